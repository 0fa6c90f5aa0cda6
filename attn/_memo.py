"""Tensors derived on the host once and kept, instead of rebuilt by small kernels on every call.

Each small torch kernel costs a few microseconds of device time and more of host time, which adds up on a
decode step that takes tens of microseconds. Two kinds of memo serve the wrappers:

- `derived`: a tensor computed from another (a scale expanded per head, a T5 distance table), kept for as long
  as that source tensor lives unchanged: the entry holds a weak reference to it and its version counter, which
  every in-place write bumps, so a caller who edits the source in place gets a fresh result.
- `by_key`: a tensor that depends only on plain values (shapes, a device).

Nothing is kept from inside CUDA-graph capture, whose memory belongs to the graph; each memo is cleared when it
reaches ``limit`` entries. What is kept is made by `outside_pools`, so that it is not in a CUDA graph's memory pool
either when the first call comes during torch.compile's graph warm-up.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def outside_pools(device: torch.device, make: Callable[[], T]) -> T:
    """``make()``, with its CUDA allocations taken from PyTorch's general memory, not a graph's pool.

    torch.compile(mode="reduce-overhead") runs a function's first calls (its warm-up) with every allocation of
    the calling thread routed into the CUDA graphs' memory pool, and then refuses to record a graph while a
    tensor in that pool is alive and not among the function's outputs. A buffer attn keeps across calls (a
    memo, the error word, split-K counters), first made during that warm-up, is such a tensor: a model's first
    attn call inside a compiled function then fails ("tensor(s) in the cudagraph pool not tracked as outputs").
    The routing is per thread, so ``make`` runs on a helper thread, on the caller's device and stream (its
    kernels stay in the caller's order) and without autograd; this costs a thread start (50-90 µs of host time),
    paid once per buffer. Inside stream capture ``make`` runs here: a helper's allocation could not join the
    capture, and callers keep nothing made there.
    """
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return make()
    stream = torch.cuda.current_stream(device)
    box: list = []

    def run() -> None:
        try:
            with torch.cuda.stream(stream), torch.no_grad():
                box.append((True, make()))
        except BaseException as e:  # handed back to the caller's thread below
            box.append((False, e))

    helper = threading.Thread(target=run, name="attn-outside-pools")
    helper.start()
    helper.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def derived(
    memo: dict, source: torch.Tensor, params: Hashable, build: Callable[[], torch.Tensor], limit: int
) -> torch.Tensor:
    """``build()``, or what it returned before for this same ``source`` (unchanged since) and ``params``."""
    key = (source._version, params)
    hit = memo.get(id(source))
    if hit is not None and hit[0]() is source and hit[1] == key:
        return hit[2]
    out = outside_pools(source.device, build)
    if not _capturing(out.device):
        if len(memo) >= limit:
            memo.clear()
        memo[id(source)] = (weakref.ref(source), key, out)
    return out


def by_key(memo: dict, key: Hashable, build: Callable[[], T], limit: int, device: torch.device) -> T:
    """``build()``, or what it returned before for ``key``; ``build`` makes its tensors on ``device``."""
    out = memo.get(key)
    if out is None:
        device = torch.device(device)
        out = outside_pools(device, build)
        if not _capturing(device):
            if len(memo) >= limit:
                memo.clear()
            memo[key] = out
    return out
