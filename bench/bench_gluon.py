"""The Gluon (sm_90) prefill kernel beside our tl.* kernel, cuDNN, FlashAttention-2 and FlexAttention.

    python -m bench.bench_gluon --out $OUT               # the PERF.md padded shapes, every contender
    python -m bench.bench_gluon --only S4096 --variants all --out $OUT  # variants on every shape
    python -m bench.bench_gluon --no-fp8 --out $OUT      # without the FP8 rows

Same process, same inputs, each contender checked against the fp32 reference before it is timed (a wrong one is
reported, not timed); the bf16 8192³ matmul is measured in the same run as the ceiling. Contenders:

  gluon            attn.fast.attention with ATTN_GLUON=1: the call a user makes, dispatched to the Gluon kernel
                   (default variant: two 4-warp consumer partitions, Q·Kᵀ of the next tile overlapped,
                   persistent grid of one program per SM)
  gluon_rowmajor   attention_gluon called directly: the default variant with run 1's schedule (all (b, h) of a
                   row block together, no L2 sections), on every shape
  gluon_2x4_serial attention_gluon called directly: two consumer partitions, no intra-warpgroup overlap
  gluon_grid       attention_gluon called directly: the default variant, one program per work item
  gluon_bn64       attention_gluon called directly: the default variant on 64-key tiles (6 stages at D128)
  gluon_noguard    attention_gluon called directly: the default variant WITHOUT the masked tiles' non-finite
                   check (guard_hidden=False; breaks SPEC's hidden-values rule): a baseline that prices the check,
                   on every shape
  gluon_ovl_unmasked attention_gluon called directly: overlap="unmasked", the masked tiles serial (the guard's
                   spills came from overlapping them), on every shape
  gluon_pingpong   attention_gluon called directly: overlap="pingpong", the two consumers taking turns to issue
                   their products over the unmasked range (FA3's ping-pong), masked tiles serial, on every shape
  tl               attn.fast.attention with ATTN_GLUON=0: the tl.* kernel (its fixed config unless autotuning)
  default          attn.fast.attention, ATTN_GLUON unset: the default dispatch (gluon_default decides; the
                   record's note says which kernel ran)

(The one-8-warp-consumer variants lost on every shape in run 1, 0.78-0.98x the default; they stay in the tests.)
With ``--fp8`` (on by default) the FP8 prefill (`attn.fast.fp8_prefill`) is timed against our bf16 prefill at
S >= 4096 on the same shapes (a second table: TFLOP/s, ratio to bf16).
  cudnn / flash    SDPA pinned to one backend, on [B, H, S, D] copies made before timing
  flex             torch.compile(flex_attention), block mask built outside timing

The packed (varlen) row of PERF.md is timed in its own table (``--seqlens``, on by default), full and causal:
gluon_packed / tl_packed are the packed call (cu_seqlens, max_seqlen given) with ATTN_GLUON=1 / 0, gluon / tl
the same lengths in the padded layout with ``seqlens_q/k`` (padding rows hold NaN). Peers in one process; the
ratio in parentheses is to tl_packed. With ``--alibi`` (on by default) ALiBi (slopes [Hq], both modes) is
timed on the GQA and S1024 shapes: gluon and tl through attn.fast.attention, beside plain gluon (a fourth table).
Writes one JSON (``--out`` is a folder, or a .json path) and prints TFLOP/s, the fraction of the matmul
ceiling, and the ratio to cuDNN (cudnn_ms / ms: > 1 means faster than cuDNN) and to the tl.* kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import common
from bench.bench_attention import (
    SHAPES,
    Contender,
    Skip,
    _padded,
    build_flex,
    build_sdpa,
    make_check,
    make_inputs,
    prepare,
)

VARIANTS = {
    "gluon_rowmajor": {"l2_bytes": None},
    "gluon_2x4_serial": {"consumers": 2, "overlap": False},
    "gluon_grid": {"persistent": False},
    "gluon_bn64": {"block_n": 64},
    "gluon_noguard": {"guard_hidden": False},
    "gluon_ovl_unmasked": {"overlap": "unmasked"},
    "gluon_pingpong": {"overlap": "pingpong"},
}
# the run-1 schedule is the same compiled kernel (the section is a runtime argument): timed on every shape; so are
# the unguarded baseline, whose difference to gluon_rowmajor/gluon is the masked tiles' check, and the variant
# that stops overlapping the masked tiles (what the check costs without its spills)
EVERY_SHAPE_VARIANTS = ("gluon_rowmajor", "gluon_noguard", "gluon_ovl_unmasked", "gluon_pingpong")
COLUMNS = ["gluon", *VARIANTS, "tl", "default", "cudnn", "flash", "flex"]


@contextlib.contextmanager
def _env(value: str | None):
    """ATTN_GLUON set to ``value`` (None: unset) for the duration."""
    saved = os.environ.get("ATTN_GLUON")
    if value is None:
        os.environ.pop("ATTN_GLUON", None)
    else:
        os.environ["ATTN_GLUON"] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ATTN_GLUON", None)
        else:
            os.environ["ATTN_GLUON"] = saved


def build_gluon(shape, x, args) -> Contender:
    import attn.fast as fast
    from attn.fast import gluon_attention as ga

    if shape.packed:
        raise Skip("the Gluon kernel takes the padded layout only")
    # the user's call must really reach the Gluon kernel: count one dispatch before this contender is accepted
    calls = []
    real = ga.attention_gluon
    ga.attention_gluon = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        with _env("1"):
            fast.attention(x.q, x.k, x.v, causal=shape.causal)
    finally:
        ga.attention_gluon = real
    if not calls:
        raise RuntimeError("ATTN_GLUON=1 did not dispatch to the Gluon kernel (gluon_supported said no)")
    return Contender(lambda: fast.attention(x.q, x.k, x.v, causal=shape.causal), context=lambda: _env("1"),
                     note="attn.fast.attention, ATTN_GLUON=1")  # fmt: skip


def build_variant(name):
    def build(shape, x, args) -> Contender:
        from attn.fast import gluon_attention as ga

        if shape.packed:
            raise Skip("the Gluon kernel takes the padded layout only")
        kw = VARIANTS[name]
        scale = shape.head_dim**-0.5
        right = 0 if shape.causal else -1
        fn = lambda: ga.attention_gluon(x.q, x.k, x.v, scale=scale, window_right=right, **kw)
        return Contender(fn, note=f"attention_gluon direct call {kw}")

    return build


def build_tl(shape, x, args) -> Contender:
    import attn.fast as fast

    return Contender(lambda: fast.attention(x.q, x.k, x.v, causal=shape.causal), context=lambda: _env("0"),
                     note="attn.fast.attention, ATTN_GLUON=0: tl.* kernel")  # fmt: skip


def build_default(shape, x, args) -> Contender:
    import attn.fast as fast
    from attn.fast import gluon_attention as ga

    calls = []
    real = ga.attention_gluon
    ga.attention_gluon = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        with _env(None):
            fast.attention(x.q, x.k, x.v, causal=shape.causal)
    finally:
        ga.attention_gluon = real
    note = f"attn.fast.attention, ATTN_GLUON unset: default dispatch ran the {'Gluon' if calls else 'tl.*'} kernel"
    return Contender(lambda: fast.attention(x.q, x.k, x.v, causal=shape.causal), context=lambda: _env(None), note=note)


# the structural variants are timed where they differ most: short and long causal sequences, and the full shape,
# where the inner loop (overlap, 64-key tiles) matters most once the schedule no longer waits on HBM
VARIANT_SHAPES = ("B16 H32 S1024 D128 causal", "B4 H32 S4096 D128 causal", "B4 H32 S4096 D128 full")
# ``--grid``: where the default dispatch's threshold should sit below S4096 (16k tokens a batch; session 9 measured
# S1024 causal D128 only: Gluon 0.94x tl.*, its serial variant 1.09x)
GRID_SHAPES = [_padded(16384 // s, 32, hkv, s, d, causal, " gqa" if hkv != 32 else "")
               for s in (1024, 2048) for causal in (True, False) for d in (128, 64) for hkv in (32, 8)]  # fmt: skip
# and two rows of the default's regime, for the variants' cost there
GRID_SHAPES += [_padded(4, 32, 32, 4096, 128, causal) for causal in (True, False)]
GRID_COLUMNS = (
    "gluon",
    "gluon_2x4_serial",
    "gluon_ovl_unmasked",
    "gluon_pingpong",
    "gluon_noguard",
    "tl",
    "default",
    "cudnn",
)


def contenders(variants: str) -> dict[str, list]:
    """``variants``: "all" (every Gluon variant), "some" (the every-shape ones), "default" (none) or "grid"
    (GRID_COLUMNS)."""
    table = {
        "gluon": [build_gluon],
        "tl": [build_tl],
        "default": [build_default],
        "cudnn": [build_sdpa("cudnn", "native"), build_sdpa("cudnn", "repeat")],
        "flash": [build_sdpa("flash", "native"), build_sdpa("flash", "repeat")],
        "flex": [build_flex],
    }
    if variants == "grid":
        table.update({name: [build_variant(name)] for name in VARIANTS})
        return {c: table[c] for c in GRID_COLUMNS}
    if variants == "all":
        table.update({name: [build_variant(name)] for name in VARIANTS})
    elif variants == "some":
        table.update({name: [build_variant(name)] for name in EVERY_SHAPE_VARIANTS})
    return {c: table[c] for c in COLUMNS if c in table}


def run_shape(shape, args, ceilings) -> dict:
    flops = shape.flops()
    result: dict[str, Any] = {"name": shape.name, "flops": flops, "contenders": {}}
    print(f"\n== {shape.name}   ({flops / 1e12:.3f} TFLOP)", flush=True)
    torch.manual_seed(args.seed)
    x = make_inputs(shape, torch.bfloat16)
    check = make_check(shape, x, args.check_rows)
    common.free_memory()
    ready = {}
    if args.grid:
        which = "grid"
    elif args.variants == "all" or (args.variants == "some" and shape.name in VARIANT_SHAPES):
        which = "all"
    else:
        which = "default" if args.variants == "default" else "some"
    for name, builders in contenders(which).items():
        c, rec = prepare(name, builders, shape, x, check, args)
        result["contenders"][name] = rec
        if c is not None:
            ready[name] = c
            if name == "default":
                print(f"  {name:<17} {rec['note']}", flush=True)
        else:
            print(f"  {name:<17} {rec['status']:<7} {rec.get('error') or rec['note']}"[:240], flush=True)
    times: dict[str, list[float]] = {n: [] for n in ready}
    for _ in range(args.repeat):  # round-robin: drift shows as spread, not as a difference between contenders
        for name, c in ready.items():
            try:
                with c.context():
                    ms, method = common.time_ms(c.fn, args.warmup, args.rep)
                times[name].append(ms)
                result["contenders"][name]["timing"] = method
            except Exception as e:
                rec = result["contenders"][name]
                rec["status"], rec["error"] = "error", f"timing failed: {common.short_error(e)}"
    ceiling = ceilings.get("matmul_bf16_tflops")
    for name, ts in times.items():
        rec = result["contenders"][name]
        if rec["status"] == "ok" and ts:
            ms = statistics.median(ts)
            tf = common.tflops(flops, ms)
            rec.update(ms=ms, ms_all=ts, spread=(max(ts) - min(ts)) / ms, tflops=tf,
                       frac_of_matmul_ceiling=(tf / ceiling) if ceiling else None)  # fmt: skip
    ref = {k: result["contenders"].get(k, {}).get("ms") for k in ("cudnn", "tl")}
    for name, rec in result["contenders"].items():
        if rec.get("ms"):
            rec["vs_cudnn"] = ref["cudnn"] / rec["ms"] if ref["cudnn"] else None
            rec["vs_tl"] = ref["tl"] / rec["ms"] if ref["tl"] else None
            print(f"  {name:<17} {rec['ms']:8.3f} ms  {rec['tflops']:6.1f} TFLOP/s  "
                  f"{common.fmt(rec['frac_of_matmul_ceiling'], '.2f')} of matmul  "
                  f"x{common.fmt(rec['vs_cudnn'], '.2f')} vs cudnn  x{common.fmt(rec['vs_tl'], '.2f')} vs tl  "
                  f"err {rec['err']:.1e}", flush=True)  # fmt: skip
    del ready, x, check
    common.free_memory()
    return result


# ---------------------------------------------------------------------------------------------------------------
# FP8 prefill (issue 17 item 2): attention_fp8 on e4m3 copies of the same inputs against our bf16 prefill


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Relative RMS error ``‖out − ref‖ / ‖ref‖`` in float64 (tests/helpers.py's definition)."""
    ref, out = ref.double(), out.double()
    return (out - ref).norm().item() / (ref.norm().item() or 1.0)


def run_fp8_shape(shape, args) -> dict:
    """Time FP8 prefill beside our bf16 calls (the default dispatch and the tl.* kernel) on one shape. The FP8
    inputs are quantized per (batch, KV head) outside timing; the V transpose the FP8 call makes is inside it.
    Checked on the last ``check_rows`` query rows: against the FP8 reference (its own numerics) and, for the
    record, against the float32 reference of the bf16 inputs (what quantizing the inputs costs)."""
    import attn.fast as fast
    from attn.fast import fp8_prefill as fk
    from attn.fast import gluon_attention as ga
    from attn.reference import attention as ref_attention
    from attn.reference import fp8_attention as fr

    flops = shape.flops()
    print(f"\n== FP8 {shape.name}   ({flops / 1e12:.3f} TFLOP)", flush=True)
    torch.manual_seed(args.seed)
    x = make_inputs(shape, torch.bfloat16)
    (q8, qd), (k8, kd), (v8, vd) = (fr.quantize_fp8(t, shape.heads_kv) for t in (x.q, x.k, x.v))
    descales = torch.stack([qd, kd, vd]).contiguous()  # [3, B, Hkv], as attention_fp8_gluon takes them
    result: dict[str, Any] = {"name": "FP8 " + shape.name, "flops": flops, "contenders": {}}
    fns = {
        # the call as a user makes it (gluon_attention.fp8_default picks the kernel), and each kernel forced
        "fp8": (lambda: fk.attention_fp8(q8, k8, v8, qd, kd, vd, causal=shape.causal), None),
        "fp8_gluon": (lambda: fk.attention_fp8(q8, k8, v8, qd, kd, vd, causal=shape.causal), "1"),
        "fp8_tl": (lambda: fk.attention_fp8(q8, k8, v8, qd, kd, vd, causal=shape.causal), "0"),
        # the Gluon FP8 kernel called directly with the consumers in ping-pong (not the default call)
        "fp8_gluon_pp": (
            lambda: ga.attention_fp8_gluon(
                q8, k8, v8, descales, scale=shape.head_dim**-0.5, causal=shape.causal, overlap="pingpong"
            ),
            None,
        ),
        "bf16_default": (lambda: fast.attention(x.q, x.k, x.v, causal=shape.causal), None),
        "bf16_tl": (lambda: fast.attention(x.q, x.k, x.v, causal=shape.causal), "0"),
    }
    rows = slice(-args.check_rows, None)  # bottom-right causal: the last rows against all keys are these rows
    with torch.no_grad():
        want8 = fr.attention_fp8(q8[:, rows], k8, v8, qd, kd, vd, causal=shape.causal).float()
        want = ref_attention(x.q[:, rows].float(), x.k.float(), x.v.float(), causal=shape.causal)
    real, launches = ga.attention_fp8_gluon, []

    def counted(*a, **kw):
        launches.append(1)
        return real(*a, **kw)

    for name, (fn, env) in fns.items():
        launches.clear()
        ga.attention_fp8_gluon = counted
        try:
            with _env(env):
                out = fn()
                torch.cuda.synchronize()
        finally:
            ga.attention_fp8_gluon = real
        got = out[:, rows].float()
        note = f"ATTN_GLUON={env}" if name != "fp8_gluon_pp" else "attention_fp8_gluon(overlap='pingpong'), direct"
        rec = {"status": "ok", "err_vs_fp32_ref": rel_err(want, got), "note": note}
        if name == "fp8_gluon" and not launches:
            rec["status"] = "not launched"
            print("  fp8_gluon: the Gluon FP8 kernel did not run (not sm_90, or fp8_supported refused)", flush=True)
        if name.startswith("fp8"):
            rec["err_vs_fp8_ref"] = rel_err(want8, got)
            # a sanity bound, not a tolerance (tests/test_fp8_prefill.py has those): P rounded against the running
            # max instead of the final one differs by up to ~2^-4/sqrt(3) relative per rounding, 1-4% RMS of the
            # output on random inputs; a descale or mask defect gives O(1). Reported, and still timed
            if not rec["err_vs_fp8_ref"] <= 0.1:
                rec["status"] = "wrong"
                print(f"  fp8 WRONG: rel err {rec['err_vs_fp8_ref']:.2e} vs the FP8 reference", flush=True)
        result["contenders"][name] = rec
        del out
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(args.repeat):
        for name, (fn, env) in fns.items():
            if result["contenders"][name]["status"] == "not launched":
                continue
            with _env(env):
                ms, method = common.time_ms(fn, args.warmup, args.rep)
            times[name].append(ms)
            result["contenders"][name]["timing"] = method
    for name, ts in times.items():
        if ts:
            rec = result["contenders"][name]
            ms = statistics.median(ts)
            rec.update(ms=ms, ms_all=ts, tflops=common.tflops(flops, ms))
    base = result["contenders"]["bf16_default"]["ms"]
    for name, rec in result["contenders"].items():
        if "ms" not in rec:
            continue
        rec["vs_bf16_default"] = base / rec["ms"]
        extra = f"  err vs fp8 ref {rec['err_vs_fp8_ref']:.1e}" if "err_vs_fp8_ref" in rec else ""
        print(f"  {name:<13} {rec['ms']:8.3f} ms  {rec['tflops']:6.1f} TFLOP/s  x{rec['vs_bf16_default']:.2f} vs "
              f"bf16 default  err vs fp32 ref {rec['err_vs_fp32_ref']:.1e}{extra}", flush=True)  # fmt: skip
    fns.clear()  # the closures hold the inputs; the caller frees memory after this frame is gone
    return result


def _check_and_time(result: dict, fns: dict, checked: tuple, args) -> None:
    """The contenders ``fns`` (name -> (call, ATTN_GLUON value)) into ``result["contenders"]``. Each name in
    ``checked`` and its tl.* peer (the name with "gluon" -> "tl") run once first: the Gluon call must have
    launched the Gluon kernel, give no NaN and agree with its peer within ``args.tol`` (tl.* is tested against
    the reference), else it is marked wrong. Then every contender still ok is timed, ``args.repeat`` passes."""
    from attn.fast import gluon_attention as ga

    peers = {c: c.replace("gluon", "tl", 1) for c in checked}
    real = ga.attention_gluon
    calls: list[str] = []
    outs, dispatched = {}, {}
    ga.attention_gluon = lambda *a, **kw: calls.append("") or real(*a, **kw)
    try:
        for cname, (fn, env) in fns.items():
            if cname in peers or cname in peers.values():
                calls.clear()
                with _env(env):
                    outs[cname] = fn()
                dispatched[cname] = bool(calls)
    finally:
        ga.attention_gluon = real
    for cname, (_, env) in fns.items():
        rec: dict[str, Any] = {"status": "ok", "note": f"ATTN_GLUON={env}"}
        if cname in peers:
            peer = peers[cname]
            err = rel_err(outs[peer], outs[cname])
            rec["err"] = err
            if not dispatched[cname] or torch.isnan(outs[cname]).any().item() or err > args.tol:
                rec.update(status="wrong", error=f"dispatched={dispatched[cname]} err={err:.2e} vs {peer}")
        result["contenders"][cname] = rec
    del outs
    for _ in range(args.repeat):
        for cname, (fn, env) in fns.items():
            rec = result["contenders"][cname]
            if rec["status"] == "ok":
                with _env(env):
                    ms, rec["timing"] = common.time_ms(fn, args.warmup, args.rep)
                rec.setdefault("ms_all", []).append(ms)


def run_seqlens_shape(shape, args) -> dict:
    """A packed shape: the Gluon and tl.* kernels on the packed call (cu_seqlens, max_seqlen given), and on the
    same lengths in the padded layout with ``seqlens_q = seqlens_k = lengths`` (padding rows hold NaN: they must
    not matter), in one process. Each Gluon call is checked against the tl.* call of its layout."""
    import attn.fast as fast

    lengths, h, d = shape.lengths, shape.heads_q, shape.head_dim
    b, smax = len(lengths), max(lengths)
    flops = shape.flops()
    name = f"seqlens B{b} H{h} Smax{smax} D{d} {'causal' if shape.causal else 'full'}"
    print(f"\n== {name}   ({flops / 1e12:.3f} TFLOP)", flush=True)
    torch.manual_seed(args.seed)
    q, k, v = (torch.randn(b, smax, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    for i, n in enumerate(lengths):
        for t in (q, k, v):
            t[i, n:] = float("nan")
    cu = torch.zeros(b + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.cumsum(lens, 0)
    qp, kp, vp = (torch.cat([t[i, :n] for i, n in enumerate(lengths)]) for t in (q, k, v))
    padded = lambda: fast.attention(q, k, v, causal=shape.causal, seqlens_q=lens, seqlens_k=lens)
    packed = lambda: fast.attention(qp, kp, vp, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=smax,
                                    max_seqlen_k=smax, causal=shape.causal)  # fmt: skip
    fns = {"gluon_packed": (packed, "1"), "tl_packed": (packed, "0"), "gluon": (padded, "1"), "tl": (padded, "0")}
    result: dict[str, Any] = {"name": name, "flops": flops, "contenders": {}}
    _check_and_time(result, fns, ("gluon_packed", "gluon"), args)
    tl_ms = statistics.median(result["contenders"]["tl_packed"].get("ms_all") or [float("nan")])
    for cname, rec in result["contenders"].items():
        if rec.get("ms_all"):
            rec["ms"] = statistics.median(rec["ms_all"])
            rec["tflops"] = common.tflops(flops, rec["ms"])
            rec["vs_tl"] = tl_ms / rec["ms"]
            print(f"  {cname:<10} {rec['ms']:8.3f} ms  {rec['tflops']:6.1f} TFLOP/s  "
                  f"x{rec['vs_tl']:.2f} vs tl_packed", flush=True)  # fmt: skip
        else:
            print(f"  {cname:<10} {rec['status']} {rec.get('error', '')}", flush=True)
    return result


ALIBI_SHAPES = ("B4 H32/8 S4096 D128 causal gqa", "B16 H32 S1024 D128 causal")


def run_alibi_shape(shape, args) -> dict:
    """ALiBi (slopes ``2^(-8h/H)``, both modes) on one padded shape: the Gluon kernel (ATTN_GLUON=1) and the
    tl.* kernel (ATTN_GLUON=0) through attn.fast.attention, and the Gluon kernel without ALiBi (what the bias
    costs it), in one process. Each Gluon ALiBi call is checked against the tl.* call of its mode."""
    import attn.fast as fast

    flops = shape.flops()
    print(f"\n== ALiBi {shape.name}   ({flops / 1e12:.3f} TFLOP)", flush=True)
    torch.manual_seed(args.seed)
    x = make_inputs(shape, torch.bfloat16)
    slopes = torch.exp2(-8.0 * torch.arange(1, shape.heads_q + 1, device="cuda") / shape.heads_q)
    call = lambda mode: lambda: fast.attention(x.q, x.k, x.v, causal=shape.causal, alibi_slopes=slopes,
                                               alibi_mode=mode)  # fmt: skip
    plain = lambda: fast.attention(x.q, x.k, x.v, causal=shape.causal)
    fns = {"gluon_alibi": (call("alibi"), "1"), "tl_alibi": (call("alibi"), "0"),
           "gluon_alibi_with_scale": (call("alibi_with_scale"), "1"),
           "tl_alibi_with_scale": (call("alibi_with_scale"), "0"), "gluon_plain": (plain, "1")}  # fmt: skip
    result: dict[str, Any] = {"name": "ALiBi " + shape.name, "flops": flops, "contenders": {}}
    _check_and_time(result, fns, ("gluon_alibi", "gluon_alibi_with_scale"), args)
    for cname, rec in result["contenders"].items():
        if rec.get("ms_all"):
            rec["ms"] = statistics.median(rec["ms_all"])
            rec["tflops"] = common.tflops(flops, rec["ms"])
            print(f"  {cname:<23} {rec['ms']:8.3f} ms  {rec['tflops']:6.1f} TFLOP/s", flush=True)
        else:
            print(f"  {cname:<23} {rec['status']} {rec.get('error', '')}", flush=True)
    return result


def summary(results, ceilings) -> str:
    cols = [c for c in COLUMNS if any(c in r["contenders"] for r in results)]
    rows = []
    for r in results:
        row = [r["name"]]
        for c in cols:
            rec = r["contenders"].get(c)
            if rec is None:
                row.append("")
            elif rec.get("tflops") is not None:
                row.append(f"{rec['tflops']:.0f} ({common.fmt(rec.get('vs_cudnn'), '.2f')})")
            else:
                row.append({"skipped": "-", "wrong": "WRONG", "error": "ERR"}.get(rec["status"], rec["status"]))
        rows.append(row)
    bad = [f"  {r['name']} / {c}: {rec['status']} {common.fmt(rec.get('err'), '.2e')} {rec.get('error', '')}"[:240]
           for r in results for c, rec in r["contenders"].items() if rec["status"] in ("wrong", "error")]  # fmt: skip
    ceiling = common.fmt(ceilings.get("matmul_bf16_tflops"), ".0f")
    lines = [
        "TFLOP/s (cudnn_ms / ms in parentheses: > 1 means faster than cuDNN)",
        common.format_table(["shape", *cols], rows),
        f"ceiling: matmul bf16 8192^3 {ceiling} TFLOP/s",
    ]
    if bad:
        lines += ["problems:", *bad]
    return "\n".join(lines)


def _record(doc, key, label, out_path, run, shape, *run_args) -> None:
    """One row of table ``key``: ``run(shape, *run_args)``, or the error it raised (one shape failing must not hide
    the others), with its wall time; the document is written after every row, so a run cut by a time limit keeps
    the rows it finished."""
    t0 = time.perf_counter()
    try:
        res = run(shape, *run_args)
    except Exception as e:
        res = {"name": label + shape.name, "error": common.short_error(e), "traceback": common.tail_traceback(),
               "contenders": {}}  # fmt: skip
        print(f"  {label}shape failed: {res['error']}", flush=True)
    common.free_memory()
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"  ({res['wall_s']} s)", flush=True)
    doc.setdefault(key, []).append(res)
    common.write_json(out_path, doc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="folder (or .json path) for the result; default bench/results/")
    p.add_argument("--only", action="append", default=[], help="keep shapes whose name contains this (repeatable)")
    p.add_argument("--variants", default="some", choices=["all", "some", "default"],
                   help="every Gluon variant on every shape, on VARIANT_SHAPES only (default), or none")  # fmt: skip
    p.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=float, default=100, help="do_bench measuring time, ms")
    p.add_argument("--repeat", type=int, default=2, help="timed passes over the contenders")
    p.add_argument("--tol", type=float, default=1e-2, help="largest relative error vs the fp32 reference")
    p.add_argument("--check-rows", type=int, default=256, help="query rows checked at each end of a sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True,
                   help="also time FP8 prefill against our bf16 prefill at S >= 4096")  # fmt: skip
    p.add_argument("--alibi", action=argparse.BooleanOptionalAction, default=True,
                   help="also time ALiBi (both modes) on ALIBI_SHAPES, Gluon vs tl.*")  # fmt: skip
    p.add_argument("--grid", action="store_true",
                   help="time GRID_SHAPES (S1024/2048, causal and full, D64/128, MHA and GQA 4; S4096 causal and full) "
                   "with GRID_COLUMNS "
                   "instead of the shape table, and nothing else (no FP8, seqlens or ALiBi tables)")  # fmt: skip
    p.add_argument("--fp8-only", action="store_true", help="only the FP8 table (its shapes: S >= 4096)")
    p.add_argument("--seqlens", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the packed shape's lengths as seqlens_q/k in the padded layout")  # fmt: skip
    args = p.parse_args(argv)
    common.require_cuda("bench.bench_gluon")
    import attn  # noqa: F401  (before anything else imports triton)

    shapes = [s for s in SHAPES if not s.packed]
    if args.grid:
        shapes = GRID_SHAPES
        args.fp8 = args.seqlens = args.alibi = False
    if args.only:
        shapes = [s for s in shapes if any(o.lower() in s.name.lower() for o in args.only)]
    if args.out.endswith(".json"):
        out_path = Path(args.out)
    else:
        name = common.default_out_path("gluon").name
        out_path = Path(args.out) / name if args.out else common.RESULTS_DIR / name
    env = common.env_info()
    print(f"{env.get('gpu')} ({env.get('sm_count')} SMs)  torch {env['torch']}  triton {env.get('triton')}  "
          f"commit {env['git_commit'][:12]}", flush=True)  # fmt: skip
    ceilings = common.measure_ceilings()
    print(f"ceilings: {ceilings}", flush=True)
    doc: dict[str, Any] = {
        "benchmark": "gluon prefill (forward) vs tl.* and peers", "env": env, "args": vars(args),
        "ceilings": ceilings, "flops_definition": "4*Hq*Sq*Sk*D, halved for causal",
        "ratio_definition": "vs_cudnn = cudnn_ms / ms, vs_tl = tl_ms / ms (> 1: faster than that peer)",
        "results": [],
    }  # fmt: skip
    if args.fp8_only:
        args.fp8, args.seqlens, args.alibi = True, False, False
    for shape in [] if args.fp8_only else shapes:
        _record(doc, "results", "", out_path, run_shape, shape, args, ceilings)
    if args.fp8:
        for shape in [s for s in shapes if s.seqlen >= 4096]:
            _record(doc, "fp8_results", "FP8 ", out_path, run_fp8_shape, shape, args)
    if args.seqlens:
        for shape in [s for s in SHAPES if s.packed]:
            for causal in (False, True):
                sh = dataclasses.replace(shape, causal=causal)
                _record(doc, "seqlens_results", "seqlens ", out_path, run_seqlens_shape, sh, args)
    if args.alibi:
        for shape in [s for s in SHAPES if s.name in ALIBI_SHAPES]:
            _record(doc, "alibi_results", "ALiBi ", out_path, run_alibi_shape, shape, args)
    if doc["results"]:
        print("\n" + summary(doc["results"], ceilings))
    if doc.get("fp8_results"):
        rows = []
        for r in doc["fp8_results"]:
            c = r["contenders"]
            cells = [f"{c[n]['tflops']:.0f} ({c[n]['vs_bf16_default']:.2f})" if c.get(n, {}).get("ms") else "ERR"
                     for n in ("fp8", "fp8_gluon", "fp8_gluon_pp", "fp8_tl", "bf16_default", "bf16_tl")]  # fmt: skip
            rows.append([r["name"][4:], *cells])
        print("\nFP8 prefill, TFLOP/s (bf16_default_ms / ms in parentheses; target fp8 >= 1.6)")
        print(common.format_table(["shape", "fp8 (default call)", "fp8_gluon (ATTN_GLUON=1)",
                                   "fp8_gluon_pp (direct, ping-pong)", "fp8_tl (ATTN_GLUON=0)",
                                   "bf16_default", "bf16_tl"], rows))  # fmt: skip
    if doc.get("seqlens_results"):
        rows = []
        for r in doc["seqlens_results"]:
            c = r["contenders"]
            cells = [f"{c[n]['tflops']:.0f} ({c[n]['vs_tl']:.2f})" if c.get(n, {}).get("ms") else "ERR"
                     for n in ("gluon_packed", "tl_packed", "gluon", "tl")]  # fmt: skip
            rows.append([r["name"], *cells])
        print("\nPacked / per-sequence lengths, TFLOP/s of the valid tokens (tl_packed_ms / ms in parentheses)")
        print(common.format_table(["shape", "gluon_packed", "tl_packed", "gluon (seqlens)", "tl (seqlens)"], rows))
    if doc.get("alibi_results"):
        names = ["gluon_alibi", "tl_alibi", "gluon_alibi_with_scale", "tl_alibi_with_scale", "gluon_plain"]
        rows = [[r["name"], *(f"{r['contenders'][n]['tflops']:.0f}" if r["contenders"].get(n, {}).get("ms") else "ERR"
                              for n in names)] for r in doc["alibi_results"]]  # fmt: skip
        print("\nALiBi, TFLOP/s")
        print(common.format_table(["shape", *names], rows))
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
