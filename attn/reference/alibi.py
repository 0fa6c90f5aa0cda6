"""ALiBi slopes, as TensorRT-LLM's ``generate_alibi_slopes`` (FasterTransformer's form) defines them.

ALiBi (Press et al., 2022) adds ``slope_h · (j − i)`` to the scores instead of using position embeddings; the
kernels compute it from the slopes on the fly (``alibi_slopes=`` of ``attention`` and ``decode``). The slopes
form a geometric sequence per head. With ``p`` the largest power of two not above the head count, head ``h``
gets ``2^(−b·(h+1)/p)`` for ``h < p`` and ``2^(−b·(2(h−p)+1)/(2p))`` after that (the odd powers of the
sequence one would use for ``2p`` heads), with ``b = alibi_bias_max`` (8 in the paper and in Bloom).
"""

from __future__ import annotations

import math

import torch

from ..checks import _is_int, _is_number, check_device

# far past any model's head count (the slopes are a [num_heads] table)
MAX_HEADS = 2**16


def alibi_slopes(
    num_heads: int,
    *,
    tp_size: int = 1,
    tp_rank: int = 0,
    alibi_scale: float = 1.0,
    alibi_bias_max: float = 8.0,
    device=None,
) -> torch.Tensor:
    """The ALiBi slopes of a tensor-parallel rank's heads.

    Args:
        num_heads: the model's total query heads (before tensor parallelism).
        tp_size: tensor-parallel ranks; each holds ``num_heads / tp_size`` consecutive heads.
        tp_rank: this rank.
        alibi_scale: multiplies every slope.
        alibi_bias_max: ``b`` in the formula (8 in the ALiBi paper and Bloom).
        device: where to put the result.

    Returns:
        float32 ``[num_heads / tp_size]``.
    """

    def is_finite(x):
        return _is_number(x) and math.isfinite(x)

    if not _is_int(num_heads) or not 1 <= num_heads <= MAX_HEADS:
        raise ValueError(f"num_heads must be an int in [1, {MAX_HEADS}], got {num_heads!r}")
    if not _is_int(tp_size) or tp_size < 1 or num_heads % tp_size:
        raise ValueError(f"tp_size must be a positive int dividing num_heads={num_heads}, got {tp_size!r}")
    if not _is_int(tp_rank) or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must lie in [0, {tp_size}), got {tp_rank!r}")
    if not is_finite(alibi_scale):
        raise ValueError(f"alibi_scale must be a finite number, got {alibi_scale!r}")
    if not is_finite(alibi_bias_max) or not alibi_bias_max > 0:
        raise ValueError(f"alibi_bias_max must be a positive finite number, got {alibi_bias_max!r}")
    device = None if device is None else check_device("device", device)
    p = 2 ** math.floor(math.log2(num_heads))
    h = torch.arange(num_heads, dtype=torch.float64)
    exponent = torch.where(h < p, alibi_bias_max * (h + 1) / p, alibi_bias_max * (2 * (h - p) + 1) / (2 * p))
    slopes = (2.0**-exponent) * alibi_scale
    per_rank = num_heads // tp_size
    return slopes[tp_rank * per_rank : (tp_rank + 1) * per_rank].float().to(device)
