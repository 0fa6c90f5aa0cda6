"""Chunked context and generation over a paged KV cache: `context_attention` beside the kernels it generalizes.

    python -m bench.bench_context [--out bench/results/x.json] [--prefix 2048 --prefix 6144]

(a) Chunked prefill: 4 sequences, each a chunk of 2048 new tokens on a cached prefix (2048 and 6144 by
    default), GQA 32/8, D128, bf16, a paged cache of 64-token blocks with a shuffled block table. Contenders:
      context-paged       attn.fast.context_attention over the paged pool
      context-contiguous  attn.fast.context_attention over a contiguous [B, L, Hkv, D] cache
      prefill             attn.fast.attention, packed and causal (bottom-right), on contiguous packed K/V of the
                          same sequences: the kernel without the cache, the speed to match
      flex                torch.compile(flex_attention) on the packed tokens with a document + causal mask
    reported in TFLOP/s of the causal work (each query sees its prefix and the chunk up to itself).
(b) Generation: 60 one-token requests on 4096 cached tokens, same heads and pool. Contenders:
      context-paged       attn.fast.context_attention (one token per sequence, GQA packed)
      decode              attn.fast.decode (split-K chosen by its heuristic)
    timed from CUDA-graph replays and reported in TB/s of K/V read.

Every contender is checked against the fp32 reference (the first and last sequence) before it is timed; a wrong
one is reported, not timed. Speedups are ``peer_ms / context_ms`` (> 1: context_attention is faster).
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench import common

DEV = "cuda"
HQ, HKV, D, BLOCK = 32, 8, 128, 64


def _paged(lens, gen):
    """A shuffled pool holding each sequence's blocks, its table, and the same K/V as a contiguous cache."""
    need = [-(-n // BLOCK) for n in lens]
    perm = torch.randperm(sum(need), generator=gen).to(DEV)
    table = torch.zeros(len(lens), max(need), dtype=torch.int32, device=DEV)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used : used + n]
        used += n
    k_pool = torch.randn(sum(need), BLOCK, HKV, D, device=DEV, dtype=torch.bfloat16)
    v_pool = torch.randn_like(k_pool)
    # contiguous copies: row b is the gather of sequence b's blocks (padding rows past its length unused)
    k_cont = k_pool[table.long()].flatten(1, 2)
    v_cont = v_pool[table.long()].flatten(1, 2)
    return k_pool, v_pool, table, k_cont, v_cont


def _check_and_time(name, fn, checks, tol, method, record, out_path):
    entry = {"method": method}
    try:
        out = fn()
        entry["err"] = max(common.rel_err(out[lo:hi].float(), want) for lo, hi, want in checks)
        if not entry["err"] <= tol:
            entry["status"] = "WRONG"
        else:
            ms = common.graph_ms(fn, calls_per_graph=5) if method == "graph" else common.bench_ms(fn)
            entry.update(status="ok", ms=ms)
    except Exception as e:
        entry.update(status="ERR", error=common.short_error(e))
    record["results"][name] = entry
    common.write_json(out_path, record)
    common.free_memory()
    return entry


def _run_all(part, contenders, checks, method, rate, args, record, out_path):
    """Checks and times each contender; ``rate = (key, amount per ms)`` gives its throughput, and every row gets
    its time over context-paged's."""
    key, per_ms = rate
    rows = {}
    for name, fn in contenders.items():
        e = rows[name] = _check_and_time(f"{part} {name}", fn, checks, args.tol, method, record, out_path)
        if e.get("ms"):
            e[key] = per_ms / e["ms"]
    base = rows["context-paged"].get("ms")
    for e in rows.values():
        if base and e.get("ms"):
            e["speedup_of_context_paged"] = e["ms"] / base
    common.write_json(out_path, record)
    return rows


def _reference_rows(q, k, v, seqlens, cu, table, b):
    import attn.reference as reference

    lo, hi = cu[b].item(), cu[b + 1].item()
    one = torch.tensor([0, hi - lo], dtype=torch.int32, device=DEV)
    want = reference.context_attention(q[lo:hi].float(), k.float(), v.float(), seqlens[b : b + 1],
                                       cu_seqlens_q=one, block_table=table[b : b + 1])  # fmt: skip
    return lo, hi, want


def chunked_prefill(prefix, args, record, out_path):
    import attn.fast as fast

    gen = torch.Generator().manual_seed(prefix)
    n, nb = args.chunk, args.chunks
    lens = [prefix + n] * nb
    k_pool, v_pool, table, k_cont, v_cont = _paged(lens, gen)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    cu_q = torch.arange(0, nb * n + 1, n, dtype=torch.int32, device=DEV)
    cu_k = torch.arange(0, nb * (prefix + n) + 1, prefix + n, dtype=torch.int32, device=DEV)
    q = torch.randn(nb * n, HQ, D, device=DEV, dtype=torch.bfloat16)
    k_packed = k_cont[:, : prefix + n].flatten(0, 1).contiguous()
    v_packed = v_cont[:, : prefix + n].flatten(0, 1).contiguous()
    checks = [_reference_rows(q, k_pool, v_pool, seqlens, cu_q, table, b) for b in (0, nb - 1)]
    flops = 4.0 * HQ * D * nb * (n * prefix + n * (n + 1) / 2)
    common_kw = dict(cu_seqlens_q=cu_q, max_seqlen_q=n, validate=False)
    contenders = {
        "context-paged": lambda: fast.context_attention(q, k_pool, v_pool, seqlens, block_table=table, **common_kw),
        "context-contiguous": lambda: fast.context_attention(q, k_cont, v_cont, seqlens, **common_kw),
        "prefill": lambda: fast.attention(q, k_packed, v_packed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                          max_seqlen_q=n, max_seqlen_k=prefix + n, causal=True),
    }  # fmt: skip
    flex = _flex(q, k_packed, v_packed, n, prefix, nb) if not args.no_flex else None
    if flex is not None:
        contenders["flex"] = flex
    return _run_all(f"prefix{prefix}", contenders, checks, "events", ("tflops", flops / 1e9), args, record, out_path)


def _flex(q, k, v, n, prefix, nb):
    """FlexAttention over the packed tokens: a query sees its own sequence's keys up to its position."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    flex = torch.compile(flex_attention, dynamic=False)
    seq_len = prefix + n
    q_doc = torch.arange(nb * n, device=DEV) // n
    q_pos = torch.arange(nb * n, device=DEV) % n + prefix
    k_doc = torch.arange(nb * seq_len, device=DEV) // seq_len
    k_pos = torch.arange(nb * seq_len, device=DEV) % seq_len

    def chunk_causal(b, h, q_idx, kv_idx):
        return (q_doc[q_idx] == k_doc[kv_idx]) & (k_pos[kv_idx] <= q_pos[q_idx])

    mask = create_block_mask(chunk_causal, None, None, nb * n, nb * seq_len, device=DEV)
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
    return lambda: flex(qt, kt, vt, block_mask=mask, enable_gqa=True)[0].transpose(0, 1)


def generation(args, record, out_path):
    import attn.fast as fast

    gen = torch.Generator().manual_seed(1)
    nb, length = args.gen, args.gen_len
    k_pool, v_pool, table, _, _ = _paged([length] * nb, gen)
    seqlens = torch.full((nb,), length, dtype=torch.int32, device=DEV)
    cu = torch.arange(nb + 1, dtype=torch.int32, device=DEV)
    q = torch.randn(nb, HQ, D, device=DEV, dtype=torch.bfloat16)
    checks = [_reference_rows(q, k_pool, v_pool, seqlens, cu, table, b) for b in (0, nb - 1)]
    kv_bytes = 2.0 * nb * length * HKV * D * 2
    contenders = {
        "context-paged": lambda: fast.context_attention(q, k_pool, v_pool, seqlens, cu_seqlens_q=cu, max_seqlen_q=1,
                                                        block_table=table, validate=False),
        "decode": lambda: fast.decode(q[:, None], k_pool, v_pool, seqlens, block_table=table, validate=False,
                                      max_seqlen_k=length, total_seqlen_k=nb * length)[:, 0],
    }  # fmt: skip
    return _run_all("generation", contenders, checks, "graph", ("kv_tbps", kv_bytes / 1e9), args, record, out_path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--prefix", type=int, action="append", help="cached tokens before each chunk (repeatable)")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--gen", type=int, default=60)
    p.add_argument("--gen-len", type=int, default=4096)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a minute)")
    p.add_argument("--tol", type=float, default=1e-2)
    args = p.parse_args()
    common.require_cuda("bench_context")
    prefixes = args.prefix or [2048, 6144]
    out_path = args.out or common.default_out_path("context")
    record = {"benchmark": "context", "env": common.env_info(), "command": common.command_line(),
              "ceilings": common.measure_ceilings(), "shape": {"heads": [HQ, HKV], "head_dim": D, "block_size": BLOCK,
              "chunks": args.chunks, "chunk": args.chunk, "prefixes": prefixes, "gen": args.gen,
              "gen_len": args.gen_len}, "results": {}}  # fmt: skip
    for prefix in prefixes:
        chunked_prefill(prefix, args, record, out_path)
    generation(args, record, out_path)
    common.write_json(out_path, record)
    for name, r in record["results"].items():
        if r.get("status") != "ok":
            print(f"{name:32s} {r.get('status')} {r.get('error', '')[:300]}")
            continue
        rate = f"{r['tflops']:6.1f} TFLOP/s" if "tflops" in r else f"{r['kv_tbps']:5.2f} TB/s K/V"
        print(f"{name:32s} {r['ms'] * 1e3:8.0f} us  {rate}  x{r.get('speedup_of_context_paged', 1):.2f} of "
              f"context-paged's time  err {r['err']:.1e}")  # fmt: skip
    print(f"results: {out_path}")


if __name__ == "__main__":
    sys.exit(main())
