"""Helpers shared by the benchmarks: timing, ceilings, metrics, environment records, result files.

Nothing here touches CUDA at import time, so the benchmarks import on a CPU-only machine and fail later with a
clear message instead of a stack trace.

The method (see bench/NOTES.md and /work/shared/PERF.md): count FLOPs and bytes first; measure the two ceilings
(a bf16 matmul and a device-to-device copy) in the same run; check every kernel against a reference before timing
it; time with device events, warmed up, median of many runs, L2 flushed; put peers side by side in one process on
the same inputs and report ratios, since ratios survive machine-to-machine drift and absolute times do not.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# H200 (and H100) L2: data sets smaller than this get re-read from L2 and flatter bandwidth numbers
L2_BYTES = 50 * 2**20
# under this a kernel's time is mostly launch overhead; time CUDA-graph replays instead
GRAPH_BELOW_MS = 0.020

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def require_cuda(what: str = "this benchmark") -> None:
    """Exit with a readable message when there is no CUDA device (imports stay CPU-safe; running does not)."""
    if not torch.cuda.is_available():
        sys.stderr.write(
            f"{what} needs a CUDA GPU: torch {torch.__version__} sees none "
            f"(torch.version.cuda={torch.version.cuda}). Run it on the GPU machine.\n"
        )
        raise SystemExit(2)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _run(cmd: Sequence[str], timeout: float = 10.0) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except Exception:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit() -> str:
    # the launching command's word wins: the device machine's copy of the tree may carry a stale .git (a run on
    # 2026-11-29 reported 46bc337 while the work tree was four commits later)
    return os.environ.get("ATTN_GIT_COMMIT") or _run(["git", "rev-parse", "HEAD"]) or "unknown"


def git_dirty() -> bool | None:
    out = _run(["git", "status", "--porcelain"])
    return None if out is None else bool(out)


def command_line() -> str:
    """The command as typed, as far as it can be rebuilt: ``python -m pkg.mod args`` for a module run."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", *sys.argv[:1]]
    return " ".join([*head, *sys.argv[1:]])


def env_info() -> dict[str, Any]:
    """What a result file must carry so that a number can be traced to a machine, a build and a commit."""
    info: dict[str, Any] = {
        "date_utc": utc_now(),
        "command": command_line(),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "python": platform.python_version(),
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # the benchmark still records what it can
        info["triton"] = f"unavailable: {e}"
    with contextlib.suppress(Exception):
        info["cudnn"] = torch.backends.cudnn.version()
    if torch.cuda.is_available():
        dev = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(dev)
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = list(torch.cuda.get_device_capability(dev))
        info["gpu_memory_bytes"] = props.total_memory
        with contextlib.suppress(Exception):
            info["l2_bytes"] = props.L2_cache_size
        # read-only query: clocks and power state explain outliers between runs
        smi = _run(
            [
                "nvidia-smi",
                f"--id={dev}",
                "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu",
                "--format=csv,noheader",
            ]
        )
        if smi:
            info["nvidia_smi"] = smi
    return info


def sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "unknown"


def default_out_path(prefix: str) -> Path:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return RESULTS_DIR / f"{prefix}_{sanitize(gpu)}_{stamp}.json"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write atomically, so a run killed mid-write leaves the previous complete file, not half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _finite(x: Any) -> Any:
    # strict JSON has no NaN/Infinity; an infinite error (a kernel that wrote NaN) is kept as the string "inf"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def short_error(e: BaseException, limit: int = 400) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def tail_traceback(lines: int = 6) -> str:
    return "".join(traceback.format_exc().splitlines(keepends=True)[-lines:])


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# metrics


def tflops(flops: float, ms: float | None) -> float | None:
    return None if not ms else flops / (ms * 1e-3) / 1e12


def tbps(nbytes: float, ms: float | None) -> float | None:
    return None if not ms else nbytes / (ms * 1e-3) / 1e12


def floor_ms(flops: float, nbytes: float, ceilings: dict[str, float]) -> float | None:
    """The larger of the arithmetic time and the memory time at the measured ceilings: no kernel beats it by much."""
    mm, cp = ceilings.get("matmul_bf16_tflops"), ceilings.get("copy_tbps")
    if not mm or not cp:
        return None
    return max(flops / (mm * 1e12), nbytes / (cp * 1e12)) * 1e3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN or Inf anywhere gives inf, so a broken kernel can never pass."""
    out, ref = out.double(), ref.double()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def autotune_record(tuner, keys_before: set) -> dict[str, Any]:
    """The tile ``tuner`` (a Triton autotuner) chose for the call just made, and every candidate's median time
    (ms) when that call was the one that tuned (its key is new since ``keys_before``, a copy of
    ``set(tuner.cache)`` taken before the call). Two kernels compared in a benchmark may run different tiles; this
    says which, and what each would have cost on the same inputs."""
    out: dict[str, Any] = {}
    if getattr(tuner, "best_config", None) is not None:
        out["config"] = str(tuner.best_config)
    if any(k not in keys_before for k in tuner.cache) and getattr(tuner, "configs_timings", None):
        out["tuning_ms"] = {
            str(cfg): (t[0] if isinstance(t, (list, tuple)) else t) for cfg, t in tuner.configs_timings.items()
        }
    return out


def kernel_variant(src, name: str, edits):
    """A variant of a kernel module for the probes: ``src`` (an ``attn/fast/*.py`` path) with every occurrence of
    each ``old`` replaced by ``new``, written beside it as ``_probe_<name>.py`` (Triton's JIT reads kernel source
    from files) and imported. The file is rewritten only when its text changes, so processes that load the same
    variant at once (compile workers) do not race on it; the caller deletes the files when done.

    Raises:
        SystemExit: an edit's ``old`` text is no longer in the source.
    """
    import importlib
    from pathlib import Path

    src = Path(src)
    text = src.read_text()
    for old, new in edits:
        if old not in text:
            raise SystemExit(f"variant {name}: the kernel source changed, edit not found:\n{old}")
        text = text.replace(old, new)
    mod_name = "_probe_" + name.replace("+", "_")
    path = src.parent / f"{mod_name}.py"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return importlib.import_module(f"attn.fast.{mod_name}")


# timing


def bench_ms(fn: Callable[[], Any], warmup: float = 25, rep: float = 100) -> float:
    """Median of ``triton.testing.do_bench`` (device events; it zeroes a 256 MB buffer before each run to flush L2).

    ``warmup`` and ``rep`` are milliseconds of running, not counts.
    """
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_ms(fn: Callable[[], Any], calls_per_graph: int = 20, warmup: int = 3, reps: int = 50) -> float:
    """Median time of one call, from replays of a CUDA graph holding ``calls_per_graph`` calls.

    For launches under ~20 µs the CPU launch cost would otherwise dominate. No L2 flush happens between the calls
    inside a graph: pair this with :class:`Rotating` when one call's data fits in L2. ``fn`` must be capturable
    (no host syncs, no allocations that change between calls, no ``.item()``).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls_per_graph)
    del graph
    return float(statistics.median(times))


def host_us(fn: Callable[[], Any], calls: int = 200) -> float:
    """Host microseconds per call with nothing waiting on the device: the launch cost a CUDA graph removes.

    When it exceeds the kernel's own time the GPU idles between calls and event timing measures the host.
    """
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def time_ms(
    fn: Callable[[], Any], warmup: float = 25, rep: float = 100, graph_below_ms: float | None = GRAPH_BELOW_MS
) -> tuple[float, str]:
    """Event-timed median; if that is under ``graph_below_ms`` retime with CUDA-graph replays.

    Returns ``(ms, method)``; method is ``"do_bench"`` or ``"cuda_graph"``. A kernel that cannot be captured keeps
    its do_bench time.
    """
    ms = bench_ms(fn, warmup, rep)
    if graph_below_ms is not None and ms < graph_below_ms:
        with contextlib.suppress(Exception):
            calls = max(1, min(1000, int(0.5 / max(ms, 1e-4))))  # about half a millisecond per replay
            return graph_ms(fn, calls_per_graph=calls), "cuda_graph"
    return ms, "do_bench"


def n_rotating_sets(bytes_per_set: int, l2_bytes: int = L2_BYTES, cap: int = 16) -> int:
    """How many input sets to cycle through so consecutive calls never find their data in L2 (1 if it cannot fit)."""
    if bytes_per_set >= l2_bytes:
        return 1
    return min(cap, 2 + math.ceil(2 * l2_bytes / max(bytes_per_set, 1)))


class Rotating:
    """Call ``fn(*sets[i])`` with ``i`` advancing on every call, so repeated timing does not measure the L2.

    Under graph capture the index advances at capture time, so a graph of ``k·len(sets)`` calls replays every set.
    """

    def __init__(self, fn: Callable[..., Any], sets: Sequence[Sequence[Any]]):
        self.fn, self.sets, self.i = fn, list(sets), 0

    def __call__(self) -> Any:
        args = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return self.fn(*args)


def peak_memory_bytes(fn: Callable[[], Any]) -> int:
    """Extra device memory one call needs at its peak (outputs and workspaces), over what was allocated before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


# ceilings


def measure_ceilings(warmup: float = 25, rep: float = 200) -> dict[str, Any]:
    """The two ceilings the metrics are fractions of, measured now on this device.

    matmul: bf16 8192³ through torch.matmul (cuBLAS), 2·n³ FLOPs. copy: 1 GiB device-to-device, counting bytes read
    plus bytes written. Random data: zeros can run measurably faster.
    """
    out: dict[str, Any] = {}
    try:
        n = 8192
        ms = _matmul_ms(n, warmup, rep)
        out["matmul_bf16_ms"] = ms
        out["matmul_bf16_tflops"] = tflops(2 * n**3, ms)
    except Exception as e:
        out["matmul_error"] = short_error(e)
    free_memory()
    try:
        nbytes = 2**30
        ms = _copy_ms(nbytes, warmup, rep)
        out["copy_1gib_ms"] = ms
        out["copy_tbps"] = tbps(2 * nbytes, ms)
    except Exception as e:
        out["copy_error"] = short_error(e)
    free_memory()
    return out


def _matmul_ms(n: int, warmup: float, rep: float) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return bench_ms(lambda: torch.matmul(a, b), warmup, rep)


def _copy_ms(nbytes: int, warmup: float, rep: float) -> float:
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return bench_ms(lambda: dst.copy_(src), warmup, rep)


# printing


def fmt(x: Any, spec: str = ".3g", none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return format(x, spec)
    return str(x)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(
        zip(cells, widths)))  # fmt: skip
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
