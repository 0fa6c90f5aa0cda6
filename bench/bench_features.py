"""What each feature costs: biases in prefill and decode, quantized, cyclic and beam caches in decode.

    python -m bench.bench_features                     # everything below
    python -m bench.bench_features --only prefill      # or: --only decode

Prefill, B4 H32 S4096 D128 causal bf16 (issue 5): our fused kernel plain, with ALiBi, with T5 implicit (a
``[Hq, num_buckets]`` table) and T5 regular (a materialized ``[Hq, S, S]`` bias), and with soft-capping; beside
FlexAttention (compiled, causal block mask) plain and with the equivalent ``score_mod``: ALiBi as
``slope·(j − i)`` and T5 as a lookup of the distance ``clamp(j − i, ±max_distance)`` in a captured
``[Hq, 2·max_distance + 1]`` table, which is exactly what our kernel reads. Cost = time / plain time.

Decode, B8 H32/8 L32768 and B1 H32/8 L131072 bf16 (issues 5 and 6): our decode kernel plain, ALiBi, T5
implicit, INT8 and FP8 caches (per-head scales), a cyclic cache that has wrapped (window = L, L + 1000 tokens
appended) and beam search (the batch as requests × 4 beams reading through a random ``cache_indirection``);
contiguous and paged (64-token blocks, shuffled). Bandwidth counts the bytes actually read (1 byte per element
for INT8/FP8); speedup is plain bf16 time / variant time at the same layout.

Pre-processing (issue 4): the fused split + QKV bias + RoPE (NeoX, full rotary) + append of new tokens into a
paged cache (64-token blocks), for a prefill-sized batch (16 × 1024 new tokens on 1024 cached) and for one decode
step (B64, one token each, on 4096 cached), GQA 32/8 D128 bf16. Bandwidth counts qkv read, q written and k/v
written; the bias and the cos/sin table are small and left out.

Each of our rows records the tile the autotuner chose (``config``) and, where that call tuned, every candidate
tile's median time (``tuning_ms``): two variants may run different tiles, and a bias's cost is also given at
the plain kernel's tile (``cost_vs_plain_same_tile``, from those tuning times).

Every variant is checked against the reference (fp32, on the same cache, dequantized where quantized) before it
is timed. Times are medians of CUDA-graph replays (decode, as a serving loop runs it) or of do_bench (prefill).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys

import torch

from bench import common
from bench.bench_decode import to_paged

DEV = "cuda"


def _check(name, out, ref, tol):
    err = common.rel_err(out.float(), ref.float())
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3g} above {tol}")
    return err


def prefill(args, ceilings) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import attn.fast as fast
    import attn.reference as reference
    from attn import RelativeBias, alibi_slopes

    b, h, s, d = 4, 32, 4096, 128
    flops = 4.0 * b * h * d * s * (s + 1) / 2  # causal: the visible half of the square
    q, k, v = (torch.randn(b, s, h, d, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    slopes = alibi_slopes(h, device=DEV)
    md, nb = 128, 32
    rel_imp = RelativeBias(table=torch.randn(h, nb, device=DEV), max_distance=md, bidirectional=False)
    # regular mode reads a materialized bias: the implicit one's, so both must give the same result
    pos = torch.arange(s, device=DEV)
    dist = (pos[None, :] - pos[:, None]).clamp(-md, md) + md  # [S, S]
    table = rel_imp.distance_table()  # [H, 2·md + 1], float32
    rel_reg = RelativeBias(bias=table[:, dist].to(torch.bfloat16))
    variants = {
        "plain": {},
        "alibi": {"alibi_slopes": slopes},
        "t5_implicit": {"rel_bias": rel_imp},
        "t5_regular": {"rel_bias": rel_reg},
        "softcap": {"softcap": 30.0},
    }

    # the reference on the first sequence only (an fp32 [H, S, S] score tensor is 2 GB)
    def ref(kw):
        kw = dict(kw)
        if "rel_bias" in kw and not kw["rel_bias"].implicit:
            kw["rel_bias"] = RelativeBias(bias=kw["rel_bias"].bias.float())
        return reference.attention(q[:1].float(), k[:1].float(), v[:1].float(), causal=True, **kw)

    tuner = sys.modules["attn.fast.attention"]._attn_fwd_tuned

    def timed(name, impl, fn, first_sequence, want):
        """Checks one contender's first sequence against the reference, then times it."""
        entry = {"phase": "prefill", "variant": name, "impl": impl}
        try:
            keys = set(tuner.cache)
            entry["err"] = _check(name, first_sequence(fn()), want, args.tol)
            if impl == "ours":
                entry.update(common.autotune_record(tuner, keys))
            ms = common.bench_ms(fn)
            entry.update(ms=ms, tflops=common.tflops(flops, ms))
        except Exception as e:
            entry["error"] = common.short_error(e)
        common.free_memory()
        return entry

    rows = []
    for name, kw in variants.items():
        if args.variants and name not in args.variants and name != "plain":
            continue
        fn = lambda kw=kw: fast.attention(q, k, v, causal=True, **kw)
        rows.append(timed(name, "ours", fn, lambda out: out[:1], ref(kw)))

    flex = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    mask = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, s, s, device=DEV)
    scale = 1.0 / math.sqrt(d)

    def alibi_mod(score, b_, h_, qi, ki):
        return score + slopes[h_] * (ki - qi).to(score.dtype)

    def t5_mod(score, b_, h_, qi, ki):
        return score + table[h_, (ki - qi).clamp(-md, md) + md]

    def softcap_mod(score, b_, h_, qi, ki):
        return 30.0 * torch.tanh(score / 30.0)

    flex_variants = {"plain": None, "alibi": alibi_mod, "t5_implicit": t5_mod, "softcap": softcap_mod}
    for name, mod in flex_variants.items():
        if args.no_flex or (args.variants and name not in args.variants and name != "plain"):
            continue
        fn = lambda mod=mod: flex(qt, kt, vt, score_mod=mod, block_mask=mask, scale=scale)
        rows.append(timed(name, "flex", fn, lambda out: out[:1].transpose(1, 2), ref(variants[name])))

    plain_ms = {r["impl"]: r.get("ms") for r in rows if r["variant"] == "plain"}
    # the autotuner may give a bias another tile than plain's: its cost at plain's tile, from the tuning times
    plain = next((r for r in rows if r["variant"] == "plain" and r["impl"] == "ours"), {})
    for r in rows:
        if r["impl"] == "ours" and plain.get("config") in r.get("tuning_ms", {}) and "tuning_ms" in plain:
            r["cost_vs_plain_same_tile"] = r["tuning_ms"][plain["config"]] / plain["tuning_ms"][plain["config"]]
    ours = {r["variant"]: r.get("ms") for r in rows if r["impl"] == "ours"}
    for r in rows:
        base = plain_ms.get(r["impl"])
        if r.get("ms") and base:
            r["cost_vs_plain"] = r["ms"] / base
        if r["impl"] == "flex" and r.get("ms") and ours.get(r["variant"]):
            r["flex_ms_over_ours"] = r["ms"] / ours[r["variant"]]
    return rows


def decode(args, ceilings) -> list[dict]:
    import attn.fast as fast
    import attn.reference as reference
    from attn import RelativeBias, alibi_slopes, calibrate_kv_scales

    tuner = sys.modules["attn.fast.decode"]._decode_tuned
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for bsz, length in ((8, 32768), (1, 131072)):
        hq, hkv, d = 32, 8, 128
        shape = f"B{bsz} H{hq}/{hkv} L{length}"
        q = torch.randn(bsz, 1, hq, d, device=DEV, dtype=torch.bfloat16)
        kc = torch.randn(bsz, length, hkv, d, device=DEV, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        lens = torch.full((bsz,), length, dtype=torch.int32, device=DEV)
        elems = 2.0 * bsz * length * hkv * d
        quant = {}
        for qd in (torch.int8, torch.float8_e4m3fn):
            ks, vs = calibrate_kv_scales(kc, vc, qd, "head")
            kq, vq = (torch.empty(kc.shape, dtype=qd, device=DEV) for _ in range(2))
            fast.append_kv(kq, vq, kc, vc, torch.zeros_like(lens), k_scale=ks, v_scale=vs)
            quant[qd] = (kq, vq, ks, vs)
        # beam: requests of 4 beams; every token comes from a random beam of its request
        beam = 4 if bsz % 4 == 0 else 1
        ind = torch.randint(0, beam, (bsz // beam, beam, length), generator=gen, dtype=torch.int32).to(DEV)
        window = length - 1000  # a cyclic cache of N slots after L tokens: wrapped by 1000
        variants = {
            "plain": dict(cache=(kc, vc), kw={}),
            "alibi": dict(cache=(kc, vc), kw={"alibi_slopes": alibi_slopes(hq, device=DEV)}),
            "t5_implicit": dict(cache=(kc, vc), kw={"rel_bias": RelativeBias(
                table=torch.randn(hq, 32, device=DEV), max_distance=128, bidirectional=False)}),
            "int8": dict(cache=quant[torch.int8][:2], bytes_per=1,
                         kw={"k_scale": quant[torch.int8][2], "v_scale": quant[torch.int8][3]}),
            "fp8": dict(cache=quant[torch.float8_e4m3fn][:2], bytes_per=1,
                        kw={"k_scale": quant[torch.float8_e4m3fn][2], "v_scale": quant[torch.float8_e4m3fn][3]}),
            "cyclic": dict(cache=(kc[:, :window].contiguous(), vc[:, :window].contiguous()),
                           kw={"max_attention_window": window}, read=window),
        }  # fmt: skip
        if beam > 1:
            variants["beam4"] = dict(cache=(kc, vc), kw={"cache_indirection": ind})
        for name, var in variants.items():
            if args.variants and name not in args.variants and name != "plain":
                continue
            kv = var["cache"]
            read_tokens = var.get("read", length)
            nbytes = elems / length * read_tokens * var.get("bytes_per", 2)
            kw = var["kw"]
            # the reference on sequence 0 (1 token, fp32); quantized caches mean what they dequantize to
            rk, rv = kv[0][:1], kv[1][:1]
            if "k_scale" in kw:
                rk = reference.dequantize(rk, kw["k_scale"])
                rv = reference.dequantize(rv, kw["v_scale"])
            rkw = {key: val for key, val in kw.items() if key not in ("k_scale", "v_scale", "cache_indirection")}
            if "cache_indirection" in kw:
                # beam 0 of request 0 reads token t from row ind[0, 0, t]: materialize that history
                rows_ = ind[0, 0].long()
                t = torch.arange(length, device=DEV)
                rk, rv = kc[rows_, t][None], vc[rows_, t][None]
            want = reference.decode(q[:1].float(), rk.float(), rv.float(), lens[:1], **rkw)
            for layout in ("contiguous", "paged64"):
                entry = {"phase": "decode", "shape": shape, "variant": name, "layout": layout}
                try:
                    if layout == "contiguous":
                        k_, v_, table = kv[0], kv[1], None
                    else:
                        k_, v_, table = to_paged(kv[0], kv[1], 64, gen)
                    # cyclic: lens counts all L tokens ever appended into its N slots
                    fn = lambda q=q, lens=lens, k_=k_, v_=v_, table=table, kw=kw, check=False: fast.decode(
                        q, k_, v_, lens, block_table=table, validate=check, **kw
                    )
                    keys = set(tuner.cache)
                    entry["err"] = _check(name, fn(check=True)[:1], want, args.tol)
                    entry.update(common.autotune_record(tuner, keys))
                    ms = common.graph_ms(fn, calls_per_graph=10)
                    entry.update(ms=ms, tbps=common.tbps(nbytes, ms), bytes=nbytes)
                    copy = ceilings.get("copy_tbps")
                    entry["frac_copy_ceiling"] = entry["tbps"] / copy if copy else None
                except Exception as e:
                    entry["error"] = common.short_error(e)
                rows.append(entry)
                del k_, v_
                common.free_memory()
        base = {(r["layout"]): r.get("ms") for r in rows if r.get("shape") == shape and r["variant"] == "plain"}
        for r in rows:
            if r.get("shape") == shape and r.get("ms") and base.get(r["layout"]):
                r["speedup_vs_plain"] = base[r["layout"]] / r["ms"]
        del kc, vc, quant, variants
        common.free_memory()
    return rows


def preprocess(args, ceilings) -> list[dict]:
    import attn.fast as fast
    import attn.reference as reference

    hq, hkv, d, bs = 32, 8, 128, 64
    width = (hq + 2 * hkv) * d
    rows = []
    for name, bsz, new, cached in (("prefill 16x1024 on 1024", 16, 1024, 1024), ("decode B64 on 4096", 64, 1, 4096)):
        total = new + cached
        nblk = -(-total // bs)
        gen = torch.Generator().manual_seed(args.seed)
        table = torch.randperm(bsz * nblk, generator=gen).view(bsz, nblk).to(torch.int32).to(DEV)
        kp = torch.zeros(bsz * nblk, bs, hkv, d, device=DEV, dtype=torch.bfloat16)
        vp = torch.zeros_like(kp)
        qkv = torch.randn(bsz * new, width, device=DEV, dtype=torch.bfloat16)
        bias = torch.randn(width, device=DEV, dtype=torch.bfloat16)
        cu = torch.arange(0, bsz + 1, device=DEV, dtype=torch.int32) * new
        lens = torch.full((bsz,), cached, device=DEV, dtype=torch.int32)
        kw = dict(num_heads_q=hq, num_heads_kv=hkv, cu_seqlens_new=cu, block_table=table, qkv_bias=bias,
                  rotary_dim=d, rope_style="neox")  # fmt: skip
        nbytes = qkv.numel() * 2 + bsz * new * (hq + 2 * hkv) * d * 2
        entry = {"phase": "preprocess", "shape": name}
        try:
            kr, vr = kp.float(), vp.float()
            want = reference.preprocess(qkv.float(), kr, vr, lens, **{**kw, "qkv_bias": bias.float()})
            got = fast.preprocess(qkv, kp, vp, lens, **kw)
            entry["err"] = max(_check("q", got, want, args.tol), _check("k cache", kp, kr, args.tol))
            fn = functools.partial(fast.preprocess, qkv, kp, vp, lens, **kw)
            # the device's time: the serving loop's call (validate=False reads nothing back), replayed from a
            # CUDA graph. The validated call is timed too, with events: its host reads set its pace.
            hot = functools.partial(fast.preprocess, qkv, kp, vp, lens, validate=False, **kw)
            ms = common.graph_ms(hot)
            ms_validated = common.bench_ms(fn)
            entry.update(ms=ms, tbps=common.tbps(nbytes, ms), bytes=nbytes, ms_validated=ms_validated,
                         host_us=common.host_us(hot), host_us_validated=common.host_us(fn))  # fmt: skip
            copy = ceilings.get("copy_tbps")
            entry["frac_copy_ceiling"] = entry["tbps"] / copy if copy else None
        except Exception as e:
            entry["error"] = common.short_error(e)
        rows.append(entry)
        common.free_memory()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=["prefill", "decode", "preprocess"], default=[])
    p.add_argument("--variants", default="", help="comma list of variants to run (default all)")
    p.add_argument("--no-flex", action="store_true", help="skip the FlexAttention prefill contenders")
    p.add_argument("--out")
    p.add_argument("--tol", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    common.require_cuda("bench_features")
    import attn.fast  # noqa: F401  (before triton, whatever the machine)

    ceilings = common.measure_ceilings()
    out_path = args.out or common.default_out_path("features")
    record = {"benchmark": "features", "env": common.env_info(), "command": common.command_line(),
              "ceilings": ceilings, "results": []}  # fmt: skip
    for phase, fn in (("prefill", prefill), ("decode", decode), ("preprocess", preprocess)):
        if args.only and phase not in args.only:
            continue
        rows = fn(args, ceilings)
        record["results"].extend(rows)
        common.write_json(out_path, record)
        for r in rows:
            what = " ".join(str(r.get(k, "")) for k in ("phase", "shape", "variant", "impl", "layout") if r.get(k))
            if "error" in r:
                print(f"{what}: ERROR {r['error'][:300]}", flush=True)
                continue
            perf = f"{r['tflops']:.0f} TFLOP/s" if "tflops" in r else f"{r['tbps']:.2f} TB/s"
            extra = "".join(
                f" {k}={r[k]:.3f}"
                for k in (
                    "cost_vs_plain",
                    "cost_vs_plain_same_tile",
                    "flex_ms_over_ours",
                    "speedup_vs_plain",
                    "frac_copy_ceiling",
                    "ms_validated",
                    "host_us",
                    "host_us_validated",
                )
                if k in r
            )
            tile = f" [{r['config']}]" if "config" in r else ""
            print(f"{what}: {r['ms'] * 1e3:.0f} us {perf} err={r['err']:.2g}{extra}{tile}", flush=True)
    print(f"ceilings: {ceilings}\nresults: {out_path}")


if __name__ == "__main__":
    sys.exit(main())
