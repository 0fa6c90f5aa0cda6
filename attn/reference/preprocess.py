"""The generation phase's pre-processing, written to be read: QKV bias, rotary embedding, append to the cache.

Before attending, each new token's fused projection ``qkv`` (TensorRT-LLM's input: ``[T, (Hq + 2·Hkv)·D]``) is
split into heads, the bias is added, q and k are rotated by their positions (RoPE), and k and v are written
into the KV cache. TensorRT-LLM's generation kernel does all of this in one pass; ``attn.fast.preprocess``
does too.

RoPE (Su et al., 2021) rotates pairs of features of q and k by an angle proportional to the token's position,
``θ_i = base^(-2i/r)`` for pair ``i`` of the first ``r = rotary_dim`` features, so that ``q_m · k_n`` depends
on ``m − n`` only. Two pairings are in use:

- ``"neox"`` (GPT-NeoX, Llama, HF's ``rotate_half``): pair ``i`` is features ``(i, i + r/2)``;
- ``"gptj"`` (GPT-J, interleaved): pair ``i`` is features ``(2i, 2i + 1)``.

Features ``r..D`` pass through unrotated (partial rotary, e.g. GPT-NeoX's ``rotary_pct = 0.25``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import _is_number, check_preprocess
from .kv_cache import append_kv


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling variant, with Hugging Face's parameter names (``rope_parameters`` in its configs).

    Attributes:
        type: ``"linear"`` (position interpolation: every frequency divided by ``factor``), ``"dynamic"``
            (NTK-aware: the base grows once the sequence outgrows ``original_max_position``), ``"llama3"``
            (Llama 3.1: low frequencies divided by ``factor``, high ones kept, a smooth ramp between), or
            ``"yarn"`` (YaRN: a ramp between interpolated and original frequencies by their rotations over the
            original context, and cos/sin multiplied by an attention factor).
        factor: the context extension factor.
        original_max_position: the context length the model was trained with (``dynamic``, ``llama3``,
            ``yarn``).
        low_freq_factor: ``llama3``: wavelengths above ``original_max_position / low_freq_factor`` are scaled.
        high_freq_factor: ``llama3``: wavelengths below ``original_max_position / high_freq_factor`` are kept.
        beta_fast: ``yarn``: rotation count above which frequencies are kept.
        beta_slow: ``yarn``: rotation count below which frequencies are interpolated.
        attention_factor: ``yarn``: the cos/sin multiplier; inferred from ``factor`` (and ``mscale``,
            ``mscale_all_dim``) when None.
        mscale: ``yarn``: DeepSeek's numerator coefficient of the inferred attention factor.
        mscale_all_dim: ``yarn``: DeepSeek's denominator coefficient.
        truncate: ``yarn``: round the correction range to whole dimensions.
    """

    type: str
    factor: float = 1.0
    original_max_position: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.type not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling.type must be one of {ROPE_SCALING_TYPES}, got {self.type!r}")
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor must be positive, got {self.factor!r}")
        if self.type in ("dynamic", "llama3", "yarn") and not self.original_max_position:
            raise ValueError(f"rope_scaling of type {self.type!r} needs original_max_position")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError("rope_scaling llama3 needs high_freq_factor > low_freq_factor > 0")


ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3", "yarn")


def check_rope_options(base, scaling) -> None:
    """``rope_base`` a positive finite number (a NaN, zero or negative base turns every key NaN), and
    ``rope_scaling`` a `RopeScaling` or None."""
    if not _is_number(base) or not math.isfinite(base) or base <= 0:
        raise ValueError(f"rope_base must be a positive finite number, got {base!r}")
    if scaling is not None and not isinstance(scaling, RopeScaling):
        raise TypeError(f"rope_scaling must be a RopeScaling or None, got {type(scaling).__name__}")


def rope_inv_freq(
    rotary_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """The rotation frequencies ``θ_i`` of the pairs, float32 ``[r/2]``, and the factor cos/sin are scaled by.

    Plain RoPE: ``θ_i = base^(-2i/r)``. The scaling variants reshape this spectrum so that a model trained on
    ``original_max_position`` tokens can read longer sequences. ``seq_len`` (the sequence length the table
    serves) matters only to ``dynamic``.
    """
    check_rope_options(base, scaling)
    r = rotary_dim
    exponents = torch.arange(0, r, 2, dtype=torch.int64).float() / r
    if scaling is None:
        return 1.0 / (base**exponents), 1.0
    f = scaling.factor
    if scaling.type == "linear":
        # position interpolation: position p behaves as p / factor
        return 1.0 / (base**exponents) / f, 1.0
    if scaling.type == "dynamic":
        # NTK-aware: raise the base so the slowest pair stretches over the longer sequence, the fastest barely
        n = max(seq_len or 0, scaling.original_max_position)
        grown = base * ((f * n / scaling.original_max_position) - (f - 1)) ** (r / (r - 2))
        return 1.0 / (grown**exponents), 1.0
    inv_freq = 1.0 / (base**exponents)
    if scaling.type == "llama3":
        wavelength = 2 * math.pi / inv_freq
        context = scaling.original_max_position
        low, high = scaling.low_freq_factor, scaling.high_freq_factor
        # pairs that turn less than `low` times over the trained context are interpolated, more than `high`
        # times kept, and the ones between blend linearly in the number of turns
        turns = context / wavelength
        blend = ((turns - low) / (high - low)).clamp(0, 1)
        return (1 - blend) * inv_freq / f + blend * inv_freq, 1.0
    # yarn: the same blend, with the boundaries given in rotations over the trained context, per dimension
    context = scaling.original_max_position

    def dim_of(rotations):
        return r * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
    if scaling.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, r - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = ((torch.arange(r // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency (fast pairs), 0: interpolate (slow pairs)
    inv_freq = inv_freq / f * (1 - keep) + inv_freq * keep
    attention = scaling.attention_factor
    if attention is None:

        def m(scale, coeff=1.0):
            return 1.0 if scale <= 1 else 0.1 * coeff * math.log(scale) + 1.0

        if scaling.mscale and scaling.mscale_all_dim:
            attention = m(f, scaling.mscale) / m(f, scaling.mscale_all_dim)
        else:
            attention = m(f)
    return inv_freq, float(attention)


def pair_indices(rotary_dim: int, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two feature indices of each rotated pair: ``(first, second)``, each ``[r/2]``."""
    i = torch.arange(rotary_dim // 2)
    if style == "neox":
        return i, i + rotary_dim // 2
    return 2 * i, 2 * i + 1


def rope_cos_sin(
    num_positions: int, rotary_dim: int, base: float = 10000.0, device=None, scaling: RopeScaling | None = None
):
    """The cos/sin table of every position below ``num_positions``: ``(cos, sin)``, float32 ``[P, r/2]`` each.

    The angle ``p·θ_i`` is formed in float32, as Hugging Face does, and its cos and sin are taken accurately;
    a scaling variant changes the frequencies ``θ_i`` and may multiply cos and sin by an attention factor
    (YaRN). For ``dynamic`` scaling the table depends on the length it serves: ``num_positions``.
    Kernels read this table instead of evaluating cos/sin themselves: the GPU's fast cos/sin lose accuracy
    for angles of thousands of radians (position 100k at θ_0 = 1), and a scaled RoPE variant is just another
    table.
    """
    inv_freq, attention_factor = rope_inv_freq(rotary_dim, base, scaling, seq_len=num_positions)
    positions = torch.arange(num_positions, device=device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq.to(device)[None, :]  # [P, r/2]
    return torch.cos(angles) * attention_factor, torch.sin(angles) * attention_factor


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    rotary_dim: int | None = None,
    base: float = 10000.0,
    style: str = "neox",
    scaling: RopeScaling | None = None,
    num_positions: int | None = None,
) -> torch.Tensor:
    """Rotates the first ``rotary_dim`` features of every head of ``x`` by its token's position.

    Args:
        x: ``[T, H, D]``.
        positions: int ``[T]``, each token's position in its sequence.
        rotary_dim: features rotated (even, at most D); defaults to D.
        base: the frequency base θ (10000 in most models).
        style: ``"neox"`` or ``"gptj"`` pairing.
        scaling: a RoPE scaling variant, or None.
        num_positions: the sequence length the frequencies serve (``dynamic`` scaling depends on it);
            defaults to the largest position + 1.

    Returns:
        ``[T, H, D]`` in x's dtype; angles in float32 as in Hugging Face, the rotation in float32.
    """
    rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
    if num_positions is None:
        num_positions = int(positions.max()) + 1 if positions.numel() else 1
    cos_table, sin_table = rope_cos_sin(num_positions, rotary_dim, base, x.device, scaling)
    cos, sin = cos_table[positions.long()][:, None, :], sin_table[positions.long()][:, None, :]  # [T, 1, r/2]
    return rotate_pairs(x, cos, sin, rotary_dim, style)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, style: str) -> torch.Tensor:
    """The rotation itself: each RoPE pair ``(a, b)`` of ``x [T, H, D]`` becomes ``(a·cos − b·sin, b·cos + a·sin)``,
    with ``cos, sin [T, 1, rotary_dim/2]`` per token and pair; in float32, returned in x's dtype."""
    first, second = (idx.to(x.device) for idx in pair_indices(rotary_dim, style))
    out = x.float().clone()
    a, b = out[..., first], out[..., second]  # [T, H, r/2] each (copies)
    out[..., first] = a * cos - b * sin
    out[..., second] = b * cos + a * sin
    return out.to(x.dtype)


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
    validate: bool = True,
) -> torch.Tensor:
    """Splits, biases and rotates new tokens' fused QKV, appends their K/V to the cache, and returns q.

    Args:
        qkv: new tokens' fused projections, packed ``[T, (Hq + 2·Hkv)·D]`` with ``cu_seqlens_new``, or padded
            ``[B, S_new, (Hq + 2·Hkv)·D]``; the cache's dtype. Within a row: the q heads, then k, then v.
        k_cache: contiguous ``[B, max_len, Hkv, D]`` or paged pool ``[num_blocks, block_size, Hkv, D]``.
        v_cache: same shape and dtype as ``k_cache``.
        cache_seqlens: int32 ``[B]``, tokens cached before these; new token ``i`` of sequence ``b`` is at
            position ``cache_seqlens[b] + i`` (its RoPE angle and its cache slot). Not updated here.
        num_heads_q: Hq.
        num_heads_kv: Hkv.
        cu_seqlens_new: int32 ``[B+1]``, prefix sums of the new tokens per sequence (packed ``qkv``).
        block_table: int32 ``[B, max_blocks]`` for a paged pool, else None.
        qkv_bias: ``[(Hq + 2·Hkv)·D]`` added to every row before anything else, or None.
        rotary_dim: features of each q/k head to rotate (even, at most D); 0 disables RoPE.
        rope_base: the frequency base θ.
        rope_style: ``"neox"`` or ``"gptj"``.
        rope_scaling: a `RopeScaling` variant, or None. Its frequencies serve the longest sequence of the
            call (cached plus new tokens), which is what ``dynamic`` scaling depends on.
        k_scale: for an int8 / float8_e4m3fn cache, the K dequantization scale, float ``[1]`` or ``[Hkv]``; the
            keys are rounded to qkv's dtype, then quantized as `append_kv` does.
        v_scale: likewise for V.
        max_attention_window: append into a cyclic cache of this many slots, as `append_kv` does.
        sink_token_length: StreamingLLM's sinks, as in `append_kv`. Then RoPE moves to read time
            (TensorRT-LLM's position shift): k is cached unrotated, and q is rotated by its position *within
            the cache* after the append (`cache_positions`), the frame in which `decode` rotates the keys
            (pass it the same ``rotary_dim``, ``rope_base``, ``rope_style``, ``rope_scaling``). The cos/sin
            table then serves ``max_attention_window`` positions.
        validate: check lengths and block-table entries on the host first. With False nothing is read back
            from the device (the positions are computed there, and the cos/sin table covers the cache's
            capacity, which is also the length ``dynamic`` scaling then serves): for inputs already checked,
            inside CUDA-graph capture or a serving loop's hot path.

    Returns:
        ``q`` shaped ``[T, Hq, D]`` (packed) or ``[B, S_new, Hq, D]`` (padded), rotated, in qkv's dtype.
    """
    args = check_preprocess(
        qkv, k_cache, v_cache, cache_seqlens, num_heads_q, num_heads_kv, cu_seqlens_new, block_table, qkv_bias,
        rotary_dim, rope_style, k_scale, v_scale, validate, max_attention_window, sink_token_length,
    )  # fmt: skip
    d = args.head_dim
    sinks = args.append.sink_token_length
    # bias and rotation in float32, one rounding to the cache's dtype at the end
    rows = qkv.reshape(-1, (num_heads_q + 2 * num_heads_kv) * d).float()
    if qkv_bias is not None:
        rows = rows + qkv_bias.float()
    heads = rows.view(-1, num_heads_q + 2 * num_heads_kv, d)
    q = heads[:, :num_heads_q]
    k = heads[:, num_heads_q : num_heads_q + num_heads_kv]
    v = heads[:, num_heads_q + num_heads_kv :]
    if rotary_dim and sinks:
        # position shift: k stays unrotated in the cache; q turns by its place in the cache after this append
        positions = cache_positions(args.positions, args.token_seq, _lengths_after(qkv, cache_seqlens, cu_seqlens_new),
                                    max_attention_window, sinks)  # fmt: skip
        q = apply_rope(q, positions, rotary_dim=rotary_dim, base=rope_base, style=rope_style, scaling=rope_scaling,
                       num_positions=max_attention_window)  # fmt: skip
    elif rotary_dim:
        kw = dict(rotary_dim=rotary_dim, base=rope_base, style=rope_style, scaling=rope_scaling,
                  num_positions=args.num_positions)  # fmt: skip
        q = apply_rope(q, args.positions, **kw)
        k = apply_rope(k, args.positions, **kw)
    q, k, v = (x.to(qkv.dtype) for x in (q, k, v))
    cyclic = dict(max_attention_window=max_attention_window, sink_token_length=sink_token_length)
    if args.packed:
        append_kv(k_cache, v_cache, k, v, cache_seqlens, cu_seqlens_new=cu_seqlens_new, block_table=block_table,
                  k_scale=k_scale, v_scale=v_scale, **cyclic)  # fmt: skip
        return q.contiguous()
    b, s = qkv.shape[:2]
    append_kv(
        k_cache, v_cache, k.reshape(b, s, num_heads_kv, d), v.reshape(b, s, num_heads_kv, d), cache_seqlens,
        block_table=block_table, k_scale=k_scale, v_scale=v_scale, **cyclic,
    )  # fmt: skip
    return q.reshape(b, s, num_heads_q, d).contiguous()


def _lengths_after(qkv, cache_seqlens, cu_seqlens_new) -> torch.Tensor:
    """Each sequence's token count after the append, on the device (nothing read back)."""
    if cu_seqlens_new is not None:
        return cache_seqlens + (cu_seqlens_new[1:] - cu_seqlens_new[:-1])
    return cache_seqlens + qkv.shape[1]


def cache_positions(
    positions: torch.Tensor, token_seq: torch.Tensor, lengths: torch.Tensor, window: int, sinks: int
) -> torch.Tensor:
    """Each token's position *within* a cyclic cache with sinks, once its sequence holds ``lengths`` tokens.

    The cache holds the ``S`` sinks and the last ``N − S`` tokens; in token order they take positions
    ``0..min(L, N)-1``: a sink keeps its own, and token ``t`` of the rolling part gets ``S + t − w``, ``w``
    being the oldest token still cached, ``max(S, L − (N − S))``.

    Args:
        positions: int ``[T]``, each token's position in its sequence (one still cached).
        token_seq: int ``[T]``, each token's sequence.
        lengths: int ``[B]``, each sequence's token count.
        window: N.
        sinks: S.
    """
    oldest = (lengths.long()[token_seq.long()] - (window - sinks)).clamp(min=sinks)
    positions = positions.long()
    return torch.where(positions < sinks, positions, sinks + positions - oldest)
