"""Small helpers shared by the kernels: interpreter detection and the project's autotune wrapper."""

from __future__ import annotations

import os

import triton


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter instead of compiling them."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune(configs: list[triton.Config], key: list[str], interpret_config: triton.Config, **kwargs):
    """``triton.autotune`` over ``configs`` on a GPU; a single fixed config under the interpreter.

    Benchmarking configs in the interpreter takes minutes and measures nothing real, so it gets one config,
    with small blocks so that tiny test shapes still span several tiles (and so exercise the tile loops and
    their boundary masks, as long sequences do on the GPU).
    """
    if is_interpreter():
        return triton.autotune([interpret_config], key=key)
    return triton.autotune(configs, key=key, **kwargs)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
