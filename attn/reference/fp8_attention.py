"""FP8 prefill attention (issue 17 item 2), written to be read: the numerics the FP8 kernel implements.

Inputs are ``float8_e4m3fn`` with per-head descale factors, as FlashAttention-3 names them: the real values are
``q8 · q_descale`` etc. (``descale = 1 / scale`` of the quantizer). Each factor is ``[B, Hkv]`` float32, FA3's
shape: query head ``h`` uses the factor of its KV head ``h // (Hq // Hkv)``; ``None`` means 1.

Where it rounds (everything else is exact or float64 here; the kernel keeps it in float32):

1. The inputs are already rounded to e4m3 by whoever quantized them. Products of two e4m3 values are exact in
   float32, so ``q8·k8ᵀ`` is exact up to the order of the D additions (the tensor core adds in float32).
2. ``s = (q8·k8ᵀ) · q_descale · k_descale · softmax_scale``; masked scores are ``-inf``.
3. ``p = exp(s - m)`` with ``m`` the row max, so ``0 <= p <= 1``; the row sum ``l = Σ p`` uses these unrounded
   probabilities (as FA3 does).
4. **P is quantized to e4m3 before P·V**, because the second product runs on the FP8 tensor cores too:
   ``p8 = e4m3(p · P_SCALE)``, round to nearest even, with ``P_SCALE = 256``. The scale is a power of two (so it
   is exact and undone exactly) that puts ``p = 1`` at 256, inside e4m3's range (max 448). Unscaled, every
   ``p < 2^-10`` would round to zero (e4m3's smallest subnormal is 2^-9); scaled, only ``p < 2^-18`` does.
   A normal p8 carries 3 mantissa bits: its relative rounding error is at most 2^-4.
5. ``o = (p8·v8) · v_descale / (P_SCALE · l)``, then rounded to ``out_dtype`` (bf16 by default). A row that
   sees no key is zero.

The kernel computes ``m`` online, tile by tile: it quantizes ``p`` relative to the running max and rescales the
accumulator when the max grows, so its roundings in step 4 fall on different values than here (each still within
2^-4 relative, or 2^-18 absolute, of the exact p). tests/test_fp8_prefill.py turns that into its tolerance.
"""

from __future__ import annotations

import math

import torch

from ..checks import _is_number, check_flag
from .attention import _mix_values

P_SCALE = 256.0
FP8 = torch.float8_e4m3fn


def _descale(x: torch.Tensor | None, name: str, batch: int, num_heads_kv: int, device) -> torch.Tensor:
    if x is None:
        return torch.ones(batch, num_heads_kv, dtype=torch.float64, device=device)
    if not isinstance(x, torch.Tensor) or x.shape != (batch, num_heads_kv):
        raise ValueError(f"{name} must be a [B, Hkv] = [{batch}, {num_heads_kv}] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")  # fmt: skip
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {x.device}")
    return x.to(torch.float64)


def check_fp8_args(q, k, v, q_descale, k_descale, v_descale, out_dtype, causal=False, softmax_scale=None):
    """Shapes, dtypes, devices and options of an FP8 prefill call (shared with the kernel's wrapper). Returns
    (B, Sq, Sk, Hq, Hkv, D)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dtype != FP8 or x.dim() != 4:
            what = f"{x.dtype} with {x.dim()} dims" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{name} must be a 4-d float8_e4m3fn tensor [B, S, H, D], got {what}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    check_flag("causal", causal)
    if softmax_scale is not None and (
        not _is_number(softmax_scale) or not math.isfinite(softmax_scale) or softmax_scale <= 0
    ):
        raise ValueError(f"softmax_scale must be None or a positive finite number, got {softmax_scale!r}")
    b, sq, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v must be [B, Sk, Hkv, D] with q's B and D, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")  # fmt: skip
    hkv = k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's heads ({hq}) must be a multiple of k's heads ({hkv})")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    for name, x in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        _descale(x, name, b, hkv, q.device)
    return b, sq, k.shape[1], hq, hkv, d


def attention_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """FP8 prefill attention: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]`` in e4m3, output ``[B, Sq, Hq, D]``
    in ``out_dtype``. Causal is bottom-right aligned, as in `attention`. The numerics are the module's."""
    b, sq, sk, hq, hkv, d = check_fp8_args(q, k, v, q_descale, k_descale, v_descale, out_dtype, causal, softmax_scale)
    if sk == 0:
        # no key at all: every row sees none, and outputs zeros (the module's rule for a keyless row)
        return torch.zeros(b, sq, hq, d, dtype=out_dtype, device=q.device)
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    g = hq // hkv
    qd, kd, vd = (_descale(x, n, b, hkv, q.device) for x, n in
                  ((q_descale, "q_descale"), (k_descale, "k_descale"), (v_descale, "v_descale")))  # fmt: skip
    # [B, Hkv, G, Sq, D] and [B, Hkv, Sk, D]: the query heads of one KV head side by side, K/V never copied per head
    qh = q.double().view(b, sq, hkv, g, d).permute(0, 2, 3, 1, 4)
    kh, vh = (x.double().permute(0, 2, 1, 3) for x in (k, v))
    s = torch.einsum("bhgqd,bhkd->bhgqk", qh, kh) * (qd * kd * scale)[:, :, None, None, None]
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        j = torch.arange(sk, device=q.device)[None, :]
        visible = j <= i
        s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # a row with no key: p = 0 everywhere, not NaN
    p = torch.exp(s - m)
    l_sum = p.sum(-1, keepdim=True)
    p8 = (p * P_SCALE).to(FP8).double()  # step 4: the only rounding besides the inputs' and the output's
    # a value (e4m3fn's NaN code) reaches only the rows that see its key, and a row whose sum is NaN (a NaN
    # score) stays NaN: l = 0 only where a row has no weight, whose output is 0 (NaN where it sees a NaN value)
    o = _mix_values(p8, vh, visible, "bhgqk,bhkd->bhgqd", "qk,bhkd->bhqd", 2) * vd[:, :, None, None, None]
    o = torch.where(l_sum != 0, o / (P_SCALE * l_sum.clamp_min(1e-300)), o * 0)
    return o.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d).to(out_dtype)


def quantize_fp8(x: torch.Tensor, num_heads_kv: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch, KV head) e4m3 quantization of ``x [B, S, H, D]`` (a helper for tests and benchmarks): the
    amax of each (b, KV head group) maps to 448. Returns ``(x8, descale [B, Hkv])``."""
    b, s, h, d = x.shape
    hkv = h if num_heads_kv is None else num_heads_kv
    xg = x.float().view(b, s, hkv, h // hkv, d)
    amax = xg.abs().amax(dim=(1, 3, 4)) if xg.numel() else xg.new_ones(b, hkv)
    amax = amax.clamp_min(1e-12)
    scale = 448.0 / amax
    x8 = (xg * scale[:, None, :, None, None]).to(FP8).view(b, s, h, d)
    return x8, (1.0 / scale).float()
