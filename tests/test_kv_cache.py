"""Appending to KV caches (reference and Triton), the block allocator, the cache objects and the converters.

Appends are exact copies, so every comparison here is exact: no tolerance to tune.
"""

from __future__ import annotations

import functools

import pytest
import torch

import attn.fast as fast
import attn.reference as reference
from attn.kv_cache import (
    BlockAllocator,
    ContiguousKVCache,
    PagedKVCache,
    PoolExhaustedError,
    to_flashinfer,
    to_trtllm,
)
from attn.layout import cu_seqlens_from_lengths
from helpers import TOL, assert_close

# the fast append checks values only when validated (tests/test_no_sync.py covers the default call)
IMPLS = {"reference": reference.append_kv, "fast": functools.partial(fast.append_kv, validate=True)}


def _paged_pool(num_blocks, block_size, hkv, d, dtype, device):
    k = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    return k, torch.randn_like(k)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded-new", "packed-new"])
def test_append_matches_reference(impl, paged, packed, device):
    b, hkv, d, block_size = 3, 2, 40, 5
    starts = torch.tensor([0, 7, 13], dtype=torch.int32, device=device)
    counts = [4, 0, 6] if packed else [3, 3, 3]
    if paged:
        k_cache, v_cache = _paged_pool(16, block_size, hkv, d, torch.float16, device)
        table = torch.randperm(16, device=device)[:12].view(b, 4).to(torch.int32)
    else:
        k_cache = torch.randn(b, 20, hkv, d, dtype=torch.float16, device=device)
        v_cache, table = torch.randn_like(k_cache), None
    if packed:
        cu = cu_seqlens_from_lengths(torch.tensor(counts, device=device))
        k_new = torch.randn(sum(counts), hkv, d, dtype=torch.float16, device=device)
    else:
        cu = None
        k_new = torch.randn(b, 3, hkv, d, dtype=torch.float16, device=device)
    v_new = torch.randn_like(k_new)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    reference.append_kv(expect_k, expect_v, k_new, v_new, starts, cu_seqlens_new=cu, block_table=table)
    IMPLS[impl](k_cache, v_cache, k_new, v_new, starts, cu_seqlens_new=cu, block_table=table)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)
    # and the reference wrote what the layout says: token i of sequence b at its slot
    for bi in range(b):
        for i in range(counts[bi]):
            row, slot = reference.slot_of(int(starts[bi]) + i, bi, block_size, table)
            src = (int(cu[bi]) + i) if packed else (bi, i)
            assert torch.equal(expect_k[row, slot], k_new[src])


@pytest.mark.parametrize("impl", IMPLS)
def test_rejected_append_leaves_cache_untouched(impl, device):
    k_cache, v_cache = _paged_pool(6, 4, 2, 16, torch.float32, device)
    table = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32, device=device)  # 9 is outside the pool
    before = k_cache.clone()
    k_new = torch.randn(2, 3, 2, 16, device=device)
    starts = torch.tensor([1, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="block_table\\[1\\] points outside the pool"):
        IMPLS[impl](k_cache, v_cache, k_new, k_new, starts, block_table=table)
    with pytest.raises(ValueError, match="over the cache capacity 8"):
        IMPLS[impl](k_cache, v_cache, k_new, k_new, starts + 5, block_table=table)
    with pytest.raises(TypeError, match="v_new must have k_new's dtype"):
        IMPLS[impl](k_cache, v_cache, k_new, k_new.half(), starts, block_table=table[:, :1])
    assert torch.equal(k_cache, before)


def test_block_allocator():
    alloc = BlockAllocator(4)
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.num_free == 1
    with pytest.raises(PoolExhaustedError, match="need 2 blocks but only 1 of 4"):
        alloc.allocate(2)
    assert alloc.num_free == 1  # a failed request takes nothing
    alloc.free(a[:2])
    with pytest.raises(ValueError, match="double free"):
        alloc.free(a[:1])
    assert alloc.allocate(1) == [a[0]]  # the last freed block is reused first


def test_paged_cache_grows_and_frees(device):
    cache = PagedKVCache(
        num_blocks=6, block_size=4, num_heads_kv=2, head_dim=16, max_seqs=3, max_blocks_per_seq=4,
        dtype=torch.float32, device=device,
    )  # fmt: skip
    s0, s1 = cache.add_sequence(), cache.add_sequence()
    k5 = torch.randn(1, 5, 2, 16, device=device)
    cache.append([s0], k5, k5 * 2)  # 5 tokens: 2 blocks
    cache.append([s1], k5[:, :3], k5[:, :3])  # 3 tokens: 1 block
    assert len(cache.blocks_of(s0)) == 2 and len(cache.blocks_of(s1)) == 1 and cache.allocator.num_free == 3
    one = torch.randn(2, 1, 2, 16, device=device)
    cache.append([s0, s1], one, one)  # decode step for both: s0 stays in block 2, s1 stays in block 1
    assert cache.length(s0) == 6 and cache.length(s1) == 4 and cache.allocator.num_free == 3
    # what the cache holds is what was appended, in order
    seqlens, table = cache.metadata([s0])
    keys = reference.gather_kv(cache.k, 6, 0, table)
    assert torch.equal(keys, torch.cat([k5[0], one[0]]))
    eleven = torch.randn(1, 11, 2, 16, device=device)
    with pytest.raises(ValueError, match="outgrow their block-table rows of 4"):
        cache.append([s0], eleven, eleven)  # 17 tokens would need 5 blocks
    s2 = cache.add_sequence()
    sixteen = torch.randn(1, 16, 2, 16, device=device)
    with pytest.raises(PoolExhaustedError, match="needs 4 new blocks, 3 are free"):
        cache.append([s2], sixteen, sixteen)
    assert cache.length(s2) == 0 and cache.allocator.num_free == 3  # the failed append reserved nothing
    cache.release(s0)
    assert cache.allocator.num_free == 5
    with pytest.raises(ValueError, match="not in use"):
        cache.append([s0], one[:1], one[:1])


def test_caches_feed_decode(device):
    # decode over the cache objects equals decode over plain tensors holding the same tokens
    hq, hkv, d = 4, 2, 32
    paged = PagedKVCache(
        num_blocks=32, block_size=8, num_heads_kv=hkv, head_dim=d, max_seqs=4, max_blocks_per_seq=8,
        dtype=torch.float32, device=device,
    )  # fmt: skip
    contiguous = ContiguousKVCache(max_seqs=4, max_len=64, num_heads_kv=hkv, head_dim=d, dtype=torch.float32,
                                   device=device)  # fmt: skip
    lens = [21, 9, 40]
    ks = [torch.randn(n, hkv, d, device=device) for n in lens]
    vs = [torch.randn(n, hkv, d, device=device) for n in lens]
    slots_p = [paged.add_sequence() for _ in lens]
    slots_c = [contiguous.add_sequence() for _ in lens]
    cu = cu_seqlens_from_lengths(torch.tensor(lens, device=device))
    paged.append(slots_p, torch.cat(ks), torch.cat(vs), cu)
    contiguous.append(slots_c, torch.cat(ks), torch.cat(vs), cu)
    q = torch.randn(3, 1, hq, d, device=device)
    seqlens, table = paged.metadata(slots_p)
    out_paged = fast.decode(q, paged.k, paged.v, seqlens, block_table=table)
    seqlens_c, table_c = contiguous.metadata(slots_c)
    out_contig = fast.decode(q, contiguous.k, contiguous.v, seqlens_c, block_table=table_c)
    for b in range(len(lens)):
        ref = reference.attention(q[b : b + 1].double(), ks[b][None].double(), vs[b][None].double())
        assert_close("paged cache", ref, out_paged[b : b + 1], TOL[torch.float32])
        assert_close("contiguous cache", ref, out_contig[b : b + 1], TOL[torch.float32])


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_quantized_cache_objects(qdtype, device):
    # a cache built with an INT8/FP8 dtype and its scales quantizes on append (the reference's bytes), hands
    # its scales to decode, and copies shared blocks byte for byte on copy-on-write
    hq, hkv, d = 4, 2, 32
    lens = [21, 9]
    ks = [torch.randn(n, hkv, d, device=device) for n in lens]
    vs = [torch.randn(n, hkv, d, device=device) for n in lens]
    k_scale, v_scale = reference.calibrate_kv_scales(torch.cat(ks), torch.cat(vs), qdtype, "head")
    cu = cu_seqlens_from_lengths(torch.tensor(lens, device=device))
    q = torch.randn(2, 1, hq, d, device=device)
    paged = PagedKVCache(
        num_blocks=16, block_size=8, num_heads_kv=hkv, head_dim=d, max_seqs=4, max_blocks_per_seq=8, dtype=qdtype,
        device=device, k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    contiguous = ContiguousKVCache(max_seqs=2, max_len=32, num_heads_kv=hkv, head_dim=d, dtype=qdtype,
                                   device=device, k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    for cache in (paged, contiguous):
        slots = [cache.add_sequence() for _ in lens]
        cache.append(slots, torch.cat(ks), torch.cat(vs), cu)
        seqlens, table = cache.metadata(slots)
        out = fast.decode(q, cache.k, cache.v, seqlens, block_table=table, **cache.scales)
        # tight: the reference decodes the same stored codes, dequantized in float64
        ref = reference.decode(q.double(), cache.k, cache.v, seqlens, block_table=table, **cache.scales)
        assert_close(f"{type(cache).__name__} decode", ref, out, TOL[torch.float32])
        # the codes are the reference quantizer's
        first = cache.k[0, :21] if cache is contiguous else cache.k[cache.blocks_of(slots[0])].flatten(0, 1)[:21]
        want = reference.quantize(ks[0], k_scale, qdtype)
        assert torch.equal(first.view(torch.uint8), want.view(torch.uint8))
    # copy-on-write of a one-byte block: the forked sequence writes into the shared partial block
    child = paged.fork(0)
    before = paged.k.view(torch.uint8).clone()
    paged.append([child], ks[1][:1][None], vs[1][:1][None])
    assert paged.num_block_copies == 1
    assert torch.equal(paged.k.view(torch.uint8)[paged.blocks_of(0)], before[paged.blocks_of(0)])
    copied, original = paged.blocks_of(child)[-1], paged.blocks_of(0)[-1]
    assert torch.equal(paged.k.view(torch.uint8)[copied, :5], before[original, :5])


def test_quantized_cache_needs_its_scales(device):
    with pytest.raises(ValueError, match="needs k_scale"):
        PagedKVCache(num_blocks=4, block_size=8, num_heads_kv=2, head_dim=16, max_seqs=2, max_blocks_per_seq=2,
                     dtype=torch.int8, device=device)  # fmt: skip
    with pytest.raises(ValueError, match="apply to int8 or float8_e4m3fn caches"):
        ContiguousKVCache(max_seqs=2, max_len=8, num_heads_kv=2, head_dim=16, device=device,
                          k_scale=torch.ones(1, device=device), v_scale=torch.ones(1, device=device))  # fmt: skip


def test_converters(device):
    table = torch.tensor([[3, 0, 5], [1, 7, 7], [2, 4, 6]], dtype=torch.int32, device=device)
    seqlens = torch.tensor([9, 0, 12], dtype=torch.int32, device=device)
    indptr, indices, last = to_flashinfer(table, seqlens, 4)
    assert indptr.tolist() == [0, 3, 3, 6]
    assert indices.tolist() == [3, 0, 5, 2, 4, 6]
    assert last.tolist() == [1, 0, 4]
    k_pool, v_pool = _paged_pool(8, 4, 2, 16, torch.float32, device)
    pool, offsets = to_trtllm(k_pool, v_pool, table)
    assert pool.shape == (8, 2, 2, 4, 16) and offsets.shape == (3, 2, 3)
    flat = pool.view(16, 2, 4, 16)  # [num_blocks·2, Hkv, block_size, D]
    # token 5 of sequence 0: logical block 1 -> pool block 0, slot 1; head 1
    assert torch.equal(flat[offsets[0, 0, 1], 1, 1], k_pool[0, 1, 1])
    assert torch.equal(flat[offsets[0, 1, 1], 1, 1], v_pool[0, 1, 1])


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_gpu_append(paged):
    b, hkv, d = 64, 8, 128
    starts = torch.randint(0, 3000, (b,), dtype=torch.int32, device="cuda")
    counts = torch.randint(0, 40, (b,), device="cuda")
    cu = cu_seqlens_from_lengths(counts)
    k_new = torch.randn(int(counts.sum()), hkv, d, dtype=torch.bfloat16, device="cuda")
    v_new = torch.randn_like(k_new)
    if paged:
        k_cache, v_cache = _paged_pool(b * 64, 64, hkv, d, torch.bfloat16, "cuda")
        table = torch.randperm(b * 64, device="cuda").view(b, 64).to(torch.int32)
    else:
        k_cache = torch.randn(b, 4096, hkv, d, dtype=torch.bfloat16, device="cuda")
        v_cache, table = torch.randn_like(k_cache), None
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    reference.append_kv(expect_k, expect_v, k_new, v_new, starts, cu_seqlens_new=cu, block_table=table)
    fast.append_kv(k_cache, v_cache, k_new, v_new, starts, cu_seqlens_new=cu, block_table=table)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)
