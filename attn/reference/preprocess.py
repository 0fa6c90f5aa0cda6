"""The generation phase's pre-processing, written to be read: QKV bias, rotary embedding, append to the cache.

Before attending, each new token's fused projection ``qkv`` (TensorRT-LLM's input: ``[T, (Hq + 2·Hkv)·D]``) is
split into heads, the bias is added, q and k are rotated by their positions (RoPE), and k and v are written
into the KV cache. TensorRT-LLM's generation kernel does all of this in one pass; ``attn.fast.preprocess``
does too.

RoPE (Su et al., 2021) rotates pairs of features of q and k by an angle proportional to the token's position,
``θ_i = base^(-2i/r)`` for pair ``i`` of the first ``r = rotary_dim`` features, so that ``q_m · k_n`` depends
on ``m − n`` only. Two pairings are in use:

- ``"neox"`` (GPT-NeoX, Llama, HF's ``rotate_half``): pair ``i`` is features ``(i, i + r/2)``;
- ``"gptj"`` (GPT-J, interleaved): pair ``i`` is features ``(2i, 2i + 1)``.

Features ``r..D`` pass through unrotated (partial rotary, e.g. GPT-NeoX's ``rotary_pct = 0.25``).
"""

from __future__ import annotations

import torch

from ..checks import check_preprocess
from .kv_cache import append_kv


def rope_inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """``θ_i = base^(-2i/r)`` for ``i < r/2``, in float32 (computed as Hugging Face's RoPE does)."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def pair_indices(rotary_dim: int, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two feature indices of each rotated pair: ``(first, second)``, each ``[r/2]``."""
    i = torch.arange(rotary_dim // 2)
    if style == "neox":
        return i, i + rotary_dim // 2
    return 2 * i, 2 * i + 1


def rope_cos_sin(num_positions: int, rotary_dim: int, base: float = 10000.0, device=None):
    """The cos/sin table of every position below ``num_positions``: ``(cos, sin)``, float32 ``[P, r/2]`` each.

    The angle ``p·θ_i`` is formed in float32, as Hugging Face does, and its cos and sin are taken accurately.
    Kernels read this table instead of evaluating cos/sin themselves: the GPU's fast cos/sin lose accuracy
    for angles of thousands of radians (position 100k at θ_0 = 1), and a scaled RoPE variant is just another
    table.
    """
    positions = torch.arange(num_positions, device=device, dtype=torch.float32)
    angles = positions[:, None] * rope_inv_freq(rotary_dim, base).to(device)[None, :]  # [P, r/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(
    x: torch.Tensor, positions: torch.Tensor, *, rotary_dim: int | None = None, base: float = 10000.0, style="neox"
) -> torch.Tensor:
    """Rotates the first ``rotary_dim`` features of every head of ``x`` by its token's position.

    Args:
        x: ``[T, H, D]``.
        positions: int ``[T]``, each token's position in its sequence.
        rotary_dim: features rotated (even, at most D); defaults to D.
        base: the frequency base θ (10000 in most models).
        style: ``"neox"`` or ``"gptj"`` pairing.

    Returns:
        ``[T, H, D]`` in x's dtype; angles in float32 as in Hugging Face, the rotation in float32.
    """
    rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
    num_positions = int(positions.max()) + 1 if positions.numel() else 1
    cos_table, sin_table = rope_cos_sin(num_positions, rotary_dim, base, x.device)
    cos, sin = cos_table[positions.long()][:, None, :], sin_table[positions.long()][:, None, :]  # [T, 1, r/2]
    first, second = (idx.to(x.device) for idx in pair_indices(rotary_dim, style))
    out = x.float().clone()
    a, b = out[..., first], out[..., second]  # [T, H, r/2] each (copies)
    out[..., first] = a * cos - b * sin
    out[..., second] = b * cos + a * sin
    return out.to(x.dtype)


def preprocess(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    num_heads_q: int,
    num_heads_kv: int,
    cu_seqlens_new: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    qkv_bias: torch.Tensor | None = None,
    rotary_dim: int = 0,
    rope_base: float = 10000.0,
    rope_style: str = "neox",
) -> torch.Tensor:
    """Splits, biases and rotates new tokens' fused QKV, appends their K/V to the cache, and returns q.

    Args:
        qkv: new tokens' fused projections, packed ``[T, (Hq + 2·Hkv)·D]`` with ``cu_seqlens_new``, or padded
            ``[B, S_new, (Hq + 2·Hkv)·D]``; the cache's dtype. Within a row: the q heads, then k, then v.
        k_cache: contiguous ``[B, max_len, Hkv, D]`` or paged pool ``[num_blocks, block_size, Hkv, D]``.
        v_cache: same shape and dtype as ``k_cache``.
        cache_seqlens: int32 ``[B]``, tokens cached before these; new token ``i`` of sequence ``b`` is at
            position ``cache_seqlens[b] + i`` (its RoPE angle and its cache slot). Not updated here.
        num_heads_q: Hq.
        num_heads_kv: Hkv.
        cu_seqlens_new: int32 ``[B+1]``, prefix sums of the new tokens per sequence (packed ``qkv``).
        block_table: int32 ``[B, max_blocks]`` for a paged pool, else None.
        qkv_bias: ``[(Hq + 2·Hkv)·D]`` added to every row before anything else, or None.
        rotary_dim: features of each q/k head to rotate (even, at most D); 0 disables RoPE.
        rope_base: the frequency base θ.
        rope_style: ``"neox"`` or ``"gptj"``.

    Returns:
        ``q`` shaped ``[T, Hq, D]`` (packed) or ``[B, S_new, Hq, D]`` (padded), rotated, in qkv's dtype.
    """
    args = check_preprocess(
        qkv, k_cache, v_cache, cache_seqlens, num_heads_q, num_heads_kv, cu_seqlens_new, block_table, qkv_bias,
        rotary_dim, rope_style,
    )  # fmt: skip
    d = args.head_dim
    # bias and rotation in float32, one rounding to the cache's dtype at the end
    rows = qkv.reshape(-1, (num_heads_q + 2 * num_heads_kv) * d).float()
    if qkv_bias is not None:
        rows = rows + qkv_bias.float()
    heads = rows.view(-1, num_heads_q + 2 * num_heads_kv, d)
    q = heads[:, :num_heads_q]
    k = heads[:, num_heads_q : num_heads_q + num_heads_kv]
    v = heads[:, num_heads_q + num_heads_kv :]
    if rotary_dim:
        positions = args.positions
        q = apply_rope(q, positions, rotary_dim=rotary_dim, base=rope_base, style=rope_style)
        k = apply_rope(k, positions, rotary_dim=rotary_dim, base=rope_base, style=rope_style)
    q, k, v = (x.to(qkv.dtype) for x in (q, k, v))
    if args.packed:
        append_kv(k_cache, v_cache, k, v, cache_seqlens, cu_seqlens_new=cu_seqlens_new, block_table=block_table)
        return q.contiguous()
    b, s = qkv.shape[:2]
    append_kv(
        k_cache, v_cache, k.reshape(b, s, num_heads_kv, d), v.reshape(b, s, num_heads_kv, d), cache_seqlens,
        block_table=block_table,
    )  # fmt: skip
    return q.reshape(b, s, num_heads_q, d).contiguous()
