"""Context-parallel attention: what one GPU can measure, a predicted scaling curve, and the multi-GPU run.

    python -m bench.bench_distributed --out $OUT                        # one GPU (world size 1), < 3 min on an H100
    torchrun --nproc-per-node 8 -m bench.bench_distributed --out $OUT   # N GPUs of one host (issue 21)
    python -m bench.bench_distributed --smoke --out /tmp/x              # CPU, gloo, interpreter, tiny shapes

One GPU (world size 1, a single-rank NCCL group):
  parity     ring attention at world size 1 and a simulated 4-rank zigzag ring (every rank's steps run in this
             process) against the plain kernel and the fp32 reference, bf16
  e2e        128k-token causal prefill, H32/8, D128, bf16: attn.attention, ring_attention (world 1), PyTorch's
             context_parallel (ring attention over SDPA; K/V expanded to 32 heads, since its ring ops take no
             GQA), and plain SDPA flash on the same expanded K/V
  overlap    one K/V shard sent around a single-rank ring (NCCL send/recv to itself, issued by the ring's
             side-stream machinery) against one ring step's compute: alone and together. If NCCL refuses the
             self-send, a side-stream device copy of the same bytes stands in, and the result says so
  steps      every (rank, step) compute time of the 128k prefill split into 2/4/8 zigzag shards (4 contiguous
             shards too, for the imbalance zigzag removes), each step as ring_attention runs it (packed calls +
             LSE merges), on the real shard sizes
  decode     one decode step over a 1M-token context (B1, H32/8, D128, bf16): the whole cache, one rank's
             1/N shard for N = 2/4/8, the merge of N partials, a single-rank all-gather
  model      attn.distributed.cost_model's prediction at 1/2/4/8 GPUs from those times, with its assumptions

N GPUs (torchrun): parity of ring attention and sharded decode against each rank's own single-GPU result; the
128k prefill with our ring and PyTorch's context_parallel (both rotate methods) at this N and the one-GPU kernel
on every rank; decode over 1M tokens with the collective's share; everything timed as the slowest rank.

Every section writes into one JSON (rewritten after each section, so a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

import attn
from attn.distributed import (
    RingSchedule,
    attend_step,
    contiguous_plan,
    merge_stack,
    ring_attention,
    sharded_decode,
    zigzag_plan,
)
from attn.distributed import cost_model as cm
from attn.distributed.decode import _all_gather_flat
from attn.distributed.ring import _Shift
from bench import common

HQ, HKV, D = 32, 8, 128


# --------------------------------------------------------------------------------------------- timing


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, dev, reps=3, warmup=1) -> float:
    """Median wall time of ``fn`` between device synchronisations (for calls of a millisecond and more)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def short_ms(fn, dev) -> float:
    """Median of triton's do_bench (L2 flushed) on CUDA, for sub-millisecond calls."""
    return common.bench_ms(fn) if dev.type == "cuda" else time_ms(fn, dev, reps=3)


def slowest_ms(fn, dev, group=None, reps=3) -> float:
    """Multi-rank: every rank runs ``fn`` between barriers; the slowest rank's median."""
    ts = []
    fn()
    for _ in range(reps):
        dist.barrier(group)
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        ts.append((time.perf_counter() - t) * 1e3)
    t = torch.tensor([statistics.median(ts)], device=dev if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def err(ref, out) -> float:
    return common.rel_err(out, ref)


# --------------------------------------------------------------------------------------------- inputs


def qkv(seqlen, dev, dtype, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(seqlen, HQ, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(seqlen, HKV, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(seqlen, HKV, D, device=dev, dtype=dtype, generator=g)
    return q, k, v


def _calls_only(q, k, v, calls):
    for c in calls:
        attn.attention(q[c.q_lo : c.q_hi], k[c.k_lo : c.k_hi], v[c.k_lo : c.k_hi], cu_seqlens_q=c.cu_q,
                       cu_seqlens_k=c.cu_k, max_seqlen_q=c.max_q, max_seqlen_k=c.max_k, window_size=c.window,
                       return_lse=True)  # fmt: skip


def run_steps(q, k, v, plan, rank, sched, out, lse, step):
    """One ring step of ``rank`` with the K/V of its source that step, as ring_attention runs it."""
    src = (rank - step) % plan.world_size
    attend_step(q, k[src], v[src], sched.steps[step], out, lse)


# --------------------------------------------------------------------------------------------- sections


def section_parity(res, dev, dtype, seqlen):
    q, k, v = qkv(seqlen, dev, dtype, seed=1)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=dev)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    ref = attn.reference.attention(q.float(), k.float(), v.float(), **kw)
    single = attn.attention(q, k, v, **kw)
    ring1 = ring_attention(q, k, v, zigzag_plan([seqlen], 1), causal=True)
    # a 4-rank zigzag ring simulated in this process: every rank's every step, then the shards put back
    plan = zigzag_plan([seqlen], 4)
    ks = [plan.shard(k, r) for r in range(4)]
    vs = [plan.shard(v, r) for r in range(4)]
    outs = []
    for r in range(4):
        ql = plan.shard(q, r)
        sched = RingSchedule(plan, r, causal=True, device=dev)
        out = torch.zeros(ql.shape, dtype=torch.float32, device=dev)
        lse = torch.full((HQ, ql.shape[0]), float("-inf"), device=dev)
        for s in range(4):
            run_steps(ql, ks, vs, plan, r, sched, out, lse, s)
        outs.append(out.to(dtype))
    sim4 = plan.unshard(outs)
    res["parity"] = {
        "seqlen": seqlen,
        "dtype": str(dtype),
        "kernel_vs_fp32_ref": err(ref, single),
        "ring_world1_vs_fp32_ref": err(ref, ring1),
        "ring_sim4_vs_fp32_ref": err(ref, sim4),
        "ring_sim4_vs_kernel": err(single, sim4),
        "note": "relative RMS errors; the ring adds fp32 merges and one rounding of the merged output",
    }


def _torch_cp(q, k, v, dev, world, rotate="allgather"):
    """PyTorch's context_parallel over SDPA flash on [1, H, S, D] buffers (K/V expanded to Hq heads)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        from torch.distributed.tensor.experimental._attention import set_rotate_method
    except ImportError:
        from torch.distributed.tensor.experimental._context_parallel._attention import set_rotate_method
    set_rotate_method(rotate)
    mesh = init_device_mesh(dev.type, (world,))
    group = HQ // HKV
    qb = q.transpose(0, 1).unsqueeze(0).contiguous()
    kb = k.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    vb = v.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    box = {}

    def run():
        box["out"] = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True)

    with (
        sdpa_kernel([SDPBackend.FLASH_ATTENTION]),
        context_parallel(mesh, buffers=[qb, kb, vb], buffer_seq_dims=[2, 2, 2]),
    ):
        ms = slowest_ms(run, dev) if world > 1 else time_ms(run, dev)
    return ms, box["out"], (qb, kb, vb)


def section_e2e(res, dev, dtype, seqlen):
    q, k, v = qkv(seqlen, dev, dtype)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=dev)
    plan = zigzag_plan([seqlen], 1)
    sched = RingSchedule(plan, 0, causal=True, device=dev)
    r = {"seqlen": seqlen, "shape": f"H{HQ}/{HKV} D{D} {dtype}"}
    r["attn_attention_ms"] = time_ms(lambda: attn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                                                            max_seqlen_q=seqlen, max_seqlen_k=seqlen), dev)  # fmt: skip
    r["ring_world1_ms"] = time_ms(lambda: ring_attention(q, k, v, plan, causal=True, schedule=sched), dev)
    r["ring_fixed_ms"] = r["ring_world1_ms"] - r["attn_attention_ms"]
    acc = torch.zeros(seqlen, HQ, D, dtype=torch.float32, device=dev)

    def setup_and_cast():
        # what ring_attention does besides its steps: the float32 accumulator and lse, and the final cast
        torch.zeros(seqlen, HQ, D, dtype=torch.float32, device=dev)
        torch.full((HQ, seqlen), float("-inf"), device=dev)
        acc.to(dtype)

    r["ring_setup_cast_ms"] = time_ms(setup_and_cast, dev)
    acc = None
    flops = 4 * seqlen * (seqlen + 1) / 2 * HQ * D
    r["attn_attention_tflops"] = common.tflops(flops, r["attn_attention_ms"])
    if dev.type == "cuda":
        try:
            ms, out, _ = _torch_cp(q, k, v, dev, 1)
            r["torch_context_parallel_ms"] = ms
            ours = attn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
            r["torch_context_parallel_vs_ours_err"] = err(ours.float(), out[0].transpose(0, 1).float())
            r["ratio_ring_over_torch_cp"] = ms / r["ring_world1_ms"]
        except Exception as e:
            r["torch_context_parallel_error"] = common.short_error(e)
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            qb = q.transpose(0, 1).unsqueeze(0)
            kb = k.repeat_interleave(HQ // HKV, 1).transpose(0, 1).unsqueeze(0)
            vb = v.repeat_interleave(HQ // HKV, 1).transpose(0, 1).unsqueeze(0)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                r["sdpa_flash_ms"] = time_ms(
                    lambda: torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True), dev
                )
        except Exception as e:
            r["sdpa_flash_error"] = common.short_error(e)
    res["e2e_world1"] = r


def section_overlap(res, dev, dtype, seqlen, group):
    """A K/V shard around a single-rank ring (to itself) against one step's compute."""
    res["overlap_loopback"] = {f"N{n}": _overlap_one(n, dev, dtype, seqlen, group) for n in (8, 4, 2)}
    common.free_memory()


def _overlap_one(n, dev, dtype, seqlen, group):
    plan = zigzag_plan([seqlen], n)
    q, k, v = qkv(seqlen, dev, dtype, seed=3)
    rank, step = 0, 1
    ql = plan.shard(q, rank)
    src = (rank - step) % n
    kl, vl = plan.shard(k, src), plan.shard(v, src)
    del q, k, v
    sched = RingSchedule(plan, rank, causal=True, device=dev)
    out = torch.zeros(ql.shape, dtype=torch.float32, device=dev)
    lse = torch.full((HQ, ql.shape[0]), float("-inf"), device=dev)
    shift = _Shift(group, 0, 1, dev)
    shapes = [tuple(kl.shape)] * 2
    side = torch.cuda.Stream() if dev.type == "cuda" else None
    bufs = [torch.empty_like(kl), torch.empty_like(vl)]
    mode = "nccl_self_sendrecv"

    def start():
        if mode.startswith("nccl"):
            shift.start([kl, vl], shapes, dtype)
            return
        # stand-in: the same bytes copied on a side stream
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            bufs[0].copy_(kl)
            bufs[1].copy_(vl)

    def finish():
        if mode.startswith("nccl"):
            shift.wait()
        elif side is not None:
            torch.cuda.current_stream().wait_stream(side)

    def transfer():
        start()
        finish()

    def compute():
        attend_step(ql, kl, vl, sched.steps[step], out, lse)

    def both():
        # the ring's order: start the transfer, compute, then wait for it
        start()
        compute()
        finish()

    try:
        transfer()
        _sync(dev)
    except Exception as e:
        mode = f"side_stream_copy (self send/recv failed: {common.short_error(e, 160)})"
    tc, tx, tb = (time_ms(f, dev, reps=5) for f in (compute, transfer, both))
    nbytes = 2 * kl.numel() * kl.element_size()
    return {
        "mode": mode,
        "shard_tokens": kl.shape[0],
        "shard_bytes": nbytes,
        "compute_ms": tc,
        "transfer_ms": tx,
        "both_ms": tb,
        "transfer_gbps": nbytes / tx / 1e6,
        "hidden_fraction": max(0.0, min(1.0, (tc + tx - tb) / min(tc, tx))),
        # 1 when the transfer hides entirely behind compute (or the reverse); the model scales each step by it
        "step_slowdown": max(1.0, tb / max(tc, tx)),
    }


def section_steps(res, dev, dtype, seqlen, counts):
    q, k, v = qkv(seqlen, dev, dtype, seed=4)
    r = {}
    for name, n, make in [(f"zigzag{n}", n, zigzag_plan) for n in counts] + [("contiguous4", 4, contiguous_plan)]:
        if n not in counts and name != "contiguous4":
            continue
        plan = make([seqlen], n)
        ks = [plan.shard(k, i) for i in range(n)]
        vs = [plan.shard(v, i) for i in range(n)]
        grid = []
        for rank in range(n):
            ql = plan.shard(q, rank)
            sched = RingSchedule(plan, rank, causal=True, device=dev)
            out = torch.zeros(ql.shape, dtype=torch.float32, device=dev)
            lse = torch.full((HQ, ql.shape[0]), float("-inf"), device=dev)
            step = functools.partial(run_steps, ql, ks, vs, plan, rank, sched, out, lse)
            grid.append([time_ms(functools.partial(step, s), dev, reps=2) for s in range(n)])
        kernel_only = None
        if name == f"zigzag{max(counts)}":
            # rank 0's steps without the merges: the attention calls alone, for the merges' share
            ql = plan.shard(q, 0)
            sched = RingSchedule(plan, 0, causal=True, device=dev)
            kernel_only = [time_ms(functools.partial(_calls_only, ql, ks[(0 - s) % n], vs[(0 - s) % n], sched.steps[s]),
                                   dev, reps=2) for s in range(n)]  # fmt: skip
        r[name] = {
            "world": n,
            "rank0_kernel_only_ms": kernel_only,
            "shard_tokens": plan.local_len(0),
            "step_ms": grid,
            "calls_per_rank": [RingSchedule(plan, i, causal=True).num_calls for i in range(n)],
        }
        common.free_memory()
    res["steps"] = r


def section_decode(res, dev, dtype, ctx_len, counts):
    r = {"context": ctx_len, "shape": f"B1 H{HQ}/{HKV} D{D} {dtype}"}
    kv_bytes = 2 * ctx_len * HKV * D * torch.tensor([], dtype=dtype).element_size()
    r["kv_bytes"] = kv_bytes
    q = torch.randn(1, 1, HQ, D, device=dev, dtype=dtype)
    shard_ms, merge_ms = {}, {}
    for n in [1, *counts]:
        n_tok = ctx_len // n
        kc = torch.randn(1, n_tok, HKV, D, device=dev, dtype=dtype)
        vc = torch.randn_like(kc)
        lens = torch.tensor([n_tok], dtype=torch.int32, device=dev)
        if n == 1:
            ref = attn.reference.decode(q.float()[:, :, :], kc[:, : min(n_tok, 65536)].float(),
                                        vc[:, : min(n_tok, 65536)].float(), lens.clamp(max=65536))  # fmt: skip
            got = attn.decode(q, kc[:, : min(n_tok, 65536)].contiguous(), vc[:, : min(n_tok, 65536)].contiguous(),
                              lens.clamp(max=65536))  # fmt: skip
            r["decode_64k_vs_fp32_ref"] = err(ref, got)
        # the call a rank makes: sharded_decode (world 1 here: no collective), ALiBi-free fast path
        call = functools.partial(sharded_decode, q, kc, vc, lens, shard_start=[0], seqlens_total=[n_tok],
                                 return_lse=True)  # fmt: skip
        shard_ms[n] = short_ms(call, dev)
        parts = (torch.randn(n, 1, 1, HQ, D, device=dev), torch.randn(n, 1, 1, HQ, device=dev))
        merge_ms[n] = short_ms(functools.partial(merge_stack, *parts), dev) if n > 1 else 0.0
        kc = vc = call = None
        common.free_memory()
    r["shard_ms"] = shard_ms
    r["merge_ms"] = merge_ms
    r["whole_cache_tbps"] = kv_bytes / shard_ms[1] / 1e9
    if dist.is_initialized():
        buf = torch.randn(1, 1, HQ, D + 1, device=dev)
        gathered = torch.empty_like(buf)
        r["allgather_world1_ms"] = short_ms(functools.partial(_all_gather_flat, gathered, buf), dev)
    res["decode"] = r


def section_model(res, seqlen):
    e2e, steps, dec = res.get("e2e_world1"), res.get("steps"), res.get("decode")
    model = {
        "assumptions": {
            "nvlink_gbps_per_direction": cm.NVLINK_GBPS_PER_DIRECTION,
            "p2p_efficiency": cm.P2P_EFFICIENCY,
            "allgather_us": f"{cm.ALLGATHER_BASE_US} + {cm.ALLGATHER_HOP_US}·(N−1)",
            "note": "H100 SXM NVLink 4 nominal bandwidth; the transfer overlaps compute except at the last step; "
            "compute while transferring is slowed by the loopback measurement's factor (1 if unmeasured)",
        }
    }
    if e2e and steps:
        grids = {v["world"]: v["step_ms"] for k, v in steps.items() if k.startswith("zigzag")}
        # N=1: the kernel's time, plus the ring's fixed cost below (accumulator set-up, merge, final cast)
        grids[1] = [[e2e["attn_attention_ms"]]]
        shard_bytes = {n: cm.kv_shard_bytes(seqlen // n, HKV, D) for n in grids}
        loop = res.get("overlap_loopback", {})
        rho = {n: loop.get(f"N{n}", {}).get("step_slowdown", 1.0) for n in grids}
        # the step grids hold the merges; what scales with the local length besides them is set-up and cast
        fixed = {n: e2e["ring_setup_cast_ms"] / n for n in grids}
        fixed[1] = max(0.0, e2e["ring_fixed_ms"])
        pred = cm.predict_prefill(e2e["attn_attention_ms"], grids, shard_bytes, overlap_slowdown=rho, fixed_ms=fixed)
        model["prefill"] = {"single_gpu_ms": e2e["attn_attention_ms"], "overlap_slowdown": rho, "by_gpus": pred}
        if "contiguous4" in steps:
            c4 = cm.predict_prefill(e2e["attn_attention_ms"], {4: steps["contiguous4"]["step_ms"]},
                                    {4: shard_bytes.get(4, cm.kv_shard_bytes(seqlen // 4, HKV, D))})  # fmt: skip
            model["prefill_contiguous4"] = c4[4]
    if dec:
        model["decode"] = {"by_gpus": cm.predict_decode(dec["shard_ms"], dec["merge_ms"], kv_bytes=dec["kv_bytes"])}
    res["model"] = model


# --------------------------------------------------------------------------------------------- multi-GPU


def multi_gpu(res, dev, dtype, seqlen, ctx_len, rank, world):
    # parity against each rank's own single-GPU result, on a shorter sequence
    s_par = min(seqlen, 16384)
    q, k, v = qkv(s_par, dev, dtype, seed=1)
    cu = torch.tensor([0, s_par], dtype=torch.int32, device=dev)
    single = attn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    plan = zigzag_plan([s_par], world)
    idx = plan.global_index(rank, dev)
    out = ring_attention(plan.shard(q, rank), plan.shard(k, rank), plan.shard(v, rank), plan, causal=True)
    e = torch.tensor([err(single[idx].float(), out.float())], device=dev)
    dist.all_reduce(e, op=dist.ReduceOp.MAX)
    res["parity"] = {"seqlen": s_par, "ring_vs_single_gpu_max_over_ranks": e.item()}

    # prefill: one GPU's kernel (every rank runs it at once), our ring, PyTorch's context_parallel
    q, k, v = qkv(seqlen, dev, dtype)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=dev)
    r = {"seqlen": seqlen, "world": world}
    r["single_gpu_ms"] = slowest_ms(lambda: attn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                                                           max_seqlen_q=seqlen, max_seqlen_k=seqlen), dev)  # fmt: skip
    plan = zigzag_plan([seqlen], world)
    ql, kl, vl = plan.shard(q, rank), plan.shard(k, rank), plan.shard(v, rank)
    sched = RingSchedule(plan, rank, causal=True, device=dev)
    r["ring_ms"] = slowest_ms(lambda: ring_attention(ql, kl, vl, plan, causal=True, schedule=sched), dev)
    r["ring_speedup"] = r["single_gpu_ms"] / r["ring_ms"]
    for rotate in ("allgather", "alltoall"):
        try:
            ms, _, _ = _torch_cp(q, k, v, dev, world, rotate)
            r[f"torch_cp_{rotate}_ms"] = ms
            r[f"ring_over_torch_cp_{rotate}"] = ms / r["ring_ms"]
        except Exception as ex:
            r[f"torch_cp_{rotate}_error"] = common.short_error(ex)
    res["prefill"] = r
    q = k = v = ql = kl = vl = None
    common.free_memory()

    # decode over ctx_len tokens sharded across the ranks
    n_tok = ctx_len // world
    qd = torch.randn(1, 1, HQ, D, device=dev, dtype=dtype, generator=torch.Generator(device=dev).manual_seed(7))
    kc = torch.randn(1, n_tok, HKV, D, device=dev, dtype=dtype)
    vc = torch.randn_like(kc)
    lens = torch.tensor([n_tok], dtype=torch.int32, device=dev)
    kw = dict(shard_start=[rank * n_tok], seqlens_total=[ctx_len])
    step = slowest_ms(lambda: sharded_decode(qd, kc, vc, lens, **kw), dev, reps=20)
    local = slowest_ms(lambda: attn.decode(qd, kc, vc, lens, return_lse=True), dev, reps=20)
    buf = torch.randn(1, 1, HQ, D + 1, device=dev)
    gathered = torch.empty(world * buf.shape[0], *buf.shape[1:], device=dev)
    coll = slowest_ms(functools.partial(_all_gather_flat, gathered, buf), dev, reps=20)
    kv_bytes = 2 * ctx_len * HKV * D * 2
    res["decode"] = {
        "context": ctx_len,
        "step_ms": step,
        "local_decode_ms": local,
        "allgather_ms": coll,
        "collective_share": coll / step,
        "aggregate_tbps": kv_bytes / step / 1e9,
        "note": "host-timed between barriers (slowest rank); compare with the one-GPU run's decode section",
    }


# --------------------------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the result JSON")
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--decode-len", type=int, default=1 << 20)
    p.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip: parity e2e overlap steps decode")
    p.add_argument("--budget-s", type=float, default=170.0, help="write what is measured and stop after this")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, interpreter, tiny shapes (checks the code)")
    args = p.parse_args(argv)

    global HQ, HKV, D
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        HQ, HKV, D = 4, 2, 16
        args.seqlen, args.decode_len, args.counts = 64, 256, [2, 4]
        dev, dtype, backend = torch.device("cpu"), torch.float32, "gloo"
    else:
        common.require_cuda("bench_distributed")
        dev, dtype, backend = None, torch.bfloat16, "nccl"

    # one fixed kernel config (the Hopper default) for every call: tuning each of the ring's call shapes at 128k
    # would not fit the time budget; ATTN_AUTOTUNE=1 in the environment turns tuning back on
    os.environ.setdefault("ATTN_AUTOTUNE", "0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if dev is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    dist.init_process_group(backend, rank=rank, world_size=world, device_id=dev if backend == "nccl" else None)

    res = {"env": common.env_info(), "world": world, "backend": backend, "smoke": args.smoke,
           "attn_autotune": os.environ["ATTN_AUTOTUNE"]}  # fmt: skip
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kind = "smoke" if args.smoke else f"{common.sanitize(res['env'].get('gpu', 'gpu'))}_x{world}"
    path = os.path.join(args.out, f"distributed_{kind}_{stamp}.json")

    def save():
        if rank == 0:
            common.write_json(path, res)

    def watchdog():
        res["cut_short"] = f"stopped by --budget-s {args.budget_s}"
        if world == 1:
            with contextlib.suppress(Exception):
                section_model(res, args.seqlen)
        save()
        sys.stdout.flush()
        os._exit(3)

    timer = threading.Timer(args.budget_s, watchdog)
    timer.daemon = True
    timer.start()
    t0 = time.time()
    if world == 1:
        sections = [
            ("parity", lambda: section_parity(res, dev, dtype, min(args.seqlen, 4096))),
            ("e2e", lambda: section_e2e(res, dev, dtype, args.seqlen)),
            ("steps", lambda: section_steps(res, dev, dtype, args.seqlen, args.counts)),
            ("decode", lambda: section_decode(res, dev, dtype, args.decode_len, args.counts)),
            # last: a self send/recv that NCCL neither refuses nor completes would hang here, and the watchdog
            # then still writes everything above
            ("overlap", lambda: section_overlap(res, dev, dtype, args.seqlen, dist.group.WORLD)),
        ]
    else:
        sections = [("multi_gpu", lambda: multi_gpu(res, dev, dtype, args.seqlen, args.decode_len, rank, world))]
    for name, fn in sections:
        if name in args.skip:
            continue
        t = time.time()
        try:
            fn()
        except Exception as e:
            res[f"{name}_error"] = common.short_error(e)
            res[f"{name}_traceback"] = traceback.format_exc()[-2000:]
        res.setdefault("section_s", {})[name] = round(time.time() - t, 2)
        print(f"[{name}] {time.time() - t:.1f}s", flush=True)
        common.free_memory() if dev.type == "cuda" else None
        save()
    if world == 1:
        section_model(res, args.seqlen)
    res["total_s"] = round(time.time() - t0, 2)
    save()
    timer.cancel()
    if rank == 0:
        print(path)
        for k in ("parity", "e2e_world1", "model", "prefill", "decode"):
            if k in res:
                print(k, res[k])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
