"""Appending new tokens' keys and values to a KV cache, written to be read.

The generation phase writes each new token's K and V into the cache before attending over it. Token ``t``
of sequence ``b`` (counting from the start of the sequence) lives at row ``t`` of ``cache[b]`` in a contiguous
cache, and at slot ``t % block_size`` of pool block ``block_table[b, t // block_size]`` in a paged one.

A cyclic cache of ``N`` slots (``max_attention_window``) puts token ``t`` in slot ``t mod N``; with StreamingLLM's
``S`` sink tokens (Xiao et al., 2023; ``sink_token_length``) the first ``S`` keep slots ``0..S-1`` and the rest
roll through the other ``N − S``. What TensorRT-LLM does, read in its kernels (``unfusedAttentionKernels``,
``decoderMaskedMultiheadAttentionTemplate.h``), and what we match:

- with ``position_shift_enabled`` its pre-processing kernel caches ``k`` before RoPE (``k_wo_pos``);
- before a generation step ``shiftKCache`` copies the cached keys to a scratch buffer, rotating key ``i`` of the
  frame "sinks, then the rolling part from token ``S + timestep − N`` on" by position ``i``: ``window_tokens``
  lists that frame, and `attn.reference.decode` rotates by it;
- the new token's q and k turn by ``min(past length, N)``, the next position of that frame.

One difference, on purpose: TensorRT-LLM attends the new token from registers *besides* the ``min(past, N)`` cached
tokens, so a full window holds ``N + 1`` keys at positions ``0..N``; here the new token is appended first and the
query sees ``N`` keys at ``0..N-1`` (the newest among them), the sliding window ``p − N < j <= p`` of the
specification. Distances from the query to the keys both see are the same. Not confirmed in its code this
session: how its paged KV-cache manager places sinks (it may round the sink block up to a whole block, a "sink
bubble"); our block table maps the logical slots above like any others.
"""

from __future__ import annotations

import torch

from ..checks import check_append, cyclic_slot
from .kv_quant import quantize


def slot_of(position: int, b: int, block_size: int, block_table: torch.Tensor | None) -> tuple[int, int]:
    """Where token ``position`` of sequence ``b`` lives: ``(row, slot)`` of the cache tensor's first two dims."""
    if block_table is None:
        return b, position
    return int(block_table[b, position // block_size]), position % block_size


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    cu_seqlens_new: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    max_attention_window: int | None = None,
    sink_token_length: int = 0,
) -> None:
    """Writes new tokens' K/V after each sequence's cached tokens, in place.

    Args:
        k_cache: contiguous ``[B, max_len, Hkv, D]`` or paged pool ``[num_blocks, block_size, Hkv, D]``.
        v_cache: same shape and dtype as ``k_cache``.
        k_new: new keys, padded ``[B, S_new, Hkv, D]`` (every sequence gets ``S_new`` tokens) or packed
            ``[T, Hkv, D]`` with ``cu_seqlens_new``; the cache's dtype.
        v_new: new values, shaped like ``k_new``.
        cache_seqlens: int32 ``[B]``, tokens already cached per sequence; the new ones go after them. Not
            updated here: the caller owns the lengths.
        cu_seqlens_new: int32 ``[B+1]`` prefix sums of the new tokens per sequence (packed ``k_new``).
        block_table: int32 ``[B, max_blocks]`` for a paged pool, else None.
        k_scale: for an int8 / float8_e4m3fn cache, the K dequantization scale, float ``[1]`` or ``[Hkv]``:
            new keys are quantized with it as they are written.
        v_scale: likewise for V.
        max_attention_window: makes the cache cyclic with this many slots (TensorRT-LLM's
            ``max_attention_window_size``): token ``t`` goes to slot ``t mod N``, overwriting token ``t − N``.
            ``cache_seqlens`` then counts every token ever appended.
        sink_token_length: StreamingLLM's attention sinks (TensorRT-LLM's ``sink_token_length``), with
            ``max_attention_window``: the first ``S`` tokens stay in slots ``0..S-1`` for good and token
            ``t >= S`` goes to slot ``S + (t − S) mod (N − S)``. One call may write at most ``N − S`` tokens
            past the sinks (no slot twice).

    Raises:
        ValueError: a sequence would outgrow its cache, or a block it writes to is outside the pool, or a bad
            window or sink length. Nothing is written then.
    """
    args = check_append(
        k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_new, block_table, k_scale, v_scale,
        max_attention_window, sink_token_length=sink_token_length,
    )  # fmt: skip
    starts = cache_seqlens.tolist()
    for b in range(args.batch):
        lo, hi = args.new_bounds[b], args.new_bounds[b + 1]
        for i in range(hi - lo):
            src = lo + i if args.packed else (b, i)
            position = starts[b] + i
            if max_attention_window is not None:
                position = cyclic_slot(position, max_attention_window, args.sink_token_length)
            row, slot = slot_of(position, b, args.block_size, block_table)
            k, v = k_new[src], v_new[src]  # [Hkv, D]
            if args.k_scale is not None:
                k, v = quantize(k, args.k_scale, k_cache.dtype), quantize(v, args.v_scale, v_cache.dtype)
            k_cache[row, slot] = k
            v_cache[row, slot] = v


def window_tokens(seqlen: int, window: int | None, sinks: int = 0) -> torch.Tensor:
    """The tokens a cache of ``seqlen`` tokens still holds, in token order: all of them, or for a cyclic cache of
    ``window`` slots the ``S`` sinks and then the last ``window − S`` tokens. Index ``i`` of the result is the
    token's position *within the cache*, the one RoPE uses when the sinks are on."""
    if window is None:
        return torch.arange(seqlen)
    # the oldest token of the rolling part (none yet while the sinks are still filling)
    first = min(max(sinks, seqlen - (window - sinks)), seqlen)
    return torch.cat([torch.arange(min(sinks, seqlen)), torch.arange(first, seqlen)])
