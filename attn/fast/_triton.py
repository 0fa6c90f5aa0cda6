"""Small helpers shared by the kernels: interpreter detection and when to autotune."""

from __future__ import annotations

import inspect
import operator
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

_INTERPRET: bool | None = None


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter instead of compiling them.

    Read from ``TRITON_INTERPRET`` once: `triton.jit` makes the same decision when it defines each kernel, so a
    later change of the variable would not change the kernels anyway, and an environment lookup costs about
    half a microsecond, several times per launch.
    """
    global _INTERPRET
    if _INTERPRET is None:
        _INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return _INTERPRET


# Kernels compile for a GPU (True) or run in Triton's CPU interpreter (False), as a constexpr a kernel may branch
# on: the interpreter cannot run inline PTX.
COMPILED = tl.constexpr(not is_interpreter())


def unit_stride(*xs) -> list:
    """Index tensors (lengths, cu_seqlens, block tables) as the kernels read them: element i of the last axis at
    ``ptr + i``. A view with another stride there (``lengths[:, 0]`` of a 2-D tensor) is copied, a tensor that
    has it passes as it is (no copy), anything else passes on to the checks that name it. ``is_contiguous`` first:
    one call settles the usual case on every call of every entry (timings in bench/NOTES.md)."""
    return [x if not isinstance(x, Tensor) or x.is_contiguous() else _last_unit(x) for x in xs]


def _last_unit(x: Tensor) -> Tensor:
    # a non-contiguous tensor whose last axis is unit-strided (a block table's column slice) is read as it is:
    # the kernels take its row stride
    return x.contiguous() if x.dim() and x.stride(-1) != 1 else x


# the largest head dim the fused prefill, context and decode kernels take: their tiles and shared memory are
# sized up to it
MAX_HEAD_DIM = 256


@triton.jit
def mul_rn(a, b):
    """``a · b`` in fp32, rounded, and never fused into an add that follows it.

    Use it for a product that feeds a ``tl.sum`` across lanes. The reduction shuffles each lane's value to its
    butterfly partner, which receives the rounded product, while ptxas fuses the lane's own product into the
    add as an fma (unrounded): lanes that should hold the same sum end up an ulp apart, and then each writes its
    copy to the same shared-memory slot. compute-sanitizer's racecheck reports those writes as WAW hazards
    (triton-lang/triton#7264), and which copy lands is up to the hardware. ``mul.rn`` has an explicit rounding
    mode, which PTX never contracts, so every lane adds the same rounded values.
    """
    if COMPILED:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)  # fmt: skip
    else:
        return a * b


# int8 -> fp16, four codes at a time (inline PTX for tl.inline_asm_elementwise with pack=4, as in the decode
# kernels' widening): each byte plus 128 (xor 0x80) becomes the low mantissa byte of 1024.0 (high byte 0x64), which
# reads as 1024 + 128 + x; subtracting 1152 (0x6480) from both halves leaves x exactly. FasterTransformer's trick.
INT8_TO_F16 = tl.constexpr("""{
            .reg .b32 t, hi, m;
            xor.b32 t, $2, 0x80808080;
            mov.b32 hi, 0x64646464;
            mov.b32 m, 0x64806480;
            prmt.b32 $0, t, hi, 0x4140;
            prmt.b32 $1, t, hi, 0x4342;
            sub.f16x2 $0, $0, m;
            sub.f16x2 $1, $1, m;
            }""")


def current_stream(device: int) -> int:
    """The raw handle of ``device``'s current stream, as Triton's own launcher asks for it:
    torch.cuda.current_stream() builds a Stream object (4.6 µs per call on the H200 machine)."""
    return _current_stream(device)


def _current_stream(device: int) -> int:
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


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the launchers' grids: `triton.cdiv` costs ~1.5 µs per call from Python."""
    return -(-a // b)


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
    """A key that separates every pair of argument lists Triton would compile apart (it may separate more).

    Flat, with one or two entries per argument, so that building it and looking it up stay cheap (the decode
    kernel has 52 arguments; a tuple per argument cost twice as much). An int is keyed by its value below 17,
    else by a code of its class: 17 for an i32 that is not a multiple of 16, 32 for one that is (17 and 32 are
    themselves of those classes, so a code never stands for ints of another class), a tuple beyond i32. A tensor
    gives its dtype, then its address modulo 16; a dtype entry always comes with its address entry, so no two
    argument lists of different kinds flatten to the same key. A tuple gives a marker, then its items' keys.
    """
    key = []
    add = key.append
    for a in args:
        t = type(a)
        if t is int:
            if 0 <= a < 17:
                add(a)
            elif -2147483648 <= a < 2147483648:
                add(32 if a & 15 == 0 else 17)
            else:
                add(_int_class(a))
        elif t is Tensor:
            add(a.dtype)
            add(a.data_ptr() & 15)
        elif t is tuple:
            # a tuple operand (a tensor's strides): Triton specializes its items one by one; a marker with the
            # length of their key keeps lists that flatten alike apart
            items = arg_key(a)
            if items is None:
                return None
            add(("tuple", len(items)))
            key.extend(items)
        elif t is float or a is None:
            add(t)
        elif t is bool:
            add(("bool",))
        elif isinstance(a, Tensor):
            add(a.dtype)
            add(a.data_ptr() & 15)
        else:
            # anything else (a tensor descriptor, a numpy scalar): not keyed here, so never launched directly
            return None
    return tuple(key)


def launch(kernel, grid, *args, _stream=None, **constexprs):
    """``kernel[grid](**operands)``; repeated specializations skip Triton's binding and autotuner dispatch.

    ``kernel`` is a ``triton.jit`` function or a ``triton.autotune`` wrapper of one. Its operands come by
    keyword, every parameter by name (a config's tile sizes come from the autotuner); `bind` checks them and
    orders them. The positional form ``launch(kernel, grid, *args, **constexprs)``, the leading parameters by
    position and the rest by name, is what `bind` produces, and what `attn.plan` records and replays.
    ``grid`` is a tuple or a callable of the constexprs and the chosen config. The autotuner's key values are
    part of the key, so each tuning key keeps its own best config. ``_stream``, ``(device, raw stream handle)``
    of the current device, saves looking them up again when the caller already has them.
    """
    if args:
        names, values = tuple(constexprs), tuple(constexprs.values())
    else:
        # operands by keyword: the constexprs as names and values (a dict only where Triton gets them)
        args, names, values = _split(kernel, constexprs)
        constexprs = None
    if is_interpreter():
        return _interpret(kernel, grid, args, constexprs or dict(zip(names, values)))
    if not fast_launch_enabled():
        return kernel[grid](*args, **(constexprs or dict(zip(names, values))))
    tuned = isinstance(kernel, triton.runtime.Autotuner)
    spec = arg_key(args)
    if spec is None or _hooked(triton.knobs.runtime):
        # profilers hook launches; let Triton call them
        return kernel[grid](*args, **(constexprs or dict(zip(names, values))))
    if _stream is None:
        device = torch.cuda.current_device()
        stream = None
    else:
        device, stream = _stream
    # names and values as two tuples: no pair objects to build and hash on every call
    key = (id(kernel), device, spec, names, values)
    if tuned:
        key += _tuning_values(kernel, args)
    entry = _LAUNCHES.get(key)
    if constexprs is None and (entry is None or entry is False):
        constexprs = dict(zip(names, values))
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
    if stream is None:
        stream = _current_stream(device)
    compiled.run(
        g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, stream, compiled.function,
        compiled.packed_metadata, None, None, None, *args, *tail,
    )  # fmt: skip
    return compiled


_BINDINGS: dict = {}
# compile options a launch may pass beside the constexprs
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_pdl")


def bind(kernel, operands: dict) -> tuple[tuple, dict]:
    """Keyword operands as `launch` passes them on: ``(args, constexprs)``.

    ``args`` are the kernel's parameters up to its last runtime (non-constexpr) one, in order; every one must be
    given (an absent tensor is passed as None, which Triton makes a compile-time None the kernel can test with
    ``is None``). ``constexprs`` are the given ones of the rest and of Triton's compile options (``num_warps``
    ...); an autotuner's config may complete them. A missing runtime operand, or a name the kernel does not
    take, raises a TypeError naming it.

    A launch site passes the same names in the same order every call, so the split is worked out (and checked)
    once per kernel and tuple of names; a call then costs two C-level item lookups. A launch by keyword still
    costs a few microseconds of host time more than the positional form, mostly Python building the keyword
    dict (bench/NOTES.md); `attn.plan`'s replays pass the recorded positional arguments and pay none of it.
    """
    args, names, values = _split(kernel, operands)
    return args, dict(zip(names, values))


def _split(kernel, operands: dict) -> tuple[tuple, tuple, tuple]:
    """`bind`'s work: ``(args, constexpr names, constexpr values)``."""
    given = tuple(operands)
    entry = _BINDINGS.get(id(kernel))
    # the names of the kernel's last call (a tuple of the same interned strings compares fast), else a lookup
    if entry is None or entry[0] is not kernel or entry[1] != given:
        entry = _BINDINGS.get((id(kernel), given))
        if entry is None or entry[0] is not kernel:
            entry = _BINDINGS[id(kernel), given] = _binding(kernel, given)
        _BINDINGS[id(kernel)] = entry
    _, _, take, names, take_values = entry
    return take(operands), names, take_values(operands)


def _binding(kernel, given: tuple):
    jit = kernel
    while isinstance(getattr(jit, "fn", None), triton.runtime.KernelInterface):
        jit = jit.fn  # through autotune and heuristics wrappers to the kernel
    names = list(jit.arg_names)
    if hasattr(jit, "params"):
        constexpr = [p.is_constexpr for p in jit.params]
    else:  # the interpreter's function: read the annotations
        params = inspect.signature(jit.fn).parameters.values()
        constexpr = [p.annotation is tl.constexpr or str(p.annotation).split(".")[-1] == "constexpr" for p in params]
    # the positional part ends at the last runtime parameter (constexprs come last in every kernel here)
    n = max((i + 1 for i, c in enumerate(constexpr) if not c), default=0)
    name = getattr(jit, "__name__", "kernel")
    missing = [p for p in names[:n] if p not in given]
    if missing:
        raise TypeError(f"{name}: no operand {', '.join(missing)}")
    unknown = [g for g in given if g not in names and g not in _OPTIONS]
    if unknown:
        raise TypeError(f"{name} takes no operand {', '.join(sorted(unknown))}")
    cnames = tuple(g for g in names[n:] + list(_OPTIONS) if g in given)
    return kernel, given, _getter(names[:n]), cnames, _getter(cnames)


def _getter(names):
    """``lambda d: tuple(d[n] for n in names)``, at C speed for two names or more."""
    if len(names) > 1:
        return operator.itemgetter(*names)
    if names:
        return lambda d, n=names[0]: (d[n],)
    return lambda d: ()


def _hooked(runtime) -> bool:
    # Triton 3.6 keeps its launch hooks in (usually empty) chains; older versions used None for none
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


_TUNING: dict = {}


def _tuning_values(kernel, args) -> tuple:
    """The values of the autotuner's key among ``args`` (its constexprs are in the launch key already)."""
    pos = _TUNING.get((id(kernel), len(args)))
    if pos is None:
        pos = tuple(i for i in map(kernel.arg_names.index, kernel.keys) if i < len(args))
        _TUNING[id(kernel), len(args)] = pos
    return tuple([args[i] for i in pos])


def _interpret(kernel, grid, args, constexprs):
    """A launch under Triton's CPU interpreter, with bfloat16 tensors computed in float32.

    The interpreter runs kernels on numpy arrays, which have no bfloat16: Triton 3.6 computes a bf16 ``tl.dot``
    wrongly there (outputs near 1e8, issue 18 finding 9). Each bf16 tensor argument is replaced by a float32
    copy of its whole storage span, viewed with the same sizes and strides (so the kernel's stride arguments and
    any aliasing still hold); after the launch, copies the kernel wrote go back, rounded to bf16. The kernel
    then computes in fp32 where the GPU would use bf16 operands: a CPU user gets at least the GPU's accuracy.
    """
    copies: dict[int, tuple] = {}
    new_args = []
    for a in args:
        if isinstance(a, Tensor) and a.dtype == torch.bfloat16:
            if id(a) not in copies:
                span = _storage_span(a)
                flat = a.as_strided((span,), (1,), a.storage_offset())
                wide = flat.float()
                copies[id(a)] = (flat, wide, wide.as_strided(a.shape, a.stride(), 0))
            new_args.append(copies[id(a)][2])
        else:
            new_args.append(a)
    result = kernel[grid](*new_args, **constexprs)
    for flat, wide, _ in copies.values():
        back = wide.to(torch.bfloat16)
        if not torch.equal(back.view(torch.int16), flat.view(torch.int16)):
            flat.copy_(back)
    return result


def _storage_span(x: Tensor) -> int:
    """Elements from ``x``'s first to its last addressable element (0 for an empty tensor)."""
    if x.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(x.shape, x.stride()) if s > 0)
