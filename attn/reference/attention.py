"""Context-phase attention, written to be read: the definition every kernel is tested against.

Semantics (see SPEC.md):

- MHA/MQA/GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``. GQA is computed by viewing the query heads
  as ``[Hkv, group]``, never by copying K/V.
- Scores ``s = (q·k) · softmax_scale / q_scaling``, then soft-capping ``cap·tanh(s/cap)`` if ``softcap > 0``.
- Causal and sliding windows are bottom-right aligned: query ``i`` of ``Sq`` sits at position ``i + Sk - Sq``
  among the keys, so the last query sees the last key.
- A query row with no visible key outputs zeros and ``lse = -inf``.

Everything is computed in float32 (float64 when the inputs are float64) and cast back to q's dtype.
"""

from __future__ import annotations

import torch
from einops import rearrange

from ..checks import AttentionArgs, check_attention, check_flag
from .relative_bias import relative_bias_matrix


def attention_mask(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which keys each query may see, with bottom-right alignment.

    Args:
        seqlen_q: number of queries Sq.
        seqlen_k: number of keys Sk.
        causal: forbid keys to the right of the diagonal.
        window_size: ``(left, right)`` inclusive reach from the diagonal; -1 is unbounded.
        device: where to build the mask.

    Returns:
        bool ``[Sq, Sk]``, True where key ``j`` is visible to query ``i``.
    """
    left, right = window_size
    if causal:
        right = 0
    # the diagonal of query i is key i + Sk - Sq: the last query lines up with the last key
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    return visible


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def alibi_bias(seqlen_q: int, seqlen_k: int, slopes: torch.Tensor) -> torch.Tensor:
    """ALiBi's additive bias: ``slope_h · (j − (i + Sk − Sq))``, zero on the diagonal, negative to its left.

    Args:
        seqlen_q: Sq.
        seqlen_k: Sk.
        slopes: ``[Hq]``, one slope per query head.

    Returns:
        ``[Hq, Sq, Sk]`` in the slopes' dtype (float32 or float64). TensorRT-LLM adds ``slope·j``, which differs
        by a constant per row and so gives the same softmax; FlashAttention uses ``−slope·|j − diag|``, which
        differs for keys right of the diagonal (bidirectional attention).
    """
    i = torch.arange(seqlen_q, device=slopes.device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=slopes.device)[None, :]
    return slopes[:, None, None] * (j - i).to(slopes.dtype)


def scale_and_cap(s: torch.Tensor, alibi: torch.Tensor | None, args) -> torch.Tensor:
    """Raw products to scores: scaled, soft-capped, and ALiBi-biased in TensorRT-LLM's two orders.

    ``alibi_with_scale`` adds the bias to the raw product, ``alibi`` to the scaled (and capped) score. ``args`` is
    anything with ``scale``, ``softcap`` and ``alibi_with_scale`` (the checked arguments of a call).
    """
    s = (s + alibi) * args.scale if alibi is not None and args.alibi_with_scale else s * args.scale
    if args.softcap > 0:
        s = args.softcap * torch.tanh(s / args.softcap)
    if alibi is not None and not args.alibi_with_scale:
        s = s + alibi
    return s


def _scores(q: torch.Tensor, k: torch.Tensor, args: AttentionArgs, slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of one sequence: scaled, biased (ALiBi, T5) and capped.

    Args:
        q: ``[Sq, Hq, D]``.
        k: ``[Sk, Hkv, D]``.
        slopes: ``[Hq]`` ALiBi slopes of this sequence, or None.

    Returns:
        ``[Hkv, group, Sq, Sk]`` in the compute dtype.
    """
    dtype = _compute_dtype(q)
    q = rearrange(q.to(dtype), "i (h g) d -> h g i d", h=args.num_heads_kv)
    k = rearrange(k.to(dtype), "j h d -> h j d")
    s = torch.einsum("hgid,hjd->hgij", q, k)
    bias = None
    if slopes is not None:
        bias = rearrange(alibi_bias(q.shape[2], k.shape[1], slopes.to(dtype)), "(h g) i j -> h g i j", h=q.shape[0])
    s = scale_and_cap(s, bias, args)
    if args.rel_bias is not None:
        rel = relative_bias_matrix(args.rel_bias, q.shape[2], k.shape[1]).to(dtype)  # [Hq, Sq, Sk]
        s = s + rearrange(rel, "(h g) i j -> h g i j", h=q.shape[0])
    return s


def _masked_softmax(s: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last axis that gives zero rows (and -inf lse) where nothing is visible.

    Returns:
        ``(p, lse)``: probabilities shaped like ``s`` and the natural-log log-sum-exp of the visible scores.
    """
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # exp(s - lse) would be exp(-inf + inf) = nan on empty rows; a finite stand-in keeps them at zero
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    return p, lse


def _mix_values(p: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, spec: str, seen_spec: str, group_dim: int):
    """``o = Σ_j p_ij·v_j`` over the keys each row sees, with ``einsum(spec, p, v)``.

    ``p`` is exactly zero for the keys a row does not see, but the product would still multiply those zeros by
    their values, and ``0·NaN = NaN``: a value no one showed the row would reach it. So the non-finite values
    enter as NaN only in the rows that see them (``einsum(seen_spec, visible, bad)``, without the GQA group
    axis ``group_dim`` of the output); the rest is a plain product over finite values.
    """
    bad = ~torch.isfinite(v)
    if not bad.any():
        return torch.einsum(spec, p, v)
    o = torch.einsum(spec, p, v.masked_fill(bad, 0))
    seen = torch.einsum(seen_spec, visible.to(v.dtype), bad.to(v.dtype)) > 0
    return o.masked_fill(seen.unsqueeze(group_dim), float("nan"))


def _attend_one(q, k, v, args: AttentionArgs, b: int = 0):
    """Attention for sequence ``b``: ``q [Sq, Hq, D]``, ``k, v [Sk, Hkv, D]`` → ``o [Sq, Hq, D]``, ``lse [Hq, Sq]``."""
    slopes = args.alibi_slopes[b] if args.alibi_slopes is not None else None
    s = _scores(q, k, args, slopes)
    visible = attention_mask(q.shape[0], k.shape[0], window_size=(args.window_left, args.window_right), device=q.device)
    p, lse = _masked_softmax(s, visible)
    vv = rearrange(v.to(s.dtype), "j h d -> h j d")
    o = _mix_values(p, vv, visible, "hgij,hjd->hgid", "ij,hjd->hid", 1)
    return rearrange(o, "h g i d -> i (h g) d"), rearrange(lse, "h g i -> (h g) i")


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
):
    """Context-phase attention, one sequence at a time.

    Two layouts. Padded: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``, optionally with the valid lengths
    ``seqlens_q/k``. Packed (varlen): ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]`` with ``cu_seqlens_q/k``.

    Args:
        q: queries, float16/bfloat16/float32/float64.
        k: keys, same dtype and device as q.
        v: values, same shape as k.
        cu_seqlens_q: int32 ``[B+1]`` prefix sums of the query lengths (packed layout).
        cu_seqlens_k: int32 ``[B+1]`` prefix sums of the key lengths (packed layout).
        max_seqlen_q: longest query sequence (packed layout); computed when None.
        max_seqlen_k: longest key sequence (packed layout); computed when None.
        seqlens_q: int32 ``[B]`` valid query lengths (padded layout); rows past them output zeros.
        seqlens_k: int32 ``[B]`` valid key lengths (padded layout); keys past them are invisible.
        causal: bottom-right aligned causal mask (query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq``).
        softmax_scale: multiplier of the scores; defaults to ``1/sqrt(D)``.
        q_scaling: TensorRT-LLM's divisor of the scale: ``scale = softmax_scale / q_scaling``.
        window_size: ``(left, right)`` sliding window around the diagonal, inclusive; -1 is unbounded.
        softcap: if > 0, scores become ``softcap·tanh(s/softcap)`` after scaling.
        alibi_slopes: ALiBi slopes, float ``[Hq]`` or ``[B, Hq]``; adds ``slope·(j − (i + Sk − Sq))`` to the
            scores (see `alibi_bias`), computed on the fly by the kernels.
        alibi_mode: ``"alibi"`` adds the bias after scaling (and capping); ``"alibi_with_scale"`` adds it to
            the raw product before scaling, as TensorRT-LLM's two position-embedding types do.
        rel_bias: a T5 ``RelativeBias`` (implicit table or regular bias tensor), added after scaling and
            capping; see `attn.reference.relative_bias`.
        return_lse: also return the natural-log log-sum-exp of each row's scores.

    Returns:
        ``out`` shaped like q in q's dtype, and with ``return_lse`` also float32 ``lse``: ``[B, Hq, Sq]``
        padded or ``[Hq, Tq]`` packed (``-inf`` for rows that see no key, and for padding rows).
    """
    check_flag("return_lse", return_lse)
    args = check_attention(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, seqlens_q=seqlens_q, seqlens_k=seqlens_k, causal=causal,
        softmax_scale=softmax_scale, q_scaling=q_scaling, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, alibi_mode=alibi_mode, rel_bias=rel_bias,
    )  # fmt: skip
    out = torch.zeros_like(q)
    if args.packed:
        lse = torch.full((args.num_heads_q, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for b in range(args.batch):
            sq, eq = bounds_q[b], bounds_q[b + 1]
            sk, ek = bounds_k[b], bounds_k[b + 1]
            o, l = _attend_one(q[sq:eq], k[sk:ek], v[sk:ek], args, b)
            out[sq:eq] = o.to(q.dtype)
            lse[:, sq:eq] = l.float()
    else:
        lse = torch.full(
            (args.batch, args.num_heads_q, q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device
        )
        for b, (lq, lk) in enumerate(zip(args.seqlens_q.tolist(), args.seqlens_k.tolist())):
            o, l = _attend_one(q[b, :lq], k[b, :lk], v[b, :lk], args, b)
            out[b, :lq] = o.to(q.dtype)
            lse[b, :, :lq] = l.float()
    return (out, lse) if return_lse else out


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
    """The unfused context path (TensorRT-LLM ``context_fmha_type=disabled``): three whole-batch steps.

    1. ``S = Q·Kᵀ`` for the whole padded batch, materialized as ``[B, Hq, Sq, Sk]``;
    2. scale, cap, mask and softmax ``S`` into ``P`` (same size);
    3. ``O = P·V``.

    Its memory grows with ``B·Hq·Sq·Sk``, which is what the fused kernel avoids. Packed input is padded
    first (the padding is masked out). Arguments and results are those of `attention`, except that the T5
    relative bias is not offered on this path.
    """
    check_flag("return_lse", return_lse)
    args = check_attention(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, seqlens_q=seqlens_q, seqlens_k=seqlens_k, causal=causal,
        softmax_scale=softmax_scale, q_scaling=q_scaling, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, alibi_mode=alibi_mode,
    )  # fmt: skip
    from ..layout import pad

    if args.packed:
        lens_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        lens_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        qp = pad(q, cu_seqlens_q, args.max_seqlen_q)
        kp = pad(k, cu_seqlens_k, args.max_seqlen_k)
        vp = pad(v, cu_seqlens_k, args.max_seqlen_k)
    else:
        lens_q, lens_k = args.seqlens_q, args.seqlens_k
        qp, kp, vp = q, k, v
    dtype = _compute_dtype(q)
    sq, sk = qp.shape[1], kp.shape[1]

    # step 1: the full score tensor, [B, Hkv, group, Sq, Sk]
    qg = rearrange(qp.to(dtype), "b i (h g) d -> b h g i d", h=args.num_heads_kv)
    s = torch.einsum("bhgid,bjhd->bhgij", qg, kp.to(dtype))
    bias = None
    if args.alibi_slopes is not None:
        # slope·(j − diag_i) with each sequence's own diagonal offset Sk_b − Sq_b
        rel = torch.arange(sk, device=q.device)[None, None, :] - (
            torch.arange(sq, device=q.device)[None, :, None] + (lens_k - lens_q)[:, None, None]
        )  # [B, Sq, Sk]
        slopes = rearrange(args.alibi_slopes.to(dtype), "b (h g) -> b h g () ()", h=args.num_heads_kv)
        bias = slopes * rel[:, None, None].to(dtype)
    s = scale_and_cap(s, bias, args)

    # step 2: each sequence's own bottom-right mask, aligned on its true lengths rather than the padding
    i = torch.arange(sq, device=q.device)
    j = torch.arange(sk, device=q.device)
    diag = (i[None, :] + (lens_k - lens_q)[:, None])[:, :, None]  # [B, Sq, 1]
    visible = (i[None, :, None] < lens_q[:, None, None]) & (j[None, None, :] < lens_k[:, None, None])
    if args.window_left >= 0:
        visible &= j[None, None, :] >= diag - args.window_left
    if args.window_right >= 0:
        visible &= j[None, None, :] <= diag + args.window_right
    p, lse = _masked_softmax(s, visible[:, None, None])

    # step 3: the second product, [B, Sq, Hq, D]
    # padding keys past each length are invisible to every row: whatever they hold never reaches the output
    o = _mix_values(p, vp.to(dtype), visible, "bhgij,bjhd->bihgd", "bij,bjhd->bihd", 3)
    o = rearrange(o, "b i h g d -> b i (h g) d").to(q.dtype)
    lse = rearrange(lse, "b h g i -> b (h g) i").float()
    if args.packed:
        keep = i[None, :] < lens_q[:, None]
        o = o[keep]
        lse = rearrange(lse, "b h i -> b i h")[keep].transpose(0, 1).contiguous()
    return (o, lse) if return_lse else o
