"""Packed queries over a KV cache in Triton: chunked context, mixed prefill/decode batches, cross attention.

This is the fused context-phase kernel of `attn.fast.attention` reading its keys and values from a cache
instead of from packed K/V: the same masked/unmasked tile split, online softmax and launch order, with three
compile-time switches. ``KV_CACHE`` takes each sequence's key count from ``cache_seqlens`` and its rows from
row ``b`` of a contiguous cache; ``IS_PAGED`` gathers each K/V tile through the block table; ``QUANT`` reads
an INT8 or FP8 cache, converting each tile to the query's type (exact: int8 and e4m3 values are fp16/bf16
numbers), multiplying the K scale into the scores and the V scale into the output. ``PACK`` packs GQA: the
query heads of one KV head share a program, its tile rows being tokens × heads, so each K/V tile is read once per
group and a one-token generation request fills a group's worth of rows rather than one.

A cyclic cache (``max_attention_window``) takes another road, because the chunk's own keys are not in the cache
yet (appending them first would overwrite keys its earlier queries still need). A gather kernel packs each
sequence's still-cached rolling tokens and then the chunk's fresh ones into a temporary, in token order,
dequantized and, with ``rotary_dim``, rotated by RoPE; one launch of the packed `attn.fast.attention` kernel
with the window ``(N − S − 1, 0)`` then does the attention: in token order the rolling window is a plain band.
StreamingLLM's sinks are not: every query sees them, at a distance that stops growing once the window is full,
which no band of the kernel expresses. They are at most a handful of keys, so their scores are computed in torch
(``T·Hq·S`` products) and merged with the kernel's output through the two log-sum-exps.
"""

from __future__ import annotations

import torch

from ..checks import ContextArgs, check_context, check_flag
from ..reference.attention import scale_and_cap
from ..reference.preprocess import RopeScaling, rope_inv_freq, rotate_pairs
from . import _errors
from ._triton import MAX_HEAD_DIM, autotune_enabled, cdiv, is_interpreter, launch, next_power_of_2, unit_stride
from .attention import LOG2E, _attn_fwd_kernel, _attn_fwd_tuned, _fixed_config, attention, relative_bias_operands
from .kv_cache import gather_window, quant_code

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
    max_attention_window: int | None = None,
    sink_token_length: int = 0,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    rotary_dim: int = 0,
    rope_base: float = 10000.0,
    rope_style: str = "neox",
    rope_scaling: RopeScaling | None = None,
    return_lse: bool = False,
    validate: bool | None = None,
):
    """Packed queries attending over their sequences' cached keys and values; same contract as
    `attn.reference.context_attention`.

    Args:
        q: packed ``[T, Hq, D]``, float16/bfloat16/float32.
        k_cache: contiguous ``[B, max_len, Hkv, D]`` or paged pool ``[num_blocks, block_size, Hkv, D]``; q's dtype
            or int8 / float8_e4m3fn with ``k_scale`` and ``v_scale``; unit stride along D.
        v_cache: same shape and dtype as ``k_cache``.
        cache_seqlens: int32 ``[B]``, tokens in each cache, the queries' own tokens included; with
            ``max_attention_window`` the tokens cached *before* this chunk.
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
        max_attention_window: a cyclic cache of ``N`` slots, as in `attn.reference.context_attention`: the
            chunk attends to the cache before it plus ``k_new``/``v_new``, and the cache is not modified.
        sink_token_length: StreamingLLM's sinks, as in `attn.reference.context_attention`.
        k_new: the chunk's keys ``[T, Hkv, D]`` in q's dtype, with ``max_attention_window``.
        v_new: the chunk's values, likewise.
        rotary_dim: RoPE at read time, as in `attn.reference.context_attention` (query ``p`` rotated at
            ``min(p, N − 1)``).
        rope_base: RoPE's frequency base θ, with ``rotary_dim``.
        rope_style: ``"neox"`` or ``"gptj"``, with ``rotary_dim``.
        rope_scaling: a `RopeScaling` variant, with ``rotary_dim``.
        return_lse: also return the log-sum-exp ``[Hq, T]``.
        validate: True checks lengths, ``cu_seqlens_q`` and block-table entries on the host before launching
            (waiting for the device); a bad call raises and nothing runs. False reads nothing back: the kernel
            clamps lengths and offsets into its tensors, reads no key of a row block whose block-table entries
            leave the pool, and records each violation for `attn.check_errors`; without ``max_seqlen_q`` the
            packed length bounds the grid. None (the default) is False unless ``ATTN_DEBUG=1``. The cyclic
            path (``max_attention_window``) reads the lengths on the host regardless, to size its temporary.

    Returns:
        ``out [T, Hq, D]`` in q's dtype, and with ``return_lse`` also float32 ``lse [Hq, T]``.
    """
    check_flag("return_lse", return_lse)
    validate = _errors.resolve_validate(validate)
    cache_seqlens, cu_seqlens_q, block_table = unit_stride(cache_seqlens, cu_seqlens_q, block_table)
    args = check_context(
        q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
        block_table=block_table, causal=causal, softmax_scale=softmax_scale, q_scaling=q_scaling,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, alibi_mode=alibi_mode,
        rel_bias=rel_bias, k_scale=k_scale, v_scale=v_scale, validate=validate,
        dtypes=(torch.float16, torch.bfloat16, torch.float32), max_attention_window=max_attention_window,
        sink_token_length=sink_token_length, k_new=k_new, v_new=v_new, rotary_dim=rotary_dim, rope_style=rope_style,
    )  # fmt: skip
    c = args.cache
    if c.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q's head dim must be at most {MAX_HEAD_DIM} for the fused kernel, got {c.head_dim}")
    if q.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"q must be a CUDA tensor (or run with TRITON_INTERPRET=1), got device {q.device}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        # a cache is updated in place by the append step, so it is never silently copied here
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along the head dim, got strides {x.stride()}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if max_attention_window is not None:
        scores = dict(softmax_scale=softmax_scale, q_scaling=q_scaling, softcap=softcap, alibi_slopes=alibi_slopes,
                      alibi_mode=alibi_mode, rel_bias=rel_bias)  # fmt: skip
        rope = dict(rotary_dim=rotary_dim, base=rope_base, style=rope_style, scaling=rope_scaling)
        out, lse = _cyclic(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, block_table, k_new, v_new, args,
                           scores, rope)  # fmt: skip
        return (out, lse) if return_lse else out

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
        return (c.batch * (c.num_heads_q // pack) * cdiv(max_rows, meta["BLOCK_M"] // pack),)

    quant = quant_code(k_cache.dtype)
    # the longest cache the kernel reads (longer lengths are clamped and reported): a regular T5 bias [Hq, L, L]
    # is read at every key position
    cap_k = c.capacity if c.rel_bias is None or c.rel_bias.bias is None else min(c.capacity, *c.rel_bias.bias.shape[1:])
    rel_mode, rel_t, rel_strides, rel_md = relative_bias_operands(c.rel_bias)
    slopes = c.alibi_slopes
    if autotune_enabled():
        kernel, meta = _attn_fwd_tuned, {}
    else:
        kernel, meta = _attn_fwd_kernel, _context_config(head_dim_pad, q.dtype, pack * max_rows)
    launch(
        kernel, grid,
        # packed queries (batch stride 0) over the cache's [B or blocks, rows, Hkv, D] pools
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, o_ptr=out, lse_ptr=lse,
        q_strides=(0, *q.stride()[:2]), k_strides=k_cache.stride()[:3], v_strides=v_cache.stride()[:3],
        o_strides=(0, *out.stride()[:2]), lse_strides=(0, *lse.stride()) if lse is not None else None,
        seq_q_ptr=cu_seqlens_q, seq_k_ptr=cache_seqlens, err_ptr=_errors.error_word(q.device),
        alibi_ptr=slopes, alibi_strides=slopes.stride() if slopes is not None else None,
        rel_ptr=rel_t, rel_strides=rel_strides, rel_md=rel_md,
        block_table_ptr=block_table, stride_bt=block_table.stride(0) if block_table is not None else 0,
        page_size=c.page_size if c.paged else 1,
        k_scale_ptr=c.k_scale if quant else None, v_scale_ptr=c.v_scale if quant else None,
        num_heads_q=c.num_heads_q, group_size=c.group_size, out_rows=args.num_tokens, max_rows=max_rows,
        cap_q=args.num_tokens, cap_k=cap_k, max_k=cap_k, pool_rows=k_cache.shape[0],
        seqlen_bucket=next_power_of_2(max_rows),
        qk_scale=qk_scale, cap_log2=cap_log2, window_left=c.window_left, window_right=c.window_right,
        HEAD_DIM=c.head_dim, HEAD_DIM_PAD=head_dim_pad,
        IS_VARLEN=True, KV_CACHE=True, IS_PAGED=c.paged, QUANT=quant,
        HAS_WINDOW_LEFT=c.window_left >= 0, HAS_WINDOW_RIGHT=c.window_right >= 0, HAS_SOFTCAP=c.softcap > 0,
        HAS_ALIBI=slopes is not None, ALIBI_WITH_SCALE=c.alibi_with_scale, REL_MODE=rel_mode, PACK=pack,
        **meta,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def _turn(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int, style: str) -> torch.Tensor:
    """RoPE's rotation of ``x [T, H, D]`` by ``delta [T]`` more positions (no attention factor: ``x`` has had it)."""
    angle = delta.float()[:, None] * inv_freq.to(x.device)[None, :]  # [T, r/2]
    return rotate_pairs(x, torch.cos(angle)[:, None, :], torch.sin(angle)[:, None, :], rotary_dim, style)


def _cyclic(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, block_table, k_new, v_new, args: ContextArgs, scores,
            rope):  # fmt: skip
    """A chunk over a cyclic cache (see the module docstring): the gathered rolling window and the chunk in one
    launch of the packed kernel, the sinks beside it. Returns ``(out, lse)``."""
    c = args.cache
    window, sinks = c.max_attention_window, c.sink_token_length
    device, num_tokens = q.device, args.num_tokens
    before = cache_seqlens.tolist()
    bounds = cu_seqlens_q.tolist()
    # read on the host regardless of validate, so checked regardless: the gathers below index with them
    if any(n < 0 for n in before):
        raise ValueError(f"cache_seqlens entries must be >= 0 (tokens cached before the chunk), got {before[:8]}")
    if bounds[0] != 0 or bounds[-1] != num_tokens or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens_q must rise from 0 to T={num_tokens} without decreasing, got {bounds[:8]}")
    counts = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    # the rolling part of sequence b, in token order from oldest[b]: what the cache still holds past the sinks
    # (the chunk's append would evict some of it), then the chunk's tokens past the sinks
    oldest = [max(sinks, n - (window - sinks)) for n in before]
    rolling = [max(0, n - a) + max(0, m - max(0, sinks - n)) if m else 0 for n, a, m in zip(before, oldest, counts)]
    # the sinks each sequence's queries can see: those cached, and those its chunk brings
    pinned = [min(sinks, n + m) if m else 0 for n, m in zip(before, counts)]

    def rows(lengths, first):
        seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
        starts = torch.tensor([0] + lengths).cumsum(0)
        index = torch.arange(seq.numel()) - starts[seq]
        return seq, index + torch.tensor(first, dtype=torch.long)[seq], index

    seq_a, tok_a, pos_a = rows(rolling, oldest)
    seq_b, tok_b, pos_b = rows(pinned, [0] * len(before))
    # one gather for both parts; a key's RoPE position is its place in its part: the rolling window's frame is
    # shifted from decode's by a constant per sequence, which the queries' turn below makes up for
    to_dev = dict(device=device, dtype=torch.int32)
    row_seq, row_tok, row_pos = (torch.cat(x).to(**to_dev) for x in ((seq_a, seq_b), (tok_a, tok_b), (pos_a, pos_b)))
    rotary_dim = rope["rotary_dim"]
    cos = sin = inv_freq = None
    if rotary_dim:
        # decode's frequencies (a frame of N positions, which matters to dynamic scaling), over more positions
        inv_freq, factor = rope_inv_freq(rotary_dim, rope["base"], rope["scaling"], seq_len=window)
        positions = max(rolling + pinned + [1])
        angles = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = (f(angles).mul(factor).to(device).contiguous() for f in (torch.cos, torch.sin))
    k_new, v_new = k_new.contiguous(), v_new.contiguous()
    # A quantized cache's keys are gathered dequantized (code × scale): rounding those to fp16 added an error
    # up to 15x the reference's (issue 18, finding 8; codes × small scales land among fp16's subnormals). They
    # stay fp32, and this launch computes in fp32 with the queries widened: the path costs more, the error is
    # the reference's. A float cache's keys gather exactly in q's dtype.
    work = torch.float32 if c.k_scale is not None else q.dtype
    k_all, v_all = gather_window(
        k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_q, row_seq, row_tok, window=window, sinks=sinks,
        block_table=block_table, k_scale=c.k_scale, v_scale=c.v_scale, row_pos=row_pos, cos=cos, sin=sin,
        rotary_dim=rotary_dim, rope_style=rope["style"], out_dtype=work,
    )  # fmt: skip
    num_a = seq_a.numel()

    # query p of sequence b is at token p; the caller rotated it at min(p, N - 1), decode's place for it
    tok_seq = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    token = torch.arange(num_tokens) - torch.tensor(bounds[:-1], dtype=torch.long)[tok_seq]
    token += torch.tensor(before, dtype=torch.long)[tok_seq]
    q_rolling = q.to(work)
    if rotary_dim:
        # in the gathered frame token j sits at j - oldest[b]; the query moves there too, so every distance to a
        # rolling key is the true p - j however far the chunk runs past the window
        delta = token - torch.tensor(oldest, dtype=torch.long)[tok_seq] - token.clamp(max=window - 1)
        q_rolling = _turn(q_rolling, delta.to(device), inv_freq, rotary_dim, rope["style"])
    left = window - sinks - 1
    if c.window_left >= 0:
        left = min(left, c.window_left)
    cu_k = torch.tensor([0] + rolling, dtype=torch.int32).cumsum(0).to(**to_dev)
    out_a, lse_a = attention(
        q_rolling, k_all[:num_a], v_all[:num_a], cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_k,
        max_seqlen_q=args.max_seqlen_q, max_seqlen_k=max(rolling + [0]), causal=True, window_size=(left, 0),
        return_lse=True, **scores,
    )  # fmt: skip
    if not sinks or not sum(pinned):
        return out_a.to(q.dtype), lse_a
    o_b, lse_b = _sink_part(q, k_all[num_a:], v_all[num_a:], pinned, tok_seq, token, args, scores)
    # the two parts are one softmax over disjoint keys: weight each normalized output by its share of the mass
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a, w_b = torch.exp(lse_a - safe).T[..., None], torch.exp(lse_b - safe).T[..., None]  # [T, Hq, 1]
    out = torch.empty_like(q)
    out.copy_(out_a.float() * w_a + o_b * w_b)
    return out, lse


def _sink_part(q, k_sinks, v_sinks, pinned, tok_seq, token, args: ContextArgs, scores):
    """Every query over its sequence's sinks, in torch: ``(o [T, Hq, D] float32, lse [Hq, T])``.

    Sink ``s`` is at distance ``min(p, N − 1) − s`` from query ``p`` (decode's frame: the window's tokens fill
    the positions between), the distance ALiBi, T5's bias and a narrower window see.
    """
    c = args.cache
    device, num_tokens = q.device, q.shape[0]
    hkv, group = c.num_heads_kv, c.group_size
    sinks = c.sink_token_length
    s = torch.arange(sinks, device=device)
    token = token.to(device)
    tok_seq = tok_seq.to(device)
    diag = token.clamp(max=c.max_attention_window - 1)
    starts = torch.tensor([0] + pinned, device=device).cumsum(0)[tok_seq]
    # [T, S]: a sink not yet written (the chunk's own, later than p) is invisible, like any future token
    visible = s[None, :] <= token[:, None]
    if c.window_left >= 0:
        visible &= diag[:, None] - s[None, :] <= c.window_left
    rows = torch.where(visible, starts[:, None] + s[None, :], 0)
    k = k_sinks[rows].float()  # [T, S, Hkv, D]
    # a hidden sink reads row 0 (another token's sink) with weight 0, but 0·NaN = NaN: its value is zeroed, so
    # only the values a query sees reach it (a visible NaN stays NaN whatever its weight, as in the reference)
    v = v_sinks[rows].float().masked_fill(~visible[:, :, None, None], 0.0)
    qg = q.float().view(num_tokens, hkv, group, -1)
    x = torch.einsum("thgd,tshd->thgs", qg, k)
    dist = (s[None, :] - diag[:, None]).float()  # [T, S], key minus query as in the kernels
    bias = None
    if c.alibi_slopes is not None:
        slopes = c.alibi_slopes[tok_seq].view(num_tokens, hkv, group, 1)
        bias = slopes * dist[:, None, None, :]
    x = scale_and_cap(x, bias, c)
    if c.rel_bias is not None:
        # implicit mode only (a cyclic cache rejects the regular one): the per-distance table, ends shared
        md = c.rel_bias.max_distance
        table = c.rel_bias.distance_table()  # [Hq, 2·md + 1]
        rel = table[:, (dist.long().clamp(-md, md) + md)]  # [Hq, T, S]
        x = x + rel.view(hkv, group, num_tokens, sinks).permute(2, 0, 1, 3)
    x = x.masked_fill(~visible[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(x, dim=-1)  # [T, Hkv, group]
    p = torch.exp(x - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    o = torch.einsum("thgs,tshd->thgd", p, v)
    return o.reshape(num_tokens, c.num_heads_q, -1), lse.reshape(num_tokens, c.num_heads_q).T
