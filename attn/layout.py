"""Converters between the padded ``[B, S, ...]`` and packed ``[T, ...]`` (varlen) layouts.

Padded stores every sequence at the batch's longest length, so memory grows with ``B·max_len``. Packed
concatenates the sequences and describes them by ``cu_seqlens``, the int32 prefix sums of their lengths
(``[B+1]``, first entry 0), which is what FlashAttention's varlen functions and TensorRT-LLM's packed mode take.
"""

from __future__ import annotations

import torch


def cu_seqlens_from_lengths(seqlens: torch.Tensor) -> torch.Tensor:
    """Prefix sums of per-sequence lengths.

    Args:
        seqlens: int ``[B]``, the length of each sequence.

    Returns:
        int32 ``[B+1]`` with ``cu[0] = 0`` and ``cu[b+1] - cu[b] = seqlens[b]``.
    """
    if not isinstance(seqlens, torch.Tensor) or seqlens.dim() != 1:
        raise ValueError("seqlens must be a 1-D tensor of lengths")
    if seqlens.dtype.is_floating_point or seqlens.dtype == torch.bool:
        raise TypeError(f"seqlens must be an integer tensor, got {seqlens.dtype}")
    if (seqlens < 0).any():
        raise ValueError("seqlens must be non-negative")
    cu = torch.zeros(seqlens.numel() + 1, dtype=torch.int32, device=seqlens.device)
    cu[1:] = torch.cumsum(seqlens, 0).to(torch.int32)
    return cu


def unpad(x: torch.Tensor, seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Packs a padded batch, dropping the padding.

    Args:
        x: ``[B, S, ...]`` padded tensor.
        seqlens: int ``[B]``, the valid length of each row, each in ``[0, S]``.

    Returns:
        ``(packed, cu_seqlens, max_seqlen)``: ``packed`` is ``[T, ...]`` with ``T = sum(seqlens)``,
        ``cu_seqlens`` int32 ``[B+1]``, ``max_seqlen`` the longest length as a Python int.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be at least 2-D [B, S, ...], got shape {tuple(x.shape)}")
    if seqlens.shape != (x.shape[0],):
        raise ValueError(f"seqlens must have shape [B]=({x.shape[0]},), got {tuple(seqlens.shape)}")
    if (seqlens > x.shape[1]).any():
        raise ValueError(f"seqlens entries must be <= the padded length {x.shape[1]}")
    cu = cu_seqlens_from_lengths(seqlens)
    # [B, S] mask of the valid positions, in row-major order, so packing keeps sequence order
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < seqlens.to(x.device)[:, None]
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    return x[keep], cu, max_seqlen


def pad(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, value: float = 0.0) -> torch.Tensor:
    """Unpacks a packed tensor into a padded batch.

    Args:
        x: ``[T, ...]`` packed tensor.
        cu_seqlens: int32 ``[B+1]`` prefix sums of the lengths.
        max_seqlen: the padded length S; must be at least the longest sequence.
        value: what the padding holds.

    Returns:
        ``[B, max_seqlen, ...]``, sequence ``b`` in row ``b`` and ``value`` after its end.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence ({max(lengths)})")
    if int(cu_seqlens[-1]) != x.shape[0]:
        raise ValueError(f"cu_seqlens[-1] must equal x.shape[0]={x.shape[0]}, got {int(cu_seqlens[-1])}")
    out = x.new_full((len(lengths), max_seqlen, *x.shape[1:]), value)
    starts = cu_seqlens[:-1].tolist()
    for b, (start, n) in enumerate(zip(starts, lengths)):
        out[b, :n] = x[start : start + n]
    return out


def new_token_positions(new_bounds: list[int], cache_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For new tokens appended after cached ones: each token's sequence and its position in that sequence.

    Args:
        new_bounds: host list ``[B+1]``, prefix sums of the new tokens per sequence.
        cache_seqlens: int32 ``[B]``, tokens already cached per sequence.

    Returns:
        ``(seq, pos)``, int32 ``[T]`` each, on ``cache_seqlens``' device, computed without a host sync.
    """
    device = cache_seqlens.device
    total = new_bounds[-1]
    counts = torch.tensor([b - a for a, b in zip(new_bounds, new_bounds[1:])], dtype=torch.int64, device=device)
    seq = torch.repeat_interleave(torch.arange(len(counts), device=device), counts, output_size=total)
    starts = torch.tensor(new_bounds[:-1], dtype=torch.int64, device=device)
    pos = cache_seqlens.long()[seq] + torch.arange(total, device=device) - starts[seq]
    return seq.to(torch.int32), pos.to(torch.int32)


def device_token_positions(
    cu_seqlens_new: torch.Tensor, cache_seqlens: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`new_token_positions` without reading anything back to the host: each packed row's sequence is found by
    a binary search of ``cu_seqlens_new``, so the call can run inside CUDA-graph capture.

    Returns:
        ``(seq, pos)``, int32 ``[T]`` each, on ``cu_seqlens_new``'s device.
    """
    rows = torch.arange(num_tokens, dtype=torch.int32, device=cu_seqlens_new.device)
    # the sequence of row r is the b with cu[b] <= r < cu[b + 1]: the count of ends cu[1:] at or below r
    seq = torch.searchsorted(cu_seqlens_new[1:].contiguous(), rows, right=True)
    pos = cache_seqlens.long()[seq] + rows.long() - cu_seqlens_new.long()[seq]
    return seq.to(torch.int32), pos.to(torch.int32)
