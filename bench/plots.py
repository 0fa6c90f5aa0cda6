"""The benchmark charts of the docs and the README, drawn from the result files that bench/results/index.json
lists (the latest prefill and decode runs on the GPU named, H200 by default).

    python -m bench.plots [--gpu H200] [--out docs/img/bench]

Writes, and prints the source file of each:

- ``roofline.png``: TFLOP/s against arithmetic intensity, every contender's prefill and decode points under the
  two measured ceilings (bf16 matmul, device copy) of the same run;
- ``prefill_ratio.png``: per prefill shape, each peer's time over ours (> 1: ours is faster);
- ``decode_bandwidth.png``: per decode shape, TB/s of K+V read by each contender against the copy ceiling.

Every chart names the GPU, the date and the commit of its run, and which call it timed: ``attn`` rows time the
default call a user makes (``attn.attention(...)``, ``attn.decode(...)``), event-timed; rows timed from
CUDA-graph replays or with a plan are labelled so.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench import index  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLORS = {"ours": "#3949ab", "cudnn": "#76b900", "flash": "#e65100", "flex": "#8e24aa", "varlen": "#00897b",
          "unfused": "#9e9e9e", "ours-p16": "#7986cb", "ours-p64": "#9fa8da"}  # fmt: skip
LABELS = {"ours": "attn (default call)", "cudnn": "cuDNN (SDPA)", "flash": "FlashAttention-2", "flex": "FlexAttention",
          "varlen": "FA2 varlen", "unfused": "attn unfused", "ours-p16": "attn, 16-token pages",
          "ours-p64": "attn, 64-token pages"}  # fmt: skip
DPI = 150


def _source(entry: dict) -> str:
    return (
        f"{entry.get('gpu') or '?'}, {entry.get('date') or '?'}, commit {entry.get('commit') or '?'} ({entry['file']})"
    )


def _ok(c: dict) -> bool:
    return c.get("status") == "ok" and c.get("ms")


def roofline(prefill: dict, decode: dict, pre_e: dict, dec_e: dict, out: Path) -> None:
    ceil = prefill["ceilings"]
    peak, bw = ceil["matmul_bf16_tflops"], ceil["copy_tbps"]
    fig, ax = plt.subplots(figsize=(9, 5.4))
    xs = [0.5, 5e4]
    knee = peak / bw
    ax.plot([xs[0], knee, xs[1]], [bw * xs[0], peak, peak], color="black", lw=1.5, label="measured ceilings")
    ax.annotate(f"bf16 matmul {peak:.0f} TFLOP/s", (knee * 1.3, peak * 1.08), fontsize=10)
    ax.annotate(f"copy {bw:.2f} TB/s", (8, bw * 8 * 1.5), fontsize=10, rotation=31)
    seen = set()
    for r in prefill["results"]:
        ai = r["flops"] / r["min_bytes"]
        for name, c in r["contenders"].items():
            if _ok(c) and name != "unfused":
                lab = LABELS.get(name, name) if name not in seen else None
                seen.add(name)
                ax.scatter(ai, r["flops"] / c["ms"] / 1e9, color=COLORS.get(name), marker="o", s=36, label=lab,
                           edgecolors="white", linewidths=0.5, zorder=3)  # fmt: skip
    for r in decode["results"]:
        m = re.search(r"H(\d+)/(\d+)", r["shape"])
        hq, hkv = (int(m.group(1)), int(m.group(2))) if m else (1, 1)
        ai = hq / hkv  # 4*Hq*D*L flops over 4*Hkv*D*L bytes of bf16 K and V
        for name, c in r["contenders"].items():
            if _ok(c) and not name.startswith("ours-"):
                lab = LABELS.get(name, name) if name not in seen else None
                seen.add(name)
                ax.scatter(ai, ai * c["tbps"], color=COLORS.get(name), marker="s", s=36, label=lab,
                           edgecolors="white", linewidths=0.5, zorder=3)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*xs)
    ax.set_ylim(1, peak * 2)
    ax.set_xlabel("arithmetic intensity (FLOP per byte of the minimal traffic)", fontsize=11)
    ax.set_ylabel("TFLOP/s", fontsize=11)
    ax.text(1.3, 1.6, "decode (squares)", fontsize=10)
    ax.text(300, 60, "prefill (circles)", fontsize=10)
    ax.set_title(f"Roofline, bf16. Prefill: {_source(pre_e)}\nDecode: {_source(dec_e)}", fontsize=9)
    ax.legend(fontsize=9, loc="upper left")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def prefill_ratio(prefill: dict, entry: dict, out: Path) -> None:
    peers = ["cudnn", "flash", "flex", "varlen"]
    rows = prefill["results"]
    fig, ax = plt.subplots(figsize=(9, 0.75 * len(rows) + 1.8))
    height = 0.8 / len(peers)
    for i, r in enumerate(rows):
        ours = r["contenders"]["ours"]
        for j, p in enumerate(peers):
            c = r["contenders"].get(p, {})
            if not (_ok(c) and _ok(ours)):
                continue
            ratio = c["ms"] / ours["ms"]
            y = i + (j - (len(peers) - 1) / 2) * height
            ax.barh(
                y, ratio, height=height * 0.9, color=COLORS[p], label=LABELS[p] if i == 0 or p == "varlen" else None
            )
            ax.text(ratio + 0.02, y, f"{ratio:.2f}", va="center", fontsize=8)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("peer time / attn time   (> 1: attn is faster)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4)
    ax.set_xlim(0, max(1.6, ax.get_xlim()[1]))
    ax.set_title(f"Prefill, bf16, attn's default call against each peer, event-timed\n{_source(entry)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def decode_bandwidth(decode: dict, entry: dict, out: Path) -> None:
    names = ["ours", "ours-p64", "ours-p16", "cudnn", "flash"]
    rows = decode["results"]
    bw = decode["ceilings"]["copy_tbps"]
    fig, ax = plt.subplots(figsize=(10, 5.2))
    width = 0.8 / len(names)
    for i, r in enumerate(rows):
        for j, n in enumerate(names):
            c = r["contenders"].get(n, {})
            if _ok(c):
                x = i + (j - (len(names) - 1) / 2) * width
                ax.bar(x, c["tbps"], width=width * 0.9, color=COLORS[n], label=LABELS[n] if i == 0 else None)
    ax.axhline(bw, color="black", lw=1.2, ls="--")
    ax.text(-0.45, bw * 1.02, f"device copy ceiling {bw:.2f} TB/s (a copy reads and writes; decode only reads)",
            ha="left", va="bottom", fontsize=9)  # fmt: skip
    ax.set_xticks(range(len(rows)), [r["shape"].replace(" ragged", "\nragged") for r in rows], fontsize=8)
    ax.set_ylabel("TB/s of K and V read", fontsize=10)
    ax.set_ylim(0, bw * 1.2)
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=5)
    ax.set_title(f"Decode, bf16 cache, one new token per sequence, event-timed default calls\n{_source(entry)}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="H200")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "bench"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pre_e = index.latest("attention", gpu=args.gpu)
    dec_e = index.latest("decode", gpu=args.gpu)
    prefill, decode = index.read(pre_e), index.read(dec_e)
    roofline(prefill, decode, pre_e, dec_e, out / "roofline.png")
    prefill_ratio(prefill, pre_e, out / "prefill_ratio.png")
    decode_bandwidth(decode, dec_e, out / "decode_bandwidth.png")
    for name in ("roofline.png", "prefill_ratio.png", "decode_bandwidth.png"):
        print(out / name)
    print(f"from {pre_e['file']} and {dec_e['file']}")


if __name__ == "__main__":
    main()
