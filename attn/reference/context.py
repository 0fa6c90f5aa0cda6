"""Attention of packed new tokens over a KV cache: chunked context, mixed batches and cross attention.

In the context phase a prompt may arrive in chunks. Each chunk's keys and values are appended to the cache
first; then its queries attend to everything cached for their sequence: the earlier chunks and themselves, with
the causal diagonal aligned bottom-right (query ``i`` of a chunk of ``n`` sits at position ``L − n + i`` of a
cache holding ``L`` tokens). A generation token is a chunk of one. With ``causal=False`` the queries see every
cached token, which is cross attention over an encoder's cache.

A cyclic cache of ``N`` slots (``max_attention_window``, optionally with ``S`` StreamingLLM sinks) cannot take
the chunk first: appending ``n`` tokens overwrites the slots of tokens ``L − N .. L − N + n − 1``, which the
chunk's own earlier queries still see (query ``p`` sees ``p − N < j <= p``). So there the order flips: the chunk
attends to the cache *as it was before it* plus its own fresh keys and values (``k_new``, ``v_new``), and the
caller appends it afterwards. Each query ``p`` then gets exactly what `decode` would give it had the prompt
arrived one token at a time: the sinks and the last ``N − S`` tokens up to ``p``, their keys (with
``rotary_dim``) rotated by their places ``0, 1, ..`` in that frame, the query sitting at ``min(p, N − 1)``.
"""

from __future__ import annotations

import torch

from ..checks import AttentionArgs, check_context, check_flag, cyclic_slot
from .attention import _attend_one
from .decode import gather_kv
from .kv_cache import window_tokens
from .kv_quant import dequantize
from .preprocess import RopeScaling, apply_rope


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
    max_attention_window: int | None = None,
    sink_token_length: int = 0,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    rotary_dim: int = 0,
    rope_base: float = 10000.0,
    rope_style: str = "neox",
    rope_scaling: RopeScaling | None = None,
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
            them first). With ``max_attention_window``: the tokens cached *before* this chunk (its own come as
            ``k_new``/``v_new``; append them after this call).
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
        max_attention_window: the cache is cyclic with ``N`` slots (see `append_kv`): query ``p`` sees the keys
            ``p − N < j <= p``, read from the cache as it was before this chunk and from ``k_new``/``v_new``.
            The cache is not modified. Needs ``causal``.
        sink_token_length: StreamingLLM's ``S`` sinks (see `append_kv`): query ``p`` sees tokens ``0..S-1`` too,
            and only the last ``N − S`` before it.
        k_new: the chunk's keys, packed like q: ``[T, Hkv, D]`` in q's dtype, as they will be appended (before
            RoPE when ``rotary_dim`` is set, unquantized for a quantized cache: the fresh keys are used at full
            precision). Only with ``max_attention_window``.
        v_new: the chunk's values, likewise.
        rotary_dim: if > 0, the keys are cached and given unrotated and turn here by their position in the
            query's frame, as `decode` does (sinks ``0..S-1``, then the rolling tokens in order); query ``p``
            must come rotated at ``min(p, N − 1)``, its own place once its token is appended.
        rope_base: RoPE's frequency base θ, with ``rotary_dim``.
        rope_style: ``"neox"`` or ``"gptj"``, with ``rotary_dim``.
        rope_scaling: a `RopeScaling` variant, with ``rotary_dim``; its frequencies serve ``N`` positions.
        return_lse: also return the log-sum-exp ``[Hq, T]``.
        validate: check lengths and block-table entries on the host (the cyclic path reads the lengths on the
            host regardless).

    Returns:
        ``out [T, Hq, D]`` in q's dtype, and with ``return_lse`` also float32 ``lse [Hq, T]``.
    """
    check_flag("return_lse", return_lse)
    args = check_context(
        q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
        block_table=block_table, causal=causal, softmax_scale=softmax_scale, q_scaling=q_scaling,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, alibi_mode=alibi_mode,
        rel_bias=rel_bias, k_scale=k_scale, v_scale=v_scale, validate=validate,
        max_attention_window=max_attention_window, sink_token_length=sink_token_length, k_new=k_new, v_new=v_new,
        rotary_dim=rotary_dim, rope_style=rope_style,
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
    if max_attention_window is not None:
        rope = dict(rotary_dim=rotary_dim, base=rope_base, style=rope_style, scaling=rope_scaling,
                    num_positions=max_attention_window)  # fmt: skip
        _cyclic(q, k_cache, v_cache, cache_seqlens.tolist(), bounds, block_table, k_new, v_new, opts, args, rope,
                out, lse)  # fmt: skip
        return (out, lse) if return_lse else out
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


def _cyclic(q, k_cache, v_cache, lengths, bounds, block_table, k_new, v_new, opts, args, rope, out, lse) -> None:
    """The cyclic path, one query at a time: each query's frame is rebuilt from the cache before the chunk and
    the chunk's fresh keys, then attended exactly as `decode` attends its one new token."""
    c = args.cache
    window, sinks = c.max_attention_window, c.sink_token_length
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    for b, cached in enumerate(lengths):
        lo, hi = bounds[b], bounds[b + 1]
        if hi == lo:
            continue
        # every token any query of the chunk may see, in token order: what the cache still holds, then the chunk
        tokens = torch.cat([_frame(cached, window, sinks), torch.arange(cached, cached + hi - lo)])
        slots = cyclic_slot(tokens[: len(tokens) - (hi - lo)], window, sinks)
        k, v = _read(k_cache, slots, b, block_table), _read(v_cache, slots, b, block_table)
        if c.k_scale is not None:
            k, v = dequantize(k, c.k_scale, dtype), dequantize(v, c.v_scale, dtype)
        k = torch.cat([k.to(dtype), k_new[lo:hi].to(dtype)])
        v = torch.cat([v.to(dtype), v_new[lo:hi].to(dtype)])
        for i in range(hi - lo):
            # the cache query p would read had its token just been appended: the sinks and the last N - S tokens
            frame = torch.searchsorted(tokens, _frame(cached + i + 1, window, sinks))
            frame = frame.to(k.device)
            k_frame = k[frame]
            if rope["rotary_dim"]:
                # position shift, as in decode: key n of the frame turns by n, whatever its token number
                k_frame = apply_rope(k_frame, torch.arange(len(frame), device=k.device), **rope)
            o, l = _attend_one(q[lo + i : lo + i + 1], k_frame, v[frame], opts, b)
            out[lo + i] = o[0].to(q.dtype)
            lse[:, lo + i] = l[:, 0].float()


def _frame(length: int, window: int, sinks: int) -> torch.Tensor:
    """`window_tokens`, also for a sequence shorter than its sinks (then simply all of its tokens)."""
    return torch.arange(length) if length <= sinks else window_tokens(length, window, sinks)


def _read(cache: torch.Tensor, slots: torch.Tensor, b: int, block_table: torch.Tensor | None) -> torch.Tensor:
    """Sequence ``b``'s rows at these slots of a contiguous cache, or of its blocks in a paged pool."""
    slots = slots.to(cache.device)
    if block_table is None:
        return cache[b, slots]
    block_size = cache.shape[1]
    return cache[block_table[b, slots // block_size].long(), slots % block_size]
