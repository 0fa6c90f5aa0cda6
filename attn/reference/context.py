"""Attention of packed new tokens over a KV cache: chunked context, mixed batches and cross attention.

In the context phase a prompt may arrive in chunks. Each chunk's keys and values are appended to the cache
first; then its queries attend to everything cached for their sequence: the earlier chunks and themselves, with
the causal diagonal aligned bottom-right (query ``i`` of a chunk of ``n`` sits at position ``L − n + i`` of a
cache holding ``L`` tokens). A generation token is a chunk of one. With ``causal=False`` the queries see every
cached token, which is cross attention over an encoder's cache.
"""

from __future__ import annotations

import torch

from ..checks import AttentionArgs, check_context
from .attention import _attend_one
from .decode import gather_kv
from .kv_quant import dequantize


def context_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int | None = None,
    block_table: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    q_scaling: float = 1.0,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    alibi_mode: str = "alibi",
    rel_bias=None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    return_lse: bool = False,
    validate: bool = True,
):
    """Packed queries attending over their sequences' cached keys and values.

    Args:
        q: packed ``[T, Hq, D]``: sequence ``b``'s queries are rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
        k_cache: contiguous ``[B, max_len, Hkv, D]`` or paged pool ``[num_blocks, block_size, Hkv, D]``; q's dtype,
            or int8 / float8_e4m3fn with ``k_scale`` and ``v_scale``.
        v_cache: same shape and dtype as ``k_cache``.
        cache_seqlens: int32 ``[B]``, tokens in each sequence's cache, the queries' own tokens included (append
            them first).
        cu_seqlens_q: int32 ``[B+1]``, prefix sums of the query counts (0 is allowed: a sequence with no new
            tokens this step).
        max_seqlen_q: the longest query count; read from ``cu_seqlens_q`` when None.
        block_table: int32 ``[B, max_blocks]`` for a paged pool, else None.
        causal: the queries are the last tokens of their cache, bottom-right causal. False: every query sees
            every cached token (cross attention).
        softmax_scale: multiplier of the scores; defaults to ``1/sqrt(D)``.
        q_scaling: TensorRT-LLM's divisor of the scale.
        window_size: ``(left, right)`` sliding window around the diagonal; -1 is unbounded.
        softcap: if > 0, scores become ``softcap·tanh(s/softcap)`` after scaling.
        alibi_slopes: ALiBi slopes, float ``[Hq]`` or ``[B, Hq]``, as in `attn.reference.attention`.
        alibi_mode: ``"alibi"`` or ``"alibi_with_scale"``.
        rel_bias: a T5 ``RelativeBias`` (query ``i`` of a chunk of ``n`` at position ``L − n + i``).
        k_scale: for an int8 / float8_e4m3fn cache, the K dequantization scale, float ``[1]`` or ``[Hkv]``.
        v_scale: likewise for V.
        return_lse: also return the log-sum-exp ``[Hq, T]``.
        validate: check lengths and block-table entries on the host.

    Returns:
        ``out [T, Hq, D]`` in q's dtype, and with ``return_lse`` also float32 ``lse [Hq, T]``.
    """
    args = check_context(
        q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
        block_table=block_table, causal=causal, softmax_scale=softmax_scale, q_scaling=q_scaling,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, alibi_mode=alibi_mode,
        rel_bias=rel_bias, k_scale=k_scale, v_scale=v_scale, validate=validate,
    )  # fmt: skip
    c = args.cache
    # each sequence is one call of the context phase's per-sequence attention, the cache's tokens as its keys
    opts = AttentionArgs(
        packed=False, batch=c.batch, num_heads_q=c.num_heads_q, num_heads_kv=c.num_heads_kv,
        head_dim=c.head_dim, max_seqlen_q=args.max_seqlen_q, max_seqlen_k=c.capacity, seqlens_q=None,
        seqlens_k=None, scale=c.scale, window_left=c.window_left, window_right=c.window_right,
        softcap=c.softcap, alibi_slopes=c.alibi_slopes, alibi_with_scale=c.alibi_with_scale,
        rel_bias=c.rel_bias,
    )  # fmt: skip
    out = torch.empty_like(q)
    lse = torch.empty(c.num_heads_q, args.num_tokens, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens_q.tolist()
    for b, seqlen in enumerate(cache_seqlens.tolist()):
        lo, hi = bounds[b], bounds[b + 1]
        if hi == lo:
            continue
        k = gather_kv(k_cache, seqlen, b, block_table)
        v = gather_kv(v_cache, seqlen, b, block_table)
        if c.k_scale is not None:
            # the quantized cache means what it dequantizes to
            dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            k, v = dequantize(k, c.k_scale, dtype), dequantize(v, c.v_scale, dtype)
        o, l = _attend_one(q[lo:hi], k, v, opts, b)
        out[lo:hi] = o.to(q.dtype)
        lse[:, lo:hi] = l.float()
    return (out, lse) if return_lse else out
