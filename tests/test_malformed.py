"""Every public entry, called with one argument replaced by a malformed value (issue 18): the call either runs or
raises a ValueError or TypeError, and a refused call that would have written a cache leaves it exactly as it was.

tests/test_checks.py and the entries' own test files hold hand-written tables of bad calls with the message
each must give. This file does not judge messages; it tries what a hand-written table misses: for every
argument of every entry (positional, keyword, and the optional ones a base call leaves out), the values a
careless or hostile caller passes: the wrong type (a list, a string, a bool for an int), the wrong dtype, one
rank too many or too few, one element too few or too many along the first and last axes, an empty tensor, a
tensor on another device (``meta``), negative and huge integers, NaN and ±inf floats, malformed tuples. An
IndexError, RuntimeError, AttributeError or a Triton error from deep inside is a defect: the caller learns
neither which argument was wrong nor whether the cache changed.

Values inside valid tensors (lengths past the cache, table entries outside the pool) are the fuzzer's and
tests/test_no_sync.py's: with ``validate=False`` the kernels clamp them and record them for `attn.check_errors`.
A substitute that happens to be valid runs; what is checked then is only that the output and the caches stay
finite (every base input is), since a malformed option that silently turns them NaN is a defect as well.
"""

from __future__ import annotations

import inspect
import math
import signal

import pytest
import torch

import attn
import attn.fast as fast
import attn.reference as reference
from attn import ContiguousKVCache, InflightBatch, PagedKVCache, PoolExhaustedError
from attn import flash_attn_interface as fa
from attn.fast import fp8_prefill
from attn.layout import cu_seqlens_from_lengths

B, HQ, HKV, D, CAP = 2, 4, 2, 16, 8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# refusals: a clear error, or (a cache object's) a pool too small for the request
ACCEPTED = (ValueError, TypeError, PoolExhaustedError)
# a huge integer: past int32, so that a size or a count built from it cannot be allocated or launched
HUGE = 2**40
# no base call takes a second in the interpreter; one that runs this long was sized by a malformed argument
CALL_SECONDS = 20


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


# each base call: (function, positional arguments, keyword arguments, names of the arguments it writes)
def _attention(fn):
    return fn, (_rand(B, 5, HQ, D), _rand(B, 5, HKV, D), _rand(B, 5, HKV, D)), dict(causal=True), ()


def _packed_attention(fn):
    cu = cu_seqlens_from_lengths(_i32(2, 3))
    return (
        fn,
        (_rand(5, HQ, D), _rand(5, HKV, D), _rand(5, HKV, D)),
        dict(cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=3, max_seqlen_k=3, causal=True),
        (),
    )


def _decode(fn):
    return fn, (_rand(B, 1, HQ, D), _rand(B, CAP, HKV, D), _rand(B, CAP, HKV, D), _i32(3, 5)), {}, ()


def _paged_decode(fn):
    # 5 blocks of 4 tokens; sequence 0 holds blocks 3, 1, sequence 1 blocks 0, 4
    pool = _rand(5, 4, HKV, D), _rand(5, 4, HKV, D)
    return fn, (_rand(B, 1, HQ, D), *pool, _i32(3, 7)), dict(block_table=_i32(3, 1, 0, 4).view(2, 2)), ()


def _context(fn):
    cu = cu_seqlens_from_lengths(_i32(1, 2))
    return (
        fn,
        (_rand(3, HQ, D), _rand(B, CAP, HKV, D), _rand(B, CAP, HKV, D), _i32(3, 5)),
        dict(cu_seqlens_q=cu, max_seqlen_q=2),
        (),
    )


def _append(fn):
    return fn, (_rand(B, CAP, HKV, D), _rand(B, CAP, HKV, D), _rand(B, 2, HKV, D), _rand(B, 2, HKV, D),
                _i32(3, 5)), {}, ("k_cache", "v_cache")  # fmt: skip


def _preprocess(fn):
    qkv = _rand(B, 2, (HQ + 2 * HKV) * D)
    return (
        fn,
        (qkv, _rand(B, CAP, HKV, D), _rand(B, CAP, HKV, D), _i32(3, 5)),
        dict(num_heads_q=HQ, num_heads_kv=HKV, rotary_dim=D),
        ("k_cache", "v_cache"),
    )


def _gpt(fn):
    # one prompt of 3 tokens and one generation request over 5 cached tokens, 4-token pages
    batch = InflightBatch.build([0, 1], [3, 1], [0, 5], block_table=_i32(3, 1, 0, 4).view(2, 2))
    qkv = _rand(batch.num_tokens, (HQ + 2 * HKV) * D)
    return (
        fn,
        (qkv, batch, _rand(5, 4, HKV, D), _rand(5, 4, HKV, D)),
        dict(num_heads_q=HQ, num_heads_kv=HKV, rotary_dim=D),
        ("k_cache", "v_cache"),
    )


def _cross(fn):
    return fn, (_rand(B, 1, HQ, D), _rand(B, 6, HKV, D), _rand(B, 6, HKV, D), _i32(4, 6)), {}, ()


def _indirection(fn):
    table = torch.zeros(B, 2, CAP, dtype=torch.int32)
    return fn, (table, _i32(1, 0, 0, 0).view(B, 2), 3), {}, ()


def _fp8(fn):
    q, k, v = (_rand(1, 4, 2, 64).to(torch.float8_e4m3fn) for _ in range(3))
    return fn, (q, k, v, torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 2)), dict(causal=True), ()


def _fa_func(fn):
    return fn, (_rand(B, 5, HQ, D), _rand(B, 5, HKV, D), _rand(B, 5, HKV, D)), dict(causal=True), ()


def _fa_varlen(fn):
    cu = cu_seqlens_from_lengths(_i32(2, 3))
    return fn, (_rand(5, HQ, D), _rand(5, HKV, D), _rand(5, HKV, D), cu, cu.clone(), 3, 3), dict(causal=True), ()


def _fa_kvcache(fn):
    angle = torch.rand(CAP, 8) * 6
    return fn, (_rand(B, 1, HQ, D), _rand(B, CAP, HKV, D), _rand(B, CAP, HKV, D)), dict(
        k=_rand(B, 1, HKV, D), v=_rand(B, 1, HKV, D), cache_seqlens=_i32(3, 5), causal=True,
        rotary_cos=angle.cos(), rotary_sin=angle.sin(),
    ), ("k_cache", "v_cache")  # fmt: skip


def _tok(n, batch=1):
    return _rand(batch, n, HKV, D, dtype=torch.float16), _rand(batch, n, HKV, D, dtype=torch.float16)


def _cache_state(c):
    """What a cache object holds: its bookkeeping (host and device) and the bytes of every token a live sequence
    lists (free blocks' contents are not state: nothing reads them; tests/test_transactional.py)."""
    state = {"lengths": list(c._lengths), "live": sorted(c._live), "seqlens": c.seqlens.clone()}
    paged = isinstance(c, PagedKVCache)
    if paged:
        state.update(free=list(c.allocator._free), refs=dict(c.allocator._refs), table=c.block_table.clone(),
                     blocks={s: list(b) for s, b in c._blocks.items()})  # fmt: skip
    for s in sorted(c._live):
        n = c._lengths[s]
        rows, cols = ([c._blocks[s][t // c.block_size] for t in range(n)], [t % c.block_size for t in range(n)]) \
            if paged else ([s] * n, list(range(n)))  # fmt: skip
        state[f"tokens of slot {s}"] = (c.k[rows, cols].clone(), c.v[rows, cols].clone())
    return state


def _paged_cache():
    """Two live sequences (6 and 9 tokens) and a fork of the first, in 4-token blocks, 3 of 9 blocks free."""
    c = PagedKVCache(num_blocks=9, block_size=4, num_heads_kv=HKV, head_dim=D, max_seqs=4, max_blocks_per_seq=4,
                     device=DEVICE)  # fmt: skip
    a, b = c.add_sequence(), c.add_sequence()
    c.append([a], *_tok(6))
    c.append([b], *_tok(9))
    f = c.fork(a)
    return c, (a, b, f)


def _contiguous_cache():
    c = ContiguousKVCache(max_seqs=3, max_len=10, num_heads_kv=HKV, head_dim=D, device=DEVICE)
    a, b = c.add_sequence(), c.add_sequence()
    c.append([a], *_tok(4))
    c.append([b], *_tok(7))
    return c, (a, b)


def _plan_run():
    plan = attn.DecodePlan(_rand(B, CAP, HKV, D), _rand(B, CAP, HKV, D), [3, 5], num_heads_q=HQ)
    return plan.run, (_rand(B, 1, HQ, D),), {}, ()


def _allocator(name, arg):
    """A 6-block allocator with blocks 0 and 1 taken; its state is its free list and reference counts."""
    a = attn.BlockAllocator(6)
    a.allocate(2)
    return getattr(a, name), (arg,), {}, lambda: {"free": list(a._free), "refs": dict(a._refs)}


def _method(make, name, args_of, kwargs=None):
    """A cache method's base call: (bound method, its arguments, the cache's whole state as what it writes)."""

    def build():
        c, slots = make()
        return getattr(c, name), args_of(slots), dict(kwargs or {}), lambda: _cache_state(c)

    return build


ENTRIES = {
    "attention": lambda: _attention(fast.attention),
    "attention-packed": lambda: _packed_attention(fast.attention),
    "attention_unfused": lambda: _attention(fast.attention_unfused),
    "decode": lambda: _decode(fast.decode),
    "decode-paged": lambda: _paged_decode(fast.decode),
    "context_attention": lambda: _context(fast.context_attention),
    "append_kv": lambda: _append(fast.append_kv),
    "preprocess": lambda: _preprocess(fast.preprocess),
    "gpt_attention": lambda: _gpt(fast.gpt_attention),
    "cross_attention": lambda: _cross(fast.cross_attention),
    "update_indirection": lambda: _indirection(fast.update_indirection),
    "attention_fp8": lambda: _fp8(fp8_prefill.attention_fp8),
    "flash_attn_func": lambda: _fa_func(fa.flash_attn_func),
    "flash_attn_varlen_func": lambda: _fa_varlen(fa.flash_attn_varlen_func),
    "flash_attn_with_kvcache": lambda: _fa_kvcache(fa.flash_attn_with_kvcache),
    # the top-level names (`attn.ops`: the launcher in eager mode, the registered operator under autograd or
    # torch.compile) take the same arguments
    "attn.attention": lambda: _attention(attn.attention),
    "attn.decode": lambda: _decode(attn.decode),
    "attn.context_attention": lambda: _context(attn.context_attention),
    "attn.append_kv": lambda: _append(attn.append_kv),
    "attn.preprocess": lambda: _preprocess(attn.preprocess),
    "attn.gpt_attention": lambda: _gpt(attn.gpt_attention),
    # the cache objects' methods (their writes: the whole cache)
    "PagedKVCache.append": _method(_paged_cache, "append", lambda s: (s[:2], *_tok(1, 2))),
    "PagedKVCache.reserve_tokens": _method(_paged_cache, "reserve_tokens", lambda s: ([s[0], s[2]], [1, 2])),
    "PagedKVCache.reserve": _method(_paged_cache, "reserve", lambda s: (s[1], 3)),
    "PagedKVCache.fork": _method(_paged_cache, "fork", lambda s: (s[1],)),
    "PagedKVCache.reorder_beams": _method(_paged_cache, "reorder_beams", lambda s: ([s[0], s[2]], [1, 0])),
    "PagedKVCache.release": _method(_paged_cache, "release", lambda s: (s[2],)),
    "PagedKVCache.metadata": _method(_paged_cache, "metadata", lambda s: (list(s),)),
    "ContiguousKVCache.append": _method(_contiguous_cache, "append", lambda s: (list(s), *_tok(2, 2))),
    "ContiguousKVCache.reserve_tokens": _method(_contiguous_cache, "reserve_tokens", lambda s: (list(s), [1, 3])),
    "ContiguousKVCache.release": _method(_contiguous_cache, "release", lambda s: (s[0],)),
    "ContiguousKVCache.metadata": _method(_contiguous_cache, "metadata", lambda s: (list(s),)),
    # plans, the step metadata, the allocator and the helpers that make a call's arguments
    "DecodePlan": lambda: (
        attn.DecodePlan,
        (_rand(B, CAP, HKV, D), _rand(B, CAP, HKV, D), [3, 5]),
        dict(num_heads_q=HQ),
        (),
    ),  # fmt: skip
    "DecodePlan.run": lambda: _plan_run(),
    "PrefillPlan": lambda: (attn.PrefillPlan, ([2, 3],), dict(causal=True, device=DEVICE), ()),
    "InflightBatch.build": lambda: (
        InflightBatch.build,
        ([0, 1], [3, 1], [0, 5]),
        dict(block_table=_i32(3, 1, 0, 4).view(2, 2)),
        (),
    ),  # fmt: skip
    "BlockAllocator.allocate": lambda: _allocator("allocate", 2),
    "BlockAllocator.free": lambda: _allocator("free", [0]),
    "BlockAllocator.share": lambda: _allocator("share", [1]),
    "calibrate_kv_scales": lambda: (
        attn.calibrate_kv_scales,
        (_rand(B, 5, HKV, D), _rand(B, 5, HKV, D), torch.int8),
        {},
        (),
    ),  # fmt: skip
    "alibi_slopes": lambda: (attn.alibi_slopes, (8,), dict(tp_size=2, tp_rank=1), ()),
    "RelativeBias": lambda: (attn.RelativeBias, (), dict(table=_rand(HQ, 32), max_distance=16), ()),
    # context parallelism's host-side pieces (the collectives need a process group: tests/test_distributed.py)
    "distributed.merge_stack": lambda: (attn.distributed.merge_stack, (_rand(3, 5, HQ, D), _rand(3, 5, HQ)), {}, ()),
    "distributed.merge_into": lambda: (
        attn.distributed.merge_into,
        (torch.zeros(5, HQ, D), torch.full((HQ, 5), -math.inf), _rand(5, HQ, D), _rand(HQ, 5)),
        {},
        ("out", "lse"),
    ),  # fmt: skip
    "distributed.zigzag_plan": lambda: (attn.distributed.zigzag_plan, ([9, 16], 2), {}, ()),
    "distributed.contiguous_plan": lambda: (attn.distributed.contiguous_plan, ([9, 16], 2), {}, ()),
    "distributed.plan_pieces": lambda: (
        attn.distributed.plan_pieces,
        (attn.distributed.zigzag_plan([9, 16], 2), 1, 0),
        dict(causal=True),
        (),
    ),  # fmt: skip
    "reference.attention": lambda: _attention(reference.attention),
    "reference.decode-paged": lambda: _paged_decode(reference.decode),
    "reference.context_attention": lambda: _context(reference.context_attention),
    "reference.append_kv": lambda: _append(reference.append_kv),
    "reference.preprocess": lambda: _preprocess(reference.preprocess),
    "reference.gpt_attention": lambda: _gpt(reference.gpt_attention),
    "reference.cross_attention": lambda: _cross(reference.cross_attention),
    "reference.attention_fp8": lambda: _fp8(reference.attention_fp8),
}

# arguments that only steer a benchmark or a test (a tile override), not a user's call
SKIP = {"config"}


def _kind(value, annotation: str) -> str:
    """What a malformed substitute for this argument looks like: by the base call's value, else its annotation."""
    # bool before int: a bool is an int to isinstance
    for typ, kind in ((torch.Tensor, "tensor"), (bool, "bool"), (int, "int"), (float, "float"), (tuple, "tuple"),
                      (list, "list"), (str, "str")):  # fmt: skip
        if isinstance(value, typ):
            return kind
    if value is None and annotation:
        for word, kind in (("Tensor", "opt-tensor"), ("tuple", "tuple"), ("bool", "bool"), ("float", "float"),
                           ("int", "int"), ("str", "str")):  # fmt: skip
            if word in annotation:
                return kind
    return "object"


def _tensor_substitutes(x: torch.Tensor) -> dict:
    subs = {"list": x.tolist() if x.numel() <= 64 else [1.0], "string": "x", "meta": x.to("meta"), "empty": x[:0],
            "rank+1": x.unsqueeze(0), "noncontiguous": torch.stack([x, x], -1)[..., 0]}  # fmt: skip
    if x.dim() > 0:
        subs["rank-1"] = x[0]
        subs["first+1"] = torch.cat([x, x[:1]])
        if x.shape[0] > 1:
            subs["first-1"] = x[1:]
        if x.shape[-1] > 1:
            subs["last-1"] = x[..., 1:]
    if x.is_floating_point():
        subs.update({"float64": x.double(), "int64": x.long(), "bool": x != 0})
    else:
        subs.update({"float32": x.float(), "int64": x.long(), "negative": x * 0 - 1, "huge": x * 0 + 2**30})
    return subs


SUBSTITUTES = {
    "int": {"negative": -1, "zero": 0, "huge": HUGE, "bool": True, "float": 2.5, "string": "2", "none": None},
    "float": {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "negative": -1.0, "zero": 0.0, "string": "x",
              "bool": True, "tensor": torch.tensor(1.0)},
    "bool": {"string": "yes", "int": 2, "tensor": torch.tensor([True, False])},
    "tuple": {"short": (1,), "long": (1, 2, 3), "string": ("a", 0), "negative": (-5, 0), "float": (1.5, 0),
              "none": None, "int": 3, "huge": (HUGE, HUGE)},
    "str": {"bogus": "bogus", "none": None, "int": 1},
    "opt-tensor": {"scalar": torch.tensor(1.0), "int64": torch.zeros(3, dtype=torch.int64), "wrong": torch.ones(3),
                   "list": [1.0, 2.0], "string": "x", "meta": torch.ones(4, device="meta")},
    "object": {"string": "x", "int": 1},
    # lists of slots, counts or parents
    "list": {"empty": [], "negative": [-1], "unknown": [10**6], "huge": [HUGE, HUGE], "string": ["a"],
             "float": [0.5], "bool": [True, False], "none": None, "int": 1, "nested": [[0]]},
}  # fmt: skip


def _arguments(entry):
    """(name, positional index or None, base value, kind) for every argument of the entry's signature."""
    fn, args, kwargs, _ = ENTRIES[entry]()
    out = []
    for i, (name, p) in enumerate(inspect.signature(fn).parameters.items()):
        if name in SKIP or p.kind is p.VAR_KEYWORD:
            continue
        positional = i < len(args)
        value = args[i] if positional else kwargs.get(name, p.default if p.default is not p.empty else None)
        out.append((name, i if positional else None, value, _kind(value, str(p.annotation))))
    return out


def _cases():
    for entry in ENTRIES:
        for name, _, _, _ in _arguments(entry):
            yield pytest.param(entry, name, id=f"{entry}-{name}")


class _Hung(Exception):
    pass


def _alarm(signum, frame):
    raise _Hung


def _nonfinite(x) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.device.type != "meta"
        and (not torch.isfinite(x.float()).all())
    )


def _recorded() -> bool:
    """Whether the call recorded an out-of-range value for `attn.check_errors` (and clears the record): its
    outputs are then undefined by contract, but the kernels stayed inside their tensors."""
    try:
        attn.check_errors()
    except ValueError:
        return True
    return False


def _build(entry):
    # the same random inputs every time, so that a call can be compared with the base call; on a GPU machine
    # the base call's tensors are made there (the substitutes of other devices stay malformed)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        fn, args, kwargs, writes = ENTRIES[entry]()
    return fn, list(args), kwargs, writes


def _run(fn, args, kwargs):
    """The call under a time limit: a size taken from a huge argument without a bound makes the interpreter run a
    grid of billions of programs (on a GPU, a launch error or a grid of empty programs), a finding, not a hang."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CALL_SECONDS)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _same(a, b) -> bool:
    """Deep equality of results and states: tensors bitwise (NaN equal to NaN), containers by their items."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num())
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    if isinstance(a, (int, float, str, bool, type(None), torch.dtype, torch.device)):
        return a == b
    # an object a call made (a plan): what it computes is compared where it is run
    return type(a) is type(b)


def _snapshot(writes, params, args, kwargs):
    """What the call may write, copied: the named tensor arguments, or a cache object's whole state."""
    if callable(writes):
        return writes()
    state = {w: (args[params.index(w)] if params.index(w) < len(args) else kwargs[w]) for w in writes}
    return {w: t.clone() for w, t in state.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"}


@pytest.mark.parametrize("entry,name", list(_cases()))
def test_malformed_argument(entry, name):
    index, _, kind = next((i, v, k) for n, i, v, k in _arguments(entry) if n == name)
    params = list(inspect.signature(ENTRIES[entry]()[0]).parameters)
    failures = []
    _recorded()
    labels = None
    k = 0
    while labels is None or k < len(labels):
        fn, args, kwargs, writes = _build(entry)
        base = args[index] if index is not None else kwargs.get(name)
        subs = _tensor_substitutes(base) if kind == "tensor" else dict(SUBSTITUTES[kind])
        if kind == "tensor":
            subs["none"] = None
        labels = labels or list(subs)
        label = labels[k]
        k += 1
        bad = subs[label]
        if index is not None:
            args[index] = bad
        else:
            kwargs[name] = bad
        before = _snapshot(writes, params, args, kwargs)
        try:
            result = _run(fn, args, kwargs)
        except _Hung:
            failures.append(f"{label}: still running after {CALL_SECONDS} s")
            continue
        except ACCEPTED:
            _recorded()
            after = _snapshot(writes, params, args, kwargs)
            changed = [w for w in before if not _same(before[w], after[w])]
            if changed:
                failures.append(f"{label}: refused, but {', '.join(changed)} changed")
            continue
        except Exception as e:  # noqa: BLE001 - any other exception is the finding
            _recorded()
            failures.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            continue
        if _recorded():
            continue
        after = _snapshot(writes, params, args, kwargs)
        # every base input is finite: a malformed option that ran must not have made the output or a written
        # cache non-finite (a NaN rope_base once turned every key NaN, silently)
        out = result[0] if isinstance(result, tuple) else result
        if label == "first+1" and name == "q" and base.dim() == 3:
            # a packed q with a row past cu_seqlens_q[-1]: no sequence owns it, and an unvalidated call leaves it
            # unwritten, as FlashAttention does (a buffer padded for a CUDA graph; docs/api/errors.md)
            out = out[: base.shape[0]]
        nonfinite = [w for w, t in [("out", out), *after.items()] if _nonfinite(t)]
        if nonfinite:
            failures.append(f"{label}: ran, and left non-finite values in {', '.join(nonfinite)}")
        if label == "noncontiguous":
            # the same values in another memory layout: the same result, and the same writes
            fn0, args0, kwargs0, writes0 = _build(entry)
            expected = _run(fn0, args0, kwargs0)
            _recorded()
            if not _same(result, expected) or not _same(after, _snapshot(writes0, params, args0, kwargs0)):
                failures.append(f"{label}: ran, but differs from the same values laid out contiguously")
    assert not failures, f"{entry}({name}=...):\n  " + "\n  ".join(failures)
