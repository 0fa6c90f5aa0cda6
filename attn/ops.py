"""The kernels as PyTorch custom operators, so that `torch.compile` traces through them.

``torch.library.custom_op`` registers each entry as an opaque operator (``torch.ops.attn.decode``, ...) with a
fake implementation that gives the output's shape and dtype without running anything, and with ``mutates_args``
naming the caches an operator writes. ``torch.compile(fullgraph=True)`` then puts one node per call in its graph
instead of tracing into the Python of the launchers (whose host-side checks it cannot trace), and
``mode="reduce-overhead"`` captures the nodes in a CUDA graph.

Operators take only what an operator schema allows (tensors, ints, floats, bools, strings, lists of them), so the
option objects are flattened here: a `RelativeBias` becomes its table or bias tensor plus two scalars, a
`RopeScaling` its type and a list of floats, ``window_size`` two ints, an `InflightBatch` its fields.

The public functions (``attn.decode``, ...) are thin wrappers: in eager mode they call the launcher directly,
because dispatching through an operator costs host time on every call, and they go through the operator when
`torch.compiler.is_compiling()` (or when an input requires grad, so that ``.backward()`` meets the error below
instead of a silent "does not require grad").

The kernels compute a forward pass only: the operators' autograd rule raises
``attn is forward-only (inference); .backward() is not supported``.
"""

from __future__ import annotations

import functools
import math

import torch

from . import fast as _fast
from .inflight import InflightBatch
from .options import accepts_options
from .reference.preprocess import RopeScaling
from .reference.relative_bias import RelativeBias

__all__ = ["append_kv", "attention", "context_attention", "decode", "gpt_attention", "preprocess"]

FORWARD_ONLY = "attn is forward-only (inference); .backward() is not supported"

# ---------------------------------------------------------------------------------------------------------------
# flattening the option objects

_ROPE_FIELDS = ("factor", "original_max_position", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                "attention_factor", "mscale", "mscale_all_dim", "truncate")  # fmt: skip


def _rope_flat(rs: RopeScaling | None) -> tuple[str | None, list[float]]:
    if rs is None:
        return None, []
    # None becomes NaN (no field takes NaN as a value), bools and ints become floats
    return rs.type, [math.nan if getattr(rs, f) is None else float(getattr(rs, f)) for f in _ROPE_FIELDS]


def _rope_unflat(kind: str | None, values: list[float]) -> RopeScaling | None:
    if kind is None:
        return None
    kw = {f: (None if math.isnan(x) else x) for f, x in zip(_ROPE_FIELDS, values)}
    if kw["original_max_position"] is not None:
        kw["original_max_position"] = int(kw["original_max_position"])
    kw["truncate"] = bool(kw["truncate"])
    return RopeScaling(kind, **kw)


def _rel_flat(rel: RelativeBias | None):
    if rel is None:
        return None, None, 128, True
    return rel.table, rel.bias, rel.max_distance, rel.bidirectional


def _rel_unflat(table, bias, max_distance, bidirectional):
    if table is None and bias is None:
        return None
    return RelativeBias(table=table, bias=bias, max_distance=max_distance, bidirectional=bidirectional)


def _no_lse(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((0,), dtype=torch.float32)


def _backward(ctx, *grads):
    raise RuntimeError(FORWARD_ONLY)


def _setup(ctx, inputs, output):
    pass


# ---------------------------------------------------------------------------------------------------------------
# attn::attention


@torch.library.custom_op("attn::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int | None, max_seqlen_k: int | None,
    seqlens_q: torch.Tensor | None, seqlens_k: torch.Tensor | None, causal: bool, softmax_scale: float | None,
    q_scaling: float, window_left: int, window_right: int, softcap: float, alibi_slopes: torch.Tensor | None,
    alibi_mode: str, rel_table: torch.Tensor | None, rel_full: torch.Tensor | None, rel_max_distance: int,
    rel_bidirectional: bool, return_lse: bool, validate: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    r = _fast.attention(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, seqlens_q=seqlens_q, seqlens_k=seqlens_k, causal=causal,
        softmax_scale=softmax_scale, q_scaling=q_scaling, window_size=(window_left, window_right), softcap=softcap,
        alibi_slopes=alibi_slopes, alibi_mode=alibi_mode,
        rel_bias=_rel_unflat(rel_table, rel_full, rel_max_distance, rel_bidirectional), return_lse=return_lse,
        validate=validate,
    )  # fmt: skip
    return r if return_lse else (r, _no_lse(q))


@_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqlens_q, seqlens_k, *rest):
    return_lse = rest[-2]
    out = q.new_empty(q.shape)
    if not return_lse:
        return out, _no_lse(q)
    if cu_seqlens_q is not None:
        return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def _attention_call(
    q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, seqlens_q=None,
    seqlens_k=None, causal=False, softmax_scale=None, q_scaling=1.0, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, alibi_mode="alibi", rel_bias=None, return_lse=False, validate=None,
):  # fmt: skip
    out, lse = torch.ops.attn.attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqlens_q, seqlens_k, causal,
        softmax_scale, q_scaling, window_size[0], window_size[1], softcap, alibi_slopes, alibi_mode,
        *_rel_flat(rel_bias), return_lse, validate,
    )  # fmt: skip
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------------------
# attn::decode


@torch.library.custom_op("attn::decode", mutates_args=())
def _decode_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None, causal: bool, softmax_scale: float | None, q_scaling: float,
    window_left: int, window_right: int, softcap: float, alibi_slopes: torch.Tensor | None, alibi_mode: str,
    rel_table: torch.Tensor | None, rel_full: torch.Tensor | None, rel_max_distance: int, rel_bidirectional: bool,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, max_attention_window: int | None,
    sink_token_length: int, rotary_dim: int, rope_base: float, rope_style: str, rope_scaling_type: str | None,
    rope_scaling_values: list[float], cache_indirection: torch.Tensor | None, return_lse: bool,
    num_splits: int | None, max_seqlen_k: int | None, total_seqlen_k: int | None, validate: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    r = _fast.decode(
        q, k_cache, v_cache, cache_seqlens, block_table=block_table, causal=causal, softmax_scale=softmax_scale,
        q_scaling=q_scaling, window_size=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes,
        alibi_mode=alibi_mode, rel_bias=_rel_unflat(rel_table, rel_full, rel_max_distance, rel_bidirectional),
        k_scale=k_scale, v_scale=v_scale, max_attention_window=max_attention_window,
        sink_token_length=sink_token_length, rotary_dim=rotary_dim, rope_base=rope_base, rope_style=rope_style,
        rope_scaling=_rope_unflat(rope_scaling_type, rope_scaling_values), cache_indirection=cache_indirection,
        return_lse=return_lse, num_splits=num_splits, max_seqlen_k=max_seqlen_k, total_seqlen_k=total_seqlen_k,
        validate=validate,
    )  # fmt: skip
    return r if return_lse else (r, _no_lse(q))


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, *rest):
    return_lse = rest[-5]
    out = q.new_empty(q.shape)
    if not return_lse:
        return out, _no_lse(q)
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def _decode_call(
    q, k_cache, v_cache, cache_seqlens, *, block_table=None, causal=False, softmax_scale=None, q_scaling=1.0,
    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, alibi_mode="alibi", rel_bias=None, k_scale=None,
    v_scale=None, max_attention_window=None, sink_token_length=0, rotary_dim=0, rope_base=10000.0,
    rope_style="neox", rope_scaling=None, cache_indirection=None, return_lse=False, num_splits=None,
    max_seqlen_k=None, total_seqlen_k=None, validate=None,
):  # fmt: skip
    out, lse = torch.ops.attn.decode(
        q, k_cache, v_cache, cache_seqlens, block_table, causal, softmax_scale, q_scaling, window_size[0],
        window_size[1], softcap, alibi_slopes, alibi_mode, *_rel_flat(rel_bias), k_scale, v_scale,
        max_attention_window, sink_token_length, rotary_dim, float(rope_base), rope_style, *_rope_flat(rope_scaling),
        cache_indirection, return_lse, num_splits, max_seqlen_k, total_seqlen_k, validate,
    )  # fmt: skip
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------------------
# attn::context_attention


@torch.library.custom_op("attn::context_attention", mutates_args=())
def _context_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    cu_seqlens_q: torch.Tensor, max_seqlen_q: int | None, block_table: torch.Tensor | None, causal: bool,
    softmax_scale: float | None, q_scaling: float, window_left: int, window_right: int, softcap: float,
    alibi_slopes: torch.Tensor | None, alibi_mode: str, rel_table: torch.Tensor | None,
    rel_full: torch.Tensor | None, rel_max_distance: int, rel_bidirectional: bool, k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None, max_attention_window: int | None, sink_token_length: int,
    k_new: torch.Tensor | None, v_new: torch.Tensor | None, rotary_dim: int, rope_base: float, rope_style: str,
    rope_scaling_type: str | None, rope_scaling_values: list[float], return_lse: bool, validate: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    r = _fast.context_attention(
        q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
        block_table=block_table, causal=causal, softmax_scale=softmax_scale, q_scaling=q_scaling,
        window_size=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes, alibi_mode=alibi_mode,
        rel_bias=_rel_unflat(rel_table, rel_full, rel_max_distance, rel_bidirectional), k_scale=k_scale,
        v_scale=v_scale, max_attention_window=max_attention_window, sink_token_length=sink_token_length,
        k_new=k_new, v_new=v_new, rotary_dim=rotary_dim, rope_base=rope_base, rope_style=rope_style,
        rope_scaling=_rope_unflat(rope_scaling_type, rope_scaling_values), return_lse=return_lse, validate=validate,
    )  # fmt: skip
    return r if return_lse else (r, _no_lse(q))


@_context_op.register_fake
def _(q, *rest):
    return_lse = rest[-2]
    out = q.new_empty(q.shape)
    if not return_lse:
        return out, _no_lse(q)
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _context_call(
    q, k_cache, v_cache, cache_seqlens, *, cu_seqlens_q, max_seqlen_q=None, block_table=None, causal=True,
    softmax_scale=None, q_scaling=1.0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, alibi_mode="alibi",
    rel_bias=None, k_scale=None, v_scale=None, max_attention_window=None, sink_token_length=0, k_new=None,
    v_new=None, rotary_dim=0, rope_base=10000.0, rope_style="neox", rope_scaling=None, return_lse=False,
    validate=None,
):  # fmt: skip
    out, lse = torch.ops.attn.context_attention(
        q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q, block_table, causal, softmax_scale,
        q_scaling, window_size[0], window_size[1], softcap, alibi_slopes, alibi_mode, *_rel_flat(rel_bias), k_scale,
        v_scale, max_attention_window, sink_token_length, k_new, v_new, rotary_dim, float(rope_base), rope_style,
        *_rope_flat(rope_scaling), return_lse, validate,
    )  # fmt: skip
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------------------
# attn::append_kv and attn::preprocess (they write the caches)


@torch.library.custom_op("attn::append_kv", mutates_args=("k_cache", "v_cache"))
def _append_op(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    cache_seqlens: torch.Tensor, cu_seqlens_new: torch.Tensor | None, block_table: torch.Tensor | None,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, max_attention_window: int | None,
    sink_token_length: int, validate: bool | None,
) -> None:  # fmt: skip
    _fast.append_kv(
        k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_new=cu_seqlens_new, block_table=block_table,
        k_scale=k_scale, v_scale=v_scale, max_attention_window=max_attention_window,
        sink_token_length=sink_token_length, validate=validate,
    )  # fmt: skip


@_append_op.register_fake
def _(*args):
    return None


def _append_call(
    k_cache, v_cache, k_new, v_new, cache_seqlens, *, cu_seqlens_new=None, block_table=None, k_scale=None,
    v_scale=None, max_attention_window=None, sink_token_length=0, validate=None,
):  # fmt: skip
    torch.ops.attn.append_kv(
        k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens_new, block_table, k_scale, v_scale,
        max_attention_window, sink_token_length, validate,
    )  # fmt: skip


@torch.library.custom_op("attn::preprocess", mutates_args=("k_cache", "v_cache"))
def _preprocess_op(
    qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, num_heads_q: int,
    num_heads_kv: int, cu_seqlens_new: torch.Tensor | None, block_table: torch.Tensor | None,
    qkv_bias: torch.Tensor | None, rotary_dim: int, rope_base: float, rope_style: str, rope_scaling_type: str | None,
    rope_scaling_values: list[float], k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
    max_attention_window: int | None, sink_token_length: int, validate: bool | None,
) -> torch.Tensor:  # fmt: skip
    return _fast.preprocess(
        qkv, k_cache, v_cache, cache_seqlens, num_heads_q=num_heads_q, num_heads_kv=num_heads_kv,
        cu_seqlens_new=cu_seqlens_new, block_table=block_table, qkv_bias=qkv_bias, rotary_dim=rotary_dim,
        rope_base=rope_base, rope_style=rope_style, rope_scaling=_rope_unflat(rope_scaling_type, rope_scaling_values),
        k_scale=k_scale, v_scale=v_scale, max_attention_window=max_attention_window,
        sink_token_length=sink_token_length, validate=validate,
    )  # fmt: skip


def _q_of_qkv(qkv, num_heads_q, num_heads_kv):
    d = qkv.shape[-1] // (num_heads_q + 2 * num_heads_kv)
    return qkv.new_empty((*qkv.shape[:-1], num_heads_q, d))


@_preprocess_op.register_fake
def _(qkv, k_cache, v_cache, cache_seqlens, num_heads_q, num_heads_kv, *rest):
    return _q_of_qkv(qkv, num_heads_q, num_heads_kv)


def _preprocess_call(
    qkv, k_cache, v_cache, cache_seqlens, *, num_heads_q, num_heads_kv, cu_seqlens_new=None, block_table=None,
    qkv_bias=None, rotary_dim=0, rope_base=10000.0, rope_style="neox", rope_scaling=None, k_scale=None,
    v_scale=None, max_attention_window=None, sink_token_length=0, validate=None,
):  # fmt: skip
    return torch.ops.attn.preprocess(
        qkv, k_cache, v_cache, cache_seqlens, num_heads_q, num_heads_kv, cu_seqlens_new, block_table, qkv_bias,
        rotary_dim, float(rope_base), rope_style, *_rope_flat(rope_scaling), k_scale, v_scale, max_attention_window,
        sink_token_length, validate,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# attn::gpt_attention (an InflightBatch flattened into its fields)

_BATCH_TENSORS = ("cu_seqlens_new", "cache_seqlens_before", "cache_seqlens_after", "block_table",
                  "context_requests", "generation_requests", "context_rows", "generation_rows",
                  "cu_seqlens_context", "token_seq", "token_positions")  # fmt: skip


@torch.library.custom_op("attn::gpt_attention", mutates_args=("k_cache", "v_cache"))
def _gpt_op(
    qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, request_types: list[int], new_tokens: list[int],
    past_lengths: list[int], cu_seqlens_new: torch.Tensor, cache_seqlens_before: torch.Tensor,
    cache_seqlens_after: torch.Tensor, block_table: torch.Tensor | None, context_requests: torch.Tensor,
    generation_requests: torch.Tensor, context_rows: torch.Tensor, generation_rows: torch.Tensor,
    cu_seqlens_context: torch.Tensor, token_seq: torch.Tensor, token_positions: torch.Tensor, num_heads_q: int,
    num_heads_kv: int, qkv_bias: torch.Tensor | None, rotary_dim: int, rope_base: float, rope_style: str,
    rope_scaling_type: str | None, rope_scaling_values: list[float], softmax_scale: float | None, q_scaling: float,
    window_left: int, window_right: int, softcap: float, alibi_slopes: torch.Tensor | None, alibi_mode: str,
    rel_table: torch.Tensor | None, rel_full: torch.Tensor | None, rel_max_distance: int, rel_bidirectional: bool,
    # (split_mode: an operator argument named "mode" collides with an argument of torch's dispatch to modes)
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, split_mode: str | None, validate: bool | None,
) -> torch.Tensor:  # fmt: skip
    after = [p + n for p, n in zip(past_lengths, new_tokens)]
    ctx_new = [n for t, n in zip(request_types, new_tokens) if t == 0]
    batch = InflightBatch(
        request_types=tuple(request_types), new_tokens=tuple(new_tokens), past_lengths=tuple(past_lengths),
        cu_seqlens_new=cu_seqlens_new, cache_seqlens_before=cache_seqlens_before,
        cache_seqlens_after=cache_seqlens_after, block_table=block_table, context_requests=context_requests,
        generation_requests=generation_requests, context_rows=context_rows, generation_rows=generation_rows,
        cu_seqlens_context=cu_seqlens_context, token_seq=token_seq, token_positions=token_positions,
        num_tokens=sum(new_tokens), max_new=max(new_tokens, default=0), max_context_new=max(ctx_new, default=0),
        max_seqlen=max(after, default=0),
    )  # fmt: skip
    return _fast.gpt_attention(
        qkv, batch, k_cache, v_cache, num_heads_q=num_heads_q, num_heads_kv=num_heads_kv, qkv_bias=qkv_bias,
        rotary_dim=rotary_dim, rope_base=rope_base, rope_style=rope_style,
        rope_scaling=_rope_unflat(rope_scaling_type, rope_scaling_values), softmax_scale=softmax_scale,
        q_scaling=q_scaling, window_size=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes,
        alibi_mode=alibi_mode, rel_bias=_rel_unflat(rel_table, rel_full, rel_max_distance, rel_bidirectional),
        k_scale=k_scale, v_scale=v_scale, mode=split_mode, validate=validate,
    )  # fmt: skip


@_gpt_op.register_fake
def _(qkv, k_cache, v_cache, *rest):
    num_heads_q, num_heads_kv = rest[14], rest[15]
    return _q_of_qkv(qkv, num_heads_q, num_heads_kv)


def _gpt_call(
    qkv, batch, k_cache, v_cache, *, num_heads_q, num_heads_kv, qkv_bias=None, rotary_dim=0, rope_base=10000.0,
    rope_style="neox", rope_scaling=None, softmax_scale=None, q_scaling=1.0, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, alibi_mode="alibi", rel_bias=None, k_scale=None, v_scale=None, mode=None, validate=None,
):  # fmt: skip
    return torch.ops.attn.gpt_attention(
        qkv, k_cache, v_cache, list(batch.request_types), list(batch.new_tokens), list(batch.past_lengths),
        *(getattr(batch, name) for name in _BATCH_TENSORS), num_heads_q, num_heads_kv, qkv_bias, rotary_dim,
        float(rope_base), rope_style, *_rope_flat(rope_scaling), softmax_scale, q_scaling, window_size[0],
        window_size[1], softcap, alibi_slopes, alibi_mode, *_rel_flat(rel_bias), k_scale, v_scale, mode, validate,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# autograd: forward only

for _op in (_attention_op, _decode_op, _context_op):
    _op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------------------------
# the public functions


def _wants_op(x) -> bool:
    # x is the call's first argument, unchecked yet: anything but a tensor goes to the launcher, whose checks
    # name it
    return torch.compiler.is_compiling() or (
        isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()
    )


def _public(fast_fn, op_call):
    @functools.wraps(fast_fn)
    def fn(*args, **kwargs):
        if _wants_op(args[0] if args else next(iter(kwargs.values()), None)):
            return op_call(*args, **kwargs)
        return fast_fn(*args, **kwargs)

    return fn


# the op calls take the options objects too (scores=, cache_view=, rope=), expanded before the operator
_attention_call, _decode_call, _context_call, _append_call, _preprocess_call, _gpt_call = (
    accepts_options(f) for f in (_attention_call, _decode_call, _context_call, _append_call, _preprocess_call,
                                 _gpt_call)
)  # fmt: skip
attention = _public(_fast.attention, _attention_call)
decode = _public(_fast.decode, _decode_call)
context_attention = _public(_fast.context_attention, _context_call)
append_kv = _public(_fast.append_kv, _append_call)
preprocess = _public(_fast.preprocess, _preprocess_call)
gpt_attention = _public(_fast.gpt_attention, _gpt_call)

# the signatures the op calls mirror (tests/test_ops.py keeps them equal)
OP_CALLS = {
    "attention": (_fast.attention, _attention_call),
    "decode": (_fast.decode, _decode_call),
    "context_attention": (_fast.context_attention, _context_call),
    "append_kv": (_fast.append_kv, _append_call),
    "preprocess": (_fast.preprocess, _preprocess_call),
    "gpt_attention": (_fast.gpt_attention, _gpt_call),
}
