"""FlashAttention's Python entry points, with its names, defaults and return conventions, on attn's kernels.

Code written against ``flash_attn`` (2.x) runs unchanged with::

    from attn.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

The layouts and the mask conventions are FlashAttention's already (``[B, S, H, D]``, packed ``[T, H, D]`` with
int32 ``cu_seqlens``, bottom-right causal, ``window_size = (left, right)``, ``softcap``, ALiBi slopes ``[H]`` or
``[B, H]`` added as ``−slope·|i + Sk − Sq − j|`` under causal masks). What differs:

- Forward only: ``dropout_p`` must be 0 (a ValueError says so), and the outputs carry no autograd graph.
  ``deterministic`` is accepted: the forward pass is deterministic anyway.
- ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: FlashAttention returns its probability matrix
  ``S_dmask`` only with dropout, which is not supported here.
- ``softmax_lse`` is the natural-log log-sum-exp, ``[B, H, Sq]`` (padded) or ``[H, total_q]`` (varlen), ``-inf``
  for rows that see no key, whose output is zero.
- ``cache_leftpad`` is not supported (a ValueError).
- ``flash_attn_with_kvcache``'s rotary tables are checked as FlashAttention checks them (``[seqlen_ro,
  rotary_dim / 2]``, ``rotary_dim <= D``, ``seqlen_ro`` at least the cache's capacity), except that any float
  dtype is taken (they are applied in fp32) and rotary without new keys is allowed (the queries are turned).
  Every argument is checked before the append writes: a refused call leaves the cache as it was.
"""

from __future__ import annotations

import torch

import attn
from attn.checks import check_decode, check_flag
from attn.fast._triton import MAX_HEAD_DIM

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
]


def _check_common(dropout_p, window_size, alibi_slopes, causal, **flags) -> tuple[int, int]:
    """Checks what attn's own checks do not (``flags``: the entry's switches, which must be bools), and returns
    the window as attn takes it."""
    check_flag("causal", causal)
    for name, value in flags.items():
        check_flag(name, value)
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0: attn implements inference (no dropout), got {dropout_p}")
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size must be a (left, right) pair, got {window_size!r}")
    left, right = window_size
    if causal and right > 0:
        # FlashAttention lets causal override the right window (it sets it to 0); attn's checks reject the pair
        right = 0
    return (left, right)


def _alibi(alibi_slopes, causal):
    # FlashAttention adds −slope·|i + Sk − Sq − j|; under a causal mask only j <= i + Sk − Sq is visible and the
    # bias is slope·(j − (i + Sk − Sq)), attn's ALiBi. Without causality the absolute value has no attn form.
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor [H] or [B, H], got {type(alibi_slopes).__name__}")
    if not causal:
        raise ValueError("alibi_slopes are supported with causal=True only (attn's ALiBi is the causal form)")
    return alibi_slopes.float() if alibi_slopes.dtype != torch.float32 else alibi_slopes


def _result(out, lse, return_attn_probs):
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False,
):  # fmt: skip
    """``q [B, Sq, H, D]``, ``k, v [B, Sk, Hkv, D]`` → ``out [B, Sq, H, D]`` (and with ``return_attn_probs``
    ``(out, softmax_lse [B, H, Sq], None)``)."""
    window_size = _check_common(dropout_p, window_size, alibi_slopes, causal, deterministic=deterministic,
                                return_attn_probs=return_attn_probs)  # fmt: skip
    res = attn.attention(
        q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
        alibi_slopes=_alibi(alibi_slopes, causal), return_lse=return_attn_probs,
    )  # fmt: skip
    return _result(*res, True) if return_attn_probs else res


def flash_attn_qkvpacked_func(
    qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False,
):  # fmt: skip
    """``qkv [B, S, 3, H, D]``; otherwise `flash_attn_func`."""
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)  # fmt: skip


def flash_attn_kvpacked_func(
    q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False,
):  # fmt: skip
    """``kv [B, Sk, 2, Hkv, D]``; otherwise `flash_attn_func`."""
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)  # fmt: skip


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, block_table=None,
):  # fmt: skip
    """Packed ``q [total_q, H, D]``, ``k, v [total_k, Hkv, D]`` with int32 ``cu_seqlens_q/k [B+1]``; with
    ``block_table [B, max_blocks]``, ``k``/``v`` are paged pools ``[num_blocks, block_size, Hkv, D]`` and
    ``cu_seqlens_k`` gives each sequence's cached length. Returns ``out [total_q, H, D]`` (and with
    ``return_attn_probs`` ``(out, softmax_lse [H, total_q], None)``)."""
    window_size = _check_common(dropout_p, window_size, alibi_slopes, causal, deterministic=deterministic,
                                return_attn_probs=return_attn_probs)  # fmt: skip
    opts = dict(
        causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
        alibi_slopes=_alibi(alibi_slopes, causal), return_lse=return_attn_probs,
    )  # fmt: skip
    if block_table is None:
        res = attn.attention(
            q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, **opts,
        )  # fmt: skip
    else:
        if cu_seqlens_k is None or cu_seqlens_k.dim() != 1:
            raise ValueError("cu_seqlens_k must be an int32 [B+1] tensor of the cached lengths with block_table")
        lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
        res = attn.context_attention(
            q, k, v, lengths, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, block_table=block_table, **opts
        )
    return _result(*res, True) if return_attn_probs else res


def _check_rotary_tables(rotary_cos, rotary_sin, q, positions_needed):
    """FlashAttention's checks of the rotary tables (its ``mha_fwd_kvcache``), as TypeError/ValueError: float
    ``[seqlen_ro, rotary_dim / 2]`` tensors of one shape on q's device, ``rotary_dim <= D``, and ``seqlen_ro``
    covering every position a call within the cache's capacity can turn (``positions_needed``)."""
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [seqlen_ro, rotary_dim / 2], got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(
            f"rotary_sin must have rotary_cos's shape {tuple(rotary_cos.shape)}, got {tuple(rotary_sin.shape)}"
        )
    seqlen_ro, half = rotary_cos.shape
    if not 1 <= 2 * half <= q.shape[-1]:
        raise ValueError(f"rotary_cos's rotary_dim (2 x {half}) must be between 2 and q's head dim {q.shape[-1]}")
    if seqlen_ro < positions_needed:
        raise ValueError(
            f"rotary_cos must have at least {positions_needed} rows (every position this call can turn within the "
            f"cache's capacity), got {seqlen_ro}"
        )


def _rotate(x, cos, sin, positions, interleaved):
    """x ``[B, S, H, D]`` turned by the rows ``positions [B, S]`` of ``cos/sin [seqlen_ro, rotary_dim / 2]``:
    GPT-J pairs ``(2i, 2i+1)`` when interleaved, NeoX halves ``(i, i + rotary_dim/2)`` otherwise; in fp32,
    rounded once to x's dtype (as FlashAttention's rotary kernel)."""
    half = cos.shape[-1]
    rd = 2 * half
    # positions come from device lengths, unread here: a length past the cache's capacity (which the append
    # rejects or skips and records for `attn.check_errors`) must not index past the table, which on a GPU is a
    # device-side assert that ends the process's CUDA context
    positions = positions.clamp(0, cos.shape[0] - 1)
    c = cos[positions].float()[:, :, None, :]
    s = sin[positions].float()[:, :, None, :]
    xf = x.float()
    rot = xf[..., :rd]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        turned = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        turned = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return torch.cat([turned, xf[..., rd:]], dim=-1).to(x.dtype)


def flash_attn_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
    cache_leftpad=None, block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
):  # fmt: skip
    """Attention of ``q [B, Sq, H, D]`` over a KV cache, after appending ``k``/``v`` to it in place.

    Args (FlashAttention's):
        k_cache, v_cache: contiguous ``[B_cache, max_len, Hkv, D]`` or paged ``[num_blocks, block_size, Hkv, D]``
            with ``block_table``.
        k, v: ``[B, S_new, Hkv, D]`` written at positions ``cache_seqlens .. cache_seqlens + S_new − 1``.
        rotary_cos, rotary_sin: ``[seqlen_ro, rotary_dim / 2]``: the new keys are turned at their positions before
            they are written; the queries at ``cache_seqlens + i`` when causal or windowed, else all at
            ``cache_seqlens``.
        cache_seqlens: int or int32 ``[B]``, tokens in the cache before the append (None: the whole cache).
        cache_batch_idx: int32 ``[B]``, the cache row of each batch entry (contiguous caches).
        rotary_interleaved: GPT-J pairs (True) or NeoX halves (False).
        num_splits: 0 lets attn choose the split-K count; 1 turns splitting off; n > 1 forces n.

    Returns:
        ``out [B, Sq, H, D]``, and with ``return_softmax_lse`` also ``softmax_lse [B, H, Sq]``.
    """
    window_size = _check_common(0.0, window_size, alibi_slopes, causal, rotary_interleaved=rotary_interleaved,
                                return_softmax_lse=return_softmax_lse)  # fmt: skip
    if cache_leftpad is not None:
        raise ValueError("cache_leftpad is not supported by attn")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if type(num_splits) is not int or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [B, Sq, H, D], got shape {tuple(q.shape)}")
    batch, device = q.shape[0], q.device
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError("cache_batch_idx applies to contiguous caches; with block_table, order the table's rows")
    if cache_batch_idx is not None:
        if not isinstance(cache_batch_idx, torch.Tensor) or cache_batch_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cache_batch_idx must be an int32 tensor, got {getattr(cache_batch_idx, 'dtype', None)}")
        if cache_batch_idx.shape != (batch,):
            raise ValueError(f"cache_batch_idx must be [B={batch}], got shape {tuple(cache_batch_idx.shape)}")
        # a contiguous cache read through its rows is a paged cache whose blocks are whole rows
        block_table = cache_batch_idx.to(device=device, dtype=torch.int32).reshape(batch, 1)
    if cache_seqlens is None:
        if block_table is not None and cache_batch_idx is None:
            raise ValueError("cache_seqlens is required with block_table")
        cache_seqlens = k_cache.shape[1]
    if type(cache_seqlens) is int:
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor, got {getattr(cache_seqlens, 'dtype', None)}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must be [B={batch}], got shape {tuple(cache_seqlens.shape)}")
    if k is not None:
        # the shapes the rotation and the append take (the append checks the rest before it writes)
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.device != device:
                raise ValueError(f"{name} must be on q's device {device}, got {x.device}")
            if x.dim() != 4 or x.shape[0] != batch or x.shape != k.shape or x.shape[2:] != k_cache.shape[2:]:
                raise ValueError(
                    f"k and v must both be [B={batch}, S_new, Hkv, D] with the cache's Hkv and D "
                    f"{tuple(k_cache.shape[2:])}, got k {tuple(k.shape)}, v {tuple(v.shape)}"
                )
    seqlen_q, s_new = q.shape[1], 0 if k is None else k.shape[1]
    lengths = cache_seqlens + s_new if s_new else cache_seqlens
    # everything the decode step checks, checked before the append writes anything: a rejected call leaves the
    # cache as it was (the append checks its own arguments before it writes)
    args = check_decode(
        q, k_cache, v_cache, lengths, block_table=block_table, causal=causal, softmax_scale=softmax_scale,
        window_size=window_size, softcap=softcap, alibi_slopes=_alibi(alibi_slopes, causal),
        num_splits=None if num_splits == 0 else num_splits, validate=False,
    )  # fmt: skip
    if args.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q's head dim must be at most {MAX_HEAD_DIM} for the decode kernel, got {args.head_dim}")
    per_row = causal or tuple(window_size) != (-1, -1)
    if rotary_cos is not None:
        # within capacity, the new keys sit below it, the queries at cache_seqlens + i (causal or windowed; the
        # cache before the append holds capacity − s_new at most) or all at cache_seqlens
        _check_rotary_tables(rotary_cos, rotary_sin, q, args.capacity + max(0, (seqlen_q if per_row else 1) - s_new))
        offs = cache_seqlens.long()[:, None]
        if per_row:
            q = _rotate(q, rotary_cos, rotary_sin, offs + torch.arange(seqlen_q, device=device), rotary_interleaved)
        else:
            q = _rotate(q, rotary_cos, rotary_sin, offs.expand(batch, seqlen_q), rotary_interleaved)
    if k is not None:
        if rotary_cos is not None:
            pos = cache_seqlens.long()[:, None] + torch.arange(s_new, device=device)
            k = _rotate(k, rotary_cos, rotary_sin, pos, rotary_interleaved)
        attn.append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table=block_table)
    res = attn.decode(
        q, k_cache, v_cache, lengths, block_table=block_table, causal=causal, softmax_scale=softmax_scale,
        window_size=window_size, softcap=softcap, alibi_slopes=_alibi(alibi_slopes, causal),
        num_splits=None if num_splits == 0 else num_splits, return_lse=return_softmax_lse,
    )  # fmt: skip
    return res
