"""``attn-bench``: runs one of the GPU benchmarks of a source checkout, with a progress bar.

    attn-bench attention [--quick] [--only NAME] [--peers cudnn,flex] [--out FILE]
    attn-bench decode|context|features|inflight [their options]   (each benchmark's own --help)

The benchmarks live in the checkout's ``bench/`` folder, beside the result files and notes they feed; they
are not part of the installed package (they import the peers, cuDNN through SDPA, FlashAttention,
FlexAttention, and are meant to be read and changed with the code). So ``attn-bench`` works from an editable
install (``pip install -e .``), or from any directory whose ``bench/`` is a checkout's. Each benchmark prints
its table and writes its result file (``bench/results/…json`` unless ``--out``); ``attn-bench`` then adds
the file to ``bench/results/index.json``, which the docs' charts read.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

BENCHMARKS = {
    "attention": "prefill: ours against cuDNN, FlashAttention-2 and FlexAttention (TFLOP/s)",
    "decode": "decode over contiguous and paged caches against the peers (TB/s)",
    "context": "chunked context: packed queries over a KV cache",
    "features": "what each feature costs (biases, windows, quantized caches) against plain",
    "inflight": "one mixed inflight step in one call against separate prefill and decode calls",
}


def _checkout() -> Path | None:
    """The source checkout that holds bench/: the one attn was installed from (editable), or the cwd."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "bench" / "common.py").is_file():
            return root
    return None


class _Progress:
    """One status line on stderr, redrawn as each shape finishes (the benchmark's own output goes to stdout)."""

    def __init__(self, name: str):
        self.name, self.done, self.start = name, 0, time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, shape) -> None:
        self.done += 1
        label = getattr(shape, "name", str(shape))
        elapsed = time.monotonic() - self.start
        line = f"[attn-bench {self.name}] {self.done} shape(s) done, last {label}, {elapsed:.0f} s"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(__doc__)
        for name, what in BENCHMARKS.items():
            print(f"  {name:<10} {what}")
        return 2
    root = _checkout()
    if root is None:
        hint = "clone the repository, pip install -e . there, then: attn-bench attention --quick"
        print(f"attn-bench: no bench/ folder; the benchmarks ship with the source checkout: {hint}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    name = argv.pop(0)
    import attn.fast  # noqa: F401  (before triton, whatever the machine)

    module = importlib.import_module(f"bench.bench_{name}")
    results = root / "bench" / "results"
    before = {p: p.stat().st_mtime for p in results.glob("*.json")} if results.is_dir() else {}
    progress = _Progress(name)
    run_shape = getattr(module, "run_shape", None)
    if run_shape is not None:

        def counted(shape, *args, **kwargs):
            try:
                return run_shape(shape, *args, **kwargs)
            finally:
                progress.step(shape)

        module.run_shape = counted
    sys.argv = [f"attn-bench {name}", *argv]
    try:
        rc = module.main()
    finally:
        progress.close()
    written = [p for p in results.glob("*.json") if before.get(p) != p.stat().st_mtime] if results.is_dir() else []
    if written:
        from bench import index

        for path in written:
            index.add(path, what=BENCHMARKS[name])
            print(f"indexed {path.relative_to(root)} in bench/results/index.json")
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
