# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Semantics: what each argument means, and where the well-known libraries differ
#
# Attention has one formula and many conventions. This page states `attn`'s, one topic at a time, and puts
# each beside PyTorch SDPA, FlashAttention (FA), FlashInfer (FI), TensorRT-LLM (TRT) and vLLM. Every claim
# about `attn` is checked live below when the site is built. SDPA runs on a CPU, so its checks are live as
# well. The others need a GPU: for those, the page states their documented convention with its source, and
# checks the consequence that matters (for example, that two bias forms give the same weights) with the
# reference.
#
# The short version:
#
# | topic | `attn` | differs in |
# |---|---|---|
# | layout | `[B, S, H, D]`, packed `[T, H, D]` + int32 `cu_seqlens` | SDPA, FlexAttention: `[B, H, S, D]` |
# | causal with `Sq != Sk` | bottom-right: key `j` visible iff `j <= i + Sk - Sq` | SDPA `is_causal`: top-left |
# | sliding window | `window_size=(left, right)`, inclusive, `-1` unbounded | TRT: one size `N` = `(N - 1, 0)` |
# | scale | `softmax_scale / q_scaling`, then soft-cap | T5 models: no `1/sqrt(D)` (`q_scaling = 1/sqrt(D)`) |
# | ALiBi | `+slope * (j - i')`, added after scaling (or before: `alibi_with_scale`) | FA: `-slope * abs(i' - j)` |
# | T5 bias | implicit mode: a `[H, buckets]` table, bucketed in the kernel | TRT regular mode: `[H, L, L]` |
# | row that sees no key | zeros, `lse = -inf` | older SDPA, naive softmax: NaN |
# | row that sees a NaN | NaN | kernels that zero it hide the bug |
# | out-of-range lengths, table entries | clamped in the kernel, raised by `attn.check_errors()` | FA, FI: not checked |
# | same call, same inputs | bitwise-equal outputs, split-K included | splits merged by atomics: last bits vary |
# | gradients | none: forward only | FA, SDPA, FlexAttention train |
# | contiguous cache | `[B, max_len, Hkv, D]` | TRT: `[B, 2, Hkv, max_len, D]` |
# | paged cache | pools `[blocks, block_size, Hkv, D]` + `block_table [B, max_blocks]` | FI: CSR indices; TRT: offsets |

# %%
import textwrap

import torch
import torch.nn.functional as F

import attn
from attn import reference

torch.manual_seed(0)


def sdpa(q, k, v, **kw):
    """SDPA on attn's layout: [B, S, H, D] in, [B, S, H, D] out (SDPA itself wants [B, H, S, D])."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw).transpose(1, 2)


def close(a, b) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


# %% [markdown]
# ## Layouts: sequence before heads
#
# `attn` takes FlashAttention's padded `[B, S, H, D]`; SDPA and FlexAttention take `[B, H, S, D]`. Both are
# 4-d tensors of the same rank, so a tensor in the wrong layout is **not** an error whenever the shapes happen
# to fit (`H` and `S` swap roles): `attn` cannot tell, and computes attention across heads instead of across
# tokens. Transpose at the boundary: `q.transpose(1, 2)`. A check that can catch it: the head count of `k`
# must divide the head count of `q`, and a cache's head count must equal `k`'s.

# %%
B, S, H, D = 2, 6, 4, 8
q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
ours = reference.attention(q, k, v)
print("attn [B,S,H,D] == SDPA on the transposed tensors:", close(ours, sdpa(q, k, v)))
wrong = reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
print("the same tensors in SDPA's layout, passed as they are, run without error and give another answer:",
      not close(ours, wrong))  # fmt: skip

# %% [markdown]
# ## Causal alignment
#
# With `Sq` queries and `Sk` keys, the queries are the *last* `Sq` tokens: query `i` sits at position
# `i + Sk - Sq` and sees keys up to it (bottom-right alignment). FA from version 2.1, TRT, vLLM and FI all
# align this way. SDPA's `is_causal=True` aligns top-left (query `i` sees keys `0..i`); its
# `torch.nn.attention.bias.causal_lower_right` gives the bottom-right mask. The two agree only when
# `Sq == Sk`.

# %%
sq, sk = 3, 7
q = torch.randn(1, sq, 2, D)
k, v = torch.randn(1, sk, 2, D), torch.randn(1, sk, 2, D)
ours = reference.attention(q, k, v, causal=True)
bottom_right = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
print("attn causal == SDPA with a bottom-right mask:", close(ours, sdpa(q, k, v, attn_mask=bottom_right)))
print("attn causal == SDPA is_causal=True (top-left):", close(ours, sdpa(q, k, v, is_causal=True)))
print("visible keys per query, bottom-right:", bottom_right.sum(1).tolist(), " top-left:", list(range(1, sq + 1)))

# %% [markdown]
# ## Sliding windows
#
# `window_size=(left, right)` is FA's: key `j` is visible from query `i` iff
# `i' - left <= j <= i' + right` with `i' = i + Sk - Sq`, both ends inclusive, `-1` for unbounded. TRT and
# Mistral describe a window by one size `N` (the query and the `N - 1` keys before it): that is `(N - 1, 0)`
# with `causal=True`. vLLM's `sliding_window` is `N` as well. Note that Hugging Face's Mistral config counts
# differently across versions; check which of `N` or `N - 1` earlier keys a model was trained with.

# %%
N = 3
q, k, v = (torch.randn(1, 8, 2, D) for _ in range(3))
ours = reference.attention(q, k, v, causal=True, window_size=(N - 1, 0))
i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
band = (j <= i) & (j > i - N)
print(f"window (N-1, 0) == SDPA with a band of {N} keys:", close(ours, sdpa(q, k, v, attn_mask=band)))

# %% [markdown]
# ## The scale, and the order of scale, bias and soft-cap
#
# The score is `s = q.k * softmax_scale / q_scaling`, with `softmax_scale = 1/sqrt(D)` by default
# (`q_scaling` is TRT's name; T5 models train without `1/sqrt(D)`, which is `q_scaling = 1/sqrt(D)`).
# Soft-capping (Gemma 2, TRT's `attn_logit_softcapping_scale`, FA's `softcap`) then maps `s` to
# `cap * tanh(s / cap)`. ALiBi is added after the scale (`alibi_mode="alibi"`), or before it
# (`"alibi_with_scale"`: `(q.k + bias) * scale`, TRT's second mode).

# %%
q, k, v = (torch.randn(1, 5, 2, D) for _ in range(3))
scale, qs, cap = 0.3, 2.0, 5.0
ours = reference.attention(q, k, v, softmax_scale=scale, q_scaling=qs, softcap=cap)
s = torch.einsum("bihd,bjhd->bhij", q, k) * (scale / qs)
by_hand = torch.einsum("bhij,bjhd->bihd", torch.softmax(cap * torch.tanh(s / cap), -1), v)
print("scale / q_scaling, then soft-cap:", close(ours, by_hand))

# %% [markdown]
# ## ALiBi: two forms that agree under a causal mask, and one that does not
#
# `attn` and TRT add `slope * (j - i')` to the score of key `j` (TRT's kernels add `slope * j`, which differs
# by a constant per row: the weights are the same, the log-sum-exp is not). FA's `alibi_slopes` adds
# `-slope * abs(i' - j)` (source: `flash_attn_interface.py`, "bias of (-alibi_slope * |i + seqlen_k - seqlen_q - j|)").
# For causal rows `j <= i'`, so the two are equal. Without a causal mask, keys to the right get a positive bias
# in our form and a negative one in FA's: **bidirectional ALiBi differs between FA and TRT**. The slopes are
# TRT's (`generate_alibi_slopes`; Bloom in Hugging Face uses the same numbers).

# %%
sq = sk = 6
q, k, v = (torch.randn(1, sq, 4, D) for _ in range(3))
slopes = attn.alibi_slopes(4)
i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
fa_bias = -slopes[:, None, None] * (i - j).abs()  # FA's form, [H, Sq, Sk]
for causal in (True, False):
    ours = reference.attention(q, k, v, causal=causal, alibi_slopes=slopes)
    mask = fa_bias.masked_fill(j > i, float("-inf")) if causal else fa_bias
    fa_form = sdpa(q, k, v, attn_mask=mask[None])
    print(f"causal={causal}: attn == FA's ALiBi form: {close(ours, fa_form)}")

# %% [markdown]
# ## T5's relative bias: implicit and regular forms
#
# T5 adds a learned bias per head and *bucket* of the relative position `j - i`: exact for small
# distances, logarithmic up to `max_distance`, shared beyond. TRT offers it in two forms, and so does
# `attn.RelativeBias`: implicit (`table [H, num_buckets]`, bucketed inside the kernel, never materializing an
# `Sq x Sk` tensor) and regular (`bias [H, L, L]`, precomputed). The buckets are Hugging Face's
# `T5Attention._relative_position_bucket`; lesson 08 checks them over every distance.

# %%
from attn.reference.relative_bias import relative_bias_matrix  # noqa: E402

table = torch.randn(2, 32)
implicit = attn.RelativeBias(table=table, max_distance=128, bidirectional=True)
dense = relative_bias_matrix(implicit, 10, 10)  # what regular mode would carry: [H, Sq, Sk]
regular = attn.RelativeBias(bias=dense)
q, k, v = (torch.randn(1, 10, 2, D) for _ in range(3))
a = reference.attention(q, k, v, rel_bias=implicit, q_scaling=1 / D**0.5)
b = reference.attention(q, k, v, rel_bias=regular, q_scaling=1 / D**0.5)
print("implicit table == the regular [H, Sq, Sk] tensor it implies:", close(a, b), tuple(dense.shape))

# %% [markdown]
# ## Rows that see no key, and rows that see a NaN
#
# The rule: **a row that sees no key is zero; a row that sees a NaN is NaN.**
#
# A query row with no visible key (a padded query, a window that excludes everything) outputs **zeros** and
# `lse = -inf`. A row that sees a non-finite score or value gives **NaN**, never zeros: a zero there would
# hide an upstream bug. Values outside the visible keys never reach any output, whatever they hold. The
# Triton kernel (run here through Triton's CPU interpreter) must give what the reference gives. The table
# prints the rule beside what each one returned on this build: a cell that disagrees with the rule is a bug,
# and the last column says so.
#
# SDPA's answer for a fully masked row changed across versions: older releases return NaN, the one on this
# machine returns what the cell prints.


# %%
def with_nan(x, pos):
    x = x.clone()
    x[0, pos] = float("nan")
    return x


q, k, v = (torch.randn(2, 4, 1, 16) for _ in range(3))
# (what, query row, expected NaN?, q, k, v); causal, so row r sees keys 0..r
cases = [
    ("a value the row sees", 3, True, q, k, with_nan(v, 3)),
    ("a key the row sees", 3, True, q, with_nan(k, 3), v),
    ("a value only later rows see", 1, False, q, k, with_nan(v, 3)),
    ("a key only later rows see", 1, False, q, with_nan(k, 3), v),
]
print(f"{'NaN in':<30}{'row':>4}  {'rule':<8}{'reference':<11}{'kernel':<8}")
for what, row, nan, q_, k_, v_ in cases:
    got = [reference.attention(q_, k_, v_, causal=True), attn.attention(q_, k_, v_, causal=True)]
    cells = ["NaN" if o[0, row].isnan().any() else "finite" for o in got]
    rule = "NaN" if nan else "finite"
    verdict = "" if cells == [rule, rule] else "  <- differs from the rule: a bug"
    print(f"{what:<30}{row:>4}  {rule:<8}{cells[0]:<11}{cells[1]:<8}{verdict}")

seqlens_k = torch.tensor([4, 0], dtype=torch.int32)  # sequence 1 has no keys at all
for name, fn in (("reference", reference.attention), ("kernel", attn.attention)):
    out, lse = fn(q, k, v, seqlens_k=seqlens_k, return_lse=True)
    print(f"{name}: a row with no key gives zeros: {bool((out[1] == 0).all())}, lse {lse[1].unique().tolist()}")
mask = torch.zeros(1, 1, dtype=torch.bool)
print(
    "SDPA on this machine, a fully masked row:",
    sdpa(q[:1, :1], k[:1, :1], v[:1, :1], attn_mask=mask)[0, 0, 0, :3].tolist(),
)


# %% [markdown]
# ## Bad index values: no sync by default, `attn.check_errors()`
#
# A default call checks shapes, dtypes and devices on the host, which is free, but never reads a tensor's
# *values* back to the host: reading `cache_seqlens` or a block table would wait for the GPU, halve a decode
# step's speed and forbid CUDA-graph capture. The kernels instead clamp every index they take from a tensor
# (lengths, block-table entries, beam indirection, `cu_seqlens`) into range, so no input makes them read or
# write outside their tensors, and record the violation in a per-device error word. The contract:
#
# - default (`validate=None`, `ATTN_DEBUG` unset): no sync; a bad value gives a clamped, meaningless output
#   and a recorded error, which `attn.check_errors()` raises as a `ValueError` (it syncs; call it after a step);
# - `validate=True` on a call, or `ATTN_DEBUG=1` in the environment: the values are checked on the host first,
#   and a bad call raises before anything is launched or written;
# - the reference always validates.
#
# FA and FI do not check these values; what an out-of-range entry does there is undefined.

# %%
kc, vc = torch.randn(1, 8, 1, 16), torch.randn(1, 8, 1, 16)
qd = torch.randn(1, 1, 1, 16)
too_long = torch.tensor([12], dtype=torch.int32)  # 12 tokens claimed, the cache holds 8
out = attn.decode(qd, kc, vc, too_long)  # no sync, no error yet: the kernel read 8 tokens
print("default call returned, output finite:", bool(out.isfinite().all()))
try:
    attn.check_errors()
except ValueError as err:
    print("attn.check_errors() raises:\n ", "\n  ".join(textwrap.wrap(str(err), 100)))
try:
    attn.decode(qd, kc, vc, too_long, validate=True)
except ValueError as err:
    print("validate=True raises at once:\n ", "\n  ".join(textwrap.wrap(str(err), 100)))

# %% [markdown]
# ## Determinism
#
# Every `attn.fast` entry is run-to-run deterministic on one GPU for one kernel configuration: the same inputs,
# options, split count and tile configuration give **bitwise-equal** outputs, split-K decode included. Each
# split's partial output and LSE come from one program, and the last program of a (sequence, KV head) pair
# merges the partials in split order, whichever program arrives last; no kernel accumulates through
# floating-point atomics. What changes the last bits: another split count (`num_splits=None` picks it from the
# shapes and the GPU's SM count), another autotuned tile (`ATTN_AUTOTUNE=0` fixes the tiles), another GPU model
# or Triton version. Inside a program, every lane that holds a copy of one reduced value must compute it
# bit for bit alike, or the copies race for the same shared-memory slot: compute-sanitizer's racecheck found
# that in the split merge (the compiler fused the summed products into the reduction on some lanes and not on
# others), and those products are now rounded explicitly (`attn.fast._triton.mul_rn`). The GPU test
# (`tests/test_determinism.py`) runs each entry 20 times; here, one split-K decode run twice:

# %%
kc, vc = torch.randn(2, 64, 1, 16), torch.randn(2, 64, 1, 16)
qd = torch.randn(2, 1, 2, 16)
lens = torch.tensor([64, 37], dtype=torch.int32)
a, b = (attn.decode(qd, kc, vc, lens, num_splits=4) for _ in range(2))
print("split-K decode (4 splits), two runs bitwise equal:", torch.equal(a.view(torch.int32), b.view(torch.int32)))

# %% [markdown]
# ## Forward only
#
# `attn` is the attention of *inference*: the Triton kernels have no backward pass. When an input requires
# gradients, the call goes through `attn`'s custom operator, whose backward raises
# `attn is forward-only (inference); .backward() is not supported`. The reference is plain PyTorch and
# differentiable, which is useful for tests, not for training speed. Train with SDPA, FA or FlexAttention.

# %%
q = torch.randn(1, 4, 2, 16, requires_grad=True)
try:
    attn.attention(q, q.detach(), q.detach()).sum().backward()
except RuntimeError as err:
    print("attn.attention(...).backward():", err)
reference.attention(q, q.detach(), q.detach()).sum().backward()
print("attn.reference.attention(...).backward(): gradient of shape", tuple(q.grad.shape))

# %% [markdown]
# ## KV-cache layouts
#
# | library | contiguous cache | paged cache |
# |---|---|---|
# | `attn` | `[B, max_len, Hkv, D]` for K and V, `cache_seqlens [B]` | `[blocks, block_size, Hkv, D]`, `block_table` |
# | FA (`flash_attn_with_kvcache`) | `[B, max_len, Hkv, D]` | the same pools and `block_table` |
# | vLLM | — | `[2, num_blocks, block_size, Hkv, D]` (its FlashAttention backend): our pools stacked |
# | FI | — | CSR: `kv_indptr [B+1]`, `kv_indices`, `kv_last_page_len [B]`, pages `[.., page_size, H, D]` (NHD) |
# | TRT | `[B, 2, Hkv, max_len, D]` | pool `[num_blocks, 2, Hkv, block_size, D]`, block offsets `[B, 2, max_blocks]` |
#
# Sources: FA's `flash_attn_interface.py`, vLLM's `vllm/v1/attention/backends/flash_attn.py`
# (`get_kv_cache_shape`), FlashInfer's `docs/tutorials/kv_layout.rst`, TensorRT-LLM's
# `docs/source/advanced/gpt-attention.md`.
# `attn.kv_cache` converts our paged metadata to FI's and TRT's; the checks below read one token through
# each layout and find the same vector.

# %%
from attn.kv_cache import to_flashinfer, to_trtllm  # noqa: E402

block_size, blocks, Hkv = 4, 8, 2
k_pool, v_pool = torch.randn(blocks, block_size, Hkv, D), torch.randn(blocks, block_size, Hkv, D)
block_table = torch.tensor([[5, 2, 7], [1, 0, 3]], dtype=torch.int32)
cache_seqlens = torch.tensor([10, 6], dtype=torch.int32)
b, t = 0, 9  # token 9 of sequence 0
ours = k_pool[block_table[b, t // block_size], t % block_size]

indptr, indices, last_page_len = to_flashinfer(block_table, cache_seqlens, block_size)
fi = k_pool[indices[indptr[b] + t // block_size], t % block_size]
trt_pool, offsets = to_trtllm(k_pool, v_pool, block_table)
# offsets index the pool viewed as [num_blocks * 2, Hkv, block_size, D]: K of block i at 2i, V at 2i + 1
trt = trt_pool.flatten(0, 1)[offsets[b, 0, t // block_size], :, t % block_size]
print("FlashInfer CSR reads the same key:", torch.equal(ours, fi), " last page lengths:", last_page_len.tolist())
print("TRT-LLM pool and block offsets read the same key:", torch.equal(ours, trt))
