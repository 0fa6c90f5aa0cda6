"""Probe: what keeps a reduce-overhead warm-up's temporaries alive under compute-sanitizer's memcheck?

    PYTHONPATH=. python bench/probes/graph_pool_probe.py     # on the GPU machine (~150 s)

History. Session 15 saw `test_compiled_model_equals_eager_gpu_reduce_overhead` fail with "tensor(s) in the
cudagraph pool not tracked as outputs"; sessions 15-17 moved every buffer attn keeps across calls out of the
graphs' pool (`attn._memo.outside_pools`; the last pair, preprocess's RoPE tables, in session 17), and on an
H100 the reduce-overhead tests now pass (`bench/results/graph_pool_H100_2026-12-07_s17.log`). Under memcheck
(caching allocator on) both still fail with 10 tensors left in the pool, and the allocation histories name them:
per layer, the linear's output, preprocess's `device_positions` (2), its q output and context attention's output,
kernel arguments of the prefill function's warm-up that should have died when it returned.

This runs the test's model compiled with mode="reduce-overhead" in fresh processes, eager run first as in the old
test: ``plain`` (expected to pass) and ``memcheck`` (the same child under `compute-sanitizer --tool memcheck`,
expected to fail). On a failure it looks up every live tensor whose address torch names and prints who refers
to it, three levels up (frames by function and line, containers by type and size), and the history frames of
attn, the test and inductor's generated code. A frame or a traceback among the referrers would point at a
swallowed exception; a Triton or sanitizer object at a launch that holds its arguments.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import gc
import re
import sys
import types
sys.path.insert(0, "tests")
import torch
import test_compile as t


def describe(obj):
    if isinstance(obj, types.FrameType):
        return f"frame {obj.f_code.co_name} {obj.f_code.co_filename.rsplit('/', 1)[-1]}:{obj.f_lineno}"
    if isinstance(obj, types.TracebackType):
        return f"traceback at {obj.tb_frame.f_code.co_name}:{obj.tb_lineno}"
    if isinstance(obj, BaseException):
        return f"exception {type(obj).__name__}: {str(obj)[:80]}"
    if isinstance(obj, dict):
        return f"dict of {len(obj)} (keys {[str(k)[:30] for k in list(obj)[:6]]})"
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__} of {len(obj)}"
    if isinstance(obj, torch.Tensor):
        return f"tensor {tuple(obj.shape)} {obj.dtype}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def referrers(obj, depth, seen, indent="    "):
    if depth == 0:
        return
    for r in gc.get_referrers(obj):
        if id(r) in seen or r is seen or isinstance(r, types.FrameType) and r.f_code.co_name == "referrers":
            continue
        seen.add(id(r))
        print(indent + describe(r))
        referrers(r, depth - 1, seen, indent + "  ")


try:
    t._check_compiled("cuda", eager_first=True, mode="reduce-overhead")
    print(f"{sys.argv[1]}: pass")
except Exception as e:
    msg = str(e)
    print(f"{sys.argv[1]}: FAIL {type(e).__name__}: {msg.splitlines()[0][:160]}")
    ptrs = {int(p) for p in re.findall(r"\d{6,}", (re.findall(r"data_ptr\(\) in (.*)", msg) or [""])[0])}
    del e
    gc.collect()
    objs = gc.get_objects()
    live = [o for o in objs if isinstance(o, torch.Tensor) and o.is_cuda and o.untyped_storage().data_ptr() in ptrs]
    for obj in live:
        print(f"  live {describe(obj)} at {obj.untyped_storage().data_ptr()}; referred to by:")
        referrers(obj, 3, {id(obj), id(objs), id(live)})  # not this search's own lists
    for line in msg.splitlines():
        if "Data Pointer" in line or re.search(r'File "/(work|tmp/torchinductor)', line):
            print("  " + line.strip()[:200])
"""


def main() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    found = sorted(Path("/usr/local").glob("cuda*/bin/compute-sanitizer"))
    san = shutil.which("compute-sanitizer") or (found[0] if found else None)
    runs = {"plain": []}
    if san:
        runs["memcheck"] = [str(san), "--tool", "memcheck", "--print-limit", "20"]
    for name, prefix in runs.items():
        proc = subprocess.run([*prefix, sys.executable, "-c", CHILD, name], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        out = proc.stdout.strip() or f"{name}: no output, rc={proc.returncode}: {proc.stderr.strip()[-300:]}"
        print(out, flush=True)


if __name__ == "__main__":
    main()
