"""Which of the suite's kernel binaries have run under each compute-sanitizer tool, and which tests would add the rest.

    python -m bench.kernel_coverage --suite MAP_DIR --tool TOOL ... [--ran TOOL=LOGS_DIR ...] [--pick OUT_DIR]

``MAP_DIR`` holds the ``kmap_*.jsonl`` files of a plain GPU run of the suite with ``ATTN_KERNEL_MAP`` set
(`tests/kernel_map.py`): each test's launched binaries, ``(name, hash)``, and its time. ``LOGS_DIR`` is a
`tests/gpu_sanitize.sh` folder: its instances record their maps under ``kmap/<tag>/`` beside ``<tag>.log``, the
sanitizer's own log. A binary counts as run under a tool when a test launched it in an instance whose log ends
with a summary of 0 errors (racecheck: 0 hazards). Binaries are matched by hash, so a run of an older kernel
source covers nothing of the new one.

This is a count per binary beside the count per test that `gpu_sanitize.sh` reports. Races and barrier errors
are properties of the binary's code, but which of its paths run depends on the sizes (how many loop trips, which
tiles are masked), so a binary run once is not every path of it run. The per-test count stays the bar.

``--pick`` writes ``pick_<tool>.txt``: the suite's test ids (one per line, for pytest's ``@file``) that launch
every binary not yet run under that tool, chosen greedily by new binaries per second of plain run time.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# kernels that are not ours: the same names tests/gpu_sanitize.sh leaves unchecked (--kernel-name-exclude),
# and inductor's generated Triton kernels
NOT_OURS = re.compile(r"^(_Z|sm[0-9]|nvjet|cutlass|ampere|cudnn|triton_)")
# "ERROR SUMMARY: 0 errors", or racecheck's "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"; not
# "ERROR SUMMARY: 121 errors were not printed", which a print limit adds after the count (tests/gpu_sanitize.sh
# adds up its instances' counts with `instance_errors` too)
SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?$|RACECHECK SUMMARY: \d+ hazards displayed \((\d+) error", re.M)


def read_maps(folder: Path) -> dict[str, dict]:
    """Test id -> {"kernels": set of (name, hash), "seconds": float, "outcome": str}, over every map file."""
    tests: dict[str, dict] = {}
    for path in sorted(folder.rglob("kmap_*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            kernels = {(n, h) for n, h in rec["kernels"] if not NOT_OURS.match(n)}
            seen = tests.setdefault(rec["id"], {"kernels": set(), "seconds": 0.0, "outcome": rec["outcome"]})
            seen["kernels"] |= kernels
            seen["seconds"] = max(seen["seconds"], rec["seconds"])
    return tests


def instance_errors(log: Path) -> int | None:
    """The error count of a sanitizer log's last summary line; None without one (the instance was cut)."""
    if not log.is_file():
        return None
    found = SUMMARY.findall(log.read_text(errors="replace"))
    if not found:
        return None
    return int(found[-1][0] or found[-1][1])


def ran_clean(logs: Path, tool: str) -> tuple[set, dict]:
    """Binaries launched in the tool's instances with 0 errors, and per instance its error count (None: no summary).

    An instance's tag is the tool's name, alone or followed by a dot and its share (``racecheck.3.c001``).
    """
    binaries: set = set()
    counts: dict = {}
    for folder in sorted(p for p in (logs / "kmap").glob("*") if p.is_dir()):
        tag = folder.name
        if tag != tool and not tag.startswith(tool + "."):
            continue
        errors = instance_errors(logs / f"{tag}.log")
        counts[tag] = errors
        if errors == 0:
            for rec in read_maps(folder).values():
                binaries |= rec["kernels"]
    return binaries, counts


def pick(tests: dict[str, dict], missing: set) -> list[str]:
    """Greedy cover: the test adding the most missing binaries per second, until none is missing."""
    left, chosen = set(missing), []
    candidates = {t: r for t, r in tests.items() if r["kernels"] & left}
    while left and candidates:
        best = max(candidates, key=lambda t: (len(candidates[t]["kernels"] & left) / (candidates[t]["seconds"] + 1), t))
        chosen.append(best)
        left -= candidates.pop(best)["kernels"]
        candidates = {t: r for t, r in candidates.items() if r["kernels"] & left}
    return chosen


def report(suite: dict[str, dict], tools: list[str], ran: dict[str, list[Path]], pick_dir: Path | None) -> str:
    binaries = set().union(*(r["kernels"] for r in suite.values())) if suite else set()
    names = sorted({n for n, _ in binaries})
    lines = [
        f"suite map: {len(suite)} tests, {len(binaries)} binaries of ours ({len(names)} kernel functions), "
        f"{sum(r['seconds'] for r in suite.values()):.0f} s of test time"
    ]
    for tool in tools:
        covered, instances = set(), {}
        for folder in ran.get(tool, []):
            got, counts = ran_clean(folder, tool)
            covered |= got
            instances.update({f"{folder.name}/{t}": c for t, c in counts.items()})
        clean = sum(1 for c in instances.values() if c == 0)
        uncut = sum(1 for c in instances.values() if c is not None)
        missing = binaries - covered
        lines.append(
            f"{tool}: {len(binaries & covered)} of {len(binaries)} binaries ran in instances with 0 errors "
            f"({clean} of {len(instances)} instances clean, {len(instances) - uncut} without a summary line)"
        )
        per_name: dict[str, int] = {}
        for n, _ in missing:
            per_name[n] = per_name.get(n, 0) + 1
        for n in sorted(per_name):
            lines.append(f"  not yet: {n} x{per_name[n]}")
        if pick_dir is not None:
            chosen = pick(suite, missing)
            pick_dir.mkdir(parents=True, exist_ok=True)
            (pick_dir / f"pick_{tool}.txt").write_text("".join(t + "\n" for t in chosen))
            secs = sum(suite[t]["seconds"] for t in chosen)
            lines.append(f"  pick_{tool}.txt: {len(chosen)} tests cover them ({secs:.0f} s of plain run time)")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", type=Path, required=True, help="folder of a plain run's kmap_*.jsonl")
    ap.add_argument("--tool", action="append", default=[], help="a sanitizer tool to report on (repeatable)")
    ap.add_argument("--ran", action="append", default=[], help="TOOL=gpu_sanitize.sh logs folder (repeatable)")
    ap.add_argument("--pick", type=Path, help="folder for pick_<tool>.txt")
    args = ap.parse_args(argv)
    ran: dict[str, list[Path]] = {}
    for item in args.ran:
        tool, sep, folder = item.partition("=")
        if not sep or not tool or not folder:
            raise SystemExit(f"--ran takes TOOL=FOLDER, got {item!r}")
        ran.setdefault(tool, []).append(Path(folder))
    tools = list(dict.fromkeys(args.tool + list(ran)))
    print(report(read_maps(args.suite), tools, ran, args.pick))


if __name__ == "__main__":
    main()
