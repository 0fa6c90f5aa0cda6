"""Cross attention: decoder queries over the keys and values of an encoder's output, kept in a cross KV cache.

In an encoder-decoder model (T5, BART, Whisper) each decoder layer attends twice: causally to the decoder's
own tokens, then, without a mask, to the encoder's output. The encoder's keys and values are computed once per
request, stored in a *cross* cache (contiguous or paged, like any KV cache, filled with `append_kv` from an
empty cache) and read at every decoder step. Each request's cross cache holds ``encoder_lengths[b]`` tokens.
"""

from __future__ import annotations

import torch

from ..checks import check_encoder_lengths, check_flag
from .context import context_attention


def _check_cross(q, cu_seqlens_q, k_cache, block_table, encoder_lengths, validate):
    """The cross-specific checks (the rest is `context_attention`'s): errors name ``encoder_lengths``."""
    if isinstance(cu_seqlens_q, torch.Tensor):
        batch = cu_seqlens_q.numel() - 1
    else:
        batch = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 4 else -1
    if isinstance(block_table, torch.Tensor) and block_table.dim() == 2:
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1] if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 else 0
    device = q.device if isinstance(q, torch.Tensor) else None
    check_encoder_lengths(encoder_lengths, batch, capacity, validate, device)


def _as_packed(q, cu_seqlens_q):
    """Padded ``[B, Sq, Hq, D]`` queries as packed rows with their prefix sums (packed ones unchanged)."""
    if cu_seqlens_q is not None:
        return q, cu_seqlens_q
    if q.dim() != 4:
        raise ValueError(f"q must be padded [B, Sq, Hq, D] (or packed [T, Hq, D] with cu_seqlens_q), got {q.shape}")
    b, sq = q.shape[:2]
    cu = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    return q.reshape(b * sq, *q.shape[2:]), cu


def _like_q(q, cu_seqlens_q, out, lse, return_lse):
    """Packed results back in the queries' layout: ``out`` like q, ``lse`` ``[B, Hq, Sq]`` when q was padded."""
    if cu_seqlens_q is None:
        b, sq, hq = q.shape[:3]
        out, lse = out.view(q.shape), lse.view(hq, b, sq).permute(1, 0, 2)
    return (out, lse) if return_lse else out


def cross_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    encoder_lengths: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    q_scaling: float = 1.0,
    softcap: float = 0.0,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    return_lse: bool = False,
    validate: bool = True,
):
    """Decoder queries attending, unmasked, to their request's encoder keys and values.

    Args:
        q: padded ``[B, Sq, Hq, D]`` (every request has ``Sq`` decoder tokens this step) or packed ``[T, Hq, D]``
            with ``cu_seqlens_q``.
        k_cache: the cross cache: contiguous ``[B, max_len, Hkv, D]`` or a paged pool
            ``[num_blocks, block_size, Hkv, D]``; q's dtype, or int8 / float8_e4m3fn with the scales.
        v_cache: same shape and dtype as ``k_cache``.
        encoder_lengths: int32 ``[B]``, the encoder tokens of each request (TensorRT-LLM's
            ``encoder_input_lengths``).
        cu_seqlens_q: int32 ``[B+1]`` for packed queries.
        block_table: int32 ``[B, max_blocks]`` for a paged cross cache.
        softmax_scale: multiplier of the scores; defaults to ``1/sqrt(D)`` (T5 uses 1 via ``q_scaling``).
        q_scaling: TensorRT-LLM's divisor of the scale.
        softcap: if > 0, scores become ``softcap·tanh(s/softcap)``.
        k_scale: for an int8 / float8_e4m3fn cross cache, the K dequantization scale ``[1]`` or ``[Hkv]``.
        v_scale: likewise for V.
        return_lse: also return the log-sum-exp: ``[B, Hq, Sq]`` padded, ``[Hq, T]`` packed.
        validate: check lengths and block-table entries on the host.

    Returns:
        ``out`` shaped like q, and with ``return_lse`` the lse.
    """
    check_flag("return_lse", return_lse)
    _check_cross(q, cu_seqlens_q, k_cache, block_table, encoder_lengths, validate)
    rows, cu = _as_packed(q, cu_seqlens_q)
    out, lse = context_attention(
        rows, k_cache, v_cache, encoder_lengths, cu_seqlens_q=cu, block_table=block_table, causal=False,
        softmax_scale=softmax_scale, q_scaling=q_scaling, softcap=softcap, k_scale=k_scale, v_scale=v_scale,
        return_lse=True, validate=validate,
    )  # fmt: skip
    return _like_q(q, cu_seqlens_q, out, lse, return_lse)
