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
# # Warp specialization on Hopper
#
# Lesson 02 built the fused prefill kernel in Triton's `tl.*` language: every warp of a program does
# everything, in order. It loads a K tile, multiplies, takes the softmax, loads a V tile, multiplies again. On
# an H100/H200 that kernel reaches 0.68-0.93x cuDNN. This lesson is about the other 10-30%, and the kernel
# structure that FlashAttention-3 (Shah et al., 2024) and cuDNN use to get it:
#
# 1. why the `tl.*` kernel stalls, read from Nsight Compute counters;
# 2. the producer/consumer pipeline, drawn as a timeline;
# 3. how it is written in Gluon, Triton's lower-level dialect: the key lines of `attn/fast/gluon_attention.py`;
# 4. what the compiler made of it (registers, shared memory), and the measured gain, where it exists.
#
# Gluon kernels compile for sm_90 only and do not run in Triton's interpreter. Everything below runs on a CPU:
# the counters and the measurements are read from files the benchmarks wrote on the GPU machine.

# %%
import inspect
import json
import re
from pathlib import Path

import _figures

import attn

RESULTS = Path(attn.__file__).resolve().parent.parent / "bench" / "results"

# %% [markdown]
# ## 1. Why the `tl.*` kernel stalls
#
# `bench/probes/ncu_profile.sh` profiled our prefill kernel and cuDNN's on the H200 at two causal shapes (B16 H32
# S1024 and B4 H32 S4096, D 128, bf16). The files are in `bench/results/ncu_H200_2026-11-29/`; here are the
# counters that tell the story.

# %%
NCU = RESULTS / "ncu_H200_2026-11-29"
WANTED = {
    "gpu__time_duration.sum": "kernel time (us)",
    "launch__block_size": "threads per program",
    "launch__grid_size": "programs",
    "launch__registers_per_thread": "registers per thread",
    "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active": "tensor pipe busy (%)",
    "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active": "load/store pipe (% of peak)",
    "sm__inst_executed_pipe_tma.avg.pct_of_peak_sustained_active": "TMA pipe (% of peak)",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio": "barrier stalls per instruction",
}


def read_summary(path):
    """{metric: (ours, cudnn)} from a two-column ncu summary written by bench/probes/ncu_summary.py."""
    rows = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in WANTED:
            rows[parts[0]] = (parts[1], parts[2])
    return rows


for name, label in (
    ("summary_prefill.txt", "B16 H32 S1024 causal"),
    ("summary_prefill_long.txt", "B4 H32 S4096 causal"),
):
    path = NCU / name
    if not path.exists():
        print(f"{label}: {path} not found")
        continue
    print(f"\n{label}{'':25s}{'tl.* kernel':>14s}{'cuDNN':>14s}")
    for metric, (ours, cudnn) in read_summary(path).items():
        print(f"  {WANTED[metric]:38s}{ours:>14s}{cudnn:>14s}")

# %% [markdown]
# Three things stand out.
#
# - **The tensor pipe idles.** It is busy 37% (S1024) and 49% (S4096) of the time in our kernel, 59% and 69%
#   in cuDNN's. Attention is two matrix products per tile with a softmax between them, and in the `tl.*` kernel
#   the same warps do both: while they compute exponentials, nobody feeds the tensor cores.
# - **Loads cost instructions.** With 64-row tiles on 4 warps, the `tl.*` kernel copies K and V with per-thread
#   asynchronous copies: 8x cuDNN's load/store instructions at S1024 (the LSU column), while cuDNN's TMA pipe
#   moves whole tiles with one instruction each.
# - **The shapes differ.** cuDNN launches 132 programs of 384 threads (one per SM, persistent) at 168
#   registers; ours launches thousands of 128- or 256-thread programs.
#
# Triton's `tl.*` language cannot say "these warps only load" or "start the next product before this
# softmax": the compiler decides which warps do what. Gluon can.

# %% [markdown]
# ## 2. The pipeline
#
# FlashAttention-3's structure, which the Gluon kernel follows:
#
# - a **producer** warp does nothing but issue TMA copies of K and V tiles into a ring of shared-memory stages.
#   For each stage, two barriers in shared memory (mbarriers) carry the handshake: *ready* (the copy engine
#   signals when the bytes have landed) and *empty* (the consumers signal when they are done with it);
# - two **consumer** warpgroups (4 warps each) own 64 query rows each. Per key tile: wait for K, Q·Kᵀ on the
#   tensor cores (`wgmma`), softmax, wait for V, P·V, release the stage;
# - the two consumers share the tensor cores, so while one computes its softmax the other's products run; and
#   each consumer issues the *next* tile's Q·Kᵀ before its current softmax (intra-warpgroup overlap).
#
# The timeline below is a model, not a measurement. Per key tile and 64 query rows, Q·Kᵀ and P·V take 0.5
# time units each on the tensor cores (shared by the whole SM), the softmax 0.6 on the warpgroup's own units;
# copying a K/V tile pair takes 0.8 on the copy engine, into a ring of 3 stages. Both schedules do the same
# work, 128 query rows against 6 key tiles. It shows where the tensor cores idle.

# %%
QK = PV = 0.5
SOFTMAX, LOAD, TILES, STAGES = 0.6, 0.8, 6, 3


def lockstep_schedule(tiles=TILES):
    """The tl.* structure: 8 warps (two warpgroups, 128 rows) do everything in order; loads run a stage ahead."""
    ev, t = [], 0.0
    for j in range(tiles):
        ev.append(("load", f"K{j + 1}", max(0.0, t - LOAD), LOAD))
        ev += [("wg1 MMA", "QK", t, 2 * QK), ("wg1 softmax", "softmax", t + 2 * QK, SOFTMAX)]
        ev.append(("wg1 MMA", "PV", t + 2 * QK + SOFTMAX, 2 * PV))
        t += 2 * QK + SOFTMAX + 2 * PV
    return ev


def specialized_schedule(tiles=TILES, stages=STAGES):
    """A producer warp and two consumer warpgroups sharing one tensor pipe; each consumer issues the next Q·Kᵀ
    before its softmax. A K stage is handed back when both consumers' Q·Kᵀ on it are done, a V stage after
    both P·V. A greedy list schedule: an op starts when its inputs are ready and its unit is free."""
    ev, tensor_free, t_load = [], 0.0, 0.0
    ready = {}  # ("K" or "V", tile) -> time its copy has landed
    freed = {}  # ("K" or "V", tile) -> time both consumers are done with it
    wgs = ("wg1", "wg2")

    def load(kind, j):
        # the producer copies K j then V j, each into the stage that tile j - stages has left
        nonlocal t_load
        for key in [("K", j), ("V", j)] if kind == "K" else [("V", j)]:
            if key not in ready:
                start = max(t_load, freed.get((key[0], j - stages), 0.0))
                ev.append(("load", f"{key[0]}{j + 1}", start, LOAD / 2))
                t_load = ready[key] = start + LOAD / 2
        return ready[(kind, j)]

    def tensor(w, name, at, dur):
        nonlocal tensor_free
        s = max(at, tensor_free)
        tensor_free = s + dur
        ev.append((f"{w} MMA", name, s, dur))
        return s + dur

    qk_done = {w: {} for w in wgs}
    pv_done = {w: {} for w in wgs}
    for j in range(tiles):
        for w in wgs:
            if j == 0:
                qk_done[w][0] = tensor(w, "QK", load("K", 0), QK)
            if j + 1 < tiles:  # the next product first ...
                qk_done[w][j + 1] = tensor(w, "QK", max(qk_done[w][j], load("K", j + 1)), QK)
            s0 = max(qk_done[w][j], pv_done[w].get(j - 1, 0.0))  # ... then this tile's softmax
            ev.append((f"{w} softmax", "softmax", s0, SOFTMAX))
            pv_done[w][j] = tensor(w, "PV", max(s0 + SOFTMAX, load("V", j)), PV)
        freed[("K", j)] = max(qk_done[w][j] for w in wgs)
        freed[("V", j)] = max(pv_done[w][j] for w in wgs)
    return ev


def tensor_busy(ev):
    """(fraction of the span during which a tensor-core op runs, the span)."""
    spans = sorted((s, s + d) for _, name, s, d in ev if name in ("QK", "PV"))
    end = max(s + d for _, _, s, d in ev)
    busy, cur = 0.0, None
    for s, e in spans:
        if cur is None or s > cur[1]:
            busy += (cur[1] - cur[0]) if cur else 0.0
            cur = [s, e]
        else:
            cur[1] = max(cur[1], e)
    busy += (cur[1] - cur[0]) if cur else 0.0
    return busy / end, end


# %% tags=["hide-input"]
schedules = [
    ("tl.*: 8 warps in lockstep (two warpgroups, 128 rows)", lockstep_schedule(),
     ["load", "wg1 MMA", "wg1 softmax"],
     {"load": "loads (same warps)", "wg1 MMA": "MMA (both WGs)", "wg1 softmax": "softmax (both WGs)"}),
    ("Gluon/FA3: producer warp + two consumer warpgroups (64 rows each)", specialized_schedule(),
     ["load", "wg1 MMA", "wg1 softmax", "wg2 MMA", "wg2 softmax"], {}),
]  # fmt: skip
_figures.schedule_gantt(schedules, tensor_busy)

# %% [markdown]
# In the lockstep schedule the tensor cores wait for every softmax. In the specialized one a warpgroup's
# softmax runs while the other warpgroup's products, or its own next Q·Kᵀ, occupy the tensor cores, and they
# idle only while the pipeline fills and drains. The real gain is smaller: the softmax is not free on the real
# machine (it takes issue slots from the same SM sub-partitions), and our two consumers are not forced to
# alternate by default. FA3 orders them with named barriers. Gluon 3.6 exposes none, so the warp scheduler
# decides; a variant that forces the turns with mbarriers measured slower on an H100 ("What is left", below).

# %% [markdown]
# ## 3. The Gluon kernel, read from its source
#
# Gluon names what `tl.*` leaves to the compiler. A few lines of `attn/fast/gluon_attention.py` carry the
# structure; they are printed here from the source itself.

# %%
from attn.fast import gluon_attention as ga  # noqa: E402  (imports Triton's Gluon; compiles nothing)


def excerpt(fn, patterns, context=0):
    """The lines of a jit function's source that match any pattern, with their line numbers in the file."""
    src, first = inspect.getsourcelines(getattr(fn, "fn", fn))
    keep = set()
    for i, line in enumerate(src):
        if any(re.search(p, line) for p in patterns):
            keep.update(range(max(0, i - context), min(len(src), i + context + 1)))
    for i in sorted(keep):
        print(f"{first + i:4d} {src[i].rstrip()}")


print("-- the kernel: shared-memory ring, barriers, and the split into partitions")
excerpt(ga._attn_fwd_gluon, [r"allocate_shared_memory", r"mbarrier\.init", r"warp_specialize", r"\[4, 1\]",
                             r"CONSUMER_REGS, PRODUCER_REGS"])  # fmt: skip

# %% [markdown]
# `gl.warp_specialize` forks the program: the default partition (4 warps, the first consumer) and two worker
# partitions, another 4-warp consumer and a 1-warp producer. The last list is each worker's register budget:
# the producer keeps 24 registers per thread, so the consumers can raise theirs to 240 (the compiler emits
# `setmaxnreg`; 12 warps at the kernel's 168 registers is the whole register file, as in cuDNN's kernel).

# %%
print("-- the producer: wait for a free stage, announce the bytes, start two TMA copies")
excerpt(ga._producer, [r"mbarrier\.", r"tma\."])

# %% [markdown]
# Each stage's `kv_empty` barrier counts one arrival per consumer; the producer waits on its phase, and the
# phase parity `(it // STAGES) & 1` flips every time the ring wraps. `expect` tells the `k_ready` barrier how
# many bytes to wait for; the TMA engine signals it when they have landed. One instruction moves a whole
# 128x128 tile (two, for the 128-byte swizzle's 64-column boxes), against thousands of per-thread copies.

# %%
print("-- a consumer's tile step: the next Q·Kᵀ before this softmax, P·V from registers")
excerpt(ga._tiles, [r"qk_next = _qk", r"_softmax_pv\(qk", r"warpgroup_mma_wait\(0, deps=\[acc_t, qk_next",
                    r"mbarrier\.arrive"])  # fmt: skip
excerpt(ga._qk, [r"mbarrier\.wait", r"warpgroup_mma\("])
excerpt(ga._softmax_pv, [r"mbarrier\.wait", r"warpgroup_mma\("])
excerpt(ga._softmax_step, [r"convert_layout\(p"])

# %% [markdown]
# `warpgroup_mma(..., is_async=True)` returns at once; the result is a token until `warpgroup_mma_wait`
# collects it. Issuing tile t+1's Q·Kᵀ, then computing tile t's softmax, then waiting for both products is the
# overlap, as written. What runs is what ptxas makes of it: at D 128 with 128-key tiles the SASS has the
# product *after* the 66 exponentials. Two score tiles, the output tile and P do not fit in the 240 registers
# next to everything else, so ptxas reuses the old scores' registers for the new ones and must finish the
# softmax first (our reading of the SASS). With 64-key tiles (`block_n=64`), or at D 64, the product's eight
# instructions sit between the exponentials, as intended (`bench/probes/gluon_sass.py` prints the order). The
# benchmark times both.
#
# FlashAttention-3 orders the loop the other way: tile t's Q·Kᵀ and tile t−1's P·V are issued together, the
# first wait collects only the Q·Kᵀ (a warpgroup's products complete in issue order), and tile t's softmax runs
# while the tensor cores do tile t−1's P·V. Only one score tile is live, so registers should not be the
# obstacle. We compiled that order too (not kept; `bench/NOTES.md`, 2026-12-07) and read the SASS. ptxas placed
# the new P in the registers that the pending P·V was still reading as its A operand, so it had to wait for that
# product before the first exponential. The PTX held the intended order. Two attempts left the SASS unchanged:
# naming both P's in the wait's `deps`, which Triton passes to the assembler only as a comment, and unrolling the
# loop so that P alternates between two variables. The lesson is the same as above: in Gluon you write the order,
# but ptxas's register allocation decides what overlaps, and only the SASS shows which.
#
# P goes into P·V straight from registers: the score accumulator's register layout is already the A operand's
# (the `convert_layout` compiles to no shared-memory traffic: `bench/probes/gluon_sass.py` counts no shared stores
# in the tile loop).

# %% [markdown]
# ## 4. What the compiler made of it, and what it gained
#
# `bench/probes/gluon_sass.py` compiles the kernel for sm_90a on a machine without a GPU and reads ptxas's report.

# %%
sass = sorted(RESULTS.glob("gluon_sass_*.txt"))
if sass:
    print(f"{sass[-1].name}:")
    for line in sass[-1].read_text().splitlines():
        if "registers" in line:
            print(" ", line.strip())
else:
    print("no gluon_sass_*.txt in bench/results: run bench/probes/gluon_sass.py")

# %% [markdown]
# The measured gain comes from `bench/bench_gluon.py`, which times the Gluon kernel beside our `tl.*` kernel,
# cuDNN, FlashAttention-2 and FlexAttention in one process, each checked against the fp32 reference first.
# The first run (H100 80GB HBM3, torch 2.11, triton 3.6; TFLOP/s, and the ratio to cuDNN's time):
#
# | shape                          | Gluon       | `tl.*`      | cuDNN | Gluon / `tl.*` |
# |--------------------------------|-------------|-------------|-------|----------------|
# | B16 H32 S1024 D128 causal      | 254 (0.64)  | 297 (0.75)  | 396   | 0.86x          |
# | B4 H32 S4096 D128 causal       | 360 (0.78)  | 407 (0.88)  | 464   | 0.88x          |
# | B4 H32 S4096 D128 full         | 396 (0.72)  | 453 (0.82)  | 553   | 0.87x          |
# | B1 H32 S16384 D128 causal      | 527 (0.95)  | 471 (0.85)  | 552   | 1.12x          |
# | B4 H32/8 S4096 D128 causal GQA | 562 (1.16)  | 412 (0.85)  | 484   | 1.36x          |
# | B8 H32 S4096 D64 causal        | 331 (0.87)  | 380 (1.00)  | 381   | 0.87x          |
#
# (bf16 matmul ceiling 717 TFLOP/s.) One row beats cuDNN by 16%, the others lose to our own `tl.*` kernel.
# The odd pair is the second and the fifth: the same FLOPs, the same kernel, the same tiles, and the GQA shape
# runs 1.56x faster. The only difference is that four query heads share each K/V head.
#
# ### Where the MHA shapes lost: the order of the work, not the inner loop
#
# The persistent grid walks work items (a 128-row block of one (batch, head)) longest first: in run 1, all
# B·H heads of the last row block, then all of the row block before it, and so on. The ~132 programs that run
# at one time therefore each hold a *different* head. A row block reads its head's whole K/V prefix, and the
# next row block of the same head comes 128 work items later, long after L2 (50 MB) has cycled through the
# other heads' K/V. Count the bytes that must come from HBM (for the sections, the ideal: all 32 row blocks of
# a head share one read of its K/V):

# %%
HBM_TBPS = 3.0  # H100 SXM, the measured copy rate in bench_gluon's ceilings


def kv_traffic(batch, heads_q, heads_kv, seqlen, head_dim, causal, heads_sharing_in_l2, block=128):
    """Bytes of K and V read from HBM when every row block reads its K/V prefix and only the query heads whose
    work runs at the same time (sharing one KV head, or one L2 section) share the copy."""
    n_m = seqlen // block
    tiles_per_head = n_m * (n_m + 1) // 2 if causal else n_m * n_m  # key tiles over all row blocks
    tile_bytes = 2 * block * head_dim * 2  # one K and one V tile, bf16
    reads = batch * heads_q * tiles_per_head * tile_bytes
    return reads / heads_sharing_in_l2


print(f"{'shape':32s} {'order':22s} {'K/V from HBM':>13s} {'at 3 TB/s':>10s}  (run 1: Gluon's time)")
for name, shape, measured_ms in (
    ("B4 H32 S4096 D128 causal", (4, 32, 32, 4096, 128, True), 1.529),
    ("B4 H32/8 S4096 D128 causal GQA", (4, 32, 8, 4096, 128, True), 0.979),
    ("B4 H32 S4096 D128 full", (4, 32, 32, 4096, 128, False), 2.774),
):
    b, hq, hkv, s_len, d, causal = shape
    for order, sharing in (("run 1 (heads apart)", hq // hkv), ("L2 sections", s_len // 128 * (hq // hkv))):
        gb = kv_traffic(*shape, heads_sharing_in_l2=sharing) / 1e9
        note = f"  ({measured_ms:.2f} ms)" if order.startswith("run 1") else ""
        print(f"{name:32s} {order:22s} {gb:10.2f} GB {gb / HBM_TBPS:8.2f} ms{note}")

# %% [markdown]
# At B4 H32 S4096 causal the run-1 order makes the kernel read 4.4 GB of K/V, 1.48 ms at 3 TB/s: nearly all of
# its 1.53 ms. It was memory-bound while looking compute-bound. With GQA four adjacent work items share one KV
# head, so a quarter of the traffic, and the kernel reached the rate its inner loop can sustain. The `tl.*`
# kernel never had the problem: its grid puts the row blocks of one head next to each other.
#
# The fix (`_tile_coords` and `l2_section` in the source) cuts the (batch, head) pairs into *sections* whose
# K/V fit in 8 MB of L2 and runs the sections one after another, each longest row block first. The programs in
# flight then share a few heads' K/V, and HBM serves each of them about once per section.

# %%
excerpt(ga._tile_coords, [r"per_section", r"width", r"pid_m =", r"bh ="])

# %% [markdown]
# The benchmark keeps run 1's order as the `gluon_rowmajor` column: the same compiled kernel (the section size
# is a runtime argument), so the two columns differ only in the order of the work.

# %%
runs = sorted(RESULTS.glob("gluon_*.json"))
if not runs:
    print("No bench/results/gluon_*.json committed yet: the table above (run 1) is the measurement so far.")
else:
    doc = json.loads(runs[-1].read_text())
    print(f"{runs[-1].name}: {doc['env'].get('gpu')}, ceiling {doc['ceilings'].get('matmul_bf16_tflops', 0):.0f} "
          f"TFLOP/s (bf16 matmul)")  # fmt: skip
    cols = ("gluon", "gluon_rowmajor", "gluon_ovl_unmasked", "gluon_pingpong", "tl", "default", "cudnn")
    print(f"{'shape':32s}" + "".join(f"{c.removeprefix('gluon_'):>13s}" for c in cols) + "   gluon/cuDNN  gluon/tl")
    for r in doc["results"]:
        c = r["contenders"]
        tf = {name: c.get(name, {}).get("tflops") for name in cols}
        cells = "".join(f"{tf[n]:13.0f}" if tf[n] else f"{c.get(n, {}).get('status', '-'):>13s}" for n in cols)
        g, t, cu = tf["gluon"], tf["tl"], tf["cudnn"]
        ratios = [f"{a / b:10.2f}x" if a and b else f"{'-':>11s}" for a, b in ((g, cu), (g, t))]
        print(f"{r['name']:32s}{cells}  {ratios[0]} {ratios[1]}")

# %% [markdown]
# ### The default dispatch
#
# `attn.attention` on an sm_90 GPU uses the Gluon kernel by default only where a benchmark measured it faster
# than the `tl.*` kernel (`gluon_default`; `ATTN_GLUON=1` forces it wherever it applies, `ATTN_GLUON=0` turns
# it off). Run 1 measured it faster only with GQA and at S16384; the L2 sections of the schedule then made it
# faster on all six shapes (1.10-1.43x our `tl.*` kernel on the H100). The guard against hidden non-finite
# values, measured in session 9, is within the run's noise (±3%) at S >= 4096 but costs 18% at B16 S1024
# causal, where the kernel now trails `tl.*` (0.94x). So today the default is causal or full attention with
# Sq = Sk >= 4096 at D64 or D128 without soft-cap or window. The predicate widens only with a new benchmark
# row. The `default` column above is that call.
#
# Where the guard's cost comes from shows in ptxas's report (`bench/probes/gluon_sass.py`, sm_90a): with the
# check in the masked tiles *and* the next tile's Q·Kᵀ in flight beside them, the consumer spills 748 bytes at
# causal D128; without the overlap in those tiles it spills 44. `overlap="unmasked"` keeps the overlap in the
# unmasked range only (a causal row block has just one or two masked tiles). Priced in session 13 (the
# `ovl_unmasked` column above, H100), it is slower than the default on five of the six shapes (0.89-1.00x) and
# faster only at B16 S1024 (1.09x), where the default call runs the `tl.*` kernel anyway: fewer spills did not
# buy time, so it stays a variant.

# %%
for case in ((4096, 4096, 32, 8), (4096, 4096, 32, 32), (16384, 16384, 32, 32), (512, 512, 32, 8)):
    sq, sk, hq, hkv = case
    on = ga.gluon_default(seqlen_q=sq, seqlen_k=sk, num_heads_q=hq, num_heads_kv=hkv, head_dim=128,
                          window_left=-1, window_right=0, softcap=0.0)  # fmt: skip
    print(f"causal D128 S{sq} H{hq}/{hkv}: {'Gluon' if on else 'tl.*'}")

# %% [markdown]
# ## FP8 prefill
#
# Hopper's tensor cores multiply e4m3 tiles at twice the bf16 rate. FP8 prefill (TensorRT-LLM's FP8 context
# FMHA, FA3's FP8 mode) takes Q, K and V in `float8_e4m3fn` with a descale factor per (batch, KV head), and
# returns bf16. The reference, `attn.reference.attention_fp8`, writes the numerics down; the one decision that
# is not forced is how P enters the second product. P·V runs on the FP8 tensor cores too, so P must be e4m3:
# we round `p · 256` (to nearest even), which puts p = 1 at 256 (e4m3 tops out at 448) and keeps every
# p >= 2^-18 nonzero; the row sum uses the unrounded p, and the 256 cancels in the final division.

# %%
import torch  # noqa: E402

from attn.fast import fp8_prefill  # noqa: E402
from attn.reference import fp8_attention as fr  # noqa: E402

torch.manual_seed(0)
q, k, v = (torch.randn(1, 96, 2, 64) for _ in range(3))
(q8, qd), (k8, kd), (v8, vd) = (fr.quantize_fp8(t) for t in (q, k, v))
exact = attn.reference.attention(q.double(), k.double(), v.double(), causal=True)
fp8_ref = fr.attention_fp8(q8, k8, v8, qd, kd, vd, causal=True)
fp8_kernel = fp8_prefill.attention_fp8(q8, k8, v8, qd, kd, vd, causal=True)  # Triton's interpreter on a CPU


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


print(f"FP8 reference vs exact bf16-input attention: {rel(fp8_ref, exact):.2e} relative RMS (input quantization)")
print(f"FP8 kernel vs FP8 reference:                 {rel(fp8_kernel, fp8_ref):.2e}")

# %% [markdown]
# Most of the FP8 error is the inputs' quantization (3 mantissa bits); the kernel adds little to its
# reference. Where the whole row fits one 128-key tile the kernel rounds exactly the p the reference rounds;
# over several tiles it rounds p against its running max instead of the final one (a different value, the same
# 2^-4 bound), which `tests/test_fp8_prefill.py` turns into its tolerance.
#
# The kernel is a `tl.*` kernel (`attn/fast/fp8_prefill.py`): `tl.dot` of two e4m3 tiles compiles to
# `wgmma ... e4m3.e4m3` on sm_90. One layout detail decides its speed. FP8 `wgmma` reads its B operand only
# with the reduction dimension contiguous: fine for Kᵀ in Q·Kᵀ, wrong for V in P·V. Given V as stored, the
# compiled loop transposed every V tile through shared memory one byte per store (128 `STS.U8` per tile, and V
# out of the copy pipeline). The wrapper therefore transposes V once per call, `[B, Hkv, D, Sk]`, and the loop
# reads Vᵀ tiles like K tiles (`bench/probes/gluon_fp8_sass.py` shows both loops).
#
# The Gluon kernel of this lesson takes e4m3 operands too (`attention_fp8_gluon`; on sm_90 the default for
# Sq = Sk >= 4096, where it was measured faster, and `ATTN_GLUON=1` forces it): the same producer, ring and
# consumers, with Vᵀ stages and `QGMMA` (FP8 wgmma) for both products. One more
# detail decides its loop. The scores' accumulator leaves each thread keys 2t, 2t+1, 8+2t, 9+2t, ... of every
# 32 (t = lane % 4), while an FP8 A operand in registers wants keys 4t .. 4t+3 and 16+4t .. 16+4t+3: a plain
# conversion shuffles P between lanes every tile. But P·V is a sum over keys, and it does not care which key is
# called k = c, as long as V's row c is the same key. So the kernel *renames* P's keys: a reshape into key
# bits, a swap of the bits of t with the bit that picks 8+, a reshape back, and
# `convert_layout(..., assert_trivial=True)`, which makes the compiler prove that no data moves. The V
# transpose that the call makes anyway writes each 32 keys in the same order. The cell below checks that
# order against the formula, on the CPU.

# %%
from attn.fast import gluon_attention as ga  # noqa: E402

v8 = torch.arange(64, dtype=torch.uint8).view(torch.float8_e4m3fn).view(1, 64, 1, 1)  # key j holds code j
order = ga._fp8_vt(v8).view(torch.uint8).flatten()[:32].tolist()
print("Vᵀ column c holds key:", order)
want = [16 * (c // 16) + 8 * ((c // 2) % 2) + 2 * ((c // 4) % 4) + c % 2 for c in range(32)]
assert order == want

# %%
# the FP8 tables: bench_gluon's full runs (gluon_*.json) and its --fp8-only runs (fp8prefill_*.json), by date
fp8_files = sorted([*runs, *RESULTS.glob("fp8prefill_*.json")], key=lambda f: (f.name.split("_")[2], f.name))
fp8_runs = [r for r in fp8_files for r in [json.loads(r.read_text())] if r.get("fp8_results")]
if not fp8_runs:
    print("FP8 prefill not measured yet (bench_gluon writes an fp8_results table).")
else:
    names = ("fp8", "fp8_gluon", "fp8_gluon_pp", "fp8_tl", "bf16_default", "bf16_tl")
    print(f"TFLOP/s   {'shape':32s} " + " ".join(f"{n:>12s}" for n in names) + "   best FP8 / bf16 default")
    for r in fp8_runs[-1]["fp8_results"]:
        c = r["contenders"]
        tf = [c.get(n, {}).get("tflops") for n in names]
        ratio = max((c.get(n, {}).get("vs_bf16_default") or 0) for n in names[:3])
        print(f"          {r['name'][4:]:32s} " + " ".join(f"{x or 0:12.0f}" for x in tf) + f"   {ratio:.2f}x")
    print("(fp8: the call as made: tl.* until session 11, Gluon at Sq = Sk >= 4096 since; fp8_gluon: ATTN_GLUON=1;")
    print(" fp8_gluon_pp: the ping-pong variant, called directly; fp8_tl: ATTN_GLUON=0; 0 = not in that run)")

# %% [markdown]
# ## What is left
#
# - **Ping-pong by order, not by chance.** FA3 makes the two consumers alternate with named barriers, so one's
#   softmax always runs under the other's products. By default ours run free, and because both wait on the same
#   K/V stages they could move in phase. `overlap="pingpong"` makes them take turns, with two mbarriers: a
#   consumer waits for its turn, issues tile t's P·V and tile t+1's Q·Kᵀ, hands the turn over, and then waits for
#   its products and computes its softmax. It compiles without spills at D 64 and in FP8, with 28 bytes at D 128
#   (the default spills 748), and its GPU tests pass. We expected +5-15% in bf16 and +10-25% in FP8. The H100
#   measured the opposite: 0.83-0.94x the default in bf16 and 0.85-0.90x in FP8 (the `pingpong` and
#   `fp8_gluon_pp` columns above). Only B16 S1024 gained (1.10x), and there the default call runs `tl.*`. So
#   either the free-running consumers were not stuck in phase, or the turns cost more than the phase did. Two
#   costs are likely. Each tile now waits on a barrier round-trip, even when its own operands are ready. And
#   when the softmax takes longer than the products, alternation alone cannot fill the tensor cores. No profile
#   says yet which one dominates. Until one does, the variant stays opt-in.
# - **The rest of the variants.** The Gluon kernel covers the padded layout with or without per-sequence
#   lengths, packed varlen input (causal, windows, soft-cap, ALiBi, GQA, D 64/128), and keeps the values of
#   hidden keys out of its masked tiles (a non-finite check per masked tile); T5 and the paged chunked context
#   stay on the `tl.*` kernel (`gluon_supported` says which), and lengths, packed input and ALiBi run on it by
#   default only once a benchmark row says they win (`gluon_default`).
# - **FP8 at FA3's speed.** The Gluon FP8 kernel beats the `tl.*` one by 1.16-1.28x on an H100, but reaches
#   only 0.79-1.24x our bf16 prefill at S4096 (session 13). FlashAttention-3's paper (Shah et al. 2024)
#   reports close to 1.2 PFLOP/s in FP8 against up to 740 TFLOP/s in FP16 on an H100, about 1.6x. Per 128x128
#   tile pair our kernel needs about as many cycles of exponentials as of FP8 tensor work, so one warpgroup's
#   softmax must hide under the other's products. The ping-pong above was meant to do that and lost 10-15%
#   here. It also still transposes V once per call, outside the pipeline.
# - **The inner loop at D 128.** ptxas still sinks the next Q·Kᵀ below the softmax (section 3), and FA3's order
#   lost its overlap to register reuse; with the L2 order fixed, that is what is left between the MHA shapes and
#   the GQA shape's rate.
