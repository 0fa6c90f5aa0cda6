"""Probe: where the host time of one `attn.fast.decode` call goes (no device sync between calls).

    PYTHONPATH=. python scripts/host_probe.py          # on the GPU machine

Prints microseconds per call for the whole call and for its parts: the checks, the output allocations, the
autotuned launch, a launch of the plain kernel with a fixed config, and the combine kernel's launch.
"""

from __future__ import annotations

import sys

import torch

import attn.fast as fast
from attn.checks import check_decode
from bench import common

# the package exports the function `decode`, which hides the module of the same name
dec = sys.modules["attn.fast.decode"]


def main() -> None:
    b, hq, hkv, d, n = 64, 32, 8, 128, 4096
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b, n, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.full((b,), n, device="cuda", dtype=torch.int32)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    rows = {
        "decode, validate=False (1 launch)": lambda: fast.decode(q, kc, vc, lens, validate=False),
        "decode, validate=True": lambda: fast.decode(q, kc, vc, lens),
        "decode, 4 splits forced (2 launches)": lambda: fast.decode(q, kc, vc, lens, validate=False, num_splits=4),
        "check_decode(validate=False)": lambda: check_decode(q, kc, vc, lens, validate=False, dtypes=dtypes),
        "4 x torch.empty": lambda: [torch.empty(b, 1, hq, 4, d, device="cuda") for _ in range(4)],
    }
    for name, fn in rows.items():
        print(f"{common.host_us(fn):8.1f} us  {name}", flush=True)
    # the same launch without the autotuner in front
    dec.autotune_enabled = lambda: False
    print(f"{common.host_us(lambda: fast.decode(q, kc, vc, lens, validate=False)):8.1f} us  decode, fixed config")


if __name__ == "__main__":
    main()
