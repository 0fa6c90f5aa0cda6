#!/usr/bin/env python3
"""One entry point for the project's jobs; each sets up its own virtual environment first.

    python3 dev.py docs          build the site (executing every lesson) and serve it on 127.0.0.1:8000
    python3 dev.py docs --build  build only (what CI does), then check it in a headless browser
    python3 dev.py test          run the test suite (CPU: kernels run in Triton's interpreter)
    python3 dev.py lint          ruff

Needs only Python >= 3.10. Each job installs the project with only its own extra into an environment of its
own: `.venv` (extra `dev`: test, lint) and `.venv-docs` (extra `docs`), so the docs build never leans on
something only the test extra brings. ATTN_VENV=DIR puts the job's environment in DIR instead.

On a machine without a CUDA torch, the environment pins the CPU builds this project is tested with (torch
2.13.0, triton 3.6.0). On a machine whose Python already has a CUDA torch, the environment sees it (system
site packages) and never replaces it: a torch older than the package supports stops the set-up instead.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENVS = {"dev": ROOT / ".venv", "docs": ROOT / ".venv-docs"}
# the exact CPU builds the suite and the lessons are checked with (numpy < 2.4 comes from the package itself)
CPU_PINS = ["torch==2.13.0", "triton==3.6.0"]
# the oldest torch the package supports (pyproject.toml: torch>=2.8, triton>=3.4)
MIN_TORCH = (2, 8)


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def system_cuda_torch() -> str | None:
    """The version of the CUDA torch that `python3` already has, or None."""
    probe = "import torch, sys; print(torch.__version__); sys.exit(0 if torch.cuda.is_available() else 1)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def venv_dir(extras: str) -> Path:
    return Path(os.environ["ATTN_VENV"]) if os.environ.get("ATTN_VENV") else VENVS[extras]


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def setup(extras: str) -> Path:
    """Creates (or reuses) the job's environment and installs the project with the given extra."""
    cuda_torch = system_cuda_torch()
    gpu = cuda_torch is not None
    if gpu and tuple(int(x) for x in cuda_torch.split("+")[0].split(".")[:2]) < MIN_TORCH:
        # installing would make pip fetch a newer torch into the environment, shadowing the machine's CUDA build
        sys.exit(f"this machine's CUDA torch is {cuda_torch}; attn needs torch >= {'.'.join(map(str, MIN_TORCH))}")
    venv = venv_dir(extras)
    if not venv_python(venv).exists():
        cmd = [sys.executable, "-m", "venv", venv]
        if gpu:
            cmd.append("--system-site-packages")
        run(cmd)
    py = venv_python(venv)
    # reinstall only when what decides the environment changed
    stamp_text = (ROOT / "pyproject.toml").read_text() + extras + str(gpu) + " ".join(CPU_PINS)
    stamp = venv / f".attn-{extras}-{hashlib.sha256(stamp_text.encode()).hexdigest()[:16]}"
    if not stamp.exists():
        # setuptools' build backend explains editable installs in a boxed warning on every install; the filter
        # (by message, so that no module is imported to resolve a category) reaches the backend's process too
        quiet = dict(os.environ, PYTHONWARNINGS="ignore:Editable installation")
        run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], env=quiet)
        pins = [] if gpu else CPU_PINS
        run([py, "-m", "pip", "install", "--quiet", *pins, "-e", f".[{extras}]"], env=quiet)
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
    # Material's banner about MkDocs 2 is advice to the theme's users, printed on every build
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    if system_cuda_torch() is None:
        # lessons run their kernels on the CPU through Triton's interpreter
        env.setdefault("TRITON_INTERPRET", "1")
    run([py, "-m", "mkdocs", "build", "--strict"], env=env)
    if args.build:
        # screenshots of every page go to site-check/, to look at when a figure check fails
        run([py, "tools/check_site.py", "site", "--shots", "site-check"], env=env)
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
