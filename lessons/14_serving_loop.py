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
# # From a kernel to a serving loop
#
# A decode kernel that reads the cache at 4 TB/s is only half of a fast decode step. The other half is the
# *host*: the Python that checks the arguments, chooses the split count and launches the kernel. This lesson is
# about that half:
#
# 1. why one host sync per call can halve decode, drawn as a CPU/GPU timeline;
# 2. plan once, run many: `attn.DecodePlan` and its siblings, checked live;
# 3. CUDA graphs: replaying a whole step with no host work at all;
# 4. `torch.compile`: the kernels as custom operators, so a compiled model traces through them.

# %%
import _figures
import torch

import attn

# %% [markdown]
# ## 1. One sync, and the GPU waits
#
# A CUDA launch is asynchronous: the host puts the kernel on a stream and returns, usually long before the
# kernel ends. A decode loop that only launches keeps the stream full: while the GPU runs step *n*, the host
# prepares step *n+1*, and the host's time (50-100 µs of Python for our launcher) hides behind the kernel's.
#
# A *sync* breaks that. `cache_seqlens.tolist()`, `int(block_table.max())` or `bool(mask.any())` copy a device
# value to the host, and the copy waits until every kernel queued before it has finished. Then the host starts
# preparing the next launch only when the GPU is already idle, and the GPU idles for the whole host time of the
# next call. Per step the time becomes **host + kernel** instead of **max(host, kernel)**: with a 60 µs host
# and a 60 µs kernel, twice as long.
#
# That is what the default `attn.decode` call did before issue 15: its checks read the lengths and the block
# table on the host, and the measured result was 0.43-0.80x cuDNN as a user calls it, against 0.98-1.00x with
# the checks turned off. Those checks are still there, as an opt-in: `validate=True` (or `ATTN_DEBUG=1`) reads the
# values and raises at once on a bad one, and it still syncs, so it draws the "before" picture below. The
# default call now reads no value on the host: the kernels clamp every index they take from a tensor into the
# range their operands allow, and record a violation in a device-side error word that `attn.check_errors()`
# reads when you choose to sync (after a step, once per request, in a test).
#
# Below, a profiler timeline of three kinds of call over the same paged cache: `validate=True` (the old default),
# the default call, and `plan.run` (section 2). It is drawn from a trace recorded on the GPU by
# `python -m bench.bench_decode --timeline ...` when that file is in `bench/results/`; otherwise a schematic
# with made-up durations stands in, labelled as such.


# %% tags=["hide-input"]
data, source = _figures.load_timeline()
if data is None:
    data, title = _figures.schematic_timeline(), "SCHEMATIC (made-up durations; no recorded timeline in bench/results/)"
else:
    title = f"recorded: {data.get('shape')} on {data.get('gpu')} ({source})"
_figures.timeline(
    data["events"], title, {"validate=True": "tab:red", "default call": "tab:orange", "plan.run": "tab:green"}
)

# %% [markdown]
# Read the red part left to right: each call's host range starts only when the previous kernel has finished
# (the sync), so kernels have gaps as long as the host range between them. In the orange and green parts the
# host ranges run ahead of the GPU and the kernels sit back to back: the GPU never waits. A recording made
# before issue 15 would show the red picture for the *default* call.
#
# What does the default call do with a bad length, then? It cannot raise (raising needs the value on the host);
# it computes with the length clamped into the cache and records the violation. The next `attn.check_errors()`
# raises it, once; `validate=True` raises at the call, before anything runs.

# %%
torch.manual_seed(0)
k_pool = torch.randn(8, 4, 2, 16)  # 8 blocks of 4 tokens, 2 KV heads, head dim 16
v_pool = torch.randn_like(k_pool)
table = torch.tensor([[0, 3], [5, 1]], dtype=torch.int32)
q = torch.randn(2, 1, 4, 16)
bad_lengths = torch.tensor([6, 1000], dtype=torch.int32)  # 1000 tokens, but the table holds 8
out = attn.decode(q, k_pool, v_pool, bad_lengths, block_table=table)  # no host read, no error yet
clamped = attn.reference.decode(q, k_pool, v_pool, torch.tensor([6, 8], dtype=torch.int32), block_table=table)
print("default call == reference on the clamped lengths:", torch.allclose(out, clamped, atol=1e-5))
for label, fn in (("check_errors()", attn.check_errors),
                  ("validate=True", lambda: attn.decode(q, k_pool, v_pool, bad_lengths, block_table=table,
                                                        validate=True))):  # fmt: skip
    try:
        fn()
    except ValueError as e:
        print(f"{label} raises: {e}")

# %% [markdown]
# ## 2. Plan once, run many
#
# The default call is asynchronous now, but it still does its host work on every call: argument checks, the
# split heuristic, the launcher's bookkeeping (about 60 µs on an H100, enough to be the bottleneck when the
# kernel is shorter than that). For serving loops there is a *plan*: the step's metadata, which the scheduler
# holds on the host anyway (lengths as Python ints, block tables as lists), is checked once and put on the
# device once; the split count is chosen once; and `plan.run(q)` only launches (about 16 µs of host time on an
# H100 machine). One plan serves every layer of a step: each layer passes its own cache pools. This is
# FlashInfer's `plan`/`run` design.
#
# Our plans go one step further in how `run` stays cheap. The first `run` calls the flat function
# (`validate=False`, with the plan's length hints) and *records* what it did: its kernel launches, and every torch
# operation around them. When those operations only built metadata (never touched the query, the cache or the
# output), later runs replay the launches alone, with the new tensors substituted. Everything else falls back to
# the flat call, which is always right.

# %%
torch.manual_seed(0)
cache = attn.PagedKVCache(num_blocks=16, block_size=8, num_heads_kv=2, head_dim=16, max_seqs=3,
                          max_blocks_per_seq=6, dtype=torch.float32)  # fmt: skip
slots = [cache.add_sequence() for _ in range(3)]
for s, n in zip(slots, [5, 30, 17]):
    k = torch.randn(1, n, 2, 16)
    cache.append([s], k, torch.randn_like(k))

plan = cache.plan_decode(slots, num_heads_q=4)  # host lists only: nothing read back from the device
q = torch.randn(3, 1, 4, 16)
out = plan.run(q)  # first run: the flat call, recorded
out2 = plan.run(q)  # a replay of the recorded launch
seqlens, table = cache.metadata(slots)
ref = attn.reference.decode(q, cache.k, cache.v, seqlens, block_table=table)
print("replayable:", plan.replayable, "| hints:", plan.hints, "| splits:", plan.num_splits)
print("run == replay:", torch.equal(out, out2), "| max |run - reference|:", float((out2 - ref).abs().max()))

# %% [markdown]
# The lengths grow by one token per step. `plan.update(lengths)` writes them into the plan's device tensor in
# place (an asynchronous copy from pinned memory). While they stay under the plan's hint (the longest length
# rounded up to 256 tokens), the recorded launches, and any CUDA graph captured from them, stay valid and
# `update` returns True; past it, the plan re-plans and returns False, and a captured graph must be captured
# again.

# %%
print("still valid:", plan.update([6, 31, 18]))

# %% [markdown]
# ## 3. CUDA graphs
#
# A CUDA graph records a sequence of launches once and replays it with one call: no Python, no launcher, no
# per-kernel host cost. Capture forbids syncs and host-to-device copies of fresh data, which is exactly what a
# plan's `run` avoids, so a decode step (all layers) can be captured once per hint bucket:
#
# ```python
# out = torch.empty_like(q)
# graph = torch.cuda.CUDAGraph()
# plan.run(q, out=out)                      # warm-up: compiles, records
# with torch.cuda.graph(graph):
#     plan.run(q, out=out)
# for step in range(n):
#     q.copy_(next_q); plan.update(lengths) # metadata in place
#     graph.replay()                        # the whole step, one host call
# ```
#
# Since the default call reads nothing on the host either, `attn.decode(...)` itself can be captured the same
# way; the plan's advantage is the host time of the calls it replaces, and that it carries the metadata.
# `tests/test_plan.py` captures every public entry with its default arguments, and every `plan.run`.
#
# `bench/bench_decode.py` times five rows per cache: the default call as a user writes it, `validate=True` (the
# old default), the hinted flat call, `plan.run`, and the plan replayed from a graph, each with its host time
# and its ratio to the best peer.
#
# ## 4. torch.compile
#
# `torch.compile` cannot trace into a Triton launcher's host checks, and a value read on the host becomes a
# data-dependent guard it cannot handle. So each entry is also a custom operator (`torch.ops.attn.decode`,
# `attn::attention`, `attn::context_attention`, `attn::append_kv`, `attn::preprocess`, `attn::gpt_attention`)
# with a fake implementation (the output's shape without running anything) and `mutates_args` for the cache
# writes. `attn.decode` and the others call the operator only while compiling; in eager mode they call the
# launcher directly, because operator dispatch costs host time. The kernels are forward-only: `.backward()`
# through them raises a clear error.


# %%
def step(q, k, v, lens, table):
    return attn.decode(q, k, v, lens, block_table=table) * 2  # the default call: no value read on the host


compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # inductor (the default) on a GPU
print("compiled == eager:", torch.equal(compiled(q, cache.k, cache.v, seqlens, table),
                                         step(q, cache.k, cache.v, seqlens, table)))  # fmt: skip

# %% [markdown]
# `fullgraph=True` fails on any graph break, so the line above also says the decode call is one node of the
# graph. `tests/test_compile.py` runs a two-layer model (prefill, then decode steps over a paged cache) the
# same way, and on the GPU with inductor and `mode="reduce-overhead"`, which captures the compiled graph in a
# CUDA graph: section 3 done by the compiler. That test also checks that the graphs were really captured (the
# attn kernels ran while the stream was capturing, and inductor skipped none).
