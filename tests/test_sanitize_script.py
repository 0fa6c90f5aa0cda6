"""tests/gpu_sanitize.sh on a CPU, with a stand-in for compute-sanitizer.

The script's sanitizer runs happen only on the GPU machine, where a broken summary line or a resume that
deselects the wrong tests would cost a whole device call and could report "0 errors" over tests that never ran.
Here a shell stand-in parses the sanitizer's options, runs the program and writes the summary line the real tool
writes, so the script's own logic is what is tested: sharing the ids among SAN_PAR instances, adding up their
reports, failing on an error, and resuming from junit files.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGET = ["tests/test_checks.py", "-k", "not-tensor"]  # a few quick tests; their count is collected below

FAKE = r"""#!/usr/bin/env bash
[ "$1" = --version ] && { echo "stand-in sanitizer"; exit 0; }
[ "$1" = --help ] && { echo "  --force-synchronization-limit arg"; exit 0; }
tool=memcheck excl= sync=
while [[ "$1" == --* ]]; do
  [ "$1" = --log-file ] && log=$2
  [ "$1" = --tool ] && tool=$2
  [ "$1" = --kernel-name-exclude ] && excl=$2
  [ "$1" = --force-synchronization-limit ] && sync=$2
  shift 2
done
if [[ "$*" == *gpu_sanitize_canary.py* ]]; then  # FAKE_CANARY: seen, unfiltered (seen only without a filter), never
  mode=${FAKE_CANARY:-seen}
  if [ "$mode" = seen ] || { [ "$mode" = unfiltered ] && [ -z "$excl" ]; }; then
    echo "========= Invalid __global__ read of size 4 bytes" > "$log"; exit 99
  fi
  echo "========= ERROR SUMMARY: 0 errors" > "$log"; exit 0
fi
"$@"; rc=$?
n=${FAKE_ERRORS:-0}
echo "allocator: ${PYTORCH_NO_CUDA_MEMORY_CACHING:-caching}" > "$log"
echo "excluded: ${excl:-none}" >> "$log"
echo "sync limit: ${sync:-none}" >> "$log"
if [ "$tool" = racecheck ]; then
  echo "========= RACECHECK SUMMARY: $n hazards displayed ($n errors, 0 warnings)" >> "$log"
else
  echo "========= ERROR SUMMARY: $n errors" >> "$log"
  [ "$n" -gt 1 ] && echo "========= ERROR SUMMARY: 1 error was not printed. Use --print-limit option" >> "$log"
fi
[ "$n" -gt 0 ] && exit 99
exit $rc
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("awk") is None, reason="needs bash")


def _run(tmp_path: Path, out: str, target: list[str] = TARGET, **env: str) -> tuple[int, str]:
    fake = tmp_path / "fake-sanitizer"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    environ = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this python as python3
        "COMPUTE_SANITIZER": str(fake),
        "OUT": str(tmp_path / out),
        "TRITON_INTERPRET": "1",
        "SAN_STAGGER": "0",
        **env,
    }
    proc = subprocess.run(["bash", "tests/gpu_sanitize.sh", *target], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    return proc.returncode, (tmp_path / out / "sanitizer" / "summary.txt").read_text()


def _ids(target: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *target]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    return [line for line in proc.stdout.splitlines() if "::" in line]


def _collected() -> int:
    n = len(_ids(TARGET))
    assert n >= 3
    return n


def test_shares_add_up_to_every_test(tmp_path):
    n = _collected()
    rc, summary = _run(tmp_path, "a", SAN_PAR="2", SANITIZER_TOOLS="memcheck racecheck")
    assert rc == 0, summary
    assert f"{n} test ids in 2 shares" in summary
    for tool in ("memcheck", "racecheck"):
        total = re.search(rf"^{tool} total: (\d+) errors reported, (\d+) instances.*'passed': (\d+)", summary, re.M)
        assert total and total.groups() == ("0", "0", str(n)), summary
    # memcheck needs every tensor in an allocation of its own; racecheck keeps the caching allocator (no cudaFree,
    # which waits for the device, per freed tensor)
    logs = tmp_path / "a" / "sanitizer"
    assert all("allocator: 1" in (logs / f"memcheck.{k}.log").read_text() for k in "01")
    assert all("allocator: caching" in (logs / f"racecheck.{k}.log").read_text() for k in "01")
    # each instance records the tests it ran in its kernel map (none launches a compiled kernel on a CPU), and the
    # coverage report reads the maps of clean instances
    mapped = [json.loads(line)["id"] for f in (logs / "kmap").glob("racecheck.*/kmap_*.jsonl")
              for line in f.read_text().splitlines()]  # fmt: skip
    assert sorted(mapped) == sorted(_ids(TARGET))
    from bench import kernel_coverage

    text = kernel_coverage.report({}, ["racecheck"], {"racecheck": [logs]}, None)
    assert "(2 of 2 instances clean, 0 without a summary line)" in text, text


def test_an_error_in_one_instance_fails_the_run(tmp_path):
    rc, summary = _run(tmp_path, "b", SAN_PAR="3", SANITIZER_TOOLS="racecheck", FAKE_ERRORS="2")
    assert rc != 0
    assert re.search(r"^racecheck total: 6 errors reported", summary, re.M), summary


def test_resume_leaves_out_what_ran(tmp_path):
    n = _collected()
    rc, _ = _run(tmp_path, "c", SAN_PAR="2", SANITIZER_TOOLS="memcheck")
    assert rc == 0
    first = tmp_path / "c" / "sanitizer" / "memcheck.0.junit.xml"  # one share done: the other is left to run
    rc, summary = _run(tmp_path, "d", SAN_PAR="2", SANITIZER_TOOLS="memcheck", SAN_DONE=str(first))
    assert rc == 0, summary
    done = int(re.search(r"resuming: (\d+) tests done", summary).group(1))
    assert 0 < done < n
    assert f"{n - done} test ids" in summary
    assert re.search(rf"'passed': {n - done}\}}", summary), summary


def test_gpu_marked_and_graph_tests_get_instances_of_their_own(tmp_path):
    # the dealing that keeps big gpu-marked tests from running in every instance at once, and graph capture on the
    # caching allocator: light ids (test_checks), gpu-marked ids (test_no_sync's), graph-capturing ids (test_plan's)
    target = ["tests/test_checks.py", "tests/test_no_sync.py", "tests/test_plan.py",
              "-k", "not-tensor or test_gpu_default_calls or graph"]  # fmt: skip
    ids = _ids(target)
    graph = [x for x in ids if "graph" in x]
    heavy = [x for x in ids if "test_gpu_default_calls" in x]
    light = [x for x in ids if "test_checks.py" in x]
    assert graph and heavy and light and len(graph) + len(heavy) + len(light) == len(ids)

    rc, summary = _run(tmp_path, "e", target, SAN_PAR="4", SAN_HEAVY="1", SAN_CHUNK="1", SANITIZER_TOOLS="memcheck")
    assert rc == 0, summary
    dealt = f"{len(ids)} test ids in 5 shares ({len(heavy)} gpu-marked in 1, {len(graph)} capturing graphs in g)"
    assert dealt in summary, summary
    logs = tmp_path / "e" / "sanitizer"
    shares = {k: (logs / f"share{k}.args").read_text().split() for k in ("0", "1", "2", "3", "_g")}
    assert sorted(shares["0"] + shares["1"] + shares["2"]) == sorted(light)
    assert sorted(shares["3"]) == sorted(heavy)
    assert sorted(shares["_g"]) == sorted(graph)
    total = re.search(r"^memcheck total: 0 errors reported, 0 instances without a summary line \| tests: (.*)$",
                      summary, re.M)  # fmt: skip
    assert total, summary
    assert sum(ast.literal_eval(total.group(1)).values()) == len(ids), summary  # a dict of pytest's counts
    # the gpu-marked share runs one process per SAN_CHUNK tests (here 1), each with its own logs
    chunks = sorted(logs.glob("memcheck.3.c*.log"))
    chunks = [c for c in chunks if not c.name.endswith(".pytest.log")]
    assert len(chunks) == len(heavy) and not (logs / "memcheck.3.log").exists()
    instances = [logs / f"memcheck.{k}.log" for k in "012"] + chunks
    # graph capture needs PyTorch's caching allocator; the other instances run without it
    assert "allocator: caching" in (logs / "memcheck.g.log").read_text()
    assert all("allocator: 1" in log.read_text() for log in instances)
    # the bound on queued launches (the sanitizer's device memory), except where a sync would break a capture
    assert "sync limit: none" in (logs / "memcheck.g.log").read_text()
    assert all("sync limit: 32" in log.read_text() for log in instances)


def test_chunks_past_the_budget_are_not_started_and_fail_the_run(tmp_path):
    # SAN_BUDGET bounds a chunked share as a whole: a chunk with under 30 s left is not started, and says so (25 s:
    # none starts, while the light share has time to finish)
    target = ["tests/test_checks.py", "tests/test_no_sync.py", "-k", "not-tensor or test_gpu_default_calls"]
    rc, summary = _run(tmp_path, "h", target, SAN_PAR="2", SAN_HEAVY="1", SAN_CHUNK="4", SAN_BUDGET="25",
                       SANITIZER_TOOLS="memcheck")  # fmt: skip
    assert rc != 0
    assert re.search(r"^memcheck\.1\.c000: not started, \d+s of the budget left$", summary, re.M), summary
    assert re.search(r"^memcheck\.0: exit 0 ", summary, re.M), summary  # the light share is not chunked


@pytest.mark.parametrize("canary", ["seen", "unfiltered", "never"])
def test_the_canary_decides_the_kernel_filter(tmp_path, canary):
    # the filter that skips PyTorch's and cuBLAS's kernels is kept only if the canary (a Triton kernel reading past
    # its tensor) is still reported under it; a canary never reported fails the run
    rc, summary = _run(tmp_path, canary, SANITIZER_TOOLS="memcheck", FAKE_CANARY=canary)
    log = (tmp_path / canary / "sanitizer" / "memcheck.log").read_text()
    if canary == "seen":
        assert rc == 0 and "those kernels go unchecked" in summary, summary
        assert "excluded: regex=^(_Z|" in log
    elif canary == "unfiltered":
        assert rc == 0 and "canary reported with every kernel checked (not under the filter" in summary, summary
        assert "excluded: none" in log
    else:
        assert rc != 0 and "canary NOT reported" in summary, summary


def test_resume_from_a_pytest_log(tmp_path):
    # a call cut before pytest wrote its junit file still has the instance's -v log
    n = _collected()
    rc, _ = _run(tmp_path, "f", SAN_PAR="2", SANITIZER_TOOLS="memcheck")
    assert rc == 0
    log = tmp_path / "f" / "sanitizer" / "memcheck.1.pytest.log"
    passed = sum(" PASSED" in line for line in log.read_text().splitlines())
    assert 0 < passed < n
    rc, summary = _run(tmp_path, "g", SAN_PAR="2", SANITIZER_TOOLS="memcheck", SAN_DONE=str(log))
    assert rc == 0, summary
    assert f"resuming: {passed} tests done" in summary, summary
    assert re.search(rf"'passed': {n - passed}\}}", summary), summary


def _jitted_name(obj) -> str | None:
    # a @triton.jit / @gluon.jit function, also under the interpreter and inside an autotuner or heuristics
    for _ in range(5):
        if type(obj).__name__ in ("JITFunction", "InterpretedFunction", "GluonJITFunction"):
            return getattr(getattr(obj, "fn", None), "__name__", None)
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return None


def test_the_default_filter_leaves_every_kernel_of_ours_checked():
    # the canary proves the filter keeps one Triton kernel; this keeps a future kernel named like a vendor's
    # (cutlass_..., triton_...) from going unchecked without anyone seeing it
    import importlib
    import pkgutil

    import attn

    script = (ROOT / "tests" / "gpu_sanitize.sh").read_text()
    pattern = re.search(r'excl=\$\{SAN_EXCLUDE-"regex=(.*?)"\}', script).group(1)
    names = set()
    for info in pkgutil.walk_packages(attn.__path__, "attn."):
        module = importlib.import_module(info.name)
        names |= {n for n in map(_jitted_name, vars(module).values()) if n}
    assert {"_attn_fwd_kernel", "_decode_kernel", "_attn_fwd_gluon", "_decode_1b_kernel"} <= names, names
    names.add("_sanitizer_canary_kernel")
    assert not [n for n in names if re.match(pattern, n)]
    # and it does exclude what it is for: PyTorch's mangled names, cuBLAS's, Inductor's
    for vendor in ("_ZN2at6native29vectorized_elementwise_kernel", "sm80_xmma_gemm_f32f32", "triton_poi_fused_0"):
        assert re.match(pattern, vendor), vendor
