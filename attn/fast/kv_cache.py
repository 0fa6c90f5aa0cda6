"""Appending new tokens' K/V to a contiguous or paged KV cache, in Triton; same contract as
``attn.reference.append_kv``.

One program copies ``BLOCK_T`` new tokens of one KV head. Each token's destination comes from its sequence's
cached length (and, for a paged cache, the block table), computed per token inside the kernel, so a ragged
batch needs no host loop. The append is a pure copy: its speed is bytes moved over bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..checks import check_append, device_positions
from ..layout import new_token_positions
from . import _errors
from ._triton import cdiv, is_interpreter, launch, next_power_of_2, unit_stride

# error bits (attn.fast._errors), as compile-time constants of the kernels
APPEND = tl.constexpr(_errors.APPEND)
BLOCK_TABLE = tl.constexpr(_errors.BLOCK_TABLE)
CU_SEQLENS = tl.constexpr(_errors.CU_SEQLENS)


@triton.jit
def rope_pairs(offs_d, ROTARY_DIM: tl.constexpr, GPTJ: tl.constexpr):
    """RoPE at read time, per feature d of a head: the partner it turns with, the sign the partner enters with
    (``x_d·cos + sign·x_partner·sin``), and the index of the pair's frequency. GPT-J pairs neighbours (2i, 2i+1),
    GPT-NeoX the two halves of the rotary dims (i, i + r/2); features past ``ROTARY_DIM`` are masked by callers."""
    if GPTJ:
        partner = offs_d + 1 - 2 * (offs_d % 2)
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
        fi = offs_d // 2
    else:
        partner = tl.where(offs_d < ROTARY_DIM // 2, offs_d + ROTARY_DIM // 2, offs_d - ROTARY_DIM // 2)
        sign = tl.where(offs_d < ROTARY_DIM // 2, -1.0, 1.0)
        fi = offs_d % (ROTARY_DIM // 2)
    return partner, sign, fi


@triton.jit
def _round_to_e4m3(y):
    # Round-to-nearest-even onto the e4m3 grid in float32 arithmetic, so the cast that follows is exact. The
    # cast alone would do this on the GPU, but Triton's interpreter mis-rounds values whose rounding carries
    # into the exponent (-125.9 became -64, not -128), and the CPU tests must see the GPU's bytes.
    bits = y.to(tl.int32, bitcast=True)
    sign = bits & -2147483648
    # normal numbers: keep 3 of float32's 23 mantissa bits, ties to even, carries into the exponent allowed
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
    normal = bits.to(tl.float32, bitcast=True)
    # subnormals (below 2^-6) sit on a fixed grid of 2^-9: adding 1.5·2^14 makes float32 round onto it. The
    # magnitude is rounded and the sign put back, so a tiny negative value becomes -0 (byte 0x80) as it does in
    # torch's cast, not +0 (the sum loses the sign)
    magnitude = (tl.abs(y) + 24576.0) - 24576.0
    # (the sign goes back as a bit: the interpreter's negation turns 0 into +0)
    subnormal = (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def _quantize(y, QUANT: tl.constexpr):
    # an explicit else: Triton's compiler (not the interpreter) also compiles the code after a constexpr-true
    # `if ...: return`, and then rejects the two return types
    if QUANT == 1:
        return tl.minimum(tl.maximum(tl.floor(y + 0.5), -127.0), 127.0).to(tl.int8)
    else:
        return _round_to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0)).to(tl.float8e4nv)


@triton.jit
def cache_slot(seq, pos, mask, block_table_ptr, stride_bt, block_size, IS_PAGED: tl.constexpr):
    """Where token ``pos`` of sequence ``seq`` is stored: ``(row, slot)`` of the cache's first two dims."""
    if IS_PAGED:
        # entries were checked against the pool on the host before this launch
        row = tl.load(block_table_ptr + seq * stride_bt + pos // block_size, mask=mask, other=0).to(tl.int64)
        slot = (pos % block_size).to(tl.int64)
    else:
        row = seq
        slot = pos.to(tl.int64)
    return row, slot


@triton.jit
def write_mask(seq, pos, t_mask, block_table_ptr, stride_bt, block_size, pool_rows, len_cap, err_ptr,
               IS_PAGED: tl.constexpr):  # fmt: skip
    """``(row, slot, ok)`` of the tokens a cache write stores: ``ok`` drops (and reports, attn.fast._errors) a
    position outside ``[0, len_cap)`` and, paged, a block-table entry outside the pool's ``pool_rows`` blocks.
    A write is skipped rather than clamped: clamped, it would overwrite another sequence's tokens."""
    ok = t_mask & (pos >= 0) & (pos < len_cap)
    tl.atomic_or(err_ptr + pos * 0, APPEND, mask=t_mask & ~ok, sem="relaxed")
    row, slot = cache_slot(seq, pos, ok, block_table_ptr, stride_bt, block_size, IS_PAGED)
    if IS_PAGED:
        outside = ok & ((row < 0) | (row >= pool_rows))
        tl.atomic_or(err_ptr + pos * 0, BLOCK_TABLE, mask=outside, sem="relaxed")
        ok = ok & ~outside
    return row, slot, ok


@triton.jit(do_not_specialize=["num_tokens", "block_size", "cyclic_n", "sinks", "pool_rows", "len_cap"])
def _append_kernel(
    # (in the order of the earlier flat parameter list, with which ptxas emits the same SASS as before)
    k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr,
    tok_seq_ptr, tok_pos_ptr, block_table_ptr, k_inv_ptr, v_inv_ptr,
    new_strides, k_strides, v_strides, stride_bt,
    num_tokens, block_size, cyclic_n, sinks, cu_ptr, err_ptr, pool_rows, len_cap,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, QUANT: tl.constexpr, CYCLIC: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Operands: the new keys and values ``[T, Hkv, D]`` (strides ``(token, head)``, shared), the caches with
    strides ``(batch or block, slot, head)``, each new token's sequence and position. A tensor a call does not
    use is None: the block table of a contiguous cache, the scales' reciprocals of a float cache, and
    ``cu_ptr``, the cu_seqlens_new checked here only when the host did not check them.
    """
    IS_PAGED: tl.constexpr = block_table_ptr is not None
    CHECK_CU: tl.constexpr = cu_ptr is not None
    stride_nt, stride_nh = new_strides
    stride_kb, stride_kn, stride_kh = k_strides
    stride_vb, stride_vn, stride_vh = v_strides
    h = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    t_mask = offs_t < num_tokens
    # [BLOCK_T]: which sequence each new token belongs to, and its position in that sequence
    seq = tl.load(tok_seq_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    pos = tl.load(tok_pos_ptr + offs_t, mask=t_mask, other=0)
    if CHECK_CU:
        # unvalidated cu_seqlens_new: a row must lie in its sequence's [cu[b], cu[b+1]), which holds for every row
        # exactly when cu rises from 0 to T; a row that does not is not written
        inside = (offs_t >= tl.load(cu_ptr + seq, mask=t_mask, other=0)) & (
            offs_t < tl.load(cu_ptr + seq + 1, mask=t_mask, other=0)
        )
        tl.atomic_or(err_ptr + offs_t * 0, CU_SEQLENS, mask=t_mask & ~inside, sem="relaxed")
        t_mask &= inside
    if CYCLIC:
        # a cyclic cache: token t overwrites token t - (N - S) in slot S + (t - S) mod (N - S), except the S sinks
        # (StreamingLLM), which keep slots 0..S-1; without sinks that is slot t mod N (a negative t is dropped
        # by write_mask, whatever slot it maps to)
        pos = tl.where(pos < 0, pos, tl.where(pos < sinks, pos, sinks + (pos - sinks) % (cyclic_n - sinks)))
    row, slot, t_mask = write_mask(seq, pos, t_mask, block_table_ptr, stride_bt, block_size, pool_rows, len_cap,
                                   err_ptr, IS_PAGED)  # fmt: skip
    mask = t_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    src = offs_t.to(tl.int64)[:, None] * stride_nt + h * stride_nh + offs_d[None, :]
    # [BLOCK_T, HEAD_DIM_PAD]
    k = tl.load(k_new_ptr + src, mask=mask)
    v = tl.load(v_new_ptr + src, mask=mask)
    if QUANT != 0:
        # x / scale as x times the float32 reciprocal, then INT8's floor(y + 0.5) or FP8's saturating cast
        k = _quantize(k.to(tl.float32) * tl.load(k_inv_ptr + h), QUANT)
        v = _quantize(v.to(tl.float32) * tl.load(v_inv_ptr + h), QUANT)
    k_dst = (row * stride_kb + slot * stride_kn)[:, None] + h * stride_kh + offs_d[None, :]
    v_dst = (row * stride_vb + slot * stride_vn)[:, None] + h * stride_vh + offs_d[None, :]
    tl.store(k_cache_ptr + k_dst, k, mask=mask)
    tl.store(v_cache_ptr + v_dst, v, mask=mask)


def quant_code(dtype: torch.dtype) -> int:
    """The kernels' QUANT flag: 0 for an unquantized cache, 1 for INT8, 2 for FP8 e4m3."""
    return {torch.int8: 1, torch.float8_e4m3fn: 2}.get(dtype, 0)


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
    validate: bool | None = None,
) -> None:
    """Writes new tokens' K/V after each sequence's cached tokens, in place.

    Args:
        k_cache: contiguous ``[B, max_len, Hkv, D]`` or paged pool ``[num_blocks, block_size, Hkv, D]``.
        v_cache: same shape and dtype as ``k_cache``.
        k_new: new keys, padded ``[B, S_new, Hkv, D]`` or packed ``[T, Hkv, D]`` with ``cu_seqlens_new``.
        v_new: new values, shaped like ``k_new``.
        cache_seqlens: int32 ``[B]``, tokens already cached per sequence (not updated here).
        cu_seqlens_new: int32 ``[B+1]`` prefix sums of the new tokens per sequence (packed ``k_new``).
        block_table: int32 ``[B, max_blocks]`` for a paged pool, else None.
        k_scale: for an int8 / float8_e4m3fn cache, the K dequantization scale ``[1]`` or ``[Hkv]``: new keys
            are quantized with it in the kernel.
        v_scale: likewise for V.
        max_attention_window: makes the cache cyclic with this many slots (token ``t`` in slot ``t mod N``).
        sink_token_length: StreamingLLM's sinks, as in `attn.reference.append_kv`: tokens ``0..S-1`` keep
            their slots, token ``t >= S`` goes to slot ``S + (t − S) mod (N − S)``.
        validate: True checks the values on the host first (lengths, ``cu_seqlens_new``, the block-table
            entries written, two tokens writing one slot, the scales), which waits for the device; a bad call
            then raises and writes nothing. False reads nothing back: the kernel skips (and records for
            `attn.check_errors`) each token whose position lies outside its cache, whose block-table entry lies
            outside the pool, or whose packed row lies outside its ``cu_seqlens_new`` range. It cannot see two
            sequences whose tables share a block (their writes race): only ``validate=True`` catches that.
            None (the default) is False unless the environment sets ``ATTN_DEBUG=1``.

    Raises:
        ValueError: with ``validate``, a sequence would outgrow its cache, a block it writes to is outside the
            pool, or two tokens would write one slot. Nothing is written then.
    """
    validate = _errors.resolve_validate(validate)
    cache_seqlens, cu_seqlens_new, block_table = unit_stride(cache_seqlens, cu_seqlens_new, block_table)
    args = check_append(
        k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_new, block_table, k_scale, v_scale,
        max_attention_window, sink_token_length=sink_token_length, validate=validate,
    )  # fmt: skip
    if k_cache.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"k_cache must be a CUDA tensor (or run with TRITON_INTERPRET=1), got {k_cache.device}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along the head dim, got strides {x.stride()}")
    hkv, d = k_new.shape[-2:]
    k_flat = k_new.reshape(-1, hkv, d)
    v_flat = v_new.reshape(-1, hkv, d)
    if k_flat.stride(-1) != 1 or k_flat.stride() != v_flat.stride():
        k_flat, v_flat = k_flat.contiguous(), v_flat.contiguous()
    num_tokens = k_flat.shape[0]
    if num_tokens == 0:
        return
    if validate:
        tok_seq, tok_pos = new_token_positions(args.new_bounds, cache_seqlens)
    else:
        tok_seq, tok_pos = device_positions(cu_seqlens_new, cache_seqlens, num_tokens, k_new.shape)
    quant = quant_code(k_cache.dtype)
    block_t = 16 if is_interpreter() else 32
    launch(
        _append_kernel, (cdiv(num_tokens, block_t), hkv),
        k_new_ptr=k_flat, v_new_ptr=v_flat, new_strides=k_flat.stride()[:2],
        k_cache_ptr=k_cache, v_cache_ptr=v_cache, k_strides=k_cache.stride()[:3], v_strides=v_cache.stride()[:3],
        tok_seq_ptr=tok_seq, tok_pos_ptr=tok_pos, err_ptr=_errors.error_word(k_cache.device),
        block_table_ptr=block_table, stride_bt=block_table.stride(0) if block_table is not None else 0,
        # reciprocals computed here, once, as the reference computes them
        k_inv_ptr=1.0 / args.k_scale if quant else None, v_inv_ptr=1.0 / args.v_scale if quant else None,
        cu_ptr=cu_seqlens_new if cu_seqlens_new is not None and not validate else None,
        num_tokens=num_tokens, block_size=args.block_size, cyclic_n=max_attention_window or 1,
        sinks=args.sink_token_length, pool_rows=k_cache.shape[0],
        len_cap=2**31 - 1 if max_attention_window is not None else args.capacity,
        HEAD_DIM=d, HEAD_DIM_PAD=next_power_of_2(d), QUANT=quant, CYCLIC=max_attention_window is not None,
        BLOCK_T=block_t,
    )  # fmt: skip


@triton.jit
def _chunk_or_cache(
    cache_ptr, new_ptr, cache_off, new_off, feat, in_cache, row_mask, scale, QUANT: tl.constexpr
):  # fmt: skip
    # [BLOCK_T, HEAD_DIM_PAD] features `feat` of each row, float32: from the cache (dequantized) or the chunk
    from_cache = tl.load(cache_ptr + cache_off[:, None] + feat, mask=row_mask & in_cache[:, None], other=0.0)
    from_new = tl.load(new_ptr + new_off[:, None] + feat, mask=row_mask & ~in_cache[:, None], other=0.0)
    x = from_cache.to(tl.float32)
    if QUANT != 0:
        x = x * scale
    return tl.where(in_cache[:, None], x, from_new.to(tl.float32))


@triton.jit(do_not_specialize=["num_rows", "block_size", "cyclic_n", "sinks"])
def _gather_window_kernel(
    # (in the order of the earlier flat parameter list, with which ptxas emits the same SASS as before)
    k_cache_ptr, v_cache_ptr, k_new_ptr, v_new_ptr, k_out_ptr, v_out_ptr,
    row_seq_ptr, row_tok_ptr, row_pos_ptr, seqlens_ptr, cu_new_ptr, block_table_ptr, k_scale_ptr, v_scale_ptr,
    cos_ptr, sin_ptr,
    k_strides, v_strides, new_strides, out_strides, stride_bt, stride_cos,
    num_rows, block_size, cyclic_n, sinks,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, QUANT: tl.constexpr,
    ROTARY_DIM: tl.constexpr, GPTJ: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Operands: the caches (strides ``(batch or block, slot, head)``), the chunk's new keys and values and the
    outputs (strides ``(row, head)``, each pair shared), each output row's sequence and token. A tensor a call
    does not use is None: the block table of a contiguous cache, the scales of a float cache, and without RoPE
    (``ROTARY_DIM`` 0) the positions and the cos/sin tables.
    """
    IS_PAGED: tl.constexpr = block_table_ptr is not None
    stride_kb, stride_kn, stride_kh = k_strides
    stride_vb, stride_vn, stride_vh = v_strides
    stride_nt, stride_nh = new_strides
    stride_ot, stride_oh = out_strides
    h = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    t_mask = offs_t < num_rows
    # [BLOCK_T]: each output row's sequence, token number, and RoPE position
    seq = tl.load(row_seq_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    tok = tl.load(row_tok_ptr + offs_t, mask=t_mask, other=0)
    cached = tl.load(seqlens_ptr + seq, mask=t_mask, other=0)
    # a token from before the chunk is read from its slot; the chunk's own are read from k_new/v_new
    in_cache = tok < cached
    slot = tl.where(tok < sinks, tok, sinks + (tok - sinks) % (cyclic_n - sinks))
    row, slot = cache_slot(seq, slot, t_mask & in_cache, block_table_ptr, stride_bt, block_size, IS_PAGED)
    fresh = tl.load(cu_new_ptr + seq, mask=t_mask, other=0).to(tl.int64) + (tok - cached)
    fresh = tl.where(in_cache, 0, fresh)
    row_mask = t_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    k_off = row * stride_kb + slot * stride_kn + h * stride_kh
    v_off = row * stride_vb + slot * stride_vn + h * stride_vh
    n_off = fresh * stride_nt + h * stride_nh
    k_scale = 1.0
    v_scale = 1.0
    if QUANT != 0:
        k_scale = tl.load(k_scale_ptr + h)
        v_scale = tl.load(v_scale_ptr + h)
    # [BLOCK_T, HEAD_DIM_PAD]
    k = _chunk_or_cache(k_cache_ptr, k_new_ptr, k_off, n_off, offs_d[None, :], in_cache, row_mask, k_scale, QUANT)
    v = _chunk_or_cache(v_cache_ptr, v_new_ptr, v_off, n_off, offs_d[None, :], in_cache, row_mask, v_scale, QUANT)
    if ROTARY_DIM > 0:
        # feature d turns with its partner by pair fi's angle at the row's position (keys are stored unrotated)
        partner, sign, fi = rope_pairs(offs_d, ROTARY_DIM, GPTJ)
        rot_mask = t_mask[:, None] & (offs_d[None, :] < ROTARY_DIM)
        k_pair = _chunk_or_cache(k_cache_ptr, k_new_ptr, k_off, n_off, partner[None, :], in_cache, rot_mask, k_scale,
                                 QUANT)  # fmt: skip
        pos = tl.load(row_pos_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
        cs_off = pos[:, None] * stride_cos + fi[None, :]
        cos = tl.load(cos_ptr + cs_off, mask=rot_mask, other=1.0)
        sin = tl.load(sin_ptr + cs_off, mask=rot_mask, other=0.0)
        k = tl.where(rot_mask, k * cos + sign[None, :] * k_pair * sin, k)
    dst = offs_t.to(tl.int64)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(k_out_ptr + dst, k.to(k_out_ptr.dtype.element_ty), mask=row_mask)
    tl.store(v_out_ptr + dst, v.to(v_out_ptr.dtype.element_ty), mask=row_mask)


def gather_window(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cu_seqlens_new: torch.Tensor,
    row_seq: torch.Tensor,
    row_tok: torch.Tensor,
    *,
    window: int,
    sinks: int = 0,
    block_table: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    row_pos: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    rotary_dim: int = 0,
    rope_style: str = "neox",
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs chosen tokens of a cyclic cache and of a fresh chunk into new ``[R, Hkv, D]`` tensors, in one pass.

    Output row ``r`` is token ``row_tok[r]`` of sequence ``row_seq[r]``: read from its cache slot (dequantized)
    when the token precedes ``cache_seqlens`` (the tokens cached before the chunk), else from row
    ``cu_seqlens_new[seq] + tok − cache_seqlens[seq]`` of ``k_new``/``v_new``. With ``rotary_dim`` the key is
    turned by RoPE at ``row_pos[r]`` from the float32 tables ``cos``/``sin`` ``[P, rotary_dim/2]``.

    The caller (`attn.fast.context_attention`) has validated every input: tokens that are still cached or in
    the chunk, block-table entries, positions inside the tables. Nothing is checked here.

    Returns:
        ``(k, v)``, each ``[R, Hkv, D]`` in ``out_dtype`` (default: k_new's dtype).
    """
    num_rows = row_seq.shape[0]
    hkv, d = k_new.shape[-2:]
    dtype = out_dtype or k_new.dtype
    k_out = torch.empty(num_rows, hkv, d, dtype=dtype, device=k_new.device)
    v_out = torch.empty(num_rows, hkv, d, dtype=dtype, device=k_new.device)
    if num_rows == 0:
        return k_out, v_out
    quant = quant_code(k_cache.dtype)
    block_t = 16 if is_interpreter() else 32
    launch(
        _gather_window_kernel, (cdiv(num_rows, block_t), hkv),
        k_cache_ptr=k_cache, v_cache_ptr=v_cache, k_strides=k_cache.stride()[:3], v_strides=v_cache.stride()[:3],
        k_new_ptr=k_new, v_new_ptr=v_new, new_strides=k_new.stride()[:2],
        k_out_ptr=k_out, v_out_ptr=v_out, out_strides=k_out.stride()[:2],
        row_seq_ptr=row_seq, row_tok_ptr=row_tok, row_pos_ptr=row_pos if rotary_dim else None,
        seqlens_ptr=cache_seqlens, cu_new_ptr=cu_seqlens_new,
        block_table_ptr=block_table, stride_bt=block_table.stride(0) if block_table is not None else 0,
        k_scale_ptr=k_scale if quant else None, v_scale_ptr=v_scale if quant else None,
        cos_ptr=cos if rotary_dim else None, sin_ptr=sin if rotary_dim else None,
        stride_cos=cos.stride(0) if rotary_dim else 0,
        num_rows=num_rows, block_size=k_cache.shape[1], cyclic_n=window, sinks=sinks,
        HEAD_DIM=d, HEAD_DIM_PAD=next_power_of_2(d), QUANT=quant, ROTARY_DIM=rotary_dim, GPTJ=rope_style == "gptj",
        BLOCK_T=block_t,
    )  # fmt: skip
    return k_out, v_out
