"""The index of bench/results: one entry per result file, so that charts, docs and lessons ask for "the latest
decode run on an H200" instead of naming files.

    python -m bench.index            # rebuild bench/results/index.json from the files (keeps hand-written fields)
    python -m bench.index --list     # one line per entry

Each entry: ``file`` (relative to bench/results), ``benchmark`` (attention, decode, features, inflight, or a
log's kind: gpu_tests, probe, sass, ncu, demo, attention-log, ...), ``gpu``, ``date`` (UTC day), ``commit``,
``command``, and ``what`` (one line, hand-written where the file cannot say). JSON result files carry all of
these in their ``env``/``command`` fields; logs get them from their name (``kind_GPU_YYYY-MM-DD[_tag].log``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
INDEX = RESULTS / "index.json"
_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})")
_KINDS = [("gpu_tests", "gpu_tests"), ("ncu_", "ncu"), ("_sass", "sass"), ("sass_", "sass"), ("probe", "probe"),
          ("demo", "demo"), ("decode_merge", "decode_merge")]  # fmt: skip


def load() -> list[dict[str, Any]]:
    return json.loads(INDEX.read_text())["files"] if INDEX.is_file() else []


def find(benchmark: str, gpu: str | None = None, tag: str | None = None) -> list[dict[str, Any]]:
    """Entries of one benchmark, oldest first; ``gpu`` and ``tag`` are substrings of the GPU name and file."""
    out = [e for e in load() if e["benchmark"] == benchmark]
    if gpu:
        out = [e for e in out if gpu.lower() in (e.get("gpu") or "").lower()]
    if tag:
        out = [e for e in out if tag in e["file"]]
    return sorted(out, key=lambda e: (e.get("date") or "", e["file"]))


def latest(benchmark: str, gpu: str | None = None, tag: str | None = None) -> dict[str, Any]:
    found = find(benchmark, gpu, tag)
    if not found:
        raise LookupError(f"no {benchmark} result{f' on {gpu}' if gpu else ''}{f' tagged {tag}' if tag else ''}")
    return found[-1]


def path(entry: dict[str, Any] | str) -> Path:
    """The file of an entry (or of the entry whose ``file`` is this name)."""
    name = entry["file"] if isinstance(entry, dict) else entry
    if not any(e["file"] == name for e in load()):
        raise LookupError(f"{name} is not in {INDEX}")
    return RESULTS / name


def read(entry: dict[str, Any] | str) -> dict[str, Any]:
    """The parsed JSON of a result file named in the index."""
    return json.loads(path(entry).read_text())


def _describe(p: Path) -> dict[str, Any]:
    rel = p.relative_to(RESULTS).as_posix()
    m = _DATE.search(p.name)
    entry: dict[str, Any] = {"file": rel, "benchmark": None, "gpu": None, "date": m.group(1) if m else None,
                             "commit": None, "command": None}  # fmt: skip
    if "H200" in p.name:
        entry["gpu"] = "NVIDIA H200"
    if p.suffix == ".json":
        doc = json.loads(p.read_text())
        env = doc.get("env", {})
        # "bench_transformers" names its benchmark after its module: the kind is the part after "bench_"
        kind = (doc.get("benchmark") or p.name).split()[0].removeprefix("bench_").split("_")[0]
        entry.update(benchmark=kind, gpu=env.get("gpu") or entry["gpu"],
                     commit=(env.get("git_commit") or "")[:12] or None, command=doc.get("command"))  # fmt: skip
        if entry["commit"] == "unknown":
            entry["commit"] = None
        for key in ("date_utc", "utc", "date"):
            if isinstance(env.get(key), str) and _DATE.search(env[key]):
                entry["date"] = _DATE.search(env[key]).group(1)
    else:
        # a run's console log beside its JSON is "attention-log": latest("attention") must find the JSON
        entry["benchmark"] = next((k for s, k in _KINDS if s in p.name), p.name.split("_")[0] + "-log")
    return entry


def add(p: Path, what: str | None = None) -> dict[str, Any]:
    """Adds (or refreshes) one file's entry and writes the index."""
    entries = {e["file"]: e for e in load()}
    new = _describe(Path(p).resolve())
    old = entries.get(new["file"], {})
    new["what"] = what or old.get("what")
    entries[new["file"]] = {**old, **{k: v for k, v in new.items() if v is not None or k not in old}}
    _write(entries.values())
    return entries[new["file"]]


def _write(entries) -> None:
    entries = sorted(entries, key=lambda e: (e.get("benchmark") or "", e.get("date") or "", e["file"]))
    INDEX.write_text(json.dumps({"files": entries}, indent=1) + "\n")


HAND = ("commit", "command", "what")  # fields a person may correct; a rebuild keeps them


def rebuild() -> None:
    old = {e["file"]: e for e in load()}
    entries = []
    for p in sorted(RESULTS.iterdir()):
        if p.name == INDEX.name or p.name.endswith(".tmp"):
            continue
        new = _describe(p)
        # what a file says about itself is re-read; what only a person could add is kept, and so is a commit or
        # command corrected by hand (a device copy's env names its git base, not the commit that ran)
        kept = old.get(new["file"], {})
        keep = {k: v for k, v in kept.items() if v is not None and (new.get(k) is None or k in HAND)}
        entries.append({**new, **keep})
    _write(entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if not args.list:
        rebuild()
    for e in load():
        print(f"{e.get('date') or '?':<10} {e.get('benchmark') or '?':<12} {e.get('commit') or '-':<12} {e['file']}")


if __name__ == "__main__":
    main()
