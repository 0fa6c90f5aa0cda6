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
# # The context phase: from naive attention to the fused kernel
#
# The context phase (prefill) runs attention over a whole prompt at once: $S_q$ queries against $S_k$ keys,
# usually with $S_q = S_k$ in the thousands. This lesson starts from the obvious way to compute it, the one
# that writes every score to memory, and arrives at the kernel `attn.fast.attention`, which never does. Every
# step is checked against `attn.reference.attention`, and every claim about memory is measured.
#
# What we cover, in order:
#
# 1. naive (unfused) attention and the size of its score matrix;
# 2. the online softmax, derived and implemented tile by tile, including base-2 exponentials and rows that see
#    no key;
# 3. how the kernel tiles a causal or sliding-window mask, and where the ~2x causal saving comes from;
# 4. the memory of the unfused path against sequence length, measured here and on an H200;
# 5. padded against packed batches of ragged lengths;
# 6. the kernel's key lines, read from its source;
# 7. a live parity check of both Triton paths against the reference.
#
# As in lesson 1, without a GPU the kernels run in Triton's interpreter, so the shapes stay tiny.

# %%
import math
import weakref
from pathlib import Path

import _figures
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Patch, Rectangle
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attn
from attn import layout, reference

torch.manual_seed(0)
torch.set_printoptions(precision=4, sci_mode=False)
REPO = Path(attn.__file__).resolve().parent.parent


def maxdiff(a, b):
    """Largest absolute difference, taken in float64 so the comparison adds no rounding of its own."""
    return (a.double() - b.double()).abs().max().item()


def gib(n):
    return f"{n / 2**30:.2f} GiB"


# %% [markdown]
# ## 1. Naive attention materializes $S$
#
# For one head, attention is $O = \operatorname{softmax}(\tau\, Q K^\top) V$. Read literally, that is three
# steps, each writing its result to memory before the next one reads it:
#
# 1. $S = \tau\, Q K^\top$, one score for every (query, key) pair: $[S_q, S_k]$ per head;
# 2. mask $S$ (masked scores become $-\infty$) and turn each row into probabilities $P = \operatorname{softmax}(S)$,
#    the same size;
# 3. $O = P V$, back to $[S_q, D]$ per head.
#
# This is TensorRT-LLM's context path with `context_fmha_type=disabled`. In `attn` it exists twice:
# `attn.reference.attention_unfused` (three whole-batch PyTorch steps) and `attn.fast.attention_unfused`,
# three Triton kernels in `attn/fast/unfused.py`: a scores kernel, a softmax kernel that overwrites the scores
# with probabilities in place, and a $P\cdot V$ kernel. Both agree with the reference:

# %%
B, S, HQ, HKV, D = 2, 24, 4, 2, 16
q, k, v = torch.randn(B, S, HQ, D), torch.randn(B, S, HKV, D), torch.randn(B, S, HKV, D)
expected = reference.attention(q, k, v, causal=True)
unfused_paths = {
    "reference.attention_unfused": reference.attention_unfused,
    "fast.attention_unfused": attn.fast.attention_unfused,
}
for name, fn in unfused_paths.items():
    err = maxdiff(fn(q, k, v, causal=True), expected)
    print(f"{name:28s} vs reference.attention: {err:.1e}")
    assert err < 1e-5

# %% [markdown]
# The trouble is the size of step 1's output. The unfused kernels keep $S$ (and then $P$, in the same buffer)
# in fp32 for the whole batch, `[B, Hq, Sq, Sk]`, so it grows as $B \cdot H_q \cdot S_q \cdot S_k$:
# quadratically in the sequence length, while the inputs and the output grow only linearly. For a
# Llama-3-8B-like layer ($H_q = 32$, $D = 128$) in 16-bit precision:

# %%
print(" batch x seq    Q,K,V,O (2 B each)   S in fp32    ratio")
for b, s in ((16, 1024), (4, 4096), (1, 16384), (1, 65536)):
    qkvo = 4 * b * s * 32 * 128 * 2
    scores = b * 32 * s * s * 4
    print(f"{b:5d} x {s:6d}   {gib(qkvo):>14s}   {gib(scores):>11s}   {scores / qkvo:6.0f}x")

# %% [markdown]
# At 16k tokens the scores of a single layer would take 32 GiB, nearly a quarter of an H200, and at 64k tokens they
# would not fit at all. Even where they fit, every score crosses the memory bus several times (written by
# step 1, read and rewritten by step 2, read by step 3), while the arithmetic per score is a handful of
# operations. The unfused path is limited by memory bandwidth, not by compute.
#
# The way out is to never write $S$: compute a tile of scores on chip, use it, and throw it away. The only
# obstacle is the softmax, whose denominator needs a whole row before any probability is known. The online
# softmax removes that obstacle.
#
# ## 2. The online softmax
#
# Take one query row with scores $s_1, \dots, s_N$ and values $v_1, \dots, v_N$. The output is
#
# $$o = \frac{\sum_j e^{s_j - m}\, v_j}{\sum_j e^{s_j - m}}, \qquad m = \max_j s_j .$$
#
# Subtracting $m$ changes nothing mathematically (it cancels between numerator and denominator) but keeps
# every exponent $\le 0$, so nothing overflows: in fp32, $e^{x}$ is already infinite for $x > 88.7$.
#
# Now split the keys into tiles and visit them one at a time. After some tiles, keep three things for the
# row: the largest score seen so far $m$, and, **relative to that $m$**,
#
# $$\ell = \sum_{j\ \text{seen}} e^{s_j - m}, \qquad a = \sum_{j\ \text{seen}} e^{s_j - m}\, v_j .$$
#
# When the next tile arrives, with scores $s_j$ for $j$ in the tile, the maximum may grow to
# $m' = \max(m, \max_{j \in \text{tile}} s_j)$. Every term already in $\ell$ and $a$ was computed relative to the
# old $m$; since $e^{s_j - m'} = e^{s_j - m} \cdot e^{m - m'}$, re-basing them costs one multiplication by
# $\alpha = e^{m - m'} \le 1$. Then the tile's own terms are added:
#
# $$\ell \leftarrow \alpha\, \ell + \sum_{j \in \text{tile}} e^{s_j - m'}, \qquad
# a \leftarrow \alpha\, a + \sum_{j \in \text{tile}} e^{s_j - m'}\, v_j, \qquad m \leftarrow m' .$$
#
# The invariant holds again, so after the last tile $o = a / \ell$ exactly, and the log-sum-exp of the row,
# needed later to merge partial results (the split-K decode of lesson 5), is $\operatorname{lse} = m + \ln \ell$.
# This running rescale was published as the "online normalizer" by Milakov and Gimelshein (2018), and is the
# heart of FlashAttention (Dao et al., 2022); FlashAttention-2 (Dao, 2023) delays the division by $\ell$ to the
# very end, as here, and parallelizes over blocks of query rows, which is what our kernel does.
#
# Here it is for a block of query rows of one head, a literal transcription, checked against the reference:


# %%
def online_attention(q, k, v, scale, block_n, causal=False):
    """One head, q [Sq, D], k and v [Sk, D]; visits the keys block_n at a time. Returns (out, lse).

    Only for masks under which every row sees key 0 (none, or causal with Sq <= Sk); the rest come below.
    """
    sq, sk = q.shape[0], k.shape[0]
    m = torch.full((sq,), -math.inf)  # running max per row
    l = torch.zeros(sq)  # running denominator, relative to m
    acc = torch.zeros(sq, v.shape[1])  # running numerator, relative to m
    rows = torch.arange(sq)[:, None]
    for start in range(0, sk, block_n):
        cols = torch.arange(start, min(start + block_n, sk))[None, :]
        s = scale * q @ k[start : start + block_n].T  # [Sq, block_n]: the only scores that ever exist
        if causal:
            s = s.masked_fill(cols > rows + sk - sq, -math.inf)
        m_new = torch.maximum(m, s.max(dim=1).values)
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new[:, None])
        l = alpha * l + p.sum(dim=1)
        acc = alpha[:, None] * acc + p @ v[start : start + block_n]
        m = m_new
    return acc / l[:, None], m + torch.log(l)


sq = sk = 40
q1, k1, v1 = torch.randn(sq, D), torch.randn(sk, D), torch.randn(sk, D)
as_4d = dict(q=q1[None, :, None], k=k1[None, :, None], v=v1[None, :, None])
for causal in (False, True):
    ref_out, ref_lse = reference.attention(**as_4d, causal=causal, return_lse=True)
    out, lse = online_attention(q1, k1, v1, 1 / math.sqrt(D), block_n=16, causal=causal)
    err, err_lse = maxdiff(out, ref_out[0, :, 0]), maxdiff(lse, ref_lse[0, 0])
    print(f"causal={causal!s:5s}: online vs reference: out {err:.1e}, lse {err_lse:.1e}")
    assert err < 1e-5 and err_lse < 1e-5

# %% [markdown]
# To watch the bookkeeping, follow a single row through the three tiles. Whenever a tile holds a score larger
# than any before, $m$ jumps and $\alpha < 1$ shrinks what was accumulated; otherwise $\alpha = 1$. (At the first
# tile $\alpha = e^{-\infty} = 0$: there is nothing to rescale yet.)

# %%
row = q1[:1]
m, l = -math.inf, 0.0
for start in range(0, sk, 16):
    s = (row @ k1[start : start + 16].T)[0] / math.sqrt(D)
    m_new = max(m, s.max().item())
    alpha = math.exp(m - m_new)
    l = alpha * l + torch.exp(s - m_new).sum().item()
    keys = f"{start:2d}..{min(start + 16, sk) - 1:2d}"
    print(f"keys {keys}: tile max {s.max():6.3f}  m {m_new:6.3f}  alpha {alpha:.3f}  l {l:7.3f}")
    m = m_new
ref_lse = reference.attention(**as_4d, return_lse=True)[1][0, 0, 0]
print(f"lse = m + ln(l) = {m + math.log(l):.4f};  reference: {ref_lse:.4f}")

# %% [markdown]
# ### Base 2: folding $\log_2 e$ into the scale
#
# A GPU has no instruction for $e^x$. Its special-function unit computes $2^x$ (`ex2`), and $e^x$ is compiled
# as $2^{x \log_2 e}$: a multiplication, then `ex2`. The kernel moves that multiplication into the scale it
# applies anyway. With $\tau' = \tau \log_2 e$ the scores are kept in "log2 units", $s' = \tau' q\cdot k = s
# \log_2 e$, and
#
# $$2^{s'_j - m'} = 2^{(s_j - m)\log_2 e} = e^{s_j - m},$$
#
# so the probabilities, $\ell$ and $a$ are unchanged, and one multiplication per score is saved. Only the
# log-sum-exp, reported in natural-log units, needs converting at the end:
# $\operatorname{lse} = m + \ln \ell = (m' + \log_2 \ell)\ln 2$.
#
# ### Rows with no visible key
#
# A row can see no key in a tile: the tile lies beyond the row's causal diagonal or outside its window, or
# the row is padding. Then all its scores in the tile are $-\infty$, $m' = -\infty$, and the update computes
# $s - m' = -\infty - (-\infty)$, which is NaN, not 0:

# %%
print("-inf - -inf =", (torch.tensor(-math.inf) - torch.tensor(-math.inf)).item())


# %% [markdown]
# A NaN in $\alpha$ poisons the row for good: $\ell$ and $a$ are multiplied by it at every later tile, so the row
# ends as NaN even if it does see keys later. The guard: while $m' = -\infty$, subtract $0$ instead. Then
# $2^{-\infty - 0} = 0$, so $p = 0$ and $\alpha = 0$, and the row stays at $\ell = 0,\ a = 0$, exactly what
# "no key seen yet" should mean. A row that never sees a key at all (a query before the first key when
# $S_q > S_k$, or a padding row) finishes with $\ell = 0$; a second guard at the end gives it zeros and
# $\operatorname{lse} = -\infty$ by convention, instead of $0/0$.
#
# Here is the same function in base 2, with both guards, taking any mask. A sliding window shows why the first
# guard is needed: with `window_size = (3, 0)` and tiles of 4 keys, query 7 sees keys 4 to 7, so the whole first
# tile is hidden from it. Without the guard, its $\ell$ becomes NaN in that first tile and stays NaN. The final
# test $\ell > 0$ is false for NaN, so the row does not even come out as NaN: it comes out as zeros, silently
# wrong.


# %%
def online_attention_exp2(q, k, v, scale, block_n, visible, guard=True):
    """online_attention in base 2, as the kernel computes it; visible [Sq, Sk] is the mask (True = seen)."""
    sq, sk = q.shape[0], k.shape[0]
    qk_scale = scale * math.log2(math.e)  # the kernel's qk_scale: one multiply gives log2 units
    m = torch.full((sq,), -math.inf)
    l = torch.zeros(sq)
    acc = torch.zeros(sq, v.shape[1])
    for start in range(0, sk, block_n):
        s = qk_scale * q @ k[start : start + block_n].T
        s = s.masked_fill(~visible[:, start : start + block_n], -math.inf)
        m_new = torch.maximum(m, s.max(dim=1).values)
        m_safe = torch.where(m_new == -math.inf, 0.0, m_new) if guard else m_new
        p = torch.exp2(s - m_safe[:, None])
        alpha = torch.exp2(m - m_safe)
        l = alpha * l + p.sum(dim=1)
        acc = alpha[:, None] * acc + p @ v[start : start + block_n]
        m = m_new
    has_key = l > 0
    l_safe = torch.where(has_key, l, 1.0)
    out = torch.where(has_key[:, None], acc / l_safe[:, None], 0.0)
    lse = torch.where(has_key, (m + torch.log2(l_safe)) * math.log(2), -math.inf)
    return out, lse


def versus_reference(sq, sk, block_n, guard=True, **mask):
    q, k, v = torch.randn(sq, D), torch.randn(sk, D), torch.randn(sk, D)
    visible = reference.attention_mask(sq, sk, **mask)
    out, lse = online_attention_exp2(q, k, v, 1 / math.sqrt(D), block_n, visible, guard)
    # the reference wants [B, S, H, D]: one sequence, one head
    ref_out, ref_lse = reference.attention(
        q[None, :, None], k[None, :, None], v[None, :, None], **mask, return_lse=True
    )
    return out, lse, ref_out[0, :, 0], ref_lse[0, 0]


out, lse, ref_out, ref_lse = versus_reference(12, 12, 4, window_size=(3, 0))
print(f"window (3, 0), guarded:    out err {maxdiff(out, ref_out):.1e}, lse err {maxdiff(lse, ref_lse):.1e}")
assert maxdiff(out, ref_out) < 1e-5 and maxdiff(lse, ref_lse) < 1e-5
out, _, ref_out, _ = versus_reference(12, 12, 4, guard=False, window_size=(3, 0))
wrong = ((out - ref_out).abs().max(dim=1).values > 1e-3).nonzero().flatten().tolist()
print("window (3, 0), unguarded: wrong queries:", wrong, " their output norms:", out[wrong].norm(dim=1).tolist())
assert wrong == list(range(7, 12))

# more queries than keys: under the bottom-right causal mask the first Sq - Sk = 2 queries see nothing
out, lse, ref_out, ref_lse = versus_reference(6, 4, 2, causal=True)
print("Sq=6, Sk=4, causal: lse          ", lse)
print("                    reference lse", ref_lse)
print("                    output row norms", out.norm(dim=1))
assert maxdiff(out, ref_out) < 1e-5 and torch.equal(lse.isinf(), ref_lse.isinf())
assert maxdiff(lse[2:], ref_lse[2:]) < 1e-5

out, lse, ref_out, ref_lse = versus_reference(40, 40, 16, causal=True)
print(f"Sq = Sk = 40, causal:      out err {maxdiff(out, ref_out):.1e}, lse err {maxdiff(lse, ref_lse):.1e}")
assert maxdiff(out, ref_out) < 1e-5 and maxdiff(lse, ref_lse) < 1e-5

# %% [markdown]
# ## 3. Tiling: which tiles the kernel visits, and how
#
# The kernel gives each program a block of `BLOCK_M` query rows of one (sequence, head), and walks that block's
# keys `BLOCK_N` at a time. Under a mask, the key tiles of a row block fall into three kinds:
#
# - **skipped**: no row of the block sees any key of the tile. The kernel never loads it.
# - **masked**: some rows see some keys. The tile needs the mask arithmetic (compare positions, set $-\infty$)
#   and the $-\infty$ guard: tiles on the causal diagonal, at the end of the sequence, on a window's left edge.
# - **unmasked**: every row of the block sees every key of the tile. No mask, no guard, the fast loop.
#
# The kernel computes, per row block, the key range $[\text{lo}, \text{hi})$ visible to at least one row and the
# tile-aligned range $[\text{full\_lo}, \text{full\_hi})$ visible to all rows, and runs three loops:
# $[\text{lo}, \text{full\_lo})$ masked (a window's left edge), $[\text{full\_lo}, \text{full\_hi})$ unmasked, and
# $[\text{full\_hi}, \text{hi})$ masked (the diagonal and the sequence end). The function below repeats the
# kernel's arithmetic line by line in Python; section 6 shows the original. Before drawing anything, we check
# it against the mask itself on a few hundred shapes: skipped tiles hold no visible key, unmasked tiles only
# visible keys, and every visible key is visited.


# %%
def kernel_split(m0, seqlen_q, seqlen_k, block_m, block_n, window_left=-1, window_right=-1):
    """The key ranges (lo, full_lo, full_hi, hi) of the row block starting at m0, as _attn_fwd_kernel computes them."""
    diag = seqlen_k - seqlen_q
    m_last = m0 + block_m - 1
    lo, hi = 0, seqlen_k
    if window_left >= 0:
        lo = max(m0 + diag - window_left, 0) // block_n * block_n
    if window_right >= 0:
        hi = min(m_last + diag + window_right + 1, seqlen_k)
    if m0 >= seqlen_q:
        hi = lo
    full_lo = lo
    if window_left >= 0:
        full_lo = -(-max(m_last + diag - window_left, 0) // block_n) * block_n
    full_hi = seqlen_k
    if window_right >= 0:
        full_hi = min(m0 + diag + window_right + 1, seqlen_k)
    full_hi = max(full_hi, 0) // block_n * block_n
    full_lo = min(max(full_lo, lo), max(hi, lo))
    full_hi = min(max(full_hi, full_lo), max(hi, lo))
    return lo, full_lo, full_hi, hi


def tile_kinds(seqlen_q, seqlen_k, block_m, block_n, window=(-1, -1)):
    """[row blocks, key tiles] grid: 0 skipped, 1 masked loop, 2 unmasked loop."""
    n_m, n_n = -(-seqlen_q // block_m), -(-seqlen_k // block_n)
    kinds = torch.zeros(n_m, n_n, dtype=torch.long)
    for bm in range(n_m):
        lo, full_lo, full_hi, hi = kernel_split(bm * block_m, seqlen_q, seqlen_k, block_m, block_n, *window)
        # the loops step by BLOCK_N from their start; every start here is tile-aligned
        for start, end, kind in ((lo, full_lo, 1), (full_lo, full_hi, 2), (full_hi, hi, 1)):
            for n0 in range(start, end, block_n):
                kinds[bm, n0 // block_n] = kind
    return kinds


def check_split(seqlen_q, seqlen_k, block_m, block_n, window):
    mask = reference.attention_mask(seqlen_q, seqlen_k, window_size=window)
    kinds = tile_kinds(seqlen_q, seqlen_k, block_m, block_n, window)
    for bm in range(kinds.shape[0]):
        for bn in range(kinds.shape[1]):
            tile = mask[bm * block_m : (bm + 1) * block_m, bn * block_n : (bn + 1) * block_n]
            # unmasked: every real row of the block sees every key of a whole tile (rows past Sq are computed,
            # then never stored, so they do not count)
            full = tile.shape[1] == block_n and bool(tile.all())
            assert kinds[bm, bn] != 0 or not tile.any(), ("skipped a visible key", seqlen_q, seqlen_k, window)
            assert kinds[bm, bn] != 2 or full, ("unmasked tile with a hidden key", seqlen_q, seqlen_k, window)


n_checked = 0
for seqlen_q, seqlen_k in ((64, 64), (50, 77), (77, 50), (1, 40), (33, 33)):
    for window in ((-1, -1), (-1, 0), (5, 0), (20, 0), (7, 3), (-1, 9)):
        for block_m, block_n in ((16, 8), (8, 16), (32, 16)):
            check_split(seqlen_q, seqlen_k, block_m, block_n, window)
            n_checked += 1
print(f"the three-way split agrees with the mask on {n_checked} shapes")


# %% [markdown]
# Now the picture. Each cell is one (row block, key tile) pair; the thin lines inside show the mask itself.
# We use the kernel's GPU tile shape for 16-bit inputs, `BLOCK_M = 128`, `BLOCK_N = 64`, so a row block covers
# two key tiles of the diagonal.


# %% tags=["hide-input"]
KIND_COLOURS = ["#eeeeee", "#f4a259", "#3d7ea6"]
KIND_NAMES = ["skipped", "masked", "unmasked"]


def draw_tiles(ax, seqlen_q, seqlen_k, block_m, block_n, window=(-1, -1), title=""):
    kinds = tile_kinds(seqlen_q, seqlen_k, block_m, block_n, window)
    for bm in range(kinds.shape[0]):
        for bn in range(kinds.shape[1]):
            x, y = bn * block_n, bm * block_m
            w, h = min(block_n, seqlen_k - x), min(block_m, seqlen_q - y)
            ax.add_patch(Rectangle((x, y), w, h, facecolor=KIND_COLOURS[kinds[bm, bn]], edgecolor="white", lw=1.5))
    mask = reference.attention_mask(seqlen_q, seqlen_k, window_size=window).float()
    ax.contour(mask.numpy(), levels=[0.5], colors="black", linewidths=0.8, extent=(0, seqlen_k, 0, seqlen_q))
    ax.set_xlim(0, seqlen_k)
    ax.set_ylim(seqlen_q, 0)
    ax.set_aspect("equal")
    counts = [int((kinds == i).sum()) for i in range(3)]
    ax.set_title(f"{title}\nskipped {counts[0]}, masked {counts[1]}, unmasked {counts[2]}", fontsize=9)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    return kinds


fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
draw_tiles(axes[0], 1024, 1024, 128, 64, (-1, 0), "causal, Sq = Sk = 1024")
draw_tiles(axes[1], 384, 1024, 128, 64, (-1, 0), "causal chunk, Sq = 384, Sk = 1024")
draw_tiles(axes[2], 1024, 1024, 128, 64, (255, 0), "sliding window (255, 0)")
fig.legend(handles=[Patch(color=c, label=n) for c, n in zip(KIND_COLOURS, KIND_NAMES)], loc="lower center", ncol=3)
fig.tight_layout(rect=(0, 0.06, 1, 1))
plt.show()

# %% [markdown]
# The black line is the edge of the mask: the visible keys lie below-left of it (between the two lines, for
# the window). Three things to notice:
#
# - With `BLOCK_M = 2·BLOCK_N`, the diagonal crosses two key tiles of every row block, so each row block has
#   two masked tiles and everything to their left is unmasked. The masked tiles are a thin band whose width
#   does not grow with the sequence; the unmasked interior grows quadratically.
# - The chunk of 384 new queries attending to 1024 keys is the bottom of the square picture: bottom-right
#   alignment puts its diagonal in the last 384 keys, and the 640 cached keys before them are all unmasked.
# - The window visits a band of constant width per row block, so the work grows linearly with the length. Its
#   left edge needs masked tiles too, where the window starts partway through a tile.
#
# ### The causal saving
#
# A row block $r$ (of $n_m = S / \texttt{BLOCK\_M}$) visits only the tiles up to its diagonal,
# $(r+1)\cdot\texttt{BLOCK\_M}/\texttt{BLOCK\_N}$ of them, so causal attention visits
# $\frac{n_m (n_m+1)}{2}\cdot\frac{\texttt{BLOCK\_M}}{\texttt{BLOCK\_N}}$ tiles instead of all of them, a fraction
# $\frac{n_m+1}{2n_m}$, which tends to one half. The H200 benchmark (section 4 loads it) times the same shape with
# and without the causal mask:

# %%
BENCH_FILE = _figures.result_path("attention_H200_2026-11-28_a.json")
bench = _figures.result(BENCH_FILE.name)
by_name = {r["name"]: r for r in bench["results"]}
full_ms = by_name["B4 H32 S4096 D128 full"]["contenders"]["ours"]["ms"]
causal_ms = by_name["B4 H32 S4096 D128 causal"]["contenders"]["ours"]["ms"]
for s in (1024, 4096, 16384):
    kinds = tile_kinds(s, s, 128, 64, (-1, 0))
    visited = int((kinds > 0).sum())
    fraction = f"{visited:6d} of {kinds.numel():6d} tiles ({visited / kinds.numel():.3f})"
    print(f"S = {s:5d}: causal visits {fraction}, {int((kinds == 1).sum())} of them masked")
print(f"H200, B4 H32 S4096 D128 bf16: causal {causal_ms:.2f} ms, full {full_ms:.2f} ms: {causal_ms / full_ms:.2f}")

# %% [markdown]
# The measured ratio is a little above the tile count's 0.52. Likely reasons: a masked tile costs more than an
# unmasked one (it computes its hidden half anyway, plus the mask), and the row blocks are unequal in work, so
# the last wave of programs does not fill the GPU. (The kernel starts the heaviest
# row blocks first to keep that tail short; section 6 shows the line.)
#
# ## 4. Memory against sequence length, measured
#
# How much memory does each path allocate? On a GPU one would read `torch.cuda.max_memory_allocated()`; the
# benchmark does exactly that. On a CPU there is no such counter, so we build a small one. A
# `TorchDispatchMode` sees every PyTorch operation run inside it, including the `torch.empty` calls with which
# the launchers allocate their buffers. For each new tensor storage it records the size, and it keeps a weak
# reference to every tensor using that storage, so that it knows when the storage has been freed. After each
# operation it adds up the storages still alive; the peak of that sum is the peak memory, at the resolution of
# one operation. Storages that existed before the call (the inputs) are not counted. The Triton kernels only
# write into buffers allocated beforehand, so nothing escapes the count. (The interpreter's own numpy arrays
# play the part of registers and on-chip memory, and are not counted, as they should not be.)


# %%
class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the `with` block and alive at the same time."""

    def __init__(self):
        super().__init__()
        self.before = set()  # storages that already existed: the inputs
        self.alive = {}  # data_ptr -> (nbytes, weak references to the tensors using it)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.alive:
                self.before.add(t.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        # forget storages whose tensors are all gone before registering new ones: the allocator may reuse the address
        alive = {p: (n, [r for r in refs if r() is not None]) for p, (n, refs) in self.alive.items()}
        self.alive = {p: entry for p, entry in alive.items() if entry[1]}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() in self.before or storage.nbytes() == 0:
                    continue
                self.alive.setdefault(storage.data_ptr(), (storage.nbytes(), []))[1].append(weakref.ref(t))
        self.peak = max(self.peak, sum(n for n, _ in self.alive.values()))
        return out


def peak_bytes(fn, *args, **kwargs):
    with PeakMemory() as tracker:
        out = fn(*args, **kwargs)
    del out
    return tracker.peak


# %% [markdown]
# One head, one sequence, $D = 16$, fp16 inputs, causal, at growing lengths. The Triton unfused path is slow in
# the interpreter (its softmax kernel runs one program per score row), so it stops at 256 tokens; the reference
# goes further.

# %%
H_MEM, D_MEM = 1, 16
measured = {"reference.attention_unfused": {}, "fast.attention_unfused": {}, "fast.attention": {}}
limits = {"reference.attention_unfused": 4096, "fast.attention_unfused": 256, "fast.attention": 512}
functions = {
    "reference.attention_unfused": reference.attention_unfused,
    "fast.attention_unfused": attn.fast.attention_unfused,
    "fast.attention": attn.fast.attention,
}
for s in (32, 64, 128, 256, 512, 1024, 2048, 4096):
    q, k, v = (torch.randn(1, s, H_MEM, D_MEM, dtype=torch.float16) for _ in range(3))
    for name, fn in functions.items():
        if s <= limits[name]:
            measured[name][s] = peak_bytes(fn, q, k, v, causal=True)

print("  S    scores B·H·S²·4   reference unfused   Triton unfused   fused (out only)")
for s in (32, 64, 128, 256, 512, 1024, 2048, 4096):
    cells = [f"{measured[n][s]:>12,d}" if s in measured[n] else f"{'':>12s}" for n in measured]
    print(f"{s:5d} {H_MEM * s * s * 4:14,d}    {cells[0]}       {cells[1]}     {cells[2]}")

# %% [markdown]
# Each column has a simple law, and the measurements follow it to the byte or nearly:
#
# - **Triton unfused**: the fp32 score buffer $4 B H_q S_q S_k$, the fp32 log-sum-exp $4 B H_q S_q$ and the output
#   $2 B S_q H_q D$, plus a few bytes: the per-sequence lengths the launcher makes up when none are given, and
#   on the first call the 4-byte word in which the kernels record bad index values (see the semantics page).
# - **Reference unfused**: about four times the scores, since its PyTorch steps keep several temporaries the
#   size of the score matrix alive at once (scores, exponentials, probabilities, the mask). It is written for
#   reading, not for memory, and the number shows how quickly a naive implementation multiplies the problem.
# - **Fused**: the output alone, $2 B S_q H_q D$ (plus the lse's $4 B H_q S_q$ when asked for it). Linear in $S$.

# %%
# the laws, to within a few bytes of metadata (made-up lengths, the 4-byte error word made on first use)
for s, got in measured["fast.attention_unfused"].items():
    assert 0 <= got - (4 * H_MEM * s * s + 4 * H_MEM * s + 2 * s * H_MEM * D_MEM) <= 16, s
for s, got in measured["fast.attention"].items():
    assert 0 <= got - 2 * s * H_MEM * D_MEM <= 16, s

fig, ax = plt.subplots(figsize=(7, 4.5))
styles = {"reference.attention_unfused": "s-", "fast.attention_unfused": "o-", "fast.attention": "^-"}
for name, points in measured.items():
    ax.loglog(list(points), list(points.values()), styles[name], label=f"{name} (measured)")
grid = torch.tensor([32.0, 4096.0])
ax.loglog(grid, 4 * H_MEM * grid**2, "k:", lw=1, label="fp32 scores, 4·S² bytes")
ax.loglog(grid, 2 * H_MEM * D_MEM * grid, "k--", lw=1, label="output, 2·S·D bytes")
ax.set_xlabel("sequence length S (Sq = Sk, one head, D = 16)")
ax.set_ylabel("peak bytes allocated by the call")
ax.set_title("Unfused memory grows as S², fused as S (measured on CPU)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# On a log-log plot a power law is a straight line, and its slope is the exponent: 2 for the unfused paths,
# 1 for the fused kernel. With $D = 16$ the lines cross near $S = 8$; with a real $D = 128$ the unfused
# path's score buffer is already 16 times the output at $S = 1024$ (fp32 scores against fp16 output,
# $4 S$ bytes per row against $2D$).
#
# ### The same on an H200
#
# The benchmark `bench/bench_attention.py` measures every contender's peak with
# `torch.cuda.max_memory_allocated()`, over what was allocated before the call. These results come from the
# file `bench/results/attention_H200_2026-11-28_a.json` (bf16 inputs, $D = 128$):

# %%
env = bench["env"]
print(f"from {BENCH_FILE.relative_to(REPO)}  ({env['gpu']}, torch {env['torch']}, {bench['args']['dtype']})")
print(f"{'shape':34s} {'unfused peak':>13s} {'fused peak':>11s} {'unfused ms':>11s} {'fused ms':>9s} {'speed-up':>9s}")
rows = []
for r in bench["results"]:
    unf, ours = r["contenders"]["unfused"], r["contenders"]["ours"]
    if unf["status"] != "ok" or ours["status"] != "ok":
        continue
    rows.append((r["name"], unf["peak_mem_bytes"], ours["peak_mem_bytes"], unf["ms"], ours["ms"]))
    print(f"{r['name']:34s} {gib(unf['peak_mem_bytes']):>13s} {gib(ours['peak_mem_bytes']):>11s} "
          f"{unf['ms']:11.2f} {ours['ms']:9.2f} {unf['ms'] / ours['ms']:8.1f}x")  # fmt: skip

spec = by_name["B4 H32 S4096 D128 causal"]["spec"]
b, h, s, d = spec["batch"], spec["heads_q"], spec["seqlen"], spec["head_dim"]
predicted = 4 * b * h * s * s + 4 * b * h * s + 2 * b * s * h * d
print(f"B4 H32 S4096 by the law above: {predicted:,d} bytes; measured {rows[1][1]:,d}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
names = [n.replace(" D128", "\n") for n, *_ in rows]
x = torch.arange(len(rows)).float()
ax1.bar(x - 0.2, [r[1] / 2**30 for r in rows], 0.4, label="unfused (3 Triton kernels)", color="#f4a259")
ax1.bar(x + 0.2, [r[2] / 2**30 for r in rows], 0.4, label="fused (attn.fast.attention)", color="#3d7ea6")
ax1.set_ylabel("peak memory of the call (GiB)")
ax1.set_ylim(0, 1.35 * max(r[1] for r in rows) / 2**30)
ax2.bar(x - 0.2, [r[3] for r in rows], 0.4, color="#f4a259")
ax2.bar(x + 0.2, [r[4] for r in rows], 0.4, color="#3d7ea6")
ax2.set_ylabel("time (ms)")
for ax in (ax1, ax2):
    ax.set_xticks(x.tolist(), names, fontsize=8)
ax1.legend(fontsize=8, loc="upper left")
fig.suptitle("H200, bf16: unfused against fused (bench/results/attention_H200_2026-11-28_a.json)", fontsize=10)
fig.tight_layout()
plt.show()

# %% [markdown]
# The law holds on the GPU too: 8 GiB of fp32 scores plus 128 MiB of output and 2 MiB of lse at
# $B=4, H_q=32, S=4096$. The fused kernel's 128 MiB is its output and nothing else. And the unfused path is
# 4 to 9 times slower, as expected of a computation that is bound by memory traffic: for the causal shapes it
# still writes and reads the whole square, masked half included, while the fused kernel skips it.
#
# ## 5. Padded against packed batches
#
# A batch of prompts has ragged lengths. Padded to the longest, every tensor is `[B, max_len, ...]`; packed,
# it is `[T, ...]` with $T = \sum_b S_b$ and `cu_seqlens` marking the boundaries (lesson 1, section 6). The
# benchmark's ragged batch shows what padding costs. For a Llama-3-8B-like layer ($H_q = 32$, $H_{kv} = 8$,
# $D = 128$, bf16), we count the bytes of Q, K, V and O in each layout, and the unfused path's score buffer,
# which is padded in both dimensions, $B \cdot H_q \cdot \max S^2$, against the $H_q \sum_b S_b^2$ it needs:

# %%
lengths = torch.tensor(bench["varlen_lengths"], dtype=torch.int32)
hq_l, hkv_l, d_l = 32, 8, 128
per_token = (2 * hq_l + 2 * hkv_l) * d_l * 2  # q and o with Hq heads, k and v with Hkv heads, 2 bytes each
max_len, n_seq = int(lengths.max()), len(lengths)
padded_qkvo, packed_qkvo = n_seq * max_len * per_token, int(lengths.sum()) * per_token
padded_scores = n_seq * hq_l * max_len**2 * 4
needed_scores = hq_l * int((lengths.long() ** 2).sum()) * 4
print("lengths:", lengths.tolist(), " cu_seqlens:", layout.cu_seqlens_from_lengths(lengths).tolist())
print(f"Q,K,V,O   padded {gib(padded_qkvo)}, packed {gib(packed_qkvo)}: {1 - packed_qkvo / padded_qkvo:.0%} is padding")
waste = 1 - needed_scores / padded_scores
print(f"S (fp32)  padded {gib(padded_scores)}, needed {gib(needed_scores)}: {waste:.0%} is padding")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
idx = torch.arange(n_seq)
ax1.bar(idx, lengths, color="#3d7ea6", label="tokens")
ax1.bar(idx, max_len - lengths, bottom=lengths, color="#dddddd", label="padding")
ax1.set_xlabel("sequence b")
ax1.set_ylabel("rows in the padded batch")
ax1.set_title(f"padded to {max_len}: {1 - packed_qkvo / padded_qkvo:.0%} of the rows are filler", fontsize=10)
ax1.legend(fontsize=8)
groups = [("Q, K, V, O", packed_qkvo, padded_qkvo), ("unfused S (fp32)", needed_scores, padded_scores)]
for i, (_, used, total) in enumerate(groups):
    ax2.bar(i, used / total, color="#3d7ea6")
    ax2.bar(i, 1 - used / total, bottom=used / total, color="#dddddd")
    ax2.text(i, 1.02, f"{gib(used)} of {gib(total)}", ha="center", fontsize=8)
ax2.set_xticks([0, 1], [g[0] for g in groups])
ax2.set_ylim(0, 1.12)
ax2.set_ylabel("fraction of the padded bytes, one layer")
ax2.set_title("needed (blue) and padding (grey)", fontsize=10)
fig.tight_layout()
plt.show()

# %% [markdown]
# Half of the padded batch's rows are filler here, and 64% of a padded score buffer. The fused kernel is
# less exposed than those numbers suggest even when given padded input: its row blocks past a sequence's end
# return at once, and it never visits keys past `seqlens_k[b]`. But the padded tensors still have to exist,
# be written and be copied, which is why packed input is the recommended form.
#
# Both layouts must give the same answer, and here they can give *exactly* the same bits: each sequence is cut
# into the same tiles, visited in the same order, whichever layout it comes from. No tolerance needed:

# %%
lens = torch.tensor([37, 8, 64, 0, 21], dtype=torch.int32)
q = torch.randn(len(lens), 64, 4, D, dtype=torch.float16)
k, v = torch.randn(len(lens), 64, 2, D, dtype=torch.float16), torch.randn(len(lens), 64, 2, D, dtype=torch.float16)
out_padded = attn.fast.attention(q, k, v, seqlens_q=lens, seqlens_k=lens, causal=True)

q_p, cu, max_s = layout.unpad(q, lens)
(k_p, _, _), (v_p, _, _) = layout.unpad(k, lens), layout.unpad(v, lens)
out_packed = attn.fast.attention(
    q_p, k_p, v_p, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_s, max_seqlen_k=max_s, causal=True
)
print(f"padded {tuple(q.shape)} vs packed {tuple(q_p.shape)}, cu_seqlens {cu.tolist()}")
print("bit-identical after layout.pad:", torch.equal(layout.pad(out_packed, cu, 64), out_padded))
assert torch.equal(layout.pad(out_packed, cu, 64), out_padded)
assert maxdiff(out_padded, reference.attention(q, k, v, seqlens_q=lens, seqlens_k=lens, causal=True)) < 2e-3

# %% [markdown]
# `layout.pad` fills with zeros, and the padded call writes zeros past each sequence's end, so even the filler
# matches.
#
# ## 6. The kernel's key lines
#
# The excerpts below are read from `attn/fast/attention.py` each time this page is built, so they show the
# kernel as it is, not as it was. (If a line they look for disappears, the build fails, and this section gets
# rewritten.)

# %%
KERNEL_FILE = REPO / "attn" / "fast" / "attention.py"
KERNEL_SOURCE = KERNEL_FILE.read_text().splitlines()


def excerpt(first, last, after=None):
    """Prints the kernel's lines from the one containing `first` to the next one containing `last`."""
    start = 0 if after is None else next(i for i, line in enumerate(KERNEL_SOURCE) if after in line)
    i = next(n for n in range(start, len(KERNEL_SOURCE)) if first in KERNEL_SOURCE[n])
    j = next(n for n in range(i, len(KERNEL_SOURCE)) if last in KERNEL_SOURCE[n])
    lines = KERNEL_SOURCE[i : j + 1]
    indent = min(len(x) - len(x.lstrip()) for x in lines if x.strip())
    print(f"# {KERNEL_FILE.relative_to(REPO)}, lines {i + 1}-{j + 1}")
    print("\n".join(x[indent:] for x in lines))


# %% [markdown]
# **The scale, in log2 units.** The launcher multiplies $\log_2 e$ into the score scale once, on the host, so
# that the kernel can call `exp2` directly (section 2). With soft-capping, the scale goes inside the $\tanh$ and
# $\log_2 e$ into the cap that multiplies it.

# %%
excerpt("if args.softcap > 0:", "qk_scale, cap_log2 = args.scale * LOG2E")

# %% [markdown]
# **Launch order: one head's row blocks together, heaviest first.** Programs are launched roughly in order of
# their id, and about one program per SM runs at a time (132 on an H200). If consecutive ids were different
# heads, every running program would stream a different head's K/V, and each head's K/V (2 MB at S = 4096,
# D = 128) would come from memory again for each of its 32 row blocks: about 4 GB of reads for a 1.5 ms kernel.
# With one head's row blocks adjacent, they stream the same K/V at nearly the same time and share it through
# the 50 MB L2. That order measured 13-37% faster on the H200 (`bench/NOTES.md`). Within a head, under a causal
# mask, the last row blocks see the most keys, so the kernel reverses the block index: the long programs start
# first and the short ones fill the gaps at the end.

# %%
excerpt("num_m_blocks = tl.cdiv(max_rows, TOKENS)", "pid_m = num_m_blocks - 1", after="def _attn_fwd_kernel")

# %% [markdown]
# **The three key ranges.** `diag` is the bottom-right alignment ($j \le i + S_k - S_q$); `lo, hi` bound the keys
# any row of the block can see, `full_lo, full_hi` those every row sees, rounded inward to whole tiles. The
# last two lines clamp the ranges into order, so that an empty range is empty rather than negative. This is what
# `kernel_split` in section 3 transcribes.

# %%
excerpt("diag = seqlen_k - seqlen_q", "full_hi = tl.minimum(tl.maximum(full_hi, full_lo)", after="def _attn_fwd_kernel")

# %% [markdown]
# **One loop, one stage per range.** `_attn_fwd_tiles` is called once per key range with a constexpr `STAGE`,
# the way Triton's attention tutorial passes its `STAGE`: `LEAD`, `FULL` and `TAIL` for the three ranges
# above (T5's implicit bias splits `FULL` three ways, lesson 08). The kernel hands every call the same bounds
# and operand tuples; the stage picks its own range and decides whether the tiles are masked. Triton compiles a
# separate copy of the loop for each stage, so the `FULL` loop, where nearly all the work is for long sequences,
# contains no position comparisons and no guard at all. (A last stage, `RERUN`, runs only when a block's
# accumulator ends non-finite: a NaN or infinite value of a key that the mask hides from some rows of a tile
# would otherwise reach them through $0 \cdot \mathrm{NaN}$; it recomputes the block keeping such values to the
# rows that see them, as the reference does.)

# %%
excerpt("kv = (k_base, v_base, stride_kn", "bounds, RERUN, CFG)", after="def _attn_fwd_kernel")

# %% [markdown]
# Inside the helper, the stage becomes the loop's range and its compile-time switches:

# %%
excerpt("MASKED: tl.constexpr = STAGE == LEAD", "lo, hi = full_hi, hi", after="def _attn_fwd_tiles")

# %% [markdown]
# **One tile: scores, mask, online softmax update.** The first product gives a `[BLOCK_M, BLOCK_N]` tile of
# scores, scaled into log2 units, with soft-capping (lesson 1, section 5) or a position bias applied here when
# enabled. Only the masked instantiation compares positions: keys past the sequence end, right of the
# (bottom-right) diagonal plus `window_right`, or left of the window. Then section 2's update in the kernel's
# words: `m_i`, `l_i`, `acc` are $m$, $\ell$, $a$ for the `BLOCK_M` rows and `alpha` rescales. There is no
# $-\infty$ guard: $m$ starts at $-$FLT_MAX instead of $-\infty$, so a row that has seen no visible key yet (or
# only scores of $-\infty$) gets $p = 2^{-\infty} = 0$, never $2^{-\infty + \infty}$. On unmasked tiles without a
# soft cap (`PLAIN`, the bulk of the work), the row max is taken over the raw products and the scale moves into the
# exponent, `exp2(qk·scale − m)`: one fused multiply-add per score instead of a multiply and a subtract. A bias
# keeps this form when it can be split into a per-key vector in raw-product units, added before the max, and
# one value per row folded into the max and the exponent: ALiBi's `slope·(j − i)` splits that way, and so does
# the T5 table beyond `max_distance` (lessons 06 and 08).
#
# Both products accumulate in fp32: `tl.dot(q, tl.trans(k))` returns fp32 scores from 16-bit inputs, and
# `tl.dot(p, v, acc)` adds into the fp32 `acc`. TensorRT-LLM's `context_fmha_type=enabled_with_fp32_acc` asks for
# fp32 accumulation of the first product; in `attn` it is always on, so there is no separate mode. `p` is cast
# to V's type before the second product so that it runs on the tensor cores.

# %%
excerpt("# [BLOCK_M, BLOCK_N], already in log2 units", "m_i = m_new")

# %% [markdown]
# **The epilogue.** One division per row instead of one per score, then the store, which is masked so that a
# packed sequence's last block does not write into the next sequence's rows. Rows that saw no key have
# $\ell = 0$ and output zeros and $\operatorname{lse} = -\infty$. A row that saw a NaN score has a NaN $\ell$, and
# the test is $\ell \ne 0$ rather than $\ell > 0$ so that the NaN reaches its output, as in the reference.
# The lse is converted back from log2 units.

# %%
excerpt("has_key = (l_i != 0.0) & row_valid", "tl.store(lse_base", after="def _attn_fwd_kernel")

# %% [markdown]
# ## 7. Live parity check
#
# Each time these docs are built, both Triton paths run on fresh random inputs and are compared with the
# reference. The rule is lesson 1's, after FlashAttention's tests: measure against the exact answer (the
# reference in float64), and allow the kernel twice the error of PyTorch computing in the kernel's own
# precision, plus a hair for float32's last bits. The unfused path gets three times: it rounds every
# *normalized* probability to 16 bits before $P\cdot V$, the largest of each row included, which the fused kernel
# keeps exact (it is $2^0 = 1$ there, before the division by $\ell$). Over a handful of seeds we saw its error
# reach twice PyTorch's, where the fused kernel's stayed below 1.8 times.

# %%
device = "cuda" if torch.cuda.is_available() else "cpu"


def check(name, fn, q, k, v, ratio, **kw):
    exact, exact_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    same_precision = reference.attention(q, k, v, **kw)
    out, lse = fn(q, k, v, return_lse=True, **kw)
    err = maxdiff(out, exact)
    budget = ratio * maxdiff(same_precision, exact) + 1e-5
    # rows that see no key have lse = -inf on both sides, and -inf - -inf is NaN
    err_lse = torch.where(lse.double() == exact_lse, 0.0, lse.double() - exact_lse).abs().max().item()
    path = fn.__module__.split(".")[-1]
    print(f"{path:9s} {str(q.dtype)[6:]:8s} {name:24s} err {err:.1e} <= {budget:.1e}   lse err {err_lse:.1e}")
    assert out.dtype == q.dtype and err <= budget and err_lse < 1e-4, name


cases = [
    ("GQA, causal", dict(hq=4, hkv=2, sq=40, sk=40), dict(causal=True)),
    ("MQA, causal chunk", dict(hq=4, hkv=1, sq=13, sk=45), dict(causal=True)),
    ("MHA, window (9, 0)", dict(hq=2, hkv=2, sq=37, sk=37), dict(window_size=(9, 0))),
    ("Sq > Sk, causal", dict(hq=2, hkv=1, sq=30, sk=20), dict(causal=True)),
]
# bfloat16 only on a GPU: the CPU interpreter cannot do bfloat16 arithmetic
dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
for fn, ratio in ((attn.fast.attention, 2), (attn.fast.attention_unfused, 3)):
    for dtype in dtypes:
        for name, n, kw in cases:
            q = torch.randn(2, n["sq"], n["hq"], D, dtype=dtype, device=device)
            k = torch.randn(2, n["sk"], n["hkv"], D, dtype=dtype, device=device)
            v = torch.randn(2, n["sk"], n["hkv"], D, dtype=dtype, device=device)
            check(name, fn, q, k, v, ratio, **kw)

# %% [markdown]
# ## 8. How far from cuDNN, and where the time goes
#
# The fused kernel beats FlashAttention-2 by 1.30-1.50× and FlexAttention by 1.02-1.26× on the H200, but
# cuDNN's kernel (what SDPA's cuDNN backend runs) is faster still: ours is at 0.74-0.95× of its speed
# (`docs/benchmarks.md`). Timing alone cannot say why. Nsight Compute can: it replays one kernel launch many
# times and reads the hardware counters of every SM. `bench/probes/ncu_profile.sh` profiles one call of each
# kernel, and `bench/probes/ncu_summary.py` puts the counters side by side. The files below are its output from the
# H200, for a short-sequence shape (B16 H32 S1024 causal) and a long one (B4 H32 S4096 causal).

# %%
NCU = _figures.result_path("ncu_H200_2026-11-29")


def ncu_table(name):
    """{metric: (ours, cudnn)} from a summary written by bench/probes/ncu_summary.py."""
    table = {}
    for line in (NCU / name).read_text().splitlines()[1:]:
        parts = line.split()
        try:
            table[parts[0]] = (float(parts[1].replace(",", "")), float(parts[2].replace(",", "")))
        except (IndexError, ValueError):
            pass  # the kernel-name row, and cells that are not numbers
    return table


NCU_ROWS = {
    "kernel time (µs)": ("gpu__time_duration.sum", 1.0),
    "tensor pipe busy (%)": ("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active", 1.0),
    "issue slots used (%)": ("smsp__issue_active.avg.pct_of_peak_sustained_active", 1.0),
    "instructions (M)": ("smsp__inst_executed.sum", 1e-6),
    "load/store instructions (% of peak)": ("sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active", 1.0),
    "DRAM bytes read (MB)": ("dram__bytes_read.sum", 1.0),
}
shapes = {"B16 S1024": ncu_table("summary_prefill.txt"), "B4 S4096": ncu_table("summary_prefill_long.txt")}
print(f"{'counter':38s}" + "".join(f"{s + ': ours':>18s}{'cuDNN':>9s}" for s in shapes))
for label, (metric, unit) in NCU_ROWS.items():
    print(f"{label:38s}" + "".join(f"{t[metric][0] * unit:18.1f}{t[metric][1] * unit:9.1f}" for t in shapes.values()))

fig, ax = plt.subplots(figsize=(8, 3.4))
bars = ["tensor pipe busy (%)", "issue slots used (%)"]
for i, t in enumerate(shapes.values()):
    for j, label in enumerate(bars):
        metric = NCU_ROWS[label][0]
        x = i * 3 + j
        ax.bar(x - 0.2, t[metric][0], 0.4, color="#3d7ea6", label="ours" if x == 0 else None)
        ax.bar(x + 0.2, t[metric][1], 0.4, color="#888888", label="cuDNN" if x == 0 else None)
ax.set_xticks([0, 1, 3, 4], [f"{s}\n{b.split(' (')[0]}" for s in shapes for b in bars], fontsize=8)
ax.set_ylabel("% of peak")
ax.set_title("H200, Nsight Compute: the tensor cores wait more in our kernel", fontsize=10)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# Both kernels read the same bytes from memory, and neither is near a memory limit. The difference is how
# much of the time the tensor cores are busy: 37% against 59% at S1024, 49% against 69% at S4096, about the
# ratio of the times. The counters also say why they wait:
#
# - **Short sequences:** the autotuner picks 64-row tiles with one warpgroup (4 warps) per program, and each
#   program copies its K/V tiles from memory with per-thread asynchronous copies. Each K/V tile is loaded once
#   per 64 rows, and every thread issues its share of the copy: 1.56× cuDNN's instructions, 8× its load/store
#   instructions. cuDNN keeps one persistent program of three warpgroups per SM and loads through TMA, one
#   instruction per tile.
# - **Long sequences:** with 128-row tiles the instruction counts are close (1.07×), yet our warps issue an
#   instruction on 31% of the cycles against 41%. They stall on full memory-instruction queues and on the
#   barriers that guard the shared-memory ring of K/V tiles.
#
# The remedy is FlashAttention-3's structure, which cuDNN's kernel resembles: one producer warp issues TMA
# loads into a ring of shared-memory buffers guarded by barriers, and two consumer warpgroups take turns
# ("ping-pong"), so that one's softmax runs while the other's matrix products occupy the tensor cores. Plain
# `tl.*` Triton does not let a kernel say which warps do what; TMA alone changed nothing here, and Triton's
# automatic warp specialization does not compile this loop. Triton's lower-level Gluon dialect does expose
# warpgroups, barriers and TMA: that is where the rest of the gap would be closed.

# %% [markdown]
# ## Summary
#
# - The unfused path (`context_fmha_type=disabled`; `attention_unfused` here) writes an fp32 score matrix of
#   $B \cdot H_q \cdot S_q \cdot S_k$ elements: quadratic in length, 8 GiB at $B=4$, $H_q=32$, $S=4096$, and
#   several times slower than fusion on an H200 because it is memory-bound.
# - The online softmax keeps, per row, a running max $m$, a denominator $\ell$ and an accumulator $a$, rescaling
#   both by $\alpha = e^{m - m'}$ when the max grows; $o = a/\ell$ and $\operatorname{lse} = m + \ln\ell$ at the
#   end. The kernel works in base 2 with $\log_2 e$ folded into the scale, and guards $m = -\infty$ so that
#   rows with no visible key give zeros and $\operatorname{lse} = -\infty$ instead of NaN.
# - Each row block splits its keys into masked / unmasked / masked ranges and never visits tiles nobody sees;
#   causal attention visits about half the tiles, and an H200 runs it in about 0.54 of the full time.
# - Measured: the unfused paths allocate $\propto S^2$, the fused kernel only its output (and lse).
# - Packed batches avoid padding (50% of rows, 64% of an unfused score buffer for the benchmark's batch), and
#   the fused kernel gives bit-identical results in both layouts.
# - Against cuDNN the gap is measured, not guessed: Nsight Compute shows our tensor cores busy 37-49% of the
#   time against 59-69%, from more load instructions at short lengths and stalls on load queues and barriers at
#   long ones; closing it takes warp specialization that plain Triton does not expose.
