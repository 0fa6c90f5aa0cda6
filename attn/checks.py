"""Input validation shared by the reference and the fast kernels.

Both implementations call the same checker, so they accept and reject exactly the same inputs, and the
errors name the argument at fault. The checker also normalises the options (scale, window, lengths) into
one small record, so the two implementations cannot drift on defaults either.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from . import _memo

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# quantized KV-cache storage: symmetric INT8 (values in [-127, 127]) and FP8 e4m3 (saturating at +-448)
QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)
QUANT_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
# the largest finite fp16: decode over an INT8/FP8 cache multiplies in fp16 (attn.fast.decode)
F16_MAX = 65504.0


def check_kv_scales(k_cache, k_scale, v_scale, num_heads_kv, validate=True):
    """Checks the dequantization scales of a quantized cache (``x ≈ stored · scale``).

    Returns:
        float32 ``(k_scale, v_scale)``, each ``[Hkv]`` (a per-tensor ``[1]`` scale is expanded), or
        ``(None, None)`` for an unquantized cache.
    """
    quantized = k_cache.dtype in QUANT_DTYPES
    if not quantized:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale/v_scale apply to int8 or float8_e4m3fn caches, not {k_cache.dtype}")
        return None, None
    out = []
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"a {k_cache.dtype} cache needs {name} (the dequantization scale)")
        if not isinstance(scale, torch.Tensor) or not scale.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if scale.shape not in ((1,), (num_heads_kv,)) or scale.device != k_cache.device:
            raise ValueError(
                f"{name} must be [1] or [Hkv={num_heads_kv}] on {k_cache.device}, got {tuple(scale.shape)} on "
                f"{scale.device}"
            )
        # reading the values waits for the device (and cannot happen inside CUDA-graph capture)
        if validate and (not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all())):
            raise ValueError(f"{name} must be positive and finite, got {scale.tolist()}")
        out.append(_per_head_scale(scale, num_heads_kv))
    return out[0], out[1]


_SCALES: dict = {}


def _per_head_scale(scale: torch.Tensor, num_heads_kv: int) -> torch.Tensor:
    """float32 ``[Hkv]`` from a ``[1]`` or ``[Hkv]`` scale: the kernels index scales by KV head.

    Expanding a per-tensor scale is a copy kernel; for K and V that is two launches per quantized call (seen by
    Nsight Compute beside each decode), so the copy is kept for as long as the same tensor lives unchanged.
    """
    if scale.dtype == torch.float32 and scale.shape == (num_heads_kv,) and scale.is_contiguous():
        return scale
    return _memo.derived(
        _SCALES, scale, num_heads_kv, lambda: scale.float().expand(num_heads_kv).contiguous(), limit=256
    )


@dataclass(frozen=True)
class AttentionArgs:
    """The validated, normalised description of one attention call.

    Attributes:
        packed: True for the packed (varlen) layout, False for padded.
        batch: number of sequences B.
        num_heads_q: query heads Hq.
        num_heads_kv: key/value heads Hkv (divides Hq).
        head_dim: D.
        max_seqlen_q: longest query sequence (the padded length in padded mode).
        max_seqlen_k: longest key sequence (the padded length in padded mode).
        seqlens_q: int32 ``[B]`` on q's device in padded mode, else None.
        seqlens_k: int32 ``[B]`` on q's device in padded mode, else None.
        scale: the multiplier of ``q·k``: ``softmax_scale / q_scaling``.
        window_left: keys at most this far left of the diagonal are visible; -1 means unbounded.
        window_right: keys at most this far right of the diagonal are visible; -1 means unbounded.
        softcap: 0 for none, else the cap of ``cap·tanh(s/cap)``.
        alibi_slopes: float32 ``[B, Hq]`` ALiBi slopes (a ``[Hq]`` input is expanded, not copied), or None.
        alibi_with_scale: TensorRT-LLM's ``alibi_with_scale`` order: ``(q·k + bias)·scale`` rather than
            ``q·k·scale + bias``.
        rel_bias: a validated ``RelativeBias`` (T5), or None.
    """

    packed: bool
    batch: int
    num_heads_q: int
    num_heads_kv: int
    head_dim: int
    max_seqlen_q: int
    max_seqlen_k: int
    seqlens_q: torch.Tensor | None
    seqlens_k: torch.Tensor | None
    scale: float
    window_left: int
    window_right: int
    softcap: float
    alibi_slopes: torch.Tensor | None = None
    alibi_with_scale: bool = False
    rel_bias: object | None = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head: 1 for MHA, Hq for MQA."""
        return self.num_heads_q // self.num_heads_kv


def _check_tensor(name: str, x, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> list[int]:
    _check_cu_shape(name, cu, device)
    # one host copy: the kernels index memory with these offsets, so they are checked before any launch
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal the packed length {total}, got {values[-1]}")
    return [b - a for a, b in zip(values, values[1:])]


_FULL_LENGTHS: dict = {}


def _full_lengths(batch: int, capacity: int, device: torch.device) -> torch.Tensor:
    """``[batch]`` int32 lengths all equal to ``capacity``, made once per shape: a padded call without lengths
    otherwise ran a fill kernel for each of q and k before the attention kernel (seen by Nsight Compute).
    Kernels only read these."""
    build = functools.partial(torch.full, (batch,), capacity, dtype=torch.int32, device=device)
    return _memo.by_key(_FULL_LENGTHS, (batch, capacity, device), build, limit=256, device=device)


def _check_cu_shape(name: str, cu, device: torch.device) -> list:
    """``cu_seqlens`` without reading its values: an int32 ``[B+1]`` tensor on ``device``; returns ``[0] * B``."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with B+1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {cu.device}")
    return [0] * (cu.numel() - 1)


def _check_seqlens(name: str, lens, batch: int, capacity: int, device: torch.device, validate=True) -> torch.Tensor:
    if lens is None:
        return _full_lengths(batch, capacity, device)
    if not isinstance(lens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(lens).__name__}")
    if lens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {lens.dtype}")
    if lens.shape != (batch,):
        raise ValueError(f"{name} must have shape [B]=({batch},), got {tuple(lens.shape)}")
    if lens.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {lens.device}")
    if not validate:
        return lens
    values = lens.tolist()
    bad = [x for x in values if x < 0 or x > capacity]
    if bad:
        raise ValueError(f"{name} entries must lie in [0, {capacity}] (the padded length), got {bad}")
    return lens


def _check_max_seqlen(name: str, given, lens: list[int]) -> int:
    actual = max(lens) if lens else 0
    if given is None:
        return actual
    if not isinstance(given, int) or isinstance(given, bool):
        raise TypeError(f"{name} must be an int, got {type(given).__name__}")
    if given < actual:
        raise ValueError(f"{name}={given} is smaller than the longest sequence ({actual})")
    return given


# the most parts `decode` cuts a cache into when asked (its heuristic stays at or below 256): each part's partial
# output is a float32 row of the head dim, so an unbounded count is an unbounded allocation
MAX_SPLITS = 1024


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_device(name: str, device) -> torch.device:
    """A ``device=`` argument as a `torch.device`: a string, an index or a device that names one this process can
    use (a CUDA device on a machine without CUDA is refused here, not by the first tensor made on it)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must name a torch device ('cpu', 'cuda', 'cuda:0', ...), got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} is {device!r}, but this machine has no CUDA device")
    return dev


def check_flag(name: str, value) -> None:
    """A switch (``causal``, ``return_lse``, ``validate``, ...) must be a bool: a string, a number or a tensor in
    its place is a caller's bug that ``if value:`` would read as True, or fail on with a message naming nothing."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_options(head_dim, causal, softmax_scale, q_scaling, window_size, softcap):
    """Checks the score options shared by every attention call; returns ``(scale, left, right, softcap)``."""
    check_flag("causal", causal)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if not _is_number(softmax_scale) or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale!r}")
    if not _is_number(q_scaling) or not math.isfinite(q_scaling) or q_scaling <= 0:
        raise ValueError(f"q_scaling must be a positive finite number, got {q_scaling!r}")

    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= 0, or -1 for unbounded, got {tuple(window_size)}")
    if causal:
        if right > 0:
            raise ValueError(f"window_size right={right} contradicts causal=True (which means right=0)")
        right = 0

    if not _is_number(softcap) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 disables it), got {softcap!r}")

    return float(softmax_scale) / float(q_scaling), left, right, float(softcap)


ALIBI_MODES = ("alibi", "alibi_with_scale")


def _check_alibi(alibi_slopes, alibi_mode, batch, num_heads_q, device):
    """Checks ALiBi slopes (``[Hq]`` or ``[B, Hq]``) and the mode; returns float32 ``[B, Hq]`` (or None)."""
    if alibi_mode not in ALIBI_MODES:
        raise ValueError(f"alibi_mode must be one of {ALIBI_MODES}, got {alibi_mode!r}")
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.dtype.is_floating_point:
        raise TypeError("alibi_slopes must be a floating-point torch.Tensor")
    if alibi_slopes.shape not in ((num_heads_q,), (batch, num_heads_q)):
        raise ValueError(
            f"alibi_slopes must be [Hq]=({num_heads_q},) or [B, Hq]=({batch}, {num_heads_q}), "
            f"got {tuple(alibi_slopes.shape)}"
        )
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be on q's device {device}, got {alibi_slopes.device}")
    slopes = alibi_slopes.float()
    return slopes.expand(batch, num_heads_q) if slopes.dim() == 1 else slopes


def _check_rel_bias(rel, num_heads_q, max_position, device):
    """Checks a T5 ``RelativeBias``: exactly one of ``table`` (implicit) and ``bias`` (regular)."""
    if rel is None:
        return None
    table, bias = getattr(rel, "table", None), getattr(rel, "bias", None)
    if (table is None) == (bias is None):
        raise ValueError("rel_bias must have exactly one of table (implicit mode) and bias (regular mode)")
    x, name = (table, "rel_bias.table") if table is not None else (bias, "rel_bias.bias")
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if x.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {x.device}")
    if table is not None:
        if table.dim() != 2 or table.shape[0] != num_heads_q or table.shape[1] < 2:
            raise ValueError(f"rel_bias.table must be [Hq={num_heads_q}, num_buckets >= 2], got {tuple(table.shape)}")
        half = table.shape[1] // 2 if rel.bidirectional else table.shape[1]
        exact = half // 2
        md = rel.max_distance
        if not isinstance(md, int) or isinstance(md, bool) or md <= 0 or md <= exact:
            raise ValueError(
                f"rel_bias.max_distance must be an int above the exact buckets ({exact} for {table.shape[1]} "
                f"buckets), got {md!r}"
            )
    elif bias.dim() != 3 or bias.shape[0] != num_heads_q or min(bias.shape[1:]) < max_position:
        raise ValueError(
            f"rel_bias.bias must be [Hq={num_heads_q}, L, L] with L >= {max_position} (the longest key sequence), "
            f"got {tuple(bias.shape)}"
        )
    return rel


def _bias_extent(rel, default: int) -> tuple:
    """The positions a regular T5 bias ``[Hq, L, L]`` covers (``min`` of its last two dims), else ``default``."""
    bias = getattr(rel, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.dim() == 3:
        return (min(bias.shape[1], bias.shape[2]),)
    return (default,)


def _check_cyclic(max_attention_window, capacity):
    """A cyclic cache's size N (TensorRT-LLM's ``max_attention_window_size``): an int in [1, capacity]."""
    if max_attention_window is None:
        return None
    n = max_attention_window
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= capacity:
        raise ValueError(f"max_attention_window must be an int in [1, {capacity}] (the cache capacity), got {n!r}")
    return n


def _check_rotary(rotary_dim, rope_style, head_dim) -> None:
    """RoPE's features per head (an even int in [0, D]; 0: none) and its pairing."""
    if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool) or rotary_dim < 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even int >= 0 (0 disables RoPE), got {rotary_dim!r}")
    if rotary_dim > head_dim:
        raise ValueError(f"rotary_dim ({rotary_dim}) must be at most the head dim ({head_dim})")
    if rope_style not in ("neox", "gptj"):
        raise ValueError(f"rope_style must be 'neox' or 'gptj', got {rope_style!r}")


def _check_sinks(sink_token_length, window) -> int:
    """StreamingLLM's sink tokens S: an int in [0, N) that needs a cyclic cache of N slots (0 turns them off)."""
    s = sink_token_length
    if not isinstance(s, int) or isinstance(s, bool) or s < 0:
        raise ValueError(f"sink_token_length must be an int >= 0, got {s!r}")
    if s and window is None:
        raise ValueError("sink_token_length needs max_attention_window: sinks pin the start of a cyclic cache")
    if s and s >= window:
        raise ValueError(
            f"sink_token_length ({s}) must be below max_attention_window ({window}): the window needs a slot"
        )
    return s


def check_attention(
    q,
    k,
    v,
    *,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    seqlens_q=None,
    seqlens_k=None,
    causal=False,
    softmax_scale=None,
    q_scaling=1.0,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    alibi_mode="alibi",
    rel_bias=None,
    dtypes=FLOAT_DTYPES,
    validate=True,
) -> AttentionArgs:
    """Validates the arguments of ``attention`` and returns their normalised form.

    With ``validate=False`` no tensor value is read (the fast kernels clamp them instead, attn.fast._errors):
    packed input takes ``max_seqlen_q``/``max_seqlen_k`` as given, or the packed lengths as bounds, and a
    regular T5 bias covers what it covers (keys past it are reported on the device).

    Raises:
        TypeError: a tensor of the wrong type or dtype.
        ValueError: wrong ranks or shapes, mismatched devices, malformed lengths or options.
    """
    check_flag("validate", validate)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, dtypes)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")

    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (packed layout)")
    rank = 3 if packed else 4
    layout = "packed [T, H, D]" if packed else "padded [B, S, H, D]"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D for the {layout} layout, got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k={tuple(k.shape)}, v={tuple(v.shape)}")
    num_heads_q, head_dim = q.shape[-2], q.shape[-1]
    num_heads_kv = k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k's head dim must equal q's ({head_dim}), got {k.shape[-1]}")
    if head_dim < 1:
        raise ValueError(f"q's head dim must be positive, got {head_dim}")
    if num_heads_kv < 1 or num_heads_q % num_heads_kv != 0:
        raise ValueError(f"k's head count ({num_heads_kv}) must divide q's head count ({num_heads_q}) for MHA/MQA/GQA")

    if packed:
        if seqlens_q is not None or seqlens_k is not None:
            raise ValueError("seqlens_q/seqlens_k belong to the padded layout; packed input uses cu_seqlens")
        if validate:
            lens_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
            lens_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
        else:
            lens_q = _check_cu_shape("cu_seqlens_q", cu_seqlens_q, q.device)
            lens_k = _check_cu_shape("cu_seqlens_k", cu_seqlens_k, q.device)
        if len(lens_q) != len(lens_k):
            raise ValueError(
                f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got B={len(lens_q)} and B={len(lens_k)}"
            )
        batch = len(lens_q)
        if validate:
            max_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, lens_q)
            max_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, lens_k)
        else:
            # FlashAttention's convention: the caller knows the longest sequences; without them the packed
            # lengths bound them (a larger grid, the same result)
            max_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, [0]) if max_seqlen_q is not None else q.shape[0]
            max_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, [0]) if max_seqlen_k is not None else k.shape[0]
            bias = getattr(rel_bias, "bias", None)
            if max_seqlen_k is None and isinstance(bias, torch.Tensor) and bias.dim() == 3:
                max_k = min(max_k, *bias.shape[1:])
        # no packed sequence is longer than the packed rows: a larger hint only sizes a larger grid of programs
        # with nothing to do (an absurd one, one the launch cannot take), so it is cut to the rows
        max_q, max_k = min(max_q, q.shape[0]), min(max_k, k.shape[0])
        if not validate:
            # a hint of 0 over rows that exist would launch no query program at all, leaving the output unwritten
            # with nothing recorded; with one row block per sequence the kernel sees a longer sequence and
            # records it (attn.check_errors)
            max_q = max(max_q, min(q.shape[0], 1))
        seqlens_q_t = seqlens_k_t = None
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q/max_seqlen_k belong to the packed layout; padded input has shapes")
        batch = q.shape[0]
        if k.shape[0] != batch:
            raise ValueError(f"k's batch ({k.shape[0]}) must equal q's ({batch})")
        max_q, max_k = q.shape[1], k.shape[1]
        seqlens_q_t = _check_seqlens("seqlens_q", seqlens_q, batch, max_q, q.device, validate)
        seqlens_k_t = _check_seqlens("seqlens_k", seqlens_k, batch, max_k, q.device, validate)

    scale, left, right, softcap = _check_options(head_dim, causal, softmax_scale, q_scaling, window_size, softcap)
    slopes = _check_alibi(alibi_slopes, alibi_mode, batch, num_heads_q, q.device)
    rel_bias = _check_rel_bias(rel_bias, num_heads_q, max_k, q.device)

    return AttentionArgs(
        packed=packed,
        batch=batch,
        num_heads_q=num_heads_q,
        num_heads_kv=num_heads_kv,
        head_dim=head_dim,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        seqlens_q=seqlens_q_t,
        seqlens_k=seqlens_k_t,
        scale=scale,
        window_left=left,
        window_right=right,
        softcap=float(softcap),
        alibi_slopes=slopes,
        alibi_with_scale=alibi_mode == "alibi_with_scale",
        rel_bias=rel_bias,
    )


@dataclass(frozen=True)
class DecodeArgs:
    """The validated, normalised description of one decode call.

    Attributes:
        batch: number of sequences B.
        seqlen_q: new query tokens per sequence (1 for plain decoding, a few for speculative decoding).
        num_heads_q: query heads Hq.
        num_heads_kv: cache heads Hkv (divides Hq).
        head_dim: D.
        paged: whether the cache is a block pool read through ``block_table``.
        page_size: tokens per block (paged) or the cache length (contiguous).
        capacity: most tokens one sequence's cache can hold.
        max_seqlen_k: the longest ``cache_seqlens`` entry (0 when not validated).
        scale: the multiplier of ``q·k``.
        window_left: as in `AttentionArgs`.
        window_right: as in `AttentionArgs`.
        softcap: as in `AttentionArgs`.
        alibi_slopes: as in `AttentionArgs`.
        alibi_with_scale: as in `AttentionArgs`.
        rel_bias: as in `AttentionArgs`.
        k_scale: float32 ``[Hkv]`` dequantization scales of a quantized cache, else None.
        v_scale: likewise for V.
        max_attention_window: the size N of a cyclic cache (token t in slot t mod N), else None.
        sink_token_length: StreamingLLM's S sink tokens pinned in slots 0..S-1 of the cyclic cache (0: none).
        cache_indirection: int32 ``[B, beam_width, max_len]`` for beam search, else None.
    """

    batch: int
    seqlen_q: int
    num_heads_q: int
    num_heads_kv: int
    head_dim: int
    paged: bool
    page_size: int
    capacity: int
    max_seqlen_k: int
    scale: float
    window_left: int
    window_right: int
    softcap: float
    alibi_slopes: torch.Tensor | None = None
    alibi_with_scale: bool = False
    rel_bias: object | None = None
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    max_attention_window: int | None = None
    cache_indirection: torch.Tensor | None = None
    sink_token_length: int = 0

    @property
    def group_size(self) -> int:
        return self.num_heads_q // self.num_heads_kv


def check_seqlen_hints(max_seqlen_k, total_seqlen_k) -> None:
    """``decode``'s optional split-heuristic hints: non-negative ints (or None), the longest at most the total."""
    for name, x in (("max_seqlen_k", max_seqlen_k), ("total_seqlen_k", total_seqlen_k)):
        if x is not None and (not isinstance(x, int) or isinstance(x, bool) or x < 0):
            raise ValueError(f"{name} must be None or an int >= 0, got {x!r}")
    if max_seqlen_k is not None and total_seqlen_k is not None and max_seqlen_k > total_seqlen_k:
        raise ValueError(f"max_seqlen_k ({max_seqlen_k}) cannot exceed total_seqlen_k ({total_seqlen_k})")


def check_decode(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    *,
    block_table=None,
    causal=False,
    softmax_scale=None,
    q_scaling=1.0,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    alibi_mode="alibi",
    rel_bias=None,
    k_scale=None,
    v_scale=None,
    max_attention_window=None,
    cache_indirection=None,
    num_splits=None,
    validate=True,
    dtypes=FLOAT_DTYPES,
    sink_token_length=0,
    rotary_dim=0,
    rope_style="neox",
) -> DecodeArgs:
    """Validates the arguments of ``decode`` and returns their normalised form.

    With ``validate=False`` the checks that read tensor values (and so wait for the device) are skipped:
    lengths within capacity, block-table and indirection entries inside their ranges, scale values. The fast
    kernels clamp such values instead and record them for ``attn.check_errors`` (attn.fast._errors).

    Raises:
        TypeError: a tensor of the wrong type or dtype.
        ValueError: wrong ranks or shapes, mismatched devices, lengths or block indices out of range.
    """
    # A serving loop calls this once per layer and step with validate=False, so every check here reads each
    # attribute once and the option checks run only for non-default options: on the H200 machine's host the
    # function took 18 µs of a decode call that the GPU finishes in tens of microseconds.
    check_flag("validate", validate)
    _check_tensor("q", q, dtypes)
    kv_dtypes = dtypes + QUANT_DTYPES
    _check_tensor("k_cache", k_cache, kv_dtypes)
    _check_tensor("v_cache", v_cache, kv_dtypes)
    cache_dtype = k_cache.dtype
    if v_cache.dtype != cache_dtype or (cache_dtype != q.dtype and cache_dtype not in QUANT_DTYPES):
        raise TypeError(
            f"k_cache and v_cache must have q's dtype {q.dtype} (or be an int8/float8_e4m3fn quantized cache), "
            f"got k_cache={k_cache.dtype}, v_cache={v_cache.dtype}"
        )
    device = q.device
    if k_cache.device != device:
        raise ValueError(f"k_cache must be on q's device {device}, got {k_cache.device}")
    if v_cache.device != device:
        raise ValueError(f"v_cache must be on q's device {device}, got {v_cache.device}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, Sq, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be 4-D, got shape {tuple(k_cache.shape)}")
    if v_cache.dim() != 4:
        raise ValueError(f"v_cache must be 4-D, got shape {tuple(v_cache.shape)}")
    cache_shape = k_cache.shape
    if cache_shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    pool_len, page_size, num_heads_kv, cache_dim = cache_shape
    if cache_dim != head_dim:
        raise ValueError(f"k_cache's head dim must equal q's ({head_dim}), got {cache_dim}")
    if num_heads_kv < 1 or num_heads_q % num_heads_kv != 0:
        raise ValueError(
            f"k_cache's head count ({num_heads_kv}) must divide q's head count ({num_heads_q}) for MHA/MQA/GQA"
        )
    if seqlen_q < 1:
        raise ValueError(f"q must hold at least one new token per sequence, got Sq={seqlen_q}")

    paged = block_table is not None
    if paged:
        if not isinstance(block_table, torch.Tensor):
            raise TypeError(f"block_table must be a torch.Tensor, got {type(block_table).__name__}")
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table must be int32, got {block_table.dtype}")
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must be [B={batch}, max_blocks], got shape {tuple(block_table.shape)}")
        if block_table.device != device:
            raise ValueError(f"block_table must be on q's device {device}, got {block_table.device}")
        capacity = block_table.shape[1] * page_size
    else:
        if pool_len != batch:
            raise ValueError(f"k_cache's batch ({pool_len}) must equal q's ({batch}) for a contiguous cache")
        capacity = page_size

    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must have shape [B]=({batch},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens must be on q's device {device}, got {cache_seqlens.device}")

    window = None if max_attention_window is None else _check_cyclic(max_attention_window, capacity)
    sinks = 0
    if type(sink_token_length) is not int or sink_token_length != 0:
        sinks = _check_sinks(sink_token_length, window)
    if type(rotary_dim) is not int or rotary_dim != 0 or rope_style != "neox":
        _check_rotary(rotary_dim, rope_style, head_dim)
    if rotary_dim and cache_indirection is not None:
        raise ValueError("rotary_dim (RoPE when reading the cache) with cache_indirection is not supported")
    if window is not None and getattr(rel_bias, "bias", None) is not None:
        raise ValueError("rel_bias in regular mode indexes absolute positions; it cannot read a cyclic cache")
    if cache_indirection is not None:
        _check_indirection(cache_indirection, batch, device, window)
    max_seqlen_k = 0
    if validate:
        max_seqlen_k = _check_decode_values(
            q, k_cache, cache_seqlens, block_table, cache_indirection, batch, capacity, page_size, window
        )

    if num_splits is not None and (not _is_int(num_splits) or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be None (automatic) or an int in [1, {MAX_SPLITS}], got {num_splits!r}")

    scale, left, right, softcap = _check_options(head_dim, causal, softmax_scale, q_scaling, window_size, softcap)
    slopes = None
    if alibi_slopes is not None or alibi_mode != "alibi":
        slopes = _check_alibi(alibi_slopes, alibi_mode, batch, num_heads_q, device)
    if rel_bias is not None:
        # unvalidated, a regular bias covers what it covers: the kernels clamp lengths to its L (and report)
        bound = max_seqlen_k if validate else min(capacity, *_bias_extent(rel_bias, capacity))
        rel_bias = _check_rel_bias(rel_bias, num_heads_q, bound, device)
    k_scale, v_scale = check_kv_scales(k_cache, k_scale, v_scale, num_heads_kv, validate)
    return DecodeArgs(
        batch=batch,
        seqlen_q=seqlen_q,
        num_heads_q=num_heads_q,
        num_heads_kv=num_heads_kv,
        head_dim=head_dim,
        paged=paged,
        page_size=page_size,
        capacity=capacity,
        max_seqlen_k=max_seqlen_k,
        scale=scale,
        window_left=left,
        window_right=right,
        softcap=softcap,
        alibi_slopes=slopes,
        alibi_with_scale=alibi_mode == "alibi_with_scale",
        rel_bias=rel_bias,
        k_scale=k_scale,
        v_scale=v_scale,
        max_attention_window=window,
        cache_indirection=cache_indirection,
        sink_token_length=sinks,
    )


def _check_indirection(cache_indirection, batch: int, device, window) -> None:
    """Beam search's ``[B, beam_width, max_len]`` int32 indirection, without reading its values."""
    if not isinstance(cache_indirection, torch.Tensor) or cache_indirection.dtype != torch.int32:
        raise TypeError("cache_indirection must be an int32 torch.Tensor [B, beam_width, max_len]")
    if cache_indirection.dim() != 3 or cache_indirection.shape[0] * cache_indirection.shape[1] != batch:
        raise ValueError(
            f"cache_indirection must be [B, beam_width, max_len] with B·beam_width = q's batch ({batch}), "
            f"got {tuple(cache_indirection.shape)}"
        )
    if cache_indirection.device != device:
        raise ValueError(f"cache_indirection must be on q's device {device}, got {cache_indirection.device}")
    if window is not None:
        raise ValueError("cache_indirection with a cyclic cache is not supported")


def _check_decode_values(q, k_cache, cache_seqlens, block_table, cache_indirection, batch, capacity, page_size,
                         window) -> int:  # fmt: skip
    """The checks that read tensor values on the host (``validate=True``); returns the longest length."""
    lens = cache_seqlens.tolist()
    # a cyclic cache keeps counting tokens past its size: only the last `window` are still stored
    bad = [x for x in lens if x < 0 or (window is None and x > capacity)]
    if bad:
        raise ValueError(f"cache_seqlens entries must lie in [0, {capacity}] (the cache capacity), got {bad}")
    max_seqlen_k = max(lens) if lens else 0
    if cache_indirection is not None and batch:
        if max_seqlen_k > cache_indirection.shape[2]:
            raise ValueError(
                f"cache_indirection covers {cache_indirection.shape[2]} tokens, fewer than the longest "
                f"cache_seqlens entry ({max_seqlen_k})"
            )
        beam = cache_indirection.shape[1]
        used = torch.arange(cache_indirection.shape[2], device=q.device)[None, :] < cache_seqlens.view(
            -1, 1
        )  # [B·beam, max_len]
        ind = cache_indirection.reshape(batch, -1)[:, : used.shape[1]]
        entries = ind[used]
        if entries.numel() and (int(entries.min()) < 0 or int(entries.max()) >= beam):
            raise ValueError(f"cache_indirection entries in use must lie in [0, {beam}) (the beam width)")
        if block_table is not None:
            # token t of beam j is read from the block-table row of the beam its entry names, not from beam j's
            # own: every (row, column) so named must lie inside the pool
            rows = (torch.arange(batch, device=q.device) // beam * beam)[:, None] + ind.long()
            cols = (torch.arange(ind.shape[1], device=q.device) // page_size)[None, :].expand_as(ind)
            entries = block_table[rows[used], cols[used]]
            pool = k_cache.shape[0]
            if entries.numel() and (int(entries.min()) < 0 or int(entries.max()) >= pool):
                raise ValueError(
                    f"block_table entries read through cache_indirection must lie in [0, {pool}) (the pool's "
                    f"blocks), got values from {int(entries.min())} to {int(entries.max())}"
                )
            return max_seqlen_k
    if block_table is not None and batch:
        # only the blocks that hold tokens are read; those must all lie inside the pool
        stored = cache_seqlens if window is None else cache_seqlens.clamp(max=window)
        used = (torch.arange(block_table.shape[1], device=q.device)[None, :] * page_size) < stored[:, None]
        entries = block_table[used]
        if entries.numel() and (int(entries.min()) < 0 or int(entries.max()) >= k_cache.shape[0]):
            raise ValueError(
                f"block_table entries in use must lie in [0, {k_cache.shape[0]}) (the pool's blocks), "
                f"got values from {int(entries.min())} to {int(entries.max())}"
            )
    return max_seqlen_k


@dataclass(frozen=True)
class ContextArgs:
    """The validated description of one ``context_attention`` call: the cache side as for ``decode``, plus the
    packed queries.

    Attributes:
        cache: the `DecodeArgs` of the cache, the options and the scales (its ``seqlen_q`` is a placeholder 1).
        max_seqlen_q: the longest sequence of new queries.
        num_tokens: T, the packed query rows.
    """

    cache: DecodeArgs
    max_seqlen_q: int
    num_tokens: int


def check_context(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    *,
    cu_seqlens_q,
    max_seqlen_q=None,
    block_table=None,
    causal=True,
    softmax_scale=None,
    q_scaling=1.0,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    alibi_mode="alibi",
    rel_bias=None,
    k_scale=None,
    v_scale=None,
    validate=True,
    dtypes=FLOAT_DTYPES,
    max_attention_window=None,
    sink_token_length=0,
    k_new=None,
    v_new=None,
    rotary_dim=0,
    rope_style="neox",
) -> ContextArgs:
    """Validates the arguments of ``context_attention``: packed queries ``[T, Hq, D]`` with ``cu_seqlens_q``, each
    sequence's queries being the last of its ``cache_seqlens`` cached tokens (or, with ``causal=False``, queries
    that see every cached token, as in cross attention).

    The cache, the options and the scales are checked exactly as ``decode`` checks them.

    With ``max_attention_window`` (a cyclic cache, optionally with sinks and RoPE at read time) the convention
    changes: ``cache_seqlens`` counts the tokens cached *before* the queries' chunk, whose own keys and values
    come as ``k_new``/``v_new`` (packed like q, q's dtype) and are appended by the caller afterwards; such a
    call must be causal.

    Raises:
        TypeError: a tensor of the wrong type or dtype.
        ValueError: wrong ranks or shapes, ``cu_seqlens_q`` not an increasing int32 prefix sum ending at T, more
            queries than cached tokens in a causal sequence, lengths or block indices out of range, and for a
            cyclic cache a missing or mis-shaped ``k_new``/``v_new`` or a non-causal call.
    """
    check_flag("validate", validate)
    _check_tensor("q", q, dtypes)
    if q.dim() != 3:
        raise ValueError(f"q must be packed [T, Hq, D], got shape {tuple(q.shape)}")
    if not isinstance(cu_seqlens_q, torch.Tensor):
        raise TypeError(f"cu_seqlens_q must be a torch.Tensor, got {type(cu_seqlens_q).__name__}")
    if cu_seqlens_q.dtype != torch.int32:
        raise TypeError(f"cu_seqlens_q must be int32, got {cu_seqlens_q.dtype}")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 1:
        raise ValueError(f"cu_seqlens_q must be 1-D [B+1], got shape {tuple(cu_seqlens_q.shape)}")
    if cu_seqlens_q.device != q.device:
        raise ValueError(f"cu_seqlens_q must be on q's device {q.device}, got {cu_seqlens_q.device}")
    batch = cu_seqlens_q.numel() - 1
    if isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.dim() == 1 and cache_seqlens.numel() != batch:
        raise ValueError(
            f"cu_seqlens_q must have B+1 entries for the B={cache_seqlens.numel()} sequences of cache_seqlens, "
            f"got {cu_seqlens_q.numel()}"
        )
    num_tokens, num_heads_q, head_dim = q.shape
    # the cache side is decode's, checked through a [B, 1, Hq, D] stand-in for the queries
    if num_tokens:
        stand_in = q.as_strided((batch, 1, num_heads_q, head_dim), (0, 0, q.stride(1), q.stride(2)))
    else:
        stand_in = q.new_empty((batch, 1, num_heads_q, head_dim))
    cache = check_decode(
        stand_in, k_cache, v_cache, cache_seqlens, block_table=block_table, causal=causal,
        softmax_scale=softmax_scale, q_scaling=q_scaling, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, alibi_mode=alibi_mode, rel_bias=rel_bias, k_scale=k_scale, v_scale=v_scale,
        validate=validate, dtypes=dtypes, max_attention_window=max_attention_window,
        sink_token_length=sink_token_length, rotary_dim=rotary_dim, rope_style=rope_style,
    )  # fmt: skip
    cyclic = cache.max_attention_window is not None
    _check_chunk_kv(q, k_new, v_new, cache, cyclic, causal, rotary_dim)
    if max_seqlen_q is not None and (
        not isinstance(max_seqlen_q, int) or isinstance(max_seqlen_q, bool) or max_seqlen_q < 0
    ):
        raise ValueError(f"max_seqlen_q must be None or an int >= 0, got {max_seqlen_q!r}")
    if not validate and max_seqlen_q is None and not cyclic:
        # nothing read back: the packed length bounds the longest sequence (FlashAttention asks for it instead)
        max_seqlen_q = num_tokens
    if validate or max_seqlen_q is None:
        cu = cu_seqlens_q.tolist()
        lens = [b - a for a, b in zip(cu, cu[1:])]
        if cu[0] != 0 or cu[-1] != num_tokens or any(n < 0 for n in lens):
            raise ValueError(
                f"cu_seqlens_q must rise from 0 to T={num_tokens} without decreasing, got {cu[:8]}"
                f"{' ...' if len(cu) > 8 else ''}"
            )
        longest = max(lens, default=0)
        if max_seqlen_q is not None and max_seqlen_q < longest:
            raise ValueError(f"max_seqlen_q ({max_seqlen_q}) is smaller than the longest query sequence ({longest})")
        if validate and cyclic:
            # positions are int32 in the kernels; a chunk past that cannot be placed
            far = [b for b, (n, k) in enumerate(zip(lens, cache_seqlens.tolist())) if k + n >= 2**31]
            if far:
                raise ValueError(f"cache_seqlens + the chunk's length must stay below 2^31, not in sequences {far[:8]}")
        elif validate and causal:
            over = [b for b, (n, k) in enumerate(zip(lens, cache_seqlens.tolist())) if n > k]
            if over:
                raise ValueError(
                    f"causal queries are the last tokens of their cache: sequences {over[:8]} have more queries in "
                    "cu_seqlens_q than tokens in cache_seqlens (append the new tokens first)"
                )
        max_seqlen_q = longest if max_seqlen_q is None else max_seqlen_q
    # no query sequence is longer than the packed rows: a larger hint would only size an emptier, larger grid
    max_seqlen_q = min(max_seqlen_q, num_tokens)
    if not validate:
        # as in check_attention: a hint of 0 over existing rows would launch nothing and record nothing
        max_seqlen_q = max(max_seqlen_q, min(num_tokens, 1))
    return ContextArgs(cache=cache, max_seqlen_q=max_seqlen_q, num_tokens=num_tokens)


def _check_chunk_kv(q, k_new, v_new, cache: DecodeArgs, cyclic: bool, causal: bool, rotary_dim: int) -> None:
    """``context_attention``'s fresh chunk: ``k_new``/``v_new`` exactly when the cache is cyclic."""
    if not cyclic:
        if k_new is not None or v_new is not None:
            raise ValueError(
                "k_new/v_new are the chunk's keys for a cyclic cache (max_attention_window); without one, append "
                "the chunk first and leave them None"
            )
        if rotary_dim:
            raise ValueError("rotary_dim (RoPE when reading the cache) needs max_attention_window in context_attention")
        return
    if not causal:
        raise ValueError("max_attention_window needs causal=True: a cyclic cache holds a sequence's own past")
    if k_new is None or v_new is None:
        raise ValueError(
            "a cyclic cache needs k_new and v_new, the chunk's own keys and values [T, Hkv, D]: the chunk may "
            "overwrite slots its earlier queries still read, so it is appended only after the attention"
        )
    shape = (q.shape[0], cache.num_heads_kv, cache.head_dim)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype} (the chunk before any quantization), got {x.dtype}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must be [T, Hkv, D] = {list(shape)} like q's rows, got {list(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")


@dataclass(frozen=True)
class AppendArgs:
    """The validated description of one append into a KV cache.

    Attributes:
        batch: number of sequences B.
        packed: whether the new tokens come packed ``[T, Hkv, D]`` with ``cu_seqlens_new``.
        new_bounds: host list ``[B+1]``: sequence ``b``'s new tokens are rows ``new_bounds[b]:new_bounds[b+1]``
            of the packed input, or ``new_bounds[b+1] - new_bounds[b]`` tokens of row ``b`` when padded.
        block_size: tokens per block (paged) or the cache length (contiguous).
        capacity: most tokens one sequence's cache can hold.
        k_scale: float32 ``[Hkv]`` dequantization scales of a quantized cache, else None.
        v_scale: likewise for V.
        max_attention_window: the size N of a cyclic cache (token t in slot t mod N), else None.
        sink_token_length: StreamingLLM's S sink tokens pinned in slots 0..S-1 of the cyclic cache (0: none).
    """

    batch: int
    packed: bool
    new_bounds: list[int]
    block_size: int
    capacity: int
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    max_attention_window: int | None = None
    sink_token_length: int = 0


def cyclic_slot(position, window: int, sinks: int = 0):
    """The slot of token ``position`` in a cyclic cache of ``window`` slots whose first ``sinks`` are pinned:
    ``t`` for a sink, else ``S + (t − S) mod (N − S)``. Works on ints and on integer tensors alike."""
    wrapped = sinks + (position - sinks) % (window - sinks)
    if isinstance(position, torch.Tensor):
        return torch.where(position < sinks, position, wrapped)
    return position if position < sinks else wrapped


def check_append(
    k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_new=None, block_table=None, k_scale=None, v_scale=None,
    max_attention_window=None, validate=True, sink_token_length=0,
) -> AppendArgs:  # fmt: skip
    """Validates an append before anything is written, so a rejected call leaves the cache untouched.

    With ``validate=False`` only types and shapes are checked: nothing is read back from the device (no lengths,
    no block-table entries, no scale values), and ``new_bounds`` is None.

    Raises:
        TypeError: a tensor of the wrong type or dtype.
        ValueError: mismatched shapes or devices, a sequence that would outgrow its cache, or a block the
            append would write that lies outside the pool.
    """
    check_flag("validate", validate)
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, x, FLOAT_DTYPES + QUANT_DTYPES)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        _check_tensor(name, x)
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(
            f"k_cache and v_cache must be 4-D and of one shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache must have k_cache's dtype {k_cache.dtype}, got {v_cache.dtype}")
    if v_new.dtype != k_new.dtype:
        raise TypeError(f"v_new must have k_new's dtype {k_new.dtype}, got {v_new.dtype}")
    if k_cache.dtype not in QUANT_DTYPES and k_new.dtype != k_cache.dtype:
        raise TypeError(f"k_new must have k_cache's dtype {k_cache.dtype}, got {k_new.dtype}")
    for name, x in (("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if x.device != k_cache.device:
            raise ValueError(f"{name} must be on k_cache's device {k_cache.device}, got {x.device}")
    if k_new.shape != v_new.shape:
        raise ValueError(f"k_new and v_new must have one shape, got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
    if k_new.shape[-2:] != k_cache.shape[-2:]:
        raise ValueError(
            f"k_new's [Hkv, D] must match the cache's {tuple(k_cache.shape[-2:])}, got {tuple(k_new.shape[-2:])}"
        )
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 or cache_seqlens.dim() != 1:
        raise TypeError("cache_seqlens must be a 1-D int32 tensor")
    if cache_seqlens.device != k_cache.device:
        raise ValueError(f"cache_seqlens must be on k_cache's device {k_cache.device}, got {cache_seqlens.device}")
    batch = cache_seqlens.shape[0]

    packed = cu_seqlens_new is not None
    if packed:
        if k_new.dim() != 3:
            raise ValueError(f"k_new must be [T, Hkv, D] with cu_seqlens_new, got shape {tuple(k_new.shape)}")
        if not validate:
            if not isinstance(cu_seqlens_new, torch.Tensor) or cu_seqlens_new.dtype != torch.int32:
                raise TypeError("cu_seqlens_new must be an int32 torch.Tensor")
            if cu_seqlens_new.shape != (batch + 1,) or cu_seqlens_new.device != k_cache.device:
                raise ValueError(f"cu_seqlens_new must be [B+1={batch + 1}] on {k_cache.device}")
            counts = bounds = None
        else:
            counts = _check_cu_seqlens("cu_seqlens_new", cu_seqlens_new, k_new.shape[0], k_cache.device)
            if len(counts) != batch:
                raise ValueError(f"cu_seqlens_new must describe B={batch} sequences, got {len(counts)}")
            bounds = cu_seqlens_new.tolist()
    else:
        if k_new.dim() != 4 or k_new.shape[0] != batch:
            raise ValueError(
                f"k_new must be [B={batch}, S_new, Hkv, D] without cu_seqlens_new, got {tuple(k_new.shape)}"
            )
        counts = [k_new.shape[1]] * batch
        bounds = [i * k_new.shape[1] for i in range(batch + 1)]

    if block_table is not None:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32:
            raise TypeError("block_table must be an int32 tensor")
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must be [B={batch}, max_blocks], got shape {tuple(block_table.shape)}")
        if block_table.device != k_cache.device:
            raise ValueError(f"block_table must be on k_cache's device {k_cache.device}, got {block_table.device}")
        block_size = k_cache.shape[1]
        capacity = block_table.shape[1] * block_size
    else:
        if k_cache.shape[0] != batch:
            raise ValueError(f"k_cache's batch ({k_cache.shape[0]}) must equal cache_seqlens' ({batch})")
        block_size = capacity = k_cache.shape[1]

    window = _check_cyclic(max_attention_window, capacity)
    sinks = _check_sinks(sink_token_length, window)
    if not validate:
        k_scale, v_scale = check_kv_scales(k_cache, k_scale, v_scale, k_cache.shape[2], validate=False)
        return AppendArgs(
            batch=batch, packed=packed, new_bounds=None, block_size=block_size, capacity=capacity,
            k_scale=k_scale, v_scale=v_scale, max_attention_window=window, sink_token_length=sinks,
        )  # fmt: skip
    starts = cache_seqlens.tolist()
    for b, (start, n) in enumerate(zip(starts, counts)):
        if start < 0:
            raise ValueError(f"cache_seqlens[{b}] = {start} is negative: a length counts the tokens already cached")
        if window is None and start + n > capacity:
            raise ValueError(
                f"sequence {b} would hold {start + n} tokens (cache_seqlens={start} + {n} new), "
                f"over the cache capacity {capacity}"
            )
        # one call must not write a slot twice: the kernel's writes have no order
        rolling = n - max(0, min(n, sinks - start))
        if window is not None and (start < 0 or rolling > window - sinks):
            raise ValueError(
                f"sequence {b} appends {n} tokens to a cyclic cache of {window} slots ({sinks} of them sinks; at most "
                f"{window - sinks} rolling tokens at once), from cache_seqlens={start}"
            )
    if block_table is not None and batch and sinks:
        # the exact slots each sequence writes, as a mask of table columns: one read of the device
        pool = k_cache.shape[0]
        cols = torch.zeros(block_table.shape, dtype=torch.bool)
        for b, (start, n) in enumerate(zip(starts, counts)):
            cols[b, cyclic_slot(torch.arange(start, start + n), window, sinks) // block_size] = True
        outside = cols.to(block_table.device) & ((block_table < 0) | (block_table >= pool))
        if bool(outside.any()):
            row = int(outside.nonzero()[0, 0])
            bad = block_table[row][outside[row]].tolist()
            raise ValueError(f"block_table[{row}] points outside the pool of {pool} blocks: {bad}")
    elif block_table is not None and batch:
        pool = k_cache.shape[0]
        # the table columns each sequence writes to, as one mask: a single read of the device, whatever B is
        if window is None:
            first = [start // block_size for start in starts]
            last = [(start + n - 1) // block_size if n else -1 for start, n in zip(starts, counts)]
        else:
            # a cyclic write of n <= window slots from start % window; when it wraps, it touches every column up
            # to the end of the window and from its start, which the range [0, last] covers conservatively
            first = [(start % window) // block_size if (start % window) + n <= window else 0 for start, n in
                     zip(starts, counts)]  # fmt: skip
            last = [
                (min(start % window + n, window) - 1) // block_size if n else -1 for start, n in zip(starts, counts)
            ]
            last = [max(hi, (window - 1) // block_size) if n and start % window + n > window else hi
                    for hi, start, n in zip(last, starts, counts)]  # fmt: skip
        cols = torch.arange(block_table.shape[1], device=block_table.device)
        first_t = torch.tensor(first, device=block_table.device)[:, None]
        last_t = torch.tensor(last, device=block_table.device)[:, None]
        outside = ((cols[None, :] >= first_t) & (cols[None, :] <= last_t)) & ((block_table < 0) | (block_table >= pool))
        if bool(outside.any()):
            row = int(outside.nonzero()[0, 0])
            bad = block_table[row][outside[row]].tolist()
            raise ValueError(f"block_table[{row}] points outside the pool of {pool} blocks: {bad}")
    if block_table is not None and batch and bounds[-1]:
        _check_no_shared_slot(block_table, cache_seqlens, bounds, block_size, window, sinks)
    k_scale, v_scale = check_kv_scales(k_cache, k_scale, v_scale, k_cache.shape[2])
    return AppendArgs(
        batch=batch, packed=packed, new_bounds=bounds, block_size=block_size, capacity=capacity, k_scale=k_scale,
        v_scale=v_scale, max_attention_window=window, sink_token_length=sinks,
    )  # fmt: skip


def _check_no_shared_slot(block_table, cache_seqlens, bounds, block_size, window, sinks) -> None:
    """Two new tokens must not land in one slot of the pool (two sequences whose tables share a block, or one
    table naming a block twice): the kernels' writes have no order, so which one stays would be chance."""
    from .layout import new_token_positions

    seq, pos = new_token_positions(bounds, cache_seqlens)
    seq, pos = seq.long(), pos.long()
    if window is not None:
        pos = cyclic_slot(pos, window, sinks)
    flat = block_table[seq, pos // block_size].long() * block_size + pos % block_size
    uniq, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
    if uniq.numel() != flat.numel():
        shared = counts[inverse] > 1
        seqs = sorted(set(seq[shared].tolist()))
        raise ValueError(
            f"block_table makes two new tokens write one slot of the pool (sequences {seqs[:8]}): their blocks "
            "overlap, so the order of the writes, and the value kept, would be chance"
        )


def device_positions(cu_seqlens_new, cache_seqlens, num_tokens: int, new_shape) -> tuple:
    """Each new token's ``(sequence, position)`` as int32 ``[T]`` tensors, computed on the device from values that
    were not checked: a packed row past ``cu_seqlens_new[-1]`` is given the last sequence (its position is then
    out of its range, which the kernels detect), so no index here leaves its tensor. Padded input needs only its
    shape."""
    device = cache_seqlens.device
    rows = torch.arange(num_tokens, dtype=torch.int32, device=device)
    if cu_seqlens_new is None:
        s_new = new_shape[1]
        seq = rows // max(s_new, 1)
        pos = cache_seqlens[seq] + rows % max(s_new, 1)
        return seq, pos.to(torch.int32)
    batch = cache_seqlens.shape[0]
    seq = torch.searchsorted(cu_seqlens_new[1:].contiguous(), rows, right=True).clamp_(max=max(batch - 1, 0))
    pos = cache_seqlens.long()[seq] + rows.long() - cu_seqlens_new.long()[seq]
    return seq.to(torch.int32), pos.clamp(-(2**31), 2**31 - 1).to(torch.int32)


@dataclass(frozen=True)
class PreprocessArgs:
    """The validated description of one pre-processing call.

    Attributes:
        packed: whether ``qkv`` is packed ``[T, ...]`` with ``cu_seqlens_new``.
        head_dim: D.
        token_seq: int32 ``[T]`` on the device: each new token's sequence.
        positions: int32 ``[T]`` on the device: each new token's position in its sequence.
        num_positions: the longest sequence after the append (cached plus new tokens), at least 1.
        append: the append's own validated arguments.
    """

    packed: bool
    head_dim: int
    token_seq: torch.Tensor
    positions: torch.Tensor
    num_positions: int
    append: AppendArgs


def check_preprocess(
    qkv, k_cache, v_cache, cache_seqlens, num_heads_q, num_heads_kv, cu_seqlens_new, block_table, qkv_bias,
    rotary_dim, rope_style, k_scale=None, v_scale=None, validate=True, max_attention_window=None, sink_token_length=0,
    positions=None, num_positions=None,
) -> PreprocessArgs:  # fmt: skip
    """Validates a pre-processing call (and the append it implies) before anything is written.

    With ``validate=False`` nothing is read back from the device: the new tokens' sequences and positions are
    computed on the device, and ``num_positions`` is the cache capacity (the cos/sin table covers it).
    ``positions``, ``(token_seq, token_positions)`` as an `attn.inflight.InflightBatch` holds them, are used
    instead of computing them, and ``num_positions``, the longest sequence after the append when the caller
    knows it on the host (the batch does), instead of the capacity.
    """
    _check_tensor("qkv", qkv)
    _check_tensor("k_cache", k_cache, FLOAT_DTYPES + QUANT_DTYPES)
    for name, n in (("num_heads_q", num_heads_q), ("num_heads_kv", num_heads_kv)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if num_heads_q % num_heads_kv != 0:
        raise ValueError(f"num_heads_kv ({num_heads_kv}) must divide num_heads_q ({num_heads_q})")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be 4-D, got shape {tuple(k_cache.shape)}")
    d = k_cache.shape[-1]
    if k_cache.shape[-2] != num_heads_kv:
        raise ValueError(f"k_cache holds {k_cache.shape[-2]} KV heads, but num_heads_kv is {num_heads_kv}")
    width = (num_heads_q + 2 * num_heads_kv) * d
    packed = cu_seqlens_new is not None
    if qkv.dim() != (2 if packed else 3) or qkv.shape[-1] != width:
        layout = "[T, (Hq + 2·Hkv)·D]" if packed else "[B, S_new, (Hq + 2·Hkv)·D]"
        raise ValueError(f"qkv must be {layout} = [..., {width}], got shape {tuple(qkv.shape)}")
    if qkv_bias is not None:
        _check_tensor("qkv_bias", qkv_bias)
        if qkv_bias.shape != (width,) or qkv_bias.device != qkv.device:
            raise ValueError(
                f"qkv_bias must be [{width}] on {qkv.device}, got {tuple(qkv_bias.shape)} on {qkv_bias.device}"
            )
    if rope_style not in ("neox", "gptj"):
        raise ValueError(f"rope_style must be 'neox' or 'gptj', got {rope_style!r}")
    if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool) or rotary_dim < 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even int >= 0 (0 disables RoPE), got {rotary_dim!r}")
    if rotary_dim > d:
        raise ValueError(f"rotary_dim ({rotary_dim}) must be at most the head dim ({d})")

    # the append sees k in its own layout; only shapes matter for its checks
    k_like = qkv[..., : num_heads_kv * d].unflatten(-1, (num_heads_kv, d))
    append = check_append(
        k_cache,
        v_cache,
        k_like,
        k_like,
        cache_seqlens,
        cu_seqlens_new,
        block_table,
        k_scale,
        v_scale,
        validate=validate,
        max_attention_window=max_attention_window,
        sink_token_length=sink_token_length,
    )
    from .layout import new_token_positions

    if not validate:
        num_tokens = qkv.shape[0] if packed else qkv.shape[0] * qkv.shape[1]
        token_seq, positions = positions or device_positions(cu_seqlens_new, cache_seqlens, num_tokens, qkv.shape)
        num_positions = max(append.capacity, 1) if num_positions is None else max(num_positions, 1)
        if rotary_dim and append.max_attention_window is not None and not append.sink_token_length and num_tokens:
            # RoPE turns a cyclic cache's keys by their absolute positions, which run past the capacity: the
            # table is sized from the positions themselves (the one value this unvalidated path reads back)
            num_positions = max(int(positions.max()) + 1, num_positions)
        return PreprocessArgs(packed=packed, head_dim=d, token_seq=token_seq, positions=positions,
                              num_positions=num_positions, append=append)  # fmt: skip

    token_seq, positions = positions or new_token_positions(append.new_bounds, cache_seqlens)
    bounds = append.new_bounds
    num_positions = max([s + (b - a) for s, a, b in zip(cache_seqlens.tolist(), bounds, bounds[1:])] + [1])
    return PreprocessArgs(
        packed=packed, head_dim=d, token_seq=token_seq, positions=positions, num_positions=num_positions, append=append
    )


def check_gpt_attention(
    qkv, batch, k_cache, v_cache, *, num_heads_q, num_heads_kv, qkv_bias, rotary_dim, rope_style, softmax_scale,
    q_scaling, window_size, softcap, alibi_slopes, alibi_mode, rel_bias, k_scale, v_scale, validate, mode=None,
) -> tuple[PreprocessArgs, ContextArgs, str]:  # fmt: skip
    """Validates a whole ``gpt_attention`` step before anything is written: the buffer against the batch, the
    pre-processing and append (as ``preprocess`` checks them) and the attention (as ``context_attention`` checks
    it, on the lengths after the step). A rejected step leaves every cache untouched.

    Returns the pre-processing's and the attention's checked arguments and the schedule: ``mode`` itself, or for
    None ``"split"`` when the
    batch has a block table (one launch per phase measured faster than one over the mixed batch on the H200,
    bench/NOTES.md) and ``"unified"`` otherwise.

    Raises:
        TypeError: a wrong type or dtype.
        ValueError: a buffer whose rows do not add up to the batch's new tokens, and every error of the calls
            above.
    """
    from .inflight import InflightBatch

    if not isinstance(batch, InflightBatch):
        raise TypeError(f"batch must be an attn.inflight.InflightBatch, got {type(batch).__name__}")
    if mode is None:
        mode = "split" if batch.block_table is not None else "unified"
    if mode not in ("unified", "split"):
        raise ValueError(f"mode must be None, 'unified' or 'split', got {mode!r}")
    if mode == "split" and batch.block_table is None:
        raise ValueError("mode='split' reads the generation requests through batch.block_table: give the batch one")
    _check_tensor("qkv", qkv)
    if qkv.dim() != 2 or qkv.shape[0] != batch.num_tokens:
        raise ValueError(
            f"qkv must be packed [T, (Hq + 2·Hkv)·D] with T = the batch's new tokens ({batch.num_tokens}), "
            f"got shape {tuple(qkv.shape)}"
        )
    if batch.cu_seqlens_new.device != qkv.device:
        raise ValueError(f"batch must live on qkv's device {qkv.device}, got {batch.cu_seqlens_new.device}")
    pre_args = check_preprocess(
        qkv, k_cache, v_cache, batch.cache_seqlens_before, num_heads_q, num_heads_kv, batch.cu_seqlens_new,
        batch.block_table, qkv_bias, rotary_dim, rope_style, k_scale, v_scale, validate,
        positions=(batch.token_seq, batch.token_positions), num_positions=batch.max_seqlen,
    )  # fmt: skip
    head_dim = qkv.shape[1] // (num_heads_q + 2 * num_heads_kv)
    q_like = qkv[:, : num_heads_q * head_dim].unflatten(-1, (num_heads_q, head_dim))
    args = check_context(
        q_like, k_cache, v_cache, batch.cache_seqlens_after, cu_seqlens_q=batch.cu_seqlens_new,
        max_seqlen_q=batch.max_new, block_table=batch.block_table, causal=True, softmax_scale=softmax_scale,
        q_scaling=q_scaling, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        alibi_mode=alibi_mode, rel_bias=rel_bias, k_scale=k_scale, v_scale=v_scale, validate=validate,
    )  # fmt: skip
    if validate and mode == "split" and qkv.dtype == torch.bfloat16 and k_cache.dtype in QUANT_DTYPES:
        # the generation requests' decode multiplies in fp16, where a larger bf16 query would become inf, and
        # their queries exist only after the pre-processing has written the cache: bound them now, from qkv and
        # the bias. RoPE turns each pair of features by an angle, so no feature grows past √2 times the larger
        # of its pair (a bound: a query just under it may be refused that the rotation would have kept in range)
        q_gen = q_like.index_select(0, batch.generation_rows.to(qkv.device)).float()
        if qkv_bias is not None:
            q_gen = q_gen + qkv_bias[: num_heads_q * head_dim].view(num_heads_q, head_dim).float()
        bound = float(q_gen.abs().amax()) * (math.sqrt(2.0) if rotary_dim else 1.0) if q_gen.numel() else 0.0
        if not bound <= F16_MAX:
            raise ValueError(
                f"qkv's query part must stay within fp16's range (|q| <= {F16_MAX}, after the bias and RoPE) for "
                f"the generation requests of a bf16 step over an INT8/FP8 cache in mode 'split', whose decode "
                f"multiplies in fp16; got a bound of {bound:.6g} (mode 'unified' reads the cache in bf16)"
            )
    return pre_args, args, mode


def check_encoder_lengths(encoder_lengths, batch: int, capacity: int, validate: bool, device=None) -> None:
    """Cross attention's ``encoder_input_lengths``: int32 ``[B]`` (on ``device``, q's, when given), each within the
    cross cache's capacity."""
    check_flag("validate", validate)
    if not isinstance(encoder_lengths, torch.Tensor):
        raise TypeError(f"encoder_lengths must be a torch.Tensor, got {type(encoder_lengths).__name__}")
    if encoder_lengths.dtype != torch.int32:
        raise TypeError(f"encoder_lengths must be int32, got {encoder_lengths.dtype}")
    if encoder_lengths.shape != (batch,):
        raise ValueError(f"encoder_lengths must have shape [B]=({batch},), got {tuple(encoder_lengths.shape)}")
    if device is not None and encoder_lengths.device != device:
        raise ValueError(f"encoder_lengths must be on q's device {device}, got {encoder_lengths.device}")
    if validate:
        bad = [x for x in encoder_lengths.tolist() if x < 0 or x > capacity]
        if bad:
            raise ValueError(
                f"encoder_lengths entries must lie in [0, {capacity}] (what the cross cache holds), got {bad}"
            )


def check_update_indirection(cache_indirection, parents, step, out=None, validate: bool = True):
    """Validates `update_indirection`'s inputs (shared by the reference and the kernel).

    Returns:
        ``(batch, beam_width, max_len)``.

    Raises:
        TypeError: a tensor of the wrong type or dtype, or a ``step`` that is neither an int nor a tensor.
        ValueError: shapes that do not match, devices that differ, ``out`` sharing memory with
            ``cache_indirection``, and (with ``validate``) a parent outside ``[0, beam_width)`` or a step
            outside ``[0, max_len)``.
    """
    check_flag("validate", validate)
    if not isinstance(cache_indirection, torch.Tensor) or cache_indirection.dtype != torch.int32:
        raise TypeError(
            "cache_indirection must be an int32 torch.Tensor [B, beam_width, max_len], got "
            f"{getattr(cache_indirection, 'dtype', type(cache_indirection).__name__)}"
        )
    if cache_indirection.dim() != 3:
        raise ValueError(f"cache_indirection must be [B, beam_width, max_len], got {tuple(cache_indirection.shape)}")
    batch, beam, max_len = cache_indirection.shape
    if beam < 1 or max_len < 1:
        raise ValueError(
            f"cache_indirection needs beam_width >= 1 and max_len >= 1, got {tuple(cache_indirection.shape)}"
        )
    device = cache_indirection.device
    if not isinstance(parents, torch.Tensor) or parents.dtype != torch.int32:
        raise TypeError(
            f"parents must be an int32 torch.Tensor [B, beam_width], got "
            f"{getattr(parents, 'dtype', type(parents).__name__)}"
        )
    if tuple(parents.shape) != (batch, beam):
        raise ValueError(
            f"parents must be [B, beam_width] = {(batch, beam)} like cache_indirection, got {tuple(parents.shape)}"
        )
    if parents.device != device:
        raise ValueError(f"parents must be on cache_indirection's device {device}, got {parents.device}")
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int32:
            raise TypeError(f"step must be an int or an int32 tensor [B], got a {step.dtype} tensor")
        if tuple(step.shape) != (batch,):
            raise ValueError(
                f"step as a tensor must be [B] = [{batch}], one position per request, got {tuple(step.shape)}"
            )
        if step.device != device:
            raise ValueError(f"step must be on cache_indirection's device {device}, got {step.device}")
    elif not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"step must be an int or an int32 tensor [B], got {type(step).__name__}")
    elif not 0 <= step < max_len:
        raise ValueError(f"step must lie in [0, max_len) = [0, {max_len}), got {step}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.int32:
            raise TypeError(f"out must be an int32 torch.Tensor, got {getattr(out, 'dtype', type(out).__name__)}")
        if out.shape != cache_indirection.shape or out.device != device:
            raise ValueError(
                f"out must match cache_indirection ({tuple(cache_indirection.shape)} on {device}), "
                f"got {tuple(out.shape)} on {out.device}"
            )
        if out.untyped_storage().data_ptr() == cache_indirection.untyped_storage().data_ptr():
            # a beam may read the row another beam is overwriting: the result would depend on the order of writes
            raise ValueError(
                "out must not share memory with cache_indirection: the update is a gather across beams, so it "
                "cannot run in place; keep two tables and swap them every step"
            )
    if validate and batch:
        bad = (parents < 0) | (parents >= beam)
        if bool(bad.any()):
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"parents must lie in [0, beam_width) = [0, {beam}), got parents[{b}, {j}] = {int(parents[b, j])}"
            )
        if isinstance(step, torch.Tensor):
            bad = (step < 0) | (step >= max_len)
            if bool(bad.any()):
                b = int(bad.nonzero()[0, 0])
                raise ValueError(f"step must lie in [0, max_len) = [0, {max_len}), got step[{b}] = {int(step[b])}")
    return batch, beam, max_len
