"""Test setup: the Triton interpreter on CPU machines, the gpu marker, seeds and NaN-poisoned allocations."""

import os
import zlib

import torch

# must happen before any kernel is defined (attn.fast does the same on import; this makes it explicit)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def pytest_configure(config):
    # ATTN_KERNEL_MAP=<folder>: record the compiled kernels each test launches (tests/kernel_map.py)
    folder = os.environ.get("ATTN_KERNEL_MAP")
    if folder:
        from kernel_map import KernelMap

        config.pluginmanager.register(KernelMap(folder), "attn_kernel_map")


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs on the H200 with the gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed(request):
    # a different draw for every test, reproducible from its id (crc32: str hashes change between runs)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch):
    """Every floating-point ``torch.empty``/``empty_like`` during a test starts as NaN.

    Kernels allocate their outputs with ``torch.empty``; poisoning it proves every element that a test
    compares was written by the kernel (stale zeros would otherwise pass for "no visible key" rows).
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def _clear_error_words():
    """Each test starts with clean device error words (attn.fast._errors).

    A default (unvalidated) call that gets bad index values records them in a per-device word that stays set
    until `attn.check_errors` reads it; a test that provokes one without checking would otherwise hand its
    report to whichever later test checks next (and make that test's message and outcome depend on the order).
    A test that leaves a violation unread fails: provoking one is only tested by checking it is reported.
    """
    from attn.fast import _errors

    def words():
        return {id(w): w for w in _errors._WORDS.values()}.values()

    for word in words():
        word.zero_()
    yield
    left = 0
    for word in words():
        left |= int(word.item())
        word.zero_()
    assert not left, f"the test left unread device errors: {_errors.describe(left)}"
