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
# # Using attn from transformers
#
# Hugging Face transformers looks its attention up by name: every modern decoder calls
# `ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, attention_mask, ...)`, and
# builds the mask with the function registered under the same name in `AttentionMaskInterface`. Registering
# both under `"attn"` is all it takes to run a model through our kernels:
#
# 1. `register()`, then `model.set_attn_implementation("attn")` (or `attn_implementation="attn"` at load);
# 2. what transformers hands the function, and how a padding mask becomes lengths;
# 3. the same logits and the same greedy tokens as eager attention, with transformers' cache and with our
#    `PagedCache`;
# 4. what one decode step spends its time on.
#
# The model here is a tiny Llama with random weights, built from a config (no download), in float32 so that the
# comparison with eager is tight. On a machine without a GPU the kernels run in Triton's interpreter.

# %%
import time
import warnings

import matplotlib.pyplot as plt
import torch

import attn.integrations.transformers as attn_hf  # imports attn first: on a CPU it sets up Triton's interpreter

attn_hf.register()
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402  (after attn, see above)

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
model = LlamaForCausalLM(config).eval()
device = "cuda" if torch.cuda.is_available() else "cpu"
model = model.to(device)

# %% [markdown]
# ## What the attention function receives
#
# `query [B, Hq, Sq, D]` and `key`/`value [B, Hkv, Sk, D]` in HF's layout (a transpose of our `[B, S, H, D]`
# views: no copy), the module (for `is_causal` and `scaling`; Gemma's `query_pre_attn_scalar` arrives as
# `scaling`), `sliding_window` and `softcap` as keywords, and the mask. Because `"attn"` is also a mask
# implementation, the mask is what FlashAttention-2 gets: `None` when every key is valid, else the 2-D padding
# mask. Left padding (what `generate` wants) makes each row's valid keys one run of columns:

# %%
ids = torch.randint(2, 100, (3, 12), device=device)
mask = torch.ones(3, 12, dtype=torch.long, device=device)
mask[1, :4] = 0  # 8 tokens
mask[2, :9] = 0  # 3 tokens
print(mask)

# %% [markdown]
# For a prompt the valid tokens of all rows are packed (`[T, H, D]` with `cu_seqlens`, varlen) and one
# `attn.attention` launch runs them, bottom-right causal; padding rows come back as zeros. For a decode step
# (`Sq = 1`) the valid keys are gathered into a left-aligned cache and `attn.decode` runs with the lengths. A
# mask that lengths cannot express (a hole in a row, a multimodal model's custom mask) runs PyTorch's SDPA
# instead, with a warning the first time; the backend never computes a different attention.

# %%
with torch.no_grad():
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("attn")
    ours = model(ids, attention_mask=mask).logits
valid = mask.bool()
print(f"prefill: max |attn − eager| over valid positions = {(ours - eager)[valid].abs().max().item():.2e}")

# %% [markdown]
# ## Generation, with transformers' cache and with `PagedCache`
#
# `generate` keeps its `DynamicCache` (dense `[B, H, S, D]` tensors, grown by concatenation each step) unless it
# is given another cache. `PagedCache` is a transformers `Cache` whose storage is an `attn.PagedKVCache`: only
# valid tokens are written (the padding takes no blocks), the prompt runs through `attn.context_attention` and
# each step through the paged `attn.decode`. `dtype=torch.int8` or `torch.float8_e4m3fn` with `k_scale`/`v_scale`
# stores one byte per value (lesson 09).


# %%
def greedy(impl, cache=None, steps=16):
    model.set_attn_implementation(impl)
    extra = {"cache": cache} if cache is not None else {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                             eos_token_id=None, output_logits=True, return_dict_in_generate=True, **extra)  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1)


t0 = time.perf_counter()
tok_eager, log_eager = greedy("eager")
tok_attn, log_attn = greedy("attn")
paged = attn_hf.PagedCache(model.config, max_batch_size=3, max_cache_len=64, block_size=8)
tok_paged, log_paged = greedy("attn", paged)
print("eager :", tok_eager[1].tolist())
print("attn  :", tok_attn[1].tolist())
print("paged :", tok_paged[1].tolist())
print(
    f"same tokens: {torch.equal(tok_eager, tok_attn) and torch.equal(tok_eager, tok_paged)}; "
    f"max logit difference {max((log_attn - log_eager).abs().max(), (log_paged - log_eager).abs().max()):.2e}"
)
print("tokens in the paged cache per sequence:", paged.kv.seqlens[:3].tolist(), f"({time.perf_counter() - t0:.1f} s)")

# %% [markdown]
# The paged cache holds 12 + 15, 8 + 15 and 3 + 15 tokens: each prompt's valid tokens and the generated ones
# (the last generated token is never fed back). transformers' dynamic cache holds 12 + 15 columns for every row,
# padding included, and copies all of them at every step.
#
# ## One decode step, profiled
#
# A profile of one decode forward (one new token for each of the 3 sequences) through `"attn"` with the paged
# cache. **On a machine without a GPU the kernels run in Triton's interpreter**, which executes each program in
# numpy: the profile below then measures the interpreter, not a GPU, and its proportions say nothing about GPU
# speed. On a GPU the same cell shows CUDA kernels. `bench/bench_transformers.py` measures the real thing: a
# Llama-3-8B-shaped model generating 256 tokens for 16 prompts of 2048, against transformers' `"sdpa"` and
# `"flex_attention"`, with the attention kernels' share of each decode step.

# %%
from torch.profiler import ProfilerActivity, profile  # noqa: E402

model.set_attn_implementation("attn")
cache = attn_hf.PagedCache(model.config, max_batch_size=3, max_cache_len=64, block_size=8)
with torch.no_grad():
    logits = model(ids, attention_mask=mask, cache=cache).logits[:, -1:]
    step_ids = logits.argmax(-1)
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        model(step_ids, attention_mask=step_mask, cache=cache)
sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
table = prof.key_averages().table(sort_by=sort, row_limit=12)
print(("GPU profile" if device == "cuda" else "CPU profile: the kernels run in Triton's INTERPRETER here") + "\n")
print(table)

# %% [markdown]
# Reading it: the rows are PyTorch ops and, labelled `attn.append_kv` / `attn.decode`, our calls (the
# integration wraps each in a `record_function`; on a GPU the kernels themselves appear as well). The share of
# the step they take is computed below from the same profile. Through the interpreter that share is the
# interpreter's numpy time, not a kernel's: it tells how this CPU run spent its time and nothing about a GPU. On
# a GPU, a decode step of a model this small is bound by the host (Python, transformers' module calls, our
# metadata), which is why serving stacks capture decode steps in CUDA graphs; for a large model at long
# context, the attention kernels' share grows with the cache, which is what the benchmark reports.

# %%
events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
total_ms = sum(e.self_cpu_time_total for e in events) / 1e3
ours_ms = sum(e.cpu_time_total for e in events if e.key.startswith("attn.")) / 1e3
where = "GPU run" if device == "cuda" else "CPU run, Triton interpreter"
print(f"attn calls: {ours_ms:.1f} ms of {total_ms:.1f} ms of host time in the step ({where})")
top = sorted(events, key=lambda e: -(e.cpu_time_total if e.key.startswith("attn.") else e.self_cpu_time_total))[:8]
fig, ax = plt.subplots(figsize=(7, 3))
ax.barh(
    [e.key[:40] for e in top][::-1],
    [(e.cpu_time_total if e.key.startswith("attn.") else e.self_cpu_time_total) / 1e3 for e in top][::-1],
)
ax.set_xlabel("host time (ms): attn.* rows inclusive, others self")
ax.set_title("one decode step" + (" (CPU: Triton interpreter)" if device != "cuda" else ""))
plt.tight_layout()
plt.show()
