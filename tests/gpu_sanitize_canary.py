"""A Triton kernel that reads outside its tensor, for ``tests/gpu_sanitize.sh`` to check its own filter.

The sanitizer runs skip kernels that are not ours (``--kernel-name-exclude``: PyTorch's, cuBLAS's): the fp32
and fp64 references spend most of a sanitized test in them. A filter that also dropped our Triton kernels would
report "0 errors" over kernels it never checked, so the script first runs this file under memcheck with the
same filter and expects the read below to be reported. Exits 0 after the launch, 3 without a GPU.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")  # x is its own allocation, so the read is outside

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _sanitizer_canary_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.load(x_ptr + n + i))  # unmasked on purpose: x[n : n + BLOCK] is past x's end


def main() -> int:
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("no GPU: the canary needs a CUDA device")
        return 3
    x = torch.zeros(4096, device="cuda")
    out = torch.empty(1024, device="cuda")
    _sanitizer_canary_kernel[(1,)](x, out, x.numel(), BLOCK=1024)
    torch.cuda.synchronize()
    print("launched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
