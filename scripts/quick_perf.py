"""A first look at the fused kernel's speed on the H200 beside SDPA's cuDNN and flash backends.

Not the benchmark (that is bench/): a fast check used while developing. Prints TFLOP/s per shape.
"""

import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import attn.fast as fast
import attn.reference as reference

SHAPES = [  # B, H, Hkv, S, D, causal
    (16, 32, 32, 1024, 128, True),
    (4, 32, 32, 4096, 128, True),
    (4, 32, 32, 4096, 128, False),
    (4, 32, 8, 4096, 128, True),
    (8, 32, 32, 4096, 64, True),
]
only = sys.argv[1:] and int(sys.argv[1])
for i, (b, h, hkv, s, d, causal) in enumerate(SHAPES):
    if only is not None and only != [] and i != only:
        continue
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16)
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    out = fast.attention(q, k, v, causal=causal)
    ref = reference.attention(q[:1].float(), k[:1].float(), v[:1].float(), causal=causal)
    err = ((out[:1].float() - ref).norm() / ref.norm()).item()
    ms = triton.testing.do_bench(lambda: fast.attention(q, k, v, causal=causal), return_mode="median")
    row = f"B{b} H{h}/{hkv} S{s} D{d} {'causal' if causal else 'full'}: ours {flops / ms / 1e9:.0f} TFLOP/s (err {err:.1e})"
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(
                    qt, kt, vt, is_causal=causal, enable_gqa=hkv != h
                )
                fn()
                ms_p = triton.testing.do_bench(fn, return_mode="median")
            row += f" | {name} {flops / ms_p / 1e9:.0f} ({ms_p / ms:.2f}x)"
        except Exception as e:  # a peer that refuses a shape is reported, not fatal
            row += f" | {name} failed: {type(e).__name__}"
    print(row, flush=True)
