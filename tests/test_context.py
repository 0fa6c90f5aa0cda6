"""Parity of `context_attention` (packed queries over a contiguous or paged, possibly quantized KV cache) with
the reference, and equivalences that need no tolerance argument: an empty prefix is plain causal prefill, a
one-token chunk is a decode step."""

from __future__ import annotations

import functools

import pytest
import torch

import attn.fast as fast
import attn.reference as reference
from attn import RelativeBias, calibrate_kv_scales
from attn.layout import cu_seqlens_from_lengths
from helpers import LSE_TOL, TOL, assert_close, assert_lse_close, dtype_id, to_paged, to_paged_fast

# (Hq, Hkv, D, new tokens per sequence, cached tokens before them): chunks of 0 (no work this step), 1 (a
# generation request) and several (a prompt chunk), on prefixes of 0 (a fresh prompt) and longer
CASES = {
    "gqa2-d40": (4, 2, 40, [3, 0, 1, 9], [5, 7, 0, 20]),
    "mqa-d64": (4, 1, 64, [1, 17, 2], [33, 0, 6]),
    "mha-d16": (2, 2, 16, [40, 1], [3, 50]),
    # GQA packing edge cases: a group of 3 leaves tile rows unused (tokens × 3 does not fill a power of two);
    # a group of 32 is split into two packs of 16 heads
    "gqa3-d24": (6, 2, 24, [11, 1, 0], [2, 0, 9]),
    "mqa32-d16": (32, 1, 16, [2, 1, 13], [30, 9, 4]),
}
FEATURES = {
    "plain": {},
    "window": {"window_size": (6, 0)},
    "softcap": {"softcap": 2.0, "softmax_scale": 0.9},
    "alibi": {"alibi_slopes": "slopes"},
    "alibi-with-scale": {"alibi_slopes": "slopes", "alibi_mode": "alibi_with_scale"},
    "alibi-per-sequence": {"alibi_slopes": "per-sequence"},
    "t5-implicit": {"rel_bias": "implicit"},
    "t5-regular": {"rel_bias": "regular"},
}


def _inputs(case, dtype, device, extra=4):
    hq, hkv, d, new, prefix = CASES[case]
    lens = [p + n for p, n in zip(prefix, new)]
    b, cap = len(lens), max(lens) + extra
    k_cache = torch.randn(b, cap, hkv, d, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(sum(new), hq, d, dtype=dtype, device=device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    cu = cu_seqlens_from_lengths(torch.tensor(new, dtype=torch.int32, device=device))
    return q, k_cache, v_cache, seqlens, cu


def _feature(name, hq, cap, device, batch):
    kw = dict(FEATURES[name])
    if kw.get("alibi_slopes") == "slopes":
        kw["alibi_slopes"] = torch.rand(hq, device=device) * 0.5
    elif kw.get("alibi_slopes") == "per-sequence":
        kw["alibi_slopes"] = torch.rand(batch, hq, device=device) * 0.5
    if kw.get("rel_bias") == "implicit":
        kw["rel_bias"] = RelativeBias(table=torch.randn(hq, 8, device=device), max_distance=12, bidirectional=False)
    elif kw.get("rel_bias") == "regular":
        kw["rel_bias"] = RelativeBias(bias=torch.randn(hq, cap, cap, device=device))
    return kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("block_size", [None, 16, 5], ids=lambda s: "contiguous" if s is None else f"paged{s}")
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("case", CASES)
def test_context_matches_reference(case, feature, block_size, dtype, device):
    q, kc, vc, seqlens, cu = _inputs(case, dtype, device)
    kw = _feature(feature, q.shape[1], kc.shape[1], device, len(seqlens))
    if block_size is not None:
        kc, vc, kw["block_table"] = to_paged(kc, vc, seqlens.tolist(), block_size)
    ref, ref_lse = reference.context_attention(q, kc, vc, seqlens, cu_seqlens_q=cu, return_lse=True, **kw)
    out, lse = fast.context_attention(q, kc, vc, seqlens, cu_seqlens_q=cu, return_lse=True, **kw)
    assert_close("out", ref, out, TOL[dtype])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[dtype])


@pytest.mark.parametrize("tile", [(16, 16), (64, 32)], ids=lambda t: f"M{t[0]}N{t[1]}")
@pytest.mark.parametrize("feature", ["plain", "window", "t5-regular"])
@pytest.mark.parametrize("case", ["gqa3-d24", "mqa32-d16", "gqa2-d40"])
def test_tile_shapes(case, feature, tile, device, monkeypatch):
    # the tiles the GPU autotuner may pick besides the interpreter's 32x16: 16 rows hold one token of a pack of
    # 16 heads, or 5 tokens of a pack of 3 (one row unused); 64 rows span several key tiles per row block
    config = {"BLOCK_M": tile[0], "BLOCK_N": tile[1], "num_warps": 4, "num_stages": 1}
    monkeypatch.setattr(fast.context, "_context_config", lambda *_: config)
    monkeypatch.setattr(fast.context, "autotune_enabled", lambda: False)
    q, kc, vc, seqlens, cu = _inputs(case, torch.float32, device)
    kw = _feature(feature, q.shape[1], kc.shape[1], device, len(seqlens))
    kc, vc, kw["block_table"] = to_paged(kc, vc, seqlens.tolist(), 5)
    ref, ref_lse = reference.context_attention(q, kc, vc, seqlens, cu_seqlens_q=cu, return_lse=True, **kw)
    out, lse = fast.context_attention(q, kc, vc, seqlens, cu_seqlens_q=cu, return_lse=True, **kw)
    assert_close("out", ref, out, TOL[torch.float32])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[torch.float32])


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn], ids=dtype_id)
@pytest.mark.parametrize("granularity", ["tensor", "head"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_quantized_cache(qdtype, granularity, paged, device):
    # the kernel must compute exactly what the reference computes on the dequantized cache (fp32 inputs, so the
    # fp32 tolerance); the error against the unquantized cache is the format's, reported by the lesson
    q, kc, vc, seqlens, cu = _inputs("gqa2-d40", torch.float32, device)
    k_scale, v_scale = calibrate_kv_scales(kc, vc, qdtype, granularity)
    kw = {"k_scale": k_scale, "v_scale": v_scale}
    if paged:
        kc, vc, kw["block_table"] = to_paged(kc, vc, seqlens.tolist(), 16)
    kq, vq = reference.quantize(kc, k_scale, qdtype), reference.quantize(vc, v_scale, qdtype)
    ref = reference.context_attention(q, kq, vq, seqlens, cu_seqlens_q=cu, **kw)
    out = fast.context_attention(q, kq, vq, seqlens, cu_seqlens_q=cu, **kw)
    assert_close("out", ref, out, TOL[torch.float32])


@pytest.mark.parametrize("block_size", [None, 16], ids=lambda s: "contiguous" if s is None else f"paged{s}")
def test_cross_attention_sees_every_key(block_size, device):
    # causal=False: decoder queries over an encoder's cache, more queries than keys in one sequence
    q, kc, vc, _, _ = _inputs("gqa2-d40", torch.float16, device)
    enc = torch.tensor([6, 1, 13, 2], dtype=torch.int32, device=device)
    cu = cu_seqlens_from_lengths(torch.tensor([9, 4, 1, 1], dtype=torch.int32, device=device))
    q = torch.randn(15, 4, 40, dtype=torch.float16, device=device)
    kw = {}
    if block_size is not None:
        kc, vc, kw["block_table"] = to_paged(kc, vc, enc.tolist(), block_size)
    ref = reference.context_attention(q, kc, vc, enc, cu_seqlens_q=cu, causal=False, **kw)
    out = fast.context_attention(q, kc, vc, enc, cu_seqlens_q=cu, causal=False, **kw)
    assert_close("out", ref, out, TOL[torch.float16])


def test_empty_prefix_is_causal_prefill(device):
    # a fresh prompt over a cache holding just itself is the packed causal prefill of the same tokens
    q, kc, vc, _, _ = _inputs("mqa-d64", torch.float32, device)
    new = [5, 12, 1]
    cu = cu_seqlens_from_lengths(torch.tensor(new, dtype=torch.int32, device=device))
    q = torch.randn(sum(new), 4, 64, device=device)
    seqlens = torch.tensor(new, dtype=torch.int32, device=device)
    k_packed = torch.cat([kc[b, :n] for b, n in enumerate(new)])
    v_packed = torch.cat([vc[b, :n] for b, n in enumerate(new)])
    want = fast.attention(q, k_packed, v_packed, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    got = fast.context_attention(q, kc, vc, seqlens, cu_seqlens_q=cu)
    assert_close("vs prefill", want, got, TOL[torch.float32])


def test_one_token_chunks_are_a_decode_step(device):
    q, kc, vc, _, _ = _inputs("gqa2-d40", torch.float32, device)
    seqlens = torch.tensor([6, 1, 13, 20], dtype=torch.int32, device=device)
    q = torch.randn(4, 4, 40, device=device)
    cu = torch.arange(5, dtype=torch.int32, device=device)
    want = fast.decode(q[:, None], kc, vc, seqlens, num_splits=1)[:, 0]
    assert_close("vs decode", want, fast.context_attention(q, kc, vc, seqlens, cu_seqlens_q=cu), TOL[torch.float32])


def _bad_inputs(device):
    q, kc, vc, seqlens, cu = _inputs("gqa2-d40", torch.float32, device)
    return q, kc, vc, seqlens, cu


BAD = {  # (change to (q, kc, vc, seqlens, cu) and kwargs, error type, words the message must contain)
    "cu-dtype": (lambda q, kc, vc, s, cu: (q, kc, vc, s, cu.long()), {}, TypeError, "cu_seqlens_q"),
    "cu-decreasing": (lambda q, kc, vc, s, cu: (q, kc, vc, s, cu.flip(0)), {}, ValueError, "cu_seqlens_q"),
    "cu-short-of-T": (lambda q, kc, vc, s, cu: (q[:-1], kc, vc, s, cu), {}, ValueError, "cu_seqlens_q"),
    "more-queries-than-cache": (lambda q, kc, vc, s, cu: (q, kc, vc, s - 2, cu), {}, ValueError, "cache_seqlens"),
    "seqlens-over-capacity": (lambda q, kc, vc, s, cu: (q, kc, vc, s + 40, cu), {}, ValueError, "cache_seqlens"),
    "q-rank": (lambda q, kc, vc, s, cu: (q[None], kc, vc, s, cu), {}, ValueError, "packed"),
    "max-seqlen-q": (lambda q, kc, vc, s, cu: (q, kc, vc, s, cu), {"max_seqlen_q": 2}, ValueError, "max_seqlen_q"),
    "cache-heads": (lambda q, kc, vc, s, cu: (q, kc[:, :, :1].expand(-1, -1, 3, -1), vc[:, :, :1].expand(
        -1, -1, 3, -1), s, cu), {}, ValueError, "head count"),
    "cu-not-from-zero": (lambda q, kc, vc, s, cu: (q, kc, vc, s, cu + 1), {}, ValueError, "cu_seqlens_q"),
    "cu-length": (lambda q, kc, vc, s, cu: (q, kc, vc, s, cu[:-1]), {}, ValueError, "cu_seqlens_q must have B"),
    "cu-2d": (lambda q, kc, vc, s, cu: (q, kc, vc, s, cu[None]), {}, ValueError, "cu_seqlens_q"),
    "cache-dtype": (lambda q, kc, vc, s, cu: (q, kc.half(), vc.half(), s, cu), {}, TypeError, "k_cache"),
    "head-dim": (lambda q, kc, vc, s, cu: (q[..., :32], kc, vc, s, cu), {}, ValueError, "head dim"),
    "int8-without-scales": (lambda q, kc, vc, s, cu: (q, kc.to(torch.int8), vc.to(torch.int8), s, cu), {},
                            ValueError, "k_scale"),
    "slopes-shape": (lambda q, kc, vc, s, cu: (q, kc, vc, s, cu), {"alibi_slopes": torch.ones(3)}, ValueError,
                     "alibi_slopes"),
    "table-dtype": (lambda q, kc, vc, s, cu: (q, kc, vc, s, cu), {"block_table": "int64"}, TypeError,
                    "block_table must be int32"),
    "table-outside-pool": (lambda q, kc, vc, s, cu: (q, kc, vc, s, cu), {"block_table": "oob"}, ValueError,
                           "block_table entries"),
}  # fmt: skip


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("case", BAD)
def test_context_rejects_bad_input(case, impl, device):
    change, kw, error, words = BAD[case]
    q, kc, vc, seqlens, cu = change(*_bad_inputs(device))
    if kw.get("block_table") == "oob":
        kc, vc, table = to_paged(kc, vc, seqlens.tolist(), 8, extra_blocks=0)
        table[-1, 0] = kc.shape[0]
        kw = {"block_table": table}
    elif kw.get("block_table") == "int64":
        kc, vc, table = to_paged(kc, vc, seqlens.tolist(), 8)
        kw = {"block_table": table.long()}
    # (the value checks are the validated call's; the default call clamps and reports, tests/test_no_sync.py)
    fn = reference.context_attention if impl == "reference" else functools.partial(fast.context_attention,
                                                                                   validate=True)  # fmt: skip
    with pytest.raises(error, match=words):
        fn(q, kc, vc, seqlens, cu_seqlens_q=cu, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["bf16", "int8", "fp8"])
@pytest.mark.parametrize("block_size", [None, 64], ids=lambda s: "contiguous" if s is None else f"paged{s}")
def test_gpu_context(cache, block_size):
    # 4 prompt chunks of 512 on 1536-token prefixes and 16 generation rows on 3000-token caches, GQA 32/8, D128
    dev, hq, hkv, d = "cuda", 32, 8, 128
    new = [512] * 4 + [1] * 16
    lens = [2048] * 4 + [3000] * 16
    kc = torch.randn(len(lens), max(lens), hkv, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
    cu = cu_seqlens_from_lengths(torch.tensor(new, dtype=torch.int32, device=dev))
    q = torch.randn(sum(new), hq, d, device=dev, dtype=torch.bfloat16)
    kw = {}
    if block_size is not None:
        kc, vc, kw["block_table"] = to_paged_fast(kc, vc, block_size)
    if cache != "bf16":
        qdtype = torch.int8 if cache == "int8" else torch.float8_e4m3fn
        k_scale, v_scale = calibrate_kv_scales(kc, vc, qdtype, "head")
        kc, vc = reference.quantize(kc, k_scale, qdtype), reference.quantize(vc, v_scale, qdtype)
        kw.update(k_scale=k_scale, v_scale=v_scale)
    out = fast.context_attention(q, kc, vc, seqlens, cu_seqlens_q=cu, **kw)
    # the reference on the first chunk and the last generation row (fp32, the same cache)
    for lo, hi, b in ((0, 512, 0), (sum(new) - 1, sum(new), len(new) - 1)):
        sub_cu = torch.tensor([0, hi - lo], dtype=torch.int32, device=dev)
        one = {**kw, "block_table": kw["block_table"][b : b + 1]} if "block_table" in kw else kw
        k_b = kc if "block_table" in kw else kc[b : b + 1]
        v_b = vc if "block_table" in kw else vc[b : b + 1]
        want = reference.context_attention(q[lo:hi].float(), k_b if cache != "bf16" else k_b.float(),
                                           v_b if cache != "bf16" else v_b.float(), seqlens[b : b + 1],
                                           cu_seqlens_q=sub_cu, **one)  # fmt: skip
        assert_close(f"rows {lo}:{hi}", want, out[lo:hi], TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [(16, 32, 4), (32, 32, 4), (128, 64, 8)], ids=lambda t: f"M{t[0]}N{t[1]}")
def test_gpu_generation_batch_matches_decode(tile, monkeypatch):
    # a generation-only batch (60 one-token requests on ragged caches up to 4096, GQA 32/8, D128, paged 64):
    # the GQA packing in the small tiles such batches get (fixed or autotuned) and in the prefill's 128-row tile
    # (a mixed batch's), forced here, against the reference and the decode kernel
    config = {"BLOCK_M": tile[0], "BLOCK_N": tile[1], "num_warps": tile[2], "num_stages": 3}
    monkeypatch.setattr(fast.context, "_context_config", lambda *_: config)
    monkeypatch.setattr(fast.context, "autotune_enabled", lambda: False)
    dev, hq, hkv, d = "cuda", 32, 8, 128
    lens = torch.randint(1, 4097, (60,)).tolist()
    kc = torch.randn(60, 4096, hkv, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    kc, vc, table = to_paged_fast(kc, vc, 64)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
    cu = torch.arange(61, dtype=torch.int32, device=dev)
    q = torch.randn(60, hq, d, device=dev, dtype=torch.bfloat16)
    out = fast.context_attention(q, kc, vc, seqlens, cu_seqlens_q=cu, block_table=table)
    want = reference.context_attention(q.float(), kc.float(), vc.float(), seqlens, cu_seqlens_q=cu, block_table=table)
    assert_close("vs reference", want, out, TOL[torch.bfloat16])
    dec = fast.decode(q[:, None], kc, vc, seqlens, block_table=table)[:, 0]
    assert_close("vs decode", want, dec, TOL[torch.bfloat16])
