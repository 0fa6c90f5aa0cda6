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
# # Cross attention
#
# Encoder-decoder models (T5, BART, Whisper, many translation models) read their input with an encoder and
# write their output with a decoder. Each decoder layer attends twice:
#
# - **self-attention** over the decoder's own tokens, causal, with a KV cache that grows by one token per
#   step, exactly as in a GPT-style model (T5 adds its relative position bias here);
# - **cross attention** from the decoder's queries to the *encoder's* output, with no mask at all: every
#   decoder token may look at every input token.
#
# The encoder's keys and values do not change while the decoder runs, so they are computed once per request
# and kept in a *cross KV cache*: TensorRT-LLM's `cross_kv_cache`, read with `encoder_input_lengths`. This
# lesson shows:
#
# 1. the two masks side by side;
# 2. filling the cross cache once, contiguous or paged, with `attn.append_kv`;
# 3. `attn.cross_attention` for decoder steps and for a whole decoder prompt, checked live;
# 4. a decoder step with T5's relative bias in self-attention and cross attention after it;
# 5. what the cross cache costs in memory, and why it is written only once.
# 6. a tiny T5-style model served with continuous batching, every token checked (`python -m attn.demo_encdec`).

# %%
import matplotlib.pyplot as plt
import torch

import attn
from attn import RelativeBias, reference
from attn.layout import cu_seqlens_from_lengths

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


# %% [markdown]
# ## 1. Two masks
#
# A decoder that has produced 6 tokens, over an encoder input of 9 tokens. Self-attention: token `i` sees
# decoder tokens `0..i`. Cross attention: every decoder token sees all 9 encoder tokens, and nothing else;
# padding past a request's `encoder_input_length` is the only thing hidden.

# %%
dec, enc = 6, 9
self_mask = reference.attention_mask(dec, dec, window_size=(-1, 0))
cross_mask = torch.ones(dec, enc, dtype=torch.bool)
fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3), gridspec_kw={"width_ratios": [dec, enc]})
a1.imshow(self_mask, cmap="Blues", vmin=0, vmax=1.4)
a1.set_title("decoder self-attention: causal", fontsize=9)
a1.set_xlabel("decoder key")
a1.set_ylabel("decoder query")
a2.imshow(cross_mask, cmap="Oranges", vmin=0, vmax=1.4)
a2.set_title("cross attention: every encoder token", fontsize=9)
a2.set_xlabel("encoder key")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The cross cache, filled once
#
# The cross cache has the same layouts as any KV cache: contiguous `[B, max_len, Hkv, D]` or a pool of blocks
# with a block table. Filling it is an append into an empty cache: `cache_seqlens` all zero, the encoder's
# keys and values packed with `cu_seqlens`. Three requests with encoder inputs of 9, 3 and 14 tokens, into a
# paged cross cache of 4-token blocks:

# %%
HQ, HKV, D, BLOCK = 4, 2, 16, 4
enc_lens = [9, 3, 14]
B = len(enc_lens)
cu_enc = cu_seqlens_from_lengths(torch.tensor(enc_lens, dtype=torch.int32, device=device))
k_enc = torch.randn(sum(enc_lens), HKV, D, device=device)  # the encoder output through each layer's K/V projections
v_enc = torch.randn_like(k_enc)

cross = attn.PagedKVCache(num_blocks=16, block_size=BLOCK, num_heads_kv=HKV, head_dim=D, max_seqs=B,
                          max_blocks_per_seq=4, dtype=torch.float32, device=device)  # fmt: skip
slots = [cross.add_sequence() for _ in range(B)]
cross.append(slots, k_enc, v_enc, cu_seqlens_new=cu_enc)
encoder_lengths, table = cross.metadata(slots)
print("encoder_lengths", encoder_lengths.tolist())
print("block table\n", table)

# %% [markdown]
# ## 3. `attn.cross_attention`
#
# A generation step brings one decoder token per request: `q [B, 1, Hq, D]`. Each reads its own request's
# encoder keys through the block table, unmasked. With one (or a few) queries per request, `attn.cross_attention`
# runs the split-K decode kernel, which is built for a few queries over many keys; for a decoder prompt (many
# tokens at once) it runs the fused context kernel. Both against the reference, and against plain
# non-causal attention over the encoder's K/V:

# %%
q_step = torch.randn(B, 1, HQ, D, device=device)
got = attn.cross_attention(q_step, cross.k, cross.v, encoder_lengths, block_table=table)
want = reference.cross_attention(q_step, cross.k, cross.v, encoder_lengths, block_table=table)
plain = attn.attention(q_step.reshape(B, HQ, D), k_enc, v_enc,
                       cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32, device=device), cu_seqlens_k=cu_enc,
                       causal=False).view(B, 1, HQ, D)  # fmt: skip
print(
    f"decode step: vs reference {maxdiff(got, want):.1e}, vs plain attention over the encoder {maxdiff(got, plain):.1e}"
)

q_prompt = torch.randn(B, 5, HQ, D, device=device)  # a 5-token decoder prompt per request
got = attn.cross_attention(q_prompt, cross.k, cross.v, encoder_lengths, block_table=table)
want = reference.cross_attention(q_prompt, cross.k, cross.v, encoder_lengths, block_table=table)
print(f"5-token decoder prompts: vs reference {maxdiff(got, want):.1e}")

# %% [markdown]
# Asking for more encoder tokens than the cross cache holds is refused by name:

# %%
try:
    attn.cross_attention(q_step, cross.k, cross.v, encoder_lengths + 20, block_table=table)
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ## 4. A decoder step, the T5 way
#
# T5's decoder adds a learned relative position bias to its self-attention scores (lesson 08): implicit mode,
# a `[Hq, num_buckets]` table, unidirectional buckets for a decoder. T5 also drops the `1/sqrt(D)` scale
# (`softmax_scale=1`, TensorRT-LLM's `q_scaling`). One decoder step of one layer, for every request: append the
# new token's k/v to the self-attention cache, attend over it with the bias, then attend to the encoder.

# %%
self_cache = attn.PagedKVCache(num_blocks=16, block_size=BLOCK, num_heads_kv=HKV, head_dim=D, max_seqs=B,
                               max_blocks_per_seq=4, dtype=torch.float32, device=device)  # fmt: skip
self_slots = [self_cache.add_sequence() for _ in range(B)]
# the decoder tokens produced so far: 3, 7 and 1
for s, n in zip(self_slots, (3, 7, 1)):
    self_cache.append([s], torch.randn(1, n, HKV, D, device=device), torch.randn(1, n, HKV, D, device=device))
rel = RelativeBias(table=torch.randn(HQ, 32, device=device), max_distance=128, bidirectional=False)

q_new, k_new, v_new = (torch.randn(B, 1, h, D, device=device) for h in (HQ, HKV, HKV))
self_cache.append(self_slots, k_new, v_new)
lens, self_table = self_cache.metadata(self_slots)
h_self = attn.decode(q_new, self_cache.k, self_cache.v, lens, block_table=self_table, rel_bias=rel,
                     softmax_scale=1.0)  # fmt: skip
h_self_ref = reference.decode(q_new, self_cache.k, self_cache.v, lens, block_table=self_table, rel_bias=rel,
                              softmax_scale=1.0)  # fmt: skip
h_cross = attn.cross_attention(h_self, cross.k, cross.v, encoder_lengths, block_table=table, softmax_scale=1.0)
h_cross_ref = reference.cross_attention(h_self_ref, cross.k, cross.v, encoder_lengths, block_table=table,
                                        softmax_scale=1.0)  # fmt: skip
print(f"self-attention with T5 bias vs reference {maxdiff(h_self, h_self_ref):.1e}; "
      f"then cross attention {maxdiff(h_cross, h_cross_ref):.1e}")  # fmt: skip

# %% [markdown]
# (A real layer projects the self-attention output before using it as the cross-attention query; the
# projection is left out here, the attention steps are what `attn` provides.)
#
# ## 5. Memory: written once, read every step
#
# Per request and layer, the cross cache holds `2 · L_enc · Hkv · D` values, the self-attention cache
# `2 · L_dec · Hkv · D`. For a Whisper-like decoder (32 layers, 20 heads of 64, 1500 encoder frames, bf16) the
# cross cache is a fixed 7.3 MiB per request and layer; over the 32 layers:

# %%
layers, heads, d, frames = 32, 20, 64, 1500
cross_bytes = 2 * frames * heads * d * 2 * layers
print(f"cross cache per request: {cross_bytes / 2**20:.0f} MiB, written once by the encoder pass")
for dec_tokens in (50, 200, 448):
    self_bytes = 2 * dec_tokens * heads * d * 2 * layers
    print(f"  self cache after {dec_tokens:3d} decoder tokens: {self_bytes / 2**20:5.1f} MiB")

# %% [markdown]
# For speech and translation the cross cache is often the larger of the two, and it is read in full at every
# step: a decode step's cross attention is as memory-bound as its self-attention, which is why the decode
# kernel (split-K over the encoder length, GQA-packed, INT8/FP8 if the cross cache is quantized) serves it.
#
# ## 6. The encoder-decoder demo
#
# `python -m attn.demo_encdec` puts the pieces into a served model, the encoder-decoder twin of lesson 12's demo.
# A tiny T5-style model with random weights (2 encoder and 2 decoder layers, GQA 4/2, T5's relative bias in both
# stacks and no `1/sqrt(D)`) serves a stream of requests, each a source text plus a short decoder prompt:
#
# - on admission, the request's source runs through the encoder: `attn.attention` over the packed sources of
#   every request admitted at that step, non-causal, bidirectional T5 buckets. Its output, projected once per
#   decoder layer, goes into a **paged cross cache** (a second `attn.PagedKVCache` with its own pool and table);
# - every step, each decoder layer runs `attn.gpt_attention` (causal, unidirectional T5 buckets, no RoPE) over a
#   paged self-attention cache for the whole mix of prompt chunks and generation tokens, then
#   `attn.cross_attention` of the same rows over each request's encoder keys and values (the prompt chunks'
#   rows packed, on the context kernel; the generation rows as one-token queries, on the decode kernel);
# - a finished request returns its self-attention blocks and its cross blocks.
#
# Every sampled token's logits are compared with a float32 recompute that has no cache at all: the encoder over
# the source and the decoder over the whole sequence so far, with plain PyTorch softmax attention. Both paths
# compute in float32 and differ only in summation order (~1e-7), so the tolerance is 1e-4; a mismatch stops the
# run (the tests corrupt one cross-attention row, or swap the two stacks' bucket functions, and see it stop).

# %%
from attn import demo_encdec  # noqa: E402

report = demo_encdec.main([])

# %%
fig, ax = plt.subplots(figsize=(8, 3))
steps = range(len(report["blocks_used"]))
ax.step(steps, report["blocks_used"], where="post", label=f"self-attention blocks (of {report['num_blocks']})")
ax.step(steps, report["cross_blocks_used"], where="post", label=f"cross blocks (of {report['cross_num_blocks']})")
ax.step(steps, report["running"], where="post", label="requests running")
ax.set_xlabel("step")
ax.set_title(f"{report['requests']} requests, all {report['logits_checked']} sampled tokens checked against "
             f"the cache-free recompute", fontsize=9)  # fmt: skip
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The two pools behave differently. A request's cross blocks are all taken at once, when its encoder runs, and
# stay constant until it finishes; its self-attention blocks grow with its prompt chunks and output. Here the
# cross pool is the one that runs full (long sources, short outputs), so it is what holds new requests back:
# the scheduler admits a request only when both pools can take it.
#
# ## Summary
#
# - Cross attention is unmasked attention from decoder queries to the encoder's keys and values.
# - The encoder's K/V go into a cross KV cache once per request (`append_kv` into an empty cache, contiguous or
#   paged); every decoder step reads it with `encoder_lengths`.
# - `attn.cross_attention` takes padded or packed queries; few per request run on the decode kernel, many on
#   the context kernel; both are checked against the reference.
# - T5's relative bias belongs to self-attention (the encoder's with bidirectional buckets, the decoder's with
#   past-only ones); cross attention has no positional bias.
# - `python -m attn.demo_encdec` serves a tiny T5-style model with continuous batching over a paged
#   self-attention cache and a paged cross cache, checking every token against a cache-free recompute.
