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
# `scripts/ncu_profile.sh` profiled our prefill kernel and cuDNN's on the H200 at two causal shapes (B16 H32
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
    """{metric: (ours, cudnn)} from a two-column ncu summary written by scripts/ncu_summary.py."""
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
# alternate (FA3 orders them with named barriers; Gluon 3.6 exposes none, so the warp scheduler decides).

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
# instructions sit between the exponentials, as intended (`scripts/gluon_sass.py` prints the order). The
# benchmark times both.
#
# P goes into P·V straight from registers: the score accumulator's register layout is already the A operand's
# (the `convert_layout` compiles to no shared-memory traffic: `scripts/gluon_sass.py` counts no shared stores
# in the tile loop).

# %% [markdown]
# ## 4. What the compiler made of it, and what it gained
#
# `scripts/gluon_sass.py` compiles the kernel for sm_90a on a machine without a GPU and reads ptxas's report.

# %%
sass = sorted(RESULTS.glob("gluon_sass_*.txt"))
if sass:
    print(f"{sass[-1].name}:")
    for line in sass[-1].read_text().splitlines():
        if "registers" in line:
            print(" ", line.strip())
else:
    print("no gluon_sass_*.txt in bench/results: run scripts/gluon_sass.py")

# %% [markdown]
# The measured gain comes from `bench/bench_gluon.py`, which times the Gluon kernel beside our `tl.*` kernel,
# cuDNN, FlashAttention-2 and FlexAttention in one process, each checked against the fp32 reference first.

# %%
runs = sorted(RESULTS.glob("gluon_*.json"))
if not runs:
    print("Not measured yet: no bench/results/gluon_*.json. The Gluon kernel has been compiled but not timed.")
else:
    doc = json.loads(runs[-1].read_text())
    print(f"{runs[-1].name}: {doc['env'].get('gpu')}, ceiling {doc['ceilings'].get('matmul_bf16_tflops', 0):.0f} "
          f"TFLOP/s (bf16 matmul)")  # fmt: skip
    print(f"{'shape':32s} {'gluon':>14s} {'tl.*':>14s} {'cuDNN':>8s}   gluon/cuDNN  gluon/tl")
    for r in doc["results"]:
        c = r["contenders"]
        g, t, cu = (c.get(name, {}).get("tflops") for name in ("gluon", "tl", "cudnn"))
        status = c.get("gluon", {}).get("status", "-")
        cells = [f"{x:6.0f} TFLOP/s" if x else status for x in (g, t)]
        ratios = [f"{a / b:10.2f}x" if a and b else f"{'-':>11s}" for a, b in ((g, cu), (g, t))]
        print(f"{r['name']:32s} {cells[0]:>14s} {cells[1]:>14s} {cu or 0:8.0f}  {ratios[0]} {ratios[1]}")

# %% [markdown]
# ## What is left
#
# - **Ping-pong by order, not by chance.** FA3 makes the two consumers alternate with named barriers, so one's
#   softmax always runs under the other's products. Here they are free-running.
# - **The rest of the variants.** The Gluon kernel covers the padded layout (causal, windows, soft-cap, GQA,
#   D 64/128); packed varlen input, per-sequence lengths, ALiBi, T5 and the paged chunked context stay on the
#   `tl.*` kernel (`gluon_supported` says which).
# - **FP8.** With e4m3 Q and K the Q·Kᵀ product runs at twice the bf16 rate; P·V needs V transposed in shared
#   memory, which is the same problem as the one-byte decode of lesson 09.
