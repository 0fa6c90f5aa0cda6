"""Small helpers shared by the kernels: interpreter detection and when to autotune."""

from __future__ import annotations

import os


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter instead of compiling them."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """Whether launchers should benchmark their config lists (the default on a GPU).

    Off under the interpreter, where benchmarking takes minutes and measures nothing real, and when
    ``ATTN_AUTOTUNE=0``: the GPU test suite sets it, because tuning every one of its many shapes would spend
    most of the run compiling. Launchers then use a fixed config chosen by a simple rule.
    """
    return not is_interpreter() and os.environ.get("ATTN_AUTOTUNE", "1") != "0"


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
