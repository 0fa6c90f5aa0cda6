"""Hopper (sm_90) prefill attention in Gluon, with FlashAttention-3's structure. Opt-in, GPU only.

Gluon (``triton.experimental.gluon``) is Triton's lower-level dialect: the program names its layouts, its shared
memory, its barriers and its warps. That is what the ``tl.*`` kernel in `attn.fast.attention` cannot say, and
what FlashAttention-3 (Shah et al., 2024) is built from:

- **A producer warp.** One warp does nothing but issue TMA copies of K and V tiles into a ring of shared-memory
  stages (as many as fit, at most 6: 3 of K and 3 of V at D128). It waits until a stage is free
  (``kv_empty``: a K stage frees once its Q·Kᵀ is done, a V stage after P·V) and the copy engine signals when
  the bytes have landed (``k_ready``, ``v_ready``). It holds 24 registers; the consumers get the rest
  (``setmaxnreg``).
- **Two consumer warpgroups.** Two 4-warp partitions own rows 0-63 and 64-127 of the 128-row query block and
  issue their own ``wgmma``. They share the K/V stages but synchronize only through the ring's barriers, so
  while one computes its softmax the other's products can occupy the tensor cores (FA3 forces the alternation
  with named barriers; here the warp scheduler decides, unless ``overlap="pingpong"``, where the consumers take
  turns to issue their products through two mbarriers). ``consumers=1`` is the alternative of one 8-warp
  partition, whose two warpgroups move in lockstep (the compiler's barriers span all 8 warps).
- **Softmax overlapped with the next QKᵀ** (``OVERLAP``): the product of tile j+1 is issued asynchronously
  before the softmax of tile j runs, so the tensor core and the exponent unit work at the same time within a
  warpgroup (FA3's intra-warpgroup pipelining). It costs a second score tile of registers, which at D128
  with 128-key tiles ptxas does not grant: it sinks the product below the softmax (see ``block_n`` below).
- **A persistent grid, longest work first, in L2 sections.** One program per SM walks work items (a 128-row
  block of one (b, h)). The (b, h) pairs are cut into sections whose K/V fit in L2 (`l2_section`); within a
  section the items go in decreasing order of their key count (causal: the bottom row blocks first), so the
  short ones fill the tail, and the programs in flight share a few heads' K/V (see `_tile_coords`). The
  producer runs ahead into the next item's K/V while the consumers finish the current one; the next Q arrives
  during the epilogue, and the output goes from registers straight to global memory.

Covered: padded ``[B, S, H, D]`` with or without per-sequence lengths ``seqlens_q/k``, packed varlen
(``cu_seqlens_q/k``), causal (bottom-right) and full, sliding windows, soft-capping, GQA/MQA, D in {64, 128},
fp16/bf16, ALiBi (``[Hq]``/``[B, Hq]`` slopes, both modes), ``return_lse``. Everything else (T5, other head
dims, fp32) goes to the ``tl.*`` kernel: see `gluon_supported`.

Hidden values stay out (SPEC): in a masked tile (the causal diagonal, a window's edges, the end of the keys) a
hidden key's p is 0, but wgmma's P·V multiplies it by the key's V row anyway, and ``0 · NaN = NaN``. Each masked
tile therefore checks its V stage for non-finite values (one pass over the stage in shared memory, one
reduction); only when there are any, the consumers rewrite the stage with them zeroed and put NaN where a
visible key had one (`_hidden_values_out`). The unmasked tiles are unchanged (their keys are visible to every
row, where NaN is the answer).

Per-sequence lengths (padded layout): TMA fills rows outside the tensor's bounds with zeros, but a padding row
inside the tensor is whatever the caller left there. Each work item reads its sequence's lengths, and the key
ranges, the mask and the diagonal use them, so tiles wholly past ``seqlens_k[b]`` are never loaded and the one
that straddles it is a masked tile: its padding keys get p = 0 from the mask, and a non-finite value in their V
rows is kept out by the mechanism above. Query rows past ``seqlens_q[b]`` compute on padding and are written as
zeros (lse −inf). Chosen over per-sequence TMA descriptors (one per sequence, built on the host: a device sync
or a descriptor array per call) and ``tma.async_gather`` (row gathers, no bulk tiles): the masked-tile check is
paid only on the tile at each sequence's end. Packed varlen is the same mechanism: the descriptors see
``[1, T, H·D]``, a sequence's tiles start at its ``cu_seqlens`` offset, the rows of the next sequence that a
sequence's last tiles load are masked keys (or query rows not stored), and TMA zero-fills past T. Offsets and
lengths are clamped into the tensors; unlike the ``tl.*`` kernel, this one records no violation for
`attn.check_errors` (the validated call, ``validate=True``, checks them on the host before either kernel runs).

Dispatch from `attn.attention` on sm_90: by default only where it was measured faster than the ``tl.*`` kernel
(`gluon_default`); ``ATTN_GLUON=1`` forces it wherever `gluon_supported`, ``ATTN_GLUON=0`` turns it off.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634

# 128 query rows per work item = two warpgroups of 64. Key tiles of 128 by default; the ring holds as many K and
# V stages as fit beside Q's 128 rows (at most 6): D128 3·2·32 + 32 = 224 KB of the 227 KB, D64 6·2·16 + 16 = 208.
# BLOCK_N = 64 is the alternative at D128: there ptxas keeps the next tile's Q·Kᵀ ahead of the softmax (with 128
# it sinks the product below the exponentials, short of registers for two score tiles, so OVERLAP overlaps
# nothing at D128; at D64 it does), at the price of twice the per-tile work (O rescale, reductions, barriers).
BLOCK_M = 128
SMEM_BYTES = 232448 - 2048  # the H100/H200 limit per block, less room for barriers and the compiler's scratch
HEAD_DIMS = (64, 128)
# the K/V bytes one section of the persistent schedule may hold (`_tile_coords`, `l2_section`): a sixth of the
# H100's 50 MB L2, so that two sections in flight at a boundary, Q and the outputs still fit beside them
L2_SECTION_BYTES = 8 << 20


def _stages(head_dim: int, block_n: int, itemsize: int = 2) -> int:
    per_stage = 2 * block_n * head_dim * itemsize
    return min(6, (SMEM_BYTES - BLOCK_M * head_dim * itemsize) // per_stage)


# registers: the 1-warp producer is given the minimum (24); the kernel's limit 168 = 65536 / (12 warps · 32)
# lets the two consumer warpgroups raise theirs to 240 (setmaxnreg), FA3's split
PRODUCER_REGS = gl.constexpr(24)
CONSUMER_REGS = gl.constexpr(240)
MAXNREG = 168


def mode() -> str:
    """``ATTN_GLUON`` from the environment: "1" forces the Gluon kernel wherever `gluon_supported`, "0" never
    uses it, anything else (unset) lets `gluon_default` decide."""
    return os.environ.get("ATTN_GLUON", "")


def enabled() -> bool:
    """The forced opt-in: ``ATTN_GLUON=1`` in the environment."""
    return mode() == "1"


# Where the Gluon kernel is the default on sm_90 (ATTN_GLUON unset). Measured basis: H100, session 9
# (bench/results/gluon_H100_2026-12-06_s9.json, peers in one process, torch 2.11, triton 3.6, the kernel with its
# guard against hidden non-finite values), TFLOP/s of Gluon against this repo's tl.* kernel:
#   B16 H32 S1024 D128 causal            275 vs 292   0.94x  (without the guard 336: the guard costs 18% here)
#   B4 H32 S4096 D128 causal             488 vs 375   1.30x
#   B4 H32 S4096 D128 full               629 vs 425   1.48x
#   B1 H32 S16384 D128 causal            571 vs 491   1.16x
#   B4 H32/8 S4096 D128 causal (GQA 4)   568 vs 410   1.39x
#   B8 H32 S4096 D64 causal              413 vs 372   1.11x
# So causal or full attention with Sq = Sk >= 4096, D64 or D128, any GQA ratio, without soft-cap or window. S1024
# loses since the guard (session 8 measured 1.10x before it); between 1024 and 4096 nothing is measured.
# Soft-cap, windows, lengths, packed input and ALiBi stay on tl.* unless forced (the packed rows measured so far
# lose: 0.72-0.95x tl.*); widen this predicate only from a benchmark row.
DEFAULT_MIN_SEQLEN = 4096


def gluon_default(*, seqlen_q, seqlen_k, num_heads_q, num_heads_kv, head_dim, window_left, window_right,
                  softcap, unmeasured=False) -> bool:  # fmt: skip
    """Whether a call that `gluon_supported` covers runs on the Gluon kernel by default (the measured wins).
    ``unmeasured``: the call uses a feature no benchmark row has measured on the Gluon kernel yet (per-sequence
    lengths, packed input, ALiBi): ``tl.*`` unless forced."""
    del num_heads_q, num_heads_kv  # every ratio measured wins (MHA and GQA 4)
    causal = window_left < 0 and window_right == 0
    full = window_left < 0 and window_right < 0
    if unmeasured or not (causal or full) or softcap > 0 or seqlen_q != seqlen_k:
        return False
    return head_dim in (64, 128) and seqlen_k >= DEFAULT_MIN_SEQLEN


def gluon_supported(q, k, v, *, packed, seqlens, head_dim, alibi, rel_bias, softcap) -> bool:
    """Whether this call can run on the Gluon kernel (everything else stays on the ``tl.*`` kernel).

    Needs an sm_90 device, fp16/bf16, D in {64, 128}, no T5 bias, and contiguous tensors whose row strides TMA
    accepts (16-byte multiples). Both layouts: padded (with or without ``seqlens_q/k``) and packed; ALiBi in
    both modes."""
    del softcap, seqlens, packed, alibi  # supported
    if rel_bias:
        return False
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or head_dim not in HEAD_DIMS:
        return False
    if not all(x.is_contiguous() and x.data_ptr() % 16 == 0 for x in (q, k, v)):
        return False
    # empty calls keep the tl.* wrapper's no-launch path
    return q.numel() > 0 and k.numel() > 0


@gluon.jit
def _tanh(x):
    # tanh(x) = 1 − 2 / (e^(2x) + 1): one exp2 and one reciprocal. rcp.approx (one MUFU op, ~1 ulp) instead of
    # the division's eight-instruction IEEE-style sequence, which made the soft-cap loop 2.4x longer in SASS.
    # e^(2x) = inf gives 1 and e^(2x) = 0 gives −1: it saturates without a branch.
    r = gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f",
                                  [gl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0], dtype=gl.float32, is_pure=True,
                                  pack=1)  # fmt: skip
    return 1.0 - 2.0 * r


@gluon.jit
def _tile_coords(tile, batch, num_heads_q, seqlen_q, section, BLOCK_M: gl.constexpr):
    """Work item ``tile`` -> (b, h, first row). The (b, h) pairs are cut into sections of ``section`` adjacent
    pairs (a multiple of the GQA group, so a KV head never straddles two sections) whose K and V fit in L2
    together; the sections run one after the other. Within a section, longest work first: the row blocks from
    the last (under a causal mask, the one with the most keys) to the first, all (b, h) of the section for one
    row block together, so the short blocks fill each section's tail and, at the end, the grid's.

    Why sections: the ~132 programs running at one time read the K/V of the (b, h) they hold. With all B·H
    pairs per row block (one section), at B4 H32 S4096 that is 128 different heads' K/V (256 MB) streaming
    through a 50 MB L2, so every row block re-reads its K/V prefix from HBM: 4.4 GB per causal call, 1.5 ms
    at 3 TB/s, the kernel's whole time in run 1 (1.53 ms) while the GQA shape (4 query heads per KV head,
    adjacent: 4x reuse) ran compute-bound at 0.98 ms. With sections the concurrent programs share a few
    heads' K/V, read from HBM about once per section."""
    num_bh = batch * num_heads_q
    n_m = gl.cdiv(seqlen_q, BLOCK_M)
    per_section = n_m * section
    sec = tile // per_section
    r = tile - sec * per_section
    # the last section may hold fewer pairs
    width = gl.minimum(section, num_bh - sec * section)
    pid_m = n_m - 1 - r // width
    bh = sec * section + r % width
    return bh // num_heads_q, bh % num_heads_q, pid_m * BLOCK_M


@gluon.jit
def _key_ranges(m0, seqlen_q, seqlen_k, window_left, window_right, HAS_WINDOW_LEFT: gl.constexpr,
                HAS_WINDOW_RIGHT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """The key ranges of the row block at m0: ``lo <= full_lo <= full_hi <= hi``. [lo, hi) holds the keys some
    row sees (lo tile-aligned); [full_lo, full_hi) the tiles every row sees whole, which need no mask. The
    producer and the consumers compute the same ranges, so they agree on the sequence of ring slots."""
    # bottom-right alignment: query row i sits on key diag + i
    diag = seqlen_k - seqlen_q
    m_last = gl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    lo = m0 * 0
    hi = seqlen_k + m0 * 0
    if HAS_WINDOW_LEFT:
        lo = gl.maximum(m0 + diag - window_left, 0) // BLOCK_N * BLOCK_N
    if HAS_WINDOW_RIGHT:
        hi = gl.maximum(gl.minimum(m_last + diag + window_right + 1, seqlen_k), lo)
    full_lo = lo
    if HAS_WINDOW_LEFT:
        full_lo = gl.cdiv(gl.maximum(m_last + diag - window_left, 0), BLOCK_N) * BLOCK_N
    full_hi = seqlen_k + m0 * 0
    if HAS_WINDOW_RIGHT:
        full_hi = gl.minimum(m0 + diag + window_right + 1, seqlen_k)
    full_hi = gl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    # a row block past its sequence's length (seqlens_q) has no rows: no keys
    hi = gl.where(m0 < seqlen_q, hi, lo)
    full_lo = gl.minimum(gl.maximum(full_lo, lo), hi)
    full_hi = gl.minimum(gl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@gluon.jit
def _lengths(b, lens_q_ptr, lens_k_ptr, seqlen_q, seqlen_k, rows_q, rows_k, HAS_SEQLENS: gl.constexpr,
             IS_PACKED: gl.constexpr):  # fmt: skip
    """Sequence b: ``(len_q, len_k, tb, start_q, start_k)``. Its rows are ``start .. start + len`` of batch entry
    ``tb`` of the ``[tb, rows, H·D]`` view (padded: tb = b, start 0; packed: tb = 0, start = cu_seqlens[b]).
    Lengths and offsets are clamped into the tensors (an unvalidated call reads and writes only inside them,
    whatever ``seqlens``/``cu_seqlens`` hold; packed query rows past ``max_seqlen_q`` are not computed)."""
    if IS_PACKED:
        start_q = gl.minimum(gl.maximum(gl.load(lens_q_ptr + b), 0), rows_q)
        len_q = gl.minimum(gl.minimum(gl.maximum(gl.load(lens_q_ptr + b + 1), start_q), rows_q) - start_q, seqlen_q)
        start_k = gl.minimum(gl.maximum(gl.load(lens_k_ptr + b), 0), rows_k)
        len_k = gl.minimum(gl.maximum(gl.load(lens_k_ptr + b + 1), start_k), rows_k) - start_k
        tb = b * 0
    else:
        start_q = b * 0
        start_k = b * 0
        tb = b
        if HAS_SEQLENS:
            len_q = gl.minimum(gl.maximum(gl.load(lens_q_ptr + b), 0), seqlen_q)
            len_k = gl.minimum(gl.maximum(gl.load(lens_k_ptr + b), 0), seqlen_k)
        else:
            len_q = seqlen_q + b * 0
            len_k = seqlen_k + b * 0
    return len_q, len_k, tb, start_q, start_k


@gluon.jit
def _producer(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, kv_empty, lens_q_ptr, lens_k_ptr, batch,
              num_heads_q, section, group_size, seqlen_q, seqlen_k, rows_q, rows_k, window_left, window_right,
              HAS_SEQLENS: gl.constexpr, IS_PACKED: gl.constexpr, HAS_WINDOW_LEFT: gl.constexpr,
              HAS_WINDOW_RIGHT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              HEAD_DIM: gl.constexpr):  # fmt: skip
    """One warp: TMA copies of every K and V tile this program's work items need, into the ring, in the order
    the consumers use them. It runs ahead into the next work item as soon as stages free up."""
    STAGES: gl.constexpr = k_bufs.shape[0]
    num_tiles = gl.cdiv(seqlen_q, BLOCK_M) * batch * num_heads_q
    it = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, h, m0 = _tile_coords(tile, batch, num_heads_q, seqlen_q, section, BLOCK_M)
        kv_col = (h // group_size) * HEAD_DIM
        len_q, len_k, tb, start_q, start_k = _lengths(b, lens_q_ptr, lens_k_ptr, seqlen_q, seqlen_k, rows_q, rows_k,
                                                      HAS_SEQLENS, IS_PACKED)  # fmt: skip
        lo, full_lo, full_hi, hi = _key_ranges(m0, len_q, len_k, window_left, window_right, HAS_WINDOW_LEFT,
                                               HAS_WINDOW_RIGHT, BLOCK_M, BLOCK_N)  # fmt: skip
        for i in range(gl.cdiv(hi - lo, BLOCK_N)):
            s = it % STAGES
            # a fresh barrier counts as having completed the phase before 0: the first pass through the ring
            # waits on phase 1 and goes straight through
            phase = ((it // STAGES) & 1) ^ 1
            n = lo + i * BLOCK_N
            # K and V have their own barriers both ways: the consumers start Q·Kᵀ while V is still in flight, and
            # hand a K stage back as soon as its Q·Kᵀ is done (kv_empty[s]), a V stage after P·V
            # (kv_empty[STAGES + s]), so the next K copy need not wait for the last P·V
            mbarrier.wait(kv_empty.index(s), phase)
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [tb, start_k + n, kv_col], k_ready.index(s), k_bufs.index(s))
            mbarrier.wait(kv_empty.index(STAGES + s), phase)
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            if v_desc.dtype == gl.float8e4nv:
                # FP8: the descriptor is over `_fp8_vt`'s [B, Hkv·D, S']: this head's D feature rows, columns n ...
                tma.async_copy_global_to_shared(v_desc, [tb, kv_col, start_k + n], v_ready.index(s), v_bufs.index(s))
            else:
                tma.async_copy_global_to_shared(v_desc, [tb, start_k + n, kv_col], v_ready.index(s), v_bufs.index(s))
            it += 1


@gluon.jit
def _scores(qk, offs_m, start, diag, seqlen_k, qk_scale, cap_log2, slope, window_left, window_right,
            MASKED: gl.constexpr, HAS_WINDOW_LEFT: gl.constexpr, HAS_WINDOW_RIGHT: gl.constexpr,
            HAS_SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):  # fmt: skip
    """Scores of one tile in log2 units (unscaled raw products on the plain path), masked where needed.

    ALiBi (``ALIBI`` 1: after scaling and capping, 2: on the raw product) adds ``slope · (j − i − diag)`` in the
    units of the line it joins: ``slope`` arrives pre-multiplied for them (`_alibi_slope`)."""
    if ALIBI != 0:
        offs_n = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        rel = (gl.expand_dims(offs_n, 0) - gl.expand_dims(offs_m + diag, 1)).to(gl.float32)
    if HAS_SOFTCAP:
        if ALIBI == 2:
            s = cap_log2 * _tanh((qk + slope * rel) * qk_scale)
        else:
            s = cap_log2 * _tanh(qk * qk_scale)
        if ALIBI == 1:
            s = s + slope * rel
    else:
        s = qk
        if ALIBI != 0:
            s = s + slope * rel
    if MASKED:
        visible = _visible(offs_m, start, diag, seqlen_k, window_left, window_right, HAS_WINDOW_LEFT,
                           HAS_WINDOW_RIGHT, BLOCK_N, s_layout)  # fmt: skip
        s = gl.where(visible, s, float("-inf"))
    return s


@gluon.jit
def _alibi_slope(alibi_ptr, stride_ab, stride_ah, b, h, qk_scale, ALIBI: gl.constexpr, HAS_SOFTCAP: gl.constexpr):
    """Head h of sequence b's ALiBi slope in the units `_scores` adds it in: with soft-cap, the capped score is
    in log2 units (mode 1: slope · log2 e) and mode 2 adds to the raw product (slope); without, everything is
    in raw-product units, scaled by qk_scale = scale · log2 e later (mode 1: slope · log2 e / qk_scale, mode 2:
    slope)."""
    slope = 0.0
    if ALIBI != 0:
        slope = gl.load(alibi_ptr + b.to(gl.int64) * stride_ab + h.to(gl.int64) * stride_ah)
        if ALIBI == 1:
            if HAS_SOFTCAP:
                slope = slope * 1.4426950408889634
            else:
                slope = slope * (1.4426950408889634 / qk_scale)
    return slope


@gluon.jit
def _visible(offs_m, start, diag, seqlen_k, window_left, window_right, HAS_WINDOW_LEFT: gl.constexpr,
             HAS_WINDOW_RIGHT: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):  # fmt: skip
    """Which keys of the tile at ``start`` each row sees (SPEC: bottom-right aligned window, keys < seqlen_k);
    [1, BLOCK_N] without a window, broadcast against the rows by the caller."""
    offs_n = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    j = gl.expand_dims(offs_n, 0)
    i = gl.expand_dims(offs_m, 1) + diag
    visible = j < seqlen_k
    if HAS_WINDOW_LEFT:
        visible = visible & (j >= i - window_left)
    if HAS_WINDOW_RIGHT:
        visible = visible & (j <= i + window_right)
    return visible


# Hidden values stay out (SPEC: values of keys hidden from a row never reach its output). In a masked tile a hidden
# key's p is exactly 0, but wgmma's P·V still multiplies it by the key's V row, and 0 · NaN = 0 · Inf = NaN. The
# unmasked tiles hold only keys every row sees, where NaN is the right answer; only the masked tiles (the causal
# diagonal, a window's edges, the end of the keys) need this. Each masked tile checks its V stage for exponent bits
# all set (one pass over the stage and one reduction); only if there are any, the slow path below runs.
# Registers are the constraint: the check runs with acc, P and (OVERLAP) the next tile's scores live, and any
# extra [WG_M, D] fp32 tensor there makes ptxas serialize every wgmma of the kernel (C7512). So the stage is read in
# chunks of 8 elements per thread (`_chunk_layout`), and the indicator product in slices of IND_KEYS keys.
IND_KEYS = gl.constexpr(32)


@gluon.constexpr_function
def _chunk_layout(COLS, NW, PER=8):
    """A [rows, COLS] register layout of PER contiguous elements (16 bytes: 8 of 16 bits, 16 of FP8) per thread;
    its tile covers (32 / (COLS / PER)) · NW rows, the chunk height of the check and the slow path."""
    return gl.BlockedLayout([1, PER], [32 // (COLS // PER), COLS // PER], [NW, 1], [1, 0])


@gluon.jit
def _has_nonfinite(v_smem, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Whether the V stage holds a NaN or ±Inf: an element whose exponent bits are all set (bf16 0x7F80, fp16
    0x7C00), read as int16 straight from shared memory. Uniform over the partition (a cross-warp reduction)."""
    NW: gl.constexpr = gl.num_warps()
    CH: gl.constexpr = (32 // (HEAD_DIM // 8)) * NW
    EXP: gl.constexpr = 0x7F80 if v_smem.dtype == gl.bfloat16 else 0x7C00
    layout: gl.constexpr = _chunk_layout(HEAD_DIM, NW)
    bits = v_smem._reinterpret(gl.int16, [BLOCK_N, HEAD_DIM], v_smem.layout)
    bad = gl.zeros([CH, HEAD_DIM], gl.int32, layout)
    for c in gl.static_range(BLOCK_N // CH):
        x = bits.slice(c * CH, CH).load(layout).to(gl.int32)
        bad = bad | ((x & EXP) == EXP).to(gl.int32)
    return gl.max(gl.max(bad, 1), 0)


@gluon.jit
def _sync_consumers(fix_bar, fixes):
    """Every consumer partition reaches this point (the ``fixes``-th phase of ``fix_bar``, count = partitions)
    after all its threads' shared-memory stores (fenced for the async proxy by the caller)."""
    gl.thread_barrier()
    mbarrier.arrive(fix_bar, count=1)
    mbarrier.wait(fix_bar, fixes & 1)
    return fixes + 1


@gluon.jit
def _v_rows(v_ptr, v_base, kv_stride, row0, kv_rows, CH: gl.constexpr, HEAD_DIM: gl.constexpr,
            layout: gl.constexpr):  # fmt: skip
    """V rows ``row0 .. row0 + CH`` of this (sequence, KV head) from global memory, as fp32; rows at or past
    ``kv_rows`` (hidden from every row) read as 0."""
    rows = row0 + gl.arange(0, CH, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    ptrs = v_ptr + v_base + gl.expand_dims(rows.to(gl.int64) * kv_stride, 1) + gl.expand_dims(cols, 0)
    mask = gl.expand_dims(rows < kv_rows, 1) & gl.expand_dims(cols < HEAD_DIM, 0)
    return gl.load(ptrs, mask=mask, other=0.0).to(gl.float32)


@gluon.jit
def _hidden_values_out(v_smem, acc, fix_bar, fixes, v_ptr, v_base, kv_stride, start, offs_m, diag, seqlen_k,
                       window_left, window_right, HAS_WINDOW_LEFT: gl.constexpr, HAS_WINDOW_RIGHT: gl.constexpr,
                       HALF: gl.constexpr, CONSUMERS: gl.constexpr, WG_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       HEAD_DIM: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                       p_layout: gl.constexpr):  # fmt: skip
    """The slow path of a masked tile whose V stage holds a non-finite value. Afterwards the stage holds V with
    its non-finite values replaced by 0 (so a hidden key's p = 0 contributes exactly 0), and ``acc`` is NaN
    exactly where a visible key's V had a non-finite value in that column: the reference's ``p · NaN`` (an Inf
    becomes NaN here, not ±Inf).

    Which outputs a visible non-finite value reaches is ``visible @ bad``, one more wgmma accumulated into acc
    itself (a separate [WG_M, D] accumulator does not fit the 240 registers beside acc, P and the next tile's
    scores: ptxas serializes every wgmma of the kernel): visible as 2^127 and bad as 2^127, both exact in bf16
    (the stage is reinterpreted as bf16 for this product whatever V's dtype), so a hit adds 2^254, past fp32's
    range, and a miss adds exactly 0. Every element at or above 1e38 (inf, or a saturated or NaN product) then
    becomes NaN; an unnormalized acc of honest values never gets there (|acc| <= keys · max|V|).

    Both consumer partitions read the stage, so they rewrite it together: each its own BLOCK_N / CONSUMERS rows,
    from V in global memory (the stage's copy is overwritten by the indicator first), with a barrier between
    the steps. Both take this path for the same tiles: they check the same untouched stage, and nobody writes
    it before both have checked (the first barrier)."""
    NW: gl.constexpr = gl.num_warps()
    CH: gl.constexpr = (32 // (HEAD_DIM // 8)) * NW
    ROWS: gl.constexpr = BLOCK_N // CONSUMERS
    dtype: gl.constexpr = v_smem.dtype
    layout: gl.constexpr = _chunk_layout(HEAD_DIM, NW)
    # the visibility operand in slices of IND_KEYS keys (an accumulator-shaped layout of that width converts to
    # the A operand in registers, as P does)
    h_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, IND_KEYS, 16])  # fmt: skip
    big: gl.constexpr = 1.7014118346046923e38  # 2^127
    ind = v_smem._reinterpret(gl.bfloat16, [BLOCK_N, HEAD_DIM], v_smem.layout)
    # 0: both partitions have checked the untouched stage
    fixes = _sync_consumers(fix_bar, fixes)
    # 1: this partition's rows become the indicator of non-finite values (2^127 / 0)
    for c in gl.static_range(ROWS // CH):
        x = _v_rows(v_ptr, v_base, kv_stride, start + HALF * ROWS + c * CH, seqlen_k, CH, HEAD_DIM, layout)
        ind.slice(HALF * ROWS + c * CH, CH).store(gl.where((x - x) != 0.0, big, 0.0).to(gl.bfloat16))
    fence_async_shared()
    fixes = _sync_consumers(fix_bar, fixes)
    # 2: acc += (visible · 2^127) @ (bad · 2^127): +inf (or at least 2^127) where a visible key is bad
    rows = gl.convert_layout(offs_m, gl.SliceLayout(1, h_layout))
    for kk in gl.static_range(BLOCK_N // IND_KEYS):
        visible = _visible(rows, start + kk * IND_KEYS, diag, seqlen_k, window_left, window_right, HAS_WINDOW_LEFT,
                           HAS_WINDOW_RIGHT, IND_KEYS, h_layout)  # fmt: skip
        vis = gl.where(visible, gl.full([WG_M, IND_KEYS], big, gl.float32, h_layout), 0.0)
        vis = gl.convert_layout(vis.to(gl.bfloat16), p_layout)
        acc = warpgroup_mma(vis, ind.slice(kk * IND_KEYS, IND_KEYS), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
    acc = gl.where(acc < 1.0e38, acc, float("nan"))
    # 3: both have read the indicator; the rows become V with its non-finite values zeroed
    fixes = _sync_consumers(fix_bar, fixes)
    for c in gl.static_range(ROWS // CH):
        x = _v_rows(v_ptr, v_base, kv_stride, start + HALF * ROWS + c * CH, seqlen_k, CH, HEAD_DIM, layout)
        v_smem.slice(HALF * ROWS + c * CH, CH).store(gl.where((x - x) != 0.0, 0.0, x).to(dtype))
    fence_async_shared()
    fixes = _sync_consumers(fix_bar, fixes)
    return acc, fixes


# FP8 (e4m3fn: no inf, NaN codes 0x7F and 0xFF) keeps hidden values out the same way, over its Vᵀ stage
# [HEAD_DIM, BLOCK_N]. The bf16 indicator product does not carry over (e4m3 tops out at 448: a hit would not stand
# out of an honest accumulator), so the rare slow path marks NaN key by key instead.
FP8_PER = gl.constexpr(16)  # FP8 elements in a thread's 16-byte chunk


@gluon.jit
def _has_nan_code(vt_smem, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr):
    """Whether an FP8 Vᵀ stage holds a NaN code, read as int8 straight from shared memory. Uniform over the
    partition (a cross-warp reduction)."""
    NW: gl.constexpr = gl.num_warps()
    CH: gl.constexpr = (32 // (BLOCK_N // FP8_PER)) * NW
    layout: gl.constexpr = _chunk_layout(BLOCK_N, NW, FP8_PER)
    bits = vt_smem._reinterpret(gl.int8, [HEAD_DIM, BLOCK_N], vt_smem.layout)
    bad = gl.zeros([CH, BLOCK_N], gl.int32, layout)
    for c in gl.static_range(HEAD_DIM // CH):
        x = bits.slice(c * CH, CH).load(layout).to(gl.int32)
        bad = bad | ((x & 0x7F) == 0x7F).to(gl.int32)
    return gl.max(gl.max(bad, 1), 0)


@gluon.jit
def _nan_codes_out(vt_smem, acc, fix_bar, fixes, v_ptr, v_base, kv_stride, start, offs_m, diag, seqlen_k,
                   window_left, window_right, HAS_WINDOW_LEFT: gl.constexpr, HAS_WINDOW_RIGHT: gl.constexpr,
                   HALF: gl.constexpr, CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                   o_layout: gl.constexpr):  # fmt: skip
    """The FP8 slow path of a masked tile whose Vᵀ stage holds a NaN code: afterwards ``acc`` is NaN exactly where
    a visible key's V has a NaN code in that column (the reference's ``p · NaN``), and the stage holds the codes
    replaced by 0, so a hidden key's p = 0 contributes exactly 0.

    The marking reads V's rows from global memory, one key at a time (a [D] vector beside acc: no extra
    [WG_M, D] registers); each partition then zeroes its HEAD_DIM / CONSUMERS feature rows of the stage in place.
    The first barrier keeps the stage untouched until both partitions have checked it (both take this path for
    the same tiles), the second keeps it from the wgmma until both have cleaned it."""
    NW: gl.constexpr = gl.num_warps()
    CH: gl.constexpr = (32 // (BLOCK_N // FP8_PER)) * NW
    ROWS: gl.constexpr = HEAD_DIM // CONSUMERS
    layout: gl.constexpr = _chunk_layout(BLOCK_N, NW, FP8_PER)
    fixes = _sync_consumers(fix_bar, fixes)
    i = gl.convert_layout(offs_m, gl.SliceLayout(1, o_layout)) + diag
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    for n in range(BLOCK_N):
        key = start + n
        x = gl.load(v_ptr + v_base + key.to(gl.int64) * kv_stride + cols, mask=(cols * 0 + key) < seqlen_k,
                    other=0.0)  # fmt: skip
        bad = (x.to(gl.int8, bitcast=True) & 0x7F) == 0x7F
        sees = (i * 0 + key) < seqlen_k
        if HAS_WINDOW_LEFT:
            sees = sees & (key >= i - window_left)
        if HAS_WINDOW_RIGHT:
            sees = sees & (key <= i + window_right)
        acc = gl.where(gl.expand_dims(sees, 1) & gl.expand_dims(bad, 0), float("nan"), acc)
    bits = vt_smem._reinterpret(gl.int8, [HEAD_DIM, BLOCK_N], vt_smem.layout)
    for c in gl.static_range(ROWS // CH):
        chunk = bits.slice(HALF * ROWS + c * CH, CH)
        x = chunk.load(layout)
        chunk.store(gl.where((x & 0x7F) == 0x7F, gl.zeros_like(x), x))
    fence_async_shared()
    fixes = _sync_consumers(fix_bar, fixes)
    return acc, fixes


@gluon.jit
def _relabel_p(p, p_layout: gl.constexpr):
    """FP8 P [M, N] (in the score accumulator's layout) as P·V's A operand without moving a byte.

    A thread's accumulator registers hold, of every 32 keys, keys 2t, 2t+1, 8+2t, 9+2t, 16+2t, ... (t = lane % 4);
    an FP8 A fragment wants k = 4t .. 4t+3 and 16+4t .. 16+4t+3 from it. P·V does not care which key is called
    k = c as long as V's row c is that key too, so P is *relabelled*: position c = 32s + 16h + 4t + 2e + i is
    key 32s + 16h + 8e + 2t + i (swap the bits of t and e), and `_fp8_vt` lays Vᵀ's columns out in the same
    order. ``assert_trivial`` makes the compiler prove the result is already P·V's A layout (no shuffles; the
    plain conversion costs 16 SHFL and a few PRMT per tile)."""
    M: gl.constexpr = p.shape[0]
    N: gl.constexpr = p.shape[1]
    x = gl.reshape(p, [M, N // 32, 2, 2, 4, 2])  # key = 32s + 16h + 8e + 2t + i: axes (s, h, e, t, i)
    x = gl.permute(x, (0, 1, 2, 4, 3, 5))  # axes (s, h, t, e, i): position c
    return gl.convert_layout(gl.reshape(x, [M, N]), p_layout, assert_trivial=True)


@gluon.jit
def _softmax_step(s, m_i, l_i, acc, qk_scale, MASKED: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                  o_layout: gl.constexpr, p_layout: gl.constexpr, dtype: gl.constexpr):  # fmt: skip
    """Online softmax of one tile: the new row max, P (as the A operand of P·V) and the rescaled sums."""
    if HAS_SOFTCAP:
        m_new = gl.maximum(m_i, gl.max(s, 1))
    else:
        # plain: the row max of the raw products, scaled once per row; the exponent is one FMA per score
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    if MASKED:
        # a row that has seen no key yet keeps m = −inf; subtracting 0 instead keeps its p = exp2(−inf) = 0
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    if HAS_SOFTCAP:
        p = gl.exp2(s - gl.expand_dims(m_use, 1))
    elif dtype == gl.float8e4nv:
        # FP8: p · 256 straight from the exponent (attn.reference.fp8_attention's P_SCALE, so that small p stay
        # out of e4m3's subnormals); l sums the scaled p and the scale cancels in acc / l
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_use - 8.0, 1))
    else:
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, 1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    # the score accumulator's registers are already laid out as wgmma's A fragment: no shared-memory trip
    if dtype == gl.float8e4nv:
        p_op = _relabel_p(p.to(dtype), p_layout)
    else:
        p_op = gl.convert_layout(p.to(dtype), p_layout)
    return p_op, m_new, l_i, acc


@gluon.jit
def _softmax_pv(qk, v_bufs, v_ready, slot, phase, acc, m_i, l_i, fix, start, offs_m, diag, seqlen_k, qk_scale,
                cap_log2, slope, window_left, window_right, MASKED: gl.constexpr, HAS_WINDOW_LEFT: gl.constexpr,
                HAS_WINDOW_RIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, HALF: gl.constexpr,
                CONSUMERS: gl.constexpr, WG_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):  # fmt: skip
    """Softmax of one tile's products, then P·V issued asynchronously; returns the pending accumulator. ``fix``
    is ``(fix_bar, fixes, v_ptr, v_base, kv_stride)``: what a masked tile's non-finite check needs."""
    s = _scores(qk, offs_m, start, diag, seqlen_k, qk_scale, cap_log2, slope, window_left, window_right, MASKED,
                HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SOFTCAP, ALIBI, BLOCK_N, s_layout)  # fmt: skip
    p_op, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, qk_scale, MASKED, HAS_SOFTCAP, o_layout, p_layout,
                                        v_bufs.dtype)  # fmt: skip
    mbarrier.wait(v_ready.index(slot), phase)
    fix_bar, fixes, v_ptr, v_base, kv_stride = fix
    if v_bufs.dtype == gl.float8e4nv:
        # FP8 stages hold Vᵀ [HEAD_DIM, BLOCK_N]: its transposed view is P·V's B operand with the keys (the
        # reduction) contiguous, the only layout FP8 wgmma reads from shared memory
        vt = v_bufs.index(slot).reshape([HEAD_DIM, BLOCK_N])
        if MASKED == 1:
            if _has_nan_code(vt, HEAD_DIM, BLOCK_N) != 0:
                acc, fixes = _nan_codes_out(vt, acc, fix_bar, fixes, v_ptr, v_base, kv_stride, start, offs_m, diag,
                                            seqlen_k, window_left, window_right, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
                                            HALF, CONSUMERS, BLOCK_N, HEAD_DIM, o_layout)  # fmt: skip
        v = vt.permute((1, 0))
    else:
        v = v_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM])
        # MASKED is 1 for a masked tile, 2 for one without the guard (GUARD_HIDDEN=False: a benchmark's baseline)
        if MASKED == 1:
            if _has_nonfinite(v, BLOCK_N, HEAD_DIM) != 0:
                acc, fixes = _hidden_values_out(v, acc, fix_bar, fixes, v_ptr, v_base, kv_stride, start, offs_m,
                                                diag, seqlen_k, window_left, window_right, HAS_WINDOW_LEFT,
                                                HAS_WINDOW_RIGHT, HALF, CONSUMERS, WG_M, BLOCK_N, HEAD_DIM, s_layout,
                                                o_layout, p_layout)  # fmt: skip
    acc = warpgroup_mma(p_op, v, acc, is_async=True)
    return acc, m_i, l_i, fixes


@gluon.jit
def _v_operand(v_bufs, slot, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Ring slot ``slot``'s V tile as P·V's B operand, [BLOCK_N, HEAD_DIM] (FP8: the transposed view of the stored
    Vᵀ, keys contiguous)."""
    if v_bufs.dtype == gl.float8e4nv:
        v = v_bufs.index(slot).reshape([HEAD_DIM, BLOCK_N]).permute((1, 0))
    else:
        v = v_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM])
    return v


@gluon.jit
def _qk(q, k_bufs, k_ready, it, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
        s_layout: gl.constexpr):  # fmt: skip
    """Q·Kᵀ of ring slot ``it`` issued asynchronously once its K tile has landed."""
    STAGES: gl.constexpr = k_bufs.shape[0]
    slot = it % STAGES
    mbarrier.wait(k_ready.index(slot), (it // STAGES) & 1)
    kt = k_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    return warpgroup_mma(q, kt, zero, use_acc=False, is_async=True)


@gluon.jit
def _tiles(q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, acc, m_i, l_i, it, fixes, fix_bar, turns, turn_bars, v_ptr,
           v_base, kv_stride, lo, hi, offs_m, diag, seqlen_k, qk_scale, cap_log2, slope, window_left, window_right,
           MASKED: gl.constexpr, HAS_WINDOW_LEFT: gl.constexpr, HAS_WINDOW_RIGHT: gl.constexpr,
           HAS_SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, OVERLAP: gl.constexpr, HALF: gl.constexpr,
           CONSUMERS: gl.constexpr,
           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, s_layout: gl.constexpr,
           o_layout: gl.constexpr, p_layout: gl.constexpr):  # fmt: skip
    """The key tiles [lo, hi): ring slots ``it, it+1, ...``; returns the running state, the next slot, the count
    of ``fix_bar`` phases (`_hidden_values_out`) and this consumer's count of turns (mode 2). Modes (OVERLAP):
    0 serial, 1 the next tile's Q·Kᵀ issued before this tile's softmax, 2 ping-pong between the consumers."""
    STAGES: gl.constexpr = k_bufs.shape[0]
    n_tiles = gl.cdiv(hi - lo, BLOCK_N)
    if OVERLAP == 1:
        # software pipeline: tile t+1's Q·Kᵀ is issued before tile t's softmax, so the tensor cores work on it
        # while this warpgroup computes exponentials; one wait then collects both products
        if n_tiles > 0:
            qk = warpgroup_mma_wait(0, deps=[_qk(q, k_bufs, k_ready, it, BLOCK_M, BLOCK_N, HEAD_DIM, s_layout)])
            mbarrier.arrive(kv_empty.index(it % STAGES), count=1)  # this K stage is read
            for t in range(n_tiles - 1):
                qk_next = _qk(q, k_bufs, k_ready, it + 1, BLOCK_M, BLOCK_N, HEAD_DIM, s_layout)
                # a no-op wait (only that product is in flight) that pins the order in SASS: without it ptxas
                # sinks the product below the softmax's exponentials, and nothing overlaps (bench/probes/gluon_sass.py)
                qk = warpgroup_mma_wait(1, deps=[qk])
                acc_t, m_i, l_i, fixes = _softmax_pv(qk, v_bufs, v_ready, it % STAGES, (it // STAGES) & 1, acc, m_i,
                                                     l_i, (fix_bar, fixes, v_ptr, v_base, kv_stride),
                                                     lo + t * BLOCK_N, offs_m, diag, seqlen_k, qk_scale, cap_log2,
                                                     slope,
                                                     window_left, window_right, MASKED, HAS_WINDOW_LEFT,
                                                     HAS_WINDOW_RIGHT, HAS_SOFTCAP, ALIBI, HALF, CONSUMERS, BLOCK_M,
                                                     BLOCK_N, HEAD_DIM, s_layout, o_layout, p_layout)  # fmt: skip
                acc, qk = warpgroup_mma_wait(0, deps=[acc_t, qk_next])
                # the next tile's K and this tile's V are read: hand both stages back to the producer
                mbarrier.arrive(kv_empty.index((it + 1) % STAGES), count=1)
                mbarrier.arrive(kv_empty.index(STAGES + it % STAGES), count=1)
                it += 1
            acc_t, m_i, l_i, fixes = _softmax_pv(qk, v_bufs, v_ready, it % STAGES, (it // STAGES) & 1, acc, m_i, l_i,
                                                 (fix_bar, fixes, v_ptr, v_base, kv_stride),
                                                 lo + (n_tiles - 1) * BLOCK_N, offs_m, diag, seqlen_k, qk_scale,
                                                 cap_log2, slope, window_left, window_right, MASKED, HAS_WINDOW_LEFT,
                                                 HAS_WINDOW_RIGHT, HAS_SOFTCAP, ALIBI, HALF, CONSUMERS, BLOCK_M,
                                                 BLOCK_N,
                                                 HEAD_DIM, s_layout, o_layout, p_layout)  # fmt: skip
            acc = warpgroup_mma_wait(0, deps=[acc_t])
            mbarrier.arrive(kv_empty.index(STAGES + it % STAGES), count=1)
            it += 1
    elif OVERLAP == 2:
        # FA3's ping-pong (unmasked ranges, two consumers; MASKED is False): the consumers take turns to issue
        # their products, so that one's softmax runs while the other's products hold the tensor cores. Within a
        # consumer the products and the softmax alternate: tile t's P·V and tile t+1's Q·Kᵀ are issued in one
        # turn, then both are waited for, then tile t+1's softmax (one score tile live). Free-running consumers
        # tend to move in phase instead, both waiting on the same K/V stages, so both compute exponentials while
        # the tensor cores idle. Turn k of consumer 0 waits for the other's turn k − 1 (its first passes: parity
        # 1 of a fresh barrier), turn k of consumer 1 for consumer 0's turn k. Both take one turn per tile of
        # the same range, so the turns match; the data is awaited before a turn is taken, not while holding it.
        if n_tiles > 0:
            qk = warpgroup_mma_wait(0, deps=[_qk(q, k_bufs, k_ready, it, BLOCK_M, BLOCK_N, HEAD_DIM, s_layout)])
            mbarrier.arrive(kv_empty.index(it % STAGES), count=1)
            sc = _scores(qk, offs_m, lo, diag, seqlen_k, qk_scale, cap_log2, slope, window_left, window_right, False,
                         HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SOFTCAP, ALIBI, BLOCK_N, s_layout)  # fmt: skip
            p_op, m_i, l_i, acc = _softmax_step(sc, m_i, l_i, acc, qk_scale, False, HAS_SOFTCAP, o_layout, p_layout,
                                                v_bufs.dtype)  # fmt: skip
            for t in range(n_tiles - 1):
                mbarrier.wait(v_ready.index(it % STAGES), (it // STAGES) & 1)
                mbarrier.wait(k_ready.index((it + 1) % STAGES), ((it + 1) // STAGES) & 1)
                mbarrier.wait(turn_bars.index(HALF), (turns & 1) ^ (1 - HALF))
                acc = warpgroup_mma(p_op, _v_operand(v_bufs, it % STAGES, BLOCK_N, HEAD_DIM), acc, is_async=True)
                qk_next = _qk(q, k_bufs, k_ready, it + 1, BLOCK_M, BLOCK_N, HEAD_DIM, s_layout)
                mbarrier.arrive(turn_bars.index(1 - HALF), count=1)
                turns += 1
                acc, qk = warpgroup_mma_wait(0, deps=[acc, qk_next])
                mbarrier.arrive(kv_empty.index(STAGES + it % STAGES), count=1)  # this V stage is read
                mbarrier.arrive(kv_empty.index((it + 1) % STAGES), count=1)  # the next K stage is read
                sc = _scores(qk, offs_m, lo + (t + 1) * BLOCK_N, diag, seqlen_k, qk_scale, cap_log2, slope,
                             window_left, window_right, False, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SOFTCAP, ALIBI,
                             BLOCK_N, s_layout)  # fmt: skip
                p_op, m_i, l_i, acc = _softmax_step(sc, m_i, l_i, acc, qk_scale, False, HAS_SOFTCAP, o_layout,
                                                    p_layout, v_bufs.dtype)  # fmt: skip
                it += 1
            mbarrier.wait(v_ready.index(it % STAGES), (it // STAGES) & 1)
            mbarrier.wait(turn_bars.index(HALF), (turns & 1) ^ (1 - HALF))
            acc = warpgroup_mma(p_op, _v_operand(v_bufs, it % STAGES, BLOCK_N, HEAD_DIM), acc, is_async=True)
            mbarrier.arrive(turn_bars.index(1 - HALF), count=1)
            turns += 1
            acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(kv_empty.index(STAGES + it % STAGES), count=1)
            it += 1
    else:
        for t in range(n_tiles):
            qk = warpgroup_mma_wait(0, deps=[_qk(q, k_bufs, k_ready, it, BLOCK_M, BLOCK_N, HEAD_DIM, s_layout)])
            mbarrier.arrive(kv_empty.index(it % STAGES), count=1)
            acc_t, m_i, l_i, fixes = _softmax_pv(qk, v_bufs, v_ready, it % STAGES, (it // STAGES) & 1, acc, m_i, l_i,
                                                 (fix_bar, fixes, v_ptr, v_base, kv_stride), lo + t * BLOCK_N,
                                                 offs_m, diag, seqlen_k, qk_scale, cap_log2, slope, window_left,
                                                 window_right, MASKED, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
                                                 HAS_SOFTCAP, ALIBI, HALF, CONSUMERS, BLOCK_M, BLOCK_N, HEAD_DIM,
                                                 s_layout,
                                                 o_layout, p_layout)  # fmt: skip
            acc = warpgroup_mma_wait(0, deps=[acc_t])
            mbarrier.arrive(kv_empty.index(STAGES + it % STAGES), count=1)
            it += 1
    return acc, m_i, l_i, it, fixes, turns


@gluon.jit
def _consumer(q_desc, o_ptr, q_bufs, q_bars, k_bufs, v_bufs, k_ready, v_ready, kv_empty, fix_bar, turn_bars, v_ptr,
              lse_ptr, lens_q_ptr, lens_k_ptr, alibi_ptr, descale_ptr, stride_ab, stride_ah, stride_lb, stride_lh,
              batch, num_heads_q, section, group_size, seqlen_q, seqlen_k, rows_q, rows_k, qk_scale, cap_log2,
              window_left, window_right, HAS_SEQLENS: gl.constexpr,
              IS_PACKED: gl.constexpr, HAS_WINDOW_LEFT: gl.constexpr, HAS_WINDOW_RIGHT: gl.constexpr,
              HAS_SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, STORE_LSE: gl.constexpr, OVERLAP: gl.constexpr,
              GUARD_HIDDEN: gl.constexpr, BLOCK_M: gl.constexpr, WG_M: gl.constexpr, BLOCK_N: gl.constexpr,
              HEAD_DIM: gl.constexpr, HALF: gl.constexpr):  # fmt: skip
    """One consumer partition: for each of the program's work items, Q·Kᵀ, online softmax and P·V for its WG_M
    rows of the row block (rows HALF·WG_M ...), then the epilogue. Every consumer reads every K/V stage of the
    block and hands it back. The next item's Q is loaded during this item's epilogue."""
    q_smem = q_bufs.index(HALF)
    q_bar = q_bars.index(HALF)
    CONSUMERS: gl.constexpr = BLOCK_M // WG_M
    MASKED: gl.constexpr = 1 if GUARD_HIDDEN else 2
    NW: gl.constexpr = gl.num_warps()
    # FP8 (e4m3 Q, K, V; P quantized to e4m3 before P·V): wgmma takes 32 of its elements per k step, and an
    # A fragment in registers holds 4 consecutive k per 32-bit register instead of 2
    FP8: gl.constexpr = q_desc.dtype == gl.float8e4nv
    K_STEP: gl.constexpr = 32 if FP8 else 16
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, K_STEP])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, HEAD_DIM, K_STEP])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=K_STEP // 8)
    num_tiles = gl.cdiv(seqlen_q, BLOCK_M) * batch * num_heads_q
    step = gl.num_programs(0)

    first = gl.program_id(0)
    if first < num_tiles:
        b, h, m_block = _tile_coords(first, batch, num_heads_q, seqlen_q, section, BLOCK_M)
        _, _, tb, start_q, _ = _lengths(b, lens_q_ptr, lens_k_ptr, seqlen_q, seqlen_k, rows_q, rows_k, HAS_SEQLENS,
                                        IS_PACKED)  # fmt: skip
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [tb, start_q + m_block + HALF * WG_M, h * HEAD_DIM], q_bar, q_smem)
    it = 0
    n_done = 0
    fixes = 0
    turns = 0
    # V rows of one KV head are num_heads_kv · HEAD_DIM elements apart (the non-finite slow path reads them)
    num_heads_kv = num_heads_q // group_size
    kv_stride = num_heads_kv * HEAD_DIM
    for tile in range(first, num_tiles, step):
        b, h, m_block = _tile_coords(tile, batch, num_heads_q, seqlen_q, section, BLOCK_M)
        m0 = m_block + HALF * WG_M
        # this sequence's lengths: the mask, the diagonal and the slow path's rows use them; the tensor's rows
        # (tb, start) only address memory
        len_q, len_k, tb, start_q, start_k = _lengths(b, lens_q_ptr, lens_k_ptr, seqlen_q, seqlen_k, rows_q, rows_k,
                                                      HAS_SEQLENS, IS_PACKED)  # fmt: skip
        v_base = ((tb.to(gl.int64) * rows_k + start_k) * num_heads_kv + h // group_size) * HEAD_DIM
        slope = _alibi_slope(alibi_ptr, stride_ab, stride_ah, b, h, qk_scale, ALIBI, HAS_SOFTCAP)
        item_scale = qk_scale
        if FP8:
            # descales [3, B, Hkv] (q, k, v): query head h uses its KV head's; Q·Kᵀ's two go into the score scale,
            # V's into the epilogue
            d_off = b * num_heads_kv + h // group_size
            n_desc = batch * num_heads_kv
            item_scale = qk_scale * gl.load(descale_ptr + d_off) * gl.load(descale_ptr + n_desc + d_off)
            v_scale = gl.load(descale_ptr + 2 * n_desc + d_off)
        diag = len_k - len_q
        lo, full_lo, full_hi, hi = _key_ranges(m_block, len_q, len_k, window_left, window_right,
                                               HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, BLOCK_M, BLOCK_N)  # fmt: skip
        mbarrier.wait(q_bar, n_done & 1)
        q = q_smem.reshape([WG_M, HEAD_DIM])
        offs_m = m0 + gl.arange(0, WG_M, layout=gl.SliceLayout(1, s_layout))
        m_i = gl.full([WG_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([WG_M], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([WG_M, HEAD_DIM], gl.float32, o_layout)
        # masked tiles on a window's left edge, unmasked tiles, masked tiles along the diagonal and the end.
        # OVERLAP 2 overlaps the unmasked range only: the guard's slow path beside a second score tile made the
        # overlapped masked loop spill (748 bytes at causal D128, 44 this way: bench/probes/gluon_sass.py), and
        # a causal block has one or two masked tiles, so their overlap is worth little
        # OVERLAP 3 ping-pongs the two consumers over the unmasked range (`_tiles`' mode 2) and runs the masked
        # tiles serially
        OVERLAP_MASKED: gl.constexpr = 1 if OVERLAP == 1 else 0
        OVERLAP_FULL: gl.constexpr = 2 if OVERLAP == 3 and CONSUMERS == 2 else (1 if OVERLAP != 0 else 0)
        acc, m_i, l_i, it, fixes, turns = _tiles(
            q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, acc, m_i, l_i, it, fixes, fix_bar, turns, turn_bars, v_ptr,
            v_base, kv_stride, lo, full_lo, offs_m, diag, len_k, item_scale, cap_log2, slope, window_left,
            window_right, MASKED, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SOFTCAP, ALIBI, OVERLAP_MASKED, HALF,
            CONSUMERS, WG_M, BLOCK_N, HEAD_DIM, s_layout, o_layout, p_layout)  # fmt: skip
        acc, m_i, l_i, it, fixes, turns = _tiles(
            q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, acc, m_i, l_i, it, fixes, fix_bar, turns, turn_bars, v_ptr,
            v_base, kv_stride, full_lo, full_hi, offs_m, diag, len_k, item_scale, cap_log2, slope, window_left,
            window_right, False, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SOFTCAP, ALIBI, OVERLAP_FULL, HALF,
            CONSUMERS, WG_M, BLOCK_N, HEAD_DIM, s_layout, o_layout, p_layout)  # fmt: skip
        acc, m_i, l_i, it, fixes, turns = _tiles(
            q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, acc, m_i, l_i, it, fixes, fix_bar, turns, turn_bars, v_ptr,
            v_base, kv_stride, full_hi, hi, offs_m, diag, len_k, item_scale, cap_log2, slope, window_left,
            window_right, MASKED, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SOFTCAP, ALIBI, OVERLAP_MASKED, HALF,
            CONSUMERS, WG_M, BLOCK_N, HEAD_DIM, s_layout, o_layout, p_layout)  # fmt: skip
        n_done += 1

        # every product that read Q has completed (the last wait): the next item's Q can come in already
        nxt = tile + step
        if nxt < num_tiles:
            nb, nh, nm = _tile_coords(nxt, batch, num_heads_q, seqlen_q, section, BLOCK_M)
            _, _, ntb, nstart, _ = _lengths(nb, lens_q_ptr, lens_k_ptr, seqlen_q, seqlen_k, rows_q, rows_k,
                                            HAS_SEQLENS, IS_PACKED)  # fmt: skip
            mbarrier.expect(q_bar, q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [ntb, nstart + nm + HALF * WG_M, nh * HEAD_DIM], q_bar, q_smem)

        # rows that saw no key have l = 0 and acc = 0: dividing by 1 leaves their zeros; rows past the sequence's
        # length (seqlens_q; computed from whatever the padding holds) are zeros by definition
        has_key = (l_i > 0.0) & (offs_m < len_q)
        l_safe = gl.where(has_key, l_i, 1.0)
        if FP8:
            inv_l = v_scale / l_safe
        else:
            inv_l = 1.0 / l_safe
        out = acc * gl.expand_dims(gl.convert_layout(inv_l, gl.SliceLayout(1, o_layout)), 1)
        if HAS_SEQLENS:
            out = gl.where(gl.expand_dims(gl.convert_layout(has_key, gl.SliceLayout(1, o_layout)), 1), out, 0.0)
        # straight from the accumulator's registers to global memory (no staging buffer: its 32 KB buy the
        # third K/V stage at D 128); rows past Sq are masked
        rows = gl.convert_layout(offs_m, gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        row_off = ((tb.to(gl.int64) * rows_q + start_q + rows) * num_heads_q + h) * HEAD_DIM
        o_ptrs = o_ptr + gl.expand_dims(row_off, 1) + gl.expand_dims(cols, 0)
        # padded: every row of the tensor (zeros past len_q); packed: this sequence's rows only (the rest of the
        # block belongs to the next sequences)
        if IS_PACKED:
            row_end = len_q
        else:
            row_end = seqlen_q + b * 0
        gl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=gl.expand_dims(rows < row_end, 1))
        if STORE_LSE:
            # m is in log2 units (scaled); ln(sum exp(s)) = (m + log2 l) · ln 2
            lse = (m_i + gl.log2(l_safe)) * 0.6931471805599453
            lse = gl.where(has_key, lse, float("-inf"))
            # padded [B, Hq, Sq]; packed [Hq, Tq] (stride_lb = 0, rows from start_q)
            ptrs = lse_ptr + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + start_q + offs_m
            gl.store(ptrs, lse, mask=offs_m < row_end)


# lengths, window sizes and head counts stay runtime values: one compiled variant per feature set, not one per
# length's divisibility by 16 (each variant takes seconds of ptxas)
@gluon.jit(do_not_specialize=["stride_ab", "stride_ah", "stride_lb", "stride_lh", "batch", "num_heads_q", "section",
                              "group_size", "seqlen_q", "seqlen_k", "rows_q", "rows_k", "window_left",
                              "window_right"])  # fmt: skip
def _attn_fwd_gluon(q_desc, k_desc, v_desc, o_ptr, v_ptr, lse_ptr, lens_q_ptr, lens_k_ptr, alibi_ptr, descale_ptr,
                    stride_ab,
                    stride_ah, stride_lb, stride_lh, batch, num_heads_q, section, group_size, seqlen_q, seqlen_k,
                    rows_q, rows_k, qk_scale, cap_log2, window_left, window_right, HAS_SEQLENS: gl.constexpr,
                    IS_PACKED: gl.constexpr, HAS_WINDOW_LEFT: gl.constexpr, HAS_WINDOW_RIGHT: gl.constexpr,
                    HAS_SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, STORE_LSE: gl.constexpr, OVERLAP: gl.constexpr,
                    CONSUMERS: gl.constexpr, GUARD_HIDDEN: gl.constexpr, BLOCK_N: gl.constexpr,
                    HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """Grid: one program per work item (row block of one (b, h)), or persistent: fewer programs, each taking
    items program_id, program_id + grid, ... (`_tile_coords` orders them longest first)."""
    # each consumer owns WG_M rows (the Q descriptor's block); a work item's row block is CONSUMERS of them
    WG_M: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = WG_M * CONSUMERS

    dtype: gl.constexpr = q_desc.dtype
    q_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # kv_empty[s]: K stage s is free; kv_empty[STAGES + s]: V stage s is free
    kv_empty = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
    # the consumers' rendezvous in the non-finite slow path (`_hidden_values_out`): one arrival per partition
    fix_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(fix_bar, count=CONSUMERS)
    # OVERLAP 3 (ping-pong): turn_bars[h] completes a phase when the other consumer has issued its products
    # (`_tiles`' mode 2); one arrival per partition
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(turn_bars.index(0), count=1)
    mbarrier.init(turn_bars.index(1), count=1)
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(q_bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        # a stage is free again once every consumer partition has arrived (one elected thread each)
        mbarrier.init(kv_empty.index(i), count=CONSUMERS)
        mbarrier.init(kv_empty.index(STAGES + i), count=CONSUMERS)

    # (the partitions' argument lists are spelled out: one shared tuple plus each HALF does not compile in
    # triton 3.6, whose tuples built in a kernel turn their constexpr elements into tensors)
    if CONSUMERS == 2:
        # FA3's layout: two 4-warp consumer partitions (warpgroups) that synchronize only through the ring's
        # barriers, so one's softmax can run while the other's products hold the tensor cores, and a 1-warp
        # producer. The default partition gets the registers the other two leave: (168·12 − 240·4 − 24·4) / 4.
        gl.warp_specialize(
            [
                (_consumer, (q_desc, o_ptr, q_bufs, q_bars, k_bufs, v_bufs, k_ready, v_ready, kv_empty, fix_bar,
                             turn_bars, v_ptr, lse_ptr, lens_q_ptr, lens_k_ptr, alibi_ptr, descale_ptr, stride_ab,
                             stride_ah, stride_lb, stride_lh, batch, num_heads_q,
                             section, group_size, seqlen_q, seqlen_k, rows_q, rows_k, qk_scale, cap_log2,
                             window_left, window_right, HAS_SEQLENS, IS_PACKED, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
                             HAS_SOFTCAP, ALIBI, STORE_LSE, OVERLAP, GUARD_HIDDEN, BLOCK_M, WG_M, BLOCK_N, HEAD_DIM,
                             0)),
                (_consumer, (q_desc, o_ptr, q_bufs, q_bars, k_bufs, v_bufs, k_ready, v_ready, kv_empty, fix_bar,
                             turn_bars, v_ptr, lse_ptr, lens_q_ptr, lens_k_ptr, alibi_ptr, descale_ptr, stride_ab,
                             stride_ah, stride_lb, stride_lh, batch, num_heads_q,
                             section, group_size, seqlen_q, seqlen_k, rows_q, rows_k, qk_scale, cap_log2,
                             window_left, window_right, HAS_SEQLENS, IS_PACKED, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
                             HAS_SOFTCAP, ALIBI, STORE_LSE, OVERLAP, GUARD_HIDDEN, BLOCK_M, WG_M, BLOCK_N, HEAD_DIM,
                             1)),
                (_producer, (k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, kv_empty, lens_q_ptr,
                             lens_k_ptr, batch, num_heads_q, section, group_size, seqlen_q, seqlen_k, rows_q, rows_k,
                             window_left, window_right, HAS_SEQLENS, IS_PACKED, HAS_WINDOW_LEFT,
                             HAS_WINDOW_RIGHT, BLOCK_M, BLOCK_N, HEAD_DIM)),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )  # fmt: skip
    else:
        # one 8-warp consumer partition over 128 rows (each of its warpgroups issues the wgmma of its 64 rows);
        # its shared-memory and barrier operations synchronize all 8 warps (bar.sync 0, 256), so the two
        # warpgroups move in lockstep
        gl.warp_specialize(
            [
                (_consumer, (q_desc, o_ptr, q_bufs, q_bars, k_bufs, v_bufs, k_ready, v_ready, kv_empty, fix_bar,
                             turn_bars, v_ptr, lse_ptr, lens_q_ptr, lens_k_ptr, alibi_ptr, descale_ptr, stride_ab,
                             stride_ah, stride_lb, stride_lh, batch, num_heads_q,
                             section, group_size, seqlen_q, seqlen_k, rows_q, rows_k, qk_scale, cap_log2,
                             window_left, window_right, HAS_SEQLENS, IS_PACKED, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
                             HAS_SOFTCAP, ALIBI, STORE_LSE, OVERLAP, GUARD_HIDDEN, BLOCK_M, WG_M, BLOCK_N, HEAD_DIM,
                             0)),
                (_producer, (k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, kv_empty, lens_q_ptr,
                             lens_k_ptr, batch, num_heads_q, section, group_size, seqlen_q, seqlen_k, rows_q, rows_k,
                             window_left, window_right, HAS_SEQLENS, IS_PACKED, HAS_WINDOW_LEFT,
                             HAS_WINDOW_RIGHT, BLOCK_M, BLOCK_N, HEAD_DIM)),
            ],
            [1],
            [PRODUCER_REGS],
        )  # fmt: skip


def _descriptor(x: torch.Tensor, rows: int, head_dim: int) -> TensorDescriptor:
    """A TMA descriptor over ``x [B, S, H, D]`` seen as ``[B, S, H·D]``: one block is ``rows`` positions of one
    head; rows past S (of this sequence, not the next) come back as zeros and stores to them are dropped."""
    b, s, h, d = x.shape
    dtype = _GL_DTYPES[x.dtype]
    block = [1, rows, head_dim]
    layout = gl.NVMMASharedLayout.get_default_for(block, dtype)
    return TensorDescriptor(x, [b, s, h * d], [s * h * d, h * d, 1], block, layout)


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float8_e4m3fn: gl.float8e4nv}


def _fp8_vt(v: torch.Tensor) -> torch.Tensor:
    """FP8 ``V [B, Sk, Hkv, D]`` as the kernel reads it: ``Vᵀ [B, Hkv, D, S']``, S' = Sk rounded up to 32 (zeros
    past Sk), with the keys of every 32 in `_relabel_p`'s order: column 32s + 16h + 4t + 2e + i holds key
    32s + 16h + 8e + 2t + i. One copy (two where Sk is not a multiple of 32), done as bytes."""
    b, sk, hkv, d = v.shape
    s_pad = -(-sk // 32) * 32
    x = v.view(torch.uint8)
    if s_pad != sk:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, s_pad - sk))
    x = x.view(b, s_pad // 32, 2, 2, 4, 2, hkv, d)  # keys (s, h, e, t, i)
    return x.permute(0, 6, 7, 1, 2, 4, 3, 5).reshape(b, hkv, d, s_pad).view(v.dtype)  # columns (s, h, t, e, i)


def _descriptor_vt(vt: torch.Tensor, block_n: int) -> TensorDescriptor:
    """A TMA descriptor over `_fp8_vt`'s ``[B, Hkv, D, S']`` seen as ``[B, Hkv·D, S']``: one block is the D feature
    rows of one head over ``block_n`` key columns; columns past S' come back as zeros."""
    b, h, d, s_pad = vt.shape
    block = [1, d, block_n]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv)
    return TensorDescriptor(vt, [b, h * d, s_pad], [h * d * s_pad, s_pad, 1], block, layout)


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 132  # a CPU compile (bench/probes/gluon_sass.py): the grid is not used
    if device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


_SMS: dict = {}


def l2_section(batch, num_heads_q, group_size, seqlen_k, head_dim, itemsize, l2_bytes=L2_SECTION_BYTES) -> int:
    """How many adjacent (b, h) pairs one section of the schedule holds (`_tile_coords`): as many whole GQA
    groups as have K and V within ``l2_bytes`` together, at least one group; ``None``: one section of all B·H
    (the order before sections: all heads of a row block together)."""
    num_bh = batch * num_heads_q
    if l2_bytes is None:
        return num_bh
    kv_head_bytes = 2 * max(seqlen_k, 1) * head_dim * itemsize
    return min(num_bh, group_size * max(1, l2_bytes // kv_head_bytes))


def launch_args(q, k, v, out, lse, *, scale, window_left, window_right, softcap, overlap=True, consumers=2,
                persistent=True, block_n=128, l2_bytes=L2_SECTION_BYTES, seqlens_q=None, seqlens_k=None,
                cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, alibi_slopes=None,
                alibi_with_scale=False, guard_hidden=True, v_t=None, descales=None):  # fmt: skip
    """The grid and the arguments of `_attn_fwd_gluon` (shared by `attention_gluon`, `attention_fp8_gluon` and
    bench/probes/gluon_sass.py). FP8 (float8_e4m3fn q, k, v; padded, no lengths, causal or full): ``v_t`` is
    ``_fp8_vt(v)`` and ``descales`` float32 ``[3, B, Hkv]`` (q, k, v), contiguous.
    Padded ``q [B, Sq, Hq, D]`` (optionally ``seqlens_q/k``), or packed ``q [Tq, Hq, D]`` with ``cu_seqlens_q/k``
    and ``max_seqlen_q/k`` (the row blocks per sequence and the L2 sections are sized by them). ALiBi:
    float32 ``alibi_slopes`` ``[Hq]`` or ``[B, Hq]`` (any strides), added after scaling and capping, or to the raw
    product with ``alibi_with_scale``. ``overlap``: True (the next tile's Q·Kᵀ issued before this tile's softmax, in
    every key range), False (never), "unmasked" (in the unmasked range only) or "pingpong" (the two consumers take
    turns to issue their products over the unmasked range, FA3's inter-warpgroup ping-pong; masked tiles
    serial; needs ``consumers=2``). The default is True; on an H100 "unmasked" ran at 0.89-1.00x of it and
    "pingpong" at 0.83-0.94x (bf16, 0.85-0.90x FP8) at S >= 4096 (bench/NOTES.md, session 13)."""
    if overlap not in (True, False, "unmasked", "pingpong"):
        raise ValueError(f"overlap must be True, False, 'unmasked' or 'pingpong', got {overlap!r}")
    if overlap == "pingpong" and consumers != 2:
        raise ValueError(f"overlap='pingpong' needs consumers=2, got {consumers}")
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed:
        if cu_seqlens_q is None or cu_seqlens_k is None or max_seqlen_q is None or max_seqlen_k is None:
            raise ValueError("packed input needs cu_seqlens_q, cu_seqlens_k, max_seqlen_q and max_seqlen_k")
        if seqlens_q is not None or seqlens_k is not None:
            raise ValueError("seqlens_q/k belong to the padded layout; packed input uses cu_seqlens")
        # the packed tensors seen as one batch entry of [1, T, H, D]: TMA bounds are the whole packed length
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        batch, seqlen_q, seqlen_k = cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k
        lens_q, lens_k = cu_seqlens_q, cu_seqlens_k
        # lse [Hq, Tq]: no batch stride, rows from cu_seqlens_q[b]
        lse_strides = (0, lse.stride(0)) if lse is not None else (0, 0)
    else:
        if (seqlens_q is None) != (seqlens_k is None):
            raise ValueError("seqlens_q and seqlens_k go together here (attn.attention fills the missing one)")
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        lens_q, lens_k = seqlens_q, seqlens_k
        lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    rows_q, rows_k = q.shape[1], k.shape[1]
    if alibi_slopes is None:
        alibi, alibi_strides, alibi_mode = out, (0, 0), 0
    else:
        alibi = alibi_slopes
        alibi_strides = (0, alibi.stride(0)) if alibi.dim() == 1 else (alibi.stride(0), alibi.stride(1))
        alibi_mode = 2 if alibi_with_scale else 1
    num_heads_q, head_dim = q.shape[2], q.shape[3]
    num_heads_kv = k.shape[2]
    fp8 = q.dtype == torch.float8_e4m3fn
    if fp8 and (v_t is None or descales is None or packed or lens_q is not None or alibi_slopes is not None
                or softcap > 0 or window_left >= 0 or lse is not None):  # fmt: skip
        raise ValueError("the FP8 variant takes padded input, causal or full, with v_t and descales only")
    block_m, stages = BLOCK_M, _stages(head_dim, block_n, q.element_size())
    wg_m = block_m // consumers
    if softcap > 0:
        qk_scale, cap_log2 = scale / softcap, softcap * LOG2E
    else:
        qk_scale, cap_log2 = scale * LOG2E, 0.0
    args = (
        _descriptor(q, wg_m, head_dim), _descriptor(k, block_n, head_dim),
        _descriptor_vt(v_t, block_n) if fp8 else _descriptor(v, block_n, head_dim),
        out, v, lse if lse is not None else out,
        lens_q if lens_q is not None else out, lens_k if lens_k is not None else out, alibi,
        descales if fp8 else out, *alibi_strides,
        *lse_strides, batch, num_heads_q,
        l2_section(batch, num_heads_q, num_heads_q // num_heads_kv, seqlen_k, head_dim, q.element_size(), l2_bytes),
        num_heads_q // num_heads_kv, seqlen_q, seqlen_k, rows_q, rows_k, qk_scale, cap_log2, window_left,
        window_right,
    )  # fmt: skip
    constexprs = dict(
        HAS_SEQLENS=lens_q is not None and not packed, IS_PACKED=packed, HAS_WINDOW_LEFT=window_left >= 0,
        HAS_WINDOW_RIGHT=window_right >= 0, HAS_SOFTCAP=softcap > 0, ALIBI=alibi_mode, GUARD_HIDDEN=guard_hidden,
        STORE_LSE=lse is not None, OVERLAP={False: 0, True: 1, "unmasked": 2, "pingpong": 3}[overlap],
        CONSUMERS=consumers, BLOCK_N=block_n,
        HEAD_DIM=head_dim, STAGES=stages, num_warps=8 // consumers, maxnreg=MAXNREG,
    )  # fmt: skip
    # one CTA per SM fits (224 KB of shared memory, 384 threads at 168 registers): a persistent grid is one
    # program per SM, each walking work items longest first; otherwise one program per item
    items = triton.cdiv(seqlen_q, block_m) * batch * num_heads_q
    grid = (min(items, _num_sms(q.device)) if persistent else items,)
    return grid, args, constexprs


def attention_gluon(q, k, v, *, scale, window_left=-1, window_right=-1, softcap=0.0, return_lse=False,
                    overlap=True, consumers=2, persistent=True, block_n=128, l2_bytes=L2_SECTION_BYTES,
                    seqlens_q=None, seqlens_k=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                    max_seqlen_k=None, alibi_slopes=None, alibi_with_scale=False, guard_hidden=True):  # fmt: skip
    """The Gluon kernel on checked arguments (`attn.fast.attention.attention` checks them and calls this when
    `gluon_supported` and ``ATTN_GLUON=1``). Padded ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]`` with optional
    ``seqlens_q/k`` int32 ``[B]`` (both or neither), or packed ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]`` with
    ``cu_seqlens_q/k`` int32 ``[B+1]`` and ``max_seqlen_q/k``; contiguous. ALiBi: float32 ``alibi_slopes``
    ``[Hq]`` or ``[B, Hq]``, ``alibi_with_scale`` as `attn.attention`'s ``alibi_mode``. ``guard_hidden=False``
    drops the masked tiles' non-finite check (a non-finite V value in a hidden key then reaches the output,
    against SPEC): only for benchmarking what the check costs (bench_gluon's ``gluon_noguard``)."""
    packed = cu_seqlens_q is not None
    out = torch.empty_like(q)
    lse = None
    if return_lse:
        shape = (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])
        lse = torch.empty(shape, dtype=torch.float32, device=q.device)
    grid, args, constexprs = launch_args(q, k, v, out, lse, scale=scale, window_left=window_left,
                                         window_right=window_right, softcap=softcap, overlap=overlap,
                                         consumers=consumers, persistent=persistent, block_n=block_n,
                                         l2_bytes=l2_bytes, seqlens_q=seqlens_q, seqlens_k=seqlens_k,
                                         cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                         max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                         alibi_slopes=alibi_slopes, alibi_with_scale=alibi_with_scale,
                                         guard_hidden=guard_hidden)  # fmt: skip
    if grid[0] == 0:
        # no row blocks (max_seqlen_q = 0 or no sequences): nothing to compute, zeros and -inf by definition
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
    else:
        _attn_fwd_gluon[grid](*args, **constexprs)
    return (out, lse) if return_lse else out


def attention_fp8_gluon(q, k, v, descales, *, scale, causal, out_dtype=torch.bfloat16, out=None, overlap=True,
                        consumers=2, persistent=True, block_n=128):  # fmt: skip
    """FP8 prefill on the Gluon kernel (`attn.fast.fp8_prefill.attention_fp8` checks the arguments and calls this
    on sm_90 where `fp8_supported`, by default where `fp8_default`, always with ``ATTN_GLUON=1``):
    ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]`` float8_e4m3fn, contiguous, ``descales`` float32 ``[3, B, Hkv]``
    (q, k, v), written into ``out`` (``[B, Sq, Hq, D]``) or a new tensor of ``out_dtype``. The numerics are
    `attn.reference.fp8_attention`'s, as in the ``tl.*`` FP8 kernel: both products on the FP8 tensor cores, P as
    e4m3(p · 256).

    V is transposed once per call into ``[B, Hkv, D, S']`` (`_fp8_vt`; part of the call's time: B·Sk·Hkv·D bytes
    read and written), because FP8 wgmma reads its B operand from shared memory only with the reduction
    dimension (here the keys) contiguous; the same copy puts the keys in the order P's registers hold them."""
    v_t = _fp8_vt(v)
    if out is None:
        out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    grid, args, constexprs = launch_args(q, k, v, out, None, scale=scale, window_left=-1,
                                         window_right=0 if causal else -1, softcap=0.0, overlap=overlap,
                                         consumers=consumers, persistent=persistent, block_n=block_n, v_t=v_t,
                                         descales=descales)  # fmt: skip
    _attn_fwd_gluon[grid](*args, **constexprs)
    return out


# Where FP8 prefill runs on the Gluon kernel by default on sm_90 (ATTN_GLUON unset). Measured basis: H100,
# session 11 (bench/results/fp8prefill_H100_2026-12-07_s11.json, one process), TFLOP/s of the Gluon FP8 kernel
# against the tl.* FP8 kernel (fp8_prefill.py), both through attention_fp8:
#   B4 H32 S4096 D128 causal             440 vs 357   1.23x
#   B4 H32 S4096 D128 full               644 vs 473   1.36x
#   B1 H32 S16384 D128 causal            756 vs 550   1.37x
#   B4 H32/8 S4096 D128 causal (GQA 4)   633 vs 497   1.27x
#   B8 H32 S4096 D64 causal              331 vs 264   1.25x
# Every row wins; shorter sequences are not measured (the bf16 kernel lost at S1024), so the same rule as
# `gluon_default`: Sq = Sk >= 4096.
def fp8_default(*, seqlen_q: int, seqlen_k: int) -> bool:
    """Whether an FP8 prefill call that `fp8_supported` covers runs on the Gluon kernel by default."""
    return seqlen_q == seqlen_k >= DEFAULT_MIN_SEQLEN


def fp8_supported(q, k, v) -> bool:
    """Whether an FP8 prefill call can run on the Gluon kernel: sm_90, D in {64, 128}, contiguous 16-byte-aligned
    tensors whose rows TMA can address, and something to compute (empty calls stay with the ``tl.*`` wrapper)."""
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.shape[-1] not in HEAD_DIMS or q.numel() == 0 or k.numel() == 0:
        return False
    return all(x.is_contiguous() and x.data_ptr() % 16 == 0 for x in (q, k, v))
