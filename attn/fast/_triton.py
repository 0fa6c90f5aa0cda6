"""Small helpers shared by the kernels: interpreter detection and when to autotune."""

from __future__ import annotations

import os

import torch


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter instead of compiling them."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _current_stream(device: int) -> int:
    # the raw handle, as Triton's own launcher asks for it: torch.cuda.current_stream() builds a Stream object
    # (4.6 µs per call on the H200 machine)
    global _current_stream
    try:
        from torch._C import _cuda_getCurrentRawStream as raw
    except ImportError:  # a torch without CUDA (the tests on CPU stub the stream)

        def raw(device):
            return torch.cuda.current_stream(device).cuda_stream

    _current_stream = raw
    return raw(device)


def autotune_enabled() -> bool:
    """Whether launchers should benchmark their config lists (the default on a GPU).

    Off under the interpreter, where benchmarking takes minutes and measures nothing real, and when
    ``ATTN_AUTOTUNE=0``: the GPU test suite sets it, because tuning every one of its many shapes would spend
    most of the run compiling. Launchers then use a fixed config chosen by a simple rule.
    """
    return not is_interpreter() and os.environ.get("ATTN_AUTOTUNE", "1") != "0"


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Launching without Triton's per-call work
#
# `kernel[grid](*args)` binds every argument, works out its specialization (dtype, 16-byte alignment, ints equal
# to 1 or divisible by 16), hashes that into a cache key and, in front of an autotuned kernel, builds the tuning
# key too. For the decode kernel's ~60 arguments that was 150-250 µs of host time per call on the H200 machine
# (bench/results/host_probe_H200_2026-11-29.log), longer than the kernel itself at most decode shapes, so a
# caller without CUDA graphs was host-bound. `launch` pays it once per specialization: the first call goes
# through Triton and the compiled kernel it returns is kept under a key at least as fine as Triton's; later
# calls with the same key hand their arguments straight to the compiled kernel's C launcher.

_LAUNCHES: dict = {}


def fast_launch_enabled() -> bool:
    """``ATTN_FAST_LAUNCH=0`` sends every launch through Triton's own path (for comparison and debugging)."""
    return os.environ.get("ATTN_FAST_LAUNCH", "1") != "0"


def _int_class(a: int):
    # Triton's int specialization: the value 1 becomes a constant, multiples of 16 get a divisibility hint, and
    # the type is i32, i64 or u64 by range; the key keeps all three apart
    return (a == 1, a % 16 == 0, a >= 2**31 or a < -(2**31), a >= 2**63)


def arg_key(args) -> tuple:
    """A key that separates every pair of argument lists Triton would compile apart (it may separate more)."""
    key = []
    add = key.append
    for a in args:
        t = type(a)
        if t is int:
            # most arguments are small non-negative ints: one comparison keys them
            add(a if 0 <= a < 17 else _int_class(a))
        elif t is torch.Tensor or isinstance(a, torch.Tensor):
            add((a.dtype, a.data_ptr() & 15 == 0))
        elif t is float or a is None:
            add(t)
        elif t is bool:
            add(("bool",))
        else:
            # anything else (a tensor descriptor, a numpy scalar): not keyed here, so never launched directly
            return None
    return tuple(key)


def launch(kernel, grid, *args, **constexprs):
    """``kernel[grid](*args, **constexprs)``; repeated specializations skip Triton's binding and autotuner dispatch.

    ``kernel`` is a ``triton.jit`` function or a ``triton.autotune`` wrapper of one; ``args`` are its leading
    parameters by position, ``constexprs`` the rest by name (a config's tile sizes come from the autotuner).
    ``grid`` is a tuple or a callable of the constexprs and the chosen config. The autotuner's key values are
    part of the key, so each tuning key keeps its own best config.
    """
    if is_interpreter() or not fast_launch_enabled():
        return kernel[grid](*args, **constexprs)
    import triton

    tuned = isinstance(kernel, triton.runtime.Autotuner)
    spec = arg_key(args)
    if spec is None or _hooked(triton.knobs.runtime):
        # profilers hook launches; let Triton call them
        return kernel[grid](*args, **constexprs)
    device = torch.cuda.current_device()
    key = (id(kernel), device, spec, tuple(constexprs.items()))
    if tuned:
        key += tuple(args[i] for i in _tuning_positions(kernel) if i < len(args))
    entry = _LAUNCHES.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **constexprs)
        if hasattr(compiled, "result"):
            compiled = compiled.result()
        jit = kernel.fn if tuned else kernel
        meta = {**constexprs, **(kernel.best_config.all_kwargs() if tuned else {})}
        names = jit.arg_names[len(args) :]
        if compiled is None or any(n not in meta for n in names):
            _LAUNCHES[key] = False
        else:
            _LAUNCHES[key] = (compiled, [meta[n] for n in names], meta)
        return compiled
    if entry is False:
        return kernel[grid](*args, **constexprs)
    compiled, tail, meta = entry
    g = grid(meta) if callable(grid) else grid
    stream = _current_stream(device)
    compiled.run(
        g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, stream, compiled.function,
        compiled.packed_metadata, None, None, None, *args, *tail,
    )  # fmt: skip
    return compiled


def _hooked(runtime) -> bool:
    # Triton 3.6 keeps its launch hooks in (usually empty) chains; older versions used None for none
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


_TUNING_POSITIONS: dict = {}


def _tuning_positions(kernel) -> tuple:
    pos = _TUNING_POSITIONS.get(id(kernel))
    if pos is None:
        pos = tuple(kernel.arg_names.index(k) for k in kernel.keys)
        _TUNING_POSITIONS[id(kernel)] = pos
    return pos
