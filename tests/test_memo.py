"""`attn._memo.outside_pools`: buffers attn keeps across calls are made outside any CUDA graph's memory pool.

torch.compile(mode="reduce-overhead") routes a thread's allocations into its graphs' pool while they warm up, and
refuses to record a graph while a tensor of that pool outlives the call. The helper makes a kept buffer on another
thread, where that routing does not apply, on the caller's stream. On the CPU the thread hand-off is tested with
the CUDA calls stood in for; on the GPU a real pool shows where the memory came from.
"""

import contextlib
import gc
import importlib
import threading

import pytest
import torch

import attn
from attn import _memo

preprocess = importlib.import_module("attn.fast.preprocess")  # attn.fast.preprocess is the function


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


def test_rope_tables_are_kept_through_the_helper(monkeypatch):
    # preprocess's cos/sin tables are kept across calls like the memos: built through the helper, and longer
    # only when a call needs more positions
    calls = []
    real = _memo.outside_pools
    monkeypatch.setattr(_memo, "outside_pools", lambda device, make: calls.append(device) or real(device, make))
    monkeypatch.setattr(preprocess, "_tables", {})
    a = preprocess._cos_sin(100, 16, 10000.0, "cpu", None)
    b = preprocess._cos_sin(4096, 16, 10000.0, "cpu", None)
    assert a is b and calls == [torch.device("cpu")] and a[0].shape[0] == 4096
    c = preprocess._cos_sin(5000, 16, 10000.0, "cpu", None)
    assert c[0].shape[0] == 8192 and len(calls) == 2
    torch.testing.assert_close(c[0][:4096], a[0], rtol=0, atol=0)


def test_rope_tables_made_inside_stream_capture_are_not_kept(monkeypatch):
    # a table made while a stream captures is filled only when the graph replays: keeping it would hand later
    # eager calls memory nothing has written
    monkeypatch.setattr(preprocess, "_tables", {})
    monkeypatch.setattr(_memo, "_capturing", lambda device: True)
    preprocess._cos_sin(100, 16, 10000.0, "cpu", None)
    assert preprocess._tables == {}


def _holds_tensors(value) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return any(isinstance(x, torch.Tensor) or (isinstance(x, tuple | list) and _holds_tensors(x)) for x in items)


@pytest.mark.gpu
def test_no_call_leaves_memory_alive_in_a_routed_pool(monkeypatch):
    """What torch.compile's graph warm-up does to a model's first calls: every allocation of the thread goes to a
    pool, and once the calls' outputs are dropped nothing may stay alive there (torch refuses to record a graph
    otherwise). attn's module-level dicts that hold tensors start empty, as in a fresh process, so every kept
    buffer these calls need (error word, split-K counters, scales, T5 table, RoPE tables) is made during them."""
    import sys

    from test_compile import TinyModel, _serve

    emptied = []
    for name, module in list(sys.modules.items()):
        if name == "attn" or name.startswith("attn."):
            for attr, value in list(vars(module).items()):
                if isinstance(value, dict) and not attr.startswith("__") and _holds_tensors(value):
                    monkeypatch.setattr(module, attr, {})
                    emptied.append(f"{name}.{attr}")
    dev = torch.device("cuda", torch.cuda.current_device())
    model = TinyModel(dev)
    b, hq, hkv, d = 3, 8, 2, 32
    lens = torch.tensor([2, 37, 60], dtype=torch.int32, device=dev)
    q = torch.randn(b, 1, hq, d, device=dev, dtype=torch.float16)
    k8 = torch.randint(-100, 100, (b, 64, hkv, d), device=dev, dtype=torch.int8)
    k16 = torch.randn(b, 64, hkv, d, device=dev, dtype=torch.float16)
    q64 = torch.randn(b, 64, hq, d, device=dev, dtype=torch.float16)
    scale = torch.full((1,), 0.02, device=dev)
    rel = attn.reference.RelativeBias(table=torch.randn(hq, 32, device=dev), max_distance=24)
    torch.cuda.synchronize()
    pool = torch.cuda.MemPool()
    with torch.no_grad(), torch.cuda.use_mem_pool(pool):
        outs = [
            _serve(model, dev),  # preprocess with RoPE, context_attention and decode over a paged cache
            attn.decode(q, k8, k8, lens, k_scale=scale, v_scale=scale, num_splits=2),
            attn.decode(q, k16, k16, lens, rel_bias=rel, causal=True, num_splits=2),
            attn.attention(q64, k16, k16, causal=True),
        ]
    torch.cuda.synchronize()
    del outs
    gc.collect()
    # the model's linear layers made cuBLAS's workspaces (32 MiB and 1 MiB on an H100) in the pool; torch's graph
    # warm-up frees them the same way when it ends (cudagraph_trees.clear_cublas_manager)
    torch._C._cuda_clearCublasWorkspaces()
    alive = []  # (address, bytes) of each block still allocated in the pool
    for seg in torch.cuda.memory_snapshot():
        if tuple(seg["segment_pool_id"]) != tuple(pool.id):
            continue
        addr = seg["address"]
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                alive.append((hex(addr), block["size"]))
            addr += block["size"]
    assert not alive, f"alive in the pool after the calls: {alive}"
    # not vacuous: the calls did keep buffers (made elsewhere)
    assert preprocess._tables and attn.fast._errors._WORDS, emptied
