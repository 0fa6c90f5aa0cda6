"""The pre-processing step (QKV bias, RoPE, append): kernel vs reference, RoPE's defining property, and
agreement with Hugging Face's rotate_half formulation."""

from __future__ import annotations

import pytest
import torch

import attn.fast as fast
import attn.reference as reference
from attn.layout import cu_seqlens_from_lengths
from helpers import TOL, assert_close, dtype_id

HQ, HKV, D = 4, 2, 40


def _qkv_and_cache(dtype, device, paged, packed, counts=(3, 0, 5), starts=(0, 9, 70)):
    b = len(counts)
    width = (HQ + 2 * HKV) * D
    if packed:
        cu = cu_seqlens_from_lengths(torch.tensor(counts, device=device))
        qkv = torch.randn(sum(counts), width, dtype=dtype, device=device)
    else:
        cu = None
        qkv = torch.randn(b, 2, width, dtype=dtype, device=device)
    if paged:
        k_cache = torch.randn(40, 8, HKV, D, dtype=dtype, device=device)
        table = torch.randperm(40, device=device)[: b * 12].view(b, 12).to(torch.int32)
    else:
        k_cache = torch.randn(b, 96, HKV, D, dtype=dtype, device=device)
        table = None
    seqlens = torch.tensor(starts, dtype=torch.int32, device=device)
    return qkv, k_cache, torch.randn_like(k_cache), seqlens, cu, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("rope", [(0, "neox"), (40, "neox"), (16, "neox"), (40, "gptj"), (24, "gptj")],
                         ids=lambda r: f"rot{r[0]}-{r[1]}")  # fmt: skip
@pytest.mark.parametrize("layout", ["packed-contiguous", "packed-paged", "padded-paged"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_preprocess_matches_reference(bias, layout, rope, dtype, device):
    packed, paged = layout.startswith("packed"), layout.endswith("paged")
    qkv, k_cache, v_cache, seqlens, cu, table = _qkv_and_cache(dtype, device, paged, packed)
    qkv_bias = torch.randn(qkv.shape[-1], dtype=dtype, device=device) if bias else None
    kw = dict(num_heads_q=HQ, num_heads_kv=HKV, cu_seqlens_new=cu, block_table=table, qkv_bias=qkv_bias,
              rotary_dim=rope[0], rope_style=rope[1])  # fmt: skip
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = reference.preprocess(qkv, k_ref, v_ref, seqlens, **kw)
    q = fast.preprocess(qkv, k_cache, v_cache, seqlens, **kw)
    # both compute the bias and rotation in fp32 and round once: they can differ by one rounding of a value
    # whose fp32 computation differed in the last bits (operation order, fused multiply-adds), so half the
    # usual low-precision tolerance; v is only biased, which both do identically
    assert_close("q", q_ref, q, TOL[dtype] / 2)
    assert_close("k cache", k_ref, k_cache, TOL[dtype] / 2)
    assert torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn], ids=dtype_id)
@pytest.mark.parametrize("rotary_dim", [0, 40], ids=lambda r: f"rot{r}")
@pytest.mark.parametrize("layout", ["packed-contiguous", "packed-paged"])
def test_quantizing_preprocess_matches_reference(layout, rotary_dim, qdtype, device):
    paged = layout.endswith("paged")
    qkv, k_float, _, seqlens, cu, table = _qkv_and_cache(torch.float16, device, paged, True)
    k_scale = torch.rand(HKV, device=device) * 0.05 + 0.01  # per head
    v_scale = torch.full((1,), 0.03, device=device)  # one for all heads
    k_cache = torch.zeros(k_float.shape, dtype=qdtype, device=device)
    v_cache = torch.zeros(k_float.shape, dtype=qdtype, device=device)
    kw = dict(num_heads_q=HQ, num_heads_kv=HKV, cu_seqlens_new=cu, block_table=table, rotary_dim=rotary_dim,
              qkv_bias=torch.randn(qkv.shape[-1], dtype=torch.float16, device=device), k_scale=k_scale,
              v_scale=v_scale)  # fmt: skip
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = reference.preprocess(qkv, k_ref, v_ref, seqlens, **kw)
    q = fast.preprocess(qkv, k_cache, v_cache, seqlens, **kw)
    assert_close("q", q_ref, q, TOL[torch.float16] / 2)
    # v is biased and quantized by the same fp32 steps: the same bytes
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8))
    if rotary_dim == 0:
        assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8))
    else:
        # a rotated key can round differently in its last fp16 bit (fused multiply-adds), which moves its
        # quantized value to the neighbouring code (int8 values, and e4m3 codes of one sign, are consecutive
        # integers), and only for values sitting on a rounding edge
        ints = k_cache.view(torch.int8 if qdtype == torch.int8 else torch.uint8).int()
        ref_ints = k_ref.view(torch.int8 if qdtype == torch.int8 else torch.uint8).int()
        differ = ints != ref_ints
        assert differ.float().mean() <= 0.01, f"{int(differ.sum())} of {differ.numel()} key bytes differ"
        assert ((ints - ref_ints).abs() <= 1).all()


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn], ids=dtype_id)
def test_gpu_quantizing_preprocess_bf16(qdtype):
    # real int8/e4m3 stores on the GPU, bf16 input, a Llama-like head layout, paged, lengths ragged
    device, hq, hkv, d = "cuda", 32, 8, 128
    counts, starts = [300, 1, 77, 0], [0, 4000, 129, 5]
    cu = torch.tensor([0] + counts, device=device).cumsum(0).to(torch.int32)
    qkv = torch.randn(sum(counts), (hq + 2 * hkv) * d, dtype=torch.bfloat16, device=device)
    table = torch.randperm(4 * 70, device=device).view(4, 70).to(torch.int32)
    k_cache = torch.zeros(4 * 70, 64, hkv, d, dtype=qdtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    kw = dict(
        num_heads_q=hq,
        num_heads_kv=hkv,
        cu_seqlens_new=cu,
        block_table=table,
        rotary_dim=d,
        k_scale=torch.rand(hkv, device=device) * 0.05 + 0.01,
        v_scale=torch.full((1,), 0.03, device=device),
    )
    seqlens = torch.tensor(starts, dtype=torch.int32, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = reference.preprocess(qkv, k_ref, v_ref, seqlens, **kw)
    q = fast.preprocess(qkv, k_cache, v_cache, seqlens, **kw)
    assert_close("q", q_ref.float(), q.float(), TOL[torch.bfloat16])
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8))
    # rotated keys: at most one code apart, rarely (see test_quantizing_preprocess_matches_reference)
    ints = k_cache.view(torch.int8 if qdtype == torch.int8 else torch.uint8).int()
    ref_ints = k_ref.view(torch.int8 if qdtype == torch.int8 else torch.uint8).int()
    assert (ints != ref_ints).float().mean() <= 0.01
    assert ((ints - ref_ints).abs() <= 1).all()


def test_rope_depends_on_relative_position(device):
    # the point of RoPE: q_m · k_n depends on m - n only
    q = torch.randn(1, 1, 64, dtype=torch.float64, device=device)
    k = torch.randn(1, 1, 64, dtype=torch.float64, device=device)
    for style in ("neox", "gptj"):

        def dot(m, n, style=style):
            qm = reference.apply_rope(q, torch.tensor([m], device=device), style=style)
            kn = reference.apply_rope(k, torch.tensor([n], device=device), style=style)
            return (qm * kn).sum().item()

        # the angles are float32 (as in HF): at position ~100 they carry ~1e-5 rad of rounding, so compare on
        # the scale of |q||k| rather than relative to a dot product that may be near zero
        size = (q.norm() * k.norm()).item()
        assert abs(dot(5, 2) - dot(103, 100)) <= 1e-4 * size
        assert abs(dot(5, 2) - dot(5, 3)) > 1e-3 * size


def test_rope_matches_hugging_face_formulation(device):
    # HF's Llama: q * cos + rotate_half(q) * sin with cos/sin repeated over the two halves
    x = torch.randn(7, 3, 32, device=device)
    pos = torch.tensor([0, 1, 5, 100, 2047, 4096, 70000], device=device)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 32, 2, dtype=torch.int64).float() / 32))
    freqs = pos.float()[:, None] * inv_freq[None, :].to(device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    rotate_half = torch.cat((-x[..., 16:], x[..., :16]), dim=-1)
    expected = x * cos + rotate_half * sin
    torch.testing.assert_close(reference.apply_rope(x, pos, style="neox"), expected, rtol=1e-6, atol=1e-6)


BAD = {
    "rotary-odd": ({"rotary_dim": 7}, ValueError, "rotary_dim must be an even"),
    "rotary-large": ({"rotary_dim": 48}, ValueError, "at most the head dim"),
    "style": ({"rotary_dim": 8, "rope_style": "llama"}, ValueError, "rope_style"),
    "bias-shape": ({"qkv_bias": "short"}, ValueError, "qkv_bias must be"),
    "heads": ({"num_heads_q": 3}, ValueError, "must divide"),
}


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("case", BAD)
def test_preprocess_rejects_bad_input(case, impl, device):
    qkv, k_cache, v_cache, seqlens, cu, table = _qkv_and_cache(torch.float32, device, True, True)
    before = k_cache.clone()
    extra, exc, match = BAD[case]
    kw = dict(num_heads_q=HQ, num_heads_kv=HKV, cu_seqlens_new=cu, block_table=table)
    kw.update(extra)
    if kw.get("qkv_bias") == "short":
        kw["qkv_bias"] = torch.zeros(5, device=device)
    fn = reference.preprocess if impl == "reference" else fast.preprocess
    with pytest.raises(exc, match=match):
        fn(qkv, k_cache, v_cache, seqlens, **kw)
    assert torch.equal(k_cache, before)


@pytest.mark.gpu
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_gpu_preprocess_long_positions(style):
    # positions up to 128k: the kernel's cos/sin table keeps large angles exact
    b, hq, hkv, d = 8, 32, 8, 128
    counts = [1] * b
    cu = cu_seqlens_from_lengths(torch.tensor(counts, device="cuda"))
    qkv = torch.randn(b, (hq + 2 * hkv) * d, dtype=torch.bfloat16, device="cuda")
    k_cache = torch.randn(b * 2048, 64, hkv, d, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(b * 2048, device="cuda").view(b, 2048).to(torch.int32)
    seqlens = torch.randint(0, 131000, (b,), dtype=torch.int32, device="cuda")
    kw = dict(num_heads_q=hq, num_heads_kv=hkv, cu_seqlens_new=cu, block_table=table, rotary_dim=d, rope_style=style)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = reference.preprocess(qkv, k_ref, v_ref, seqlens, **kw)
    q = fast.preprocess(qkv, k_cache, v_cache, seqlens, **kw)
    assert_close("q", q_ref, q, TOL[torch.bfloat16] / 2)
    assert_close("k cache", k_ref, k_cache, TOL[torch.bfloat16] / 2)
    assert torch.equal(v_cache, v_ref)


SCALINGS = {
    "linear": (dict(rope_type="linear", factor=4.0), dict(type="linear", factor=4.0)),
    "dynamic": (dict(rope_type="dynamic", factor=2.0), dict(type="dynamic", factor=2.0, original_max_position=2048)),
    "llama3": (
        dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=512),
        dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=512),
    ),
    "yarn": (
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=512),
        dict(type="yarn", factor=4.0, original_max_position=512),
    ),
    "yarn-deepseek": (
        dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=512, mscale=1.0, mscale_all_dim=0.707,
             beta_fast=32, beta_slow=1),
        dict(type="yarn", factor=40.0, original_max_position=512, mscale=1.0, mscale_all_dim=0.707),
    ),
}  # fmt: skip


@pytest.mark.parametrize("seq_len", [1000, 6000])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
@pytest.mark.parametrize("name", SCALINGS)
def test_rope_scaling_matches_hugging_face(name, base, seq_len):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_params, ours = SCALINGS[name]
    config = transformers.LlamaConfig(
        hidden_size=64 * 8, num_attention_heads=8, max_position_embeddings=2048,
        rope_parameters={**hf_params, "rope_theta": base},
    )  # fmt: skip
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS[hf_params["rope_type"]](config, "cpu", seq_len=seq_len)
    inv, factor = reference.rope_inv_freq(64, base, reference.RopeScaling(**ours), seq_len=seq_len)
    torch.testing.assert_close(inv, hf_inv.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(hf_factor, rel=1e-12)


@pytest.mark.parametrize("name", SCALINGS)
def test_preprocess_with_rope_scaling(name, device):
    qkv, k_cache, v_cache, seqlens, cu, table = _qkv_and_cache(torch.float32, device, True, True)
    params = dict(SCALINGS[name][1])
    if name == "dynamic":
        params["original_max_position"] = 32  # dynamic NTK changes nothing until sequences outgrow this
    kw = dict(num_heads_q=HQ, num_heads_kv=HKV, cu_seqlens_new=cu, block_table=table, rotary_dim=32,
              rope_scaling=reference.RopeScaling(**params))  # fmt: skip
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = reference.preprocess(qkv, k_ref, v_ref, seqlens, **kw)
    q = fast.preprocess(qkv, k_cache, v_cache, seqlens, **kw)
    assert_close("q", q_ref, q, TOL[torch.float32])
    assert_close("k cache", k_ref, k_cache, TOL[torch.float32])
    # the scaling changed something: plain RoPE gives a different q
    plain = reference.preprocess(qkv, k_ref.clone(), v_ref.clone(), seqlens, **{**kw, "rope_scaling": None})
    assert not torch.allclose(plain, q_ref)


def test_rope_scaling_rejects_bad_parameters():
    with pytest.raises(ValueError, match="rope_scaling.type"):
        reference.RopeScaling(type="ntk")
    with pytest.raises(ValueError, match="needs original_max_position"):
        reference.RopeScaling(type="yarn", factor=4.0)
    with pytest.raises(ValueError, match="factor must be positive"):
        reference.RopeScaling(type="linear", factor=0.0)


@pytest.mark.parametrize("layout", ["packed-paged", "padded-paged", "packed-contiguous"])
def test_unvalidated_preprocess_matches_validated(layout, device):
    # validate=False computes the positions on the device and sizes the cos/sin table by the capacity: the
    # same q and the same cache bytes as the validated call
    packed, paged = layout.startswith("packed"), layout.endswith("paged")
    qkv, k_cache, v_cache, seqlens, cu, table = _qkv_and_cache(torch.float16, device, paged, packed)
    kw = dict(num_heads_q=HQ, num_heads_kv=HKV, cu_seqlens_new=cu, block_table=table, rotary_dim=40)
    k2, v2 = k_cache.clone(), v_cache.clone()
    q1 = fast.preprocess(qkv, k_cache, v_cache, seqlens, **kw)
    q2 = fast.preprocess(qkv, k2, v2, seqlens, validate=False, **kw)
    assert torch.equal(q1, q2) and torch.equal(k_cache, k2) and torch.equal(v_cache, v2)
