"""Probe: which prefill-kernel changes pay on the H200, measured side by side before any goes into the kernel.

    PYTHONPATH=. python scripts/prefill_probe.py            # on the GPU machine

Each variant is the source of ``attn/fast/attention.py`` with one textual change, written to a scratch module
(Triton's JIT reads kernel source from files) and timed on the PERF.md prefill shapes beside the unchanged
kernel and cuDNN, after a correctness check against cuDNN. Variants (grid and fma, probed first, are in the
kernel since 8bae14b; their edits are in that commit's version of this file):

  grid   program id 0 walks the row blocks of one head (heaviest first) and id 1 the heads, instead of the
         reverse: the row blocks that read the same K/V then run together and find it in L2.
  tma    K and V tiles through tensor descriptors built in the kernel (Hopper's TMA engine: one instruction
         per tile, out-of-bounds rows and columns filled with zeros by the hardware instead of masks)
  tma+ws the same, with Triton's warp specialization on the unmasked loop (producer warps issue the loads)
  fma    the unmasked loop without biases takes the row max of the raw products and forms the exponent as
         one multiply-add ``qk·scale − m`` (the Triton tutorial's form), one multiply per score fewer.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attn.fast  # noqa: F401  (sets up Triton before anything else imports it)
from bench import common

SRC = Path(__file__).resolve().parent.parent / "attn" / "fast" / "attention.py"

TMA = [
    (
        "LOG2E = 1.4426950408889634\n",
        "LOG2E = 1.4426950408889634\n\n\n"
        "def _alloc(size, alignment, stream):\n"
        "    return torch.empty(size, device='cuda', dtype=torch.int8)\n\n\n"
        "triton.set_allocator(_alloc)\n",
    ),
    ("    k_base, v_base, stride_kn, stride_vn,\n", "    k_desc, v_desc, stride_kn, stride_vn,\n"),
    (
        "        if MASKED or PAD_D:\n"
        "            k = tl.load(k_base + offs_kn[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)\n"
        "        else:\n"
        "            k = tl.load(k_base + offs_kn[:, None] * stride_kn + offs_d[None, :])\n",
        "        k = k_desc.load([start_n, 0])\n",
    ),
    (
        "        if MASKED or PAD_D:\n"
        "            v = tl.load(v_base + offs_kn[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)\n"
        "        else:\n"
        "            v = tl.load(v_base + offs_kn[:, None] * stride_vn + offs_d[None, :])\n",
        "        v = v_desc.load([start_n, 0])\n",
    ),
    (
        "    o_base = o_ptr + b64 * stride_ob",
        "    k_desc = tl.make_tensor_descriptor(k_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_kn, 1],\n"
        "                                       block_shape=[BLOCK_N, HEAD_DIM_PAD])\n"
        "    v_desc = tl.make_tensor_descriptor(v_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_vn, 1],\n"
        "                                       block_shape=[BLOCK_N, HEAD_DIM_PAD])\n"
        "    o_base = o_ptr + b64 * stride_ob",
    ),
    ("        acc, l_i, m_i, q, k_base, v_base, stride_kn,", "        acc, l_i, m_i, q, k_desc, v_desc, stride_kn,"),
]
WS = [
    (
        "    for start_n in range(lo, hi, BLOCK_N):\n        offs_kn = start_n + offs_n\n",
        "    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=not MASKED):\n"
        "        offs_kn = start_n + offs_n\n",
    )
]
VARIANTS = {"base": [], "tma": TMA, "tma+ws": TMA + WS}


def load_variant(name: str, edits):
    # every occurrence is edited: the tile loop is called three times
    return common.kernel_variant(SRC, name, edits)


SHAPES = [  # (name, B, Hq, Hkv, S, D, causal)
    ("B16 H32 S1024 causal", 16, 32, 32, 1024, 128, True),
    ("B4 H32 S4096 causal", 4, 32, 32, 4096, 128, True),
    ("B4 H32 S4096 full", 4, 32, 32, 4096, 128, False),
    ("B1 H32 S16384 causal", 1, 32, 32, 16384, 128, True),
    ("B4 H32/8 S4096 causal", 4, 32, 8, 4096, 128, True),
    ("B8 H32 S4096 D64 causal", 8, 32, 32, 4096, 64, True),
]


def main() -> None:
    common.require_cuda("prefill_probe")
    mods = {name: load_variant(name, edits) for name, edits in VARIANTS.items()}
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
    print("\nTFLOP/s, bf16, autotuned (5 configs), do_bench medians")
    print(common.format_table(header, rows))
    for mod in mods.values():
        for key, cfg in getattr(mod._attn_fwd_tuned, "cache", {}).items():
            print(mod.__name__, key[:3], cfg)
    for p in SRC.parent.glob("_probe_*.py"):
        p.unlink()


if __name__ == "__main__":
    sys.exit(main())
