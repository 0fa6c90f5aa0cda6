"""generate() of a Llama-3-8B-shaped model (random weights, bf16, one GPU) through attn's "attn" backend with its
PagedCache, against transformers' "sdpa" and "flex_attention" backends, in one process.

An implementation is ``name[:cache][@flash]``: ``attn`` alone uses attn's PagedCache, a peer alone the cache a user
gets by default (transformers' DynamicCache); ``:dynamic`` or ``:static`` picks that cache instead (``sdpa:static``
is transformers' StaticCache, which generate() also compiles the model for). ``@flash`` runs the call inside
``sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])``: on an H100 with torch 2.11 plain ``sdpa`` picks cuDNN's
kernel, whose graph is built again for every new key length (mlx PR 2743 and sglang PR 4650 report the cost), so
``sdpa@flash`` separates that from the attention itself.

    PYTHONPATH=. python -m bench.bench_transformers --out $OUT            # 16 prompts of 2048 tokens, 256 new
    PYTHONPATH=. python -m bench.bench_transformers --layers 8 --out $OUT # fewer layers of the same shape

Per implementation: the time of the user's call (``model.generate``, wall clock, synchronized), the prefill alone
(``max_new_tokens=1``), decode tokens/s from their difference, and, from a torch.profiler trace of a few decode
steps at the full context, the share of GPU time spent in attention kernels (by kernel name: ours
``_decode_kernel``/``_merge_splits``/``_append_kernel``/``_attn_fwd``, SDPA's flash/efficient/cudnn kernels,
FlexAttention's generated ``triton_`` kernels under ``flex``). Every implementation's greedy tokens are compared
with sdpa's (bf16 runs may diverge after a near-tie; the first divergence step is recorded, not hidden).

All three run the model in the same process on the same weights and prompts; writes one JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import env_info, require_cuda, utc_now, write_json

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)  # fmt: skip

ATTN_KERNELS = {
    "attn": ("_decode_kernel", "_merge_splits", "_append_kernel", "_attn_fwd", "_context"),
    "sdpa": ("flash", "fmha", "efficient_attention", "cudnn", "sdpa"),
    "flex_attention": ("flex", "triton_tem_fused"),
}


def build_model(layers: int):
    import transformers

    cfg = transformers.LlamaConfig(**LLAMA3_8B, num_hidden_layers=layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    # random weights at a scale that keeps bf16 activations ordinary (the init's 0.02 std does)
    return model


def split_impl(spec):
    """``"sdpa:static@flash"`` -> ("sdpa", "static"); the cache defaults to PagedCache for attn, DynamicCache for
    peers (the backend pin is `backends`')."""
    impl, _, cache = spec.split("@")[0].partition(":")
    return impl, cache or ("paged" if impl == "attn" else "dynamic")


def backends(spec):
    """The SDPA backend pin of ``spec`` (a context manager; a no-op without ``@flash``)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if spec.endswith("@flash"):
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    return contextlib.nullcontext()


def cache_kwargs(model, spec, batch, max_len):
    import inspect

    import attn.integrations.transformers as attn_hf

    impl, cache = split_impl(spec)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    if cache == "paged":
        cache = attn_hf.PagedCache(model.config, max_batch_size=batch, max_cache_len=max_len, block_size=64)
        return {name: cache}
    if cache == "static":
        return {"cache_implementation": "static"}
    return {}  # generate()'s default: a DynamicCache


def generate(model, spec, ids, new_tokens, max_len):
    model.set_attn_implementation(split_impl(spec)[0])
    kw = cache_kwargs(model, spec, ids.shape[0], max_len)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0, eos_token_id=None, **kw)  # fmt: skip
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def attention_share(model, spec, ids, steps, max_len):
    """Profiles ``steps`` decode forwards after a prefill of ``ids``; returns (attention GPU ms, total GPU ms,
    top kernels)."""
    import inspect

    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache, StaticCache

    impl, cache = split_impl(spec)
    model.set_attn_implementation(impl)
    kw = cache_kwargs(model, spec, ids.shape[0], max_len)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    if cache == "static":
        kw = {name: StaticCache(config=model.config, max_cache_len=max_len)}
    elif cache == "dynamic":
        kw = {name: DynamicCache(config=model.config)}
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw).logits[:, -1:]
        nxt = logits.argmax(-1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                nxt = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **kw).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
    total = attn_ms = 0.0
    kernels = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if dev_us <= 0 or ev.key.startswith("ProfilerStep"):
            continue
        # key_averages mixes CPU ops (whose device time includes their kernels) and kernels: count kernels only
        if getattr(ev, "device_type", None) is not None and str(ev.device_type).endswith("CPU"):
            continue
        total += dev_us / 1e3
        if any(p in ev.key for p in ATTN_KERNELS[impl]):
            attn_ms += dev_us / 1e3
        kernels.append((ev.key[:80], round(dev_us / 1e3 / steps, 4)))
    kernels.sort(key=lambda x: -x[1])
    return attn_ms / steps, total / steps, kernels[:12]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the 8B shape (32 = Llama-3-8B)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--impls", default="attn,sdpa,sdpa@flash,flex_attention",
                   help="comma-separated name[:paged|dynamic|static][@flash]")  # fmt: skip
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--out", required=True, help="directory for the JSON result")
    args = p.parse_args(argv)
    require_cuda("bench_transformers")
    import attn.integrations.transformers as attn_hf

    attn_hf.register()
    started = time.perf_counter()
    model = build_model(args.layers)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(100, 128000, (args.batch, args.prompt), device="cuda", generator=g)
    max_len = args.prompt + args.new
    note = "Llama-3-8B shape" if args.layers == 32 else f"{args.layers} of Llama-3-8B's 32 layers (same layer shape)"
    print(f"{note}: batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, bf16, random weights")
    rows, tokens = {}, {}
    for impl in args.impls.split(","):
        row = {}
        try:
            with torch.no_grad(), backends(impl):
                # warm-up at the measured shapes: compiles (flex), autotunes (attn), fills the allocator's pools
                generate(model, impl, ids, 2, max_len)
                _, t_prefill = generate(model, impl, ids, 1, max_len)
                out, t_total = generate(model, impl, ids, args.new, max_len)
            tokens[impl] = out[:, args.prompt :]
            row.update(
                generate_s=t_total, prefill_s=t_prefill, tokens_per_s=args.batch * args.new / t_total,
                decode_tokens_per_s=args.batch * (args.new - 1) / max(t_total - t_prefill, 1e-9),
            )  # fmt: skip
            with backends(impl):
                a_ms, tot_ms, top = attention_share(model, impl, ids, args.profile_steps, max_len)
            row.update(decode_step_gpu_ms=tot_ms, decode_step_attention_ms=a_ms, attention_share=a_ms / tot_ms,
                       top_kernels=top)  # fmt: skip
        except Exception as e:  # one implementation failing must not hide the others
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rows[impl] = row
        torch.cuda.empty_cache()
        print(impl, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "top_kernels"},
              flush=True)  # fmt: skip
        # written after every implementation: a run cut by a time limit keeps the rows it finished
        _write(args, note, rows, started, partial=True)
    base = tokens.get("sdpa")
    for impl, t in tokens.items():
        if base is not None and impl != "sdpa":
            diff = (t != base).any(0).nonzero()
            rows[impl]["first_token_divergence_vs_sdpa"] = int(diff[0]) if len(diff) else None
    if "attn" in rows and "tokens_per_s" in rows["attn"]:
        for impl in rows:
            if impl != "attn" and "tokens_per_s" in rows[impl]:
                rows["attn"][f"speedup_vs_{impl}"] = rows["attn"]["tokens_per_s"] / rows[impl]["tokens_per_s"]
    result = _write(args, note, rows, started, partial=False)
    print(f"wrote the result ({result['wall_s']:.0f} s)")
    return result


def _write(args, note, rows, started, partial: bool) -> dict:
    result = dict(
        benchmark="bench_transformers", when=utc_now(), env=env_info(), note=note, layers=args.layers,
        batch=args.batch, prompt=args.prompt, new_tokens=args.new, results=rows, partial=partial,
        wall_s=time.perf_counter() - started,
    )  # fmt: skip
    path = Path(args.out) / f"transformers_{torch.cuda.get_device_name().replace(' ', '_')}_{args.layers}L.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return result


if __name__ == "__main__":
    main()
