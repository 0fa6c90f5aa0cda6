"""T5 relative attention bias: the bucket function against transformers' T5, and both modes (regular and
implicit) in the prefill and decode kernels against the reference."""

from __future__ import annotations

import importlib

import pytest
import torch

import attn.fast as fast
import attn.reference as reference
from helpers import LSE_TOL, TOL, assert_close, assert_lse_close, dtype_id, random_packed, to_paged


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 64), (8, 20)])
def test_bucket_matches_t5(num_buckets, max_distance, bidirectional):
    transformers = pytest.importorskip("transformers")
    t5 = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    rp = torch.arange(-600, 601)
    expected = t5(rp, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    ours = reference.t5_bucket(rp, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(ours, expected)


def test_distance_table_is_the_bucket_lookup():
    table = torch.randn(3, 32)
    rel = reference.RelativeBias(table=table, max_distance=128)
    dist = rel.distance_table()
    assert dist.shape == (3, 257)
    # every distance, near or far, reads the bucket T5 assigns it (far ones clamp to the table's ends)
    for rp in (-1000, -128, -127, -9, 0, 5, 64, 128, 4000):
        bucket = reference.t5_bucket(torch.tensor(rp), num_buckets=32, max_distance=128)
        assert torch.equal(dist[:, max(-128, min(rp, 128)) + 128], table[:, bucket])


def _implicit(hq, device, bidirectional=True):
    return reference.RelativeBias(table=torch.randn(hq, 32, device=device), max_distance=24,
                                  bidirectional=bidirectional)  # fmt: skip


def _regular(hq, length, device):
    return reference.RelativeBias(bias=torch.randn(hq, length, length, device=device))


def _check_prefill(q, k, v, dtype, **kw):
    """The fused kernel's output and log-sum-exp against the float64 reference on the same inputs."""
    out, lse = fast.attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    assert_close("prefill", ref, out, TOL[dtype])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("mode", ["implicit", "implicit-causal", "regular"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_prefill_with_relative_bias(causal, mode, dtype, device):
    lens_q, lens_k = [13, 0, 40], [20, 5, 40]
    q, k, v, cu_q, cu_k = random_packed(lens_q, lens_k, 6, 2, 32, dtype, device)
    rel = _regular(6, 40, device) if mode == "regular" else _implicit(6, device, mode == "implicit")
    # T5: no 1/sqrt(D); q_scaling = 1/sqrt(D) makes the scale 1
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, rel_bias=rel, q_scaling=32**-0.5)
    _check_prefill(q, k, v, dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "one-sided"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_prefill_far_tiles(causal, bidirectional, dtype, device):
    # sequences several tiles longer than max_distance on both sides of the diagonal, so that the kernel's
    # unmasked tiles split into far-left (one value per row), near (gathered) and far-right parts; chunked rows
    # (Sq < Sk) move the diagonal off the tile grid, and an 8-key distance cap makes most tiles far
    lens_q, lens_k = [150, 61, 1], [150, 170, 90]
    q, k, v, cu_q, cu_k = random_packed(lens_q, lens_k, 4, 2, 32, dtype, device)
    rel = reference.RelativeBias(table=torch.randn(4, 8, device=device), max_distance=8, bidirectional=bidirectional)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, rel_bias=rel, q_scaling=32**-0.5)
    _check_prefill(q, k, v, dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("window", [(40, 0), (40, 30)], ids=["left40-causal", "left40-right30"])
def test_prefill_far_tiles_window(window, dtype, device):
    # a sliding window much wider than max_distance: the masked tiles on the window's edges lie wholly beyond
    # max_distance (one value per row, decided per tile inside the masked loop), the unmasked ones split three ways
    lens_q, lens_k = [150, 61], [150, 170]
    q, k, v, cu_q, cu_k = random_packed(lens_q, lens_k, 4, 2, 32, dtype, device)
    rel = reference.RelativeBias(table=torch.randn(4, 8, device=device), max_distance=8)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, window_size=window, rel_bias=rel, q_scaling=32**-0.5)
    _check_prefill(q, k, v, dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("alibi_mode", ["alibi", "alibi_with_scale"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_prefill_far_tiles_with_alibi(causal, alibi_mode, dtype, device):
    # both biases at once: the far tiles' plain path then folds two per-row terms into the max and the exponent
    # (the T5 end value and ALiBi's per-tile offset), and the near tiles add ALiBi's per-key vector to the gather
    lens_q, lens_k = [150, 61], [150, 170]
    q, k, v, cu_q, cu_k = random_packed(lens_q, lens_k, 4, 2, 32, dtype, device)
    rel = reference.RelativeBias(table=torch.randn(4, 8, device=device), max_distance=8, bidirectional=False)
    slopes = reference.alibi_slopes(4, device=device) * torch.rand(2, 1, device=device).add(0.5)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, rel_bias=rel, alibi_slopes=slopes,
              alibi_mode=alibi_mode)  # fmt: skip
    _check_prefill(q, k, v, dtype, **kw)


@pytest.mark.parametrize("alibi", [False, True], ids=["t5", "t5+alibi"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_context_far_tiles_gqa_packed(paged, alibi, device):
    # context_attention packs a KV head's query heads into one tile (rows: tokens x heads), so each row has its
    # own head's far values (and with ALiBi its own slope in the per-row terms); a long cache puts most tiles
    # beyond max_distance
    b, hq, hkv, d, n = 2, 8, 2, 32, 160
    lens_q = [40, 3]
    cu = torch.tensor([0, 40, 43], dtype=torch.int32, device=device)
    seqlens = torch.tensor([160, 131], dtype=torch.int32, device=device)
    q = torch.randn(43, hq, d, device=device, dtype=torch.float16)
    kc = torch.randn(b, n, hkv, d, device=device, dtype=torch.float16)
    vc = torch.randn_like(kc)
    kw = dict(cu_seqlens_q=cu, max_seqlen_q=max(lens_q), rel_bias=_implicit(hq, device, False), return_lse=True)
    if alibi:
        kw["alibi_slopes"] = reference.alibi_slopes(hq, device=device)
    if paged:
        table = torch.randperm(b * 10, device=device).to(torch.int32).view(b, 10)
        pool_k = torch.empty(b * 10, 16, hkv, d, device=device, dtype=torch.float16)
        pool_v = torch.empty_like(pool_k)
        pool_k.view(b * 10, -1)[table.flatten().long()] = kc.reshape(b * 10, -1)
        pool_v.view(b * 10, -1)[table.flatten().long()] = vc.reshape(b * 10, -1)
        out, lse = fast.context_attention(q, pool_k, pool_v, seqlens, block_table=table, **kw)
    else:
        out, lse = fast.context_attention(q, kc, vc, seqlens, **kw)
    ref, ref_lse = reference.context_attention(q.double(), kc.double(), vc.double(), seqlens, **kw)
    assert_close("context", ref, out, TOL[torch.float16])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[torch.float16])


def test_prefill_autotune_key_separates_bias_modes():
    # implicit and regular mode both pass float32 bias tensors, so only REL_MODE in the key keeps the implicit
    # kernel's best config (3-stage 128x128 tiles on the H200) from reaching regular mode, which cannot fit it
    # in shared memory (bench/probes/prefill_sass.py)
    module = importlib.import_module("attn.fast.attention")  # attn.fast.attention is the function
    assert "REL_MODE" in module._attn_fwd_tuned.keys


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("mode", ["implicit-causal", "regular"])
def test_decode_with_relative_bias(mode, paged, device):
    b, sq, hq, hkv, d = 3, 2, 8, 2, 32
    lens = torch.tensor([2, 37, 60], dtype=torch.int32, device=device)
    q = torch.randn(b, sq, hq, d, device=device, dtype=torch.float16)
    k_cache = torch.randn(b, 64, hkv, d, device=device, dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    rel = _regular(hq, 64, device) if mode == "regular" else _implicit(hq, device, False)
    kw = dict(rel_bias=rel, causal=True, num_splits=2)
    if paged:
        k_cache, v_cache = k_cache.view(b * 8, 8, hkv, d), v_cache.view(b * 8, 8, hkv, d)
        kw["block_table"] = torch.randperm(b * 8, device=device).to(torch.int32).view(b, 8)
    out, lse = fast.decode(q, k_cache, v_cache, lens, return_lse=True, **kw)
    ref, ref_lse = reference.decode(q.double(), k_cache.double(), v_cache.double(), lens, return_lse=True, **kw)
    assert_close("decode", ref, out, TOL[torch.float16])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[torch.float16])


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("sq", [1, 3], ids=lambda s: f"sq{s}")
@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "one-sided"])
def test_decode_far_and_near_loops(bidirectional, splits, sq, paged, device):
    # caches several tiles (16 keys under the interpreter) longer than max_distance 20: each program's chunk
    # splits at a tile boundary into a far loop (one value per row) and a near loop (gathered). Unsplit, the two
    # long caches are mixed and the 7-key one all near; with 3 splits the 150-key cache has two all-far programs
    # and an all-near one, the 97-key cache an all-far, a mixed (split inside its chunk) and an all-near one. Pages
    # of 12 keys divide neither the lengths nor the tiles: the paged path's block-table look-ahead, re-primed at
    # the split, starts mid-page. (A deliberately wrong far value, a split one tile late, or a look-ahead carried
    # over from the far loop each fail this test.)
    b, hq, hkv, d = 3, 8, 2, 32
    lens = torch.tensor([150, 97, 7], dtype=torch.int32, device=device)
    q = torch.randn(b, sq, hq, d, device=device)
    k_cache = torch.randn(b, 156, hkv, d, device=device)
    v_cache = torch.randn_like(k_cache)
    rel = reference.RelativeBias(table=torch.randn(hq, 16, device=device) * 4, max_distance=20,
                                 bidirectional=bidirectional)  # fmt: skip
    kw = dict(rel_bias=rel, causal=True, num_splits=splits, q_scaling=d**-0.5)
    if paged:
        k_cache, v_cache, kw["block_table"] = to_paged(k_cache, v_cache, lens, 12)
    out, lse = fast.decode(q, k_cache, v_cache, lens, return_lse=True, **kw)
    ref, ref_lse = reference.decode(q.double(), k_cache.double(), v_cache.double(), lens, return_lse=True, **kw)
    assert_close("decode", ref, out, TOL[torch.float32])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[torch.float32])


def test_decode_step_sees_the_prefill_positions(device):
    # the last rows of a causal prefill and a decode step over the same cache read the same biases
    hq, d, n = 4, 16, 30
    q, k, v = (torch.randn(1, n, h, d, device=device) for h in (hq, 2, 2))
    rel = _implicit(hq, device, False)
    prefill = fast.attention(q, k, v, causal=True, rel_bias=rel)
    step = fast.decode(q[:, -1:].contiguous(), k, v, torch.tensor([n], dtype=torch.int32, device=device),
                       causal=True, rel_bias=rel)  # fmt: skip
    assert_close("decode vs prefill", prefill[:, -1:], step, TOL[torch.float32])


BAD = {
    "both": (lambda d: reference.RelativeBias(table=torch.ones(4, 8, device=d), bias=torch.ones(4, 9, 9, device=d)),
             ValueError, "exactly one of"),
    "table-heads": (lambda d: reference.RelativeBias(table=torch.ones(3, 8, device=d)), ValueError, "rel_bias.table"),
    "buckets": (lambda d: reference.RelativeBias(table=torch.ones(4, 1, device=d)), ValueError, "num_buckets >= 2"),
    "max-distance": (lambda d: reference.RelativeBias(table=torch.ones(4, 32, device=d), max_distance=0), ValueError,
                     "max_distance"),
    "bias-short": (lambda d: reference.RelativeBias(bias=torch.ones(4, 5, 5, device=d)), ValueError, "L >= 9"),
    "bias-int": (lambda d: reference.RelativeBias(bias=torch.ones(4, 9, 9, dtype=torch.int32, device=d)), TypeError,
                 "floating-point"),
}  # fmt: skip


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("case", BAD)
def test_relative_bias_bad_input(case, impl, device):
    make, exc, match = BAD[case]
    q = torch.randn(2, 9, 4, 16, device=device)
    fn = reference.attention if impl == "reference" else fast.attention
    with pytest.raises(exc, match=match):
        fn(q, q, q, rel_bias=make(device))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["implicit", "regular"])
def test_gpu_relative_bias(mode):
    q = torch.randn(2, 1024, 16, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    rel = _regular(16, 1024, "cuda") if mode == "regular" else reference.RelativeBias(
        table=torch.randn(16, 32, device="cuda"), max_distance=128)  # fmt: skip
    kw = dict(rel_bias=rel, q_scaling=64**-0.5)
    assert_close("prefill", reference.attention(q.float(), k.float(), v.float(), **kw), fast.attention(q, k, v, **kw),
                 TOL[torch.bfloat16])  # fmt: skip


def test_distance_table_follows_the_bucket_table(device):
    # the kernels' log2-unit distance table is kept between calls (building it is a dozen small kernels per
    # call); a write into the bucket table, a new table object, or another max_distance must each be seen
    from attn.fast.attention import _log2_distance_table

    lens = [40, 23]
    q, k, v, cu_q, cu_k = random_packed(lens, lens, 4, 2, 16, torch.float32, device)
    table = torch.randn(4, 8, device=device)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    first = reference.RelativeBias(table=table, max_distance=8, bidirectional=False)
    assert _log2_distance_table(first) is _log2_distance_table(
        reference.RelativeBias(table=table, max_distance=8, bidirectional=False)
    )
    for rel in (
        first,
        reference.RelativeBias(table=table.mul_(3.0), max_distance=8, bidirectional=False),
        reference.RelativeBias(table=table, max_distance=5, bidirectional=False),
        reference.RelativeBias(table=table, max_distance=5, bidirectional=True),
        reference.RelativeBias(table=torch.randn(4, 8, device=device), max_distance=5, bidirectional=True),
    ):
        out = fast.attention(q, k, v, rel_bias=rel, **kw)
        ref = reference.attention(q.double(), k.double(), v.double(), rel_bias=rel, **kw)
        assert_close("prefill", ref, out, TOL[torch.float32])
