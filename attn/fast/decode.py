"""Generation-phase (decode) attention in Triton: GQA-packed, split-K, over contiguous or paged caches.

One program serves all ``G = Hq / Hkv`` query heads of one KV head (times the ``Sq`` new tokens): their
``Sq·G`` rows form the M dimension of the products, so each K/V tile is read from memory once for the whole
group and the products run on tensor cores (TensorRT-LLM's XQA idea; vLLM and FlashAttention call it GQA
packing).

Decode reads the whole cache to produce a handful of rows, so it is bound by memory bandwidth, and a batch
with few ``(sequence, KV head)`` pairs leaves most of the 132 SMs idle. Multi-block mode (split-K,
"flash-decoding") cuts each cache into ``num_splits`` chunks handled by separate programs; each writes its
normalised partial output and log-sum-exp, and the last program of each pair to finish merges them:
``lse = logsumexp_s(lse_s)``, ``o = Σ_s exp(lse_s − lse)·o_s``. One launch per call, not two: at small batch a
launch's host time is comparable to the kernel's, and event-timed callers without CUDA graphs pay it.

Paged caches are read through the block table. Where every tile lies within one page (pages a multiple of the
tile, no ring and no beam indirection) a tile needs one entry; otherwise each key looks up its own, which works
for any block size, including sizes smaller than the tile.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _memo
from ..checks import F16_MAX, check_decode, check_flag, check_seqlen_hints
from ..reference.preprocess import RopeScaling
from . import _errors
from . import gluon_decode as gd
from ._triton import (
    INT8_TO_F16,
    MAX_HEAD_DIM,
    autotune_enabled,
    cdiv,
    current_stream,
    is_interpreter,
    launch,
    mul_rn,
    next_power_of_2,
    unit_stride,
)
from .attention import LOG2E, _tanh, relative_bias_operands
from .kv_cache import quant_code, rope_pairs
from .preprocess import _cos_sin

# MERGE_TILE: values a tile of the split merge holds, 32 a thread (see _merge_splits)
CONFIGS = [
    triton.Config({"BLOCK_N": bn, "MERGE_TILE": 1024 * w}, num_warps=w, num_stages=s)
    # (64, 2, 4) is the best tile for bf16 and FP8 caches at the shapes, (128, 4, 5) for INT8 pages
    # (bench/probes/decode_probe.py); the rest cover other head counts and lengths
    for bn, w, s in [(64, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 3), (32, 4, 4), (64, 2, 4), (128, 4, 5)]
]


# shared memory of each, compiled for sm_90a by bench/probes/decode_sass.py's method (contiguous, D 128): 132 KiB
# and 180 KiB; the last two are for D 256, where the first two need 264 and 360 KiB (see shared_bytes)
ROTARY_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "MERGE_TILE": 4096}, num_warps=4, num_stages=s)
    for bn, s in [(64, 2), (32, 4), (32, 2), (16, 4)]
]

# the shared memory one block may use on the H100 and H200 (227 KiB); a GPU reports its own
SMEM_LIMIT = 232448


def shared_bytes(
    block_n: int, num_stages: int, head_dim_pad: int, kv_bytes: int, rotary: bool, block_m: int = 16
) -> int:
    """An upper estimate of the decode kernel's shared memory (16-bit queries): ``num_stages − 1`` buffered
    copies of each tile the loop pipelines (K and V in the cache's dtype; with RoPE at read time also the
    partner tile and the fp32 cos and sin tiles), the 16-bit query tile, with RoPE the turned key tile on its
    way to the product, and 4 KiB of scratch.

    Fitted to Triton 3.6's sm_90 builds of this kernel (compiled without a GPU, with the launch's
    divisibility hints), above by at most 4 KiB for every config of `CONFIGS` and `ROTARY_CONFIGS` at D
    128 and 256 over fp16 and int8 caches: e.g. RoPE at D 128, 64-key tiles in 2 stages, 132 KiB; at D 256,
    264 KiB (the H100's OutOfResources of issue 18, "Required: 241664" in its build, over the 227 KiB limit);
    no RoPE, D 256, 64 keys in 3 stages, 138 KiB.
    """
    per_key = 2 * kv_bytes + (kv_bytes + 8 if rotary else 0)
    staged = max(num_stages - 1, 1) * block_n * head_dim_pad * per_key
    turned = 2 * block_n * head_dim_pad if rotary else 0
    return staged + turned + 2 * block_m * head_dim_pad + 4096


@functools.cache
def _smem_limit(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return SMEM_LIMIT
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT) or SMEM_LIMIT


def fitting_configs(
    configs, head_dim_pad: int, kv_bytes: int, rotary: bool, limit: int = SMEM_LIMIT, block_m: int = 16
) -> list:
    """The configs whose `shared_bytes` fit ``limit``; the one needing least if none does (so every valid
    input gets a launch, and a wrong estimate shows as Triton's own error rather than as no config at all)."""

    def need(c):
        return shared_bytes(c.kwargs["BLOCK_N"], c.num_stages, head_dim_pad, kv_bytes, rotary, block_m)

    keep = [c for c in configs if need(c) <= limit]
    return keep or [min(configs, key=need)]


def _keep(configs, named_args, **kwargs):
    if named_args["q_ptr"].dtype == torch.float32:
        # IEEE fp32 tiles: small ones, as in the context kernel (this path is for correctness, not speed)
        return [triton.Config({"BLOCK_N": 32, "MERGE_TILE": 4096}, num_warps=4, num_stages=2)]
    rotary = bool(kwargs.get("ROTARY_DIM", 0))
    # RoPE at read time pipelines a partner tile and fp32 cos/sin tiles beside K and V: 64-key tiles in three
    # stages need 244 KiB of shared memory at D 128 (over the H200's 227), so it has configs of its own
    k = named_args["k_ptr"]
    limit = _smem_limit(k.device.index if k.is_cuda else None)
    return fitting_configs(ROTARY_CONFIGS if rotary else configs, kwargs["HEAD_DIM_PAD"], k.element_size(), rotary,
                           limit, kwargs["BLOCK_M"])  # fmt: skip


# error bits (attn.fast._errors), as compile-time constants of the kernels
LENGTHS = tl.constexpr(_errors.LENGTHS)
BLOCK_TABLE = tl.constexpr(_errors.BLOCK_TABLE)
INDIRECTION = tl.constexpr(_errors.INDIRECTION)
QUERY_RANGE = tl.constexpr(_errors.QUERY_RANGE)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _widen(x, dtype: tl.constexpr, INT8_ASM: tl.constexpr):
    """A tile of int8 or e4m3 codes (or of keys already turned by RoPE) in the products' dtype, exactly."""
    if INT8_ASM and x.dtype == tl.int8 and dtype == tl.float16:
        # int8 -> fp16 four at a time (INT8_TO_F16, FasterTransformer's trick), with integer and half2 operations
        # instead of one conversion per code (the conversion units issue at a quarter of the integer rate); the
        # interpreter takes the plain conversion.
        return tl.inline_asm_elementwise(
            asm=INT8_TO_F16,
            constraints="=r,=r,r",
            args=[x],
            dtype=tl.float16,
            is_pure=True,
            pack=4,
        )
    else:
        return x.to(dtype)


@triton.jit
def _slots(offs_n, sinks, wrap_n, ring_shift, ring, CYCLIC: tl.constexpr):
    """Key n of the sequence (token order, within what the cache still holds) -> its slot in the cache.

    A cyclic cache of N slots after L > N tokens keeps its sinks in slots [0, S) and the newest N - S of the
    rest in a ring: token t >= S sits in slot S + (t - S) mod (N - S). Key n >= S is token n + L - N, so across
    [S, N) its slots run up by one from S + ring_shift and wrap once, at key wrap_n: one compare and a select
    per key instead of an integer remainder by a runtime value (ring_shift and wrap_n come once per program).
    """
    if CYCLIC:
        return offs_n + tl.where(offs_n < sinks, 0, tl.where(offs_n < wrap_n, ring_shift, ring_shift - ring))
    else:
        return offs_n


@triton.jit
def _first_blocks(
    block_table_ptr, b64, stride_bt, lo, hi, sinks, wrap_n, ring_shift, ring,
    CYCLIC: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # A paged tile's block-table entries are loaded one iteration ahead: its K/V loads then depend on no load of
    # their own iteration, and the pipeliner keeps them in flight (FP8 pages: 1.04x -> 1.3x the bf16 cache's
    # speed, bench/probes/decode_probe.py). These are the first tile's, for a loop over [lo, hi): one entry when the
    # tile lies within a page (see _decode_tiles), else one per key.
    if (not CYCLIC) and PAGE_SIZE % BLOCK_N == 0:
        first = tl.load(block_table_ptr + b64 * stride_bt + lo // PAGE_SIZE, mask=lo < hi, other=0)
    else:
        offs_lo = lo + tl.arange(0, BLOCK_N)
        slot = _slots(offs_lo, sinks, wrap_n, ring_shift, ring, CYCLIC)
        first = tl.load(block_table_ptr + b64 * stride_bt + slot // PAGE_SIZE, mask=offs_lo < hi, other=0)
    return first


@triton.jit
def _visible(offs_n, key_valid, tok, diag, window_left, window_right, HAS_WINDOW_LEFT: tl.constexpr,
             HAS_WINDOW_RIGHT: tl.constexpr):  # fmt: skip
    """[BLOCK_M, BLOCK_N]: which keys of a tile each row sees (new token i sits on key diag + i)."""
    visible = key_valid[None, :]
    if HAS_WINDOW_RIGHT:
        visible &= offs_n[None, :] <= tok[:, None] + diag + window_right
    if HAS_WINDOW_LEFT:
        visible &= offs_n[None, :] >= tok[:, None] + diag - window_left
    return visible


# The key ranges of one program's chunk: `_decode_tiles`' STAGE picks one from the bounds (lo, far_hi, hi) the
# kernel computes, as the stages of Triton's attention tutorial do.
ALL = tl.constexpr(0)  # [lo, hi): the whole chunk (no T5 implicit bias)
FAR = tl.constexpr(1)  # [lo, far_hi): T5 implicit, keys past max_distance left of every row: one value per row
NEAR = tl.constexpr(2)  # [far_hi, hi): T5 implicit, the rest, the table gathered per score
RERUN = tl.constexpr(3)  # [lo, hi) again in SAFE narrow tiles, for a chunk whose accumulator ended non-finite


@triton.jit
def _decode_tiles(
    next_block, m_i, l_i, acc, bad, q, offs_d, d_mask, qrows, kv, table, cyclic, rope, scores, bounds,
    STAGE: tl.constexpr, CFG: tl.constexpr,
):  # fmt: skip
    """The keys of one STAGE of a program's chunk folded into its running (m_i, l_i, acc); ``next_block``, for
    paged caches read without a beam indirection, the stage's first tile's block-table entries (`_first_blocks`).

    Operands, grouped as the kernel builds them (runtime tuples: Triton turns their elements into tensors, so an
    absent pointer is 0, never None): ``qrows`` = (tok, row_valid, diag); ``kv`` = (k_head, v_head, stride_kb,
    stride_kn, stride_vb, stride_vn); ``table`` = (b64, block_table_ptr, stride_bt, ind_ptr, stride_ib,
    stride_ibeam, beam_width, pool_rows); ``cyclic`` = (sinks, wrap_n, ring_shift, ring); ``rope`` = (partner,
    sign, fi, rotated, cos_ptr, sin_ptr, stride_cos); ``scores`` = (k_scale, qk_scale, cap_log2, slope,
    window_left, window_right, rel_rows, stride_rm, rel_md, rel_far); ``bounds`` = (lo, far_hi, hi). ``CFG``:
    the kernel's compile-time flags, one constexpr tuple (indexed below).

    Indices read from tensors (block-table entries, beam indirection entries) outside the tensors they address
    are replaced by 0 (block 0, beam 0), so no value makes the loop read outside them; ``bad`` ([BLOCK_N] int32)
    gathers the error bits of those it replaced (attn.fast._errors), reported once after the loop.

    With a T5 implicit bias (REL_MODE 1) the chunk is two stages, so that each part has a loop of its own, with
    no per-tile branch in its body: FAR, keys all more than max_distance left of every row, whose bias is one
    value per row (``rel_far``); NEAR, the others, gathered per score.

    SAFE keeps non-finite values to the rows that see their keys. A window may hide loaded keys from some rows
    (left of the first tile's window; right of the earlier tokens' under causal or a right window): their p is
    0, but 0·NaN = NaN (and 0·inf), so the plain product spreads such a value to every row. SAFE takes them out
    of the product and marks NaN exactly where a visible key holds one, as the reference's P·V over the visible
    keys gives; it costs a reduction, a second product and shared memory, so the normal loops do without it and
    the kernel reruns a chunk in a SAFE loop only when a window is on and its accumulator ends non-finite.
    """
    tok, row_valid, diag = qrows
    k_head, v_head, stride_kb, stride_kn, stride_vb, stride_vn = kv
    b64, block_table_ptr, stride_bt, ind_ptr, stride_ib, stride_ibeam, beam_width, pool_rows = table
    sinks, wrap_n, ring_shift, ring = cyclic
    partner, sign, fi, rotated, cos_ptr, sin_ptr, stride_cos = rope
    k_scale, qk_scale, cap_log2, slope, window_left, window_right, rel_rows, stride_rm, rel_md, rel_far = scores
    lo, far_hi, hi = bounds
    ROTARY_DIM: tl.constexpr = CFG[0]
    PAGE_SIZE: tl.constexpr = CFG[1]
    INT8_ASM: tl.constexpr = CFG[2]
    IS_PAGED: tl.constexpr = CFG[3]
    CYCLIC: tl.constexpr = CFG[4]
    HAS_INDIRECTION: tl.constexpr = CFG[5]
    HAS_WINDOW_LEFT: tl.constexpr = CFG[6]
    HAS_WINDOW_RIGHT: tl.constexpr = CFG[7]
    HAS_SOFTCAP: tl.constexpr = CFG[8]
    HAS_ALIBI: tl.constexpr = CFG[9]
    ALIBI_WITH_SCALE: tl.constexpr = CFG[10]
    REL_MODE: tl.constexpr = CFG[11]
    QUANT: tl.constexpr = CFG[12]
    PRECISION: tl.constexpr = CFG[13]
    SAFE: tl.constexpr = STAGE == RERUN
    # the key tile: the config's, or the rerun's narrow one (see the kernel)
    BLOCK_N: tl.constexpr = CFG[15] if SAFE else CFG[14]
    # how a T5 implicit bias applies to this stage's tiles: one value per row ("far"), gathered ("near"), or not
    T5: tl.constexpr = "far" if STAGE == FAR else ("near" if REL_MODE == 1 and STAGE != ALL else "none")
    tl.static_assert(SAFE or (REL_MODE == 1) == (STAGE != ALL))
    if STAGE == FAR:
        hi = far_hi
    elif STAGE == NEAR:
        lo = far_hi
    # every tile starts on a multiple of BLOCK_N (the caller keeps lo on that grid), so with pages a multiple of
    # the tile a tile never crosses a page: one block-table entry and one row offset serve all of its keys, where
    # the general path spends a load and a 64-bit multiply-add per key (the one-byte caches felt it most:
    # 1300 against 1080 loop instructions for FP8 pages, bench/probes/decode_sass.py)
    TILE_PAGES: tl.constexpr = IS_PAGED and not (CYCLIC or HAS_INDIRECTION) and PAGE_SIZE % BLOCK_N == 0
    # The near loop (a few tiles per cache) prefetches one tile ahead instead of the config's depth: the
    # pipeliner copies its gathered bias tiles through shared memory too, and at full depth those buffers pushed
    # the 64/2/4 config from 102 to 114 KiB, past two programs per SM (bench/probes/decode_sass.py); at depth 2
    # its buffers stay within the far loop's, which they reuse.
    STAGES: tl.constexpr = 1 if SAFE else (2 if T5 == "near" else None)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_valid = offs_n < hi
        slot = _slots(offs_n, sinks, wrap_n, ring_shift, ring, CYCLIC)
        if HAS_INDIRECTION:
            # beam search: each token is read from the cache row of the beam the indirection names
            request = b64 // beam_width
            src = tl.load(ind_ptr + request * stride_ib + (b64 % beam_width) * stride_ibeam + offs_n,
                          mask=key_valid, other=0)  # fmt: skip
            # (one unsigned compare finds both a negative entry and one past the end; either reads beam 0)
            outside = src.to(tl.uint32) >= beam_width.to(tl.uint32)
            bad |= tl.where(outside, INDIRECTION, 0)
            src = tl.where(outside, 0, src)
            seq_row = request * beam_width + src.to(tl.int64)
        else:
            seq_row = b64
        if IS_PAGED:
            # slot -> (pool block, row); an entry outside the pool reads block 0 and is reported
            if HAS_INDIRECTION:
                # each key's row is gathered from the indirection first; loading the entries a tile ahead as well
                # measured slower (beam search over pages: 0.83x plain decode instead of 0.975x)
                block = tl.load(block_table_ptr + seq_row * stride_bt + slot // PAGE_SIZE, mask=key_valid, other=0)
            elif TILE_PAGES:
                block = next_block
                ahead = start_n + BLOCK_N
                next_block = tl.load(block_table_ptr + b64 * stride_bt + ahead // PAGE_SIZE, mask=ahead < hi, other=0)
            else:
                block = next_block
                ahead = offs_n + BLOCK_N
                ahead_slot = _slots(ahead, sinks, wrap_n, ring_shift, ring, CYCLIC)
                next_block = tl.load(block_table_ptr + b64 * stride_bt + ahead_slot // PAGE_SIZE, mask=ahead < hi,
                                     other=0)  # fmt: skip
            outside = block.to(tl.uint32) >= pool_rows.to(tl.uint32)
            bad |= tl.where(outside, BLOCK_TABLE, 0)
            block = tl.where(outside, 0, block)
            if TILE_PAGES:
                # consecutive rows of one page. (Row offsets written as loop-invariant ones, plus a per-tile base,
                # are hoisted out of the loop with the whole pointer tile: 255 registers.)
                rows = start_n % PAGE_SIZE + tl.arange(0, BLOCK_N)
                k_off = block.to(tl.int64) * stride_kb + rows * stride_kn
                v_off = block.to(tl.int64) * stride_vb + rows * stride_vn
            else:
                k_off = block.to(tl.int64) * stride_kb + (slot % PAGE_SIZE) * stride_kn
                v_off = block.to(tl.int64) * stride_vb + (slot % PAGE_SIZE) * stride_vn
        else:
            k_off = seq_row * stride_kb + slot.to(tl.int64) * stride_kn
            v_off = seq_row * stride_vb + slot.to(tl.int64) * stride_vn
        kv_mask = key_valid[:, None] & d_mask[None, :]
        if SAFE:
            # first, while few registers are live: V without its non-finite values, and NaN in acc where a
            # visible key holds one (key by key, for the tiles that hold one: no [BLOCK_M, D] temporary beside acc)
            v_safe = tl.load(v_head + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            if QUANT != 0:
                v_safe = _widen(v_safe, q.dtype, INT8_ASM)
            nonfinite = ((v_safe != v_safe) | (tl.abs(v_safe) == float("inf"))).to(tl.int8)
            if tl.max(tl.max(nonfinite, 1), 0) != 0:
                for n in range(0, BLOCK_N):
                    bad_d = tl.max(tl.where(tl.arange(0, BLOCK_N)[:, None] == n, nonfinite, 0), 0) != 0
                    key = tl.full([1], n, tl.int32) + start_n
                    sees = _visible(key, key < hi, tok, diag, window_left, window_right, HAS_WINDOW_LEFT,
                                    HAS_WINDOW_RIGHT)  # fmt: skip
                    acc = tl.where(sees & bad_d[None, :], float("nan"), acc)
                v_safe = tl.where(nonfinite != 0, 0.0, v_safe)
        # [BLOCK_N, HEAD_DIM_PAD]
        k = tl.load(k_head + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if ROTARY_DIM > 0:
            # rotation is linear, so a quantized key turns before its scale applies
            rot_mask = key_valid[:, None] & rotated[None, :]
            k_pair = tl.load(k_head + k_off[:, None] + partner[None, :], mask=rot_mask, other=0.0).to(tl.float32)
            cs_off = offs_n.to(tl.int64)[:, None] * stride_cos + fi[None, :]
            cos = tl.load(cos_ptr + cs_off, mask=rot_mask, other=1.0)
            sin = tl.load(sin_ptr + cs_off, mask=rot_mask, other=0.0)
            k = (k.to(tl.float32) * cos + sign[None, :] * k_pair * sin).to(q.dtype)
        if QUANT != 0:
            # int8 and e4m3 values are exact in fp16/bf16: the products see the stored values, and the scale
            # multiplies the scores instead of every element
            k = _widen(k, q.dtype, INT8_ASM)
        # [BLOCK_M, BLOCK_N], in log2 units
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if QUANT != 0:
            qk = qk * k_scale
        if HAS_ALIBI:
            rel = (offs_n[None, :] - (tok[:, None] + diag)).to(tl.float32)
            if ALIBI_WITH_SCALE:
                qk += slope[:, None] * rel
        if HAS_SOFTCAP:
            s = cap_log2 * _tanh(qk * qk_scale)
        else:
            s = qk * qk_scale
        if HAS_ALIBI:
            if not ALIBI_WITH_SCALE:
                s += (slope[:, None] * 1.4426950408889634) * rel
        if T5 == "near":
            # T5 implicit near the rows: each packed row reads its own head's per-distance table, a gather per
            # score. Distances past max_distance (on either side) share its ends, hence the clamp
            rp = offs_n[None, :] - (tok[:, None] + diag)
            rp = tl.minimum(tl.maximum(rp, -rel_md), rel_md)
            r_mask = row_valid[:, None] & key_valid[None, :]
            s += tl.load(rel_rows[:, None] + rp + rel_md, mask=r_mask, other=0.0)
        if REL_MODE == 2:
            q_pos = tl.maximum(tok + diag, 0)
            r_mask = row_valid[:, None] & key_valid[None, :]
            r_off = q_pos[:, None].to(tl.int64) * stride_rm + offs_n[None, :]
            s += tl.load(rel_rows[:, None] + r_off, mask=r_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        visible = _visible(offs_n, key_valid, tok, diag, window_left, window_right, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT)
        s = tl.where(visible, s, float("-inf"))
        if T5 == "far":
            # every score of a row has the same bias, so it is a row term of the max and the exponent, as in the
            # prefill kernel's plain tiles: the scores stay qk·scale and each needs no add of its own
            m_new = tl.maximum(m_i, tl.max(s, 1) + rel_far)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with nothing visible yet keep m = -inf; subtracting 0 instead avoids inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if T5 == "far":
            p = tl.math.exp2(s - (m_safe - rel_far)[:, None])
        else:
            p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # [BLOCK_N, HEAD_DIM_PAD]
        if SAFE:
            v = v_safe
        else:
            v = tl.load(v_head + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            if QUANT != 0:
                v = _widen(v, q.dtype, INT8_ASM)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc, bad


@triton.jit(
    do_not_specialize=[
        "num_heads_kv",
        "seqlen_q",
        "num_splits",
        "min_chunk",
        "window_left",
        "window_right",
        "tune_len",
        "rel_md",
        "sinks",
        "pool_rows",
        "len_cap",
    ]
)
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_strides, k_strides, v_strides, o_strides, lse_strides,
    seqlens_ptr, err_ptr, part_ptr, count_ptr, block_table_ptr, stride_bt, pool_rows,
    alibi_ptr, alibi_strides, rel_ptr, rel_strides, rel_md, k_scale_ptr, v_scale_ptr,
    ind_ptr, ind_strides, beam_width, cos_ptr, sin_ptr, stride_cos,
    num_heads_kv, seqlen_q, num_splits, min_chunk, cyclic_n, sinks, len_cap, tune_len,
    qk_scale, cap_log2, window_left, window_right,
    ROTARY_DIM: tl.constexpr, GPTJ: tl.constexpr, PAGE_SIZE: tl.constexpr, INT8_ASM: tl.constexpr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, IS_PAGED: tl.constexpr,
    CYCLIC: tl.constexpr, HAS_INDIRECTION: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, ALIBI_WITH_SCALE: tl.constexpr, REL_MODE: tl.constexpr, QUANT: tl.constexpr,
    MMA_F16: tl.constexpr, MERGE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MERGE_TILE: tl.constexpr,
):  # fmt: skip
    """Operands: q, o ``[B, Sq, Hq, D]`` and the caches (``[B, N, Hkv, D]``, or pools addressed through
    ``block_table_ptr`` with ``IS_PAGED``) with their strides in elements, ``(batch, row, head)``; lse ``[B, Hq,
    Sq]`` with strides ``(batch, token, head)``. A tensor a call does not use is None: lse without
    ``return_lse``; the split partials ``part_ptr`` and arrival counters ``count_ptr`` in a one-split launch;
    the block table; ALiBi slopes ``[B, Hq]`` (strides ``(batch, head)``); the T5 bias (strides ``(head,
    query)``); the scales of a one-byte cache; the beam indirection ``[B / beam_width, beam_width, N]``
    (strides ``(request, beam)``); RoPE's cos/sin tables (row stride ``stride_cos``). The flags the autotuner
    keys on (IS_PAGED, HAS_INDIRECTION, HAS_ALIBI, REL_MODE, ROTARY_DIM) stay parameters: a None makes no entry
    in its key. MMA_F16 stays one too: under the interpreter a bf16 query arrives widened to fp32, so its
    dtype cannot tell. err_ptr: the device's error word (attn.fast._errors).
    """
    STORE_LSE: tl.constexpr = lse_ptr is not None
    SPLIT_MERGE: tl.constexpr = part_ptr is not None
    # fp32 queries take full-precision products; the others ignore the setting
    PRECISION: tl.constexpr = "ieee" if q_ptr.dtype.element_ty == tl.float32 else "tf32"
    stride_qb, stride_qm, stride_qh = q_strides
    stride_kb, stride_kn, stride_kh = k_strides
    stride_vb, stride_vn, stride_vh = v_strides
    # read only with the features that use them (0 otherwise)
    stride_ib, stride_ibeam = 0, 0
    if HAS_INDIRECTION:
        stride_ib, stride_ibeam = ind_strides
    stride_rm = 0
    if REL_MODE != 0:
        stride_rm = rel_strides[1]
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // num_heads_kv
    h_kv = pid_bh % num_heads_kv
    b64 = b.to(tl.int64)
    seqlen_k = tl.load(seqlens_ptr + b)
    # nothing was read back on the host (attn.fast._errors): a length outside [0, len_cap] (the capacity, the
    # indirection's max_len) is clamped into it, and the pair's first program reports it
    tl.atomic_or(err_ptr, LENGTHS, mask=((seqlen_k < 0) | (seqlen_k > len_cap)) & (split == 0), sem="relaxed")
    seqlen_k = tl.minimum(tl.maximum(seqlen_k, 0), len_cap)

    # row r of the block is new token r // GROUP of query head h_kv * GROUP + r % GROUP
    offs_r = tl.arange(0, BLOCK_M)
    tok = offs_r // GROUP
    head = h_kv * GROUP + offs_r % GROUP
    row_valid = tok < seqlen_q
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    # [BLOCK_M, HEAD_DIM_PAD]
    q = tl.load(
        q_ptr + b64 * stride_qb + tok[:, None] * stride_qm + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None] & d_mask[None, :],
        other=0.0,
    )
    if MMA_F16:
        # a one-byte cache under 16-bit queries: the products run in fp16, whose conversions from the stored
        # codes are cheap (e4m3 -> fp16 one instruction per pair; int8 -> fp16 below), while bf16's made the
        # loop bound by conversions instead of bytes (bench/probes/decode_probe.py: FP8 1.1x -> 1.6x the bf16
        # cache's speed). A bf16 query is exact in fp16 within its range, which the launcher checks when validating
        # and the first program of each pair reports otherwise (an overflow would turn scores into inf). The test
        # is "not fp16" rather than "bf16": MMA_F16 means a 16-bit query, and under the CPU interpreter a bf16
        # query arrives as its fp32 copy (attn.fast._triton._interpret), which must be checked all the same
        if q.dtype != tl.float16:
            big = tl.max(tl.max(tl.abs(q.to(tl.float32)), 1), 0) > 65504.0
            tl.atomic_or(err_ptr, QUERY_RANGE, mask=big & (split == 0), sem="relaxed")
        q = q.to(tl.float16)

    # the operands of features compiled out are None (or 0), and _decode_tiles never reads them
    slope = 0.0
    if HAS_ALIBI:
        # [BLOCK_M]: each packed row belongs to its own query head, so each has its own slope
        slope = tl.load(alibi_ptr + b64 * alibi_strides[0] + head * alibi_strides[1], mask=row_valid, other=0.0)

    # the tokens still stored: all of them, or a cyclic cache's min(L, N), counted from 0 in token order (the
    # sinks, then the rolling part): key n of this frame is token n, or n + (L - N) past the sinks
    first = seqlen_k * 0
    ring, ring_shift, wrap_n = first, first, first
    if CYCLIC:
        skipped = tl.maximum(seqlen_k - cyclic_n, 0)
        seqlen_k = seqlen_k - skipped
        ring = cyclic_n - sinks
        ring_shift = skipped % ring
        wrap_n = sinks + ring - ring_shift
    # this program's chunk of them, tile-aligned so that splits never share a tile. A chunk is never shorter than
    # min_chunk keys, so in a ragged batch a short cache stays in one or a few programs (the rest exit at once)
    # while a long one is cut into num_splits: every program gets about the same work.
    chunk = tl.cdiv(tl.maximum(tl.cdiv(seqlen_k - first, num_splits), min_chunk), BLOCK_N) * BLOCK_N
    lo = first + split * chunk
    hi = tl.minimum(lo + chunk, seqlen_k)
    # bottom-right alignment: new token i sits on key diag + i
    diag = seqlen_k - seqlen_q
    if HAS_WINDOW_LEFT:
        # on the tile grid still (_decode_tiles' one-entry-per-tile pages rely on it); keys left of the window
        # in the first tile are masked
        lo = tl.maximum(lo, (diag - window_left) // BLOCK_N * BLOCK_N)
    if HAS_WINDOW_RIGHT:
        hi = tl.minimum(hi, seqlen_q - 1 + diag + window_right + 1)

    rel_rows = 0  # read only with a T5 bias
    if REL_MODE != 0:
        rel_rows = rel_ptr + head.to(tl.int64) * rel_strides[0]
    rel_far = 0.0
    if REL_MODE == 1:
        # each row's value for every distance beyond max_distance on the left, loaded once
        rel_far = tl.load(rel_rows, mask=row_valid, other=0.0)
    k_scale = 1.0
    if QUANT != 0:
        k_scale = tl.load(k_scale_ptr + h_kv)
        v_scale = tl.load(v_scale_ptr + h_kv)
    k_head = k_ptr + h_kv.to(tl.int64) * stride_kh
    v_head = v_ptr + h_kv.to(tl.int64) * stride_vh
    partner, sign, fi, rotated = offs_d, offs_d, offs_d, offs_d
    if ROTARY_DIM > 0:
        # RoPE at read time (keys cached unrotated): feature d of a key turns with its partner, by the angle of
        # pair fi at the key's position within the cache
        partner, sign, fi = rope_pairs(offs_d, ROTARY_DIM, GPTJ)
        rotated = offs_d < ROTARY_DIM
    # the first range's loop: all of [lo, hi), or with a T5 implicit bias its far part (below)
    far_hi = hi
    if REL_MODE == 1:
        # T5 implicit: keys more than max_distance left of every row (the nearest row is token 0, on key diag)
        # all read the table's left end, so the chunk splits in two loops: those keys, one value per row and no
        # gather, then the rest, gathered per score. Neither loop branches per tile, and the far one, nearly all
        # of a long cache, is plain decode's loop plus a row term (a per-tile branch between the two had cost
        # ~10 barriers and ~12 shared stores of layout conversions, and 0.78-0.88x plain decode's bandwidth).
        # The split falls on the chunk's tile grid (whole tiles from lo): the near part starts on a tile boundary.
        far_hi = tl.minimum(lo + tl.maximum(diag - rel_md + 1 - lo, 0) // BLOCK_N * BLOCK_N, hi)
    # (m_i, l_i, acc and next_block are defined, and _decode_tiles takes them, in the order of the loop this
    # replaced: the order of a loop's carried values reaches ptxas, and this keeps the kernels without a T5
    # implicit bias the same code as before the split, bench/probes/decode_sass.py)
    PRIME: tl.constexpr = IS_PAGED and not HAS_INDIRECTION
    next_block = 0
    if PRIME:
        next_block = _first_blocks(
            block_table_ptr, b64, stride_bt, lo, far_hi, sinks, wrap_n, ring_shift, ring, CYCLIC, PAGE_SIZE, BLOCK_N
        )  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    bad = tl.zeros([BLOCK_N], dtype=tl.int32)
    # the operand tuples of _decode_tiles (an absent pointer is 0 there: a runtime tuple cannot hold None)
    qrows = (tok, row_valid, diag)
    kv = (k_head, v_head, stride_kb, stride_kn, stride_vb, stride_vn)
    table = (b64, block_table_ptr if IS_PAGED else 0, stride_bt, ind_ptr if HAS_INDIRECTION else 0, stride_ib,
             stride_ibeam, beam_width, pool_rows)  # fmt: skip
    cyclic = (sinks, wrap_n, ring_shift, ring)
    rope = (partner, sign, fi, rotated, cos_ptr if ROTARY_DIM > 0 else 0, sin_ptr if ROTARY_DIM > 0 else 0, stride_cos)
    scores = (k_scale, qk_scale, cap_log2, slope, window_left, window_right, rel_rows, stride_rm, rel_md, rel_far)
    bounds = (lo, far_hi, hi)
    # a rerun's key tiles are narrow: 16 keys, 32 for an FP8 cache (why: the rerun's comment below)
    SAFE_N: tl.constexpr = min(32 if QUANT == 2 else 16, BLOCK_N)
    CFG: tl.constexpr = (ROTARY_DIM, PAGE_SIZE, INT8_ASM, IS_PAGED, CYCLIC, HAS_INDIRECTION, HAS_WINDOW_LEFT,
                         HAS_WINDOW_RIGHT, HAS_SOFTCAP, HAS_ALIBI, ALIBI_WITH_SCALE, REL_MODE, QUANT, PRECISION,
                         BLOCK_N, SAFE_N)  # fmt: skip
    FIRST: tl.constexpr = FAR if REL_MODE == 1 else ALL
    m_i, l_i, acc, bad = _decode_tiles(
        next_block, m_i, l_i, acc, bad, q, offs_d, d_mask, qrows, kv, table, cyclic, rope, scores, bounds, FIRST, CFG
    )  # fmt: skip
    if REL_MODE == 1:
        # the near part, [far_hi, hi)
        if PRIME:
            # the far loop's last look-ahead was masked by its end
            next_block = _first_blocks(
                block_table_ptr, b64, stride_bt, far_hi, hi, sinks, wrap_n, ring_shift, ring, CYCLIC, PAGE_SIZE,
                BLOCK_N,
            )  # fmt: skip
        m_i, l_i, acc, bad = _decode_tiles(
            next_block, m_i, l_i, acc, bad, q, offs_d, d_mask, qrows, kv, table, cyclic, rope, scores, bounds, NEAR, CFG
        )  # fmt: skip
    if IS_PAGED or HAS_INDIRECTION:
        # the entries this program clamped, one atomic (none at all when every entry was in range)
        bad_bits = tl.reduce(bad, 0, _bit_or)
        tl.atomic_or(err_ptr, bad_bits, mask=bad_bits != 0, sem="relaxed")
    if (HAS_WINDOW_LEFT or HAS_WINDOW_RIGHT) and QUANT != 1:
        # A non-finite value in a tile's V makes its column of the product non-finite in every row (0·NaN = NaN),
        # and that never leaves acc. Without a window every row sees every key of [lo, hi), so that is the
        # reference's result; a window may hide the key from some rows, so a chunk whose accumulator ends
        # non-finite (or whose row sums overflow: a false alarm costs time only) computes its keys again in a
        # SAFE loop (see _decode_tiles), in narrow tiles: 16 keys, 32 for an FP8 cache, the widths with which
        # the normal loop kept its instructions and stayed free of register spills on sm_90a (wider or narrower
        # ones added reloads to it: bench/probes/decode_sass.py). Only inputs holding non-finite values take the
        # branch; the normal loop carries no check at all. An int8 cache holds no non-finite value: no rerun.
        row_sums = tl.sum(acc, 1)
        if tl.max(((row_sums != row_sums) | (tl.abs(row_sums) == float("inf"))).to(tl.int32), 0) != 0:
            safe_block = 0
            if PRIME:
                safe_block = _first_blocks(
                    block_table_ptr, b64, stride_bt, lo, hi, sinks, wrap_n, ring_shift, ring, CYCLIC, PAGE_SIZE,
                    SAFE_N,
                )  # fmt: skip
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
            # (the entries were reported above, and the rerun reads the same ones)
            m_i, l_i, acc, _ = _decode_tiles(
                safe_block, m_i, l_i, acc, tl.zeros([SAFE_N], dtype=tl.int32), q, offs_d, d_mask, qrows, kv, table,
                cyclic, rope, scores, bounds, RERUN, CFG,
            )  # fmt: skip

    # l = 0 exactly for a row (or a split) that saw no visible key; a NaN score makes l NaN (the max drops NaN,
    # exp2(NaN − m) does not): l != 0 keeps that NaN in the output and the lse instead of zeroing the row. A row
    # whose visible scores are all -inf has l = 0 too, and acc = 0 unless it sees a non-finite value (then NaN):
    # acc·0 keeps that NaN, as the reference gives it
    has_key = l_i != 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = tl.where(has_key[:, None], acc / l_safe[:, None], acc * 0.0)
    if QUANT != 0:
        # the output is linear in V: its scale applies once, here
        out = out * v_scale
    o_mask = row_valid[:, None] & d_mask[None, :]
    if not SPLIT_MERGE:
        stride_ob, stride_om, stride_oh = o_strides
        o_rows = o_ptr + b64 * stride_ob + tok * stride_om + head * stride_oh
        tl.store(o_rows[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=o_mask)
        if STORE_LSE:
            # m_i is in log2 units; ln(sum exp(s)) = (m + log2(l)) * ln(2)
            lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
            stride_lb, stride_lm, stride_lh = lse_strides
            tl.store(lse_ptr + b64 * stride_lb + tok * stride_lm + head * stride_lh, lse, mask=row_valid)
    else:
        lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        # this chunk's normalised partial and its log-sum-exp, in float32 at part_ptr: for each (sequence, KV
        # head) pair a [rows, splits, D] block of outputs, and after all of them the [rows, splits] log-sum-exps
        rows = seqlen_q * GROUP
        pair_row = pid_bh.to(tl.int64) * rows
        part_row = (pair_row + offs_r) * num_splits + split
        tl.store(part_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=o_mask)
        lse_part = part_ptr + tl.num_programs(0).to(tl.int64) * rows * num_splits * HEAD_DIM
        tl.store(lse_part + part_row, lse, mask=row_valid)
        # The last of the pair's programs to get here merges all of its partials (one launch instead of a
        # second, merging kernel: at small batch each launch costs more host time than the GPU spends on it).
        # Every program of the pair arrives, empty chunks included, so the count to wait for is num_splits.
        # Ordering: the barrier makes every thread's partial stores happen before the atomic, whose release
        # (cumulative in PTX's memory model) publishes them at GPU scope; the merging program's acquire, and
        # the barrier Triton puts after a scalar atomic to hand its result to every thread, order its reads
        # after all of them. Its reads bypass L1 (.cg), which is not coherent across SMs.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            tl.debug_barrier()
            _merge_splits(
                part_ptr + pair_row * num_splits * HEAD_DIM, lse_part + pair_row * num_splits, o_ptr, lse_ptr,
                b64, h_kv, rows, num_splits, o_strides, lse_strides, GROUP, HEAD_DIM, HEAD_DIM_PAD, MERGE_ROWS,
                MERGE_TILE,
            )  # fmt: skip
            # back to zero for the next launch on this stream (kernels on one stream, or a graph's replays,
            # run one after another; nothing else of this launch touches the pair's counter any more)
            tl.store(count_ptr + pid_bh, 0)


@triton.jit
def _merge_splits(
    o_part, lse_part, o_ptr, lse_ptr, b64, h_kv, rows, num_splits, o_strides, lse_strides,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    MERGE_ROWS: tl.constexpr, MERGE_TILE: tl.constexpr,
):  # fmt: skip
    """One pair's outputs from its split partials: ``lse = logsumexp_s(lse_s)``, ``o = Σ_s exp(lse_s − lse)·o_s``.

    This runs after the last partial is written, so its latency adds to the kernel's. It works on ``[rows,
    splits, D]`` tiles of ``MERGE_TILE`` values (32 a thread), two loaded per iteration, and every lane of the
    splits axis keeps its own running maximum and sums, so nothing inside the loop waits on a reduction across
    threads: the loads of an iteration depend only on its index. The lanes are combined once at the end.
    """
    STORE_LSE: tl.constexpr = lse_ptr is not None
    stride_ob, stride_om, stride_oh = o_strides
    ROW_T: tl.constexpr = min(MERGE_ROWS, max(MERGE_TILE // HEAD_DIM_PAD, 1))
    S_T: tl.constexpr = max(MERGE_TILE // (ROW_T * HEAD_DIM_PAD), 1)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    offs_t = tl.arange(0, S_T)
    for r0 in range(0, rows, ROW_T):
        r = r0 + tl.arange(0, ROW_T)
        r_mask = r < rows
        lse_rows = lse_part + r * num_splits
        o_rows = o_part + r * num_splits * HEAD_DIM
        m_lane = tl.full([ROW_T, S_T], float("-inf"), dtype=tl.float32)
        w_sum = tl.zeros([ROW_T, S_T], dtype=tl.float32)
        acc = tl.zeros([ROW_T, S_T, HEAD_DIM_PAD], dtype=tl.float32)
        for s0 in range(0, num_splits, 2 * S_T):
            sa = s0 + offs_t
            sb = sa + S_T
            # every partial read here was written by its program (empty chunks write zeros and -inf); masked
            # lanes read -inf and 0, so they weigh nothing
            mask_a = r_mask[:, None] & (sa < num_splits)[None, :]
            mask_b = r_mask[:, None] & (sb < num_splits)[None, :]
            lse_a = tl.load(lse_rows[:, None] + sa[None, :], mask=mask_a, other=float("-inf"), cache_modifier=".cg")
            lse_b = tl.load(lse_rows[:, None] + sb[None, :], mask=mask_b, other=float("-inf"), cache_modifier=".cg")
            o_a = tl.load(
                o_rows[:, None, None] + (sa * HEAD_DIM)[None, :, None] + offs_d[None, None, :],
                mask=mask_a[:, :, None] & d_mask[None, None, :],
                other=0.0,
                cache_modifier=".cg",
            )
            o_b = tl.load(
                o_rows[:, None, None] + (sb * HEAD_DIM)[None, :, None] + offs_d[None, None, :],
                mask=mask_b[:, :, None] & d_mask[None, None, :],
                other=0.0,
                cache_modifier=".cg",
            )
            m_new = tl.maximum(m_lane, tl.maximum(lse_a, lse_b))
            # a lane that has seen only empty splits keeps m = -inf; subtracting 0 instead avoids inf - inf
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_lane - m_safe)
            w_a = tl.exp(lse_a - m_safe)
            w_b = tl.exp(lse_b - m_safe)
            acc = acc * alpha[:, :, None] + w_a[:, :, None] * o_a + w_b[:, :, None] * o_b
            w_sum = w_sum * alpha + w_a + w_b
            m_lane = m_new
        m = tl.max(m_lane, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        scale = tl.exp(m_lane - m_safe[:, None])
        # mul_rn: every lane of a reduction must hold the same sum (see its docstring)
        total = tl.sum(mul_rn(w_sum, scale), 1)
        # a NaN partial (lse_s NaN) makes its weight and so the total NaN: != 0 keeps it, only empty rows are 0
        has_key = total != 0.0
        t_safe = tl.where(has_key, total, 1.0)
        out = tl.sum(mul_rn(acc, scale[:, :, None]), 1) / t_safe[:, None]
        tok = r // GROUP
        head = h_kv * GROUP + r % GROUP
        out_rows = o_ptr + b64 * stride_ob + tok * stride_om + head * stride_oh
        tl.store(out_rows[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=r_mask[:, None] & d_mask[None, :])  # fmt: skip
        if STORE_LSE:
            lse_out = tl.where(has_key, m_safe + tl.log(t_safe), float("-inf"))
            stride_lb, stride_lm, stride_lh = lse_strides
            tl.store(lse_ptr + b64 * stride_lb + tok * stride_lm + head * stride_lh, lse_out, mask=r_mask)


_decode_tuned = triton.autotune(
    configs=CONFIGS,
    # split and unsplit launches of one head shape want different tiles: the split count and the length are keys.
    # So are the features that change the loop's addressing (a ring, a beam indirection, a T5 bias): without them
    # a beam-search call reused whatever tile plain decode had tuned (B8 L32768 contiguous: 0.84x plain decode
    # with plain's 64-key tile in one run, 1.00x with its 128-key tile in another)
    key=[
        "HEAD_DIM_PAD",
        "GROUP",
        "IS_PAGED",
        "CYCLIC",
        "HAS_INDIRECTION",
        "REL_MODE",
        "BLOCK_M",
        "HAS_WINDOW_LEFT",
        "HAS_SOFTCAP",
        "HAS_ALIBI",
        "ROTARY_DIM",
        "num_splits",
        "tune_len",
    ],  # fmt: skip
    prune_configs_by={"early_config_prune": _keep},
)(_decode_kernel)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


MIN_SPLIT_KEYS = 2048
# the shortest part when a batch too small to fill the GPU is cut (see choose_num_splits)
SPLIT_KEYS = 4096


def choose_num_splits(
    batch: int, num_heads_kv: int, max_seqlen_k: int, num_sms: int, total_seqlen_k: int | None = None
) -> int:
    """Multi-block heuristic: up to about eight waves of programs, but no split shorter than 4096 keys.

    ``B·Hkv`` programs already fill the GPU when they are more than the SMs; below that, each cache is cut
    into parts until about ``8·num_sms`` programs exist, as long as each part keeps 4096 keys or more to
    amortize its partial writes, its arrival at the pair's counter and the merge. The merge runs in the last
    program of each pair, at the end of the kernel, so fewer, longer parts pay; measured on the H200 with the
    autotuned kernel (event-timed, TB/s): B1 Hkv8 L131072 3.64 at 64 splits, 3.86 at 32, 3.96 at 16; B4 L65536
    4.06 at 32, 4.15 at 16; B8 L32768 4.10 at 16, 4.17 at 8. 4096 keys choose 32, 16 and 8 of those. (With a
    separate merging kernel, bench/probes/split_probe.py had found B1 near 3.8 TB/s for 16 to 64 splits and B8 3.79
    at 5 splits, 4.07 at 16.)

    With ``total_seqlen_k`` (the sum of the lengths), a ragged batch (longest cache over 1.5 times the mean) is cut
    even when ``B·Hkv`` fills the GPU, because then the programs of the longest caches set the time while most SMs
    idle (B32 Hkv8, lengths 128..8192, unsplit: 3.31 TB/s). The longest caches are cut into parts of at most
    ``total·Hkv / (2·num_sms)`` keys (and at least 2048), about what each of two programs per SM would get if the
    work were spread evenly; `decode`'s minimum part length of 2048 keys keeps the short caches whole.
    """
    programs = max(batch * num_heads_kv, 1)
    if programs >= num_sms:
        if total_seqlen_k is None or batch == 0 or max_seqlen_k <= 1.5 * total_seqlen_k / batch:
            return 1
        target = max(MIN_SPLIT_KEYS, total_seqlen_k * num_heads_kv // (2 * num_sms))
        return min(cdiv(max_seqlen_k, target), 256)
    splits = cdiv(8 * num_sms, programs)
    return max(1, min(splits, cdiv(max(max_seqlen_k, 1), SPLIT_KEYS), 256))


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
    validate: bool | None = None,
):
    """Decode-step attention over a contiguous or paged KV cache; same contract as
    `attn.reference.decode`.

    Args:
        q: ``[B, Sq, Hq, D]``, the new tokens' queries (``Sq`` is 1 for plain decoding).
        k_cache: contiguous ``[B, max_len, Hkv, D]`` or paged pool ``[num_blocks, block_size, Hkv, D]``;
            q's dtype, or int8 / float8_e4m3fn with ``k_scale`` and ``v_scale``; unit stride along D.
        v_cache: same shape and dtype as ``k_cache``.
        cache_seqlens: int32 ``[B]``, tokens in each sequence's cache, the new ones included.
        block_table: int32 ``[B, max_blocks]`` mapping logical blocks to pool blocks; None for contiguous.
        causal: bottom-right causal among the new tokens; irrelevant when ``Sq = 1``.
        softmax_scale: multiplier of the scores; defaults to ``1/sqrt(D)``.
        q_scaling: TensorRT-LLM's divisor of the scale.
        window_size: ``(left, right)`` sliding window around the diagonal; -1 is unbounded.
        softcap: if > 0, scores become ``softcap·tanh(s/softcap)`` after scaling.
        alibi_slopes: ALiBi slopes, float ``[Hq]`` or ``[B, Hq]``, computed into the scores in the kernel.
        alibi_mode: ``"alibi"`` or ``"alibi_with_scale"``, as in `attn.reference.attention`.
        rel_bias: a T5 ``RelativeBias``, as in `attn.fast.attention`.
        k_scale: for an int8 / float8_e4m3fn cache, the K dequantization scale, float ``[1]`` or ``[Hkv]``;
            folded into the scores.
        v_scale: likewise for V; folded into the output.
        max_attention_window: the cache is cyclic with this many slots, as in `attn.reference.decode`.
        sink_token_length: StreamingLLM's sinks, as in `attn.reference.decode`.
        rotary_dim: RoPE at read time (keys cached unrotated), as in `attn.reference.decode`: each key tile is
            turned by its positions within the cache, from a float32 cos/sin table; 0 compiles it out.
        rope_base: RoPE's frequency base θ, with ``rotary_dim``.
        rope_style: ``"neox"`` or ``"gptj"``, with ``rotary_dim``.
        rope_scaling: a `RopeScaling` variant, with ``rotary_dim``.
        cache_indirection: beam search, int32 ``[B, beam_width, max_len]``, as in `attn.reference.decode`; the
            kernel gathers each token's row through it.
        return_lse: also return the log-sum-exp ``[B, Hq, Sq]``.
        num_splits: multi-block mode: 1 turns it off, n > 1 forces n parts per cache, None chooses from
            ``B·Hkv``, the lengths and the SM count (`choose_num_splits`), with parts of at least 2048 keys.
        max_seqlen_k: the longest ``cache_seqlens`` entry, a hint for the split heuristic (a serving loop's
            scheduler knows it on the host); without it the cache capacity is assumed. Not checked on the
            device: a wrong hint changes the split count, never the result.
        total_seqlen_k: the sum of ``cache_seqlens``, likewise: it lets the heuristic balance a ragged batch.
        validate: True checks the values of lengths, block-table and indirection entries (and a bf16 query's
            range over a one-byte cache) on the host before launching, which waits for the device and cannot
            run inside CUDA-graph capture; a bad call then raises and nothing runs. False reads nothing back:
            the kernel clamps out-of-range indices into its tensors and records them for
            `attn.check_errors`. None (the default) is False unless the environment sets ``ATTN_DEBUG=1``.

    Returns:
        ``out [B, Sq, Hq, D]`` in q's dtype, and with ``return_lse`` also float32 ``lse [B, Hq, Sq]``.
    """
    check_flag("return_lse", return_lse)
    validate = _errors.resolve_validate(validate)
    cache_seqlens, block_table = unit_stride(cache_seqlens, block_table)
    args = check_decode(
        q, k_cache, v_cache, cache_seqlens, block_table=block_table, causal=causal, softmax_scale=softmax_scale,
        q_scaling=q_scaling, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        alibi_mode=alibi_mode, rel_bias=rel_bias, k_scale=k_scale, v_scale=v_scale,
        max_attention_window=max_attention_window, cache_indirection=cache_indirection, num_splits=num_splits,
        validate=validate, dtypes=(torch.float16, torch.bfloat16, torch.float32),
        sink_token_length=sink_token_length, rotary_dim=rotary_dim, rope_style=rope_style,
    )  # fmt: skip
    if max_seqlen_k is not None or total_seqlen_k is not None:
        check_seqlen_hints(max_seqlen_k, total_seqlen_k)
    if args.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q's head dim must be at most {MAX_HEAD_DIM} for the decode kernel, got {args.head_dim}")
    interpret = is_interpreter()
    if not q.is_cuda and not interpret:
        raise ValueError(f"q must be a CUDA tensor (or run with TRITON_INTERPRET=1), got device {q.device}")
    # a cache is updated in place by the append step, so it is never silently copied here
    if k_cache.stride(-1) != 1:
        raise ValueError(f"k_cache must have unit stride along the head dim, got strides {k_cache.stride()}")
    if v_cache.stride(-1) != 1:
        raise ValueError(f"v_cache must have unit stride along the head dim, got strides {v_cache.stride()}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if cache_indirection is not None and cache_indirection.stride(-1) != 1:
        cache_indirection = cache_indirection.contiguous()

    bsz, sq, hq, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    # the log-sum-exp is written only when asked for: serving loops never read it
    lse = torch.empty((bsz, hq, sq), dtype=torch.float32, device=q.device) if return_lse else None
    if bsz == 0 or hq == 0 or d == 0:
        return (out, lse) if return_lse else out

    hkv = args.num_heads_kv
    quant = quant_code(k_cache.dtype)
    mma_f16 = quant != 0 and q.dtype != torch.float32
    if mma_f16 and q.dtype == torch.bfloat16 and validate:
        # the kernel's products run in fp16 (see _decode_kernel); beyond its range a query would become inf
        q_max = float(q.abs().amax())
        if not q_max <= F16_MAX:
            raise ValueError(
                f"q must lie within fp16's range (|q| <= {F16_MAX}) over an INT8/FP8 cache, whose products run "
                f"in fp16; got max |q| = {q_max}"
            )
    # what the Gluon one-byte kernel does not cover (windows and soft-cap it does)
    features = (args.alibi_slopes is not None or args.rel_bias is not None or max_attention_window is not None
                or cache_indirection is not None or rotary_dim > 0)  # fmt: skip
    if mma_f16 and q.is_cuda and _gluon_decode(q, k_cache, v_cache, cache_seqlens, out, lse, args, block_table,
                                               num_splits, max_seqlen_k, features):  # fmt: skip
        return (out, lse) if return_lse else out
    # a forced split count is taken literally (tests rely on it to cut even tiny caches); a chosen one comes with
    # the heuristic's minimum part length
    min_chunk = 0 if num_splits is not None else MIN_SPLIT_KEYS
    if num_splits is None:
        sms = 132 if interpret else _num_sms(q.device.index or 0)
        if validate:
            # the checks read the lengths on the host anyway
            max_len, total = args.max_seqlen_k, int(cache_seqlens.sum())
        else:
            # without hints, every cache counts as full and the batch as uniform
            max_len = max_seqlen_k if max_seqlen_k is not None else args.capacity
            total = total_seqlen_k
        if max_attention_window is not None:
            max_len = min(max_len, max_attention_window)
            total = None
        num_splits = choose_num_splits(bsz, hkv, max_len, sms, total_seqlen_k=total)
    group = args.group_size
    if args.softcap > 0:
        qk_scale, cap_log2 = args.scale / args.softcap, args.softcap * LOG2E
    else:
        qk_scale, cap_log2 = args.scale * LOG2E, 0.0

    stream = None
    if num_splits > 1:
        # one float32 buffer for the partial outputs [B·Hkv, Sq·G, splits, D] and, after them, their
        # log-sum-exps [B·Hkv, Sq·G, splits]; the kernel merges them (see _decode_kernel)
        part = torch.empty(bsz * sq * hq * num_splits * (d + 1), dtype=torch.float32, device=q.device)
        if interpret:
            counters = _split_counters(q.device, q.device, bsz * hkv)
        else:
            # the device Triton launches on, and its stream (launch is handed both, so it looks neither up again)
            device = torch.cuda.current_device()
            stream = (device, current_stream(device))
            counters = _split_counters(stream, q.device, bsz * hkv)
    else:
        part = counters = None

    rel_mode, rel_t, rel_strides, rel_md = relative_bias_operands(args.rel_bias)
    if rotary_dim:
        # the frame of positions never exceeds the window (or the capacity): the reference's table length
        cos, sin = _cos_sin(max_attention_window or args.capacity, rotary_dim, rope_base, q.device, rope_scaling)
    else:
        cos = sin = None
    kw = {
        "GROUP": group, "HEAD_DIM": d, "HEAD_DIM_PAD": max(16, next_power_of_2(d)), "IS_PAGED": args.paged,
        "CYCLIC": max_attention_window is not None, "HAS_INDIRECTION": cache_indirection is not None,
        "HAS_WINDOW_LEFT": args.window_left >= 0, "HAS_WINDOW_RIGHT": args.window_right >= 0,
        "HAS_SOFTCAP": args.softcap > 0, "HAS_ALIBI": args.alibi_slopes is not None,
        "ALIBI_WITH_SCALE": args.alibi_with_scale, "REL_MODE": rel_mode, "QUANT": quant, "MMA_F16": mma_f16,
        "MERGE_ROWS": next_power_of_2(sq * group) if num_splits > 1 else 1,
        "BLOCK_M": max(16, next_power_of_2(sq * group)),
    }  # fmt: skip
    if autotune_enabled():
        kernel = _decode_tuned
    else:
        kernel = _decode_kernel
        if interpret:
            kw.update(BLOCK_N=16, num_warps=4, num_stages=1)
        elif q.dtype == torch.float32:
            kw.update(BLOCK_N=32, num_warps=4, num_stages=2)
        else:
            # the first of ROTARY_CONFIGS (or 64 keys in 3 stages) whose shared memory fits: D 256 with RoPE at
            # read time takes 32-key tiles
            first = ROTARY_CONFIGS if rotary_dim else [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3)]
            limit = _smem_limit(q.device.index if q.is_cuda else None)
            c = fitting_configs(first, kw["HEAD_DIM_PAD"], k_cache.element_size(), bool(rotary_dim), limit,
                                kw["BLOCK_M"])[0]  # fmt: skip
            kw.update(BLOCK_N=c.kwargs["BLOCK_N"], num_warps=c.num_warps, num_stages=c.num_stages)
        # as in CONFIGS; under the interpreter a small tile, so that the tests' few splits and rows take several
        kw["MERGE_TILE"] = 256 if interpret else 1024 * kw["num_warps"]
    # the longest length the kernel accepts (it clamps longer ones): a cyclic cache counts past its size
    len_cap = 2**31 - 1 if max_attention_window is not None else args.capacity
    if cache_indirection is not None:
        len_cap = min(len_cap, cache_indirection.shape[2])
    if rel_mode == 2:
        # a regular T5 bias [Hq, L, L] is read at every key position
        len_cap = min(len_cap, *args.rel_bias.bias.shape[1:])
    slopes, ind = args.alibi_slopes, cache_indirection
    lse_strides = (lse.stride(0), lse.stride(2), lse.stride(1)) if lse is not None else None
    launch(
        kernel, (bsz * hkv, num_splits),
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, o_ptr=out, lse_ptr=lse,
        q_strides=q.stride()[:3], k_strides=k_cache.stride()[:3], v_strides=v_cache.stride()[:3],
        o_strides=out.stride()[:3], lse_strides=lse_strides,
        seqlens_ptr=cache_seqlens, err_ptr=_errors.error_word(q.device), part_ptr=part, count_ptr=counters,
        block_table_ptr=block_table, stride_bt=block_table.stride(0) if block_table is not None else 0,
        pool_rows=k_cache.shape[0],
        alibi_ptr=slopes, alibi_strides=slopes.stride() if slopes is not None else None,
        rel_ptr=rel_t, rel_strides=rel_strides, rel_md=rel_md,
        k_scale_ptr=args.k_scale if quant else None, v_scale_ptr=args.v_scale if quant else None,
        ind_ptr=ind, ind_strides=ind.stride()[:2] if ind is not None else None,
        beam_width=ind.shape[1] if ind is not None else 1,
        cos_ptr=cos, sin_ptr=sin, stride_cos=cos.stride(0) if rotary_dim else 0,
        num_heads_kv=hkv, seqlen_q=sq, num_splits=num_splits, min_chunk=min_chunk,
        cyclic_n=max_attention_window or 1, sinks=args.sink_token_length, len_cap=len_cap,
        tune_len=next_power_of_2(max(args.max_seqlen_k if validate else (max_seqlen_k or args.capacity), 1)),
        qk_scale=qk_scale, cap_log2=cap_log2, window_left=args.window_left, window_right=args.window_right,
        ROTARY_DIM=rotary_dim, GPTJ=rope_style == "gptj",
        # a compile-time page size turns the per-key division and remainder into shifts (pages are powers of
        # two in practice; others compile to multiply-high sequences)
        PAGE_SIZE=args.page_size if args.paged else 1, INT8_ASM=not interpret,
        _stream=stream, **kw,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def _gluon_decode(q, k_cache, v_cache, cache_seqlens, out, lse, args, block_table, num_splits, max_seqlen_k,
                  features) -> bool:  # fmt: skip
    """Runs the call on the Gluon one-byte kernel (`attn.fast.gluon_decode`) and returns True where it covers the
    call and is chosen (``ATTN_GLUON_DECODE=1``, or its `default`); False leaves the call to this file's kernel."""
    choice = gd.mode()
    if choice == "0" or not (choice == "1" or gd.default()):
        return False
    if not gd.supported(q, k_cache, paged=args.paged, page_size=args.page_size, group=args.group_size,
                        head_dim=args.head_dim, capacity=args.capacity, features=features):  # fmt: skip
        return False
    bsz, hkv = q.shape[0], args.num_heads_kv
    min_chunk = 0
    if num_splits is None:
        max_len = max_seqlen_k if max_seqlen_k is not None else args.capacity
        num_splits = gd.choose_num_splits(bsz, hkv, max_len, _num_sms(q.device.index or 0))
        min_chunk = gd.MIN_SPLIT_KEYS
    part = counters = None
    if num_splits > 1:
        part = torch.empty(bsz * q.shape[2] * num_splits * (args.head_dim + 1), dtype=torch.float32, device=q.device)
        device = torch.cuda.current_device()
        counters = _split_counters((device, current_stream(device)), q.device, bsz * hkv)
    gd.decode_1b(
        q, k_cache.view(torch.int8), v_cache.view(torch.int8), cache_seqlens, out,
        lse.view(bsz, q.shape[2], 1) if lse is not None else None, part, counters,
        block_table=block_table, k_scale=args.k_scale, v_scale=args.v_scale,
        qk_scale=args.scale / args.softcap if args.softcap > 0 else args.scale * LOG2E,
        cap_log2=args.softcap * LOG2E if args.softcap > 0 else 0.0,
        num_splits=num_splits, min_chunk=min_chunk, len_cap=args.capacity, page_size=args.page_size,
        group=args.group_size, quant=quant_code(k_cache.dtype), err=_errors.error_word(q.device),
        window_left=args.window_left,
    )  # fmt: skip
    return True


# Split-merge arrival counters: one int32 per (sequence, KV head) pair, zeroed when made and left at zero by every
# launch (the merging program resets its pair's). They are kept per (device, stream): launches on one stream run
# one after another and can share them, launches on two streams may overlap and must not. CUDA graphs captured
# on one stream share that stream's counters, so such graphs must not be replayed concurrently with each other
# or with eager decode calls on that stream (replaying one graph at a time, as serving loops do, is fine).
_COUNTERS: dict = {}
# counters replaced by larger ones stay allocated: a CUDA graph may hold their address
_RETIRED: list = []


def _split_counters(stream, device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` zeroed counters on ``device`` for launches on ``stream``: ``(device index, stream handle)``
    on a GPU, the device itself under the interpreter (whose programs run one at a time)."""
    buf = _COUNTERS.get(stream)
    if buf is not None and buf.shape[0] >= n:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # a buffer made now is zeroed only when the graph replays (the memset is captured), so it serves this
        # call alone: each replay zeroes it before the kernel runs. Capturing after an eager call on the same
        # stream (a warm-up) uses the cached counters instead, without the memset.
        return torch.zeros(n, dtype=torch.int32, device=device)
    if buf is not None:
        _RETIRED.append(buf)
    size = max(n, 1024, 2 * (buf.shape[0] if buf is not None else 0))
    # kept for good, so made outside any CUDA graph's memory pool: torch.compile's graphs warm up on a stream of
    # their own, whose first decode call makes its counters while the thread's allocations go to their pool
    buf = _memo.outside_pools(device, lambda: torch.zeros(size, dtype=torch.int32, device=device))
    _COUNTERS[stream] = buf
    return buf
