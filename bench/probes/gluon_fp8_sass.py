"""Compile the FP8 prefill kernel (attn/fast/fp8_prefill.py) for sm_90a on a machine without a GPU and report
ptxas's registers, spills and shared memory, and the loops' instruction mix (are the products FP8 wgmma?).

    TRITON_INTERPRET=0 PYTHONPATH=. python bench/probes/gluon_fp8_sass.py [--config 128,128,8,3] [--dump DIR]

The arguments come from a real `attention_fp8` call on CPU tensors with the launch intercepted, bound by
Triton's own binder: the specialization the GPU launch compiles (EXACT_ROUND off, as on the GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from sass_tools import compile_for_target, loops, parse, resources, sass_of  # noqa: E402

from attn.fast import fp8_prefill as fk  # noqa: E402

COUNTS = ["HGMMA", "MUFU.EX2", "FFMA", "FMUL", "FADD", "FMNMX", "F2FP", "LDS", "STS", "LDG", "LDGSTS", "BAR", "SHFL"]


def captured(b, sq, sk, hq, hkv, d, causal, config):
    """``(args, constexprs)`` of the launch `attention_fp8` makes for this shape."""
    f8 = torch.float8_e4m3fn
    q = torch.zeros(b, sq, hq, d).to(f8)
    k, v = (torch.zeros(b, sk, hkv, d).to(f8) for _ in range(2))
    seen = {}

    class Grab:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.update(args=a, kw=kw)

    real_kernel, real_interp = fk._fp8_fwd, fk.is_interpreter
    fk._fp8_fwd, fk.is_interpreter = Grab(), lambda: True
    try:
        fk.attention_fp8(q, k, v, causal=causal, config=config)
    finally:
        fk._fp8_fwd, fk.is_interpreter = real_kernel, real_interp
    kw = dict(seen["kw"], EXACT_ROUND=False)
    return seen["args"], kw


def compile_fp8(b, sq, sk, hq, hkv, d, causal, config):
    args, kw = captured(b, sq, sk, hq, hkv, d, causal, config)
    kernel = fk._fp8_fwd
    return compile_for_target(kernel, args, kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="", help="BLOCK_M,BLOCK_N,num_warps,num_stages (default: the kernel's)")
    p.add_argument("--dump", default="", help="write each case's PTX/SASS to this folder")
    a = p.parse_args()
    config = None
    if a.config:
        bm, bn, w, s = (int(x) for x in a.config.split(","))
        config = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    cases = {
        "causal_d128": (1, 4096, 4096, 8, 8, 128, True),
        "full_d128": (1, 4096, 4096, 8, 8, 128, False),
        "causal_d64": (1, 4096, 4096, 8, 8, 64, True),
        "causal_d256": (1, 4096, 4096, 8, 8, 256, True),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, c in cases.items():
            cfg = config if config is not None or c[5] != 256 else None
            kern = compile_fp8(*c, cfg)
            info, sass = sass_of(kern, tmp)
            if a.dump:
                os.makedirs(a.dump, exist_ok=True)
                for ext, text in (("sass", sass), ("ptx", kern.asm["ptx"]), ("ttgir", kern.asm["ttgir"])):
                    with open(os.path.join(a.dump, f"fp8_{name}.{ext}"), "w") as f:
                        f.write(text)
            regs, spills = resources(info)
            wgmma = sorted({ln.split()[0] for ln in kern.asm["ptx"].splitlines() if "wgmma.mma_async" in ln})
            print(f"\n{name}: {regs} registers, {spills} bytes spilled, {kern.metadata.shared} bytes shared memory; "
                  f"{wgmma}")  # fmt: skip
            instrs = parse(sass)
            rows = [("total", [op for _, op, _ in instrs])]
            rows += [(f"loop{i}", ops) for i, (_, _, ops) in enumerate(loops(instrs))]
            print(f"{'part':7s} {'instr':>6s} " + " ".join(f"{c.split('.')[-1][:6]:>6s}" for c in COUNTS))
            for part, ops in rows:
                cnt = Counter(k for op in ops for k in COUNTS if op == k or op.startswith(k + "."))
                print(f"{part:7s} {len(ops):6d} " + " ".join(f"{cnt[k]:6d}" for k in COUNTS))


if __name__ == "__main__":
    main()
