"""Parity of the fused context-phase kernel with the reference, and equivalences that need no tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attn.fast as fast
import attn.reference as reference
from attn.layout import pad, unpad
from helpers import LSE_TOL, TOL, assert_close, assert_lse_close, dtype_id, random_packed, shape_id

# (B, Sq, Sk, Hq, Hkv, D): single tokens, ragged non-powers of two, Sq != Sk both ways, odd head dims,
# MHA (Hq = Hkv), GQA and MQA (Hkv = 1)
SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 37, 45, 8, 2, 40),
    (1, 113, 203, 4, 1, 72),
    (2, 64, 64, 4, 4, 64),
    (1, 70, 33, 6, 3, 59),
]
FEATURES = {
    "full": {},
    "causal": {"causal": True},
    "window-left": {"window_size": (9, -1)},
    "window-both": {"window_size": (7, 3)},
    "causal-window": {"causal": True, "window_size": (16, 0)},
    "softcap": {"causal": True, "softcap": 1.5},
    "qscaling": {"q_scaling": 0.7, "softmax_scale": 0.3},
}
CPU_DTYPES = [torch.float32, torch.float16]


def _padded(shape, dtype, device):
    b, sq, sk, hq, hkv, d = shape
    q = torch.randn(b, sq, hq, d, dtype=dtype, device=device)
    k = torch.randn(b, sk, hkv, d, dtype=dtype, device=device)
    v = torch.randn(b, sk, hkv, d, dtype=dtype, device=device)
    return q, k, v


def _check(q, k, v, dtype, **kw):
    out, lse = fast.attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close("out", ref, out, TOL[dtype])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[dtype])


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(*s))
def test_padded_matches_reference(shape, feature, dtype, device):
    q, k, v = _padded(shape, dtype, device)
    _check(q, k, v, dtype, **FEATURES[feature])


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "lens_q, lens_k",
    [
        ([13, 0, 40, 1], [13, 0, 40, 1]),  # self-attention with an empty sequence
        ([5, 31, 17], [50, 31, 64]),  # chunked context: new tokens over a cached prefix
        ([20, 3], [7, 0]),  # more queries than keys, and queries with no keys at all
    ],
    ids=["self-empty", "chunked", "q-longer"],
)
def test_packed_matches_reference(lens_q, lens_k, causal, dtype, device):
    q, k, v, cu_q, cu_k = random_packed(lens_q, lens_k, 6, 2, 48, dtype, device)
    _check(q, k, v, dtype, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_equals_padded(causal, device):
    # same tiles from each sequence's start in both layouts, so the results agree bit for bit
    lens_q = torch.tensor([29, 0, 64, 7], dtype=torch.int32, device=device)
    lens_k = torch.tensor([40, 5, 64, 7], dtype=torch.int32, device=device)
    q, k, v = _padded((4, 64, 70, 4, 2, 32), torch.float16, device)
    out_pad, lse_pad = fast.attention(q, k, v, seqlens_q=lens_q, seqlens_k=lens_k, causal=causal, return_lse=True)
    qp, cu_q, max_q = unpad(q, lens_q)
    kp, cu_k, max_k = unpad(k, lens_k)
    vp, _, _ = unpad(v, lens_k)
    out_packed, lse_packed = fast.attention(
        qp, kp, vp, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        causal=causal, return_lse=True,
    )  # fmt: skip
    assert torch.equal(pad(out_packed, cu_q, q.shape[1]), out_pad)
    lse_packed_padded = pad(lse_packed.t(), cu_q, q.shape[1], value=float("-inf")).transpose(1, 2)
    assert torch.equal(lse_packed_padded, lse_pad)
    # padding rows are defined: zero output, -inf lse
    assert (out_pad[1] == 0).all() and torch.isneginf(lse_pad[1]).all()


@pytest.mark.parametrize("feature", ["full", "causal", "window-both", "softcap"])
def test_unfused_kernels_match_reference(feature, device):
    lens_q = [17, 0, 33]
    lens_k = [17, 9, 48]
    q, k, v, cu_q, cu_k = random_packed(lens_q, lens_k, 4, 2, 40, torch.float16, device)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **FEATURES[feature])
    out, lse = fast.attention_unfused(q, k, v, return_lse=True, **kw)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    assert_close("unfused kernels", ref, out, TOL[torch.float16])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[torch.float16])
    # padded input with padding rows: zeros there, as in the fused kernel
    qp, kp, vp = (pad(x, cu, n) for x, cu, n in ((q, cu_q, 40), (k, cu_k, 48), (v, cu_k, 48)))
    lq, lk = (torch.tensor(x, dtype=torch.int32, device=device) for x in (lens_q, lens_k))
    kw = FEATURES[feature]
    out_pad = fast.attention_unfused(qp, kp, vp, seqlens_q=lq, seqlens_k=lk, **kw)
    fused_pad = fast.attention(qp, kp, vp, seqlens_q=lq, seqlens_k=lk, **kw)
    assert_close("unfused vs fused, padded", fused_pad, out_pad, 2 * TOL[torch.float16])


@pytest.mark.parametrize("feature", ["full", "causal", "window-both", "softcap"])
def test_fused_matches_unfused(feature, device):
    lens_q = [17, 0, 33]
    lens_k = [17, 9, 48]
    q, k, v, cu_q, cu_k = random_packed(lens_q, lens_k, 4, 4, 32, torch.float32, device)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **FEATURES[feature])
    out, lse = fast.attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = reference.attention_unfused(q.double(), k.double(), v.double(), return_lse=True, **kw)
    assert_close("fused vs unfused", ref, out, TOL[torch.float32])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[torch.float32])


def test_reference_paths_agree(device):
    # the per-sequence loop and the whole-batch unfused path are independent codes for one definition
    lens_q = torch.tensor([9, 30, 0], dtype=torch.int32, device=device)
    lens_k = torch.tensor([30, 30, 4], dtype=torch.int32, device=device)
    q, k, v = _padded((3, 30, 30, 6, 2, 24), torch.float64, device)
    for kw in ({}, {"causal": True}, {"window_size": (4, 6), "softcap": 2.0}):
        a, la = reference.attention(q, k, v, seqlens_q=lens_q, seqlens_k=lens_k, return_lse=True, **kw)
        b, lb = reference.attention_unfused(q, k, v, seqlens_q=lens_q, seqlens_k=lens_k, return_lse=True, **kw)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.equal(torch.isneginf(la), torch.isneginf(lb))
        torch.testing.assert_close(la[~torch.isneginf(la)], lb[~torch.isneginf(lb)], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sq, sk", [(24, 24), (10, 31), (31, 10)])
def test_reference_matches_sdpa(sq, sk, device):
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    q, k, v = _padded((2, sq, sk, 8, 2, 16), torch.float64, device)
    to_sdpa = lambda x: x.transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D]
    full = F.scaled_dot_product_attention(to_sdpa(q), to_sdpa(k), to_sdpa(v), enable_gqa=True)
    torch.testing.assert_close(reference.attention(q, k, v), to_sdpa(full), rtol=1e-10, atol=1e-10)

    # our causal is bottom-right; SDPA's is_causal is top-left, and the two differ whenever Sq != Sk
    ks, vs = (x.repeat_interleave(4, dim=2) for x in (k, v))
    ours = reference.attention(q, k, v, causal=True)
    lower_right = F.scaled_dot_product_attention(
        to_sdpa(q), to_sdpa(ks), to_sdpa(vs), attn_mask=causal_lower_right(sq, sk)
    )
    upper_left = F.scaled_dot_product_attention(
        to_sdpa(q), to_sdpa(ks), to_sdpa(vs), attn_mask=causal_upper_left(sq, sk)
    )
    # rows with no visible key (Sq > Sk) are zero in ours; SDPA gives NaN or zero there, by version
    defined = ~torch.isnan(to_sdpa(lower_right))
    torch.testing.assert_close(ours[defined], to_sdpa(lower_right)[defined], rtol=1e-10, atol=1e-10)
    assert (ours[:, : max(sq - sk, 0)] == 0).all()
    if sq == sk:
        torch.testing.assert_close(ours, to_sdpa(upper_left), rtol=1e-10, atol=1e-10)
    else:
        assert not torch.allclose(ours.nan_to_num(), to_sdpa(upper_left).nan_to_num())


def test_strided_views_of_fused_qkv(device):
    # q, k, v carved out of one projection output: the kernel must honour the head and token strides
    b, s, hq, hkv, d = 2, 45, 8, 2, 32
    qkv = torch.randn(b, s, hq + 2 * hkv, d, device=device)
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq : hq + hkv], qkv[:, :, hq + hkv :]
    assert not q.is_contiguous()
    out = fast.attention(q, k, v, causal=True)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
    assert_close("strided", ref, out, TOL[torch.float32])


def test_rows_without_keys_are_zero(device):
    # Sq > Sk with a causal mask: the first Sq - Sk queries see nothing
    q, k, v = _padded((1, 40, 8, 2, 2, 16), torch.float16, device)
    out, lse = fast.attention(q, k, v, causal=True, return_lse=True)
    assert (out[:, :32] == 0).all() and torch.isneginf(lse[:, :, :32]).all()
    assert torch.isfinite(lse[:, :, 32:]).all()


def test_empty_inputs(device):
    q, k, v, cu_q, cu_k = random_packed([0, 0], [0, 0], 2, 1, 16, torch.float32, device)
    out, lse = fast.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
    q, k, v, cu_q, cu_k = random_packed([3, 4], [0, 0], 2, 1, 16, torch.float32, device)
    out, lse = fast.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


# ---- on the GPU: bf16, the sizes the benchmark uses, every head dim the kernel takes
GPU_SHAPES = [
    (2, 1024, 1024, 32, 8, 128),
    (1, 2048, 2048, 8, 8, 64),
    (1, 1000, 1500, 4, 1, 256),
    (2, 777, 777, 6, 2, 80),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("feature", ["full", "causal", "causal-window", "softcap"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: shape_id(*s))
def test_gpu_padded_matches_reference(shape, feature, dtype):
    q, k, v = _padded(shape, dtype, "cuda")
    _check(q, k, v, dtype, **FEATURES[feature])


@pytest.mark.gpu
@pytest.mark.parametrize("feature", ["full", "causal", "window-both", "softcap"])
def test_gpu_unfused_kernels(feature):
    q, k, v = _padded((2, 300, 517, 8, 2, 128), torch.bfloat16, "cuda")
    out = fast.attention_unfused(q, k, v, **FEATURES[feature])
    ref = reference.attention(q.double(), k.double(), v.double(), **FEATURES[feature])
    assert_close("unfused kernels", ref, out, TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_packed_matches_reference(causal, dtype):
    lens_q = [1000, 0, 3000, 17, 256, 1]
    lens_k = [1000, 5, 3100, 17, 512, 1]
    q, k, v, cu_q, cu_k = random_packed(lens_q, lens_k, 16, 4, 128, dtype, "cuda")
    _check(q, k, v, dtype, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal)
