"""FP8 prefill attention (issue 17 item 2): e4m3 Q, K, V with per-head descale factors, bf16 output.

A ``tl.*`` kernel: on sm_90 Triton lowers ``tl.dot`` of two e4m3 tiles to FP8 ``wgmma`` (twice the bf16 rate),
and the same kernel runs in the CPU interpreter, so it is CPU-tested. The numerics are those of
`attn.reference.fp8_attention` (read its docstring first): Q·Kᵀ on the FP8 tensor cores with float32
accumulation, the online softmax in float32 (log2 units), P quantized to e4m3 as ``p · 256`` before P·V on the FP8
tensor cores, and the descales, ``1/256`` and ``1/l`` applied once to the output.

Covered: padded ``[B, S, H, D]``, causal (bottom-right) and full, GQA/MQA, D in {64, 128, 256}, any lengths.
Not covered (use the bf16 `attention`): windows, soft-cap, ALiBi/T5, packed/varlen, LSE.

On sm_90, D 64/128 calls with Sq = Sk >= 4096 run on the warp-specialized Gluon kernel instead
(`attn.fast.gluon_attention.attention_fp8_gluon`: the bf16 Gluon kernel's structure with FP8 operands, the same
numerics; measured 1.23-1.37x this kernel, `gluon_attention.fp8_default`). ``ATTN_GLUON=1`` sends every call it
covers there, ``ATTN_GLUON=0`` none.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference.fp8_attention import P_SCALE, check_fp8_args
from . import gluon_attention as ga
from ._triton import cdiv, is_interpreter

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128, 256)


@triton.jit
def _round_e4m3(x):
    """Round ``0 <= x <= 448`` to the nearest e4m3 value (ties to even) in float32 arithmetic, so that the cast
    that follows is exact. Only under the interpreter, whose float32 -> fp8 cast truncates (and mangles carries);
    on the GPU the cast itself (cvt.rn.satfinite) rounds to nearest even."""
    # normal e4m3 (x >= 2^-6): keep 3 of float32's 23 mantissa bits, round to nearest even on the bit pattern
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    # subnormal e4m3 (x < 2^-6): multiples of 2^-9; float32's spacing at 2^14 is 2^-9, so x + 2^14 rounds there
    sub = (x + 16384.0) - 16384.0
    return tl.where(x < 0.015625, sub, normal)


@triton.jit
def _tile(q, k_ptrs, vt_ptrs, start, acc, m_i, l_i, offs_m, offs_n, diag, seqlen_k, qk_scale, stride_kn,
          MASKED: tl.constexpr, CAUSAL: tl.constexpr, EXACT_ROUND: tl.constexpr,
          LOG2_P_SCALE: tl.constexpr, SAFE: tl.constexpr = False):  # fmt: skip
    """One key tile at ``start``: scores, online softmax, P in e4m3, P·V. Masked tiles bound the loads and mask
    keys past Sk and, under causal, right of the diagonal. SAFE (a masked causal tile of the rerun, see
    _fp8_fwd) keeps e4m3fn's NaN codes (0x7F, 0xFF; it has no inf) to the rows that see their key: a key right of
    a row's diagonal has p = 0 there, but 0·NaN = NaN."""
    cols = start + offs_n
    if SAFE:
        # first, while few registers are live: Vᵀ without its NaN codes (tested on the bits: the interpreter reads
        # 0x7F as 480), and NaN in acc where a visible key holds one, key by key
        vt = tl.load(vt_ptrs + start, mask=cols[None, :] < seqlen_k, other=0.0)
        bits = vt.to(tl.uint8, bitcast=True)
        bad = ((bits & 0x7F) == 0x7F).to(tl.int8)
        if tl.max(tl.max(bad, 1), 0) != 0:
            for n in range(0, offs_n.shape[0]):
                bad_d = tl.max(tl.where(offs_n[None, :] == n, bad, 0), 1) != 0
                sees = (start + n < seqlen_k) & (start + n <= offs_m + diag)
                acc = tl.where(sees[:, None] & bad_d[None, :], float("nan"), acc)
            vt = tl.where(bad != 0, 0, bits).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    if MASKED:
        k = tl.load(k_ptrs + start * stride_kn, mask=cols[:, None] < seqlen_k, other=0.0)
    else:
        k = tl.load(k_ptrs + start * stride_kn)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units: descales, softmax scale and log2(e) in one factor
    if MASKED:
        visible = cols[None, :] < seqlen_k
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen no key keeps m = -inf; subtracting 0 keeps its p = exp2(-inf) = 0
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    # p · P_SCALE directly: exp2(s − m + log2 P_SCALE), one subtraction per row instead of a multiply per score;
    # l sums the scaled p, so the scale cancels in o = acc / l
    p = tl.math.exp2(s - (m_use - LOG2_P_SCALE)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if EXACT_ROUND:
        p = _round_e4m3(p)
    p8 = p.to(tl.float8e4nv)
    # Vᵀ's tile [D, BLOCK_N], keys contiguous: the transpose view is P·V's B operand with the reduction (keys)
    # contiguous, the only FP8 wgmma operand layout; V itself would be transposed through shared memory byte by
    # byte in every tile (STS.U8 in SASS: bench/probes/gluon_fp8_sass.py)
    if MASKED and not SAFE:
        vt = tl.load(vt_ptrs + start, mask=cols[None, :] < seqlen_k, other=0.0)
    elif not SAFE:
        vt = tl.load(vt_ptrs + start)
    acc = tl.dot(p8, tl.trans(vt), acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _fp8_fwd(Q, K, V, O, QD, KD, VD, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb,
             stride_vh, stride_vd, stride_ob, stride_om, stride_oh, stride_db, stride_dh, num_heads_q, group_size,
             seqlen_q, seqlen_k, sm_scale_log2, CAUSAL: tl.constexpr, EXACT_ROUND: tl.constexpr,
             LOG2_P_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             HEAD_DIM: tl.constexpr):  # fmt: skip
    # axis 0: row blocks, the last (under causal the longest) first; axis 1: (b, h). Programs launched together
    # are the row blocks of one head, so they share its K/V in L2
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads_q
    h = bh % num_heads_q
    hk = h // group_size
    # [B, Hkv] descales: query head h uses its KV head's
    d_off = b * stride_db + hk * stride_dh
    qk_scale = tl.load(QD + d_off) * tl.load(KD + d_off) * sm_scale_log2
    v_descale = tl.load(VD + d_off)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < seqlen_q, other=0.0)
    k_ptrs = K + b64 * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    vt_ptrs = V + b64 * stride_vb + hk * stride_vh + offs_d[:, None] * stride_vd + offs_n[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # bottom-right alignment: query row i sits on key i + diag. [0, full_hi): tiles every row of the block sees
    # whole (no mask); [full_hi, hi): tiles along the diagonal or past Sk
    diag = seqlen_k - seqlen_q
    hi = seqlen_k
    full_hi = seqlen_k // BLOCK_N * BLOCK_N
    if CAUSAL:
        hi = tl.maximum(tl.minimum(pid_m * BLOCK_M + BLOCK_M + diag, seqlen_k), 0)
        full_hi = tl.minimum(tl.maximum(pid_m * BLOCK_M + diag + 1, 0) // BLOCK_N * BLOCK_N, full_hi)
    for start in range(0, full_hi, BLOCK_N):
        acc, m_i, l_i = _tile(q, k_ptrs, vt_ptrs, start, acc, m_i, l_i, offs_m, offs_n, diag, seqlen_k, qk_scale,
                              stride_kn, False, CAUSAL, EXACT_ROUND, LOG2_P_SCALE)  # fmt: skip
    for start in range(full_hi, hi, BLOCK_N):
        acc, m_i, l_i = _tile(q, k_ptrs, vt_ptrs, start, acc, m_i, l_i, offs_m, offs_n, diag, seqlen_k, qk_scale,
                              stride_kn, True, CAUSAL, EXACT_ROUND, LOG2_P_SCALE)  # fmt: skip
    if CAUSAL:
        # A NaN code in a tile's V makes its column of the product NaN in every row (0·NaN = NaN), rows whose
        # diagonal hides the key included, and that never leaves acc. A block whose accumulator ends non-finite
        # (or whose row sums overflow: a false alarm costs time only) computes its tiles again in SAFE tiles of
        # 32 keys, not pipelined, which keep such values to the rows that see them. Only inputs holding NaN codes
        # take the branch; the normal loops carry no check at all. (Without causal every row sees every key.)
        row_sums = tl.sum(acc, 1)
        redo = tl.max(((row_sums != row_sums) | (tl.abs(row_sums) == float("inf"))).to(tl.int32), 0)
        if EXACT_ROUND:
            # the interpreter reads the NaN code 0x7F as 480, so nothing shows in acc there: its codes, then
            for start in range(full_hi, hi, BLOCK_N):
                codes = tl.load(vt_ptrs + start, mask=(start + offs_n)[None, :] < seqlen_k, other=0.0)
                nan_code = (codes.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F
                redo |= tl.max(tl.max(nan_code.to(tl.int32), 1), 0)
        if redo != 0:
            SAFE_N: tl.constexpr = 32
            offs_s = tl.arange(0, SAFE_N)
            k_safe = K + b64 * stride_kb + hk * stride_kh + offs_s[:, None] * stride_kn + offs_d[None, :]
            vt_safe = V + b64 * stride_vb + hk * stride_vh + offs_d[:, None] * stride_vd + offs_s[None, :]
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            for start in tl.range(0, hi, SAFE_N, num_stages=1):
                acc, m_i, l_i = _tile(q, k_safe, vt_safe, start, acc, m_i, l_i, offs_m, offs_s, diag, seqlen_k,
                                      qk_scale, stride_kn, True, CAUSAL, EXACT_ROUND, LOG2_P_SCALE, True)  # fmt: skip

    # rows that saw no key have l = 0 and acc = 0: dividing by 1 leaves their zeros (l is P_SCALE · Σ p), or the
    # NaN of a value they see; a NaN score makes l NaN, and l != 0 keeps it (l > 0 made the row zero)
    l_safe = tl.where(l_i != 0.0, l_i, 1.0)
    out = acc * (v_descale / l_safe)[:, None]
    o_ptrs = O + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < seqlen_q)


def _config(head_dim: int) -> dict:
    # 128 query rows (two warpgroups), 128-key tiles: the FP8 products want K >= 32 and their tiles twice the
    # bf16 kernel's in keys for the same bytes; D256 halves the key tile to stay in registers
    if head_dim == 256:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def attention_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: dict | None = None,
) -> torch.Tensor:
    """FP8 prefill, `attn.reference.attention_fp8`'s signature: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``
    float8_e4m3fn, descales ``[B, Hkv]`` float32 (None: 1). ``config`` overrides the tile (BLOCK_M, BLOCK_N,
    num_warps, num_stages) for benchmarks."""
    b, sq, sk, hq, hkv, d = check_fp8_args(q, k, v, q_descale, k_descale, v_descale, out_dtype, causal, softmax_scale)
    if d not in HEAD_DIMS:
        raise ValueError(f"q's head dim must be one of {HEAD_DIMS} for the FP8 kernel, got {d}")
    if q.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"q must be a CUDA tensor (or run with TRITON_INTERPRET=1), got device {q.device}")
    if not (k.device == v.device == q.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if b * hq > 65535:
        raise ValueError(f"B·Hq must be at most 65535 (the grid's second axis), got {b}·{hq}")
    scale = d**-0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    ones = None
    descales = []
    for x in (q_descale, k_descale, v_descale):
        if x is None:
            if ones is None:
                ones = torch.ones(b, hkv, dtype=torch.float32, device=q.device)
            x = ones
        # one stride pair for all three: contiguous float32 [B, Hkv] (a copy only if the caller's is not)
        descales.append(x.to(device=q.device, dtype=torch.float32).contiguous())
    out = torch.empty(b, sq, hq, d, dtype=out_dtype, device=q.device)
    if out.numel() == 0:
        return out
    if sk == 0:
        return out.zero_()
    mode = ga.mode()
    if (
        config is None
        and mode != "0"
        and ga.fp8_supported(q, k, v)
        and (mode == "1" or ga.fp8_default(seqlen_q=sq, seqlen_k=sk))
    ):
        return ga.attention_fp8_gluon(q, k, v, torch.stack(descales), scale=scale, causal=causal, out=out)
    # Vᵀ [B, Hkv, D, Sk]: one copy per call (B·Sk·Hkv·D bytes read and written, ~3-5% of the kernel's time at
    # S4096), the price of FP8 P·V's operand layout (see _tile)
    vt = v.permute(0, 2, 3, 1).contiguous()
    cfg = dict(config or _config(d))
    grid = (cdiv(sq, cfg["BLOCK_M"]), b * hq)
    _fp8_fwd[grid](
        q, k, vt, out, *descales,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        vt.stride(0), vt.stride(1), vt.stride(2), out.stride(0), out.stride(1), out.stride(2),
        descales[0].stride(0), descales[0].stride(1), hq, hq // hkv, sq, sk, scale * LOG2E,
        CAUSAL=causal, EXACT_ROUND=is_interpreter(), LOG2_P_SCALE=math.log2(P_SCALE), HEAD_DIM=d, **cfg,
    )  # fmt: skip
    return out
