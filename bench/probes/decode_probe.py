"""Probe: which decode-kernel changes make INT8/FP8 caches pay on the H200, measured side by side.

    PYTHONPATH=. python bench/probes/decode_probe.py             # on the GPU machine

Halving the bytes of the cache gained only 1.1-1.4x contiguous and lost 10-23% paged (bench/NOTES.md,
2026-11-28): with one-byte keys the loop stops being bound by loads. Each variant below is the source of
``attn/fast/decode.py`` with textual edits, written to a scratch module (Triton's JIT reads kernel source from
files) and timed with CUDA-graph replays beside the unchanged kernel, for several fixed tile configs, after a
check against the unchanged kernel's output. Compiling dominates, so worker processes compile every
(variant, config, cache) combination first, into a shared Triton cache, and one process then times them all.

The variants are edits of the current kernel (one-byte caches multiply in fp16, INT8 codes widened four at
a time by inline PTX, plain paged tiles load their block-table entries one iteration ahead, page size fixed
at compile time):

  i8bf16   INT8 caches with bf16 products, converted one code at a time (the kernel before this probe)
  i8cvt    INT8 with fp16 products, converted one code at a time instead of four by integer operations

Earlier rounds (logs in bench/results/decode_probe_2026-11-29_*.log) measured, at B8 H32/8 L32768 and B1
L131072: the scores as K·Qᵀ (the converted key tile as wgmma's A operand, in registers): 0.86-0.98x of base,
slower everywhere; also Vᵀ·Pᵀ: 0.67-0.70x; FP8 converted to fp16 instead of bf16: contiguous 1.11x -> 1.54x and
1.06x -> 1.58x the bf16 cache; INT8 to fp16 by conversion: slower than to bf16 (1.13x vs 1.27x), and by
integer operations (the byte into the mantissa of 1024.0): 1.25x vs 1.36x; one block-table entry per tile
instead of per key: +2-14%; the block-table entries of the next tile loaded one iteration ahead, with fp16
products, on FP8 pages: 0.85x -> 1.31x. Round 5 (session 6, `_r5.log`): V's one-byte tiles read as 32-bit words and
widened in registers, then handed to the products through shared memory as fp16 (ldmatrix, as for a bf16 cache)
instead of one byte per shared-memory load: 15-17% fewer instructions in the key loop (static SASS), but slower
on the H200 wherever it was not even: FP8 contiguous 1.61x -> 1.37x (B8) and 1.55x -> 1.32x (B1), paged
1.44x -> 1.27x and 1.39x -> 1.19x the bf16 cache; INT8 1.37x -> 1.33x, 1.39x -> 1.24x, paged even. The fp16
staging tile adds 16 KiB of shared memory per stage set (FP8 64/2/4: 55 -> 72 KiB, four programs an SM -> three)
and a store-barrier-load chain per tile; the loop was waiting on latency more than on issue slots.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from pathlib import Path

import torch

import attn.fast  # noqa: F401  (sets up Triton before anything else imports it)
from bench import common
from bench.bench_decode import to_paged

SRC = Path(__file__).resolve().parents[2] / "attn" / "fast" / "decode.py"

FIXED = [("            kw.update(BLOCK_N=64, num_warps=4, num_stages=3)\n", "            kw.update(**PROBE_CFG)\n"),
         ("MIN_SPLIT_KEYS = 2048\n", "MIN_SPLIT_KEYS = 2048\nPROBE_CFG = {}\n")]  # fmt: skip
I8BF16 = [
    (
        "    mma_f16 = quant != 0 and q.dtype != torch.float32\n",
        "    mma_f16 = quant == 2 and q.dtype != torch.float32\n",
    )
]
I8CVT = [("INT8_ASM=not interpret,", "INT8_ASM=False,")]
VARIANTS = {"base": [], "i8bf16": I8BF16, "i8cvt": I8CVT}
CONFIGS = [(32, 4, 3), (64, 4, 3), (64, 4, 5), (64, 2, 4), (128, 4, 3), (128, 4, 4), (128, 4, 5), (128, 2, 3),
           (256, 4, 3)]  # fmt: skip
SHAPES = [("B8 H32/8 L32768", 8, 32768), ("B1 H32/8 L131072", 1, 131072)]
DTYPES = {"bf16": torch.bfloat16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}


def load_variant(name: str):
    return common.kernel_variant(SRC, name, FIXED + VARIANTS[name])


def combos():
    """Every (variant, cache dtype, layout, config) timed; variants other than base only on one-byte caches."""
    for name in VARIANTS:
        for dt, layout, cfg in itertools.product(DTYPES, ("contiguous", "paged64"), CONFIGS):
            if name != "base" and dt == "bf16":
                continue
            if name != "base" and dt != "int8":
                continue
            yield name, dt, layout, cfg


def make_inputs():
    gen = torch.Generator().manual_seed(0)
    sets = {}
    for shape, bsz, length in SHAPES:
        q = torch.randn(bsz, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(bsz, length, 8, 128, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        lens = torch.full((bsz,), length, dtype=torch.int32, device="cuda")
        for dt, torch_dt in DTYPES.items():
            if torch_dt == torch.bfloat16:
                k_, v_, kw = kc, vc, {}
            else:
                ks, vs = attn.reference.calibrate_kv_scales(kc, vc, torch_dt, "head")
                k_, v_ = (torch.empty(kc.shape, dtype=torch_dt, device="cuda") for _ in range(2))
                attn.fast.append_kv(k_, v_, kc, vc, torch.zeros_like(lens), k_scale=ks, v_scale=vs)
                kw = {"k_scale": ks, "v_scale": vs}
            hints = {"max_seqlen_k": length, "total_seqlen_k": bsz * length}
            sets[shape, dt, "contiguous"] = (q, k_, v_, lens, None, kw, hints)
            pk, pv, table = to_paged(k_, v_, 64, gen)
            sets[shape, dt, "paged64"] = (q, pk, pv, lens, table, kw, hints)
        del kc, vc
    return sets


def call(mod, inputs, cfg):
    q, k_, v_, lens, table, kw, hints = inputs
    mod.PROBE_CFG.clear()
    mod.PROBE_CFG.update(BLOCK_N=cfg[0], num_warps=cfg[1], num_stages=cfg[2])
    # no host reads: the call is captured into a CUDA graph
    return mod.decode(q, k_, v_, lens, block_table=table, validate=False, **hints, **kw)


def warm(worker: int, workers: int) -> None:
    """Compile this worker's share of the combinations (one call each, no timing)."""
    sets = make_inputs()
    mods = {name: load_variant(name) for name in VARIANTS}
    for i, (name, dt, layout, cfg) in enumerate(combos()):
        if i % workers != worker:
            continue
        for shape, _, _ in SHAPES[:1]:  # the specializations do not depend on the length
            try:
                call(mods[name], sets[shape, dt, layout], cfg)
            except Exception as e:
                print(f"warm {name} {dt} {layout} {cfg}: {common.short_error(e)}", flush=True)
    torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--warm", nargs=2, type=int, default=None)
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args()
    os.environ["ATTN_AUTOTUNE"] = "0"
    if args.warm:
        warm(*args.warm)
        return
    common.require_cuda("decode_probe")
    for name in VARIANTS:
        load_variant(name)
    procs = [
        subprocess.Popen([sys.executable, __file__, "--warm", str(i), str(args.workers)], env=dict(os.environ))
        for i in range(args.workers)
    ]
    for pr in procs:
        pr.wait()
    sets = make_inputs()
    mods = {name: load_variant(name) for name in VARIANTS}
    results = {}
    for shape, bsz, length in SHAPES:
        base_out = {}
        for name, dt, layout, cfg in combos():
            inputs = sets[shape, dt, layout]
            try:
                out = call(mods[name], inputs, cfg).float()
                key = (dt, layout)
                if key not in base_out:
                    base_out[key] = call(mods["base"], inputs, (64, 4, 3)).float()
                err = common.rel_err(out, base_out[key])
                if not err < 5e-3:
                    print(f"{shape} {name} {dt} {layout} {cfg}: WRONG {err:.3g}", flush=True)
                    continue
                ms = common.graph_ms(lambda m=mods[name], i=inputs, c=cfg: call(m, i, c))
            except Exception as e:
                print(f"{shape} {name} {dt} {layout} {cfg}: ERR {common.short_error(e)}", flush=True)
                continue
            nbytes = 2.0 * bsz * length * 8 * 128 * (2 if dt == "bf16" else 1)
            results[shape, name, dt, layout, cfg] = ms
            print(f"{shape} | {name} | {dt} | {layout} | {cfg} | {ms * 1e3:.1f} us | {nbytes / ms / 1e9:.2f} TB/s",
                  flush=True)  # fmt: skip
    print("\nbest config per (shape, variant, cache, layout); speedup over the best bf16 base of that layout")
    header = ["shape", "layout", "cache", *VARIANTS]
    rows = []
    for shape, _, _ in SHAPES:
        for layout in ("contiguous", "paged64"):
            ref = min((ms for (s, n, d, lay, _), ms in results.items()
                       if s == shape and n == "base" and d == "bf16" and lay == layout), default=None)  # fmt: skip
            for dt in DTYPES:
                cells = [shape, layout, dt]
                for name in VARIANTS:
                    got = [(ms, cfg) for (s, n, d, lay, cfg), ms in results.items()
                           if s == shape and n == name and d == dt and lay == layout]  # fmt: skip
                    if not got or ref is None:
                        cells.append("-")
                        continue
                    ms, cfg = min(got)
                    cells.append(f"{ref / ms:.2f}x {cfg[0]}/{cfg[1]}/{cfg[2]}")
                rows.append(cells)
    print(common.format_table(header, rows))
    print("\ncompiled kernels: shared bytes, registers, async copies in the TTGIR (pipelined loads)")
    for name, mod in mods.items():
        for dev_cache in getattr(mod._decode_kernel, "device_caches", {}).values():
            for kern in dev_cache[0].values():
                ttgir = kern.asm.get("ttgir", "")
                print(name, kern.name if hasattr(kern, "name") else "", "quant/paged?",
                      "QUANT" in str(getattr(kern, "src", "")), "shared", kern.metadata.shared,
                      "regs", getattr(kern, "n_regs", "?"), "warps", kern.metadata.num_warps,
                      "stages", getattr(kern.metadata, "num_stages", "?"),
                      "async_copy", ttgir.count("async_copy_global_to_local"),
                      "cvt", ttgir.count("tt.fp_to_fp") + ttgir.count("arith.sitofp"), flush=True)  # fmt: skip
    for pth in SRC.parent.glob("_probe_*.py"):
        pth.unlink()


if __name__ == "__main__":
    sys.exit(main())
