"""Generation-phase attention over a KV cache, written to be read.

A decode step has a few new query tokens per sequence (one for plain decoding, several for speculative
decoding) whose keys and values are already in the cache. Each query attends to its sequence's cached tokens
with the context phase's semantics: bottom-right alignment (the last query is the newest token), windows,
soft-capping, ``q_scaling``.

Two cache layouts:

- contiguous: ``k_cache, v_cache [B, max_len, Hkv, D]``; sequence ``b`` owns row ``b``;
- paged: pools ``k_cache, v_cache [num_blocks, block_size, Hkv, D]`` and ``block_table [B, max_blocks]``;
  token ``t`` of sequence ``b`` lives in block ``block_table[b, t // block_size]`` at slot ``t % block_size``.
"""

from __future__ import annotations

import torch

from ..checks import AttentionArgs, check_decode, check_flag, check_seqlen_hints, cyclic_slot
from .attention import _attend_one
from .kv_cache import window_tokens
from .kv_quant import dequantize
from .preprocess import RopeScaling, apply_rope


def gather_kv(
    cache: torch.Tensor,
    seqlen: int,
    b: int,
    block_table: torch.Tensor | None = None,
    window: int | None = None,
    sinks: int = 0,
) -> torch.Tensor:
    """The cached tokens of sequence ``b``, in order: the first ``seqlen``, or for a cyclic cache of ``window``
    slots the last ``min(seqlen, window)`` of them (token ``t`` in slot ``t mod window``), or with ``sinks``
    the first ``sinks`` tokens and then the last ``window − sinks`` (see `attn.reference.window_tokens`).

    Args:
        cache: contiguous ``[B, max_len, Hkv, D]`` or a paged pool ``[num_blocks, block_size, Hkv, D]``.
        seqlen: how many tokens to read.
        b: the sequence.
        block_table: int32 ``[B, max_blocks]`` for a paged pool, else None.
        window: a cyclic cache's slot count N, else None.
        sinks: StreamingLLM's sink tokens S (with ``window``).

    Returns:
        ``[min(seqlen, window), Hkv, D]``.
    """
    t = window_tokens(seqlen, window, sinks).to(cache.device)
    if window is not None:
        t = cyclic_slot(t, window, sinks)
    if block_table is None:
        return cache[b, t]
    block_size = cache.shape[1]
    blocks = block_table[b, t // block_size].long()
    return cache[blocks, t % block_size]


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    causal: bool = False,
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
    rotary_dim: int = 0,
    rope_base: float = 10000.0,
    rope_style: str = "neox",
    rope_scaling: RopeScaling | None = None,
    cache_indirection: torch.Tensor | None = None,
    return_lse: bool = False,
    num_splits: int | None = None,
    max_seqlen_k: int | None = None,
    total_seqlen_k: int | None = None,
    validate: bool = True,
):
    """Decode-step attention of new tokens over a contiguous or paged KV cache.

    Args:
        q: ``[B, Sq, Hq, D]``, the new tokens' queries (``Sq`` is 1 for plain decoding).
        k_cache: contiguous ``[B, max_len, Hkv, D]`` or paged pool ``[num_blocks, block_size, Hkv, D]``;
            q's dtype, or int8 / float8_e4m3fn with ``k_scale`` and ``v_scale``.
        v_cache: same shape and dtype as ``k_cache``.
        cache_seqlens: int32 ``[B]``, tokens in each sequence's cache, the new ones included.
        block_table: int32 ``[B, max_blocks]`` mapping each sequence's logical blocks to pool blocks; None for
            a contiguous cache.
        causal: bottom-right causal among the new tokens (query ``i`` sees key ``j`` iff
            ``j <= i + L - Sq``); irrelevant when ``Sq = 1``.
        softmax_scale: multiplier of the scores; defaults to ``1/sqrt(D)``.
        q_scaling: TensorRT-LLM's divisor of the scale.
        window_size: ``(left, right)`` sliding window around the diagonal; -1 is unbounded.
        softcap: if > 0, scores become ``softcap·tanh(s/softcap)`` after scaling.
        alibi_slopes: ALiBi slopes, float ``[Hq]`` or ``[B, Hq]``, as in `attn.reference.attention`.
        alibi_mode: ``"alibi"`` or ``"alibi_with_scale"``, as in `attn.reference.attention`.
        rel_bias: a T5 ``RelativeBias``, as in `attn.reference.attention` (the query sits at position
            ``L − Sq + i``).
        k_scale: for an int8 / float8_e4m3fn cache, the K dequantization scale, float ``[1]`` or ``[Hkv]``.
        v_scale: likewise for V.
        max_attention_window: the cache is cyclic with this many slots (see `append_kv`): the queries see the
            last ``min(L, N)`` tokens, which is TensorRT-LLM's sliding window ``p − N < j <= p`` for the newest
            token; combine with ``window_size`` for anything narrower.
        sink_token_length: StreamingLLM's ``S`` sink tokens (see `append_kv`): the queries see the sinks and
            the last ``N − S`` tokens, ``min(L, N)`` keys in all, which form the frame of positions below.
        rotary_dim: if > 0, the keys were cached *before* RoPE (as `preprocess` stores them when the sinks
            are on) and are rotated here, each by its position within the cache: sinks ``0..S-1``, then the
            window's tokens at consecutive positions in token order (TensorRT-LLM's position shift). The
            queries must already be rotated at their own positions in that frame (`preprocess` does it).
        rope_base: RoPE's frequency base θ, with ``rotary_dim``.
        rope_style: ``"neox"`` or ``"gptj"``, with ``rotary_dim``.
        rope_scaling: a `RopeScaling` variant, with ``rotary_dim``; its frequencies serve ``N`` positions
            (the frame never exceeds the cache), or the capacity without a window.
        cache_indirection: beam search (TensorRT-LLM's layout): int32 ``[B, beam_width, max_len]``. The batch of
            ``q`` and the cache rows are the ``B·beam_width`` beams, beam ``i`` of request ``b`` at row
            ``b·beam_width + i``; its token ``t`` is read from the row of beam ``cache_indirection[b, i, t]``, so
            beams that share a history share its cache entries instead of copying them.
        return_lse: also return the log-sum-exp ``[B, Hq, Sq]``.
        num_splits: how many parts the fast kernel splits each cache into (None: chosen automatically). The
            result does not depend on it; the reference accepts it to keep the signatures equal.
        max_seqlen_k: the longest ``cache_seqlens`` entry, a hint for the fast kernel's split heuristic; the
            reference accepts it (and ``total_seqlen_k``) to keep the signatures equal.
        total_seqlen_k: the sum of ``cache_seqlens``, likewise.
        validate: check lengths and block-table entries against the cache (reads them on the host).

    Returns:
        ``out [B, Sq, Hq, D]`` in q's dtype, and with ``return_lse`` also float32 ``lse [B, Hq, Sq]``.
    """
    check_flag("return_lse", return_lse)
    args = check_decode(
        q, k_cache, v_cache, cache_seqlens, block_table=block_table, causal=causal, softmax_scale=softmax_scale,
        q_scaling=q_scaling, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        alibi_mode=alibi_mode, rel_bias=rel_bias, k_scale=k_scale, v_scale=v_scale,
        max_attention_window=max_attention_window, cache_indirection=cache_indirection, num_splits=num_splits,
        validate=validate, sink_token_length=sink_token_length, rotary_dim=rotary_dim, rope_style=rope_style,
    )  # fmt: skip
    check_seqlen_hints(max_seqlen_k, total_seqlen_k)
    rope_positions = max_attention_window or args.capacity
    # the per-sequence attention of the context phase, with the cache's tokens as the keys
    opts = AttentionArgs(
        packed=False, batch=args.batch, num_heads_q=args.num_heads_q, num_heads_kv=args.num_heads_kv,
        head_dim=args.head_dim, max_seqlen_q=args.seqlen_q, max_seqlen_k=args.capacity, seqlens_q=None,
        seqlens_k=None, scale=args.scale, window_left=args.window_left, window_right=args.window_right,
        softcap=args.softcap, alibi_slopes=args.alibi_slopes, alibi_with_scale=args.alibi_with_scale,
        rel_bias=args.rel_bias,
    )  # fmt: skip
    out = torch.empty_like(q)
    lse = torch.empty(args.batch, args.num_heads_q, args.seqlen_q, dtype=torch.float32, device=q.device)
    for b, seqlen in enumerate(cache_seqlens.tolist()):
        if cache_indirection is None:
            k = gather_kv(k_cache, seqlen, b, block_table, max_attention_window, args.sink_token_length)
            v = gather_kv(v_cache, seqlen, b, block_table, max_attention_window, args.sink_token_length)
        else:
            # token t comes from the beam the indirection names: a row of the same request
            beam = cache_indirection.shape[1]
            rows = (b // beam) * beam + cache_indirection[b // beam, b % beam, :seqlen].long()
            k = [gather_kv(k_cache, t + 1, int(r), block_table)[t] for t, r in enumerate(rows)]
            v = [gather_kv(v_cache, t + 1, int(r), block_table)[t] for t, r in enumerate(rows)]
            empty = k_cache.new_zeros((0, *k_cache.shape[2:]))
            k, v = (torch.stack(x) if x else empty for x in (k, v))
        if args.k_scale is not None:
            # the quantized cache means what it dequantizes to
            dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            k, v = dequantize(k, args.k_scale, dtype), dequantize(v, args.v_scale, dtype)
        if rotary_dim:
            # position shift: key i of the gathered frame is rotated by i, whatever its token number
            frame = torch.arange(k.shape[0], device=k.device)
            k = apply_rope(k, frame, rotary_dim=rotary_dim, base=rope_base, style=rope_style, scaling=rope_scaling,
                           num_positions=rope_positions)  # fmt: skip
        o, l = _attend_one(q[b], k, v, opts, b)
        out[b] = o.to(q.dtype)
        lse[b] = l.float()
    return (out, lse) if return_lse else out
