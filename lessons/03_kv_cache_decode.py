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
# # The KV cache and the generation phase
#
# An LLM serves a request in two phases. The **context phase** (prefill) runs the whole prompt through the
# model at once; that is the attention of lesson 01, many queries against many keys. The **generation phase**
# (decode) then produces the answer one token at a time: each step feeds the newest token through the model,
# and in every layer that token's query attends to the keys and values of every token before it.
#
# This lesson is about the second phase:
#
# 1. why the keys and values are cached, and what the cache costs in memory;
# 2. what one decode step reads and computes, and why that makes decode *memory-bound*;
# 3. a roofline of our kernels, with points measured on an H200;
# 4. GQA packing, the trick that lets one program read each K/V tile once for a whole group of heads;
# 5. `attn.fast.decode` live, checked against `attn.reference.decode`;
# 6. one decode step is the last row of a causal prefill; a small generation loop proves the cache exact;
# 7. honest speed notes from the H200 benchmark files.
#
# As in lesson 01, the Triton kernels run in Triton's CPU interpreter when there is no GPU, so every live
# shape here is tiny. The speed numbers come from result files measured on an H200, not from your machine.

# %%
import inspect
import re

import _figures
import matplotlib.pyplot as plt
import torch

import attn
from attn import reference

torch.manual_seed(0)
torch.set_printoptions(precision=4, sci_mode=False)

# on a GPU the kernels run for real and need their inputs there; on a CPU the interpreter reads ordinary tensors
device = "cuda" if torch.cuda.is_available() else "cpu"


def maxdiff(a, b):
    """Largest absolute difference, taken in float64 so the comparison adds no rounding of its own."""
    return (a.double() - b.double()).abs().max().item()


# %% [markdown]
# ## 1. Why cache K and V
#
# In a decoder every layer is causal: the hidden state of token $j$ depends only on tokens $\le j$. So the key
# and value that token $j$ produces in layer $\ell$, $k_j^{(\ell)} = W_K^{(\ell)} x_j^{(\ell)}$ and
# $v_j^{(\ell)} = W_V^{(\ell)} x_j^{(\ell)}$ (with RoPE applied at its fixed position $j$), never change once
# computed, however many tokens come after it. Generating token $t+1$ needs the keys and values of tokens
# $1..t$ in every layer; they are the same numbers the previous step already had.
#
# Two ways to produce them at step $t$:
#
# - **recompute**: run the model over all $t$ tokens again, about $2P$ FLOPs per token for a model of $P$
#   parameters, so $2Pt$ for the step and $\approx P T^2$ to generate $T$ tokens: quadratic in the length;
# - **cache**: keep every layer's $k_j, v_j$ in memory (the *KV cache*), run the model over the new token
#   only ($2P$ FLOPs), append its $k, v$, and let its query attend over the cache: linear in the length.
#
# Every serving engine caches; the price is memory. Per token the cache holds, in each layer, $H_{kv}$ keys
# and $H_{kv}$ values of $D$ numbers each: $2 \cdot n_\text{layers} \cdot H_{kv} \cdot D \cdot s$ bytes, with $s$
# bytes per number. A few model shapes in 16-bit numbers:

# %%
models = {
    # name: (layers, Hq, Hkv, D, parameters)
    "Llama-2-7B (MHA)": (32, 32, 32, 128, 6.7e9),
    "Llama-3-8B (GQA 32/8)": (32, 32, 8, 128, 8.0e9),
    "Llama-3-70B (GQA 64/8)": (80, 64, 8, 128, 70.6e9),
}
print(f"{'model':24s} {'KiB/token':>9s} {'GiB at 32k tokens':>18s} {'GiB for 64 x 4096':>18s}")
for name, (layers, _, hkv_m, d_m, _) in models.items():
    per_token = 2 * layers * hkv_m * d_m * 2
    print(f"{name:24s} {per_token / 1024:9.0f} {per_token * 32768 / 2**30:18.1f} {per_token * 64 * 4096 / 2**30:18.1f}")

# %% [markdown]
# And what the cache buys, for the Llama-3-8B shape generating $T = 8192$ tokens after an empty prompt
# (matrix FLOPs only, attention's own FLOPs left out because both ways do the same attention):

# %%
layers, hq_m, hkv_m, d_m, params = models["Llama-3-8B (GQA 32/8)"]
T = 8192
recompute = sum(2 * params * t for t in range(1, T + 1))
cached = 2 * params * T
cache_bytes = 2 * layers * hkv_m * d_m * 2 * T
print(f"recompute: {recompute:.1e} FLOPs  (~{recompute / 700e12 / 60:.0f} min at 700 TFLOP/s)")
print(f"cache:     {cached:.1e} FLOPs  (~{cached / 700e12:.2f} s),  {cache_bytes / 2**30:.1f} GiB of cache at the end")
print(f"ratio: {recompute / cached:.0f}x, that is (T + 1) / 2")

# %% [markdown]
# Four thousand times less arithmetic for one GiB of memory. The cache changes what limits generation,
# though: a step no longer computes much, it *reads* a lot (all the weights, and the whole cache of every
# sequence in the batch). The weights are shared by the batch; the cache is not, so with many sequences or long
# ones the cache reads dominate. Those reads are the attention kernel's job, and the subject of the rest of
# this lesson.
#
# ## 2. What one decode step reads and computes
#
# Take one layer and one sequence whose cache holds $L$ tokens (the new ones included), with $S_q$ new tokens
# ($S_q = 1$ for plain decoding, a few for speculative decoding, where a draft proposes several tokens and the
# model checks them in one step). The attention kernel must
#
# - **read** the cached keys and values: $2 \cdot L \cdot H_{kv} \cdot D \cdot s$ bytes (the queries and the
#   output, $S_q H_q D$ numbers each, are negligible next to it);
# - **compute** $QK^\top$ and $PV$, each $2 \cdot S_q \cdot H_q \cdot L \cdot D$ FLOPs: $4 S_q H_q L D$ in all
#   (the softmax's exponentials are a further $S_q H_q L$, small next to it).
#
# Their ratio is the step's **arithmetic intensity**, FLOPs per byte moved from memory:
#
# $$I = \frac{4\, S_q H_q L D}{2\, L H_{kv} D\, s} = \frac{2\, S_q\, G}{s}, \qquad G = H_q / H_{kv} .$$
#
# In 16-bit numbers ($s = 2$) this is just $I = S_q \cdot G$: **one** FLOP per byte for MHA, $G$ for GQA.
# $L$ and $D$ cancel: a longer cache is more bytes *and* proportionally more FLOPs, never a better ratio.
#
# That formula assumes each K/V byte leaves memory once and serves all $G$ query heads of its group. A kernel
# that runs one program per *query* head reads every K/V tile $G$ times; unless the re-reads hit in L2 (a long
# cache does not fit in the H200's 50 MB), its intensity falls back to $S_q$. Section 4 shows how our kernel
# earns the factor $G$.
#
# A GPU does both things at once, at its own peak rate for each. A kernel whose intensity is below
# $\text{peak FLOP/s} / \text{peak bytes/s}$, the **ridge point**, cannot use all its arithmetic: the memory
# finishes last. For the H200:

# %%
h200 = {
    "datasheet: 989 TFLOP/s dense bf16, 4.8 TB/s": (989e12, 4.8e12),
    "measured matmul 790 TFLOP/s, 4.8 TB/s": (790e12, 4.8e12),
    "measured matmul 687 TFLOP/s, copy 4.24 TB/s": (687e12, 4.24e12),
}
for name, (flops, bw) in h200.items():
    print(f"ridge point {flops / bw:5.0f} FLOP/B   ({name})")

print()
for name, sq, hq, hkv, s in [
    ("MHA, Sq=1", 1, 32, 32, 2),
    ("GQA 32/8, Sq=1 (Llama-3-8B)", 1, 32, 8, 2),
    ("GQA 64/8, Sq=1 (Llama-3-70B)", 1, 64, 8, 2),
    ("GQA 32/8, Sq=4 (speculative)", 4, 32, 8, 2),
    ("GQA 32/8, Sq=1, FP8 cache", 1, 32, 8, 1),
]:
    print(f"decode intensity {2 * sq * (hq // hkv) / s:5.0f} FLOP/B   ({name})")

# %% [markdown]
# The ridge point lies somewhere between 160 and 210 FLOP/B depending on which peaks you trust; decode
# attention sits at 1 to 16. Its arithmetic would fit in a few percent of the tensor cores' time, so its
# speed is set by one number, how fast it streams the cache. That is why decode kernels are judged in **TB/s of
# K and V read**, against the copy bandwidth, and not in TFLOP/s. (Prefill, with $S_q$ in the thousands, is at
# thousands of FLOP/B and the opposite holds.)
#
# ## 3. A roofline of our kernels, measured on an H200
#
# The roofline model draws the best achievable FLOP/s as a function of intensity,
# $\min(\text{peak FLOP/s},\ I \cdot \text{peak bytes/s})$: a slanted memory roof, then a flat compute roof
# after the ridge. Below we place the points the project measured on an NVIDIA H200 (bf16, torch 2.11, Triton
# 3.6, 2026-11-28) in these files of the repository:
#
# - `bench/results/decode_H200_2026-11-28.json` and `decode_H200_2026-11-28_v2.json` (`bench/bench_decode.py`):
#   for each shape and contender, the time `ms` and the K/V read rate `tbps`. The bytes are
#   $2 \cdot \sum_b L_b \cdot H_{kv} \cdot D \cdot 2$ and the FLOPs $4 \cdot H_q \cdot \sum_b L_b \cdot D$;
# - `bench/results/attention_H200_2026-11-28_a.json` and `_b.json` (`bench/bench_attention.py`): prefill shapes,
#   with `flops`, the minimal bytes `min_bytes` (Q, K, V read and O written once) and `tflops` per contender.
#
# These are not measurements of the machine running this page.


# %%
def decode_points(path, points=None):
    """{shape: {contender: (intensity FLOP/B, TFLOP/s, TB/s, ms)}} from a decode result file, added to points."""
    points = {} if points is None else points
    for r in _figures.result(path)["results"]:
        hq, hkv = map(int, re.search(r"H(\d+)/(\d+)", r["shape"]).groups())
        total_len = sum(r["lengths"])
        head_dim = r["kv_bytes"] / (4 * total_len * hkv)
        flops = 4 * hq * total_len * head_dim
        points.setdefault(r["shape"], {}).update(
            {
                name: (flops / r["kv_bytes"], flops / (c["ms"] * 1e-3) / 1e12, c["tbps"], c["ms"])
                for name, c in r["contenders"].items()
                if c.get("status") == "ok"
            }
        )
    return points


def prefill_points(path):
    """{shape: {contender: (intensity FLOP/B, TFLOP/s)}} from a prefill result file."""
    points = {}
    for r in _figures.result(path)["results"]:
        points[r["name"]] = {
            name: (r["flops"] / r["min_bytes"], c["tflops"])
            for name, c in r["contenders"].items()
            if c.get("status") == "ok"
        }
    return points


# the second decode run re-measured three shapes (ours, cuDNN, FA2) after a change of the split heuristic: its
# numbers replace the first run's where it has them, so ours and its peers always come from the same run
decode = decode_points("decode_H200_2026-11-28_v2.json", decode_points("decode_H200_2026-11-28.json"))
prefill = prefill_points("attention_H200_2026-11-28_a.json") | prefill_points("attention_H200_2026-11-28_b.json")
for shape, c in decode.items():
    print(f"decode  {shape:42s} I = {c['ours'][0]:4.1f} FLOP/B")
for shape, c in prefill.items():
    print(f"prefill {shape:42s} I = {c['ours'][0]:5.0f} FLOP/B")

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(8, 5.2))
intensity = torch.logspace(-1, 4, 200)
for (name, (flops, bw)), style in zip(list(h200.items())[::2], ("-", "--")):
    roof = torch.minimum(torch.full_like(intensity, flops / 1e12), intensity * bw / 1e12)
    ax.plot(intensity, roof, style, color="0.3", lw=1.2, label=f"roof, {name}")

# cuDNN drawn first and larger, so that our points stay visible where the two coincide
for contender, marker, color, size in (("cudnn", "s", "tab:orange", 70), ("ours", "o", "tab:blue", 30)):
    for phase, points, filled in (("decode", decode, True), ("prefill", prefill, False)):
        xy = [c[contender][:2] for c in points.values() if contender in c]
        ax.scatter(
            [p[0] for p in xy],
            [p[1] for p in xy],
            marker=marker,
            s=size,
            color=color if filled else "none",
            edgecolors=color,
            label=f"{phase}, {contender}",
            zorder=3,
        )
arrow = dict(arrowstyle="->", color="0.4")
ax.annotate("decode, GQA 32/8:\nB64, B8, ragged B32, B1", (4, 13), (9, 2.5), arrowprops=arrow)
ax.annotate("decode: MHA\nB128 L2048", (1, 4.4), (0.15, 25), arrowprops=arrow)
ax.annotate("prefill: 7 shapes", (900, 350), (20, 700), arrowprops=arrow)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlim(0.1, 1e4)
ax.set_ylim(0.1, 2000)
ax.set_xlabel("arithmetic intensity (FLOP per byte of DRAM traffic)")
ax.set_ylabel("TFLOP/s")
ax.set_title("Roofline, H200, bf16: points measured on 2026-11-28 (bench/results/*.json)", fontsize=10)
ax.grid(which="both", alpha=0.2)
ax.legend(fontsize=8, loc="lower right")
plt.show()

# %% [markdown]
# The decode points sit on the slanted roof, a hundred times below the tensor cores' peak, and they could not
# be anywhere else: at 4 FLOP/B even a perfect kernel gets $4 \times 4.8 \approx 19$ TFLOP/s. (Some lie a little
# above the dashed roof: that roof uses the copy benchmark's 4.24 TB/s, and a copy writes as much as it reads,
# while decode only reads; cuDNN's decode reached 4.50 TB/s.) The lowest GQA point is our B1 L131072, discussed
# in section 7. The prefill
# points sit under the flat roof, limited by arithmetic (and by how well the kernel feeds the tensor cores:
# our prefill reaches 0.6 to 0.8 of cuDNN's). Two kernels, two different games: prefill is won with tensor-core
# scheduling, decode with memory traffic.
#
# ## 4. GQA packing: one K/V tile for the whole group
#
# Our decode kernel (`attn/fast/decode.py`) runs one program per (sequence, KV head) and lets it serve all
# $G$ query heads of that KV head, for all $S_q$ new tokens. Their $S_q \cdot G$ query vectors are stacked as
# the rows of one matrix, the M dimension of the products: row $r$ is new token $\lfloor r / G \rfloor$ of query
# head $h_{kv} G + (r \bmod G)$. Each tile of `BLOCK_N` cached keys is then loaded once and multiplied against
# every row with a single `tl.dot`, and the same for the values. This is TensorRT-LLM's XQA idea; vLLM and
# FlashAttention call it "pack GQA".
#
# Two things come out of it:
#
# - **bytes**: each K/V tile is read from memory once per group instead of $G$ times, which is what earns the
#   intensity $S_q G$ of section 2;
# - **tensor cores**: a decode step of one head is a matrix-*vector* product, which tensor cores cannot run;
#   stacked, the group is a small matrix. `tl.dot` needs every dimension to be at least 16, so the kernel pads
#   the rows to `BLOCK_M = max(16, next_power_of_2(Sq·G))`. The padding rows are computed and thrown away, but
#   in a memory-bound kernel spare arithmetic is free: padding costs FLOPs, never bytes.
#
# The packing is only a reshape. Here it is in torch, for one sequence and one KV head, against a per-head loop:

# %%
sq, hq, hkv, d, length = 2, 8, 2, 32, 40
group = hq // hkv
q = torch.randn(sq, hq, d)
k, v = torch.randn(length, hkv, d), torch.randn(length, hkv, d)
h_kv = 1

# rows ordered token-major: row r = (token r // G, head h_kv*G + r % G), as in the kernel
rows = q[:, h_kv * group : (h_kv + 1) * group].reshape(sq * group, d)  # [Sq*G, D]
p = (rows @ k[:, h_kv].T / d**0.5).softmax(-1)  # [Sq*G, L]: one product for the whole group
packed = (p @ v[:, h_kv]).view(sq, group, d)

heads = range(h_kv * group, (h_kv + 1) * group)
per_head = torch.stack(
    [torch.stack([(q[t, h] @ k[:, h_kv].T / d**0.5).softmax(-1) @ v[:, h_kv] for h in heads]) for t in range(sq)]
)
print(f"packed vs one head at a time: {maxdiff(packed, per_head):.1e}")
assert maxdiff(packed, per_head) < 1e-5

# %% [markdown]
# How full the M dimension is, for a few models and step sizes. The picture shows the rows of one program's
# query block: each color is a query head, dark and light alternate the new tokens, gray is padding.

# %%
configs = [("MHA, Sq=1", 1, 1), ("GQA G=4, Sq=1", 4, 1), ("GQA G=8, Sq=1", 8, 1), ("GQA G=4, Sq=3", 4, 3)]
fig, axes = plt.subplots(1, len(configs), figsize=(9, 3.4))
for ax, (name, g, s) in zip(axes, configs):
    block_m = max(16, 1 << (s * g - 1).bit_length())
    print(f"{name:15s} rows {s * g:2d}, BLOCK_M {block_m:2d}: {s * g / block_m:4.0%} of the rows are real")
    img = torch.ones(block_m, 3, 4)
    for r in range(s * g):
        img[r, :, :3] = torch.tensor(plt.cm.tab10(r % g)[:3]) * (0.75 if (r // g) % 2 else 1.0)
    img[s * g :, :, :3] = 0.85
    ax.imshow(img.numpy(), aspect=0.4)
    ax.set_xticks([])
    ax.set_yticks([0, block_m - 1])
    ax.set_title(f"{name}\nBLOCK_M={block_m}", fontsize=9)
axes[0].set_ylabel("row r of the query block")
fig.tight_layout()
plt.show()

# %% [markdown]
# MHA wastes 15 of 16 rows, and it does not matter: its intensity is 1 FLOP/B, far below the ridge, whatever
# the padding. For Llama-3-70B's $G = 8$, or a speculative step, more rows do real work on each loaded tile.
#
# ## 5. `attn.fast.decode` live
#
# The signature, read from the library itself so that it is never out of date:

# %%
print("attn.fast.decode(")
for param in inspect.signature(attn.fast.decode).parameters.values():
    default = "" if param.default is param.empty else f"={param.default!r}"
    print(f"    {param.name}{default},")
print(")")

# %% [markdown]
# - `q [B, Sq, Hq, D]`: the new tokens' queries, $S_q = 1$ for plain decoding, a few for speculative decoding;
# - `k_cache, v_cache [B, max_len, Hkv, D]`: a contiguous cache, one row of `max_len` slots per sequence
#   (lesson 04 covers the paged layout, selected by `block_table`);
# - `cache_seqlens` int32 `[B]`: how many tokens each sequence's cache holds, **the new tokens included**: their
#   K/V are appended before the attention (by `attn.append_kv`), so they attend to themselves too. The new
#   tokens are the last $S_q$ of the $L_b$ cached, and the causal mask is aligned bottom-right as in lesson 01;
# - the scale, window and soft-capping options (and any other score option the signature lists) mean what they
#   mean in `attn.attention`; `num_splits` is the multi-block mode of lesson 05; `validate=False` skips the
#   host-side checks of the lengths (they read the GPU tensor, which a CUDA graph cannot do).
#
# The slots past `cache_seqlens[b]` must not matter. We fill them with NaN, so any read of them would show.
# The tolerance rule is lesson 01's: at most twice the error of PyTorch in the kernel's own precision, both
# against a float64 reference.

# %%
B, MAX_LEN, HQ, HKV, D = 3, 96, 8, 2, 32
cache_seqlens = torch.tensor([96, 41, 7], dtype=torch.int32, device=device)


def make_cache(dtype):
    k_cache = torch.randn(B, MAX_LEN, HKV, D, dtype=dtype, device=device)
    v_cache = torch.randn(B, MAX_LEN, HKV, D, dtype=dtype, device=device)
    for b, n in enumerate(cache_seqlens.tolist()):
        k_cache[b, n:] = float("nan")
        v_cache[b, n:] = float("nan")
    return k_cache, v_cache


def check(name, q, k_cache, v_cache, **kw):
    exact, exact_lse = reference.decode(
        q.double(), k_cache.double(), v_cache.double(), cache_seqlens, return_lse=True, **kw
    )
    same_precision = reference.decode(q, k_cache, v_cache, cache_seqlens, **kw)
    out, lse = attn.fast.decode(q, k_cache, v_cache, cache_seqlens, return_lse=True, **kw)
    err = maxdiff(out, exact)
    budget = 2 * maxdiff(same_precision, exact) + 1e-5
    err_lse = maxdiff(lse, exact_lse)
    print(f"{str(q.dtype)[6:]:8s} {name:32s} err {err:.1e} <= {budget:.1e}   lse err {err_lse:.1e}")
    assert not out.isnan().any() and err <= budget and err_lse < 1e-4, name


# bfloat16 only on a GPU: the CPU interpreter cannot do bfloat16 arithmetic
dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
for dtype in dtypes:
    k_cache, v_cache = make_cache(dtype)
    q1 = torch.randn(B, 1, HQ, D, dtype=dtype, device=device)
    q3 = torch.randn(B, 3, HQ, D, dtype=dtype, device=device)
    check("Sq=1", q1, k_cache, v_cache)
    check("Sq=3 speculative, causal", q3, k_cache, v_cache, causal=True)
    check("Sq=1, window (15, 0), softcap 30", q1, k_cache, v_cache, window_size=(15, 0), softcap=30.0)

# %% [markdown]
# ## 6. A decode step is the last row of a causal prefill
#
# Nothing about attention changes in the generation phase; only the bookkeeping does. A decode step of $S_q$
# new tokens over a cache of $L$ tokens must equal the last $S_q$ rows of a causal prefill over all $L$ tokens:
# the bottom-right mask gives those rows exactly the keys the cache holds (with `causal=True`, each new token
# sees the ones before it but not the ones after). Checked with the two Triton kernels, the prefill one of
# lesson 01 against the decode one, for a plain step and a speculative one:

# %%
L_ALL = 50
q_all = torch.randn(2, L_ALL, HQ, D, device=device)
k_all, v_all = torch.randn(2, L_ALL, HKV, D, device=device), torch.randn(2, L_ALL, HKV, D, device=device)
prefill_out = attn.fast.attention(q_all, k_all, v_all, causal=True)
full = torch.full((2,), L_ALL, dtype=torch.int32, device=device)
for sq in (1, 4):
    step = attn.fast.decode(q_all[:, -sq:], k_all, v_all, full, causal=True)
    err = maxdiff(step, prefill_out[:, -sq:])
    print(f"Sq={sq}: decode vs last rows of prefill: {err:.1e}")
    assert err < 1e-5

# %% [markdown]
# Now the whole loop, on one attention layer with random projection weights: a prompt of 6 tokens goes through
# the context phase, then 5 tokens are generated one at a time. The cached path projects only the new token,
# appends its K/V with `attn.append_kv` and runs `attn.fast.decode`; the recomputing path projects every token
# so far and runs a causal prefill. (The hidden states `x` stand in for what the previous layers would produce;
# those layers are causal too, so their rows are equally fixed.) Both paths must produce the same output at
# every step, and the cached one does a fraction of the projections.

# %%
D_MODEL, PROMPT, STEPS = 64, 6, 5
w_q = torch.randn(D_MODEL, HQ * D, device=device) / D_MODEL**0.5
w_k = torch.randn(D_MODEL, HKV * D, device=device) / D_MODEL**0.5
w_v = torch.randn(D_MODEL, HKV * D, device=device) / D_MODEL**0.5
x = torch.randn(1, PROMPT + STEPS, D_MODEL, device=device)


def project(xs):
    """Hidden states [1, S, d_model] -> q [1, S, Hq, D], k and v [1, S, Hkv, D]."""
    return (xs @ w_q).unflatten(-1, (HQ, D)), (xs @ w_k).unflatten(-1, (HKV, D)), (xs @ w_v).unflatten(-1, (HKV, D))


k_cache = torch.zeros(1, PROMPT + STEPS, HKV, D, device=device)
v_cache = torch.zeros_like(k_cache)
cached_len = torch.zeros(1, dtype=torch.int32, device=device)
rows_cached = rows_recomputed = 0

# context phase: the whole prompt at once, and its K/V written to the cache
q_p, k_p, v_p = project(x[:, :PROMPT])
attn.append_kv(k_cache, v_cache, k_p, v_p, cached_len)
cached_len += PROMPT
rows_cached += PROMPT

for t in range(PROMPT, PROMPT + STEPS):
    q_t, k_t, v_t = project(x[:, t : t + 1])
    attn.append_kv(k_cache, v_cache, k_t, v_t, cached_len)
    cached_len += 1
    out_cached = attn.fast.decode(q_t, k_cache, v_cache, cached_len)
    rows_cached += 1

    q_r, k_r, v_r = project(x[:, : t + 1])
    out_recomputed = attn.fast.attention(q_r, k_r, v_r, causal=True)[:, -1:]
    rows_recomputed += t + 1

    err = maxdiff(out_cached, out_recomputed)
    print(f"token {t}: cache holds {int(cached_len)} tokens, cached vs recomputed {err:.1e}")
    assert err < 1e-5
print(f"projected rows: {rows_cached} with the cache, {rows_recomputed + PROMPT} recomputing")

# %% [markdown]
# ## 7. Speed notes, measured on an H200
#
# From the two decode result files (bf16, one query token, contiguous cache; the second file re-measured three
# shapes after a change of the split heuristic, and wins where it has the shape). TB/s counts K and V read
# once; the H200's device-to-device copy reaches about 4.24 TB/s and the best read rate seen is cuDNN's
# 4.50. "ours/cuDNN" is cuDNN's time divided by ours: above 1, ours is faster.

# %%
print(f"{'shape':42s} {'ours':>6s} {'cuDNN':>6s} {'FA2':>6s} {'Flex':>6s}  ours/cuDNN  (TB/s)")
for shape, c in decode.items():
    tb = {name: f"{c[name][2]:6.2f}" if name in c else "     -" for name in ("ours", "cudnn", "flash", "flex")}
    ratio = f"{c['cudnn'][3] / c['ours'][3]:10.2f}" if "cudnn" in c else "         -"
    print(f"{shape:42s} {tb['ours']} {tb['cudnn']} {tb['flash']} {tb['flex']}  {ratio}")

# %% [markdown]
# What the numbers say, and what they do not:
#
# - Where $B \cdot H_{kv}$ alone gives every SM work (B64 H32/8: 512 programs; B128 H32/32: 4096), our kernel
#   reads 4.3 and 4.5 TB/s, about the copy ceiling and within 1% of cuDNN. There is little left to win there
#   with the cache in bf16; an INT8/FP8 cache, half the bytes, is the next step.
# - B8 L32768 has only 64 (sequence, KV head) pairs for 132 SMs. It needs the multi-block mode of lesson 05, and
#   with it reaches 4.13 TB/s, 0.97 of cuDNN.
# - **B1 L131072 is our weak point, and it is not understood.** The file says 2.13 TB/s, 0.54 of cuDNN, although
#   a separate probe of split counts (`bench/results/decode_split_probe_2026-11-28.log`, lesson 05) measured
#   3.75 TB/s for the same shape and about the same split count. As `bench/NOTES.md` records, our three B1
#   variants all took 0.24-0.25 ms whatever their split count, which looks like a fixed cost (host-side launch
#   overhead, two launches, the autotuner's dispatch) rather than the kernel's reading speed. It was: lesson 05
#   shows CUDA-graph replays at 4.12 TB/s for the same kernel, and after the launch path, the checks and the
#   merge were reworked (one launch, 55-86 µs of host time), event-timed B1 reads 3.88 TB/s.
# - FlashAttention-2 through SDPA ("FA2") is slow on the short-cache shapes; FlexAttention (in this torch)
#   falls to 0.9 and 0.1 TB/s as the batch shrinks and the cache grows, the behaviour of a kernel that does
#   not split the cache across SMs. The peers were run in the same process on the same inputs; PERF.md lists
#   the method.
# - The ragged batch (32 sequences of 128 to 8192 tokens) has no peer numbers in these files. Ours reads
#   3.13 TB/s there. A likely reason, not yet measured: with one program per (sequence, KV head) the programs of
#   the longest sequences run 64 times longer than those of the shortest, and the SMs that finish early idle.
# - The FlexAttention column comes from the first file only (the second run left it out).
#
# ## Summary
#
# - Keys and values of past tokens never change in a causal decoder, so generation caches them:
#   $2 \cdot n_\text{layers} \cdot H_{kv} \cdot D \cdot s$ bytes per token (128 KiB for Llama-3-8B in bf16),
#   in exchange for turning $O(T^2)$ recomputation into $O(T)$.
# - One decode step reads the whole cache and does $4 S_q H_q L D$ FLOPs: intensity $2 S_q G / s$ FLOP/B,
#   1 to 16 against an H200 ridge of 160-210. Decode is memory-bound; judge it in TB/s.
# - GQA packing stacks a KV head's $S_q G$ query rows into one `tl.dot` (padded to 16 rows): each K/V tile is
#   read once per group, and the padding costs only FLOPs, which are free here.
# - `attn.fast.decode(q, k_cache, v_cache, cache_seqlens, ...)`: `cache_seqlens` counts the new tokens too; a
#   step equals the last $S_q$ rows of a causal prefill, and a cached generation loop equals recomputation.
# - On the H200, ours is at the copy ceiling and on par with cuDNN when $B \cdot H_{kv}$ fills the GPU; the
#   small-batch, long-cache case needs lesson 05, and B1 L131072 remains unexplained.
