"""Exact merging of partial attention results by their log-sum-exp.

If a row's keys are split into two disjoint sets with partial results ``(o₁, ℓ₁)`` and ``(o₂, ℓ₂)`` (each ``o``
the softmax-weighted mean of its set's values, each ``ℓ`` the log of its set's softmax denominator), then the
result over the union is ``ℓ = log(e^ℓ₁ + e^ℓ₂)`` and ``o = e^(ℓ₁−ℓ)·o₁ + e^(ℓ₂−ℓ)·o₂``. A set that holds no
visible key has ``ℓ = −inf`` and weight zero; a row with no visible key at all stays ``o = 0, ℓ = −inf``.
"""

from __future__ import annotations

import torch


def _weights(lse: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    # exp(lse − total) with rows that see nothing anywhere (total = −inf) kept at weight 0 instead of nan
    return torch.exp(lse - torch.where(torch.isneginf(total), torch.zeros_like(total), total))


def _check_parts(outs, lses, out_name: str, lse_name: str) -> None:
    """``outs [..., rows..., D]`` and ``lses [..., rows...]`` float tensors of matching shapes on one device."""
    for name, x in ((out_name, outs), (lse_name, lses)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if outs.dim() < 1 or outs.shape[:-1] != lses.shape:
        raise ValueError(
            f"{out_name} must be {lse_name}'s shape plus the head dim, got {tuple(outs.shape)} and {tuple(lses.shape)}"
        )
    if outs.device != lses.device:
        raise ValueError(f"{out_name} and {lse_name} must be on one device, got {outs.device} and {lses.device}")


def merge_into(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Folds a partial result into an accumulator, in place.

    Args:
        out: float32 ``[T, H, D]``, the accumulated output (rows that saw nothing yet are 0).
        lse: float32 ``[H, T]``, its log-sum-exp (``-inf`` where nothing was seen yet).
        part_out: ``[T, H, D]``, a partial output over other keys (any float dtype).
        part_lse: float32 ``[H, T]``, its log-sum-exp.
    """
    # lse is [H, T] against the outputs' [T, H, D]: checked as their transposes
    _check_parts(out, lse.T if isinstance(lse, torch.Tensor) and lse.dim() == 2 else lse, "out", "lse")
    _check_parts(part_out, part_lse.T if isinstance(part_lse, torch.Tensor) and part_lse.dim() == 2 else part_lse,
                 "part_out", "part_lse")  # fmt: skip
    if out.dtype != torch.float32 or lse.dtype != torch.float32:
        raise TypeError(f"out and lse accumulate in float32, got {out.dtype} and {lse.dtype}")
    if part_out.shape != out.shape or part_out.device != out.device:
        raise ValueError(f"part_out must match out {tuple(out.shape)} on {out.device}, got {tuple(part_out.shape)} on "
                         f"{part_out.device}")  # fmt: skip
    total = torch.logaddexp(lse, part_lse)
    w_old = _weights(lse, total).T.unsqueeze(-1)  # [T, H, 1]
    w_new = _weights(part_lse, total).T.unsqueeze(-1)
    # two passes over the accumulator, no temporaries of its size (addcmul_ widens part_out as it reads it)
    out.mul_(w_old).addcmul_(part_out, w_new)
    lse.copy_(total)


def merge_stack(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges N partial results over disjoint key sets.

    Args:
        outs: ``[N, *rows, D]`` partial outputs.
        lses: ``[N, *rows]`` their log-sum-exps.

    Returns:
        float32 ``(out [*rows, D], lse [*rows])``.
    """
    _check_parts(outs, lses, "outs", "lses")
    if outs.dim() < 2 or outs.shape[0] < 1:
        raise ValueError(f"outs must stack at least one partial result [N >= 1, *rows, D], got {tuple(outs.shape)}")
    total = torch.logsumexp(lses.float(), dim=0)
    w = _weights(lses.float(), total)
    return (w.unsqueeze(-1) * outs.float()).sum(0), total
