"""Checks that pyproject.toml's dependency bounds can be met on every supported torch, without replacing it.

    python tools/check_deps.py                  # resolver matrix: each supported torch x (no extra, each extra)
    python tools/check_deps.py --env PYTHON     # also: installing into PYTHON's environment changes no torch

The matrix resolves metadata only (no wheel is downloaded): ``uv pip compile`` of the project with each extra
on its own, for Linux x86-64 and CPython 3.11, with the torch pinned. A combination passes when it resolves,
keeps that torch and gets numpy < 2.4 (Triton's CPU interpreter needs it). uv is installed into a throw-away
environment from PyPI when it is not on PATH.

``--env`` asks pip itself (``pip install --dry-run --report``) what installing the checkout into an existing
environment would do: it must install nothing named torch, triton or nvidia-*.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
# every torch the bounds claim, with the triton it pins on Linux (torch's own metadata decides; printed below)
SUPPORTED_TORCH = ["2.8.0", "2.9.1", "2.10.0", "2.11.0", "2.12.0", "2.13.0"]
# torch 2.7 pins triton 3.3, below our triton>=3.4: the resolver must refuse it rather than upgrade torch
UNSUPPORTED_TORCH = ["2.7.1"]


def _uv(tmp: Path) -> str:
    exe = shutil.which("uv")
    if exe:
        return exe
    venv = tmp / "uv-env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "uv"], check=True)
    return str(venv / "bin/uv")


def _resolve(uv: str, tmp: Path, torch: str, extra: str | None) -> tuple[bool, dict[str, str], str]:
    constraints = tmp / "constraints.txt"
    constraints.write_text(f"torch=={torch}\n")
    cmd = [uv, "pip", "compile", str(ROOT / "pyproject.toml"), "-c", str(constraints), "--quiet", "--no-header",
           "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28",
           "--index-url", "https://pypi.org/simple", "--no-build"]  # fmt: skip
    if extra:
        cmd += ["--extra", extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    pins = {}
    for line in done.stdout.splitlines():
        if "==" in line and not line.startswith(" "):
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.split()[0].split(";")[0]
    return done.returncode == 0, pins, done.stderr.strip()


def _numpy_ok(version: str) -> bool:
    major, minor = (int(x) for x in version.split(".")[:2])
    return (major, minor) < (2, 4)


def matrix() -> list[str]:
    extras = [None, *tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]]
    failures = []
    with tempfile.TemporaryDirectory(prefix="attn-deps-") as tmp:
        tmp = Path(tmp)
        uv = _uv(tmp)
        for torch in SUPPORTED_TORCH:
            for extra in extras:
                ok, pins, err = _resolve(uv, tmp, torch, extra)
                what = f"torch {torch}, extra {extra or '(none)'}"
                if not ok:
                    failures.append(f"{what}: does not resolve: {err[-400:]}")
                elif pins.get("torch") != torch:
                    failures.append(f"{what}: resolves torch {pins.get('torch')}")
                elif not _numpy_ok(pins.get("numpy", "0.0")):
                    failures.append(f"{what}: resolves numpy {pins['numpy']}")
                else:
                    print(f"  ok   {what}: triton {pins.get('triton')}, numpy {pins.get('numpy')}", flush=True)
        for torch in UNSUPPORTED_TORCH:
            ok, pins, _ = _resolve(uv, tmp, torch, None)
            if ok:
                failures.append(f"torch {torch} is unsupported but resolves (triton {pins.get('triton')})")
            else:
                print(f"  ok   torch {torch}: refused, as it should be", flush=True)
    return failures


def into_env(python: str) -> list[str]:
    done = subprocess.run(
        [python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "-e", str(ROOT)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        return [f"pip install --dry-run into {python} failed: {done.stderr[-400:]}"]
    names = [item["metadata"]["name"].lower() for item in json.loads(done.stdout)["install"]]
    bad = [n for n in names if n in ("torch", "triton") or n.startswith("nvidia-")]
    print(f"  ok   pip into {python} would install: {', '.join(names)}" if not bad else "", flush=True)
    return [f"installing into {python} would replace: {', '.join(bad)}"] if bad else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", help="a Python whose environment already has torch")
    parser.add_argument("--no-matrix", action="store_true", help="only the --env check")
    args = parser.parse_args()
    failures = [] if args.no_matrix else matrix()
    if args.env:
        failures += into_env(args.env)
    for f in failures:
        print(f"  FAIL {f}")
    print("FAIL" if failures else "PASS: dependency bounds")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
