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
# # ALiBi: attention with linear biases
#
# A transformer layer on its own does not know the order of its tokens: permute the keys and values together
# and every output stays the same. Position has to be put in from outside. ALiBi, from Press, Smith and Lewis,
# *Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation* (ICLR 2022), does it
# with no embedding at all: each head subtracts from every score a penalty proportional to the distance between
# query and key. Bloom and MPT were trained this way, and TensorRT-LLM, vLLM and FlashAttention all support it.
#
# What we cover, in order:
#
# 1. what ALiBi replaces, and why it extrapolates to sequences longer than the training ones;
# 2. the slopes: the formula with $p = 2^{\lfloor \log_2 H \rfloor}$, and what head counts that are not a power of
#    two get;
# 3. TensorRT-LLM's generator: tensor-parallel slices, `alibi_scale`, and a check against Bloom's code;
# 4. the bias, head by head, on a 12×12 grid;
# 5. what it does to the attention weights: steep slopes make local heads;
# 6. the conventions that differ between libraries, and when they agree;
# 7. TensorRT-LLM's two orders, `alibi` and `alibi_with_scale`;
# 8. why the kernels never build the bias, and a live check of `attn.fast.attention` and `attn.fast.decode`.

# %%
import math

import _figures
import matplotlib.pyplot as plt
import torch

import attn
from attn import reference

torch.manual_seed(0)
torch.set_printoptions(precision=4, sci_mode=False, linewidth=120)

# on a GPU the kernels run for real and need their inputs there; on a CPU the interpreter reads ordinary tensors
device = "cuda" if torch.cuda.is_available() else "cpu"


def maxdiff(a, b):
    """Largest absolute difference, taken in float64 so the comparison adds no rounding of its own."""
    return (a.double() - b.double()).abs().max().item()


# %% [markdown]
# ## 1. What ALiBi replaces, and why it extrapolates
#
# The original transformer adds a position vector to each token's embedding before the first layer: fixed
# sinusoids, or a learned table with one row per position (GPT-2, OPT). A learned table has no row for position
# 2049 if training stopped at 2048, and Press et al. measured that sinusoids, which can be evaluated anywhere, still
# fall apart a little past the training length: perplexity climbs steeply. In their experiments rotary embeddings
# and T5's relative bias hold out somewhat longer, but degrade too.
#
# ALiBi drops the position vectors. Inside every layer, head $h$ adds to the score of query $i$ and key $j \le i$ a
# bias that is linear in their distance:
#
# $$s_{ij} = \tau\, q_i \cdot k_j + m_h\,(j - i), \qquad m_h > 0 .$$
#
# The key $d$ tokens back loses $m_h d$ in score, so its softmax weight is multiplied by $e^{-m_h d}$ relative to an
# otherwise equal key on the diagonal. The penalty depends on the distance only, never on the absolute positions,
# and it is the same straight line at every length. A longer input brings larger distances, but the rule that
# scores them is one the model was trained with, and it already pushes far keys towards zero weight.
#
# How much attention would a head put beyond its training length? Take a model trained on 1024 tokens, now reading
# 2048, and give every key the same content score, so that only the bias decides. The share of weight the last
# query puts on keys more than 1024 tokens back, for the 8 heads of an 8-head model:

# %%
train_len, test_len = 1024, 2048
slopes8 = attn.alibi_slopes(8)
weights = reference.alibi_bias(1, test_len, slopes8.double())[:, 0].softmax(-1)  # [H, Sk], last query
distance = test_len - 1 - torch.arange(test_len)
beyond = weights[:, distance >= train_len].sum(-1)
for h in range(8):
    print(f"head {h}: slope 1/{1 / slopes8[h]:<4.0f} share beyond {train_len} tokens: {beyond[h]:.1e}")

# %% [markdown]
# Even the gentlest head, slope $1/256$, gives the unseen distances under 2% of its weight; the others give
# practically nothing. Content scores can override the bias, of course, but they have to fight a penalty that
# grows without bound. This is also what ALiBi costs: a head cannot attend far back unless the content strongly
# asks for it.
#
# ## 2. The slopes
#
# The slopes form a geometric sequence, one value per head, fixed before training and never learned. For $H$ heads
# with $H$ a power of two, head $h = 0, \dots, H-1$ gets
#
# $$m_h = 2^{-8(h+1)/H},$$
#
# so 8 heads get $\tfrac12, \tfrac14, \dots, \tfrac1{256}$, and 16 heads get the same values with their geometric
# means slotted in between: $2^{-0.5}, 2^{-1}, 2^{-1.5}, \dots, 2^{-8}$. The 8 is TensorRT-LLM's `alibi_bias_max`,
# $b$ below; the paper and Bloom use 8.
#
# For other head counts the paper's reference code, which Bloom, TensorRT-LLM and vLLM all follow, does something
# less obvious. Let $p = 2^{\lfloor \log_2 H \rfloor}$ be the largest power of two not above $H$. The first $p$
# heads get the $p$-head sequence; the remaining $H - p$ heads take values from the $2p$-head sequence, but only its
# odd-numbered terms, because its even-numbered ones are exactly the $p$-head sequence already in use
# ($2^{-b\cdot 2k/2p} = 2^{-bk/p}$):
#
# $$m_h = \begin{cases} 2^{-b(h+1)/p} & h < p,\\[2pt] 2^{-b\,(2(h-p)+1)/(2p)} & h \ge p. \end{cases}$$
#
# Taking the odd terms in order means the extra heads fall *between* the steepest existing slopes, one in each gap,
# starting from the steep end: the extra heads are local ones (the gentlest slope stays $2^{-b}$, the steepest
# becomes $2^{-b/2p}$).
# The result is not the geometric sequence $2^{-b(h+1)/H}$ one might guess. Whatever the motivation, what matters
# for inference is that a checkpoint was trained with exactly these numbers, in this head order, so they must be
# reproduced head by head.
#
# $H = 12$, with the exponents $-\log_2 m_h$ written in units of $b/2p = 1/2$:

# %%
p12 = 2 ** math.floor(math.log2(12))
s12 = attn.alibi_slopes(12)
print(f"H = 12, p = {p12}")
for h in range(12):
    units = -math.log2(s12[h].item()) / (8 / (2 * p12))
    print(
        f"head {h:2d}: slope {s12[h]:.4f} = 2^-({units:.0f}/2)   {'p-head sequence' if h < p12 else 'odd term of 2p'}"
    )

# %% [markdown]
# Heads 8 to 11 sit at the odd exponents 1, 3, 5, 7, in the gaps before heads 0 to 3 (exponents 2, 4, 6, 8). The
# same picture for several head counts, on a log scale where a geometric sequence is a straight line. The first
# 8 heads of $H = 12$ are exactly the 8 heads of $H = 8$, and likewise for 40 and 32; the extra heads form a
# second, twice-denser line that starts again near 1:

# %%
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
# H = 8 and 32 draw large hollow markers: H = 12 and 40 start with exactly the same slopes and would hide them
for n, color in zip((8, 12, 32, 40), ("C0", "C1", "C2", "C3")):
    s = attn.alibi_slopes(n)
    p = 2 ** math.floor(math.log2(n))
    style = dict(ms=7, mfc="none", lw=0.8) if n == p else dict(ms=3)
    ax.semilogy(range(p), s[:p], "o-", color=color, label=f"H = {n}: heads 0..{p - 1}", **style)
    if n > p:
        ax.semilogy(range(p, n), s[p:], "s--", color=color, ms=4, mfc="none", label=f"H = {n}: heads {p}..{n - 1}")
ax.set_xlabel("head h")
ax.set_ylabel("slope (log scale)")
ax.set_title("Slopes by head: extra heads restart at the steep end")
ax.legend(fontsize=8)

# the same slopes on one line, sorted: the extra heads interleave with the first p
for row, n in enumerate((12, 40)):
    s = attn.alibi_slopes(n)
    p = 2 ** math.floor(math.log2(n))
    ax2.plot(s[:p], [row] * p, "o", color="C0", ms=5, label="heads h < p" if row == 0 else None)
    ax2.plot(s[p:], [row] * (n - p), "s", color="C3", ms=5, mfc="none", label="heads h ≥ p" if row == 0 else None)
ax2.set_xscale("log")
ax2.set_yticks([0, 1], ["H = 12", "H = 40"])
ax2.set_ylim(-0.7, 1.7)
ax2.set_xlabel("slope (log scale)")
ax2.set_title("Sorted: the extra heads fill the gaps among the steepest")
ax2.legend(fontsize=8, loc="center left")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. TensorRT-LLM's generator: tensor parallelism, `alibi_scale`, and Bloom
#
# `attn.alibi_slopes(num_heads, *, tp_size, tp_rank, alibi_scale, alibi_bias_max)` follows TensorRT-LLM's
# `generate_alibi_slopes`. Under tensor parallelism each of `tp_size` ranks holds `num_heads / tp_size`
# consecutive heads, and its slopes are its slice of the *global* sequence. The trap is to compute the slopes
# of a rank from its local head count: 40 heads on 4 ranks are not four 10-head models.

# %%
full40 = attn.alibi_slopes(40)
ranks = [attn.alibi_slopes(40, tp_size=4, tp_rank=r) for r in range(4)]
for r, s in enumerate(ranks):
    print(f"rank {r}: heads {10 * r:2d}..{10 * r + 9:2d}  slopes {s[0]:.4f} .. {s[-1]:.4f}")
assert torch.equal(torch.cat(ranks), full40)
print(f"rank 1 vs alibi_slopes(10), the wrong way: max diff {maxdiff(ranks[1], attn.alibi_slopes(10)):.3f}")

# %% [markdown]
# `alibi_scale` multiplies every slope, and `alibi_bias_max` is $b$. The slopes are computed in float64 and rounded
# once to float32.
#
# Finally, an independent check: Hugging Face's Bloom builds its ALiBi tensor with its own code,
# `build_alibi_tensor(attention_mask, num_heads, dtype)`, which returns `slope · position` for every key
# (`[H, 1, S]` for one sequence). With two tokens, the value at position 1 is the slope itself. Every head count
# from 1 to 64 must agree, up to float32 rounding: Bloom raises its powers in float32, where a few last bits go
# astray, while `attn` computes them in float64 and rounds once.

# %%
from transformers.models.bloom.modeling_bloom import build_alibi_tensor  # noqa: E402

worst, exact = 0.0, 0
for n in range(1, 65):
    ours_n = attn.alibi_slopes(n)
    bloom = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n, torch.float32)[:, 0, 1]  # [H]
    worst = max(worst, ((ours_n.double() - bloom.double()) / bloom.double()).abs().max().item())
    exact += int(torch.equal(ours_n, bloom))
ulp = torch.finfo(torch.float32).eps
print(f"H = 1..64: identical for {exact} head counts; largest relative difference {worst:.1e} = {worst / ulp:.1f} ulp")
assert worst < 8 * ulp

# %% [markdown]
# ## 4. The bias, head by head
#
# `attn.reference.alibi_bias(Sq, Sk, slopes)` returns the bias `[H, Sq, Sk]` that `attn` adds:
#
# $$\text{bias}_{h,i,j} = m_h\,\bigl(j - (i + S_k - S_q)\bigr).$$
#
# The term $i + S_k - S_q$ is the query's own position when the queries are the last $S_q$ of $S_k$ tokens, the
# bottom-right alignment of lesson 01; so the bias is zero on the diagonal and falls by $m_h$ per step to the left.
# It is *signed*: to the right of the diagonal, keys a causal mask would hide, it is positive. For bidirectional
# attention that means future keys get a bonus that grows with distance, which is not what FlashAttention does
# (section 6).
#
# Below, heads 0, 2, 4 and 7 of an 8-head model (slopes $\tfrac12, \tfrac18, \tfrac1{32}, \tfrac1{256}$) on a 12×12
# grid, in the style of attention-gym. All panels share one color scale, so a gentle head looks almost flat; grey
# cells are masked. The third row is FlashAttention's symmetric form $-m_h\,|i + S_k - S_q - j|$.


# %%
def show_biases(rows, heads, slopes):
    """Small multiples: one row per (title, bias [H, S, S] with NaN where masked), one column per head."""
    vmax = max(b[heads].nan_to_num().abs().max().item() for _, b in rows)
    cmap = plt.get_cmap("RdBu").copy()
    cmap.set_bad("lightgrey")
    fig, axes = plt.subplots(len(rows), len(heads), figsize=(2.5 * len(heads), 2.6 * len(rows)))
    for r, (title, bias) in enumerate(rows):
        for c, h in enumerate(heads):
            ax = axes[r, c]
            im = ax.imshow(bias[h].numpy(), cmap=cmap, vmin=-vmax, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {h}, slope 1/{1 / slopes[h].item():.0f}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{title}\nquery i", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("key j", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="bias added to the score")


n = 12
causal = reference.attention_mask(n, n, causal=True)
ours = reference.alibi_bias(n, n, slopes8)  # [8, 12, 12]
rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # j - i on a square grid
flash = -slopes8[:, None, None] * rel.abs()
show_biases(
    [
        ("causal, attn / FA", ours.masked_fill(~causal, float("nan"))),
        ("bidirectional, attn", ours),
        ("bidirectional, FlashAttention", flash),
    ],
    heads=[0, 2, 4, 7],
    slopes=slopes8,
)
plt.show()

# %% [markdown]
# ## 5. What the bias does to the attention weights
#
# To see the bias alone, remove the content: with $q = 0$ every dot product is 0 and the scores are just the bias.
# There is a neat way to read the weights out of the library itself: make the values the identity matrix,
# $v_j = e_j$. Then the output $o_i = \sum_j p_{ij} v_j$ *is* row $i$ of the weights. One query attending causally
# to 64 keys, 8 heads sharing one K/V head:


# %%
def content_free_weights(sk, **kw):
    """The weights [H, Sk] that the last of Sk tokens gives to each key when all content scores are 0."""
    q = torch.zeros(1, 1, 8, sk, dtype=torch.float64)
    # any keys will do, since q = 0; the head dim is Sk so that v can be the identity
    k = torch.randn(1, sk, 1, sk, dtype=torch.float64)
    v = torch.eye(sk, dtype=torch.float64)[None, :, None, :]  # v_j = e_j
    return reference.attention(q, k, v, causal=True, **kw)[0, 0]


sk = 64
w = content_free_weights(sk, alibi_slopes=slopes8)
dist = torch.arange(sk - 1, -1, -1)  # key j is Sk-1-j tokens back from the query

fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
for h in (0, 1, 2, 4, 7):
    ax.plot(dist, w[h], ".-", ms=3, label=f"head {h}, slope 1/{1 / slopes8[h]:.0f}")
    ax2.semilogy(dist, w[h], ".-", ms=3)
ax.set_xlabel("distance i − j (tokens back)")
ax.set_ylabel("attention weight")
ax.set_title("Content-free weights: steep slopes make local heads")
ax.legend(fontsize=8)
ax2.set_xlabel("distance i − j")
ax2.set_title("Log scale: straight lines, weight ∝ exp(−m·distance)")
fig.tight_layout()
plt.show()

# distance within which each head puts 90% of its weight, reading from the diagonal outwards
span90 = [int((w[h].flip(0).cumsum(0) < 0.9).sum()) + 1 for h in range(8)]
print("90% of the weight lies within this many tokens, heads 0..7:", span90)
assert torch.allclose(w[0, -2] / w[0, -1], torch.tensor(math.exp(-0.5), dtype=torch.float64))

# %% [markdown]
# Head 0 spends 90% of its attention on the last handful of tokens; head 7 spreads it almost evenly over all 64.
# ALiBi thus gives each layer a fixed spectrum of ranges, from very local to nearly global, and lets the content
# scores work within it. The assertion checks the claim of section 1 exactly: one step back multiplies head 0's
# weight by $e^{-1/2}$.
#
# ## 6. Conventions that differ
#
# Four libraries, four formulas for the bias of query $i$ and key $j$ (with $\delta = S_k - S_q$):
#
# | who | bias | note |
# |---|---|---|
# | `attn` | $m\,(j - (i + \delta))$ | zero on the diagonal |
# | vLLM (unified Triton kernel) | $m\,(j - \delta)$ | counts from the chunk's first query; ours when $S_q = 1$ |
# | TensorRT-LLM, Bloom in transformers | $+m\,j$ | key only: Bloom stores `[H, 1, Sk]` |
# | FlashAttention | $-m\,\lvert i + \delta - j\rvert$ | symmetric around the diagonal |
#
# The first three differ, within one row $i$, by a constant: $m(i + \delta)$ or $m\,i$. A softmax does not see a
# constant added to a whole row, $\operatorname{softmax}(s + c) = \operatorname{softmax}(s)$, so they give the same
# weights for every row, causal or not. (Their log-sum-exp differs by the constant, so partial results from two
# conventions must never be merged.) FlashAttention's absolute value agrees with ours wherever
# $j \le i + \delta$, which is every visible key of a causal row; it differs for keys right of the diagonal, which
# only bidirectional attention sees. Let us check all of it on a chunk of $S_q = 5$ queries over $S_k = 9$ keys:

# %%
sq, sk, h = 5, 9, 8
scores = torch.randn(h, sq, sk, dtype=torch.float64)
m = slopes8.double()[:, None, None]
i = torch.arange(sq)[:, None]
j = torch.arange(sk)[None, :]
delta = sk - sq
biases = {
    "attn": reference.alibi_bias(sq, sk, slopes8.double()),
    "vLLM": m * (j - delta),
    "TensorRT-LLM": m * j.expand(sq, sk),
    "FlashAttention": -m * (i + delta - j).abs(),
}


def weights_with(bias, mask):
    return (scores + bias).masked_fill(~mask, float("-inf")).softmax(-1)


for name, mask in (("causal", reference.attention_mask(sq, sk, causal=True)), ("bidirectional", torch.ones(sq, sk))):
    mask = mask.bool()
    ref_w = weights_with(biases["attn"], mask)
    diffs = {other: maxdiff(weights_with(b, mask), ref_w) for other, b in biases.items() if other != "attn"}
    print(f"{name:13s} weights vs attn: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert diffs["vLLM"] < 1e-12 and diffs["TensorRT-LLM"] < 1e-12
    assert (diffs["FlashAttention"] < 1e-12) == (name == "causal")

# %% [markdown]
# Where exactly does FlashAttention part ways? The difference of the two biases is zero up to the diagonal and
# $2m\,(j - i - \delta)$ beyond it; but because the softmax renormalizes, the weights of the whole row change, the
# visible past keys included:

# %%
bidir = torch.ones(sq, sk, dtype=torch.bool)
print("bias difference attn - FA, head 0 (rows: queries):")
print(biases["attn"][0] - biases["FlashAttention"][0])
print("weight difference attn - FA, head 0:")
print(weights_with(biases["attn"], bidir)[0] - weights_with(biases["FlashAttention"], bidir)[0])

# %% [markdown]
# So `attn` gives TensorRT-LLM's answer. A bidirectional model trained with FlashAttention's symmetric ALiBi
# would need that form instead; `attn` does not offer it. For causal attention, which is how the decoder-only ALiBi
# models run, every convention gives the same attention.
#
# ## 7. Two orders: `alibi` and `alibi_with_scale`
#
# TensorRT-LLM has two position-embedding types for ALiBi that differ only in where the scale $\tau$ goes:
#
# - `alibi`: $s = \tau\, q\cdot k + \text{bias}$, the bias added to the scaled score (Bloom's order);
# - `alibi_with_scale`: $s = \tau\,(q\cdot k + \text{bias})$, the bias added to the raw dot product.
#
# Expanding the second, $\tau\,\text{bias} = (\tau m)(j - \dots)$: `alibi_with_scale` with slopes $m$ is `alibi` with
# slopes $\tau m$. With $D = 64$, $\tau = 1/8$, the second order makes every head eight times gentler. The two
# orders agree exactly after that rescaling:

# %%
D = 64
q = torch.randn(2, 20, 8, D, dtype=torch.float64)
k, v = torch.randn(2, 20, 2, D, dtype=torch.float64), torch.randn(2, 20, 2, D, dtype=torch.float64)
tau = 1 / math.sqrt(D)
with_scale = reference.attention(q, k, v, causal=True, alibi_slopes=slopes8, alibi_mode="alibi_with_scale")
rescaled = reference.attention(q, k, v, causal=True, alibi_slopes=slopes8 * tau, alibi_mode="alibi")
unscaled = reference.attention(q, k, v, causal=True, alibi_slopes=slopes8, alibi_mode="alibi")
print(f"alibi_with_scale(m) vs alibi(tau*m): {maxdiff(with_scale, rescaled):.1e}")
print(f"alibi_with_scale(m) vs alibi(m):     {maxdiff(with_scale, unscaled):.1e}   <- a different model")
assert maxdiff(with_scale, rescaled) < 1e-12 and maxdiff(with_scale, unscaled) > 1e-2

# %% [markdown]
# With soft-capping (lesson 01, $s \leftarrow c\tanh(s/c)$) the rescaling no longer works, because the two orders
# put the bias on different sides of the cap. `alibi` caps the content score and adds the bias afterwards, so the
# distance penalty still grows without bound. `alibi_with_scale` puts the bias inside the $\tanh$: the penalty
# saturates at $-c$, and beyond some distance all keys look equally far. The content-free weights of section 5
# (head dim 64, so $\tau = 1/8$ again) give back the scores as $\log(p_j / p_\text{diagonal})$; head 0, $c = 2$:

# %%
cap = 2.0
for mode, slopes_ in (("alibi", slopes8 * tau), ("alibi_with_scale", slopes8)):
    w_cap = content_free_weights(64, softcap=cap, alibi_slopes=slopes_, alibi_mode=mode)[0]
    score = (w_cap / w_cap[-1]).log()
    shown = ", ".join(f"{score[63 - d].item():6.3f}" for d in (0, 8, 16, 32, 63))
    print(f"{mode:17s} head 0 score at distance 0, 8, 16, 32, 63: {shown}")

# %% [markdown]
# ## 8. Inside the kernels: the bias is never built
#
# The reference materializes `alibi_bias`, `[H, Sq, Sk]`, because it reads like the formula. The Triton kernels
# (`HAS_ALIBI` in `attn/fast/attention.py` and `attn/fast/decode.py`) load each head's slope once and compute the
# bias of each `[BLOCK_M, BLOCK_N]` tile from the indices they already have: the distance `offs_n - (offs_m + diag)`
# to the diagonal, times the slope. That is one multiply-add per score, from registers. Two details:
#
# - the kernels use a base-2 softmax (`exp2`), so in `alibi` order the slope is multiplied by $\log_2 e$ on the way
#   in; in `alibi_with_scale` order the bias joins the raw product and the $\log_2 e$ in the scale covers it;
# - slopes may be `[Hq]` (one model) or `[B, Hq]` (per sequence); the kernel reads them through two strides, with
#   stride 0 for the batch when the slopes are shared, so nothing is expanded.
#
# What materializing would cost for a batch of 4 sequences of 4096 tokens with 32 heads:

# %%
B_, H_, S_ = 4, 32, 4096
slope_bytes = attn.alibi_slopes(H_).nbytes
print(f"slopes [H]:                     {slope_bytes:>15,d} bytes")
print(f"Bloom-style +m*j, [B, H, 1, S]: {B_ * H_ * S_ * 4:>15,d} bytes")
for name, size in (("fp32", 4), ("fp16", 2)):
    full = B_ * H_ * S_ * S_ * size
    ratio = full // slope_bytes
    print(f"bias [B, H, S, S] in {name}:      {full:>15,d} bytes = {full / 2**30:.0f} GiB, {ratio:,d}x the slopes")
assert slope_bytes == 128

# %% [markdown]
# Eight GiB of bias, written once and read back by every attention call of every layer, against 128 bytes. It
# is the same argument as for the scores themselves in lesson 02.
#
# A direct look at the bias the kernel computes: the identity-values trick of section 5, now through
# `attn.fast.attention`, returns the kernel's weights, which we compare with the softmax of `alibi_bias`:

# %%
n = 32
q_zero = torch.zeros(1, n, 8, n, device=device)
k_rand = torch.randn(1, n, 1, n, device=device)
v_eye = torch.eye(n, device=device)[None, :, None, :]
# the head dim is n, so alibi_with_scale multiplies the bias by 1/sqrt(n)
for mode, factor in (("alibi", 1.0), ("alibi_with_scale", 1 / math.sqrt(n))):
    kernel_w = attn.fast.attention(q_zero, k_rand, v_eye, causal=True, alibi_slopes=slopes8.to(device), alibi_mode=mode)
    mask = reference.attention_mask(n, n, causal=True)
    expected = (reference.alibi_bias(n, n, slopes8) * factor).masked_fill(~mask, float("-inf")).softmax(-1)
    err = maxdiff(kernel_w[0].transpose(0, 1).cpu(), expected)
    print(f"{mode:17s} kernel weights vs softmax(alibi_bias): {err:.1e}")
    assert err < 1e-5

# %% [markdown]
# ### Live parity checks
#
# As in lesson 01, each check runs the Triton kernel on fresh random inputs and compares it with the reference; the
# kernel may be at most twice as far from the float64 answer as PyTorch computing in the kernel's precision, plus a
# hair. The cases cover GQA, $S_q < S_k$, both orders, soft-capping, bidirectional attention, and slopes of shape
# `[Hq]` and `[B, Hq]` (here two sequences whose models differ in `alibi_scale`).


# %%
def check(name, fn, ref_fn, args, **kw):
    exact, exact_lse = ref_fn(*(a.double() if a.is_floating_point() else a for a in args), return_lse=True, **kw)
    same_precision = ref_fn(*args, **kw)
    out, lse = fn(*args, return_lse=True, **kw)
    err = maxdiff(out, exact)
    budget = 2 * maxdiff(same_precision, exact) + 1e-5
    # rows that see no key have lse = -inf on both sides, and -inf - -inf is NaN
    err_lse = torch.where(lse.double() == exact_lse, 0.0, lse.double() - exact_lse).abs().max().item()
    print(f"{str(args[0].dtype)[6:]:8s} {name:46s} err {err:.1e} <= {budget:.1e}   lse err {err_lse:.1e}")
    assert out.dtype == args[0].dtype and not out.isnan().any() and err <= budget and err_lse < 1e-4, name


HQ, HKV, D = 8, 2, 32
per_head = attn.alibi_slopes(HQ, device=device)  # [Hq]
per_seq = torch.stack([per_head, attn.alibi_slopes(HQ, alibi_scale=0.5, device=device)])  # [B, Hq]
prefill_cases = [
    ("causal, slopes [Hq]", 40, 40, dict(causal=True, alibi_slopes=per_head)),
    ("causal Sq < Sk, slopes [B, Hq]", 17, 45, dict(causal=True, alibi_slopes=per_seq)),
    ("alibi_with_scale, q_scaling 2", 33, 33, dict(causal=True, alibi_slopes=per_seq, q_scaling=2.0)),
    ("bidirectional, softcap 5", 24, 30, dict(alibi_slopes=per_head, softcap=5.0)),
]
prefill_cases[2][3]["alibi_mode"] = "alibi_with_scale"

# bfloat16 only on a GPU: the CPU interpreter cannot do bfloat16 arithmetic
dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
for dtype in dtypes:
    for name, sq, sk, kw in prefill_cases:
        q = torch.randn(2, sq, HQ, D, dtype=dtype, device=device)
        k = torch.randn(2, sk, HKV, D, dtype=dtype, device=device)
        v = torch.randn(2, sk, HKV, D, dtype=dtype, device=device)
        check(f"attention: {name}", attn.fast.attention, reference.attention, (q, k, v), **kw)

# %% [markdown]
# And decoding over a KV cache of ragged lengths, whose unused slots hold NaN so that any stray read would show,
# with one new token, three speculative ones, and the cache split in parts (lesson 05):

# %%
B, MAX_LEN = 2, 48
cache_seqlens = torch.tensor([48, 13], dtype=torch.int32, device=device)
decode_cases = [
    ("Sq=1, slopes [Hq]", 1, dict(alibi_slopes=per_head)),
    ("Sq=3 causal, [B, Hq], alibi_with_scale", 3, dict(causal=True, alibi_slopes=per_seq)),
    ("Sq=1, slopes [B, Hq], 3 splits", 1, dict(alibi_slopes=per_seq, num_splits=3)),
]
decode_cases[1][2]["alibi_mode"] = "alibi_with_scale"
for dtype in dtypes:
    k_cache = torch.randn(B, MAX_LEN, HKV, D, dtype=dtype, device=device)
    v_cache = torch.randn(B, MAX_LEN, HKV, D, dtype=dtype, device=device)
    for b, n in enumerate(cache_seqlens.tolist()):
        k_cache[b, n:] = float("nan")
        v_cache[b, n:] = float("nan")
    for name, sq, kw in decode_cases:
        q = torch.randn(B, sq, HQ, D, dtype=dtype, device=device)
        check(f"decode: {name}", attn.fast.decode, reference.decode, (q, k_cache, v_cache, cache_seqlens), **kw)

# %% [markdown]
# ### Speed on the H200
#
# The kernels never build the bias; what does it cost them? Per score the obvious form is an integer
# subtraction, a conversion, a multiply-add and, in the exponent, a subtract that the bias-free tiles avoid (they
# take the row max of the raw products and fold the scale into one multiply-add, lesson 02). The prefill kernel
# keeps that plain form with ALiBi by splitting the bias: $m(j - i) = m\,n + m\,(j_0 - i)$ for key $j = j_0 + n$
# of a tile starting at $j_0$. The first part is a vector over the tile's keys, the same for every tile,
# computed once before the loop (in raw-product units, divided by the scale); the second is one number per row
# and tile, folded into the row max and the exponent. The per-row constant of the whole sequence never enters
# the softmax at all and is added back to the log-sum-exp at the end. In decode the bias is a few operations on
# a `[rows, 64]` tile in a kernel bound by memory, and costs nothing measurable.
#
# Measured with `python -m bench.bench_features` (B4 H32 S4096 D128 causal prefill; decode B8 H32/8 L32768 and
# B1 L131072, from CUDA-graph replays), beside FlexAttention with the same bias as a `score_mod`:

# %%
prefill = _figures.result("features_H200_2026-11-29_prefill_f.json")["results"]
cost = {(r["variant"], r["impl"]): r for r in prefill}
ours, flex = cost[("alibi", "ours")], cost[("alibi", "flex")]
print(f"prefill, ours:  plain {cost[('plain', 'ours')]['tflops']:.0f} TFLOP/s, ALiBi {ours['tflops']:.0f} "
      f"(costs {ours['cost_vs_plain'] - 1:.1%})")  # fmt: skip
print(f"prefill, Flex:  plain {cost[('plain', 'flex')]['tflops']:.0f} TFLOP/s, ALiBi {flex['tflops']:.0f} "
      f"(costs {flex['cost_vs_plain'] - 1:.1%}); ours is {flex['ms'] / ours['ms']:.2f}x faster")  # fmt: skip
decode = _figures.result("features_H200_2026-11-29_decode_i.json")["results"]
for r in decode:
    if r["variant"] == "alibi":
        print(f"decode {r['shape']:18s} {r['layout']:10s}: ALiBi at {r['speedup_vs_plain']:.3f}x plain's speed")

# %% [markdown]
# ALiBi costs about 6% in prefill (9.6% before the split into a vector and a row term) and nothing in decode.
# Against FlexAttention the kernel is 1.18× faster with ALiBi, about what it is without a bias (1.15×): Flex's
# `score_mod` is cheap too (8.5%), so what separates the two is the plain kernel, not the bias. The project had
# aimed at 1.2×, which needs a faster plain kernel (lesson 02, section 8).
#
# ## Summary
#
# - ALiBi replaces position embeddings with a per-head penalty $m_h \cdot$ distance on the scores. It depends on
#   the distance only, so longer inputs bring only larger distances, which it already pushes towards zero weight.
# - Slopes: $2^{-b(h+1)/p}$ for the first $p = 2^{\lfloor\log_2 H\rfloor}$ heads, then the odd terms of the $2p$
#   sequence, which interleave with the steepest ones. Under tensor parallelism a rank takes its slice of the
#   global slopes. `attn.alibi_slopes` matches Bloom's for every $H \le 64$.
# - Steep slopes make local heads, gentle ones nearly global heads.
# - `attn` adds $m(j - (i + S_k - S_q))$; vLLM's and TensorRT-LLM's forms differ by a constant per row and give the
#   same attention (not the same log-sum-exp). FlashAttention's $-m|\cdot|$ agrees on causal rows and differs for
#   bidirectional attention.
# - `alibi_with_scale` is `alibi` with the slopes multiplied by $\tau$, except under soft-capping, where it also caps
#   the bias.
# - The kernels compute the bias from the slope and the distance to the diagonal, tile by tile: 128 bytes of
#   slopes instead of a bias of several GiB. On the H200 ALiBi costs about 6% in prefill and nothing in decode.
