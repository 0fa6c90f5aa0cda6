"""Compile the fused prefill kernel for the H200 (sm_90a) on a machine without a GPU and count its SASS instructions.

    TRITON_INTERPRET=0 PYTHONPATH=. python bench/probes/prefill_sass.py [--config 128,128,8,3] [--module M] [--dump D]

The cases are the bias benchmark's (bench/bench_features.py prefill: B4 H32 S4096 D128 causal bf16): plain,
ALiBi (both modes), T5 implicit (32 buckets, max_distance 128) and T5 regular (a bf16 [H, S, S] bias). Their
arguments come from a real call of `attention` on CPU tensors with the launch intercepted, and Triton's own
binder turns them into the specialization the JIT would compile on the GPU (dtypes, 16-byte alignment, ints
equal to 1 or divisible by 16), so the script follows the launcher when it changes. The tile config is the
autotuner's choice for this shape on the H200 (128x128, 8 warps, 3 stages: prefill_probe_2026-11-28.log), or
``--config``.

Prints registers, spills and shared memory (ptxas -v; more than 232448 bytes, the H200's 227 KB per block,
cannot launch), then static instruction counts: for the whole kernel, and for each loop (a backward branch
and the code it jumps back over). The loop counts are the ones that matter: a tile loop runs up to 32 times
per program at S4096, everything else once. Loops come in code order: the unmasked loop (for T5 implicit:
far-left, near, far-right), then the masked one along the diagonal; the last, one instruction, is the trap
after the exit.

``--module`` compiles a variant module ``attn.fast.NAME`` instead (for example one that
bench/probes/prefill_probe.py wrote), so variants can be read before they are timed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
from collections import Counter

import torch
from sass_tools import compile_for_target, loops, parse, resources, sass_of

import attn.fast  # noqa: F401  (sets up Triton before anything else imports it)
from attn import RelativeBias, alibi_slopes
from attn.fast._triton import bind

# prefixes of the full opcodes (with modifiers): MUFU.EX2 is the exponential, FMNMX the row max
COUNTS = ["HGMMA", "HMMA", "MUFU.EX2", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "LDG", "LDGSTS", "LDS", "LDSM",
          "STS", "BAR", "SHFL", "I2F", "IMAD", "ISETP", "BRA"]  # fmt: skip
B, H, S, D = 4, 32, 4096, 128


def cases():
    slopes = alibi_slopes(H)
    table = torch.randn(H, 32, generator=torch.Generator().manual_seed(0))
    return {
        "plain": {},
        "alibi": {"alibi_slopes": slopes},
        "alibi_with_scale": {"alibi_slopes": slopes, "alibi_mode": "alibi_with_scale"},
        "t5_implicit": {"rel_bias": RelativeBias(table=table, max_distance=128, bidirectional=False)},
        # the benchmark's regular mode reads a materialized bf16 [H, S, S] bias (never touched here)
        "t5_regular": {"rel_bias": RelativeBias(bias=torch.empty(H, S, S, dtype=torch.bfloat16))},
    }


def captured_launch(mod, **kw):
    """The positional arguments and constexprs `mod.attention` hands to its launch, without launching."""
    seen = {}

    def fake_launch(kernel, grid, *args, **constexprs):
        if not args:  # operands by keyword: launch's positional form
            args, constexprs = bind(kernel, constexprs)
        seen.update(args=args, constexprs=constexprs)

    saved = mod.launch, mod.is_interpreter
    # CPU tensors pass the device check only under the interpreter; nothing runs, the launch is intercepted
    mod.launch, mod.is_interpreter = fake_launch, lambda: True
    try:
        q, k, v = (torch.empty(B, S, H, D, dtype=torch.bfloat16) for _ in range(3))
        mod.attention(q, k, v, causal=True, **kw)
    finally:
        mod.launch, mod.is_interpreter = saved
    return seen["args"], seen["constexprs"]


def compile_prefill(mod, kw, config):
    bm, bn, warps, stages = config
    args, constexprs = captured_launch(mod, **kw)
    for name in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"):
        constexprs.pop(name, None)
    kernel = mod._attn_fwd_kernel
    config_kw = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return compile_for_target(kernel, args, {**constexprs, **config_kw})


def count(ops):
    c = Counter()
    for op in ops:
        for name in COUNTS:
            if op == name or op.startswith(name + "."):
                c[name] += 1
    return c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="128,128,8,3", help="BLOCK_M,BLOCK_N,num_warps,num_stages")
    p.add_argument("--module", default="attention", help="attn.fast module holding the kernel")
    p.add_argument("--cases", default="", help="comma-separated subset of " + ",".join(cases()))
    p.add_argument("--dump", default="", help="write each case's SASS to this folder")
    a = p.parse_args()
    config = tuple(int(x) for x in a.config.split(","))
    mod = importlib.import_module(f"attn.fast.{a.module}")
    wanted = [c for c in a.cases.split(",") if c]
    head = f"{'case':17s} {'part':9s} {'instr':>6s} " + " ".join(f"{c.split('.')[-1]:>6s}" for c in COUNTS)
    print(f"# {a.module}, config {config}, sm_90a; regs/spills/smem from ptxas -v")
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in cases().items():
            if wanted and name not in wanted:
                continue
            kern = compile_prefill(mod, kw, config)
            info, sass = sass_of(kern, tmp)
            if a.dump:
                os.makedirs(a.dump, exist_ok=True)
                with open(os.path.join(a.dump, f"{name}.sass"), "w") as f:
                    f.write(sass)
            regs, spills = resources(info)
            print(f"\n{name}: {regs} registers, {spills} bytes spilled, {kern.metadata.shared} bytes shared memory")
            print(head)
            instrs = parse(sass)
            rows = [("total", [op for _, op, _ in instrs])]
            rows += [(f"loop{i}", ops) for i, (_, _, ops) in enumerate(loops(instrs))]
            for part, ops in rows:
                c = count(ops)
                print(f"{name:17s} {part:9s} {len(ops):6d} " + " ".join(f"{c[k]:6d}" for k in COUNTS))


if __name__ == "__main__":
    main()
