"""The metadata of one inflight-batching step: which rows of the packed buffer belong to which request.

A serving engine's step mixes **context** requests (a whole prompt, or the next chunk of one, on top of what is
already cached) and **generation** requests (one new token each). All their new tokens sit in one packed buffer
``[T, ...]``, request after request, in any order. `InflightBatch` is built once per step on the host from the
scheduler's lists and holds every device tensor the kernels need, so the attention itself reads nothing back.

TensorRT-LLM describes the same step with ``request_types`` (0 context, 1 generation), ``context_lengths`` and
``past_key_value_lengths``, and wants context requests first. Here ``new_tokens`` is what each request adds to
the buffer this step (a chunk's length; 1 for generation) and ``past_lengths`` what its cache held before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .checks import check_device
from .layout import new_token_positions

CONTEXT, GENERATION = 0, 1


@dataclass(frozen=True)
class InflightBatch:
    """One step's requests, validated, with their device metadata.

    Attributes:
        request_types: per request, ``CONTEXT`` (0) or ``GENERATION`` (1).
        new_tokens: per request, its rows in the packed buffer this step.
        past_lengths: per request, tokens cached before this step.
        cu_seqlens_new: int32 ``[B+1]``, prefix sums of ``new_tokens``: request ``b`` owns rows
            ``cu[b]:cu[b+1]``.
        cache_seqlens_before: int32 ``[B]``, ``past_lengths`` (where the new tokens are written, and their
            positions).
        cache_seqlens_after: int32 ``[B]``, ``past + new`` (what attention reads).
        block_table: int32 ``[B, max_blocks]``, each request's row of the paged cache's table; None for a
            contiguous cache whose row ``b`` is request ``b``.
        context_requests: int64 ``[Bc]``, the indices of the context requests (for per-phase launches).
        generation_requests: int64 ``[Bg]``, the indices of the generation requests.
        context_rows: int64 ``[Tc]``, the buffer rows of the context requests, in order.
        generation_rows: int64 ``[Bg]``, the buffer row of each generation request.
        cu_seqlens_context: int32 ``[Bc+1]``, prefix sums of the context requests' new tokens.
        token_seq: int32 ``[T]``, the request of each buffer row.
        token_positions: int32 ``[T]``, each buffer row's position in its sequence (past length + offset). Built
            here, once per step, so that no layer's call computes them again.
        num_tokens: T.
        max_new: the most new tokens of one request.
        max_context_new: the most new tokens of one context request (0 without any).
        max_seqlen: the longest cache after this step.
    """

    request_types: tuple[int, ...]
    new_tokens: tuple[int, ...]
    past_lengths: tuple[int, ...]
    cu_seqlens_new: torch.Tensor
    cache_seqlens_before: torch.Tensor
    cache_seqlens_after: torch.Tensor
    block_table: torch.Tensor | None
    context_requests: torch.Tensor
    generation_requests: torch.Tensor
    context_rows: torch.Tensor
    generation_rows: torch.Tensor
    cu_seqlens_context: torch.Tensor
    token_seq: torch.Tensor
    token_positions: torch.Tensor
    num_tokens: int
    max_new: int
    max_context_new: int
    max_seqlen: int

    @property
    def batch(self) -> int:
        return len(self.request_types)

    @classmethod
    def build(
        cls,
        request_types: Sequence[int],
        new_tokens: Sequence[int],
        past_lengths: Sequence[int],
        *,
        block_table: torch.Tensor | None = None,
        device=None,
    ) -> InflightBatch:
        """Validates the scheduler's per-request lists and builds the device metadata.

        Args:
            request_types: per request, 0 (context) or 1 (generation), in buffer order.
            new_tokens: per request, new tokens in the buffer this step: at least 1 for a context request,
                exactly 1 for a generation request.
            past_lengths: per request, tokens already cached: at least 1 for a generation request.
            block_table: int32 ``[B, max_blocks]``, the requests' rows of a paged cache's table (or the one-column
                table of `attn.kv_cache.ContiguousKVCache.metadata`); None when the cache is a contiguous
                ``[B, max_len, ...]`` tensor in request order.
            device: where the metadata lives; the block table's device by default.

        Raises:
            TypeError: a list entry that is not an int, or a block table that is not int32.
            ValueError: lists of different lengths, an unknown request type, a generation request without a cached
                prompt or with other than one new token, a context request with no new token, a block table
                with a row count other than B.
        """
        lists = {"request_types": request_types, "new_tokens": new_tokens, "past_lengths": past_lengths}
        for name, values in lists.items():
            if any(not isinstance(x, int) or isinstance(x, bool) for x in values):
                raise TypeError(f"{name} must hold ints, got {list(values)[:8]}")
        batch = len(request_types)
        if len(new_tokens) != batch or len(past_lengths) != batch:
            raise ValueError(
                f"request_types, new_tokens and past_lengths must have one entry per request, got lengths "
                f"{batch}, {len(new_tokens)} and {len(past_lengths)}"
            )
        for b, (kind, new, past) in enumerate(zip(request_types, new_tokens, past_lengths)):
            if kind not in (CONTEXT, GENERATION):
                raise ValueError(f"request_types[{b}] must be 0 (context) or 1 (generation), got {kind}")
            if past < 0:
                raise ValueError(f"past_lengths[{b}] must be >= 0, got {past}")
            if kind == GENERATION and new != 1:
                raise ValueError(f"new_tokens[{b}] of a generation request must be 1, got {new}")
            if kind == GENERATION and past < 1:
                raise ValueError(f"past_lengths[{b}]: a generation request needs a cache holding its prompt, got 0")
            if kind == CONTEXT and new < 1:
                raise ValueError(f"new_tokens[{b}] of a context request must be >= 1, got {new}")
            if past + new >= 2**31:
                # positions are int32 on the device
                raise ValueError(f"past_lengths[{b}] + new_tokens[{b}] must stay below 2^31, got {past + new}")
        if block_table is not None:
            if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32:
                raise TypeError("block_table must be an int32 torch.Tensor [B, max_blocks]")
            if block_table.dim() != 2 or block_table.shape[0] != batch:
                raise ValueError(f"block_table must be [B={batch}, max_blocks], got {tuple(block_table.shape)}")
            device = block_table.device if device is None else device
        device = check_device("device", "cpu" if device is None else device)

        def ints(values, dtype=torch.int32):
            return torch.tensor(list(values), dtype=dtype, device=device)

        cu = [0]
        for n in new_tokens:
            cu.append(cu[-1] + n)
        ctx = [b for b in range(batch) if request_types[b] == CONTEXT]
        gen = [b for b in range(batch) if request_types[b] == GENERATION]
        cu_ctx = [0]
        for b in ctx:
            cu_ctx.append(cu_ctx[-1] + new_tokens[b])
        after = [p + n for p, n in zip(past_lengths, new_tokens)]
        # each row's request and position, computed on the host, then one copy each
        seq, positions = new_token_positions(cu, torch.tensor(list(past_lengths), dtype=torch.int32))
        is_context = torch.tensor([t == CONTEXT for t in request_types], dtype=torch.bool)
        return cls(
            request_types=tuple(request_types),
            new_tokens=tuple(new_tokens),
            past_lengths=tuple(past_lengths),
            cu_seqlens_new=ints(cu),
            cache_seqlens_before=ints(past_lengths),
            cache_seqlens_after=ints(after),
            block_table=block_table,
            context_requests=ints(ctx, torch.int64),
            generation_requests=ints(gen, torch.int64),
            context_rows=torch.nonzero(is_context[seq]).flatten().to(device),
            generation_rows=ints([cu[b] for b in gen], torch.int64),
            cu_seqlens_context=ints(cu_ctx),
            token_seq=seq.to(device=device, dtype=torch.int32),
            token_positions=positions.to(device=device, dtype=torch.int32),
            num_tokens=cu[-1],
            max_new=max(new_tokens, default=0),
            max_context_new=max((new_tokens[b] for b in ctx), default=0),
            max_seqlen=max(after, default=0),
        )

    # plans (attn.plan)

    def plan(self, k_cache: torch.Tensor, v_cache: torch.Tensor, *, num_heads_q: int, num_heads_kv: int, **options):
        """An `attn.plan.GptAttentionPlan` of this step over ``k_cache``/``v_cache``."""
        from .plan import GptAttentionPlan

        return GptAttentionPlan(self, k_cache, v_cache, num_heads_q=num_heads_q, num_heads_kv=num_heads_kv, **options)
