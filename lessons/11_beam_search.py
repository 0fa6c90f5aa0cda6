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
# # Beam search and the KV cache
#
# Greedy decoding keeps one continuation per request. *Beam search* keeps $W$ of them, the beams: at every step
# each beam proposes its next tokens, the $W \cdot V$ candidates are scored by their total log-probability, and
# the best $W$ survive. Several survivors may extend the same old beam and some old beams may have none, so
# after step $t$ the new beam $j$ continues the history of old beam $\text{parent}_j$.
#
# For the KV cache this is a problem of bookkeeping, not of arithmetic: beam $j$ must now attend over its
# parent's keys and values. Copying the parent's whole history into beam $j$'s cache works, but moves
# $W \cdot L$ tokens of K/V per step and layer, growing with the length $L$. Two systems avoid the copy:
#
# - **TensorRT-LLM** keeps one cache row per beam and a small table, `cache_indirection [B, W, max_len]`:
#   token $t$ of beam $j$ is read from the row of beam `cache_indirection[b, j, t]`. A reorder rewrites only
#   the table (`attn.update_indirection`), and each beam writes its new tokens into its own row.
# - **vLLM** gives beams block tables over a shared paged pool. A reorder hands the parent's blocks to the
#   child by reference count (`PagedKVCache.reorder_beams`); a write into a shared, partly filled block copies
#   that one block first (copy-on-write). Full blocks of the shared history are never copied.
#
# What we cover:
#
# 1. a tiny model and a beam search over it, so that the parents come from real scores;
# 2. the indirection table, pictured as it evolves;
# 3. the same search over shared blocks, pictured with reference counts;
# 4. a live check: the three ways (indirection, shared blocks, copied histories) pick the same tokens and
#    produce the same attention outputs, bit for bit;
# 5. the bytes each way moves and holds.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

import attn  # noqa: F401  (sets up Triton's interpreter on machines without a GPU)
import attn.fast as fast
import attn.reference as reference
from attn.kv_cache import PagedKVCache

torch.manual_seed(0)

# %% [markdown]
# ## 1. A tiny model to search over
#
# One attention layer is enough: token embeddings give each new token its query, key and value, decode
# attention over the cache gives an output, and a projection of that output gives the next token's
# log-probabilities. The scores therefore depend on what each beam's cache holds: if a beam read the wrong
# history, the search would take a different path. Sizes are small so the lesson runs in Triton's interpreter on
# a CPU; everything is float32.

# %%
V, W, HQ, HKV, D = 16, 3, 4, 2, 16  # vocabulary, beam width, query heads, KV heads (GQA 4/2), head dim
PROMPT, STEPS, BLOCK = 6, 10, 4  # prompt tokens, generated tokens, tokens per block of the paged cache
MAX_LEN = PROMPT + STEPS
g = torch.Generator().manual_seed(2)
emb_q = torch.randn(V, HQ, D, generator=g)
emb_k = torch.randn(V, HKV, D, generator=g)
emb_v = torch.randn(V, HKV, D, generator=g)
unembed = torch.randn(HQ * D, V, generator=g) * 0.6
prompt = torch.randint(0, V, (PROMPT,), generator=g)


def pick(out, cum, first):
    """One beam-search step: the best W of the W·V extensions, as (parents [W], tokens [W], scores [W])."""
    logp = torch.log_softmax(out.reshape(W, -1) @ unembed, -1)
    scores = cum[:, None] + logp
    if first:
        # all beams hold the same prompt: extending more than one would propose every candidate W times
        scores[1:] = float("-inf")
    best = scores.flatten().topk(W)
    return best.indices // V, best.indices % V, best.values


# %% [markdown]
# A search loop that does not care how the cache is organised: each way of keeping the cache supplies
# `reorder(parents, step)`, `append(k, v, step)` and `decode(q, n)`. Here `step` is the position of the token
# the new beams are about to write, i.e. the cache length before that append: the prompt occupies positions
# $0..5$, the first generated token is written at position 6 and decode then reads 7 tokens.


# %%
def beam_search(cache, record=None):
    """Runs the search over `cache`; returns the tokens of every beam and the attention output of every step."""
    cum = torch.zeros(W)
    seqs = [prompt.tolist() for _ in range(W)]
    # the prompt's last token asks for the first generated one (prefill put the prompt's K/V in the cache)
    out = cache.decode(emb_q[prompt[-1]].expand(W, 1, HQ, D).contiguous(), PROMPT)
    outs = [out]
    for i in range(STEPS):
        step = PROMPT + i
        parents, tokens, cum = pick(out, cum, first=i == 0)
        seqs = [seqs[p] + [int(t)] for p, t in zip(parents.tolist(), tokens)]
        cache.reorder(parents.to(torch.int32), step)
        cache.append(emb_k[tokens], emb_v[tokens], step)
        out = cache.decode(emb_q[tokens][:, None], step + 1)
        outs.append(out)
        if record is not None:
            record(i, cache, parents)
    return seqs, outs


# %% [markdown]
# ## 2. TensorRT-LLM's way: one row per beam, and an indirection table
#
# Each beam owns a row of the contiguous cache, `k, v [W, max_len, Hkv, D]` (for a batch: `B·W` rows, beam $j$
# of request $b$ at row $b W + j$). The prompt is written once, into beam 0's row, and the table starts at
# zero: every beam reads the prompt from row 0. After a step picks the parents, the table is updated,
# for new beam $j$ with parent $p$:
#
# $$\text{new}[j, t] = \text{old}[p, t] \;\; (t \ne \text{step}), \qquad \text{new}[j, \text{step}] = j$$
#
# The history is the parent's; the token about to be written is the beam's own. The update is a gather across
# beams, so it runs out of place: in place, beam $j$ could read row $p$ after beam $p$'s program has rewritten it.
# The loop keeps two tables and swaps them, as TensorRT-LLM does with its source and target tables.


# %%
class Indirection:
    def __init__(self):
        self.k = torch.zeros(W, MAX_LEN, HKV, D)
        self.v = torch.zeros_like(self.k)
        self.k[0, :PROMPT], self.v[0, :PROMPT] = emb_k[prompt], emb_v[prompt]
        # [B = 1, W, max_len]: every beam reads the prompt from beam 0's row
        self.table = torch.zeros(1, W, MAX_LEN, dtype=torch.int32)
        self.spare = torch.empty_like(self.table)
        self.bytes_moved = 0

    def reorder(self, parents, step):
        self.table, self.spare = fast.update_indirection(self.table, parents[None], step, out=self.spare), self.table
        self.bytes_moved += self.table.numel() * 4

    def append(self, k, v, step):
        fast.append_kv(self.k, self.v, k[:, None], v[:, None], torch.full((W,), step, dtype=torch.int32))

    def decode(self, q, n):
        lens = torch.full((W,), n, dtype=torch.int32)
        return fast.decode(q, self.k, self.v, lens, cache_indirection=self.table)


tables = {}
indirection = Indirection()
seqs_a, outs_a = beam_search(indirection, record=lambda i, c, p: tables.__setitem__(i, (c.table[0].clone(), p)))
for j, s in enumerate(seqs_a):
    print(f"beam {j}: prompt {s[:PROMPT]} + generated {s[PROMPT:]}")

# %% [markdown]
# The table after three moments of the search. Each cell is a token position of a beam, coloured (and
# labelled) by the row it is read from; blank cells are positions not written yet. The prompt columns read row
# 0. The newest position of every beam names the beam itself: that token was just written into its own row.
# Older positions name the rows where ancestors wrote them; a reorder copies the parent's whole row of the
# table, which is why a beam's colours can change completely from one picture to the next.

# %%
cmap = plt.get_cmap("tab10", W)
shown = [0, STEPS // 2, STEPS - 1]
fig, axes = plt.subplots(len(shown), 1, figsize=(8, 1.2 + 1.1 * len(shown) * W / 3), sharex=True)
for ax, i in zip(axes, shown):
    table, parents = tables[i]
    n = PROMPT + i + 1
    grid = np.where(np.arange(MAX_LEN)[None, :] < n, table.numpy(), np.nan)
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=W - 0.5, aspect="auto")
    for j in range(W):
        for t in range(n):
            ax.text(t, j, int(table[j, t]), ha="center", va="center", color="w", fontsize=8)
    ax.axvline(PROMPT - 0.5, color="k", lw=1)
    ax.set(yticks=range(W), ylabel="beam", title=f"after step {i}: parents {parents.tolist()}, step = {n - 1}")
axes[-1].set(xlabel="token position (left of the line: the prompt)")
plt.tight_layout()
plt.show()

# %% [markdown]
# The reference `attn.reference.update_indirection` is the definition; the Triton kernel is one program per
# (beam, span of positions). A quick check of the two on random tables, several requests at different lengths
# (`step` may be one int or one per request):

# %%
old = torch.randint(0, 4, (3, 4, 50), dtype=torch.int32)
parents = torch.randint(0, 4, (3, 4), dtype=torch.int32)
steps = torch.tensor([7, 30, 49], dtype=torch.int32)
assert torch.equal(fast.update_indirection(old, parents, steps), reference.update_indirection(old, parents, steps))
try:
    fast.update_indirection(old, parents, steps, out=old)
except ValueError as e:
    print("in place is refused:", e)

# %% [markdown]
# ## 3. vLLM's way: shared blocks, reference counts and copy-on-write
#
# A paged cache (lesson 04) stores each sequence as a list of blocks. Beams become sequences whose lists share
# blocks: the prompt's sequence is *forked* $W - 1$ times (`PagedKVCache.fork`: same blocks, reference counts
# up, nothing copied). After each step, `PagedKVCache.reorder_beams(slots, parents)` gives every beam its
# parent's block list; blocks no beam lists any more go back to the pool in the same call. When a beam appends
# into a block it shares and that block is only partly filled, the cache copies that block first, so the other
# owners never see the write. The last owner to write keeps the original.


# %%
class Shared:
    def __init__(self):
        self.cache = PagedKVCache(num_blocks=4 * MAX_LEN // BLOCK, block_size=BLOCK, num_heads_kv=HKV, head_dim=D,
                                  max_seqs=W, max_blocks_per_seq=-(-MAX_LEN // BLOCK), dtype=torch.float32)  # fmt: skip
        root = self.cache.add_sequence()
        self.cache.append([root], emb_k[prompt][None], emb_v[prompt][None])
        self.slots = [root] + [self.cache.fork(root) for _ in range(W - 1)]

    def reorder(self, parents, step):
        self.cache.reorder_beams(self.slots, parents)

    def append(self, k, v, step):
        self.cache.append(self.slots, k[:, None], v[:, None])

    def decode(self, q, n):
        seqlens, table = self.cache.metadata(self.slots)
        return fast.decode(q, self.cache.k, self.cache.v, seqlens, block_table=table)


def snapshot(i, way, parents):
    c = way.cache
    lists = [[(blk, c.allocator.ref_count(blk)) for blk in c.blocks_of(s)] for s in way.slots]
    pictures[i] = (lists, c.length(way.slots[0]), c.num_block_copies, c.allocator.num_used)


pictures = {}
shared = Shared()
seqs_b, outs_b = beam_search(shared, record=snapshot)
print(f"blocks copied by copy-on-write over {STEPS} steps: {shared.cache.num_block_copies}")

# %% [markdown]
# Each row below is a beam's block list, left to right in token order. A box is one pool block, labelled with its
# pool index and with how many beams list it; darker boxes are shared. The hatched part of the last box is not
# filled yet. The prompt's first block stays shared by every beam for the whole search.

# %%
fig, axes = plt.subplots(len(shown), 1, figsize=(8, 1.2 + 1.1 * len(shown) * W / 3), sharex=True)
for ax, i in zip(axes, shown):
    lists, length, copies, used = pictures[i]
    for j, blocks in enumerate(lists):
        for x, (blk, refs) in enumerate(blocks):
            shade = plt.get_cmap("Blues")(0.25 + 0.75 * (refs - 1) / max(W - 1, 1))
            ax.add_patch(Rectangle((x + 0.05, j - 0.4), 0.9, 0.8, color=shade))
            filled = min(max(length - x * BLOCK, 0), BLOCK) / BLOCK
            if filled < 1:
                ax.add_patch(Rectangle((x + 0.05 + 0.9 * filled, j - 0.4), 0.9 * (1 - filled), 0.8, fill=False,
                                       hatch="///", ec="w", lw=0))  # fmt: skip
            ax.text(x + 0.5, j, f"#{blk}  ×{refs}", ha="center", va="center", fontsize=8,
                    color="w" if refs > 1 else "k")  # fmt: skip
    ax.set(xlim=(0, -(-MAX_LEN // BLOCK)), ylim=(W - 0.5, -0.5), yticks=range(W), ylabel="beam",
           title=f"after step {i}: {length} tokens, {used} blocks in use, {copies} copied so far")  # fmt: skip
axes[-1].set(xlabel=f"logical block (×{BLOCK} tokens)", xticks=np.arange(-(-MAX_LEN // BLOCK)) + 0.5,
             xticklabels=range(-(-MAX_LEN // BLOCK)))  # fmt: skip
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. The live check: three ways, one search
#
# The third way is the naive one: every step, every beam's whole history is copied from its parent. The three
# must make the same choices and produce the same attention outputs. They do bit for bit, because the decode
# kernel sees the same keys in the same order, only found through different addresses. The float64 reference
# checks that this common answer is right.


# %%
class Copying:
    def __init__(self):
        self.k = [emb_k[prompt].clone() for _ in range(W)]
        self.v = [emb_v[prompt].clone() for _ in range(W)]
        self.bytes_moved = 0

    def reorder(self, parents, step):
        self.k = [self.k[p].clone() for p in parents.tolist()]
        self.v = [self.v[p].clone() for p in parents.tolist()]
        self.bytes_moved += sum(x.numel() * x.element_size() for x in self.k + self.v)

    def append(self, k, v, step):
        self.k = [torch.cat([h, x[None]]) for h, x in zip(self.k, k)]
        self.v = [torch.cat([h, x[None]]) for h, x in zip(self.v, v)]

    def padded(self):
        k, v = torch.zeros(W, MAX_LEN, HKV, D), torch.zeros(W, MAX_LEN, HKV, D)
        for j in range(W):
            k[j, : len(self.k[j])], v[j, : len(self.v[j])] = self.k[j], self.v[j]
        return k, v

    def decode(self, q, n):
        return fast.decode(q, *self.padded(), torch.full((W,), n, dtype=torch.int32))


copying = Copying()
seqs_c, outs_c = beam_search(copying)
assert seqs_a == seqs_b == seqs_c, "the three searches took different paths"
assert all(torch.equal(a, c) and torch.equal(b, c) for a, b, c in zip(outs_a, outs_b, outs_c))
print("same tokens and bit-identical attention outputs at all", len(outs_c), "decode steps")

# the common answer against the float64 definition, for the last step
k_full, v_full = copying.padded()
q_last = emb_q[torch.tensor([s[-1] for s in seqs_c])][:, None]
lens = torch.full((W,), MAX_LEN, dtype=torch.int32)
ref = reference.decode(q_last.double(), k_full.double(), v_full.double(), lens)
err = ((outs_c[-1].double() - ref).norm() / ref.norm()).item()
print(f"kernel vs float64 reference: relative error {err:.1e}")
assert err < 2e-5
# and the reference decode, reading the per-beam rows through the final table, gives that same answer
through_table = reference.decode(q_last.double(), indirection.k.double(), indirection.v.double(), lens,
                                 cache_indirection=indirection.table)  # fmt: skip
assert torch.equal(through_table, ref)

# %% [markdown]
# ## 5. What each way moves and holds
#
# Per generation step (and per layer), the three ways move:
#
# - copying histories: every beam's whole history, $W \cdot L$ tokens of K and V;
# - the indirection: the table, $W \cdot L_{\max}$ int32 entries (4 bytes each, $L_{\max}$ = `max_len`), whatever
#   the model size;
# - copy-on-write: at most $W - 1$ blocks, and only when the last block is partly filled.
#
# And at the end they hold: copying and the indirection $W$ rows of history each (the indirection's rows are
# allocated up front at `max_len`, and the prompt sits in row 0 only); shared blocks store the prompt once and
# each beam's own tail once. Counted on the search above:

# %%
token_bytes = 2 * HKV * D * 4  # K and V of one token, float32
rows = [
    # (way, bytes written to reorder the beams, K/V bytes allocated at the end)
    ("copying histories", copying.bytes_moved, sum(x.numel() * x.element_size() for x in copying.k + copying.v)),
    ("indirection", indirection.bytes_moved, indirection.k.numel() * 4 * 2),
    ("shared blocks + COW", shared.cache.num_block_copies * BLOCK * token_bytes,
     shared.cache.allocator.num_used * BLOCK * token_bytes),
]  # fmt: skip
print(f"{'':22s}{'bytes moved by reorders':>26s}{'K/V bytes allocated':>22s}")
for name, moved, held in rows:
    print(f"{name:22s}{moved:26,d}{held:22,d}")
print(f"tokens stored: copying {W * MAX_LEN}, indirection {PROMPT + W * STEPS} (in {W} rows of {MAX_LEN}), "
      f"shared blocks {PROMPT + W * STEPS} (in {shared.cache.allocator.num_used} blocks of {BLOCK})")  # fmt: skip

# %% [markdown]
# The toy is too small to show the trend. For a Llama-3-8B-like model (32 layers, 8 KV heads of 128, bf16:
# 128 KiB of K/V per token) with a 2000-token prompt, $W = 4$ and 200 generated tokens, the per-step traffic of
# the three ways, summed over the generation (the copy-on-write figure is its worst case, $W - 1$ blocks of 16
# tokens on each step that does not start a block):

# %%
per_token, P, GEN, BEAMS, BS = 2 * 32 * 8 * 128 * 2, 2000, 200, 4, 16
lengths = np.arange(P, P + GEN)
moved = {
    "copying histories": (BEAMS * lengths * per_token).sum(),
    "indirection table": GEN * BEAMS * (P + GEN) * 4,
    "copy-on-write (worst)": sum((BEAMS - 1) * BS * per_token for n in lengths if n % BS),
}
for name, b in moved.items():
    print(f"{name:26s} {b / 2**30:10.3f} GiB moved over {GEN} steps")
held = {"copying histories": BEAMS * (P + GEN), "shared blocks (at least)": P + BEAMS * GEN}
for name, n in held.items():
    print(f"{name:26s} {n * per_token / 2**30:10.3f} GiB held at the end")
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(list(moved), [b / 2**30 for b in moved.values()])
ax.set(yscale="log", ylabel="GiB moved (log)", title="reordering beams: bytes moved over a 200-token search")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Summary
#
# - A beam-search step gives each new beam its parent's history; copying it costs $W \cdot L$ tokens per step.
# - TensorRT-LLM keeps rows per beam and rewrites only `cache_indirection` (`attn.update_indirection`, out of
#   place into a second table); decode gathers each key's row through it (`attn.decode(...,
#   cache_indirection=...)`).
# - vLLM shares blocks by reference count (`PagedKVCache.fork`, `reorder_beams`) and copies a block only when a
#   beam writes into a shared, partly filled one; full blocks of the shared history are never copied, and
#   blocks of dropped beams return to the pool at once.
# - Both give the same attention, bit for bit, as copying every history: the kernels see the same keys in the
#   same order.
