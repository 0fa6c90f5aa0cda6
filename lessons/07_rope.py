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
# # RoPE: rotary position embeddings and their scaling variants
#
# Attention by itself does not know where a token is: permute the keys and values together and every output
# stays the same. Rotary position embeddings (RoPE, Su et al., *RoFormer: Enhanced Transformer with Rotary
# Position Embedding*, 2021) put the position in by *rotating* q and k, pair of features by pair of features,
# through an angle proportional to the token's position. Almost every open LLM since GPT-J and GPT-NeoX uses
# it, and TensorRT-LLM applies it inside its attention, between the QKV projection and the append to the KV
# cache. `attn` does the same in `attn.fast.preprocess`.
#
# What we cover, in order:
#
# 1. why rotating by position-proportional angles makes $q_m \cdot k_n$ depend only on $m - n$, checked with
#    `attn.reference.apply_rope`;
# 2. a picture of the rotation: fast and slow pairs turning as the position grows;
# 3. the two pairings, GPT-NeoX (`rotate_half`) and GPT-J (interleaved), side by side, and why they are the
#    same rotation up to a permutation of features;
# 4. partial rotary (`rotary_dim < D`);
# 5. the frequency spectrum, and which pairs ever complete a turn within the training context;
# 6. the scaling variants (linear, dynamic NTK, Llama 3.1, YaRN): what each does to the frequencies, plotted,
#    and checked against Hugging Face's implementation;
# 7. why the kernel reads a float32 cos/sin table instead of evaluating cos and sin itself;
# 8. a live parity check of the fused pre-processing kernel against the reference.

# %%
import math

import matplotlib.pyplot as plt
import torch

import attn
from attn import layout, reference
from attn.reference import RopeScaling
from attn.reference.preprocess import pair_indices

torch.manual_seed(0)
torch.set_printoptions(precision=4, sci_mode=False)


def maxdiff(a, b):
    """Largest absolute difference, taken in float64 so the comparison adds no rounding of its own."""
    return (a.double() - b.double()).abs().max().item()


def rotate(x, positions, **kw):
    """apply_rope for one head: x [T, D], positions int [T] -> [T, D]."""
    return reference.apply_rope(x[:, None, :], torch.as_tensor(positions), **kw)[:, 0, :]


# %% [markdown]
# ## 1. Why a rotation gives relative positions
#
# Split the first $r$ features of a head (the *rotary dim*; $r = D$ unless stated otherwise) into $r/2$ pairs.
# Pair $i$ gets its own frequency $\theta_i = \text{base}^{-2i/r}$, with base $= 10000$ in the original
# papers. A token at position $m$ has each of its pairs $(a, b)$ turned through the angle $m\theta_i$:
#
# $$\begin{pmatrix} a' \\ b' \end{pmatrix} =
# \begin{pmatrix} \cos m\theta_i & -\sin m\theta_i \\ \sin m\theta_i & \cos m\theta_i \end{pmatrix}
# \begin{pmatrix} a \\ b \end{pmatrix}.$$
#
# The complex numbers make the consequence a one-liner. Read the pair as $z = a + \mathrm{i}\,b$; the rotation
# is then the product $z\,e^{\mathrm{i} m\theta_i}$, and the dot product of two pairs $u, w$ is
# $\operatorname{Re}(u\,\bar w)$. Rotate the query's pairs $z^q_i$ by position $m$ and the key's pairs $z^k_i$
# by position $n$:
#
# $$q_m \cdot k_n = \sum_{i} \operatorname{Re}\!\left( z^q_i e^{\mathrm{i} m\theta_i} \,
# \overline{z^k_i e^{\mathrm{i} n\theta_i}} \right)
# = \sum_{i} \operatorname{Re}\!\left( z^q_i \, \overline{z^k_i} \; e^{\mathrm{i} (m-n)\theta_i} \right).$$
#
# The two absolute positions have merged into their difference: the score of a query and a key depends on
# their content and on how far apart they are, never on where the pair sits in the sequence. Two more things
# come for free. A rotation keeps lengths, so RoPE never inflates or shrinks the scores the way adding a
# position vector can; and nothing is added to $v$, so the values carry content only.
#
# Two (query, key) placements with the same offset must give the same score, and a different offset a
# different one. `apply_rope` takes `[T, H, D]` and one position per token; we work in float64 so that only
# the method is on trial.

# %%
D = 64
q, k = torch.randn(1, D, dtype=torch.float64), torch.randn(1, D, dtype=torch.float64)


def score(m, n, **kw):
    return (rotate(q, [m], **kw) * rotate(k, [n], **kw)).sum().item()


for m, n in ((5, 2), (103, 100), (2003, 2000), (5, 3)):
    print(f"q at {m:4d}, k at {n:4d} (offset {m - n}): q.k = {score(m, n):+.6f}")
assert abs(score(5, 2) - score(2003, 2000)) < 1e-4 * abs(score(5, 2)) and abs(score(5, 2) - score(5, 3)) > 1e-2

# %% [markdown]
# The agreement is not float64's $10^{-16}$, and it loosens as the positions grow: relative $10^{-6}$ at
# position 100, $2 \cdot 10^{-5}$ at 2000. `apply_rope` forms the angles $p\,\theta_i$ in float32, as Hugging
# Face does, whatever the dtype of $x$, and a float32 angle near 2000 is only known to about $10^{-4}$
# radians. Section 7 comes back to this.
#
# The whole matrix of scores of one query against one key, placed at every pair of positions, is therefore
# constant along its diagonals (a Toeplitz matrix):

# %%
P = 48
qs = rotate(q.expand(P, D), torch.arange(P))  # the query at every position
ks = rotate(k.expand(P, D), torch.arange(P))
grid = qs @ ks.T  # [P, P]: q at row position m, k at column position n
fig, ax = plt.subplots(figsize=(4.2, 3.6))
im = ax.imshow(grid.numpy(), cmap="RdBu_r")
ax.set_xlabel("key position n")
ax.set_ylabel("query position m")
ax.set_title("$q_m \\cdot k_n$: constant along $m - n$", fontsize=10)
fig.colorbar(im, ax=ax, shrink=0.8)
fig.tight_layout()
plt.show()
spread = max(grid.diagonal(o).std().item() for o in range(-P + 2, P - 1))
print(f"largest standard deviation along a diagonal: {spread:.1e} (entries are of size {grid.abs().mean():.1f})")

# %% [markdown]
# ## 2. The rotation, pictured
#
# Each pair is a clock hand turning at its own speed: pair $i$ advances $\theta_i$ radians per token, one full
# turn every $\lambda_i = 2\pi/\theta_i$ tokens (its *wavelength*). Below, a feature vector whose only non-zero
# entry is the first member of one pair is rotated to positions $0, 1, \dots, 15$ by `apply_rope`, and we read
# that pair back. With $r = 16$ and base 10000, pair 0 turns one radian per token (a full turn every $2\pi
# \approx 6.3$ tokens, so positions alias after a few steps), while pair 3 turns $10000^{-6/16} \approx 0.03$
# radians per token and has barely moved after 16 tokens. The right panel shows $\cos(p\,\theta_i)$ for all 8
# pairs over 256 positions: the fast pairs resolve neighbouring tokens, the slow ones tell near from far.

# %%
r_small, P = 16, 16
first, second = pair_indices(r_small, "neox")
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.5]})
colors = plt.cm.viridis(torch.linspace(0, 1, P).numpy())
for ax, i in zip(axes[:2], (0, 3)):
    x = torch.zeros(P, r_small)
    x[:, first[i]] = 1.0
    out = rotate(x, torch.arange(P), rotary_dim=r_small)
    a, b = out[:, first[i]], out[:, second[i]]
    ax.add_patch(plt.Circle((0, 0), 1, fill=False, color="0.8"))
    for p in range(P):
        ax.annotate("", xy=(a[p], b[p]), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color=colors[p], lw=1.5))
    ax.set(xlim=(-1.2, 1.2), ylim=(-1.2, 1.2), aspect="equal", xticks=[], yticks=[])
    theta = 10000.0 ** (-2 * i / r_small)
    ax.set_title(f"pair {i}: features ({first[i]}, {second[i]})\n$\\theta_{i}$ = {theta:.3f} rad/token", fontsize=9)
sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, P - 1))
fig.colorbar(sm, ax=axes[1], shrink=0.7, label="position")
cos_table, _ = reference.rope_cos_sin(256, r_small, 10000.0)
im = axes[2].imshow(cos_table.T.numpy(), aspect="auto", cmap="RdBu_r", interpolation="nearest")
axes[2].set(xlabel="position p", ylabel="pair i", title="$\\cos(p\\,\\theta_i)$, r = 16")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Two pairings, one rotation
#
# *Which* features form a pair is a convention, and two are in use:
#
# - **GPT-J** (Wang and Komatsuzaki, 2021), and Meta's original Llama code, which views the head as
#   complex numbers: neighbours pair up, $(2i,\ 2i+1)$. `style="gptj"`, TensorRT-LLM's `rope_gptj`.
# - **GPT-NeoX** (Black et al., 2022), and Hugging Face's Llama with its `rotate_half`: the two halves of the
#   rotary dims pair up, $(i,\ i + r/2)$. `style="neox"` (the default), TensorRT-LLM's `rope_gpt_neox`.
#
# In both, pair $i$ turns at $\theta_i$. For $D = r = 8$ (arcs join the two features of a pair, coloured by
# the pair's frequency), and below them the rotation matrix at position 1 that `apply_rope` applies, found by
# rotating the 8 unit vectors:

# %%
r8 = 8
fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), gridspec_kw={"height_ratios": [1, 1.6]})
pair_colors = plt.cm.plasma(torch.linspace(0, 0.85, r8 // 2).numpy())
for col, (style, label) in enumerate((("neox", "GPT-NeoX / rotate_half"), ("gptj", "GPT-J / interleaved"))):
    ax = axes[0, col]
    for f in range(r8):
        ax.add_patch(plt.Rectangle((f - 0.4, -0.4), 0.8, 0.8, fill=False))
        ax.text(f, 0, str(f), ha="center", va="center")
    for i, (a, b) in enumerate(zip(*pair_indices(r8, style))):
        a, b = int(a), int(b)
        xs = torch.linspace(0, math.pi, 50)
        ax.plot((a + b) / 2 - (b - a) / 2 * torch.cos(xs), 0.45 + 0.35 * (b - a) ** 0.5 * torch.sin(xs),
                color=pair_colors[i], lw=2, label=f"pair {i}")  # fmt: skip
    ax.set(xlim=(-0.6, r8 - 0.4), ylim=(-0.6, 1.6), aspect="equal", title=label)
    ax.axis("off")
    if col == 1:
        ax.legend(loc="upper right", fontsize=8, ncol=2, frameon=False)
    rot = rotate(torch.eye(r8), [1] * r8, style=style).T  # column f is the image of unit vector f
    axes[1, col].imshow(rot.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    for (row, c), val in zip(torch.cartesian_prod(torch.arange(r8), torch.arange(r8)).tolist(), rot.flatten()):
        if abs(val) > 1e-6:
            axes[1, col].text(c, row, f"{val:.2f}", ha="center", va="center", fontsize=6)
    axes[1, col].set_title(f"rotation matrix at position 1 ({style})", fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# The GPT-J matrix is block-diagonal with $2\times 2$ blocks; the GPT-NeoX one is the same blocks spread over
# two diagonals. Relabel the features and one becomes the other: let $\pi$ list the GPT-J features in NeoX
# order, $\pi = (0, 2, 4, \dots, r-2,\ 1, 3, \dots, r-1)$. Then pair $i$ of $x[\pi]$ in the NeoX pairing,
# features $(i, i + r/2)$, holds $x$'s features $(2i, 2i+1)$, the pair GPT-J would rotate. So
#
# $$\operatorname{rope}_\text{gptj}(x) = \operatorname{unpermute}\big(\operatorname{rope}_\text{neox}(x[\pi])\big).$$
#
# The same multiplications on the same numbers, so the two sides agree exactly:

# %%
r = 64
x = torch.randn(5, 3, r)
pos = torch.tensor([0, 1, 17, 900, 70000])
perm = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])
via_neox = torch.empty_like(x)
via_neox[..., perm] = reference.apply_rope(x[..., perm], pos, style="neox")
gptj = reference.apply_rope(x, pos, style="gptj")
print(f"gptj vs permute -> neox -> unpermute: {maxdiff(gptj, via_neox):.1e}")
print(f"gptj vs neox on the same features:    {maxdiff(gptj, reference.apply_rope(x, pos, style='neox')):.1e}")
assert torch.equal(gptj, via_neox)

# %% [markdown]
# A permutation applied to both q and k does not change $q \cdot k$, so a model can be moved from one pairing
# to the other by permuting the rows of its q and k projection weights (and biases), once, offline. That is
# what Hugging Face's Llama conversion script does to Meta's interleaved checkpoints so that `rotate_half` can
# run them. The one thing that cannot happen is running a checkpoint with the other pairing: the scores then
# come out wrong, yet nothing crashes and random weights would not reveal it.
#
# ## 4. Partial rotary
#
# Some models rotate only the first $r < D$ features of each head and leave the rest as plain, position-free
# dot products: GPT-NeoX-20B and the Pythia models set `rotary_pct = 0.25`, so $r = D/4$; TensorRT-LLM calls $r$
# `rotary_embedding_dim`. Two details matter. Frequencies are $\text{base}^{-2i/r}$ with the *rotary* dim in
# the exponent, so all $r/2$ pairs span the full range of wavelengths; and the NeoX pairs are $(i, i + r/2)$,
# halves of the rotated part, not of the head.

# %%
x = torch.randn(4, 2, D)
pos = torch.tensor([3, 50, 700, 9000])
out = reference.apply_rope(x, pos, rotary_dim=16)
print("features 16.. untouched:", torch.equal(out[..., 16:], x[..., 16:]))
print("first 16 == rotating a 16-feature head:", torch.equal(out[..., :16], reference.apply_rope(x[..., :16], pos)))
assert torch.equal(out[..., 16:], x[..., 16:])

# %% [markdown]
# The score then splits into a relative part (the first $r$ features) and a position-free content part (the
# rest), and it still depends on $m - n$ only:

# %%
kw = dict(rotary_dim=16)
print(f"rotary_dim 16: offset 3 at (5, 2) {score(5, 2, **kw):+.6f}, at (4003, 4000) {score(4003, 4000, **kw):+.6f}")

# %% [markdown]
# ## 5. The frequency spectrum and the training context
#
# The frequencies form a geometric series, from $\theta_0 = 1$ radian per token down to
# $\theta_{r/2-1} = \text{base}^{-(r-2)/r} \approx 1/\text{base}$. In wavelengths,
# $\lambda_i = 2\pi\,\text{base}^{2i/r}$, from $2\pi \approx 6$ tokens to $2\pi\,\text{base}^{(r-2)/r}$, a
# little under $2\pi \cdot \text{base}$: for $r = 128$, 54,000 tokens with base 10000 and 2.6 million with
# Llama 3's base 500000.
#
# Compare the wavelengths with the context $L$ the model was trained on. A pair with $\lambda_i < L$ went
# round its circle many times during training, so every angle it can show at a longer position is one it
# has seen (on its own; the combination across pairs is new). A pair with $\lambda_i > L$ never completed a
# turn: training only ever showed it an arc of $2\pi L / \lambda_i$. Run the model past $L$ and those pairs
# reach angles it has never seen: the usual explanation of why a RoPE model's quality collapses just past
# its training length. Every scaling variant below is a way of keeping those slow pairs inside the arc the
# model knows.

# %%
r = 128
i = torch.arange(r // 2)
fig, ax = plt.subplots(figsize=(7, 3.8))
for base, context, color in ((10000.0, 4096, "C0"), (500000.0, 8192, "C1")):
    inv_freq, _ = reference.rope_inv_freq(r, base)
    wavelength = 2 * math.pi / inv_freq.double()
    ax.semilogy(i, wavelength, color=color, label=f"base {base:g}")
    ax.axhline(context, color=color, ls="--", lw=1, label=f"training context {context}")
    never = int((wavelength > context).sum())
    print(f"base {base:8g}: wavelengths {wavelength[0]:.1f} .. {wavelength[-1]:,.0f} tokens; "
          f"{never} of {r // 2} pairs never complete a turn in {context} tokens")  # fmt: skip
ax.set(xlabel="pair i", ylabel="wavelength $2\\pi/\\theta_i$ (tokens)", title=f"RoPE wavelengths, r = {r}")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Scaling variants: stretching a trained spectrum
#
# To read $s$ times more tokens than it was trained on (the *factor* $s$, trained length $L$), a model's
# frequencies are reshaped, usually followed by a short fine-tune. `attn.RopeScaling` takes the names of
# Hugging Face's `rope_parameters`; each variant changes only $\theta_i$ (and, for YaRN, a factor on cos and
# sin), so to the kernel it is just another table.
#
# - **linear**, position interpolation (Chen et al., *Extending Context Window of Large Language Models via
#   Positional Interpolation*, 2023; kaiokendev's SuperHOT at the same time): $\theta_i' = \theta_i / s$.
#   Position $p$ now looks like position $p/s$, so $sL$ tokens fit into the angles of $L$. The price: the fast
#   pairs, whose job is to tell neighbours apart, now see neighbours $s$ times closer than ever in training.
# - **dynamic**, NTK-aware scaling (bloc97's Reddit post *NTK-Aware Scaled RoPE*, and emozilla's *Dynamically
#   Scaled RoPE* that made it grow with the sequence, both 2023): leave the fast pairs alone and stretch the
#   slow ones by raising the base. With $n$ the length of the sequence being served,
#   $\alpha = 1 + s\,(\max(n, L)/L - 1)$ and
#   $\text{base}' = \text{base} \cdot \alpha^{r/(r-2)}$. The exponent is chosen so that the slowest pair,
#   $\theta_{r/2-1} = \text{base}^{-(r-2)/r}$, is divided by exactly $\alpha$, while $\theta_0 = 1$ never
#   changes; the pairs between are divided by $\alpha^{2i/(r-2)}$. Nothing changes until $n$ exceeds $L$, and
#   $s$ is a slope, not a target: at $n = sL$ the slowest pair is slowed by $s^2 - s + 1$, more than $s$.
# - **llama3**, Llama 3.1's band-wise blend (Meta's Llama 3.1 release code; the models are described in
#   *The Llama 3 Herd of Models*, 2024). Count the turns each pair
#   makes over the trained context, $L/\lambda_i$. Pairs with fewer than `low_freq_factor` turns (1) are
#   interpolated, $\theta_i/s$; pairs with more than `high_freq_factor` turns (4) are kept; the pairs between
#   blend linearly in the number of turns.
# - **yarn** (Peng, Quesnelle, Fan and Shippole, *YaRN: Efficient Context Window Extension of Large Language
#   Models*, 2023): the same idea with the boundaries in rotations: pairs turning more than $\beta_\text{fast}
#   = 32$ times over $L$ are kept, fewer than $\beta_\text{slow} = 1$ times interpolated, with a linear ramp
#   *in the pair index* between (the boundaries rounded outwards to whole pairs). It also multiplies cos and
#   sin by an attention factor $0.1\ln s + 1$; since both q and k are rotated, the scores grow by its square,
#   which sharpens the softmax that longer contexts would otherwise flatten.
#
# Below, the frequencies of each variant against plain RoPE for $r = 128$: a Llama-3-like base 500000 with
# Llama 3.1's parameters (factor 8, low 1, high 4, $L = 8192$), and base 10000 with linear, dynamic (served
# at 2× and 4× the trained length) and YaRN, factor 4 and $L = 4096$. The lower row is the ratio
# $\theta'_i/\theta_i$: 1 means the pair is kept, $1/s$ means it is interpolated.

# %%
llama3 = RopeScaling(type="llama3", factor=8.0, original_max_position=8192, low_freq_factor=1.0, high_freq_factor=4.0)
linear = RopeScaling(type="linear", factor=4.0)
dynamic = RopeScaling(type="dynamic", factor=4.0, original_max_position=4096)
yarn = RopeScaling(type="yarn", factor=4.0, original_max_position=4096)
panels = [
    (500000.0, 8192, [("llama3, factor 8", llama3, None)]),
    (10000.0, 4096, [("linear, factor 4", linear, None), ("dynamic, n = 8192", dynamic, 8192),
                     ("dynamic, n = 16384", dynamic, 16384), ("yarn, factor 4", yarn, None)]),
]  # fmt: skip
fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True, gridspec_kw={"height_ratios": [1.4, 1]})
for col, (base, context, variants) in enumerate(panels):
    plain, _ = reference.rope_inv_freq(r, base)
    top, bottom = axes[0, col], axes[1, col]
    top.semilogy(i, 2 * math.pi / plain, "k", lw=2.5, label="plain RoPE")
    for n, (label, scaling, seq_len) in enumerate(variants):
        scaled, factor = reference.rope_inv_freq(r, base, scaling, seq_len=seq_len)
        style = dict(color=f"C{n}", ls="--" if scaling.type == "dynamic" and seq_len == 16384 else "-")
        top.semilogy(i, 2 * math.pi / scaled, label=label + (f" (cos/sin x {factor:.3f})" if factor != 1 else ""),
                     **style)  # fmt: skip
        bottom.semilogy(i, scaled / plain, **style)
    top.axhline(context, color="0.5", ls=":", label=f"trained context L = {context}")
    if col == 0:
        for turns in (llama3.low_freq_factor, llama3.high_freq_factor):
            top.axhline(context / turns, color="C3", lw=0.8, ls=(0, (1, 3)))
        top.text(1, context / 4 * 1.2, "L / high: kept below", fontsize=8, color="C3")
        top.text(1, context * 1.2, "L / low: interpolated above", fontsize=8, color="C3")
    top.set(ylabel="wavelength (tokens)", title=f"base {base:g}, r = {r}")
    top.legend(fontsize=8)
    ratios = [1, 1 / 2, 1 / 4, 1 / 8, 1 / 16]
    bottom.set_yticks(ratios, ["1", "1/2", "1/4", "1/8", "1/16"])
    bottom.minorticks_off()
    bottom.set(xlabel="pair i", ylabel="$\\theta'_i / \\theta_i$", ylim=(1 / 20, 1.3))
fig.tight_layout()
plt.show()

# %% [markdown]
# What the plots say:
#
# - **llama3** leaves the first pairs (many turns over 8192 tokens) exactly as trained, divides the last ones
#   by 8, and slides between the two over the band where the wavelength is between $L/4$ and $L$.
# - **linear** shifts the whole curve: every wavelength times 4, the fast pairs included.
# - **dynamic** pivots around pair 0: no change at the fast end, the full stretch $\alpha$ at the slow end,
#   geometric in between, and the stretch keeps growing with the length served.
# - **yarn** has three zones: kept (more than 32 turns), interpolated (less than one turn), and a ramp.
#
# The dynamic variant's dependence on the served length, and the exact-$\alpha$ claim for its slowest pair:

# %%
plain, _ = reference.rope_inv_freq(r, 10000.0)
for n in (1000, 4096, 6000, 8192, 16384):
    scaled, _ = reference.rope_inv_freq(r, 10000.0, dynamic, seq_len=n)
    alpha = 1 + dynamic.factor * (max(n, 4096) / 4096 - 1)
    print(f"n = {n:5d}: alpha {alpha:5.2f}, slowest pair slowed x{plain[-1] / scaled[-1]:6.3f}, "
          f"fastest x{plain[0] / scaled[0]:.3f}")  # fmt: skip
    assert abs(plain[-1] / scaled[-1] - alpha) < 1e-4 * alpha

# %% [markdown]
# Dynamic scaling has a catch with a KV cache. The cache stores keys *after* rotation, so keys appended when
# the sequence was short were rotated with the old frequencies, while the new query uses the frequencies of
# the current length: their angles no longer differ by exactly $(m-n)\theta_i'$. Hugging Face behaves the
# same way, and so does `attn`: each call builds the table for the longest sequence it serves (cached plus
# new tokens), for every sequence of the batch.
#
# ### Checked against Hugging Face
#
# Hugging Face's `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS` is the ground truth for these
# formulas. Its functions read a model config; a minimal `LlamaConfig` with head size 128 is enough. Its
# dynamic variant takes the trained length from `max_position_embeddings`; llama3 and YaRN read it from
# `original_max_position_embeddings` and expect `max_position_embeddings` to be the extended length.

# %%
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

hf_cases = [
    ("llama3", 500000.0, llama3, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192), 131072, None),
    ("linear", 10000.0, linear, dict(factor=4.0), 4096, None),
    ("dynamic", 10000.0, dynamic, dict(factor=4.0), 4096, 16384),
    ("yarn", 10000.0, yarn, dict(factor=4.0, original_max_position_embeddings=4096), 16384, None),
    ("yarn", 10000.0, RopeScaling(type="yarn", factor=40.0, original_max_position=4096, mscale=1.0,
                                  mscale_all_dim=0.707),
     dict(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=0.707), 163840, None),
]  # fmt: skip
for rope_type, base, ours, hf_params, max_pos, seq_len in hf_cases:
    config = LlamaConfig(
        hidden_size=r * 8, num_attention_heads=8, max_position_embeddings=max_pos,
        rope_parameters={"rope_type": rope_type, "rope_theta": base, **hf_params},
    )  # fmt: skip
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    inv, factor = reference.rope_inv_freq(r, base, ours, seq_len=seq_len)
    rel = ((inv.double() - hf_inv.double()).abs() / hf_inv.double()).max().item()
    print(f"{rope_type:8s} factor {ours.factor:4g}: max relative diff {rel:.1e}, attention factor "
          f"{factor:.4f} (HF {hf_factor:.4f})")  # fmt: skip
    assert rel < 1e-6 and abs(factor - hf_factor) < 1e-12

# %% [markdown]
# The last line is DeepSeek's YaRN variant, whose attention factor is a ratio of two such logarithms
# (`mscale`, `mscale_all_dim`).
#
# ## 7. Why the kernel reads a float32 cos/sin table
#
# A kernel could compute $\cos(p\,\theta_i)$ and $\sin(p\,\theta_i)$ itself from the position and the
# frequency: it would save a memory read. `attn.fast.preprocess` does not; it reads a float32 table
# `[positions, r/2]` built by `attn.reference.rope_cos_sin`. TensorRT-LLM, too, builds a float32
# `rotary_cos_sin` table ahead of time (`RopeEmbeddingUtils.create_sinusoidal_positions_for_attention_plugin`)
# and hands it to its attention. The reason is the size of the angles. At position $p = 10^5$ the fast pairs
# are at angles near $10^5$ radians, about 16,000 turns, and all the information is in the angle modulo $2\pi$.
#
# **Rounding the angle.** A float32 number near $10^5$ has a spacing of $2^{-7} \approx 0.008$, so the angle
# itself can only be stored to within $0.004$ radians, and the frequency $\theta_i$, rounded to float32, is
# off by a relative $2^{-24}$, which the multiplication by $p$ turns into an absolute error that grows with
# $p$. Here is the error of the float32 angle `p * inv_freq` (how Hugging Face and `rope_cos_sin` form it)
# against the angle computed in float64 from the exact frequencies, over the 64 pairs of $r = 128$,
# base 500000, for 2048 positions at each size:

# %%
inv32, _ = reference.rope_inv_freq(r, 500000.0)
inv64 = 500000.0 ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
for start in (1_000, 10_000, 100_000, 1_000_000):
    p = torch.arange(start, start + 2048)
    exact = p.double()[:, None] * inv64[None, :]
    angle32 = p.float()[:, None] * inv32[None, :]
    err = (angle32.double() - exact).abs().max().item()
    cos_err = (torch.cos(angle32.double()) - torch.cos(exact)).abs().max().item()
    print(f"p ~ {start:>9,}: max angle error {err:.1e} rad, max error of cos {cos_err:.1e}")

# %% [markdown]
# At 128k tokens the angle is off by about $10^{-2}$ radians, which moves cos and sin by as much as
# bfloat16's own rounding ($2^{-8} \approx 0.004$ relative). It is not a bug to fix: Hugging Face rounds the
# same way, so these are the angles a checkpoint is run with there, and `attn` keeps them. But it shows how
# little slack is left: any *further* error in evaluating cos and sin is added on top.
#
# **Evaluating cos of a large angle.** An accurate `cos` first reduces its argument modulo $2\pi$ with more
# precision than float32 has (libm and `torch.cos` on a CPU do). GPU kernels are often compiled to fast
# approximations instead (CUDA's `__cosf`/`__sinf`, `-use_fast_math`), whose documented error bound
# ($2^{-21.41}$ absolute) holds for arguments in $[-\pi, \pi]$ only; the CUDA Programming Guide says only
# that it is larger outside. We have not measured a GPU's cos here. What we can show on a CPU is what a
# naive reduction in float32 costs: subtract the nearest multiple of a float32 $2\pi$, then take an accurate
# cos of the remainder.

# %%
for start in (1_000, 100_000, 1_000_000):
    angle32 = torch.arange(start, start + 2048).float()[:, None] * inv32[None, :]
    two_pi = torch.tensor(2 * math.pi, dtype=torch.float32)
    reduced = angle32 - two_pi * torch.round(angle32 / two_pi)  # all in float32
    err = (torch.cos(reduced.double()) - torch.cos(angle32.double())).abs().max().item()
    print(f"p ~ {start:>9,}: naive float32 range reduction adds up to {err:.1e} to cos")

# %% [markdown]
# A table sidesteps the question. The cos and sin of each float32 angle are computed once, accurately, by
# PyTorch, and the kernel only multiplies and adds, so it produces the reference's values whatever the GPU's
# math library does, at every position. It also makes the scaling variants free: llama3, YaRN and the rest
# differ only in the numbers in the table (YaRN's attention factor is multiplied into it), and the kernel
# does not know which variant it runs. The table costs $2 \cdot 4 \cdot r/2$ bytes per position, 64 MiB for
# 128k positions at $r = 128$; the kernel reads one row per token. `attn.fast.preprocess` keeps one table per
# (rotary dim, base, scaling, device), grown in powers of two, except for dynamic scaling, whose table
# depends on the length served and is rebuilt for each call.
#
# ## 8. The fused pre-processing kernel, checked live
#
# In the generation phase, every new token arrives as one row of the fused QKV projection,
# `[T, (Hq + 2·Hkv)·D]`: the q heads, then the k heads, then the v heads. `attn.fast.preprocess` does in one
# pass what TensorRT-LLM's generation kernel does before attending: add the QKV bias, rotate q and k by their
# positions, write q out, and append the rotated k and the plain v to a contiguous or paged KV cache. New
# token $j$ of sequence $b$ sits at position `cache_seqlens[b] + j`, which is both its RoPE angle and its
# cache slot. `attn.reference.preprocess` is the same contract written plainly.
#
# The cell below runs both on fresh random inputs and asserts that they agree, for both pairings, full and
# partial rotary, a scaling variant, biases, and positions up to about 100,000, in float32 and float16. The
# packed batch holds three sequences with 3, 0 and 5 new tokens. The paged pool is small: only the blocks
# this call writes are mapped (to shuffled pool blocks), and the other entries of the block table are $-1$,
# which is allowed because nothing reads them.
#
# How close is close enough? Both sides compute the bias and the rotation in float32 and round once to the
# cache's dtype. In float32 they can differ in the last bits (operation order, fused multiply-adds); in
# float16 a last-bit difference can flip one rounding. So the bound is one unit in the last place of the
# value (of 1 for smaller values, where the error both sides share is absolute). v is only biased,
# identically on both sides, so the caches' values must be bit-equal.

# %%
device = "cuda" if torch.cuda.is_available() else "cpu"
HQ, HKV, D = 4, 2, 64
counts, starts = [3, 0, 5], [17, 250, 99_990]


def make_inputs(dtype, paged, block_size=16):
    cu = layout.cu_seqlens_from_lengths(torch.tensor(counts, device=device))
    qkv = torch.randn(sum(counts), (HQ + 2 * HKV) * D, dtype=dtype, device=device)
    bias = torch.randn(qkv.shape[-1], dtype=dtype, device=device)
    seqlens = torch.tensor(starts, dtype=torch.int32, device=device)
    if not paged:
        # a contiguous cache must reach the largest position: keep positions small for it
        seqlens = seqlens.clamp(max=40)
        k_cache = torch.randn(len(counts), 48, HKV, D, dtype=dtype, device=device)
        return qkv, bias, k_cache, torch.randn_like(k_cache), seqlens, cu, None
    max_blocks = (max(starts) + max(counts)) // block_size + 1
    table = torch.full((len(counts), max_blocks), -1, dtype=torch.int32)
    needed = [
        (b, blk)
        for b, (s, n) in enumerate(zip(starts, counts))
        for blk in range(s // block_size, (s + n - 1) // block_size + 1)
        if n
    ]
    pool = torch.randperm(2 * len(needed))
    for (b, blk), phys in zip(needed, pool.tolist()):
        table[b, blk] = phys
    k_cache = torch.randn(len(pool), block_size, HKV, D, dtype=dtype, device=device)
    return qkv, bias, k_cache, torch.randn_like(k_cache), seqlens, cu, table.to(device)


def ulp_diff(ref, out):
    """Largest |out - ref| in units of the last place of ref's dtype, values below 1 counted as 1."""
    # below 1, a rotation's cancellation makes the absolute error, not the relative one, what is shared
    _, exponent = torch.frexp(ref.double().abs().clamp_min(1.0))
    spacing = torch.finfo(ref.dtype).eps * torch.exp2((exponent - 1).double())
    return ((out.double() - ref.double()).abs() / spacing).max().item()


cases = [
    ("neox, full rotary, paged", dict(rotary_dim=64, rope_style="neox"), True),
    ("gptj, full rotary, paged", dict(rotary_dim=64, rope_style="gptj"), True),
    ("neox, rotary 16, contiguous", dict(rotary_dim=16, rope_style="neox"), False),
    ("neox, llama3 scaling, paged", dict(rotary_dim=64, rope_base=500000.0, rope_scaling=llama3), True),
    ("gptj, yarn scaling, paged", dict(rotary_dim=32, rope_style="gptj", rope_scaling=yarn), True),
]
for dtype in (torch.float32, torch.float16):
    for name, rope, paged in cases:
        qkv, bias, k_cache, v_cache, seqlens, cu, table = make_inputs(dtype, paged)
        kw = dict(num_heads_q=HQ, num_heads_kv=HKV, cu_seqlens_new=cu, block_table=table, qkv_bias=bias, **rope)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        q_ref = reference.preprocess(qkv, k_ref, v_ref, seqlens, **kw)
        q_out = attn.fast.preprocess(qkv, k_cache, v_cache, seqlens, **kw)
        q_ulp, k_ulp = ulp_diff(q_ref, q_out), ulp_diff(k_ref, k_cache)
        print(f"{str(dtype)[6:]:8s} {name:28s} q: {q_ulp:4.2f} ulp, k cache: {k_ulp:4.2f} ulp, "
              f"v cache equal: {torch.equal(v_ref, v_cache)}")  # fmt: skip
        assert q_out.dtype == dtype and q_ulp <= 1.0 and k_ulp <= 1.0, name
        assert torch.equal(v_ref, v_cache), name

# %% [markdown]
# In the interpreter the two agree bit for bit; the one-ulp bound leaves room for a GPU's fused multiply-adds.
# The whole cache is compared, not only the new slots, so the check also shows that the kernel wrote nothing
# anywhere else. Last, the keys the kernel appended are the ones RoPE promises: for the float32 llama3 case,
# take the k heads out of the biased QKV rows by hand, rotate them with `apply_rope` at their positions, and
# look them up in the paged cache through the block table.

# %%
qkv, bias, k_cache, v_cache, seqlens, cu, table = make_inputs(torch.float32, paged=True)
kw = dict(num_heads_q=HQ, num_heads_kv=HKV, cu_seqlens_new=cu, block_table=table, qkv_bias=bias, **cases[3][1])
attn.fast.preprocess(qkv, k_cache, v_cache, seqlens, **kw)
# the check itself runs on the CPU, wherever the kernel ran
rows, k_cache, table, seqlens = (x.cpu() for x in (qkv + bias, k_cache, table, seqlens))
k_new = rows[:, HQ * D : (HQ + HKV) * D].view(-1, HKV, D)  # [T, Hkv, D]
seq_of_token = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
positions = seqlens[seq_of_token] + torch.cat([torch.arange(n) for n in counts])
by_hand = reference.apply_rope(k_new, positions, base=500000.0, scaling=llama3)
slots = [reference.slot_of(int(p), int(b), k_cache.shape[1], table) for p, b in zip(positions, seq_of_token)]
from_cache = torch.stack([k_cache[row, slot] for row, slot in slots])
print("positions of the new tokens:", positions.tolist())
print(f"appended keys vs rotated by hand: {maxdiff(from_cache, by_hand):.1e}")
assert maxdiff(from_cache, by_hand) < 1e-5

# %% [markdown]
# These checks ran in Triton's interpreter on a CPU, in float32 and float16. The pre-processing kernel's speed
# on a GPU, and its parity there (bfloat16 included), have not been measured in this session; the test suite
# has a GPU test for positions up to 128k that would do the latter.
#
# ## Summary
#
# - RoPE rotates pair $i$ of q and k by $p\,\theta_i$, $\theta_i = \text{base}^{-2i/r}$. In complex numbers,
#   $q_m\cdot k_n = \sum_i \operatorname{Re}(z^q_i \bar z^k_i e^{\mathrm{i}(m-n)\theta_i})$: scores depend on the
#   offset only, and rotations keep norms.
# - GPT-NeoX/`rotate_half` pairs $(i, i + r/2)$, GPT-J pairs $(2i, 2i+1)$: the same rotation up to a
#   permutation of features, which converts checkpoints but must never be mixed up at run time.
# - Partial rotary rotates the first $r$ features, with $r$ (not $D$) in the frequencies and in the NeoX pairing.
# - Pairs whose wavelength exceeds the training context never turned fully in training. Linear scaling slows
#   every pair by $s$; dynamic NTK raises the base with the served length; Llama 3.1 interpolates the slow band,
#   keeps the fast one and blends between by turns; YaRN ramps by rotations and scales cos/sin by
#   $0.1 \ln s + 1$. All match Hugging Face's `ROPE_INIT_FUNCTIONS`.
# - The kernel reads a float32 cos/sin table: angles of $10^5$ radians leave no room for an inexact cos, and a
#   scaling variant is just a different table.
