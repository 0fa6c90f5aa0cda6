# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Attention across GPUs
#
# A Llama-3-70B-shaped model keeps, per token, 80 layers × 8 KV heads × 128 dims × 2 (K and V) × 2 bytes =
# 320 KiB of KV cache. A 1M-token context is 320 GiB: no single GPU holds it. And a 128k-token prefill of one
# layer (32 query heads) is about 1.4·10¹⁴ FLOPs of attention: a good fraction of a second on an H100, for every
# layer. Serving stacks split attention across GPUs in two ways:
#
# - **by heads** (tensor parallelism): each GPU owns some heads. Attention needs no communication at all; only
#   what is per head (ALiBi slopes, the T5 table, the KV cache) must be sliced consistently;
# - **by sequence** (context parallelism): each GPU owns a slice of the tokens. Every query still needs every key
#   before it, so keys must travel: **ring attention** for prefill, a **sharded KV cache** for decode.
#
# Both rest on something `attn` already returns: a partial output together with its log-sum-exp. This lesson
#
# 1. derives the LSE merge that makes partial results exact;
# 2. draws the ring step by step;
# 3. shows why the causal mask makes a naive split unbalanced, and how zigzag sharding fixes it;
# 4. keeps positions global (masks, windows, ALiBi) with a kernel that knows nothing of offsets;
# 5. runs ring attention and a sharded decode live, in two CPU processes talking through `torch.distributed`
#    (gloo), against the single-process result;
# 6. slices heads for tensor parallelism;
# 7. predicts the scaling at 2, 4 and 8 GPUs from one GPU's measured step times.
#
# The kernels run in Triton's CPU interpreter here, so the live shapes are tiny.

# %%
import json
import os
import tempfile
from pathlib import Path

import _figures
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attn
from attn.distributed import (
    RingSchedule,
    ShardedKVCache,
    contiguous_plan,
    cost_model,
    merge_into,
    plan_pieces,
    ring_attention,
    tensor_parallel,
    zigzag_plan,
)
from attn.layout import cu_seqlens_from_lengths

torch.manual_seed(0)


def maxdiff(a, b):
    """Largest absolute difference, in float64."""
    return (a.double() - b.double()).abs().max().item()


# %% [markdown]
# ## 1. The merge
#
# Take one query row and split its keys into two disjoint sets A and B. With scores $s_j$, attention over a set
# is $o_A = \sum_{j\in A} e^{s_j} v_j / Z_A$ with $Z_A = \sum_{j \in A} e^{s_j}$, and the kernel also returns
# $\ell_A = \log Z_A$. Over the union,
#
# $$ Z = Z_A + Z_B, \qquad o = \frac{Z_A\, o_A + Z_B\, o_B}{Z} = e^{\ell_A - \ell}\, o_A + e^{\ell_B - \ell}\, o_B,
# \qquad \ell = \log\!\left(e^{\ell_A} + e^{\ell_B}\right). $$
#
# Nothing is approximated: the union's output is a weighted mean of the parts, weighted by their share of the
# softmax denominator. A part whose keys are all masked has $\ell = -\infty$ and weight $0$; a row that sees no
# key anywhere keeps $o = 0, \ell = -\infty$ (lesson 05 builds the same merge for split-K decode). The merge is
# associative, so any number of parts can be folded in, in any order: `attn.distributed.merge_into` does it in
# place on a float32 accumulator.

# %%
q = torch.randn(12, 4, 16)
k = torch.randn(12, 2, 16)
v = torch.randn(12, 2, 16)
cu = torch.tensor([0, 12], dtype=torch.int32)
full, full_lse = attn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True)

acc = torch.zeros(12, 4, 16)
acc_lse = torch.full((4, 12), float("-inf"))
for lo, hi in [(8, 12), (0, 3), (3, 8)]:  # three key sets, in no particular order
    cuk = torch.tensor([0, hi - lo], dtype=torch.int32)
    o, l = attn.attention(q, k[lo:hi], v[lo:hi], cu_seqlens_q=cu, cu_seqlens_k=cuk, return_lse=True)
    merge_into(acc, acc_lse, o, l)
print("merged vs whole:", maxdiff(acc, full), " lse:", maxdiff(acc_lse, full_lse))

# %% [markdown]
# ## 2. The ring
#
# N ranks each hold a slice of the sequence: queries, keys and values. Ring attention takes N steps. At step $s$
# rank $r$ holds the K/V shard that started on rank $(r - s) \bmod N$; it attends its queries to that shard and
# merges, while it passes the shard to rank $r+1$ and receives the next one from rank $r-1$. The transfer is
# asynchronous point-to-point (`torch.distributed.batch_isend_irecv`; on GPUs NCCL runs it on its own stream
# while the attention kernels run), so a step costs the larger of its compute and its transfer, not their sum.
# After N steps every rank has seen every shard, and its queries' outputs are exact.

# %%
N = 4

# %% tags=["hide-input"]
_figures.ring_steps(N)

# %% [markdown]
# ## 3. Causal balance: zigzag sharding
#
# Under a causal mask a query sees only the keys before it. Cut the sequence into N contiguous slices and rank 0's
# queries see only their own slice while rank N−1's see everything: the work per rank grows as 1 : 3 : 5 : 7, and
# since every step waits for the slowest rank, the ring runs at the speed of the last one.
#
# **Zigzag** sharding cuts the sequence into 2N chunks and gives rank $r$ chunks $r$ and $2N-1-r$: one early, one
# late. Every rank then has the same causal work. Below, each visible (query, key) pair of a 64-token causal mask
# is coloured by the rank that computes it (the rank owning the query), for both plans.

# %%
S = 64


def causal_work(plan):
    """Visible (query, key) pairs each rank computes over the whole ring, from the pieces the ring schedules."""
    work = []
    for r in range(plan.world_size):
        n = 0
        for src in range(plan.world_size):
            for p in plan_pieces(plan, r, src, causal=True):
                rows, cols = p.q_hi - p.q_lo, p.k_hi - p.k_lo
                n += rows * cols if p.full else sum(min(cols, i + 1 + p.e) for i in range(rows))
        work.append(n)
    return work


# %% tags=["hide-input"]
_figures.owner_maps([("contiguous", contiguous_plan([S], N)), ("zigzag", zigzag_plan([S], N))], causal_work)

# %%
print("contiguous:", causal_work(contiguous_plan([S], N)), " zigzag:", causal_work(zigzag_plan([S], N)))
print(zigzag_plan([S], N))

# %% [markdown]
# ## 4. Positions stay global
#
# A rank's queries and a shard's keys are pieces of one sequence, with their own positions: masks, sliding
# windows and ALiBi must be applied in those global positions. `attn.attention` takes no position offset. What
# it does have is **bottom-right alignment**: a query block and a key block are lined up on their *ends*. So for
# a query range $[q_a, q_b)$ and a key range $[k_a, k_b)$, let
#
# $$ e = q_b - k_b $$
#
# be how far the true diagonal sits from the one the kernel assumes. The global mask $-L \le k - q \le R$
# (left reach $L$, right reach $R$; causal is $R = 0$) is then exactly the kernel's window $(L - e,\; R + e)$ on
# the local ranges. Negative reaches cannot be passed, so each (query range, key range) pair is first trimmed to
# the rows and columns that see anything; after trimming both reaches are provably ≥ 0. ALiBi adds
# $\text{slope}\cdot(k - q)$; the kernel adds $\text{slope}\cdot(k - q - e)$ in local terms, a constant
# $-\text{slope}\cdot e$ per row of the pair: the softmax does not change, the row's log-sum-exp moves by that
# constant, and it is added back before the merge.
#
# Pairs that share a kernel window, laid out in increasing order, run as the sequences of one packed varlen call.
# With zigzag and a causal mask that is two calls on a rank's first step (its two chunks against themselves,
# then its late chunk against its early one) and one call on every other step:

# %%
plan = zigzag_plan([S], N)
for s, calls in enumerate(RingSchedule(plan, 1, causal=True).steps):
    print(f"rank 1, step {s} (K/V of rank {(1 - s) % N}):")
    for c in calls:
        spans = ", ".join(f"q[{p.q_lo}:{p.q_hi}]×k[{p.k_lo}:{p.k_hi}] e={p.e}" for p in c.pieces)
        print(f"    window {c.window}: {spans}")

# %% [markdown]
# ## 5. Live: two processes, gloo
#
# Two CPU processes form a process group over gloo (on GPUs the same code runs over NCCL). Each takes its shard
# of a packed batch of two sequences (zigzag, so the shards are uneven: 37 and 11 tokens do not split evenly),
# runs `ring_attention` with a causal sliding window and ALiBi, and then decodes one more token per sequence from
# a `ShardedKVCache` whose positions are split between the ranks. Rank 0 gathers the outputs; we compare them with
# one process running the same kernels on the whole input.

# %%
LENS, HQ, HKV, D = [37, 11], 4, 2, 16
MASK = dict(causal=True, window_size=(9, -1), alibi_slopes=attn.alibi_slopes(HQ))
gen = torch.Generator().manual_seed(1)
QG, KG, VG = (torch.randn(sum(LENS), h, D, generator=gen) for h in (HQ, HKV, HKV))
K_NEW, V_NEW, Q_DEC = (torch.randn(2, 1, h, D, generator=gen) for h in (HKV, HKV, HQ))


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    plan = zigzag_plan(LENS, world)
    out, lse = ring_attention(plan.shard(QG, rank), plan.shard(KG, rank), plan.shard(VG, rank), plan,
                              return_lse=True, **MASK)  # fmt: skip
    # context-parallel decode: positions [r·32, (r+1)·32) live on rank r
    cache = ShardedKVCache(attn.ContiguousKVCache(max_seqs=2, max_len=32, num_heads_kv=HKV, head_dim=D,
                                                  dtype=torch.float32), shard_len=32)  # fmt: skip
    slots = [cache.add_sequence() for _ in LENS]
    cu = [0, LENS[0], sum(LENS)]
    for s, (a, b) in zip(slots, zip(cu, cu[1:])):
        cache.append([s], KG[a:b][None], VG[a:b][None])
    cache.append(slots, K_NEW, V_NEW)
    dec = cache.decode(Q_DEC, slots, alibi_slopes=MASK["alibi_slopes"])
    torch.save({"out": out, "lse": lse, "dec": dec, "held": cache.local.seqlens[slots].tolist()},
               os.path.join(out_dir, f"{rank}.pt"))  # fmt: skip
    dist.destroy_process_group()


with tempfile.TemporaryDirectory() as tmp:
    # fork: the children inherit this process's imports (and the functions defined in this notebook)
    mp.start_processes(worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, start_method="fork")
    parts = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]

plan = zigzag_plan(LENS, 2)
print(plan)
ring_out = plan.unshard([p["out"] for p in parts])
ring_lse = plan.unshard([p["lse"] for p in parts], dim=1)
cu = cu_seqlens_from_lengths(torch.tensor(LENS, dtype=torch.int32))
single, single_lse = attn.attention(QG, KG, VG, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True, **MASK)
print("ring (2 processes) vs one process:  out", maxdiff(ring_out, single), " lse", maxdiff(ring_lse, single_lse))

kc = torch.zeros(2, 64, HKV, D)
vc = torch.zeros_like(kc)
for b, (a, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
    kc[b, : e - a], vc[b, : e - a] = KG[a:e], VG[a:e]
    kc[b, e - a], vc[b, e - a] = K_NEW[b, 0], V_NEW[b, 0]
lens = torch.tensor([n + 1 for n in LENS], dtype=torch.int32)
dec_single = attn.decode(Q_DEC, kc, vc, lens, alibi_slopes=MASK["alibi_slopes"])
print("tokens held per rank (seq 0, seq 1):", [p["held"] for p in parts])
print("sharded decode vs one process:", maxdiff(parts[0]["dec"], dec_single), "(rank 1 got the same:",
      torch.equal(parts[0]["dec"], parts[1]["dec"]), ")")  # fmt: skip

# %% [markdown]
# The second sequence (12 tokens) lives entirely on rank 0: rank 1 holds none of it, decodes an empty shard
# (output 0, log-sum-exp −∞) and the merge gives it weight 0.
#
# ## 6. Tensor parallelism: slicing heads
#
# With heads split across ranks, every rank runs the ordinary kernels on its heads, with no communication inside
# attention. The one subtlety is GQA with fewer KV heads than ranks: each rank's query heads still read a single
# KV head, which is then replicated on several ranks. And ALiBi's slopes depend on the head index *in the whole
# model*: TensorRT-LLM generates them for all heads and each rank takes its slice (`tp_rank` offset), which is
# not the same as generating slopes for a model with fewer heads.

# %%
for tp in (4, 16):
    rows = [tensor_parallel.head_ranges(32, 8, tp, r) for r in range(tp)]
    print(
        f"Hq=32, Hkv=8, {tp} ranks:",
        ", ".join(f"r{r}: q{qh.start}-{qh.stop - 1} kv{list(kh)}" for r, (qh, kh) in enumerate(rows[:6])),
        "...",
    )
slopes = attn.alibi_slopes(8)
print("all 8 slopes:             ", slopes.tolist())
print("rank 1 of 2 (TRT offset): ", tensor_parallel.shard_alibi_slopes(8, 2, 1).tolist())
print("a 4-head model (wrong):   ", attn.alibi_slopes(4).tolist())

# %% [markdown]
# ## 7. How far it scales: a cost model
#
# A ring step costs the larger of its compute and its transfer, and the steps are synchronous. With
# $C(N, r, s)$ rank $r$'s compute at step $s$ and $X$ one K/V shard's transfer time,
#
# $$ T(N) = \sum_{s=0}^{N-1} \max\!\Big(\max_r C(N, r, s),\; X_s\Big), \qquad
#    X_s = \frac{2\,(S/N)\,H_{kv}\,D\cdot 2\,\text{B}}{B_\text{link}} \;(s < N-1). $$
#
# For the 128k-token prefill (H32/8, D128, bf16) one K/V shard at N = 8 is 64 MB: about 0.18 ms at NVLink 4's
# nominal 450 GB/s per direction (80% of it assumed usable), against a step compute of several milliseconds: the
# transfer hides, and what limits the scaling is the compute itself: how fast the kernel runs at the smaller
# shard shapes, and the merges. `bench/bench_distributed.py` measures every $C(N, r, s)$ on one GPU, at the real
# shard sizes, and writes the prediction. Decode needs one all-gather of a few KB per step, a latency of a few
# microseconds against the time to stream $1/N$ of the cache.
#
# The curve below uses that measured file when one exists in `bench/results`; otherwise it uses **assumed step
# times**, and says so: every step's attention at the one-GPU kernel's throughput (zigzag gives each step the
# same work), plus one merge per step streaming the float32 accumulator (four passes at 3 TB/s). That curve can
# only show the merges and the transfers; the measured one also shows how the kernel slows on smaller shards.

# %%
RESULTS = next((p for p in (Path("bench/results"), Path("../bench/results")) if p.is_dir()), None)
# the newest one-GPU result of bench/bench_distributed.py that got as far as the model (not a --smoke run)
measured = []
for path in sorted(RESULTS.glob("distributed_*.json")) if RESULTS else []:
    data = json.loads(path.read_text())
    if data.get("world") == 1 and not data.get("smoke") and "prefill" in data.get("model", {}):
        measured.append((path, data["model"]))
model = measured[-1][1] if measured else None
if model:
    source = f"measured step times, {measured[-1][0].name}, {json.loads(measured[-1][0].read_text())['env'].get('gpu')}"
    prefill = {int(n): v for n, v in model["prefill"]["by_gpus"].items()}
    decode = {int(n): v for n, v in model.get("decode", {}).get("by_gpus", {}).items()}
else:
    source = "ASSUMED step times (no GPU measurement in bench/results yet)"
    seqlen, single_ms = 131072, 450.0  # assumed: 1.4e14 FLOPs at ~310 TFLOP/s
    grids = {}
    for n in (1, 2, 4, 8):
        # zigzag: every step of every rank does 1/N² of the causal work; the merge streams [S/N, 32, 128] fp32
        merge_ms = 4 * (seqlen // n) * 32 * 128 * 4 / 3.0e12 * 1e3 if n > 1 else 0.0
        grids[n] = [[single_ms / n**2 + merge_ms] * n for _ in range(n)]
    shard = {n: cost_model.kv_shard_bytes(seqlen // n, 8, 128) for n in grids}
    prefill = cost_model.predict_prefill(single_ms, grids, shard)
    kv_bytes = 2 * (1 << 20) * 8 * 128 * 2
    t_read = {n: kv_bytes / n / 3.0e12 * 1e3 for n in (1, 2, 4, 8)}  # assumed 3 TB/s per H100
    decode = cost_model.predict_decode(t_read, {}, kv_bytes=kv_bytes)

_figures.scaling_curves(prefill, decode, source)
for n in sorted(prefill):
    p = prefill[n]
    print(f"N={n}: prefill {p['ms']:.1f} ms, speed-up {p['speedup']:.2f}x; one shard's transfer {p['comm_ms']:.3f} ms")

# %% [markdown]
# The measured multi-GPU run (issue 21, `torchrun --nproc-per-node N -m bench.bench_distributed`) tests this
# prediction; until a multi-GPU host is lent, the curve above is a prediction, not a measurement.
