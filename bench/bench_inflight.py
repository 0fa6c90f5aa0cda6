"""Inflight batching: one `gpt_attention` step over a mixed batch against our separate prefill and decode calls.

    python -m bench.bench_inflight [--out bench/results/x.json]

The batch (issue 7): 4 fresh prompts of 2048 tokens and 60 generation requests with 4096 cached tokens, GQA
32/8, D128, a paged cache of 64-token blocks, bf16, RoPE on. Contenders, all on the same inputs:

  op-unified   attn.fast.gpt_attention(mode="unified"): pre-processing + one context_attention launch
  op-split     attn.fast.gpt_attention(mode="split"): pre-processing + context_attention + split-K decode
  separate     pre-processing + attn.fast.attention on the prompts (packed, causal) + attn.fast.decode on the
               generation requests: what a caller without the mixed-batch op would launch
and the attention part alone (the pre-processing is the same launch in all three): ``unified`` (one
context_attention), ``split`` (context_attention + decode) and ``separate`` (attention + decode). All are timed
with events (do_bench), which is what a caller without CUDA graphs gets: where ``host_us`` exceeds the events'
time, the host sets the pace. The op's schedules (validate=False: nothing read back) are also replayed from CUDA
graphs (``graph_ms``), the device's time alone; the separate path's packed prefill reads its lengths on the host,
which a graph cannot capture.

Every contender's output is checked against the fp32 reference on the first prompt and the last generation
request before it is timed.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench import common

DEV = "cuda"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--gen", type=int, default=60)
    p.add_argument("--gen-len", type=int, default=4096)
    p.add_argument("--tol", type=float, default=1e-2)
    args = p.parse_args()
    common.require_cuda("bench_inflight")
    import attn.fast as fast
    import attn.reference as reference
    from attn import InflightBatch
    from attn.inflight import CONTEXT, GENERATION

    ceilings = common.measure_ceilings()
    hq, hkv, d, bs = 32, 8, 128, 64
    types = [CONTEXT] * args.prompts + [GENERATION] * args.gen
    new = [args.prompt_len] * args.prompts + [1] * args.gen
    past = [0] * args.prompts + [args.gen_len - 1] * args.gen
    need = [-(-(x + n) // bs) for x, n in zip(past, new)]
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(sum(need), generator=gen)
    table = torch.zeros(len(types), max(need), dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used : used + n]
        used += n
    table = table.to(DEV)
    k_cache = torch.randn(sum(need), bs, hkv, d, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    batch = InflightBatch.build(types, new, past, block_table=table)
    qkv = torch.randn(batch.num_tokens, (hq + 2 * hkv) * d, device=DEV, dtype=torch.bfloat16)
    kw = dict(num_heads_q=hq, num_heads_kv=hkv, rotary_dim=d)

    # the pieces the separate path launches, built once from the same inputs
    q = fast.preprocess(qkv, k_cache, v_cache, batch.cache_seqlens_before, num_heads_q=hq, num_heads_kv=hkv,
                        cu_seqlens_new=batch.cu_seqlens_new, block_table=table, rotary_dim=d)  # fmt: skip
    n_ctx = args.prompts * args.prompt_len
    gen_req = batch.generation_requests
    cu_ctx = batch.cu_seqlens_context
    # a caller without the op keeps the prompts' rotated k and their v packed for the prefill kernel
    heads = qkv[:n_ctx].view(n_ctx, hq + 2 * hkv, d)
    pos = torch.arange(args.prompt_len, device=DEV, dtype=torch.int32).repeat(args.prompts)
    k_ctx = reference.apply_rope(heads[:, hq : hq + hkv].float(), pos, rotary_dim=d).to(torch.bfloat16)
    v_ctx = heads[:, hq + hkv :].contiguous()
    q_ctx, q_gen = q[:n_ctx], q[n_ctx:, None]
    lens_gen = batch.cache_seqlens_after.index_select(0, gen_req)
    table_gen = table.index_select(0, gen_req)
    table_ctx = table[: args.prompts]

    def separate_attention():
        o1 = fast.attention(q_ctx, k_ctx, v_ctx, cu_seqlens_q=cu_ctx, cu_seqlens_k=cu_ctx,
                            max_seqlen_q=args.prompt_len, max_seqlen_k=args.prompt_len, causal=True)  # fmt: skip
        o2 = fast.decode(q_gen, k_cache, v_cache, lens_gen, block_table=table_gen, validate=False,
                         max_seqlen_k=args.gen_len, total_seqlen_k=args.gen * args.gen_len)  # fmt: skip
        return torch.cat([o1, o2[:, 0]])

    def unified_attention():
        return fast.context_attention(q, k_cache, v_cache, batch.cache_seqlens_after,
                                      cu_seqlens_q=batch.cu_seqlens_new, max_seqlen_q=batch.max_new,
                                      block_table=table, validate=False)  # fmt: skip

    def split_attention():
        o1 = fast.context_attention(q_ctx, k_cache, v_cache, batch.cache_seqlens_after[: args.prompts],
                                    cu_seqlens_q=cu_ctx, max_seqlen_q=args.prompt_len, block_table=table_ctx,
                                    validate=False)  # fmt: skip
        o2 = fast.decode(q_gen, k_cache, v_cache, lens_gen, block_table=table_gen, validate=False,
                         max_seqlen_k=args.gen_len)  # fmt: skip
        return torch.cat([o1, o2[:, 0]])

    def op(mode):
        return lambda: fast.gpt_attention(qkv, batch, k_cache, v_cache, mode=mode, validate=False, **kw)

    def separate_op():
        fast.preprocess(qkv, k_cache, v_cache, batch.cache_seqlens_before, num_heads_q=hq, num_heads_kv=hkv,
                        cu_seqlens_new=batch.cu_seqlens_new, block_table=table, rotary_dim=d)  # fmt: skip
        return separate_attention()

    # the reference on the first prompt and the last generation request (fp32, the cache as written above)
    def ref_rows(b):
        lo, hi = batch.cu_seqlens_new[b].item(), batch.cu_seqlens_new[b + 1].item()
        one = torch.tensor([0, hi - lo], dtype=torch.int32, device=DEV)
        want = reference.context_attention(q[lo:hi].float(), k_cache.float(), v_cache.float(),
                                           batch.cache_seqlens_after[b : b + 1], cu_seqlens_q=one,
                                           block_table=table[b : b + 1])  # fmt: skip
        return lo, hi, want

    checks = [ref_rows(0), ref_rows(len(types) - 1)]

    def err_of(out):
        return max(common.rel_err(out[lo:hi].float(), want) for lo, hi, want in checks)

    flops = 4.0 * args.prompts * hq * d * args.prompt_len * (args.prompt_len + 1) / 2
    kv_bytes = 2.0 * args.gen * args.gen_len * hkv * d * 2
    record = {"benchmark": "inflight", "env": common.env_info(), "command": common.command_line(),
              "ceilings": ceilings, "shape": {"prompts": args.prompts, "prompt_len": args.prompt_len,
              "gen": args.gen, "gen_len": args.gen_len, "heads": [hq, hkv], "head_dim": d, "block_size": bs},
              "prefill_flops": flops, "decode_kv_bytes": kv_bytes, "results": {}}  # fmt: skip
    contenders = {
        # events for all, as a caller without graphs sees it; the contenders that read nothing back on the host
        # (validate=False) are also replayed from CUDA graphs, for the device's time alone. The separate path's
        # packed prefill checks its cu_seqlens on the host, which a graph cannot capture.
        "attention unified": (unified_attention, "events+graph"),
        "attention split": (split_attention, "events+graph"),
        "attention separate": (separate_attention, "events"),
        "op unified": (op("unified"), "events+graph"),
        "op split": (op("split"), "events+graph"),
        "op separate": (separate_op, "events"),
    }
    out_path = args.out or common.default_out_path("inflight")
    for name, (fn, method) in contenders.items():
        entry = {"method": method}
        try:
            entry["err"] = err_of(fn())
            if not entry["err"] <= args.tol:
                entry["status"] = "WRONG"
            else:
                entry.update(status="ok", ms=common.bench_ms(fn), host_us=common.host_us(fn, calls=20))
                if "graph" in method:
                    entry["graph_ms"] = common.graph_ms(fn, calls_per_graph=5)
        except Exception as e:
            entry.update(status="ERR", error=common.short_error(e))
        record["results"][name] = entry
        common.write_json(out_path, record)
        common.free_memory()
    res = record["results"]
    for part in ("attention", "op"):
        base = res.get(f"{part} separate", {}).get("ms")
        for mode in ("unified", "split", "separate"):
            r = res[f"{part} {mode}"]
            if r.get("ms") and base:
                r["speedup_vs_separate"] = base / r["ms"]
    common.write_json(out_path, record)
    for name, r in res.items():
        if r.get("status") != "ok":
            print(f"{name:20s} {r.get('status')} {r.get('error', '')[:300]}")
            continue
        graph = f"  graph {r['graph_ms'] * 1e3:.0f} us" if r.get("graph_ms") else ""
        print(f"{name:20s} {r['ms'] * 1e3:8.0f} us (events)  x{r.get('speedup_vs_separate', 1):.2f} vs separate"
              f"  host {r['host_us']:.0f} us{graph}  err {r['err']:.1e}")  # fmt: skip
    print(f"results: {out_path}")


if __name__ == "__main__":
    sys.exit(main())
