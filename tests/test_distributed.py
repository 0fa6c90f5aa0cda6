"""Context- and tensor-parallel attention on CPU processes: gloo and the Triton interpreter.

One group of 3 processes (forked from the test process, so they inherit its imports, its ``TRITON_INTERPRET``
and its NaN-poisoned ``torch.empty``) runs every check and writes its errors; the tests below assert them. Each
distributed result is compared with the single-process kernel on the whole input and with the fp64 reference,
within the kernel's own fp32 tolerance (tests/helpers.py): the ring and the merges add a few fp32 roundings per
row, far below it.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attn
from attn.distributed import (
    RingSchedule,
    Segment,
    ShardedKVCache,
    ShardPlan,
    attend_step,
    contiguous_plan,
    plan_pieces,
    ring_attention,
    sharded_decode,
    zigzag_plan,
)
from attn.distributed import (
    tensor_parallel as tp,
)
from attn.layout import cu_seqlens_from_lengths
from helpers import LSE_TOL, TOL, rel_err

WORLD = 3
F32 = torch.float32


def _lse_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Worst lse error relative to ``max(1, |lse|)``, or inf when the −inf patterns differ."""
    empty = torch.isneginf(ref)
    if not torch.equal(torch.isneginf(out), empty) or torch.isnan(out).any():
        return float("inf")
    if empty.all():
        return 0.0
    return ((out.double() - ref.double())[~empty].abs() / ref.double()[~empty].abs().clamp_min(1.0)).max().item()


def _err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float("inf") if torch.isnan(out).any() or out.shape != ref.shape else rel_err(ref, out)


def _ring_case(rank, world, group, lens, plan, *, hq=4, hkv=2, d=16, seed=0, **mask):
    """Ring attention on this rank's shard vs the single-process kernel and the fp64 reference."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q = torch.randn(total, hq, d, generator=g)
    k = torch.randn(total, hkv, d, generator=g)
    v = torch.randn(total, hkv, d, generator=g)
    cu = cu_seqlens_from_lengths(torch.tensor(lens, dtype=torch.int32))
    one = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True, **mask)
    single, single_lse = attn.attention(q, k, v, **one)
    ref, ref_lse = attn.reference.attention(q.double(), k.double(), v.double(), **one)
    out, lse = ring_attention(plan.shard(q, rank), plan.shard(k, rank), plan.shard(v, rank), plan, group=group,
                              return_lse=True, **mask)  # fmt: skip
    idx = plan.global_index(rank)
    return {
        "out_vs_single": _err(single[idx], out),
        "out_vs_ref": _err(ref[idx], out),
        "lse_vs_ref": _lse_err(ref_lse[:, idx], lse),
        "lse_vs_single": _lse_err(single_lse[:, idx], lse),
    }


def _decode_case(rank, world, paged: bool, seed=1):
    """A sharded cache filled by appends (prompt, then steps), decoded, vs one contiguous cache on one process."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d, shard_len = 4, 2, 16, 8
    prompts = [19, 5]
    if paged:
        local = attn.PagedKVCache(num_blocks=12, block_size=4, num_heads_kv=hkv, head_dim=d, max_seqs=2,
                                  max_blocks_per_seq=2, dtype=F32)  # fmt: skip
    else:
        local = attn.ContiguousKVCache(max_seqs=2, max_len=shard_len, num_heads_kv=hkv, head_dim=d, dtype=F32)
    cache = ShardedKVCache(local, shard_len=shard_len)
    full = attn.ContiguousKVCache(max_seqs=2, max_len=shard_len * world, num_heads_kv=hkv, head_dim=d, dtype=F32)
    slots = [cache.add_sequence() for _ in prompts]
    fslots = [full.add_sequence() for _ in prompts]
    for s, fs, n in zip(slots, fslots, prompts):
        k, v = torch.randn(1, n, hkv, d, generator=g), torch.randn(1, n, hkv, d, generator=g)
        cache.append([s], k, v)
        full.append([fs], k, v)
    res = {}
    slopes = attn.alibi_slopes(hq)
    cases = {
        "plain": dict(sq=1),
        "alibi": dict(sq=1, alibi_slopes=slopes),
        "window_causal_sq2_alibi": dict(sq=2, causal=True, window_size=(6, -1), alibi_slopes=slopes),
    }
    for name, kw in cases.items():
        sq = kw.pop("sq")
        k, v = torch.randn(2, sq, hkv, d, generator=g), torch.randn(2, sq, hkv, d, generator=g)
        cache.append(slots, k, v)
        full.append(fslots, k, v)
        q = torch.randn(2, sq, hq, d, generator=g)
        out, lse = cache.decode(q, slots, return_lse=True, **kw)
        seqlens, table = full.metadata(fslots)
        single, single_lse = attn.decode(q, full.k, full.v, seqlens, block_table=table, return_lse=True, **kw)
        ref, ref_lse = attn.reference.decode(q.double(), full.k.double(), full.v.double(), seqlens,
                                             block_table=table, return_lse=True, **kw)  # fmt: skip
        res[f"{name}_out_vs_single"] = _err(single, out)
        res[f"{name}_out_vs_ref"] = _err(ref, out)
        res[f"{name}_lse_vs_ref"] = _lse_err(ref_lse, lse)
    res["owner"] = float(cache.owner(slots[0]) != (19 + 1 + 1 + 2) // shard_len)
    return res


def _tp_case(rank, world, group, seed=2):
    """Head-sliced attention (sliced and replicated KV, ALiBi, T5) and a per-rank cache, gathered."""
    g = torch.Generator().manual_seed(seed)
    res = {}
    for hkv in (3, 1):
        hq, d, s = 6, 16, 11
        q, k, v = (torch.randn(1, s, h, d, generator=g) for h in (hq, hkv, hkv))
        slopes = attn.alibi_slopes(hq)
        ql, kl, vl = tp.shard_heads(q, k, v, world, rank)
        local_slopes = tp.shard_alibi_slopes(hq, world, rank)
        out = tp.gather_heads(attn.attention(ql, kl, vl, causal=True, alibi_slopes=local_slopes), group)
        ref = attn.reference.attention(q.double(), k.double(), v.double(), causal=True, alibi_slopes=slopes)
        res[f"alibi_hkv{hkv}"] = _err(ref, out)
        res[f"slopes_hkv{hkv}"] = float(not torch.equal(local_slopes, slopes[rank * 2 : rank * 2 + 2]))
        rel = attn.RelativeBias(table=torch.randn(hq, 8, generator=g), max_distance=16, bidirectional=False)
        out = tp.gather_heads(
            attn.attention(ql, kl, vl, causal=True, rel_bias=tp.shard_relative_bias(rel, world, rank)), group
        )
        ref = attn.reference.attention(q.double(), k.double(), v.double(), causal=True, rel_bias=rel)
        res[f"t5_hkv{hkv}"] = _err(ref, out)
        # a paged cache object per rank holding its KV heads, decoded against the full cache
        cache = attn.PagedKVCache(num_blocks=8, block_size=4, num_heads_kv=hkv, head_dim=d, max_seqs=2,
                                  max_blocks_per_seq=4, dtype=F32)  # fmt: skip
        slot = cache.add_sequence()
        cache.append([slot], k, v)
        local = tp.shard_cache(cache, hq, world, rank)
        qd = torch.randn(1, 1, hq, d, generator=g)
        qd_local = tp.shard_heads(qd, k, v, world, rank)[0]
        out = tp.gather_heads(attn.decode(qd_local, local.k, local.v, *local.metadata([slot])[:1],
                                          block_table=local.metadata([slot])[1]), group)  # fmt: skip
        seqlens, table = cache.metadata([slot])
        ref = attn.reference.decode(qd.double(), cache.k.double(), cache.v.double(), seqlens, block_table=table)
        res[f"cache_decode_hkv{hkv}"] = _err(ref, out)
    return res


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    try:
        uneven = [29, 3, 17]
        # zigzag with chunk sizes that differ, and a sequence too short for every rank to get a token of it
        results["ring_zigzag_causal_varlen"] = _ring_case(rank, world, None, uneven, zigzag_plan(uneven, world),
                                                          causal=True)  # fmt: skip
        # contiguous shards with rank 1 holding nothing; causal sliding window and ALiBi in global positions
        cuts = [[0, 12, 12, 29], [0, 1, 1, 3], [0, 9, 9, 17]]
        empty_rank = contiguous_plan(uneven, world, cuts)
        results["ring_empty_rank_window_alibi"] = _ring_case(
            rank, world, None, uneven, empty_rank, causal=True, window_size=(7, -1), alibi_slopes=attn.alibi_slopes(4)
        )
        results["ring_zigzag_bidirectional_window_alibi_softcap"] = _ring_case(
            rank, world, None, uneven, zigzag_plan(uneven, world), window_size=(5, 3),
            alibi_slopes=torch.rand(3, 4) * 0.5, softcap=4.0,
        )  # fmt: skip
        # a 2-rank subgroup of the world: the ring's peers are the group's global ranks
        sub = dist.new_group([1, 2])
        if rank in (1, 2):
            results["ring_subgroup_zigzag_gqa_mqa"] = _ring_case(rank - 1, 2, sub, [23], zigzag_plan([23], 2),
                                                                 hq=4, hkv=1, causal=True)  # fmt: skip
        results["decode_contiguous"] = _decode_case(rank, world, paged=False)
        results["decode_paged"] = _decode_case(rank, world, paged=True)
        results["tensor_parallel"] = _tp_case(rank, world, None)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


# the gloo processes work on CPU tensors, which the kernels accept only in the interpreter
CPU_KERNELS = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(scope="module")
def dist_results():
    if not CPU_KERNELS:
        pytest.skip("CPU processes over gloo need the interpreter (TRITON_INTERPRET=1); the GPU ring is issue 21's")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        # fork: the children share this process's imported torch, triton and attn (spawning costs ~10 s each)
        mp.start_processes(_worker, args=(WORLD, init_file, tmp), nprocs=WORLD, start_method="fork", join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


RING = [
    "ring_zigzag_causal_varlen",
    "ring_empty_rank_window_alibi",
    "ring_zigzag_bidirectional_window_alibi_softcap",
    "ring_subgroup_zigzag_gqa_mqa",
]


@pytest.mark.parametrize("case", RING)
def test_ring_attention_matches_single_process(dist_results, case):
    ranks = [r for r in dist_results if case in r]
    assert len(ranks) == (2 if "subgroup" in case else WORLD)
    for res in ranks:
        e = res[case]
        print(case, e)
        assert e["out_vs_single"] <= TOL[F32] and e["out_vs_ref"] <= TOL[F32]
        assert e["lse_vs_ref"] <= LSE_TOL[F32] and e["lse_vs_single"] <= LSE_TOL[F32]


@pytest.mark.parametrize("case", ["decode_contiguous", "decode_paged"])
def test_sharded_decode_matches_single_process(dist_results, case):
    for res in dist_results:
        e = res[case]
        print(case, e)
        assert e.pop("owner") == 0.0, "the next token's owner"
        for name, err in e.items():
            assert err <= (LSE_TOL[F32] if "lse" in name else TOL[F32]), name


def test_tensor_parallel_matches_single_process(dist_results):
    for res in dist_results:
        e = res["tensor_parallel"]
        print(e)
        for name, err in e.items():
            assert err <= (0.0 if name.startswith("slopes") else TOL[F32]), name


def _simulated_ring(q, k, v, plan, impl, **mask):
    """Every rank's every ring step in this process (no transport): the planning and the merges, alone."""
    hq, d = q.shape[1:]
    slopes = mask.pop("alibi_slopes", None)
    s2 = None if slopes is None else slopes.float().expand(plan.num_seqs, hq)
    shift = (1 / d**0.5) if mask.get("alibi_mode") == "alibi_with_scale" else 1.0
    outs, lses = [], []
    for r in range(plan.world_size):
        sched = RingSchedule(plan, r, causal=mask.get("causal", False), window_size=mask.get("window_size", (-1, -1)),
                             coalesce=slopes is None, device=q.device)  # fmt: skip
        ql = plan.shard(q, r)
        out = torch.zeros(ql.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((hq, ql.shape[0]), float("-inf"), device=q.device)
        for step in range(plan.world_size):
            src = (r - step) % plan.world_size
            attend_step(ql, plan.shard(k, src), plan.shard(v, src), sched.steps[step], out, lse, slopes=s2,
                        alibi_shift=shift, impl=impl, softcap=mask.get("softcap", 0.0),
                        alibi_mode=mask.get("alibi_mode", "alibi"))  # fmt: skip
        outs.append(out.to(q.dtype))
        lses.append(lse)
    return plan.unshard(outs), plan.unshard(lses, dim=1)


MASKS = {
    "causal": dict(causal=True),
    "bidirectional": dict(),
    "causal_window": dict(causal=True, window_size=(5, -1)),
    "window_both": dict(window_size=(4, 3)),
    "right_only": dict(window_size=(-1, 2)),
    "causal_alibi": dict(causal=True, alibi=True),
    "window_alibi_with_scale": dict(window_size=(6, 2), alibi=True, alibi_mode="alibi_with_scale"),
    "bidirectional_alibi_softcap": dict(alibi=True, softcap=3.0),
}


@pytest.mark.parametrize("mask", MASKS)
def test_ring_plan_matches_reference_in_one_process(mask):
    # the step planning (trimming, kernel windows from e, ALiBi shifts, packing) over many shardings, with the
    # fp64 reference as the kernel: exact up to fp32 merges (the lse comes back in fp32)
    lens = [13, 1, 40]
    kw = dict(MASKS[mask])
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(len(lens), 4, dtype=torch.float64)
    cu = cu_seqlens_from_lengths(torch.tensor(lens, dtype=torch.int32))
    q = torch.randn(sum(lens), 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, sum(lens), 2, 8, dtype=torch.float64)
    ref, ref_lse = attn.reference.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True, **kw)
    plans = [
        zigzag_plan(lens, 2),
        zigzag_plan(lens, 4),
        contiguous_plan(lens, 3, cuts=[[0, 0, n // 3, n] for n in lens]),
    ]
    for plan in plans:
        out, lse = _simulated_ring(q, k, v, plan, attn.reference.attention, **kw)
        assert rel_err(ref, out) <= TOL[F32], plan
        assert _lse_err(ref_lse, lse) <= LSE_TOL[F32], plan


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["causal", "causal_window", "causal_alibi", "window_both"])
def test_ring_steps_bf16_gpu(mask):
    # the compiled kernels through a simulated 4-rank zigzag ring, against the same kernels on the whole input
    lens = [3001, 1111]
    kw = dict(MASKS[mask])
    if kw.get("window_size"):
        kw["window_size"] = tuple(w * 100 if w > 0 else w for w in kw["window_size"])
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = attn.alibi_slopes(32, device="cuda")
    cu = cu_seqlens_from_lengths(torch.tensor(lens, dtype=torch.int32, device="cuda"))
    q = torch.randn(sum(lens), 32, 128, dtype=torch.bfloat16, device="cuda")
    k, v = torch.randn(2, sum(lens), 8, 128, dtype=torch.bfloat16, device="cuda")
    single = attn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, **kw)
    ref = attn.reference.attention(q.float(), k.float(), v.float(), cu_seqlens_q=cu, cu_seqlens_k=cu, **kw)
    out, _ = _simulated_ring(q, k, v, zigzag_plan(lens, 4), attn.attention, **kw)
    assert rel_err(ref, out) <= TOL[torch.bfloat16]
    assert rel_err(single, out) <= TOL[torch.bfloat16]


def test_zigzag_balances_causal_work():
    # visible (query, key) pairs per rank over the whole ring: equal under zigzag, 1:3:5:7 under contiguous
    def work(plan):
        out = []
        for r in range(plan.world_size):
            n = 0
            for src in range(plan.world_size):
                for p in plan_pieces(plan, r, src, causal=True):
                    rows, cols = p.q_hi - p.q_lo, p.k_hi - p.k_lo
                    n += rows * cols if p.full else sum(min(cols, i + 1 + p.e) for i in range(rows))
            out.append(n)
        return out

    assert work(zigzag_plan([64], 4)) == [520] * 4
    assert work(contiguous_plan([64], 4)) == [136, 392, 648, 904]
    assert sum(work(zigzag_plan([64], 4))) == 64 * 65 // 2


def test_tensor_parallel_cache_objects(device):
    # a fresh per-rank cache holds the rank's KV heads: a slice, or the one replicated head
    paged = dict(num_blocks=4, block_size=4, head_dim=8, max_seqs=1, max_blocks_per_seq=2, dtype=torch.float32,
                 device=device)  # fmt: skip
    assert tp.new_cache(attn.PagedKVCache, num_heads_q=8, num_heads_kv=4, tp_size=2, tp_rank=1, **paged).k.shape[2] == 2
    assert tp.new_cache(attn.PagedKVCache, num_heads_q=8, num_heads_kv=2, tp_size=4, tp_rank=3, **paged).k.shape[2] == 1
    assert list(tp.head_ranges(8, 2, 4, 3)[1]) == [1]
    # a copied cache keeps its own bookkeeping: appends to it leave the original alone
    cache = attn.PagedKVCache(num_heads_kv=4, **paged)
    s = cache.add_sequence()
    cache.append([s], torch.randn(1, 3, 4, 8, device=device), torch.randn(1, 3, 4, 8, device=device))
    local = tp.shard_cache(cache, 8, 2, 1)
    assert torch.equal(local.k, cache.k[:, :, 2:4])
    local.append([s], torch.randn(1, 2, 2, 8, device=device), torch.randn(1, 2, 2, 8, device=device))
    assert (local.length(s), cache.length(s)) == (5, 3)


def test_bad_input():
    plan = zigzag_plan([10], 2)
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="plan is for 2 ranks"):
        ring_attention(q, q, q, plan)
    with pytest.raises(ValueError, match="q must be"):
        ring_attention(q[:3], q[:3], q[:3], zigzag_plan([10], 1))
    with pytest.raises(ValueError, match="non-decreasing points"):
        contiguous_plan([10], 2, cuts=[[0, 4, 9]])
    with pytest.raises(ValueError, match="held by no rank or by two"):
        ShardPlan([10], [[Segment(0, 0, 5)], [Segment(0, 4, 10)]])
    with pytest.raises(ValueError, match="alibi_with_scale"):
        ring_attention(q, q, q, zigzag_plan([10], 1), alibi_slopes=torch.ones(2), alibi_mode="alibi_with_scale",
                       softcap=2.0)  # fmt: skip
    with pytest.raises(ValueError, match="schedule was built"):
        one = zigzag_plan([10], 1)
        ring_attention(q, q, q, one, schedule=RingSchedule(one, 0, causal=True))
    with pytest.raises(ValueError, match="tp_size"):
        tp.head_ranges(8, 4, 3, 0)
    with pytest.raises(ValueError, match="past seqlens_total"):
        sharded_decode(q[None, :1], q[None], q[None], torch.tensor([10], dtype=torch.int32), shard_start=[0],
                       seqlens_total=[5], window_size=(3, -1))  # fmt: skip
