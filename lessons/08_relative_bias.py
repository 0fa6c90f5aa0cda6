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
# # T5's relative attention bias, regular and implicit
#
# T5, from Raffel et al., *Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer*
# (JMLR 2020), has no position embeddings at all. Instead every attention score receives a learned scalar that
# depends only on the head and on how far the key is from the query, with far distances pooled into
# logarithmically wider *buckets*. Its descendants (Flan-T5, mT5, UL2, ByT5) use the same scheme,
# and TensorRT-LLM runs it through its GPT attention plugin in two modes, which `attn` reproduces.
#
# What we cover, in order:
#
# 1. what T5 adds to the scores, and why it uses no $1/\sqrt{D}$;
# 2. the bucket function, derived, plotted, and checked against the T5 code in transformers;
# 3. the bias on a small grid, head by head;
# 4. TensorRT-LLM's two modes: *regular* (a given `[H, L, L]` bias) and *implicit* (a table `[H, num_buckets]`);
# 5. how `attn`'s kernels do implicit mode, a per-distance table, and why: bucket edges that sit exactly on an
#    integer;
# 6. the memory of the two modes, measured;
# 7. live checks of `attn.fast.attention` and `attn.fast.decode` in both modes.

# %%
import math

import matplotlib.pyplot as plt
import torch

import attn
from attn import reference
from attn.fast.attention import LOG2E, REL_PAD, relative_bias_operands

torch.manual_seed(0)
torch.set_printoptions(precision=4, sci_mode=False, linewidth=120)

# on a GPU the kernels run for real and need their inputs there; on a CPU the interpreter reads ordinary tensors
device = "cuda" if torch.cuda.is_available() else "cpu"


def maxdiff(a, b):
    """Largest absolute difference, taken in float64 so the comparison adds no rounding of its own."""
    return (a.double() - b.double()).abs().max().item()


# %% [markdown]
# ## 1. What T5 adds to the scores
#
# Lesson 06 showed that attention on its own is blind to token order. ALiBi fixes that with a fixed line per head;
# T5 learns the shape instead. For query $i$ and key $j$ let $r = j - i$ be the *relative position* (negative for
# keys in the past). Each head $h$ owns a small learned table $t_h$ of `num_buckets` numbers (32 in every T5
# checkpoint), and the score becomes
#
# $$s_{ij} = q_i \cdot k_j + t_h\bigl[\beta(r)\bigr],$$
#
# where $\beta$ maps a relative position to a bucket index. Only the first layer of the encoder and of the decoder
# owns a table; the other layers reuse the bias that layer computed. Since $\beta$ depends only on $r$, the bias is
# constant along every diagonal of the score matrix (a Toeplitz matrix), whatever the sequence length.
#
# **No $1/\sqrt{D}$.** T5 was trained without scaling the dot product: Mesh TensorFlow folded the factor into the
# initialization of the query projection, so the checkpoints expect $\tau = 1$. TensorRT-LLM expresses the scale
# through `q_scaling`, $\tau = 1/(q_\text{scaling}\sqrt{D})$, so T5 runs with $q_\text{scaling} = 1/\sqrt{D}$; `attn`
# accepts the same argument (or `softmax_scale=1`). The bias is added *after* the scale, so with $\tau = 1$ the
# order does not matter for T5 anyway.

# %%
D = 32
q, k, v = (torch.randn(1, 10, 4, D, dtype=torch.float64) for _ in range(3))
rel = attn.RelativeBias(table=torch.randn(4, 32, dtype=torch.float64), max_distance=128)
with_q_scaling = reference.attention(q, k, v, rel_bias=rel, q_scaling=D**-0.5)
unit_scale = reference.attention(q, k, v, rel_bias=rel, softmax_scale=1.0)
print(f"q_scaling = 1/sqrt(D) vs softmax_scale = 1: {maxdiff(with_q_scaling, unit_scale):.1e}")
assert maxdiff(with_q_scaling, unit_scale) < 1e-12

# %% [markdown]
# ## 2. The bucket function
#
# T5 wants fine resolution for nearby tokens and coarse resolution far away, where "17 or 19 tokens back" hardly
# matters. $\beta$ is built in three steps.
#
# **Direction.** In the encoder (*bidirectional*) keys on both sides are visible, so the `num_buckets` are split in
# two halves of $n = \text{num\_buckets}/2$: keys after the query ($r > 0$) use buckets $n \dots 2n-1$, the rest
# buckets $0 \dots n-1$, and both work with the distance $d = |r|$. In the decoder (*unidirectional*, causal) only
# the past is visible, so all $n = \text{num\_buckets}$ buckets go to $d = \max(-r, 0)$; keys in the future (which
# the causal mask hides anyway) all fall into bucket 0 with $d = 0$.
#
# **Exact buckets.** Half of the $n$ buckets, $e = n/2$ of them, are exact: distance $d < e$ gets bucket $d$.
#
# **Logarithmic buckets.** The other $n - e$ buckets divide the range $[e, \text{max\_distance})$ into pieces of
# equal width on a logarithmic scale:
#
# $$\beta(d) = e + \left\lfloor \frac{\ln(d/e)}{\ln(\text{max\_distance}/e)}\,(n - e) \right\rfloor,
# \qquad \text{capped at } n - 1 .$$
#
# Bucket $e + m$ thus starts at $d = e\,\rho^{m}$ with $\rho = (\text{max\_distance}/e)^{1/(n-e)}$, and every distance
# from max_distance on lands in the last bucket: the bias **saturates**. For T5's defaults (32 buckets, max_distance
# 128) that gives:
#
# - bidirectional: $n = 16$, $e = 8$, eight log buckets spanning a factor $128/8 = 16$, so $\rho = \sqrt 2$: every
#   second edge is a power of two, at $d = 16, 32, 64$ (and 128);
# - unidirectional: $n = 32$, $e = 16$, sixteen log buckets spanning a factor 8, so $\rho = 2^{3/16}$: apart from
#   the ends 16 and 128, no edge is an integer.
#
# `attn.reference.t5_bucket` implements this in float32, as T5 does. First, a check against the function the T5
# models in transformers actually call, over every relative position in $[-1000, 1000]$ and several settings.
# (transformers is imported only now: `attn` must be imported before anything that imports Triton, so that on a
# CPU it can switch Triton to its interpreter first.)

# %%
from transformers.models.t5.configuration_t5 import T5Config  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

t5_bucket_hf = T5Attention._relative_position_bucket
rp = torch.arange(-1000, 1001)
for bidirectional in (True, False):
    for num_buckets, max_distance in ((32, 128), (16, 64), (8, 20), (64, 256)):
        hf = t5_bucket_hf(rp, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
        ours = reference.t5_bucket(rp, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
        assert torch.equal(ours, hf), (bidirectional, num_buckets, max_distance)
print("t5_bucket equals T5Attention._relative_position_bucket for all 2001 positions, 8 settings")

# %% [markdown]
# Now the picture. On the left, the bucket against the relative position; on the right, the same against the
# distance on a logarithmic axis, where log-spaced buckets become an even staircase. Dotted lines mark the end of
# the exact buckets and max_distance.

# %%
rp = torch.arange(-300, 301)
b_bi = reference.t5_bucket(rp, bidirectional=True)
b_uni = reference.t5_bucket(rp, bidirectional=False)

fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
ax.plot(rp, b_bi, drawstyle="steps-mid", label="bidirectional (encoder)")
ax.plot(rp, b_uni, drawstyle="steps-mid", label="unidirectional (decoder)")
for x in (-128, -8, 8, 128):
    ax.axvline(x, color="grey", ls=":", lw=0.8)
ax.set_xlabel("relative position r = j − i")
ax.set_ylabel("bucket")
ax.set_title("T5 buckets, num_buckets=32, max_distance=128")
ax.legend(fontsize=8)

dist = torch.arange(1, 301)
ax2.semilogx(dist, reference.t5_bucket(-dist, bidirectional=True), ".", ms=3, label="bidirectional, past keys")
ax2.semilogx(dist, reference.t5_bucket(dist, bidirectional=True), ".", ms=3, label="bidirectional, future keys")
ax2.semilogx(dist, reference.t5_bucket(-dist, bidirectional=False), ".", ms=3, label="unidirectional, past keys")
for x, label in ((8, "e = 8"), (16, "e = 16"), (128, "max_distance")):
    ax2.axvline(x, color="grey", ls=":", lw=0.8)
    ax2.text(x * 1.05, 1, label, fontsize=8, color="grey")
ax2.set_xlabel("distance d = |r| (log scale)")
ax2.set_title("Exact below e, log-spaced up to 128, then flat")
ax2.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The number of distinct distances per bucket, for the bidirectional past half, makes the growth concrete:

# %%
past = reference.t5_bucket(-torch.arange(0, 129), bidirectional=True)
for bucket in range(16):
    ds = torch.nonzero(past == bucket).flatten()
    last = "..." if bucket == 15 else str(ds[-1].item())
    print(f"bucket {bucket:2d}: distances {ds[0].item():3d} .. {last}")

# %% [markdown]
# ## 3. The bias, head by head
#
# Real T5 tables are learned; here they are random numbers, which is enough to see the structure.
# `attn.reference.relative_bias_matrix(rel, Sq, Sk)` returns the bias `[H, Sq, Sk]` one sequence gets, with the
# query of row $i$ at position $i + S_k - S_q$ (bottom-right, as everywhere in `attn`). On a 40×40 grid, the first
# panel shows the bucket of every cell (bidirectional), the others the bias of three heads; grey cells of the
# decoder row are hidden by the causal mask. Every panel is constant along diagonals, and the bands widen with the
# distance from the main diagonal.

# %%
n = 40
table = torch.randn(3, 32)
enc = attn.RelativeBias(table=table, max_distance=128, bidirectional=True)
dec = attn.RelativeBias(table=table, max_distance=128, bidirectional=False)
grid_rp = torch.arange(n)[None, :] - torch.arange(n)[:, None]
causal = reference.attention_mask(n, n, causal=True)
rows = {
    "encoder": (reference.t5_bucket(grid_rp, bidirectional=True), reference.relative_bias_matrix(enc, n, n)),
    "decoder": (
        reference.t5_bucket(grid_rp, bidirectional=False).float().masked_fill(~causal, float("nan")),
        reference.relative_bias_matrix(dec, n, n).masked_fill(~causal, float("nan")),
    ),
}
vmax = table.abs().max().item()
fig, axes = plt.subplots(2, 4, figsize=(12, 5.6), layout="constrained")
for r, (name, (buckets, bias)) in enumerate(rows.items()):
    for c in range(4):
        ax = axes[r, c]
        if c == 0:
            cmap = plt.get_cmap("viridis").copy()
            cmap.set_bad("lightgrey")
            im0 = ax.imshow(buckets.float().numpy(), cmap=cmap, vmin=0, vmax=31)
            ax.set_title(f"{name}: bucket", fontsize=9)
        else:
            cmap = plt.get_cmap("RdBu").copy()
            cmap.set_bad("lightgrey")
            im = ax.imshow(bias[c - 1].numpy(), cmap=cmap, vmin=-vmax, vmax=vmax)
            ax.set_title(f"{name}: bias of head {c - 1}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("key j", fontsize=8)
        ax.set_ylabel("query i", fontsize=8)
fig.colorbar(im0, ax=axes[:, 0], shrink=0.6, label="bucket")
fig.colorbar(im, ax=axes[:, 1:], shrink=0.6, label="bias added to the score")
plt.show()

# every diagonal holds one value: the bias is a function of j - i only
bias = reference.relative_bias_matrix(enc, n, n)
assert all(bias[:, i, j].eq(bias[:, 0, j - i]).all() for i in range(n) for j in range(i, n))
assert all(bias[:, i, j].eq(bias[:, i - j, 0]).all() for i in range(n) for j in range(i))

# %% [markdown]
# One more outside check: transformers' `T5Attention.compute_bias(Sq, Sk, past_seen_tokens=Sk - Sq)` builds the
# bias `[1, H, Sq, Sk]` a T5 layer adds, from its `nn.Embedding` of shape `[num_buckets, H]`. Our table is its
# transpose. For an encoder layer and a decoder layer, with a chunk of 7 queries after 23 cached tokens:

# %%
for is_decoder in (False, True):
    config = T5Config(d_model=32, d_kv=8, num_heads=4, is_decoder=is_decoder)
    layer = T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
    with torch.no_grad():
        hf_bias = layer.compute_bias(7, 30, past_seen_tokens=23)[0]  # [H, Sq, Sk]
        ours = reference.relative_bias_matrix(
            attn.RelativeBias(table=layer.relative_attention_bias.weight.T, bidirectional=not is_decoder), 7, 30
        )
    print(f"{'decoder' if is_decoder else 'encoder'}: compute_bias vs relative_bias_matrix {maxdiff(hf_bias, ours)}")
    assert torch.equal(hf_bias, ours)

# %% [markdown]
# ## 4. TensorRT-LLM's two modes
#
# TensorRT-LLM's GPT attention takes the bias as `relative_attention_bias` plus `max_distance`, and what it means
# depends on `max_distance`:
#
# - **regular** (`max_distance = 0`): the bias is a precomputed tensor `[H, L, L]`, `bias[h, query position, key
#   position]`, with $L$ at least the longest sequence; the kernel reads one value per score. This is what
#   transformers does too: `compute_bias` materializes `[1, H, Sq, Sk]` once per forward pass and hands it to
#   every layer.
# - **implicit** (`max_distance > 0`): only the learned table `[H, num_buckets]` is passed, and the bucket of each
#   score is computed inside the kernel. Nothing of size $S_q \times S_k$ ever exists.
#
# In `attn` both are an `attn.RelativeBias`: `RelativeBias(bias=...)` for regular mode, `RelativeBias(table=...,
# max_distance=..., bidirectional=...)` for implicit mode. Regular mode is the more general one: any `[H, L, L]`
# tensor works, Toeplitz or not. Implicit mode is the special case T5 needs. Turning an implicit bias into a regular
# one, by materializing it, gives the same attention:

# %%
L = 48
q, k, v = (torch.randn(1, L, 4, D, dtype=torch.float64) for _ in range(3))
implicit = attn.RelativeBias(table=torch.randn(4, 32, dtype=torch.float64), max_distance=128)
regular = attn.RelativeBias(bias=reference.relative_bias_matrix(implicit, L, L))  # [H, L, L]
for causal_ in (False, True):
    a = reference.attention(q, k, v, causal=causal_, rel_bias=implicit, q_scaling=D**-0.5)
    b = reference.attention(q, k, v, causal=causal_, rel_bias=regular, q_scaling=D**-0.5)
    print(f"causal={causal_}: implicit vs materialized regular {maxdiff(a, b):.1e}")
    assert maxdiff(a, b) < 1e-12

# %% [markdown]
# Regular mode indexes by absolute positions. A chunk of $S_q$ queries after $S_k - S_q$ cached tokens reads rows
# $S_k - S_q, \dots, S_k - 1$ of the bias, and a decode step reads row $S_k - 1$: the same rows a full prefill would
# read for those tokens. That is why $L$ must cover the longest key sequence, and why `attn` rejects a shorter bias.
#
# ## 5. Implicit mode in `attn`'s kernels, and why a per-distance table
#
# A kernel could evaluate $\beta$ per score as TensorRT-LLM's implicit mode describes: a subtraction, a logarithm,
# a floor, a lookup. `attn`'s kernels do something simpler. On the host, `RelativeBias.distance_table()` evaluates
# the reference `t5_bucket` once for every relative position $r \in [-\text{max\_distance}, \text{max\_distance}]$
# and gathers the table with it, giving `[H, 2·max_distance + 1]` float32 values, the bias of each distance. The
# kernel then reads, for each score,
#
# $$\text{dist\_table}_h\bigl[\operatorname{clamp}(r, -\text{max\_distance}, \text{max\_distance}) +
# \text{max\_distance}\bigr],$$
#
# and the clamp is exact because every $|r| \ge \text{max\_distance}$ is in the last bucket of its side. With T5's
# defaults the table holds 257 values per head instead of 32, about 1 KB per head, read from cache.

# %%
tab = torch.randn(3, 32)
rel = attn.RelativeBias(table=tab, max_distance=128)
dist_table = rel.distance_table()
print("table", tuple(tab.shape), "-> distance table", tuple(dist_table.shape), dist_table.dtype)
rp = torch.arange(-1000, 1001)
via_clamp = dist_table[:, rp.clamp(-128, 128) + 128]
via_buckets = tab[:, reference.t5_bucket(rp, num_buckets=32, max_distance=128)]
assert torch.equal(via_clamp, via_buckets)
print("clamped distance lookup == bucket lookup for every r in [-1000, 1000]")

# %% [markdown]
# Why not simply compute the bucket in the kernel? Because the bucket is a *floor* of a floating-point number, and
# with T5's default settings some of those numbers are exact integers. Then the bucket depends on the last bit of a
# logarithm. Let us find those distances: for every $d$ from $e$ to 300, compute
# $x = \ln(d/e)/\ln(\text{max\_distance}/e)\cdot(n - e)$ in float32 as T5 does, and flag the distances where $x$
# comes out as an exact integer, that is, exactly on the edge between two buckets.


# %%
def log_buckets(d, n, e, max_distance, nudge=0):
    """The logarithmic branch of T5's bucket, with the float32 logarithm moved by `nudge` ulps."""
    log = torch.log(d.float() / e)
    for _ in range(abs(nudge)):
        log = torch.nextafter(log, torch.full_like(log, math.copysign(math.inf, nudge)))
    x = log / math.log(max_distance / e) * (n - e)
    return x, (e + x.long()).clamp(max=n - 1)


on_edge = {}
for name, n_half in (("bidirectional", 16), ("unidirectional", 32)):
    e = n_half // 2
    d = torch.arange(e, 301)
    x, bucket = log_buckets(d, n_half, e, 128)
    edge = x == x.round()
    on_edge[name] = d[edge]
    print(f"{name:14s} (n={n_half}, e={e}): x is an exact integer at d = {d[edge].tolist()}, x = {x[edge].tolist()}")

# %% [markdown]
# As derived in section 2: in the bidirectional case the edges at $d = 16, 32, 64, 128, 256$ are powers of two,
# where $\ln(d/8)/\ln 16$ is exactly $\tfrac14, \tfrac12, \tfrac34, 1, \tfrac54$ in real arithmetic, and PyTorch's
# float32 happens to land on it exactly. ($d = e$ gives $\ln 1 = 0$, exact in any implementation, and from 128 on the
# cap at $n - 1$ hides the edge.) In the unidirectional case only those two harmless ends are integers.
#
# Now move the float32 logarithm by a single ulp, the smallest change a float32 can make, in either direction. A
# GPU logarithm is not correctly rounded: CUDA documents its accurate `logf` to within 1 ulp and the fast `__logf`
# to several, so this is exactly the kind of difference another implementation may produce:

# %%
for name, n_half in (("bidirectional", 16), ("unidirectional", 32)):
    e = n_half // 2
    d = torch.arange(e + 1, 301)
    _, base = log_buckets(d, n_half, e, 128)
    for nudge in (-1, +1):
        _, moved = log_buckets(d, n_half, e, 128, nudge)
        changed = moved != base
        pairs = [f"d={di}: {b0} -> {b1}" for di, b0, b1 in zip(d[changed].tolist(), base[changed], moved[changed])]
        print(f"{name:14s} log {nudge:+d} ulp: {len(pairs)} distances change bucket  {', '.join(map(str, pairs))}")
        if name == "bidirectional" and nudge == -1:
            assert d[changed].tolist() == [16, 32, 64]

# %% [markdown]
# One ulp *down* moves distances 16, 32 and 64 into the previous bucket: a key exactly 16 tokens away would get the
# weight of bucket 9 instead of 10, a systematic change of the model on every such pair, not noise. One ulp *up*
# changes nothing, because those values already sit at the bottom of their bucket. Whether a particular GPU `log`
# errs downwards at exactly $\ln 2$, $\ln 4$, $\ln 8$ is a property of that implementation and its compiler flags;
# the per-distance table removes the question. The bucket is computed once, on the host, by the very function the
# reference and transformers use, so the kernel and the reference agree on every bucket by construction, and the
# kernel does no transcendental arithmetic for the bias at all. Its only cost is the larger table, a few KB.
#
# ## 6. Memory, measured
#
# How much does each mode need? We measure the bytes of the tensors the kernels are actually handed, taken from
# `relative_bias_operands`, the helper `attn.fast.attention` and `attn.fast.decode` call to turn a `RelativeBias`
# into the pointer the kernel reads: for regular mode that is the given `bias` itself, for implicit mode the
# distance table (in log2 units, padded with 256 copies of each end value so a prefill tile's gather needs no
# clamp). We also report the bytes of the learned table. Take $H = 16$ heads (T5-large) and float32;
# a float16 regular bias would halve its line, nothing more.
#
# A float32 `[16, L, L]` bias reaches 64 GiB at $L = 32768$, more than this machine has. Up to $L = 2048$ the regular
# bias below is a real (uninitialized) CPU tensor; beyond, it is a tensor on PyTorch's `meta` device, which has a
# shape, a dtype and an `nbytes` but no storage. The implicit side is always real.

# %%
H = 16
table = torch.randn(H, 32)
implicit = attn.RelativeBias(table=table, max_distance=128)
lengths = [2**p for p in range(7, 16)]
regular_bytes, implicit_bytes = [], []
for L in lengths:
    where = "cpu" if L <= 2048 else "meta"
    regular = attn.RelativeBias(bias=torch.empty(H, L, L, device=where))
    _, t_reg, _, _ = relative_bias_operands(regular)
    mode, t_imp, _, md = relative_bias_operands(implicit)
    # the kernels read the distance table in log2 units, from a copy padded with its end values on both sides
    held = t_imp.untyped_storage().nbytes()
    assert mode == 1 and md == 128 and held == (2 * md + 1 + 2 * REL_PAD) * H * 4
    assert torch.equal(t_imp[:, : 2 * md + 1], implicit.distance_table() * LOG2E)
    regular_bytes.append(t_reg.nbytes)
    implicit_bytes.append(held)
    print(
        f"L={L:6d}: regular {t_reg.nbytes / 2**20:10.1f} MiB ({where:4s})   "
        f"implicit distance table {held:6d} B   learned table {table.nbytes} B"
    )
    del regular, t_reg

fig, ax = plt.subplots(figsize=(6.5, 4))
ax.loglog(lengths, regular_bytes, "o-", label="regular: bias [H, L, L]")
ax.loglog(lengths, implicit_bytes, "s-", label="implicit (attn): distance table [H, 2·128+1], padded")
ax.loglog(lengths, [table.nbytes] * len(lengths), "^--", label="implicit: learned table [H, 32]")
ax.set_xlabel("longest sequence L (tokens)")
ax.set_ylabel("bytes")
ax.set_title(f"T5 bias memory, H={H}, float32")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The regular bias grows as $4HL^2$ bytes, a slope of 2 on the log-log plot: 16 MiB at 512 tokens, 1 GiB at 4096,
# 64 GiB at 32768. The implicit side is flat, $4H(2\cdot 128 + 1)$ = 16 KiB at every length. And since the distance
# table is derived from the learned one, it costs the model no extra weight memory. It is built once per learned
# table and kept while that tensor lives unchanged (a write into it is seen through its version counter): building
# it is about twenty small torch operations, and on the H200 that fixed cost, ~35 µs per call, was most of what T5
# cost a decode step (`bench/NOTES.md`, session 5).
#
# The reference, `attn.reference.attention`, materializes `[H, Sq, Sk]` in both modes: it is written to be read,
# not to save memory. Only the kernels avoid it.
#
# ## 7. Live checks of the kernels
#
# Every time these docs are built, the cells below run the Triton kernels on fresh random inputs and compare them to
# the reference, in both modes, in float32 and float16. As in lesson 01, each result is measured against the
# reference computed in float64, and may be at most twice as far from it as PyTorch computing in the kernel's own
# precision, plus a hair for float32's last bits. T5 runs with $q_\text{scaling} = 1/\sqrt{D}$.


# %%
def check(name, fn, ref_fn, args, **kw):
    q, *rest = args
    exact, exact_lse = ref_fn(*(x.double() if x.is_floating_point() else x for x in args), return_lse=True, **kw)
    same_precision = ref_fn(*args, **kw)
    out, lse = fn(*args, return_lse=True, **kw)
    err = maxdiff(out, exact)
    budget = 2 * maxdiff(same_precision, exact) + 1e-5
    # rows that see no key have lse = -inf on both sides, and -inf - -inf is NaN
    err_lse = torch.where(lse.double() == exact_lse, 0.0, lse.double() - exact_lse).abs().max().item()
    print(f"{str(q.dtype)[6:]:8s} {name:48s} err {err:.1e} <= {budget:.1e}   lse err {err_lse:.1e}")
    assert out.dtype == q.dtype and err <= budget and err_lse < 1e-3, name


def t5_implicit(hq, bidirectional=True, num_buckets=32, max_distance=128):
    table = torch.randn(hq, num_buckets, device=device)
    return attn.RelativeBias(table=table, max_distance=max_distance, bidirectional=bidirectional)


HQ, HKV, D = 4, 2, 32
# max_distance 20 lets these short sequences reach the clamped, saturated part of the table
rel_biases = {
    "implicit, bidirectional 32/128": t5_implicit(HQ),
    "implicit, unidirectional 16/20": t5_implicit(HQ, bidirectional=False, num_buckets=16, max_distance=20),
    "regular [H, 64, 64]": attn.RelativeBias(bias=torch.randn(HQ, 64, 64, device=device)),
}
# bfloat16 only on a GPU: the CPU interpreter cannot do bfloat16 arithmetic
dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
for dtype in dtypes:
    for mode, rb in rel_biases.items():
        for causal_, sq, sk in ((False, 40, 40), (True, 17, 50)):
            q = torch.randn(2, sq, HQ, D, dtype=dtype, device=device)
            k = torch.randn(2, sk, HKV, D, dtype=dtype, device=device)
            v = torch.randn(2, sk, HKV, D, dtype=dtype, device=device)
            name = f"prefill {mode}, {'causal Sq=17 Sk=50' if causal_ else 'full'}"
            check(name, attn.fast.attention, reference.attention, (q, k, v), causal=causal_, rel_bias=rb,
                  q_scaling=D**-0.5)  # fmt: skip

# %% [markdown]
# Decode: two new tokens per sequence over caches of different lengths, split over two blocks of the multi-block
# decode of lesson 05. The decoder of T5 is unidirectional, so that is the implicit mode tested here, next to the
# regular one.

# %%
lens = torch.tensor([2, 37, 60], dtype=torch.int32, device=device)
decode_biases = {
    "implicit, unidirectional 32/128": t5_implicit(HQ, bidirectional=False),
    "implicit, unidirectional 16/20": t5_implicit(HQ, bidirectional=False, num_buckets=16, max_distance=20),
    "regular [H, 64, 64]": rel_biases["regular [H, 64, 64]"],
}
for dtype in dtypes:
    for mode, rb in decode_biases.items():
        q = torch.randn(3, 2, HQ, D, dtype=dtype, device=device)
        k_cache = torch.randn(3, 64, HKV, D, dtype=dtype, device=device)
        v_cache = torch.randn(3, 64, HKV, D, dtype=dtype, device=device)
        check(f"decode {mode}", attn.fast.decode, reference.decode, (q, k_cache, v_cache, lens), causal=True,
              rel_bias=rb, q_scaling=D**-0.5, num_splits=2)  # fmt: skip

# %% [markdown]
# Finally an equivalence that needs no tolerance tuning: because both paths place the query at $i + S_k - S_q$, a
# decode step over a cache of $S$ tokens reads exactly the bias the last row of a causal prefill of those $S$ tokens
# reads, in either mode, so their outputs must agree to float32 rounding.

# %%
S = 45
q, k, v = (torch.randn(1, S, h, D, device=device) for h in (HQ, HKV, HKV))
for mode, rb in (("implicit", t5_implicit(HQ, bidirectional=False, num_buckets=16, max_distance=20)),
                 ("regular", rel_biases["regular [H, 64, 64]"])):  # fmt: skip
    prefill = attn.fast.attention(q, k, v, causal=True, rel_bias=rb, q_scaling=D**-0.5)
    step = attn.fast.decode(q[:, -1:].contiguous(), k, v, torch.tensor([S], dtype=torch.int32, device=device),
                            causal=True, rel_bias=rb, q_scaling=D**-0.5)  # fmt: skip
    err = maxdiff(prefill[:, -1:], step)
    print(f"{mode:8s}: decode step vs last prefill row {err:.1e}")
    assert err < 1e-5

# %% [markdown]
# **Speed.** These checks say the kernels are correct, not how fast they are. On an H200 (`bench/bench_features.py`,
# `docs/benchmarks.md` has the tables), at B4 H32 S4096 D128 causal, the prefill kernel takes 1.078x its bias-free
# time with an implicit bias and 2.56x with a regular one: regular mode loads a bias value per score from a tensor
# as large as the score matrix, 1 GB here, the very memory traffic a fused kernel exists to avoid, while implicit
# mode's keys more than max_distance to the left of a tile's rows all read one value per row (the plain loop with
# a row term) and only the tiles near the diagonal gather from the per-distance table. FlexAttention, given the
# same table as a captured tensor in its `score_mod`, is 4.8x slower. In decode (B8 L32768 and B1 L131072, one
# token against the whole cache) the implicit bias costs nothing measurable, 0.99-1.00x plain decode, once the
# per-distance table is built once per learned table and not on every call: that build, 19 small GPU operations,
# had been the whole 12-20% the bias cost.
#
# ## Summary
#
# - T5 adds a learned scalar per head and per bucket of the relative position $j - i$ to every score, and uses no
#   $1/\sqrt{D}$: $q_\text{scaling} = 1/\sqrt{D}$ in TensorRT-LLM's terms, $\tau = 1$.
# - Buckets: split by direction in the encoder, exact for $d < e$, log-spaced up to max_distance, then saturated.
#   `attn.reference.t5_bucket` equals transformers' `_relative_position_bucket`.
# - Regular mode takes a bias `[H, L, L]` indexed by absolute positions ($4HL^2$ bytes in float32); implicit mode
#   takes the table `[H, num_buckets]` and never builds anything $S_q \times S_k$.
# - `attn`'s kernels read implicit mode from a per-distance table `[H, 2·max_distance + 1]` built on the host with the
#   reference bucket function, with the distance clamped: with T5's defaults the bidirectional bucket edges at
#   $d = 16, 32, 64$ are exact integers, and one ulp of a logarithm moves them into the neighbouring bucket.
# - Both modes match the reference in the prefill and decode kernels, and a decode step matches the last prefill
#   row. On an H200 implicit mode costs 8% in prefill and nothing in decode; regular mode 2.6x in prefill.
