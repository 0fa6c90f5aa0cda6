"""Probe: is a kept buffer made during torch.compile's graph warm-up what broke reduce-overhead (session 15)?

    PYTHONPATH=. python bench/probes/graph_pool_probe.py     # on the GPU machine

Session 15 saw `test_compiled_model_equals_eager_gpu_reduce_overhead` fail when it ran first in its process
("tensor(s) in the cudagraph pool not tracked as outputs"), and df54a22 makes every buffer attn keeps on a helper
thread (`attn._memo.outside_pools`), outside the pool the warm-up routes the thread's allocations to. This runs the
test's model compiled with mode="reduce-overhead", with no eager call before it, in fresh processes, as controls
for `tests/test_compile.py::test_reduce_overhead_as_the_first_attn_call_in_a_process` (the same run with the
helper, as shipped, which `MODE=pools` runs just before this):

- ``no helper``: `outside_pools` replaced by a plain call (the code before df54a22). Session 16 (H100): fails,
  3 tensors left in the pool, the error word among them;
- ``no helper, eager first``: the old test's order. Session 16: passes;
- ``helper, history``: as shipped, with torch's allocation history on: the fresh-process test still failed in
  session 16 (2 tensors left in the pool), and this names where they were made;
- ``helper, eager first``: as shipped, the old test's order: under memcheck it failed in session 16 (10 tensors);
- ``helper, warm linear``: as shipped, after one eager cuBLAS call and no attn call before compiling.
  The ``helper`` variants record the histories.

Session 17 (H100): all three ``helper`` variants pass once preprocess's RoPE cos/sin tables (the 2 tensors) are
made outside the pool too (`bench/results/graph_pool_H100_2026-12-07_s17.log`).

Each prints one line: the variant, pass or the first line of the error, and (on failure) which kept buffers were
made during the run, by where they were made.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import collections
import sys
import traceback
sys.path.insert(0, "tests")
import torch
import attn
from attn import _memo
import test_compile as t

variant = sys.argv[1]
made = collections.Counter()

def plain(device, make):
    caller = traceback.extract_stack(limit=2)[0]
    made[f"{caller.filename.rsplit('/', 1)[-1]}:{caller.lineno} {caller.name}"] += 1
    return make()

if variant.startswith("helper"):
    # as shipped, with torch recording where each pool allocation was made: a failure then names them. torch
    # records only inside its warm-ups and recordings; recording from the start costs nothing here and also
    # covers an allocation made elsewhere and routed to the pool
    torch._inductor.config.triton.cudagraph_trees_history_recording = True
    torch.cuda.memory._record_memory_history()
if variant == "helper, warm linear":
    # as shipped, after one eager linear layer with a bias (no attn call): passing would put the leftovers in
    # cuBLAS's lazily made workspaces, not in attn
    x = torch.randn(4, 8, device="cuda")
    torch.nn.functional.linear(x, torch.randn(8, 8, device="cuda"), torch.randn(8, device="cuda"))
    torch.cuda.synchronize()
elif not variant.startswith("helper"):
    _memo.outside_pools = plain
try:
    t._check_compiled("cuda", eager_first=variant.endswith("eager first"), mode="reduce-overhead")
    print(f"{variant}: pass")
except Exception as e:
    print(f"{variant}: FAIL {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    if variant.startswith("helper"):
        # the allocation histories: the stack of each tensor left in the pool, attn's frames and torch's
        print("\n".join(line for line in str(e).splitlines()[1:] if line.strip()))
    print(f"  kept buffers made without the helper: {dict(made)}")
"""


def main() -> None:
    variants = ["helper, history", "helper, eager first", "helper, warm linear"]  # no-helper controls: run in s16
    for variant in variants:
        proc = subprocess.run([sys.executable, "-c", CHILD, variant], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        out = proc.stdout.strip() or f"{variant}: no output, rc={proc.returncode}: {proc.stderr.strip()[-300:]}"
        print(out, flush=True)


if __name__ == "__main__":
    main()
