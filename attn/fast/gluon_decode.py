"""One-byte (INT8 / FP8 e4m3) decode in Gluon: V reaches the tensor cores without passing through shared memory.

Why a second decode kernel. Decode reads the whole cache for a few query rows, so a one-byte cache should run
at up to twice the speed of a 16-bit one. The ``tl.*`` kernel (`attn.fast.decode`) stops near 1.4-1.6x: Triton
stages every tile in shared memory and reads V back in the layout of the P·V product, where each thread needs
*two keys of the same feature* in one register (the product reduces over keys, while the cache stores each
key's features contiguously). For 16-bit values ``ldmatrix.trans`` does that transpose; for bytes nothing does,
and V leaves shared memory one byte per instruction (bench/NOTES.md, sessions 5-6: 51% of issue slots, the loop
bound by instructions, not bytes).

The idea here: **which key and which feature a register holds is ours to choose.** An ``mma.m16n8k16``
computes ``Σ_k A[m, k]·B[k, n]``; permuting the k index the same way in A and B changes nothing, and permuting
B's n index permutes the output's columns, which the store undoes. So each operand is loaded straight from
global memory in a layout where every thread reads long contiguous runs (32 bytes of one key for K, 16 bytes
of four consecutive keys for V), and then *relabelled* — a reshape into single bits, a permutation of those
bits, a reshape back — so that Triton sees exactly the mma operand layout. ``convert_layout(...,
assert_trivial=True)`` proves at compile time that the relabelled tensor needs no data movement: no shared
memory, no shuffles (bench/probes/gluon_decode_sass.py checks the compiled kernel).

Structure. One warp per program; a program owns a chunk of one (sequence, KV head) pair's cache (split-K) and
its ``G = Hq / Hkv`` query heads as the rows of the products (padded to 16). Per 16-key tile: K and V as int8 or
e4m3 codes into registers; codes widened to fp16 in registers (INT8 by FasterTransformer's integer trick, four
codes in five instructions; e4m3 by ``cvt.f16x2.e4m3x2``); Q·Kᵀ on the tensor cores, the online softmax, P·V on
the tensor cores. Loads reach the registers one of two ways (which is faster is for bench/bench_decode_1b.py to
say): straight from global memory, two tiles per loop iteration so that the second tile's loads are in flight
during the first's products (``STEP_TILES``), or through a cp.async ring of 3-4 tiles in shared memory, each lane
copying and later reading back its own bytes (``RING_STAGES``). Many one-warp programs share an SM, which hides
the rest of the memory latency. The last program of each pair to finish merges the pair's partials, as the
``tl.*`` kernel does (one launch per call).

Covered: Sq = 1, fp16/bf16 queries, INT8 and FP8 caches with ``[1]`` or ``[Hkv]`` scales, contiguous and paged
caches whose pages hold a multiple of 16 tokens, D in {64, 128}, GQA groups up to 64, sliding windows
(``window_size``; a left window bounds the keys a new token sees), soft-capping, ``return_lse``, the
in-kernel clamps and error bits of `attn.fast._errors`. Everything else stays with the ``tl.*`` kernel:
see `supported`.

The numerics are the ``tl.*`` kernel's: products in fp16 with float32 accumulation (a bf16 query is exact in
fp16 within fp16's range, which is checked as there), the scores' K scale folded into the softmax scale, the V
scale applied to the output. A key past a sequence's end loads as 0 and scores -inf, so a non-finite code
there never reaches the output; a visible key's non-finite value does, as the reference gives it.
"""

from __future__ import annotations

import functools
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from . import _errors
from ._triton import INT8_TO_F16, launch
from .gluon_attention import _tanh

HEAD_DIMS = (64, 128)
# keys per tile: one m16n8k16 k-step of P·V
TILE_KEYS = 16
TILE = gl.constexpr(TILE_KEYS)
MAX_GROUP = 64
LENGTHS = gl.constexpr(_errors.LENGTHS)
BLOCK_TABLE = gl.constexpr(_errors.BLOCK_TABLE)
QUERY_RANGE = gl.constexpr(_errors.QUERY_RANGE)


# ---------------------------------------------------------------------------------------------------------------
# The relabelling, on the host. A tile's index is written in bits; a "map" sends each logical bit (the index the
# mma layout means) to the physical bit (the index in memory) it is loaded from.
#
# mma.m16n8k16's operand layouts, one warp (Triton's linear layouts; print them with gl.to_linear_layout):
#   Q·Kᵀ's B = Kᵀ [d, key]: registers hold d bits 0, 3, 4, ... and key bit 3; lanes d bits 1, 2, key bits 0-2
#   P·V's  B = V  [key, d]: registers hold key bits 0, 3 and d bits 3, 4, ...; lanes key bits 1, 2, d bits 0-2
#   P·V's  C = O  [row, d]: d bits 0, 3, 4, ... in registers, 1, 2 in lanes (the columns of the output)
# Physical loads want a thread's registers to cover consecutive addresses: so each map sends the bits a thread
# holds in registers to the lowest physical bits, in register order, and the lane bits above them.
# ---------------------------------------------------------------------------------------------------------------


def _bits(n: int) -> int:
    return n.bit_length() - 1


def key_map() -> list[int]:
    """Logical key bit -> physical key bit, shared by K and V (P's columns are Q·Kᵀ's, and P·V reduces over
    them, so both must read key n from the same row): a V thread's registers hold logical keys bits 0 and 3,
    which become physical bits 0 and 1 (four consecutive rows per thread), its lane bits 1, 2 physical 2, 3."""
    return [0, 2, 3, 1]


def k_dim_map(head_dim: int) -> list[int]:
    """Kᵀ's logical d bit -> physical d bit: register bits 0, 3, 4, ... -> 0, 1, 2, ...; lane bits 1, 2 on top.
    A thread then holds ``head_dim / 4`` consecutive features of one key (32 bytes at D 128)."""
    nb = _bits(head_dim)
    regs = [0] + list(range(3, nb))
    m = [0] * nb
    for phys, logical in enumerate(regs):
        m[logical] = phys
    m[1], m[2] = nb - 2, nb - 1
    return m


def v_dim_map(head_dim: int) -> list[int]:
    """V's (and the output's) logical d bit -> physical: register bits 3, 4, ... -> 0, 1, ...; lane bits 0, 1, 2
    on top. A thread holds ``head_dim / 8`` consecutive features of each of its four keys (16 bytes at D 128)."""
    nb = _bits(head_dim)
    m = [0] * nb
    for phys, logical in enumerate(range(3, nb)):
        m[logical] = phys
    m[0], m[1], m[2] = nb - 3, nb - 2, nb - 1
    return m


def _relabel_perm(dim_maps: list[list[int]]) -> tuple[int, ...]:
    """The axes permutation that turns a tensor reshaped into single bits (row-major: each dimension's most
    significant bit first), indexed physically, into one indexed logically, given each dimension's map."""
    offsets, off = [], 0
    for m in dim_maps:
        offsets.append(off)
        off += len(m)
    perm = []
    for m, o in zip(dim_maps, offsets):
        nb = len(m)
        # logical axis i holds logical bit nb-1-i, read from the physical axis of bit m[nb-1-i]
        perm += [o + nb - 1 - m[nb - 1 - i] for i in range(nb)]
    return tuple(perm)


def phys_index(logical: int, m: list[int]) -> int:
    """The physical index a logical index is loaded from (host-side mirror of the kernel's arithmetic)."""
    return sum(((logical >> i) & 1) << m[i] for i in range(len(m)))


def _linear(reg, lane, shape):
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=[], block_bases=[], shape=shape)


@functools.cache
def layouts(head_dim: int, block_m: int) -> dict:
    """The kernel's layouts and relabelling permutations for one head dim and row count."""
    nb = _bits(head_dim)
    kd, vd, km = k_dim_map(head_dim), v_dim_map(head_dim), key_map()
    # physical [d, key] tile for Kᵀ: the mma B layout with every basis's coordinates sent through the maps
    #   registers: logical d bits 0, 3, 4, ... (physical 0, 1, ...), then key bit 3 (physical 1)
    #   lanes: d bits 1, 2 (physical nb-2, nb-1), key bits 0, 1, 2 (physical 0, 2, 3)
    k_reg = [[1 << kd[b], 0] for b in [0] + list(range(3, nb))] + [[0, 1 << km[3]]]
    k_lane = [[1 << kd[1], 0], [1 << kd[2], 0]] + [[0, 1 << km[b]] for b in (0, 1, 2)]
    # physical [key, d] tile for V, d bits first (the loads' contiguous run), then key bits 0, 3
    v_reg = [[0, 1 << vd[b]] for b in range(3, nb)] + [[1 << km[0], 0], [1 << km[3], 0]]
    v_lane = [[1 << km[1], 0], [1 << km[2], 0]] + [[0, 1 << vd[b]] for b in (0, 1, 2)]
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    return {
        "LK": _linear(k_reg, k_lane, [head_dim, TILE_KEYS]),
        "LV": _linear(v_reg, v_lane, [TILE_KEYS, head_dim]),
        # Q [rows, d]: any layout (read once, and convert_layout moves it into the A operand's)
        "LQ": gl.BlockedLayout([1, max(head_dim // 32, 1)], [1, 32], [1, 1], [1, 0]),
        # the merge's [splits, d] tiles
        "LM": gl.BlockedLayout([1, max(head_dim // 32, 1)], [1, 32], [1, 1], [1, 0]),
        "MMA": mma,
        "K_BITS": tuple([2] * (nb + 4)),
        "K_PERM": _relabel_perm([kd, km]),
        "V_BITS": tuple([2] * (4 + nb)),
        "V_PERM": _relabel_perm([km, vd]),
        "Q_BITS": tuple([block_m] + [2] * nb),
        # Q's d is Kᵀ's d (the reduction of Q·Kᵀ): the same permutation of its bits, after the row axis
        "Q_PERM": (0,) + tuple(1 + p for p in _relabel_perm([kd])),
    }


# ---------------------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit
def _relabel(x, BITS: gl.constexpr, PERM: gl.constexpr, SHAPE0: gl.constexpr, SHAPE1: gl.constexpr):
    """The same registers, indexed logically: reshape into bits, permute them, reshape back."""
    return gl.reshape(gl.permute(gl.reshape(x, BITS.value), PERM.value), [SHAPE0, SHAPE1])


@gluon.jit
def _widen(x, QUANT: gl.constexpr):
    """Codes to fp16, exactly (int8: the integer trick, four per call; e4m3: the hardware's pair conversion)."""
    if QUANT == 1:
        return gl.inline_asm_elementwise(INT8_TO_F16, "=r,=r,r", [x], dtype=gl.float16, is_pure=True, pack=4)
    else:
        # the cache arrives viewed as int8 (its bytes), so that both formats load alike
        return x.to(gl.float8e4nv, bitcast=True).to(gl.float16)


@gluon.jit
def _key_phys(n):
    """The physical key of logical key ``n`` in a tile (`key_map`: bits 0, 1, 2, 3 -> 0, 2, 3, 1)."""
    return (n & 1) | (((n >> 1) & 1) << 2) | (((n >> 2) & 1) << 3) | (((n >> 3) & 1) << 1)


@gluon.jit
def _tile_block(start, hi, entry, pool_rows, b64, PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr):
    """Where the tile at ``start`` lies: (the block, int64, to multiply by the caches' first stride; the tile's
    first row within it; whether the block entry was out of range). Paged: one entry per tile (pages are a
    multiple of the tile), an entry outside the pool read as block 0. Contiguous: the sequence's own rows. Every
    row `_load_tile` reads from there lies inside the cache (``0 <= row0 < max(hi, 1)`` contiguous; within one
    page paged)."""
    if PAGED:
        # a tile past the range got entry 0 (`_entry`): block 0, and rows within it
        bad = ((entry < 0) | (entry >= pool_rows)) & (start < hi)
        return gl.where(bad, 0, entry).to(gl.int64), start % PAGE_SIZE, bad
    else:
        # a tile past the range (the last look-ahead) reads the range's last key, or row 0: never past the cache
        return b64, gl.minimum(start, gl.maximum(hi - 1, 0)), start < 0


@gluon.jit
def _tile_keys(n, start, first, hi, HAS_WINDOW: gl.constexpr):
    """The keys a tile at ``start`` reads, as offsets from its first row: key ``start + n`` itself where it is
    visible (``first <= key < hi``), else the nearest visible one (a window's hidden keys at the tile's start read
    key ``first``, keys at or past ``hi`` read ``hi - 1``), and offset 0 for a tile with no visible key. Every offset
    stays within the tile, so within its page and inside the cache."""
    if HAS_WINDOW:
        n = gl.maximum(n, first - start)
    return gl.minimum(n, gl.maximum(hi - 1 - start, 0))


@gluon.jit
def _load_tile(k_block, v_block, start, row0, first, hi, nk, nv, dk, dv, stride_kn, stride_vn,
               HAS_WINDOW: gl.constexpr):  # fmt: skip
    """The codes of the tile at ``start`` (Kᵀ ``[d, key]``, V ``[key, d]``, physical order), unmasked: a key
    outside ``[first, hi)`` reads the nearest visible key again (`_tile_keys`). Masked loads would have Triton
    select every byte on its own (an unpack and a repack of each word, ~40% more instructions in the loop);
    here the words go to the widening as loaded. A repeated key scores -inf (its column is masked) and weighs
    p = 0 in P·V; it is a visible key of the sequence, so a non-finite value in its V row is in the output
    anyway (every query row of a decode step sees the same keys), and 0·x adds nothing else. (A hidden key's own
    row is never read: its NaN would otherwise reach the output through 0·NaN.)"""
    k_rows = row0 + _tile_keys(nk, start, first, hi, HAS_WINDOW)
    v_rows = row0 + _tile_keys(nv, start, first, hi, HAS_WINDOW)
    k = gl.load(k_block + gl.expand_dims(k_rows, 0) * stride_kn + gl.expand_dims(dk, 1))
    v = gl.load(v_block + gl.expand_dims(v_rows, 1) * stride_vn + gl.expand_dims(dv, 0))
    return k, v


@gluon.jit
def _issue_tile(k_stage, v_stage, k_block, v_block, start, row0, first, hi, nk, nv, dk, dv, stride_kn,
                stride_vn, HAS_WINDOW: gl.constexpr):  # fmt: skip
    """`_load_tile`'s addresses, copied asynchronously (cp.async, 16 bytes each) into one stage of the ring.
    Each lane later reads back exactly the bytes it copied (the same layouts), so no barrier is needed."""
    k_rows = row0 + _tile_keys(nk, start, first, hi, HAS_WINDOW)
    v_rows = row0 + _tile_keys(nv, start, first, hi, HAS_WINDOW)
    async_copy.async_copy_global_to_shared(k_stage, k_block + gl.expand_dims(k_rows, 0) * stride_kn
                                           + gl.expand_dims(dk, 1))  # fmt: skip
    async_copy.async_copy_global_to_shared(v_stage, v_block + gl.expand_dims(v_rows, 1) * stride_vn
                                           + gl.expand_dims(dv, 0))  # fmt: skip
    async_copy.commit_group()


@gluon.jit
def _attend(q, k, v, start, first, hi, col_key, scale, m_i, l_i, acc, QUANT: gl.constexpr,
            HEAD_DIM: gl.constexpr, MMA: gl.constexpr, K_BITS: gl.constexpr, K_PERM: gl.constexpr,
            V_BITS: gl.constexpr, V_PERM: gl.constexpr, HAS_WINDOW: gl.constexpr, cap_log2,
            HAS_SOFTCAP: gl.constexpr):  # fmt: skip
    """One tile of codes (`_load_tile`) into the running softmax state: widen, relabel into the mma operands,
    Q·Kᵀ, the online softmax (log2 units), P·V."""
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    BLOCK_M: gl.constexpr = q.shape[0]
    kt = gl.convert_layout(_relabel(_widen(k, QUANT), K_BITS, K_PERM, HEAD_DIM, TILE), B_OP, assert_trivial=True)
    s = mma_v2(q, kt, gl.zeros([BLOCK_M, TILE], gl.float32, MMA)) * scale
    if HAS_SOFTCAP:
        # scale is then (softmax scale / softcap)·k_scale: softcap·tanh(s / softcap), in log2 units
        s = cap_log2 * _tanh(s)
    key = start + col_key
    visible = key < hi
    if HAS_WINDOW:
        visible &= key >= first
    s = gl.where(gl.expand_dims(visible, 0), s, float("-inf"))
    # the max drops NaN and exp2(NaN - m) does not, so a NaN score makes its row's l and acc NaN (SPEC); a row
    # with no visible key so far keeps m = -inf (subtract 0 then)
    m_new = gl.maximum(m_i, gl.max(s, 1))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(s - gl.expand_dims(m_safe, 1))
    l_i = l_i * alpha + gl.sum(p, 1)
    vt = gl.convert_layout(_relabel(_widen(v, QUANT), V_BITS, V_PERM, TILE, HEAD_DIM), B_OP, assert_trivial=True)
    # P's columns are Q·Kᵀ's: the accumulator layout of m16n8 is the A operand's of k16, no movement
    p_op = gl.convert_layout(p.to(gl.float16), A_OP, assert_trivial=True)
    acc = mma_v2(p_op, vt, acc * gl.expand_dims(alpha, 1))
    return m_new, l_i, acc


@gluon.jit
def _entry(table_row, start, hi, max_blocks, PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr):
    """The block-table entry of the tile at ``start`` (0 when the tile is past the chunk or not paged)."""
    if PAGED:
        page = start // PAGE_SIZE
        return gl.load(table_row + page, mask=(start < hi) & (page < max_blocks), other=0)
    else:
        return 0


@gluon.jit
def _decode_1b_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, part_ptr, count_ptr, seqlens_ptr, table_ptr, err_ptr, k_scale_ptr,
    v_scale_ptr,
    stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_ob, stride_oh,
    stride_lb, stride_lh, stride_bt,
    num_heads_kv, num_splits, min_chunk, len_cap, pool_rows, max_blocks, qk_scale, window_left, cap_log2,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, QUANT: gl.constexpr, Q_F16: gl.constexpr,
    PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, SPLIT_MERGE: gl.constexpr, STORE_LSE: gl.constexpr,
    HAS_WINDOW: gl.constexpr, HAS_SOFTCAP: gl.constexpr, STEP: gl.constexpr, STAGES: gl.constexpr, SMEM_K: gl.constexpr,
    SMEM_V: gl.constexpr, LK: gl.constexpr, LV: gl.constexpr, LQ: gl.constexpr, LM: gl.constexpr, MMA: gl.constexpr,
    K_BITS: gl.constexpr, K_PERM: gl.constexpr, V_BITS: gl.constexpr, V_PERM: gl.constexpr, Q_BITS: gl.constexpr,
    Q_PERM: gl.constexpr,
):  # fmt: skip
    """Grid ``(B·Hkv, num_splits)``, one warp each. q ``[B, 1, Hq, D]``; caches ``[B, L, Hkv, D]`` or pools
    ``[blocks, PAGE_SIZE, Hkv, D]`` (``stride_kb`` is then the block stride) of int8 / e4m3 codes; scales
    float32 ``[Hkv]``; out ``[B, 1, Hq, D]``; the caches' bytes as int8 whatever their format (QUANT: 1 INT8,
    2 e4m3); lse ``[B, Hq, 1]``; part: the split partials as the tl.* kernel
    lays them out, ``[pairs, G, splits, D]`` then ``[pairs, G, splits]``, float32."""
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)
    COL: gl.constexpr = gl.SliceLayout(0, MMA)
    pid_bh = gl.program_id(0)
    split = gl.program_id(1)
    b = pid_bh // num_heads_kv
    h = pid_bh % num_heads_kv
    b64 = b.to(gl.int64)
    seqlen = gl.load(seqlens_ptr + b)
    # no value was read on the host (attn.fast._errors): clamp, and let the pair's first program report it
    gl.atomic_or(err_ptr, LENGTHS, mask=((seqlen < 0) | (seqlen > len_cap)) & (split == 0), sem="relaxed")
    seqlen = gl.minimum(gl.maximum(seqlen, 0), len_cap)
    # the visible keys: all of them, or with a left window the last window_left + 1 (the new token is key
    # seqlen - 1; a right window hides nothing from it). The splits cut them from the tile below the first, so
    # tiles stay on the 16-key grid (and inside pages); this program's chunk is never shorter than min_chunk keys
    first = seqlen * 0
    if HAS_WINDOW:
        first = gl.maximum(seqlen - 1 - window_left, 0)
    base = first // TILE * TILE
    chunk = gl.cdiv(gl.maximum(gl.cdiv(seqlen - base, num_splits), min_chunk), TILE) * TILE
    lo = base + split * chunk
    hi = gl.minimum(lo + chunk, seqlen)

    # Q: the group's rows, in fp16 (the products' type), its d relabelled as Kᵀ's, in the A operand's layout
    rq = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LQ))
    dq = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, LQ))
    q_rows = q_ptr + b64 * stride_qb + (h * GROUP + rq).to(gl.int64) * stride_qh
    q = gl.load(gl.expand_dims(q_rows, 1) + gl.expand_dims(dq, 0), mask=gl.expand_dims(rq < GROUP, 1), other=0.0)
    if not Q_F16:
        # a bf16 query is exact in fp16 within fp16's range; beyond it, report (as the tl.* kernel does)
        big = gl.max(gl.max(gl.abs(q.to(gl.float32)), 1), 0) > 65504.0
        gl.atomic_or(err_ptr, QUERY_RANGE, mask=big & (split == 0), sem="relaxed")
    q = gl.convert_layout(_relabel(q.to(gl.float16), Q_BITS, Q_PERM, BLOCK_M, HEAD_DIM), A_OP)

    k_scale = gl.load(k_scale_ptr + h)
    v_scale = gl.load(v_scale_ptr + h)
    scale = qk_scale * k_scale

    # the physical offsets of a tile: Kᵀ [d, key], V [key, d]
    dk = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, LK))
    nk = gl.arange(0, TILE, layout=gl.SliceLayout(0, LK))
    nv = gl.arange(0, TILE, layout=gl.SliceLayout(1, LV))
    dv = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, LV))
    k_head = k_ptr + h.to(gl.int64) * stride_kh
    v_head = v_ptr + h.to(gl.int64) * stride_vh
    table_row = table_ptr + b64 * stride_bt
    # the score columns' physical keys (key_map: logical bits 0, 1, 2, 3 -> physical 0, 2, 3, 1)
    cols = gl.arange(0, TILE, layout=COL)
    col_key = _key_phys(cols)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, ROW)
    l_i = gl.zeros([BLOCK_M], gl.float32, ROW)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, MMA)
    bad = lo < 0  # False: the block entries this program clamped

    if STAGES == 0:
        # STEP tiles per iteration: all their loads are issued before the first one's products, so that a warp has
        # STEP·4 KiB in flight (D 128) while it waits; the next iteration's block entries are loaded one ahead
        CHUNK: gl.constexpr = STEP * TILE
        entry_a = _entry(table_row, lo, hi, max_blocks, PAGED, PAGE_SIZE)
        entry_b = _entry(table_row, lo + TILE, hi, max_blocks, PAGED, PAGE_SIZE)
        for start in range(lo, hi, CHUNK):
            next_a = _entry(table_row, start + CHUNK, hi, max_blocks, PAGED, PAGE_SIZE)
            blk, row0, was_bad = _tile_block(start, hi, entry_a, pool_rows, b64, PAGED, PAGE_SIZE)
            bad |= was_bad
            k_a, v_a = _load_tile(k_head + blk * stride_kb, v_head + blk * stride_vb, start, row0, first, hi,
                                  nk, nv, dk, dv, stride_kn, stride_vn, HAS_WINDOW)  # fmt: skip
            if STEP == 2:
                next_b = _entry(table_row, start + CHUNK + TILE, hi, max_blocks, PAGED, PAGE_SIZE)
                blk, row0, was_bad = _tile_block(start + TILE, hi, entry_b, pool_rows, b64, PAGED, PAGE_SIZE)
                bad |= was_bad
                k_b, v_b = _load_tile(k_head + blk * stride_kb, v_head + blk * stride_vb, start + TILE, row0,
                                      first, hi, nk, nv, dk, dv, stride_kn, stride_vn, HAS_WINDOW)  # fmt: skip
                entry_b = next_b
            m_i, l_i, acc = _attend(q, k_a, v_a, start, first, hi, col_key, scale, m_i, l_i, acc, QUANT,
                                    HEAD_DIM, MMA, K_BITS, K_PERM, V_BITS, V_PERM, HAS_WINDOW, cap_log2,
                                    HAS_SOFTCAP)  # fmt: skip
            if STEP == 2:
                m_i, l_i, acc = _attend(q, k_b, v_b, start + TILE, first, hi, col_key, scale, m_i, l_i, acc,
                                        QUANT, HEAD_DIM, MMA, K_BITS, K_PERM, V_BITS, V_PERM, HAS_WINDOW, cap_log2,
                                    HAS_SOFTCAP)  # fmt: skip
            entry_a = next_a
    else:
        # a ring of STAGES tiles in shared memory, filled by cp.async STAGES - 1 tiles ahead of the products:
        # up to (STAGES - 1)·4 KiB in flight a warp (D 128) with no registers held for them. The block entry of
        # the tile to copy is loaded one iteration before it is needed.
        k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, HEAD_DIM, TILE], SMEM_K)
        v_smem = gl.allocate_shared_memory(gl.int8, [STAGES, TILE, HEAD_DIM], SMEM_V)
        for i in gl.static_range(STAGES - 1):
            t = lo + i * TILE
            entry = _entry(table_row, t, hi, max_blocks, PAGED, PAGE_SIZE)
            blk, row0, was_bad = _tile_block(t, hi, entry, pool_rows, b64, PAGED, PAGE_SIZE)
            bad |= was_bad
            _issue_tile(k_smem.index(i), v_smem.index(i), k_head + blk * stride_kb, v_head + blk * stride_vb, t,
                        row0, first, hi, nk, nv, dk, dv, stride_kn, stride_vn, HAS_WINDOW)  # fmt: skip
        AHEAD: gl.constexpr = (STAGES - 1) * TILE
        entry = _entry(table_row, lo + AHEAD, hi, max_blocks, PAGED, PAGE_SIZE)
        it = 0
        for start in range(lo, hi, TILE):
            t = start + AHEAD
            entry_next = _entry(table_row, t + TILE, hi, max_blocks, PAGED, PAGE_SIZE)
            blk, row0, was_bad = _tile_block(t, hi, entry, pool_rows, b64, PAGED, PAGE_SIZE)
            bad |= was_bad
            w = (it + STAGES - 1) % STAGES
            _issue_tile(k_smem.index(w), v_smem.index(w), k_head + blk * stride_kb, v_head + blk * stride_vb, t,
                        row0, first, hi, nk, nv, dk, dv, stride_kn, stride_vn, HAS_WINDOW)  # fmt: skip
            # the tile at start (STAGES - 1 groups ago) has landed; the newer ones may still be in flight
            async_copy.wait_group(STAGES - 1)
            r = it % STAGES
            k = k_smem.index(r).load(LK)
            v = v_smem.index(r).load(LV)
            m_i, l_i, acc = _attend(q, k, v, start, first, hi, col_key, scale, m_i, l_i, acc, QUANT, HEAD_DIM,
                                    MMA, K_BITS, K_PERM, V_BITS, V_PERM, HAS_WINDOW, cap_log2,
                                    HAS_SOFTCAP)  # fmt: skip
            entry = entry_next
            it += 1
        # no copy may still be writing shared memory when the program ends
        async_copy.wait_group(0)
    if PAGED:
        gl.atomic_or(err_ptr, BLOCK_TABLE, mask=bad, sem="relaxed")

    # l = 0 exactly where no key was visible (zeros, lse -inf); a NaN l keeps its NaN (as the tl.* kernel)
    has_key = l_i != 0.0
    l_safe = gl.where(has_key, l_i, 1.0)
    out = gl.where(gl.expand_dims(has_key, 1), acc / gl.expand_dims(l_safe, 1), acc * 0.0) * v_scale
    lse = gl.where(has_key, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    rows = gl.arange(0, BLOCK_M, layout=ROW)
    row_ok = rows < GROUP
    # the output's columns are V's logical d: physical d = (l >> 3) + (D / 8)·(l & 7) (v_dim_map)
    ocol = gl.arange(0, HEAD_DIM, layout=COL)
    o_d = (ocol >> 3) + (ocol & 7) * (HEAD_DIM // 8)
    o_mask = gl.expand_dims(row_ok, 1) & gl.expand_dims(ocol < HEAD_DIM, 0)
    if not SPLIT_MERGE:
        o_rows = o_ptr + b64 * stride_ob + (h * GROUP + rows).to(gl.int64) * stride_oh
        gl.store(gl.expand_dims(o_rows, 1) + gl.expand_dims(o_d, 0), out.to(o_ptr.dtype.element_ty), mask=o_mask)
        if STORE_LSE:
            gl.store(lse_ptr + b64 * stride_lb + (h * GROUP + rows) * stride_lh, lse, mask=row_ok)
    else:
        pair_row = pid_bh.to(gl.int64) * GROUP
        part_row = (pair_row + rows) * num_splits + split
        gl.store(part_ptr + gl.expand_dims(part_row * HEAD_DIM, 1) + gl.expand_dims(o_d, 0), out, mask=o_mask)
        lse_part = part_ptr + gl.num_programs(0).to(gl.int64) * GROUP * num_splits * HEAD_DIM
        gl.store(lse_part + part_row, lse, mask=row_ok)
        # the last of the pair's programs merges (the ordering argument is the tl.* kernel's, _decode_kernel:
        # the barrier puts every lane's stores before the release of the atomic; the merge reads bypass L1)
        gl.thread_barrier()
        arrived = gl.atomic_add(count_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            gl.thread_barrier()
            _merge(part_ptr + pair_row * num_splits * HEAD_DIM, lse_part + pair_row * num_splits, o_ptr, lse_ptr,
                   b64, h, num_splits, stride_ob, stride_oh, stride_lb, stride_lh, GROUP, HEAD_DIM, STORE_LSE,
                   LM)  # fmt: skip
            gl.store(count_ptr + pid_bh, 0)


@gluon.jit
def _mul_rn(a, b):
    # a product never fused into the add that follows: a cross-lane gl.sum of fused products leaves the lanes an
    # ulp apart, and their copies race for one shared-memory slot (attn.fast._triton.mul_rn says more)
    return gl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=gl.float32, is_pure=True,
                                     pack=1)  # fmt: skip


@gluon.jit
def _merge(o_part, lse_part, o_ptr, lse_ptr, b64, h, num_splits, stride_ob, stride_oh, stride_lb, stride_lh,
           GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, STORE_LSE: gl.constexpr, LM: gl.constexpr):  # fmt: skip
    """``lse = logsumexp_s(lse_s)``, ``o = Σ_s exp(lse_s − lse)·o_s`` for each of the pair's rows: two passes
    over ``[16, D]`` tiles of partials (the maximum, then the weighted sum). Empty splits hold 0 and -inf."""
    ST: gl.constexpr = 16
    offs_s = gl.arange(0, ST, layout=gl.SliceLayout(1, LM))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, LM))
    for r in range(GROUP):
        lse_row = lse_part + r * num_splits
        o_row = o_part + r * num_splits * HEAD_DIM
        m_vec = gl.full([ST], float("-inf"), gl.float32, gl.SliceLayout(1, LM))
        for s0 in range(0, num_splits, ST):
            sl = gl.load(lse_row + s0 + offs_s, mask=s0 + offs_s < num_splits, other=float("-inf"),
                         cache_modifier=".cg")  # fmt: skip
            m_vec = gl.maximum(m_vec, sl)
        m = gl.max(m_vec, 0)
        m_safe = gl.where(m == float("-inf"), 0.0, m)
        acc = gl.zeros([HEAD_DIM], gl.float32, gl.SliceLayout(0, LM))
        w_vec = gl.zeros([ST], gl.float32, gl.SliceLayout(1, LM))
        for s0 in range(0, num_splits, ST):
            s_ok = s0 + offs_s < num_splits
            sl = gl.load(lse_row + s0 + offs_s, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
            o = gl.load(o_row + gl.expand_dims((s0 + offs_s) * HEAD_DIM, 1) + gl.expand_dims(offs_d, 0),
                        mask=gl.expand_dims(s_ok, 1), other=0.0, cache_modifier=".cg")  # fmt: skip
            w = gl.exp(sl - m_safe)
            w_vec += w
            acc += gl.sum(_mul_rn(gl.expand_dims(w, 1), o), 0)
        total = gl.sum(w_vec, 0)
        # a NaN partial makes its weight, and so the total, NaN: != 0 keeps it
        out = gl.where(total != 0.0, acc / gl.where(total != 0.0, total, 1.0), acc * 0.0)
        head = h * GROUP + r
        gl.store(o_ptr + b64 * stride_ob + head.to(gl.int64) * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty))
        if STORE_LSE:
            lse = gl.where(total != 0.0, m_safe + gl.log(gl.where(total != 0.0, total, 1.0)), float("-inf"))
            gl.store(lse_ptr + b64 * stride_lb + head * stride_lh, lse)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


def mode() -> str:
    """``ATTN_GLUON_DECODE`` from the environment: "1" uses this kernel wherever `supported`, "0" never, anything
    else (unset) leaves it to `default`."""
    return os.environ.get("ATTN_GLUON_DECODE", "")


@functools.cache
def _is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def supported(q, k_cache, *, paged, page_size, group, head_dim, capacity, features) -> bool:
    """Whether this kernel covers a checked decode call: sm_90, one new token, a 16-bit query over an INT8 /
    FP8 cache, D 64 or 128, a GQA group of at most 64, pages a multiple of 16 tokens, and none of ``features``
    (ALiBi, T5, a cyclic cache, beams, RoPE at read time: the tl.* kernel's; windows and soft-cap are covered)."""
    return (
        q.is_cuda
        and _is_sm90(q.device.index if q.device.index is not None else torch.cuda.current_device())
        and q.shape[1] == 1
        and q.dtype in (torch.float16, torch.bfloat16)
        and k_cache.dtype in (torch.int8, torch.float8_e4m3fn)
        and head_dim in HEAD_DIMS
        and group <= MAX_GROUP
        and (not paged or page_size % TILE_KEYS == 0)
        and capacity > 0
        and not features
    )


def default() -> bool:
    """Whether `attn.decode` takes this kernel by default where `supported`: no. On an H100 (session 11,
    bench/results/gpu_s11_H100_2026-12-07.log) it ran at 0.55-0.81x the tl.* one-byte kernel on the PERF.md
    decode shapes despite 2.6-2.8x fewer instructions per byte; ``ATTN_GLUON_DECODE=1`` opts in."""
    return False


# tiles per loop iteration (1 or 2): their loads are in flight together (bench/bench_decode_1b.py times both)
STEP_TILES = int(os.environ.get("ATTN_GLUON_DECODE_STEP", "2"))
# 0: loads straight into registers (STEP_TILES a loop iteration); n >= 2: a cp.async ring of n tiles in shared
# memory, n - 1 tiles ahead (bench/bench_decode_1b.py times the alternatives)
RING_STAGES = int(os.environ.get("ATTN_GLUON_DECODE_STAGES", "0"))
# the programs one SM runs at once (one warp each, ~180 registers a thread: about 11 fit) times two waves' worth
PROGRAMS_PER_SM = 16
# the shortest chunk a split may get: its partial write, arrival and share of the merge amortized over it
MIN_SPLIT_KEYS = 256


# the most parts a cache is cut into: the last program of a pair merges every part's rows alone (one warp, a
# loop of loads that each wait), so its time grows with the count; 64 parts of 4 rows are 128 KiB to read
MAX_SPLITS = 64


def choose_num_splits(batch: int, num_heads_kv: int, max_seqlen_k: int, num_sms: int) -> int:
    """Split-K for one-warp programs: about ``PROGRAMS_PER_SM`` programs per SM, chunks of at least
    ``MIN_SPLIT_KEYS`` keys, at most ``MAX_SPLITS`` parts (untuned: `bench_decode_1b --sweep` times the counts)."""
    pairs = max(batch * num_heads_kv, 1)
    want = -(-PROGRAMS_PER_SM * num_sms // pairs)
    return max(1, min(want, -(-max(max_seqlen_k, 1) // MIN_SPLIT_KEYS), MAX_SPLITS))


def launch_args(q, k_cache, v_cache, cache_seqlens, out, lse, part, counters, *, block_table, k_scale, v_scale,
                qk_scale, num_splits, min_chunk, len_cap, page_size, group, quant, err, window_left=-1,
                cap_log2=0.0, step=None, stages=None):  # fmt: skip
    """The grid, positional operands and constexprs of one launch (`decode_1b`; the compile probe
    bench/probes/gluon_decode_sass.py builds the same from CPU tensors)."""
    bsz, _, hq, d = q.shape
    hkv = k_cache.shape[2]
    block_m = max(16, 1 << (group - 1).bit_length())
    paged = block_table is not None
    split = num_splits > 1
    step = step or STEP_TILES
    stages = RING_STAGES if stages is None else stages
    args = (
        q, k_cache, v_cache, out, lse if lse is not None else out, part if split else out,
        counters if split else cache_seqlens, cache_seqlens, block_table if paged else cache_seqlens, err,
        k_scale, v_scale,
        q.stride(0), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(2),
        lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        block_table.stride(0) if paged else 0,
        hkv, num_splits, min_chunk, len_cap, k_cache.shape[0], block_table.shape[1] if paged else 0, qk_scale,
        max(window_left, 0), cap_log2,
    )  # fmt: skip
    constexprs = dict(
        GROUP=group, HEAD_DIM=d, BLOCK_M=block_m, QUANT=quant,
        Q_F16=q.dtype == torch.float16, PAGED=paged, PAGE_SIZE=page_size if paged else TILE_KEYS,
        SPLIT_MERGE=split, STORE_LSE=lse is not None, HAS_WINDOW=window_left >= 0, HAS_SOFTCAP=cap_log2 > 0,
        STEP=step, STAGES=stages,
        num_warps=1,
        SMEM_K=gl.SwizzledSharedLayout(1, 1, 1, [0, 1]), SMEM_V=gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
        **layouts(d, block_m),
    )  # fmt: skip
    return (bsz * hkv, num_splits), args, constexprs


def decode_1b(q, k_cache, v_cache, cache_seqlens, out, lse, part, counters, **kw) -> None:
    """Launch on checked operands (`attn.fast.decode.decode` prepares them: ``qk_scale`` in log2 units, or with a
    soft-cap ``scale / softcap`` and ``cap_log2 = softcap·log2(e)``; the split buffers and counters, the error
    word ``err``; keywords as `launch_args`). Writes ``out [B, 1, Hq, D]`` and ``lse [B, Hq, 1]`` (or None)."""
    grid, args, constexprs = launch_args(q, k_cache, v_cache, cache_seqlens, out, lse, part, counters, **kw)
    # through attn's launcher, imported by name as in the tl.* kernels' modules: a repeated specialization skips
    # Triton's binding, and a DecodePlan's recorder (which swaps the name `launch` in attn.fast's modules, this
    # one imported with attn.fast.decode) sees the launch and replays it through the compiled kernel's entry
    launch(_decode_1b_kernel, grid, *args, **constexprs)
