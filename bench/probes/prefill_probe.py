"""Probe: which prefill-kernel changes pay on the H200, measured side by side before (or after) they go into the kernel.

    PYTHONPATH=. python bench/probes/prefill_probe.py                  # on the GPU machine: the bias suite (issue 5)
    PYTHONPATH=. python bench/probes/prefill_probe.py --suite shapes   # the PERF.md prefill shapes against cuDNN

Each variant is the source of ``attn/fast/attention.py`` with textual edits, written to a scratch module
(Triton's JIT reads kernel source from files) and timed beside the unchanged kernel ("base") after a correctness
check. Variants probed earlier and their outcomes (bench/NOTES.md; their edits are in the versions of this file
at the commits named):

  grid   (317f075; in the kernel since 8bae14b) program id 0 walks the row blocks of one head, heaviest first,
         so the blocks that read the same K/V run together and find it in L2
  fma    (317f075; in the kernel since 8bae14b) plain unmasked tiles take the row max of the raw products and
         form the exponent as one multiply-add ``qk·scale − m``
  tma, tma+ws (c0841ba; not kept) K/V tiles through in-kernel tensor descriptors, with and without Triton's
         warp specialization (which did not compile)

The bias suite (default) runs B4 H32 S4096 D128 causal bf16, as bench/bench_features.py does: plain, ALiBi
(the standard slopes of 32 heads) and T5 implicit (32 buckets, max_distance 128, one-sided). Each variant runs
only the cases its edit touches; every output is checked against the fp32 reference on the first sequence
(relative RMS error under 1e-2, bf16 outputs sit near 2e-3) before it is timed. The variants undo, one at a
time, the bias changes of the issue-5 work, so one run measures each of them:

  alibi_old   ALiBi tiles off the plain path again: per tile each key's distance converted to float and
              scaled, per score qk·scale + slope·col as one multiply-add and a subtract of the max (691
              instead of 600 SASS instructions per 128x128 tile on sm_90a; plain 531: bench/probes/prefill_sass.py)
  t5_2d       the near loop as now, but its tiles gather per score from global memory (64-bit pointers per
              score, a 32 KB layout-conversion buffer): 950 instructions per near tile instead of 606, and
              256 KB of shared memory at 128x128/3 stages, more than the 227 KB a block may have
  t5_nonplain the near tiles off the plain path: the gathered values (log2 units) added after the product and a
              subtract in the exponent, instead of loading them (raw-product units) into the product's
              accumulator before it (675 instead of 606 instructions per tile, but the gather's shared-memory
              round trip then overlaps the product instead of preceding it: which wins is a timing question)
  t5_branch   the near loop decides per tile again (far-left / far-right / near, as t5_nonplain) instead of
              knowing its tiles are near; both far paths then sit in the loop body (820 instructions)
  t5_old      t5_2d and t5_branch together: the T5 kernel before the work (1454 instructions per near tile,
              2171 per diagonal tile instead of 1143, 76 bytes of spills)

The autotuner picks among the three 128-row, 8-warp configs (128x64/3 stages, 128x128/2, 128x128/3: the
H200's choices at D128 S4096 in prefill_probe_2026-11-28.log were among them) to keep the run under four
minutes; ``--all-configs`` tunes over the kernel's full list. The chosen config of each case is printed: the
T5 variants' shared memory decides it.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import attn.fast  # noqa: F401  (sets up Triton before anything else imports it)
from bench import common

SRC = Path(__file__).resolve().parents[2] / "attn" / "fast" / "attention.py"

ALIBI_OLD = [
    ("not HAS_SOFTCAP and REL_MODE == 0,", "not HAS_SOFTCAP and not HAS_ALIBI and REL_MODE == 0,"),
    ("PRECISION, not HAS_SOFTCAP,", "PRECISION, not HAS_SOFTCAP and not HAS_ALIBI,"),
]
T5_2D = [
    (
        "    if ROW_HEADS:\n        # GQA-packed rows each read their own head's table",
        "    if True:\n        # GQA-packed rows each read their own head's table",
    )
]
# the near loop's flags (NEAR, then PLAIN two lines down): the only call with NEAR set
_NEAR_CALL = (
    "            False, False, {near}, PACK > 1, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SOFTCAP, HAS_ALIBI,"
    " ALIBI_WITH_SCALE,\n"
    "            ALIBI_BY_KEY, REL_MODE, HEAD_DIM != HEAD_DIM_PAD, HEAD_DIM,\n"
    "            BLOCK_N, PRECISION, {plain}, IS_PAGED, QUANT,\n"
)
_NEAR_PLAIN = _NEAR_CALL.format(near="True", plain="not HAS_SOFTCAP")
T5_NONPLAIN = [(_NEAR_PLAIN, _NEAR_CALL.format(near="True", plain="False"))]
# the per-tile branch adds log2-unit values, so the loop leaves the plain form too
T5_BRANCH = [(_NEAR_PLAIN, _NEAR_CALL.format(near="False", plain="False"))]
# issue 18 (helper nan): the block rerun that keeps hidden non-finite values out, compiled out (its check: one
# row-sum reduction of acc per program; the SAFE loop adds code but no work). base - nan_off is what it costs
NAN_OFF = [
    (
        '    if tl.max(((row_sums != row_sums) | (tl.abs(row_sums) == float("inf"))).to(tl.int32), 0) != 0:\n'
        "        m_i = tl.full(",
        "    if False:\n        m_i = tl.full(",
    )
]
# name: (edits, cases it changes)
VARIANTS = {
    "base": ([], ("plain", "alibi", "t5_implicit")),
    "alibi_old": (ALIBI_OLD, ("alibi",)),
    "t5_2d": (T5_2D, ("t5_implicit",)),
    "t5_nonplain": (T5_NONPLAIN, ("t5_implicit",)),
    "t5_branch": (T5_BRANCH, ("t5_implicit",)),
    "t5_old": (T5_2D + T5_BRANCH, ("t5_implicit",)),
    "nan_off": (NAN_OFF, ("plain", "alibi", "t5_implicit")),
}
# the autotuner's candidates for the bias suite: every H200 choice at D128 so far was one of these
PROBE_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3)]


def load_variant(name: str, edits):
    # every occurrence is edited: the tile loop is called up to five times
    return common.kernel_variant(SRC, name, edits)


def restrict_configs(mod) -> None:
    mod._attn_fwd_tuned.configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in PROBE_CONFIGS
    ]


def chosen_configs(mod) -> list[str]:
    out = []
    for key, cfg in getattr(mod._attn_fwd_tuned, "cache", {}).items():
        kw = cfg.all_kwargs()
        out.append(f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{kw['num_warps']} s{kw['num_stages']} (key {key[:10]})")
    return out


def bias_suite(args) -> None:
    import attn.reference as reference
    from attn import RelativeBias, alibi_slopes

    b, h, s, d = 4, 32, 4096, 128
    flops = 4.0 * b * h * d * s * (s + 1) / 2  # causal: the visible half of the square
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    cases = {
        "plain": {},
        "alibi": {"alibi_slopes": alibi_slopes(h, device="cuda")},
        "t5_implicit": {
            "rel_bias": RelativeBias(
                table=torch.randn(h, 32, device="cuda", generator=gen), max_distance=128, bidirectional=False
            )
        },
    }
    mods = {}
    for name, (edits, _) in VARIANTS.items():
        if args.variants and name not in args.variants and name != "base":
            continue
        mods[name] = load_variant(name, edits)
        if not args.all_configs:
            restrict_configs(mods[name])

    times: dict[tuple[str, str], float] = {}
    for case, kw in cases.items():
        # the fp32 reference on the first sequence (an fp32 [H, S, S] score tensor is 2 GB per sequence)
        ref = reference.attention(q[:1].float(), k[:1].float(), v[:1].float(), causal=True, **kw)
        for name, mod in mods.items():
            if case not in VARIANTS[name][1]:
                continue
            fn = functools.partial(mod.attention, q, k, v, causal=True, **kw)
            try:
                out = fn()
                err = common.rel_err(out[:1].float(), ref)
                if not err < 1e-2:
                    print(f"{case} {name}: WRONG, relative error {err:.3g}", flush=True)
                    continue
                times[case, name] = common.bench_ms(fn)
            except Exception as e:
                print(f"{case} {name}: ERR {common.short_error(e)}", flush=True)
                continue
            ms = times[case, name]
            tf = common.tflops(flops, ms)
            print(f"{case} {name}: {ms * 1e3:.0f} us, {tf:.0f} TFLOP/s, err {err:.2g}", flush=True)
        del ref
        common.free_memory()

    plain = times.get(("plain", "base"))
    header = ["case", *mods]
    rows = []
    for case in cases:
        cells = [case]
        for name in mods:
            ms = times.get((case, name))
            if ms is None:
                cells.append("-" if case not in VARIANTS[name][1] else "ERR")
            else:
                ratio = f" {ms / plain:.3f}x" if plain else ""
                cells.append(f"{ms * 1e3:.0f}{ratio}")
        rows.append(cells)
    print("\nB4 H32 S4096 D128 causal bf16: microseconds (do_bench medians) and time over base's plain kernel")
    print(common.format_table(header, rows))
    for name, mod in mods.items():
        for line in chosen_configs(mod):
            print(f"{name}: {line}")


SHAPES = [  # (name, B, Hq, Hkv, S, D, causal)
    ("B16 H32 S1024 causal", 16, 32, 32, 1024, 128, True),
    ("B4 H32 S4096 causal", 4, 32, 32, 4096, 128, True),
    ("B4 H32 S4096 full", 4, 32, 32, 4096, 128, False),
    ("B1 H32 S16384 causal", 1, 32, 32, 16384, 128, True),
    ("B4 H32/8 S4096 causal", 4, 32, 8, 4096, 128, True),
    ("B8 H32 S4096 D64 causal", 8, 32, 32, 4096, 64, True),
]


def shapes_suite(args) -> None:
    """The plain kernel (and any variants named) on the PERF.md shapes, checked against and beside cuDNN."""
    mods = {name: load_variant(name, VARIANTS[name][0]) for name in ["base", *args.variants] if name in VARIANTS}
    header = ["shape", "cudnn", *mods]
    rows = []
    for name, b, hq, hkv, s, d, causal in SHAPES:
        q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flops = 4.0 * b * hq * s * s * d / (2 if causal else 1)
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        sdpa = functools.partial(F.scaled_dot_product_attention, qt, kt, vt, is_causal=causal, enable_gqa=hq != hkv)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = sdpa()
            ms = common.bench_ms(sdpa)
        cells = [name, f"{common.tflops(flops, ms):.0f}"]
        for mod in mods.values():
            fn = functools.partial(mod.attention, q, k, v, causal=causal)
            try:
                err = common.rel_err(fn().transpose(1, 2).float(), ref.float())
            except Exception as e:
                cells.append("ERR")
                print(mod.__name__, common.short_error(e), flush=True)
                continue
            if not err < 1e-2:
                cells.append(f"WRONG {err:.2g}")
                continue
            cells.append(f"{common.tflops(flops, common.bench_ms(fn)):.0f}")
        rows.append(cells)
        print("  " + " | ".join(cells), flush=True)
        common.free_memory()
    print("\nTFLOP/s, bf16, autotuned (the kernel's configs), do_bench medians")
    print(common.format_table(header, rows))
    for name, mod in mods.items():
        for line in chosen_configs(mod):
            print(f"{name}: {line}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["bias", "shapes"], default="bias")
    p.add_argument("--variants", default="", help=f"comma-separated subset of {', '.join(VARIANTS)} (default all)")
    p.add_argument("--all-configs", action="store_true", help="tune over the kernel's whole config list")
    args = p.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(sorted(unknown))}")
    common.require_cuda("prefill_probe")
    try:
        bias_suite(args) if args.suite == "bias" else shapes_suite(args)
    finally:
        for path in SRC.parent.glob("_probe_*.py"):
            path.unlink()


if __name__ == "__main__":
    sys.exit(main())
