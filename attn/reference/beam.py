"""Beam search over a KV cache, the TensorRT-LLM way: one cache row per beam and an indirection table.

Beam search keeps ``beam_width`` candidate continuations per request. After every step it keeps the best
``beam_width`` extensions, and several of them may extend the same old beam while others are dropped: new beam
``j`` continues old beam ``parents[b, j]``. Its history is now its parent's, but the cache rows are not moved.
Instead ``cache_indirection int32 [B, beam_width, max_len]`` records, for each beam and each token position, the
beam whose cache row holds that token; `attn.reference.decode` reads token ``t`` of beam ``i`` from row
``b·beam_width + cache_indirection[b, i, t]``.

Updating the table after a step is a gather over the beam axis: new beam ``j`` takes its parent's row of the
table, and the token it is about to write is its own, so that entry points at ``j`` itself.

The timeline of one generation step of a request whose caches hold ``L`` tokens (the prompt and the tokens
generated so far; each beam holds its own tokens in its own row, at their positions):

1. decode the beams' newest tokens over ``L`` cached tokens; sample and keep the best extensions:
   ``parents [B, beam_width]`` and the tokens chosen for position ``L``;
2. ``update_indirection(table, parents, step=L)``: beam ``j`` now reads tokens ``0..L-1`` where its parent did,
   and token ``L`` from its own row;
3. the next decode step runs the chosen tokens through the model: ``append_kv`` writes their K/V at position
   ``step = L`` of each beam's own row (``cache_seqlens = L`` as the starting length), and ``decode`` reads
   ``L + 1`` tokens (``cache_seqlens = L + 1``) through the updated table.

So ``step`` is the position of the token the new beams are about to write: the cache length before that
append, which is also the ``cache_seqlens`` entry that ``append_kv`` starts from.
"""

from __future__ import annotations

import torch

from ..checks import check_update_indirection


def update_indirection(
    cache_indirection: torch.Tensor,
    parents: torch.Tensor,
    step: int | torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """The indirection table after a beam-search step reordered the beams (TensorRT-LLM's update).

    New beam ``j`` of request ``b`` continues old beam ``p = parents[b, j]``::

        new[b, j, t]    = old[b, p, t]   for every t != step
        new[b, j, step] = j

    Entries before ``step`` are the history the new beam inherits; the entry at ``step`` names the beam's own
    row, where its next token is about to be appended; entries after ``step`` are copied from the parent too but
    never read (decode reads ``cache_seqlens <= step + 1`` tokens). No K/V moves: only this int32 table.

    Args:
        cache_indirection: int32 ``[B, beam_width, max_len]``, the table before the step.
        parents: int32 ``[B, beam_width]``: new beam ``j`` of request ``b`` continues old beam ``parents[b, j]``,
            a value in ``[0, beam_width)``.
        step: the position of the token the new beams are about to write: the cache length before that append,
            i.e. the ``cache_seqlens`` that ``append_kv`` starts from (decode then reads ``step + 1`` tokens).
            An int for the whole batch, or int32 ``[B]`` for requests at different lengths; in ``[0, max_len)``.
        out: int32 ``[B, beam_width, max_len]`` to write into; a new tensor if None. It must not share memory with
            ``cache_indirection``: the update is a gather across beams, so in place a beam could read a row
            that another beam has already overwritten. Keep two tables and swap them every step.
        validate: check the parents and per-request steps on the host (reads them). Turn it off only for inputs
            already checked; the kernel then writes -1 for a beam whose parent is out of range, which decode's
            own validation rejects.

    Returns:
        the new table, int32 ``[B, beam_width, max_len]`` (``out`` when given).
    """
    batch, beam, _ = check_update_indirection(cache_indirection, parents, step, out, validate)
    if out is None:
        out = torch.empty_like(cache_indirection)
    steps = step.tolist() if isinstance(step, torch.Tensor) else [step] * batch
    for b in range(batch):
        for j in range(beam):
            out[b, j] = cache_indirection[b, int(parents[b, j])]
            out[b, j, steps[b]] = j
    return out
