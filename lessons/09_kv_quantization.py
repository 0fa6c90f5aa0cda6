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
# # Quantizing the KV cache: INT8 and FP8
#
# Lesson 03 showed that a decode step is bound by memory bandwidth: to produce one output row per query head
# it reads every cached key and value once, and does only a few FLOPs per byte. Lesson 04 showed that the
# cache, not the weights, is what limits how many sequences (and how long) a server can hold. Both problems
# have the same cure: store each cached number in fewer bytes. TensorRT-LLM, vLLM and FlashInfer all offer an
# 8-bit KV cache, INT8 or FP8, with a float dequantization scale: a stored byte $c$ stands for $c \cdot s$.
#
# What we cover, in order:
#
# 1. why one byte instead of two: speed (bytes halve, so up to 2×) and capacity;
# 2. the two formats, symmetric INT8 and FP8 e4m3, and a picture of the values each can represent;
# 3. scale granularity: one scale for the whole cache (TensorRT-LLM's `kv_cache_scaling_factor`), one for K and
#    one for V, one per KV head; error histograms on keys with loud heads and outlier channels;
# 4. calibration from samples, and what happens to a value the calibration did not foresee;
# 5. how the kernels dequantize for free, and why folding the scales into the scores and the output is exact;
# 6. live checks: the Triton append writes the reference's bytes; the Triton decode on a quantized cache
#    matches the reference on the same cache, contiguous and paged; the cache objects quantize on append and
#    hand their scales to the readers, and a forked sequence copies its shared block as raw bytes;
# 7. memory saved, for a Llama-3-8B-like model;
# 8. speed: the 2× bound, what was measured on the H200, and what the kernel had to change to approach it;
# 9. the Gluon kernel that renames bytes instead of moving them, drawn lane by lane.
#
# As in the other lessons, without a GPU the Triton kernels run in Triton's interpreter, so the live shapes
# stay tiny. The quantization itself is plain PyTorch (`attn.reference.quantize`) and runs on larger tensors.

# %%

import _figures
import matplotlib.pyplot as plt
import torch

import attn
from attn import reference

torch.manual_seed(0)
torch.set_printoptions(precision=4, sci_mode=False)

# on a GPU the kernels run for real and need their inputs there; on a CPU the interpreter reads ordinary tensors
device = "cuda" if torch.cuda.is_available() else "cpu"
QDTYPES = {"INT8": torch.int8, "FP8": torch.float8_e4m3fn}
LIMIT = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def rel_err(ref, out):
    """Relative RMS error ``‖out − ref‖ / ‖ref‖``, in float64 so the measure adds no rounding of its own."""
    ref, out = ref.double(), out.double()
    return ((out - ref).norm() / ref.norm()).item()


# %% [markdown]
# ## 1. Why one byte
#
# A decode step over a sequence of $L$ cached tokens reads $2 \cdot L \cdot H_{kv} \cdot D$ numbers (K and
# V) per layer and does about $4 \cdot H_q \cdot L \cdot D$ FLOPs with them: a handful of FLOPs per byte,
# far below what an H200 needs (hundreds) to be limited by arithmetic. The time of the step is therefore
# close to *bytes read / bandwidth*, and storing the cache in 1 byte per number instead of bf16's 2 halves the
# bytes. That puts an upper bound of 2× on the speed-up of the attention itself; section 8 says what has been
# measured and what has not.
#
# The second gain is capacity. The cache of every running sequence must stay in GPU memory, so the memory left
# after the weights caps $\sum_b L_b$, the product of batch size and context length. Halving the bytes per
# token doubles it (section 7 counts it for a Llama-3-8B-like model).
#
# The price is precision: 256 codes per number instead of 65536. The rest of the lesson is about spending
# those 256 codes well.
#
# ## 2. Two formats of one byte
#
# **INT8, symmetric.** $c = \operatorname{clamp}(\operatorname{round}(x / s), -127, 127)$ and $\hat x = c \cdot s$.
# The grid is uniform: a step of $s$ everywhere, so the absolute error is at most $s/2$ whatever the size
# of $x$. Code $-128$ is left unused so that the range is symmetric. The relative error, $s / (2|x|)$, is small
# for values near the top of the range and large for small values: a value of $0.01 \cdot 127 s$ has only
# about one code on either side of it.
#
# **FP8 e4m3** (the `float8_e4m3fn` of PyTorch, NVIDIA's "E4M3"): 1 sign bit, 4 exponent bits, 3 mantissa
# bits, exponent bias 7. A normal value is $\pm 1.m_1m_2m_3 \cdot 2^{e-7}$, so between two powers of two there
# are 8 equally spaced values and the step doubles at each power of two: the grid is *relative*, with a
# rounding error of at most $2^{-4}$ (6.25%) of the value. The format has no infinities; the single pattern
# `S.1111.111` is NaN, which makes the largest value $1.75 \cdot 2^{8} = 448$. Below the smallest normal
# value $2^{-6}$ come subnormals, $m \cdot 2^{-9}$ for $m = 1..7$, a uniform grid that fills the gap down to 0.
# Quantizing is $c = \operatorname{fp8}(\operatorname{clamp}(x / s, -448, 448))$ (round to nearest even), and
# $\hat x = c \cdot s$ as before.
#
# FP8 has every one of its 256 bit patterns as a PyTorch value, so we can list the format exhaustively:

# %%
e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
finite = e4m3[e4m3.isfinite()]
pos = finite[finite > 0].unique()  # sorted
subnormals = pos[pos < 2**-6]
print(f"bit patterns: 256, NaN: {int(e4m3.isnan().sum())}, distinct finite values: {finite.unique().numel()}")
print(f"positive values: {pos.numel()}, of which subnormal: {subnormals.numel()}")
print(f"smallest subnormal {pos[0]:.6f} = 2^-9, smallest normal {2**-6} = 2^-6, largest {pos[-1]:.0f}")
print("values in [1, 2):", pos[(pos >= 1) & (pos < 2)].tolist())
print("values in [256, 448]:", pos[pos >= 256].tolist())
assert pos.numel() == 126 and subnormals.numel() == 7 and pos[-1] == 448 and pos[0] == 2**-9

# %% [markdown]
# The picture compares the two grids over the same range. INT8 is drawn with the scale that maps its top code
# 127 onto 448, so both formats cover $[0, 448]$. On a linear axis (top), INT8's 127 positive values are
# evenly spaced 3.5 apart; FP8's 126 crowd near zero and thin out towards 448, where the step is 32. On a
# logarithmic axis (bottom) we plot the worst-case relative rounding error, half the gap to the neighbouring
# value divided by the value: flat near $2^{-4}$ for FP8 over five decades, falling like $1/x$ for INT8, which
# is more precise than FP8 only in the top decade of its range.

# %%
int8_grid = torch.arange(1, 128).float() * (448 / 127)
fig, (ax_lin, ax_rel) = plt.subplots(2, 1, figsize=(10, 6.2))
ax_lin.eventplot([pos.numpy(), int8_grid.numpy()], lineoffsets=[1, 0], linelengths=0.7, colors=["C1", "C0"])
ax_lin.set_yticks([0, 1], ["INT8, s = 448/127", "FP8 e4m3, s = 1"])
ax_lin.set_xlim(-5, 455)
ax_lin.set_xlabel("representable positive values (linear axis)")
ax_lin.set_title("Where the 1-byte codes fall between 0 and 448")


def half_gap_relative(grid):
    """Worst relative rounding error at each grid value: half the larger gap to a neighbour, over the value."""
    padded = torch.cat([torch.zeros(1), grid, grid[-1:] + (grid[-1] - grid[-2])])
    gaps = torch.maximum(padded[1:-1] - padded[:-2], padded[2:] - padded[1:-1])
    return 0.5 * gaps / grid


ax_rel.loglog(pos, half_gap_relative(pos), ".-", color="C1", label="FP8 e4m3 (subnormals below 2^-6)")
ax_rel.loglog(int8_grid, half_gap_relative(int8_grid), ".-", color="C0", label="INT8 (uniform step 3.53)")
ax_rel.axhline(2**-4, color="0.5", lw=0.8, ls="--")
ax_rel.axvline(2**-6, color="C1", lw=0.8, ls=":")
ax_rel.set_xlabel("value (log axis)")
ax_rel.set_ylabel("half gap / value")
ax_rel.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# One more difference matters when a value falls outside the range the scale was chosen for. Converting a
# float to `int8` without clamping wraps around (200 becomes −56 here, a sign flip), which is why the
# quantizer clamps first. PyTorch's conversion to `float8_e4m3fn` saturates at ±448 on its own, and the Triton
# kernel clamps explicitly before converting, so an FP8 value can never turn into NaN on its way in.

# %%
print("float -> int8 without clamping: ", torch.tensor([100.0, 200.0, -300.0]).to(torch.int8).tolist())
print("float -> float8_e4m3fn:         ", torch.tensor([100.0, 500.0, -3000.0]).to(torch.float8_e4m3fn).tolist())
one = torch.ones(1)
print("attn quantize, INT8:            ", reference.quantize(torch.tensor([[100.0, 200.0, -300.0]]), one, torch.int8))
print(
    "attn quantize, FP8:             ",
    reference.quantize(torch.tensor([[100.0, 500.0, -3000.0]]), one, torch.float8_e4m3fn).float(),
)

# %% [markdown]
# ## 3. How many scales: per tensor, per K and V, per head
#
# A scale maps the values that occur onto the format's range; the natural choice is
# $s = \max|x| / 127$ (INT8) or $\max|x| / 448$ (FP8), so the largest value lands on the largest code. The
# question is over *which* values the maximum is taken. `attn` supports three granularities, coarsest first:
#
# - `"tensor"`: a single scale shared by K and V of the whole layer. This is TensorRT-LLM's
#   `kv_cache_scaling_factor`, shape `[1]`.
# - `"kv"`: one scale for K and another for V, each `[1]`.
# - `"head"`: one scale per KV head, for K and for V: `k_scale, v_scale [Hkv]`.
#
# Real keys are not well-behaved Gaussian noise. Their magnitude varies from head to head, and a few channels
# of the keys carry values much larger than the rest, with a consistent sign across tokens (a well-documented
# effect in LLaMA-family models, the reason for methods such as KIVI and KVQuant). Values are tamer. A single
# shared scale is set by the largest of all of these, so every head and the whole of V pay for the loudest
# channel of the loudest head: their values use only a sliver of the codes. Users of TensorRT-LLM's single
# shared scale report exactly this loss of accuracy; the finer granularities cost a few more floats.
#
# We build such a cache: 8 KV heads of dimension 64, heads 2 and 5 five times louder than the others, and
# in K two outlier channels per head sitting near $\pm 8$ times the head's normal size.

# %%
HKV, D = 8, 64
LOUD = [2, 5]


def synthetic_kv(tokens, batch=1):
    """K and V ``[batch, tokens, Hkv, D]`` with loud heads and, in K, outlier channels of fixed sign."""
    head_gain = torch.ones(HKV)
    head_gain[LOUD] = 5.0
    k = torch.randn(batch, tokens, HKV, D)
    gen = torch.Generator().manual_seed(1)
    for h in range(HKV):
        # the outlier channels of a head are the same for every token, as in real models
        ch = torch.randperm(D, generator=gen)[:2]
        sign = torch.tensor([1.0, -1.0])
        k[..., h, ch] = sign * 8.0 + torch.randn(batch, tokens, 2)
    k = k * head_gain[:, None]
    v = torch.randn(batch, tokens, HKV, D) * (0.5 + 0.5 * head_gain[:, None]) * 0.5
    return k, v


k_big, v_big = synthetic_kv(4096)
print("max |K| per head:", k_big.abs().amax(dim=(0, 1, 3)).round(decimals=1).tolist())
print("max |V| per head:", v_big.abs().amax(dim=(0, 1, 3)).round(decimals=1).tolist())

# %% [markdown]
# For each format and granularity we calibrate the scales on the data itself (the best case: the largest value
# is known exactly), quantize with `attn.reference.quantize` (the same arithmetic as the kernels, which section
# 6 checks byte for byte), dequantize, and measure each element's error in units of its own head's RMS
# magnitude. That unit is the one that matters: a head's attention scores scale with the size of its keys,
# so an error is harmful in proportion to it, not in absolute terms.

# %%
GRANULARITIES = ["tensor", "kv", "head"]


def roundtrip(x, scale, qdtype):
    return reference.dequantize(reference.quantize(x, scale, qdtype), scale)


def relative_to_head(err, x):
    """|err| in units of the RMS of x's head: ``[..., Hkv, D]``, flattened."""
    rms = x.pow(2).mean(dim=tuple(range(x.dim() - 2)) + (x.dim() - 1,)).sqrt()  # [Hkv]
    return (err.abs() / rms[:, None]).flatten()


errors, scales = {}, {}
for fname, qdtype in QDTYPES.items():
    for g in GRANULARITIES:
        ks, vs = attn.calibrate_kv_scales(k_big, v_big, qdtype, g)
        scales[fname, g] = (ks, vs)
        for name, x, s in (("K", k_big, ks), ("V", v_big, vs)):
            errors[fname, g, name] = relative_to_head(roundtrip(x, s, qdtype) - x, x)

fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
bins = torch.logspace(-6, 1, 71)
for row, fname in enumerate(QDTYPES):
    for col, name in enumerate(("K", "V")):
        ax = axes[row, col]
        for g in GRANULARITIES:
            e = errors[fname, g, name].clamp_min(1.01e-6)  # exact zeros land in the first bin
            ax.hist(
                e.numpy(), bins=bins.numpy(), histtype="step", lw=1.4, label=f"{g}: RMS {e.pow(2).mean().sqrt():.1e}"
            )
        ax.set_xscale("log")
        ax.set_title(f"{fname}, {name}", fontsize=10)
        ax.legend(fontsize=8, title="granularity", title_fontsize=8)
    axes[row, 0].set_ylabel("elements")
for ax in axes[1]:
    ax.set_xlabel("|error| / RMS of the element's head")
fig.suptitle("Element-wise quantization error per scale granularity (8 heads × 64 channels × 4096 tokens)")
fig.tight_layout()
plt.show()

# %% [markdown]
# The histograms read left (good) to right (bad); the legend gives each curve's RMS. What they show:
#
# - **INT8 suffers from a coarse scale.** With one shared scale, V's step is set by K's loudest outlier,
#   8 to 25 times V's own largest value, so V uses only the codes up to about ±5 to ±15 and its error is a
#   sizeable fraction of its RMS. Separate K and V scales repair V; per-head scales repair the quiet heads
#   of K, whose step was set by the loud heads. (For K, `tensor` and `kv` are the same scale, since K holds
#   the overall maximum: their curves coincide.)
# - **Per-head INT8 still pays for outlier channels.** Inside a head, the two outlier channels set the step,
#   and the ordinary channels, about eight times smaller, use only the codes up to about ±35 of ±127.
# - **FP8 barely notices the granularity.** Its relative grid gives every value about the same relative
#   error, at most $2^{-4}$, whatever the scale, as long as the value stays above the subnormals; the three
#   curves nearly coincide.
# - **But at its best, INT8 is the more precise format.** With per-head scales its error is about half of
#   FP8's: near the top of its range INT8 has 7 bits of resolution, FP8 only 3 mantissa bits everywhere.
#   FP8's strength is robustness, not precision.
#
# The same in numbers, split by the kind of head:

# %%
quiet = [h for h in range(HKV) if h not in LOUD]
print(f"{'':11s} {'K quiet':>9s} {'K loud':>9s} {'V quiet':>9s} {'V loud':>9s}   (relative RMS error)")
for fname, qdtype in QDTYPES.items():
    for g in GRANULARITIES:
        ks, vs = scales[fname, g]
        cells = []
        for x, s in ((k_big, ks), (v_big, vs)):
            back = roundtrip(x, s, qdtype)
            cells += [rel_err(x[..., heads, :], back[..., heads, :]) for heads in (quiet, LOUD)]
        print(f"{fname:4s} {g:6s} " + " ".join(f"{c:9.2e}" for c in cells))

# %% [markdown]
# ### What reaches the attention output
#
# Element errors are only a means; what the model sees is the attention output. We quantize a cache of 2
# sequences of 128 tokens with each format and granularity, run the Triton decode kernel `attn.fast.decode`
# on it with the scales, and compare with the reference attention computed in float64 on the unquantized
# cache. Each sequence gets 8 query vectors (decode accepts several new tokens per sequence, as in speculative
# decoding; without a causal mask each one is an independent sample) for 16 query heads, so 256 output rows
# per run. The queries are scaled so that the scores spread over a few units, as in a trained model, rather
# than saturating the softmax. For scale, the grey histogram is the same kernel on an fp16 cache: the error of
# 16-bit storage.

# %%
B, L, HQ = 2, 128, 16
k_small, v_small = synthetic_kv(L, batch=B)
q_small = 0.3 * torch.randn(B, 8, HQ, D)
lens = torch.full((B,), L, dtype=torch.int32)
exact = reference.decode(q_small.double(), k_small.double(), v_small.double(), lens)
q16 = q_small.to(device, torch.float16)
lens_d = lens.to(device)


def row_errors(out):
    """Relative error of each output row (one query vector of one head) against the float64 reference."""
    diff = (out.double().cpu() - exact).norm(dim=-1)
    return (diff / exact.norm(dim=-1)).flatten()


row_err = {}
for fname, qdtype in QDTYPES.items():
    for g in GRANULARITIES:
        ks, vs = attn.calibrate_kv_scales(k_small, v_small, qdtype, g)
        kc = reference.quantize(k_small, ks, qdtype).to(device)
        vc = reference.quantize(v_small, vs, qdtype).to(device)
        out = attn.fast.decode(q16, kc, vc, lens_d, k_scale=ks.to(device), v_scale=vs.to(device))
        row_err[fname, g] = row_errors(out)
fp16_err = row_errors(
    attn.fast.decode(q16, k_small.to(device, torch.float16), v_small.to(device, torch.float16), lens_d)
)

print(f"{'cache':12s} {'median':>9s} {'worst row':>10s}   (relative error of an output row vs float64)")
for (fname, g), e in row_err.items():
    print(f"{fname:4s} {g:7s} {e.median():9.2e} {e.max():10.2e}")
print(f"{'fp16':12s} {fp16_err.median():9.2e} {fp16_err.max():10.2e}")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
bins = torch.logspace(-4.5, 0, 46).numpy()
for ax, fname in zip(axes, QDTYPES):
    for g in GRANULARITIES:
        ax.hist(row_err[fname, g].numpy(), bins=bins, histtype="step", lw=1.4, label=g)
    ax.hist(fp16_err.numpy(), bins=bins, histtype="stepfilled", color="0.85", label="fp16 cache")
    ax.set_xscale("log")
    ax.set_xlabel("relative error of an output row")
    ax.set_title(f"attn.fast.decode on a {fname} cache", fontsize=10)
    ax.legend(fontsize=8)
axes[0].set_ylabel("output rows")
fig.tight_layout()
plt.show()

# %% [markdown]
# The ranking carries over to the output. With INT8, one shared scale costs more than an order of magnitude
# in output error compared with per-head scales, and separate K/V scales recover most of it; with FP8 the
# three granularities sit together, between INT8's best and its worst. And every 8-bit error is far above
# fp16's: 8-bit storage is a trade, not a free lunch. Whether
# the trade is acceptable is decided on a model's task accuracy (perplexity, benchmarks), never on a synthetic
# cache like this one; what the experiment does show is which knob matters for which format.
#
# ## 4. Calibration, and values nobody calibrated for
#
# The scale must be fixed *before* the values it serves exist: a token's K and V are quantized once, when they
# are appended, and later tokens must use the same scale, or the cache would need a scale per token.
# TensorRT-LLM's flow is the one `attn.calibrate_kv_scales` implements: run the model on calibration samples,
# record the largest $|K|$ and $|V|$ (per tensor, per K/V, or per head), and divide by 127 or 448.
#
# Two things follow. First, a later value can exceed the calibrated maximum. Both formats clamp it to their
# largest code, so the error is the excess, and nothing worse: no wrap-around, no NaN, no infinity. Second,
# taking the maximum is not necessarily the best choice. For INT8, a smaller scale clips the rare largest
# values but gives every other value a finer step; for FP8, the step is relative, and a smaller scale buys
# almost nothing until clipping begins. We calibrate per head on the first 256 tokens of one sequence and
# look at what happens to the other 3840:

# %%
sample = slice(0, 256)
for fname, qdtype in QDTYPES.items():
    ks, vs = attn.calibrate_kv_scales(k_big[:, sample], v_big[:, sample], qdtype, "head")
    stored = reference.quantize(v_big, vs, qdtype).float()
    clipped = (stored.abs() == LIMIT[qdtype]) & (v_big.abs() > vs[:, None] * LIMIT[qdtype])
    err = rel_err(v_big, reference.dequantize(stored.to(qdtype), vs))
    print(
        f"{fname}: V values beyond the calibrated range: {int(clipped.sum())} of {v_big.numel()}"
        f" ({100 * clipped.float().mean():.3f}%), all stored as ±{LIMIT[qdtype]:.0f}; rel. RMS error {err:.2e}"
    )

# a value twice the calibrated maximum: clamped to the top code, in both formats
ks1 = torch.ones(1)
print("2x the range, INT8 ->", reference.quantize(torch.tensor([[254.0, -254.0]]), ks1, torch.int8).tolist())
print(
    "2x the range, FP8  ->",
    reference.quantize(torch.tensor([[896.0, -896.0]]), ks1, torch.float8_e4m3fn).float().tolist(),
)

# %% [markdown]
# Now the trade-off between clipping and resolution. We take one quiet head of V (Gaussian values) and one of
# K (with its two outlier channels), set the scale to a multiple $\alpha$ of the max-calibrated one, and
# measure the relative RMS error. $\alpha < 1$ clips, $\alpha > 1$ wastes range.

# %%
alphas = torch.logspace(-1.3, 1.3, 53)
curves = {}
for fname, qdtype in QDTYPES.items():
    for name, x in (("V, Gaussian", v_big[..., :1, :]), ("K, outlier channels", k_big[..., :1, :])):
        s0 = x.abs().amax() / LIMIT[qdtype]
        curves[fname, name] = [rel_err(x, roundtrip(x, (a * s0).reshape(1), qdtype)) for a in alphas.tolist()]

fig, ax = plt.subplots(figsize=(8, 4.2))
for (fname, name), c in curves.items():
    ax.loglog(
        alphas,
        c,
        "-" if fname == "INT8" else "--",
        color="C0" if name.startswith("V") else "C3",
        label=f"{fname}, {name}",
    )
ax.axvline(1.0, color="0.5", lw=0.8)
ax.set_xlabel("scale / (max|x| / format max)     (< 1 clips, > 1 leaves codes unused)")
ax.set_ylabel("relative RMS error")
ax.legend(fontsize=8)
ax.set_title("Clipping against resolution, one head, 4096 tokens", fontsize=10)
fig.tight_layout()
plt.show()
at_max = int(alphas.sub(1).abs().argmin())
for (fname, name), c in curves.items():
    best = min(range(len(c)), key=c.__getitem__)
    print(f"{fname:4s} {name:20s}: error {c[at_max]:.2e} at the maximum, best {c[best]:.2e} at {alphas[best]:.2f}")

# %% [markdown]
# Left of 1, every curve rises steeply once clipping reaches the bulk of the values. For Gaussian values INT8
# does best a little under the maximum (a few clipped values buy a finer step for all the others) and still
# beats the maximum at 0.8; for the keys with outlier channels the same 0.8 is already worse, because the
# outliers are whole channels, not rare events, and clipping soon touches every token. Right of 1, INT8's
# error grows in proportion to the scale. FP8's curves are flat from 1 to 20: a scale too large by 10× costs
# it almost nothing, because the values just move down its exponent range. That robustness, rather than
# precision at the best scale (where INT8 wins), is why FP8 is the usual choice for the KV cache on GPUs that
# support it (Hopper and later): a scale calibrated on too few samples, or a model whose activations drift,
# does not hurt it. INT8 asks for careful calibration and fine granularity.
#
# ## 5. Dequantizing for free
#
# A kernel could dequantize every element it loads, $\hat k_{jd} = c_{jd} \cdot s_k$, before using it. It does
# not need to. Take one KV head with scales $s_k$ and $s_v$, stored codes $c_{jd}$ for K and $c'_{jd}$ for V.
# The score of query $q$ against key $j$ is
#
# $$\tau\, q \cdot \hat k_j = \tau \sum_d q_d\, (s_k\, c_{jd}) = (\tau\, s_k)\,(q \cdot c_j),$$
#
# because $s_k$ is the same for every $d$: the kernel computes the dot product on the stored values and
# multiplies the *score* by $s_k$, one multiply per score rather than $D$ per key. The softmax then gives
# weights $p_j$, and since $s_v$ is the same for every $j$,
#
# $$o = \frac{\sum_j p_j\, \hat v_j}{\sum_j p_j} = s_v \cdot \frac{\sum_j p_j\, c'_j}{\sum_j p_j},$$
#
# one multiply per output element at the very end. In `attn.fast.decode` these are the lines
# `qk = qk * k_scale` and `out = out * v_scale`. The scale has to be constant along the summed index for this
# to work: per tensor and per head qualify, and so would a per-token K scale (one multiply per score, varying
# with $j$) or a per-channel one (folded into $q$ instead); a per-element scale would not.
#
# Algebraically the folded form is the same number. In floating point, it is the same up to the order of one
# rounding, provided the dot products $q \cdot c_j$ see the stored values *exactly*. The kernel converts the
# loaded bytes to the query's dtype (fp16 or bf16) so that `tl.dot` runs on tensor cores, and that conversion
# is lossless:
#
# - an INT8 code is an integer of magnitude at most 127, which needs 7 significant bits; fp16 has 11 and bf16
#   has 8;
# - an e4m3 value has 4 significant bits and exponents from $2^{-9}$ to $2^{8}$; fp16 covers $2^{-24}$ to
#   $2^{15}$ with 11 bits, bf16 covers far more with 8.
#
# So the tensor-core product computes $q \cdot c_j$ with no error from the conversion at all. Both claims,
# checked on every code:

# %%
int8_codes = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
fp8_codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
fp8_codes = fp8_codes[fp8_codes.float().isfinite()]
for name, codes in (("int8", int8_codes), ("float8_e4m3fn", fp8_codes)):
    for half in (torch.float16, torch.bfloat16):
        # through the 16-bit type and back to float32: any rounding would change the value
        exact_conv = torch.equal(codes.to(half).float(), codes.float())
        print(f"all {codes.numel()} {name} values exact in {str(half)[6:]}: {exact_conv}")
        assert exact_conv

# the folded computation against dequantizing every element first, one head, float64 throughout
codes_k = reference.quantize(k_small[0], scales["FP8", "head"][0], torch.float8_e4m3fn)  # [L, Hkv, D]
s_k = scales["FP8", "head"][0][0].double()
q0 = q_small[0, 0, 0].double()
per_element = q0 @ (codes_k[:, 0].double() * s_k).T
folded = (q0 @ codes_k[:, 0].double().T) * s_k
print(f"scores, folded vs per element: max difference {(folded - per_element).abs().max():.1e}")

# %% [markdown]
# ## 6. Live checks against the reference
#
# **The append writes the reference's bytes.** `attn.fast.append_kv` quantizes in the kernel as it writes.
# It multiplies by the float32 reciprocal of the scale, rounds INT8 with $\lfloor y + 0.5 \rfloor$, and for
# FP8 rounds onto the e4m3 grid in float32 arithmetic before converting (`_round_to_e4m3`): the GPU's own
# conversion would round correctly, but Triton's CPU interpreter mis-rounds values whose rounding carries into
# the exponent, and the kernel must produce the GPU's bytes on both. `attn.reference.append_kv` does the same
# arithmetic in PyTorch. We append a ragged packed batch into contiguous and paged caches and compare the raw
# bytes (`.view(torch.uint8)`: bytes are what the cache is, and float8 tensors lack an equality kernel on
# some devices).

# %%
counts = torch.tensor([5, 0, 11])
cu_new = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).to(torch.int32)]).to(device)
starts = torch.tensor([0, 4, 21], dtype=torch.int32, device=device)
hkv_t, d_t = 2, 32
k_new = (torch.randn(int(counts.sum()), hkv_t, d_t) * torch.tensor([1.0, 4.0])[:, None]).to(device, torch.float16)
v_new = torch.randn_like(k_new)

for fname, qdtype in QDTYPES.items():
    for layout_name in ("contiguous", "paged"):
        if layout_name == "paged":
            # 3 sequences of up to 40 tokens in 8-token blocks, scattered over a shuffled pool
            cache = torch.zeros(16, 8, hkv_t, d_t, device=device).to(qdtype)
            table = torch.randperm(16, device=device)[:15].to(torch.int32).view(3, 5)
        else:
            cache = torch.zeros(3, 40, hkv_t, d_t, device=device).to(qdtype)
            table = None
        for g in GRANULARITIES:
            ks, vs = attn.calibrate_kv_scales(k_new, v_new, qdtype, g)
            kw = dict(cu_seqlens_new=cu_new, block_table=table, k_scale=ks, v_scale=vs)
            kf, vf, kr, vr = (cache.clone() for _ in range(4))
            attn.fast.append_kv(kf, vf, k_new, v_new, starts, **kw)
            reference.append_kv(kr, vr, k_new, v_new, starts, **kw)
            same = torch.equal(kf.view(torch.uint8), kr.view(torch.uint8)) and torch.equal(
                vf.view(torch.uint8), vr.view(torch.uint8)
            )
            written = int((kf.view(torch.uint8) != cache.view(torch.uint8)).sum())
            assert same, (fname, layout_name, g)
        print(f"{fname:4s} {layout_name:10s}: fast and reference wrote identical bytes ({written} K bytes changed)")

# %% [markdown]
# **The decode reads the quantized cache as the reference does.** `attn.reference.decode` on a quantized cache
# dequantizes every element (in float64 when the query is float64) and attends as usual; `attn.fast.decode`
# reads the bytes and folds the scales. Same cache, same scales: the two must agree to the precision of the
# kernel's fp16 arithmetic, here a relative RMS tolerance of $2 \cdot 2^{-10}$, the library's tolerance for
# fp16. Paged caches use a shuffled block table and 3-way split-K as well, to exercise the multi-block path.
# The last column is the error of the same kernel output against the *unquantized* cache: the price of the
# format, not of the kernel.

# %%
TOL_FP16 = 2 * 2.0**-10
lens3 = torch.tensor([1, 29, 64], dtype=torch.int32)
k_full, v_full = synthetic_kv(64, batch=3)
k_full, v_full = k_full[..., :2, :32].contiguous(), v_full[..., :2, :32].contiguous()
# two quiet heads from the generator; a loud second head keeps the granularities apart
k_full[..., 1, :] *= 4.0
q3 = (0.3 * torch.randn(3, 1, 8, 32)).half()
unquantized = reference.decode(q3.double(), k_full.double(), v_full.double(), lens3)
print(f"{'cache':27s} {'vs reference':>13s} {'vs unquantized':>15s}")
for fname, qdtype in QDTYPES.items():
    for g in GRANULARITIES:
        ks, vs = attn.calibrate_kv_scales(k_full, v_full, qdtype, g)
        for layout_name in ("contiguous", "paged"):
            if layout_name == "paged":
                # 3 sequences × 8 blocks of 8 tokens, scattered over a 24-block pool
                table = torch.randperm(24).to(torch.int32).view(3, 8)
                kc = torch.zeros(24, 8, 2, 32).to(qdtype)
                splits = 3
            else:
                table, splits = None, 1
                kc = torch.zeros(3, 64, 2, 32).to(qdtype)
            vc = kc.clone()
            zeros = torch.zeros(3, dtype=torch.int32)
            reference.append_kv(kc, vc, k_full, v_full, zeros, block_table=table, k_scale=ks, v_scale=vs)
            kw = dict(block_table=table, k_scale=ks, v_scale=vs, num_splits=splits)
            ref = reference.decode(q3.double(), kc, vc, lens3, **kw)
            dev_kw = {n: (x.to(device) if x is not None else None) for n, x in kw.items() if n != "num_splits"}
            out = attn.fast.decode(
                q3.to(device), kc.to(device), vc.to(device), lens3.to(device), num_splits=splits, **dev_kw
            )
            err_ref, err_unq = rel_err(ref, out.cpu()), rel_err(unquantized, out.cpu())
            print(f"{fname:4s} {g:6s} {layout_name:10s}   {err_ref:11.1e}   {err_unq:13.1e}")
            assert err_ref < TOL_FP16, (fname, g, layout_name)

# %% [markdown]
# The kernel agrees with the reference far inside fp16's tolerance everywhere, while its distance to the
# unquantized answer is set by the format and the granularity, and follows the ranking of section 3.
#
# **The cache objects carry their scales.** A serving loop does not pass scales around by hand:
# `attn.PagedKVCache` and `attn.ContiguousKVCache` take `dtype=torch.int8` or `torch.float8_e4m3fn` with
# `k_scale` and `v_scale` (checked once, as every kernel checks them), quantize on every `append`, and hand the
# scales to the readers through `cache.scales`, a dict of keywords for `attn.decode`, `attn.context_attention`
# or `attn.gpt_attention`. Below, two sequences grow in chunks of uneven length inside an FP8 paged pool of
# 8-token blocks; a third is forked from the first (lesson 11's beam-search sharing) and appends its own
# token. Its last block is shared and only partly full, so that block is copied first, as raw bytes: a copy
# of one-byte codes must not pass through a float conversion. Decoding the three from the pool then matches
# the reference that dequantizes the same pool, and the fork sees its parent's history plus its own token.

# %%
hkv_o, d_o = 2, 32
pool = attn.PagedKVCache(
    num_blocks=12, block_size=8, num_heads_kv=hkv_o, head_dim=d_o, max_seqs=4, max_blocks_per_seq=6,
    dtype=torch.float8_e4m3fn, device=device, k_scale=torch.tensor([0.02, 0.05], device=device),
    v_scale=torch.tensor([0.01], device=device),
)  # fmt: skip
seqs = [pool.add_sequence(), pool.add_sequence()]
for chunk in ([7, 3], [5, 9], [1, 1]):
    # packed chunks: one ragged append per step, as a scheduler would issue it
    cu = torch.tensor([0, chunk[0], sum(chunk)], dtype=torch.int32, device=device)
    kn = torch.randn(sum(chunk), hkv_o, d_o, device=device).half()
    vn = torch.randn_like(kn)
    pool.append(seqs, kn, vn, cu_seqlens_new=cu)
fork = pool.fork(seqs[0])
copies_before = pool.num_block_copies
pool.append(
    [fork], torch.randn(1, 1, hkv_o, d_o, device=device).half(), torch.randn(1, 1, hkv_o, d_o, device=device).half()
)
live = [seqs[0], seqs[1], fork]
print(f"lengths {[pool.length(s) for s in live]}, blocks {[pool.blocks_of(s) for s in live]}")
print(f"blocks copied by the fork's append: {pool.num_block_copies - copies_before}")
print(f"pool bytes: {pool.k.numel() * pool.k.element_size() * 2} (bf16 would need twice that)")

q_o = (0.3 * torch.randn(3, 1, 4 * hkv_o, d_o, device=device)).half()
lens_o, table_o = pool.seqlens[live], pool.block_table[live]
out_o = attn.decode(q_o, pool.k, pool.v, lens_o, block_table=table_o, **pool.scales)
ref_o = reference.decode(q_o.cpu().double(), pool.k.cpu(), pool.v.cpu(), lens_o.cpu(), block_table=table_o.cpu(),
                         **{n: x.cpu() for n, x in pool.scales.items()})  # fmt: skip
err_o = rel_err(ref_o, out_o.cpu())
print(f"decode from the FP8 pool vs the reference on the same pool: {err_o:.1e} (tolerance {TOL_FP16:.1e})")
assert err_o < TOL_FP16
# the fork shares its parent's first blocks: the same pool rows, so the same codes, for every shared token
shared = pool.length(seqs[0]) // 8
assert pool.blocks_of(fork)[:shared] == pool.blocks_of(seqs[0])[:shared]
assert pool.num_block_copies - copies_before == 1

# %% [markdown]
# ## 7. Memory saved
#
# Per token, a model stores K and V for every layer and KV head: $2 \cdot N_\text{layers} \cdot H_{kv} \cdot D$
# numbers. The scales are per layer (and per head), not per token: a fixed few kilobytes for the whole model.
# For a Llama-3-8B-like model (32 layers, $H_{kv} = 8$, $D = 128$):

# %%
layers, hkv_llama, d_llama = 32, 8, 128
numbers_per_token = 2 * layers * hkv_llama * d_llama
budget = 80 * 2**30  # GiB of memory given to the cache
print(f"{'cache':22s} {'KiB/token':>9s} {'scales (model)':>16s} {'tokens in 80 GiB':>17s} {'seqs of 8192':>13s}")
for name, nbytes, scale_bytes in (
    ("bf16", 2, 0),
    ("int8/fp8, per tensor", 1, layers * 1 * 4),
    ("int8/fp8, per K and V", 1, layers * 2 * 4),
    ("int8/fp8, per head", 1, layers * 2 * hkv_llama * 4),
):
    per_token = numbers_per_token * nbytes
    fits = (budget - scale_bytes) // per_token
    print(f"{name:22s} {per_token / 1024:9.0f} {scale_bytes:>14d} B {fits:>17,d} {fits // 8192:>13d}")

# %% [markdown]
# 128 KiB per token in bf16 becomes 64 KiB; 80 GiB hold 1.31 million tokens instead of 655 thousand:
# twice the batch at a given context length (159 sequences of 8192 tokens instead of 80), or twice the context
# at a given batch. Even per-head scales,
# the finest granularity here, add 2 KiB for the whole model, nothing next to one token's 64 KiB.
#
# ## 8. Speed: the 2× bound, and what the kernel had to change to approach it
#
# At the same achieved bandwidth, half the bytes take half the time, so the attention of a decode step can be
# at most 2× faster (the query, the output and the block table are the same size in both cases, but small next
# to the cache). Published FP8 KV decode kernels report 1.6–1.9× over bf16 (`PERF.md`). Reaching the bound
# needs the kernel to stay limited by memory after the change: it now does the same FLOPs on half the bytes,
# *plus a conversion of every loaded code* into the products' 16-bit type.
#
# That conversion turned out to be the whole story. Two H200 runs of `bench/bench_features.py` (decode
# variants, GQA 32/8, $D = 128$, per-head scales, CUDA-graph replays) are read below: the first kernel
# (2026-11-28), which converted each code to bf16 with one conversion instruction, and the current one.

# %%
runs = {
    "first kernel (11-28)": "features_H200_2026-11-28_b.json",
    "current kernel (11-29)": "features_H200_2026-11-29_decode_i.json",
}
speed = {}  # (run, shape, variant, layout) -> speed-up over the bf16 cache in the same run
for label, path in runs.items():
    run = _figures.result(path)
    assert run["env"]["gpu"] == "NVIDIA H200"
    for r in run["results"]:
        if r.get("phase") == "decode" and r.get("variant") in ("int8", "fp8") and "speedup_vs_plain" in r:
            speed[label, r["shape"], r["variant"], r["layout"]] = r["speedup_vs_plain"]
shapes = sorted({key[1] for key in speed})
print(f"{'shape':18s} {'cache':5s} {'layout':11s}" + "".join(f"{label:>24s}" for label in runs))
for shape in shapes:
    for variant in ("int8", "fp8"):
        for layout in ("contiguous", "paged64"):
            cells = "".join(f"{speed.get((label, shape, variant, layout), float('nan')):23.2f}x" for label in runs)
            print(f"{shape:18s} {variant.upper():5s} {layout:11s}{cells}")

fig, axes = plt.subplots(1, len(shapes), figsize=(11, 3.4), sharey=True)
for ax, shape in zip(axes, shapes):
    bars = [(v, lay) for v in ("int8", "fp8") for lay in ("contiguous", "paged64")]
    x = torch.arange(len(bars)).float()
    for k, label in enumerate(runs):
        ys = [speed.get((label, shape, v, lay), 0.0) for v, lay in bars]
        ax.bar(x + (k - 0.5) * 0.38, ys, width=0.38, label=label, color=["#bbbbbb", "#3366aa"][k])
    ax.axhline(2.0, color="k", ls="--", lw=1)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.text(len(bars) - 0.6, 2.03, "bound: half the bytes", ha="right", va="bottom", fontsize=8)
    ax.set_xticks(x.tolist(), [f"{v.upper()}\n{lay.replace('64', ' 64')}" for v, lay in bars], fontsize=8)
    ax.set_title(shape, fontsize=9)
axes[0].set_ylabel("speed-up over the bf16 cache")
axes[0].legend(fontsize=8, loc="upper left")
fig.tight_layout()
plt.show()

# %% [markdown]
# What changed between the grey bars and the blue ones (each step measured before it was kept:
# `bench/probes/decode_probe.py`, logs and predictions in `bench/NOTES.md`):
#
# - **Products in fp16, not bf16.** Both hold every int8 and e4m3 code exactly. But Hopper converts e4m3 to
#   fp16 with one instruction per *pair* of codes, while the path to bf16 takes several, and with half the
#   bytes per key the loop had become bound by those conversions. In fp16, FP8 went from 1.1× to 1.6×. The
#   query is converted too: a bf16 query is exact in fp16 as long as it stays inside fp16's range, which the
#   launcher checks (a query beyond ±65504 is refused with a `ValueError`, not turned into `inf`; an inflight
#   step in `gpt_attention`'s split mode bounds its generation queries from `qkv` before it writes the cache).
# - **INT8 four codes at a time.** A conversion instruction per code runs on the conversion units, at a
#   quarter of the integer rate. The kernel instead writes each byte (plus 128) into the low mantissa byte of
#   the fp16 number 1024.0, which then *reads* as $1024 + 128 + c$, and subtracts 1152 from two values at once
#   with one half2 instruction: about five integer and half2 operations per four codes (a trick from
#   NVIDIA's FasterTransformer). INT8 went from 1.31–1.37× to 1.36–1.48× contiguous: better, but the conversion
#   was only part of its bound.
#
# The INT8 trick is easy to check on the CPU, on every one of the 256 codes: put each byte (plus 128) under the
# high byte 0x64, read the 16 bits as fp16, subtract 1152.

# %%
codes = torch.arange(-128, 128, dtype=torch.int32)
bits = (codes + 128) | 0x6400  # 0x6400 is 1024.0 in fp16; the low byte lands in its mantissa
as_fp16 = bits.to(torch.int16).view(torch.float16)
print("1024 + 128 + c for c = -128, -1, 0, 127:", as_fp16[[0, 127, 128, 255]].tolist())
widened = as_fp16 - 1152.0
print("after subtracting 1152, every code is exact:", torch.equal(widened.float(), codes.float()))

# %% [markdown]
# The next two changes are for paged caches (lesson 04, section 7):
#
# - **The block table a tile ahead, with the page size fixed at compile time.** A tile's K/V addresses came
#   from a block-table load in the same iteration, so the loads could not be issued early; and dividing by a
#   page size known only at run time costs a long integer sequence per key. Loading the next tile's entries one
#   iteration ahead and compiling the page size in (so the division is a shift) took paged FP8 from 0.77–0.85×
#   (slower than bf16!) to 1.46–1.48×, and paged INT8 from 0.88–0.90× to 1.12–1.26×.
# - **One entry per tile** when the page is a multiple of the tile: one load and one base address for the whole
#   tile instead of a load and a 64-bit multiply-add per key. The FP8 loop over pages went from 1300 to 1033
#   instructions per 64-key tile (the contiguous loop has 1080), and at B8 the pages now run as fast as a
#   contiguous cache: INT8 1.23× → 1.39–1.41×, FP8 1.47× → 1.63×. At B1 the tuner prefers 128-key tiles, which cross
#   64-token pages and still read per key (INT8 1.16×, FP8 1.36× paged).
#
# The result still misses the 1.7× the project set itself. Where the time goes was measured with Nsight Compute
# (`bench/results/ncu_H200_2026-11-29/`): the one-byte loops use half the issue slots and mostly wait on shared-
# memory loads, with few programs per SM to hide the wait. The products want V's codes of consecutive keys
# side by side in one register, and in the cache's [key, feature] order those are a row apart, so V comes out
# of shared memory one byte per instruction (128 loads a thread per 64-key tile). The obvious fix, reading V as
# 32-bit words and handing it to the products through shared memory as fp16, cut the loop by 15–17% and ran
# *slower* (FP8 1.61× → 1.37×, `decode_probe_2026-11-29_r5.log`): the fp16 staging tile cost a resident
# program per SM, and latency, not instruction count, was the bound. FlashAttention-3's FP8 kernel transposes
# byte pairs with `ldmatrix` on the way out of shared memory, which Triton's language does not expose.
#
# ## 9. Choosing which byte a register holds: the Gluon kernel
#
# Gluon, Triton's lower-level dialect (lesson 17), lets a kernel name the *layout* of every tensor: which thread
# and which register holds each element. That opens a way around the transpose that needs no shared memory at
# all (`attn/fast/gluon_decode.py`, opt-in with `ATTN_GLUON_DECODE=1`).
#
# The tensor-core instruction `mma.m16n8k16` computes $C[m, n] = \sum_k A[m, k]\,B[k, n]$. Nothing in that sum
# cares *which* key is called $k = 0$: renumber the keys the same way in A (the probabilities P) and in B (the
# values V) and the product is unchanged. Renumber B's columns (the features of V) and the output's columns come
# out renumbered the same way, which the store can undo. So instead of moving bytes to where the instruction
# wants them, the kernel *renames* them: it loads V in whatever order reads memory best, and then declares that
# order to be the one the instruction expects.
#
# The picture shows one 16-key × 128-feature V tile of the cache, coloured by the lane of the warp that holds
# each byte. Left: the operand layout of `mma.m16n8k16` applied to the cache as stored. A lane holds keys
# $2t, 2t{+}1, 2t{+}8, 2t{+}9$ of one feature every 8 columns: 64 single bytes scattered over the tile, which is
# why the `tl.*` kernel reads them one instruction each. Right: the Gluon kernel's load. Each lane holds four
# consecutive keys × 16 consecutive features, four 16-byte loads, and the relabelling maps that block onto
# exactly the registers the instruction reads.

# %%
from attn.fast import gluon_decode as gd  # noqa: E402


def owners(reg_bases, lane_bases, shape):
    """[keys, features] -> the lane holding each element, from a layout's bases (a linear layout: an element's
    coordinates are the XOR of the bases of its register and lane bits)."""
    lane_of = torch.full(shape, -1)
    for lane in range(32):
        for reg in range(1 << len(reg_bases)):
            r, c = 0, 0
            for bit, (br, bc) in enumerate(reg_bases):
                if reg >> bit & 1:
                    r, c = r ^ br, c ^ bc
            for bit, (br, bc) in enumerate(lane_bases):
                if lane >> bit & 1:
                    r, c = r ^ br, c ^ bc
            lane_of[r, c] = lane
    return lane_of


# mma.m16n8k16's B operand for [16 keys, 128 features], one warp (printed by gl.to_linear_layout)
mma_b = owners([[1, 0], [8, 0], [0, 8], [0, 16], [0, 32], [0, 64]], [[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]],
               (16, 128))  # fmt: skip
lv = gd.layouts(128, 16)["LV"]
relabelled = owners(lv.reg_bases, lv.lane_bases, (16, 128))
assert (mma_b >= 0).all() and (relabelled >= 0).all()  # every byte of the tile is held by exactly one lane

cmap = plt.get_cmap("tab20b", 32)
fig, axes = plt.subplots(1, 2, figsize=(11, 2.6), sharey=True)
for ax, owner, title in ((axes[0], mma_b, "mma operand layout on the cache as stored: single bytes"),
                         (axes[1], relabelled, "the Gluon kernel's load: 4 keys x 16 features a lane")):  # fmt: skip
    ax.imshow(owner, cmap=cmap, aspect="auto", interpolation="nearest", vmin=-0.5, vmax=31.5)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("feature (bytes of one key, as stored)")
axes[0].set_ylabel("key")
fig.tight_layout()
plt.show()


def runs(owner):
    """Bytes per contiguous run that one lane holds within a key's row (what a single load can fetch)."""
    same = (owner[:, 1:] == owner[:, :-1]).sum().item()
    return owner.numel() / (owner.numel() - same)


print(f"bytes per contiguous run a lane holds: mma layout {runs(mma_b):.0f}, Gluon load {runs(relabelled):.0f}")

# %% [markdown]
# The renaming is a permutation of index *bits*: the kernel reshapes the loaded tile into single bits
# (`[2, 2, ..., 2]`), permutes them, and reshapes back; Triton's `convert_layout(..., assert_trivial=True)` then
# fails to compile unless the result already *is* the instruction's layout, so the compiler proves that no
# data moves. The same bit permutation is applied to the keys of K (so P's columns match V's rows) and to Q's
# features (so Q·Kᵀ pairs each feature with itself). The check below does the renaming on index tensors and
# confirms, on the CPU, that a product computed in renamed order equals the product in stored order.

# %%
keys_map, v_map = gd.key_map(), gd.v_dim_map(128)
perm_keys = torch.tensor([gd.phys_index(n, keys_map) for n in range(16)])  # logical key -> stored key
perm_feat = torch.tensor([gd.phys_index(j, v_map) for j in range(128)])  # logical feature -> stored feature
p_stored = torch.rand(4, 16, dtype=torch.float64)  # 4 query heads' probabilities over the tile's 16 keys
v_stored = torch.randn(16, 128, dtype=torch.float64)
o_renamed = p_stored[:, perm_keys] @ v_stored[perm_keys][:, perm_feat]  # what the mma computes
o = torch.empty_like(o_renamed)
o[:, perm_feat] = o_renamed  # the store puts logical column j at stored feature perm_feat[j]
print("renamed product == stored product:", torch.allclose(o, p_stored @ v_stored))

# %% [markdown]
# With no shared memory and no byte-by-byte loads, the key loop compiles to 318 instructions per 16 keys for
# FP8 and 414 for INT8 on one warp (`bench/probes/gluon_decode_sass.py`, sm_90a), against about 900 and 1080
# per 64 keys on four warps in the `tl.*` kernel: 2.6–2.8× fewer instructions per byte. Whether that turns into
# speed is a GPU question, and on an H100 the answer was no: 1.2–2.1 TB/s, 0.55–0.81× the `tl.*` kernel
# (`bench/results/gpu_s11_H100_2026-12-07.log`). Counting instructions predicts an issue-bound loop; this one is
# bound elsewhere (latency or memory-level parallelism are the suspects, unprofiled yet), which is why it stays
# opt-in and why a prediction gets measured before it becomes the default.
#
# ## Summary
#
# - An 8-bit KV cache halves the bytes a decode step reads (so up to 2× faster attention, 1.6–1.9× published
#   for FP8) and doubles the tokens that fit in memory; a stored code $c$ means $c \cdot s$.
# - INT8 has a uniform grid (absolute error ≤ $s/2$); FP8 e4m3 a relative one (≤ $2^{-4}$ of the value, over
#   $2^{-6}$ to 448, subnormals below). Out-of-range values clamp to ±127 or ±448 in `attn`; a bare cast to
#   int8 would wrap.
# - Granularity: TensorRT-LLM's single shared scale lets K's loudest outlier set V's step too. Separate K/V
#   scales and per-head scales cost a few bytes and matter a lot for INT8; FP8 is far less sensitive.
# - Calibrate with the maximum over samples (`attn.calibrate_kv_scales`); later values beyond it are clipped,
#   never wrapped. INT8 is sensitive to the scale, FP8 hardly.
# - Kernels dequantize for free: int8 and e4m3 values convert exactly to fp16/bf16, $s_k$ multiplies the scores
#   and $s_v$ the output, which is exact because the scales are constant along the summed index.
# - Live: the Triton append writes the reference's bytes; the Triton decode on a quantized cache matches the
#   reference on it, contiguous and paged.
# - Speed on the H200: FP8 1.51–1.63× the bf16 cache contiguous and 1.36–1.63× paged, INT8 1.36–1.42× and
#   1.16–1.40×, after moving the products to fp16, making the conversions cheap and the paged addresses per
#   tile; the 2× bound (and the project's 1.7× target) is not reached.
