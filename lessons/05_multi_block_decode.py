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
# # Multi-block (split-K) decode
#
# Lesson 03 ended with a decode kernel that streams the KV cache at the copy bandwidth, provided the batch has
# enough (sequence, KV head) pairs to give every SM work. This lesson handles the case where it does not: one
# long request, or a handful of them. The fix is to split each cache along its length into chunks that
# separate programs read in parallel, and to merge their results afterwards. It was published as
# *Flash-Decoding* (Tri Dao and colleagues, 2023); TensorRT-LLM calls it *multi-block mode*, FlashInfer
# *split-KV*, and FlashAttention exposes it as the `num_splits` argument of `flash_attn_with_kvcache`.
#
# 1. why one program per (sequence, KV head) leaves the GPU idle;
# 2. the split, in a picture;
# 3. the merge: derived, proved equal to the full softmax, and made safe for empty chunks;
# 4. the merge in a few lines of torch, checked against `attn.reference.decode`;
# 5. how our kernel cuts the cache, and `attn.fast.decode` with `num_splits = 1, 2, 3, ...`;
# 6. the heuristic that picks the split count, and the H200 measurements behind it.
#
# The Triton kernels run in Triton's CPU interpreter when there is no GPU, so live shapes are tiny; the speed
# numbers come from files measured on an H200, not from your machine.

# %%
import inspect
import re
import sys

import _figures
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, Rectangle

import attn
from attn import reference

torch.manual_seed(0)
torch.set_printoptions(precision=4, sci_mode=False)

# on a GPU the kernels run for real and need their inputs there; on a CPU the interpreter reads ordinary tensors
device = "cuda" if torch.cuda.is_available() else "cpu"
NUM_SMS = 132  # H200


def maxdiff(a, b):
    """Largest absolute difference, taken in float64 so the comparison adds no rounding of its own."""
    return (a.double() - b.double()).abs().max().item()


# %% [markdown]
# ## 1. Too few programs
#
# Our decode kernel gives one program each (sequence, KV head) pair, and that program serves the pair's $G$
# query heads (GQA packing, lesson 03) by walking the whole cache of that sequence from start to end. The grid
# has $B \cdot H_{kv}$ programs. An H200 has 132 SMs, and a single SM can keep only so many memory requests in
# flight: the 4.8 TB/s of HBM are reached only when most SMs are busy streaming. For the decode shapes of the
# project's benchmark:

# %%
shapes = [
    # (batch, Hq, Hkv, cache length)
    (64, 32, 8, 4096),
    (8, 32, 8, 32768),
    (1, 32, 8, 131072),
    (128, 32, 32, 2048),
]
print(f"{'shape':22s} {'programs':>8s}  SMs with work")
for b, hq, hkv, length in shapes:
    programs = b * hkv
    busy = min(programs, NUM_SMS)
    print(f"{f'B{b} H{hq}/{hkv} L{length}':22s} {programs:8d}  {busy:3d} of {NUM_SMS} ({busy / NUM_SMS:4.0%})")

# %% [markdown]
# A single long request, the case that matters for long-context chat and agents, keeps 8 of 132 SMs busy, and
# each of those 8 programs reads 131072 keys in a row. Batch 8 is better but still leaves half the SMs idle.
# There is no other axis to spread over: $S_q = 1$, and the $G$ query heads already share one program (lesson
# 03). The only long axis left is the cache length.
#
# ## 2. The split
#
# Cut each sequence's cache into $n$ chunks and launch $B \cdot H_{kv} \cdot n$ programs. Program $s$ attends
# the new token's queries to its chunk only, as if the chunk were the whole cache, and writes a *partial*
# result: its normalized output $o_s$ and the log-sum-exp $\ell_s$ of its scores. Then the $n$ partials of
# each query row are merged into the final output: by a second, tiny kernel in FlashDecoding, and in `attn` by
# whichever program of the sequence finishes last (section 5).

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(9, 3.6))
n_chunks, colors = 4, plt.cm.tab10.colors
for s in range(n_chunks):
    x0 = 0.5 + s * 2.0
    ax.add_patch(Rectangle((x0, 3.0), 2.0, 0.6, color=colors[s], alpha=0.7))
    ax.text(x0 + 1.0, 3.3, f"keys of chunk {s + 1}", ha="center", va="center", fontsize=8)
    ax.add_patch(Rectangle((x0 + 0.3, 1.6), 1.4, 0.6, fill=False, ec=colors[s], lw=1.5))
    ax.text(x0 + 1.0, 1.9, f"program {s + 1}:\n$o_{s + 1}$, $\\ell_{s + 1}$", ha="center", va="center", fontsize=8)
    ax.add_patch(FancyArrowPatch((x0 + 1.0, 3.0), (x0 + 1.0, 2.22), arrowstyle="->", mutation_scale=10))
    ax.add_patch(FancyArrowPatch((x0 + 1.0, 1.6), (4.5, 0.82), arrowstyle="->", mutation_scale=10, color="0.4"))
ax.add_patch(Rectangle((3.3, 0.2), 2.4, 0.6, fill=False, ec="k", lw=1.5))
ax.text(4.5, 0.5, "merge: $\\ell$, $o$", ha="center", va="center", fontsize=9)
ax.text(0.5, 3.8, "KV cache of one (sequence, KV head), L tokens", fontsize=9)
ax.text(8.7, 1.9, "one query row,\nall G heads\nin every program", fontsize=8, va="center")
ax.set_xlim(0, 10.5)
ax.set_ylim(0, 4.1)
ax.axis("off")
plt.show()

# %% [markdown]
# ## 3. The merge
#
# Fix one query row with scores $x_j$ (already scaled, masked keys at $-\infty$) over the keys $j = 1..L$. Full
# attention returns
#
# $$\ell = \log \sum_{j} e^{x_j}, \qquad o = \sum_j e^{x_j - \ell}\, v_j .$$
#
# Split the keys into disjoint chunks $J_1, \dots, J_n$. Chunk $s$ computes the same two quantities over its own
# keys only:
#
# $$\ell_s = \log \sum_{j \in J_s} e^{x_j}, \qquad o_s = \sum_{j \in J_s} e^{x_j - \ell_s}\, v_j .$$
#
# **Merge rule.** $\ell = \log \sum_s e^{\ell_s}$ (a log-sum-exp over the chunks), and
# $o = \sum_s e^{\ell_s - \ell}\, o_s$.
#
# **Proof.** The chunks partition the keys, so the sum over all keys is the sum over chunks of the sums inside
# them: $\sum_j e^{x_j} = \sum_s \sum_{j \in J_s} e^{x_j} = \sum_s e^{\ell_s}$. Taking logs gives the first
# identity. For the second, write each weight of the full softmax as the chunk's weight times a correction:
# $e^{x_j - \ell} = e^{\ell_s - \ell}\, e^{x_j - \ell_s}$ for $j \in J_s$. Then
#
# $$o = \sum_s \sum_{j \in J_s} e^{\ell_s - \ell}\, e^{x_j - \ell_s}\, v_j
#     = \sum_s e^{\ell_s - \ell} \sum_{j \in J_s} e^{x_j - \ell_s}\, v_j
#     = \sum_s e^{\ell_s - \ell}\, o_s . \qquad \blacksquare$$
#
# The merge weights $w_s = e^{\ell_s - \ell}$ are positive and sum to 1 (by the first identity): the output is
# a convex combination of the partial outputs, each chunk weighted by its share of the total softmax mass. No
# chunk needs to know the others' maxima; that is what makes the chunks independent. It is the same rescaling
# as the online softmax inside the kernel's loop, applied once more, between programs instead of between
# tiles. The rule is also associative: merging $(1, 2)$ and then $3$ gives the same pair as merging all three,
# which is what lets FlashInfer merge "attention states" in any order, for example a shared prompt prefix
# computed once with each request's own suffix.
#
# **Empty chunks.** A chunk can see no key at all: it lies past the end of a short sequence, outside a
# sliding window, or (with several new tokens and `causal=True`) after a given row's diagonal. Its sum is
# empty, so $\ell_s = \log 0 = -\infty$ and its weight $e^{-\infty} = 0$: it contributes nothing, as it should,
# provided $o_s$ is a finite number (0 by convention; $0 \cdot \text{NaN}$ would still be NaN). Computed
# literally, though, a merge of rows whose chunks are *all* empty evaluates $e^{-\infty - (-\infty)}$, which is
# NaN. Stable code subtracts the largest $\ell_s$, $m$, before exponentiating (for the same overflow reasons as
# any softmax) and replaces $m = -\infty$ by 0; the row then gets $\ell = -\infty$ and $o = 0$, the library's
# convention for a row with no visible key.
#
# ## 4. The merge in torch
#
# First the partial attention of one chunk, for all query rows of one sequence, written from the definition
# (float64, GQA by viewing the query heads as `[Hkv, G]` as in lesson 01). Rows with no visible key get
# $o_s = 0$, $\ell_s = -\infty$.


# %%
def partial_attention(q, k, v, lo, hi, causal):
    """Attention of q [Sq, Hq, D] over keys lo..hi-1 of k, v [L, Hkv, D] -> o_s [Sq, Hq, D], lse_s [Sq, Hq]."""
    sq, hq, d = q.shape
    length, hkv, _ = k.shape
    qg = q.double().view(sq, hkv, hq // hkv, d)
    x = torch.einsum("ihgd,jhd->ihgj", qg, k[lo:hi].double()) / d**0.5  # [Sq, Hkv, G, hi-lo]
    if causal:
        # new token i sits at position L - Sq + i (bottom-right alignment)
        visible = torch.arange(lo, hi)[None, :] <= torch.arange(sq)[:, None] + length - sq
        x = x.masked_fill(~visible[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(x, dim=-1)  # -inf where nothing is visible
    p = torch.exp(x - lse[..., None]).nan_to_num(0.0)  # an empty row is 0/0: no weight anywhere
    o = torch.einsum("ihgj,jhd->ihgd", p, v[lo:hi].double())
    return o.reshape(sq, hq, d), lse.reshape(sq, hq)


def merge(o_parts, lse_parts):
    """Partials o [n, ..., D] and lse [n, ...] of disjoint chunks -> the full (o [..., D], lse [...])."""
    m = lse_parts.max(dim=0).values
    m = torch.where(m == float("-inf"), 0.0, m)  # all chunks empty: avoid -inf - -inf
    w = torch.exp(lse_parts - m)  # [n, ...], in (0, 1], 0 for empty chunks
    total = w.sum(dim=0)
    lse = m + torch.log(total)  # log(0) = -inf for a row with no key at all
    o = (w[..., None] * o_parts).sum(dim=0) / torch.where(total > 0, total, 1.0)[..., None]
    return o, lse


# %% [markdown]
# Now a batch of two sequences, cut into uneven chunks on purpose, with three new tokens attending causally,
# checked against the reference. In the second sequence, the last chunk holds only the final key, which only
# the last of the three new tokens may see: for the other two rows that chunk is empty.

# %%
HQ, HKV, D, SQ = 8, 2, 32, 3
lengths = [53, 20]
q = torch.randn(2, SQ, HQ, D)
k_cache, v_cache = torch.randn(2, 64, HKV, D), torch.randn(2, 64, HKV, D)
cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
ref_out, ref_lse = reference.decode(
    q.double(), k_cache.double(), v_cache.double(), cache_seqlens, causal=True, return_lse=True
)

cuts = {53: [0, 5, 30, 31, 53], 20: [0, 12, 19, 20]}
for b, length in enumerate(lengths):
    k, v = k_cache[b, :length], v_cache[b, :length]
    parts = [partial_attention(q[b], k, v, lo, hi, causal=True) for lo, hi in zip(cuts[length], cuts[length][1:])]
    o_parts, lse_parts = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    o, lse = merge(o_parts, lse_parts)
    empty = (lse_parts == float("-inf")).sum().item()
    err, err_lse = maxdiff(o, ref_out[b]), maxdiff(lse, ref_lse[b].transpose(0, 1))
    print(f"L={length}: chunks {cuts[length]}, {empty} empty partials; err {err:.1e}, lse {err_lse:.1e}")
    # the reference returns its lse in float32 whatever the input
    assert err < 1e-12 and err_lse < 1e-5

# %% [markdown]
# Two more properties, checked on the last sequence's partials: the merge is associative, and a row whose
# chunks are all empty comes out as zeros with $\ell = -\infty$, where the literal formula gives NaN.

# %%
o_12, lse_12 = merge(o_parts[:2], lse_parts[:2])
o_tree, lse_tree = merge(torch.stack([o_12, o_parts[2]]), torch.stack([lse_12, lse_parts[2]]))
print(f"merge(merge(1, 2), 3) vs merge(1, 2, 3): {maxdiff(o_tree, o):.1e}")
assert maxdiff(o_tree, o) < 1e-12

nothing = torch.full((3, 1), float("-inf"), dtype=torch.float64)
o_none, lse_none = merge(torch.zeros(3, 1, D, dtype=torch.float64), nothing)
literal = torch.exp(nothing - torch.logsumexp(nothing, dim=0))
print(f"all chunks empty: literal weights {literal.flatten().tolist()}")
print(f"                  guarded merge: lse {lse_none.item()}, largest |o| {o_none.abs().max().item()}")
assert lse_none.item() == float("-inf") and o_none.abs().max().item() == 0

# %% [markdown]
# ## 5. Where the kernel cuts, and `num_splits`
#
# `attn.fast.decode` runs the split as a grid of `(B·Hkv, num_splits)` programs. Program `split` of a sequence
# of $L$ cached tokens takes the keys
#
# $$\text{chunk} = \left\lceil \lceil L / n \rceil / \texttt{BLOCK\_N} \right\rceil \cdot \texttt{BLOCK\_N},
# \qquad [\,\text{split}\cdot\text{chunk},\ \min((\text{split}+1)\cdot\text{chunk},\ L)\,),$$
#
# whole tiles of `BLOCK_N` keys, so that no tile is shared by two programs. Every sequence of a batch gets
# the same $n$, so a short sequence in a batch with long ones ends up with empty trailing splits: they write
# $o_s = 0$, $\ell_s = -\infty$, and the merge ignores them. The partials are kept in float32 whatever
# the input dtype, and only the merged output is rounded to it.
#
# **Who merges.** A separate merging kernel is the textbook form, but every launch costs the host tens of
# microseconds, and at small batch, where splitting matters, the kernel itself takes little more than a hundred:
# two launches made an eager B1 L131072 call host-bound (2.2 TB/s instead of 4.0 on one H200 host). So the merge
# runs inside the same launch, as TensorRT-LLM's multi-block mode does it. After writing its partial, each
# program adds 1 to a counter of its (sequence, KV head) pair; the program that sees $n - 1$ is the last, reads
# all $n$ partials back and writes the output, then puts the counter back to 0 for the next call. Two things
# make that safe: a barrier before the atomic (every thread's partial stores happen before it) with the
# atomic's release and acquire at GPU scope (the stores are visible to the SM that merges), and reads that skip
# the merging SM's L1 cache, which is not kept coherent with other SMs' writes:

# %%
# the package exports the function `decode`, which hides the module of the same name
_src = inspect.getsource(sys.modules["attn.fast.decode"]._decode_kernel.fn)
_a = _src.index("        tl.debug_barrier()\n        arrived")
print(_src[_a : _src.index("\n", _src.index("if arrived", _a))])

# %% [markdown]
# Under the interpreter the kernel uses `BLOCK_N = 16` (on a GPU the autotuner picks 32 to 128). Here are the
# chunks of a batch with lengths 70, 33 and 3, for a few split counts:

# %%
BLOCK_N_INTERPRETER = 16


def cdiv(a, b):
    return (a + b - 1) // b


def kernel_chunks(length, n, block_n=BLOCK_N_INTERPRETER):
    chunk = cdiv(cdiv(length, n), block_n) * block_n
    return [(s * chunk, min((s + 1) * chunk, length)) for s in range(n)]


for n in (1, 2, 3, 5):
    per_seq = [kernel_chunks(length, n) for length in (70, 33, 3)]
    row = "  ".join(" ".join(f"[{lo},{hi})" if lo < hi else "empty" for lo, hi in chunks) for chunks in per_seq)
    print(f"n={n}: {row}")

# %% [markdown]
# Now the kernel itself, for $n = 1$ to 6, with one new token and with three (causal), in float32 and float16,
# against the float64 reference. The tolerance rule is lesson 01's: at most twice the error of PyTorch in the
# kernel's own precision. The slots past each sequence's length are filled with NaN, so a split that read past
# its end would show. Then the outputs for different $n$ are compared with each other: they differ only by
# rounding, since the order of the additions changes.

# %%
lengths = torch.tensor([70, 33, 3], dtype=torch.int32, device=device)
# bfloat16 only on a GPU: the CPU interpreter cannot do bfloat16 arithmetic
dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
for dtype in dtypes:
    k_cache = torch.randn(3, 80, HKV, D, dtype=dtype, device=device)
    v_cache = torch.randn(3, 80, HKV, D, dtype=dtype, device=device)
    for b, n_tok in enumerate(lengths.tolist()):
        k_cache[b, n_tok:] = float("nan")
        v_cache[b, n_tok:] = float("nan")
    for sq, causal in ((1, False), (3, True)):
        q = torch.randn(3, sq, HQ, D, dtype=dtype, device=device)
        exact, exact_lse = reference.decode(
            q.double(), k_cache.double(), v_cache.double(), lengths, causal=causal, return_lse=True
        )
        budget = 2 * maxdiff(reference.decode(q, k_cache, v_cache, lengths, causal=causal), exact) + 1e-5
        outs = []
        for n in range(1, 7):
            out, lse = attn.fast.decode(q, k_cache, v_cache, lengths, causal=causal, num_splits=n, return_lse=True)
            assert not out.isnan().any(), n
            assert maxdiff(out, exact) <= budget and maxdiff(lse, exact_lse) < 1e-4, (dtype, sq, n)
            outs.append(out)
        worst = max(maxdiff(out, exact) for out in outs)
        spread = max(maxdiff(out, outs[0]) for out in outs)
        print(
            f"{str(dtype)[6:]:8s} Sq={sq} causal={causal!s:5s}: n=1..6 worst err {worst:.1e} <= {budget:.1e};"
            f" largest difference between split counts {spread:.1e}"
        )

# %% [markdown]
# In float16 two split counts can differ by one unit in the last place of the output: the merged float32 value
# lands on either side of a rounding boundary. Both are within the budget.
#
# ## 6. How many splits
#
# More splits mean more programs, but each one also pays fixed costs: it loads its queries, fills its loop's
# software pipeline, writes a partial of $S_q \cdot H_q \cdot (D + 1)$ float32 numbers, and all of them are read
# back by the merging program, which works while the rest of the GPU may already be idle. With too many, chunks
# become a tile or two long and those costs dominate.
# The heuristic, `attn.fast.choose_num_splits(batch, num_heads_kv, max_seqlen_k, num_sms)` (and
# `total_seqlen_k`, for ragged batches: below):
#
# - if $B \cdot H_{kv} \ge$ the number of SMs, no split: the grid already fills the GPU;
# - otherwise aim at about eight "waves", $8 \cdot 132$ programs, so that every SM has several programs to
#   overlap and the last, partial wave is a small fraction of the run;
# - but never chunks shorter than 4096 keys, and never more than 256 splits.
#
# What it picks for the benchmark's shapes (B64, B8, B1 with 32/8 heads at three lengths, and the MHA shape),
# with `num_sms = 132`:

# %%
print(f"{'shape':22s} {'programs':>8s} {'splits':>6s} {'keys/split':>10s} {'grid':>6s} {'waves':>6s}")
for b, hq, hkv, length in [(b, 32, 8, n) for b in (64, 8, 1) for n in (4096, 32768, 131072)] + [(128, 32, 32, 2048)]:
    n = attn.fast.choose_num_splits(b, hkv, length, NUM_SMS)
    grid = b * hkv * n
    name = f"B{b} H{hq}/{hkv} L{length}"
    print(f"{name:22s} {b * hkv:8d} {n:6d} {cdiv(length, n):10d} {grid:6d} {grid / NUM_SMS:6.1f}")

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.8))
lens = [2**p for p in range(10, 19)]
for b in (1, 2, 4, 8, 16):
    ax.plot(lens, [attn.fast.choose_num_splits(b, 8, n, NUM_SMS) for n in lens], "o-", ms=4, label=f"B={b}")
ax.set_xscale("log", base=2)
ax.set_yscale("log", base=2)
ax.set_xlabel("cache length L")
ax.set_ylabel("num_splits chosen")
ax.set_title("choose_num_splits(B, Hkv=8, L, 132 SMs); B >= 17 never splits", fontsize=10)
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The rising part of each curve is the 4096-key floor; the flat part is the eight-wave target, $\lceil 1056 /
# (8B) \rceil$ splits for $H_{kv} = 8$.
#
# ### What the H200 says
#
# The numbers behind the heuristic come from a probe run on an H200 (bf16, 32 query and 8 KV heads, $D = 128$,
# one new token), `bench/probes/split_probe.py`, whose output is `bench/results/decode_split_probe_2026-11-28.log`:
# the K/V read rate for the two long-cache shapes at several forced split counts. The "(auto)" marks in the
# log are the heuristic of that day (two waves, at least 512 keys per split), which picked 5 and 33 splits;
# the heuristic that followed this probe picked 16 and 64, and the current one (merge in the kernel, below)
# picks 8 and 32. For scale, the dotted lines are cuDNN on the same shapes in the
# benchmark run `decode_H200_2026-11-28_v2.json`, a separate process on the same day.

# %%
probe = {}
for line in _figures.result_path("decode_split_probe_2026-11-28.log").read_text().splitlines():
    found = re.match(r"(B\d+ L\d+) splits\s+(\d+)( \(auto\))?: ([\d.]+) TB/s", line)
    if found:
        shape, n, auto, tbps = found.groups()
        # the probe measured its automatic choice twice when it was also in the fixed list
        probe.setdefault(shape, {})[int(n)] = (float(tbps), bool(auto))
cudnn = {
    r["shape"].replace(" H32/8", ""): r["contenders"]["cudnn"]["tbps"]
    for r in _figures.result("decode_H200_2026-11-28_v2.json")["results"]
}
for shape, points in probe.items():
    print(shape, {n: t for n, (t, _) in sorted(points.items())}, f"cuDNN {cudnn[shape]:.2f}")

fig, ax = plt.subplots(figsize=(7, 4.2))
for (shape, points), color in zip(sorted(probe.items()), ("tab:blue", "tab:orange")):
    ns = sorted(points)
    ax.plot(ns, [points[n][0] for n in ns], "o-", color=color, label=f"{shape} (probe)")
    old = [n for n in ns if points[n][1]]
    ax.scatter(old, [points[n][0] for n in old], s=160, facecolors="none", edgecolors=color, lw=1.5)
    b, length = map(int, re.findall(r"\d+", shape))
    now = attn.fast.choose_num_splits(b, 8, length, NUM_SMS)
    ax.axvline(now, color=color, ls="--", lw=1)
    ax.axhline(cudnn[shape], color=color, ls=":", lw=1)
ax.axhline(4.24, color="0.4", lw=1)
ax.text(5.2, 4.28, "device copy 4.24 TB/s", fontsize=8, color="0.3")
ax.set_xscale("log", base=2)
ticks = [5, 16, 33, 64, 132, 264]
ax.set_xticks(ticks, labels=[str(t) for t in ticks])
ax.minorticks_off()
ax.set_xlim(4, 300)
ax.set_ylim(1.5, 4.6)
ax.set_xlabel("num_splits")
ax.set_ylabel("TB/s of K and V read")
ax.set_title(
    "H200, bf16: split probe (decode_split_probe_2026-11-28.log)\n"
    "circled: the day's automatic pick; dashed: today's heuristic; dotted: cuDNN",
    fontsize=9,
)
ax.grid(alpha=0.3)
ax.legend(fontsize=8, loc="lower left")
fig.tight_layout()
plt.show()

# %% [markdown]
# Reading the curves:
#
# - **B8 L32768** (64 programs unsplit): 5 splits (320 programs, 2.4 waves) read 3.79 TB/s; 16 splits (1024
#   programs, 2048 keys each) 4.07, the best of the probe. That is where the eight-wave target came from, and the
#   benchmark's second run confirmed it at 4.13 TB/s, 0.97 of cuDNN.
# - **B1 L131072** (8 programs unsplit): flat from 16 to 66 splits (3.8 TB/s), a little lower at 132.
# - Both fall off a cliff at 264 splits: 1.90 and 2.78 TB/s. The extra bytes are not the reason. Per
#   sequence and KV head, the partials add $2 \cdot n \cdot S_q G (D + 1) \cdot 4$ bytes (written, then read by the
#   merge) to the $4 L D$ bytes of bf16 K and V, a fraction of about $2 n G S_q / L$:

# %%
for b, length in ((8, 32768), (1, 131072)):
    n = 264
    extra = 2 * n * 4 * (128 + 1) * 4 / (4 * length * 128)
    print(f"B{b} L{length}: {n} splits -> {length // n} keys per split, partials add {extra:.1%} to the bytes")

# %% [markdown]
#   A few percent cannot halve the speed. What changes is the length of each program's work: 124 keys is about
#   two tiles of 64, too short for a loop pipelined three or four tiles deep to ever reach its steady state, so
#   the fixed costs of each program (and the tail of a grid of 16896 programs) dominate. Hence a floor on the
#   chunk: 2048 keys with the separate merging kernel of this probe. Since the merge moved into the last
#   program of each pair, its time grows with $n$ and sits at the end of the kernel: at B1 L131072 the atomic
#   and the merge cost about 13 µs at 64 splits and 3 µs at 32 (event-timed 3.64 and 3.86 TB/s, 3.96 at 16).
#   The floor is now 4096 keys, which picks 32 splits there and 8 for B8 L32768 (4.17 TB/s).
#
#   The floor was set on bf16 caches. An INT8 or FP8 cache (lesson 09) puts half the bytes into a part of the same
#   length, which argues for fewer parts, but its loop is bound by latency rather than bytes, which argues for
#   more programs in flight. Measured (`split_probe_H200_2026-11-29_one_byte.log`, graph replays): at B1
#   L131072 over 64-token pages, 64 splits beat the floor's 32 by 5-14% (INT8 113.5 -> 99.2 µs), while
#   contiguous caches were even; at B8 L32768 the floor's 8 stayed best (FP8 pages 154 µs, 164 at 16 splits).
#   Two shapes do not make a rule yet, so the heuristic is unchanged.
#
# **The benchmark's B1 puzzle, solved.** With 64 splits, one benchmark run (`decode_H200_2026-11-28_v2.json`)
# measured B1 L131072 at 2.13 TB/s, 0.54 of cuDNN, while the probe read 3.75 TB/s at 66 splits. The benchmark
# now also times CUDA-graph replays and the host's cost per call (`decode_H200_2026-11-28_v3_graph.json`): from
# graph replays B1 reads 4.12 TB/s (0.96 of cuDNN's 4.27), and one call of `attn.fast.decode` costs the host
# 126-247 µs (checks, two launches with about sixty arguments each, the autotuner's dispatch) against 17-37 µs
# for SDPA. The kernel takes about 130 µs, so an event-timed loop measured the host. Serving engines replay
# their decode step from a CUDA graph, which removes that cost; an eager caller pays it on every layer. Since
# then, kernels launch through `attn.fast._triton.launch` (the compiled kernel's C launcher, after the first
# call), the checks for `validate=False` got cheaper, and the merge joined the split kernel: one launch and
# 55-86 µs of host time per call, and B1 L131072 event-timed at 3.88 TB/s
# (`decode_merge_H200_2026-11-29_run4.log`).

# %%
graph = _figures.result("decode_H200_2026-11-28_v3_graph.json")
print(f"{'shape':42s} {'events':>7s} {'graph':>7s} {'host us':>8s}   (ours; TB/s)   cuDNN graph")
for r in graph["results"]:
    ours, peer = r["contenders"]["ours"], r["contenders"].get("cudnn", {})
    peer_graph = f"{peer['tbps_graph']:.2f}" if peer.get("tbps_graph") else "-"
    print(f"{r['shape']:42s} {ours['tbps']:7.2f} {ours['tbps_graph']:7.2f} {ours['host_us']:8.0f}   {peer_graph:>14s}")

# %% [markdown]
# ### Ragged batches
#
# The last row of that table is a batch of 32 sequences of 128 to 8192 tokens: 256 programs, so by the first
# rule no split, and 3.31 TB/s from graph replays. Every program runs in the first wave, and the time is that of
# the programs holding 8192 keys while most SMs idle after their short ones. Two changes balance it:
#
# - a chunk chosen by the heuristic is never shorter than 2048 keys, so a short cache stays in one program
#   and its other split programs exit at once (a split count you force is taken literally);
# - a ragged batch (longest cache over 1.5 times the mean) is split even when $B \cdot H_{kv}$ fills the GPU:
#   the longest caches into parts of about $\sum_b L_b \cdot H_{kv} / (2 \cdot 132)$ keys, what each of two programs
#   per SM would get if the work were spread evenly.
#
# `decode` knows the lengths when it validates (it reads them anyway); a caller that skips validation, as a
# CUDA-graph serving loop must, passes `max_seqlen_k` and `total_seqlen_k` from its scheduler. The picture:
# keys per program for the benchmark's ragged batch, before and after.

# %%
gen = torch.Generator().manual_seed(0)
ragged = [int(x) for x in torch.randint(128, 8193, (32,), generator=gen)]
n_split = attn.fast.choose_num_splits(32, 8, max(ragged), NUM_SMS, total_seqlen_k=sum(ragged))


def programs_of(lengths, splits, min_chunk, tile=64):
    """Keys each split program reads, as the kernel cuts them (tile-aligned chunks, at least min_chunk)."""
    work = []
    for n in lengths:
        chunk = cdiv(max(cdiv(n, splits), min_chunk), tile) * tile
        work += [max(0, min(chunk, n - s * chunk)) for s in range(splits)]
    return [w for w in work if w > 0]


before, after = programs_of(ragged, 1, 0), programs_of(ragged, n_split, 2048)
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.hist([before, after], bins=24, label=[f"unsplit: {len(before)} programs per KV head",
                                         f"{n_split} splits, >= 2048 keys: {len(after)} programs"])  # fmt: skip
ax.set_xlabel("keys read by one program")
ax.set_ylabel("programs (per KV head)")
ax.set_title(f"ragged B32 (128..8192 tokens): longest program {max(before)} -> {max(after)} keys", fontsize=10)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Summary
#
# - Decode's grid of $B \cdot H_{kv}$ programs cannot fill 132 SMs for small batches (8 programs for one
#   request with 8 KV heads). Split each cache into $n$ chunks: $B \cdot H_{kv} \cdot n$ programs.
# - Each chunk returns its normalized output $o_s$ and log-sum-exp $\ell_s$; the merge is exact:
#   $\ell = \log\sum_s e^{\ell_s}$, $o = \sum_s e^{\ell_s - \ell} o_s$, a convex combination, associative.
# - Empty chunks have $\ell_s = -\infty$ and weight 0, as long as $o_s$ is finite (0); subtract the largest
#   $\ell_s$ and replace $-\infty$ by 0 there, so that a row with no keys at all ends as $o = 0$, $\ell = -\infty$.
# - `attn.fast.decode(..., num_splits=n)` gives the reference's answer for every $n$, up to rounding; `None`
#   asks `choose_num_splits`: no split once $B \cdot H_{kv} \ge$ SMs, else about eight waves, chunks of at
#   least 4096 keys; a ragged batch's longest caches are cut even when the grid is full.
# - The last program of each (sequence, KV head) to finish does the merge, found by an atomic counter: one
#   launch per call, which is what an eager caller's host time needs.
# - On the H200, splitting brings B8 L32768 from 3.79 to 4.07-4.13 TB/s and B1 L131072 to 4.12 (graph
#   replays); too many splits (chunks of a few hundred keys) halve the speed. Eager calls paid 0.13-0.25 ms of
#   host time each with two launches through Triton; one direct launch pays 55-86 µs.
