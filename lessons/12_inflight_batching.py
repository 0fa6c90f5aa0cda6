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
# # Inflight batching
#
# A server does not receive its requests in tidy batches. They arrive one by one, with prompts of any length,
# and each stops after its own number of generated tokens. Batching them naively, waiting for a batch to fill
# and then running it until its longest request is done, leaves the GPU idle in two ways: finished requests
# keep their place until the whole batch ends, and new ones wait outside. *Inflight* (or *continuous*) batching
# re-forms the batch at every step instead: Orca's iteration-level scheduling (Yu et al., OSDI 2022), called
# inflight batching in TensorRT-LLM. A step then mixes two kinds of work:
#
# - **context** requests: a prompt, or the next *chunk* of a long prompt (chunked prefill, as in Sarathi,
#   Agrawal et al. 2024), whose tokens attend to the request's earlier chunks and to themselves;
# - **generation** requests: one new token each, attending to everything cached for its request.
#
# This lesson covers:
#
# 1. static and inflight batching side by side, as a timeline;
# 2. one step's packed buffer and its metadata, `attn.InflightBatch`, drawn;
# 3. `attn.gpt_attention`, TensorRT-LLM's op: what it does per request, and the batched kernels checked live
#    against the request-by-request reference;
# 4. chunked prefill: a prompt in chunks gives exactly what one pass gives;
# 5. the end-to-end demo: a small decoder served with continuous batching, every token checked, the cache
#    blocks in use over time;
# 6. what the mixed step costs on an H200.

# %%

import _figures
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

import attn
from attn import InflightBatch, reference
from attn.inflight import CONTEXT, GENERATION

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"


def maxdiff(a, b):
    """Largest absolute difference, in float64 so the comparison adds no rounding of its own."""
    return (a.double() - b.double()).abs().max().item()


# %% [markdown]
# ## 1. Static and inflight batching
#
# Six requests with different prompt and output lengths arrive over time; the GPU holds at most four at once.
# We simulate both schedulers step by step (one step = one token for every running request; a prompt costs one
# step here, to keep the picture simple) and draw, for each request, when it waits and when it runs.

# %%
ARRIVALS = [0, 0, 1, 3, 4, 6]
OUTPUTS = [9, 3, 5, 7, 2, 4]
SLOTS = 4


def simulate(inflight):
    """Per request, the (start, end) of its run; static batching starts a batch only when the last one ended."""
    start, end = {}, {}
    running, step, waiting = [], 0, list(range(len(ARRIVALS)))
    while waiting or running:
        arrived = [r for r in waiting if ARRIVALS[r] <= step]
        if inflight or not running:
            for r in arrived[: SLOTS - len(running)]:
                waiting.remove(r)
                running.append(r)
                start[r] = step
        step += 1
        for r in list(running):
            if step - start[r] >= OUTPUTS[r] + 1:  # one step of prompt, then its tokens
                end[r] = step
                running.remove(r)
        if not inflight and running and all(step - start[r] >= OUTPUTS[r] + 1 for r in running):
            running = []
    return start, end


# %% tags=["hide-input"]
fig, axes = plt.subplots(1, 2, figsize=(12, 3.2), sharey=True)
for ax, inflight in zip(axes, (False, True)):
    start, end = simulate(inflight)
    for r in range(len(ARRIVALS)):
        ax.add_patch(Rectangle((ARRIVALS[r], r - 0.35), start[r] - ARRIVALS[r], 0.7, color="0.85"))
        ax.add_patch(Rectangle((start[r], r - 0.35), 1, 0.7, color="tab:orange"))
        ax.add_patch(Rectangle((start[r] + 1, r - 0.35), end[r] - start[r] - 1, 0.7, color="tab:blue"))
    total = max(end.values())
    busy = sum(OUTPUTS) + len(OUTPUTS)
    ax.set_xlim(0, 26)
    ax.set_ylim(-0.6, len(ARRIVALS) - 0.4)
    ax.set_yticks(range(len(ARRIVALS)), [f"request {r}" for r in range(len(ARRIVALS))])
    ax.set_xlabel("step")
    kind = "inflight: the batch re-forms every step" if inflight else "static: a batch runs until its longest ends"
    ax.set_title(f"{kind}\nall done at step {total}; slots busy {busy / (SLOTS * total):.0%}", fontsize=9)
axes[0].invert_yaxis()
handles = [Rectangle((0, 0), 1, 1, color=c) for c in ("0.85", "tab:orange", "tab:blue")]
fig.legend(handles, ["waiting", "prompt (context)", "generating"], loc="lower center", ncol=3, fontsize=8)
fig.tight_layout(rect=(0, 0.08, 1, 1))
plt.show()

# %% [markdown]
# Under static batching request 1 finishes early but its slot stays empty until request 0 is done, and requests
# 3 to 5 wait for a whole batch to drain. Under inflight batching a slot is refilled the step after it frees,
# so prompts (orange) and generation (blue) of different requests run in the same step. That mixed step is
# what the attention op has to handle.
#
# ## 2. One step's packed buffer
#
# All new tokens of a step travel in one buffer of fused QKV projections `[T, (Hq + 2·Hkv)·D]`, request after
# request. Per request the scheduler knows three numbers: its type, how many tokens it adds now (a chunk's
# length, or 1 for generation) and how many its cache held before. TensorRT-LLM calls them `request_types`,
# `context_lengths` and `past_key_value_lengths`, and wants the context requests first; `attn` accepts any order.
# `InflightBatch.build` validates them once per step, on the host, and prepares every device tensor the kernels
# read, so the op itself never waits on the host.

# %%
HQ, HKV, D, BLOCK = 4, 2, 16, 4
types = [GENERATION, CONTEXT, GENERATION, CONTEXT, GENERATION]
new = [1, 6, 1, 4, 1]
past = [9, 0, 4, 7, 13]  # request 1 is a fresh prompt, request 3 the second chunk of a longer one
cache = attn.PagedKVCache(num_blocks=32, block_size=BLOCK, num_heads_kv=HKV, head_dim=D, max_seqs=8,
                          max_blocks_per_seq=8, dtype=torch.float32, device=device)  # fmt: skip
slots = [cache.add_sequence() for _ in types]
# the earlier tokens of each request, written as earlier steps would have
for s, n in zip(slots, past):
    if n:
        cache.append([s], torch.randn(1, n, HKV, D, device=device), torch.randn(1, n, HKV, D, device=device))
cache.reserve_tokens(slots, new)  # blocks for this step's tokens, all or nothing
_, table = cache.metadata(slots)
batch = InflightBatch.build(types, new, past, block_table=table)
print("cu_seqlens_new       ", batch.cu_seqlens_new.tolist())
print("cache_seqlens_before ", batch.cache_seqlens_before.tolist())
print("cache_seqlens_after  ", batch.cache_seqlens_after.tolist())
print("context rows         ", batch.context_rows.tolist())
print("generation rows      ", batch.generation_rows.tolist())

# %% tags=["hide-input"]
colors = plt.get_cmap("tab10")
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2.4]})
bounds = batch.cu_seqlens_new.tolist()
for b in range(batch.batch):
    for row in range(bounds[b], bounds[b + 1]):
        hatch = "" if types[b] == CONTEXT else "//"
        ax1.add_patch(Rectangle((0, row), 1, 1, facecolor=colors(b), alpha=0.75, hatch=hatch, edgecolor="w"))
    kind = "chunk" if types[b] == CONTEXT else "gen"
    ax1.text(1.1, (bounds[b] + bounds[b + 1]) / 2, f"req {b}: {kind}, past {past[b]}", va="center", fontsize=8)
ax1.set_xlim(0, 3.2)
ax1.set_ylim(batch.num_tokens, 0)
ax1.set_xticks([])
ax1.set_ylabel("row of the packed QKV buffer")
ax1.set_title("the buffer (hatched: generation tokens)", fontsize=9)
# which cached token each row attends to: its request's prefix plus itself, bottom-right causal
for b in range(batch.batch):
    after = past[b] + new[b]
    for i, row in enumerate(range(bounds[b], bounds[b + 1])):
        sees = past[b] + i + 1
        ax2.add_patch(Rectangle((0, row), sees, 1, facecolor=colors(b), alpha=0.75, edgecolor="w", lw=0.3))
        ax2.add_patch(Rectangle((sees, row), after - sees, 1, facecolor="0.92", edgecolor="w", lw=0.3))
for x in range(0, 20, BLOCK):
    ax2.axvline(x, color="0.5", lw=0.5, ls=":")
ax2.set_xlim(0, 18)
ax2.set_ylim(batch.num_tokens, 0)
ax2.set_xlabel(f"position in the request's cache (dotted: {BLOCK}-token block edges)")
ax2.set_title("what each row attends to (grey: its cache's later tokens, hidden by the causal mask)", fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# A chunk's rows form a staircase that starts at its prefix (request 3 sees its 7 cached tokens plus the chunk
# up to itself); a generation row sees its whole cache. Every row reads its keys through its request's block
# table, so a step's work is a packed set of queries over a paged cache: the job of `attn.context_attention`,
# which is the fused prefill kernel reading its K/V through the block table.
#
# ## 3. The op: `attn.gpt_attention`
#
# Per request, TensorRT-LLM's GPT attention op does three things, and `attn.reference.gpt_attention` does them
# literally, one request at a time:
#
# 1. split the request's rows into q, k and v heads, add the QKV bias, rotate q and k by RoPE at positions
#    `past, past + 1, ...`;
# 2. append k and v to the request's cache (quantizing them for an INT8/FP8 cache);
# 3. let the new queries attend, causally, to everything the cache now holds for the request.
#
# `attn.gpt_attention` runs the whole step batched: one pre-processing launch over every row, then either one
# `context_attention` launch over the mixed batch (`mode="unified"`) or one launch per phase, with the split-K
# decode kernel for the generation rows (`mode="split"`, the default for a paged cache: section 6 says why).
# Everything is validated before the cache changes, so a rejected step leaves it untouched. Both against the
# reference, each on its own copy of the cache:

# %%
qkv = torch.randn(batch.num_tokens, (HQ + 2 * HKV) * D, device=device)
kw = dict(num_heads_q=HQ, num_heads_kv=HKV, rotary_dim=D, qkv_bias=torch.randn(qkv.shape[1], device=device))
k_ref, v_ref = cache.k.clone(), cache.v.clone()
want = reference.gpt_attention(qkv, batch, k_ref, v_ref, **kw)
for mode in ("unified", "split"):
    k_pool, v_pool = cache.k.clone(), cache.v.clone()
    got = attn.gpt_attention(qkv, batch, k_pool, v_pool, mode=mode, **kw)
    print(f"{mode:8s} output vs reference {maxdiff(got, want):.1e}, k cache {maxdiff(k_pool, k_ref):.1e}, "
          f"v cache {maxdiff(v_pool, v_ref):.1e}")  # fmt: skip
    assert maxdiff(got, want) < 1e-4 and maxdiff(k_pool, k_ref) < 1e-5

# %% [markdown]
# A step the op must refuse, and the proof that it changed nothing: a buffer one row short of the batch.

# %%
before = cache.k.clone()
try:
    attn.gpt_attention(qkv[:-1], batch, cache.k, cache.v, **kw)
except ValueError as e:
    print("ValueError:", e)
print("cache unchanged:", torch.equal(cache.k, before))

# %% [markdown]
# ## 4. Chunked prefill changes nothing
#
# Splitting a prompt into chunks is only a scheduling decision: the attention of every token must be what one
# pass over the whole prompt gives. One request, a 14-token prompt run as chunks of 5, 6 and 3 in three steps,
# then two generated tokens, against a single causal attention over all 16 tokens (RoPE at the same positions):

# %%
one = attn.PagedKVCache(num_blocks=8, block_size=BLOCK, num_heads_kv=HKV, head_dim=D, max_seqs=1,
                        max_blocks_per_seq=8, dtype=torch.float32, device=device)  # fmt: skip
slot = one.add_sequence()
tokens = torch.randn(16, (HQ + 2 * HKV) * D, device=device)
outs, pos = [], 0
for n in (5, 6, 3, 1, 1):
    one.reserve_tokens([slot], [n])
    step = InflightBatch.build([CONTEXT if n > 1 or pos < 14 else GENERATION], [n], [pos],
                               block_table=one.metadata([slot])[1])  # fmt: skip
    outs.append(attn.gpt_attention(tokens[pos : pos + n], step, one.k, one.v, num_heads_q=HQ, num_heads_kv=HKV,
                                   rotary_dim=D))  # fmt: skip
    one.advance([slot], [n])
    pos += n
heads = tokens.view(16, HQ + 2 * HKV, D)
p = torch.arange(16, device=device, dtype=torch.int32)
q = reference.apply_rope(heads[:, :HQ], p, rotary_dim=D)
k = reference.apply_rope(heads[:, HQ : HQ + HKV], p, rotary_dim=D)
cu = torch.tensor([0, 16], dtype=torch.int32, device=device)
whole = reference.attention(q, k, heads[:, HQ + HKV :], cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
print(f"chunks 5+6+3, then 2 generated tokens, vs one pass: max difference {maxdiff(torch.cat(outs), whole):.1e}")

# %% [markdown]
# ## 5. The demo: a model served with continuous batching
#
# `python -m attn.demo` puts it together. A small GPT-style decoder (random weights; pre-norm blocks, fused QKV
# with bias, RoPE, GQA) whose every attention layer is one `attn.gpt_attention` call over a paged cache per
# layer. Requests arrive every other step; each step the scheduler gives every running request its next token
# and fills a budget of 16 tokens with prompt chunks. Blocks are reserved as sequences grow and returned when
# they finish. Every sampled token's logits are compared with a naive recompute of the whole sequence, without
# any cache, in float32; a mismatch stops the run. (On a GPU, `--device cuda --large` serves a 8-layer bf16
# model.)

# %%
from attn import demo  # noqa: E402

report = demo.main(["--requests", "10"])

# %%
fig, ax = plt.subplots(figsize=(8, 3))
steps = range(len(report["blocks_used"]))
ax.step(steps, report["blocks_used"], where="post", label=f"cache blocks in use (of {report['num_blocks']})")
ax.step(steps, report["running"], where="post", label="requests running")
ax.set_xlabel("step")
ax.set_title(f"{report['requests']} requests, {report['generated_tokens']} generated tokens, all "
             f"{report['logits_checked']} checked against the naive recompute", fontsize=9)  # fmt: skip
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The block count rises as prompts are admitted and sequences grow, falls as requests finish, and returns to
# zero: nothing leaks. The scheduler admits a request only when the pool can hold its whole lifetime (prompt
# plus its maximum output), so no running request is ever short of a block; real servers admit more
# optimistically and preempt (swap out or recompute) when the pool runs dry.
#
# ## 6. What the mixed step costs on an H200
#
# `bench/bench_inflight.py` times one step of 4 fresh prompts of 2048 tokens and 60 generation requests on
# 4096 cached tokens (GQA 32/8, D = 128, 64-token blocks, bf16) three ways: the op with one attention launch
# (`unified`), the op with one launch per phase (`split`), and what a caller without the op would launch
# (pre-processing, `attn.attention` on the packed prompts, `attn.decode` on the generation requests). Each is
# timed with events, as a caller without CUDA graphs sees it, and its host time per call is measured beside;
# the op's schedules, which read nothing back on the host, are also replayed from a CUDA graph: the device's
# time alone.

# %%
record = _figures.result("inflight_H200_2026-11-29.json")
print(f"{'':22s} {'events':>8s} {'vs separate':>12s} {'host':>8s} {'graph':>8s}")
for name, r in record["results"].items():
    graph = f"{r['graph_ms'] * 1e3:6.0f}us" if r.get("graph_ms") else "       -"
    print(f"  {name:20s} {r['ms'] * 1e3:6.0f}us {r.get('speedup_vs_separate', 1):11.2f}x {r['host_us']:6.0f}us {graph}")

# %% [markdown]
# Read the columns together. As a caller without graphs sees it, one `gpt_attention` call is about 1.7× faster
# than the separate calls, but the separate calls are *host-bound*: their host time per call (about 2 ms:
# the packed prefill checks its lengths on the host, and each of the three launches has its own checks) is
# longer than their device time, so the GPU waits. The op builds the per-token metadata once per step (in
# `InflightBatch`) and checks once, so its host time stays below its device time.
#
# On the device alone, the mixed launch is *not* faster: attention in one launch takes about 1.06 ms against
# 0.93 ms for the separate kernels. The 60 generation requests fill 4 of a 128-row tile each, and their
# programs stream 4096 keys serially while the prompts' programs compute; the split schedule gives them the
# decode kernel's split-K instead, and matches the separate kernels. Overlapping the two phases on two CUDA
# streams measured no gain either (`inflight_H200_2026-11-29_overlap.json`): the prefill grid fills every SM.
# A unified kernel that beats separate launches would need decode-shaped tiles (few rows, split keys) inside
# the same grid, which `attn` does not have yet.

# %% [markdown]
# ## Summary
#
# - Inflight batching re-forms the batch every step: finished requests leave, new ones join, and a step mixes
#   prompt chunks with generation tokens.
# - `attn.InflightBatch` turns the scheduler's per-request lists (type, new tokens, cached tokens) into the
#   packed buffer's metadata once per step; any order of requests works.
# - `attn.gpt_attention` = pre-processing (bias, RoPE, append, quantization) + attention of packed queries over
#   a paged cache, in one launch for the whole mixed batch or one per phase; everything is checked before the
#   cache changes.
# - Chunked prefill is exact: chunks plus generation steps give what one pass gives.
# - The demo serves a model with continuous batching, checking every token against a cache-free recompute.
