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
# # Sliding windows, rolling caches and attention sinks
#
# A KV cache grows by one row per generated token, per layer, per head. For a long conversation that is the
# whole memory budget (lesson 04). A *sliding window* caps it: a query at position $p$ sees only the keys
# $p - N < j \le p$, so only the last $N$ tokens ever need to be stored. TensorRT-LLM calls $N$
# `max_attention_window_size`; Mistral 7B was trained with $N = 4096$.
#
# What we cover:
#
# 1. the sliding-window mask;
# 2. the rolling (cyclic) cache that stores exactly $N$ tokens, pictured as it wraps;
# 3. why a model *not* trained with a window falls apart when the first tokens leave it (attention sinks);
# 4. StreamingLLM's fix: pin the first $S$ tokens, roll the rest;
# 5. RoPE positions *within the cache*, and checks against the kernels;
# 6. a long prompt in chunks over the ring, and why each chunk attends before it is appended;
# 7. the memory saved.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

import attn  # noqa: F401  (sets up Triton's interpreter on machines without a GPU)
import attn.fast as fast
import attn.reference as reference

torch.manual_seed(0)

# %% [markdown]
# ## 1. The sliding-window mask
#
# With causal attention a query at position $i$ sees keys $j \le i$. A window of $N$ keeps only
# $i - N < j \le i$: a band of width $N$ along the diagonal. Every row sees at most $N$ keys, however long the
# sequence.

# %%
L, N = 16, 5
i, j = np.arange(L)[:, None], np.arange(L)[None, :]
causal = j <= i
window = causal & (j > i - N)
fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
for ax, mask, title in ((axes[0], causal, "causal"), (axes[1], window, f"sliding window N = {N}")):
    ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.3)
    ax.set(title=title, xlabel="key position j", ylabel="query position i")
plt.tight_layout()
plt.show()

# %% [markdown]
# The library's `window_size = (N - 1, 0)` is that band: the check below compares it with a mask built by hand.

# %%
q = torch.randn(1, L, 2, 16, dtype=torch.float64)
k, v = torch.randn_like(q), torch.randn_like(q)
banded = reference.attention(q, k, v, window_size=(N - 1, 0))
bias = torch.where(torch.from_numpy(window), 0.0, float("-inf")).double()
by_hand = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / 4.0 + bias, -1)
by_hand = torch.einsum("bhij,bjhd->bihd", by_hand, v)
assert torch.allclose(banded, by_hand)
print("window_size=(N-1, 0) is the band above")

# %% [markdown]
# ## 2. The rolling cache
#
# If no query will ever look further back than $N$ tokens, the cache needs only $N$ slots. Token $t$ goes to
# slot $t \bmod N$, overwriting token $t - N$, exactly the one that just left the window. The picture shows
# which token each slot holds after each step: the newest write is outlined.

# %%
N, steps = 6, 15
held = np.full((steps, N), -1)
for t in range(steps):
    if t:
        held[t] = held[t - 1]
    held[t, t % N] = t
fig, ax = plt.subplots(figsize=(5, 6))
ax.imshow(np.where(held < 0, np.nan, held), cmap="viridis", aspect="auto")
for t in range(steps):
    for s in range(N):
        if held[t, s] >= 0:
            ax.text(s, t, held[t, s], ha="center", va="center", color="w", fontsize=8)
    ax.add_patch(plt.Rectangle((t % N - 0.5, t - 0.5), 1, 1, fill=False, ec="r", lw=2))
ax.set(xlabel="slot", ylabel="step (tokens appended - 1)", title=f"cyclic cache, N = {N}: token t in slot t mod N")
plt.show()

# %% [markdown]
# The kernels do just that: `append_kv(..., max_attention_window=N)` writes token $t$ to slot $t \bmod N$ and
# `decode(..., max_attention_window=N)` reads the last $\min(L, N)$ tokens. Appending 15 tokens one at a time
# into 6 slots leaves tokens 12, 13, 14 in slots 0, 1, 2 and tokens 9, 10, 11 in slots 3, 4, 5:

# %%
cache = torch.zeros(1, N, 1, 16)
for t in range(steps):
    token = torch.full((1, 1, 1, 16), float(t))
    fast.append_kv(cache, cache.clone(), token, token, torch.tensor([t], dtype=torch.int32), max_attention_window=N)
print("slots hold tokens", cache[0, :, 0, 0].int().tolist())
assert cache[0, :, 0, 0].int().tolist() == held[-1].tolist()

# %% [markdown]
# ## 3. Why the first tokens matter: attention sinks
#
# Xiao et al. (2023, *Efficient Streaming Language Models with Attention Sinks*) found that models trained with
# full causal attention put a large share of every query's attention on the first few tokens, whatever those
# tokens say. Softmax must hand out a total weight of 1; a head with nothing useful to attend to parks the
# weight on tokens every query has always seen, the first ones. Once a rolling window drops them, that weight
# has nowhere to go, the remaining scores get inflated, and perplexity explodes.
#
# We have no trained model here, so the next cell builds a **synthetic** head that behaves the way the paper
# describes: keys of the first 4 tokens share a direction that every query also has (a "sink" direction),
# the other keys are random. This is an illustration of the mechanism, not a measurement of a real model.

# %%
d, L, S = 64, 200, 4
sink_dir = torch.randn(d, dtype=torch.float64)
sink_dir /= sink_dir.norm()
keys = torch.randn(L, d, dtype=torch.float64)
keys[:S] += 10.0 * sink_dir  # the first tokens' keys carry the sink direction
queries = torch.randn(L, d, dtype=torch.float64) + 3.0 * sink_dir  # every query looks for it a little
scores = queries @ keys.T / d**0.5
scores = scores.masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf"))
probs = torch.softmax(scores, -1)
mass_first = probs[:, :S].sum(-1)
print(f"share of attention on the first {S} tokens, averaged over queries 50..199: {mass_first[50:].mean():.2f}")

# %% [markdown]
# What happens to the last query when the cache is a window of 32 tokens, with and without the first 4. Softmax
# renormalizes over what is left: each window key's weight is its full-attention weight divided by the total
# weight of the keys kept. Without the sinks that total is small and every window weight is inflated several
# times over; with them the weights stay near what the model was trained to produce. (Real models show the
# consequence in perplexity: the paper's Figure 3.)

# %%
W = 32
last = L - 1
window_keys = torch.arange(last - W + S + 1, last + 1)  # the N - S newest, kept in both cases
kept_mass = probs[last, window_keys].sum()
inflation_window_only = 1 / probs[last, last - W + 1 :].sum()
inflation_with_sinks = 1 / (kept_mass + probs[last, :S].sum())
print(f"window keys' weights multiplied by {inflation_window_only:.1f} without sinks, "
      f"by {inflation_with_sinks:.2f} with them")  # fmt: skip
assert inflation_window_only > 2 * inflation_with_sinks
fig, ax = plt.subplots(figsize=(7, 2.5))
ax.bar(range(60), probs[last, :60].numpy())
ax.set(xlabel="key position", ylabel="weight", title=f"query {last}: attention on the first 60 keys (synthetic)")
plt.show()

# %% [markdown]
# ## 4. StreamingLLM: sinks pinned, the rest rolling
#
# The fix is to keep the first $S$ tokens forever (TensorRT-LLM's `sink_token_length`): they take slots
# $0..S-1$, and token $t \ge S$ goes to slot $S + (t - S) \bmod (N - S)$. The cache holds the sinks and the last
# $N - S$ tokens.

# %%
N, S, steps = 7, 2, 16
held = np.full((steps, N), -1)
for t in range(steps):
    if t:
        held[t] = held[t - 1]
    slot = t if t < S else S + (t - S) % (N - S)
    held[t, slot] = t
fig, ax = plt.subplots(figsize=(5.5, 6))
ax.imshow(np.where(held < 0, np.nan, held), cmap="viridis", aspect="auto")
ax.axvline(S - 0.5, color="k", lw=2)
for t in range(steps):
    for s in range(N):
        if held[t, s] >= 0:
            ax.text(s, t, held[t, s], ha="center", va="center", color="w", fontsize=8)
ax.set(xlabel="slot (left of the line: sinks)", ylabel="step", title=f"N = {N}, S = {S}: sinks pinned, the rest roll")
plt.show()

cache = torch.zeros(1, N, 1, 16)
for t in range(steps):
    token = torch.full((1, 1, 1, 16), float(t))
    fast.append_kv(cache, cache.clone(), token, token, torch.tensor([t], dtype=torch.int32),
                   max_attention_window=N, sink_token_length=S)  # fmt: skip
assert cache[0, :, 0, 0].int().tolist() == held[-1].tolist()
print("kernel's slots:", cache[0, :, 0, 0].int().tolist(), "  cached tokens in order:",
      reference.window_tokens(steps, N, S).tolist())  # fmt: skip

# %% [markdown]
# The decode kernel walks the cached tokens in token order, key $n$ of the frame being token $n$ for a sink and
# token $n + (L - N)$ otherwise, and must find each one's slot. Written as above that is a remainder by
# $N - S$, a number known only at run time, which costs a GPU a long integer sequence per key. But within one
# frame the rolling part's slots run up by one from $S + ((L - N) \bmod (N - S))$ and wrap once, back to $S$:
# so the kernel computes that start and the key where the wrap happens once per program, and each key's slot
# is one compare and one select. The check below runs both forms over every frame up to 40 tokens. On an H200
# (B8 L32768 and B1 L131072, GQA 32/8, `bench/bench_features.py`), decoding over a wrapped cyclic cache then
# reads 1.00-1.02x as fast as plain decode over the same number of keys, contiguous or paged; with the
# remainder per key, B1 over pages had run at 0.82x.


# %%
def slot_by_remainder(n, length, window, sinks):
    token = n if n < sinks else n + max(length - window, 0)
    return token if token < sinks else sinks + (token - sinks) % (window - sinks)


def slot_by_select(n, length, window, sinks):
    ring = window - sinks
    shift = max(length - window, 0) % ring  # once per program
    wrap = sinks + ring - shift  # the first key whose slot has wrapped back to `sinks`
    return n if n < sinks else (n + shift if n < wrap else n + shift - ring)


checked = 0
for window in range(2, 12):
    for sinks in range(window):
        for length in range(1, 41):
            for n in range(min(length, window)):
                assert slot_by_select(n, length, window, sinks) == slot_by_remainder(n, length, window, sinks)
                checked += 1
print(f"compare-and-select slots equal the remainder form on {checked} (frame, key) pairs")

# %% [markdown]
# ## 5. RoPE positions within the cache
#
# With RoPE a key's rotation encodes its position. After 16 tokens the cache holds tokens 0, 1, 11..15; their
# original positions have a gap of 9 between the sinks and the window, a distance the model never saw between
# neighbours at training time if the window is long. StreamingLLM instead numbers the tokens by their place
# *in the cache*: sinks $0..S-1$, then the window's tokens at $S, S+1, \dots$ in token order, and the query by
# its own place (the last). That needs the keys stored **before** rotation, and rotated when read, because a
# key's place changes every time the window moves. TensorRT-LLM does the same (`position_shift_enabled`: its
# pre-processing kernel caches `k` unrotated, and `shiftKCache` rotates key $i$ of the frame by $i$ before the
# generation kernel reads it); the docstring of `attn.reference.kv_cache` lists where we differ.
#
# $$\text{position of token } t = \begin{cases} t & t < S \\ S + t - \max(S,\, L - (N - S)) & t \ge S \end{cases}$$
#
# The live check: feed a sequence through `preprocess` (which caches k unrotated and turns q by its place) and
# `decode(rotary_dim=...)` (which turns the keys as it reads them), and compare with attention computed directly
# over the sinks plus the last $N - S$ tokens with keys rotated at $0, 1, \dots$.

# %%
hq, hkv, d, N, S, total = 4, 2, 32, 12, 3, 40
width = (hq + 2 * hkv) * d
qkv = torch.randn(1, total, width, dtype=torch.float16)
k_cache = torch.zeros(1, N, hkv, d, dtype=torch.float16)
v_cache = torch.zeros_like(k_cache)
lens = torch.zeros(1, dtype=torch.int32)
kw = dict(num_heads_q=hq, num_heads_kv=hkv, rotary_dim=d, max_attention_window=N, sink_token_length=S)
for start in range(0, total, 9):  # chunks of 9 = N - S tokens, then the rest
    chunk = qkv[:, start : start + 9]
    q = fast.preprocess(chunk, k_cache, v_cache, lens, **kw)
    lens += chunk.shape[1]
out = fast.decode(q[:, -1:], k_cache, v_cache, lens, max_attention_window=N, sink_token_length=S, rotary_dim=d)

heads = qkv[0].view(total, hq + 2 * hkv, d)
tokens = reference.window_tokens(total, N, S)
k_direct = reference.apply_rope(heads[tokens, hq : hq + hkv].float(), torch.arange(len(tokens)))
q_direct = reference.apply_rope(heads[-1:, :hq].float(), torch.tensor([len(tokens) - 1]))
direct = reference.attention(q_direct[None].double(), k_direct[None].double(), heads[None, tokens, hq + hkv :].double())
err = ((out.double() - direct).norm() / direct.norm()).item()
print(f"cached tokens {tokens.tolist()}; kernels vs direct computation: relative error {err:.1e}")
assert err < 2e-3

# %% [markdown]
# ## 6. A prompt in chunks over the ring: attend first, append after
#
# So far the cache grew a token or a short chunk at a time. A long prompt comes in chunks too (chunked context),
# and each chunk's queries attend to the cached prefix plus the chunk itself. Without a window the recipe is
# "append the chunk, then attend". Over a full ring that recipe is wrong: a chunk of $n$ tokens appended at
# length $L$ writes slots that hold tokens $L - N .. L - N + n - 1$, and its own first query, at position $L$,
# still needs every one of them but the oldest ($p - N < j \le p$). The picture: a ring of $N = 8$ holding tokens
# 12..19, and a chunk of 5 (tokens 20..24). Red: keys the chunk's first query needs that its own append destroys.

# %%
N, L, n = 8, 20, 5
before = [L - N + (s - L) % N for s in range(N)]  # the token in each slot before the chunk
after = [t if not any(u % N == s for u in range(L, L + n)) else L + (s - L) % N for s, t in enumerate(before)]
needed = set(range(L - N + 1, L + 1))  # what query L sees
fig, axes = plt.subplots(1, 2, figsize=(9, 2.2))
for ax, row, title in ((axes[0], before, "ring before the chunk"), (axes[1], after, "after appending tokens 20..24")):
    lost = [t not in row and t in needed for t in before]
    colors = [
        "tab:red" if lost[s] and row is after else "tab:blue" if t < L else "tab:green" for s, t in enumerate(row)
    ]
    ax.bar(range(N), [1] * N, color=colors, edgecolor="k")
    for s, t in enumerate(row):
        ax.text(s, 0.5, t, ha="center", va="center", color="w")
    ax.set(title=title, xlabel="slot", yticks=[])
plt.tight_layout()
plt.show()
print("query 20 needs", sorted(needed), "- after the append the ring lacks", sorted(needed - set(after) - {L}))

# %% [markdown]
# So over a cyclic cache `context_attention` takes the chunk's keys and values separately (`k_new`, `v_new`),
# counts `cache_seqlens` *before* the chunk, and leaves the cache alone; the caller appends afterwards. Each
# query $p$ gets what `decode` would have given it had the prompt come one token at a time: the sinks and the
# last $N - S$ tokens up to $p$, keys turned by their places in that frame, the query turned at $\min(p, N-1)$.
# The fast version gathers each sequence's still-cached rolling tokens and the chunk into one packed
# temporary (in token order the rolling window is a plain band, `window_size=(N - S - 1, 0)`) and runs the
# fused prefill kernel once; the sinks, seen by every query at a distance that stops growing, are a handful
# of keys scored beside it and merged through the log-sum-exps.
#
# The live check: a 40-token prompt with RoPE, chunks of 7, 1, 15 and 17 (longer than the ring of 12, with
# 3 sinks), each attended and then appended, against decode-style attention computed token by token from
# scratch.

# %%
hq, hkv, d, N, S, total = 4, 2, 32, 12, 3, 40
q_raw = torch.randn(total, hq, d, dtype=torch.float16)
k_all = torch.randn(total, hkv, d, dtype=torch.float16)  # cached unrotated: the sinks move RoPE to read time
v_all = torch.randn_like(k_all)
q_all = reference.apply_rope(q_raw, torch.arange(total).clamp(max=N - 1))  # each query at min(p, N - 1)
k_cache = torch.zeros(1, N, hkv, d, dtype=torch.float16)
v_cache = torch.zeros_like(k_cache)
lens, outs, start = torch.zeros(1, dtype=torch.int32), [], 0
for size in (7, 1, 15, 17):
    rows = slice(start, start + size)
    cu = torch.tensor([0, size], dtype=torch.int32)
    out = fast.context_attention(q_all[rows], k_cache, v_cache, lens, cu_seqlens_q=cu, max_attention_window=N,
                                 sink_token_length=S, k_new=k_all[rows], v_new=v_all[rows], rotary_dim=d)  # fmt: skip
    outs.append(out)
    # only now: one append writes at most N - S rolling slots, so a long chunk goes in pieces
    for lo in range(start, start + size, N - S):
        hi = min(lo + N - S, start + size)
        fast.append_kv(k_cache, v_cache, k_all[lo:hi], v_all[lo:hi], torch.tensor([lo], dtype=torch.int32),
                       cu_seqlens_new=torch.tensor([0, hi - lo], dtype=torch.int32), max_attention_window=N,
                       sink_token_length=S)  # fmt: skip
    lens += size
    start += size
chunked = torch.cat(outs)
direct = []
for p in range(total):
    tokens = torch.arange(p + 1) if p < S else reference.window_tokens(p + 1, N, S)
    k = reference.apply_rope(k_all[tokens].float(), torch.arange(len(tokens)))
    direct.append(reference.attention(q_all[None, p : p + 1].double(), k[None].double(), v_all[None, tokens].double()))
direct = torch.cat(direct, dim=1)[0]
err = ((chunked.double() - direct).norm() / direct.norm()).item()
print(f"chunked over the ring vs token-by-token definition: relative error {err:.1e}")
assert err < 2e-3

# %% [markdown]
# ## 7. Memory saved
#
# The cache holds $N$ tokens instead of $L$: for a Llama-3-8B-like model (32 layers, 8 KV heads of 128, fp16)
# each token costs $2 \cdot 32 \cdot 8 \cdot 128 \cdot 2$ bytes = 128 KiB. The sinks cost a handful of slots.

# %%
per_token = 2 * 32 * 8 * 128 * 2
lengths = np.array([4096, 16384, 65536, 262144])
for n in (4096, 1024):
    print(f"window N = {n:>5}: " + ", ".join(f"L={x}: {min(x, n) / x:5.1%} of the full cache" for x in lengths))
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(lengths, lengths * per_token / 2**30, "o-", label="full cache")
ax.plot(lengths, np.minimum(lengths, 4096) * per_token / 2**30, "o-", label="rolling, N = 4096 (4 sinks)")
ax.set(xscale="log", xlabel="sequence length L", ylabel="GiB per sequence", title="KV cache of one sequence")
ax.legend()
plt.show()

# %% [markdown]
# ## Summary
#
# - A sliding window of $N$ lets the cache roll through $N$ slots: token $t$ in slot $t \bmod N$.
# - Models trained with full attention dump attention on their first tokens; dropping them breaks the model.
# - StreamingLLM pins $S$ sinks in slots $0..S-1$; the rest roll through $N - S$ slots.
# - Positions are counted within the cache, so keys are cached unrotated and rotated at read time; the decode
#   kernel does it under a compile-time flag (`rotary_dim`), leaving plain decode untouched.
# - A prompt chunk over a full ring must attend before it is appended (its append overwrites keys its own
#   queries need): `context_attention(..., max_attention_window=N, k_new=..., v_new=...)`, then `append_kv`.
