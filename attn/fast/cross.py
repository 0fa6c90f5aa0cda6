"""Cross attention in Triton: the decode kernel for a step's few decoder tokens, the context kernel otherwise.

Same contract as `attn.reference.cross_attention`. A generation step brings one query per request over an
encoder cache of hundreds or thousands of tokens: memory-bound, the split-K decode kernel's case. A decoder
prompt (or teacher-forced training-style input) brings many: the fused context kernel, unmasked. The choice
depends on shapes only, so it costs no host read.
"""

from __future__ import annotations

import torch

from ..checks import check_flag
from ..reference.cross import _as_packed, _check_cross, _like_q
from . import _errors
from .context import context_attention
from .decode import decode

# up to this many decoder tokens per request, all of a KV head's query rows fit one decode tile
DECODE_MAX_TOKENS = 4


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
    validate: bool | None = None,
):
    """Decoder queries over their request's encoder keys and values; see `attn.reference.cross_attention`.

    ``validate`` as in `attn.fast.decode`: None (the default) reads nothing back unless ``ATTN_DEBUG=1``; the
    kernels clamp ``encoder_lengths`` into the cross cache and record it for `attn.check_errors`.
    """
    check_flag("return_lse", return_lse)
    validate = _errors.resolve_validate(validate)
    _check_cross(q, cu_seqlens_q, k_cache, block_table, encoder_lengths, validate)
    opts = dict(softmax_scale=softmax_scale, q_scaling=q_scaling, softcap=softcap, k_scale=k_scale, v_scale=v_scale,
                block_table=block_table, validate=validate)  # fmt: skip
    if cu_seqlens_q is None and q.dim() == 4 and q.shape[1] <= DECODE_MAX_TOKENS:
        return decode(q, k_cache, v_cache, encoder_lengths, causal=False, return_lse=return_lse, **opts)
    rows, cu = _as_packed(q, cu_seqlens_q)
    out, lse = context_attention(rows, k_cache, v_cache, encoder_lengths, cu_seqlens_q=cu, causal=False,
                                 return_lse=True, **opts)  # fmt: skip
    return _like_q(q, cu_seqlens_q, out, lse, return_lse)
