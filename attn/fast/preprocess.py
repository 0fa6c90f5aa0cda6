"""The generation phase's pre-processing as one Triton kernel: QKV bias, RoPE on q and k, append of k and v
into a contiguous or paged cache. Same contract as ``attn.reference.preprocess``.

One program handles ``BLOCK_T`` new tokens of one head: a query head (bias, rotate, write q) or a KV head
(bias, rotate k, write k and v into the cache). Every byte of ``qkv`` is read once and every output byte
written once, so the kernel's speed is bytes over bandwidth. The rotation reads cos/sin from a float32 table
(``attn.reference.rope_cos_sin``), which keeps it exact for long positions and identical to the reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _memo
from ..checks import check_preprocess, cyclic_slot
from ..reference.preprocess import RopeScaling, _lengths_after, cache_positions, check_rope_options, rope_cos_sin
from . import _errors
from ._triton import cdiv, is_interpreter, launch, next_power_of_2, unit_stride
from .kv_cache import _quantize, quant_code, write_mask

APPEND = tl.constexpr(_errors.APPEND)


@triton.jit
def _load_biased(row_ptr, bias_ptr, cols, mask, HAS_BIAS: tl.constexpr):
    x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _store(dst, x, mask, inv_scale, QUANT: tl.constexpr, SRC_TY: tl.constexpr):
    if QUANT != 0:
        # the reference rounds to qkv's dtype first and quantizes that value: the same bytes need the same steps
        tl.store(dst, _quantize(x.to(SRC_TY).to(tl.float32) * inv_scale, QUANT), mask=mask)
    else:
        tl.store(dst, x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _write_head(
    row_ptr, bias_ptr, col0, dst_ptr, offs_d, t_mask, cos, sin, idx1, idx2, pair_mask, inv_scale,
    HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr,
    QUANT: tl.constexpr,
):  # fmt: skip
    # features past the rotary dim pass through; the rotated pairs are stored separately, so no address is
    # written twice by one program
    src_ty = row_ptr.dtype.element_ty
    rest = t_mask[:, None] & (offs_d[None, :] >= ROTARY_DIM) & (offs_d[None, :] < HEAD_DIM)
    x = _load_biased(row_ptr, bias_ptr, col0 + offs_d[None, :], rest, HAS_BIAS)
    _store(dst_ptr + offs_d[None, :], x, rest, inv_scale, QUANT, src_ty)
    if ROTARY_DIM > 0:
        pm = t_mask[:, None] & pair_mask[None, :]
        # [BLOCK_T, HALF_PAD]
        x1 = _load_biased(row_ptr, bias_ptr, col0 + idx1[None, :], pm, HAS_BIAS)
        x2 = _load_biased(row_ptr, bias_ptr, col0 + idx2[None, :], pm, HAS_BIAS)
        if ROTATE:
            y1 = x1 * cos - x2 * sin
            y2 = x2 * cos + x1 * sin
        else:
            y1 = x1
            y2 = x2
        _store(dst_ptr + idx1[None, :], y1, pm, inv_scale, QUANT, src_ty)
        _store(dst_ptr + idx2[None, :], y2, pm, inv_scale, QUANT, src_ty)


@triton.jit(do_not_specialize=["num_tokens", "block_size", "num_positions", "pool_rows", "len_cap"])
def _preprocess_kernel(
    # (in the order of the earlier flat parameter list, with which ptxas emits the same SASS as before)
    qkv_ptr, bias_ptr, q_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr,
    tok_seq_ptr, tok_pos_ptr, rope_pos_ptr, block_table_ptr, k_inv_ptr, v_inv_ptr,
    stride_row, q_strides, k_strides, v_strides, stride_bt, stride_cos,
    num_tokens, block_size, num_positions, err_ptr, pool_rows, len_cap,
    NUM_HEADS_Q: tl.constexpr, NUM_HEADS_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    ROTARY_DIM: tl.constexpr, HALF_PAD: tl.constexpr, GPTJ: tl.constexpr, QUANT: tl.constexpr,
    ROTATE_K: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Operands: the fused rows ``[T, (Hq + 2·Hkv)·D]`` (row stride ``stride_row``), q ``[T, Hq, D]`` (strides
    ``(token, head)``), the caches (strides ``(batch or block, slot, head)``), each token's sequence and cache
    position. A tensor a call does not use is None: the QKV bias, the block table of a contiguous cache, the
    scales' reciprocals of a float cache, and without RoPE (``ROTARY_DIM`` 0) its positions and cos/sin tables
    (``num_positions`` rows).
    """
    HAS_BIAS: tl.constexpr = bias_ptr is not None
    IS_PAGED: tl.constexpr = block_table_ptr is not None
    stride_qt, stride_qh = q_strides
    stride_kb, stride_kn, stride_kh = k_strides
    stride_vb, stride_vn, stride_vh = v_strides
    hh = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < num_tokens
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ptr = qkv_ptr + offs_t.to(tl.int64)[:, None] * stride_row
    # the cache position a token is written to (its slot in a cyclic cache), and the one RoPE turns q by (not the
    # same with StreamingLLM's sinks, where q turns by its place within the cache)
    pos = tl.load(tok_pos_ptr + offs_t, mask=t_mask, other=0)

    # the pair of features each rotation mixes: (i, i + r/2) for GPT-NeoX, (2i, 2i + 1) for GPT-J
    offs_i = tl.arange(0, HALF_PAD)
    pair_mask = offs_i < ROTARY_DIM // 2
    if GPTJ:
        idx1 = 2 * offs_i
        idx2 = 2 * offs_i + 1
    else:
        idx1 = offs_i
        idx2 = offs_i + ROTARY_DIM // 2
    cos = 1.0  # (and sin: read only with ROTARY_DIM > 0)
    sin = 0.0
    if ROTARY_DIM > 0:
        rope_pos = tl.load(rope_pos_ptr + offs_t, mask=t_mask, other=0)
        cs_off = rope_pos.to(tl.int64)[:, None] * stride_cos + offs_i[None, :]
        # a RoPE position past the table (possible only when nothing was validated) reads nothing and is reported
        in_table = (rope_pos >= 0) & (rope_pos < num_positions)
        tl.atomic_or(err_ptr + offs_t * 0, APPEND, mask=t_mask & ~in_table & (hh == 0), sem="relaxed")
        cs_mask = (t_mask & in_table)[:, None] & pair_mask[None, :]
        # [BLOCK_T, HALF_PAD]
        cos = tl.load(cos_ptr + cs_off, mask=cs_mask, other=1.0)
        sin = tl.load(sin_ptr + cs_off, mask=cs_mask, other=0.0)

    if hh < NUM_HEADS_Q:
        dst = q_ptr + offs_t.to(tl.int64)[:, None] * stride_qt + hh * stride_qh
        _write_head(row_ptr, bias_ptr, hh * HEAD_DIM, dst, offs_d, t_mask, cos, sin, idx1, idx2, pair_mask, 1.0,
                    HEAD_DIM, ROTARY_DIM, HAS_BIAS, True, 0)  # fmt: skip
    else:
        h = hh - NUM_HEADS_Q
        seq = tl.load(tok_seq_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
        # (a token whose slot or block lies outside the cache is not written, and is reported)
        row, slot, t_mask = write_mask(seq, pos, t_mask, block_table_ptr, stride_bt, block_size, pool_rows, len_cap,
                                       err_ptr, IS_PAGED)  # fmt: skip
        k_dst = k_cache_ptr + (row * stride_kb + slot * stride_kn)[:, None] + h * stride_kh
        v_dst = v_cache_ptr + (row * stride_vb + slot * stride_vn)[:, None] + h * stride_vh
        k_inv = 1.0
        v_inv = 1.0
        if QUANT != 0:
            k_inv = tl.load(k_inv_ptr + h)
            v_inv = tl.load(v_inv_ptr + h)
        _write_head(row_ptr, bias_ptr, (NUM_HEADS_Q + h) * HEAD_DIM, k_dst, offs_d, t_mask, cos, sin, idx1, idx2,
                    pair_mask, k_inv, HEAD_DIM, ROTARY_DIM, HAS_BIAS, ROTATE_K, QUANT)  # fmt: skip
        _write_head(row_ptr, bias_ptr, (NUM_HEADS_Q + NUM_HEADS_KV + h) * HEAD_DIM, v_dst, offs_d, t_mask, cos, sin,
                    idx1, idx2, pair_mask, v_inv, HEAD_DIM, ROTARY_DIM, HAS_BIAS, False, QUANT)  # fmt: skip


_tables: dict = {}


def _cos_sin(num_positions: int, rotary_dim: int, base: float, device, scaling: RopeScaling | None):
    """The cos/sin table, kept per (rotary dim, base, scaling, device) and grown in powers of two.

    Rows of a longer table equal the shorter one's, except under ``dynamic`` scaling, whose frequencies
    depend on the length served: that table is built for exactly the call's length.

    Kept through `attn._memo.by_key`: made outside CUDA graph pools (a model's first preprocess call inside
    torch.compile(mode="reduce-overhead") otherwise left cos and sin in the graphs' pool, and torch refused to
    record: "2 tensor(s) in the cudagraph pool not tracked as outputs"), and never kept from inside stream
    capture, where the kernels that fill a table only run when the graph replays.
    """
    check_rope_options(base, scaling)
    if scaling is not None and scaling.type == "dynamic":
        return rope_cos_sin(num_positions, rotary_dim, base, device, scaling)
    key = (rotary_dim, float(base), scaling, str(device))
    table = _tables.get(key)
    if table is not None and table[0].shape[0] < num_positions:
        del _tables[key]  # too short: a longer one replaces it
    rows = max(next_power_of_2(num_positions), 4096)
    build = functools.partial(rope_cos_sin, rows, rotary_dim, base, device, scaling)
    return _memo.by_key(_tables, key, build, limit=64, device=device)


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
    rope_scaling: RopeScaling | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    max_attention_window: int | None = None,
    sink_token_length: int = 0,
    validate: bool | None = None,
) -> torch.Tensor:
    """Splits, biases and rotates new tokens' fused QKV, appends their K/V to the cache, and returns q.

    Args:
        qkv: new tokens' fused projections, packed ``[T, (Hq + 2·Hkv)·D]`` with ``cu_seqlens_new``, or padded
            ``[B, S_new, (Hq + 2·Hkv)·D]``; the cache's dtype. Within a row: the q heads, then k, then v.
        k_cache: contiguous ``[B, max_len, Hkv, D]`` or paged pool ``[num_blocks, block_size, Hkv, D]``.
        v_cache: same shape and dtype as ``k_cache``.
        cache_seqlens: int32 ``[B]``, tokens cached before these; new token ``i`` of sequence ``b`` is at
            position ``cache_seqlens[b] + i``. Not updated here.
        num_heads_q: Hq.
        num_heads_kv: Hkv.
        cu_seqlens_new: int32 ``[B+1]``, prefix sums of the new tokens per sequence (packed ``qkv``).
        block_table: int32 ``[B, max_blocks]`` for a paged pool, else None.
        qkv_bias: ``[(Hq + 2·Hkv)·D]`` added to every row before anything else, or None.
        rotary_dim: features of each q/k head to rotate (even, at most D); 0 disables RoPE.
        rope_base: the frequency base θ.
        rope_style: ``"neox"`` or ``"gptj"``.
        rope_scaling: a ``RopeScaling`` variant, or None.
        k_scale: for an int8 / float8_e4m3fn cache, the K dequantization scale, float ``[1]`` or ``[Hkv]``: new
            keys are quantized with it as they are written (after rounding to qkv's dtype, as the reference does).
        v_scale: likewise for V.
        max_attention_window: append into a cyclic cache of this many slots, as `attn.fast.append_kv` does.
        sink_token_length: StreamingLLM's sinks, as in `attn.reference.preprocess`: k is cached unrotated and
            q rotated by its position within the cache after the append; `attn.fast.decode` rotates the keys.
        validate: True checks lengths and block-table entries on the host first (a bad call raises and writes
            nothing). False reads nothing back from the device: the positions are computed there, the cos/sin
            table covers the cache's capacity, and the kernel
            skips, and records for `attn.check_errors`, a token whose slot or block lies outside the cache.
            (Two cases still read the lengths: RoPE into a cyclic cache without sinks, whose positions run past
            the capacity and size the table, and ``dynamic`` RoPE scaling, whose frequencies depend on the
            longest sequence.) None (the default) is False unless ``ATTN_DEBUG=1``.

    Returns:
        ``q`` shaped ``[T, Hq, D]`` (packed) or ``[B, S_new, Hq, D]`` (padded), rotated, in qkv's dtype.
    """
    validate = _errors.resolve_validate(validate)
    cache_seqlens, cu_seqlens_new, block_table = unit_stride(cache_seqlens, cu_seqlens_new, block_table)
    num_positions = None
    # (a rope_scaling of another type is refused by _cos_sin, before the launch writes anything)
    if not validate and rotary_dim and isinstance(rope_scaling, RopeScaling) and rope_scaling.type == "dynamic":
        # dynamic scaling's frequencies depend on the longest sequence: read it (the one sync of this case)
        counts = (cu_seqlens_new[1:] - cu_seqlens_new[:-1]) if cu_seqlens_new is not None else qkv.shape[1]
        num_positions = int((cache_seqlens + counts).max()) if cache_seqlens.numel() else 1
    args = check_preprocess(
        qkv, k_cache, v_cache, cache_seqlens, num_heads_q, num_heads_kv, cu_seqlens_new, block_table, qkv_bias,
        rotary_dim, rope_style, k_scale, v_scale, validate, max_attention_window, sink_token_length,
        num_positions=num_positions,
    )  # fmt: skip
    return launch_preprocess(
        args, qkv, k_cache, v_cache, cache_seqlens, num_heads_q=num_heads_q, num_heads_kv=num_heads_kv,
        cu_seqlens_new=cu_seqlens_new, block_table=block_table, qkv_bias=qkv_bias, rotary_dim=rotary_dim,
        rope_base=rope_base, rope_style=rope_style, rope_scaling=rope_scaling,
        max_attention_window=max_attention_window,
    )  # fmt: skip


def launch_preprocess(
    args, qkv, k_cache, v_cache, cache_seqlens, *, num_heads_q, num_heads_kv, cu_seqlens_new, block_table, qkv_bias,
    rotary_dim, rope_base, rope_style, rope_scaling, max_attention_window=None,
) -> torch.Tensor:  # fmt: skip
    """`preprocess` after `check_preprocess`: for callers that checked the call already (`gpt_attention`)."""
    if qkv.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"qkv must be a CUDA tensor (or run with TRITON_INTERPRET=1), got {qkv.device}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along the head dim, got strides {x.stride()}")
    d = args.head_dim
    rows = qkv.reshape(-1, qkv.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    num_tokens = rows.shape[0]
    q = torch.empty(num_tokens, num_heads_q, d, dtype=qkv.dtype, device=qkv.device)
    if num_tokens:
        tok_seq = args.token_seq
        sinks = args.append.sink_token_length
        slot_pos = rope_pos = args.positions
        if max_attention_window is not None:
            # (a negative position, possible only unvalidated, stays negative: the kernel drops it)
            slot_pos = cyclic_slot(args.positions, max_attention_window, sinks)
            slot_pos = torch.where(args.positions < 0, args.positions, slot_pos)
        if rotary_dim and sinks:
            # position shift: q turns by its place within the cache, which never reaches the window's size
            lengths = _lengths_after(qkv, cache_seqlens, cu_seqlens_new)
            rope_pos = cache_positions(args.positions, tok_seq, lengths, max_attention_window, sinks)
            cos, sin = _cos_sin(max_attention_window, rotary_dim, rope_base, qkv.device, rope_scaling)
        elif rotary_dim:
            # the table covers the last position written: cached tokens plus the new ones
            cos, sin = _cos_sin(args.num_positions, rotary_dim, rope_base, qkv.device, rope_scaling)
        quant = quant_code(k_cache.dtype)
        block_t = 16 if is_interpreter() else 32
        launch(
            _preprocess_kernel, (cdiv(num_tokens, block_t), num_heads_q + num_heads_kv),
            qkv_ptr=rows, stride_row=rows.stride(0), bias_ptr=qkv_bias, q_ptr=q, q_strides=q.stride()[:2],
            k_cache_ptr=k_cache, v_cache_ptr=v_cache, k_strides=k_cache.stride()[:3], v_strides=v_cache.stride()[:3],
            tok_seq_ptr=tok_seq, tok_pos_ptr=slot_pos, err_ptr=_errors.error_word(qkv.device),
            block_table_ptr=block_table, stride_bt=block_table.stride(0) if block_table is not None else 0,
            # reciprocals computed here, once, as the reference computes them
            k_inv_ptr=1.0 / args.append.k_scale if quant else None,
            v_inv_ptr=1.0 / args.append.v_scale if quant else None,
            rope_pos_ptr=rope_pos if rotary_dim else None, cos_ptr=cos if rotary_dim else None,
            sin_ptr=sin if rotary_dim else None, stride_cos=cos.stride(0) if rotary_dim else 0,
            num_positions=cos.shape[0] if rotary_dim else 0,
            num_tokens=num_tokens, block_size=args.append.block_size, pool_rows=k_cache.shape[0],
            len_cap=args.append.capacity,
            NUM_HEADS_Q=num_heads_q, NUM_HEADS_KV=num_heads_kv, HEAD_DIM=d, HEAD_DIM_PAD=next_power_of_2(d),
            ROTARY_DIM=rotary_dim, HALF_PAD=max(1, next_power_of_2(rotary_dim // 2)), GPTJ=rope_style == "gptj",
            QUANT=quant, ROTATE_K=not sinks, BLOCK_T=block_t,
        )  # fmt: skip
    if args.packed:
        return q
    return q.view(*qkv.shape[:2], num_heads_q, d)
