"""How a packed batch of sequences is split across the ranks of a context-parallel group.

A plan lists, for every rank, the pieces of sequences it holds (`Segment`: sequence, first and one-past-last
position), in the order they sit in that rank's local tensors. Every token of every sequence belongs to exactly one
rank; a rank may hold nothing. Positions stay global: a segment knows where its tokens sit in their sequence,
which is what masks, windows and ALiBi need.

Two standard plans:

- `contiguous_plan`: rank ``r`` holds the ``r``-th slice of each sequence (optionally with explicit cut points,
  for uneven shards). Causal attention is unbalanced: the last rank's queries see every key, the first rank's
  only their own.
- `zigzag_plan`: each sequence is cut into ``2N`` chunks and rank ``r`` holds chunks ``r`` and ``2N−1−r``, an
  early one and a late one, so every rank gets the same causal work (to within one token per chunk).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, end)`` of sequence ``seq`` (positions within that sequence)."""

    seq: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


class ShardPlan:
    """Which tokens of a packed batch each rank holds.

    Args:
        seqlens: the length of every sequence of the packed batch.
        segments: per rank, its segments in local order (sorted by sequence, then position; empty ones are
            dropped).

    Raises:
        ValueError: a segment outside its sequence, segments out of order, or tokens held by no rank or by two.
    """

    def __init__(self, seqlens: Sequence[int], segments: Sequence[Sequence[Segment]]):
        self.seqlens = tuple(int(n) for n in seqlens)
        if any(n < 0 for n in self.seqlens):
            raise ValueError(f"seqlens must be >= 0, got {self.seqlens}")
        if len(segments) < 1:
            raise ValueError("segments must list at least one rank")
        self.segments = tuple(tuple(s for s in rank if s.length > 0) for rank in segments)
        held = [[] for _ in self.seqlens]
        for r, segs in enumerate(self.segments):
            keys = [(s.seq, s.start) for s in segs]
            if keys != sorted(keys):
                raise ValueError(f"segments of rank {r} must be sorted by (seq, start), got {segs}")
            for s in segs:
                if not (0 <= s.seq < len(self.seqlens) and 0 <= s.start < s.end <= self.seqlens[s.seq]):
                    raise ValueError(f"segment {s} of rank {r} lies outside its sequence (seqlens {self.seqlens})")
                held[s.seq].append((s.start, s.end))
        for b, spans in enumerate(held):
            pos = 0
            for start, end in sorted(spans):
                if start != pos:
                    raise ValueError(f"sequence {b}: tokens from {min(start, pos)} are held by no rank or by two")
                pos = end
            if pos != self.seqlens[b]:
                raise ValueError(f"sequence {b}: tokens {pos}..{self.seqlens[b]} are held by no rank")
        # where each sequence starts in the global packed tensor, and each segment in its rank's local tensor
        self.cu_seqlens = [0]
        for n in self.seqlens:
            self.cu_seqlens.append(self.cu_seqlens[-1] + n)
        self.offsets = []
        for segs in self.segments:
            offs, o = [], 0
            for s in segs:
                offs.append(o)
                o += s.length
            self.offsets.append(tuple(offs))

    @property
    def world_size(self) -> int:
        return len(self.segments)

    @property
    def num_seqs(self) -> int:
        return len(self.seqlens)

    def local_len(self, rank: int) -> int:
        """Tokens held by ``rank``."""
        return sum(s.length for s in self.segments[rank])

    def global_index(self, rank: int, device=None) -> torch.Tensor:
        """int64 ``[local_len]``: the row of the global packed tensor behind each local row of ``rank``."""
        idx = [
            torch.arange(self.cu_seqlens[s.seq] + s.start, self.cu_seqlens[s.seq] + s.end) for s in self.segments[rank]
        ]
        return torch.cat(idx).to(device) if idx else torch.zeros(0, dtype=torch.int64, device=device)

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """int64 ``[local_len]``: each local token's position within its sequence (for RoPE and plots)."""
        pos = [torch.arange(s.start, s.end) for s in self.segments[rank]]
        return torch.cat(pos).to(device) if pos else torch.zeros(0, dtype=torch.int64, device=device)

    def shard(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """The local rows of ``rank`` from a global packed tensor ``x [T, ...]`` (a copy)."""
        if x.shape[0] != self.cu_seqlens[-1]:
            raise ValueError(f"x must have {self.cu_seqlens[-1]} rows (the packed batch), got {x.shape[0]}")
        return x[self.global_index(rank, x.device)]

    def unshard(self, parts: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
        """The global packed tensor from every rank's local tensor (``parts[r]``), rows along ``dim``."""
        if len(parts) != self.world_size:
            raise ValueError(f"parts must hold one tensor per rank ({self.world_size}), got {len(parts)}")
        ref = parts[0]
        shape = list(ref.shape)
        shape[dim] = self.cu_seqlens[-1]
        out = ref.new_zeros(shape)
        for r, p in enumerate(parts):
            out.index_copy_(dim, self.global_index(r, p.device), p)
        return out

    def cu_seqlens_local(self, rank: int, device=None) -> torch.Tensor:
        """int32 ``[B+1]`` of ``rank``'s local tensor seen as a packed batch of its pieces of every sequence."""
        lens = [0] * self.num_seqs
        for s in self.segments[rank]:
            lens[s.seq] += s.length
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        return torch.tensor(cu, dtype=torch.int32, device=device)

    def __repr__(self) -> str:
        ranks = "; ".join(
            f"rank {r}: " + (", ".join(f"s{s.seq}[{s.start}:{s.end}]" for s in segs) or "-")
            for r, segs in enumerate(self.segments)
        )
        return f"ShardPlan({ranks})"


# far past any job's rank count: plans are lists per rank, built on the host
MAX_WORLD = 2**16


def _check_world(world_size) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or not 1 <= world_size <= MAX_WORLD:
        raise ValueError(f"world_size must be an int in [1, {MAX_WORLD}], got {world_size!r}")


def contiguous_plan(seqlens: Sequence[int], world_size: int, cuts: Sequence[Sequence[int]] | None = None) -> ShardPlan:
    """Rank ``r`` holds the ``r``-th contiguous slice of every sequence.

    Args:
        seqlens: sequence lengths.
        world_size: ranks N.
        cuts: optional per sequence N+1 non-decreasing cut points from 0 to its length (uneven shards; equal cut
            points give a rank no tokens). Default: as even as possible.
    """
    _check_world(world_size)
    segs = [[] for _ in range(world_size)]
    for b, n in enumerate(seqlens):
        c = [r * n // world_size for r in range(world_size + 1)] if cuts is None else list(cuts[b])
        if len(c) != world_size + 1 or c[0] != 0 or c[-1] != n or any(x > y for x, y in zip(c, c[1:])):
            raise ValueError(f"cuts[{b}] must be {world_size + 1} non-decreasing points from 0 to {n}, got {c}")
        for r in range(world_size):
            segs[r].append(Segment(b, c[r], c[r + 1]))
    return ShardPlan(seqlens, segs)


def zigzag_plan(seqlens: Sequence[int], world_size: int) -> ShardPlan:
    """Each sequence in ``2N`` chunks (sizes differ by at most one); rank ``r`` holds chunks ``r`` and ``2N−1−r``.

    A sequence shorter than ``2N`` leaves some chunks empty, so some ranks hold none of its tokens.
    """
    _check_world(world_size)
    n_chunks = 2 * world_size
    segs = [[] for _ in range(world_size)]
    for b, n in enumerate(seqlens):
        c = [i * n // n_chunks for i in range(n_chunks + 1)]
        for r in range(world_size):
            lo, hi = r, n_chunks - 1 - r
            if c[lo + 1] == c[hi]:
                # the two chunks touch (middle rank, or an empty chunk between): one segment
                segs[r].append(Segment(b, c[lo], c[hi + 1]))
            else:
                segs[r] += [Segment(b, c[lo], c[lo + 1]), Segment(b, c[hi], c[hi + 1])]
    return ShardPlan(seqlens, segs)
