"""attn as a Hugging Face transformers attention backend.

    import attn.integrations.transformers as attn_hf
    attn_hf.register()                                   # "attn" joins transformers' attention and mask interfaces
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="attn")
    # or: model.set_attn_implementation("attn")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=64)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=64,
                         past_key_values=attn_hf.PagedCache(model.config, max_batch_size=8, max_cache_len=4096))

What transformers hands the attention function, and what we make of it:

- ``query [B, Hq, Sq, D]``, ``key``/``value [B, Hkv, Sk, D]`` (HF's layout): transposed views are our
  ``[B, S, H, D]`` layout with unit stride along D, so nothing is copied when every token is valid.
- ``module``: ``is_causal``, ``scaling`` (Gemma's ``query_pre_attn_scalar`` arrives through it),
  ``sliding_window`` and ``softcap`` as keywords; GQA/MQA needs nothing: our kernels read ``Hkv`` heads.
- ``attention_mask``: because "attn" is registered in the mask interface too, transformers gives what it gives
  FlashAttention-2: ``None`` (every key valid) or the 2-D padding mask ``[B, Sk]``. Each row's valid keys must be
  one run of columns (left or right padding); the valid queries are the tail of that run. The tokens are packed
  (varlen) for prefill, or gathered into a left-aligned cache for a decode step (``attn.decode``).
- Anything lengths, causality and one window cannot express (custom mask functions of multimodal models, packed
  training sequences, a mask with holes, ``s_aux`` sinks, a head dim above 256, dropout or gradients, a custom
  4-D mask) is computed by PyTorch's SDPA (or the same math in plain torch where SDPA lacks soft-capping or sinks),
  with a warning the first time each reason occurs. The backend never computes a different attention.

Sliding windows follow transformers' masks: a key ``j`` is visible from query ``i`` iff ``i − w < j <= i``, our
``window_size = (w − 1, 0)``.

`patch_bloom` and `patch_t5` bring the two architectures whose attention does not go through the interface
(ALiBi, T5's relative bias) to the same kernels, the way Liger-Kernel patches models: the forward of each
attention module instance is replaced, the weights stay.

`PagedCache` is a transformers ``Cache`` whose key/value storage is an `attn.PagedKVCache` (INT8/FP8 optional):
prefill runs through `attn.context_attention` and decode steps through the paged `attn.decode`.

Supported: transformers 5.x (tested with 5.25). 4.53-4.57 have the same interfaces (``AttentionInterface``,
``AttentionMaskInterface``, layered ``Cache`` from 4.56) and should work, untested here.
"""

from __future__ import annotations

import math
import types
import warnings
import weakref

import torch
from transformers import masking_utils as mu
from transformers.cache_utils import Cache, CacheLayerMixin

import attn

__all__ = [
    "PagedCache",
    "attn_attention_forward",
    "attn_mask",
    "patch_bloom",
    "patch_t5",
    "register",
]

_WARNED: set[str] = set()
# profiler labels of our calls: a profile of a model step shows "attn.decode" etc. beside transformers' ops
_label = torch.profiler.record_function
_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"attn: {reason}; this call runs PyTorch's SDPA (or the same math in torch) instead", stacklevel=3
        )


# ---------------------------------------------------------------------------------------------------------------------
# registration and the mask


def register(name: str = "attn") -> None:
    """Registers ``name`` with transformers' ``AttentionInterface`` (the attention function) and
    ``AttentionMaskInterface`` (so that models hand it a 2-D padding mask or None rather than a dense 4-D mask).

    After it, ``attn_implementation="attn"`` at load time or ``model.set_attn_implementation("attn")`` selects it.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(name, attn_attention_forward)
    mu.AttentionMaskInterface.register(name, attn_mask)


def _mask_kind(fn) -> str | None:
    """``"causal"``, ``"sliding"`` (causal within a window), ``"full"`` for transformers' own mask functions;
    None for anything else (packed sequences, chunked attention, image-token overlays, user functions)."""
    if fn is mu.causal_mask_function:
        return "causal"
    if fn is getattr(mu, "bidirectional_mask_function", None):
        return "full"
    # sliding_window_causal_mask_function(w) = and_masks(sliding_window_overlay(w), causal_mask_function)
    if getattr(fn, "__qualname__", "") == "and_masks.<locals>.and_mask" and fn.__closure__:
        parts = fn.__closure__[0].cell_contents
        if (
            isinstance(parts, tuple)
            and len(parts) == 2
            and parts[1] is mu.causal_mask_function
            and getattr(parts[0], "__qualname__", "") == "sliding_window_overlay.<locals>.inner_mask"
        ):
            return "sliding"
    return None


def attn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """The mask function registered for "attn": FlashAttention-2's contract (None, or the bool padding mask
    ``[B, kv_length]`` of the keys the layer will see) for transformers' causal, sliding and bidirectional masks;
    the dense 4-D mask SDPA would get for any other mask function, which the attention function then hands to
    SDPA."""
    if mask_function is None:
        mask_function = mu.causal_mask_function
    if _mask_kind(mask_function) is None:
        kwargs["allow_is_causal_skip"] = False
        kwargs.pop("allow_is_bidirectional_skip", None)
        return mu.sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, **kwargs,
        )  # fmt: skip
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    # the 2-D mask covers columns [0, past + q); the layer's keys are columns [kv_offset, kv_offset + kv_length)
    # (a static cache is longer than the mask: its extra columns hold no token)
    if mask.shape[-1] < kv_offset + kv_length:
        mask = torch.nn.functional.pad(mask, (0, kv_offset + kv_length - mask.shape[-1]), value=False)
    mask = mask[:, kv_offset : kv_offset + kv_length]
    if mask.shape[-1] == kv_length and bool(mask.all()):
        return None
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# the attention function


class _Runs:
    """Host-side description of a 2-D padding mask: per row, the run of valid keys ``[first, end)`` and the
    valid queries (query indices ``[q_lo, q_hi)``); None from `_runs` when a row's valid keys are not one run."""

    def __init__(self, first, end, q_lo, q_hi):
        self.first, self.end, self.q_lo, self.q_hi = first, end, q_lo, q_hi


def _runs(mask: torch.Tensor, seqlen_q: int, cross: bool) -> _Runs | None:
    valid = mask.to(torch.bool)
    count = valid.sum(1)
    first = valid.to(torch.int8).argmax(1)
    end = first + count
    cols = torch.arange(valid.shape[1], device=valid.device)
    one_run = (((cols >= first[:, None]) & (cols < end[:, None])) == valid).all(1)
    stats = torch.stack([first, end, one_run.to(first.dtype)]).tolist()  # one host read
    first, end, one_run = stats
    if not all(one_run):
        return None
    n = len(first)
    if cross:
        return _Runs(first, end, [0] * n, [seqlen_q] * n)
    seqlen_k = valid.shape[1]
    # the queries are the last columns before the first column no row uses (a static cache's free tail)
    q_start = min(max(max(end) - seqlen_q, 0), seqlen_k - seqlen_q)
    q_lo = [max(f, q_start) - q_start for f in first]
    q_hi = [max(e - q_start, lo) for e, lo in zip(end, q_lo)]
    return _Runs(first, end, q_lo, q_hi)


def _rows(los, his, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors ``(b, s)`` of rows ``[lo_b, hi_b)`` of each sequence, in order."""
    b = [i for i, (lo, hi) in enumerate(zip(los, his)) for _ in range(hi - lo)]
    s = [p for lo, hi in zip(los, his) for p in range(lo, hi)]
    return torch.tensor(b, dtype=torch.long, device=device), torch.tensor(s, dtype=torch.long, device=device)


def _gather(x: torch.Tensor, los, his) -> torch.Tensor:
    """Rows ``[lo_b, hi_b)`` of each ``x[b]`` (``[B, S, H, D]``), packed ``[T, H, D]``."""
    return x[_rows(los, his, x.device)]


def _cu(counts, device) -> torch.Tensor:
    cu = [0]
    for c in counts:
        cu.append(cu[-1] + c)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _attend(q, k, v, mask, *, causal, scale, window, softcap, alibi_slopes=None, rel_bias=None, cross=False):
    """attn's kernels for HF-style inputs in our layout: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``, the
    2-D padding mask (or None). Returns ``out [B, Sq, Hq, D]``, or None when the mask is not one run per row."""
    batch, seqlen_q = q.shape[:2]
    seqlen_k = k.shape[1]
    opts = dict(softmax_scale=scale, window_size=window, softcap=softcap, alibi_slopes=alibi_slopes, rel_bias=rel_bias)
    if mask is None:
        if seqlen_q == 1 and seqlen_k > 0:
            lengths = torch.full((batch,), seqlen_k, dtype=torch.int32, device=q.device)
            with _label("attn.decode"):
                return attn.decode(q, k, v, lengths, **opts)
        with _label("attn.attention"):
            return attn.attention(q, k, v, causal=causal, **opts)
    runs = _runs(mask, seqlen_q, cross)
    if runs is None:
        return None
    if seqlen_q == 1:
        # a decode step: the valid keys gathered into a left-aligned cache ([B, max run, Hkv, D])
        width = max(max(e - f for f, e in zip(runs.first, runs.end)), 1)
        cols = torch.tensor(runs.first, device=q.device)[:, None] + torch.arange(width, device=q.device)
        cols = cols.clamp(max=seqlen_k - 1)
        rows = torch.arange(batch, device=q.device)[:, None]
        lengths = [e - f if hi > lo else 0 for f, e, lo, hi in zip(runs.first, runs.end, runs.q_lo, runs.q_hi)]
        seqlens = torch.tensor(lengths, dtype=torch.int32, device=q.device)
        k_left, v_left = k[rows, cols], v[rows, cols]
        with _label("attn.decode"):
            return attn.decode(q, k_left, v_left, seqlens, **opts)
    # packed (varlen): the valid queries of each row attend to its run of valid keys, bottom-right aligned
    q_packed = _gather(q, runs.q_lo, runs.q_hi)
    k_packed, v_packed = _gather(k, runs.first, runs.end), _gather(v, runs.first, runs.end)
    q_counts = [hi - lo for lo, hi in zip(runs.q_lo, runs.q_hi)]
    k_counts = [e - f for f, e in zip(runs.first, runs.end)]
    with _label("attn.attention"):
        o = attn.attention(
            q_packed, k_packed, v_packed, cu_seqlens_q=_cu(q_counts, q.device), cu_seqlens_k=_cu(k_counts, q.device),
            max_seqlen_q=max(q_counts), max_seqlen_k=max(k_counts), causal=causal, **opts,
        )  # fmt: skip
    out = q.new_zeros(q.shape)
    out[_rows(runs.q_lo, runs.q_hi, q.device)] = o
    return out


def _dense_mask(mask, batch, seqlen_q, seqlen_k, causal, window, device) -> torch.Tensor:
    """The bool ``[B, 1, Sq, Sk]`` mask our kernels implement for a 2-D padding mask (or None): what the SDPA
    fallback computes when the kernels cannot run for another reason."""
    valid = torch.ones(batch, seqlen_k, dtype=torch.bool, device=device) if mask is None else mask.to(torch.bool)
    if mask is None:
        q_start = seqlen_k - seqlen_q
    else:
        cols = torch.arange(seqlen_k, device=device)
        end = int(torch.where(valid, cols + 1, 0).max())
        q_start = min(max(end - seqlen_q, 0), seqlen_k - seqlen_q)
    i = torch.arange(seqlen_q, device=device)[:, None] + q_start
    j = torch.arange(seqlen_k, device=device)[None, :]
    allowed = valid[:, None, None, :].expand(batch, 1, seqlen_q, seqlen_k)
    if causal:
        allowed = allowed & (j <= i)
    if window[0] >= 0:
        allowed = allowed & (j >= i - window[0])
    return allowed


def _torch_attention(query, key, value, mask, *, scale, softcap, s_aux=None, dropout=0.0, training=False):
    """HF layout in, ``[B, Sq, Hq, D]`` out: SDPA, or the same math in torch for soft-capping and sinks.
    ``mask`` is a bool or additive float mask broadcastable to ``[B, Hq, Sq, Sk]``, or None."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if not softcap and s_aux is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout if training else 0.0, scale=scale
        )
        return out.transpose(1, 2).contiguous()
    s = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    if s_aux is not None:
        sinks = s_aux.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1).to(s.dtype)
        p = torch.softmax(torch.cat([s, sinks], dim=-1).float(), dim=-1)[..., :-1].to(value.dtype)
    else:
        p = torch.softmax(s.float(), dim=-1).to(value.dtype)
    p = torch.nn.functional.dropout(p, dropout, training=training)
    return torch.matmul(p, value).transpose(1, 2).contiguous()


def _kernel_blocker(module, query, key, value, attention_mask, dropout, s_aux, kwargs) -> str | None:
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:
        return "a mask that lengths, causality and a window cannot express (a dense mask)"
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        return f"an attention mask of type {type(attention_mask).__name__}"
    if s_aux is not None:
        return "attention sinks (s_aux) are not supported"
    if dropout and getattr(module, "training", False):
        return "dropout in training"
    if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
        return "the kernels have no backward pass (inputs require grad)"
    if query.shape[-1] > 256 or value.shape[-1] != query.shape[-1]:
        return f"head dims q {query.shape[-1]} / v {value.shape[-1]} (the kernels take equal dims up to 256)"
    if query.dtype not in _FAST_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype}"
    if query.device.type != "cuda" and not attn.fast._triton.is_interpreter():
        return f"device {query.device}"
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        return "packed sequences given as cu_seq_lens"
    return None


def _t5_rel(module) -> attn.RelativeBias:
    """The implicit T5 bias of a `patch_t5`-ed self-attention module: its stack's first-layer table, read at each
    call (so that moved or reloaded weights are seen)."""
    emb, cfg = module.__dict__["_attn_t5_source"], module.config
    return attn.RelativeBias(
        table=emb.weight.t(), max_distance=cfg.relative_attention_max_distance, bidirectional=not module.is_decoder
    )


def attn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: HF-layout inputs, ``(out [B, Sq, Hq, D], None)``."""
    if kwargs.get("output_attentions", False):
        _warn_once("output_attentions=True is not supported (no weights are returned)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    cap = float(softcap) if softcap else 0.0
    window = (-1, -1)
    if sliding_window is not None and sliding_window > 0:
        window = (int(sliding_window) - 1, 0)
    alibi_slopes = kwargs.pop("_attn_alibi_slopes", None)
    position_bias = kwargs.pop("position_bias", None)
    rel, reason = None, None
    if getattr(module, "_attn_t5_cross", False):
        position_bias = None  # T5's cross attention has no bias: transformers hands it zeros
    elif module.__dict__.get("_attn_t5_source") is not None:
        rel, position_bias = _t5_rel(module), None
    elif position_bias is not None:
        reason = "a dense position bias (patch_t5 turns T5's into the implicit kernel bias)"
    # a PagedCache's pools (never under torch.compile: PagedCache is not compileable, and dynamo would break the
    # graph on the weak dictionary)
    paged = None if torch.compiler.is_compiling() else _PAGED_POOLS.get(id(key))
    if paged is not None and paged.k is key:
        if reason is not None:
            raise NotImplementedError(f"PagedCache: {reason}")
        out = paged.attend(
            module, query, attention_mask, causal=causal, scale=scale, window=window, softcap=cap,
            alibi_slopes=alibi_slopes, rel_bias=rel,
        )  # fmt: skip
        return out, None
    # non-causal attention without a position-dependent bias (encoders, cross attention): every query row sees
    # its row's valid keys; with a bias the query rows must sit on the key columns (an encoder's self-attention)
    cross = not causal and rel is None and alibi_slopes is None
    if reason is None:
        reason = _kernel_blocker(module, query, key, value, attention_mask, dropout, s_aux, kwargs)
    if reason is None and window[0] >= 0 and not causal:
        reason = "a sliding window without causality"
    if reason is None and not causal and not cross and query.shape[2] != key.shape[2]:
        reason = "a position bias in non-causal attention between different sequences"
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if reason is None:
        out = _attend(
            q, k, v, attention_mask, causal=causal, scale=scale, window=window, softcap=cap,
            alibi_slopes=alibi_slopes, rel_bias=rel, cross=cross,
        )  # fmt: skip
        if out is not None:
            return out, None
        reason = "a padding mask whose valid keys are not one run of columns per row"
    _warn_once(reason)
    mask = attention_mask
    if mask is None or mask.dim() == 2:
        mask = _dense_mask(mask, query.shape[0], query.shape[2], key.shape[2], causal, window, query.device)
    bias = position_bias
    if rel is not None:
        bias = attn.reference.relative_bias.relative_bias_matrix(rel, query.shape[2], key.shape[2])[None]
    if alibi_slopes is not None:
        # ALiBi as Bloom defines it: slope times the key's position among the row's valid tokens (a row constant
        # apart, the same as slope times the distance when the valid keys are one run)
        if attention_mask is not None and attention_mask.dim() == 2:
            pos = attention_mask.to(torch.long).cumsum(-1) - 1
        else:
            pos = torch.arange(key.shape[2], device=query.device)[None, :]
        bias = alibi_slopes.float().reshape(1, -1, 1, 1) * pos[:, None, None, :].float()
    if bias is not None:
        bias = bias.to(query.dtype)
        mask = torch.where(mask, bias, torch.finfo(query.dtype).min) if mask.dtype == torch.bool else mask + bias
    out = _torch_attention(
        query, key, value, mask, scale=scale, softcap=cap, s_aux=s_aux, dropout=dropout,
        training=getattr(module, "training", False),
    )  # fmt: skip
    return out, None


# ---------------------------------------------------------------------------------------------------------------------
# PagedCache: a transformers Cache over attn.PagedKVCache

# id(k pool) -> the PagedLayer that owns it: PagedCache.update returns the layer's pools instead of dense K/V, and
# the attention function recognizes them (an identity check guards against reused ids)
_PAGED_POOLS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class _PagedStep:
    """One forward step over all layers: the new tokens of each sequence, reserved once, written by each layer at
    the same positions; the lengths advance after the last layer."""

    def __init__(self, kv: attn.PagedKVCache, slots, mask, seqlen_q, device):
        if mask is None:
            lo, hi = [0] * len(slots), [seqlen_q] * len(slots)
            self.one_run = True
        else:
            new = mask[:, -seqlen_q:].to(torch.bool)
            runs = _runs(new, seqlen_q, cross=True)
            if runs is None:
                raise NotImplementedError(
                    "PagedCache: the new tokens of a sequence must be one run of valid columns (left or right padding)"
                )
            lo, hi = runs.first, runs.end
            cols = mask.to(torch.bool)
            self.one_run = _runs(cols, seqlen_q, cross=True) is not None
        self.lo, self.hi = lo, hi
        self.counts = [h - lo_ for lo_, h in zip(lo, hi)]
        kv.reserve_tokens(slots, self.counts)
        after = [kv.length(s) + c for s, c in zip(slots, self.counts)]
        # host-known lengths: the first layer's calls check the metadata, the others skip the host reads
        self.hints = dict(max_seqlen_k=max(after, default=0), total_seqlen_k=sum(after))
        self.seqlens_before, self.block_table = (t.clone() for t in kv.metadata(slots))
        self.seqlens_after = self.seqlens_before + torch.tensor(self.counts, dtype=torch.int32, device=device)
        self.cu = _cu(self.counts, device)
        self.max_new = max(self.counts) if self.counts else 0
        self.decode = seqlen_q == 1 and all(c == 1 for c in self.counts)
        # every token valid: the packed rows are a reshape; else index tensors built once for all layers
        self.all_valid = all(c == seqlen_q for c in self.counts)
        self.rows = None if self.all_valid else _rows(lo, hi, device)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, Sq, H, D]`` -> the step's valid rows ``[T, H, D]``."""
        return x.reshape(-1, *x.shape[2:]) if self.all_valid else x[self.rows]


class PagedCache(Cache):
    """A transformers ``Cache`` whose keys and values live in an `attn.PagedKVCache` (one block table for all
    layers, one pool pair per layer), so that ``generate`` decodes through attn's paged kernel.

    Use it with ``attn_implementation="attn"`` (after `register`)::

        cache = PagedCache(model.config, max_batch_size=16, max_cache_len=4096, block_size=64)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=256, past_key_values=cache)

    Only valid tokens are stored (padding columns take no space); sliding-window layers keep every token and apply
    their window when reading. ``update`` returns the layer's pools, which only the "attn" attention function
    understands: another attention implementation raises there.

    Args:
        config: the model's config (for the number of layers; a text config of multimodal models).
        max_batch_size: sequences the cache can hold.
        max_cache_len: tokens per sequence (prompt, padding excluded, plus generated tokens).
        block_size: tokens per block.
        num_blocks: pool blocks; defaults to enough for every sequence at ``max_cache_len``.
        dtype: the storage dtype: None (the model's), a float type, or ``torch.int8`` / ``torch.float8_e4m3fn``.
        k_scale: for an INT8/FP8 cache, the K dequantization scale (float, or float tensor ``[1]`` or ``[Hkv]``),
            shared by all layers; see `attn.calibrate_kv_scales`.
        v_scale: likewise for V.
        device: where the pools live; defaults to the first keys' device.
    """

    def __init__(
        self, config, *, max_batch_size, max_cache_len, block_size=16, num_blocks=None, dtype=None, k_scale=None,
        v_scale=None, device=None,
    ):  # fmt: skip
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_layers = text.num_hidden_layers
        if max_batch_size < 1 or max_cache_len < 1 or block_size < 1:
            raise ValueError("max_batch_size, max_cache_len and block_size must be positive")
        blocks_per_seq = math.ceil(max_cache_len / block_size)
        # kept behind read-only properties: transformers 5.17's Cache defines both names as properties with no
        # setter (5.25 does not), so plain attributes fail there
        self._max_batch_size, self._max_cache_len, self.block_size = max_batch_size, max_cache_len, block_size
        self.num_blocks = num_blocks if num_blocks is not None else max_batch_size * blocks_per_seq
        self.blocks_per_seq = blocks_per_seq
        self.storage_dtype, self.device = dtype, device
        self.k_scale, self.v_scale = _scale(k_scale), _scale(v_scale)
        if dtype in (torch.int8, getattr(torch, "float8_e4m3fn", None)) and (k_scale is None or v_scale is None):
            raise ValueError(f"an INT8/FP8 cache (dtype={dtype}) needs k_scale and v_scale")
        self.kv: attn.PagedKVCache | None = None
        self.slots: list[int] = []
        self._step: _PagedStep | None = None
        super().__init__(layers=[PagedLayer(self, i) for i in range(num_layers)])

    # the storage, created when the first layer sees its first keys

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def max_cache_len(self) -> int:
        return self._max_cache_len

    def _ensure_kv(self, key_states: torch.Tensor):
        if self.kv is not None:
            return
        batch, hkv, _, d = key_states.shape
        if batch > self.max_batch_size:
            raise ValueError(f"batch {batch} exceeds max_batch_size={self.max_batch_size}")
        dtype = self.storage_dtype or key_states.dtype
        device = self.device or key_states.device
        scales = {}
        if self.k_scale is not None:
            scales = dict(k_scale=self.k_scale.to(device), v_scale=self.v_scale.to(device))
        self.kv = attn.PagedKVCache(
            num_blocks=self.num_blocks, block_size=self.block_size, num_heads_kv=hkv, head_dim=d,
            max_seqs=self.max_batch_size, max_blocks_per_seq=self.blocks_per_seq, dtype=dtype, device=device,
            **scales,
        )  # fmt: skip
        self.slots = [self.kv.add_sequence() for _ in range(batch)]

    def _begin_step(self, mask, seqlen_q, device) -> _PagedStep:
        if self._step is None:
            self._step = _PagedStep(self.kv, self.slots, mask, seqlen_q, device)
        return self._step

    def _end_step(self, layer_idx: int) -> None:
        if layer_idx == len(self.layers) - 1 and self._step is not None:
            self.kv.advance(self.slots, self._step.counts)
            self._step = None

    @property
    def is_compileable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self.kv.reorder_beams(self.slots, beam_idx.tolist())

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("PagedCache cannot be cropped (assisted decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int):
        if self.kv is not None and repeats != 1:
            raise NotImplementedError("PagedCache cannot repeat sequences after the prompt was cached")

    def batch_select_indices(self, indices: torch.Tensor):
        raise NotImplementedError("PagedCache cannot drop sequences in place; release them from cache.kv")

    def reset(self):
        if self.kv is not None:
            for s in self.slots:
                self.kv.release(s)
        self.kv, self.slots, self._step = None, [], None
        for layer in self.layers:
            layer.columns = 0
            layer.k = layer.v = None
            layer.is_initialized = False


def _scale(x):
    if x is None or isinstance(x, torch.Tensor):
        return x
    return torch.tensor([float(x)], dtype=torch.float32)


class PagedLayer(CacheLayerMixin):
    """One layer of a `PagedCache`: its K/V pools (layer 0's are the PagedKVCache's own; the others are listed in
    its ``extra_pools`` so that copy-on-write covers them) and the number of mask columns seen."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, cache, index):
        super().__init__()
        self._cache = weakref.ref(cache)
        self.index = index
        self.columns = 0
        self.k = self.v = None
        self._new = None

    def __repr__(self):
        return f"PagedLayer({self.index})"

    def lazy_initialization(self, key_states, value_states) -> None:
        cache = self._cache()
        cache._ensure_kv(key_states)
        kv = cache.kv
        hkv, d = key_states.shape[1], key_states.shape[3]
        if self.index == 0:
            self.k, self.v = kv.k, kv.v
        else:
            shape = (kv.k.shape[0], kv.k.shape[1], hkv, d)
            self.k = torch.zeros(shape, dtype=kv.k.dtype, device=kv.k.device)
            self.v = torch.zeros_like(self.k)
            kv.extra_pools.append((self.k, self.v))
        _PAGED_POOLS[id(self.k)] = self
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.columns += key_states.shape[-2]
        self._new = (key_states, value_states)
        return self.k, self.v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.columns = 0

    def attend(self, module, query, mask, *, causal, scale, window, softcap, alibi_slopes=None, rel_bias=None):
        """Writes this step's valid new tokens into the pools, then attends over the paged cache."""
        cache = self._cache()
        k_new, v_new = self._new
        self._new = None
        if not causal:
            raise NotImplementedError("PagedCache serves causal self-attention only")
        seqlen_q = query.shape[2]
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            raise NotImplementedError("PagedCache: a mask that lengths and a window cannot express")
        step = cache._begin_step(mask, seqlen_q, query.device)
        if window[0] >= 0 and not step.one_run:
            raise NotImplementedError("PagedCache: a sliding window over a mask with holes (right-padded prompts)")
        kv = cache.kv
        q = query.transpose(1, 2)
        k_packed, v_packed = step.pack(k_new.transpose(1, 2)), step.pack(v_new.transpose(1, 2))
        with _label("attn.append_kv"):
            attn.append_kv(
                self.k, self.v, k_packed, v_packed, step.seqlens_before, cu_seqlens_new=step.cu,
                block_table=step.block_table, **kv.scales,
            )  # fmt: skip
        opts = dict(
            softmax_scale=scale, window_size=window, softcap=softcap, alibi_slopes=alibi_slopes, rel_bias=rel_bias,
            **kv.scales,
        )  # fmt: skip
        validate = self.index == 0
        if step.decode:
            hints = {} if validate else step.hints
            with _label("attn.decode"):
                out = attn.decode(
                    q, self.k, self.v, step.seqlens_after, block_table=step.block_table, validate=validate, **hints,
                    **opts,
                )  # fmt: skip
        else:
            q_packed = step.pack(q)
            with _label("attn.context_attention"):
                o = attn.context_attention(
                    q_packed, self.k, self.v, step.seqlens_after, cu_seqlens_q=step.cu, max_seqlen_q=step.max_new,
                    block_table=step.block_table, causal=True, validate=validate, **opts,
                )  # fmt: skip
            if step.all_valid:
                out = o.view(q.shape)
            else:
                out = q.new_zeros(q.shape)
                out[step.rows] = o
        cache._end_step(self.index)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# architectures outside the interface, patched the way Liger-Kernel patches models


def _use_attn_masks(model) -> None:
    """Makes the model's mask builders hand 2-D padding masks (the "attn" mask function): through
    ``set_attn_implementation`` where the model accepts it, else on the configs directly (Bloom's attention
    does not go through the interface, so transformers refuses the name for it)."""
    register()
    try:
        model.set_attn_implementation("attn")
    except (ValueError, KeyError, AttributeError):
        pass
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None) != "attn":
            cfg._attn_implementation = "attn"


def _bloom_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                   output_attentions=False, **kwargs):  # fmt: skip
    """BloomAttention.forward through attn's kernels: ALiBi is computed inside them from the slopes (the model's
    ``alibi`` tensor is not read), after scaling, as Bloom adds it."""
    from transformers.models.bloom.modeling_bloom import dropout_add

    batch, seqlen_q, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    slopes = self._attn_slopes
    if slopes.device != q.device:
        slopes = self._attn_slopes = slopes.to(q.device)
    out, _ = attn_attention_forward(
        self, q, k, v, attention_mask, scaling=self.inv_norm_factor, is_causal=True, _attn_alibi_slopes=slopes,
        dropout=self.attention_dropout.p,
    )  # fmt: skip
    context = out.reshape(batch, seqlen_q, self.num_heads * self.head_dim)
    if self.pretraining_tp > 1 and self.slow_but_exact:
        slices = self.hidden_size / self.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(self.pretraining_tp):
            lo, hi = int(i * slices), int((i + 1) * slices)
            output = output + torch.nn.functional.linear(context[:, :, lo:hi], self.dense.weight[:, lo:hi])
    else:
        output = self.dense(context)
    return dropout_add(output, residual, self.hidden_dropout, self.training), None


def patch_bloom(model):
    """Runs every ``BloomAttention`` of ``model`` through attn's kernels, ALiBi computed inside them (in place,
    returns the model). Padding masks become lengths as for the interface; masks they cannot express fall back
    to SDPA with Bloom's ALiBi. ``output_attentions`` returns no weights."""
    from transformers.models.bloom.modeling_bloom import BloomAttention

    from ..reference.alibi import alibi_slopes

    found = 0
    for m in model.modules():
        if isinstance(m, BloomAttention):
            # Bloom's slopes are the standard ALiBi ones (transformers builds them inside build_alibi_tensor,
            # a private helper of some versions): attn's own, equal to them for every head count
            m._attn_slopes = alibi_slopes(m.num_heads, device=m.dense.weight.device).float()
            m.forward = types.MethodType(_bloom_forward, m)
            found += 1
    if not found:
        raise ValueError("patch_bloom: the model has no BloomAttention module")
    _use_attn_masks(model)
    return model


def _t5_placeholder_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
    # the patched layers read the bias table inside the kernel: the dense [1, H, Sq, Sk] bias is never built
    return torch.zeros(1, self.n_heads, 1, 1, device=device or self.relative_attention_bias.weight.device)


def patch_t5(model):
    """Runs T5's attention (T5, mT5, and models built from ``T5Stack``) through attn's kernels, in place; returns
    the model.

    - Self-attention in both stacks takes the relative bias in implicit mode: the kernel reads the first layer's
      table ``[H, num_buckets]`` through a per-distance table; the dense ``[1, H, Sq, Sk]`` bias transformers
      builds is not built any more (``compute_bias`` returns a placeholder the patched layers ignore).
    - Cross attention runs without a bias over the encoder's keys, which ``generate`` keeps in the cross cache
      (``EncoderDecoderCache.cross_attention_cache``): each decode step is one `attn.decode` over it.

    The model must then run with the "attn" implementation (set here); switching back to eager or SDPA after
    patching computes a wrong bias.
    """
    from transformers.models.t5.modeling_t5 import T5Attention

    stacks = [m for m in model.modules() if type(m).__name__.endswith("Stack") and hasattr(m, "block")]
    if not stacks:
        raise ValueError("patch_t5: the model has no T5Stack")
    for stack in stacks:
        first = stack.block[0].layer[0].SelfAttention
        if not isinstance(first, T5Attention) or not first.has_relative_attention_bias:
            raise ValueError("patch_t5: a stack's first self-attention has no relative_attention_bias")
        for block in stack.block:
            # in __dict__, not as an attribute: nn.Module would register the embedding as a submodule (and a second
            # copy of the table in the state dict)
            block.layer[0].SelfAttention.__dict__["_attn_t5_source"] = first.relative_attention_bias
            if stack.is_decoder and len(block.layer) > 2:
                block.layer[1].EncDecAttention._attn_t5_cross = True
        first.compute_bias = types.MethodType(_t5_placeholder_bias, first)
    _use_attn_masks(model)
    return model
