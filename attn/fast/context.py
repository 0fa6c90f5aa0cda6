"""Packed queries over a KV cache in Triton: chunked context, mixed prefill/decode batches, cross attention.

This is the fused context-phase kernel of `attn.fast.attention` reading its keys and values from a cache
instead of from packed K/V: the same masked/unmasked tile split, online softmax and launch order, with three
compile-time switches. ``KV_CACHE`` takes each sequence's key count from ``cache_seqlens`` and its rows from
row ``b`` of a contiguous cache; ``IS_PAGED`` gathers each K/V tile through the block table; ``QUANT`` reads
an INT8 or FP8 cache, converting each tile to the query's type (exact: int8 and e4m3 values are fp16/bf16
numbers), multiplying the K scale into the scores and the V scale into the output. ``PACK`` packs GQA: the
query heads of one KV head share a program, its tile rows being tokens × heads, so each K/V tile is read once per
group and a one-token generation request fills a group's worth of rows rather than one.
"""

from __future__ import annotations

import torch
import triton

from ..checks import check_context
from ._triton import autotune_enabled, is_interpreter, next_power_of_2
from .attention import LOG2E, _attn_fwd_kernel, _attn_fwd_tuned, _fixed_config, relative_bias_operands
from .kv_cache import quant_code

MAX_PACK = 16  # the smallest tile has 16 rows (tl.dot's minimum); a larger group is split into packs


def gqa_pack(group_size: int) -> int:
    """How many query heads of a KV head share a program's tile: the whole group when it fits in 16 rows,
    else its largest divisor that does (MQA with 32 heads: packs of 16)."""
    return max(p for p in range(1, min(group_size, MAX_PACK) + 1) if group_size % p == 0)


def _context_config(head_dim_pad: int, dtype: torch.dtype, rows: int) -> dict:
    """The config when not autotuning; ``rows`` is the longest sequence's tile rows (query tokens × pack)."""
    if not is_interpreter() and head_dim_pad <= 128 and rows <= 32:
        # generation requests and short chunks: most of a 128-row tile would be padding (the autotuner weighs
        # such tiles itself, see attention._keep)
        return {"BLOCK_M": 16 if rows <= 16 else 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
    return _fixed_config(head_dim_pad, dtype)


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
    """Packed queries attending over their sequences' cached keys and values; same contract as
    `attn.reference.context_attention`.

    Args:
        q: packed ``[T, Hq, D]``, float16/bfloat16/float32.
        k_cache: contiguous ``[B, max_len, Hkv, D]`` or paged pool ``[num_blocks, block_size, Hkv, D]``; q's dtype
            or int8 / float8_e4m3fn with ``k_scale`` and ``v_scale``; unit stride along D.
        v_cache: same shape and dtype as ``k_cache``.
        cache_seqlens: int32 ``[B]``, tokens in each cache, the queries' own tokens included.
        cu_seqlens_q: int32 ``[B+1]``, prefix sums of the query counts per sequence.
        max_seqlen_q: the longest query count (pass it with ``validate=False`` to avoid a host read).
        block_table: int32 ``[B, max_blocks]`` for a paged pool, else None.
        causal: bottom-right causal (queries are their cache's last tokens); False for cross attention.
        softmax_scale: multiplier of the scores; defaults to ``1/sqrt(D)``.
        q_scaling: TensorRT-LLM's divisor of the scale.
        window_size: ``(left, right)`` sliding window around the diagonal; -1 is unbounded.
        softcap: if > 0, scores become ``softcap·tanh(s/softcap)`` after scaling.
        alibi_slopes: ALiBi slopes, float ``[Hq]`` or ``[B, Hq]``, computed in the kernel.
        alibi_mode: ``"alibi"`` or ``"alibi_with_scale"``.
        rel_bias: a T5 ``RelativeBias``, as in `attn.fast.attention`.
        k_scale: for an int8 / float8_e4m3fn cache, the K dequantization scale, float ``[1]`` or ``[Hkv]``.
        v_scale: likewise for V.
        return_lse: also return the log-sum-exp ``[Hq, T]``.
        validate: check lengths and block-table entries on the host before launching. Turn it off only for
            inputs already checked (inside CUDA-graph capture, for example).

    Returns:
        ``out [T, Hq, D]`` in q's dtype, and with ``return_lse`` also float32 ``lse [Hq, T]``.
    """
    args = check_context(
        q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
        block_table=block_table, causal=causal, softmax_scale=softmax_scale, q_scaling=q_scaling,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, alibi_mode=alibi_mode,
        rel_bias=rel_bias, k_scale=k_scale, v_scale=v_scale, validate=validate,
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
    )  # fmt: skip
    c = args.cache
    if c.head_dim > 256:
        raise ValueError(f"q's head dim must be at most 256 for the fused kernel, got {c.head_dim}")
    if q.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"q must be a CUDA tensor (or run with TRITON_INTERPRET=1), got device {q.device}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        # a cache is updated in place by the append step, so it is never silently copied here
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along the head dim, got strides {x.stride()}")
    if q.stride(-1) != 1:
        q = q.contiguous()

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(c.num_heads_q, args.num_tokens, dtype=torch.float32, device=q.device) if return_lse else None
    if args.num_tokens == 0 or c.batch == 0 or args.max_seqlen_q == 0:
        return (out, lse) if return_lse else out

    if c.softcap > 0:
        qk_scale, cap_log2 = c.scale / c.softcap, c.softcap * LOG2E
    else:
        qk_scale, cap_log2 = c.scale * LOG2E, 0.0
    head_dim_pad = max(16, next_power_of_2(c.head_dim))
    max_rows = args.max_seqlen_q
    pack = gqa_pack(c.group_size)

    def grid(meta):
        # a program: one KV head's `pack` query heads over BLOCK_M // pack tokens of one sequence
        return (c.batch * (c.num_heads_q // pack) * triton.cdiv(max_rows, meta["BLOCK_M"] // pack),)

    quant = quant_code(k_cache.dtype)
    placeholder = cache_seqlens
    rel_mode, rel_t, rel_strides, rel_md = relative_bias_operands(c.rel_bias, placeholder)
    slopes = c.alibi_slopes if c.alibi_slopes is not None else placeholder
    slope_strides = c.alibi_slopes.stride() if c.alibi_slopes is not None else (0, 0)
    if autotune_enabled():
        kernel, meta = _attn_fwd_tuned, {}
    else:
        kernel, meta = _attn_fwd_kernel, _context_config(head_dim_pad, q.dtype, pack * max_rows)
    kernel[grid](
        q, k_cache, v_cache, out, lse if lse is not None else out,
        cu_seqlens_q, cache_seqlens, slopes, *slope_strides, rel_t, *rel_strides, rel_md,
        block_table if block_table is not None else placeholder,
        block_table.stride(0) if block_table is not None else 0,
        c.page_size if c.paged else 1,
        c.k_scale if quant else placeholder, c.v_scale if quant else placeholder,
        0, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        0, out.stride(0), out.stride(1),
        0, *(lse.stride() if lse is not None else (0, 0)),
        c.num_heads_q, c.group_size, args.num_tokens, max_rows,
        qk_scale, cap_log2, c.window_left, c.window_right, next_power_of_2(max_rows),
        HEAD_DIM=c.head_dim, HEAD_DIM_PAD=head_dim_pad,
        IS_VARLEN=True, KV_CACHE=True, IS_PAGED=c.paged, QUANT=quant,
        HAS_WINDOW_LEFT=c.window_left >= 0, HAS_WINDOW_RIGHT=c.window_right >= 0, HAS_SOFTCAP=c.softcap > 0,
        HAS_ALIBI=c.alibi_slopes is not None, ALIBI_WITH_SCALE=c.alibi_with_scale, REL_MODE=rel_mode,
        STORE_LSE=lse is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PACK=pack,
        **meta,
    )  # fmt: skip
    return (out, lse) if return_lse else out
