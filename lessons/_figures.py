"""Drawing and bookkeeping helpers of the lessons, kept out of them so that a lesson reads as prose plus the
calls that matter.

A lesson imports it as ``import _figures``: ``python lessons/NN_topic.py`` puts ``lessons/`` on the path, and
the docs build does the same for the kernels that execute the lessons (tools/build_docs.py). Importing it sets
the figure style every lesson shares: the helpers draw figures at most ``MAX_WIDTH_IN`` inches wide at 100 dpi
with no text below ``MIN_FONT_PT`` (two-digit numbers in a cell one point less), so that a figure shown in the
site's column (about 950 px at a laptop's width) keeps its text at 10 px or more; tools/check_site.py fails the
build where a figure's text would render too small.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # bench.index (the results' index) lives in the checkout, beside the lessons, not in the package
    sys.path.append(str(ROOT))

MAX_WIDTH_IN = 9.6
MIN_FONT_PT = 8.5
COLORS = plt.get_cmap("tab10").colors

plt.rcParams.update({
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
})  # fmt: skip


def result(name: str) -> dict:
    """A benchmark result file, looked up in bench/results/index.json (which names GPU, date and commit)."""
    from bench import index

    return index.read(name)


def result_path(name: str) -> Path:
    """The path of a file (or folder) of bench/results named in its index."""
    from bench import index

    return index.path(name)


def latest_result(benchmark: str, gpu: str = "H200", tag: str | None = None) -> tuple[dict, dict]:
    """The index entry and the parsed file of the latest run of a benchmark on a GPU."""
    from bench import index

    entry = index.latest(benchmark, gpu=gpu, tag=tag)
    return entry, index.read(entry)


def paged_cache(cache, title: str, request_of: dict, names: str) -> None:
    """The pool of a paged cache as a row of blocks, and each sequence's block-table row with an arrow from each
    entry to the block it names.

    Checks, while drawing, that every slot a sequence's length covers holds exactly the token its block table
    says lives there (the lessons write the token's position into ``k[..., 0]`` and its request number into
    ``v[..., 0]``). A grey slot holds a finished sequence's stale token; a white one was never written.
    """
    bs, nb = cache.block_size, cache.allocator.num_blocks
    width = cache.max_blocks_per_seq
    step = bs + 0.6
    owner = {blk: (s, i) for s in cache.live for i, blk in enumerate(cache.blocks_of(s))}
    fig, ax = plt.subplots(figsize=(MAX_WIDTH_IN, 3.9))
    for blk in range(nb):
        x0 = blk * step
        s, i = owner.get(blk, (None, 0))
        fill = min(bs, cache.length(s) - i * bs) if s is not None else 0
        for j in range(bs):
            pos, req = int(cache.k[blk, j, 0, 0]), int(cache.v[blk, j, 0, 0])
            if j < fill:
                assert (req, pos) == (request_of[s], i * bs + j), (blk, j)
                face, ink = COLORS[req - 1], "white"
            else:
                face, ink = ("0.88", "0.45") if req else ("white", None)
            ax.add_patch(Rectangle((x0 + j, 0), 1, 1.3, facecolor=face, edgecolor="0.75", lw=0.5))
            if ink:
                # two digits in one slot: a size smaller, so that neighbours do not touch
                size = MIN_FONT_PT if pos < 10 else MIN_FONT_PT - 1
                ax.text(x0 + j + 0.5, 0.65, pos, ha="center", va="center", fontsize=size, color=ink)
        used = s is not None
        ax.add_patch(
            Rectangle((x0, 0), bs, 1.3, fill=False, lw=1.2, ec="black" if used else "0.6", ls="-" if used else "--")
        )
        ax.text(x0 + bs / 2, -0.4, f"block {blk}", ha="center", va="center", fontsize=MIN_FONT_PT)
    # two table rows above the pool and two below, side by side, so that no arrow crosses a table row
    places = [(0.0, 3.2), (0.52, 3.2), (0.0, -4.0), (0.52, -4.0)]
    cell = 2.4
    for s in range(cache.max_seqs):
        fx, y = places[s]
        x = fx * nb * step
        live = s in cache.live
        label = f"block_table[{s}]" + (f": {names[request_of[s] - 1]}, {cache.length(s)} tokens" if live else ": free")
        ax.text(x, y + 1.35 if y > 0 else y - 0.35, label, fontsize=9.5, va="center")
        blocks_s = cache.blocks_of(s) if live else []
        for c in range(width):
            in_use = c < len(blocks_s)
            color = COLORS[request_of[s] - 1] if in_use else "white"
            ax.add_patch(Rectangle((x + c * cell, y), cell, 1.0, facecolor=color, edgecolor="0.4", lw=0.8, alpha=0.85))
            entry = int(cache.block_table[s, c])
            ax.text(x + (c + 0.5) * cell, y + 0.5, entry if in_use else "·", ha="center", va="center", fontsize=10)
            if in_use:
                start = (x + (c + 0.5) * cell, y if y > 0 else y + 1.0)
                end = (entry * step + bs / 2, 1.35 if y > 0 else -0.7)
                ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", color=color, lw=1, alpha=0.7))
    free = cache.allocator.num_free
    tokens = sum(cache.length(s) for s in cache.live)
    ax.set_title(f"{title}\n{nb - free} blocks used, {free} free; {tokens} tokens in {(nb - free) * bs} slots")
    ax.set_xlim(-0.3, nb * step)
    ax.set_ylim(-4.8, 4.9)
    ax.axis("off")
    fig.tight_layout()
    plt.show()


def contiguous_cache(cache, title: str, request_of: dict, names: str) -> None:
    """The live sequences of ``cache`` as the rows of a contiguous cache of ``max_blocks_per_seq * block_size``
    slots each: what the same tokens would reserve without paging."""
    fig, ax = plt.subplots(figsize=(MAX_WIDTH_IN, 0.55 * len(cache.live) + 1.0))
    row_len = cache.max_blocks_per_seq * cache.block_size
    for r, s in enumerate(cache.live):
        n = cache.length(s)
        for t in range(row_len):
            face = COLORS[request_of[s] - 1] if t < n else "white"
            ax.add_patch(Rectangle((t, -r), 1, 0.9, facecolor=face, edgecolor="0.75", lw=0.5))
        ax.text(-0.5, -r + 0.45, f"row {r}: {names[request_of[s] - 1]}", ha="right", va="center", fontsize=9.5)
    ax.set_xlim(-4, row_len + 0.5)
    ax.set_ylim(-len(cache.live) + 0.8, 1)
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    plt.show()


def grouped_bars(rows: list[tuple[str, dict]], series: list[tuple[str, str]], *, ylabel: str, title: str,
                 ref: str | None = None, hline: tuple[float, str] | None = None) -> None:  # fmt: skip
    """One group of bars per row (``rows``: label and {series name: value}), one bar per series; over each bar
    of a series other than ``ref``, its ratio to ``ref``; an optional horizontal line (value, label)."""
    fig, ax = plt.subplots(figsize=(MAX_WIDTH_IN, 4.4))
    width = 0.8 / len(series)
    top = max(v for _, vals in rows for v in vals.values())
    for i, (name, label) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [vals[name] for _, vals in rows], width * 0.95, label=label, color=COLORS[i])
        if ref and name != ref:
            for x, (_, vals) in zip(xs, rows):
                ax.text(x, vals[name] + top * 0.01, f"{vals[name] / vals[ref]:.2f}", ha="center", va="bottom",
                        fontsize=MIN_FONT_PT, rotation=90)  # fmt: skip
    if hline:
        ax.axhline(hline[0], color="0.4", ls=":", lw=1, label=hline[1])
    ax.set_xticks(range(len(rows)), [label for label, _ in rows], fontsize=MIN_FONT_PT)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, top * 1.3)
    ax.set_title(title)
    ax.legend(ncols=len(series) + 1, loc="upper center", fontsize=MIN_FONT_PT)
    fig.tight_layout()
    plt.show()


# ---------------------------------------------------------------------------------------------------------------
# lessons 14-17


RESULTS = ROOT / "bench" / "results"


def load_timeline():
    """Lesson 14: the newest recorded timeline in bench/results/ and its file name, or (None, None)."""
    for path in sorted(RESULTS.glob("*timeline*.json"))[::-1]:
        data = json.loads(path.read_text())
        if data.get("events"):
            return data, path.name
    return None, None


def schematic_timeline(host_us=60.0, sync_us=8.0, kernel_us=60.0, plan_us=15.0, calls=4):
    """Made-up durations: a synchronizing call (its host work starts only after the previous kernel), then two
    asynchronous ones (host work overlaps the previous kernel): the default call and the cheaper plan.run."""
    events, t_host, t_gpu = [], 0.0, 0.0
    for _ in range(calls):  # validate=True: wait for the GPU, then prepare, then launch
        t_host = max(t_host, t_gpu)
        events.append({"track": "cpu", "name": "validate=True", "ts_us": t_host, "dur_us": host_us + sync_us})
        t_host += host_us + sync_us
        events.append({"track": "gpu", "name": "decode kernel", "ts_us": t_host, "dur_us": kernel_us})
        t_gpu = t_host + kernel_us
    for name, dur in (("default call", host_us), ("plan.run", plan_us)):
        t_host = t_gpu + 40
        for _ in range(calls):  # asynchronous: the host runs ahead; the GPU runs back to back
            events.append({"track": "cpu", "name": name, "ts_us": t_host, "dur_us": dur})
            t_host += dur
            start = max(t_host, t_gpu)
            events.append({"track": "gpu", "name": "decode kernel", "ts_us": start, "dur_us": kernel_us})
            t_gpu = start + kernel_us
    return {"events": events}


def timeline(events: list[dict], title: str, colors: dict) -> None:
    """Lesson 14: host, CUDA-runtime and GPU rows of a timeline (``events``: track, name, ts_us, dur_us); a
    name in ``colors`` gets its colour and a legend entry, other GPU events blue, other host events grey."""
    fig, ax = plt.subplots(figsize=(MAX_WIDTH_IN, 2.8))
    for e in events:
        row = {"cpu": 1, "runtime": 0.5, "gpu": 0}[e["track"]]
        color = colors.get(e["name"], "tab:blue" if e["track"] == "gpu" else "0.6")
        ax.broken_barh([(e["ts_us"], max(e["dur_us"], 0.5))], (row - 0.18, 0.36), color=color)
    ax.set_yticks([0, 0.5, 1], ["GPU kernels", "CUDA runtime", "host (Python)"])
    ax.set_xlabel("µs")
    ax.set_title(title, fontsize=MIN_FONT_PT + 0.5)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles=handles, labels=list(colors), loc="upper right", fontsize=MIN_FONT_PT)
    fig.tight_layout()
    plt.show()


def ring_steps(n: int) -> None:
    """Lesson 16: the ``n`` steps of ring attention, one panel per step; rank r holds the K/V shard that
    started on rank (r - s) mod n, coloured by that shard's origin, and passes it to rank r + 1."""
    import math

    fig, axes = plt.subplots(1, n, figsize=(MAX_WIDTH_IN, MAX_WIDTH_IN / n + 0.5))

    def at(r):
        a = math.pi / 2 - 2 * math.pi * r / n
        return math.cos(a), math.sin(a)

    for s, ax in enumerate(axes):
        for r in range(n):
            (x, y), src = at(r), (r - s) % n
            ax.add_patch(plt.Circle((x, y), 0.42, color=COLORS[src], alpha=0.85))
            ax.text(x, y + 0.1, f"rank {r}", ha="center", va="center", fontsize=MIN_FONT_PT, color="white",
                    weight="bold")  # fmt: skip
            ax.text(x, y - 0.16, f"K/V {src}", ha="center", va="center", fontsize=MIN_FONT_PT, color="white")
            if s < n - 1:
                x2, y2 = at(r + 1)
                head, tail = (0.62 * x2 + 0.38 * x, 0.62 * y2 + 0.38 * y), (0.62 * x + 0.38 * x2, 0.62 * y + 0.38 * y2)
                ax.annotate("", xy=head, xytext=tail, arrowprops=dict(arrowstyle="->", color="gray"))
        ax.set_xlim(-1.5, 1.5)
        ax.set_ylim(-1.5, 1.5)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(f"step {s}" + (": compute, send" if s < n - 1 else ": compute (last)"), fontsize=MIN_FONT_PT + 1)
    fig.suptitle(f"Ring attention, {n} ranks: each computes with the K/V shard it holds while passing it on")
    fig.tight_layout()
    plt.show()


def owner_map(plan):
    """The rank that computes each visible (query, key) pair of a causal mask over ``plan``'s one sequence: an
    [S, S] array, NaN where the mask hides the pair."""
    import numpy as np

    s = sum(len(plan.positions(r)) for r in range(plan.world_size))
    m = np.full((s, s), np.nan)
    for r in range(plan.world_size):
        for qpos in plan.positions(r).tolist():
            m[qpos, : qpos + 1] = r
    return m


def owner_maps(plans: list[tuple[str, object]], causal_work) -> None:
    """Lesson 16: for each (name, ShardPlan), which rank computes each visible (query, key) pair of a causal
    mask, and the work per rank (``causal_work(plan)``)."""
    from matplotlib.colors import ListedColormap

    n = plans[0][1].world_size
    fig, axes = plt.subplots(1, len(plans) + 1, figsize=(MAX_WIDTH_IN, 3.4))
    for ax, (name, plan) in zip(axes, plans):
        ax.imshow(owner_map(plan), cmap=ListedColormap(COLORS[:n]), vmin=-0.5, vmax=n - 0.5)
        ax.set_title(f"{name}: rank per (q, k)")
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    width = 0.8 / len(plans)
    for i, (name, plan) in enumerate(plans):
        axes[-1].bar([r + (i - (len(plans) - 1) / 2) * width for r in range(n)], causal_work(plan), width, label=name)
    axes[-1].set_xticks(range(n))
    axes[-1].set_xlabel("rank")
    axes[-1].set_ylabel("visible (q, k) pairs")
    axes[-1].legend(fontsize=MIN_FONT_PT)
    axes[-1].set_title("work per rank")
    fig.tight_layout()
    plt.show()


def scaling_curves(prefill: dict, decode: dict, source: str) -> None:
    """Lesson 16: predicted prefill speed-up and decode bandwidth efficiency against the number of GPUs
    (``prefill[n]["speedup"]``, ``decode[n]["efficiency"]``)."""
    fig, axes = plt.subplots(1, 2, figsize=(MAX_WIDTH_IN, 3.8))
    ns = sorted(prefill)
    axes[0].plot(ns, ns, "k--", label="ideal")
    axes[0].plot(ns, [prefill[n]["speedup"] for n in ns], "o-", label="ring attention (predicted)")
    axes[0].set_title("128k causal prefill, H32/8 D128 bf16")
    axes[0].set_xlabel("GPUs")
    axes[0].set_ylabel("speed-up over one GPU")
    if decode:
        nd = sorted(decode)
        axes[1].plot(nd, [100.0] * len(nd), "k--", label="ideal")
        axes[1].plot(nd, [100 * decode[n]["efficiency"] for n in nd], "o-", label="sharded decode (predicted)")
        axes[1].set_ylim(0, 110)
    axes[1].set_title("decode over a 1M-token context")
    axes[1].set_xlabel("GPUs")
    axes[1].set_ylabel("% of N × one GPU's bandwidth")
    for ax in axes:
        ax.set_xticks([1, 2, 4, 8])
        ax.legend(fontsize=MIN_FONT_PT)
    fig.suptitle(f"Predicted scaling ({source})", fontsize=MIN_FONT_PT + 1)
    fig.tight_layout()
    plt.show()


def schedule_gantt(schedules: list[tuple], busy) -> None:
    """Lesson 17: one panel per schedule (title, events (unit, op, start, duration), rows, row labels); ``busy``
    maps the events to (fraction of the span the tensor cores work, the span)."""
    colors = {"QK": "tab:blue", "PV": "tab:green", "softmax": "tab:orange"}
    span = max(max(s + d for _, _, s, d in ev) for _, ev, _, _ in schedules)
    heights = [len(rows) for _, _, rows, _ in schedules]
    fig, axes = plt.subplots(len(schedules), 1, figsize=(MAX_WIDTH_IN, 0.55 * sum(heights) + 1.6), sharex=True,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    for ax, (title, ev, rows, labels) in zip(axes, schedules):
        for who, name, s, d in ev:
            y = rows.index(who)
            ax.add_patch(Rectangle((s, y - 0.38), d, 0.76, color=colors.get(name, "0.6"), alpha=0.85, ec="white"))
            if name != "softmax":  # "softmax" does not fit its box at a legible size: the legend names it
                ax.text(s + d / 2, y, name, ha="center", va="center", fontsize=MIN_FONT_PT)
        frac, end = busy(ev)
        ax.set_yticks(range(len(rows)), [labels.get(r, "producer (TMA)" if r == "load" else r) for r in rows])
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.invert_yaxis()
        ax.set_title(f"{title}\ndone at t = {end:.1f}, tensor cores busy {frac:.0%} of the time",
                     fontsize=MIN_FONT_PT + 1)  # fmt: skip
    axes[-1].set_xlim(0, span + 0.3)
    axes[-1].set_xlabel("time (model units)")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    axes[-1].legend(handles, ["Q·Kᵀ", "P·V", "softmax"], loc="lower right", fontsize=MIN_FONT_PT)
    fig.tight_layout()
    plt.show()
