"""KV-cache objects: a contiguous cache, a paged cache with its block allocator, and converters from our
paged metadata to TensorRT-LLM's and FlashInfer's.

The caches only keep the bookkeeping (which sequence owns which rows or blocks, how many tokens each holds);
the tensors are plain attributes that the ``append_kv`` and ``decode`` functions read and write:

    cache = PagedKVCache(num_blocks=64, block_size=16, num_heads_kv=8, head_dim=128, max_seqs=4,
                         max_blocks_per_seq=16, dtype=torch.bfloat16, device="cuda")
    s = cache.add_sequence()
    cache.append([s], k_new, v_new)          # reserves blocks, writes K/V, advances the length
    seqlens, table = cache.metadata([s])
    out = attn.decode(q, cache.k, cache.v, seqlens, block_table=table)
    cache.release(s)                         # the blocks go back to the pool

The paged layout follows vLLM and FlashAttention: pools ``[num_blocks, block_size, Hkv, D]`` and an int32
``block_table [max_seqs, max_blocks_per_seq]`` whose row ``b`` lists the pool blocks of sequence ``b`` in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PoolExhaustedError(RuntimeError):
    """The block pool has fewer free blocks than a request needs."""


class BlockAllocator:
    """Hands out the block indices of a pool and takes them back.

    A free list, last freed first out: a block released by a finished sequence is the next one reused, while
    it may still be warm in the L2 cache.

    Args:
        num_blocks: the pool's size.
    """

    def __init__(self, num_blocks: int):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        """Takes ``n`` free blocks; all or nothing.

        Raises:
            PoolExhaustedError: fewer than ``n`` blocks are free.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > len(self._free):
            raise PoolExhaustedError(
                f"need {n} blocks but only {len(self._free)} of {self.num_blocks} are free: finish or evict "
                "sequences, or build the cache with more blocks"
            )
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Returns blocks to the pool.

        Raises:
            ValueError: a block that is not currently allocated (a double free, or not from this pool).
        """
        bad = [b for b in blocks if b not in self._used]
        if bad:
            raise ValueError(f"blocks {bad} are not allocated from this pool (double free?)")
        for b in reversed(list(blocks)):
            self._used.discard(b)
            self._free.append(b)


class _SequenceSlots:
    """Slot bookkeeping shared by both caches: which of the ``max_seqs`` rows are live."""

    def __init__(self, max_seqs: int, device):
        if not isinstance(max_seqs, int) or max_seqs < 1:
            raise ValueError(f"max_seqs must be a positive int, got {max_seqs!r}")
        self.max_seqs = max_seqs
        self.seqlens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self._lengths = [0] * max_seqs  # host copy: the bookkeeping never waits on the device
        self._live: set[int] = set()

    def add_sequence(self) -> int:
        """Claims a free sequence slot and returns its index.

        Raises:
            PoolExhaustedError: every slot is taken.
        """
        for s in range(self.max_seqs):
            if s not in self._live:
                self._live.add(s)
                self._set_length(s, 0)
                return s
        raise PoolExhaustedError(f"all {self.max_seqs} sequence slots are in use")

    def _check_live(self, slot: int) -> None:
        if slot not in self._live:
            raise ValueError(f"sequence slot {slot} is not in use (live slots: {sorted(self._live)})")

    def _set_length(self, slot: int, n: int) -> None:
        self._lengths[slot] = n
        self.seqlens[slot] = n

    def length(self, slot: int) -> int:
        self._check_live(slot)
        return self._lengths[slot]

    def advance(self, slots: Sequence[int], counts: Sequence[int]) -> None:
        """Counts ``counts[i]`` more tokens as cached in ``slots[i]``, after an operation that wrote them itself
        (`attn.gpt_attention`, `attn.preprocess`); pair it with `reserve_tokens` before that operation."""
        for s in slots:
            self._check_live(s)
        for s, n in zip(slots, counts):
            self._set_length(s, self._lengths[s] + n)

    @property
    def live(self) -> list[int]:
        return sorted(self._live)


class ContiguousKVCache(_SequenceSlots):
    """One row of ``max_len`` tokens per sequence slot: ``k, v [max_seqs, max_len, Hkv, D]``.

    Args:
        max_seqs: sequence slots.
        max_len: tokens each slot can hold.
        num_heads_kv: KV heads.
        head_dim: D.
        dtype: the cache's dtype.
        device: where the cache lives.
    """

    def __init__(self, *, max_seqs, max_len, num_heads_kv, head_dim, dtype=torch.float16, device="cpu"):
        super().__init__(max_seqs, device)
        self.max_len = max_len
        self.k = torch.zeros(max_seqs, max_len, num_heads_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def append(self, slots: Sequence[int], k_new, v_new, cu_seqlens_new=None, *, impl=None) -> None:
        """Writes new tokens for ``slots`` (padded ``[len(slots), S_new, Hkv, D]`` or packed with
        ``cu_seqlens_new``) after their cached tokens, and advances their lengths.

        Raises:
            ValueError: a slot that is not in use, or a sequence that would outgrow ``max_len``; nothing is
                written then.
        """
        for s in slots:
            self._check_live(s)
        counts = _new_counts(slots, k_new, cu_seqlens_new)
        seqlens, table = self.metadata(slots)
        _append_impl(impl)(self.k, self.v, k_new, v_new, seqlens, cu_seqlens_new=cu_seqlens_new, block_table=table)
        for s, n in zip(slots, counts):
            self._set_length(s, self._lengths[s] + n)

    def reserve_tokens(self, slots: Sequence[int], counts: Sequence[int]) -> None:
        """Checks that ``counts[i]`` more tokens fit in ``slots[i]`` (all or nothing); see `advance`.

        Raises:
            ValueError: a slot not in use, or a sequence that would outgrow ``max_len``.
        """
        for s in slots:
            self._check_live(s)
        over = [s for s, n in zip(slots, counts) if self._lengths[s] + n > self.max_len]
        if over:
            raise ValueError(f"sequence slots {over} would outgrow max_len={self.max_len}")

    def release(self, slot: int) -> None:
        """Ends a sequence: its slot becomes free (its rows are simply overwritten by the next owner)."""
        self._check_live(slot)
        self._live.discard(slot)
        self._set_length(slot, 0)

    def metadata(self, slots: Sequence[int]):
        """``(cache_seqlens, block_table)`` for ``decode``/``append_kv`` over ``slots``.

        A contiguous cache is a paged one whose blocks are whole rows: the table has one column, the slot
        itself, and ``self.k``/``self.v`` act as the pool. (To read every slot in order, pass ``self.k`` with
        ``self.seqlens`` and no table instead.)
        """
        idx = list(slots)
        table = torch.tensor(idx, dtype=torch.int32, device=self.k.device).view(-1, 1)
        return self.seqlens[idx], table


class PagedKVCache(_SequenceSlots):
    """A block pool shared by all sequences, with a block table per sequence and a block allocator.

    Args:
        num_blocks: blocks in the pool.
        block_size: tokens per block.
        num_heads_kv: KV heads.
        head_dim: D.
        max_seqs: sequence slots (rows of the block table).
        max_blocks_per_seq: the block table's width: a sequence holds at most this many blocks.
        dtype: the cache's dtype.
        device: where the pools live.
    """

    def __init__(
        self,
        *,
        num_blocks,
        block_size,
        num_heads_kv,
        head_dim,
        max_seqs,
        max_blocks_per_seq,
        dtype=torch.float16,
        device="cpu",
    ):
        super().__init__(max_seqs, device)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.allocator = BlockAllocator(num_blocks)
        self.k = torch.zeros(num_blocks, block_size, num_heads_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # unused entries stay 0: kernels only read the entries of blocks that hold tokens
        self.block_table = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._blocks: dict[int, list[int]] = {}

    def add_sequence(self) -> int:
        slot = super().add_sequence()
        self._blocks[slot] = []
        return slot

    def blocks_of(self, slot: int) -> list[int]:
        """The pool blocks of a sequence, in logical order."""
        self._check_live(slot)
        return list(self._blocks[slot])

    def reserve(self, slot: int, num_new_tokens: int) -> None:
        """Makes room for ``num_new_tokens`` more tokens, taking blocks from the pool as needed.

        Raises:
            ValueError: the sequence would need more blocks than its block-table row holds.
            PoolExhaustedError: the pool has too few free blocks. Either way nothing changes.
        """
        self._check_live(slot)
        need = -(-(self._lengths[slot] + num_new_tokens) // self.block_size)
        have = len(self._blocks[slot])
        if need > self.max_blocks_per_seq:
            raise ValueError(
                f"sequence slot {slot} would need {need} blocks for {self._lengths[slot] + num_new_tokens} tokens, "
                f"more than its block table's {self.max_blocks_per_seq}"
            )
        if need > have:
            new = self.allocator.allocate(need - have)
            self._blocks[slot].extend(new)
            self.block_table[slot, have:need] = torch.tensor(new, dtype=torch.int32)

    def append(self, slots: Sequence[int], k_new, v_new, cu_seqlens_new=None, *, impl=None) -> None:
        """Reserves blocks, writes new tokens for ``slots`` (padded ``[len(slots), S_new, Hkv, D]`` or packed
        with ``cu_seqlens_new``) after their cached tokens, and advances their lengths.

        Raises:
            ValueError: a slot not in use or a sequence outgrowing its table row.
            PoolExhaustedError: too few free blocks. Nothing is reserved or written then.
        """
        for s in slots:
            self._check_live(s)
        counts = _new_counts(slots, k_new, cu_seqlens_new)
        self.reserve_tokens(slots, counts)
        idx = list(slots)
        _append_impl(impl)(
            self.k, self.v, k_new, v_new, self.seqlens[idx],
            cu_seqlens_new=cu_seqlens_new, block_table=self.block_table[idx],
        )  # fmt: skip
        for s, n in zip(slots, counts):
            self._set_length(s, self._lengths[s] + n)

    def reserve_tokens(self, slots: Sequence[int], counts: Sequence[int]) -> None:
        """Takes the blocks that ``counts[i]`` more tokens of ``slots[i]`` need, all or nothing; see `advance`.

        Raises:
            ValueError: a slot not in use, or a sequence outgrowing its block-table row.
            PoolExhaustedError: too few free blocks. Nothing is reserved then.
        """
        for s in slots:
            self._check_live(s)
        # check every sequence against its table row and the pool before reserving any block
        total = [-(-(self._lengths[s] + n) // self.block_size) for s, n in zip(slots, counts)]
        over = [s for s, t in zip(slots, total) if t > self.max_blocks_per_seq]
        if over:
            raise ValueError(f"sequence slots {over} would outgrow their block-table rows of {self.max_blocks_per_seq}")
        new_blocks = sum(max(t - len(self._blocks[s]), 0) for s, t in zip(slots, total))
        if new_blocks > self.allocator.num_free:
            raise PoolExhaustedError(f"appending needs {new_blocks} new blocks, {self.allocator.num_free} are free")
        for s, n in zip(slots, counts):
            self.reserve(s, n)

    def release(self, slot: int) -> None:
        """Ends a sequence: its blocks go back to the pool and its slot becomes free."""
        self._check_live(slot)
        self.allocator.free(self._blocks.pop(slot))
        self.block_table[slot] = 0
        self._live.discard(slot)
        self._set_length(slot, 0)

    def metadata(self, slots: Sequence[int]):
        """``(cache_seqlens, block_table)`` for ``decode``/``append_kv`` over ``slots``, as keyword-ready tensors."""
        idx = list(slots)
        return self.seqlens[idx], self.block_table[idx]


def _new_counts(slots, k_new, cu_seqlens_new) -> list[int]:
    if cu_seqlens_new is not None:
        cu = cu_seqlens_new.tolist()
        if len(cu) != len(slots) + 1:
            raise ValueError(f"cu_seqlens_new must have len(slots)+1={len(slots) + 1} entries, got {len(cu)}")
        return [b - a for a, b in zip(cu, cu[1:])]
    if k_new.dim() != 4 or k_new.shape[0] != len(slots):
        raise ValueError(f"k_new must be [len(slots)={len(slots)}, S_new, Hkv, D], got {tuple(k_new.shape)}")
    return [k_new.shape[1]] * len(slots)


def _append_impl(impl):
    if impl is not None:
        return impl
    from .fast import append_kv

    return append_kv


def to_flashinfer(block_table: torch.Tensor, cache_seqlens: torch.Tensor, block_size: int):
    """Our paged metadata in FlashInfer's CSR form.

    Args:
        block_table: int32 ``[B, max_blocks]``.
        cache_seqlens: int32 ``[B]``.
        block_size: tokens per block (FlashInfer's ``page_size``).

    Returns:
        ``(kv_indptr int32 [B+1], kv_indices int32 [nnz], kv_last_page_len int32 [B])``: the pages of sequence
        ``b`` are ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``, and its last page holds ``kv_last_page_len[b]``
        tokens (0 for a sequence with no pages).
    """
    pages = (cache_seqlens.long() + block_size - 1) // block_size
    indptr = torch.zeros(len(pages) + 1, dtype=torch.int32, device=block_table.device)
    indptr[1:] = torch.cumsum(pages, 0)
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < pages[:, None]
    indices = block_table[used].to(torch.int32)
    last = torch.where(pages > 0, cache_seqlens.long() - (pages - 1) * block_size, 0).to(torch.int32)
    return indptr, indices, last


def to_trtllm(k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor):
    """Our pools and block table in TensorRT-LLM's paged layout.

    TensorRT-LLM keeps one pool ``[num_blocks, 2, Hkv, block_size, D]`` (K and V of a block side by side,
    heads before tokens) and per-sequence offsets ``[B, 2, max_blocks]`` into that pool viewed as
    ``[num_blocks·2, Hkv, block_size, D]``: K of block ``i`` at ``2i``, V at ``2i + 1``.

    Returns:
        ``(pool [num_blocks, 2, Hkv, block_size, D], block_offsets int32 [B, 2, max_blocks])``.
    """
    pool = torch.stack([k_pool, v_pool], dim=1).transpose(2, 3).contiguous()
    offsets = torch.stack([2 * block_table, 2 * block_table + 1], dim=1).to(torch.int32)
    return pool, offsets
