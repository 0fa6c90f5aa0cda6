"""Compile the decode kernel for the H200 (sm_90a) on a machine without a GPU and count its SASS instructions.

    TRITON_INTERPRET=0 PYTHONPATH=. python bench/probes/decode_sass.py

Triton can compile ahead of time for a named target with the ptxas and cuobjdump it ships, so the code a
change produces can be read before spending GPU time on it. The specializations mimic the JIT's on the
benchmark shapes (16-byte aligned pointers, strides divisible by 16, GROUP 4, D 128, 64-token pages). Prints
registers and spills (ptxas -v) and counts of the instructions that tell where one-byte caches pay: global
loads (LDG), asynchronous copies to shared memory (LDGSTS), shared stores and loads (STS, LDS, LDSM), the
conversions (I2F, F2FP, PRMT, HADD2), the tensor-core instructions, and integer multiply-adds (address work);
barriers (BAR) and shared stores mostly come from layout conversions. The last column takes apart the key loops
(the loops with tensor-core instructions, one per part of a chunk; the merge's loops have none): the
instructions, BAR, STS and LDS of each loop body, which is what each tile costs. The REL_MODE 1 rows are the
T5 implicit bias, whose far loop should cost what plain decode's loop does.

    TRITON_INTERPRET=0 PYTHONPATH=. python bench/probes/decode_sass.py [DIR]

writes each kernel's SASS into DIR as well, with addresses and encodings stripped, so that two versions of the
kernel can be diffed.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

import triton
from sass_tools import TARGET, loops, parse, resources, sass_of
from triton.compiler import ASTSource

import attn.fast  # noqa: F401

dec = sys.modules["attn.fast.decode"]
POINTERS = {"q_ptr": "*bf16", "o_ptr": "*bf16", "lse_ptr": "*fp32", "part_ptr": "*fp32", "count_ptr": "*i32",
            "seqlens_ptr": "*i32", "block_table_ptr": "*i32",
            "alibi_ptr": "*fp32", "rel_ptr": "*fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
            "ind_ptr": "*i32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "err_ptr": "*i32"}  # fmt: skip
# stride tuples without the divisibility hint (the others get it on every element)
NOT_ALIGNED = {"alibi_strides", "rel_strides", "ind_strides"}
COUNTS = "BAR LDG LDGSTS STS LDS LDSM I2F F2FP PRMT HADD2 HMMA HGMMA IMAD FFMA FADD FMUL STG ATOMG".split()


def compile_decode(quant: int, paged: bool, block_n: int, warps: int, stages: int, SPLIT_MERGE=False,
                   STORE_LSE=True, **overrides):  # fmt: skip
    cache = {0: "*bf16", 1: "*i8", 2: "*fp8e4nv"}[quant]
    consts = dict(ROTARY_DIM=0, GPTJ=False, PAGE_SIZE=64 if paged else 1, INT8_ASM=True, GROUP=4, HEAD_DIM=128,
                  HEAD_DIM_PAD=128, IS_PAGED=paged, CYCLIC=False, HAS_INDIRECTION=False, HAS_WINDOW_LEFT=False,
                  HAS_WINDOW_RIGHT=False, HAS_SOFTCAP=False, HAS_ALIBI=False, ALIBI_WITH_SCALE=False, REL_MODE=0,
                  QUANT=quant, MMA_F16=quant != 0, MERGE_ROWS=1, BLOCK_M=16, BLOCK_N=block_n,
                  MERGE_TILE=1024 * warps)  # fmt: skip
    consts.update(overrides)
    # the operands a call without them passes as None (the kernel tests them at compile time)
    absent = {"alibi_ptr", "alibi_strides", "ind_ptr", "ind_strides", "cos_ptr", "sin_ptr"}
    if not SPLIT_MERGE:
        absent |= {"part_ptr", "count_ptr"}
    if not STORE_LSE:
        absent |= {"lse_ptr", "lse_strides"}
    if not paged:
        absent.add("block_table_ptr")
    if not quant:
        absent |= {"k_scale_ptr", "v_scale_ptr"}
    if not consts["REL_MODE"]:
        absent |= {"rel_ptr", "rel_strides"}
    consts.update({name: None for name in absent})
    kernel = dec._decode_kernel
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in ("k_ptr", "v_ptr"):
            signature[name] = cache
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name in ("qk_scale", "cap_log2"):
            signature[name] = "fp32"
        elif name.endswith("_strides"):
            n = 3 if name[0] in "qkvol" else 2
            signature[name] = ("i32",) * n
            if name not in NOT_ALIGNED:
                attrs.update({(i, j): [["tt.divisibility", 16]] for j in range(n)})
        else:
            signature[name] = "i32"
        if name.endswith("_ptr") and name not in consts or name in ("stride_bt", "stride_cos"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options=dict(num_warps=warps, num_stages=stages))


def key_loops(sass: str) -> str:
    """``instrs/BAR/STS/LDS`` of each loop body (a backward branch's span) that holds tensor-core instructions."""
    cells = []
    for _, _, body in loops(parse(sass)):
        body = [op.split(".")[0] for op in body]
        if "HMMA" in body or "HGMMA" in body:
            cells.append("/".join(str(n) for n in (len(body), *(body.count(c) for c in ("BAR", "STS", "LDS")))))
    return " ".join(cells)


def main() -> None:
    cases = [(0, False, 64, 2, 4), (0, True, 64, 2, 4), (1, False, 128, 4, 3), (1, True, 128, 4, 3),
             (1, True, 64, 4, 3), (2, False, 64, 2, 4), (2, True, 64, 2, 4)]  # fmt: skip
    # each tile unsplit (one program per pair writes the output) and split (the last program of a pair merges
    # the partials: SPLIT_MERGE), the latter also without the log-sum-exp (STORE_LSE off, a serving loop's call)
    variants = [(False, True)] * len(cases) + [(True, True)] * len(cases) + [(True, False)]
    rows = [(*c, merge, lse, 0) for c, (merge, lse) in zip(cases * 2 + cases[:1], variants)]
    # T5 implicit bias (REL_MODE 1) on the bf16 tile, as the benchmark calls it (split, no LSE): its far
    # keys should cost what plain decode's do
    rows += [(0, paged, 64, 2, 4, merge, lse, 1) for paged in (False, True) for merge, lse in variants[-2:]]
    # with a directory argument, each kernel's SASS is written there too (to diff two versions of the kernel)
    dump = sys.argv[1] if len(sys.argv) > 1 else None
    header = "cache paged tile      merge lse   rel regs spills smem  instrs " + " ".join(f"{c:>6s}" for c in COUNTS)
    print(header + "  key loops (instrs/BAR/STS/LDS)")
    with tempfile.TemporaryDirectory() as tmp:
        for quant, paged, bn, w, st, merge, store_lse, rel_mode in rows:
            merge_kw = dict(SPLIT_MERGE=merge, STORE_LSE=store_lse, MERGE_ROWS=4 if merge else 1)
            kern = compile_decode(quant, paged, bn, w, st, REL_MODE=rel_mode, **merge_kw)
            info, sass = sass_of(kern, tmp)
            ops = [op.split(".")[0] for _, op, _ in parse(sass)]
            regs, spills = resources(info)
            name = {0: "bf16", 1: "int8", 2: "fp8"}[quant]
            cells = " ".join(f"{sum(op == c for op in ops):6d}" for c in COUNTS)
            row = f"{name:5s} {paged!s:5s} {bn}/{w}/{st:<5d} {merge!s:5s} {store_lse!s:5s} {rel_mode:3d} {regs:>4s}"
            print(f"{row} {spills:>6s} {kern.metadata.shared:6d} {len(ops):6d} {cells}  {key_loops(sass)}")
            if dump:
                os.makedirs(dump, exist_ok=True)
                tag = f"{name}-{'paged' if paged else 'contig'}-{bn}-{w}-{st}-m{merge:d}-l{store_lse:d}-r{rel_mode}"
                with open(os.path.join(dump, tag + ".sass"), "w") as f:
                    # addresses and encodings stripped, so that unchanged code diffs clean
                    f.write("\n".join(re.sub(r"/\*[0-9a-f]{4,}\*/|/\* 0x[0-9a-f]+ \*/", "", ln).rstrip()
                                      for ln in sass.splitlines()) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
