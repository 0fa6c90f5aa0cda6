"""The cyclic (rolling) KV cache, TensorRT-LLM's max_attention_window_size: token t lives in slot t mod N and
the newest token sees the last N. Appending past the size, then decoding, must equal attention over the last
N tokens of the whole sequence."""

from __future__ import annotations

import pytest
import torch

import attn.fast as fast
import attn.reference as reference
from helpers import LSE_TOL, TOL, assert_close, assert_lse_close


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"splits{s}")
def test_rolling_cache_equals_window_over_the_whole_sequence(impl, paged, splits, device):
    b, hq, hkv, d, window = 2, 4, 2, 32, 24
    total = [50, 17]  # one sequence wraps around twice, the other not at all
    k_all = torch.randn(b, max(total), hkv, d, device=device, dtype=torch.float16)
    v_all = torch.randn_like(k_all)
    if paged:
        k_cache = torch.zeros(12, 4, hkv, d, device=device, dtype=torch.float16)
        table = torch.randperm(12, device=device).to(torch.int32).view(b, 6)  # 6 blocks of 4 = 24 slots
    else:
        k_cache = torch.zeros(b, window, hkv, d, device=device, dtype=torch.float16)
        table = None
    v_cache = torch.zeros_like(k_cache)
    append = reference.append_kv if impl == "reference" else fast.append_kv
    # feed the sequences in uneven chunks, as prefill chunks and decode steps would
    seqlens = torch.zeros(b, dtype=torch.int32, device=device)
    for step in (7, 11, 1, 1, 20, 10):
        counts = [max(0, min(step, t - int(n))) for t, n in zip(total, seqlens.tolist())]
        cu = torch.tensor([0, counts[0], counts[0] + counts[1]], dtype=torch.int32, device=device)
        k_new = torch.cat([k_all[i, int(seqlens[i]) : int(seqlens[i]) + counts[i]] for i in range(b)])
        v_new = torch.cat([v_all[i, int(seqlens[i]) : int(seqlens[i]) + counts[i]] for i in range(b)])
        append(k_cache, v_cache, k_new, v_new, seqlens, cu_seqlens_new=cu, block_table=table,
               max_attention_window=window)  # fmt: skip
        seqlens += torch.tensor(counts, dtype=torch.int32, device=device)
    assert seqlens.tolist() == total
    q = torch.randn(b, 1, hq, d, device=device, dtype=torch.float16)
    out, lse = fast.decode(q, k_cache, v_cache, seqlens, block_table=table, max_attention_window=window,
                           num_splits=splits, return_lse=True)  # fmt: skip
    # the definition: the newest token attends to the last `window` tokens of its whole sequence
    for i, n in enumerate(total):
        ref, ref_lse = reference.attention(
            q[i : i + 1].double(), k_all[i : i + 1, :n].double(), v_all[i : i + 1, :n].double(),
            window_size=(window - 1, 0), return_lse=True,
        )  # fmt: skip
        assert_close("rolling cache", ref, out[i : i + 1], TOL[torch.float16])
        assert_lse_close("lse", ref_lse, lse[i : i + 1], LSE_TOL[torch.float16])
    ref_decode = reference.decode(q.double(), k_cache.double(), v_cache.double(), seqlens, block_table=table,
                                  max_attention_window=window)  # fmt: skip
    assert_close("vs reference decode", ref_decode, out, TOL[torch.float16])


def test_cyclic_bad_input(device):
    k_cache = torch.zeros(2, 8, 1, 16, device=device)
    q = torch.randn(2, 1, 2, 16, device=device)
    lens = torch.tensor([20, 3], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="max_attention_window must be an int in \\[1, 8\\]"):
        fast.decode(q, k_cache, k_cache, lens, max_attention_window=9)
    # (value checks: made by the validated call; tests/test_no_sync.py covers the default call)
    with pytest.raises(ValueError, match="cache_seqlens entries"):
        fast.decode(q, k_cache, k_cache, lens, validate=True)  # 20 tokens only fit a cyclic cache
    with pytest.raises(ValueError, match="appends 9 tokens to a cyclic cache of 8 slots"):
        fast.append_kv(k_cache, k_cache, torch.randn(2, 9, 1, 16, device=device),
                       torch.randn(2, 9, 1, 16, device=device), lens, max_attention_window=8,
                       validate=True)  # fmt: skip
