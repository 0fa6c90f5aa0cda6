"""Tensors derived on the host once and kept, instead of rebuilt by small kernels on every call.

Each small torch kernel costs a few microseconds of device time and more of host time, which adds up on a
decode step that takes tens of microseconds. Two kinds of memo serve the wrappers:

- `derived`: a tensor computed from another (a scale expanded per head, a T5 distance table), kept for as long
  as that source tensor lives unchanged: the entry holds a weak reference to it and its version counter, which
  every in-place write bumps, so a caller who edits the source in place gets a fresh result.
- `by_key`: a tensor that depends only on plain values (shapes, a device).

Nothing is kept from inside CUDA-graph capture, whose memory belongs to the graph; each memo is cleared when it
reaches ``limit`` entries.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def derived(
    memo: dict, source: torch.Tensor, params: Hashable, build: Callable[[], torch.Tensor], limit: int
) -> torch.Tensor:
    """``build()``, or what it returned before for this same ``source`` (unchanged since) and ``params``."""
    key = (source._version, params)
    hit = memo.get(id(source))
    if hit is not None and hit[0]() is source and hit[1] == key:
        return hit[2]
    out = build()
    if not _capturing(out.device):
        if len(memo) >= limit:
            memo.clear()
        memo[id(source)] = (weakref.ref(source), key, out)
    return out


def by_key(memo: dict, key: Hashable, build: Callable[[], torch.Tensor], limit: int) -> torch.Tensor:
    """``build()``, or what it returned before for ``key``."""
    out = memo.get(key)
    if out is None:
        out = build()
        if not _capturing(out.device):
            if len(memo) >= limit:
                memo.clear()
            memo[key] = out
    return out
