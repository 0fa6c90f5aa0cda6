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
# # Attention from scratch
#
# This lesson builds the attention of a decoder-only LLM one idea at a time, checking every step against
# `attn.reference.attention`, the library's definition of "correct", and ends by checking the fused Triton
# kernel `attn.fast.attention` against it. Everything runs on a CPU in well under a minute: without a GPU,
# importing `attn.fast` makes Triton run its kernels in an interpreter, so the shapes here stay tiny.
#
# What we cover, in order:
#
# 1. one head of attention, and why the scores are divided by $\sqrt{D}$;
# 2. many heads: MHA, MQA and GQA, and how GQA shares K/V heads without copying them;
# 3. TensorRT-LLM's `q_scaling`;
# 4. masks: causal attention aligned bottom-right (ours) or top-left (PyTorch SDPA), sliding windows;
# 5. soft-capping of the scores;
# 6. padded and packed batches;
# 7. the unfused and the fused computation, and a live parity check of the Triton kernel.

# %%
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import attn
from attn import layout, reference

torch.manual_seed(0)
torch.set_printoptions(precision=4, sci_mode=False)


def maxdiff(a, b):
    """Largest absolute difference, taken in float64 so the comparison adds no rounding of its own."""
    return (a.double() - b.double()).abs().max().item()


# %% [markdown]
# ## 1. One head
#
# A head receives, for each of $S_q$ query tokens, a query vector $q_i \in \mathbb{R}^D$, and for each of
# $S_k$ key tokens a key $k_j$ and a value $v_j$. Query $i$ scores every key with a dot product, turns the
# scores into weights with a softmax, and returns the weighted average of the values:
#
# $$s_{ij} = \tau \, q_i \cdot k_j, \qquad p_{ij} = \frac{e^{s_{ij}}}{\sum_{j'} e^{s_{ij'}}}, \qquad
# o_i = \sum_j p_{ij} \, v_j .$$
#
# In matrix form, $O = \operatorname{softmax}(\tau\, Q K^\top)\, V$, with the softmax taken along each row.
# The output has one row per query, and each row is a convex combination of value vectors.
#
# **Why $\tau = 1/\sqrt{D}$.** Suppose the entries of $q$ and $k$ are independent with mean 0 and variance 1
# (roughly what normalized activations look like). Each product $q_d k_d$ then has mean 0 and variance 1, and
# the dot product is a sum of $D$ of them, so $\operatorname{Var}(q\cdot k) = D$: its typical size grows like
# $\sqrt{D}$. Feed scores that large into a softmax and it saturates: almost all the weight lands on one key,
# and the gradient through the other keys vanishes. Dividing by $\sqrt{D}$ brings the variance back to 1,
# whatever the head size. Let us check both claims numerically.

# %%
for d in (16, 64, 256):
    q1, k1 = torch.randn(4096, d), torch.randn(4096, 64, d)
    raw = torch.einsum("nd,njd->nj", q1, k1)
    top_raw = raw.softmax(-1).max(-1).values.mean()
    top_scaled = (raw / math.sqrt(d)).softmax(-1).max(-1).values.mean()
    print(
        f"D={d:3d}: std(q.k) {raw.std():5.2f}, sqrt(D) {d**0.5:5.2f}; top weight {top_raw:.2f}, scaled {top_scaled:.2f}"
    )


# %% [markdown]
# The "top weight" is the largest of the 64 softmax weights, averaged over queries. Unscaled, it approaches 1
# as $D$ grows: attention degenerates into picking one key. Scaled, the weights stay spread in the same way at
# every head size.
#
# Here is a single head written directly from the formula. It is the whole idea; everything after this is
# bookkeeping (heads, masks, batches) or speed.


# %%
def one_head(q, k, v, scale):
    """q [Sq, D], k and v [Sk, D] -> [Sq, D]."""
    s = scale * q @ k.T  # [Sq, Sk]
    p = s.softmax(dim=-1)  # each row sums to 1
    return p @ v  # [Sq, D]


# %% [markdown]
# ## 2. Many heads: MHA, MQA, GQA
#
# A layer runs $H_q$ heads side by side, each with its own slice of the projections, so each sees a different
# "view" of the tokens. We use FlashAttention's layout: a padded batch is `q [B, Sq, Hq, D]` and
# `k, v [B, Sk, Hkv, D]`, heads next to the head dimension.
#
# - **MHA** (multi-head attention): every query head has its own key/value head, $H_{kv} = H_q$.
# - **MQA** (multi-query attention): all query heads share a single key/value head, $H_{kv} = 1$.
# - **GQA** (grouped-query attention): in between. The $H_q$ query heads form $H_{kv}$ groups of
#   $G = H_q / H_{kv}$ consecutive heads, and query head $h$ reads key/value head $\lfloor h / G \rfloor$.
#
# Why bother: during generation the keys and values of every past token are kept in the KV cache, and reading
# that cache is what limits decoding speed. Its size is proportional to $H_{kv}$. For a Llama-3-8B-like model
# (32 layers, $H_q = 32$, $H_{kv} = 8$, $D = 128$, 16-bit numbers):

# %%
layers, hq_llama, hkv_llama, d_llama, tokens = 32, 32, 8, 128, 8192
for name, hkv_ in (("MHA", hq_llama), ("GQA", hkv_llama), ("MQA", 1)):
    per_token = 2 * layers * hkv_ * d_llama * 2  # K and V, 2 bytes each
    print(f"{name}: {per_token / 1024:5.0f} KiB per token, {per_token * tokens / 2**30:5.2f} GiB for {tokens} tokens")

# %% [markdown]
# The loop below is a literal reading of the definition: for every batch element and query head, pick that
# head's key/value head and call `one_head`. It is slow, but nobody can doubt it, so we compare the library's
# reference against it, for MHA, GQA and MQA.


# %%
def attention_by_loops(q, k, v):
    b, _, hq, d = q.shape
    group = hq // k.shape[2]
    out = torch.empty_like(q)
    for bi in range(b):
        for h in range(hq):
            kv = h // group
            out[bi, :, h] = one_head(q[bi, :, h], k[bi, :, kv], v[bi, :, kv], 1 / math.sqrt(d))
    return out


B, S, D = 2, 10, 32
for hq, hkv in ((4, 4), (4, 2), (4, 1)):
    q = torch.randn(B, S, hq, D)
    k, v = torch.randn(B, S, hkv, D), torch.randn(B, S, hkv, D)
    err = maxdiff(attention_by_loops(q, k, v), reference.attention(q, k, v))
    print(f"Hq={hq} Hkv={hkv}: max |loops - reference| = {err:.1e}")
    assert err < 1e-5

# %% [markdown]
# ### GQA without copying K and V
#
# The easy way to implement GQA is to copy each key/value head $G$ times (`repeat_interleave` along the head
# axis) and then run plain MHA. It gives the right answer but allocates $G$ times the K/V memory on every
# call, which throws away exactly the saving GQA was designed for.
#
# Instead, view the query heads as a grid `[Hkv, G]`: head $h$ becomes the pair $(h // G,\ h \bmod G)$, the
# same grouping as above. A reshape of `q` is free (it changes strides, not data), and one `einsum` contracts
# each group of queries against its own K/V head, broadcasting over the group axis:

# %%
hq, hkv = 4, 2
group = hq // hkv
q = torch.randn(B, S, hq, D)
k, v = torch.randn(B, S, hkv, D), torch.randn(B, S, hkv, D)

qg = q.view(B, S, hkv, group, D)  # a view: no data moved
s = torch.einsum("bihgd,bjhd->bhgij", qg, k) / math.sqrt(D)  # [B, Hkv, G, Sq, Sk]
o = torch.einsum("bhgij,bjhd->bihgd", s.softmax(-1), v).reshape(B, S, hq, D)
print(f"grouped einsum vs reference: {maxdiff(o, reference.attention(q, k, v)):.1e}")

k_copied = k.repeat_interleave(group, dim=2)  # the wasteful way: [B, S, Hq, D]
print("K bytes: shared", k.untyped_storage().nbytes(), "copied", k_copied.untyped_storage().nbytes())

# %% [markdown]
# One trap: `k.repeat(1, 1, G, 1)` also produces `Hq` heads, but in the order $0, 1, 0, 1, \dots$, so query
# head $h$ would read K/V head $h \bmod H_{kv}$ instead of $\lfloor h/G \rfloor$. With random weights nothing
# looks wrong; with a real checkpoint the model outputs nonsense. The comparison makes the difference visible:

# %%
wrong = attention_by_loops(q, k.repeat(1, 1, group, 1), v.repeat(1, 1, group, 1))
right = attention_by_loops(q, k_copied, v.repeat_interleave(group, dim=2))
print(f"repeat_interleave vs reference:    {maxdiff(right, reference.attention(q, k, v)):.1e}")
print(f"repeat (wrong order) vs reference: {maxdiff(wrong, reference.attention(q, k, v)):.1e}")

# %% [markdown]
# ## 3. The scale and TensorRT-LLM's `q_scaling`
#
# `softmax_scale` is $\tau$ and defaults to $1/\sqrt{D}$. TensorRT-LLM describes the scale by a divisor
# instead, `q_scaling`, with $\tau = \dfrac{1}{q_\text{scaling}\,\sqrt{D}}$; `attn` accepts both and
# multiplies them: $\tau = \texttt{softmax_scale} / \texttt{q_scaling}$.
#
# T5 is the model where this matters: it was trained with no $1/\sqrt{D}$ at all (the scale was folded into
# the initialization of the query projection), so it needs $\tau = 1$, that is $q_\text{scaling} = 1/\sqrt{D}$.

# %%
q, k, v = torch.randn(B, S, 4, D), torch.randn(B, S, 2, D), torch.randn(B, S, 2, D)
t5 = reference.attention(q, k, v, q_scaling=1 / math.sqrt(D))
unit = reference.attention(q, k, v, softmax_scale=1.0)
print(f"q_scaling=1/sqrt(D) vs softmax_scale=1: {maxdiff(t5, unit):.1e}")

# %% [markdown]
# ## 4. Masks
#
# A mask decides which keys each query may see; the masked scores are set to $-\infty$ before the softmax, so
# they get weight exactly 0. `attn.reference.attention_mask(Sq, Sk, ...)` returns the boolean mask `[Sq, Sk]`
# (True = visible) for the options the kernels support. A small helper draws masks the way
# [attention-gym](https://github.com/pytorch-labs/attention-gym) does, on a toy grid: rows are queries,
# columns are keys, dark cells are visible.


# %%
def show_masks(masks):
    fig, axes = plt.subplots(1, len(masks), figsize=(3.2 * len(masks), 3.6))
    for ax, (title, m) in zip(axes, masks.items()):
        ax.imshow(m.numpy(), cmap="Blues", vmin=-0.3, vmax=1.2)
        ax.set_xticks(torch.arange(-0.5, m.shape[1]).tolist(), minor=True)
        ax.set_yticks(torch.arange(-0.5, m.shape[0]).tolist(), minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(which="both", length=0, labelsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    fig.tight_layout()


# %% [markdown]
# ### Causal, and where its diagonal goes when $S_q \ne S_k$
#
# In a decoder, token $t$ may only look at tokens $\le t$. When queries and keys are the same tokens
# ($S_q = S_k$) the mask is the lower triangle, $j \le i$, and there is nothing to discuss.
#
# But during inference they often differ. While generating, one new token ($S_q = 1$) attends to the whole
# cache ($S_k$ = all tokens so far). In chunked prefill, a chunk of $S_q$ new tokens attends to the $S_k - S_q$
# cached tokens before it plus itself. In both cases **the queries are the last $S_q$ tokens** of the
# sequence, so query $i$ sits at absolute position $i + S_k - S_q$, and the causal rule becomes
#
# $$\text{key } j \text{ is visible to query } i \iff j \le i + S_k - S_q .$$
#
# The diagonal is anchored at the bottom-right corner: the last query sees every key. This is the convention
# of FlashAttention (since 2.1), TensorRT-LLM and vLLM, and the one `attn` uses.
#
# PyTorch's `scaled_dot_product_attention(..., is_causal=True)` anchors it at the top-left instead, $j \le i$,
# as if the queries were the *first* $S_q$ tokens. The two agree only when $S_q = S_k$. With $S_q = 4$,
# $S_k = 12$:

# %%
sq, sk = 4, 12
bottom_right = reference.attention_mask(sq, sk, causal=True)
top_left = torch.ones(sq, sk).tril().bool()
show_masks(
    {
        "causal, Sq = Sk = 12": reference.attention_mask(12, 12, causal=True),
        "causal, Sq=4, Sk=12\nbottom-right (attn, FA, TRT)": bottom_right,
        "causal, Sq=4, Sk=12\ntop-left (SDPA is_causal)": top_left,
    }
)

# %% [markdown]
# Let us confirm that `attn`'s causal attention is SDPA with the bottom-right mask passed explicitly, and not
# SDPA's own `is_causal` once $S_q \ne S_k$. SDPA wants heads before the sequence axis (`[B, H, S, D]`), and
# `enable_gqa=True` for $H_{kv} < H_q$.


# %%
def sdpa(q, k, v, **kw):
    # SDPA wants [B, H, S, D]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw).transpose(1, 2)


q, k, v = torch.randn(B, sq, 4, D), torch.randn(B, sk, 2, D), torch.randn(B, sk, 2, D)
ours = reference.attention(q, k, v, causal=True)
err_mask = maxdiff(ours, sdpa(q, k, v, attn_mask=bottom_right))
err_is_causal = maxdiff(ours, sdpa(q, k, v, is_causal=True))
print(f"vs SDPA with the bottom-right mask: {err_mask:.1e}")
print(f"vs SDPA is_causal=True (top-left):  {err_is_causal:.1e}   <- a different function")
assert err_mask < 1e-5 and err_is_causal > 1e-2

q, k, v = torch.randn(B, 12, 4, D), torch.randn(B, 12, 2, D), torch.randn(B, 12, 2, D)
err_square = maxdiff(reference.attention(q, k, v, causal=True), sdpa(q, k, v, is_causal=True))
print(f"Sq = Sk: vs SDPA is_causal=True: {err_square:.1e}")
assert err_square < 1e-5

# %% [markdown]
# When $S_q > S_k$, the bottom-right rule leaves the first $S_q - S_k$ queries with no visible key at all.
# Their softmax would be $0/0$. `attn` defines such rows to output zeros (and a log-sum-exp of $-\infty$)
# instead of NaN, the convention of FlashAttention's reference code.

# %%
q, k, v = torch.randn(1, 6, 1, D), torch.randn(1, 4, 1, D), torch.randn(1, 4, 1, D)
out, lse = reference.attention(q, k, v, causal=True, return_lse=True)
print("visible keys per query:", reference.attention_mask(6, 4, causal=True).sum(-1).tolist())
print("row norms of the output:", out[0, :, 0].norm(dim=-1))
print("lse:", lse[0, 0])

# %% [markdown]
# ### Sliding windows
#
# Mistral-style local attention lets each query see only the most recent keys. `window_size = (left, right)`
# keeps key $j$ iff $i' - \text{left} \le j \le i' + \text{right}$, where $i' = i + S_k - S_q$ is the query's
# position on the same bottom-right diagonal; $-1$ means unbounded on that side. Causal attention is the window
# $(-1, 0)$. TensorRT-LLM's `max_attention_window_size = N` (each token sees itself and the $N-1$ before it)
# is `window_size = (N - 1, 0)`.

# %%
show_masks(
    {
        "window (3, 0): TRT window N=4": reference.attention_mask(12, 12, window_size=(3, 0)),
        "window (2, 2): local, both sides": reference.attention_mask(12, 12, window_size=(2, 2)),
        "window (3, 0), Sq=4, Sk=12": reference.attention_mask(4, 12, window_size=(3, 0)),
    }
)

# %% [markdown]
# ## 5. Soft-capping
#
# Gemma-2 bounds its attention scores smoothly instead of letting them grow: after scaling, each score becomes
#
# $$s \leftarrow c \, \tanh(s / c),$$
#
# which is close to $s$ while $|s| \ll c$ and never leaves $(-c, c)$ (TensorRT-LLM's
# `attn_logit_softcapping_scale`). Below, the library's `softcap` against the formula written out by hand:

# %%
cap = 5.0
q, k, v = torch.randn(1, 8, 1, D) * 3, torch.randn(1, 8, 1, D) * 3, torch.randn(1, 8, 1, D)
s = (q[0, :, 0] @ k[0, :, 0].T) / math.sqrt(D)
by_hand = (cap * torch.tanh(s / cap)).softmax(-1) @ v[0, :, 0]
capped = cap * torch.tanh(s / cap)
print(f"largest |score|: {s.abs().max():.2f} before capping, {capped.abs().max():.2f} after")
print(f"softcap vs by hand: {maxdiff(reference.attention(q, k, v, softcap=cap)[0, :, 0], by_hand):.1e}")

# %% [markdown]
# ## 6. Padded and packed batches
#
# Real batches hold sequences of different lengths. There are two ways to store them.
#
# **Padded**: `[B, max_len, H, D]`, each sequence followed by filler, with its true length in `seqlens [B]`.
# Simple, but memory and work grow with $B \cdot \max_b S_b$, and one long request makes every row long.
#
# **Packed** ("varlen"): concatenate the sequences into `[T, H, D]` with $T = \sum_b S_b$, and describe where
# each starts with `cu_seqlens`, the int32 prefix sums of the lengths, `[B+1]` starting at 0: sequence $b$
# occupies rows `cu_seqlens[b]:cu_seqlens[b+1]`. No filler at all; this is what FlashAttention's varlen
# functions and TensorRT-LLM's packed mode take, and what `attn` recommends.
#
# Causal masks are aligned per sequence, on each sequence's own $S_q$ and $S_k$, never on the padded length.
# `attn.layout` converts between the two forms.

# %%
lengths = torch.tensor([5, 12, 3], dtype=torch.int32)
q_pad = torch.randn(3, 12, 4, D)
k_pad, v_pad = torch.randn(3, 12, 2, D), torch.randn(3, 12, 2, D)

q_packed, cu_seqlens, max_seqlen = layout.unpad(q_pad, lengths)
k_packed, _, _ = layout.unpad(k_pad, lengths)
v_packed, _, _ = layout.unpad(v_pad, lengths)
print("cu_seqlens:", cu_seqlens.tolist(), " max_seqlen:", max_seqlen)
print(f"padded q holds {q_pad.shape[0] * q_pad.shape[1]} token rows, packed q holds {q_packed.shape[0]}")

out_pad = reference.attention(q_pad, k_pad, v_pad, seqlens_q=lengths, seqlens_k=lengths, causal=True)
out_packed = reference.attention(
    q_packed, k_packed, v_packed,
    cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, causal=True,
)  # fmt: skip
back = layout.pad(out_packed, cu_seqlens, max_seqlen)
print(f"padded vs packed: {maxdiff(back, out_pad):.1e}")
print("padding rows of the padded output are zero:", bool((out_pad[0, 5:] == 0).all()))

# %% [markdown]
# ## 7. Unfused, fused, and a live check of the Triton kernel
#
# Everything so far materializes the score matrix $S = \tau Q K^\top$, `[B, Hq, Sq, Sk]`, then the
# probabilities $P$ of the same size, then $PV$. That is TensorRT-LLM's *unfused* context path
# (`context_fmha_type=disabled`), `attn.reference.attention_unfused` here, and it works. Its cost is memory
# traffic: for one sequence of 8192 tokens with 32 heads, $S$ alone in fp32 is
# $32 \cdot 8192^2 \cdot 4$ bytes $= 8$ GiB, written once and read back, only to be reduced to an output
# $S_k/D$ times smaller.
#
# The *fused* kernel (`attn.fast.attention`, also exported as `attn.attention`) never writes $S$: it streams
# tiles of K and V through on-chip memory and keeps, for each query row, a running maximum, a running softmax
# denominator and a running weighted sum (the "online softmax" of FlashAttention). Later lessons derive it.
# Here we only need its contract: same signature, same answer.
#
# Every time these docs are built, the cell below runs the Triton kernel on fresh random inputs and compares it
# to the reference. If the kernel is wrong, the assertion fails and so does the docs build.
#
# How close is close enough? Both are rounded, so we measure each against the exact answer (the reference
# computed in float64) and use FlashAttention's rule: the kernel may be at most twice as far from it as
# PyTorch computing in the kernel's own precision, plus a hair for float32's last bits.


# %%
unfused_err = maxdiff(reference.attention_unfused(q, k, v), reference.attention(q, k, v))
print(f"reference: unfused vs fused definition: {unfused_err:.1e}")


# %%
# on a GPU the kernel runs for real and needs its inputs there; on a CPU, the interpreter reads ordinary tensors
device = "cuda" if torch.cuda.is_available() else "cpu"


def check(name, q, k, v, **kw):
    exact, exact_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    same_precision = reference.attention(q, k, v, **kw)
    out, lse = attn.fast.attention(q, k, v, return_lse=True, **kw)
    err = maxdiff(out, exact)
    budget = 2 * maxdiff(same_precision, exact) + 1e-5
    # rows that see no key have lse = -inf on both sides, and -inf - -inf is NaN
    err_lse = torch.where(lse.double() == exact_lse, 0.0, lse.double() - exact_lse).abs().max().item()
    print(f"{str(q.dtype)[6:]:8s} {name:29s} err {err:.1e} <= {budget:.1e}   lse err {err_lse:.1e}")
    assert out.dtype == q.dtype and err <= budget and err_lse < 1e-4, name


cases = [
    ("MHA", dict(hq=4, hkv=4, sq=48, sk=48), {}),
    ("GQA, causal, Sq < Sk", dict(hq=4, hkv=2, sq=17, sk=50), dict(causal=True)),
    ("MQA, window (8, 0)", dict(hq=4, hkv=1, sq=40, sk=40), dict(window_size=(8, 0))),
    ("GQA, softcap 20, q_scaling 2", dict(hq=4, hkv=2, sq=33, sk=33), dict(softcap=20.0, q_scaling=2.0)),
]
# bfloat16 only on a GPU: the CPU interpreter cannot do bfloat16 arithmetic
dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
for dtype in dtypes:
    for name, n, kw in cases:
        q = torch.randn(2, n["sq"], n["hq"], D, dtype=dtype, device=device)
        k = torch.randn(2, n["sk"], n["hkv"], D, dtype=dtype, device=device)
        v = torch.randn(2, n["sk"], n["hkv"], D, dtype=dtype, device=device)
        check(name, q, k, v, **kw)

# %% [markdown]
# And a packed batch of ragged lengths, with an empty sequence and a query chunk shorter than its keys:

# %%
lens_q = torch.tensor([7, 0, 19, 3], dtype=torch.int32, device=device)
lens_k = torch.tensor([7, 5, 30, 11], dtype=torch.int32, device=device)
q = torch.randn(int(lens_q.sum()), 4, D, device=device)
k = torch.randn(int(lens_k.sum()), 2, D, device=device)
v = torch.randn(int(lens_k.sum()), 2, D, device=device)
packed = dict(
    cu_seqlens_q=layout.cu_seqlens_from_lengths(lens_q),
    cu_seqlens_k=layout.cu_seqlens_from_lengths(lens_k),
    max_seqlen_q=int(lens_q.max()),
    max_seqlen_k=int(lens_k.max()),
)
check("packed, causal", q, k, v, causal=True, **packed)

# %% [markdown]
# ## Summary
#
# - Attention is $\operatorname{softmax}(\tau QK^\top)V$ per head; $\tau = 1/\sqrt{D}$ keeps the score variance
#   at 1 whatever the head size. TensorRT-LLM's `q_scaling` divides $\tau$ (T5: $q_\text{scaling} = 1/\sqrt{D}$).
# - GQA: query head $h$ reads K/V head $\lfloor h / G \rfloor$. View queries as `[Hkv, G]` and broadcast;
#   never copy K/V, and never use `repeat` (wrong order).
# - Causal masks for $S_q \ne S_k$ are aligned bottom-right: $j \le i + S_k - S_q$. SDPA's `is_causal` is
#   top-left; pass an explicit mask to SDPA when comparing. Rows that see no key output zeros.
# - Sliding windows are `(left, right)` around the same diagonal; soft-capping is $c \tanh(s/c)$ after scaling.
# - Packed batches (`[T, H, D]` + `cu_seqlens`) carry no padding and are what the kernels prefer.
