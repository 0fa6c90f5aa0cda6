"""Cross attention: decoder queries over an encoder's cross KV cache, padded or packed, contiguous or paged,
against the reference and against plain unmasked attention over the encoder's K/V."""

from __future__ import annotations

import functools

import pytest
import torch

import attn.fast as fast
import attn.reference as reference
from attn import calibrate_kv_scales
from attn.layout import cu_seqlens_from_lengths
from helpers import LSE_TOL, TOL, assert_close, assert_lse_close, dtype_id, to_paged

HQ, HKV, D = 4, 2, 40
ENC = [6, 1, 13, 9]  # encoder tokens per request, one of them a single token


def _cross_cache(dtype, device, block_size):
    k = torch.randn(len(ENC), max(ENC) + 2, HKV, D, dtype=dtype, device=device)
    v = torch.randn_like(k)
    lens = torch.tensor(ENC, dtype=torch.int32, device=device)
    if block_size is None:
        return k, v, lens, None
    k_pool, v_pool, table = to_paged(k, v, ENC, block_size)
    return k_pool, v_pool, lens, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("block_size", [None, 4], ids=lambda s: "contiguous" if s is None else f"paged{s}")
@pytest.mark.parametrize("queries", ["decode-step", "padded-5", "packed"])
def test_cross_matches_reference(queries, block_size, dtype, device):
    k, v, lens, table = _cross_cache(dtype, device, block_size)
    kw = {"block_table": table}
    if queries == "packed":
        cu = cu_seqlens_from_lengths(torch.tensor([3, 0, 7, 1], dtype=torch.int32, device=device))
        q = torch.randn(11, HQ, D, dtype=dtype, device=device)
        kw["cu_seqlens_q"] = cu
    else:
        q = torch.randn(len(ENC), 1 if queries == "decode-step" else 5, HQ, D, dtype=dtype, device=device)
    ref, ref_lse = reference.cross_attention(q, k, v, lens, return_lse=True, **kw)
    out, lse = fast.cross_attention(q, k, v, lens, return_lse=True, **kw)
    assert_close("out", ref, out, TOL[dtype])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[dtype])


def test_cross_is_unmasked_attention_over_the_encoder(device):
    # with the encoder's K/V given directly, cross attention is plain non-causal attention with key lengths
    k, v, lens, _ = _cross_cache(torch.float32, device, None)
    q = torch.randn(len(ENC), 5, HQ, D, device=device)
    want = fast.attention(q, k, v, seqlens_k=lens, causal=False)
    assert_close("vs attention", want, fast.cross_attention(q, k, v, lens), TOL[torch.float32])


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn], ids=dtype_id)
def test_quantized_cross_cache(qdtype, device):
    k, v, lens, table = _cross_cache(torch.float32, device, 4)
    k_scale, v_scale = calibrate_kv_scales(k, v, qdtype, "head")
    kq, vq = reference.quantize(k, k_scale, qdtype), reference.quantize(v, v_scale, qdtype)
    q = torch.randn(len(ENC), 1, HQ, D, device=device)
    kw = dict(block_table=table, k_scale=k_scale, v_scale=v_scale)
    ref = reference.cross_attention(q, kq, vq, lens, **kw)
    assert_close("out", ref, fast.cross_attention(q, kq, vq, lens, **kw), TOL[torch.float32])


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize(
    "case, error, words",
    [("beyond-cache", ValueError, "encoder_lengths"), ("dtype", TypeError, "encoder_lengths"),
     ("shape", ValueError, "encoder_lengths")],
)  # fmt: skip
def test_cross_rejects_bad_encoder_lengths(case, error, words, impl, device):
    k, v, lens, _ = _cross_cache(torch.float32, device, None)
    lens = {"beyond-cache": lens + 10, "dtype": lens.long(), "shape": lens[:2]}[case]
    q = torch.randn(len(ENC), 1, HQ, D, device=device)
    fn = reference.cross_attention if impl == "reference" else functools.partial(fast.cross_attention, validate=True)
    with pytest.raises(error, match=words):
        fn(q, k, v, lens)


@pytest.mark.gpu
@pytest.mark.parametrize("sq", [1, 64])
def test_gpu_cross(sq):
    # 16 requests, encoders of 200..1500 tokens in a paged bf16 cross cache, GQA 32/8, D128
    dev, hq, hkv, d = "cuda", 32, 8, 128
    enc = [int(x) for x in torch.randint(200, 1501, (16,))]
    k = torch.randn(16, max(enc), hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.tensor(enc, dtype=torch.int32, device=dev)
    q = torch.randn(16, sq, hq, d, device=dev, dtype=torch.bfloat16)
    want = reference.cross_attention(q.float(), k.float(), v.float(), lens)
    assert_close("out", want, fast.cross_attention(q, k, v, lens), TOL[torch.bfloat16])
