"""The beam-search indirection update in Triton; same contract as `attn.reference.update_indirection`.

One program writes ``BLOCK_T`` positions of one new beam's row: it loads the beam's parent once, gathers that
parent's row of the old table and puts the beam's own index at ``step``. The update is a pure copy of
``B·beam_width·max_len`` int32 entries, bound by memory bandwidth, and tiny next to one decode step.

It runs out of place, from one table into another (TensorRT-LLM also keeps a source and a target table). In
place it would race: new beam ``j`` reads old row ``parents[b, j]`` while the program of new beam
``parents[b, j]`` may already be overwriting that row, and no order of programs is guaranteed. A beam-search
loop keeps two tables and swaps them after every step, which costs one extra table, not a copy per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..checks import check_update_indirection
from . import _errors
from ._triton import is_interpreter, next_power_of_2

PARENTS = tl.constexpr(_errors.PARENTS)


@triton.jit(do_not_specialize=["beam_width", "max_len", "step"])
def _update_indirection_kernel(
    src_ptr, parents_ptr, steps_ptr, out_ptr,
    stride_sb, stride_sw, stride_st, stride_pb, stride_pw, stride_ob, stride_ow, stride_ot,
    beam_width, max_len, step, err_ptr,
    PER_REQUEST_STEP: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    b = (row // beam_width).to(tl.int64)
    j = row % beam_width
    parent = tl.load(parents_ptr + b * stride_pb + j * stride_pw)
    # a parent outside the table (only possible with validate=False) reads nothing: its row becomes -1; a
    # per-request step outside [0, max_len) writes no beam index. Either is reported (attn.fast._errors) by the
    # row's first program
    in_range = (parent >= 0) & (parent < beam_width)
    ok = in_range
    if PER_REQUEST_STEP:
        step = tl.load(steps_ptr + b)
        ok = ok & (step >= 0) & (step < max_len)
    tl.atomic_or(err_ptr, PARENTS, mask=~ok & (tl.program_id(1) == 0), sem="relaxed")
    offs_t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < max_len
    # [BLOCK_T]
    src = tl.load(
        src_ptr + b * stride_sb + parent.to(tl.int64) * stride_sw + offs_t * stride_st,
        mask=t_mask & in_range,
        other=-1,
    )
    new = tl.where(offs_t == step, j, src)
    tl.store(out_ptr + b * stride_ob + j.to(tl.int64) * stride_ow + offs_t * stride_ot, new, mask=t_mask)


def update_indirection(
    cache_indirection: torch.Tensor,
    parents: torch.Tensor,
    step: int | torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """The indirection table after a beam-search step reordered the beams; same contract as
    `attn.reference.update_indirection`.

    Args:
        cache_indirection: int32 ``[B, beam_width, max_len]``, the table before the step.
        parents: int32 ``[B, beam_width]``: new beam ``j`` of request ``b`` continues old beam ``parents[b, j]``.
        step: the position of the token the new beams are about to write (the cache length before that append):
            an int, or int32 ``[B]`` per request; in ``[0, max_len)``.
        out: int32 ``[B, beam_width, max_len]`` to write into (a new tensor if None); never ``cache_indirection``
            itself: the gather cannot run in place (see the module's notes). Swap two tables every step.
        validate: True checks the parents and per-request steps on the host (reads them, waiting for the
            device). False reads nothing: a row whose parent or step is out of range becomes -1 and is recorded
            for `attn.check_errors`. None (the default) is False unless ``ATTN_DEBUG=1``.

    Returns:
        the new table, int32 ``[B, beam_width, max_len]`` (``out`` when given).
    """
    validate = _errors.resolve_validate(validate)
    batch, beam, max_len = check_update_indirection(cache_indirection, parents, step, out, validate)
    dev = cache_indirection.device
    if dev.type != "cuda" and not is_interpreter():
        raise ValueError(f"cache_indirection must be a CUDA tensor (or run with TRITON_INTERPRET=1), got device {dev}")
    if out is None:
        out = torch.empty_like(cache_indirection)
    if out.numel() == 0:
        return out
    per_request = isinstance(step, torch.Tensor)
    steps = step.contiguous() if per_request else parents
    block_t = min(1024, next_power_of_2(max_len))
    _update_indirection_kernel[(batch * beam, triton.cdiv(max_len, block_t))](
        cache_indirection, parents, steps, out,
        *cache_indirection.stride(), *parents.stride(), *out.stride(),
        beam, max_len, 0 if per_request else step, _errors.error_word(dev),
        PER_REQUEST_STEP=per_request, BLOCK_T=block_t,
    )  # fmt: skip
    return out
