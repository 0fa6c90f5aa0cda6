"""Tensor-parallel attention helpers: each rank owns a slice of the heads.

With ``N`` ranks, rank ``r`` holds query heads ``[r·Hq/N, (r+1)·Hq/N)``. Its KV heads are those these query
heads read (query head ``h`` reads KV head ``h // (Hq/Hkv)``): a slice of ``Hkv/N`` heads when ``Hkv ≥ N``, or,
when there are fewer KV heads than ranks, the one KV head of its query heads, replicated on ``N/Hkv`` ranks (as
TensorRT-LLM and vLLM do). Attention needs no communication: each rank runs the unchanged kernels on its heads,
and what is per head (ALiBi slopes, the T5 table, the KV cache) is sliced the same way.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist

from ..reference.alibi import alibi_slopes
from ..reference.relative_bias import RelativeBias


def _check(num_heads_q: int, num_heads_kv: int, tp_size: int, tp_rank: int) -> None:
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive int, got {tp_size!r}")
    if not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must lie in [0, {tp_size}), got {tp_rank!r}")
    if num_heads_q % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide the query heads ({num_heads_q})")
    if num_heads_q % num_heads_kv:
        raise ValueError(f"the KV heads ({num_heads_kv}) must divide the query heads ({num_heads_q})")
    if num_heads_kv % tp_size and tp_size % num_heads_kv:
        raise ValueError(
            f"tp_size={tp_size} and the KV heads ({num_heads_kv}) must divide one another (sliced or replicated KV)"
        )


def head_ranges(num_heads_q: int, num_heads_kv: int, tp_size: int, tp_rank: int) -> tuple[range, range]:
    """The query heads and the KV heads of rank ``tp_rank``.

    Returns:
        ``(q_heads, kv_heads)`` as ranges; ``kv_heads`` has one head, shared with other ranks, when
        ``num_heads_kv < tp_size``.
    """
    _check(num_heads_q, num_heads_kv, tp_size, tp_rank)
    per_q = num_heads_q // tp_size
    q_heads = range(tp_rank * per_q, (tp_rank + 1) * per_q)
    if num_heads_kv >= tp_size:
        per_kv = num_heads_kv // tp_size
        return q_heads, range(tp_rank * per_kv, (tp_rank + 1) * per_kv)
    kv = tp_rank // (tp_size // num_heads_kv)
    return q_heads, range(kv, kv + 1)


def shard_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tp_size: int, tp_rank: int, head_dim: int = -2):
    """This rank's heads of ``q [..., Hq, D]`` and ``k, v [..., Hkv, D]`` (views; ``head_dim`` is the head axis)."""
    qh, kvh = head_ranges(q.shape[head_dim], k.shape[head_dim], tp_size, tp_rank)
    return (q.narrow(head_dim, qh.start, len(qh)), k.narrow(head_dim, kvh.start, len(kvh)),
            v.narrow(head_dim, kvh.start, len(kvh)))  # fmt: skip


def shard_alibi_slopes(num_heads: int, tp_size: int, tp_rank: int, **kwargs) -> torch.Tensor:
    """ALiBi slopes of the rank's query heads: TensorRT-LLM's generator with the rank offset (the slopes of the
    whole model's heads ``tp_rank·Hq/N …``, not those of a model with ``Hq/N`` heads). kwargs as in
    `attn.alibi_slopes`."""
    return alibi_slopes(num_heads, tp_size=tp_size, tp_rank=tp_rank, **kwargs)


def shard_relative_bias(rel: RelativeBias, tp_size: int, tp_rank: int) -> RelativeBias:
    """The T5 bias of the rank's query heads: rows of the table (implicit) or of the bias tensor (regular)."""
    full = rel.table if rel.implicit else rel.bias
    hq = full.shape[0]
    if not isinstance(tp_size, int) or tp_size < 1 or hq % tp_size or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_size={tp_size!r} must divide the bias heads ({hq}) and tp_rank={tp_rank!r} lie below it")
    per = hq // tp_size
    part = full[tp_rank * per : (tp_rank + 1) * per]
    return dataclasses.replace(rel, **({"table": part} if rel.implicit else {"bias": part}))


def shard_cache(cache, num_heads_q: int, tp_size: int, tp_rank: int):
    """A rank's copy of a cache object (`attn.ContiguousKVCache` / `attn.PagedKVCache`) holding its KV heads.

    The bookkeeping (sequences, lengths, block tables, allocator) is copied and then evolves on its own: every
    rank appends and releases the same sequences. Per-head quantization scales are sliced along.
    """
    _, kvh = head_ranges(num_heads_q, cache.k.shape[2], tp_size, tp_rank)
    # the big tensors are not deep-copied: the copy gets its own slices of them
    memo = {id(cache.k): None, id(cache.v): None}
    local = copy.deepcopy(cache, memo)
    local.k = cache.k[:, :, kvh.start : kvh.stop].contiguous()
    local.v = cache.v[:, :, kvh.start : kvh.stop].contiguous()
    for name in ("k_scale", "v_scale"):
        s = getattr(cache, name, None)
        if s is not None and s.numel() > 1:
            setattr(local, name, s[kvh.start : kvh.stop].clone())
    if hasattr(local, "extra_pools"):
        local.extra_pools = []
    return local


def new_cache(cls, *, num_heads_q: int, num_heads_kv: int, tp_size: int, tp_rank: int, **kwargs):
    """A fresh cache object of class ``cls`` sized for the rank's KV heads (kwargs as for ``cls``)."""
    _, kvh = head_ranges(num_heads_q, num_heads_kv, tp_size, tp_rank)
    return cls(num_heads_kv=len(kvh), **kwargs)


def gather_heads(out: torch.Tensor, group=None, head_dim: int = -2) -> torch.Tensor:
    """Every rank's head slice of an output, concatenated back in head order (an all-gather)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return out
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=head_dim)
