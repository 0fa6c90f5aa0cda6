"""Side-by-side table of selected Nsight Compute metrics from ``ncu --import REP --page raw --csv`` dumps.

    python bench/probes/ncu_summary.py a.csv b.csv ...      # bench/probes/ncu_profile.sh calls it

Each CSV holds one row per profiled kernel; the longest kernel of each file is the one shown (a case's
range may also hold small helper kernels). Metrics are picked by name pattern, so the table shows whatever
this ncu version calls its tensor-pipe, issue, stall and throughput counters.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

PATTERNS = [
    r"^gpu__time_duration\.sum$",
    r"^launch__(registers_per_thread|shared_mem_per_block_dynamic|grid_size|block_size|occupancy_limit_\w+)$",
    r"^sm__throughput\.avg\.pct_of_peak_sustained_elapsed$",
    r"^dram__throughput\.avg\.pct_of_peak_sustained_elapsed$",
    r"^dram__bytes_read\.sum$",
    r"^l1tex__throughput\.avg\.pct_of_peak_sustained_active$",
    r"^lts__throughput\.avg\.pct_of_peak_sustained_elapsed$",
    r"^sm__warps_active\.avg\.pct_of_peak_sustained_active$",
    r"^smsp__issue_active\.avg\.pct_of_peak_sustained_active$",
    r"^sm__pipe_\w+_cycles_active\.avg\.pct_of_peak_sustained_active$",
    r"^sm__inst_executed_pipe_\w+\.avg\.pct_of_peak_sustained_active$",
    r"^smsp__average_warps_issue_stalled_\w+_per_issue_active\.ratio$",
    r"^smsp__inst_executed\.sum$",
    r"^sm__cycles_elapsed\.avg$",
]


def number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


# ncu picks each file's unit per metric by magnitude (one kernel's time in us, another's in ms), so cells are
# converted to one unit per row before they sit side by side
SCALE = {
    "ns": ("us", 1e-3), "us": ("us", 1.0), "ms": ("us", 1e3), "s": ("us", 1e6),
    "byte": ("MB", 1e-6), "Kbyte": ("MB", 1e-3), "Mbyte": ("MB", 1.0), "Gbyte": ("MB", 1e3),
}  # fmt: skip


def load(path: Path) -> dict[str, tuple[str, str]]:
    with path.open() as f:
        rows = list(csv.reader(f))
    # ncu may print ==PROF== lines before the table
    start = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
    header, units, data = rows[start], rows[start + 1], rows[start + 2 :]
    t = header.index("gpu__time_duration.sum")
    row = max(data, key=lambda r: number(r[t]) or 0.0)
    name = row[header.index("Kernel Name")] if "Kernel Name" in header else "?"
    out = {"kernel": (name[:60], "")}
    for h, u, v in zip(header, units, row):
        if any(re.match(p, h) for p in PATTERNS):
            x = number(v)
            if u in SCALE and x is not None:
                u, factor = SCALE[u]
                v = f"{x * factor:.6f}"
            out[h] = (v, u)
    return out


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]]
    tables = [load(p) for p in paths]
    keys = list(dict.fromkeys(k for t in tables for k in t))
    # stall reasons and pipes that are zero in every column say nothing
    keys = [k for k in keys if any(number(t.get(k, ("0", ""))[0]) != 0 for t in tables)]
    width = max(len(k) for k in keys)
    print(" " * width + "  " + "  ".join(f"{p.stem:>22}" for p in paths))
    for k in keys:
        unit = next((t[k][1] for t in tables if k in t), "")
        cells = "  ".join(f"{t.get(k, ('-', ''))[0][:22]:>22}" for t in tables)
        print(f"{k:<{width}}  {cells}  {unit}")


if __name__ == "__main__":
    main()
