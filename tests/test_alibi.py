"""ALiBi: TensorRT-LLM's slope generator against Bloom's in transformers, and the bias computed inside the
prefill, unfused and decode kernels against the reference."""

from __future__ import annotations

import pytest
import torch

import attn.fast as fast
import attn.reference as reference
from helpers import LSE_TOL, TOL, assert_close, assert_lse_close, dtype_id, random_packed


@pytest.mark.parametrize("num_heads", [1, 5, 8, 12, 32, 40, 64])
def test_slopes_match_bloom(num_heads):
    transformers = pytest.importorskip("transformers")
    build = transformers.models.bloom.modeling_bloom.build_alibi_tensor
    # Bloom's bias for key position 1 (all keys visible) is the slope itself
    alibi = build(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)  # [H, 1, 2]
    torch.testing.assert_close(reference.alibi_slopes(num_heads), alibi[:, 0, 1], rtol=1e-6, atol=0)


def test_slopes_tensor_parallel_and_scale():
    full = reference.alibi_slopes(48, alibi_scale=0.5, alibi_bias_max=4.0)
    parts = [reference.alibi_slopes(48, tp_size=4, tp_rank=r, alibi_scale=0.5, alibi_bias_max=4.0) for r in range(4)]
    assert torch.equal(torch.cat(parts), full)
    # 48 heads: the first 32 follow 2^(-4(h+1)/32), the other 16 take the odd powers for 64 heads
    assert full[0].item() == pytest.approx(0.5 * 2 ** (-4 / 32))
    assert full[32].item() == pytest.approx(0.5 * 2 ** (-4 / 64))
    with pytest.raises(ValueError, match="tp_size"):
        reference.alibi_slopes(10, tp_size=4)


def test_bias_definition():
    bias = reference.alibi_bias(2, 4, torch.tensor([0.5]))
    # query 0 sits on key 2, query 1 on key 3 (bottom-right): slope·(j − diag)
    assert bias[0].tolist() == [[-1.0, -0.5, 0.0, 0.5], [-1.5, -1.0, -0.5, 0.0]]


MODES = {
    "alibi-causal": {"causal": True},
    "alibi-full": {},
    "with-scale": {"causal": True, "alibi_mode": "alibi_with_scale"},
    "softcap": {"causal": True, "softcap": 3.0},
    "softcap-with-scale": {"softcap": 3.0, "alibi_mode": "alibi_with_scale"},
    "window": {"causal": True, "window_size": (11, 0)},
}


def _slopes(per_batch, b, hq, device):
    base = reference.alibi_slopes(hq, device=device)
    # per-sequence slopes: each sequence its own scaling of the standard ones
    return base * torch.rand(b, 1, device=device).add(0.5) if per_batch else base


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes-Hq", "slopes-B-Hq"])
@pytest.mark.parametrize("mode", MODES)
def test_prefill_with_alibi(mode, per_batch, dtype, device):
    lens_q, lens_k = [13, 0, 40], [20, 5, 40]
    q, k, v, cu_q, cu_k = random_packed(lens_q, lens_k, 6, 2, 32, dtype, device)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, alibi_slopes=_slopes(per_batch, 3, 6, device), **MODES[mode])
    out, lse = fast.attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    assert_close("prefill", ref, out, TOL[dtype])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[dtype])
    ref_unfused = reference.attention_unfused(q.double(), k.double(), v.double(), **kw)
    torch.testing.assert_close(ref_unfused, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["alibi-causal", "softcap-with-scale"])
def test_unfused_kernels_with_alibi(mode, device):
    q, k, v, cu_q, cu_k = random_packed([9, 0, 20], [14, 5, 20], 4, 2, 16, torch.float16, device)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, alibi_slopes=_slopes(True, 3, 4, device), **MODES[mode])
    ref = reference.attention(q.double(), k.double(), v.double(), **kw)
    assert_close("unfused kernels", ref, fast.attention_unfused(q, k, v, **kw), TOL[torch.float16])


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("mode", ["alibi-causal", "with-scale", "softcap"])
def test_decode_with_alibi(mode, splits, paged, device):
    b, sq, hq, hkv, d = 3, 2, 8, 2, 32
    lens = torch.tensor([2, 37, 60], dtype=torch.int32, device=device)
    q = torch.randn(b, sq, hq, d, device=device, dtype=torch.float16)
    k_cache = torch.randn(b, 64, hkv, d, device=device, dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    kw = dict(alibi_slopes=_slopes(True, b, hq, device), num_splits=splits, **MODES[mode])
    if paged:
        k_cache = k_cache.view(b * 8, 8, hkv, d)
        v_cache = v_cache.view(b * 8, 8, hkv, d)
        kw["block_table"] = torch.arange(b * 8, device=device, dtype=torch.int32).view(b, 8).flip(1).contiguous()
    out, lse = fast.decode(q, k_cache, v_cache, lens, return_lse=True, **kw)
    ref, ref_lse = reference.decode(q.double(), k_cache.double(), v_cache.double(), lens, return_lse=True, **kw)
    assert_close("decode", ref, out, TOL[torch.float16])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[torch.float16])


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_alibi_bad_input(impl, device):
    fn = reference.attention if impl == "reference" else fast.attention
    q = torch.randn(2, 8, 4, 16, device=device)
    with pytest.raises(ValueError, match="alibi_slopes must be"):
        fn(q, q, q, alibi_slopes=torch.ones(3, device=device))
    with pytest.raises(ValueError, match="alibi_mode"):
        fn(q, q, q, alibi_slopes=torch.ones(4, device=device), alibi_mode="sqrt")
    with pytest.raises(TypeError, match="alibi_slopes must be a floating-point"):
        fn(q, q, q, alibi_slopes=torch.ones(4, dtype=torch.int32, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["alibi-causal", "with-scale"])
def test_gpu_alibi(mode):
    q = torch.randn(2, 1024, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kw = dict(alibi_slopes=reference.alibi_slopes(32, device="cuda"), **MODES[mode])
    assert_close("prefill", reference.attention(q.float(), k.float(), v.float(), **kw), fast.attention(q, k, v, **kw),
                 TOL[torch.bfloat16])  # fmt: skip
    lens = torch.tensor([1024, 333], dtype=torch.int32, device="cuda")
    out = fast.decode(q[:, -1:].contiguous(), k, v, lens, **kw)
    ref = reference.decode(q[:, -1:].float(), k.float(), v.float(), lens, **kw)
    assert_close("decode", ref, out, TOL[torch.bfloat16])
