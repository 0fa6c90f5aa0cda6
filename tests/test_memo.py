"""`attn._memo.outside_pools`: buffers attn keeps across calls are made outside any CUDA graph's memory pool.

torch.compile(mode="reduce-overhead") routes a thread's allocations into its graphs' pool while they warm up, and
refuses to record a graph while a tensor of that pool outlives the call. The helper makes a kept buffer on another
thread, where that routing does not apply, on the caller's stream. On the CPU the thread hand-off is tested with
the CUDA calls stood in for; on the GPU a real pool shows where the memory came from.
"""

import contextlib
import threading

import pytest
import torch

from attn import _memo


def test_cpu_tensors_are_made_here():
    here = threading.get_ident()
    seen = []
    out = _memo.outside_pools(torch.device("cpu"), lambda: seen.append(threading.get_ident()) or torch.ones(2))
    assert seen == [here] and torch.equal(out, torch.ones(2))


def _stand_in_cuda(monkeypatch, capturing=False):
    streams = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")

    @contextlib.contextmanager
    def stream(s):
        streams.append((threading.get_ident(), s))
        yield

    monkeypatch.setattr(torch.cuda, "stream", stream)
    return streams


def test_cuda_buffers_are_made_on_a_helper_thread_on_the_callers_stream(monkeypatch):
    streams = _stand_in_cuda(monkeypatch)
    here, dev = threading.get_ident(), torch.device("cuda", 0)
    seen = []

    def make():
        seen.append((threading.get_ident(), torch.is_grad_enabled()))
        return torch.zeros(3, requires_grad=True) * 2  # no autograd history is kept under the helper's no_grad

    out = _memo.outside_pools(dev, make)
    ((thread, grad),) = seen
    assert thread != here and not grad and out.grad_fn is None
    assert streams == [(thread, f"stream of {dev}")]


def test_an_error_in_make_reaches_the_caller(monkeypatch):
    _stand_in_cuda(monkeypatch)

    def make():
        raise ValueError("from the helper")

    with pytest.raises(ValueError, match="from the helper"):
        _memo.outside_pools(torch.device("cuda", 0), make)


def test_inside_stream_capture_the_buffer_is_made_here(monkeypatch):
    # a helper thread's allocation could not join the capture; callers keep nothing made during one
    streams = _stand_in_cuda(monkeypatch, capturing=True)
    here = threading.get_ident()
    seen = []
    _memo.outside_pools(torch.device("cuda", 0), lambda: seen.append(threading.get_ident()))
    assert seen == [here] and streams == []


def test_memos_build_through_the_helper(monkeypatch):
    calls = []
    real = _memo.outside_pools
    monkeypatch.setattr(_memo, "outside_pools", lambda device, make: calls.append(device) or real(device, make))
    memo = {}
    a = _memo.by_key(memo, ("k", 1), lambda: torch.arange(3), limit=4, device="cpu")
    b = _memo.by_key(memo, ("k", 1), lambda: torch.arange(5), limit=4, device="cpu")
    assert a is b and calls == [torch.device("cpu")]  # built once, through the helper
    src = torch.ones(2)
    c = _memo.derived(memo, src, "p", lambda: src * 3, limit=4)
    assert torch.equal(c, torch.full((2,), 3.0)) and len(calls) == 2


def _pool_of(ptr: int):
    for seg in torch.cuda.memory_snapshot():
        if seg["address"] <= ptr < seg["address"] + seg["total_size"]:
            return tuple(seg["segment_pool_id"])
    raise AssertionError(f"no segment holds {ptr:#x}")


@pytest.mark.gpu
def test_gpu_helper_allocates_outside_a_routed_pool():
    dev = torch.device("cuda", torch.cuda.current_device())
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        routed = torch.empty(1 << 20, device=dev)
        kept = _memo.outside_pools(dev, lambda: torch.zeros(1 << 20, device=dev))
    assert _pool_of(routed.data_ptr()) == tuple(pool.id)
    assert _pool_of(kept.data_ptr()) != tuple(pool.id)
    assert torch.count_nonzero(kept).item() == 0  # zeroed on the caller's stream, in order
