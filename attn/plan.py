"""Plan once, run many: attention calls whose per-step host work is done once, when the step is planned.

A serving loop knows each step's metadata on the host before any kernel runs: which sequences are in the batch,
their lengths, their block tables, the shapes and the options. A *plan* takes that metadata, checks it once on the
host, puts it on the device, and chooses what the flat function would choose per call (split counts, tiles).
``plan.run(q, ...)`` then launches the kernels with no host reads of device memory and no allocation beyond its
output (none with ``out=``), so it can be captured in a CUDA graph. One plan serves every layer of a step: pass
each layer's cache pools to ``run``. This is FlashInfer's ``plan``/``run`` split
(``BatchDecodeWithPagedKVCacheWrapper``); the cache objects hand plans out (`attn.PagedKVCache.plan_decode`,
`attn.ContiguousKVCache.plan_decode`, `attn.PagedKVCache.plan_context`, `attn.InflightBatch.plan`).

How ``run`` stays cheap. A plan calls the flat function (`attn.fast.decode`, ...) with ``validate=False`` and the
length hints it accepts. Its first eager ``run`` does exactly that, and records what the call did: the kernel
launches (kernel, grid, arguments), and every torch operation around them. If the operations only built
metadata from the plan's own tensors (never read the inputs, the outputs, or a buffer a kernel receives), later
runs replay the launches alone, with the new query, cache pools and output substituted for the recorded ones.
On a GPU a replay calls each compiled kernel's launcher directly (as `attn.fast._triton.launch` does for a
specialization it has seen, without rebuilding its key), as long as the new tensors have the recorded 16-byte
alignment; otherwise it goes through `_triton.launch`. That is a few microseconds of Python per launch instead of
the flat function's argument checks and bookkeeping (tens of microseconds). Anything
else (an operation on the inputs, a launch that bypasses `attn.fast._triton.launch`, inputs whose shapes,
strides or dtypes differ from the recorded ones) runs the flat function instead, which is always correct.
``plan.replayable`` says which path a plan took. The workspaces the recorded call allocated (split partials)
are kept by the plan and reused by every replay, so a replay allocates only its output, and replays of one plan
must not run concurrently (on two streams) with each other. The options (``softcap``, ``alibi_slopes``, ...) are
checked by the flat function on the first run, once; tensors among them are captured as they are then (edit one
in place and make a new plan).

Metadata that changes between steps: ``plan.update(...)`` writes new lengths (and block tables) into the plan's
device tensors in place, from a pinned host buffer, without a sync. The recorded launches stay valid while the
lengths stay within the plan's hints (``max_seqlen_k``, rounded up to ``round_to`` tokens at planning, or a bound
you give): then ``update`` returns True, and a CUDA graph captured from ``run`` keeps working. When the lengths
outgrow the hints, ``update`` re-plans (new hints, the next run records again) and returns False: re-capture
any graph (the old replay's workspaces stay allocated, so an old graph replayed by mistake still touches only
memory it owns). Planning itself costs one host-to-device copy of the metadata and a few checks on host lists;
`ContextPlan`, `PrefillPlan` and `GptAttentionPlan` are re-made per step rather than updated.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Sequence

import torch

from .checks import check_device, check_flag
from .fast import _errors, _triton
from .fast.decode import _num_sms, choose_num_splits

__all__ = ["ContextPlan", "DecodePlan", "GptAttentionPlan", "PrefillPlan"]

ROUND_TO = 256

# ---------------------------------------------------------------------------------------------------------------
# Recording one flat call, replaying its launches


def _launch_modules():
    # every kernel module that imported _triton.launch by name (read each time: a module may be added later)
    mods = [m for name, m in list(sys.modules.items()) if name.startswith("attn.fast.") and m is not _triton]
    return [m for m in mods if getattr(m, "launch", None) is _real_launch]


_real_launch = _triton.launch
_state = threading.local()
_patch_lock = threading.Lock()

_aten = torch.ops.aten
# operations that create a tensor without reading any tensor's values
_FACTORIES = {
    _aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default, _aten.new_empty.default,
    _aten.new_empty_strided.default, _aten.arange.default, _aten.arange.start, _aten.arange.start_step,
}  # fmt: skip
# factories that also set every value: replayed as fills (a kernel may count into a zeroed buffer), with the
# value at this position of the arguments (None: the constant given)
_INITIALIZED = {
    _aten.zeros.default: 0, _aten.zeros_like.default: 0, _aten.new_zeros.default: 0, _aten.ones.default: 1,
    _aten.ones_like.default: 1, _aten.new_ones.default: 1, _aten.full.default: ("arg", 1),
    _aten.full_like.default: ("arg", 1), _aten.new_full.default: ("arg", 2),
}  # fmt: skip
# in-place writes of a constant into a fresh tensor (a zeroed counter, a poisoned output): replayed as steps
_FILLS = {_aten.zero_.default, _aten.fill_.Scalar}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(tree):
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)

    walk(tree)
    return out


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Sees every aten operation of the recorded call (launches run with the mode switched off)."""

    def __init__(self):
        super().__init__()
        self.fresh: set[int] = set()  # storages created during the call
        self.ops: list[tuple] = []  # (operation, storages read, storages written) per operation
        self.steps: list = []  # ("launch", kernel, grid, args, constexprs) or ("fill", func, tensor, args)
        self.bypass = False  # a kernel launched other than through _triton.launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in _FACTORIES:
            self.fresh.update(_storage(t) for t in _tensors(result))
        elif func in _INITIALIZED:
            value = _INITIALIZED[func]
            value = args[value[1]] if isinstance(value, tuple) else value
            self.fresh.add(_storage(result))
            self.steps.append(("fill", _aten.fill_.Scalar, result, (value,)))
        elif func in _FILLS and _storage(args[0]) in self.fresh:
            self.steps.append(("fill", func, args[0], tuple(args[1:])))
        elif not getattr(func, "is_view", False) and func is not _aten.detach.default:
            # an empty tensor holds nothing to protect, and on a GPU every empty storage has the address 0
            reads = {_storage(t) for t in _tensors((args, kwargs)) if t.device.type != "meta" and t.numel()}
            writes = {_storage(t) for t in _tensors(result) if t.numel()}
            self.ops.append((func, reads, writes))
            self.fresh.update(writes - reads)
        return result


def _recording_launch(kernel, grid, *args, _stream=None, **constexprs):
    if not args:
        # operands by keyword: recorded in launch's positional form, which a replay hands to the launcher
        args, constexprs = _triton.bind(kernel, constexprs)
    rec = getattr(_state, "recorder", None)
    if rec is None:
        return _real_launch(kernel, grid, *args, _stream=_stream, **constexprs)
    from torch.utils._python_dispatch import _disable_current_modes

    _state.in_launch = True
    try:
        with _disable_current_modes():
            direct = _direct_handle(kernel, grid, args, constexprs)
            result = (
                direct[0] if direct is not None else _real_launch(kernel, grid, *args, _stream=_stream, **constexprs)
            )
    finally:
        _state.in_launch = False
    rec.steps.append(("launch", kernel, grid, args, constexprs, direct))
    return result


def _direct_handle(kernel, grid, args, constexprs):
    """On a GPU, launches through Triton's own entry (as `_triton.launch` does for a new specialization) and
    returns what a replay needs to call the compiled kernel's launcher directly: ``(compiled, grid, tail)``, the
    trailing constexpr/config values in parameter order. None under the interpreter or without fast launches."""
    import triton

    if _triton.is_interpreter() or not _triton.fast_launch_enabled() or _triton._hooked(triton.knobs.runtime):
        return None
    if not isinstance(kernel, (triton.runtime.JITFunction, triton.runtime.Autotuner)):
        return None  # something launch() was handed that is not a Triton kernel (a test's stand-in): no handle
    compiled = kernel[grid](*args, **constexprs)
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    tuned = isinstance(kernel, triton.runtime.Autotuner)
    jit = kernel.fn if tuned else kernel
    meta = {**constexprs, **(kernel.best_config.all_kwargs() if tuned else {})}
    names = jit.arg_names[len(args) :]
    if compiled is None or not hasattr(compiled, "run") or any(n not in meta for n in names):
        return (compiled, None, None, None)
    g = grid(meta) if callable(grid) else grid
    g = (g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)
    # the device Triton launched on (its current one), whose current stream a replay launches on
    return (compiled, g, tuple(meta[n] for n in names), torch.cuda.current_device())


def _watch_direct_launches():
    """Patches Triton's kernel entry so that a launch outside `_triton.launch` marks the recording unsafe."""
    import triton.runtime.jit as jit

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    saved = []
    for cls in classes:
        real = cls.run

        def run(self, *a, _real=real, **k):
            rec = getattr(_state, "recorder", None)
            if rec is not None and not getattr(_state, "in_launch", False):
                rec.bypass = True
            return _real(self, *a, **k)

        saved.append((cls, real))
        cls.run = run
    return saved


class _Replay:
    """The launches (and fills) of one recorded flat call, with the inputs and outputs as substitution slots."""

    __slots__ = ("signature", "steps", "out_specs", "single", "none", "op_reads")

    def matches(self, inputs) -> bool:
        sig = self.signature
        for t, (shape, stride, dtype, device) in zip(inputs, sig):
            if t.shape != shape or t.dtype != dtype or t.stride() != stride or t.device != device:
                return False
        return True

    def __call__(self, inputs, out):
        outs = []
        for i, (shape, stride, dtype, device, contiguous) in enumerate(self.out_specs):
            given = out[i] if out is not None else None
            if given is not None and given.shape == shape and given.stride() == stride and given.dtype == dtype:
                outs.append(given)
            elif contiguous:
                outs.append(torch.empty(shape, dtype=dtype, device=device))
            else:
                outs.append(torch.empty_strided(shape, stride, dtype=dtype, device=device))
        pool = (*inputs, *outs)
        launch = _real_launch
        for step in self.steps:
            if step[0] == "launch":
                _, kernel, grid, template, subs, constexprs, direct, aligned, addresses = step
                tensors = [pool[src] if view is None else _rebuild_view(pool[src], view) for _, src, view in subs]
                ptrs = [t.data_ptr() for t in tensors]
                # the compiled kernel is specialized on each tensor's 16-byte alignment: the substituted ones
                # must align as the recorded ones did (the others are the recorded tensors themselves)
                if direct is not None and tuple([p & 15 for p in ptrs]) == aligned:
                    # every tensor as its address: Triton's launcher takes an int as it is, while for a tensor it
                    # calls data_ptr() and asks the driver to check the pointer (cuPointerGetAttribute), one
                    # driver call per tensor per launch. The inputs were checked by `matches` (device and
                    # layout), the recorded tensors are kept alive by the template.
                    args = list(addresses)
                    for (pos, _, _), p in zip(subs, ptrs):
                        args[pos] = p
                    compiled, g, tail, device = direct
                    compiled.run(
                        g[0], g[1], g[2], _triton.current_stream(device), compiled.function,
                        compiled.packed_metadata, None, None, None, *args, *tail,
                    )  # fmt: skip
                else:
                    args = list(template)
                    for (pos, _, _), t in zip(subs, tensors):
                        args[pos] = t
                    launch(kernel, grid, *args, **constexprs)
            else:
                _, func, template_t, src, fargs = step
                func(pool[src] if src is not None else template_t, *fargs)
        if self.none:
            return None
        return outs[0] if self.single else tuple(outs)


def _record(flat, inputs):
    """Runs ``flat(*inputs)`` once, recording it; returns ``(result, _Replay or None)``."""
    # the device's error word (attn.fast._errors) must exist before recording: made during the call, its zeroing
    # would be recorded as a fill, and every replay would then clear violations recorded by earlier calls
    # (only for a tensor on a device the kernels run on: anything else is refused by the flat function's checks, and
    # must not leave a word behind on the meta device)
    first = inputs[0]
    if isinstance(first, torch.Tensor) and first.device.type in ("cuda", "cpu"):
        _errors.error_word(first.device)
    rec = _Recorder()
    with _patch_lock:
        modules = _launch_modules()
        saved_launch = [(m, m.launch) for m in modules]
        saved_run = _watch_direct_launches()
        for m in modules:
            m.launch = _recording_launch
        _state.recorder = rec
        try:
            with rec:
                result = flat(*inputs)
        finally:
            _state.recorder = None
            for m, f in saved_launch:
                m.launch = f
            for cls, real in saved_run:
                cls.run = real
    return result, _replay_of(rec, inputs, result)


class _Refused:
    """Why a recorded call cannot be replayed (falsy: `_Plan._execute` treats it as "not replayable")."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason

    def __bool__(self):
        return False


def _replay_of(rec: _Recorder, inputs, result) -> _Replay | _Refused:
    if rec.bypass:
        return _Refused("a kernel was launched other than through attn.fast._triton.launch")
    outputs = [] if result is None else ([result] if isinstance(result, torch.Tensor) else list(result))
    if any(not isinstance(o, torch.Tensor) for o in outputs):
        return _Refused("the call returned something other than tensors")
    roles = [*inputs, *outputs]
    role_storage = {_storage(t) for t in roles if t.numel()}
    if any(_storage(o) not in rec.fresh for o in outputs) or len({_storage(o) for o in outputs}) != len(outputs):
        return _Refused("an output is an input, or two outputs share memory")
    # buffers a kernel may write: the roles and the fresh workspaces it receives (metadata that existed before the
    # call, such as the plan's lengths and block table, is only read by the kernels: their contract)
    launched = set()
    for step in rec.steps:
        if step[0] == "launch":
            launched.update(_storage(t) for t in _tensors(step[3]) if t.numel() and _storage(t) in rec.fresh)
    hazard = role_storage | launched
    op_reads = set()
    for func, reads, writes in rec.ops:
        if reads & hazard or writes & role_storage:
            # work on the inputs, the outputs or a kernel's buffer: only the flat call is right
            return _Refused(f"the torch operation {func} reads or writes an input, an output or a kernel's buffer")
        op_reads |= reads
    steps = []
    for step in rec.steps:
        if step[0] == "launch":
            _, kernel, grid, args, constexprs, direct = step
            subs = []
            for pos, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    idx = next((i for i, r in enumerate(roles) if r is a), None)
                    if idx is not None:
                        subs.append((pos, idx, None))
                    elif _storage(a) in role_storage:
                        # a view of an input or output (a slice of qkv, say; an FP8 cache read as int8 codes): rebuilt
                        # on the new tensor with the same sizes, strides and offset from it, in the view's dtype if
                        # that has the same element size (so sizes, strides and offsets mean the same elements)
                        idx = next(i for i, r in enumerate(roles) if _storage(r) == _storage(a))
                        base = roles[idx]
                        if a.element_size() != base.element_size() or a.device != base.device:
                            return _Refused("a kernel reads an input or output through a view of another element size")
                        dtype = None if a.dtype == base.dtype else a.dtype
                        offset = a.storage_offset() - base.storage_offset()
                        subs.append((pos, idx, (tuple(a.shape), a.stride(), offset, dtype)))
            # the recorded inputs and outputs are not kept alive by the template: their slots are filled per run
            template = tuple(None if any(pos == p for p, _, _ in subs) else a for pos, a in enumerate(args))
            aligned = tuple(args[pos].data_ptr() & 15 for pos, _, _ in subs)
            if direct is not None and direct[1] is None:
                direct = None  # launched, but not in a form a replay can call directly
            # the template with its CUDA tensors as addresses, for the direct launch (see _Replay.__call__)
            addresses = tuple(a.data_ptr() if isinstance(a, torch.Tensor) and a.is_cuda else a for a in template)
            steps.append(("launch", kernel, grid, template, tuple(subs), dict(constexprs), direct, aligned, addresses))
        else:
            # (a factory's result reaches the dispatch mode as another Python object than the caller's, so
            # outputs are found here by their memory)
            _, func, t, fargs = step
            idx = next((i for i, r in enumerate(roles) if _storage(r) == _storage(t)), None)
            if idx is None:
                steps.append(("fill", func, t, None, fargs))
                continue
            base = roles[idx]
            same = (t.shape, t.stride(), t.storage_offset(), t.dtype) == (
                base.shape, base.stride(), base.storage_offset(), base.dtype)  # fmt: skip
            if not same:
                return _Refused("a fill writes part of an input or output")
            steps.append(("fill", func, None, idx, fargs))
    r = _Replay()
    r.signature = tuple((t.shape, t.stride(), t.dtype, t.device) for t in inputs)
    r.steps = steps
    r.out_specs = tuple((o.shape, o.stride(), o.dtype, o.device, o.is_contiguous()) for o in outputs)
    r.single = isinstance(result, torch.Tensor)
    r.none = result is None
    r.op_reads = op_reads
    return r


def _rebuild_view(base: torch.Tensor, view: tuple) -> torch.Tensor:
    """The recorded view ``(sizes, strides, offset, dtype or None)`` of a role, on this run's tensor for it."""
    shape, stride, offset, dtype = view
    if dtype is not None:
        base = base.view(dtype)  # same element size (recorded so): the same elements, read as another type
    return base.as_strided(shape, stride, base.storage_offset() + offset)


def _capturing(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_cuda and torch.cuda.is_current_stream_capturing()


def _outputs_of(result):
    return [result] if isinstance(result, torch.Tensor) else list(result)


class _Plan:
    """What every plan shares: the lazy recording, the replay, the fallback and ``out=``."""

    _replay: _Replay | _Refused | bool = False  # False: not recorded yet; _Refused: not replayable

    def _flat(self, *inputs):  # pragma: no cover - each plan defines it
        raise NotImplementedError

    @property
    def replayable(self) -> bool | None:
        """True when ``run`` replays recorded launches, False when it calls the flat function, None before the
        first eager ``run``."""
        return None if self._replay is False else isinstance(self._replay, _Replay)

    @property
    def refusal(self) -> str | None:
        """Why ``run`` calls the flat function instead of replaying (None when it replays or has not run)."""
        return self._replay.reason if isinstance(self._replay, _Refused) else None

    def _execute(self, inputs, out):
        if out is not None and any(o is not None and not isinstance(o, torch.Tensor) for o in out):
            raise TypeError(f"out must be None, a tensor or a tuple of tensors (None for one not wanted), got {out!r}")
        rep = self._replay
        if isinstance(rep, _Replay) and rep.matches(inputs):
            return rep(inputs, out)
        if rep is False and not _capturing(inputs[0]):
            result, self._replay = _record(self._flat, inputs)
        else:
            result = self._flat(*inputs)
        if out is not None and result is not None:
            for o, r in zip(out, _outputs_of(result)):
                if o is not None:
                    o.copy_(r)
            return out[0] if isinstance(result, torch.Tensor) else tuple(o if o is not None else r for o, r in
                                                                        zip(out, _outputs_of(result)))  # fmt: skip
        return result

    def _invalidate(self):
        if isinstance(self._replay, _Replay):
            # a CUDA graph captured from the old replay still points at its workspaces: keep them allocated
            self._retired = [*getattr(self, "_retired", []), self._replay]
        self._replay = False


# ---------------------------------------------------------------------------------------------------------------
# Host-side metadata


def _host_ints(x, name: str) -> list[int]:
    """Python ints from a list/tuple of ints or a CPU integer tensor; a device tensor is refused (planning reads
    nothing back from the device)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise TypeError(f"{name} must be host-side (python ints or a CPU tensor) so that planning reads nothing "
                            f"back from the device, got a tensor on {x.device}")  # fmt: skip
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.dim() != 1:
            raise TypeError(f"{name} must be a 1-D integer tensor, got {x.dtype} of shape {tuple(x.shape)}")
        values = [int(v) for v in x.tolist()]
    elif not isinstance(x, (list, tuple)) or any(not isinstance(v, int) or isinstance(v, bool) for v in x):
        raise TypeError(f"{name} must be a list of ints or a CPU tensor, got {type(x).__name__}")
    else:
        values = list(x)
    if any(not -(2**31) <= v < 2**31 for v in values):
        # the kernels read them as int32
        raise ValueError(f"{name} entries must fit in int32, got {values[:8]}")
    return values


def _flat_options(plan: str, fn, options: dict, block_table=None):
    """The plan's keywords with any ``scores``/``cache_view``/``rope`` object (attn/options.py) expanded into the
    flat keywords of ``fn``; a ``CacheView``'s block table becomes the plan's ``block_table``. Returns
    ``(options, block_table)``."""
    from .options import expand_options

    options = expand_options(plan, frozenset(inspect.signature(fn).parameters), options)
    if "block_table" in options:
        if block_table is not None:
            raise TypeError(f"{plan}: block_table given both as a keyword and in cache_view")
        block_table = options.pop("block_table")
    return options, block_table


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _check_pool(k_cache, v_cache):
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (contiguous [B, max_len, Hkv, D] or a pool "
                             f"[num_blocks, block_size, Hkv, D])")  # fmt: skip
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")  # fmt: skip


def _table_on_host(block_table, batch: int, name: str = "block_table") -> torch.Tensor:
    """An int32 ``[B, max_blocks]`` table as a CPU tensor (a device table is read once, here, at planning)."""
    if isinstance(block_table, (list, tuple)):
        rows = [list(r) for r in block_table]
        width = max((len(r) for r in rows), default=0)
        block_table = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32).view(-1, width)
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise TypeError(f"{name} must be an int32 [B, max_blocks] tensor or a list of lists of ints")
    if block_table.shape[0] != batch:
        raise ValueError(f"{name} must have B={batch} rows, got {block_table.shape[0]}")
    return block_table.cpu()


def _check_paged(lengths, table: torch.Tensor, num_blocks: int, block_size: int, name="cache_seqlens"):
    width = table.shape[1]
    for b, n in enumerate(lengths):
        need = -(-n // block_size)
        if need > width:
            raise ValueError(f"{name}[{b}]={n} needs {need} blocks, but block_table has {width} columns")
        used = table[b, :need]
        if need and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
            raise ValueError(f"block_table[{b}] lists blocks outside the pool [0, {num_blocks}): "
                             f"{[x for x in used.tolist() if x < 0 or x >= num_blocks]}")  # fmt: skip


class _PinnedInts:
    """A pinned host buffer for in-place metadata updates: the copy is asynchronous, and the buffer is not
    rewritten before the previous copy out of it has run (an event, normally long complete)."""

    def __init__(self, dst: torch.Tensor):
        self.dst = dst
        self.event = None
        pin = dst.is_cuda
        self.host = torch.empty(dst.shape, dtype=dst.dtype, pin_memory=pin)

    def write(self, values: torch.Tensor):
        if self.event is not None:
            self.event.synchronize()
        self.host.copy_(values)
        self.dst.copy_(self.host, non_blocking=self.dst.is_cuda)
        if self.dst.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record()


# ---------------------------------------------------------------------------------------------------------------
# Decode


class DecodePlan(_Plan):
    """A decode step over a contiguous or paged cache: `attn.decode` planned once for every layer.

    Args:
        k_cache: the cache planned against (contiguous ``[B, max_len, Hkv, D]`` or a pool ``[num_blocks,
            block_size, Hkv, D]``); ``run`` may be given any layer's pools of the same shape, dtype and strides.
        v_cache: likewise.
        cache_seqlens: per sequence, the tokens cached (the new ones included): python ints or a CPU tensor.
        block_table: the sequences' block tables, int32 ``[B, max_blocks]`` (CPU, or a device tensor read once
            here), or lists of block ids; None for a contiguous cache.
        num_heads_q: query heads.
        q_len: new tokens per sequence (``Sq``; 1 for plain decoding).
        max_seqlen_k: a bound on the lengths this plan will serve (through `update`); by default the longest
            length rounded up to ``round_to`` tokens.
        round_to: the granularity of the default bound.
        num_splits: force a split count (as in `attn.decode`); None lets the flat function choose it from the
            hints, which `num_splits` reports.
        **options: `attn.decode`'s other keywords (causal, window_size, softcap, alibi_slopes, rel_bias,
            k_scale, v_scale, max_attention_window, sink_token_length, rotary_dim, rope_*, cache_indirection,
            return_lse, ...), fixed for the plan; or the option objects ``scores=``, ``cache_view=``, ``rope=``
            (`attn.ScoreOptions`, `attn.CacheView`, `attn.RopeOptions`), expanded here.

    ``run(q, k_cache=None, v_cache=None, *, out=None)`` returns what `attn.decode` returns.
    """

    def __init__(self, k_cache, v_cache, cache_seqlens, *, block_table=None, num_heads_q: int, q_len: int = 1,
                 max_seqlen_k: int | None = None, round_to: int = ROUND_TO, num_splits: int | None = None,
                 **options):  # fmt: skip
        from .fast import decode

        _check_pool(k_cache, v_cache)
        options, block_table = _flat_options("DecodePlan", decode, options, block_table)
        for bad in ("validate", "total_seqlen_k"):
            if bad in options:
                raise TypeError(f"DecodePlan sets {bad} itself")
        if not isinstance(num_heads_q, int) or num_heads_q < 1 or num_heads_q % k_cache.shape[2]:
            raise ValueError(f"num_heads_q must be a positive multiple of Hkv={k_cache.shape[2]}, got {num_heads_q}")
        if not isinstance(q_len, int) or q_len < 1:
            raise ValueError(f"q_len must be a positive int, got {q_len}")
        self.k_cache, self.v_cache = k_cache, v_cache
        if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
            raise ValueError(f"round_to must be a positive int, got {round_to!r}")
        self.num_heads_q, self.q_len, self.options = num_heads_q, q_len, options
        self.round_to, self._bound, self._forced_splits = round_to, max_seqlen_k, num_splits
        self.paged = block_table is not None
        lengths = _host_ints(cache_seqlens, "cache_seqlens")
        self.batch = len(lengths)
        device = k_cache.device
        self.cache_seqlens = torch.zeros(self.batch, dtype=torch.int32, device=device)
        self.block_table = None
        if self.paged:
            table = _table_on_host(block_table, self.batch)
            self.block_table = torch.zeros(table.shape, dtype=torch.int32, device=device)
            self._table_buf = _PinnedInts(self.block_table)
        self._len_buf = _PinnedInts(self.cache_seqlens)
        self.hints = None
        self.update(lengths, table if self.paged else None)

    def _capacity(self) -> int:
        if self.paged:
            return self.block_table.shape[1] * self.k_cache.shape[1]
        return self.k_cache.shape[1]

    def update(self, cache_seqlens, block_table=None) -> bool:
        """New lengths (and, for a paged cache, block tables of the same width) for the next runs, written in
        place. Returns True when the recorded launches (and any CUDA graph captured from ``run``) stay valid,
        False when the lengths outgrew the plan's hints and it re-planned."""
        lengths = _host_ints(cache_seqlens, "cache_seqlens")
        if len(lengths) != self.batch:
            raise ValueError(f"cache_seqlens must keep B={self.batch} entries, got {len(lengths)}")
        capacity = self._capacity()
        bad = [n for n in lengths if n < self.q_len or n > capacity]
        if bad:
            raise ValueError(f"cache_seqlens entries must lie in [q_len={self.q_len}, {capacity}], got {bad[:8]}")
        if self.paged:
            if block_table is not None:
                table = _table_on_host(block_table, self.batch)
                if table.shape != self.block_table.shape:
                    raise ValueError(f"block_table must keep shape {tuple(self.block_table.shape)}, got "
                                     f"{tuple(table.shape)}")  # fmt: skip
                self._host_table = table
            elif not hasattr(self, "_host_table"):
                raise ValueError("a paged plan needs a block_table")
            _check_paged(lengths, self._host_table, self.k_cache.shape[0], self.k_cache.shape[1])
            if block_table is not None:
                self._table_buf.write(self._host_table)
        elif block_table is not None:
            raise ValueError("block_table given to a plan made for a contiguous cache")
        elif self.batch > self.k_cache.shape[0]:
            raise ValueError(f"{self.batch} sequences but the contiguous cache has {self.k_cache.shape[0]} rows")
        self._len_buf.write(torch.tensor(lengths, dtype=torch.int32))
        self.lengths = lengths
        longest, total = max(lengths, default=0), sum(lengths)
        window = self.options.get("max_attention_window")
        if self.hints is not None and longest <= self.hints["max_seqlen_k"] and total <= self.hints["total_seqlen_k"]:
            return True
        bound = self._bound if self._bound is not None else min(_round_up(max(longest, 1), self.round_to), capacity)
        if bound < longest:
            raise ValueError(f"max_seqlen_k={bound} is below the longest length {longest}")
        total_bound = min(_round_up(max(total, 1), self.round_to * max(self.batch, 1)), bound * self.batch)
        self.hints = {"max_seqlen_k": bound, "total_seqlen_k": total_bound}
        sms = 132 if _triton.is_interpreter() else _num_sms(self.k_cache.device.index or 0)
        effective = min(bound, window) if window is not None else bound
        self.num_splits = self._forced_splits or choose_num_splits(
            self.batch, self.k_cache.shape[2], effective, sms, total_seqlen_k=None if window else total_bound
        )
        self._invalidate()
        return False

    def _flat(self, q, k_cache, v_cache):
        from .fast import decode

        return decode(
            q, k_cache, v_cache, self.cache_seqlens, block_table=self.block_table, num_splits=self._forced_splits,
            validate=False, **self.hints, **self.options,
        )  # fmt: skip

    def flat_kwargs(self) -> dict:
        """The keywords ``run`` passes to `attn.decode` (beside q, the pools and ``self.cache_seqlens``)."""
        return {"block_table": self.block_table, "num_splits": self._forced_splits, "validate": False,
                **self.hints, **self.options}  # fmt: skip

    def run(self, q, k_cache=None, v_cache=None, *, out=None):
        """Decode for q ``[B, q_len, Hq, D]`` over ``k_cache``/``v_cache`` (the planned pools by default)."""
        inputs = (q, self.k_cache if k_cache is None else k_cache, self.v_cache if v_cache is None else v_cache)
        return self._execute(inputs, out if out is None or isinstance(out, tuple) else (out,))


# ---------------------------------------------------------------------------------------------------------------
# Context (chunked prefill over a cache)


class ContextPlan(_Plan):
    """Chunked prefill / mixed steps: `attn.context_attention` for packed queries over a cache, planned once.

    Args:
        k_cache, v_cache: the cache (or any layer's pools of the same layout, given to ``run``).
        cache_seqlens: per sequence, the tokens its cache holds including this chunk (python ints / CPU tensor).
        new_tokens: per sequence, this chunk's query tokens (rows of the packed q).
        block_table: as for `DecodePlan`; None for a contiguous cache.
        **options: `attn.context_attention`'s other keywords, fixed for the plan.

    Re-plan for a new step (planning is a host check and two small copies).
    """

    def __init__(self, k_cache, v_cache, cache_seqlens, new_tokens, *, block_table=None, **options):
        from .fast import context_attention

        _check_pool(k_cache, v_cache)
        options, block_table = _flat_options("ContextPlan", context_attention, options, block_table)
        if "validate" in options:
            raise TypeError("ContextPlan sets validate itself")
        lengths = _host_ints(cache_seqlens, "cache_seqlens")
        new = _host_ints(new_tokens, "new_tokens")
        if len(new) != len(lengths):
            raise ValueError(f"new_tokens must have B={len(lengths)} entries, got {len(new)}")
        if any(n < 0 for n in new):
            raise ValueError(f"new_tokens entries must be >= 0, got {new}")
        device = k_cache.device
        if block_table is not None:
            table = _table_on_host(block_table, len(lengths))
            capacity = table.shape[1] * k_cache.shape[1]
            _check_paged(lengths, table, k_cache.shape[0], k_cache.shape[1])
            self.block_table = table.to(device)
        else:
            capacity = k_cache.shape[1]
            if len(lengths) > k_cache.shape[0]:
                raise ValueError(f"{len(lengths)} sequences but the contiguous cache has {k_cache.shape[0]} rows")
            self.block_table = None
        if options.get("max_attention_window") is None and options.get("k_new") is None:
            bad = [b for b, (n, L) in enumerate(zip(new, lengths)) if L > capacity or L < 0]
            if bad:
                raise ValueError(f"cache_seqlens entries must lie in [0, {capacity}], bad sequences {bad}")
            if options.get("causal", True):
                bad = [b for b, (n, L) in enumerate(zip(new, lengths)) if n > L]
                if bad:
                    raise ValueError(f"a causal chunk cannot have more tokens than its cache holds: sequences {bad}")
        cu = [0]
        for n in new:
            cu.append(cu[-1] + n)
        self.k_cache, self.v_cache, self.options = k_cache, v_cache, options
        self.lengths, self.new_tokens, self.num_tokens = lengths, new, cu[-1]
        self.cache_seqlens = torch.tensor(lengths, dtype=torch.int32).to(device)
        self.cu_seqlens_q = torch.tensor(cu, dtype=torch.int32).to(device)
        self.max_seqlen_q = max(new, default=0)

    def _flat(self, q, k_cache, v_cache):
        from .fast import context_attention

        return context_attention(
            q, k_cache, v_cache, self.cache_seqlens, cu_seqlens_q=self.cu_seqlens_q, max_seqlen_q=self.max_seqlen_q,
            block_table=self.block_table, validate=False, **self.options,
        )  # fmt: skip

    def run(self, q, k_cache=None, v_cache=None, *, out=None):
        """Attention for packed q ``[T, Hq, D]`` over the cache."""
        inputs = (q, self.k_cache if k_cache is None else k_cache, self.v_cache if v_cache is None else v_cache)
        return self._execute(inputs, out if out is None or isinstance(out, tuple) else (out,))


# ---------------------------------------------------------------------------------------------------------------
# Prefill (packed or padded attention, no cache)


class PrefillPlan(_Plan):
    """`attn.attention` for a batch of prompts, planned once.

    Args:
        seqlens_q: per sequence, its query tokens (python ints / CPU tensor).
        seqlens_k: per sequence, its keys; the query lengths by default.
        packed: True for packed ``[T, H, D]`` inputs (``cu_seqlens`` built here), False for padded
            ``[B, S, H, D]`` inputs (lengths passed only when some sequence is shorter than the padding).
        padded_len_q, padded_len_k: for padded inputs, ``S`` of q and of k (the longest lengths by default).
        device: where the metadata lives.
        **options: `attn.attention`'s other keywords (causal, window_size, softcap, ...), fixed for the plan.
    """

    def __init__(self, seqlens_q, seqlens_k=None, *, packed: bool = True, padded_len_q: int | None = None,
                 padded_len_k: int | None = None, device="cuda", **options):  # fmt: skip
        from .fast import attention

        options, _ = _flat_options("PrefillPlan", attention, options)
        if "validate" in options:
            raise TypeError("PrefillPlan sets validate itself")
        check_flag("packed", packed)
        device = check_device("device", device)
        lq = _host_ints(seqlens_q, "seqlens_q")
        lk = lq if seqlens_k is None else _host_ints(seqlens_k, "seqlens_k")
        if len(lk) != len(lq):
            raise ValueError(f"seqlens_k must have B={len(lq)} entries, got {len(lk)}")
        if any(n < 0 for n in lq + lk):
            raise ValueError("sequence lengths must be >= 0")
        self.options, self.packed = options, packed
        self.max_seqlen_q, self.max_seqlen_k = max(lq, default=0), max(lk, default=0)
        self.meta: dict = {}
        if packed:
            for name, lens in (("cu_seqlens_q", lq), ("cu_seqlens_k", lk)):
                cu = [0]
                for n in lens:
                    cu.append(cu[-1] + n)
                self.meta[name] = torch.tensor(cu, dtype=torch.int32).to(device)
            self.meta.update(max_seqlen_q=self.max_seqlen_q, max_seqlen_k=self.max_seqlen_k)
        else:
            sq = self.max_seqlen_q if padded_len_q is None else padded_len_q
            sk = self.max_seqlen_k if padded_len_k is None else padded_len_k
            if self.max_seqlen_q > sq or self.max_seqlen_k > sk:
                raise ValueError(f"lengths exceed the padded lengths ({sq}, {sk})")
            if any(n != sq for n in lq):
                self.meta["seqlens_q"] = torch.tensor(lq, dtype=torch.int32).to(device)
            if any(n != sk for n in lk):
                self.meta["seqlens_k"] = torch.tensor(lk, dtype=torch.int32).to(device)

    def _flat(self, q, k, v):
        from .fast import attention

        return attention(q, k, v, validate=False, **self.meta, **self.options)

    def run(self, q, k, v, *, out=None):
        """Attention of q over k, v (packed or padded, as planned)."""
        return self._execute((q, k, v), out if out is None or isinstance(out, tuple) else (out,))


# ---------------------------------------------------------------------------------------------------------------
# The inflight step (gpt_attention)


class GptAttentionPlan(_Plan):
    """One inflight-batching step (`attn.gpt_attention`): pre-processing (QKV bias, RoPE, the cache write) and
    attention over a packed buffer of context and generation requests, planned once per step.

    Args:
        batch: the step's `attn.InflightBatch` (already validated from the scheduler's host lists).
        k_cache, v_cache: the cache written and read (any layer's pools of the same layout go to ``run``).
        num_heads_q, num_heads_kv: heads.
        **options: `attn.gpt_attention`'s other keywords (qkv_bias, rotary_dim, rope_*, mode, ...).

    The batch's block-table entries are checked against the pool here (one read of the table). ``run`` writes
    the cache, so a CUDA graph of it must be replayed once per step, like the step itself.
    """

    def __init__(self, batch, k_cache, v_cache, *, num_heads_q: int, num_heads_kv: int, **options):
        from .fast import gpt_attention

        _check_pool(k_cache, v_cache)
        options, _ = _flat_options("GptAttentionPlan", gpt_attention, options)
        if "validate" in options:
            raise TypeError("GptAttentionPlan sets validate itself")
        after = [p + n for p, n in zip(batch.past_lengths, batch.new_tokens)]
        if batch.block_table is not None:
            table = _table_on_host(batch.block_table, batch.batch, "batch.block_table")
            if options.get("max_attention_window") is None:
                _check_paged(after, table, k_cache.shape[0], k_cache.shape[1], "past_lengths + new_tokens")
        elif max(after, default=0) > k_cache.shape[1]:
            raise ValueError(f"a sequence would hold {max(after)} tokens, over the cache's {k_cache.shape[1]}")
        self.batch, self.k_cache, self.v_cache = batch, k_cache, v_cache
        self.kwargs = {"num_heads_q": num_heads_q, "num_heads_kv": num_heads_kv, **options}

    def _flat(self, qkv, k_cache, v_cache):
        from .fast import gpt_attention

        return gpt_attention(qkv, self.batch, k_cache, v_cache, validate=False, **self.kwargs)

    def run(self, qkv, k_cache=None, v_cache=None, *, out=None):
        """The step for the packed ``qkv [T, (Hq + 2·Hkv)·D]``; writes the cache, returns ``out [T, Hq, D]``."""
        inputs = (qkv, self.k_cache if k_cache is None else k_cache, self.v_cache if v_cache is None else v_cache)
        return self._execute(inputs, out if out is None or isinstance(out, tuple) else (out,))


def plan_decode_for(cache, slots: Sequence[int], **kwargs) -> DecodePlan:
    """`DecodePlan` over ``slots`` of a `PagedKVCache` or `ContiguousKVCache`, from its host bookkeeping."""
    slots = list(slots)
    for s in slots:
        cache._check_live(s)
    lengths = [cache._lengths[s] for s in slots]
    return DecodePlan(cache.k, cache.v, lengths, block_table=_cache_table(cache, slots), **cache.scales, **kwargs)


def plan_context_for(cache, slots: Sequence[int], new_tokens, **kwargs) -> ContextPlan:
    """`ContextPlan` over ``slots`` (their chunks already appended), from the cache's host bookkeeping."""
    slots = list(slots)
    for s in slots:
        cache._check_live(s)
    lengths = [cache._lengths[s] for s in slots]
    return ContextPlan(cache.k, cache.v, lengths, new_tokens, block_table=_cache_table(cache, slots),
                       **cache.scales, **kwargs)  # fmt: skip


def _cache_table(cache, slots):
    if hasattr(cache, "_blocks"):
        width = cache.max_blocks_per_seq
        return [cache._blocks[s] + [0] * (width - len(cache._blocks[s])) for s in slots]
    if slots == list(range(cache.max_seqs)):
        return None  # every row, in order: the contiguous cache itself
    return [[s] for s in slots]  # one-column table: each slot's row is its only block (see metadata())
