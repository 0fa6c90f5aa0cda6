"""Options as values: the score, cache-view and RoPE keywords of the attention calls as three frozen dataclasses.

Every attention entry takes up to 27 keyword arguments. Most of them belong to three groups that a model fixes
once and passes to every call, and that the same call in `attn.reference` and `attn.fast` shares:

- `ScoreOptions`: how a score is formed (``softmax_scale``, ``q_scaling``, ``causal``, ``window_size``,
  ``softcap``, ALiBi ``alibi_slopes``/``alibi_mode``, the T5 ``rel_bias``);
- `CacheView`: how the cache is read (contiguous, or paged through ``block_table``; the int8/fp8 ``k_scale``/
  ``v_scale``; the cyclic ``max_attention_window`` with its ``sink_token_length`` sinks; beam search's
  ``cache_indirection``);
- `RopeOptions`: rotary embedding (``rotary_dim``, ``base``, ``style``, ``scaling``).

Each is checked when it is made (a bad value raises there, naming the field) and is immutable, so one object
can be built with the model and passed to every layer's call::

    scores = attn.ScoreOptions(causal=True, softcap=30.0)
    view = attn.CacheView(block_table=table)
    out = attn.decode(q, k_pool, v_pool, lens, scores=scores, cache_view=view)
    ref = attn.reference.decode(q, k_pool, v_pool, lens, scores=scores, cache_view=view)

The flat keywords stay, and they are what the kernels' launchers take: the ``scores=``, ``cache_view=`` and
``rope=`` keywords, added by `accepts_options` to each entry of `attn.fast` and `attn.reference`, expand an
object into the flat keywords (the fields that differ from the dataclass's defaults) before the call. A field
that the function has no keyword for, or a keyword given both flat and in an object, is a TypeError. With no
object given the call goes straight through (one Python frame). Checks that need the call's tensors (a
window against the cache, the slopes' shape against the heads) stay with the function.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import torch

from .checks import _is_int, _is_number

__all__ = ["CacheView", "RopeOptions", "ScoreOptions", "accepts_options", "expand_options"]


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreOptions:
    """How a query-key score is formed (see `attn.reference.attention` for each keyword's meaning).

    ``causal=None`` keeps the function's own default (False for attention and decode, True for
    context_attention); ``window_size`` is ``(left, right)`` with -1 for unbounded.
    """

    softmax_scale: float | None = None
    q_scaling: float = 1.0
    causal: bool | None = None
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: torch.Tensor | None = None
    alibi_mode: str = "alibi"
    rel_bias: object | None = None  # attn.RelativeBias

    def __post_init__(self):
        from .checks import ALIBI_MODES, _check_options
        from .reference.relative_bias import RelativeBias

        if isinstance(self.window_size, list):
            object.__setattr__(self, "window_size", tuple(self.window_size))
        if self.causal is not None and not isinstance(self.causal, bool):
            raise TypeError(f"ScoreOptions.causal must be a bool or None, got {self.causal!r}")
        try:  # the scalar checks every call makes (head_dim only sets the default scale, unused here)
            _check_options(1, bool(self.causal), self.softmax_scale, self.q_scaling, self.window_size, self.softcap)
        except (TypeError, ValueError) as e:
            raise type(e)(f"ScoreOptions: {e}") from None
        if self.alibi_mode not in ALIBI_MODES:
            raise ValueError(f"ScoreOptions.alibi_mode must be one of {ALIBI_MODES}, got {self.alibi_mode!r}")
        if self.alibi_slopes is not None and (
            not isinstance(self.alibi_slopes, torch.Tensor) or not self.alibi_slopes.dtype.is_floating_point
        ):
            raise TypeError("ScoreOptions.alibi_slopes must be a floating-point torch.Tensor or None")
        if self.rel_bias is not None and not isinstance(self.rel_bias, RelativeBias):
            raise TypeError(f"ScoreOptions.rel_bias must be an attn.RelativeBias or None, got {type(self.rel_bias)}")
        if self.alibi_slopes is not None and self.rel_bias is not None:
            raise ValueError("ScoreOptions: alibi_slopes and rel_bias are two position biases; give one")


@dataclasses.dataclass(frozen=True, eq=False)
class CacheView:
    """How a call reads (and writes) the KV cache.

    ``block_table=None`` is a contiguous cache ``[B, max_len, Hkv, D]``; an int32 ``[B, max_blocks]`` table
    makes the cache a pool of blocks. ``k_scale``/``v_scale`` dequantize an int8/fp8 cache (both or neither).
    ``max_attention_window`` makes the cache cyclic (``sink_token_length`` sinks pinned at its start).
    ``cache_indirection`` (int32 ``[B, beam_width, max_len]``) reads each token from the beam it was written by.
    """

    block_table: torch.Tensor | None = None
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    max_attention_window: int | None = None
    sink_token_length: int = 0
    cache_indirection: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("block_table", "cache_indirection"):
            t = getattr(self, name)
            rank = 2 if name == "block_table" else 3
            if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != rank):
                raise TypeError(f"CacheView.{name} must be an int32 {rank}-D torch.Tensor or None")
        if (self.k_scale is None) != (self.v_scale is None):
            raise ValueError("CacheView: k_scale and v_scale go together (a quantized cache has both)")
        for name in ("k_scale", "v_scale"):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point):
                raise TypeError(f"CacheView.{name} must be a floating-point torch.Tensor or None")
        w, s = self.max_attention_window, self.sink_token_length
        if w is not None and (not _is_int(w) or w < 1):
            raise ValueError(f"CacheView.max_attention_window must be an int >= 1 or None, got {w!r}")
        if not _is_int(s) or s < 0:
            raise ValueError(f"CacheView.sink_token_length must be an int >= 0, got {s!r}")
        if s and (w is None or s >= w):
            raise ValueError(f"CacheView.sink_token_length={s} needs a max_attention_window above it, got {w!r}")

    @property
    def paged(self) -> bool:
        return self.block_table is not None


@dataclasses.dataclass(frozen=True)
class RopeOptions:
    """Rotary position embedding: the first ``rotary_dim`` features of each head rotated (0: none), pairs
    chosen by ``style`` ("neox": halves, "gptj": neighbours), frequencies from ``base`` and ``scaling``
    (an `attn.RopeScaling`: linear, dynamic, llama3, yarn, ...)."""

    rotary_dim: int = 0
    base: float = 10000.0
    style: str = "neox"
    scaling: object | None = None  # attn.RopeScaling

    def __post_init__(self):
        from .reference.preprocess import RopeScaling

        if not _is_int(self.rotary_dim) or self.rotary_dim < 0 or self.rotary_dim % 2:
            raise ValueError(f"RopeOptions.rotary_dim must be an even int >= 0 (0 disables RoPE), got "
                             f"{self.rotary_dim!r}")  # fmt: skip
        if not _is_number(self.base) or not math.isfinite(self.base) or self.base <= 1:
            raise ValueError(f"RopeOptions.base must be a finite number > 1, got {self.base!r}")
        if self.style not in ("neox", "gptj"):
            raise ValueError(f"RopeOptions.style must be 'neox' or 'gptj', got {self.style!r}")
        if self.scaling is not None and not isinstance(self.scaling, RopeScaling):
            raise TypeError(f"RopeOptions.scaling must be an attn.RopeScaling or None, got {type(self.scaling)}")


# the keyword each object takes, and each field's flat keyword
GROUPS = {
    "scores": (ScoreOptions, {f.name: f.name for f in dataclasses.fields(ScoreOptions)}),
    "cache_view": (CacheView, {f.name: f.name for f in dataclasses.fields(CacheView)}),
    "rope": (RopeOptions, {"rotary_dim": "rotary_dim", "base": "rope_base", "style": "rope_style",
                           "scaling": "rope_scaling"}),
}  # fmt: skip


def _set_fields(obj) -> dict:
    """The fields of ``obj`` that differ from its class's defaults (tensors and objects: by identity)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = f.default
        same = value is default or (
            not isinstance(value, torch.Tensor) and type(value) is type(default) and value == default
        )
        if not same:
            out[f.name] = value
    return out


def expand_options(fn_name: str, params, kwargs: dict, groups=tuple(GROUPS)) -> dict:
    """``kwargs`` with any ``scores``/``cache_view``/``rope`` object replaced by the flat keywords it sets.

    Args:
        fn_name: the function's name, for the errors.
        params: the function's flat keyword names.
        kwargs: the keywords of the call.
        groups: the object keywords the function takes (others are left for the function to refuse).

    Raises:
        TypeError: an object of the wrong class, a field the function has no keyword for, or a keyword given
            both flat and in an object.
    """
    out = dict(kwargs)
    for name in groups:
        cls, flat = GROUPS[name]
        obj = out.pop(name, None)
        if obj is None:
            continue
        if not isinstance(obj, cls):
            raise TypeError(f"{fn_name}: {name} must be an attn.{cls.__name__}, got {type(obj).__name__}")
        for field, value in _set_fields(obj).items():
            key = flat[field]
            if key not in params:
                raise TypeError(f"{fn_name} takes no {key} ({cls.__name__}.{field} is set)")
            if key in out:
                raise TypeError(f"{fn_name}: {key} given both as a keyword and in {name}={cls.__name__}(...)")
            out[key] = value
    return out


def accepts_options(fn):
    """``fn`` also taking ``scores=``, ``cache_view=`` and ``rope=`` (those of the three groups it has flat
    keywords for), expanded by `expand_options`; its signature and docstring are kept, the new keywords added."""
    sig = inspect.signature(fn)
    params = frozenset(sig.parameters)
    groups = [name for name, (_, flat) in GROUPS.items() if any(k in params for k in flat.values())]
    if not groups:
        return fn
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation=f"{GROUPS[name][0].__name__} | None") for name in groups]  # fmt: skip
    name, groups = fn.__name__, tuple(groups)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for g in groups:
            if g in kwargs:
                return fn(*args, **expand_options(name, params, kwargs, groups))
        return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *added])
    wrapper.__wrapped__ = fn
    return wrapper
