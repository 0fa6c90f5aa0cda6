"""Beam-search cache indirection: decoding through cache_indirection equals decoding over caches in which
every beam's history was copied out in full, bit for bit (the same keys in the same order)."""

from __future__ import annotations

import functools

import pytest
import torch

import attn.fast as fast
import attn.reference as reference
from helpers import TOL, assert_close


def _beams(device, b=2, beam=3, hkv=2, d=32, max_len=40):
    rows = b * beam
    k_cache = torch.randn(rows, max_len, hkv, d, device=device, dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    lens = torch.tensor([1, 17, 33, 40, 0, 25], dtype=torch.int32, device=device)[:rows]
    ind = torch.randint(0, beam, (b, beam, max_len), dtype=torch.int32, device=device)
    # what the indirection means, made explicit: each beam's own copy of its history
    copied_k, copied_v = torch.empty_like(k_cache), torch.empty_like(v_cache)
    for r in range(rows):
        for t in range(max_len):
            src = (r // beam) * beam + int(ind[r // beam, r % beam, t])
            copied_k[r, t], copied_v[r, t] = k_cache[src, t], v_cache[src, t]
    return k_cache, v_cache, lens, ind, copied_k, copied_v


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("splits", [1, 2], ids=lambda s: f"splits{s}")
def test_indirection_equals_copied_histories(paged, splits, device):
    k_cache, v_cache, lens, ind, copied_k, copied_v = _beams(device)
    q = torch.randn(6, 1, 4, 32, device=device, dtype=torch.float16)
    kw = dict(num_splits=splits)
    if paged:
        # the same caches as a shuffled pool of 8-token blocks
        rows, max_len, hkv, d = k_cache.shape
        perm = torch.randperm(rows * 5, device=device)
        table = perm.view(rows, 5).to(torch.int32)

        def pool(x):
            p = torch.empty(rows * 5, 8, hkv, d, device=device, dtype=x.dtype)
            p[perm] = x.view(rows * 5, 8, hkv, d)
            return p

        k_cache, v_cache, copied_k, copied_v = (pool(x) for x in (k_cache, v_cache, copied_k, copied_v))
        kw["block_table"] = table
    out = fast.decode(q, k_cache, v_cache, lens, cache_indirection=ind, **kw)
    plain = fast.decode(q, copied_k, copied_v, lens, **kw)
    assert torch.equal(out, plain)
    ref = reference.decode(q.double(), k_cache.double(), v_cache.double(), lens, cache_indirection=ind, **kw)
    assert_close("beam decode", ref, out, TOL[torch.float16])


def test_indirection_bad_input(device):
    k_cache, v_cache, lens, ind, _, _ = _beams(device)
    q = torch.randn(6, 1, 4, 32, device=device, dtype=torch.float16)
    bad = ind.clone()
    bad[1, 2, 5] = 3  # beam width is 3
    for fn in (reference.decode, functools.partial(fast.decode, validate=True)):
        with pytest.raises(ValueError, match="cache_indirection entries in use must lie in \\[0, 3\\)"):
            fn(q, k_cache, v_cache, lens, cache_indirection=bad)
        with pytest.raises(ValueError, match="B·beam_width = q's batch"):
            fn(q, k_cache, v_cache, lens, cache_indirection=ind[:1])
        with pytest.raises(TypeError, match="int32"):
            fn(q, k_cache, v_cache, lens, cache_indirection=ind.long())
