"""The kernel map (tests/kernel_map.py) and the per-binary coverage it feeds (bench/kernel_coverage.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from triton.compiler.compiler import CompiledKernel

from bench import kernel_coverage as kc

HERE = Path(__file__).resolve().parent


def _fake_kernel(name: str, h: str, launcher):
    # a compiled kernel without compiling: the `run` property hands out `_run` once it is set
    k = CompiledKernel.__new__(CompiledKernel)
    k.name, k.hash, k._run = name, h, launcher
    return k


def test_map_inner_launch():
    # run plainly, it checks the property still hands out the launcher; under the map (the test below runs it in
    # a child process) the launch is recorded as well
    launcher = object()
    assert _fake_kernel("_fake_kernel", "h1", launcher).run is launcher


def test_map_inner_quiet():
    pass


def test_map_records_each_tests_launches(tmp_path):
    env = {**os.environ, "ATTN_KERNEL_MAP": str(tmp_path)}
    ids = [f"{HERE / 'test_kernel_map.py'}::test_map_inner_{name}" for name in ("launch", "quiet")]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *ids],
        env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    files = list(tmp_path.glob("kmap_*.jsonl"))
    assert len(files) == 1
    recs = {r["id"].split("::")[-1]: r for r in map(json.loads, files[0].read_text().splitlines())}
    assert recs["test_map_inner_launch"]["kernels"] == [["_fake_kernel", "h1"]]
    assert recs["test_map_inner_launch"]["outcome"] == "passed"
    # the second test launched nothing: the first test's launch is not carried over
    assert recs["test_map_inner_quiet"]["kernels"] == []


def _write_map(folder: Path, records):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "kmap_1.jsonl", "w") as f:
        for tid, kernels, secs in records:
            f.write(json.dumps({"id": tid, "outcome": "passed", "seconds": secs, "kernels": kernels}) + "\n")


def test_coverage_counts_only_clean_instances_and_picks_the_cheapest_cover(tmp_path):
    b1, b2, b3 = ["_k1", "a"], ["_k2", "b"], ["_k3", "c"]
    vendor = ["triton_poi_fused_0", "z"]  # inductor's kernel: not ours, never counted
    _write_map(
        tmp_path / "suite",
        [("t1", [b1, vendor], 1.0), ("t2", [b2, b3], 10.0), ("t3", [b2], 1.0), ("t4", [b3], 1.0)],
    )
    logs = tmp_path / "run"
    # instance A: 0 errors (racecheck's summary form); B: 3 errors; C: cut, no summary line
    _write_map(logs / "kmap" / "racecheck.0", [("t1", [b1], 1.0)])
    (logs / "racecheck.0.log").write_text("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    _write_map(logs / "kmap" / "racecheck.1", [("t3", [b2], 1.0)])
    (logs / "racecheck.1.log").write_text("========= RACECHECK SUMMARY: 3 hazards displayed (3 errors, 0 warnings)\n")
    _write_map(logs / "kmap" / "racecheck.2", [("t4", [b3], 1.0)])
    (logs / "racecheck.2.log").write_text("========= Target application returned an error\n")
    assert kc.instance_errors(logs / "racecheck.0.log") == 0
    assert kc.instance_errors(logs / "racecheck.1.log") == 3
    assert kc.instance_errors(logs / "racecheck.2.log") is None

    suite = kc.read_maps(tmp_path / "suite")
    assert suite["t1"]["kernels"] == {("_k1", "a")}
    text = kc.report(suite, ["racecheck", "synccheck"], {"racecheck": [logs]}, tmp_path / "pick")
    assert "racecheck: 1 of 3 binaries ran in instances with 0 errors (1 of 3 instances clean, 1 without" in text
    assert "not yet: _k2 x1" in text and "not yet: _k3 x1" in text
    # t3 and t4 add one binary a second each; t2 adds both for ten
    assert sorted((tmp_path / "pick" / "pick_racecheck.txt").read_text().split()) == ["t3", "t4"]
    # a tool with no run yet: every binary missing, t1 for _k1, and t3 and t4 as above
    assert "synccheck: 0 of 3 binaries" in text
    assert sorted((tmp_path / "pick" / "pick_synccheck.txt").read_text().split()) == ["t1", "t3", "t4"]


def test_memcheck_summary_form(tmp_path):
    log = tmp_path / "m.log"
    log.write_text("========= ERROR SUMMARY: 2 errors\n========= ERROR SUMMARY: 0 errors\n")
    assert kc.instance_errors(log) == 0  # the last summary counts
    log.write_text("========= ERROR SUMMARY: 121 errors were not printed\n")
    assert kc.instance_errors(log) is None
