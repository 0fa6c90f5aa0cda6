"""Probe: where the host time of one replayed `DecodePlan.run` goes (issue 15's target: <= 20 us per call).

    PYTHONPATH=. python bench/probes/plan_host_profile.py     # on the GPU machine

For two short shapes and the PERF.md decode shapes (bf16, contiguous and 64-token pages): host microseconds per
`plan.run`, per `plan.run(q, out=(o, None))` (no output allocation) and per bare output allocation; then the
functions holding the most host time under cProfile for one shape.

Each number is the median of 9 passes of 100 calls back to back, a sync before each pass. Session 11 timed one
pass of 400 calls and read two things that are not the plan: its first rows ran 1.5x slower than the same work
later (a bare `torch.empty` 3.9 us against 2.1: a cold host), and long kernels (0.2-1 ms) queue up behind 400
launches (suspected of B8 L32768's 27 us contiguous against 20 paged). The whole table also runs twice.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics

import torch

import attn
from attn.fast import _triton
from bench import common


def main():
    # the PERF.md shapes keep the GPU busier than the host (0.3-1 ms a kernel), and a host far ahead of a busy GPU
    # may wait in the driver's launch queue: the two short shapes first, whose kernels end before the next call
    # is issued, show the host cost alone
    shapes = [("B1 H32/8 L256", 1, 256, 32, 8), ("B4 H32/8 L1024", 4, 1024, 32, 8),
              ("B64 H32/8 L4096", 64, 4096, 32, 8), ("B8 H32/8 L32768", 8, 32768, 32, 8),
              ("B1 H32/8 L131072", 1, 131072, 32, 8), ("B128 H32/32 L2048", 128, 2048, 32, 32)]  # fmt: skip
    for rnd in (1, 2):
        print(f"-- pass {rnd}", flush=True)
        for name, b, n, hq, hkv in shapes:
            for paged in (False, True):
                probe(name, b, n, hq, hkv, paged, profile=rnd == 2 and name.startswith("B4 ") and not paged)


def probe(name, b, n, hq, hkv, paged, profile, d=128, dev="cuda"):
    q = torch.randn(b, 1, hq, d, device=dev, dtype=torch.bfloat16)
    if paged:
        bs = 64
        pool_k = torch.randn(b * n // bs, bs, hkv, d, device=dev, dtype=torch.bfloat16)
        table = torch.randperm(b * n // bs, dtype=torch.int32).view(b, n // bs)
    else:
        pool_k = torch.randn(b, n, hkv, d, device=dev, dtype=torch.bfloat16)
        table = None
    pool_v = torch.randn_like(pool_k)
    plan = attn.DecodePlan(pool_k, pool_v, [n] * b, block_table=table, num_heads_q=hq)
    plan.run(q)
    torch.cuda.synchronize()
    o = torch.empty_like(q)
    steps = [s for s in plan._replay.steps if s[0] == "launch"] if plan.replayable else []

    def us(fn):
        return statistics.median(common.host_us(fn, calls=100) for _ in range(9))

    row = {
        "run": us(lambda: plan.run(q)),
        "run_out": us(lambda: plan.run(q, out=(o, None))),
        "empty": us(lambda: torch.empty_like(q)),
        "stream": us(lambda: _triton.current_stream(0)),
    }
    print(f"{name:20s} {'paged' if paged else 'contig':6s} replayable={plan.replayable} ({plan.refusal}) "
          f"launches={len(steps)} direct={sum(s[6] is not None for s in steps)} "
          + " ".join(f"{k}={v:.1f}us" for k, v in row.items()), flush=True)  # fmt: skip
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2000):
            plan.run(q)
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
