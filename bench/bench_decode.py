"""Generation-phase (decode) attention: our split-K kernel beside its peers, same process, same inputs.

    python -m bench.bench_decode                      # the PERF.md decode shapes, contiguous and paged
    python -m bench.bench_decode --only L131072 --out bench/results/x.json

Decode is bound by memory bandwidth, so the metric is TB/s of K and V read (``2·Σ_b L_b·Hkv·D·2`` bytes),
against the copy ceiling measured in the same run. Contenders, each checked against the fp32 reference on the
first and last sequence before it is timed:
  ours        attn.decode on the contiguous cache [B, L, Hkv, D] as a user calls it: no hints, no validate flag
  ours-p64    the same default call on the cache as a shuffled pool of 64-token blocks, with its block table
  *-validated LABELLED: validate=True, the host checks of values that the default call made before issue 15
              (it reads the lengths and block table back: one sync per call)
  *-hinted    LABELLED: validate=False plus the lengths' max and sum (what a scheduler knows)
  *-planned   LABELLED: attn.DecodePlan.run(q), the plan made once outside the timed loop
  *-graph     LABELLED: plan.run captured in a CUDA graph and replayed (the graph time, host cost removed)
  cudnn, flash, efficient   SDPA pinned to one backend, q [B, Hq, 1, D] over [B, Hkv, L, D] copies
  flex        torch.compile(flex_attention), enable_gqa, no mask
The ragged shape (one batch of mixed lengths) has only our kernels: the SDPA backends take no per-sequence
lengths. Every row records TB/s, the fraction of the copy ceiling, the ratio to the best peer (cuDNN, FA2,
efficient, Flex) and the host time per call (``host_us``: 200 calls issued back to back, divided; for a call that
syncs itself, as the default call did before issue 15's fix, that includes waiting for its own kernels).

    python -m bench.bench_decode --out $OUT/decode.json --timeline $OUT/decode_timeline.json

``--timeline`` also records a torch.profiler trace of a few validated calls (the old default), a few default calls
and a few planned calls on one shape (host ranges, the syncs, the GPU kernels) into a small JSON that
lessons/14_serving_loop.py draws.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from bench import common

PEERS = ["cudnn", "flash", "efficient", "flex"]
OURS = ["ours", "ours-validated", "ours-hinted", "ours-planned", "ours-graph", "ours-p64", "ours-p64-validated",
        "ours-p64-hinted", "ours-p64-planned", "ours-p64-graph"]  # fmt: skip
COLUMNS = [*OURS, *PEERS]


@dataclass(frozen=True)
class Shape:
    name: str
    lengths: tuple[int, ...]
    heads_q: int
    heads_kv: int
    head_dim: int = 128

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def ragged(self) -> bool:
        return len(set(self.lengths)) > 1

    def kv_bytes(self, elem: int = 2) -> float:
        return 2.0 * sum(self.lengths) * self.heads_kv * self.head_dim * elem


def shapes(quick: bool) -> list[Shape]:
    if quick:
        return [Shape("B8 H32/8 L4096", (4096,) * 8, 32, 8)]
    gen = torch.Generator().manual_seed(0)
    ragged = tuple(int(x) for x in torch.randint(128, 8193, (32,), generator=gen))
    return [
        Shape("B64 H32/8 L4096", (4096,) * 64, 32, 8),
        Shape("B8 H32/8 L32768", (32768,) * 8, 32, 8),
        Shape("B1 H32/8 L131072", (131072,), 32, 8),
        Shape("B128 H32/32 L2048", (2048,) * 128, 32, 32),
        Shape(f"B32 H32/8 ragged L128..8192 (sum {sum(ragged)})", ragged, 32, 8),
    ]


def to_paged(k_cache, v_cache, block_size, gen):
    """The contiguous cache ``[B, L, Hkv, D]`` as a pool of ``block_size``-token blocks in shuffled order, and
    its block table. One-byte caches (INT8/FP8) are moved as raw bytes: padding and indexed copies are not
    implemented for every float8 type."""
    b, max_len, hkv, d = k_cache.shape
    n = math.ceil(max_len / block_size)
    pad = n * block_size - max_len
    perm = torch.randperm(b * n, generator=gen).to(k_cache.device)
    pools = []
    for x in (k_cache, v_cache):
        raw = x.view(torch.uint8) if x.element_size() == 1 else x
        if pad:
            raw = torch.nn.functional.pad(raw, (0, 0, 0, 0, 0, pad))
        blocks = raw.reshape(b * n, block_size, hkv, d)
        pool = torch.empty_like(blocks)
        pool[perm] = blocks
        pools.append(pool.view(x.dtype))
    return pools[0], pools[1], perm.view(b, n).to(torch.int32)


def run_shape(shape: Shape, args, ceilings) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    import attn.fast as fast
    import attn.reference as reference

    dev, dtype = "cuda", torch.bfloat16
    gen = torch.Generator().manual_seed(args.seed)
    max_len = max(shape.lengths)
    q = torch.randn(shape.batch, 1, shape.heads_q, shape.head_dim, dtype=dtype, device=dev)
    kc = torch.randn(shape.batch, max_len, shape.heads_kv, shape.head_dim, dtype=dtype, device=dev)
    vc = torch.randn_like(kc)
    seqlens = torch.tensor(shape.lengths, dtype=torch.int32, device=dev)
    nbytes = shape.kv_bytes()

    check_rows = sorted({0, shape.batch - 1})
    refs = {
        b: reference.decode(q[b : b + 1].float(), kc[b : b + 1].float(), vc[b : b + 1].float(), seqlens[b : b + 1])
        for b in check_rows
    }

    def err_of(out):
        return max(common.rel_err(out[b : b + 1].float(), refs[b]) for b in check_rows)

    import attn

    hints = {"max_seqlen_k": max_len, "total_seqlen_k": sum(shape.lengths)}
    contenders = {}
    caches = {"ours": (kc, vc, None), "ours-p64": to_paged(kc, vc, 64, gen)}
    plans = {}
    for name, (k_, v_, table) in caches.items():
        # the default call, exactly as a user writes it
        contenders[name] = (lambda k_=k_, v_=v_, table=table: attn.decode(q, k_, v_, seqlens, block_table=table),
                            lambda o: o, None)  # fmt: skip
        # labelled: the host checks of values, as the default call did before issue 15 (a sync per call)
        contenders[f"{name}-validated"] = (
            lambda k_=k_, v_=v_, table=table: attn.decode(q, k_, v_, seqlens, block_table=table, validate=True),
            lambda o: o, None,
        )  # fmt: skip
        # labelled: the hinted flat call (validate=False and the lengths' max and sum)
        contenders[f"{name}-hinted"] = (
            lambda k_=k_, v_=v_, table=table: fast.decode(q, k_, v_, seqlens, block_table=table, validate=False,
                                                          **hints),
            lambda o: o, None,
        )  # fmt: skip
        # labelled: planned once (host lists, as a scheduler has them), run per call
        plan = attn.DecodePlan(k_, v_, list(shape.lengths), block_table=None if table is None else table.cpu(),
                               num_heads_q=shape.heads_q)  # fmt: skip
        plans[name] = plan
        contenders[f"{name}-planned"] = (lambda plan=plan: plan.run(q), lambda o: o, None)
    if not shape.ragged:
        qt = q.transpose(1, 2).contiguous()
        kt, vt = (x.transpose(1, 2).contiguous() for x in (kc, vc))
        to_ours = lambda o: o.transpose(1, 2)
        gqa = shape.heads_q != shape.heads_kv
        from torch.nn.attention import SDPBackend

        backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                    "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip
        for name, backend in backends.items():
            ctx = lambda backend=backend: sdpa_kernel(backend)
            fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)
            contenders[name] = (fn, to_ours, ctx)
        torch._dynamo.config.cache_size_limit = 64
        flex = torch.compile(flex_attention, dynamic=False)
        contenders["flex"] = (lambda: flex(qt, kt, vt, enable_gqa=gqa), to_ours, None)

    results = {}
    for name, (fn, to_ours, ctx) in contenders.items():
        if args.peers and name not in args.peers and not name.startswith("ours"):
            continue
        entry = {}
        try:
            with ctx() if ctx else _null():
                out = fn()
                torch.cuda.synchronize()
                entry["err"] = err_of(to_ours(out))
                if not entry["err"] <= args.tol:
                    entry["status"] = "WRONG"
                else:
                    ms, method = common.time_ms(fn)
                    entry.update(status="ok", ms=ms, method=method, tbps=common.tbps(nbytes, ms))
                    copy = ceilings.get("copy_tbps")
                    entry["frac_copy_ceiling"] = entry["tbps"] / copy if copy else None
                    # a serving loop replays decode from a CUDA graph, so the host's launch cost is not paid
                    # per step; the graph time is the kernel's, the event time adds any host-bound gap
                    entry["host_us"] = common.host_us(fn)
                    try:
                        if name.endswith("-validated"):
                            raise RuntimeError("not captured: validate=True reads values on the host")
                        gms = common.graph_ms(fn, calls_per_graph=max(1, min(100, int(2.0 / ms))))
                        entry.update(ms_graph=gms, tbps_graph=common.tbps(nbytes, gms))
                        entry["frac_copy_ceiling_graph"] = entry["tbps_graph"] / copy if copy else None
                    except Exception as e:
                        entry["graph_error"] = common.short_error(e)
        except Exception as e:  # one peer failing is a result, not the end of the run
            entry.update(status="ERR", error=common.short_error(e))
        results[name] = entry
        common.free_memory()
    # labelled graph-replayed rows: the planned call's graph time as a row of its own
    for name in caches:
        r = results.get(f"{name}-planned", {})
        if r.get("ms_graph"):
            results[f"{name}-graph"] = {"status": "ok", "ms": r["ms_graph"], "method": "cuda_graph(plan.run)",
                                        "tbps": r["tbps_graph"], "frac_copy_ceiling": r.get("frac_copy_ceiling_graph"),
                                        "host_us": 0.0}  # fmt: skip
        results[name]["plan_replayable"] = plans[name].replayable
        results[name]["plan_num_splits"] = plans[name].num_splits
    ours_ms = results.get("ours", {}).get("ms")
    ours_graph = results.get("ours", {}).get("ms_graph")
    peer_ms = [results[p]["ms"] for p in PEERS if results.get(p, {}).get("ms")]
    best_peer = min(peer_ms) if peer_ms else None
    for r in results.values():
        if r.get("ms") and ours_ms:
            r["speedup_vs_this"] = r["ms"] / ours_ms
        if r.get("ms_graph") and ours_graph:
            r["speedup_vs_this_graph"] = r["ms_graph"] / ours_graph
        if r.get("ms") and best_peer:
            # > 1: faster than the best peer (event-timed, as a user without graphs sees both)
            r["vs_best_peer"] = best_peer / r["ms"]
    # issue 15's targets, from the default calls as a user makes them: >= 0.97x cuDNN, paged >= 0.95x contiguous
    ratios = {}
    cudnn_ms, p64_ms = results.get("cudnn", {}).get("ms"), results.get("ours-p64", {}).get("ms")
    if ours_ms and cudnn_ms:
        ratios["ours_vs_cudnn"] = cudnn_ms / ours_ms
    if p64_ms and cudnn_ms:
        ratios["p64_vs_cudnn"] = cudnn_ms / p64_ms
    if ours_ms and p64_ms:
        ratios["p64_vs_contiguous"] = ours_ms / p64_ms
    hinted_ms = results.get("ours-hinted", {}).get("ms")
    if ours_ms and hinted_ms:
        ratios["default_vs_hinted"] = hinted_ms / ours_ms
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = fast.choose_num_splits(shape.batch, shape.heads_kv, max_len, sms, total_seqlen_k=sum(shape.lengths))
    if args.timeline and not args.timeline_done and args.timeline_shape in shape.name:
        args.timeline_done = True
        record_timeline(args.timeline, shape, {label: contenders[f"ours-p64{suffix}"][0] for label, suffix in
                                               zip(TIMELINE_LABELS, ("-validated", "", "-planned"))})  # fmt: skip
    return {"shape": shape.name, "lengths": list(shape.lengths), "kv_bytes": nbytes, "num_splits": splits,
            "best_peer_ms": best_peer, "default_call_ratios": ratios, "contenders": results}  # fmt: skip


TIMELINE_LABELS = ("validate=True", "default call", "plan.run")


def record_timeline(path, shape, calls_by_label: dict, calls: int = 6) -> None:
    """A few calls of each kind (``TIMELINE_LABELS``: the validated call that the default was before issue 15,
    the default call, the planned call) under torch.profiler: host ranges, syncs and GPU kernels, in
    microseconds from the first event, as a small JSON (the full Chrome trace is megabytes)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile, record_function

    for fn in calls_by_label.values():
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for label, fn in calls_by_label.items():
            for _ in range(calls):
                with record_function(label):
                    fn()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = f"{tmp}/trace.json"
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f).get("traceEvents", [])
    keep = []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, name = e.get("cat", ""), e.get("name", "")
        if cat == "user_annotation" and name in calls_by_label:
            keep.append(("cpu", name, e))
        elif cat == "kernel":
            keep.append(("gpu", name[:60], e))
        elif cat in ("cuda_runtime", "cuda_driver") and any(
            w in name for w in ("Synchronize", "Memcpy", "LaunchKernel")
        ):
            keep.append(("runtime", name, e))
    t0 = min((float(e["ts"]) for _, _, e in keep), default=0.0)
    rows = [{"track": t, "name": n, "ts_us": float(e["ts"]) - t0, "dur_us": float(e.get("dur", 0))} for t, n, e in keep]
    common.write_json(path, {"shape": shape.name, "gpu": torch.cuda.get_device_name(), "calls": calls,
                             "env": common.env_info(), "events": rows})  # fmt: skip


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", action="append", default=[])
    p.add_argument("--peers", default="", help="comma list of peers to run (default all)")
    p.add_argument("--out")
    p.add_argument("--tol", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeline", help="also write a profiler timeline (validated, default, planned calls) to this JSON")
    p.add_argument("--timeline-shape", default="L32768", help="the shape (a substring of its name) profiled")
    args = p.parse_args()
    args.timeline_done = False
    args.peers = [x for x in args.peers.split(",") if x]
    common.require_cuda("bench_decode")
    import attn.fast  # noqa: F401  (before triton, whatever the machine)

    ceilings = common.measure_ceilings()
    out_path = args.out or common.default_out_path("decode")
    record = {"benchmark": "decode", "env": common.env_info(), "command": common.command_line(),
              "ceilings": ceilings, "bytes_definition": "2 * sum(L_b) * Hkv * D * 2 (K and V read once, bf16)",
              "results": []}  # fmt: skip
    rows = []
    for shape in shapes(args.quick):
        if args.only and not any(s in shape.name for s in args.only):
            continue
        print(f"== {shape.name}", flush=True)
        r = run_shape(shape, args, ceilings)
        record["results"].append(r)
        common.write_json(out_path, record)
        cells = [shape.name, str(r["num_splits"])]
        for name in COLUMNS:
            c = r["contenders"].get(name)
            if not c:
                cells.append("-")
            elif c.get("status") != "ok":
                cells.append(c.get("status", "?"))
            else:
                peer = f" p{c['vs_best_peer']:.2f}" if c.get("vs_best_peer") else ""
                cells.append(f"{c['tbps']:.2f}{peer} h{c['host_us']:.0f}us")
            if c and c.get("status") == "ERR":
                print(f"  {name}: {c['error'][:200]}", flush=True)
        rows.append(cells)
        print("  " + " | ".join(cells), flush=True)
        print("  default-call ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in r["default_call_ratios"].items()),
              flush=True)  # fmt: skip
    print("\nTB/s of K+V read, event-timed; p: best peer's time / this row's time (> 1: faster than the best peer);")
    print("h: host time of one call without a sync; -validated/-hinted/-planned/-graph rows are labelled variants")
    print(common.format_table(["shape", "splits", *COLUMNS], rows))
    print(f"ceilings: copy {ceilings.get('copy_tbps')} TB/s\nresults: {out_path}")


if __name__ == "__main__":
    sys.exit(main())
