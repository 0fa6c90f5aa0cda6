"""T5's relative attention bias, in TensorRT-LLM's two modes, written to be read.

T5 (Raffel et al., 2020) replaces position embeddings with a learned scalar per head and per *bucket* of the
relative position ``rp = j − i``: small distances get a bucket each, larger ones share logarithmically wider
buckets up to ``max_distance``, beyond which all distances share the last bucket. T5 also drops the
``1/sqrt(D)`` scale (pass ``q_scaling = 1/sqrt(D)``, or ``softmax_scale=1``).

- Regular mode: the bias is given as a tensor ``[Hq, L, L]``, indexed by the query's and the key's positions.
- Implicit mode: only the table ``[Hq, num_buckets]`` and ``max_distance`` are given; the bias is looked up
  per score. Nothing of size ``Sq × Sk`` exists: that is the mode's point.

The query of row ``i`` sits at position ``i + Sk − Sq`` (bottom-right, as everywhere in attn), so a decode
step and a prefill see the same relative positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def t5_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's bucket of each relative position ``rp = key − query``.

    Bidirectional: half the buckets for keys after the query (``rp > 0``), half for the rest, by ``|rp|``.
    Unidirectional (decoder self-attention): only ``rp <= 0`` matters, by ``−rp``. Within a half of
    ``n`` buckets, distances below ``n/2`` map to themselves; larger ones to
    ``n/2 + floor(log(d / (n/2)) / log(max_distance / (n/2)) · (n − n/2))``, capped at ``n − 1``.

    Returns:
        long tensor shaped like ``relative_position``.
    """
    rp = relative_position.long()
    bucket = torch.zeros_like(rp)
    n = num_buckets
    if bidirectional:
        n //= 2
        bucket += (rp > 0).long() * n
        dist = rp.abs()
    else:
        dist = (-rp).clamp(min=0)
    exact = n // 2
    # the logarithmic buckets, computed in float32 as T5 does (bucket edges follow that rounding)
    log_ratio = torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (n - exact)).long()).clamp(max=n - 1)
    return bucket + torch.where(dist < exact, dist, far)


@dataclass(frozen=True)
class RelativeBias:
    """A T5-style relative attention bias: give ``table`` (implicit mode) or ``bias`` (regular mode).

    Attributes:
        table: float ``[Hq, num_buckets]``, implicit mode: one learned value per head and bucket.
        bias: float ``[Hq, L, L]``, regular mode: ``bias[h, query_pos, key_pos]`` with ``L`` covering the
            longest sequence.
        max_distance: implicit mode: distances from here on share the last bucket.
        bidirectional: implicit mode: encoder-style buckets (both directions) or decoder-style (past only).
    """

    table: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    max_distance: int = 128
    bidirectional: bool = True

    @property
    def implicit(self) -> bool:
        return self.table is not None

    def distance_table(self) -> torch.Tensor:
        """Implicit mode, as the kernels read it: float32 ``[Hq, 2·max_distance + 1]``, the bias of every
        relative position in ``[−max_distance, max_distance]``; farther ones share the end values.

        This is the bucket function evaluated once per distance instead of once per score: a few KB, and
        exactly the buckets of `t5_bucket`, with no risk of a GPU logarithm rounding a bucket edge
        differently.
        """
        rp = torch.arange(-self.max_distance, self.max_distance + 1, device=self.table.device)
        buckets = t5_bucket(
            rp, bidirectional=self.bidirectional, num_buckets=self.table.shape[1], max_distance=self.max_distance
        )
        return self.table.float()[:, buckets].contiguous()


def relative_bias_matrix(rel: RelativeBias, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """The bias one sequence's scores get: ``[Hq, Sq, Sk]`` (for the reference and for plots)."""
    q_pos = torch.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q)
    k_pos = torch.arange(seqlen_k)[None, :]
    if rel.implicit:
        rp = (k_pos - q_pos).to(rel.table.device)
        buckets = t5_bucket(rp, bidirectional=rel.bidirectional, num_buckets=rel.table.shape[1],
                            max_distance=rel.max_distance)  # fmt: skip
        return rel.table[:, buckets]
    return rel.bias[:, q_pos.clamp(min=0).to(rel.bias.device), k_pos.to(rel.bias.device)]
