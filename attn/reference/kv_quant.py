"""INT8 and FP8 (e4m3) KV-cache quantization, written to be read.

A quantized cache stores each K (and V) element as one byte and a float32 dequantization scale ``s`` per
tensor or per KV head: ``x ≈ stored · s``. Half the bytes of bf16, and decode is memory-bound, so up to twice
the speed. Symmetric INT8: ``stored = clamp(round(x / s), −127, 127)``. FP8 e4m3: ``stored = x / s`` rounded to
the nearest e4m3 value, saturating at ±448.

Scales, coarsest to finest: TensorRT-LLM's one per-tensor scale shared by K and V
(``kv_cache_scaling_factor``), separate K and V scales, and one scale per KV head (K and V each). Attention
reads the stored values, folds the K scale into the scores and the V scale into the output, so
dequantization costs a multiply per score, not per element.
"""

from __future__ import annotations

import torch

from ..checks import QUANT_DTYPES, QUANT_MAX


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Quantizes ``x [..., Hkv, D]`` with per-head scales ``[Hkv]`` (or one ``[1]``) to int8 or float8_e4m3fn.

    INT8 rounds with ``floor(y + 0.5)`` and divides by multiplying with the float32 reciprocal of the scale,
    exactly as the kernels do, so both produce the same bytes.
    """
    if dtype not in QUANT_DTYPES:
        raise TypeError(f"dtype must be one of {QUANT_DTYPES}, got {dtype}")
    inv = (1.0 / scale.float()).to(x.device)[:, None]  # [Hkv, 1]
    y = x.float() * inv
    limit = QUANT_MAX[dtype]
    if dtype == torch.int8:
        return torch.floor(y + 0.5).clamp(-limit, limit).to(torch.int8)
    return y.clamp(-limit, limit).to(dtype)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``stored · scale`` for ``x [..., Hkv, D]`` and scales ``[Hkv]`` (or ``[1]``), in ``dtype``."""
    return x.to(dtype) * scale.to(dtype).to(x.device)[:, None]


def calibrate_kv_scales(
    k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype, granularity: str = "head"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantization scales from sample keys and values ``[..., Hkv, D]``: the largest magnitude maps to the
    format's largest value (127 or 448).

    Args:
        k: sample keys.
        v: sample values.
        dtype: torch.int8 or torch.float8_e4m3fn.
        granularity: ``"tensor"`` (TensorRT-LLM: one scale shared by K and V), ``"kv"`` (one for K, one for V)
            or ``"head"`` (one per KV head, for K and for V).

    Returns:
        float32 ``(k_scale, v_scale)``, ``[1]`` each or ``[Hkv]`` each.
    """
    if dtype not in QUANT_DTYPES:
        raise TypeError(f"dtype must be one of {QUANT_DTYPES}, got {dtype}")
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor [..., Hkv, D], got {getattr(x, 'dtype', x)!r}")
        if x.dim() < 2 or x.numel() == 0:
            raise ValueError(f"{name} must be a non-empty [..., Hkv, D] sample, got shape {tuple(x.shape)}")
    if k.shape[-2:] != v.shape[-2:] or k.device != v.device:
        raise ValueError(f"k and v must share [Hkv, D] and a device, got {tuple(k.shape)} on {k.device} and "
                         f"{tuple(v.shape)} on {v.device}")  # fmt: skip
    limit = QUANT_MAX[dtype]
    hkv = k.shape[-2]

    def amax(x, per_head):
        x = x.float().abs().reshape(-1, hkv, x.shape[-1])
        return x.amax(dim=(0, 2)) if per_head else x.amax().reshape(1)

    if granularity == "tensor":
        shared = torch.maximum(amax(k, False), amax(v, False))
        k_amax = v_amax = shared
    elif granularity == "kv":
        k_amax, v_amax = amax(k, False), amax(v, False)
    elif granularity == "head":
        k_amax, v_amax = amax(k, True), amax(v, True)
    else:
        raise ValueError(f"granularity must be 'tensor', 'kv' or 'head', got {granularity!r}")
    # a NaN or an inf in the sample would make every scale of its group NaN or inf (a host read: calibration runs
    # once, offline)
    if not bool(torch.isfinite(k_amax).all() and torch.isfinite(v_amax).all()):
        raise ValueError("k and v must be finite: a NaN or ±inf sample gives no scale")
    # an all-zero sample would give a zero scale; any positive one represents zeros exactly
    return (k_amax / limit).clamp(min=1e-12), (v_amax / limit).clamp(min=1e-12)
