"""Compile check of the Gluon prefill kernel on a machine without a GPU: every constexpr variant that
`attn.attention` can dispatch to (and the structural variants the tests and bench_gluon launch), for sm_90a,
with ptxas's registers and spills and the wgmma-serialization warning (C7512) if ptxas gives it.

    TRITON_INTERPRET=0 PYTHONPATH=. python bench/probes/gluon_compile.py [--quick] [--only SUBSTRING]

Run it before each commit that touches attn/fast/gluon_attention.py. ``--quick``: one variant per feature
(causal D128, full+LSE D64, window+softcap fp16, the 8-warp consumer, 64-key tiles,
per-sequence lengths, packed, ALiBi). A failure prints the
error's last line and the exit status is the number of failures. Uses bench/probes/gluon_sass.py's
`compile_case` (the real `launch_args` on CPU tensors, so the specialization is the GPU launch's).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from gluon_sass import compile_case, every_specialization  # noqa: E402
from sass_tools import TOOLS  # noqa: E402


def quick():
    bf, f16 = torch.bfloat16, torch.float16
    # (B, Sq, Sk, Hq, Hkv, D, dtype, causal, window, softcap, lse, overlap, consumers, block_n)
    return {
        "causal D128 bf16": (1, 256, 256, 8, 2, 128, bf, True, -1, 0.0, False, True, 2, 128),
        "full D64 lse": (1, 256, 256, 8, 8, 64, bf, False, -1, 0.0, True, True, 2, 128),
        "window+softcap fp16 lse": (1, 256, 256, 4, 4, 128, f16, True, 200, 20.0, True, True, 2, 128),
        "causal c1 (8-warp consumer)": (1, 256, 256, 8, 2, 128, bf, True, -1, 0.0, True, True, 1, 128),
        "causal serial n64": (1, 256, 256, 8, 2, 128, bf, True, -1, 0.0, True, False, 2, 64),
        "seqlens causal D128": (2, 256, 256, 8, 2, 128, bf, True, -1, 0.0, True, True, 2, 128, True),
        "seqlens window fp16 D64": (2, 256, 256, 8, 2, 64, f16, False, 150, 0.0, True, True, 2, 128, True),
        "packed causal D128": (2, 256, 256, 8, 2, 128, bf, True, -1, 0.0, True, True, 2, 128, "packed"),
        "packed window+softcap D64": (2, 256, 256, 8, 8, 64, bf, True, 100, 20.0, True, True, 2, 128, "packed"),
        "alibi causal D128": (2, 256, 256, 8, 2, 128, bf, True, -1, 0.0, True, True, 2, 128, None, True, 1),
        "alibi2 softcap packed D64": (2, 256, 256, 8, 2, 64, bf, True, -1, 20.0, True, True, 2, 128, "packed", True, 2),
    }


def ptxas_report(kern, tmp):
    ptx = os.path.join(tmp, "k.ptx")
    with open(ptx, "w") as f:
        f.write(kern.asm["ptx"])
    out = subprocess.run([os.path.join(TOOLS, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.o")],
                         capture_output=True, text=True, check=True).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", out).group(1)
    spills = re.search(r"(\d+) bytes spill stores", out).group(1)
    serial = "C7512" in out  # "wgmma.mma_async instructions are serialized"
    return regs, spills, serial


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="")
    a = p.parse_args()
    cases = quick() if a.quick else every_specialization()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, c in cases.items():
            if a.only and a.only not in name:
                continue
            t0 = time.time()
            try:
                kern = compile_case(c)
                regs, spills, serial = ptxas_report(kern, tmp)
                warn = "  WGMMA SERIALIZED (C7512)" if serial else ""
                print(f"ok    {name}: {regs} regs, {spills} bytes spilled, {kern.metadata.shared} bytes shared, "
                      f"{time.time() - t0:.0f} s{warn}", flush=True)  # fmt: skip
                failed += serial
            except Exception as e:  # report and go on: the point is the full list
                failed += 1
                last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                print(f"FAIL  {name}: {type(e).__name__}: {last[:300]}", flush=True)
    print(f"{failed} failed")
    return failed


if __name__ == "__main__":
    sys.exit(main())
