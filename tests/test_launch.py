"""The direct launch path (`attn.fast._triton.launch`): its key never merges two specializations Triton keeps
apart, and a repeated call reaches the compiled kernel's launcher with the same arguments Triton would pass.

The GPU side (every kernel test on the H200 goes through `launch`) is covered by the parity tests; the GPU test
here checks that a misaligned view after an aligned call is not launched with the aligned build.
"""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

import attn.fast._triton as tr


def _pool():
    base = torch.zeros(64)
    ints = [0, 1, 2, 15, 16, 17, 32, 48, 2**31 - 16, 2**31 - 1, 2**31, 2**32, -1, -16, -(2**31), -(2**31) - 1]
    # around the key's codes for ints of 17 and more (17: i32 not a multiple of 16, 32: a multiple)
    ints += [2**63, 2**64 - 16, 18, 31, 33, 64, 4096, 2**31 - 17, -15, -17, -32, -(2**31) + 16, -(2**31) - 16]
    tensors = [base, base[1:], base[4:], base.to(torch.float16), base.to(torch.float16)[8:], base.to(torch.int32)]
    return ints + tensors + [0.0, 1.0, -2.5, None, True, False]


def _triton_spec(a):
    return native_specialize_impl(BaseBackend, a, False, True, True)


def test_equal_keys_mean_equal_triton_specializations():
    # every pair from a pool that covers Triton's classes (1, multiples of 16, i32/i64/u64 ranges, aligned and
    # misaligned tensors of several dtypes): equal keys must never hide different specializations
    pool = _pool()
    for a, b in itertools.product(pool, repeat=2):
        if tr.arg_key([a]) == tr.arg_key([b]):
            assert _triton_spec(a) == _triton_spec(b), (a, b)


def test_equal_keys_of_argument_lists_mean_equal_specializations():
    # the key is flat (a tensor gives two entries, anything else one): lists of different lengths and kinds must
    # never flatten to equal keys unless Triton specializes them alike, position by position
    rng = random.Random(0)
    pool = _pool()
    seen = {}
    for _ in range(20000):
        args = [rng.choice(pool) for _ in range(rng.randrange(1, 5))]
        key = tr.arg_key(args)
        spec = [_triton_spec(a) for a in args]
        assert seen.setdefault(key, spec) == spec, (args, seen[key])


def test_random_ints_keep_the_rule():
    rng = random.Random()
    for _ in range(2000):
        a = rng.choice([rng.randrange(-(2**40), 2**40), rng.randrange(0, 64) * 16, 1, rng.randrange(2**63, 2**64)])
        b = rng.choice([rng.randrange(-(2**40), 2**40), rng.randrange(0, 64) * 16, 1])
        if tr.arg_key([a]) == tr.arg_key([b]):
            assert _triton_spec(a) == _triton_spec(b), (a, b)


class _Compiled:
    def __init__(self):
        self.function, self.packed_metadata, self.calls = "fn", "meta", []

    def run(self, *args):
        self.calls.append(args)


class _Kernel:
    """Stands in for a `triton.jit` function: records how it was called and returns one compiled kernel."""

    __name__ = "_stand_in"
    arg_names = ["x_ptr", "n", "scale", "BLOCK"]
    params = [SimpleNamespace(is_constexpr=c) for c in (False, False, False, True)]

    def __init__(self):
        self.compiled, self.slow_calls = _Compiled(), []

    def __getitem__(self, grid):
        def runner(*args, **kwargs):
            self.slow_calls.append((grid, args, kwargs))
            return self.compiled

        return runner


@pytest.fixture
def gpu_free_launch(monkeypatch):
    # run the launch path's host logic without a GPU
    monkeypatch.setattr(tr, "is_interpreter", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tr, "_current_stream", lambda device: 7)
    monkeypatch.setattr(tr, "_LAUNCHES", {})


def test_second_call_goes_straight_to_the_launcher(gpu_free_launch):
    k = _Kernel()
    x = torch.zeros(32)
    tr.launch(k, lambda meta: (3 * meta["BLOCK"],), x, 100, 0.5, BLOCK=4, num_warps=4)
    assert len(k.slow_calls) == 1 and not k.compiled.calls
    tr.launch(k, lambda meta: (3 * meta["BLOCK"],), x, 116, 0.25, BLOCK=4, num_warps=4)
    assert len(k.slow_calls) == 1
    # grid from the constexprs, stream, the compiled function, no hooks, then every parameter in order
    assert k.compiled.calls == [(12, 1, 1, 7, "fn", "meta", None, None, None, x, 116, 0.25, 4)]


def test_a_given_stream_is_used(gpu_free_launch):
    # decode passes the (device, stream) it looked up for its split counters; launch must not ask again
    k = _Kernel()
    x = torch.zeros(32)
    for _ in range(2):
        tr.launch(k, (1,), x, 100, 0.5, BLOCK=4, _stream=(0, 99))
    assert len(k.slow_calls) == 1 and "_stream" not in k.slow_calls[0][2]
    assert k.compiled.calls == [(1, 1, 1, 99, "fn", "meta", None, None, None, x, 100, 0.5, 4)]


def test_a_new_specialization_goes_through_triton(gpu_free_launch):
    k = _Kernel()
    x = torch.zeros(32)
    tr.launch(k, (1,), x, 100, 0.5, BLOCK=4)
    tr.launch(k, (1,), x[1:], 100, 0.5, BLOCK=4)  # misaligned
    tr.launch(k, (1,), x, 96, 0.5, BLOCK=4)  # divisible by 16
    tr.launch(k, (1,), x, 1, 0.5, BLOCK=4)  # the constant 1
    tr.launch(k, (1,), x.half(), 100, 0.5, BLOCK=4)  # another dtype
    tr.launch(k, (1,), x, 100, 0.5, BLOCK=8)  # another constexpr
    assert len(k.slow_calls) == 6 and not k.compiled.calls


def test_interpreter_and_switch_use_triton(gpu_free_launch, monkeypatch):
    k = _Kernel()
    x = torch.zeros(32)
    monkeypatch.setenv("ATTN_FAST_LAUNCH", "0")
    for _ in range(2):
        tr.launch(k, (1,), x, 100, 0.5, BLOCK=4)
    assert len(k.slow_calls) == 2 and not k.compiled.calls


def test_keyword_operands_reach_the_launcher_in_parameter_order(gpu_free_launch):
    # by keyword, in any order: the same launches as the positional form, and the same cache entry
    k = _Kernel()
    x = torch.zeros(32)
    tr.launch(k, (1,), scale=0.5, BLOCK=4, n=100, x_ptr=x, num_warps=4)
    assert k.slow_calls == [((1,), (x, 100, 0.5), {"BLOCK": 4, "num_warps": 4})]
    tr.launch(k, (1,), x, 116, 0.25, BLOCK=4, num_warps=4)
    tr.launch(k, (1,), BLOCK=4, num_warps=4, x_ptr=x, n=132, scale=0.75)
    assert len(k.slow_calls) == 1
    assert [c[9:] for c in k.compiled.calls] == [(x, 116, 0.25, 4), (x, 132, 0.75, 4)]


def test_keyword_operands_are_checked():
    k = _Kernel()
    x = torch.zeros(32)
    with pytest.raises(TypeError, match="_stand_in: no operand n, scale"):
        tr.bind(k, {"x_ptr": x, "BLOCK": 4})
    with pytest.raises(TypeError, match="_stand_in takes no operand stride, y_ptr"):
        tr.bind(k, {"x_ptr": x, "n": 1, "scale": 1.0, "y_ptr": x, "stride": 2, "BLOCK": 4})
    args, constexprs = tr.bind(k, {"BLOCK": 4, "scale": 1.0, "n": 3, "x_ptr": None})
    assert args == (None, 3, 1.0) and constexprs == {"BLOCK": 4}
    assert not k.slow_calls


@triton.jit
def _add_kernel(x_ptr, y_ptr, strides, n, BLOCK: tl.constexpr):
    # y is optional: a None operand is a compile-time None
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs * strides[0], mask=offs < n)
    if y_ptr is not None:
        x += tl.load(y_ptr + offs * strides[1], mask=offs < n)
    tl.store(x_ptr + offs * strides[0], x, mask=offs < n)


def test_none_and_tuple_operands(device):
    # binds by keyword, takes None for an absent tensor and a tuple of strides; under the interpreter (conftest
    # sets TRITON_INTERPRET on CPU machines) the bf16 path widens the tensors and writes back
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(40, dtype=dtype, device=device)
        y = torch.randn(20, dtype=dtype, device=device)
        want = x.clone()
        tr.launch(_add_kernel, (1,), x_ptr=x, y_ptr=None, strides=(2, 1), n=20, BLOCK=32)
        torch.testing.assert_close(x, want, rtol=0, atol=0)
        tr.launch(_add_kernel, (1,), y_ptr=y, x_ptr=x, strides=(2, 1), n=20, BLOCK=32)
        want[::2] = (want[::2].float() + y.float()).to(dtype)
        torch.testing.assert_close(x, want, rtol=0, atol=0)


def test_a_real_kernel_names_what_is_missing():
    # the names come from the kernel's own signature (the interpreter's function here); nothing runs
    x = torch.zeros(8)
    with pytest.raises(TypeError, match="_add_kernel: no operand y_ptr"):
        tr.launch(_add_kernel, (1,), x_ptr=x, strides=(1, 1), n=8, BLOCK=8)
    with pytest.raises(TypeError, match="_add_kernel takes no operand z_ptr"):
        tr.launch(_add_kernel, (1,), x_ptr=x, y_ptr=None, z_ptr=x, strides=(1, 1), n=8, BLOCK=8)
    assert torch.equal(x, torch.zeros(8))


def test_keys_of_none_and_tuples():
    # a tuple's ints specialize one by one, like separate ints: its key entries follow its own, and equal keys
    # still mean equal Triton specializations (including tuples nested in lists of other arguments)
    rng = random.Random(1)
    ints = [0, 1, 2, 16, 17, 32, 2**31, -1]
    tuples = [tuple(rng.choice(ints) for _ in range(rng.randrange(0, 4))) for _ in range(40)]
    pool = [None, 0, 16, torch.zeros(8), *tuples]
    seen = {}
    for _ in range(5000):
        args = [rng.choice(pool) for _ in range(rng.randrange(1, 4))]
        key = tr.arg_key(args)
        assert key is not None, args
        spec = [_triton_spec(a) for a in args]
        assert seen.setdefault(key, spec) == spec, (args, seen[key])


@pytest.mark.gpu
def test_gpu_misaligned_view_after_aligned_call():
    from attn import fast
    from attn.reference import decode as ref_decode

    b, hq, hkv, d, n = 2, 8, 2, 64, 300
    kc = torch.randn(b, n, hkv, d, device="cuda", dtype=torch.float16)
    vc = torch.randn_like(kc)
    lens = torch.tensor([n, 77], device="cuda", dtype=torch.int32)
    flat = torch.randn(b * hq * d + 1, device="cuda", dtype=torch.float16)
    aligned = flat[: b * hq * d].view(b, 1, hq, d)
    shifted = flat[1:].view(b, 1, hq, d)  # 2 bytes past a 16-byte boundary
    for q in (aligned, shifted, aligned, shifted):
        got = fast.decode(q, kc, vc, lens)
        want = ref_decode(q.double(), kc.double(), vc.double(), lens)
        # fp16 inputs, fp32 accumulation: errors of a few fp16 ulps of O(1) outputs
        torch.testing.assert_close(got.double(), want, atol=4e-3, rtol=4e-3)
