"""Cache objects are transactional (issue 18): a rejected call leaves the allocator, the block tables, the lengths
and every byte exactly as they were; a call that fails part-way (a failure injected at each of its steps) leaves
the bookkeeping exactly as it was and every byte a sequence lists unchanged.

Free blocks' contents are not state: no kernel reads them, and a copy-on-write target written before a later
step failed goes back to the free list. Everything else is compared exactly.
"""

from __future__ import annotations

import pytest
import torch

import attn.fast as fast
import attn.reference as reference
from attn.kv_cache import ContiguousKVCache, PagedKVCache, PoolExhaustedError
from attn.layout import cu_seqlens_from_lengths

HKV, D, BS = 2, 8, 4
REJECTED = (ValueError, TypeError, PoolExhaustedError)


def _bookkeeping(c):
    state = dict(
        lengths=list(c._lengths), live=sorted(c._live), seqlens=c.seqlens.clone(),
    )  # fmt: skip
    if isinstance(c, PagedKVCache):
        state.update(
            free=list(c.allocator._free), refs=dict(c.allocator._refs), table=c.block_table.clone(),
            blocks={s: list(b) for s, b in c._blocks.items()}, copies=c.num_block_copies,
        )  # fmt: skip
    return state


def _listed_bytes(c):
    """The K/V of every token each live sequence holds, in order: what any reader can see."""
    out = {}
    for s in c.live:
        n = c.length(s)
        if isinstance(c, PagedKVCache):
            rows = [c._blocks[s][t // BS] for t in range(n)]
            slots = [t % BS for t in range(n)]
            out[s] = (c.k[rows, slots].clone(), c.v[rows, slots].clone())
        else:
            out[s] = (c.k[s, :n].clone(), c.v[s, :n].clone())
    return out


def _assert_same(before, after, what):
    assert before.keys() == after.keys(), what
    for key in before:
        a, b = before[key], after[key]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f"{what}: {key} changed"
        elif isinstance(a, tuple):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), f"{what}: bytes of sequence {key} changed"
        else:
            assert a == b, f"{what}: {key} changed: {a} -> {b}"


def _snapshot(c):
    return _bookkeeping(c), _listed_bytes(c), c.k.clone(), c.v.clone()


def _tokens(n, dtype=torch.float16):
    return torch.randn(1, n, HKV, D, dtype=dtype), torch.randn(1, n, HKV, D, dtype=dtype)


def _paged(num_blocks=9):
    """Three live sequences, one a fork sharing a partly filled block (the next write copies it), and a pool
    with 2 free blocks left."""
    c = PagedKVCache(num_blocks=num_blocks, block_size=BS, num_heads_kv=HKV, head_dim=D, max_seqs=4,
                     max_blocks_per_seq=4)  # fmt: skip
    a, b = c.add_sequence(), c.add_sequence()
    c.append([a], *_tokens(6), impl=reference.append_kv)  # 2 blocks, the second half full
    c.append([b], *_tokens(9), impl=reference.append_kv)  # 3 blocks
    f = c.fork(a)  # shares a's two blocks
    c.append([f], *_tokens(1), impl=reference.append_kv)  # copies the shared partial block: 1 more
    assert c.allocator.num_free == 9 - 6
    c.append([b], *_tokens(3), impl=reference.append_kv)  # 12 tokens, 3 full blocks
    c.append([a], *_tokens(2), impl=reference.append_kv)  # a: 8 tokens, 2 full blocks
    return c, (a, b, f)


def _contiguous():
    c = ContiguousKVCache(max_seqs=3, max_len=10, num_heads_kv=HKV, head_dim=D)
    a, b = c.add_sequence(), c.add_sequence()
    c.append([a], *_tokens(4), impl=reference.append_kv)
    c.append([b], *_tokens(7), impl=reference.append_kv)
    return c, (a, b)


def _malformed_paged(c, slots):
    """``(name, call)`` pairs, each a call the cache must reject."""
    a, b, f = slots
    k1, v1 = _tokens(1)
    k2, v2 = torch.randn(2, 1, HKV, D, dtype=torch.float16), torch.randn(2, 1, HKV, D, dtype=torch.float16)
    cu = cu_seqlens_from_lengths(torch.tensor([1, 1], dtype=torch.int32))
    packed = torch.randn(2, HKV, D, dtype=torch.float16)
    return [
        ("k_new dtype", lambda: c.append([a], k1.float(), v1.float())),
        ("v_new dtype", lambda: c.append([a], k1, v1.float())),
        ("k_new heads", lambda: c.append([a], torch.randn(1, 1, HKV + 1, D, dtype=torch.float16), v1)),
        ("k_new head dim", lambda: c.append([a], torch.randn(1, 1, HKV, D + 2, dtype=torch.float16), v1)),
        ("k_new/v_new shapes", lambda: c.append([a], k1, torch.randn(1, 2, HKV, D, dtype=torch.float16))),
        ("k_new batch", lambda: c.append([a, b], k1, v1)),
        ("k_new not a tensor", lambda: c.append([a], k1.tolist(), v1)),
        ("cu int64", lambda: c.append([a, b], packed, packed, cu.long())),
        ("cu decreasing", lambda: c.append([a, b], packed, packed, torch.tensor([0, 2, 1], dtype=torch.int32))),
        ("cu total", lambda: c.append([a, b], packed, packed, torch.tensor([0, 1, 3], dtype=torch.int32))),
        ("cu first", lambda: c.append([a, b], packed, packed, torch.tensor([1, 1, 2], dtype=torch.int32))),
        ("cu entries", lambda: c.append([a], packed, packed, cu)),
        ("dead slot", lambda: c.append([3], k1, v1)),
        ("slot twice", lambda: c.append([a, a], k2, v2)),
        ("row overflow", lambda: c.append([b], *_tokens(5))),
        ("pool exhausted", lambda: c.append([a, f], *[torch.randn(2, 8, HKV, D, dtype=torch.float16)] * 2)),
        ("reserve negative", lambda: c.reserve_tokens([a], [-1])),
        ("reserve counts", lambda: c.reserve_tokens([a, b], [1])),
        ("reserve exhausted", lambda: c.reserve_tokens([a, f], [8, 8])),
        ("advance unreserved", lambda: c.advance([a], [1])),
        ("advance negative", lambda: c.advance([a], [-2])),
        ("advance twice", lambda: c.advance([a, a], [0, 0])),
        ("advance counts", lambda: c.advance([a, b], [0])),
        ("reorder parents", lambda: c.reorder_beams([a, f], [0, 2])),
        ("reorder slots twice", lambda: c.reorder_beams([a, a], [0, 0])),
        ("reorder dead slot", lambda: c.reorder_beams([a, 3], [0, 0])),
        ("release dead slot", lambda: c.release(3)),
        ("fork dead slot", lambda: c.fork(3)),
        ("blocks_of dead slot", lambda: c.blocks_of(3)),
    ]


def test_paged_rejected_calls_change_nothing():
    c, slots = _paged()
    calls = _malformed_paged(c, slots)
    for name, call in calls:
        before = _snapshot(c)
        with pytest.raises(REJECTED, match=None) as info:
            call()
        print(f"{name}: {info.type.__name__}: {info.value}")
        after = _snapshot(c)
        _assert_same(before[0], after[0], name)
        _assert_same(before[1], after[1], name)
        # nothing was written at all, free blocks included
        assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3]), f"{name}: pool bytes changed"
    print(f"{len(calls)} malformed calls on a paged cache, each rejected with nothing changed")


def test_fast_append_rejects_before_reserving():
    # finding 2 as reported: the Triton append rejected k_new of the wrong dtype after blocks were reserved
    c = PagedKVCache(num_blocks=4, block_size=BS, num_heads_kv=HKV, head_dim=D, max_seqs=2, max_blocks_per_seq=4)
    s = c.add_sequence()
    before = _snapshot(c)
    for k_new in (torch.randn(1, 6, HKV, D), torch.randn(1, 6, HKV + 1, D, dtype=torch.float16)):
        with pytest.raises(REJECTED):
            c.append([s], k_new, k_new, impl=fast.append_kv)
        after = _snapshot(c)
        _assert_same(before[0], after[0], "fast append")
        assert torch.equal(before[2], after[2])
    assert c.allocator.num_free == 4 and c.length(s) == 0


def test_contiguous_rejected_calls_change_nothing():
    c, (a, b) = _contiguous()
    k1, v1 = _tokens(1)
    calls = [
        ("k_new dtype", lambda: c.append([a], k1.float(), v1.float())),
        ("k_new heads", lambda: c.append([a], torch.randn(1, 1, HKV + 1, D, dtype=torch.float16), v1)),
        ("overflow", lambda: c.append([b], *_tokens(4))),
        ("dead slot", lambda: c.append([2], k1, v1)),
        ("reserve overflow", lambda: c.reserve_tokens([a, b], [1, 4])),
        ("advance overflow", lambda: c.advance([b], [4])),
        ("advance negative", lambda: c.advance([a], [-1])),
        ("release dead", lambda: c.release(2)),
    ]
    for name, call in calls:
        before = _snapshot(c)
        with pytest.raises(REJECTED):
            call()
        after = _snapshot(c)
        _assert_same(before[0], after[0], name)
        assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3]), f"{name}: bytes changed"


class Injected(RuntimeError):
    pass


def _failing_at(step, monkeypatch, c):
    """Makes step ``step`` of an append raise: the allocator's allocate / free, the block copy, the table
    write, or the append itself (before or after it wrote every position it was given)."""
    if step in ("allocate", "free"):
        real = getattr(c.allocator, step)
        calls = {"n": 0}

        def fail_second(*a, **k):
            # the first allocate succeeds, so that there is something to roll back (free comes after one)
            calls["n"] += 1
            if calls["n"] > (1 if step == "allocate" else 0):
                raise Injected(step)
            return real(*a, **k)

        monkeypatch.setattr(c.allocator, step, fail_second)
        return reference.append_kv
    if step == "copy":

        def fail_copy(src, dst):
            raise Injected(step)

        monkeypatch.setattr(c, "_copy_blocks", fail_copy)
        return reference.append_kv
    if step == "append-before":

        def fail(*a, **k):
            raise Injected(step)

        return fail

    def write_then_fail(*a, **k):
        reference.append_kv(*a, **k)
        raise Injected(step)

    return write_then_fail


STEPS = ["allocate", "free", "copy", "append-before", "append-after"]


@pytest.mark.parametrize("step", STEPS)
def test_paged_failure_at_each_step_rolls_back(step, monkeypatch):
    # a batch append that copies f's shared block, grows a and b by one block each: every step has work
    c = PagedKVCache(num_blocks=16, block_size=BS, num_heads_kv=HKV, head_dim=D, max_seqs=4, max_blocks_per_seq=4)
    a, b = c.add_sequence(), c.add_sequence()
    c.append([a], *_tokens(6), impl=reference.append_kv)
    c.append([b], *_tokens(4), impl=reference.append_kv)
    f = c.fork(a)
    before = _snapshot(c)
    impl = _failing_at(step, monkeypatch, c)
    k3 = torch.randn(3, 3, HKV, D, dtype=torch.float16)
    with pytest.raises(Injected):
        c.append([f, a, b], k3, k3.clone(), impl=impl)
    monkeypatch.undo()
    after = _snapshot(c)
    _assert_same(before[0], after[0], step)
    _assert_same(before[1], after[1], step)
    # and the cache works on: the same append now succeeds and lands as if nothing had happened
    c.append([f, a, b], k3, k3.clone(), impl=reference.append_kv)
    assert [c.length(s) for s in (f, a, b)] == [9, 9, 7]
    for s in (f, a, b):
        row = c.blocks_of(s)
        got = torch.stack([c.k[row[t // BS], t % BS] for t in range(c.length(s) - 3, c.length(s))])
        assert torch.equal(got, k3[[f, a, b].index(s)])


@pytest.mark.parametrize("step", ["allocate", "free", "copy"])
def test_paged_reserve_tokens_rolls_back(step, monkeypatch):
    c = PagedKVCache(num_blocks=16, block_size=BS, num_heads_kv=HKV, head_dim=D, max_seqs=4, max_blocks_per_seq=4)
    a = c.add_sequence()
    c.append([a], *_tokens(6), impl=reference.append_kv)
    f = c.fork(a)
    before = _snapshot(c)
    _failing_at(step, monkeypatch, c)
    with pytest.raises(Injected):
        c.reserve_tokens([f, a], [3, 5])
    monkeypatch.undo()
    after = _snapshot(c)
    _assert_same(before[0], after[0], step)
    _assert_same(before[1], after[1], step)


def test_contiguous_failure_in_append_rolls_back():
    c, (a, b) = _contiguous()
    before = _snapshot(c)

    def write_then_fail(*a_, **k):
        reference.append_kv(*a_, **k)
        raise Injected("append")

    with pytest.raises(Injected):
        c.append([a, b], *[torch.randn(2, 2, HKV, D, dtype=torch.float16)] * 2, impl=write_then_fail)
    after = _snapshot(c)
    _assert_same(before[0], after[0], "contiguous")
    _assert_same(before[1], after[1], "contiguous")
