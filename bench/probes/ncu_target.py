"""One call of a kernel inside an NVTX range named ``profile``, for Nsight Compute to read its hardware counters.

    PYTHONPATH=. python bench/probes/ncu_target.py CASE        # on the GPU machine, under bench/probes/ncu_profile.sh

Cases (bf16, the PERF.md shapes):

  prefill        ours, B16 H32 S1024 D128 causal (the shape furthest from cuDNN: 0.74x on 2026-11-29)
  prefill_cudnn  SDPA's cuDNN backend on the same inputs
  prefill_long   ours, B4 H32 S4096 D128 causal (0.88x cuDNN)
  prefill_long_cudnn
  decode         ours, B8 H32/8 L32768, contiguous bf16 cache, the heuristic's split count
  decode_fp8     the same over an FP8 (e4m3) cache (1.61x the bf16 cache's speed, against the 1.7x target)
  decode_int8    the same over an INT8 cache
  gluon_long     the Gluon bf16 prefill (ATTN_GLUON=1), B4 H32 S4096 D128 causal
  fp8_long       FP8 prefill on the Gluon kernel (ATTN_GLUON=1), same shape: 440 TFLOP/s on 2026-12-07 against
                 the bf16 default's 462, where FP8 tensor cores should give up to 2x
  fp8_long_tl    the tl.* FP8 kernel (ATTN_GLUON=0) on the same inputs
  gdecode_fp8    the Gluon one-byte decode (ATTN_GLUON_DECODE=1), FP8 cache, decode's shape: 0.78-0.81x the
                 tl.* kernel on 2026-12-07 with 2.6-2.8x fewer instructions per byte
  gdecode_int8   the same over an INT8 cache

Everything before the range (autotuning, compilation, warm-up) runs outside it, so the profiler sees only the
configuration the benchmark times.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attn.fast as fast


def prefill(b: int, s: int, cudnn: bool):
    h, d = 32, 128
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if cudnn:
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))

        def call():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        return call
    return lambda: fast.attention(q, k, v, causal=True)


def decode(dtype):
    b, hq, hkv, d, n = 8, 32, 8, 128, 32768
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, n, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.full((b,), n, device="cuda", dtype=torch.int32)
    kw = {}
    if dtype is not None:
        amax = 448.0 if dtype == torch.float8_e4m3fn else 127.0
        ks, vs = (x.abs().amax().float().reshape(1) / amax for x in (k, v))
        if dtype == torch.int8:
            k, v = (torch.round(x / sc).clamp(-127, 127).to(torch.int8) for x, sc in ((k, ks), (v, vs)))
        else:
            k, v = ((x / sc).to(dtype) for x, sc in ((k, ks), (v, vs)))
        kw = dict(k_scale=ks, v_scale=vs)
    return lambda: fast.decode(q, k, v, lens, validate=False, max_seqlen_k=n, total_seqlen_k=n * b, **kw)


def gluon_prefill(fp8: bool, gluon: bool):
    os.environ["ATTN_GLUON"] = "1" if gluon else "0"
    b, s, h, d = 4, 4096, 32, 128
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if not fp8:
        return lambda: fast.attention(q, k, v, causal=True)
    from attn.fast.fp8_prefill import attention_fp8

    q8, k8, v8 = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
    return lambda: attention_fp8(q8, k8, v8, causal=True)


def gluon_decode(dtype):
    os.environ["ATTN_GLUON_DECODE"] = "1"
    return decode(dtype)


CASES = {
    "prefill": lambda: prefill(16, 1024, False),
    "prefill_cudnn": lambda: prefill(16, 1024, True),
    "prefill_long": lambda: prefill(4, 4096, False),
    "prefill_long_cudnn": lambda: prefill(4, 4096, True),
    "decode": lambda: decode(None),
    "decode_fp8": lambda: decode(torch.float8_e4m3fn),
    "decode_int8": lambda: decode(torch.int8),
    "gluon_long": lambda: gluon_prefill(False, True),
    "fp8_long": lambda: gluon_prefill(True, True),
    "fp8_long_tl": lambda: gluon_prefill(True, False),
    "gdecode_fp8": lambda: gluon_decode(torch.float8_e4m3fn),
    "gdecode_int8": lambda: gluon_decode(torch.int8),
}


def main() -> None:
    call = CASES[sys.argv[1]]()
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    call()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
