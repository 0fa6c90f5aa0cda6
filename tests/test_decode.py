"""Parity of the decode kernel with the reference, and equivalences: paged == contiguous, split-K invariance,
a decode step == the last rows of a prefill."""

from __future__ import annotations

import functools
import sys

import pytest
import torch

import attn.fast as fast
import attn.reference as reference
from helpers import LSE_TOL, TOL, assert_close, assert_lse_close, dtype_id, to_paged, to_paged_fast


def _contiguous(b, sq, hq, hkv, d, lens, dtype, device, max_len=None):
    max_len = max_len or max(lens) + 3
    q = torch.randn(b, sq, hq, d, dtype=dtype, device=device)
    k_cache = torch.randn(b, max_len, hkv, d, dtype=dtype, device=device)
    v_cache = torch.randn(b, max_len, hkv, d, dtype=dtype, device=device)
    return q, k_cache, v_cache, torch.tensor(lens, dtype=torch.int32, device=device)


CASES = {  # (B, Sq, Hq, Hkv, D, lengths)
    "mha-d64": (3, 1, 4, 4, 64, [1, 70, 33]),
    "gqa4-d40": (2, 1, 8, 2, 40, [101, 17]),
    "mqa-d72": (2, 1, 6, 1, 72, [45, 9]),
    "gqa8-spec3": (2, 3, 8, 1, 32, [3, 88]),
    "empty-cache": (2, 1, 4, 2, 16, [0, 20]),
}
FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"causal": True, "window_size": (23, 0)},
    "softcap": {"softcap": 2.0, "q_scaling": 1.3},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("splits", [None, 1, 3], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("case", CASES)
def test_decode_contiguous_matches_reference(case, feature, splits, dtype, device):
    b, sq, hq, hkv, d, lens = CASES[case]
    q, kc, vc, seqlens = _contiguous(b, sq, hq, hkv, d, lens, dtype, device)
    kw = FEATURES[feature]
    out, lse = fast.decode(q, kc, vc, seqlens, num_splits=splits, return_lse=True, **kw)
    ref, ref_lse = reference.decode(q.double(), kc.double(), vc.double(), seqlens, return_lse=True, **kw)
    assert_close("decode", ref, out, TOL[dtype])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[dtype])


@pytest.mark.parametrize("window", [None, (23, 0)], ids=["full", "window23"])
@pytest.mark.parametrize("block_size", [16, 5, 32])
@pytest.mark.parametrize("case", ["gqa4-d40", "gqa8-spec3", "empty-cache"])
def test_paged_equals_contiguous(case, block_size, window, device):
    # the kernel visits the same keys in the same order either way, so the results agree bit for bit. Pages that
    # are a multiple of the tile (16 and 32 under the interpreter's 16-key tiles) are read one entry per tile,
    # which needs every tile on the tile grid; a sliding window starts at a key off that grid
    b, sq, hq, hkv, d, lens = CASES[case]
    q, kc, vc, seqlens = _contiguous(b, sq, hq, hkv, d, lens, torch.float16, device)
    k_pool, v_pool, block_table = to_paged(kc, vc, lens, block_size)
    kw = {"causal": True} if window is None else {"causal": True, "window_size": window}
    for splits in (1, 2):
        contiguous = fast.decode(q, kc, vc, seqlens, num_splits=splits, return_lse=True, **kw)
        paged = fast.decode(q, k_pool, v_pool, seqlens, block_table=block_table, num_splits=splits, return_lse=True,
                            **kw)  # fmt: skip
        assert torch.equal(contiguous[0], paged[0]) and torch.equal(contiguous[1], paged[1])
    ref = reference.decode(q.double(), k_pool.double(), v_pool.double(), seqlens, block_table=block_table, **kw)
    assert_close("paged vs reference", ref, paged[0], TOL[torch.float16])


def test_decode_step_is_last_rows_of_prefill(device):
    # a decode step over a cache holding the whole sequence is the prefill's last Sq rows
    b, sq, hq, hkv, d, n = 2, 2, 8, 2, 32, 57
    q_all = torch.randn(b, n, hq, d, device=device)
    k_all = torch.randn(b, n, hkv, d, device=device)
    v_all = torch.randn(b, n, hkv, d, device=device)
    prefill = fast.attention(q_all, k_all, v_all, causal=True)
    seqlens = torch.full((b,), n, dtype=torch.int32, device=device)
    step = fast.decode(q_all[:, -sq:].contiguous(), k_all, v_all, seqlens, causal=True, num_splits=2)
    assert_close("decode vs prefill", prefill[:, -sq:], step, TOL[torch.float32])


def test_num_splits_heuristic():
    assert fast.choose_num_splits(64, 8, 4096, 132) == 1  # 512 programs fill the GPU
    assert fast.choose_num_splits(1, 8, 131072, 132) == 32  # 8 programs: 4096 keys per split caps it
    assert fast.choose_num_splits(1, 8, 4000, 132) == 1  # too short to split
    assert fast.choose_num_splits(8, 8, 32768, 132) == 8  # 64 programs: 8 splits of 4096 keys
    # a ragged batch that fills the GPU: only the caches longer than ~total·Hkv/(2·SMs) keys are cut
    assert fast.choose_num_splits(32, 8, 8192, 132, total_seqlen_k=32 * 3000) == 3
    assert fast.choose_num_splits(32, 8, 8192, 132, total_seqlen_k=32 * 8192) == 1  # uniform
    assert fast.choose_num_splits(32, 8, 8192, 132) == 1  # lengths unknown: treated as uniform


def test_heuristic_splits_keep_short_caches_whole(device):
    # B·Hkv = 2 programs: the heuristic cuts the 5000-token cache into 2 parts; the 300-token one fits the
    # minimum part of 2048 keys, so its other program finds nothing to do. Both must still be exact, with and
    # without the hints a serving loop passes instead of letting decode read the lengths.
    q, kc, vc, lens = _contiguous(2, 1, 4, 1, 16, [5000, 300], torch.float32, device)
    assert fast.choose_num_splits(2, 1, 5000, 132) == 2
    want = reference.decode(q, kc, vc, lens)
    assert_close("validated", want, fast.decode(q, kc, vc, lens), TOL[torch.float32])
    hinted = fast.decode(q, kc, vc, lens, validate=False, max_seqlen_k=5000, total_seqlen_k=5300)
    assert_close("hinted", want, hinted, TOL[torch.float32])


# ---- the split merge: the last program of each (sequence, KV head) pair merges the pair's partials
SPLIT_CASES = {  # (B, Sq, Hq, Hkv, D, lengths): every length is off the interpreter's 16-key tile
    "ragged-len1": (4, 1, 8, 2, 40, [1, 83, 30, 131]),
    "empty-seq": (3, 1, 4, 1, 24, [0, 45, 7]),
    "spec3-gqa4": (2, 3, 8, 2, 32, [5, 99]),
}


@pytest.mark.parametrize("return_lse", [True, False], ids=["lse", "no-lse"])
@pytest.mark.parametrize("splits", [2, 3, 7], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_merge_matches_reference(case, splits, return_lse, device):
    # Forced counts cut even the 1-key cache, so most of its programs find an empty chunk, and 7 splits of 5
    # keys leave empty chunks in every pair: the merge must weigh those at zero. Outputs and the partials'
    # buffer start as NaN (conftest), so a row the merge skipped or a partial it read unwritten shows up.
    # Tolerances: TOL/LSE_TOL's (helpers.py): the merge adds float32 roundings only, far below those of the
    # fp16 products.
    b, sq, hq, hkv, d, lens = SPLIT_CASES[case]
    q, kc, vc, seqlens = _contiguous(b, sq, hq, hkv, d, lens, torch.float16, device)
    got = fast.decode(q, kc, vc, seqlens, causal=True, num_splits=splits, return_lse=return_lse)
    ref, ref_lse = reference.decode(q.double(), kc.double(), vc.double(), seqlens, causal=True, return_lse=True)
    out = got[0] if return_lse else got
    assert_close("split decode", ref, out, TOL[torch.float16])
    if return_lse:
        assert_lse_close("split lse", ref_lse, got[1], LSE_TOL[torch.float16])
    # with or without the log-sum-exp, the same output bit for bit
    other = fast.decode(q, kc, vc, seqlens, causal=True, num_splits=splits, return_lse=not return_lse)
    assert torch.equal(out, other[0] if not return_lse else other)


def test_split_counters_return_to_zero_and_are_reused(device):
    # the merging program resets its pair's counter: a second launch over the same buffer must merge as correctly
    # as the first and leave every counter at zero again; so must a launch after the buffer grew (the old one is
    # kept, since a CUDA graph may hold its address)
    dec = sys.modules["attn.fast.decode"]
    q, kc, vc, seqlens = _contiguous(3, 2, 8, 2, 32, [70, 1, 37], torch.float32, device)
    first = fast.decode(q, kc, vc, seqlens, num_splits=5, return_lse=True)
    second = fast.decode(q, kc, vc, seqlens, num_splits=5, return_lse=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    want = reference.decode(q.double(), kc.double(), vc.double(), seqlens)
    assert_close("second call", want, second[0], TOL[torch.float32])
    assert dec._COUNTERS and all(int(c.abs().sum()) == 0 for c in dec._COUNTERS.values())
    for key, buf in list(dec._COUNTERS.items()):
        grown = dec._split_counters(key, buf.device, buf.numel() + 1)
        assert grown.numel() > buf.numel() and any(old is buf for old in dec._RETIRED)
    third = fast.decode(q, kc, vc, seqlens, num_splits=5, return_lse=True)
    assert torch.equal(first[0], third[0]) and torch.equal(first[1], third[1])
    assert all(int(c.abs().sum()) == 0 for c in dec._COUNTERS.values())


def test_split_merge_paged_and_heuristic_hints(device):
    # the chosen split count with its minimum part (2 programs, the short cache's second finding nothing) over
    # paged storage, without validation as a serving loop calls it
    q, kc, vc, lens = _contiguous(2, 1, 4, 1, 16, [5000, 300], torch.float32, device)
    k_pool, v_pool, table = to_paged(kc, vc, [5000, 300], 64)
    want = reference.decode(q, kc, vc, lens)
    got = fast.decode(q, k_pool, v_pool, lens, block_table=table, validate=False, max_seqlen_k=5000,
                      total_seqlen_k=5300)  # fmt: skip
    assert_close("paged, hinted", want, got, TOL[torch.float32])


def _three_heads(cache):
    return cache[:, :, :1].expand(-1, -1, 3, -1)


def _bad(device):
    q, kc, vc, seqlens = _contiguous(2, 1, 4, 2, 16, [5, 9], torch.float32, device, max_len=12)
    k_pool, v_pool, table = to_paged(kc, vc, [5, 9], 4, extra_blocks=0)
    return q, kc, vc, seqlens, k_pool, v_pool, table


BAD = {
    "seqlens-over-capacity": (lambda q, kc, vc, s, kp, vp, t: (q, kc, vc, s + 4), {}, ValueError, "cache_seqlens"),
    "seqlens-dtype": (lambda q, kc, vc, s, kp, vp, t: (q, kc, vc, s.long()), {}, TypeError, "cache_seqlens"),
    "cache-dtype": (lambda q, kc, vc, s, kp, vp, t: (q, kc.half(), vc.half(), s), {}, TypeError, "k_cache"),
    "cache-heads": (lambda q, kc, vc, s, kp, vp, t: (q, _three_heads(kc), _three_heads(vc), s), {}, ValueError,
                    "head count"),
    "cache-head-dim": (lambda q, kc, vc, s, kp, vp, t: (q, kc[..., :8], vc[..., :8], s), {}, ValueError, "head dim"),
    "table-outside-pool": (lambda q, kc, vc, s, kp, vp, t: (q, kp, vp, s), {"block_table": "oob"}, ValueError,
                           "block_table entries"),
    "table-dtype": (lambda q, kc, vc, s, kp, vp, t: (q, kp, vp, s), {"block_table": "long"}, TypeError, "block_table"),
    "splits": (lambda q, kc, vc, s, kp, vp, t: (q, kc, vc, s), {"num_splits": 0}, ValueError, "num_splits"),
    "hint-negative": (lambda q, kc, vc, s, kp, vp, t: (q, kc, vc, s), {"max_seqlen_k": -1}, ValueError,
                      "max_seqlen_k"),
    "hint-order": (lambda q, kc, vc, s, kp, vp, t: (q, kc, vc, s), {"max_seqlen_k": 9, "total_seqlen_k": 5},
                   ValueError, "total_seqlen_k"),
}  # fmt: skip


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("case", BAD)
def test_decode_rejects_bad_input(case, impl, device):
    make, kwargs, exc, match = BAD[case]
    parts = _bad(device)
    kwargs = dict(kwargs)
    if kwargs.get("block_table") == "oob":
        table = parts[6].clone()
        table[1, 0] = parts[4].shape[0]  # one past the pool
        kwargs["block_table"] = table
    elif kwargs.get("block_table") == "long":
        kwargs["block_table"] = parts[6].long()
    # (the value checks are the validated call's; the default call clamps and reports, tests/test_no_sync.py)
    fn = reference.decode if impl == "reference" else functools.partial(fast.decode, validate=True)
    with pytest.raises(exc, match=match):
        fn(*make(*parts), **kwargs)


# ---- on the GPU: bf16, long caches, the benchmark's GQA ratio, paged block sizes 16 and 64
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("splits", [None, 1, 7], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("block_size", [None, 16, 64], ids=lambda s: "contiguous" if s is None else f"paged{s}")
@pytest.mark.parametrize("hq, hkv", [(32, 8), (32, 32), (16, 1)], ids=["gqa4", "mha", "mqa"])
def test_gpu_decode(hq, hkv, block_size, splits, dtype):
    lens = [1, 777, 4099, 2048]
    q, kc, vc, seqlens = _contiguous(4, 1, hq, hkv, 128, lens, dtype, "cuda")
    kw = {}
    if block_size is not None:
        kc, vc, kw["block_table"] = to_paged_fast(kc, vc, block_size)
    out, lse = fast.decode(q, kc, vc, seqlens, num_splits=splits, return_lse=True, **kw)
    ref, ref_lse = reference.decode(q.float(), kc.float(), vc.float(), seqlens, return_lse=True, **kw)
    assert_close("decode", ref, out, TOL[dtype])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[dtype])


@pytest.mark.gpu
def test_gpu_split_merge_has_no_race():
    # 512 programs merging through the counters, 50 times: the merge reads the partials in a fixed order,
    # whichever program does it, so every repetition must equal the first bit for bit; a partial read before
    # its program's stores were visible, or a counter left non-zero, would break that
    q, kc, vc, seqlens = _contiguous(1, 1, 32, 8, 128, [32768], torch.bfloat16, "cuda", max_len=32768)
    single = fast.decode(q, kc, vc, seqlens, num_splits=1)
    first = fast.decode(q, kc, vc, seqlens, num_splits=64, validate=False)
    # bf16 outputs: the split and unsplit sums round differently, within TOL's bound
    assert_close("64 splits vs 1", single.float(), first.float(), TOL[torch.bfloat16])
    for _ in range(50):
        again = fast.decode(q, kc, vc, seqlens, num_splits=64, validate=False)
        assert torch.equal(again, first)
    torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for c in sys.modules["attn.fast.decode"]._COUNTERS.values())


@pytest.mark.gpu
@pytest.mark.parametrize("warm_on_capture_stream", [False, True], ids=["fresh", "warm"])
def test_gpu_split_merge_under_cuda_graph(warm_on_capture_stream):
    # captured on a stream without counters (torch's own capture stream), each call gets its own, zeroed by a
    # memset in the graph; captured on the stream of the warm-up, the calls reuse that stream's counters, which
    # each replay leaves at zero
    q, kc, vc, seqlens = _contiguous(2, 1, 32, 8, 128, [9000, 1], torch.bfloat16, "cuda")
    want = fast.decode(q, kc, vc, seqlens, num_splits=16, return_lse=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # compiles outside the capture, and leaves counters for this stream
        fast.decode(q, kc, vc, seqlens, num_splits=16, return_lse=True, validate=False)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    capture = stream if warm_on_capture_stream else None
    with torch.cuda.graph(graph, stream=capture):
        got = fast.decode(q, kc, vc, seqlens, num_splits=16, return_lse=True, validate=False)
        got2 = fast.decode(q, kc, vc, seqlens, num_splits=16, return_lse=True, validate=False)
    for _ in range(5):
        got[0].zero_()
        got2[1].zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(got2[0], want[0]) and torch.equal(got2[1], want[1])
