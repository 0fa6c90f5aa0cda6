"""Context-parallel decode: the KV cache of long sequences sharded across ranks.

Rank ``r`` stores, for every sequence, the tokens at global positions ``[start_r, start_r + len_r)`` in its own
cache (contiguous or paged). A decode step replicates the new queries on every rank; each rank attends them to its
shard (``attn.decode(..., return_lse=True)``), and one collective (an all-gather of outputs and log-sum-exps)
lets every rank merge the partial results exactly.

Positions stay global as in ring attention (`attn.distributed.ring`): ``attn.decode`` places the queries at the
end of the keys it reads, so a shard whose last token is ``e`` positions before the last query uses the kernel
window ``(L − e, R + e)``, and ALiBi's rows are shifted back by ``−slope·e`` in the log-sum-exp. With one query
per sequence and no window, masks do not depend on ``e`` and the step needs no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .merge import merge_stack
from .ring import _group_info, _mask_bounds


def _host_ints(x, n: int, name: str) -> list[int]:
    vals = x.tolist() if isinstance(x, torch.Tensor) else list(x)
    if len(vals) != n:
        raise ValueError(f"{name} must hold {n} entries (one per sequence), got {len(vals)}")
    return [int(t) for t in vals]


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group=None) -> None:
    # torch ≥ 2.12 names it all_gather_single (all_gather_into_tensor warns there); older versions lack it
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def all_gather_merge(out: torch.Tensor, lse: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The one collective of a context-parallel decode step: every rank's ``(out, lse)`` gathered and merged.

    Args:
        out: ``[B, Sq, Hq, D]``, this rank's partial output.
        lse: float32 ``[B, Hq, Sq]``, its log-sum-exp.

    Returns:
        float32 ``(out [B, Sq, Hq, D], lse [B, Hq, Sq])`` over all ranks' keys, the same on every rank.
    """
    rank, world = _group_info(group)
    if world == 1:
        return out.float(), lse.float()
    # one message: the lse rides along as an extra column of the output
    buf = torch.cat([out.float(), lse.transpose(1, 2).unsqueeze(-1).float()], dim=-1).contiguous()
    if dist.get_backend(group) == "nccl":
        # ranks' buffers one after the other along the first axis (the layout both NCCL and gloo accept)
        flat = torch.empty((world * buf.shape[0], *buf.shape[1:]), dtype=buf.dtype, device=buf.device)
        _all_gather_flat(flat, buf, group)
        gathered = flat.view(world, *buf.shape)
    else:
        gathered = torch.empty((world, *buf.shape), dtype=buf.dtype, device=buf.device)
        dist.all_gather(list(gathered.unbind(0)), buf, group=group)
    o, l = merge_stack(gathered[..., :-1], gathered[..., -1])
    return o, l.transpose(1, 2).contiguous()


def sharded_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    shard_start,
    seqlens_total,
    group=None,
    block_table: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    q_scaling: float = 1.0,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    alibi_mode: str = "alibi",
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    return_lse: bool = False,
    impl=None,
):
    """Decode over a KV cache sharded by position across the ranks of ``group``.

    Args:
        q: ``[B, Sq, Hq, D]``, the new tokens' queries, the same on every rank; they sit at global positions
            ``seqlens_total − Sq … seqlens_total − 1``.
        k_cache: this rank's cache, contiguous ``[B, max_len, Hkv, D]`` or a paged pool (see `attn.decode`).
        v_cache: like k_cache.
        cache_seqlens: int32 ``[B]``, tokens of each sequence held by this rank (0 allowed).
        shard_start: ``[B]`` ints (list or tensor): the global position of this rank's first token of each
            sequence.
        seqlens_total: ``[B]`` ints: each sequence's length over all ranks (the new tokens included).
        group: the context-parallel process group (default: the world).
        block_table: int32 ``[B, max_blocks]`` for a paged pool.
        causal, softmax_scale, q_scaling, window_size, softcap, alibi_slopes, alibi_mode, k_scale, v_scale: as
            in `attn.decode`, in global positions.
        return_lse: also return the merged log-sum-exp.
        impl: the decode function (default `attn.decode`).

    Returns:
        ``out [B, Sq, Hq, D]`` in q's dtype, the same on every rank; with ``return_lse`` also float32
        ``lse [B, Hq, Sq]``.
    """
    if impl is None:
        from ..fast import decode as impl
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Sq, Hq, D], got {tuple(q.shape)}")
    if alibi_slopes is not None and alibi_mode == "alibi_with_scale" and softcap > 0:
        raise ValueError("sharded_decode cannot combine alibi_mode='alibi_with_scale' with softcap > 0")
    batch, sq, hq, d = q.shape
    L, R = _mask_bounds(causal, window_size)
    kwargs = dict(
        block_table=block_table, softmax_scale=softmax_scale, q_scaling=q_scaling, softcap=softcap,
        alibi_mode=alibi_mode, k_scale=k_scale, v_scale=v_scale, return_lse=True,
    )  # fmt: skip
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.float().expand(batch, hq) if alibi_slopes.dim() == 1 else alibi_slopes.float()
    if L is None and (R is None or sq == 1):
        # every cached key is visible to every query, wherever the shard sits: one call, e stays on the device
        out, lse = impl(q, k_cache, v_cache, cache_seqlens, alibi_slopes=slopes, **kwargs)
        if slopes is not None:
            dev = cache_seqlens.device
            start = torch.as_tensor(shard_start, device=dev)
            e = torch.as_tensor(seqlens_total, device=dev) - start - cache_seqlens
            lse = lse - (slopes * e[:, None].float())[..., None] * _alibi_shift(alibi_mode, softmax_scale, q_scaling, d)
    else:
        lens = _host_ints(cache_seqlens, batch, "cache_seqlens")
        starts = _host_ints(shard_start, batch, "shard_start")
        totals = _host_ints(seqlens_total, batch, "seqlens_total")
        out = torch.zeros_like(q)
        lse = torch.full((batch, hq, sq), float("-inf"), dtype=torch.float32, device=q.device)
        # sequences grouped by (queries that see the shard, kernel window); e per sequence for ALiBi
        groups: dict[tuple[int, tuple[int, int]], list[tuple[int, int]]] = {}
        for b in range(batch):
            e = totals[b] - (starts[b] + lens[b])
            if lens[b] == 0:
                continue
            if e < 0:
                raise ValueError(f"sequence {b}: this rank's shard ends at {starts[b] + lens[b]}, past seqlens_total")
            # with a left window only the first m queries may reach back to this shard: they end e' = e − (Sq − m)
            # positions after it, which keeps the kernel's left reach L − e' ≥ 0
            m = sq if L is None else min(sq, L - e + sq)
            if m <= 0:
                continue
            e -= sq - m
            window = (-1 if L is None else L - e, -1 if R is None else R + e)
            groups.setdefault((m, window), []).append((b, e))
        for (m, window), members in groups.items():
            ix = torch.tensor([b for b, _ in members], device=q.device)
            # a contiguous cache is a pool of one-row blocks: a subset of sequences is a subset of table rows
            table = block_table if block_table is not None else torch.arange(batch, device=q.device).view(-1, 1)
            kw = dict(kwargs, block_table=table[ix].to(torch.int32))
            o, l = impl(q[ix, :m], k_cache, v_cache, cache_seqlens[ix], window_size=window,
                        alibi_slopes=None if slopes is None else slopes[ix], **kw)  # fmt: skip
            if slopes is not None:
                e = torch.tensor([e for _, e in members], device=q.device, dtype=torch.float32)
                l = l - (slopes[ix] * e[:, None])[..., None] * _alibi_shift(alibi_mode, softmax_scale, q_scaling, d)
            out[ix, :m], lse[ix, :, :m] = o, l
    out, lse = all_gather_merge(out, lse, group)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _alibi_shift(mode: str, softmax_scale, q_scaling: float, head_dim: int) -> float:
    if mode != "alibi_with_scale":
        return 1.0
    return (1.0 / head_dim**0.5 if softmax_scale is None else softmax_scale) / q_scaling


class ShardedKVCache:
    """A context-parallel KV cache: rank ``r`` stores positions ``[r·shard_len, (r+1)·shard_len)`` of every
    sequence in its own cache object (`attn.ContiguousKVCache` or `attn.PagedKVCache`).

    Every rank makes the same calls with the same (replicated) arguments; each keeps only its part. An append
    writes a token on the rank that owns its position (`owner`), so a growing sequence fills rank 0's shard,
    then rank 1's, and so on.

    Args:
        local: this rank's cache object, able to hold ``shard_len`` tokens per sequence.
        shard_len: positions per rank.
        group: the context-parallel process group (default: the world).
    """

    def __init__(self, local, *, shard_len: int, group=None):
        if not isinstance(shard_len, int) or shard_len < 1:
            raise ValueError(f"shard_len must be a positive int, got {shard_len!r}")
        cap = getattr(local, "max_len", None) or local.max_blocks_per_seq * local.block_size
        if cap < shard_len:
            raise ValueError(f"local holds {cap} tokens per sequence, fewer than shard_len={shard_len}")
        self.local, self.shard_len, self.group = local, shard_len, group
        self.rank, self.world = _group_info(group)
        self._total: dict[int, int] = {}

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold over all ranks."""
        return self.shard_len * self.world

    def add_sequence(self) -> int:
        slot = self.local.add_sequence()
        self._total[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.local.release(slot)
        del self._total[slot]

    def length(self, slot: int) -> int:
        """The sequence's length over all ranks."""
        return self._total[slot]

    def owner(self, slot: int) -> int:
        """The rank that stores the sequence's next token."""
        return self._total[slot] // self.shard_len

    def append(self, slots: Sequence[int], k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Appends ``k_new, v_new [len(slots), S_new, Hkv, D]`` (the same on every rank); this rank writes the
        tokens whose positions it owns.

        Raises:
            ValueError: an unknown slot, or a sequence that would outgrow `capacity`; nothing is written then.
        """
        slots = list(slots)
        if k_new.dim() != 4 or k_new.shape[0] != len(slots) or v_new.shape != k_new.shape:
            raise ValueError(f"k_new and v_new must be [len(slots)={len(slots)}, S_new, Hkv, D], got "
                             f"{tuple(k_new.shape)} and {tuple(v_new.shape)}")  # fmt: skip
        for s in slots:
            if s not in self._total:
                raise ValueError(f"slot {s} is not a live sequence")
        n = k_new.shape[1]
        over = [s for s in slots if self._total[s] + n > self.capacity]
        if over:
            raise ValueError(f"sequence slots {over} would outgrow the capacity {self.capacity}")
        lo, hi = self.rank * self.shard_len, (self.rank + 1) * self.shard_len
        mine, ks, vs, lens = [], [], [], []
        for i, s in enumerate(slots):
            a, b = max(self._total[s], lo), min(self._total[s] + n, hi)
            if a < b:
                mine.append(s)
                ks.append(k_new[i, a - self._total[s] : b - self._total[s]])
                vs.append(v_new[i, a - self._total[s] : b - self._total[s]])
                lens.append(b - a)
        if mine:
            cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(k_new.device)
            self.local.append(mine, torch.cat(ks), torch.cat(vs), cu)
        for s in slots:
            self._total[s] += n

    def decode(self, q: torch.Tensor, slots: Sequence[int], **kwargs):
        """`sharded_decode` of ``q [len(slots), Sq, Hq, D]`` over these sequences; kwargs as there."""
        slots = list(slots)
        seqlens, table = self.local.metadata(slots)
        start = [self.rank * self.shard_len] * len(slots)
        total = [self._total[s] for s in slots]
        return sharded_decode(q, self.local.k, self.local.v, seqlens, block_table=table, shard_start=start,
                              seqlens_total=total, group=self.group, **self.local.scales, **kwargs)  # fmt: skip
