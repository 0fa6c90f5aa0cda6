"""Compile check of the Gluon one-byte decode kernel (attn/fast/gluon_decode.py) without a GPU, for sm_90a:
registers, spills, shared memory, the global loads' widths, the loop's instructions, and that no operand goes
through shared memory (the relabelling's point: every convert_layout in the loop is proven trivial at compile
time, and the only shared memory is the Q conversion's and the reductions' scratch).

    TRITON_INTERPRET=0 PYTHONPATH=. python bench/probes/gluon_decode_sass.py [--sass]
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

from attn.fast import gluon_decode as gd  # noqa: E402

# (name, B, L, Hq, Hkv, D, cache dtype, query dtype, page size (0: contiguous), splits, lse[, ring stages[, window]])
I8, F8, BF, F16 = torch.int8, torch.float8_e4m3fn, torch.bfloat16, torch.float16
CASES = [
    ("int8 contig G4 D128 split", 8, 4096, 32, 8, 128, I8, BF, 0, 16, False),
    ("fp8 contig G4 D128 split", 8, 4096, 32, 8, 128, F8, BF, 0, 16, False),
    ("int8 paged64 G4 D128 split", 8, 4096, 32, 8, 128, I8, BF, 64, 16, False),
    ("fp8 paged16 G4 D128 lse", 8, 4096, 32, 8, 128, F8, F16, 16, 1, True),
    ("int8 contig MHA D64", 8, 4096, 32, 32, 64, I8, F16, 0, 1, False),
    ("fp8 contig G32 D128 split", 2, 4096, 32, 1, 128, F8, BF, 0, 8, True),
    ("int8 contig G4 D128 split, cp.async ring 4", 8, 4096, 32, 8, 128, I8, BF, 0, 16, False, 4),
    ("fp8 paged64 G4 D128 split, cp.async ring 3", 8, 4096, 32, 8, 128, F8, BF, 64, 16, False, 3),
    ("fp8 paged16 G4 D128 split, window 1000", 8, 4096, 32, 8, 128, F8, BF, 16, 4, False, 0, 1000),
    ("int8 contig G4 D128 split, ring 4, window 1000", 8, 4096, 32, 8, 128, I8, BF, 0, 4, False, 4, 1000),
    ("fp8 contig G4 D128 split, softcap 50", 8, 4096, 32, 8, 128, F8, BF, 0, 16, False, 0, -1, 50.0),
]


def compile_case(b, n, hq, hkv, d, kv_dtype, q_dtype, page, splits, want_lse, stages=0, window=-1, softcap=0.0):
    q = torch.empty(b, 1, hq, d, dtype=q_dtype)
    if page:
        k = torch.empty(b * n // page, page, hkv, d, dtype=kv_dtype)
        table = torch.zeros(b, n // page, dtype=torch.int32)
    else:
        k = torch.empty(b, n, hkv, d, dtype=kv_dtype)
        table = None
    k = k.view(torch.int8)
    v = torch.empty_like(k)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, 1) if want_lse else None
    part = torch.empty(b * hq * splits * (d + 1)) if splits > 1 else None
    counters = torch.zeros(b * hkv, dtype=torch.int32) if splits > 1 else None
    lens = torch.full((b,), n, dtype=torch.int32)
    scale = torch.ones(hkv)
    grid, args, constexprs = gd.launch_args(
        q, k, v, lens, out, lse, part, counters, block_table=table, k_scale=scale, v_scale=scale,
        qk_scale=0.1, num_splits=splits, min_chunk=0, len_cap=n, page_size=page, group=hq // hkv,
        quant=1 if kv_dtype == torch.int8 else 2, stages=stages, window_left=window,
        cap_log2=softcap * 1.4426950408889634,
        err=torch.zeros(1, dtype=torch.int32),
    )  # fmt: skip
    kernel = gd._decode_1b_kernel
    return compile_for_target(kernel, args, constexprs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sass", action="store_true", help="print the SASS of the first case")
    p.add_argument("--only", default="")
    a = p.parse_args()
    failed = 0
    for name, *c in CASES:
        if a.only and a.only not in name:
            continue
        try:
            kern = compile_case(*c)
        except Exception as e:  # report and go on
            print(f"FAIL  {name}: {str(e).strip().splitlines()[-1][:300]}")
            failed += 1
            continue
        ptx = kern.asm["ptx"]
        loads = Counter(re.findall(r"ld\.global(?:\.\w+)*?\.(v\d)?\.?b(\d+)", ptx))
        ttgir = kern.asm["ttgir"]
        allocs = ttgir.count("ttg.local_alloc")
        with tempfile.TemporaryDirectory() as tmp:
            info, sass = sass_of(kern, tmp)
        regs, spills = resources(info)
        instrs = parse(sass)
        # the key loop: the one with the products (the merge's loops have none)
        body = max(
            (lp for lp in loops(instrs) if any(op.startswith("HMMA") for op in lp[2])),
            key=lambda lp: len(lp[2]),
            default=(0, 0, []),
        )[2]
        ops = Counter(op.split(".")[0] for op in body)
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
        print(f"ok    {name}: {regs} regs, {spills} B spilled, {kern.metadata.shared} B shared, "
              f"{allocs} local_alloc in ttgir, {ptx.count('mma.sync')} mma in ptx, global loads {dict(loads)}; "
              f"longest loop {len(body)} instructions ({top})", flush=True)  # fmt: skip
        if a.sass:
            print(sass)
            a.sass = False
    return failed


if __name__ == "__main__":
    sys.exit(main())
