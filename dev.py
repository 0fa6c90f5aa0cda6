#!/usr/bin/env python3
"""One entry point for the project's jobs; each sets up its own virtual environment first.

    python3 dev.py docs          build the site (executing every lesson) and serve it on 127.0.0.1:8000
    python3 dev.py docs --build  build only (what CI does), then check it in a headless browser
    python3 dev.py test          run the test suite (CPU: kernels run in Triton's interpreter)
    python3 dev.py lint          ruff

Needs only Python >= 3.10. On a machine without a CUDA torch, the environment pins the CPU builds this
project is tested with (torch 2.13.0, triton 3.6.0). On a machine whose Python already has a CUDA torch,
the environment sees it (system site packages) and installs neither torch nor triton.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("ATTN_VENV", ROOT / ".venv"))
# numpy < 2.4: Triton 3.6's interpreter turns loaded scalars into Python ints with int(array([x])), which
# numpy 2.4 made an error (it was a deprecation warning since 1.25)
CPU_PINS = ["torch==2.13.0", "triton==3.6.0", "numpy<2.4"]


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def system_has_cuda_torch() -> bool:
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def setup(extras: str) -> Path:
    """Creates (or reuses) the environment and installs the project with the given extras."""
    gpu = system_has_cuda_torch()
    if not venv_python().exists():
        cmd = [sys.executable, "-m", "venv", VENV]
        if gpu:
            cmd.append("--system-site-packages")
        run(cmd)
    py = venv_python()
    # reinstall only when what decides the environment changed
    stamp_text = (ROOT / "pyproject.toml").read_text() + extras + str(gpu) + " ".join(CPU_PINS)
    stamp = VENV / f".attn-{extras}-{hashlib.sha256(stamp_text.encode()).hexdigest()[:16]}"
    if not stamp.exists():
        run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
        pins = [] if gpu else CPU_PINS
        run([py, "-m", "pip", "install", "--quiet", *pins, "-e", f".[{extras}]"])
        stamp.touch()
    return py


def cmd_test(argv: list[str]) -> None:
    py = setup("dev")
    run([py, "-m", "pytest", *argv])


def cmd_lint(argv: list[str]) -> None:
    py = setup("dev")
    run([py, "-m", "ruff", "check", ".", *argv])
    run([py, "-m", "ruff", "format", "--check", ".", *argv])


def cmd_docs(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="dev.py docs")
    parser.add_argument("--build", action="store_true", help="build and check only; do not serve")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    py = setup("docs")
    env = dict(os.environ)
    if not system_has_cuda_torch():
        # lessons run their kernels on the CPU through Triton's interpreter
        env.setdefault("TRITON_INTERPRET", "1")
    run([py, "-m", "mkdocs", "build", "--strict"], env=env)
    if args.build:
        run([py, "tools/check_site.py", "site"], env=env)
        return
    print(f"serving the built site on http://127.0.0.1:{args.port}/ (Ctrl-C stops)", flush=True)
    run([py, "-m", "http.server", str(args.port), "--bind", "127.0.0.1", "--directory", "site"])


def main() -> None:
    jobs = {"test": cmd_test, "lint": cmd_lint, "docs": cmd_docs}
    if len(sys.argv) < 2 or sys.argv[1] not in jobs:
        print(__doc__)
        sys.exit(2)
    try:
        jobs[sys.argv[1]](sys.argv[2:])
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
