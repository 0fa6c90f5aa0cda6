"""A cost model of context-parallel attention: scaling at N GPUs predicted from one GPU's step times.

Prefill (ring attention, N ranks, N steps). At step ``s`` every rank computes its queries against one K/V
shard while that shard travels to the next rank. The steps are synchronous (a rank cannot start step ``s+1``
before its shard arrives), so

    T(N) = Σ_s max( max_r C(N, r, s) · ρ_s,  X_s ) + F(N),

with ``C(N, r, s)`` rank ``r``'s compute time at step ``s`` (measured on one GPU at the real shard sizes), ``X_s``
the transfer time of one K/V shard (``bytes / link bandwidth``, none after the last step), ``ρ_s`` the slowdown
of compute while a transfer shares the GPU (measured, or 1), and ``F`` the per-call fixed cost (accumulator,
final cast). The speed-up is ``T(1) / T(N)`` with ``T(1)`` the plain one-GPU kernel.

Decode (sharded cache). Every rank reads ``1/N`` of the cache, then one all-gather of the partial outputs
(tiny: ``B·Sq·Hq·(D+1)`` floats per rank) and a merge:

    t(N) = t_shard(N) + t_allgather(N) + t_merge(N).

Bandwidth efficiency is ``t(1) / (N · t(N))``: 1 means every GPU streams its shard at the one-GPU rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# NVLink 4 on H100 SXM: 18 links × 25 GB/s per direction = 450 GB/s per direction per GPU (nominal); NCCL's
# point-to-point reaches roughly 80% of it through NVSwitch. Both are assumptions until the multi-GPU run.
NVLINK_GBPS_PER_DIRECTION = 450.0
P2P_EFFICIENCY = 0.8
# a small all-gather through NCCL inside one NVSwitch node: a fixed cost plus one hop per extra rank (assumed)
ALLGATHER_BASE_US = 8.0
ALLGATHER_HOP_US = 3.0


def kv_shard_bytes(tokens: int, num_heads_kv: int, head_dim: int, elem_bytes: int = 2) -> int:
    """Bytes of one K/V shard on the wire (K and V)."""
    return 2 * tokens * num_heads_kv * head_dim * elem_bytes


def transfer_ms(nbytes: float, gbps: float = NVLINK_GBPS_PER_DIRECTION, efficiency: float = P2P_EFFICIENCY) -> float:
    return nbytes / (gbps * efficiency * 1e9) * 1e3


def predict_prefill(
    single_ms: float,
    step_ms: Mapping[int, Sequence[Sequence[float]]],
    shard_bytes: Mapping[int, float],
    *,
    overlap_slowdown: float | Mapping[int, float] = 1.0,
    fixed_ms: Mapping[int, float] | None = None,
    gbps: float = NVLINK_GBPS_PER_DIRECTION,
    efficiency: float = P2P_EFFICIENCY,
) -> dict[int, dict[str, float]]:
    """Predicted ring-attention time and speed-up at each N.

    Args:
        single_ms: the one-GPU kernel over the whole sequence.
        step_ms: per N, ``step_ms[N][r][s]``: rank r's compute at step s.
        shard_bytes: per N, the bytes of one K/V shard.
        overlap_slowdown: ρ, a step's slowdown while a transfer runs (one value, or one per N).
        fixed_ms: per N, the fixed cost per call (accumulator set-up, final cast); 0 when absent.

    Returns:
        per N: ``ms``, ``speedup``, ``efficiency`` (speed-up / N), ``comm_ms`` (one shard's transfer),
        ``compute_ms`` (the sum of the slowest rank per step), ``balance`` (mean / max rank compute).
    """
    out = {}
    for n, grid in sorted(step_ms.items()):
        steps = len(grid[0])
        rho = overlap_slowdown.get(n, 1.0) if isinstance(overlap_slowdown, Mapping) else overlap_slowdown
        x = transfer_ms(shard_bytes[n], gbps, efficiency) if n > 1 else 0.0
        total, compute = 0.0, 0.0
        for s in range(steps):
            c = max(grid[r][s] for r in range(n))
            compute += c
            last = s == steps - 1
            total += c if last else max(c, x) * rho
        total += (fixed_ms or {}).get(n, 0.0)
        per_rank = [sum(row) for row in grid]
        out[n] = {
            "ms": total,
            "speedup": single_ms / total,
            "efficiency": single_ms / total / n,
            "comm_ms": x,
            "compute_ms": compute,
            "balance": sum(per_rank) / len(per_rank) / max(per_rank),
        }
    return out


def allgather_ms(n: int, base_us: float = ALLGATHER_BASE_US, hop_us: float = ALLGATHER_HOP_US) -> float:
    return 0.0 if n == 1 else (base_us + hop_us * (n - 1)) / 1e3


def predict_decode(
    shard_ms: Mapping[int, float], merge_ms: Mapping[int, float], *, kv_bytes: float, collective_ms=None
) -> dict[int, dict[str, float]]:
    """Predicted context-parallel decode step at each N.

    Args:
        shard_ms: per N, one rank's decode over its ``1/N`` of the cache (N=1: the whole cache).
        merge_ms: per N, the merge of N partial results.
        kv_bytes: bytes of the whole cache (K and V) read per step.
        collective_ms: per N, the all-gather's time; default `allgather_ms` (assumed latencies).

    Returns:
        per N: ``ms``, ``collective_ms``, ``collective_share``, ``tbps`` (aggregate), ``efficiency``
        (``t(1) / (N·t(N))``).
    """
    t1 = shard_ms[1] + merge_ms.get(1, 0.0)
    out = {}
    for n in sorted(shard_ms):
        coll = allgather_ms(n) if collective_ms is None else collective_ms[n]
        t = shard_ms[n] + merge_ms.get(n, 0.0) + coll
        out[n] = {
            "ms": t,
            "collective_ms": coll,
            "collective_share": coll / t,
            "tbps": kv_bytes / t / 1e9,
            "efficiency": t1 / (n * t),
        }
    return out
