"""The device-side error word: how a default (unvalidated) call reports bad index values without a host sync.

A default call of a fast entry checks shapes, dtypes and devices on the host, which costs nothing, but reads no
tensor values: reading ``cache_seqlens`` or a block table back to the host waits for the device (a decode step
then runs at half speed) and cannot happen inside CUDA-graph capture. The kernels instead clamp every index
they take from a tensor (lengths, block-table entries, beam indirection entries, ``cu_seqlens`` offsets) into
the range their operands allow (a length is clamped into it; a block or beam index outside it reads entry 0; a
cache write outside its cache is skipped), so no input makes them read or write outside their tensors, and record each
kind of violation as a bit of one int32 word per device (an atomic OR, executed only by a program that saw a
violation). `check_errors` reads the word, raises a ValueError naming the violation, and clears it.

``validate=True`` (or the environment variable ``ATTN_DEBUG=1`` when ``validate`` is left None) runs the host
checks instead, before anything is launched: a bad call then raises at once and changes nothing.
"""

from __future__ import annotations

import os

import torch

from .. import _memo

# one bit per kind of violation; the kernels OR them into the word
LENGTHS = 1
BLOCK_TABLE = 2
INDIRECTION = 4
CU_SEQLENS = 8
MAX_SEQLEN = 16
APPEND = 32
PARENTS = 64
QUERY_RANGE = 128

MESSAGES = {
    LENGTHS: "a length (cache_seqlens, seqlens_q/seqlens_k or encoder_lengths) was negative or above what its "
    "tensor holds (the cache capacity, the padded length, cache_indirection's max_len, or rel_bias.bias's L); it "
    "was clamped",
    BLOCK_TABLE: "a block_table entry in use pointed outside the pool of cache blocks; decode read block 0 instead, "
    "context_attention read no key for that row block, a cache write skipped the token",
    INDIRECTION: "a cache_indirection entry in use lay outside [0, beam_width); beam 0 was read instead",
    CU_SEQLENS: "cu_seqlens did not rise from 0 to the packed length without decreasing; offsets were clamped",
    MAX_SEQLEN: "a sequence was longer than max_seqlen_q/max_seqlen_k (or than rel_bias.bias covers); its "
    "rows or keys past that bound were not computed",
    APPEND: "an append would have written outside its sequence's cache (a negative cache_seqlens entry, or more "
    "tokens than the capacity); those tokens were not written",
    PARENTS: "update_indirection got a parent outside [0, beam_width) or a step outside [0, max_len); that row "
    "was filled with -1",
    QUERY_RANGE: "a bf16 query over an INT8/FP8 cache lay beyond fp16's range (|q| > 65504), in which that decode "
    "multiplies: its scores overflowed",
}

_WORDS: dict = {}


def debug_enabled() -> bool:
    """Whether ``ATTN_DEBUG`` asks for the host checks (any value but empty and ``0``)."""
    return os.environ.get("ATTN_DEBUG", "") not in ("", "0")


def resolve_validate(validate: bool | None) -> bool:
    """A fast entry's ``validate`` argument: True or False as given; None (the default) means ``ATTN_DEBUG``."""
    if validate is None:
        return debug_enabled()
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be None, True or False, got {validate!r}")
    return validate


def error_word(device: torch.device) -> torch.Tensor:
    """The int32 ``[1]`` error word of ``device``, made (zeroed) on first use.

    Made inside CUDA-graph capture, the word's zeroing is part of the graph, so every replay starts it at zero;
    a call before capture (the usual warm-up) avoids that. Made outside any graph's memory pool (see
    `attn._memo.outside_pools`): it outlives every call.
    """
    word = _WORDS.get(device)  # a tensor's own device: the launchers' case, one dict lookup
    if word is None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        word = _WORDS.get(dev)
        if word is None:
            word = _memo.outside_pools(dev, lambda: torch.zeros(1, dtype=torch.int32, device=dev))
            _WORDS[dev] = word
        _WORDS[device] = word
    return word


def describe(bits: int) -> list[str]:
    """The messages of the violations in ``bits``."""
    return [msg for bit, msg in MESSAGES.items() if bits & bit]


def check_errors(device: torch.device | str | None = None) -> None:
    """Raises the violations that default (unvalidated) fast calls recorded on the device, and clears them.

    Reads the error word of ``device`` (every device used so far when None), which waits for the device's work
    to finish. Call it where a sync is cheap: after a step, in a test, or once per request.

    Raises:
        ValueError: naming each kind of violation recorded since the last check.
    """
    if device is None:
        words = list({id(w): w for w in _WORDS.values()}.values())
    else:
        device = torch.device(device)
        words = [error_word(device)]
    bits = 0
    for word in words:
        value = int(word.item())
        if value:
            word.zero_()
            bits |= value
    if bits:
        raise ValueError(
            "a fast attention call got out-of-range index values (the kernels stayed inside their tensors; pass "
            "validate=True or set ATTN_DEBUG=1 to find the call and argument): " + "; ".join(describe(bits))
        )
