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

Blocks can be shared, as vLLM shares them between the beams of a beam search: `PagedKVCache.fork` and
`PagedKVCache.reorder_beams` hand blocks to several sequences by reference count, and a write into a shared,
partly filled block copies that block first (copy-on-write). The contiguous cache has no such sharing: its beams
share history through ``cache_indirection`` instead (`attn.reference.update_indirection`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch


class PoolExhaustedError(RuntimeError):
    """The block pool has fewer free blocks than a request needs."""


class BlockAllocator:
    """Hands out the block indices of a pool, counts their owners and takes them back.

    A free list, last freed first out: a block released by a finished sequence is the next one reused, while
    it may still be warm in the L2 cache. Every allocated block has a reference count, the number of sequences
    whose block tables list it: 1 when allocated, one more per `share` (a forked sequence, vLLM's prefix and
    beam sharing). `free` drops one reference per listed block; a block returns to the pool when its last owner
    lets it go.

    Args:
        num_blocks: the pool's size.
    """

    def __init__(self, num_blocks: int):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Allocated blocks, each counted once however many sequences share it."""
        return len(self._refs)

    def ref_count(self, block: int) -> int:
        """How many owners ``block`` has (0 when it is free)."""
        return self._refs.get(block, 0)

    def allocate(self, n: int) -> list[int]:
        """Takes ``n`` free blocks, each with one owner; all or nothing.

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
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def peek(self, n: int) -> list[int]:
        """The blocks ``allocate(n)`` would hand out now, in its order; changes nothing."""
        return self._free[: len(self._free) - n - 1 : -1] if n > 0 else []

    def _undo(self, allocated: Sequence[int], unreferenced: Sequence[int]) -> None:
        """Takes back ``allocate`` calls that handed out ``allocated`` (in order) and ``free`` calls that dropped
        one owner of each of ``unreferenced`` without releasing it: the free list and the counts are exactly as
        before them."""
        for b in reversed(list(unreferenced)):
            self._refs[b] += 1
        for b in reversed(list(allocated)):
            del self._refs[b]
            self._free.append(b)

    def share(self, blocks: Sequence[int]) -> None:
        """Adds one owner to each listed block (a block listed twice gains two); all or nothing.

        Raises:
            ValueError: a block that is not currently allocated.
        """
        bad = sorted({b for b in blocks if b not in self._refs})
        if bad:
            raise ValueError(f"blocks {bad} are not allocated from this pool: only allocated blocks can be shared")
        for b in blocks:
            self._refs[b] += 1

    def free(self, blocks: Sequence[int]) -> list[int]:
        """Drops one owner of each listed block; blocks left with none go back to the pool. All or nothing.

        Returns:
            the blocks that went back to the pool.

        Raises:
            ValueError: a block that is not currently allocated, or listed more times than it has owners (a
                double free, or not from this pool).
        """
        listed: dict[int, int] = {}
        for b in blocks:
            listed[b] = listed.get(b, 0) + 1
        bad = sorted(b for b, n in listed.items() if self._refs.get(b, 0) < n)
        if bad:
            raise ValueError(f"blocks {bad} are not allocated from this pool (double free?)")
        released = []
        for b in reversed(list(blocks)):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                del self._refs[b]
                self._free.append(b)
                released.append(b)
        return released


class _SequenceSlots:
    """Slot bookkeeping shared by both caches: which of the ``max_seqs`` rows are live."""

    def __init__(self, max_seqs: int, device):
        if not isinstance(max_seqs, int) or max_seqs < 1:
            raise ValueError(f"max_seqs must be a positive int, got {max_seqs!r}")
        self.max_seqs = max_seqs
        self.seqlens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self._lengths = [0] * max_seqs  # host copy: the bookkeeping never waits on the device
        self._live: set[int] = set()

    def _set_scales(self, k_scale, v_scale) -> None:
        # an INT8/FP8 cache carries its dequantization scales, so that appends quantize with them and readers
        # find them beside the codes (checked like every kernel checks them)
        from .checks import check_kv_scales

        self.k_scale, self.v_scale = check_kv_scales(self.k, k_scale, v_scale, self.k.shape[2])

    @property
    def scales(self) -> dict:
        """``{"k_scale": ..., "v_scale": ...}`` of a quantized cache (empty for a float one), ready to pass as
        keywords to `attn.decode`, `attn.context_attention` or `attn.gpt_attention`."""
        if self.k_scale is None:
            return {}
        return {"k_scale": self.k_scale, "v_scale": self.v_scale}

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
        # a bool would pass as slot 0 or 1 (True == 1), and a list of them would index as a mask
        if isinstance(slot, bool) or not _is_index(slot):
            raise TypeError(f"a sequence slot must be an int, got {slot!r}")
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
        slots, counts = list(slots), _counts(counts)
        for s in slots:
            self._check_live(s)
        if len(counts) != len(slots):
            raise ValueError(f"counts must have one entry per slot ({len(slots)}), got {len(counts)}")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct, got {slots}")
        if any(n < 0 for n in counts):
            raise ValueError(f"counts must be >= 0, got {counts}")
        over = [s for s, n in zip(slots, counts) if self._lengths[s] + n > self._capacity(s)]
        if over:
            raise ValueError(
                f"sequence slots {over} would hold more tokens than reserved for them: reserve_tokens first"
            )
        for s, n in zip(slots, counts):
            self._set_length(s, self._lengths[s] + n)

    def _capacity(self, slot: int) -> int:
        raise NotImplementedError

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
        dtype: the cache's dtype: a float type, or ``torch.int8`` / ``torch.float8_e4m3fn`` with the scales.
        device: where the cache lives.
        k_scale: for an INT8/FP8 cache, the K dequantization scale, float ``[1]`` or ``[Hkv]`` (see
            `attn.calibrate_kv_scales`); appends quantize with it, and `scales` hands it to the readers.
        v_scale: likewise for V.
    """

    def __init__(
        self, *, max_seqs, max_len, num_heads_kv, head_dim, dtype=torch.float16, device="cpu", k_scale=None,
        v_scale=None,
    ):  # fmt: skip
        super().__init__(max_seqs, device)
        self.max_len = max_len
        self.k = torch.zeros(max_seqs, max_len, num_heads_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._set_scales(k_scale, v_scale)

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
        # the cache owns the lengths on the host, so it checks room itself: a default (unvalidated) append reads
        # no lengths back and would skip the overflowing tokens (reporting them to attn.check_errors) after this
        # call had already counted them; checked here, a rejected call changes nothing and costs no sync
        self.reserve_tokens(slots, counts)
        _check_new_tokens(self, k_new, v_new, list(slots), cu_seqlens_new)
        seqlens, table = self.metadata(slots)
        _append_impl(impl)(
            self.k, self.v, k_new, v_new, seqlens, cu_seqlens_new=cu_seqlens_new, block_table=table, **self.scales
        )
        for s, n in zip(slots, counts):
            self._set_length(s, self._lengths[s] + n)

    def _capacity(self, slot: int) -> int:
        return self.max_len

    def reserve_tokens(self, slots: Sequence[int], counts: Sequence[int]) -> None:
        """Checks that ``counts[i]`` more tokens fit in ``slots[i]`` (all or nothing); see `advance`.

        Raises:
            ValueError: a slot not in use or listed twice, a negative count, or a sequence that would outgrow
                ``max_len``.
        """
        slots, counts = list(slots), _counts(counts)
        for s in slots:
            self._check_live(s)
        if len(counts) != len(slots):
            raise ValueError(f"counts must have one entry per slot ({len(slots)}), got {len(counts)}")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct, got {slots}")
        if any(n < 0 for n in counts):
            raise ValueError(f"counts must be >= 0, got {counts}")
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
        for s in idx:
            self._check_live(s)
        table = torch.tensor(idx, dtype=torch.int32, device=self.k.device).view(-1, 1)
        return self.seqlens[idx], table

    # plans (attn.plan): the step's metadata from the host bookkeeping, checked once, for every layer's call

    def plan_decode(self, slots: Sequence[int], *, num_heads_q: int, **options):
        """An `attn.plan.DecodePlan` for a decode step over ``slots`` (their new tokens already appended)."""
        from .plan import plan_decode_for

        return plan_decode_for(self, slots, num_heads_q=num_heads_q, **options)

    def plan_context(self, slots: Sequence[int], new_tokens: Sequence[int], **options):
        """An `attn.plan.ContextPlan` for chunks of ``new_tokens`` over ``slots`` (the chunks already appended)."""
        from .plan import plan_context_for

        return plan_context_for(self, slots, new_tokens, **options)


class PagedKVCache(_SequenceSlots):
    """A block pool shared by all sequences, with a block table per sequence and a block allocator.

    Sequences may share blocks (vLLM's design for beam search and parallel sampling): `fork` starts a sequence
    that lists all of its parent's blocks, and `reorder_beams` gives each beam of a beam search its parent's
    blocks after a step; only reference counts change. A write that would land in a block other sequences still
    list copies that block first (copy-on-write), so the other owners never see it. Blocks whose tokens are all
    older than the write (full blocks of the shared history) are never copied: a write of token ``L`` only
    touches the block that holds position ``L`` and the ones after it.

    Args:
        num_blocks: blocks in the pool.
        block_size: tokens per block.
        num_heads_kv: KV heads.
        head_dim: D.
        max_seqs: sequence slots (rows of the block table).
        max_blocks_per_seq: the block table's width: a sequence holds at most this many blocks.
        dtype: the cache's dtype: a float type, or ``torch.int8`` / ``torch.float8_e4m3fn`` with the scales.
        device: where the pools live.
        k_scale: for an INT8/FP8 cache, the K dequantization scale, float ``[1]`` or ``[Hkv]``; appends quantize
            with it, and `scales` hands it to the readers.
        v_scale: likewise for V.

    Attributes:
        extra_pools: ``(k, v)`` pools of other layers that use this cache's block table (a model with one table
            for all its layers): copy-on-write copies a block in each of them as well as in ``k``/``v``.
        num_block_copies: how many blocks copy-on-write has copied so far (per pool pair).
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
        k_scale=None,
        v_scale=None,
    ):
        super().__init__(max_seqs, device)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.allocator = BlockAllocator(num_blocks)
        self.k = torch.zeros(num_blocks, block_size, num_heads_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._set_scales(k_scale, v_scale)
        self.extra_pools: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_block_copies = 0
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
        """Makes room for ``num_new_tokens`` more tokens, taking blocks from the pool as needed (and copying a
        shared block the tokens would be written into); `reserve_tokens` for one sequence.

        Raises:
            ValueError: the sequence would need more blocks than its block-table row holds.
            PoolExhaustedError: the pool has too few free blocks. Either way nothing changes.
        """
        self.reserve_tokens([slot], [num_new_tokens])

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
        plan = self._plan_writes(slots, counts)
        idx = list(slots)
        # everything about k_new/v_new is checked before a block is taken or copied: a rejected call changes
        # nothing, not even the bytes of free blocks (the append checks again, with the reserved table)
        _check_new_tokens(self, k_new, v_new, idx, cu_seqlens_new)
        undo = _Undo(self, idx)
        try:
            self._apply(plan, undo)
            _append_impl(impl)(
                self.k, self.v, k_new, v_new, self.seqlens[idx],
                cu_seqlens_new=cu_seqlens_new, block_table=self.block_table[idx], **self.scales,
            )  # fmt: skip
            for s, n in zip(slots, counts):
                self._set_length(s, self._lengths[s] + n)
        except BaseException:
            undo.rollback()
            raise

    def reserve_tokens(self, slots: Sequence[int], counts: Sequence[int]) -> None:
        """Prepares the blocks that ``counts[i]`` more tokens of ``slots[i]`` will be written into, all or
        nothing; see `advance`.

        New blocks come from the pool. A block that already exists where the tokens go (the partly filled last
        block) and that other sequences share is copied into a fresh block first (copy-on-write), so that the
        write stays private. When every owner of a shared block appends in the same call, the last of them keeps
        the original: it is no longer shared by then.

        Raises:
            ValueError: a slot not in use or listed twice, a negative count, or a sequence outgrowing its
                block-table row.
            PoolExhaustedError: too few free blocks for the new and the copied blocks. Nothing is reserved or
                copied then.
        """
        plan = self._plan_writes(slots, counts)
        undo = _Undo(self, [s for s, _, _ in plan])
        try:
            self._apply(plan, undo)
        except BaseException:
            undo.rollback()
            raise

    def _capacity(self, slot: int) -> int:
        return len(self._blocks[slot]) * self.block_size

    def _apply(self, plan, undo: _Undo) -> None:
        """Takes the blocks a checked plan needs and copies the shared ones, recording in ``undo`` what it
        changes (a failure part-way, even inside the allocator or the copy, is rolled back by the caller)."""
        needed = sum(len(copies) + grow for _, copies, grow in plan)
        if needed > self.allocator.num_free:
            raise PoolExhaustedError(f"appending needs {needed} new blocks, {self.allocator.num_free} are free")
        src, dst = [], []
        for s, copies, grow in plan:
            blocks = self._blocks[s]
            if copies or grow:
                undo.keep_row(s)
            for i in copies:
                (fresh,) = self.allocator.allocate(1)
                undo.allocated.append(fresh)
                # the other owners keep the original; this sequence drops its reference to it
                self.allocator.free([blocks[i]])
                undo.unreferenced.append(blocks[i])
                src.append(blocks[i])
                dst.append(fresh)
                blocks[i] = fresh
            if grow:
                fresh = self.allocator.allocate(grow)
                undo.allocated.extend(fresh)
                blocks.extend(fresh)
            if copies or grow:
                self.block_table[s, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        # copies land in blocks that were free: what other sequences list is never written
        self._copy_blocks(src, dst)

    def _plan_writes(self, slots, counts):
        """``[(slot, indices of its blocks to copy, blocks to add)]`` for appending ``counts`` tokens; checks
        everything and changes nothing."""
        slots, counts = list(slots), _counts(counts)
        if len(counts) != len(slots):
            raise ValueError(f"counts must have one entry per slot ({len(slots)}), got {len(counts)}")
        for s in slots:
            self._check_live(s)
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct, got {slots}")
        if any(n < 0 for n in counts):
            raise ValueError(f"counts must be >= 0, got {counts}")
        bs = self.block_size
        # check every sequence against its table row and the pool before reserving any block
        total = [-(-(self._lengths[s] + n) // bs) for s, n in zip(slots, counts)]
        over = [s for s, t in zip(slots, total) if t > self.max_blocks_per_seq]
        if over:
            raise ValueError(f"sequence slots {over} would outgrow their block-table rows of {self.max_blocks_per_seq}")
        # owners left on each shared block as the sequences before in this call take their private copies
        owners: dict[int, int] = {}
        plan = []
        for s, n, t in zip(slots, counts, total):
            blocks = self._blocks[s]
            copies = []
            if n:
                # the existing blocks the new tokens land in: the one holding position L, and any reserved after it
                for i in range(self._lengths[s] // bs, min(t, len(blocks))):
                    blk = blocks[i]
                    left = owners.get(blk, self.allocator.ref_count(blk))
                    if left > 1:
                        copies.append(i)
                        owners[blk] = left - 1
            plan.append((s, copies, max(t - len(blocks), 0)))
        return plan

    def _copy_blocks(self, src: list[int], dst: list[int]) -> None:
        if not src:
            return
        device = self.k.device
        src_t = torch.tensor(src, dtype=torch.long, device=device)
        dst_t = torch.tensor(dst, dtype=torch.long, device=device)
        for k, v in [(self.k, self.v), *self.extra_pools]:
            for pool in (k, v):
                # one-byte pools move as raw bytes: indexed copies are not implemented for every float8 type
                raw = pool.view(torch.uint8) if pool.element_size() == 1 else pool
                raw[dst_t] = raw[src_t]
        self.num_block_copies += len(src)

    def fork(self, slot: int) -> int:
        """Starts a new sequence whose history is ``slot``'s: it lists the same blocks (their reference counts go
        up), nothing is copied. The first write into a block both still list copies it (see `reserve_tokens`).

        Returns:
            the new sequence's slot.

        Raises:
            ValueError: ``slot`` is not in use.
            PoolExhaustedError: every sequence slot is taken. Nothing changes then.
        """
        self._check_live(slot)
        child = self.add_sequence()
        blocks = self._blocks[slot]
        self.allocator.share(blocks)
        self._blocks[child] = list(blocks)
        self.block_table[child] = self.block_table[slot]
        self._set_length(child, self._lengths[slot])
        return child

    def reorder_beams(self, slots: Sequence[int], parents) -> None:
        """After a beam-search step: beam ``i`` (sequence ``slots[i]``) continues the history of beam
        ``parents[i]``; in place.

        Each slot takes the block list and length its parent had before the call, by reference counts alone. A
        block that no new beam lists any more (the tail of a beam that was dropped) goes back to the pool in
        the same call. The slots keep their identities, so a loop reorders, appends and decodes the same slots::

            slots = [cache.add_sequence()]
            cache.append(slots, k_prompt, v_prompt)
            slots += [cache.fork(slots[0]) for _ in range(beam_width - 1)]
            for step in range(steps):
                ...                                   # decode, score, pick parents and tokens
                cache.reorder_beams(slots, parents)
                cache.append(slots, k_new, v_new)     # copy-on-write of shared partial blocks happens here

        Args:
            slots: the live, distinct sequences of one beam search (or of several, reordered together).
            parents: ``len(slots)`` ints (a list or a tensor) in ``[0, len(slots))``, indices into ``slots``.

        Raises:
            ValueError: a slot not in use or listed twice, or parents of the wrong length or out of range.
                Nothing changes then.
        """
        slots = list(slots)
        parents = parents.tolist() if hasattr(parents, "tolist") else list(parents)
        for s in slots:
            self._check_live(s)
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct, got {slots}")
        if len(parents) != len(slots):
            raise ValueError(f"parents must have one entry per slot ({len(slots)}), got {len(parents)}")
        bad = [p for p in parents if not (isinstance(p, int) and 0 <= p < len(slots))]
        if bad:
            raise ValueError(f"parents must be ints in [0, len(slots)) = [0, {len(slots)}), got {bad}")
        old = [self._blocks[s] for s in slots]
        lengths = [self._lengths[s] for s in slots]
        rows = self.block_table[[slots[p] for p in parents]]
        # take the new references before dropping the old ones: a block some new beam keeps never reaches 0
        self.allocator.share([b for p in parents for b in old[p]])
        self.allocator.free([b for blocks in old for b in blocks])
        for s, p in zip(slots, parents):
            self._blocks[s] = list(old[p])
            self._set_length(s, lengths[p])
        self.block_table[slots] = rows

    def release(self, slot: int) -> None:
        """Ends a sequence: it lets go of its blocks (those no other sequence lists go back to the pool) and its
        slot becomes free."""
        self._check_live(slot)
        self.allocator.free(self._blocks.pop(slot))
        self.block_table[slot] = 0
        self._live.discard(slot)
        self._set_length(slot, 0)

    def metadata(self, slots: Sequence[int]):
        """``(cache_seqlens, block_table)`` for ``decode``/``append_kv`` over ``slots``, as keyword-ready tensors."""
        idx = list(slots)
        for s in idx:
            self._check_live(s)
        return self.seqlens[idx], self.block_table[idx]

    # plans (attn.plan): the step's metadata from the host bookkeeping, checked once, for every layer's call

    def plan_decode(self, slots: Sequence[int], *, num_heads_q: int, **options):
        """An `attn.plan.DecodePlan` for a decode step over ``slots`` (their new tokens already appended)."""
        from .plan import plan_decode_for

        return plan_decode_for(self, slots, num_heads_q=num_heads_q, **options)

    def plan_context(self, slots: Sequence[int], new_tokens: Sequence[int], **options):
        """An `attn.plan.ContextPlan` for chunks of ``new_tokens`` over ``slots`` (the chunks already appended)."""
        from .plan import plan_context_for

        return plan_context_for(self, slots, new_tokens, **options)


class _Undo:
    """What a paged cache's reservation changed, to put back exactly when a later step of the call fails.

    The allocator's free list and counts, the touched sequences' block lists and table rows, their lengths and
    the copy counter return to their values before the call. Bytes: a reservation only writes blocks it took
    from the free list (copy-on-write targets), and an append only writes positions at or past a sequence's
    length in blocks no other sequence lists, so no byte any sequence lists changes; the free blocks' contents
    (never read by a kernel) may.
    """

    def __init__(self, cache: PagedKVCache, slots):
        self.cache = cache
        self.allocated: list[int] = []
        self.unreferenced: list[int] = []
        self.rows: list[tuple[int, list[int], torch.Tensor]] = []
        self.lengths = [(s, cache._lengths[s]) for s in slots]
        self.copies = cache.num_block_copies

    def keep_row(self, slot: int) -> None:
        self.rows.append((slot, list(self.cache._blocks[slot]), self.cache.block_table[slot].clone()))

    def rollback(self) -> None:
        c = self.cache
        for s, blocks, row in reversed(self.rows):
            c._blocks[s] = blocks
            c.block_table[s] = row
        c.allocator._undo(self.allocated, self.unreferenced)
        for s, n in self.lengths:
            c._set_length(s, n)
        c.num_block_copies = self.copies


def _check_new_tokens(cache, k_new, v_new, idx, cu_seqlens_new) -> None:
    """The append's own checks of the new tokens against the cache (types, shapes, devices, scales), on the
    host only; lengths and table entries are the cache's own, and the reservation makes room for them."""
    from .checks import check_append

    seqlens, table = cache.metadata(idx)
    check_append(cache.k, cache.v, k_new, v_new, seqlens, cu_seqlens_new, table, validate=False, **cache.scales)


def _new_counts(slots, k_new, cu_seqlens_new) -> list[int]:
    if not isinstance(k_new, torch.Tensor):
        raise TypeError(f"k_new must be a torch.Tensor, got {type(k_new).__name__}")
    if cu_seqlens_new is not None:
        from .checks import _check_cu_seqlens

        if k_new.dim() != 3:
            raise ValueError("k_new must be a packed [T, Hkv, D] tensor with cu_seqlens_new")
        counts = _check_cu_seqlens("cu_seqlens_new", cu_seqlens_new, k_new.shape[0], k_new.device)
        if len(counts) != len(slots):
            raise ValueError(f"cu_seqlens_new must have len(slots)+1={len(slots) + 1} entries, got {len(counts) + 1}")
        return counts
    if k_new.dim() != 4 or k_new.shape[0] != len(slots):
        raise ValueError(f"k_new must be [len(slots)={len(slots)}, S_new, Hkv, D], got {tuple(k_new.shape)}")
    return [k_new.shape[1]] * len(slots)


def _is_index(x) -> bool:
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def _counts(counts) -> list[int]:
    """Token counts as ints: a float (0.5 tokens) or a bool is a caller's bug, not a count to round."""
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence):
        raise TypeError(f"counts must be a sequence of ints, got {counts!r}")
    if any(isinstance(n, bool) or not _is_index(n) for n in counts):
        raise TypeError(f"counts must be ints, got {list(counts)}")
    return [operator.index(n) for n in counts]


def _append_impl(impl):
    if impl is not None:
        if not callable(impl):
            raise TypeError(f"impl must be None or an append function (attn.append_kv's signature), got {impl!r}")
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
