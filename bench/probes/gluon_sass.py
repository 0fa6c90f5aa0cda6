"""Compile the Gluon prefill kernel (attn/fast/gluon_attention.py) for sm_90a on a machine without a GPU and
report what ptxas says: registers, spills, shared memory, and the instruction mix of each loop.

    TRITON_INTERPRET=0 PYTHONPATH=. python bench/probes/gluon_sass.py [--cases plain,causal] [--dump DIR]

Arguments come from the real `launch_args` on CPU tensors (TMA descriptors only record shapes and strides), so
the specialization is the one the GPU launch would compile. A warp-specialized kernel's register count from
ptxas is the launch limit (``maxnreg``); the partitions' own budgets appear as ``setmaxnreg`` in the SASS.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from sass_tools import compile_for_target, loops, parse, resources, sass_of  # noqa: E402

from attn.fast import gluon_attention as ga  # noqa: E402

COUNTS = ["HGMMA", "QGMMA", "WARPGROUP", "MUFU.EX2", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "LDS", "STS", "BAR",
          "SYNCS", "SHFL", "PRMT", "F2FP", "UTMALDG", "BRA"]  # fmt: skip


def cases():
    # (B, Sq, Sk, Hq, Hkv, D, dtype, causal, window, softcap, lse, overlap, consumers)
    bf, f16, f8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn
    return {
        "causal_d128": (2, 1024, 1024, 4, 4, 128, bf, True, -1, 0.0, False, True, 2),
        "causal_d128_noovl": (2, 1024, 1024, 4, 4, 128, bf, True, -1, 0.0, False, False, 2),
        "causal_d128_1wg8": (2, 1024, 1024, 4, 4, 128, bf, True, -1, 0.0, False, True, 1),
        "causal_d128_bn64": (2, 1024, 1024, 4, 4, 128, bf, True, -1, 0.0, False, True, 2, 64),
        "full_d128_lse": (2, 1024, 1024, 4, 4, 128, bf, False, -1, 0.0, True, True, 2),
        "causal_d64": (2, 1024, 1024, 4, 4, 64, bf, True, -1, 0.0, False, True, 2),
        "gqa_fp16": (2, 1024, 1024, 8, 2, 128, f16, True, -1, 0.0, False, True, 2),
        "window_softcap": (2, 1024, 1024, 4, 4, 128, bf, True, 256, 30.0, True, True, 2),
        # FP8 (e4m3 Q, K, V; Vᵀ stages, QGMMA): `attention_fp8_gluon`
        "fp8_causal_d128": (2, 1024, 1024, 8, 2, 128, f8, True, -1, 0.0, False, True, 2),
        "fp8_full_d128": (2, 1024, 1024, 8, 2, 128, f8, False, -1, 0.0, False, True, 2),
        "fp8_causal_d64": (2, 1024, 1024, 8, 2, 64, f8, True, -1, 0.0, False, True, 2),
        # overlap="pingpong": the consumers take turns to issue their products over the unmasked range
        "causal_d128_pp": (2, 1024, 1024, 4, 4, 128, bf, True, -1, 0.0, False, "pingpong", 2),
        "full_d128_lse_pp": (2, 1024, 1024, 4, 4, 128, bf, False, -1, 0.0, True, "pingpong", 2),
        "causal_d64_pp": (2, 1024, 1024, 4, 4, 64, bf, True, -1, 0.0, False, "pingpong", 2),
        "fp8_causal_d128_pp": (2, 1024, 1024, 8, 2, 128, f8, True, -1, 0.0, False, "pingpong", 2),
    }


def every_specialization():
    """Every constexpr combination that tests/test_gluon_attention.py, bench/bench_gluon.py and
    bench/probes/gluon_smoke.py compile (lengths and windows are not specialized), as cases()-style tuples."""
    bf, f16 = torch.bfloat16, torch.float16
    features = {"full": (False, -1, 0.0), "causal": (True, -1, 0.0), "causal-window": (True, 200, 0.0),
                "window-both": (False, 150, 0.0), "softcap": (True, -1, 20.0)}  # fmt: skip
    out = {}
    # tests: features x head dims, LSE on, default variant
    for d in (64, 128):
        for name, (causal, window, cap) in features.items():
            out[f"test {name} D{d}"] = (1, 256, 256, 4, 4, d, bf, causal, window, cap, True, True, 2, 128)
    # tests: structural variants (LSE on), both dtypes for the default
    variants = ((2, True, f16, 128), (2, False, bf, 128), (1, True, bf, 128), (1, False, bf, 128), (2, True, bf, 64))
    for consumers, overlap, dtype, bn in variants:
        for causal in (False, True):
            key = f"variant c{consumers} ovl={overlap} {dtype} n{bn} causal={causal}"
            out[key] = (1, 256, 256, 8, 2, 128, dtype, causal, -1, 0.0, True, overlap, consumers, bn)
    # bench and smoke (LSE off): every variant, causal/full at D128, causal at D64
    for consumers, overlap, bn in ((2, True, 128), (2, False, 128), (1, True, 128), (1, False, 128), (2, True, 64)):
        for causal, d in ((True, 128), (False, 128), (True, 64)):
            key = f"bench c{consumers} ovl={overlap} n{bn} causal={causal} D{d}"
            out[key] = (1, 256, 256, 8, 2, d, bf, causal, -1, 0.0, False, overlap, consumers, bn)
    out["smoke D64 n64 full lse"] = (1, 256, 256, 8, 8, 64, bf, False, -1, 0.0, True, True, 2, 64)
    # overlap="unmasked": the tests' structural variant (LSE on) and the benchmark's (LSE off)
    for causal in (False, True):
        for lse, d in ((True, 128), (False, 128), (False, 64)):
            key = f"ovl=unmasked causal={causal} lse={lse} D{d}"
            out[key] = (1, 256, 256, 8, 2, d, bf, causal, -1, 0.0, lse, "unmasked", 2, 128)
    # overlap="pingpong": the tests' structural variants (bf16 and fp16, 64-key tiles; LSE on), per-sequence
    # lengths, and the benchmark's (LSE off)
    for causal in (False, True):
        for dtype, bn, lse, d in ((bf, 128, True, 128), (f16, 128, True, 128), (bf, 64, True, 128),
                                  (bf, 128, False, 128), (bf, 128, False, 64)):  # fmt: skip
            key = f"ovl=pingpong causal={causal} {dtype} n{bn} lse={lse} D{d}"
            out[key] = (1, 256, 256, 8, 2, d, dtype, causal, -1, 0.0, lse, "pingpong", 2, bn)
    for d in (64, 128):
        for name, (causal, window, cap) in features.items():
            out[f"seqlens pingpong {name} D{d}"] = (2, 256, 256, 4, 4, d, bf, causal, window, cap, True, "pingpong",
                                                    2, 128, True)  # fmt: skip
    # per-sequence lengths (seqlens_q/k): every feature at D128 and D64 (LSE on), the structural variants causal
    for d in (64, 128):
        for name, (causal, window, cap) in features.items():
            out[f"seqlens {name} D{d}"] = (2, 256, 256, 4, 4, d, bf, causal, window, cap, True, True, 2, 128, True)
    for consumers, overlap, dtype, bn in variants:
        key = f"seqlens c{consumers} ovl={overlap} {dtype} n{bn} causal"
        out[key] = (2, 256, 256, 8, 2, 128, dtype, True, -1, 0.0, True, overlap, consumers, bn, True)
    # packed (cu_seqlens): the same
    for d in (64, 128):
        for name, (causal, window, cap) in features.items():
            out[f"packed {name} D{d}"] = (2, 256, 256, 4, 4, d, bf, causal, window, cap, True, True, 2, 128, "packed")
    for consumers, overlap, dtype, bn in variants:
        key = f"packed c{consumers} ovl={overlap} {dtype} n{bn} causal"
        out[key] = (2, 256, 256, 8, 2, 128, dtype, True, -1, 0.0, True, overlap, consumers, bn, "packed")
    # ALiBi: both modes over the features at D128, with lengths and packed, and the structural variants
    for mode in (1, 2):
        for name, (causal, window, cap) in features.items():
            out[f"alibi{mode} {name} D128"] = (2, 256, 256, 8, 2, 128, bf, causal, window, cap, True, True, 2, 128,
                                               None, True, mode)  # fmt: skip
        out[f"alibi{mode} seqlens causal D64"] = (2, 256, 256, 8, 2, 64, bf, True, -1, 0.0, True, True, 2, 128, True,
                                                  True, mode)  # fmt: skip
        out[f"alibi{mode} packed causal D128 fp16"] = (2, 256, 256, 8, 2, 128, f16, True, -1, 0.0, True, True, 2, 128,
                                                       "packed", True, mode)  # fmt: skip
    for consumers, overlap, dtype, bn in variants:
        key = f"alibi1 c{consumers} ovl={overlap} {dtype} n{bn} causal"
        out[key] = (2, 256, 256, 8, 2, 128, dtype, True, -1, 0.0, True, overlap, consumers, bn, None, True, 1)
    # bench_gluon: the packed shape as packed and as seqlens (full and causal, LSE off), the unguarded baseline
    for causal in (False, True):
        for layout in (True, "packed"):
            out[f"bench {'packed' if layout == 'packed' else 'seqlens'} causal={causal}"] = (
                2, 256, 256, 32, 32, 128, bf, causal, -1, 0.0, False, True, 2, 128, layout)  # fmt: skip
    for causal, d in ((True, 128), (False, 128), (True, 64)):
        out[f"bench noguard causal={causal} D{d}"] = (1, 256, 256, 8, 2, d, bf, causal, -1, 0.0, False, True, 2, 128,
                                                      None, False)  # fmt: skip
    # FP8 (tests/test_fp8_prefill.py, bench_gluon's FP8 table): causal and full at D64 and D128, both structures
    for d in (64, 128):
        for causal in (False, True):
            for consumers in (1, 2):
                out[f"fp8 c{consumers} causal={causal} D{d}"] = (1, 256, 256, 8, 2, d, torch.float8_e4m3fn, causal,
                                                                 -1, 0.0, False, True, consumers)  # fmt: skip
            out[f"fp8 pingpong causal={causal} D{d}"] = (1, 256, 256, 8, 2, d, torch.float8_e4m3fn, causal, -1, 0.0,
                                                         False, "pingpong", 2)  # fmt: skip
    return out


def compile_case(c):
    """Compile one case: ``(B, Sq, Sk, Hq, Hkv, D, dtype, causal, window, softcap, lse, overlap, consumers
    [, block_n [, layout [, guard_hidden [, alibi]]]])``; layout None (padded), True (padded with seqlens_q/k) or
    "packed" (cu_seqlens); alibi 0 (none), 1 (after scaling, slopes [B, Hq]) or 2 (with scale, slopes [Hq])."""
    b, sq, sk, hq, hkv, d, dtype, causal, window, softcap, want_lse, overlap, consumers, *rest = c
    block_n = rest[0] if rest else 128
    layout = rest[1] if len(rest) > 1 else None
    guard = rest[2] if len(rest) > 2 else True
    mode = rest[3] if len(rest) > 3 else 0
    extra = {"guard_hidden": guard}
    if layout == "packed":
        cu = lambda n: torch.arange(0, (b + 1) * n, n, dtype=torch.int32)  # noqa: E731
        extra.update(cu_seqlens_q=cu(sq), cu_seqlens_k=cu(sk), max_seqlen_q=sq, max_seqlen_k=sk)
        q = torch.empty(b * sq, hq, d, dtype=dtype)
        k, v = (torch.empty(b * sk, hkv, d, dtype=dtype) for _ in range(2))
        lse = torch.empty(hq, b * sq) if want_lse else None
    else:
        if layout:
            extra.update(seqlens_q=torch.full((b,), sq, dtype=torch.int32),
                         seqlens_k=torch.full((b,), sk, dtype=torch.int32))  # fmt: skip
        q = torch.empty(b, sq, hq, d, dtype=dtype)
        k, v = (torch.empty(b, sk, hkv, d, dtype=dtype) for _ in range(2))
        lse = torch.empty(b, hq, sq) if want_lse else None
    if dtype == torch.float8_e4m3fn:
        # FP8: Vᵀ padded to 32 keys and the [3, B, Hkv] descales, as attention_fp8_gluon passes them
        extra.update(v_t=torch.empty(b, hkv, d, -(-sk // 32) * 32, dtype=dtype), descales=torch.empty(3, b, hkv))
    if mode:
        extra.update(alibi_slopes=torch.empty(hq) if mode == 2 else torch.empty(b, hq), alibi_with_scale=mode == 2)
    out = torch.empty_like(q, dtype=torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype)
    grid, args, constexprs = ga.launch_args(q, k, v, out, lse, scale=d**-0.5, window_left=window,
                                            window_right=0 if causal else (70 if window >= 0 else -1), softcap=softcap,
                                            overlap=overlap, consumers=consumers, block_n=block_n,
                                            **extra)  # fmt: skip
    if layout == "packed":
        assert constexprs["IS_PACKED"], "a packed case must compile the packed variant"
    kernel = ga._attn_fwd_gluon
    return compile_for_target(kernel, args, constexprs)


def order(ops) -> str:
    """Runs of the products, exponentials, wgmma fences/waits and mbarrier waits, in code order."""
    runs = []
    for op in ops:
        for tag in ("HGMMA", "QGMMA", "MUFU.EX2", "WARPGROUP.ARRIVE", "WARPGROUP.DEPBAR", "SYNCS.PHASECHK"):
            if op.startswith(tag):
                if runs and runs[-1][0] == tag:
                    runs[-1][1] += 1
                else:
                    runs.append([tag, 1])
    return " ".join(f"{t}x{n}" for t, n in runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="", help="comma-separated subset of " + ",".join(cases()))
    p.add_argument("--dump", default="", help="write each case's PTX/SASS to this folder")
    p.add_argument("--check-all", action="store_true", help="only compile every specialization the tests use")
    a = p.parse_args()
    if a.check_all:
        failed = 0
        with tempfile.TemporaryDirectory() as tmp:
            for name, c in every_specialization().items():
                try:
                    info, _ = sass_of(compile_case(c), tmp)
                    regs, spills = resources(info)
                    print(f"ok    {name}: {spills} bytes spilled", flush=True)
                except Exception as e:  # report and go on: the point is the full list
                    failed += 1
                    print(f"FAIL  {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        print(f"{failed} failed")
        return
    wanted = [c for c in a.cases.split(",") if c]
    head = f"{'case':18s} {'part':7s} {'instr':>6s} " + " ".join(f"{c.split('.')[-1][:6]:>6s}" for c in COUNTS)
    with tempfile.TemporaryDirectory() as tmp:
        for name, c in cases().items():
            if wanted and name not in wanted:
                continue
            kern = compile_case(c)
            info, sass = sass_of(kern, tmp)
            if a.dump:
                os.makedirs(a.dump, exist_ok=True)
                for ext, text in (("sass", sass), ("ptx", kern.asm["ptx"]), ("ttgir", kern.asm["ttgir"])):
                    with open(os.path.join(a.dump, f"{name}.{ext}"), "w") as f:
                        f.write(text)
            regs, spills = resources(info)
            setmax = sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", kern.asm["ptx"])))
            print(f"\n{name}: {regs} registers (launch), setmaxnreg {setmax}, {spills} bytes spilled, "
                  f"{kern.metadata.shared} bytes shared memory")  # fmt: skip
            print(head)
            instrs = parse(sass)
            rows = [("total", [op for _, op, _ in instrs])]
            rows += [(f"loop{i}", ops) for i, (_, _, ops) in enumerate(loops(instrs))]
            for part, ops in rows:
                cnt = Counter()
                for op in ops:
                    for k in COUNTS:
                        if op == k or op.startswith(k + ".") or (k == "WARPGROUP" and op.startswith("WARPGROUP")):
                            cnt[k] += 1
                print(f"{name:18s} {part:7s} {len(ops):6d} " + " ".join(f"{cnt[k]:6d}" for k in COUNTS))
            # the issue order in the first tile loop (a loop with products, not the whole persistent loop): does
            # the next tile's Q·Kᵀ (HGMMA) come before the softmax's exponentials (MUFU)?
            for _, _, ops in loops(instrs):
                if any(o.startswith(("HGMMA", "QGMMA")) for o in ops) and len(ops) < 1200:
                    print(f"{name}: tile loop issue order: {order(ops)}")
                    break


if __name__ == "__main__":
    main()
