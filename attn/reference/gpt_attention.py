"""TensorRT-LLM's GPT attention op, one request at a time: the definition the batched kernels are checked against.

One step of a serving engine hands the op a packed buffer of fused QKV projections ``[T, (Hq + 2·Hkv)·D]``:
the new tokens of every request, request after request (`attn.inflight.InflightBatch` says whose rows are
whose). For each request the op

1. splits its rows into q, k and v heads, adds the QKV bias and rotates q and k by their positions
   (``past + i`` for the request's ``i``-th new token);
2. appends k and v to the request's cache (quantizing them for an INT8/FP8 cache);
3. lets each new query attend, causally, to everything the cache now holds for that request: a prompt chunk
   sees the earlier chunks and itself, a generation token sees the whole history.

The reference does exactly that, request by request, with the reference pre-processing and attention.
"""

from __future__ import annotations

import torch

from ..checks import check_gpt_attention
from .context import context_attention
from .preprocess import RopeScaling, preprocess


def gpt_attention(
    qkv: torch.Tensor,
    batch,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    num_heads_q: int,
    num_heads_kv: int,
    qkv_bias: torch.Tensor | None = None,
    rotary_dim: int = 0,
    rope_base: float = 10000.0,
    rope_style: str = "neox",
    rope_scaling: RopeScaling | None = None,
    softmax_scale: float | None = None,
    q_scaling: float = 1.0,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    alibi_mode: str = "alibi",
    rel_bias=None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    mode: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """One inflight-batching step of attention over a mixed batch of context and generation requests.

    Args:
        qkv: packed fused projections ``[T, (Hq + 2·Hkv)·D]`` of every request's new tokens, in the batch's
            order; within a row the q heads, then k, then v. The cache's dtype (or q's, for a quantized cache).
        batch: the step's `attn.inflight.InflightBatch`.
        k_cache: contiguous ``[B, max_len, Hkv, D]`` (row ``b`` is request ``b``) or a paged pool
            ``[num_blocks, block_size, Hkv, D]`` read through ``batch.block_table``; updated in place.
        v_cache: same shape and dtype as ``k_cache``.
        num_heads_q: Hq.
        num_heads_kv: Hkv.
        qkv_bias: ``[(Hq + 2·Hkv)·D]`` added to every row first, or None.
        rotary_dim: features of each q/k head to rotate; 0 disables RoPE.
        rope_base: RoPE's base θ.
        rope_style: ``"neox"`` or ``"gptj"``.
        rope_scaling: a `RopeScaling`, or None.
        softmax_scale: multiplier of the scores; defaults to ``1/sqrt(D)``.
        q_scaling: TensorRT-LLM's divisor of the scale.
        window_size: ``(left, right)`` sliding window; -1 is unbounded.
        softcap: if > 0, scores become ``softcap·tanh(s/softcap)``.
        alibi_slopes: ALiBi slopes ``[Hq]`` or ``[B, Hq]``.
        alibi_mode: ``"alibi"`` or ``"alibi_with_scale"``.
        rel_bias: a T5 ``RelativeBias``.
        k_scale: for an int8 / float8_e4m3fn cache, the K dequantization scale ``[1]`` or ``[Hkv]``.
        v_scale: likewise for V.
        mode: how the fast op schedules the attention: ``"unified"``, ``"split"``, or None for split when the
            batch has a block table; the reference accepts it to keep the signatures equal.
        validate: check lengths and block-table entries on the host.

    Returns:
        ``out [T, Hq, D]`` in qkv's dtype: each new token's attention output.
    """
    # the reference runs request by request whatever the schedule; mode is checked so both refuse the same calls
    check_gpt_attention(
        qkv, batch, k_cache, v_cache, num_heads_q=num_heads_q, num_heads_kv=num_heads_kv, qkv_bias=qkv_bias,
        rotary_dim=rotary_dim, rope_style=rope_style, softmax_scale=softmax_scale, q_scaling=q_scaling,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, alibi_mode=alibi_mode,
        rel_bias=rel_bias, k_scale=k_scale, v_scale=v_scale, validate=validate, mode=mode,
    )  # fmt: skip
    d = qkv.shape[1] // (num_heads_q + 2 * num_heads_kv)
    out = torch.empty(batch.num_tokens, num_heads_q, d, dtype=qkv.dtype, device=qkv.device)
    bounds = batch.cu_seqlens_new.tolist()
    for b in range(batch.batch):
        lo, hi = bounds[b], bounds[b + 1]
        one = torch.tensor([0, hi - lo], dtype=torch.int32, device=qkv.device)
        if batch.block_table is None:
            # a contiguous cache: this request's row, as a one-request cache (a view: writes land in place)
            k_b, v_b, table = k_cache[b : b + 1], v_cache[b : b + 1], None
        else:
            k_b, v_b, table = k_cache, v_cache, batch.block_table[b : b + 1]
        slopes = alibi_slopes[b : b + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        # steps 1 and 2: bias, RoPE at positions past + i, append (quantized) to the cache
        q = preprocess(
            qkv[lo:hi], k_b, v_b, batch.cache_seqlens_before[b : b + 1], num_heads_q=num_heads_q,
            num_heads_kv=num_heads_kv, cu_seqlens_new=one, block_table=table, qkv_bias=qkv_bias,
            rotary_dim=rotary_dim, rope_base=rope_base, rope_style=rope_style, rope_scaling=rope_scaling,
            k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
        # step 3: the new queries over the whole cache of the request, bottom-right causal
        out[lo:hi] = context_attention(
            q, k_b, v_b, batch.cache_seqlens_after[b : b + 1], cu_seqlens_q=one, block_table=table, causal=True,
            softmax_scale=softmax_scale, q_scaling=q_scaling, window_size=window_size, softcap=softcap,
            alibi_slopes=slopes, alibi_mode=alibi_mode, rel_bias=rel_bias, k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
    return out
