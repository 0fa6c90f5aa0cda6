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
    tl.store(out_ptr + i, tl.load(x_ptr + n + i))  # unmasked on purpose: n is past x's end


def main() -> int:
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("no GPU: the canary needs a CUDA device")
        return 3
    # out first, then x, and the read starts 4 KiB past x's end. Session 15's first canary allocated x, then out,
    # and read x[4096:5120]; memcheck said nothing, with and without the filter. memcheck reports a read even one
    # byte past an allocation unless it lands in another, and the driver packs small allocations, so that read
    # most likely fell inside out. Nothing is allocated after x here.
    out = torch.empty(1024, device="cuda")
    x = torch.zeros(4096, device="cuda")
    _sanitizer_canary_kernel[(1,)](x, out, x.numel() + 1024, BLOCK=1024)
    torch.cuda.synchronize()
    print("launched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
