"""Context-phase (prefill) attention: our fused Triton kernel beside its peers, same process, same inputs.

    python -m bench.bench_attention                  # the PERF.md shapes, all contenders
    python -m bench.bench_attention --quick          # two small shapes, a smoke run
    python -m bench.bench_attention --only S16384 --only gqa --out bench/results/x.json
    python -m bench.bench_attention --sweep 36 --peers cudnn,flash  # 36 shapes drawn from the untuned space

Contenders, each checked against the fp32 reference before it is timed (a wrong one is reported, not timed):
  ours       attn.fast.attention on [B, S, H, D] (or packed [T, H, D] + cu_seqlens)
  cudnn      SDPA pinned to SDPBackend.CUDNN_ATTENTION, on contiguous [B, H, S, D] copies made before timing
  flash      SDPA pinned to SDPBackend.FLASH_ATTENTION (FlashAttention-2)
  efficient  SDPA pinned to SDPBackend.EFFICIENT_ATTENTION (xFormers/cutlass memory-efficient kernel)
  flex       torch.compile(flex_attention), block mask built outside timing
  varlen     torch.nn.attention.varlen.varlen_attn (packed shape only)
  unfused    attn.fast.attention_unfused (three Triton kernels): materializes Q·Kᵀ; run only where it fits
For the packed batch, cudnn/flash/efficient loop over the sequences (one SDPA call each) and flex uses a
document mask over the packed tokens. Speedup printed beside each peer is peer_ms / our_ms (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from bench import common

DEVICE = "cuda"  # a constant so a CPU dry run of the plumbing can swap it

# T = 16532 with every length in 256..4096, as in PERF.md's packed row; the order mixes long and short on purpose
VARLEN_LENGTHS = (1024, 4096, 256, 2804, 1536, 4000, 768, 2048)


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads_q: int
    heads_kv: int
    seqlen: int  # padded: Sq = Sk = seqlen; packed: the longest sequence
    head_dim: int
    causal: bool
    lengths: tuple[int, ...] | None = None  # set for the packed (varlen) layout

    @property
    def packed(self) -> bool:
        return self.lengths is not None

    @property
    def gqa(self) -> bool:
        return self.heads_kv != self.heads_q

    def flops(self) -> float:
        # 4·Hq·Sq·Sk·D per sequence (two matmuls), halved for causal by convention; query heads, so GQA saves none
        lens = self.lengths if self.packed else (self.seqlen,) * self.batch
        f = sum(4.0 * self.heads_q * n * n * self.head_dim for n in lens)
        return f / 2 if self.causal else f

    def min_bytes(self, elem: int = 2) -> float:
        # Q, K, V read once and O written once: the memory floor, far below the arithmetic one for prefill
        tokens = sum(self.lengths) if self.packed else self.batch * self.seqlen
        return float(tokens * self.head_dim * elem * (2 * self.heads_q + 2 * self.heads_kv))


def _heads(hq, hkv):
    return f"H{hq}" if hq == hkv else f"H{hq}/{hkv}"


def _padded(b, hq, hkv, s, d, causal, tag=""):
    name = f"B{b} {_heads(hq, hkv)} S{s} D{d} {'causal' if causal else 'full'}{tag}"
    return Shape(name, b, hq, hkv, s, d, causal)


def _packed(lengths, h, d, causal, hkv=None):
    hkv = h if hkv is None else hkv
    name = f"packed{len(lengths)} {_heads(h, hkv)} T{sum(lengths)} D{d} {'causal' if causal else 'full'} varlen"
    return Shape(name, len(lengths), h, hkv, max(lengths), d, causal, tuple(lengths))


SHAPES = [
    _padded(16, 32, 32, 1024, 128, True),
    _padded(4, 32, 32, 4096, 128, True),
    _padded(4, 32, 32, 4096, 128, False),
    _padded(1, 32, 32, 16384, 128, True),
    _padded(4, 32, 8, 4096, 128, True, " gqa"),
    _padded(8, 32, 32, 4096, 64, True),
    _packed(VARLEN_LENGTHS, 32, 128, False),
]
QUICK_SHAPES = [
    _padded(2, 16, 4, 1024, 128, True, " gqa"),
    _packed((200, 1000, 333, 512), 16, 64, False),
]
COLUMNS = ["ours", "cudnn", "flash", "efficient", "flex", "varlen", "unfused"]

# ``--sweep``: issue 17's space, which no kernel configuration was tuned on. Padded shapes at 8k-64k tokens a batch
SWEEP_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32)
SWEEP_HEAD_DIMS = (64, 128, 256)
SWEEP_GQA = (1, 4, 8)  # query heads per KV head
SWEEP_TOKENS = (8192, 65536)


def sweep_shapes(n: int, seed: int = 0) -> list[Shape]:
    """``n`` shapes drawn at random (``seed`` fixes the draw) from the sweep space: S 512-16k, batch 1-32 at
    SWEEP_TOKENS tokens a batch, D 64/128/256 (32 query heads; 16 at D256), GQA 1/4/8, causal or full. Every
    fourth is a packed batch of ragged lengths (1 to 8192 tokens, about 16k in all, the first of length 1).
    Drawing instead of crossing keeps a run to a few minutes; a different seed draws other shapes."""
    import random

    rng = random.Random(seed)
    shapes: list[Shape] = []
    while len(shapes) < n:
        d, group, causal = rng.choice(SWEEP_HEAD_DIMS), rng.choice(SWEEP_GQA), rng.random() < 0.5
        hq = 16 if d == 256 else 32
        hkv = hq // group
        tag = " gqa" if group > 1 else ""
        if len(shapes) % 4 == 3:
            lengths = [1]
            while sum(lengths) < 16384:
                lengths.append(rng.randint(1, 8192))
            shapes.append(_packed(lengths, hq, d, causal, hkv))
            continue
        s = rng.choice(SWEEP_SEQLENS)
        b = rng.choice([b for b in SWEEP_BATCHES if SWEEP_TOKENS[0] <= b * s <= SWEEP_TOKENS[1]])
        shape = _padded(b, hq, hkv, s, d, causal, tag)
        if shape.name not in {x.name for x in shapes}:
            shapes.append(shape)
    return shapes


class Skip(Exception):
    """A contender that does not apply to a shape (reported as skipped, not as an error)."""


class NoFallback(Exception):
    """A fallback builder with nothing different to offer for this shape: report the earlier failure as is."""


@dataclass
class Contender:
    fn: Callable[[], Any]
    to_ours: Callable[[Any], torch.Tensor] = lambda o: o  # output in our layout, for the check only
    context: Callable[[], Any] = contextlib.nullcontext  # entered around the check, memory probe and timing
    note: str = ""


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)  # per-peer layouts, built once per shape outside timing


def make_inputs(shape: Shape, dtype=torch.bfloat16) -> Inputs:
    dev = DEVICE
    if shape.packed:
        t = sum(shape.lengths)
        q = torch.randn(t, shape.heads_q, shape.head_dim, device=dev, dtype=dtype)
        k = torch.randn(t, shape.heads_kv, shape.head_dim, device=dev, dtype=dtype)
        v = torch.randn(t, shape.heads_kv, shape.head_dim, device=dev, dtype=dtype)
        cu = torch.tensor([0, *torch.tensor(shape.lengths).cumsum(0).tolist()], device=dev, dtype=torch.int32)
        return Inputs(q, k, v, cu)
    b, s = shape.batch, shape.seqlen
    q = torch.randn(b, s, shape.heads_q, shape.head_dim, device=dev, dtype=dtype)
    k = torch.randn(b, s, shape.heads_kv, shape.head_dim, device=dev, dtype=dtype)
    v = torch.randn(b, s, shape.heads_kv, shape.head_dim, device=dev, dtype=dtype)
    return Inputs(q, k, v)


def make_check(shape: Shape, x: Inputs, rows: int) -> Callable[[torch.Tensor], float]:
    """A function from a contender's output (our layout) to its relative error against the fp32 reference.

    Padded shapes are checked on a subset, to stay fast and small at S = 16384: the first and the last ``rows``
    query rows of the first and last batch element, all heads. Both subsets are exact sub-problems: with
    bottom-right causal alignment the last rows see every key, and the first rows see only the first ``rows`` keys.
    The packed batch is checked whole (the reference loops over its sequences).
    """
    import attn.reference as reference

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be true fp32
    if shape.packed:
        cu, m = x.cu_seqlens, shape.seqlen
        ref = reference.attention(
            x.q.float(), x.k.float(), x.v.float(), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m,
            max_seqlen_k=m, causal=shape.causal,
        )  # fmt: skip

        def check(out):
            if tuple(out.shape) != tuple(x.q.shape):
                raise ValueError(f"output shape {tuple(out.shape)} != {tuple(x.q.shape)}")
            return common.rel_err(out, ref)

        return check

    s, r = shape.seqlen, min(rows, shape.seqlen)
    pieces = []  # (batch index, row slice, reference rows)
    for b in sorted({0, shape.batch - 1}):
        qb, kb, vb = (t[b : b + 1].float() for t in (x.q, x.k, x.v))
        keys = r if shape.causal else s
        pieces.append((b, slice(0, r), reference.attention(qb[:, :r], kb[:, :keys], vb[:, :keys], causal=shape.causal)))
        if r < s:
            pieces.append((b, slice(s - r, s), reference.attention(qb[:, s - r :], kb, vb, causal=shape.causal)))

    def check(out):
        if tuple(out.shape) != tuple(x.q.shape):
            raise ValueError(f"output shape {tuple(out.shape)} != {tuple(x.q.shape)}")
        if not bool(torch.isfinite(out).all()):
            return math.inf
        num = den = 0.0
        for b, rs, ref in pieces:
            got = out[b : b + 1, rs].double()
            num += (got - ref.double()).pow(2).sum().item()
            den += ref.double().pow(2).sum().item()
        return math.sqrt(num / den) if den > 0 else math.sqrt(num)

    return check


# contenders: each builder returns a Contender or raises (Skip for "does not apply")


def build_ours(shape: Shape, x: Inputs, args) -> Contender:
    import attn.fast as fast

    if shape.packed:
        cu, m = x.cu_seqlens, shape.seqlen
        return Contender(
            lambda: fast.attention(
                x.q, x.k, x.v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m, causal=shape.causal
            )
        )
    return Contender(lambda: fast.attention(x.q, x.k, x.v, causal=shape.causal))


def _bhsd(x: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the transposed copies are made once and shared by the SDPA and flex peers; the transpose is never timed
    if "bhsd" not in x.extras:
        x.extras["bhsd"] = tuple(t.transpose(1, 2).contiguous() for t in (x.q, x.k, x.v))
    return x.extras["bhsd"]


def _per_sequence_bhsd(shape: Shape, x: Inputs):
    if "seqs" not in x.extras:
        bounds = x.cu_seqlens.tolist()
        x.extras["seqs"] = [
            tuple(t[a:e].transpose(0, 1).unsqueeze(0).contiguous() for t in (x.q, x.k, x.v))
            for a, e in zip(bounds[:-1], bounds[1:])
        ]
    return x.extras["seqs"]


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]  # fmt: skip


def build_sdpa(backend_name: str, gqa_mode: str) -> Callable[[Shape, Inputs, Any], Contender]:
    """SDPA pinned to one backend. ``gqa_mode``: "native" (enable_gqa=True) or "repeat" (K/V heads repeated
    before timing, for a backend that refuses enable_gqa; that peer then reads more K/V bytes than ours)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def build(shape: Shape, x: Inputs, args) -> Contender:
        if gqa_mode == "repeat" and not shape.gqa:
            raise NoFallback
        backend = _sdpa_backend(backend_name)
        context = lambda: sdpa_kernel(backend)
        if shape.packed:
            if shape.gqa:
                raise Skip("packed GQA loop not implemented")
            seqs = _per_sequence_bhsd(shape, x)

            def loop():
                return [F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal) for q, k, v in seqs]

            to_ours = lambda outs: torch.cat([o[0].transpose(0, 1) for o in outs], dim=0)
            return Contender(loop, to_ours, context, f"one SDPA call per sequence ({len(seqs)} calls)")
        q, k, v = _bhsd(x)
        to_ours = lambda o: o.transpose(1, 2)
        if not shape.gqa:
            return Contender(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal), to_ours, context)
        if gqa_mode == "native":
            fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal, enable_gqa=True)
            return Contender(fn, to_ours, context, "enable_gqa=True")
        if gqa_mode != "repeat":
            raise ValueError(f"gqa_mode {gqa_mode!r}")
        group = shape.heads_q // shape.heads_kv
        kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        fn = lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=shape.causal)
        return Contender(fn, to_ours, context, "K/V repeat_interleave'd to Hq heads outside timing")

    return build


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # one compiled graph per shape and mask; the default limit (8) would silently fall back to eager
        knobs = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit")
        for knob in knobs:
            with contextlib.suppress(Exception):  # the names changed across torch releases
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(256, int(getattr(torch._dynamo.config, knob))))
        # dynamic=False: after a second shape dynamo would otherwise compile a slower shape-generic kernel
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def build_flex(shape: Shape, x: Inputs, args) -> Contender:
    from torch.nn.attention.flex_attention import create_block_mask

    flex = _compiled_flex()
    kw = {"enable_gqa": True} if shape.gqa else {}
    if shape.packed:
        t = x.q.shape[0]
        lens = torch.tensor(shape.lengths, device=DEVICE)
        doc = torch.repeat_interleave(torch.arange(len(shape.lengths), device=DEVICE), lens)
        causal = shape.causal

        def document(b, h, q_idx, kv_idx):
            same = doc[q_idx] == doc[kv_idx]
            return (same & (q_idx >= kv_idx)) if causal else same  # equal q/k lengths: both alignments agree

        mask = create_block_mask(document, None, None, t, t, device=DEVICE)
        q, k, v = (u.transpose(0, 1).unsqueeze(0).contiguous() for u in (x.q, x.k, x.v))
        fn = lambda: flex(q, k, v, block_mask=mask, **kw)
        return Contender(fn, lambda o: o[0].transpose(0, 1), note="document mask over the packed tokens")
    q, k, v = _bhsd(x)
    mask = None
    if shape.causal:
        offset = k.shape[2] - q.shape[2]  # bottom-right alignment, as ours

        def causal_mask(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx

        mask = create_block_mask(causal_mask, None, None, q.shape[2], k.shape[2], device=DEVICE)
    return Contender(lambda: flex(q, k, v, block_mask=mask, **kw), lambda o: o.transpose(1, 2))


def build_varlen(shape: Shape, x: Inputs, args) -> Contender:
    if not shape.packed:
        raise Skip("packed shapes only")
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as e:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn: {e}") from e
    params = inspect.signature(varlen_attn).parameters
    kw = {}
    if shape.causal:  # the signature moved between torch releases: is_causal early on, window_size=(-1, 0) later
        if "is_causal" in params:
            kw["is_causal"] = True
        elif "window_size" in params:
            kw["window_size"] = (-1, 0)
        else:
            raise RuntimeError("varlen_attn has neither is_causal nor window_size")
    if shape.gqa:
        if "enable_gqa" not in params:
            raise Skip("varlen_attn has no enable_gqa")
        kw["enable_gqa"] = True
    cu, m = x.cu_seqlens, shape.seqlen
    fn = lambda: varlen_attn(x.q, x.k, x.v, cu, cu, m, m, **kw)
    to_ours = lambda o: o[0] if isinstance(o, (tuple, list)) else o
    return Contender(fn, to_ours, note=f"varlen_attn{inspect.signature(varlen_attn)}"[:300])


def build_unfused(shape: Shape, x: Inputs, args) -> Contender:
    import attn.fast as fast

    score_bytes = shape.batch * shape.heads_q * shape.seqlen * shape.seqlen * 4
    if score_bytes > args.unfused_max_gib * 2**30:
        raise Skip(f"fp32 score tensor {score_bytes / 2**30:.1f} GiB > --unfused-max-gib {args.unfused_max_gib}")
    if shape.packed:
        cu, m = x.cu_seqlens, shape.seqlen
        fn = lambda: fast.attention_unfused(
            x.q, x.k, x.v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m, causal=shape.causal
        )
    else:
        fn = lambda: fast.attention_unfused(x.q, x.k, x.v, causal=shape.causal)
    return Contender(fn, note=f"materializes [B,Hq,Sq,Sk] fp32 scores ({score_bytes / 2**30:.2f} GiB each)")


def contenders() -> dict[str, list[Callable]]:
    """Column name -> builders to try in order (a later one is the fallback when the one before fails)."""
    return {
        "ours": [build_ours],
        "cudnn": [build_sdpa("cudnn", "native"), build_sdpa("cudnn", "repeat")],
        "flash": [build_sdpa("flash", "native"), build_sdpa("flash", "repeat")],
        "efficient": [build_sdpa("efficient", "native"), build_sdpa("efficient", "repeat")],
        "flex": [build_flex],
        "varlen": [build_varlen],
        "unfused": [build_unfused],
    }


def prepare(name: str, builders, shape: Shape, x: Inputs, check, args) -> tuple[Contender | None, dict]:
    """Build a contender, run it once, check it, measure its peak memory. Returns it only if it may be timed."""
    rec: dict[str, Any] = {"status": "error", "ms": None, "err": None, "peak_mem_bytes": None, "note": ""}
    failures = []
    for build in builders:
        try:
            c = build(shape, x, args)
        except Skip as e:
            rec.update(status="skipped", note=str(e))
            return None, rec
        except NoFallback:
            break
        except Exception as e:
            failures.append(common.short_error(e))
            continue
        try:
            with c.context():
                out = c.fn()
                torch.cuda.synchronize()
                err = check(c.to_ours(out))
            del out
        except Exception as e:
            failures.append(common.short_error(e))
            common.free_memory()
            continue
        rec["note"] = "; ".join(filter(None, [c.note, *(f"earlier attempt failed: {f}" for f in failures)]))
        rec["err"] = err
        if not err <= args.tol:  # also catches NaN
            rec["status"] = "wrong"
            return None, rec
        try:
            with c.context():
                rec["peak_mem_bytes"] = common.peak_memory_bytes(c.fn)
        except Exception as e:
            rec["note"] += f"; peak-memory probe failed: {common.short_error(e)}"
        rec["status"] = "ok"
        return c, rec
    rec["error"] = " | ".join(failures)
    return None, rec


def run_shape(shape: Shape, args, ceilings: dict) -> dict:
    flops, nbytes = shape.flops(), shape.min_bytes()
    result: dict[str, Any] = {
        "name": shape.name, "spec": asdict(shape), "dtype": args.dtype, "flops": flops, "min_bytes": nbytes,
        "floor_ms": common.floor_ms(flops, nbytes, ceilings), "contenders": {},
    }  # fmt: skip
    print(f"\n== {shape.name}   ({flops / 1e12:.3f} TFLOP, floor {common.fmt(result['floor_ms'])} ms)", flush=True)
    torch.manual_seed(args.seed)
    x = make_inputs(shape, getattr(torch, args.dtype))
    try:
        check = make_check(shape, x, args.check_rows)
    except Exception as e:
        result["error"] = f"reference check could not be built: {common.short_error(e)}"
        print("  " + result["error"], flush=True)
        return result
    common.free_memory()

    wanted = [n for n in COLUMNS if not args.peers or n == "ours" or n in args.peers]
    table = contenders()
    ready: dict[str, Contender] = {}
    for name in wanted:
        c, rec = prepare(name, table[name], shape, x, check, args)
        result["contenders"][name] = rec
        if c is not None:
            ready[name] = c
        else:
            print(f"  {name:<10} {rec['status']:<7} {rec.get('error') or rec['note']}"[:240], flush=True)

    # timed round-robin, repeated, so drift during the run shows as spread instead of as a difference
    times: dict[str, list[float]] = {n: [] for n in ready}
    for _ in range(args.repeat):
        for name, c in ready.items():
            try:
                with c.context():
                    ms, method = common.time_ms(c.fn, args.warmup, args.rep, graph_below_ms=common.GRAPH_BELOW_MS)
                times[name].append(ms)
                result["contenders"][name]["timing"] = method
            except Exception as e:
                rec = result["contenders"][name]
                rec["status"], rec["error"] = "error", f"timing failed: {common.short_error(e)}"
    for name, ts in times.items():
        rec = result["contenders"][name]
        if rec["status"] != "ok" or not ts:
            continue
        ms = statistics.median(ts)
        rec.update(
            ms=ms, ms_all=ts, spread=(max(ts) - min(ts)) / ms, tflops=common.tflops(flops, ms),
            tbps_min_bytes=common.tbps(nbytes, ms),
            frac_of_matmul_ceiling=_frac(common.tflops(flops, ms), ceilings.get("matmul_bf16_tflops")),
            frac_of_floor=_frac(result["floor_ms"], ms),
        )  # fmt: skip
    ours_ms = result["contenders"].get("ours", {}).get("ms")
    for name, rec in result["contenders"].items():
        rec["speedup_ours_vs_this"] = (rec["ms"] / ours_ms) if (ours_ms and rec.get("ms")) else None
        if rec.get("ms"):
            print(
                f"  {name:<10} ok      {rec['ms']:8.3f} ms  {rec['tflops']:6.1f} TFLOP/s  err {rec['err']:.1e}  "
                f"peak {common.fmt((rec['peak_mem_bytes'] or 0) / 2**20, '.0f')} MiB  "
                f"x{common.fmt(rec['speedup_ours_vs_this'], '.2f')}  {rec['note']}"[:240],
                flush=True,
            )
    del ready, x, check
    common.free_memory()
    return result


def _frac(a, b):
    return (a / b) if (a is not None and b) else None


def summary(results: list[dict], ceilings: dict) -> str:
    cols = [c for c in COLUMNS if any(c in r["contenders"] for r in results)]
    rows = []
    for r in results:
        row = [r["name"]]
        for c in cols:
            rec = r["contenders"].get(c)
            if rec is None:
                row.append("")
            elif rec.get("tflops") is not None:
                cell = f"{rec['tflops']:.0f}"
                if c != "ours" and rec.get("speedup_ours_vs_this"):
                    cell += f" ({rec['speedup_ours_vs_this']:.2f}x)"
                row.append(cell)
            else:
                row.append({"skipped": "-", "wrong": "WRONG", "error": "ERR"}.get(rec["status"], rec["status"]))
        rows.append(row)
    lines = [
        "TFLOP/s (peer_ms / our_ms in parentheses: > 1 means ours is faster); '-' skipped, ERR/WRONG see JSON",
        common.format_table(["shape", *cols], rows),
    ]
    # the unfused path's cost is memory as much as time: show it beside the fused kernel's
    mem_rows = []
    for r in results:
        u, o = r["contenders"].get("unfused"), r["contenders"].get("ours")
        if u and u.get("ms") and o:
            mem_rows.append([
                r["name"], common.fmt(o.get("ms"), ".3f"), common.fmt(u["ms"], ".3f"),
                common.fmt((o.get("peak_mem_bytes") or 0) / 2**20, ".0f"),
                common.fmt((u.get("peak_mem_bytes") or 0) / 2**20, ".0f"),
            ])  # fmt: skip
    if mem_rows:
        lines += ["", common.format_table(["shape", "fused ms", "unfused ms", "fused MiB", "unfused MiB"], mem_rows)]
    bad = [
        f"  {r['name']} / {c}: {rec['status']} {common.fmt(rec.get('err'), '.2e')} {rec.get('error', '')}"[:200]
        for r in results for c, rec in r["contenders"].items() if rec["status"] in ("wrong", "error")
    ]  # fmt: skip
    if bad:
        lines += ["", "problems:", *bad]
    lines.append(
        f"ceilings: matmul bf16 8192^3 {common.fmt(ceilings.get('matmul_bf16_tflops'), '.0f')} TFLOP/s, "
        f"copy 1 GiB {common.fmt(ceilings.get('copy_tbps'), '.2f')} TB/s"
    )
    return "\n".join(lines)


def sweep_summary(results: list[dict]) -> str:
    """The sweep in one line per peer: how our time compares with that peer's over the shapes both ran."""
    lines = ["sweep, peer_ms / our_ms over the shapes both ran (> 1: ours faster):"]
    peers = [c for c in COLUMNS[1:] if any(r["contenders"].get(c, {}).get("speedup_ours_vs_this") for r in results)]
    for peer in peers:
        ratios = sorted(r["contenders"][peer]["speedup_ours_vs_this"] for r in results
                        if r["contenders"].get(peer, {}).get("speedup_ours_vs_this"))  # fmt: skip
        lines.append(f"  {peer:<10} {len(ratios)} shapes: min {ratios[0]:.2f}  median {statistics.median(ratios):.2f}  "
                     f"max {ratios[-1]:.2f}  ours >= 1.0 on {sum(x >= 1.0 for x in ratios)}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two small shapes, a smoke run")
    p.add_argument("--sweep", type=int, default=0, metavar="N",
                   help="N shapes drawn (with --seed) from sweep_shapes' untuned space, not PERF.md's")  # fmt: skip
    p.add_argument("--out", help="result JSON (default bench/results/attention_<gpu>_<date>.json)")
    p.add_argument("--only", action="append", default=[], help="keep shapes whose name contains this (repeatable)")
    p.add_argument("--peers", default="", help=f"comma list of contenders besides ours (default all: {COLUMNS[1:]})")
    p.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=float, default=100, help="do_bench measuring time, ms")
    p.add_argument("--repeat", type=int, default=2, help="timed passes over the contenders (spread = noise)")
    p.add_argument("--tol", type=float, default=1e-2, help="largest relative error vs the fp32 reference")
    p.add_argument("--check-rows", type=int, default=256, help="query rows checked at each end of a padded sequence")
    p.add_argument("--unfused-max-gib", type=float, default=8.0, help="run unfused only if its score tensor fits")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the matmul and copy ceilings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="input dtype (the ceiling stays the bf16 matmul)")  # fmt: skip
    args = p.parse_args(argv)
    args.peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    unknown = [s for s in args.peers if s not in COLUMNS]
    if unknown:
        p.error(f"unknown peers {unknown}; choose from {COLUMNS[1:]}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    common.require_cuda("bench.bench_attention")
    shapes = QUICK_SHAPES if args.quick else sweep_shapes(args.sweep, args.seed) if args.sweep else SHAPES
    if args.only:
        shapes = [s for s in shapes if any(o.lower() in s.name.lower() for o in args.only)]
        if not shapes:
            print(f"no shape matches --only {args.only}", file=sys.stderr)
            return 2
    # attn before anything imports triton: on a CPU machine attn.fast must switch Triton to its interpreter first
    import attn

    out_path = args.out or common.default_out_path("attention")
    env = common.env_info()
    env["attn_version"] = getattr(attn, "__version__", "unknown")
    with contextlib.suppress(Exception):  # which SDPA backend an unpinned call would pick, in order
        from torch.nn.attention import SDPBackend

        names = {int(b): b.name for b in SDPBackend.__members__.values()}
        env["sdp_priority_order"] = [names.get(int(b), str(b)) for b in torch._C._get_sdp_priority_order()]
    print(f"{env.get('gpu')} ({env.get('sm_count')} SMs)  torch {env['torch']}  triton {env.get('triton')}  "
          f"cuda {env['cuda']}  commit {env['git_commit'][:12]}", flush=True)  # fmt: skip

    ceilings = {} if args.no_ceilings else common.measure_ceilings()
    print(f"ceilings: {ceilings}", flush=True)
    doc: dict[str, Any] = {
        "benchmark": "attention (context phase, forward)", "env": env, "command": env["command"],
        "args": vars(args), "ceilings": ceilings, "varlen_lengths": list(VARLEN_LENGTHS),
        "speedup_definition": "peer_ms / our_ms (> 1: ours faster)",
        "flops_definition": "4*Hq*Sq*Sk*D summed over sequences, halved for causal",
        "results": [],
    }  # fmt: skip
    for shape in shapes:
        t0 = time.perf_counter()
        try:
            res = run_shape(shape, args, ceilings)
        except Exception as e:  # e.g. out of memory building inputs: record it and go on
            res = {"name": shape.name, "error": common.short_error(e), "traceback": common.tail_traceback(),
                   "contenders": {}}  # fmt: skip
            print(f"  shape failed: {res['error']}", flush=True)
            common.free_memory()
        res["wall_s"] = round(time.perf_counter() - t0, 1)  # compile + autotune + checks + timing
        print(f"  ({res['wall_s']} s)", flush=True)
        doc["results"].append(res)
        common.write_json(out_path, doc)  # after every shape, so a crash keeps what was measured
    print("\n" + summary(doc["results"], ceilings))
    if args.sweep:
        print(sweep_summary(doc["results"]))
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
