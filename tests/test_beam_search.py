"""Beam search over KV caches: the indirection update (reference vs Triton), vLLM-style block sharing with
copy-on-write in `attn.kv_cache.PagedKVCache`, and a short beam-search loop run three ways that must agree.

Most comparisons here are exact: the indirection update and the block copies are pure copies, and the three
ways of running the loop present the decode kernel with the same keys in the same order.
"""

from __future__ import annotations

import functools

import pytest
import torch

import attn
import attn.fast as fast
import attn.reference as reference
from attn.fast._triton import autotune_enabled
from attn.kv_cache import BlockAllocator, PagedKVCache, PoolExhaustedError
from helpers import TOL, assert_close, dtype_id

# (the fast update checks parent and step values only when validated; tests/test_no_sync.py covers the default)
IMPLS = {"reference": reference.update_indirection, "fast": functools.partial(fast.update_indirection, validate=True)}


# ---- the indirection update ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "b,beam,max_len", [(1, 1, 1), (2, 3, 40), (3, 4, 1500), (1, 8, 17)], ids=lambda x: str(x)
)  # 1500 > 1024: several programs along the time axis
@pytest.mark.parametrize("per_request", [False, True], ids=["step-int", "step-per-request"])
def test_update_indirection_parity(b, beam, max_len, per_request, device):
    old = torch.randint(0, beam, (b, beam, max_len), dtype=torch.int32, device=device)
    parents = torch.randint(0, beam, (b, beam), dtype=torch.int32, device=device)
    if per_request:
        step = torch.randint(0, max_len, (b,), dtype=torch.int32, device=device)
        steps = step.tolist()
    else:
        step = max_len // 2
        steps = [step] * b
    before = old.clone()
    expect = reference.update_indirection(old, parents, step)
    # -1 is never a valid entry: any position the kernel failed to write shows up
    out = torch.full_like(old, -1)
    got = fast.update_indirection(old, parents, step, out=out)
    assert got is out and torch.equal(out, expect)
    assert torch.equal(old, before)  # out of place: the source table is untouched
    # and the reference is the definition: the parent's history, then the beam's own row at `step`
    for bi in range(b):
        for j in range(beam):
            p, s = int(parents[bi, j]), steps[bi]
            assert torch.equal(expect[bi, j, :s], old[bi, p, :s])
            assert int(expect[bi, j, s]) == j
            assert torch.equal(expect[bi, j, s + 1 :], old[bi, p, s + 1 :])


@pytest.mark.parametrize("impl", IMPLS)
def test_update_indirection_strided(impl, device):
    # non-contiguous table views (a slice of a wider buffer) are read and written through their strides
    wide = torch.randint(0, 3, (2, 3, 50), dtype=torch.int32, device=device)
    old = wide[:, :, 5:45]
    parents = torch.tensor([[2, 2, 0], [1, 0, 1]], dtype=torch.int32, device=device)
    out_wide = torch.full_like(wide, -7)
    out = out_wide[:, :, 10:50]
    IMPLS[impl](old, parents, 7, out=out)
    assert torch.equal(out, reference.update_indirection(old.contiguous(), parents, 7))
    assert (out_wide[:, :, :10] == -7).all()  # nothing outside the view was written


@pytest.mark.parametrize("impl", IMPLS)
def test_update_indirection_bad_input(impl, device):
    ind = torch.randint(0, 3, (2, 3, 10), dtype=torch.int32, device=device)
    parents = torch.randint(0, 3, (2, 3), dtype=torch.int32, device=device)
    out = torch.full_like(ind, -1)
    before = ind.clone()
    fn = IMPLS[impl]
    bad = parents.clone()
    bad[1, 2] = 3
    with pytest.raises(ValueError, match=r"parents must lie in \[0, beam_width\) = \[0, 3\), got parents\[1, 2\] = 3"):
        fn(ind, bad, 4, out=out)
    with pytest.raises(ValueError, match=r"parents must lie in \[0, beam_width\)"):
        fn(ind, parents - 1 - parents, 4, out=out)  # all -1
    with pytest.raises(TypeError, match="parents must be an int32"):
        fn(ind, parents.long(), 4, out=out)
    with pytest.raises(TypeError, match="cache_indirection must be an int32"):
        fn(ind.long(), parents, 4)
    with pytest.raises(ValueError, match=r"parents must be \[B, beam_width\] = \(2, 3\)"):
        fn(ind, parents[:, :2], 4, out=out)
    with pytest.raises(ValueError, match=r"cache_indirection must be \[B, beam_width, max_len\]"):
        fn(ind[0], parents, 4)
    with pytest.raises(ValueError, match=r"step must lie in \[0, max_len\) = \[0, 10\), got 10"):
        fn(ind, parents, 10, out=out)
    with pytest.raises(ValueError, match=r"step must lie in \[0, max_len\)"):
        fn(ind, parents, -1, out=out)
    with pytest.raises(ValueError, match=r"got step\[1\] = 12"):
        fn(ind, parents, torch.tensor([3, 12], dtype=torch.int32, device=device), out=out)
    with pytest.raises(TypeError, match="step must be an int or an int32 tensor"):
        fn(ind, parents, 2.0, out=out)
    with pytest.raises(TypeError, match="step must be an int or an int32 tensor"):
        fn(ind, parents, torch.tensor([3, 4], device=device), out=out)
    with pytest.raises(ValueError, match=r"step as a tensor must be \[B\]"):
        fn(ind, parents, torch.tensor([3], dtype=torch.int32, device=device), out=out)
    with pytest.raises(ValueError, match="out must not share memory with cache_indirection"):
        fn(ind, parents, 4, out=ind)
    with pytest.raises(ValueError, match="out must not share memory"):
        fn(ind, parents, 4, out=ind.view(2, 3, 10))
    with pytest.raises(ValueError, match="out must match cache_indirection"):
        fn(ind, parents, 4, out=out[:, :, :9])
    with pytest.raises(TypeError, match="out must be an int32"):
        fn(ind, parents, 4, out=out.long())
    assert torch.equal(ind, before) and (out == -1).all()


def test_update_indirection_unchecked_parent_stays_inside(device):
    # with validate=False the kernel still reads only inside the table: a bad parent's row becomes -1
    ind = torch.randint(0, 3, (2, 3, 10), dtype=torch.int32, device=device)
    parents = torch.tensor([[0, 7, 2], [-4, 1, 1]], dtype=torch.int32, device=device)
    out = fast.update_indirection(ind, parents, 4, validate=False)
    expect = reference.update_indirection(ind, parents.clamp(0, 2), 4)
    for b, j in ((0, 0), (0, 2), (1, 1), (1, 2)):
        assert torch.equal(out[b, j], expect[b, j])
    for b, j in ((0, 1), (1, 0)):
        assert (out[b, j, :4] == -1).all() and int(out[b, j, 4]) == j and (out[b, j, 5:] == -1).all()
    # and the violation is recorded for attn.check_errors (which clears it)
    with pytest.raises(ValueError, match="update_indirection got a parent outside"):
        attn.check_errors()


# ---- the block allocator and the paged cache's sharing ---------------------------------------------------------


def _paged(device, num_blocks=16, block_size=4, max_seqs=6, max_blocks_per_seq=6, dtype=torch.float32):
    return PagedKVCache(
        num_blocks=num_blocks, block_size=block_size, num_heads_kv=2, head_dim=8, max_seqs=max_seqs,
        max_blocks_per_seq=max_blocks_per_seq, dtype=dtype, device=device,
    )  # fmt: skip


def _tokens(n, device, dtype=torch.float32):
    k = torch.randn(1, n, 2, 8, device=device, dtype=dtype)
    return k, torch.randn_like(k)


def _state(cache):
    """Everything a rejected call must leave as it was."""
    refs = [cache.allocator.ref_count(b) for b in range(cache.allocator.num_blocks)]
    blocks = {s: cache.blocks_of(s) for s in cache.live}
    return (cache.k.clone(), cache.v.clone(), cache.block_table.clone(), cache.seqlens.clone(), refs, blocks,
            cache.allocator.num_free, cache.num_block_copies)  # fmt: skip


def _assert_same_state(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def _check_books(cache):
    """The allocator's counts agree with the block lists: each block's owners are the sequences listing it."""
    listed: dict[int, int] = {}
    for s in cache.live:
        for blk in cache.blocks_of(s):
            listed[blk] = listed.get(blk, 0) + 1
    for blk in range(cache.allocator.num_blocks):
        assert cache.allocator.ref_count(blk) == listed.get(blk, 0), f"block {blk}"
    assert cache.allocator.num_used == len(listed)
    assert cache.allocator.num_free + cache.allocator.num_used == cache.allocator.num_blocks


def test_block_allocator_ref_counts():
    alloc = BlockAllocator(4)
    a = alloc.allocate(2)
    alloc.share(a)
    alloc.share(a[:1])
    assert [alloc.ref_count(x) for x in a] == [3, 2] and alloc.num_used == 2 and alloc.num_free == 2
    assert alloc.free(a) == []  # shared: nothing goes back yet
    assert alloc.free(a) == [a[1]] and alloc.num_free == 3
    with pytest.raises(ValueError, match="double free"):
        alloc.free([a[0], a[0]])  # one owner left, two releases asked: rejected whole
    assert alloc.ref_count(a[0]) == 1
    with pytest.raises(ValueError, match="not allocated"):
        alloc.share([a[1]])
    assert alloc.free([a[0]]) == [a[0]] and alloc.num_free == 4
    with pytest.raises(ValueError, match="double free"):
        alloc.free([a[0]])


@pytest.mark.parametrize("prompt", [6, 8], ids=["partial-last-block", "full-last-block"])
def test_fork_shares_and_copies_only_partial_blocks(prompt, device):
    cache = _paged(device)
    parent = cache.add_sequence()
    cache.append([parent], *_tokens(prompt, device))
    blocks = cache.blocks_of(parent)
    children = [cache.fork(parent) for _ in range(2)]
    # forking copies nothing: three owners per block, no block taken
    assert all(cache.blocks_of(c) == blocks for c in children)
    assert [cache.allocator.ref_count(b) for b in blocks] == [3, 3]
    assert cache.allocator.num_free == 16 - 2 and cache.num_block_copies == 0
    assert [cache.length(c) for c in children] == [prompt, prompt]
    # one decode step for all three
    cache.append([parent, *children], *(x.expand(3, 1, 2, 8).contiguous() for x in _tokens(1, device)))
    if prompt == 6:
        # the partly filled block 1 is written by all three: two take copies, the last keeps the original
        assert cache.num_block_copies == 2 and cache.allocator.num_free == 16 - 4
        assert cache.allocator.ref_count(blocks[0]) == 3  # the full block stays shared, never copied
        assert len({cache.blocks_of(s)[1] for s in (parent, *children)}) == 3
    else:
        # the history ends on a block boundary: every beam takes a fresh block, nothing is copied
        assert cache.num_block_copies == 0 and cache.allocator.num_free == 16 - 5
        assert [cache.allocator.ref_count(b) for b in blocks] == [3, 3]
    _check_books(cache)
    for s in (parent, *children):
        cache.release(s)
    assert cache.allocator.num_free == 16 and cache.allocator.num_used == 0  # no leak


def test_copy_on_write_isolation(device):
    cache = _paged(device)
    parent = cache.add_sequence()
    k, v = _tokens(7, device)
    cache.append([parent], k, v)
    child = cache.fork(parent)
    pool_k, pool_v, table = cache.k.clone(), cache.v.clone(), cache.block_table[parent].clone()
    k2, v2 = _tokens(3, device)
    cache.append([child], k2, v2)  # writes positions 7..9: block 1 (shared, partial) is copied, block 2 is new
    assert cache.num_block_copies == 1
    # the parent's table and every byte of its blocks are unchanged
    assert torch.equal(cache.block_table[parent], table)
    for blk in cache.blocks_of(parent):
        assert torch.equal(cache.k[blk], pool_k[blk]) and torch.equal(cache.v[blk], pool_v[blk])
    # the child sees the shared history, then its own tokens
    got = reference.gather_kv(cache.k, 10, child, cache.block_table)
    assert torch.equal(got, torch.cat([k[0], k2[0]]))
    assert torch.equal(reference.gather_kv(cache.k, 7, parent, cache.block_table), k[0])
    # the parent now writes in place: it is the block's only owner
    cache.append([parent], *_tokens(1, device))
    assert cache.num_block_copies == 1
    _check_books(cache)


def test_reserve_tokens_and_advance_copy_on_write(device):
    # the reserve_tokens / advance pair (attn.gpt_attention's callers) copies a shared partial block too
    cache = _paged(device)
    parent = cache.add_sequence()
    k, v = _tokens(5, device)
    cache.append([parent], k, v)
    child = cache.fork(parent)
    cache.reserve_tokens([child], [2])
    assert cache.num_block_copies == 1 and cache.blocks_of(child)[1] != cache.blocks_of(parent)[1]
    k2, v2 = _tokens(2, device)
    seqlens, table = cache.metadata([child])
    fast.append_kv(cache.k, cache.v, k2, v2, seqlens, block_table=table)
    cache.advance([child], [2])
    assert torch.equal(reference.gather_kv(cache.k, 7, child, cache.block_table), torch.cat([k[0], k2[0]]))
    assert torch.equal(reference.gather_kv(cache.k, 5, parent, cache.block_table), k[0])
    _check_books(cache)


def test_reorder_beams_frees_dropped_tails(device):
    cache = _paged(device, num_blocks=32)
    root = cache.add_sequence()
    cache.append([root], *_tokens(8, device))  # two full blocks, shared by every beam from here on
    beams = [root, cache.fork(root), cache.fork(root)]
    for _ in range(5):  # five tokens each: every beam owns blocks 2 (full) and 3 (1 token)
        cache.append(beams, *(x.expand(3, 1, 2, 8).contiguous() for x in _tokens(1, device)))
    assert cache.allocator.num_used == 2 + 3 * 2
    tails = {s: cache.blocks_of(s)[2:] for s in beams}
    # beams 0 and 1 both continue old beam 2; old beams 0 and 1 are dropped, their private tails freed
    cache.reorder_beams(beams, [2, 2, 0])
    assert cache.allocator.num_used == 2 + 2 * 2
    assert all(cache.allocator.ref_count(b) == 0 for b in tails[beams[1]])
    assert cache.blocks_of(beams[0]) == cache.blocks_of(beams[1]) == cache.blocks_of(root)[:2] + tails[beams[2]]
    assert [cache.allocator.ref_count(b) for b in tails[beams[2]]] == [2, 2]
    assert cache.blocks_of(beams[2])[2:] == tails[beams[0]]
    assert [cache.length(s) for s in beams] == [13, 13, 13]
    _check_books(cache)
    # the identity reorder changes nothing
    snap = _state(cache)
    cache.reorder_beams(beams, torch.tensor([0, 1, 2]))
    _assert_same_state(snap, _state(cache))
    for s in beams:
        cache.release(s)
    assert cache.allocator.num_free == 32


def test_rejected_sharing_calls_leave_cache_untouched(device):
    cache = _paged(device, num_blocks=5, max_seqs=3)
    root = cache.add_sequence()
    cache.append([root], *_tokens(7, device))  # 2 blocks, the second partial
    beams = [root, cache.fork(root), cache.fork(root)]
    snap = _state(cache)
    with pytest.raises(PoolExhaustedError, match="all 3 sequence slots"):
        cache.fork(root)
    # 9 more tokens each: 2 copies of the shared partial block + 2 new blocks per beam = 8 > 3 free
    k, v = _tokens(9, device)
    with pytest.raises(PoolExhaustedError, match="needs 8 new blocks, 3 are free"):
        cache.append(beams, k.expand(3, 9, 2, 8), v.expand(3, 9, 2, 8))
    with pytest.raises(PoolExhaustedError, match="needs 8 new blocks"):
        cache.reserve_tokens(beams, [9, 9, 9])
    with pytest.raises(ValueError, match=r"parents must be ints in \[0, len\(slots\)\) = \[0, 3\), got \[3\]"):
        cache.reorder_beams(beams, [0, 3, 1])
    with pytest.raises(ValueError, match="parents must have one entry per slot"):
        cache.reorder_beams(beams, [0, 1])
    with pytest.raises(ValueError, match="slots must be distinct"):
        cache.reorder_beams([root, root], [0, 1])
    with pytest.raises(ValueError, match="slots must be distinct"):
        cache.reserve_tokens([root, root], [1, 1])
    with pytest.raises(ValueError, match="not in use"):
        cache.reorder_beams([root, 5], [0, 0])
    with pytest.raises(ValueError, match="not in use"):
        cache.fork(5)
    _assert_same_state(snap, _state(cache))
    # what fits does go through: one token each needs the 2 copies only
    one = _tokens(1, device)
    cache.append(beams, *(x.expand(3, 1, 2, 8).contiguous() for x in one))
    assert cache.num_block_copies == 2 and cache.allocator.num_free == 1
    _check_books(cache)


def test_copy_on_write_copies_extra_pools(device):
    # a model with one table for all layers registers the other layers' pools; their blocks are copied too
    cache = _paged(device)
    other = (torch.randn_like(cache.k), torch.randn_like(cache.v))
    cache.extra_pools.append(other)
    root = cache.add_sequence()
    cache.append([root], *_tokens(3, device))
    child = cache.fork(root)
    cache.reserve_tokens([child], [1])
    src, dst = cache.blocks_of(root)[0], cache.blocks_of(child)[0]
    assert src != dst
    for pool in (cache.k, cache.v, *other):
        assert torch.equal(pool[dst], pool[src])


# ---- one beam search, three ways -------------------------------------------------------------------------------


def _beam_search(device, dtype, *, batch, beam, steps, hq, hkv, d, prompt_lens, block_size, exact=True):
    """Runs the same random beam search (random K/V, queries and parents) three ways, checking each step.

    (a) TensorRT-LLM: one contiguous row per beam, the prompt only in beam 0's row, ``cache_indirection`` kept
        up to date by `update_indirection` (two tables, swapped);
    (b) vLLM: a paged cache, beams forked from the prompt's sequence, `reorder_beams` after every step and
        copy-on-write in `append`;
    (c) naive: every beam's whole history physically copied at every step.

    With ``exact`` the three outputs must be equal bit for bit: the kernel sees the same keys in the same order
    and tiles. Without it (autotuning may give the paged and the contiguous launch different tiles, hence a
    different summation order) each is held to the reference's tolerance; the cache contents stay exact.
    """
    rows = batch * beam
    max_len = max(prompt_lens) + steps
    prompts_k = [torch.randn(n, hkv, d, device=device, dtype=dtype) for n in prompt_lens]
    prompts_v = [torch.randn_like(x) for x in prompts_k]

    # (a)
    k_a = torch.zeros(rows, max_len, hkv, d, device=device, dtype=dtype)
    v_a = torch.zeros_like(k_a)
    for b, n in enumerate(prompt_lens):
        k_a[b * beam, :n], v_a[b * beam, :n] = prompts_k[b], prompts_v[b]
    # all zeros: every beam reads the prompt from beam 0's row
    ind = torch.zeros(batch, beam, max_len, dtype=torch.int32, device=device)
    spare = torch.empty_like(ind)

    # (b)
    blocks_per_seq = -(-max_len // block_size)
    cache = PagedKVCache(
        num_blocks=rows * blocks_per_seq, block_size=block_size, num_heads_kv=hkv, head_dim=d, max_seqs=rows,
        max_blocks_per_seq=blocks_per_seq, dtype=dtype, device=device,
    )  # fmt: skip
    beams = []
    for b in range(batch):
        root = cache.add_sequence()
        cache.append([root], prompts_k[b][None], prompts_v[b][None])
        beams.append([root] + [cache.fork(root) for _ in range(beam - 1)])
    slots = [s for request in beams for s in request]

    # (c)
    hist_k = [prompts_k[r // beam].clone() for r in range(rows)]
    hist_v = [prompts_v[r // beam].clone() for r in range(rows)]

    expected_copies = 0
    for i in range(steps):
        lens = [n + i for n in prompt_lens]
        lens_rows = torch.tensor([n for n in lens for _ in range(beam)], dtype=torch.int32, device=device)
        parents = torch.randint(0, beam, (batch, beam), dtype=torch.int32, device=device)
        k_new = torch.randn(rows, 1, hkv, d, device=device, dtype=dtype)
        v_new = torch.randn_like(k_new)
        q = torch.randn(rows, 1, hq, d, device=device, dtype=dtype)

        # (a) the table is reordered; the new token goes into each beam's own row at position `step`
        steps_t = torch.tensor(lens, dtype=torch.int32, device=device)
        ind, spare = fast.update_indirection(ind, parents, steps_t, out=spare), ind
        fast.append_kv(k_a, v_a, k_new, v_new, lens_rows)
        out_a = fast.decode(q, k_a, v_a, lens_rows + 1, cache_indirection=ind)

        # (b) the block lists are reordered; appending copies shared partly filled blocks
        for b in range(batch):
            cache.reorder_beams(beams[b], parents[b])
            if lens[b] % block_size:
                # after the fork every beam shares the last block; later, beams with the same parent do
                distinct = 1 if i == 0 else len(set(parents[b].tolist()))
                expected_copies += beam - distinct
        cache.append(slots, k_new, v_new)
        seqlens, table = cache.metadata(slots)
        out_b = fast.decode(q, cache.k, cache.v, seqlens, block_table=table)

        # (c) copy each new beam's whole history from its parent, then add the new token
        src = [r // beam * beam + int(parents[r // beam, r % beam]) for r in range(rows)]
        hist_k = [torch.cat([hist_k[src[r]], k_new[r]]) for r in range(rows)]
        hist_v = [torch.cat([hist_v[src[r]], v_new[r]]) for r in range(rows)]
        k_c = torch.zeros_like(k_a)
        v_c = torch.zeros_like(v_a)
        for r in range(rows):
            k_c[r, : len(hist_k[r])], v_c[r, : len(hist_v[r])] = hist_k[r], hist_v[r]
        out_c = fast.decode(q, k_c, v_c, lens_rows + 1)

        # and the kernel against the float64 definition, at the usual decode tolerance (tests/helpers.py: the
        # rounding of P and of the output to the input dtype)
        ref = reference.decode(q.double(), k_c.double(), v_c.double(), lens_rows + 1)
        assert_close(f"step {i} copied", ref, out_c, TOL[dtype])
        if exact:
            # the same keys and values in the same order, through the same kernel: the same bits
            assert torch.equal(out_a, out_c), f"step {i}: indirection != copied histories"
            assert torch.equal(out_b, out_c), f"step {i}: shared blocks != copied histories"
        else:
            assert_close(f"step {i} indirection", ref, out_a, TOL[dtype])
            assert_close(f"step {i} shared blocks", ref, out_b, TOL[dtype])
        assert cache.num_block_copies == expected_copies, f"step {i}: copies"
        _check_books(cache)

    # what each way holds at the end is each beam's history, bit for bit
    final = lens_rows + 1
    for r, s in enumerate(slots):
        n = int(final[r])
        assert torch.equal(reference.gather_kv(cache.k, n, s, cache.block_table), hist_k[r])
        assert torch.equal(reference.gather_kv(cache.v, n, s, cache.block_table), hist_v[r])
        src = r // beam * beam + ind[r // beam, r % beam, :n].long()
        assert torch.equal(k_a[src, torch.arange(n, device=device)], hist_k[r])
        assert torch.equal(v_a[src, torch.arange(n, device=device)], hist_v[r])
    # the reference decode reads through the same table to the same answer
    q = torch.randn(rows, 1, hq, d, device=device, dtype=dtype)
    through_table = reference.decode(q.double(), k_a.double(), v_a.double(), final, cache_indirection=ind)
    copied = reference.decode(q.double(), k_c.double(), v_c.double(), final)
    assert torch.equal(through_table, copied)
    # no leak: releasing every beam returns every block
    for s in slots:
        cache.release(s)
    assert cache.allocator.num_free == cache.allocator.num_blocks


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=dtype_id)
def test_beam_search_three_ways(dtype, device):
    # exact under the interpreter and with ATTN_AUTOTUNE=0: one tile config for every launch
    _beam_search(device, dtype, batch=2, beam=3, steps=12, hq=4, hkv=2, d=32, prompt_lens=[5, 9], block_size=4,
                 exact=not autotune_enabled())  # fmt: skip


@pytest.mark.gpu
def test_gpu_beam_search_three_ways():
    # bf16 arithmetic for real; bit-exact agreement only with one fixed tile config (ATTN_AUTOTUNE=0)
    _beam_search("cuda", torch.bfloat16, batch=4, beam=4, steps=40, hq=8, hkv=2, d=128,
                 prompt_lens=[37, 100, 5, 64], block_size=16, exact=not autotune_enabled())  # fmt: skip
