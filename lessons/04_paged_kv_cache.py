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
# # The paged KV cache
#
# While a model generates, it keeps the keys and values of every past token of every sequence in the KV cache,
# and that cache, not the weights, is what limits how many sequences a GPU can serve at once. The simplest
# layout gives each sequence one contiguous row long enough for the longest sequence the server allows. This
# lesson shows how much memory that wastes, and how the *paged* cache fixes it: the idea of vLLM's
# PagedAttention (Kwon et al., SOSP 2023), also used by TensorRT-LLM's paged KV cache and by FlashInfer.
#
# What we cover, in order:
#
# 1. the waste of a contiguous cache, with numbers for a Llama-3-8B-like model;
# 2. the paged layout: a shared pool of fixed-size blocks and a block table per sequence;
# 3. a picture of a real `attn.PagedKVCache` as sequences arrive, grow, finish and hand their blocks over;
# 4. the errors a user meets, and why a failed append changes nothing;
# 5. decoding over a paged cache: live checks against a contiguous copy and the reference, and how the kernel
#    gathers keys through the block table;
# 6. the converters to FlashInfer's and TensorRT-LLM's paged formats;
# 7. what paging costs in speed, measured on an H200;
# 8. chunked context over a paged cache: a prompt fed in chunks equals the whole prompt, which tiles a chunk
#    visits, and how the query heads of a KV head share a tile.

# %%
import math
import os

import _figures
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

import attn
from attn import reference
from attn.kv_cache import to_flashinfer, to_trtllm
from attn.layout import cu_seqlens_from_lengths

torch.manual_seed(0)
torch.set_printoptions(linewidth=120)
# on a GPU the kernels run for real and need their inputs there; on a CPU, the interpreter reads ordinary tensors
device = "cuda" if torch.cuda.is_available() else "cpu"


def maxdiff(a, b):
    """Largest absolute difference, taken in float64 so the comparison adds no rounding of its own."""
    return (a.double() - b.double()).abs().max().item()


# %% [markdown]
# ## 1. What a contiguous cache wastes
#
# A contiguous cache is a tensor `k_cache, v_cache [max_seqs, max_len, Hkv, D]`: sequence $b$ owns row $b$,
# and its token $t$ lives at `k_cache[b, t]`. The row has to be allocated when the request arrives, and at that
# moment nobody knows how long the answer will be. So the server reserves `max_len` tokens for every sequence,
# and all the slots past a sequence's actual length are memory that no other sequence can use. This is
# *internal fragmentation*: the waste sits inside each allocation.
#
# How much is that? For a Llama-3-8B-like model (32 layers, $H_{kv} = 8$, $D = 128$, 16-bit numbers) one token
# costs $2 \cdot 32 \cdot 8 \cdot 128 \cdot 2$ bytes $= 128$ KiB, so a row of 8192 tokens is 1 GiB. Take a batch
# of requests whose lengths spread the way chat traffic does: most are a few hundred to a few thousand tokens,
# a few are long. (The lengths below are drawn from a log-normal distribution for illustration; they are not
# measured traffic.)

# %%
layers, hkv_llama, d_llama = 32, 8, 128
per_token = 2 * layers * hkv_llama * d_llama * 2  # K and V, 2 bytes each
max_len = 8192
gen = torch.Generator().manual_seed(0)
lengths = (torch.randn(256, generator=gen) * 0.9 + math.log(900)).exp().round().clamp(16, max_len).long()
print(f"{len(lengths)} sequences: median {lengths.median()} tokens, mean {lengths.float().mean():.0f}")

reserved = len(lengths) * max_len * per_token
stored = lengths.sum().item() * per_token
print(
    f"contiguous: {reserved / 2**30:.1f} GiB reserved, {stored / 2**30:.1f} GiB of tokens: {stored / reserved:.0%} used"
)

# %% [markdown]
# About a sixth of the reservation holds tokens. The vLLM paper measured the same effect in the serving systems
# of the time: only about 20-40% of their KV-cache memory held actual token states. Since the cache decides how
# many sequences fit on the GPU at once, and decoding many sequences together is what makes it efficient, this
# waste is paid directly in throughput.
#
# ## 2. The paged idea
#
# Operating systems solved the same problem for process memory with pages, and vLLM's PagedAttention carries the
# idea over to the KV cache:
#
# - all sequences share one **pool** of fixed-size blocks, `k_cache, v_cache [num_blocks, block_size, Hkv, D]`;
# - each sequence has a **block table** row listing, in order, the pool blocks that hold its tokens,
#   `block_table int32 [max_seqs, max_blocks_per_seq]`;
# - token $t$ of sequence $b$ lives in block `block_table[b, t // block_size]`, at slot `t % block_size`;
# - a **block allocator** hands out a new block only when a sequence's last block is full, and takes all of a
#   sequence's blocks back when it finishes.
#
# A sequence's blocks need not be adjacent or in order in the pool; only the table knows the order. And the
# only unused memory a live sequence holds is the rest of its last block: at most `block_size - 1` token slots,
# whatever its length. With 16-token blocks (vLLM's default) the same 256 sequences need:

# %%
block_size = 16
blocks = (lengths + block_size - 1) // block_size
paged_bytes = blocks.sum().item() * block_size * per_token
waste_tokens = blocks.sum().item() * block_size - lengths.sum().item()
print(f"paged, {block_size}-token blocks: {paged_bytes / 2**30:.1f} GiB, {stored / paged_bytes:.1%} used")
print(f"waste: {waste_tokens} token slots, {waste_tokens / len(lengths):.1f} per sequence (at most {block_size - 1})")
assert waste_tokens <= len(lengths) * (block_size - 1)

# roughly what is left of an H200's 141 GB after 16 GB of weights and some working memory
cache_budget = 100 * 2**30
fit_contiguous = cache_budget // (max_len * per_token)
fit_paged = cache_budget // (paged_bytes / len(lengths))
print(f"sequences of this mix that fit in 100 GiB: contiguous {fit_contiguous}, paged about {fit_paged:.0f}")

# %% [markdown]
# The block size is a trade: smaller blocks waste less of the last block, but make the block table longer and
# each block's keys a shorter contiguous run of memory for the attention kernel to read. Paging also makes
# other tricks possible that a contiguous row cannot do, such as two sequences sharing the blocks of a common
# prompt prefix; `attn` does not implement those.
#
# ## 3. The picture: a real paged cache at work
#
# Let us drive an `attn.PagedKVCache` through a small serving scenario and draw it after each stage. The pool
# has 12 blocks of 4 tokens, and the table has 4 sequence slots of at most 5 blocks (20 tokens) each. One KV
# head with $D = 4$ is enough to see the layout.
#
# To make the picture honest, it is drawn from the pool's memory, not from our own bookkeeping: every token we
# append carries its position $t$ in `k[..., 0]` and its request's number in `v[..., 0]`. The drawing reads
# those markers back out of `cache.k` and `cache.v` and asserts that each valid slot holds the token the block
# table says it should. The append itself is `attn.append_kv`, the Triton kernel, which the cache calls for us.

# %%
cache = attn.PagedKVCache(
    num_blocks=12, block_size=4, num_heads_kv=1, head_dim=4, max_seqs=4, max_blocks_per_seq=5,
    dtype=torch.float32, device=device,
)  # fmt: skip
NAMES = "ABCDEFGH"
request_of = {}  # sequence slot -> request number (1 = A, ...); 0 in the pool means "never written"


def append_tokens(cache, counts):
    """Appends counts[slot] marked tokens to each slot, all in one packed call."""
    slots = list(counts)
    k_parts, v_parts = [], []
    for s in slots:
        n, start = counts[s], cache.length(s)
        k = torch.randn(n, 1, 4, device=device)
        v = torch.randn(n, 1, 4, device=device)
        k[:, 0, 0] = torch.arange(start, start + n)
        v[:, 0, 0] = request_of[s]
        k_parts.append(k)
        v_parts.append(v)
    cu = cu_seqlens_from_lengths(torch.tensor([counts[s] for s in slots], device=device))
    cache.append(slots, torch.cat(k_parts), torch.cat(v_parts), cu_seqlens_new=cu)


def new_request(cache, prompt_len):
    s = cache.add_sequence()
    request_of[s] = max(request_of.values(), default=0) + 1
    append_tokens(cache, {s: prompt_len})
    return s


# %% [markdown]
# The drawing: the pool is the row of blocks in the middle, each block a strip of 4 token slots. A coloured slot
# holds a token of the request of that colour (the number is its position $t$ in the sequence); a grey one holds
# stale data left by a finished sequence; a white one was never written. Dashed blocks are free. Each sequence's
# block-table row is drawn above or below the pool (entries past the sequence's last block are not used), with an
# arrow from each entry to the pool block it names.


# %%
def draw(cache, title):
    _figures.paged_cache(cache, title, request_of, NAMES)


history = []


def record(stage):
    live = cache.live
    tokens = sum(cache.length(s) for s in live)
    slots_used = cache.allocator.num_used * cache.block_size
    history.append((stage, len(live), tokens, slots_used, len(live) * cache.max_blocks_per_seq * cache.block_size))
    # the paged waste is the tail of each sequence's last block, never more
    assert slots_used - tokens <= len(live) * (cache.block_size - 1)


# %% [markdown]
# **Stage 1.** Three requests arrive, A with a 6-token prompt, B with 9 and C with 3. One packed append writes
# all three prompts; the cache reserves $\lceil 6/4 \rceil = 2$, $3$ and $1$ blocks, taking them from the free
# list in order.

# %%
a, b, c = (new_request(cache, n) for n in (6, 9, 3))
record("A, B, C arrive")
print(cache.block_table)
draw(cache, "1. A, B, C arrive with prompts of 6, 9, 3 tokens")

# %% [markdown]
# **Stage 2.** Four decode steps: each appends one token to every sequence. A sequence takes a new block only on
# the step that finds its last block full, so the blocks of different sequences now interleave in the pool:
# A owns blocks 0, 1 and then 7. Nothing about that matters to the attention kernel, which follows the table.

# %%
for _ in range(4):
    append_tokens(cache, {s: 1 for s in cache.live})
record("4 decode steps")
print(cache.block_table)
assert cache.blocks_of(a) == [0, 1, 7]
draw(cache, "2. after 4 decode steps")

# %% [markdown]
# **Stage 3.** B finishes. `cache.release` gives its blocks back to the allocator and frees its table
# row. The pool memory is not cleared (that would be a waste of bandwidth): the grey slots still hold B's old
# keys and values, but no block table points at them any more, so no kernel reads them.

# %%
b_blocks = cache.blocks_of(b)
cache.release(b)
record("B finishes")
print(f"B's blocks {b_blocks} are free again: {cache.allocator.num_free} free blocks")
draw(cache, "3. B finishes: its blocks return to the pool")

# %% [markdown]
# **Stage 4.** A new request D arrives with a 7-token prompt, then two more decode steps run for A, C and D. D
# gets B's old table row, and B's blocks too: the allocator's free list is last-freed-first-out, so recently
# freed blocks (which may still be in the GPU's L2 cache) are reused first. Where D has not yet overwritten B's
# data, the slots stay grey: the length of a sequence, not the content of the memory, says which slots are valid.

# %%
d = new_request(cache, 7)
assert d == b and cache.blocks_of(d) == b_blocks[:2]
for _ in range(2):
    append_tokens(cache, {s: 1 for s in cache.live})
record("D arrives, 2 steps")
print(cache.block_table)
draw(cache, "4. D arrives in B's slot and reuses B's blocks; 2 more decode steps")

# %% [markdown]
# ### The same scenario in a contiguous cache
#
# A contiguous cache that allows the same 20 tokens per sequence must reserve a full row for each live sequence.
# Here is the final state drawn that way, and the bill for every stage:


# %%
_figures.contiguous_cache(
    cache, "4. the same sequences in a contiguous cache: one reserved 20-token row each", request_of, NAMES
)

print(f"{'stage':20s} {'seqs':>4s} {'tokens':>6s} {'paged slots':>11s} {'contiguous slots':>16s}")
for stage, n, tokens, slots_used, contiguous in history:
    print(f"{stage:20s} {n:4d} {tokens:6d} {slots_used:11d} {contiguous:16d}")

# %% [markdown]
# At every stage the paged cache holds at most 3 unused slots per live sequence (the tail of the last block),
# while the contiguous one holds whatever each sequence has not yet grown into. In this toy the rows are short,
# so the difference is a factor of about 1.5 to 2; with the 8192-token rows of section 1 it was about six.
#
# ## 4. The errors a user meets
#
# Two things can stop an append. The pool can run out of free blocks: `PoolExhaustedError` (a `RuntimeError`),
# which a scheduler answers by waiting for a sequence to finish, or by preempting one. Or a sequence can outgrow
# its block-table row, `max_blocks_per_seq` blocks: a `ValueError`, because that is a limit the user chose when
# building the cache.
#
# Either way, the append is all or nothing: every sequence of the call is checked against its row and the pool
# before a single block is taken or a single byte written. A half-done append would leave a sequence with blocks
# but no tokens in them, or tokens past its length. We check that by snapshotting the whole cache.


# %%
def snapshot(cache):
    return (
        cache.block_table.clone(), cache.seqlens.clone(), cache.allocator.num_free, cache.k.clone(), cache.v.clone()
    )  # fmt: skip


def unchanged(before, after):
    return all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(before, after))


print(f"free blocks: {cache.allocator.num_free}")
e = cache.add_sequence()
request_of[e] = max(request_of.values()) + 1
before = snapshot(cache)
try:
    append_tokens(cache, {e: 16})  # needs 4 blocks, 3 are free
except attn.PoolExhaustedError as err:
    print("PoolExhaustedError:", err)
assert unchanged(before, snapshot(cache))
cache.release(e)

before = snapshot(cache)
try:
    # C would fit (9 + 9 = 18 tokens, 2 new blocks), but A would need 6 blocks for 21 tokens
    append_tokens(cache, {c: 9, a: 9})
except ValueError as err:
    print("ValueError:", err)
assert unchanged(before, snapshot(cache))
print("both failed appends left the table, the lengths, the allocator and the pool exactly as they were")

# %% [markdown]
# ## 5. Decoding over a paged cache
#
# The decode kernel takes the pool and the metadata of the sequences to read: `seqlens, table =
# cache.metadata(slots)`, then `attn.decode(q, cache.k, cache.v, seqlens, block_table=table)`. Without a block
# table, the same function reads a contiguous cache.
#
# The checks below build a paged cache and a contiguous cache from the same appends (ragged prompts, then decode
# steps) with GQA ($H_q = 8$, $H_{kv} = 2$) and a block size of 5, deliberately neither a power of two nor a
# multiple of the kernel's tile. Then three claims:
#
# 1. the Triton kernel over the paged cache gives **bitwise** the same output as over the contiguous cache: the
#    same keys are read in the same tiles and go through the same arithmetic (the split count depends only on
#    the lengths, so it is the same too); only the addresses differ;
# 2. both agree with `attn.reference.decode`, within the tolerance of lesson 1 (at most twice the error of
#    PyTorch in the same precision, against a float64 computation);
# 3. moving the blocks to different places in the pool and rewriting the table accordingly changes nothing,
#    bitwise.


# %%
# on a GPU the autotuner could pick different tiles for the paged and the contiguous launch, which would change
# the order of the sums; one fixed tile keeps the exact comparison meaningful (the interpreter never autotunes)
os.environ["ATTN_AUTOTUNE"] = "0"


def build_caches(dtype, prompts=(23, 1, 37, 12), steps=3, hkv=2, dim=32, block=5):
    paged = attn.PagedKVCache(
        num_blocks=40, block_size=block, num_heads_kv=hkv, head_dim=dim, max_seqs=len(prompts),
        max_blocks_per_seq=10, dtype=dtype, device=device,
    )  # fmt: skip
    contig = attn.ContiguousKVCache(
        max_seqs=len(prompts), max_len=50, num_heads_kv=hkv, head_dim=dim, dtype=dtype, device=device
    )
    slots = [paged.add_sequence() for _ in prompts]
    assert [contig.add_sequence() for _ in prompts] == slots
    cu = cu_seqlens_from_lengths(torch.tensor(prompts, device=device))
    news = [(torch.randn(sum(prompts), hkv, dim, dtype=dtype, device=device), cu)]
    news += [(torch.randn(len(prompts), 1, hkv, dim, dtype=dtype, device=device), None) for _ in range(steps)]
    for k_new, cu_new in news:
        v_new = torch.randn_like(k_new)
        paged.append(slots, k_new, v_new, cu_seqlens_new=cu_new)
        contig.append(slots, k_new, v_new, cu_seqlens_new=cu_new)
    return paged, contig, slots


def check_decode(dtype):
    paged, contig, slots = build_caches(dtype)
    seqlens, table = paged.metadata(slots)
    q = torch.randn(len(slots), 1, 8, 32, dtype=dtype, device=device)
    out_paged = attn.decode(q, paged.k, paged.v, seqlens, block_table=table)
    out_contig = attn.decode(q, contig.k, contig.v, contig.seqlens)

    exact = reference.decode(q.double(), paged.k.double(), paged.v.double(), seqlens, block_table=table)
    same_precision = reference.decode(q, paged.k, paged.v, seqlens, block_table=table)
    err, budget = maxdiff(out_paged, exact), 2 * maxdiff(same_precision, exact) + 1e-5

    # move every block somewhere else in the pool; block i goes to perm[i], so the table entry i becomes perm[i]
    perm = torch.randperm(paged.k.shape[0], device=device)
    k_moved, v_moved = torch.empty_like(paged.k), torch.empty_like(paged.v)
    k_moved[perm], v_moved[perm] = paged.k, paged.v
    table_moved = perm[table.long()].to(torch.int32)
    out_moved = attn.decode(q, k_moved, v_moved, seqlens, block_table=table_moved)

    name = str(dtype)[6:]
    print(f"{name:8s} lengths {seqlens.tolist()}: paged == contiguous {torch.equal(out_paged, out_contig)}, "
          f"shuffled == paged {torch.equal(out_moved, out_paged)}, err vs fp64 {err:.1e} <= {budget:.1e}")  # fmt: skip
    assert torch.equal(out_paged, out_contig) and torch.equal(out_moved, out_paged)
    assert err <= budget
    return paged, slots


for dtype in [torch.float32, torch.float16]:
    paged, slots = check_decode(dtype)
print(paged.metadata(slots)[1])

# %% [markdown]
# ### How the kernel reads through the block table
#
# The decode kernel (`attn/fast/decode.py`) walks over a sequence's keys in tiles of `BLOCK_N` consecutive
# logical positions. For a contiguous cache, the address of key $n$ is simply `b * stride_kb + n * stride_kn`.
# For a paged cache, each key of the tile looks up its own block first:
#
# ```python
# block = tl.load(block_table_ptr + b64 * stride_bt + offs_n // page_size, mask=key_valid, other=0)
# k_off = block.to(tl.int64) * stride_kb + (offs_n % page_size) * stride_kn
# ```
#
# That is one extra small load per key (neighbouring keys mostly read the same table entry, so it comes from
# cache) and addresses that are contiguous only within a block. Because the lookup is per key, a tile may start
# in the middle of a block and cover several blocks, so any block size works, including ones smaller than the
# tile or not a power of two. When the block size is a multiple of the tile, the kernel takes a shortcut (section
# 7): every tile starts on a multiple of the tile size, so it lies within one block, and one table entry serves
# all of its keys. Here is the general computation in PyTorch, for the first tile of the longest sequence of the
# last cache, with a 16-key tile (the size the kernel uses in the interpreter):

# %%
seqlens, table = paged.metadata(slots)
b_long = int(seqlens.argmax())
offs_n = torch.arange(16, device=device)
block = table[b_long, offs_n // paged.block_size]
slot = offs_n % paged.block_size
print("key n:       ", offs_n.tolist())
print("pool block:  ", block.tolist())
print("slot in block:", slot.tolist())
tile = paged.k[block.long(), slot]  # [BLOCK_N, Hkv, D], what the kernel's masked load reads
assert torch.equal(tile, reference.gather_kv(paged.k, 16, b_long, table))

# %% [markdown]
# ## 6. Other libraries' paged formats
#
# The idea is everywhere; the bookkeeping differs. `attn.kv_cache` converts our metadata to the two formats
# most often met next to ours.
#
# **FlashInfer** calls blocks *pages* and stores the page lists of a batch in compressed sparse row form: the
# pages of sequence $b$ are `kv_indices[kv_indptr[b]:kv_indptr[b+1]]`, and `kv_last_page_len[b]` says how many
# tokens its last page holds (so the length is $(\text{pages} - 1) \cdot \text{page\_size} +
# \text{last\_page\_len}$). Only the pages in use are listed, so unlike our table it has no padding columns.
# Our pools `[num_blocks, block_size, Hkv, D]` are what FlashInfer calls the "NHD" layout.

# %%
seqlens, table = paged.metadata(slots)
kv_indptr, kv_indices, kv_last_page_len = to_flashinfer(table, seqlens, paged.block_size)
print("seqlens:         ", seqlens.tolist())
print("kv_indptr:       ", kv_indptr.tolist())
print("kv_indices:      ", kv_indices.tolist())
print("kv_last_page_len:", kv_last_page_len.tolist())
for b_ in range(len(slots)):
    pages = kv_indices[kv_indptr[b_] : kv_indptr[b_ + 1]].long()
    n = (len(pages) - 1) * paged.block_size + int(kv_last_page_len[b_])
    keys = paged.k[pages].flatten(0, 1)[:n]  # the pages in order, cut to the length
    assert n == int(seqlens[b_]) and torch.equal(keys, reference.gather_kv(paged.k, n, b_, table))

# %% [markdown]
# **TensorRT-LLM** keeps K and V of a block side by side in one pool, `[num_blocks, 2, Hkv, tokens_per_block, D]`
# (heads before tokens inside a block), and gives each sequence *block offsets* `[B, 2, max_blocks]` into that
# pool viewed as `[2 * num_blocks, Hkv, tokens_per_block, D]`: the K half of block $i$ is at offset $2i$ and the
# V half at $2i + 1$. `to_trtllm` copies the pools into that layout and rewrites the table:

# %%
pool, offsets = to_trtllm(paged.k, paged.v, table)
print("pool:", tuple(pool.shape), " offsets:", tuple(offsets.shape))
print("offsets of sequence 0, K and V:\n", offsets[0])
halves = pool.flatten(0, 1)  # [2 * num_blocks, Hkv, tokens_per_block, D]
t = torch.arange(int(seqlens[0]), device=device)
k_trt = halves[offsets[0, 0, t // paged.block_size].long(), :, t % paged.block_size]  # [L, Hkv, D]
v_trt = halves[offsets[0, 1, t // paged.block_size].long(), :, t % paged.block_size]
assert torch.equal(k_trt, reference.gather_kv(paged.k, len(t), 0, table))
assert torch.equal(v_trt, reference.gather_kv(paged.v, len(t), 0, table))

# %% [markdown]
# ## 7. What paging costs in speed
#
# Decoding is bound by memory bandwidth: each step reads the whole cache to produce one row per query head.
# Paging adds the block-table loads and breaks the keys into runs of `block_size` tokens, so it can only be
# slower than reading the same bytes contiguously; the question is by how much. `bench/bench_decode.py` times
# `attn.decode` on the same bf16 cache as a contiguous tensor (`ours`) and as a randomly shuffled pool with
# 16-token (`ours-p16`) and 64-token blocks (`ours-p64`), and reports TB/s of K and V read. These are the numbers
# measured on an NVIDIA H200 (copy ceiling about 4.2 TB/s), loaded from the result files: the first two runs
# (2026-11-28), one from the next day and the latest (2026-11-29, commit 0d6c0a7), each timed from CUDA-graph
# replays where the file has them (the device's time; with plain event timing the host time of a call hid the
# kernel on the long shapes before the launch path was made cheaper).

# %%
rows, ceilings = [], []
for tag in ("2026-11-28_v4_ragged", "2026-11-29.json", "2026-11-29_e"):
    entry, run = _figures.latest_result("decode", gpu="H200", tag=tag)
    ceilings.append(run["ceilings"]["copy_tbps"])
    for r in run["results"]:
        c = r["contenders"]
        tbps = {name: c[name].get("tbps_graph") or c[name]["tbps"] for name in ("ours", "ours-p16", "ours-p64")}
        rows.append((f"{r['shape'].split(' (')[0]} [{entry['commit'][:7]}]", tbps))

print(f"{'shape [commit]':38s} {'contig':>7s} {'p16':>6s} {'p64':>6s}   p16/contig  p64/contig")
for shape, tb in rows:
    r16, r64 = tb["ours-p16"] / tb["ours"], tb["ours-p64"] / tb["ours"]
    print(f"{shape:38s} {tb['ours']:7.2f} {tb['ours-p16']:6.2f} {tb['ours-p64']:6.2f}   {r16:10.2f}  {r64:10.2f}")

labels = [s.replace(" ragged L128..8192", "\nragged").replace(" L", "\nL").replace(" [", "\n[") for s, _ in rows]
_figures.grouped_bars(
    list(zip(labels, (tb for _, tb in rows))),
    [("ours", "contiguous"), ("ours-p16", "paged, 16-token blocks"), ("ours-p64", "paged, 64-token blocks")],
    ref="ours",
    hline=(sum(ceilings) / len(ceilings), "copy ceiling (same runs)"),
    ylabel="TB/s of K and V read",
    title="attn.decode, NVIDIA H200, bf16, D = 128, graph replays; over the bars: paged / contiguous",
)

# %% [markdown]
# On 2026-11-28 (commit ef77225) paging cost 5-10% on the regular shapes and about 20% on the ragged
# batch. Three changes to the kernel's paged path, made for the one-byte caches of lesson 09, removed it:
#
# - **The page size became a compile-time constant.** Each key's slot is `slot // block_size` (which block) and
#   `slot % block_size` (which row in it). With a block size known only at run time, division and remainder
#   are a long integer sequence per key; with a constant power of two they are a shift and a mask.
# - **A tile's block-table entries are loaded one iteration ahead.** The K and V addresses of a tile come
#   from the block table; loaded in the same iteration, they delay the tile's loads, which the compiler can then
#   not start early. Loaded the iteration before, the K/V loads depend on nothing in their own iteration and
#   the software pipeline keeps them in flight.
# - **One entry per tile where the block holds the whole tile.** With blocks a multiple of the tile (64-token
#   blocks and 64-key tiles, say), the kernel keeps every tile on the tile grid (a sliding window's first tile
#   starts below the window, its extra keys masked), so a tile never crosses a block. It then loads one entry
#   per tile, a tile ahead, and forms the tile's addresses from one base and the row offsets, instead of a load
#   and a 64-bit multiply-add per key. Compiled for the H200, the loop of a bf16 tile over pages went from 971
#   to 610 instructions (`bench/probes/decode_sass.py`); bf16 decode was bound by bytes anyway, but the ragged batch
#   went from 0.95x to 1.00x of contiguous, and one-byte caches, which are bound by instructions, gained 13-15%
#   (lesson 09).
#
# On the latest run paged decoding reads 0.98-1.00x as fast as contiguous with 64-token blocks on every shape,
# the ragged batch included, and 0.94-0.99x with 16-token blocks (which the 64-key tiles cross, so they still
# look up per key). The pool's scattered blocks cost nothing measurable: the bandwidth was lost to the address
# arithmetic, not to the memory layout. Paging also lets several times more sequences share the GPU (section
# 1), which is why serving systems use it.

# %% [markdown]
# ## 8. Chunked context over a paged cache
#
# A long prompt need not enter the model in one piece. Serving systems cut it into chunks of a few thousand
# tokens (TensorRT-LLM's *chunked context*), so that one long prompt does not stall the generation requests
# batched with it and a step's activations stay bounded. A chunk of $n$ tokens is handled like this: its keys
# and values are appended to the cache first, then its queries attend to everything the cache now holds for the
# sequence, the earlier chunks and the chunk itself. With $L$ tokens cached (the chunk's own included), query
# $i$ of the chunk sits at position $L - n + i$ and sees key $j$ iff
#
# $$ j \le i + (L - n), $$
#
# the causal mask aligned bottom-right, exactly as the prefill kernel defines it when $S_k > S_q$. A generation
# request is a chunk of one; a sequence with nothing new this step is a chunk of zero.
#
# `attn.context_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q=cu, block_table=table)` takes a packed
# batch of such chunks: `q [T, Hq, D]`, sequence $b$'s queries in rows `cu[b]:cu[b+1]`, its keys read through its
# row of the block table. It is the fused prefill kernel of lesson 2 with three compile-time switches: key
# counts from `cache_seqlens`, K/V tiles gathered through the block table (per key, as in section 5, so any
# block size works), and INT8/FP8 tiles converted in registers.
#
# The claim to check: feeding two prompts chunk by chunk through a paged cache (block size 5, GQA 8/2) gives
# the same output as attending over each whole prompt at once. Prompt lengths 37 and 22 in chunks of 16, so
# chunks are ragged, and in the last step the shorter prompt has nothing left (a chunk of zero).

# %%
HQ, HKV, DIM, CHUNK = 8, 2, 32, 16
lengths = [37, 22]
chunk_cache = attn.PagedKVCache(num_blocks=20, block_size=5, num_heads_kv=HKV, head_dim=DIM, max_seqs=2,
                                max_blocks_per_seq=8, dtype=torch.float32, device=device)  # fmt: skip
chunk_slots = [chunk_cache.add_sequence() for _ in lengths]
qs = [torch.randn(n, HQ, DIM, device=device) for n in lengths]
ks = [torch.randn(n, HKV, DIM, device=device) for n in lengths]
vs = [torch.randn(n, HKV, DIM, device=device) for n in lengths]
outs = [[] for _ in lengths]
for start in range(0, max(lengths), CHUNK):
    parts = [slice(min(start, n), min(start + CHUNK, n)) for n in lengths]
    cu = cu_seqlens_from_lengths(torch.tensor([p.stop - p.start for p in parts], device=device))
    # append the chunk's keys and values first: its queries see themselves through the cache
    chunk_cache.append(chunk_slots, torch.cat([k[p] for k, p in zip(ks, parts)]),
                       torch.cat([v[p] for v, p in zip(vs, parts)]), cu_seqlens_new=cu)  # fmt: skip
    seqlens, table = chunk_cache.metadata(chunk_slots)
    out = attn.context_attention(torch.cat([q[p] for q, p in zip(qs, parts)]), chunk_cache.k, chunk_cache.v,
                                 seqlens, cu_seqlens_q=cu, block_table=table)  # fmt: skip
    print(f"step at {start:2d}: new tokens {(cu[1:] - cu[:-1]).tolist()}, cached {seqlens.tolist()}")
    for b in range(len(lengths)):
        outs[b].append(out[cu[b] : cu[b + 1]])

for b, n in enumerate(lengths):
    whole = reference.attention(qs[b][None].double(), ks[b][None].double(), vs[b][None].double(), causal=True)[0]
    err = maxdiff(torch.cat(outs[b]), whole)
    print(f"prompt {b} ({n} tokens): chunked over the paged cache vs whole prompt at once (fp64): {err:.1e}")
    assert err < 1e-5

# %% [markdown]
# ### Which tiles a chunk visits
#
# The kernel walks over a chunk in row blocks and, for each, over key tiles of `BLOCK_N` keys. Like the prefill
# kernel it splits the key range of a row block three ways (lesson 2): tiles no row of the block can see are
# never loaded, tiles every row sees run without any mask arithmetic, and only the tiles crossing the diagonal
# (or a window's left edge) pay for the mask. A chunk on a long prefix is therefore mostly unmasked work: the
# whole prefix is visible to every query, and only a band of tiles along the chunk's own diagonal is masked.
#
# Below, the ranges are computed with the kernel's own formulas (`_attn_fwd_kernel` in `attn/fast/attention.py`)
# for a chunk of 48 tokens on a 64-token prefix, 16-token row blocks and 16-key tiles, and checked against the
# reference mask, `reference.attention_mask`: every visible (query, key) pair lies in a visited tile, and every
# unmasked tile is visible in full. The right panel adds a sliding window of 40 keys, which also skips tiles on
# the left.


# %%
def tile_plan(n, total, rows, cols, window_left=-1):
    """The kernel's split of each row block's key range: (lo, full_lo, full_hi, hi) per row block."""
    diag, plan = total - n, []
    for m0 in range(0, n, rows):
        m_last = m0 + rows - 1
        lo, hi = 0, min(m_last + diag + 1, total)  # causal: the right window is 0
        full_lo, full_hi = lo, max(min(m0 + diag + 1, total), 0) // cols * cols
        if window_left >= 0:
            lo = max(m0 + diag - window_left, 0) // cols * cols
            full_lo = -(-max(m_last + diag - window_left, 0) // cols) * cols
        full_lo = min(max(full_lo, lo), max(hi, lo))
        full_hi = min(max(full_hi, full_lo), max(hi, lo))
        plan.append((lo, full_lo, full_hi, hi))
    return plan


def check_and_draw(ax, n, total, rows, cols, window_left=-1):
    visible = reference.attention_mask(n, total, causal=True, window_size=(window_left, 0))
    ax.imshow(visible, cmap="Greys", vmin=0, vmax=2.5, aspect="auto", interpolation="nearest",
              extent=(0, total, n, 0))  # fmt: skip
    counts = {"unmasked": 0, "masked": 0, "skipped": 0}
    for r, (lo, full_lo, full_hi, hi) in enumerate(tile_plan(n, total, rows, cols, window_left)):
        m0 = r * rows
        for k0 in range(0, total, cols):
            tile = visible[m0 : m0 + rows, k0 : k0 + cols]
            if full_lo <= k0 < full_hi:
                kind, color = "unmasked", "C2"
                assert tile.all(), "an unmasked tile must be visible in full"
            elif lo <= k0 < hi:
                kind, color = "masked", "C1"
            else:
                kind, color = "skipped", None
                assert not tile.any(), "a skipped tile must hold no visible pair"
            counts[kind] += 1
            if color:
                ax.add_patch(Rectangle((k0, m0), cols, rows, fill=True, alpha=0.35, color=color, lw=0))
            ax.add_patch(Rectangle((k0, m0), cols, rows, fill=False, ec="0.5", lw=0.5))
    ax.axvline(total - n, color="C3", ls="--", lw=1)
    ax.set_xlabel(f"key position (prefix of {total - n} | chunk of {n})")
    ax.set_ylabel("query of the chunk")
    title = "causal" if window_left < 0 else f"causal, window of {window_left} keys to the left"
    ax.set_title(f"{title}:\n{counts['unmasked']} unmasked, {counts['masked']} masked, {counts['skipped']} skipped",
                 fontsize=9.5)  # fmt: skip
    return counts


fig, axes = plt.subplots(1, 2, figsize=(_figures.MAX_WIDTH_IN, 4.2))
for ax, window in zip(axes, (-1, 40)):
    print(check_and_draw(ax, n=48, total=112, rows=16, cols=16, window_left=window))
axes[0].legend(handles=[Rectangle((0, 0), 1, 1, color="C2", alpha=0.35, label="unmasked (no mask arithmetic)"),
                        Rectangle((0, 0), 1, 1, color="C1", alpha=0.35, label="masked (diagonal, window edge)"),
                        Rectangle((0, 0), 1, 1, fill=False, ec="0.5", label="skipped (never loaded)")],
               fontsize=8.5, loc="lower left")  # fmt: skip
fig.tight_layout()
plt.show()

# %% [markdown]
# ### Packing the query heads of a KV head
#
# With GQA, the $H_q / H_{kv}$ query heads of a group read the same keys and values. The kernel therefore gives
# one program a whole group: its tile rows are *tokens × heads* (row $r$ holds token $\lfloor r / g \rfloor$ of
# the row block and head $r \bmod g$ of the group), and each K/V tile is loaded once for all $g$ heads instead of
# once per head. The masks above are per token, so a row block of `BLOCK_M` rows covers `BLOCK_M / g` tokens.
# This matters most for generation requests: one token alone would fill one row of a 16-row tile, while with
# packing it fills $g$ of them. For the GQA 8/2 batch above ($g = 4$) and a 16-row tile:

# %%
g = HQ // HKV
print("tile row:", list(range(16)))
print("token:   ", [r // g for r in range(16)])
print("head:    ", [r % g for r in range(16)], "(+ the group's first head)")

# %% [markdown]
# ## Summary
#
# - A contiguous cache reserves `max_len` tokens per sequence; with realistic lengths most of it stays empty.
# - A paged cache shares a pool of `block_size`-token blocks; `block_table[b, t // block_size]` and slot
#   `t % block_size` locate token $t$ of sequence $b$. Each live sequence wastes at most `block_size - 1` slots.
# - Blocks are taken as sequences grow and returned when they finish; freed blocks are reused at once, and
#   their stale contents are never read because lengths and tables decide what is valid.
# - `append` is all or nothing: `PoolExhaustedError` when the pool is short, `ValueError` when a sequence would
#   outgrow its table row, and the cache is untouched after either.
# - The decode kernel looks up a block per key, so any block size works, or per tile when the block is a
#   multiple of the tile; its output over a paged cache is bitwise that over a contiguous one, wherever the
#   blocks sit in the pool.
# - FlashInfer lists pages in CSR form (`kv_indptr`, `kv_indices`, `kv_last_page_len`); TensorRT-LLM pairs K and
#   V per block in one pool and addresses them by block offsets $2i$ and $2i+1$.
# - Measured on an H200, paged decode with 64-token blocks runs at 0.98-1.00x of contiguous, a ragged batch
#   included, after the block size became a compile-time constant, the block-table entries are loaded a tile
#   ahead and a tile takes one entry (it was 0.90-0.95x and 0.79-0.81x before).
# - A prompt chunk of $n$ tokens, appended first, attends to the $L$ cached tokens bottom-right causally;
#   `attn.context_attention` runs a packed batch of chunks (and one-token generation requests) over a paged
#   cache, visiting only tiles some query can see and masking only those across the diagonal.
