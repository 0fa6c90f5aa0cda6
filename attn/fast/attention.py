"""Fused context-phase attention (FlashAttention-2 style forward) in Triton.

One program computes ``BLOCK_M`` query rows of one (sequence, query head). It streams the visible key/value
tiles through an online softmax, so neither ``Q·Kᵀ`` nor the probabilities ever reach memory.

Supports: padded ``[B, S, H, D]`` (with per-sequence lengths) and packed ``[T, H, D]`` + ``cu_seqlens``;
MHA/MQA/GQA; bottom-right causal; sliding windows; soft-capping; ``q_scaling``; ``return_lse``; any head dim
up to 256 (padded to a power of two inside the kernel); fp16, bf16 and fp32 inputs with fp32 accumulation.

The key range of each row block is split three ways: masked tiles on the left edge of a window, unmasked
tiles in the middle, masked tiles along the diagonal and the sequence end. Tiles nobody can see are never
visited, and the middle loop carries no mask arithmetic at all.

Lineage: the structure follows Triton's fused-attention tutorial and FlashAttention-2 (Dao, 2023).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _memo
from ..checks import check_attention, check_flag
from . import _errors
from ._triton import MAX_HEAD_DIM, autotune_enabled, cdiv, is_interpreter, launch, next_power_of_2, unit_stride

LOG2E = 1.4426950408889634
# error bits (attn.fast._errors), as compile-time constants of the kernels
LENGTHS = tl.constexpr(_errors.LENGTHS)
BLOCK_TABLE = tl.constexpr(_errors.BLOCK_TABLE)
CU_SEQLENS = tl.constexpr(_errors.CU_SEQLENS)
MAX_SEQLEN = tl.constexpr(_errors.MAX_SEQLEN)
# at least the distances one prefill tile spans, rounded up to a power of two (2·max(BLOCK_M, BLOCK_N) <= 256
# for every config): see relative_bias_operands and _t5_near_bias
REL_PAD = 256

# Hopper starting points; the context-phase speed work widens this list.
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 2),
        (128, 128, 8, 3),
        (64, 64, 4, 3),
    ]
]


def _keep(configs, named_args, **kwargs):
    head_dim = kwargs.get("HEAD_DIM_PAD", named_args.get("HEAD_DIM_PAD"))
    if named_args["q_ptr"].dtype == torch.float32:
        # IEEE fp32 products run without tensor cores and hold 4-byte tiles: large tiles only spill registers
        # (and take ptxas minutes to compile); fp32 is a correctness path, not a fast one
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
    if kwargs.get("KV_CACHE") and kwargs.get("PACK", 1) * named_args["max_rows"] <= 32:
        # queries over a cache with few rows per sequence (generation requests, short chunks): a 128-row tile
        # would be mostly padding, so smaller ones join the candidates (these three compile without register
        # spills for D = 128 over a paged cache, checked with ptxas -v for sm_90a; 16x64 and 32x64 on 4 warps spill)
        small = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in [(16, 32, 4, 3), (32, 32, 4, 3), (16, 64, 8, 2)]
        ]
        configs = [c for c in small if c.kwargs["BLOCK_M"] >= kwargs.get("PACK", 1)] + configs
    if head_dim >= 256:
        # 256-wide rows: deeper pipelines or 128-key tiles overflow the 228 KB of shared memory
        return [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        ]
    return configs


@triton.jit
def _tanh(x):
    # no libdevice call, so the interpreter can run it too; saturates cleanly to +-1 for large |x|
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _t5_near_bias(rel_head, offs_m, offs_n, start_n, diag, r0, rel_md, unit, BLOCK_N: tl.constexpr,
                  ROW_HEADS: tl.constexpr):  # fmt: skip
    """The T5 implicit bias of one tile near the diagonal, [BLOCK_M, BLOCK_N]: table[j − i] · unit (the table is
    in log2 units; unit 1 / qk_scale turns it into raw-product units for the plain form)."""
    if ROW_HEADS:
        # GQA-packed rows each read their own head's table: a gather per score
        return tl.load(rel_head + (start_n + offs_n[None, :] - (offs_m[:, None] + diag) + rel_md)) * unit
    else:
        # One head: the tile's distances j − i = (start_n − r0) + n − r (r0 = m0 + diag, r the row in the block)
        # take at most BLOCK_M + BLOCK_N − 1 values. They are loaded once as a vector (a coalesced load) and
        # gathered from it; Triton 3.6 lowers the gather through a 1 KB shared buffer (one store, a barrier,
        # one LDS per score with an immediate offset). A global load per score instead needed 64-bit pointers
        # for each (spills at 255 registers) and took its result through a 32 KB layout-conversion buffer,
        # which pushed the 3-stage 128x128 config past the 227 KB of shared memory (bench/probes/prefill_sass.py).
        BLOCK_M: tl.constexpr = offs_m.shape[0]
        SPAN: tl.constexpr = 2 * BLOCK_N if BLOCK_N >= BLOCK_M else 2 * BLOCK_M
        tl.static_assert(SPAN <= 256, "a near tile's distances must fit in the table's REL_PAD (256) end copies")
        # the vector starts at the tile's smallest distance (row BLOCK_M − 1, key start_n); a near tile has
        # one distance within max_distance, so it stays inside the table's REL_PAD end copies
        first = start_n - r0 - (BLOCK_M - 1)
        vec = tl.load(rel_head + (first + rel_md) + tl.arange(0, SPAN)) * unit
        rows = offs_m - (r0 - diag)
        idx = offs_n[None, :] - rows[:, None] + (BLOCK_M - 1)
        return tl.reshape(tl.gather(vec, tl.reshape(idx, [BLOCK_M * BLOCK_N]), 0), [BLOCK_M, BLOCK_N])


@triton.jit
def _visible(offs_m, offs_kn, seqlen_k, diag, window_left, window_right, HAS_WINDOW_LEFT: tl.constexpr,
             HAS_WINDOW_RIGHT: tl.constexpr):  # fmt: skip
    """[BLOCK_M, BLOCK_N]: which keys of a tile each row sees (row i sits on key i + diag)."""
    visible = offs_kn[None, :] < seqlen_k
    if HAS_WINDOW_RIGHT:
        visible &= offs_kn[None, :] <= offs_m[:, None] + diag + window_right
    if HAS_WINDOW_LEFT:
        visible &= offs_kn[None, :] >= offs_m[:, None] + diag - window_left
    return visible


# The key ranges a row block folds in, in key order: `_attn_fwd_tiles`' STAGE picks its range from the bounds
# (lo, full_lo, near_lo, near_hi, full_hi, hi) the kernel computes once per block, as the stages of Triton's
# attention tutorial do.
LEAD = tl.constexpr(0)  # [lo, full_lo): masked tiles before the fully visible ones (a left window's edge)
FULL = tl.constexpr(1)  # [full_lo, full_hi): every key visible to every row of the block, no mask
FAR_LEFT = tl.constexpr(2)  # T5 implicit splits FULL three ways: [full_lo, near_lo) past max_distance on the left,
NEAR = tl.constexpr(3)  # [near_lo, near_hi) within max_distance of some row's diagonal,
FAR_RIGHT = tl.constexpr(4)  # [near_hi, full_hi) past max_distance on the right
TAIL = tl.constexpr(5)  # [full_hi, hi): masked tiles along the diagonal (causal) or a right window's edge
RERUN = tl.constexpr(6)  # [lo, hi) again, masked and SAFE, for a block whose accumulator ended non-finite


@triton.jit
def _t5_near_range(full_lo, full_hi, r0, r_last, rel_md, BLOCK_N: tl.constexpr):
    """[near_lo, near_hi): the tiles of [full_lo, full_hi) with a key within max_distance of some row's diagonal
    (rows r0..r_last in key coordinates), tile-aligned; the tiles left of it see only the table's left end, those
    right of it only its right end."""
    far_lo = r0 - rel_md + 1  # the first key within max_distance of the first row
    near_lo = tl.cdiv(tl.maximum(far_lo - BLOCK_N + 1, 0), BLOCK_N) * BLOCK_N
    near_lo = tl.minimum(tl.maximum(near_lo, full_lo), full_hi)
    near_hi = tl.cdiv(tl.maximum(r_last + rel_md, 0), BLOCK_N) * BLOCK_N
    near_hi = tl.minimum(tl.maximum(near_hi, near_lo), full_hi)
    return near_lo, near_hi


@triton.jit
def _t5_end_value(ptr, offs_m, ROW_HEADS: tl.constexpr):
    """[BLOCK_M]: one end of the T5 table (log2 units), the bias of every score past max_distance on that side;
    with ROW_HEADS each row reads its own head's table (``ptr`` is then a [BLOCK_M, 1] column)."""
    if ROW_HEADS:
        return tl.reshape(tl.load(ptr), [offs_m.shape[0]])
    else:
        return tl.zeros([offs_m.shape[0]], dtype=tl.float32) + tl.load(ptr)


@triton.jit
def _attn_fwd_tiles(acc, l_i, m_i, q, offs_m, offs_d, kv, geom, bias, bounds, STAGE: tl.constexpr, CFG: tl.constexpr):
    """The key tiles of one STAGE folded into the running (acc, l_i, m_i).

    Operands, grouped as the kernel builds them: ``kv`` = (k_base, v_base, stride_kn, stride_vn, stride_kb,
    stride_vb, bt_row, page_size, k_scale), ``geom`` = (seqlen_q, seqlen_k, diag, window_left, window_right),
    ``bias`` = (qk_scale, cap_log2, slope, alibi_r0, rel_head, stride_rm, rel_md), ``bounds`` = (lo, full_lo,
    near_lo, near_hi, full_hi, hi) (runtime tuples: Triton turns their elements into tensors, so none may be None
    or a string), and ``CFG`` the kernel's compile-time flags, one constexpr tuple (indexed below).

    The stage decides the range and the form of its tiles: LEAD, TAIL and RERUN mask per score; FULL and the
    T5 stages (FAR_LEFT/FAR_RIGHT add one bias value per row, NEAR gathers per score) do not, and take the
    plain form (row max of the raw products, the scale inside the exponent) unless a soft cap applies.

    RERUN (SAFE) keeps non-finite values to the rows that see their keys: a masked tile may hold keys that the
    causal mask or a window hides from some rows, whose p is 0 there, but 0·NaN = NaN (and 0·inf), so the plain
    product spreads such a value to every row of the tile. SAFE takes those values out of the product and marks
    NaN exactly where a visible key holds one, as the reference's P·V over the visible keys gives; it costs a
    reduction, a second product and shared memory, so the normal stages do without it and the kernel reruns a
    block in RERUN only when its accumulator ends non-finite. Its key tiles are half as wide: the rerun's extra
    product and operands then fit in the registers the normal loops use, where full tiles made ptxas spill
    values that the normal loops reload.
    """
    k_base, v_base, stride_kn, stride_vn, stride_kb, stride_vb, bt_row, page_size, k_scale = kv
    seqlen_q, seqlen_k, diag, window_left, window_right = geom
    qk_scale, cap_log2, slope, alibi_r0, rel_head, stride_rm, rel_md = bias
    lo, full_lo, near_lo, near_hi, full_hi, hi = bounds
    HAS_WINDOW_LEFT: tl.constexpr = CFG[0]
    HAS_WINDOW_RIGHT: tl.constexpr = CFG[1]
    HAS_SOFTCAP: tl.constexpr = CFG[2]
    HAS_ALIBI: tl.constexpr = CFG[3]
    ALIBI_WITH_SCALE: tl.constexpr = CFG[4]
    ALIBI_BY_KEY: tl.constexpr = CFG[5]
    T5_MODE: tl.constexpr = CFG[6]
    ROW_HEADS: tl.constexpr = CFG[7]  # GQA-packed rows: slopes and T5 rows per row
    HEAD_DIM: tl.constexpr = CFG[8]
    HEAD_DIM_PAD: tl.constexpr = CFG[9]
    TILE_N: tl.constexpr = CFG[10]
    PRECISION: tl.constexpr = CFG[11]
    IS_PAGED: tl.constexpr = CFG[12]
    QUANT: tl.constexpr = CFG[13]
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    MASKED: tl.constexpr = STAGE == LEAD or STAGE == TAIL or STAGE == RERUN
    SAFE: tl.constexpr = STAGE == RERUN
    ROW_BIAS: tl.constexpr = STAGE == FAR_LEFT or STAGE == FAR_RIGHT
    NEAR_TILES: tl.constexpr = STAGE == NEAR
    # the far stages' bias is their row value: no per-score T5 work there
    REL_MODE: tl.constexpr = 0 if ROW_BIAS else T5_MODE
    PLAIN: tl.constexpr = not MASKED and not HAS_SOFTCAP and (T5_MODE == 0 or STAGE != FULL)
    BLOCK_N: tl.constexpr = TILE_N // 2 if SAFE and TILE_N >= 32 else TILE_N
    row_bias = 0.0
    if STAGE == LEAD:
        lo, hi = lo, full_lo
    elif STAGE == FULL:
        lo, hi = full_lo, full_hi
    elif STAGE == FAR_LEFT:
        lo, hi = full_lo, near_lo
        row_bias = _t5_end_value(rel_head, offs_m, ROW_HEADS)
    elif STAGE == NEAR:
        lo, hi = near_lo, near_hi
    elif STAGE == FAR_RIGHT:
        lo, hi = near_hi, full_hi
        row_bias = _t5_end_value(rel_head + 2 * rel_md, offs_m, ROW_HEADS)
    elif STAGE == TAIL:
        lo, hi = full_hi, hi
    offs_n = tl.arange(0, BLOCK_N)
    # T5 values outside the near loop come in log2 units, which only the non-plain form adds as they are
    tl.static_assert(not (PLAIN and (REL_MODE == 2 or (REL_MODE == 1 and not NEAR_TILES))))
    # the rerun has the whole shared memory of the normal loops' pipelines to itself, but no pipeline: its
    # cleaned operands then fit beside K and V
    STAGES: tl.constexpr = 1 if SAFE else None
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        offs_kn = start_n + offs_n
        if MASKED:
            kv_mask = (offs_kn[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
        else:
            kv_mask = offs_d[None, :] < HEAD_DIM
        if IS_PAGED:
            # a paged cache: key j lives in pool block bt_row[j // page_size], row j % page_size; the entries a
            # sequence uses were checked against the pool on the host, and keys past the end read block 0
            block = tl.load(bt_row + offs_kn // page_size, mask=offs_kn < seqlen_k, other=0).to(tl.int64)
            k_rows = block * stride_kb + (offs_kn % page_size) * stride_kn
            v_rows = block * stride_vb + (offs_kn % page_size) * stride_vn
        else:
            k_rows = offs_kn * stride_kn
            v_rows = offs_kn * stride_vn
        if SAFE:
            # first, while few registers are live: V without its non-finite values, and NaN in acc where a
            # visible key holds one (key by key, for the tiles that hold one: no [BLOCK_M, D] temporary beside acc)
            v_safe = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            if QUANT != 0:
                v_safe = v_safe.to(q.dtype)
            bad = ((v_safe != v_safe) | (tl.abs(v_safe) == float("inf"))).to(tl.int8)
            if tl.max(tl.max(bad, 1), 0) != 0:
                for n in range(0, BLOCK_N):
                    bad_d = tl.max(tl.where(offs_n[:, None] == n, bad, 0), 0) != 0
                    key = tl.full([1], n, tl.int32) + start_n
                    sees = _visible(offs_m, key, seqlen_k, diag, window_left, window_right, HAS_WINDOW_LEFT,
                                    HAS_WINDOW_RIGHT)  # fmt: skip
                    acc = tl.where(sees & bad_d[None, :], float("nan"), acc)
                v_safe = tl.where(bad != 0, 0.0, v_safe)
        # [BLOCK_N, HEAD_DIM_PAD]
        if MASKED or PAD_D:
            k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_base + k_rows[:, None] + offs_d[None, :])
        if QUANT != 0:
            # int8 and e4m3 values are exact in fp16/bf16: the product sees the stored values and the scale
            # multiplies the scores instead of every element
            k = k.to(q.dtype)
        # [BLOCK_M, BLOCK_N], already in log2 units: exp2 is the cheap exponential on the GPU
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if QUANT != 0:
            qk = qk * k_scale
        if HAS_ALIBI and ALIBI_BY_KEY and not PLAIN:
            # ALiBi's slope·(j − i − diag) is slope·(j − r0) − slope·(i + diag − r0), r0 = alibi_r0 a constant of
            # the program. The second term is the same for every key of a row, so the softmax ignores it (the
            # LSE gets it back at the end) and the bias is a [BLOCK_N] vector per tile. r0 near the block keeps
            # the visible keys' biases small, so fp32 loses nothing to large offsets.
            col = (offs_kn - alibi_r0).to(tl.float32)[None, :]
        elif HAS_ALIBI and not ALIBI_BY_KEY:
            # inside a soft cap the bias cannot be split: the distance of every score
            rel = (offs_kn[None, :] - (offs_m[:, None] + diag)).to(tl.float32)
            if ALIBI_WITH_SCALE:
                qk += slope * rel
        # plain unmasked tiles (the bulk of the work) take the row max of the raw products and scale inside the
        # exponent, qk·scale − m, one multiply-add per score: the Triton tutorial's form, +0-3% on the H200
        if HAS_SOFTCAP:
            s = cap_log2 * _tanh(qk * qk_scale)
        elif PLAIN:
            s = qk
            if HAS_ALIBI:
                # ALiBi in the plain form: slope·(j − r0) = slope·n + slope·(start_n − r0) for key n of the tile.
                # The first part, divided by the scale into raw-product units, is the same [BLOCK_N] vector every
                # tile (the compiler computes it once, before the loop); the second is one value per row and
                # tile, a row term below. One operation per score remains (Triton makes the vector the product's
                # accumulator input: a register copy per score instead of the subtract in the exponent), but the
                # conversion, multiply and add of each key's distance in every tile are gone: 600 instead of 691
                # SASS instructions per 128x128 tile on sm_90a, plain 531 (bench/probes/prefill_sass.py). Precision:
                # the vector is at most |slope|·BLOCK_N / scale (~1450 for slope 1 at D 128), rounded to fp32
                # once: ~1e-5 in the exponent; the row term is what the non-plain form adds per key.
                if ALIBI_WITH_SCALE:
                    s += slope * offs_n.to(tl.float32)[None, :]
                else:
                    s += (slope * (1.4426950408889634 / qk_scale)) * offs_n.to(tl.float32)[None, :]
        else:
            s = qk * qk_scale
        if HAS_ALIBI and ALIBI_BY_KEY and not PLAIN:
            if ALIBI_WITH_SCALE:
                # (qk + slope·col)·scale, no cap: qk_scale is already in log2 units
                s += (slope * qk_scale) * col
            else:
                s += (slope * 1.4426950408889634) * col
        elif HAS_ALIBI and not ALIBI_BY_KEY:
            if not ALIBI_WITH_SCALE:
                s += (slope * 1.4426950408889634) * rel
        if ROW_BIAS and not PLAIN:
            # a T5 far tile's one value per row; plain tiles take it in the max and the exponent below
            s += row_bias[:, None]
        if REL_MODE == 1 and NEAR_TILES and PLAIN:
            # T5 implicit, a tile the caller knows lies within max_distance of the diagonal: no per-tile branch.
            # In the plain form the values come in raw-product units (one multiply per vector element), so the
            # add lands before the max and the exponent keeps its single multiply-add; Triton turns qk + bias
            # into the product's accumulator input, so the gathered values load straight into it
            s += _t5_near_bias(rel_head, offs_m, offs_n, start_n, diag, alibi_r0, rel_md, 1.0 / qk_scale, BLOCK_N,
                               ROW_HEADS)  # fmt: skip
        elif REL_MODE == 1 and NEAR_TILES:
            s += _t5_near_bias(rel_head, offs_m, offs_n, start_n, diag, alibi_r0, rel_md, 1.0, BLOCK_N, ROW_HEADS)
        elif REL_MODE == 1:
            # T5 implicit: the per-distance table in log2 units, distances past max_distance sharing its ends.
            # A tile lying wholly beyond max_distance from the diagonal adds one value; only the tiles near the
            # diagonal gather per score. The table carries REL_PAD copies of each end value on either side, more
            # than the distances one tile spans, so the gather needs no clamp.
            rp_min = start_n - (tl.max(offs_m) + diag)
            rp_max = start_n + BLOCK_N - 1 - (tl.min(offs_m) + diag)
            if rp_max <= -rel_md:
                s += tl.load(rel_head)
            elif rp_min >= rel_md:
                s += tl.load(rel_head + 2 * rel_md)
            else:
                s += _t5_near_bias(rel_head, offs_m, offs_n, start_n, diag, alibi_r0, rel_md, 1.0, BLOCK_N, ROW_HEADS)
        if REL_MODE == 2:
            # T5 regular: bias[h, query position, key position], the query at i + Sk - Sq
            q_pos = tl.maximum(offs_m + diag, 0)
            r_mask = (offs_m[:, None] < seqlen_q) & (offs_kn[None, :] < seqlen_k)
            r_off = q_pos[:, None].to(tl.int64) * stride_rm + offs_kn[None, :]
            s += tl.load(rel_head + r_off, mask=r_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        if MASKED:
            s = tl.where(
                _visible(offs_m, offs_kn, seqlen_k, diag, window_left, window_right, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT),
                s,
                float("-inf"),
            )
        # [BLOCK_M]
        if PLAIN and (ROW_BIAS or HAS_ALIBI):
            # the plain form's one value per row and tile (log2 units): a T5 far tile's bias, ALiBi's
            # slope·(start_n − r0)
            if HAS_ALIBI:
                if ROW_HEADS:
                    row_slope = tl.reshape(slope, [offs_m.shape[0]])
                else:
                    row_slope = slope
                if ALIBI_WITH_SCALE:
                    row_slope = row_slope * qk_scale
                else:
                    row_slope = row_slope * 1.4426950408889634
                row_term = row_slope * (start_n - alibi_r0).to(tl.float32)
                if ROW_BIAS:
                    row_term += row_bias
            else:
                row_term = row_bias
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale + row_term)
        elif PLAIN:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        # m starts at -FLT_MAX, not -inf (see the caller), so m_new is finite (or NaN): a row that has seen no
        # visible key yet, or only scores of -inf, gets p = exp2(-inf) = 0, never exp2(-inf + inf) = NaN
        if PLAIN and (ROW_BIAS or HAS_ALIBI):
            # qk·scale + row_term − m: still one multiply-add per score
            p = tl.math.exp2(s * qk_scale - (m_new - row_term)[:, None])
        elif PLAIN:
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
        else:
            p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # [BLOCK_N, HEAD_DIM_PAD]
        if SAFE:
            v = v_safe
        elif MASKED or PAD_D:
            v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        else:
            v = tl.load(v_base + v_rows[:, None] + offs_d[None, :])
        if QUANT != 0 and not SAFE:
            v = v.to(q.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# lengths, head counts and window sizes vary per call: specializing on their values would recompile often
@triton.jit(
    do_not_specialize=[
        "num_heads_q",
        "group_size",
        "out_rows",
        "max_rows",
        "window_left",
        "window_right",
        "seqlen_bucket",
        "cap_q",
        "cap_k",
        "max_k",
        "pool_rows",
    ]
)
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_strides, k_strides, v_strides, o_strides, lse_strides,
    seq_q_ptr, seq_k_ptr, err_ptr, alibi_ptr, alibi_strides, rel_ptr, rel_strides, rel_md,
    block_table_ptr, stride_bt, page_size, k_scale_ptr, v_scale_ptr,
    num_heads_q, group_size, out_rows, max_rows, cap_q, cap_k, max_k, pool_rows, seqlen_bucket,
    qk_scale, cap_log2, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    IS_VARLEN: tl.constexpr, KV_CACHE: tl.constexpr, IS_PAGED: tl.constexpr, QUANT: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, ALIBI_WITH_SCALE: tl.constexpr, REL_MODE: tl.constexpr,
    PACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Operands: q, k, v, o [and lse] with their strides in elements, ``(batch, row, head)`` (``(batch, head,
    row)`` for lse; the batch stride is 0 in the packed layout); k and v as a KV cache's pools with
    ``KV_CACHE``, addressed through ``block_table_ptr`` (row stride ``stride_bt``, ``page_size`` keys a block)
    with ``IS_PAGED``, scaled per KV head by ``k/v_scale_ptr`` with ``QUANT``. seq_q/seq_k: the lengths, or
    cu_seqlens with ``IS_VARLEN``. A tensor a call does not use is None: lse without ``return_lse``, the ALiBi
    slopes ``[B, Hq]`` (strides ``(batch, head)``), the T5 bias (strides ``(head, query)``, ``rel_md`` its
    max distance), the block table and scales. The flags the autotuner keys on (HAS_ALIBI, REL_MODE, IS_PAGED,
    QUANT) stay parameters: a None makes no entry in its key, which could then not tell one absent tensor from
    another. err_ptr: the device's error word (attn.fast._errors).
    """
    STORE_LSE: tl.constexpr = lse_ptr is not None
    # fp32 inputs take full-precision products; the others ignore the setting
    PRECISION: tl.constexpr = "ieee" if q_ptr.dtype.element_ty == tl.float32 else "tf32"
    stride_qb, stride_qm, stride_qh = q_strides
    stride_kb, stride_kn, stride_kh = k_strides
    stride_vb, stride_vn, stride_vh = v_strides
    stride_ob, stride_om, stride_oh = o_strides
    # Consecutive programs are the row blocks of one head, so the blocks that stream the same K/V run side by
    # side and share it through L2 (the other order, all heads of one row block together, re-read every head's
    # K/V from memory once per row block and ran 13-37% slower on the H200: bench/NOTES.md). Within a head the
    # heaviest row blocks (most keys under a causal mask) start first, so the tail of the grid is short.
    # GQA packing (PACK > 1): a program serves PACK query heads of one KV head, its tile rows are BLOCK_M // PACK
    # tokens × PACK heads (row r: token r // PACK, head r % PACK), so each K/V tile is loaded once for all of
    # them. A generation request (one token) then fills PACK rows of the tile instead of one.
    TOKENS: tl.constexpr = BLOCK_M // PACK
    num_m_blocks = tl.cdiv(max_rows, TOKENS)
    pid = tl.program_id(0)
    pid_bh = pid // num_m_blocks
    pid_m = num_m_blocks - 1 - pid % num_m_blocks
    num_programs_h = num_heads_q // PACK
    b = pid_bh // num_programs_h
    h = pid_bh % num_programs_h * PACK
    h_kv = h // group_size
    offs_r = tl.arange(0, BLOCK_M)
    # rel_head and stride_rm are read only where REL_MODE != 0 (0 otherwise: the tile helper's operand tuples
    # cannot hold None)
    rel_head = 0
    stride_rm = 0
    if REL_MODE != 0:
        stride_rm = rel_strides[1]
    if PACK == 1:
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(alibi_ptr + b * alibi_strides[0] + h * alibi_strides[1])
        if REL_MODE != 0:
            rel_head = rel_ptr + h.to(tl.int64) * rel_strides[0]
        head_off_q = 0
        head_off_o = 0
        head_off_l = 0
    else:
        # per-row heads: slopes and bias rows become [BLOCK_M, 1] columns, broadcast over the keys
        row_head = offs_r % PACK
        slope = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
        if HAS_ALIBI:
            slope = tl.load(alibi_ptr + b * alibi_strides[0] + (h + row_head) * alibi_strides[1])[:, None]
        if REL_MODE != 0:
            rel_head = (rel_ptr + (h + row_head).to(tl.int64) * rel_strides[0])[:, None]
        head_off_q = row_head * stride_qh
        head_off_o = row_head * stride_oh
        head_off_l = 0
        if STORE_LSE:
            head_off_l = row_head * lse_strides[1]

    b64 = b.to(tl.int64)
    # Offsets and lengths were not read on the host (attn.fast._errors): each is clamped into the tensor it
    # indexes, cap_q/cap_k rows (the packed lengths, the padded lengths, or the cache capacity), and max_k keys
    # (max_seqlen_k, or what a T5 bias covers); a violation sets a bit of the error word
    if IS_VARLEN:
        cu_lo = tl.load(seq_q_ptr + b)
        cu_hi = tl.load(seq_q_ptr + b + 1)
        lo_c = tl.minimum(tl.maximum(cu_lo, 0), cap_q)
        hi_c = tl.minimum(tl.maximum(cu_hi, lo_c), cap_q)
        err = tl.where((lo_c != cu_lo) | (hi_c != cu_hi), CU_SEQLENS, 0)
        start_q = lo_c.to(tl.int64)
        seqlen_q = hi_c - lo_c
        # rows past max_rows have no program
        err |= tl.where(seqlen_q > max_rows, MAX_SEQLEN, 0)
        if KV_CACHE:
            # keys from a KV cache (contiguous rows or pool blocks of sequence b): seq_k holds its lengths
            start_k = b64 * 0
            seqlen_k = tl.load(seq_k_ptr + b)
            err |= tl.where((seqlen_k < 0) | (seqlen_k > cap_k), LENGTHS, 0)
            seqlen_k = tl.minimum(tl.maximum(seqlen_k, 0), cap_k)
        else:
            cu_lo = tl.load(seq_k_ptr + b)
            cu_hi = tl.load(seq_k_ptr + b + 1)
            lo_c = tl.minimum(tl.maximum(cu_lo, 0), cap_k)
            hi_c = tl.minimum(tl.maximum(cu_hi, lo_c), cap_k)
            err |= tl.where((lo_c != cu_lo) | (hi_c != cu_hi), CU_SEQLENS, 0)
            start_k = lo_c.to(tl.int64)
            seqlen_k = hi_c - lo_c
            err |= tl.where(seqlen_k > max_k, MAX_SEQLEN, 0)
            seqlen_k = tl.minimum(seqlen_k, max_k)
        # packed rows past this sequence belong to the next one: never store them
        row_limit = seqlen_q
    else:
        start_q = b64 * 0
        seqlen_q = tl.load(seq_q_ptr + b)
        start_k = b64 * 0
        seqlen_k = tl.load(seq_k_ptr + b)
        err = tl.where((seqlen_q < 0) | (seqlen_q > cap_q) | (seqlen_k < 0) | (seqlen_k > cap_k), LENGTHS, 0)
        seqlen_q = tl.minimum(tl.maximum(seqlen_q, 0), cap_q)
        seqlen_k = tl.minimum(tl.maximum(seqlen_k, 0), cap_k)
        # padded rows past the sequence are part of the output and get zeros
        row_limit = out_rows + seqlen_q * 0
    # one program of each sequence reports
    tl.atomic_or(err_ptr, err, mask=(err != 0) & (pid % num_m_blocks == 0) & (h == 0), sem="relaxed")

    m0 = pid_m * TOKENS
    if m0 >= row_limit:
        return

    q_base = q_ptr + b64 * stride_qb + start_q * stride_qm + h.to(tl.int64) * stride_qh
    if IS_PAGED:
        # pool blocks are addressed per tile through the block table
        k_base = k_ptr + h_kv.to(tl.int64) * stride_kh
        v_base = v_ptr + h_kv.to(tl.int64) * stride_vh
    else:
        k_base = k_ptr + b64 * stride_kb + start_k * stride_kn + h_kv.to(tl.int64) * stride_kh
        v_base = v_ptr + b64 * stride_vb + start_k * stride_vn + h_kv.to(tl.int64) * stride_vh
    bt_row = 0  # read only with IS_PAGED
    if IS_PAGED:
        bt_row = block_table_ptr + b64 * stride_bt
    k_scale = 1.0
    if QUANT != 0:
        k_scale = tl.load(k_scale_ptr + h_kv)
    o_base = o_ptr + b64 * stride_ob + start_q * stride_om + h.to(tl.int64) * stride_oh

    # the query token of each tile row
    offs_m = m0 + offs_r // PACK
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_valid = offs_m < seqlen_q
    if PACK * TOKENS != BLOCK_M:
        # a pack that does not divide the tile leaves its last rows unused
        row_valid &= offs_r < PACK * TOKENS
    # [BLOCK_M, HEAD_DIM_PAD]
    q = tl.load(
        q_base + (offs_m * stride_qm + head_off_q)[:, None] + offs_d[None, :],
        mask=row_valid[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )

    # bottom-right alignment: query row i sits on key diag + i
    diag = seqlen_k - seqlen_q
    m_last = m0 + TOKENS - 1
    # [lo, hi): keys visible to at least one row of the block
    lo = seqlen_k * 0
    hi = seqlen_k
    if HAS_WINDOW_LEFT:
        lo = tl.maximum(m0 + diag - window_left, 0) // BLOCK_N * BLOCK_N
    if HAS_WINDOW_RIGHT:
        hi = tl.minimum(m_last + diag + window_right + 1, seqlen_k)
    if IS_PAGED:
        # the block-table entries of the keys this block reads, checked once here instead of in the tile loops:
        # with one outside the pool the block reads no key at all (its rows output zeros) and reports it
        outside = seqlen_k * 0
        page_hi = tl.cdiv(hi, page_size)
        for p0 in range(lo // page_size, page_hi, BLOCK_N):
            pages = p0 + offs_n
            entry = tl.load(bt_row + pages, mask=pages < page_hi, other=0)
            outside |= tl.max(((entry < 0) | (entry >= pool_rows)).to(tl.int32), 0)
        tl.atomic_or(err_ptr, BLOCK_TABLE, mask=outside != 0, sem="relaxed")
        if outside != 0:
            hi = lo
    if m0 >= seqlen_q:
        hi = lo
    # [full_lo, full_hi): keys visible to every row of the block, tile-aligned
    full_lo = lo
    if HAS_WINDOW_LEFT:
        full_lo = tl.cdiv(tl.maximum(m_last + diag - window_left, 0), BLOCK_N) * BLOCK_N
    full_hi = seqlen_k
    if HAS_WINDOW_RIGHT:
        full_hi = tl.minimum(m0 + diag + window_right + 1, seqlen_k)
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), tl.maximum(hi, lo))

    # m starts at -FLT_MAX rather than -inf, so no tile needs a guard against exp2(-inf - (-inf)): a row whose
    # visible scores are all -inf (a -inf bias, an infinite query) keeps l = 0 and outputs zeros with lse = -inf,
    # as the reference gives it (a visible score below -FLT_MAX, in log2 units, cannot be finite)
    m_i = tl.full([BLOCK_M], -3.4028234663852886e38, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    ALIBI_BY_KEY: tl.constexpr = not (ALIBI_WITH_SCALE and HAS_SOFTCAP)
    kv = (k_base, v_base, stride_kn, stride_vn, stride_kb, stride_vb, bt_row, page_size, k_scale)
    geom = (seqlen_q, seqlen_k, diag, window_left, window_right)
    bias = (qk_scale, cap_log2, slope, m0 + diag, rel_head, stride_rm, rel_md)
    near_lo = full_hi
    near_hi = full_hi
    if REL_MODE == 1:
        near_lo, near_hi = _t5_near_range(full_lo, full_hi, m0 + diag, m_last + diag, rel_md, BLOCK_N)
    bounds = (lo, full_lo, near_lo, near_hi, full_hi, hi)
    CFG: tl.constexpr = (HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SOFTCAP, HAS_ALIBI, ALIBI_WITH_SCALE, ALIBI_BY_KEY,
                         REL_MODE, PACK > 1, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, PRECISION, IS_PAGED, QUANT)  # fmt: skip
    acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, offs_m, offs_d, kv, geom, bias, bounds, LEAD, CFG)
    if REL_MODE == 1:
        acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, offs_m, offs_d, kv, geom, bias, bounds, FAR_LEFT, CFG)
        acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, offs_m, offs_d, kv, geom, bias, bounds, NEAR, CFG)
        acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, offs_m, offs_d, kv, geom, bias, bounds, FAR_RIGHT, CFG)
    else:
        acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, offs_m, offs_d, kv, geom, bias, bounds, FULL, CFG)
    acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, offs_m, offs_d, kv, geom, bias, bounds, TAIL, CFG)
    # A non-finite value in a tile's V makes its column of the product non-finite in every row, 0·NaN = NaN, and
    # that never leaves acc (alpha is finite). Where a masked tile hides its key from some rows, those rows must
    # not see it: a block whose accumulator ends non-finite (or whose row sums overflow: a false alarm costs
    # time only) computes its tiles again in RERUN, which keeps such values to the rows that see them. Only
    # inputs holding non-finite values take the branch; the normal loops carry no check at all.
    row_sums = tl.sum(acc, 1)
    if tl.max(((row_sums != row_sums) | (tl.abs(row_sums) == float("inf"))).to(tl.int32), 0) != 0:
        m_i = tl.full([BLOCK_M], -3.4028234663852886e38, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, offs_m, offs_d, kv, geom, bias, bounds, RERUN, CFG)

    # Invariant: l = 0 exactly for a row that saw no visible key (each visible score adds exp2(s − m) > 0, the
    # max's own key 1), and those rows keep their zeros. A NaN score (NaN or ±inf in q, NaN in a visible key)
    # makes l NaN: the max drops NaN, but exp2(NaN − m) does not. Testing l != 0 rather than l > 0 lets that NaN
    # through acc / l (and into the lse), as the reference gives it; a NaN value makes acc NaN. No per-score work.
    # A row whose visible scores are all -inf also has l = 0 and outputs zeros, but where it sees a non-finite
    # value its acc holds NaN (0·p of the tiles' products is 0 elsewhere): acc·0 keeps that NaN, as the reference
    # marks every row that sees a non-finite value.
    has_key = (l_i != 0.0) & row_valid
    l_safe = tl.where(has_key, l_i, 1.0)
    out = tl.where(has_key[:, None], acc / l_safe[:, None], tl.where(row_valid[:, None], acc * 0.0, 0.0))
    if QUANT != 0:
        # the output is linear in V: its scale applies once, here
        out = out * tl.load(v_scale_ptr + h_kv)
    store_rows = offs_m < row_limit
    if PACK * TOKENS != BLOCK_M:
        store_rows &= offs_r < PACK * TOKENS
    tl.store(
        o_base + (offs_m * stride_om + head_off_o)[:, None] + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=store_rows[:, None] & (offs_d[None, :] < HEAD_DIM),
    )
    if STORE_LSE:
        # m_i is in log2 units; ln(sum exp(s)) = (m + log2(l)) * ln(2)
        lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
        if HAS_ALIBI and ALIBI_BY_KEY:
            # the per-row ALiBi term the tiles left out, slope·(i + diag − r0) with r0 = m0 + diag, in natural units
            row_slope = slope if PACK == 1 else tl.reshape(slope, [BLOCK_M])
            if ALIBI_WITH_SCALE:
                row_slope = row_slope * (qk_scale * 0.6931471805599453)
            lse -= row_slope * (offs_m - m0).to(tl.float32)
        lse = tl.where(has_key, lse, float("-inf"))
        stride_lb, stride_lh, stride_lm = lse_strides
        lse_base = lse_ptr + b64 * stride_lb + h.to(tl.int64) * stride_lh + start_q * stride_lm
        tl.store(lse_base + (offs_m * stride_lm + head_off_l), lse, mask=store_rows)


_REL_TABLES: dict = {}


def _log2_distance_table(rel) -> torch.Tensor:
    """The implicit-mode table the kernels read, kept for as long as the same bucket table lives unchanged.

    Building it is a dozen small torch kernels (the bucket function over every distance, a gather, the padding):
    ~35 µs of device time per call on the H200, a fixed cost that made T5 decode 0.78-0.88x plain
    (`features_H200_2026-11-29_decode_d.json`). It is rebuilt when the bucket table is written in place.
    """

    def build():
        # log2 units (the kernels exponentiate base 2), and REL_PAD copies of each end value on either side: the
        # view starts at distance -max_distance, so a prefill tile's gather may index up to REL_PAD entries
        # past either end, inside this tensor, without clamping
        table = rel.distance_table()
        ends = (table[:, :1].expand(-1, REL_PAD), table, table[:, -1:].expand(-1, REL_PAD))
        return torch.cat(ends, dim=1).mul_(LOG2E)[:, REL_PAD:]

    params = (rel.max_distance, rel.bidirectional, tuple(rel.table.shape))
    return _memo.derived(_REL_TABLES, rel.table, params, build, limit=64)


def relative_bias_operands(rel):
    """What the kernels read for a T5 bias: ``(mode, tensor, (stride_h, stride_q), max_distance)``.

    Mode 0: none (tensor and strides None). Mode 1 (implicit): the per-distance table
    ``[Hq, 2·max_distance + 1]`` in log2 units (a view into one padded by ``REL_PAD`` end values on either side).
    Mode 2 (regular): the given ``[Hq, L, L]`` bias, which must have unit stride along the key position.
    """
    if rel is None:
        return 0, None, None, 0
    if rel.implicit:
        view = _log2_distance_table(rel)
        return 1, view, (view.stride(0), 0), rel.max_distance
    bias = rel.bias if rel.bias.stride(-1) == 1 else rel.bias.contiguous()
    return 2, bias, (bias.stride(0), bias.stride(1)), 0


_attn_fwd_tuned = triton.autotune(
    configs=CONFIGS,
    key=[
        "HEAD_DIM_PAD",
        "IS_VARLEN",
        "KV_CACHE",
        "IS_PAGED",
        "QUANT",
        "HAS_WINDOW_LEFT",
        "HAS_WINDOW_RIGHT",
        "HAS_SOFTCAP",
        "HAS_ALIBI",
        # the bias modes need different shared memory: T5 implicit fits the 3-stage 128x128 config, regular
        # mode does not (bench/probes/prefill_sass.py), and both pass float32 bias tensors, which the autotuner's
        # dtype part of the key would not tell apart
        "REL_MODE",
        "PACK",
        "seqlen_bucket",
    ],  # fmt: skip
    prune_configs_by={"early_config_prune": _keep},
)(_attn_fwd_kernel)


def _fixed_config(head_dim_pad: int, dtype: torch.dtype) -> dict:
    """The config used when not autotuning: small tiles in the interpreter, a safe Hopper default otherwise."""
    if is_interpreter():
        # small tiles so that tiny test shapes still span several tiles, exercising the loops and edge masks
        return {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if head_dim_pad >= 256:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    seqlens_q: torch.Tensor | None = None,
    seqlens_k: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    q_scaling: float = 1.0,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    alibi_mode: str = "alibi",
    rel_bias=None,
    return_lse: bool = False,
    validate: bool | None = None,
):
    """Fused context-phase attention; same contract as `attn.reference.attention`.

    Two layouts. Padded: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``, optionally with the valid lengths
    ``seqlens_q/k``. Packed (varlen): ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]`` with ``cu_seqlens_q/k``.
    Accumulation is always fp32 (TensorRT-LLM's ``enabled_with_fp32_acc``); fp32 inputs use full-precision
    (not TF32) products.

    Args:
        q: queries, float16/bfloat16/float32, on a CUDA device (or any device under the interpreter).
        k: keys, same dtype and device as q.
        v: values, same shape as k.
        cu_seqlens_q: int32 ``[B+1]`` prefix sums of the query lengths (packed layout).
        cu_seqlens_k: int32 ``[B+1]`` prefix sums of the key lengths (packed layout).
        max_seqlen_q: longest query sequence (packed layout), as FlashAttention takes it. When None, the
            validated call computes it on the host and the default call bounds it by the packed length (the same
            result, with more programs that exit at once): pass it in a serving loop.
        max_seqlen_k: longest key sequence (packed layout), likewise.
        seqlens_q: int32 ``[B]`` valid query lengths (padded layout); rows past them output zeros.
        seqlens_k: int32 ``[B]`` valid key lengths (padded layout); keys past them are invisible.
        causal: bottom-right aligned causal mask (query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq``).
        softmax_scale: multiplier of the scores; defaults to ``1/sqrt(D)``.
        q_scaling: TensorRT-LLM's divisor of the scale: ``scale = softmax_scale / q_scaling``.
        window_size: ``(left, right)`` sliding window around the diagonal, inclusive; -1 is unbounded.
        softcap: if > 0, scores become ``softcap·tanh(s/softcap)`` after scaling.
        alibi_slopes: ALiBi slopes, float ``[Hq]`` or ``[B, Hq]``; the bias ``slope·(j − (i + Sk − Sq))`` is
            computed inside the kernel, never materialized.
        alibi_mode: ``"alibi"`` (bias after scaling and capping) or ``"alibi_with_scale"`` (bias on the raw
            product, before scaling).
        rel_bias: a T5 ``RelativeBias``: implicit mode reads a per-distance table of ``2·max_distance + 1``
            values per head inside the kernel; regular mode reads the given ``[Hq, L, L]`` bias per score.
        return_lse: also return the natural-log log-sum-exp of each row's scores.
        validate: True checks ``cu_seqlens``, ``seqlens`` and the ``max_seqlen`` hints against the values on
            the host (waiting for the device); a bad call raises and nothing runs. False reads nothing back: the
            kernel clamps offsets and lengths into the tensors and records violations for `attn.check_errors`.
            None (the default) is False unless the environment sets ``ATTN_DEBUG=1``.

    Returns:
        ``out`` shaped like q in q's dtype, and with ``return_lse`` also float32 ``lse``: ``[B, Hq, Sq]``
        padded or ``[Hq, Tq]`` packed (``-inf`` for rows that see no key, and for padding rows).
    """
    check_flag("return_lse", return_lse)
    cu_seqlens_q, cu_seqlens_k, seqlens_q, seqlens_k = unit_stride(cu_seqlens_q, cu_seqlens_k, seqlens_q, seqlens_k)
    args = check_attention(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, seqlens_q=seqlens_q, seqlens_k=seqlens_k, causal=causal,
        softmax_scale=softmax_scale, q_scaling=q_scaling, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, alibi_mode=alibi_mode, rel_bias=rel_bias,
        dtypes=(torch.float16, torch.bfloat16, torch.float32), validate=_errors.resolve_validate(validate),
    )  # fmt: skip
    if args.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q's head dim must be at most {MAX_HEAD_DIM} for the fused kernel, got {args.head_dim}")
    if q.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"q must be a CUDA tensor (or run with TRITON_INTERPRET=1), got device {q.device}")
    # the kernel reads each head's D features with unit stride; anything else is copied once here
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    gluon_mode = os.environ.get("ATTN_GLUON", "")
    if gluon_mode != "0" and q.device.type == "cuda":
        # issue 17: the warp-specialized Gluon kernel on sm_90 where it covers the call, by default only where it
        # was measured faster than this file's kernel (gluon_default); ATTN_GLUON=1 forces it, =0 turns it off
        from . import gluon_attention as _g

        has_lens = seqlens_q is not None or seqlens_k is not None
        if _g.gluon_supported(q, k, v, packed=args.packed, seqlens=has_lens, head_dim=args.head_dim,
                              alibi=args.alibi_slopes is not None, rel_bias=args.rel_bias is not None,
                              softcap=args.softcap) and (
            gluon_mode == "1"
            or _g.gluon_default(seqlen_q=q.shape[1], seqlen_k=k.shape[1], num_heads_q=q.shape[2],
                                num_heads_kv=k.shape[2], head_dim=args.head_dim, window_left=args.window_left,
                                window_right=args.window_right, softcap=args.softcap,
                                unmeasured=has_lens or args.packed or args.alibi_slopes is not None)
        ):  # fmt: skip
            # with lengths, both (check_attention fills the one not given with the padded length)
            if args.packed:
                lens = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=args.max_seqlen_q,
                            max_seqlen_k=args.max_seqlen_k)  # fmt: skip
            elif has_lens:
                lens = dict(seqlens_q=args.seqlens_q, seqlens_k=args.seqlens_k)
            else:
                lens = {}
            return _g.attention_gluon(q, k, v, scale=args.scale, window_left=args.window_left,
                                      window_right=args.window_right, softcap=args.softcap, return_lse=return_lse,
                                      alibi_slopes=args.alibi_slopes, alibi_with_scale=args.alibi_with_scale,
                                      **lens)  # fmt: skip

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if args.packed:
        lse_shape, row_dim = (args.num_heads_q, q.shape[0]), q.shape[0]
    else:
        lse_shape, row_dim = (args.batch, args.num_heads_q, q.shape[1]), q.shape[1]
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device) if return_lse else None
    if q.numel() == 0 or k.numel() == 0:
        # nothing to attend to (or nobody asking): zeros and -inf by definition, without a launch
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return (out, lse) if return_lse else out

    if args.packed:
        # one flat token axis: the batch stride is 0 and the lse is [Hq, Tq]
        seq_q, seq_k = cu_seqlens_q, cu_seqlens_k
        q_strides, k_strides, v_strides, o_strides = ((0, *x.stride()[:2]) for x in (q, k, v, out))
        lse_strides = (0, *lse.stride()) if lse is not None else None
    else:
        seq_q, seq_k = args.seqlens_q, args.seqlens_k
        q_strides, k_strides, v_strides, o_strides = (x.stride()[:3] for x in (q, k, v, out))
        lse_strides = lse.stride() if lse is not None else None

    if args.softcap > 0:
        # s = cap * tanh(qk * scale / cap), kept in log2 units for exp2
        qk_scale, cap_log2 = args.scale / args.softcap, args.softcap * LOG2E
    else:
        qk_scale, cap_log2 = args.scale * LOG2E, 0.0
    head_dim_pad = max(16, next_power_of_2(args.head_dim))
    max_rows = args.max_seqlen_q if args.packed else row_dim

    def grid(meta):
        # one flat axis (its limit is 2^31 - 1, a second axis's only 65535): row blocks of a head adjacent
        return (args.batch * args.num_heads_q * cdiv(max_rows, meta["BLOCK_M"]),)

    rel_mode, rel_t, rel_strides, rel_md = relative_bias_operands(args.rel_bias)
    slopes = args.alibi_slopes
    if autotune_enabled():
        kernel, meta = _attn_fwd_tuned, {}
    else:
        kernel, meta = _attn_fwd_kernel, _fixed_config(head_dim_pad, q.dtype)
    launch(
        kernel, grid,
        q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=out, lse_ptr=lse,
        q_strides=q_strides, k_strides=k_strides, v_strides=v_strides, o_strides=o_strides, lse_strides=lse_strides,
        seq_q_ptr=seq_q, seq_k_ptr=seq_k, err_ptr=_errors.error_word(q.device),
        alibi_ptr=slopes, alibi_strides=slopes.stride() if slopes is not None else None,
        rel_ptr=rel_t, rel_strides=rel_strides, rel_md=rel_md,
        block_table_ptr=None, stride_bt=0, page_size=1, k_scale_ptr=None, v_scale_ptr=None,
        num_heads_q=args.num_heads_q, group_size=args.group_size, out_rows=row_dim, max_rows=max_rows,
        cap_q=q.shape[0] if args.packed else q.shape[1], cap_k=k.shape[0] if args.packed else k.shape[1],
        max_k=args.max_seqlen_k, pool_rows=1, seqlen_bucket=next_power_of_2(max_rows),
        qk_scale=qk_scale, cap_log2=cap_log2, window_left=args.window_left, window_right=args.window_right,
        HEAD_DIM=args.head_dim, HEAD_DIM_PAD=head_dim_pad,
        IS_VARLEN=args.packed, KV_CACHE=False, IS_PAGED=False, QUANT=0, HAS_WINDOW_LEFT=args.window_left >= 0,
        HAS_WINDOW_RIGHT=args.window_right >= 0, HAS_SOFTCAP=args.softcap > 0,
        HAS_ALIBI=slopes is not None, ALIBI_WITH_SCALE=args.alibi_with_scale, REL_MODE=rel_mode, PACK=1,
        **meta,
    )  # fmt: skip
    return (out, lse) if return_lse else out
