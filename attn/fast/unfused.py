"""The unfused context path in Triton (TensorRT-LLM ``context_fmha_type=disabled``): three kernels.

1. ``_scores_kernel``: ``S = scale·Q·Kᵀ`` (capped, masked with -inf) for the whole padded batch, written to an
   fp32 ``[B, Hq, Sq, Sk]`` buffer;
2. ``_softmax_kernel``: each row of ``S`` becomes probabilities in place (and its log-sum-exp is kept);
3. ``_pv_kernel``: ``O = P·V``.

It exists to be measured against the fused kernel: the buffer grows with ``B·Hq·Sq·Sk`` and every element
crosses memory three times, which is what fusion removes. Packed input is padded first, as TensorRT-LLM's
unfused path works on padded tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..checks import check_attention, check_flag
from ..layout import pad
from ._triton import is_interpreter, launch, mul_rn, next_power_of_2
from .attention import _tanh

# a constexpr, because jitted code may only read globals that are
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _scores_kernel(
    # (in the order of the earlier flat parameter list, with which ptxas emits the same SASS as before)
    q_ptr, k_ptr, s_ptr, seqlens_q_ptr, seqlens_k_ptr, alibi_ptr, alibi_strides,
    q_strides, k_strides, s_strides,
    num_heads_q, group_size, seqlen_q_pad, seqlen_k_pad,
    scale, softcap, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ALIBI_WITH_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Operands: q, k (padded ``[B, S, H, D]``, strides ``(batch, row, head)``) and the scores ``[B, Hq, Sq, Sk]``
    (strides ``(batch, head, row)``); the ALiBi slopes ``[B, Hq]`` (strides ``(batch, head)``), or None."""
    HAS_ALIBI: tl.constexpr = alibi_ptr is not None
    # fp32 inputs take full-precision products; the others ignore the setting
    PRECISION: tl.constexpr = "ieee" if q_ptr.dtype.element_ty == tl.float32 else "tf32"
    stride_qb, stride_qm, stride_qh = q_strides
    stride_kb, stride_kn, stride_kh = k_strides
    stride_sb, stride_sh, stride_sm = s_strides
    pid_m, pid_n, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = pid_bh // num_heads_q
    h = pid_bh % num_heads_q
    seqlen_q = tl.load(seqlens_q_ptr + b)
    seqlen_k = tl.load(seqlens_k_ptr + b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + (h // group_size).to(tl.int64) * stride_kh
    # [BLOCK_M, HEAD_DIM_PAD]
    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    # [BLOCK_N, HEAD_DIM_PAD]
    k = tl.load(
        k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
        mask=(offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    # [BLOCK_M, BLOCK_N]
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    diag = seqlen_k - seqlen_q
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + b * alibi_strides[0] + h * alibi_strides[1])
        bias = slope * (offs_n[None, :] - (offs_m[:, None] + diag)).to(tl.float32)
        if ALIBI_WITH_SCALE:
            qk += bias
    s = qk * scale
    if HAS_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    if HAS_ALIBI:
        if not ALIBI_WITH_SCALE:
            s += bias
    visible = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
    if HAS_WINDOW_RIGHT:
        visible &= offs_n[None, :] <= offs_m[:, None] + diag + window_right
    if HAS_WINDOW_LEFT:
        visible &= offs_n[None, :] >= offs_m[:, None] + diag - window_left
    s = tl.where(visible, s, float("-inf"))
    s_base = s_ptr + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    tl.store(
        s_base + offs_m[:, None].to(tl.int64) * stride_sm + offs_n[None, :],
        s,
        mask=(offs_m[:, None] < seqlen_q_pad) & (offs_n[None, :] < seqlen_k_pad),
    )


@triton.jit
def _softmax_kernel(s_ptr, lse_ptr, seqlen_k_pad, BLOCK_N: tl.constexpr):
    # one program per score row: a pass for the row's max and sum, then one that writes the probabilities
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * seqlen_k_pad
    offs = tl.arange(0, BLOCK_N)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, seqlen_k_pad, BLOCK_N):
        x = tl.load(s_row + start + offs, mask=start + offs < seqlen_k_pad, other=float("-inf")) * LOG2E
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.math.exp2(m - m_safe) + tl.math.exp2(x - m_safe)
        m = m_new
    m_row = tl.max(m, 0)
    m_row_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    # mul_rn: every lane of a reduction must hold the same sum (see its docstring)
    l_row = tl.sum(mul_rn(l, tl.math.exp2(m - m_row_safe)), 0)
    # l = 0 only for a row that sees no key; a NaN score makes l NaN, which must reach p and the lse, not vanish
    has_key = l_row != 0.0
    l_safe = tl.where(has_key, l_row, 1.0)
    for start in range(0, seqlen_k_pad, BLOCK_N):
        mask = start + offs < seqlen_k_pad
        x = tl.load(s_row + start + offs, mask=mask, other=float("-inf")) * LOG2E
        tl.store(s_row + start + offs, tl.math.exp2(x - m_row_safe) / l_safe, mask=mask)
    lse = tl.where(has_key, (m_row_safe + tl.math.log2(l_safe)) / LOG2E, float("-inf"))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _pv_tiles(
    acc, p_base, v_base, offs_m, offs_n, offs_d, seqlen_q, seqlen_k, seqlen_q_pad, diag, window_left, window_right,
    stride_pm, stride_vn,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr, SAFE: tl.constexpr,
):  # fmt: skip
    """``acc + P·V`` over the keys of a row block. P is 0 where the mask hides a key, but 0·NaN = NaN (and
    0·inf): SAFE takes non-finite values out of the product and marks NaN exactly where a visible key holds
    one, as the reference's P·V over the visible keys gives (see _pv_kernel for when it runs)."""
    for start_n in tl.range(0, seqlen_k, BLOCK_N, num_stages=1 if SAFE else None):
        cols = start_n + offs_n
        # [BLOCK_M, BLOCK_N]
        p = tl.load(
            p_base + offs_m[:, None].to(tl.int64) * stride_pm + cols[None, :],
            mask=(offs_m[:, None] < seqlen_q_pad) & (cols[None, :] < seqlen_k),
            other=0.0,
        )
        # [BLOCK_N, HEAD_DIM_PAD]
        v = tl.load(
            v_base + cols[:, None] * stride_vn + offs_d[None, :],
            mask=(cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM),
            other=0.0,
        )
        if SAFE:
            bad = ((v != v) | (tl.abs(v) == float("inf"))).to(tl.int8)
            if tl.max(tl.max(bad, 1), 0) != 0:
                # key by key, NaN where a row sees a key holding a non-finite value in column d (no [BLOCK_M, D]
                # temporary beside acc)
                for n in range(0, BLOCK_N):
                    bad_d = tl.max(tl.where(offs_n[:, None] == n, bad, 0), 0) != 0
                    key = start_n + n
                    sees = (offs_m < seqlen_q) & (key < seqlen_k)
                    if HAS_WINDOW_RIGHT:
                        sees &= key <= offs_m + diag + window_right
                    if HAS_WINDOW_LEFT:
                        sees &= key >= offs_m + diag - window_left
                    acc = tl.where(sees[:, None] & bad_d[None, :], float("nan"), acc)
                v = tl.where(bad != 0, 0.0, v)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _pv_kernel(
    p_ptr, v_ptr, o_ptr, seqlens_q_ptr, seqlens_k_ptr,
    p_strides, v_strides, o_strides,
    num_heads_q, group_size, seqlen_q_pad, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PRECISION: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # each tensor's first three strides, in its own dimension order (scores [B, H, Sq, Sk]; v, out [B, S, H, D])
    stride_pb, stride_ph, stride_pm = p_strides
    stride_vb, stride_vn, stride_vh = v_strides
    stride_ob, stride_om, stride_oh = o_strides
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b = pid_bh // num_heads_q
    h = pid_bh % num_heads_q
    seqlen_q = tl.load(seqlens_q_ptr + b)
    seqlen_k = tl.load(seqlens_k_ptr + b)
    diag = seqlen_k - seqlen_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    p_base = p_ptr + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
    v_base = v_ptr + b.to(tl.int64) * stride_vb + (h // group_size).to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    acc = _pv_tiles(
        acc, p_base, v_base, offs_m, offs_n, offs_d, seqlen_q, seqlen_k, seqlen_q_pad, diag, window_left,
        window_right, stride_pm, stride_vn, HEAD_DIM, PRECISION, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, BLOCK_N, False,
    )  # fmt: skip
    # A non-finite value in V makes its column of the product non-finite in every row (0·NaN = NaN), rows that
    # do not see its key included, padding rows too. A block whose accumulator ends non-finite (or whose row
    # sums overflow: a false alarm costs time only) computes its product again in the SAFE loop, which keeps
    # such values to the rows that see them; only inputs holding non-finite values take the branch. A row that
    # sees no key (padding rows, rows left of a window) then keeps acc = 0; one whose visible scores are all
    # -inf is 0 too, or NaN where it sees a non-finite value, as the reference gives both.
    # (16-key tiles: the rerun then needs no more registers than the normal loop)
    SAFE_N: tl.constexpr = 16
    row_sums = tl.sum(acc, 1)
    if tl.max(((row_sums != row_sums) | (tl.abs(row_sums) == float("inf"))).to(tl.int32), 0) != 0:
        acc = _pv_tiles(
            tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32), p_base, v_base, offs_m, tl.arange(0, SAFE_N), offs_d,
            seqlen_q, seqlen_k, seqlen_q_pad, diag, window_left, window_right, stride_pm, stride_vn, HEAD_DIM,
            PRECISION, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, SAFE_N, True,
        )  # fmt: skip
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_om + offs_d[None, :],
        acc.to(o_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < seqlen_q_pad) & (offs_d[None, :] < HEAD_DIM),
    )


def attention_unfused(
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
    return_lse: bool = False,
):
    """The unfused context path as three Triton kernels; same contract as `attn.reference.attention`.

    Materializes the fp32 score/probability buffer ``[B, Hq, max_seqlen_q, max_seqlen_k]``: use it to see
    (and measure) what the fused kernel saves, not to serve.
    """
    check_flag("return_lse", return_lse)
    args = check_attention(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, seqlens_q=seqlens_q, seqlens_k=seqlens_k, causal=causal,
        softmax_scale=softmax_scale, q_scaling=q_scaling, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, alibi_mode=alibi_mode, dtypes=(torch.float16, torch.bfloat16, torch.float32),
    )  # fmt: skip
    if args.head_dim > 256:
        raise ValueError(f"q's head dim must be at most 256 for the Triton kernels, got {args.head_dim}")
    if q.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"q must be a CUDA tensor (or run with TRITON_INTERPRET=1), got device {q.device}")
    if args.packed:
        lens_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.int32)
        lens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
        qp = pad(q, cu_seqlens_q, args.max_seqlen_q)
        kp = pad(k, cu_seqlens_k, args.max_seqlen_k)
        vp = pad(v, cu_seqlens_k, args.max_seqlen_k)
    else:
        lens_q, lens_k = args.seqlens_q, args.seqlens_k
        qp, kp, vp = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    bsz, sq, hq, d = qp.shape
    sk = kp.shape[1]

    scores = torch.empty((bsz, hq, sq, sk), dtype=torch.float32, device=q.device)
    lse = torch.empty((bsz, hq, sq), dtype=torch.float32, device=q.device)
    out = torch.empty_like(qp)
    if qp.numel() == 0 or sk == 0:
        out.zero_()
        lse.fill_(float("-inf"))
    else:
        head_dim_pad = max(16, next_power_of_2(d))
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        bm, bn = (32, 16) if is_interpreter() or q.dtype == torch.float32 else (64, 64)
        slopes = args.alibi_slopes
        launch(
            _scores_kernel, (triton.cdiv(sq, bm), triton.cdiv(sk, bn), bsz * hq),
            q_ptr=qp, k_ptr=kp, s_ptr=scores,
            q_strides=qp.stride()[:3], k_strides=kp.stride()[:3], s_strides=scores.stride()[:3],
            seqlens_q_ptr=lens_q, seqlens_k_ptr=lens_k,
            alibi_ptr=slopes, alibi_strides=slopes.stride() if slopes is not None else None,
            num_heads_q=hq, group_size=args.group_size, seqlen_q_pad=sq, seqlen_k_pad=sk,
            scale=args.scale, softcap=args.softcap, window_left=args.window_left, window_right=args.window_right,
            HEAD_DIM=d, HEAD_DIM_PAD=head_dim_pad,
            HAS_WINDOW_LEFT=args.window_left >= 0, HAS_WINDOW_RIGHT=args.window_right >= 0,
            HAS_SOFTCAP=args.softcap > 0, ALIBI_WITH_SCALE=args.alibi_with_scale, BLOCK_M=bm, BLOCK_N=bn,
        )  # fmt: skip
        launch(_softmax_kernel, (bsz * hq * sq,), scores, lse, sk, BLOCK_N=min(1024, next_power_of_2(sk)))
        launch(
            _pv_kernel, (triton.cdiv(sq, bm), bsz * hq),
            p_ptr=scores, v_ptr=vp, o_ptr=out, seqlens_q_ptr=lens_q, seqlens_k_ptr=lens_k,
            p_strides=(scores.stride(0), scores.stride(1), scores.stride(2)), v_strides=vp.stride()[:3],
            o_strides=out.stride()[:3], num_heads_q=hq, group_size=args.group_size, seqlen_q_pad=sq,
            window_left=args.window_left, window_right=args.window_right,
            HEAD_DIM=d, HEAD_DIM_PAD=head_dim_pad, PRECISION=precision, HAS_WINDOW_LEFT=args.window_left >= 0,
            HAS_WINDOW_RIGHT=args.window_right >= 0, BLOCK_M=bm, BLOCK_N=bn,
        )  # fmt: skip
    if args.packed:
        keep = torch.arange(sq, device=q.device)[None, :] < lens_q[:, None]
        out = out[keep]
        lse = lse.transpose(1, 2)[keep].transpose(0, 1).contiguous()
    return (out, lse) if return_lse else out
