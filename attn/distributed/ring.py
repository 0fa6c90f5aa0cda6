"""Ring attention: context-parallel prefill over ``torch.distributed``.

Each rank holds a slice of every sequence (a `ShardPlan`): its queries and its keys/values. For N ranks the ring
takes N steps. At step ``s`` rank ``r`` holds the K/V shard of rank ``(r − s) mod N``; it sends that shard on to
rank ``r + 1`` and receives the next one from ``r − 1`` (asynchronous point-to-point, ``batch_isend_irecv``) while
it attends its queries to the shard it has. Each step's partial output and log-sum-exp are folded into an
accumulator exactly (`attn.distributed.merge`), so the result equals single-process attention over the whole
sequence.

Positions stay global. ``attn.attention`` has no position offset: it aligns a query block and a key block on
their *ends* (bottom-right: the last query sits at the last key's position). For a query range ``[qa, qb)``
and a key range ``[ka, kb)`` of one sequence, with ``e = qb − kb`` (how far the true diagonal lies from the one
the kernel assumes), the global mask ``−L ≤ k − q ≤ R`` is the kernel's window ``(L − e, R + e)`` on the local
ranges. So each (query segment, key segment) pair is first trimmed to the rows and columns that can see
anything, which guarantees both window sides are ≥ 0, and then runs as one sequence of a packed varlen call.
ALiBi's bias ``slope·(k − q)`` differs from what the kernel adds by the constant ``−slope·e`` on every row of
the pair: the softmax is unchanged and the row's log-sum-exp moves by that constant, which is added back before
the merge. Pairs that share a kernel window and can be laid out in increasing order go into one packed call
(gaps are filled with empty sequences), so a zigzag ring makes two calls on its first step and one on the others.

Not supported by composition: the T5 relative bias (its buckets are not a constant shift) and ALiBi's
``alibi_with_scale`` mode together with soft-capping (the shift would sit inside the ``tanh``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..checks import _is_int, check_flag
from .merge import merge_into
from .sharding import ShardPlan


@dataclass(frozen=True)
class Piece:
    """One (query range, key range) pair of one sequence, as one sequence of a packed kernel call.

    ``q_lo:q_hi`` are rows of this rank's local q, ``k_lo:k_hi`` rows of the K/V shard held at this step, ``e``
    the global end of the queries minus that of the keys, ``full`` whether every query sees every key.
    """

    seq: int
    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    e: int
    full: bool


@dataclass
class Call:
    """One packed ``attention`` call of a ring step: pieces in increasing q and k order, one kernel window."""

    window: tuple[int, int]
    pieces: list[Piece]
    # filled by `RingSchedule._finish`: the packed call's metadata, on the device
    q_lo: int = 0
    q_hi: int = 0
    k_lo: int = 0
    k_hi: int = 0
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0
    seq_of_call_seq: torch.Tensor | None = None  # int64 [B_call]: the batch sequence of each call sequence
    row_seq: torch.Tensor | None = None  # int64 [rows]: the batch sequence of each query row
    row_e: torch.Tensor | None = None  # float32 [rows]: the e of each query row (0 on filler rows)


def _mask_bounds(causal: bool, window_size) -> tuple[int | None, int | None]:
    left, right = window_size
    if causal:
        right = 0
    return (left if left >= 0 else None), (right if right >= 0 else None)


def plan_pieces(plan: ShardPlan, rank: int, src: int, *, causal: bool = False, window_size=(-1, -1)) -> list[Piece]:
    """The pairs through which ``rank``'s queries see the K/V shard of ``src``, trimmed to what is visible.

    Returns:
        pieces sorted by ``(q_lo, k_lo)``; empty when no query of ``rank`` sees a key of ``src``.
    """
    if not isinstance(plan, ShardPlan):
        raise TypeError(f"plan must be a ShardPlan, got {type(plan).__name__}")
    for name, r in (("rank", rank), ("src", src)):
        if not _is_int(r) or not 0 <= r < plan.world_size:
            raise ValueError(f"{name} must be a rank in [0, {plan.world_size}), got {r!r}")
    check_flag("causal", causal)
    L, R = _mask_bounds(causal, window_size)
    pieces = []
    for qs, oq in zip(plan.segments[rank], plan.offsets[rank]):
        for ks, ok in zip(plan.segments[src], plan.offsets[src]):
            if ks.seq != qs.seq:
                continue
            qa, qb, ka, kb = qs.start, qs.end, ks.start, ks.end
            # rows that see nothing of [ka, kb) and columns no row of [qa, qb) sees are cut off
            if R is not None:
                qa, kb = max(qa, ks.start - R), min(kb, qs.end + R)
            if L is not None:
                ka, qb = max(ka, qs.start - L), min(qb, ks.end + L)
            if qa >= qb or ka >= kb:
                continue
            full = (R is None or kb - 1 - qa <= R) and (L is None or qb - 1 - ka <= L)
            pieces.append(
                Piece(qs.seq, oq + qa - qs.start, oq + qb - qs.start, ok + ka - ks.start, ok + kb - ks.start,
                      qb - kb, full)
            )  # fmt: skip
    return sorted(pieces, key=lambda p: (p.q_lo, p.k_lo))


def _coalesce(pieces: list[Piece]) -> list[Piece]:
    """Without ALiBi a fully visible pair does not care where its tokens sit: fully visible pieces whose keys
    (same queries) or queries (same keys) are neighbours in the buffers become one piece."""
    changed = True
    while changed:
        changed = False
        pieces = sorted(pieces, key=lambda p: (p.q_lo, p.k_lo))
        for i, a in enumerate(pieces):
            for j, b in enumerate(pieces):
                if i == j or not (a.full and b.full and a.seq == b.seq):
                    continue
                if (a.q_lo, a.q_hi) == (b.q_lo, b.q_hi) and a.k_hi == b.k_lo:
                    joined = Piece(a.seq, a.q_lo, a.q_hi, a.k_lo, b.k_hi, 0, True)
                elif (a.k_lo, a.k_hi) == (b.k_lo, b.k_hi) and a.q_hi == b.q_lo:
                    joined = Piece(a.seq, a.q_lo, b.q_hi, a.k_lo, a.k_hi, 0, True)
                else:
                    continue
                pieces = [p for n, p in enumerate(pieces) if n not in (i, j)] + [joined]
                changed = True
                break
            if changed:
                break
    return sorted(pieces, key=lambda p: (p.q_lo, p.k_lo))


def plan_calls(pieces: list[Piece], *, causal: bool = False, window_size=(-1, -1)) -> list[Call]:
    """Groups pieces into packed calls: one kernel window per call, q and k ranges increasing within it."""
    L, R = _mask_bounds(causal, window_size)
    calls: list[Call] = []
    for p in pieces:
        if p.full:
            window = (-1, -1)
        else:
            window = (-1 if L is None else L - p.e, -1 if R is None else R + p.e)
        for c in calls:
            last = c.pieces[-1]
            if c.window == window and last.q_hi <= p.q_lo and last.k_hi <= p.k_lo:
                c.pieces.append(p)
                break
        else:
            calls.append(Call(window, [p]))
    return calls


class RingSchedule:
    """Every packed call of every ring step of one rank, planned once (host work) and reused.

    Args:
        plan: the sharding.
        rank: this rank.
        causal, window_size: the mask, in global positions.
        coalesce: join fully visible neighbours (only when no ALiBi: ALiBi needs each pair's own ``e``).
        device: where the call metadata goes.
    """

    def __init__(self, plan: ShardPlan, rank: int, *, causal=False, window_size=(-1, -1), coalesce=True,
                 device=None):  # fmt: skip
        self.plan, self.rank = plan, rank
        self.mask = (bool(causal), tuple(window_size), bool(coalesce))
        n = plan.world_size
        self.steps: list[list[Call]] = []
        for step in range(n):
            src = (rank - step) % n
            pieces = plan_pieces(plan, rank, src, causal=causal, window_size=window_size)
            if coalesce:
                pieces = _coalesce(pieces)
            calls = plan_calls(pieces, causal=causal, window_size=window_size)
            for c in calls:
                self._finish(c, device)
            self.steps.append(calls)

    @staticmethod
    def _finish(c: Call, device) -> None:
        c.q_lo, c.k_lo = c.pieces[0].q_lo, c.pieces[0].k_lo
        c.q_hi, c.k_hi = c.pieces[-1].q_hi, c.pieces[-1].k_hi
        lens_q, lens_k, seqs, row_seq, row_e = [], [], [], [], []
        qc, kc = c.q_lo, c.k_lo
        for p in c.pieces:
            # filler sequences: skipped query rows see no key (zero output, lse −inf), skipped keys have no query
            if p.q_lo > qc:
                lens_q.append(p.q_lo - qc), lens_k.append(0), seqs.append(p.seq)
                row_seq += [p.seq] * (p.q_lo - qc)
                row_e += [0] * (p.q_lo - qc)
            if p.k_lo > kc:
                lens_q.append(0), lens_k.append(p.k_lo - kc), seqs.append(p.seq)
            lens_q.append(p.q_hi - p.q_lo), lens_k.append(p.k_hi - p.k_lo), seqs.append(p.seq)
            row_seq += [p.seq] * (p.q_hi - p.q_lo)
            row_e += [p.e] * (p.q_hi - p.q_lo)
            qc, kc = p.q_hi, p.k_hi
        cu = lambda lens: torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)  # noqa: E731
        c.cu_q, c.cu_k = cu(lens_q), cu(lens_k)
        c.max_q, c.max_k = max(lens_q), max(lens_k)
        c.seq_of_call_seq = torch.tensor(seqs, dtype=torch.int64, device=device)
        c.row_seq = torch.tensor(row_seq, dtype=torch.int64, device=device)
        c.row_e = torch.tensor(row_e, dtype=torch.float32, device=device)

    @property
    def num_calls(self) -> int:
        return sum(len(s) for s in self.steps)


def _group_info(group):
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _peer(group, r: int) -> int:
    return r if group is None or group is dist.group.WORLD else dist.get_global_rank(group, r)


class _Shift:
    """Sends tensors to the next rank and receives the previous rank's, asynchronously.

    On CUDA the P2P operations are issued from a side stream that first waits for the compute stream (the
    tensors to send are ready); NCCL then runs them on its own stream, concurrently with the compute kernels
    issued next. `wait` makes the compute stream wait for the transfer, not the host.
    """

    def __init__(self, group, rank: int, world: int, device: torch.device):
        self.group, self.rank, self.world = group, rank, world
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.works, self.recv = [], []

    def start(self, send: list[torch.Tensor], recv_shapes: list[tuple], dtype) -> None:
        nxt, prv = _peer(self.group, (self.rank + 1) % self.world), _peer(self.group, (self.rank - 1) % self.world)
        ctx = torch.cuda.stream(self.stream) if self.cuda else _nullcontext()
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream())
        with ctx:
            self.recv = [torch.empty(s, dtype=dtype, device=send[0].device) for s in recv_shapes]
            ops = [dist.P2POp(dist.isend, t, nxt, self.group) for t in send]
            ops += [dist.P2POp(dist.irecv, t, prv, self.group) for t in self.recv]
            self.works = dist.batch_isend_irecv(ops)
        if self.cuda:
            for t in send:
                t.record_stream(self.stream)

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        if self.cuda:
            cur = torch.cuda.current_stream()
            cur.wait_stream(self.stream)
            for t in self.recv:
                t.record_stream(cur)
        recv, self.works, self.recv = self.recv, [], []
        return recv


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _slopes_2d(alibi_slopes, num_seqs: int, num_heads: int) -> torch.Tensor:
    s = alibi_slopes.float()
    if s.shape == (num_heads,):
        return s.expand(num_seqs, num_heads)
    if s.shape == (num_seqs, num_heads):
        return s
    raise ValueError(
        f"alibi_slopes must be [Hq]={num_heads} or [B, Hq]=[{num_seqs}, {num_heads}], got {tuple(s.shape)}"
    )


def attend_step(q, k, v, calls: list[Call], out, lse, *, slopes=None, alibi_shift=1.0, impl=None, **kwargs) -> None:
    """One ring step: the packed calls of this rank's queries over the K/V shard it holds, merged into
    ``out`` (float32 ``[T_local, Hq, D]``) and ``lse`` (``[Hq, T_local]``) in place.

    ``slopes`` is float32 ``[B, Hq]`` or None; ``alibi_shift`` the lse shift per unit of ``e`` and of slope;
    ``kwargs`` go to the attention function (scale, softcap, ALiBi mode).
    """
    if impl is None:
        from ..fast import attention as impl
    for c in calls:
        o, l = impl(
            q[c.q_lo : c.q_hi], k[c.k_lo : c.k_hi], v[c.k_lo : c.k_hi], cu_seqlens_q=c.cu_q, cu_seqlens_k=c.cu_k,
            max_seqlen_q=c.max_q, max_seqlen_k=c.max_k, window_size=c.window,
            alibi_slopes=None if slopes is None else slopes[c.seq_of_call_seq], return_lse=True, **kwargs,
        )  # fmt: skip
        if slopes is not None:
            # the kernel's bias is slope·(k − q − e): put the −slope·e it left out back into the lse
            l = l - slopes[c.row_seq].T * (c.row_e * alibi_shift)
        merge_into(out[c.q_lo : c.q_hi], lse[:, c.q_lo : c.q_hi], o, l)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: ShardPlan,
    *,
    group=None,
    causal: bool = False,
    softmax_scale: float | None = None,
    q_scaling: float = 1.0,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    alibi_mode: str = "alibi",
    return_lse: bool = False,
    schedule: RingSchedule | None = None,
    impl=None,
):
    """Context-parallel attention of this rank's queries over every rank's keys, in a ring.

    Every rank of ``group`` calls it with its own shard; positions (masks, windows, ALiBi) are those of the
    whole sequences described by ``plan``. Without an initialized process group it runs as world size 1.

    Args:
        q: ``[T_local, Hq, D]``, this rank's queries (``plan.shard(q_global, rank)``).
        k: ``[T_local, Hkv, D]``, this rank's keys.
        v: like k.
        plan: the `ShardPlan` (the same on every rank).
        group: the context-parallel process group (default: the world).
        causal, softmax_scale, q_scaling, window_size, softcap, alibi_slopes, alibi_mode: as in
            `attn.attention`, applied in global positions; ``alibi_slopes`` is ``[Hq]`` or ``[B, Hq]`` for
            the plan's B sequences.
        return_lse: also return the log-sum-exp.
        schedule: a `RingSchedule` built earlier for the same plan, rank and mask (saves the host planning).
        impl: the attention function (default `attn.attention`; `attn.reference.attention` works too).

    Returns:
        ``out [T_local, Hq, D]`` in q's dtype, and with ``return_lse`` also float32 ``lse [Hq, T_local]``
        (``-inf`` for rows that see no key).
    """
    if impl is None:
        from ..fast import attention as impl
    rank, world = _group_info(group)
    if plan.world_size != world:
        raise ValueError(f"plan is for {plan.world_size} ranks but the group has {world}")
    t_local = plan.local_len(rank)
    if q.dim() != 3 or q.shape[0] != t_local:
        raise ValueError(f"q must be [T_local={t_local}, Hq, D] for rank {rank} of the plan, got {tuple(q.shape)}")
    if k.dim() != 3 or k.shape[0] != t_local or v.shape != k.shape:
        raise ValueError(f"k and v must both be [T_local={t_local}, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if alibi_slopes is not None and alibi_mode == "alibi_with_scale" and softcap > 0:
        raise ValueError("ring_attention cannot combine alibi_mode='alibi_with_scale' with softcap > 0")
    if schedule is None:
        schedule = RingSchedule(plan, rank, causal=causal, window_size=window_size,
                                coalesce=alibi_slopes is None, device=q.device)  # fmt: skip
    elif (schedule.plan, schedule.rank, schedule.mask) != (
        plan,
        rank,
        (causal, tuple(window_size), alibi_slopes is None),
    ):
        raise ValueError("schedule was built for another plan, rank, mask or ALiBi setting")
    hq, d = q.shape[1], q.shape[2]
    slopes = None if alibi_slopes is None else _slopes_2d(alibi_slopes, plan.num_seqs, hq)
    scale = (1.0 / d**0.5 if softmax_scale is None else softmax_scale) / q_scaling
    # ALiBi's lse shift per unit of e: after scaling in "alibi" mode, before it in "alibi_with_scale"
    shift = scale if alibi_mode == "alibi_with_scale" else 1.0

    out = torch.zeros(t_local, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((hq, t_local), float("-inf"), dtype=torch.float32, device=q.device)
    kv = [k.contiguous(), v.contiguous()]
    shift_op = _Shift(group, rank, world, q.device) if world > 1 else None
    for step in range(world):
        if step < world - 1:
            # the shard this rank will hold next step is the one rank r−1 holds now
            n_next = plan.local_len((rank - step - 1) % world)
            shift_op.start(kv, [(n_next, *k.shape[1:])] * 2, k.dtype)
        attend_step(
            q, kv[0], kv[1], schedule.steps[step], out, lse, slopes=slopes, alibi_shift=shift, impl=impl,
            softmax_scale=softmax_scale, q_scaling=q_scaling, softcap=softcap, alibi_mode=alibi_mode,
        )  # fmt: skip
        if step < world - 1:
            kv = shift_op.wait()
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
