"""Which compiled Triton kernels each test launches: a pytest plugin, on when ``ATTN_KERNEL_MAP`` names a folder.

compute-sanitizer's racecheck and synccheck check what a kernel binary does with shared memory and barriers.
Knowing which binaries each test launches says which tests add a binary that no sanitized test has run yet,
and which binaries a sanitized run really ran (`bench/kernel_coverage.py` reads these maps). A binary is
Triton's compiled kernel: its ``name`` (the Python function's) and ``hash`` (of the source, the constexprs, the
argument specialization, the options and the target), so two tests that differ only in sizes Triton does not
specialize on launch the same binary.

Every launch goes through ``CompiledKernel.run``, a property that hands out the launcher: Triton's own path,
`attn.fast._triton.launch`'s direct path and `attn.plan`'s replays all read it once per launch. Wrapping the
property records the launch without installing a launch hook, which would send those paths back to Triton's
(`_triton._hooked`), so a test launches the same binaries with the map on as off.

Kernels launched before a test (module fixtures) count for the first test that runs after them. Each process
appends one line per test to ``kmap_<pid>.jsonl`` as the test ends, so a run cut short keeps what ran:
``{"id": ..., "outcome": "passed" | "failed" | "skipped", "seconds": ..., "kernels": [[name, hash], ...]}``.
"""

import json
import os
import time

import pytest

_launched: set = set()


def _wrap_run():
    from triton.compiler.compiler import CompiledKernel

    real = CompiledKernel.run.fget
    if getattr(real, "_attn_kernel_map", False):  # a second registration in one process wraps it once
        return

    def run(self):
        _launched.add((self.name, self.hash))
        return real(self)

    run._attn_kernel_map = True
    CompiledKernel.run = property(run)


class KernelMap:
    def __init__(self, folder: str):
        self.path = os.path.join(folder, f"kmap_{os.getpid()}.jsonl")
        self.outcome = "passed"
        os.makedirs(folder, exist_ok=True)
        _wrap_run()

    def pytest_runtest_logreport(self, report):
        # setup, call and teardown each report; the test failed if any phase did
        if report.failed:
            self.outcome = "failed"
        elif report.skipped and self.outcome == "passed":
            self.outcome = "skipped"

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        _launched.clear()
        self.outcome = "passed"
        start = time.perf_counter()
        yield
        line = {
            "id": item.nodeid,
            "outcome": self.outcome,
            "seconds": round(time.perf_counter() - start, 3),
            "kernels": sorted([name, h] for name, h in _launched),
        }
        _launched.clear()
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
