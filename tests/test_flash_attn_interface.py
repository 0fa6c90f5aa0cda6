"""attn.flash_attn_interface on FlashAttention's own test grid (seqlen pairs with Sq > Sk and Sq < Sk, odd head
dims, MQA/GQA, contiguous and paged caches, appends with rotary), against a plain float64 computation written
here from FlashAttention's documented semantics. Tolerances are tests/helpers.py's (fp32: IEEE products, a few
ulps amplified by the reduction length)."""

import math

import pytest
import torch

from attn.flash_attn_interface import (
    flash_attn_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)
from tests.helpers import LSE_TOL, TOL, assert_close, assert_lse_close, to_paged


def ref_attention(q, k, v, lens_k=None, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None):
    """FlashAttention's forward in float64: ``q [B, Sq, H, D]``, ``k, v [B, Sk, Hkv, D]``, sequence ``b`` using its
    first ``lens_k[b]`` keys; query ``i`` sits at ``i + Sk_b − Sq`` (bottom-right). Returns out and lse."""
    b, sq, h, d = q.shape
    g = h // k.shape[2]
    scale = scale if scale is not None else 1 / math.sqrt(d)
    out = torch.zeros(b, sq, h, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float64)
    for i in range(b):
        sk = int(lens_k[i]) if lens_k is not None else k.shape[1]
        kk = k[i, :sk].double().repeat_interleave(g, 1)
        vv = v[i, :sk].double().repeat_interleave(g, 1)
        s = torch.einsum("qhd,khd->hqk", q[i].double(), kk) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        row = torch.arange(sq)[:, None] + sk - sq
        col = torch.arange(sk)[None, :]
        if alibi is not None:
            slopes = alibi[i] if alibi.dim() == 2 else alibi
            s = s - slopes.double()[:, None, None] * (row - col).abs()
        visible = torch.ones(sq, sk, dtype=torch.bool)
        if causal:
            visible &= col <= row
        if window[0] >= 0:
            visible &= col >= row - window[0]
        if window[1] >= 0:
            visible &= col <= row + window[1]
        s = s.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(s, -1)
        p = torch.exp(s - row_lse[..., None]).nan_to_num(0.0)
        out[i] = torch.einsum("hqk,khd->qhd", p, vv)
        lse[i] = row_lse
    return out, lse


# FlashAttention's test_flash_attn_output pairs, shrunk for the interpreter: Sq > Sk and Sq < Sk both
SEQLENS = [(1, 23), (3, 79), (52, 27), (113, 20)]


@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("d,hkv", [(32, 4), (59, 2), (40, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func(seqlen_q, seqlen_k, d, hkv, causal, device):
    h = 4
    q = torch.randn(2, seqlen_q, h, d, device=device)
    k = torch.randn(2, seqlen_k, hkv, d, device=device)
    v = torch.randn(2, seqlen_k, hkv, d, device=device)
    window = (5, 3) if d == 40 else (-1, -1)
    softcap = 2.0 if d == 59 else 0.0
    alibi = torch.rand(2, h, device=device) * 0.3 if causal and d == 32 else None
    out, lse, probs = flash_attn_func(q, k, v, 0.0, 0.7, causal, window, softcap, alibi, return_attn_probs=True)
    ref, ref_lse = ref_attention(q.cpu(), k.cpu(), v.cpu(), causal=causal, window=window, softcap=softcap,
                                 alibi=None if alibi is None else alibi.cpu(), scale=0.7)  # fmt: skip
    assert probs is None
    assert_close("out", ref, out.cpu(), TOL[torch.float32])
    assert_lse_close("lse", ref_lse, lse.cpu(), LSE_TOL[torch.float32])
    alone = flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi,
                            softmax_scale=0.7, deterministic=True)  # fmt: skip
    assert torch.equal(alone, out)


def test_qkvpacked_and_errors(device):
    qkv = torch.randn(2, 17, 3, 2, 16, device=device)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    ref, _ = ref_attention(*(x.cpu() for x in qkv.unbind(2)), causal=True)
    assert_close("qkvpacked", ref, out.cpu(), TOL[torch.float32])
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p=0.1)
    with pytest.raises(ValueError, match="alibi_slopes"):
        flash_attn_func(*qkv.unbind(2), alibi_slopes=torch.ones(2, device=device))


@pytest.mark.parametrize("paged", [False, True])
def test_flash_attn_varlen_func(paged, device):
    lens_q, lens_k = [5, 1, 17], [9, 30, 17]
    h, hkv, d = 4, 2, 24
    qs = [torch.randn(n, h, d) for n in lens_q]
    ks = [torch.randn(n, hkv, d) for n in lens_k]
    vs = [torch.randn(n, hkv, d) for n in lens_k]
    cu_q = torch.tensor([0, 5, 6, 23], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 39, 56], dtype=torch.int32, device=device)
    q = torch.cat(qs).to(device)
    if paged:
        k_cache = torch.zeros(3, 30, hkv, d)
        v_cache = torch.zeros(3, 30, hkv, d)
        for i, n in enumerate(lens_k):
            k_cache[i, :n], v_cache[i, :n] = ks[i], vs[i]
        k, v, table = to_paged(k_cache.to(device), v_cache.to(device), lens_k, block_size=8)
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 30, causal=True, window_size=(6, 0),
                                             return_attn_probs=True, block_table=table)  # fmt: skip
    else:
        k, v = torch.cat(ks).to(device), torch.cat(vs).to(device)
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 30, causal=True, window_size=(6, 0),
                                             return_attn_probs=True)  # fmt: skip
    assert lse.shape == (h, 23)
    for i in range(3):
        ref, ref_lse = ref_attention(qs[i][None], ks[i][None], vs[i][None], causal=True, window=(6, 0))
        lo, hi = int(cu_q[i]), int(cu_q[i + 1])
        assert_close(f"seq{i}", ref[0], out[lo:hi].cpu(), TOL[torch.float32])
        assert_lse_close(f"lse{i}", ref_lse[0], lse[:, lo:hi].cpu(), LSE_TOL[torch.float32])


def _rotary_ref(x, cos, sin, pos, interleaved):
    """Rotary by FlashAttention's definition, one position at a time, in float64."""
    out = x.double().clone()
    rd = 2 * cos.shape[-1]
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            c, sn = cos[pos[b][s]].double(), sin[pos[b][s]].double()
            if interleaved:
                x1, x2 = x[b, s, :, 0:rd:2].double(), x[b, s, :, 1:rd:2].double()
                out[b, s, :, 0:rd:2] = x1 * c - x2 * sn
                out[b, s, :, 1:rd:2] = x1 * sn + x2 * c
            else:
                x1, x2 = x[b, s, :, : rd // 2].double(), x[b, s, :, rd // 2 : rd].double()
                out[b, s, :, : rd // 2] = x1 * c - x2 * sn
                out[b, s, :, rd // 2 : rd] = x1 * sn + x2 * c
    return out.float()


@pytest.mark.parametrize(
    "seqlen_q,new,paged,rotary,interleaved,causal,batch_idx",
    [
        (1, 1, False, True, True, True, False),
        (1, 1, True, True, False, True, False),
        (4, 4, True, False, False, True, False),
        (3, 3, False, True, False, False, True),  # not causal: every query turned at cache_seqlens
        (5, 0, False, False, False, True, True),  # no append; Sq > 1 over the cache
        (2, 2, True, True, True, False, False),
    ],
)
def test_flash_attn_with_kvcache(seqlen_q, new, paged, rotary, interleaved, causal, batch_idx, device):
    b, h, hkv, d, max_len = 3, 4, 2, 32, 40
    cached = torch.tensor([7, 19, 0 if new else 3], dtype=torch.int32)
    k_cache = torch.randn(b, max_len, hkv, d)
    v_cache = torch.randn(b, max_len, hkv, d)
    q = torch.randn(b, seqlen_q, h, d)
    k_new, v_new = torch.randn(b, new, hkv, d), torch.randn(b, new, hkv, d)
    cos = sin = None
    if rotary:
        angle = torch.rand(64, 8) * 6.0  # rotary_dim 16 of d 32: a partial rotary
        cos, sin = torch.cos(angle), torch.sin(angle)
    # the expected cache after the append, and the expected (rotated) queries
    order = torch.tensor([2, 0, 1]) if batch_idx else torch.arange(b)
    exp_k, exp_v = k_cache.clone(), v_cache.clone()
    k_in = k_new
    if rotary and new:
        k_in = _rotary_ref(k_new, cos, sin, [[int(cached[i]) + t for t in range(new)] for i in range(b)], interleaved)
    for i in range(b):
        row = int(order[i])
        exp_k[row, cached[i] : cached[i] + new] = k_in[i]
        exp_v[row, cached[i] : cached[i] + new] = v_new[i]
    q_in = q
    if rotary:
        pos = [[int(cached[i]) + (t if causal else 0) for t in range(seqlen_q)] for i in range(b)]
        q_in = _rotary_ref(q, cos, sin, pos, interleaved)
    lens = cached + new
    ref, ref_lse = ref_attention(q_in, exp_k[order], exp_v[order], lens, causal=causal)

    kc, vc, table = k_cache.to(device), v_cache.to(device), None
    if paged:
        kc, vc, table = to_paged(kc, vc, [max_len] * b, block_size=8)
    opts = dict(
        k=k_new.to(device) if new else None, v=v_new.to(device) if new else None, cache_seqlens=cached.to(device),
        block_table=table, causal=causal, return_softmax_lse=True, rotary_interleaved=interleaved,
        cache_batch_idx=order.to(device=device, dtype=torch.int32) if batch_idx else None,
    )  # fmt: skip
    if rotary:
        opts.update(rotary_cos=cos.to(device), rotary_sin=sin.to(device))
    out, lse = flash_attn_with_kvcache(q.to(device), kc, vc, **opts)
    assert_close("out", ref, out.cpu(), TOL[torch.float32])
    assert_lse_close("lse", ref_lse, lse.cpu(), LSE_TOL[torch.float32])
    # the append landed where FlashAttention writes it
    for i in range(b):
        row = int(order[i])
        for t in range(int(cached[i]), int(lens[i])):
            if paged:
                blk, slot = int(table[i, t // 8]), t % 8
                got_k, got_v = kc[blk, slot].cpu(), vc[blk, slot].cpu()
            else:
                got_k, got_v = kc[row, t].cpu(), vc[row, t].cpu()
            torch.testing.assert_close(got_k, exp_k[row, t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_v, exp_v[row, t])


def test_with_kvcache_errors(device):
    q = torch.randn(1, 1, 2, 16, device=device)
    kc = torch.zeros(1, 8, 2, 16, device=device)
    with pytest.raises(ValueError, match="cache_leftpad"):
        flash_attn_with_kvcache(q, kc, kc.clone(), cache_seqlens=1, cache_leftpad=torch.zeros(1, device=device))
    with pytest.raises(ValueError, match="k and v"):
        flash_attn_with_kvcache(q, kc, kc.clone(), k=torch.zeros(1, 1, 2, 16, device=device), cache_seqlens=1)


def _bad_kvcache_calls(device):
    """(case, keyword arguments, exception type, message) of calls that must be refused before the append."""
    f32 = dict(device=device)
    cos, sin = torch.rand(40, 8, **f32), torch.rand(40, 8, **f32)
    return [
        ("cos short", dict(rotary_cos=cos[:4], rotary_sin=sin[:4]), ValueError, "rotary_cos must have at least 32"),
        ("rotary_dim > D", dict(rotary_cos=torch.rand(40, 24, **f32), rotary_sin=torch.rand(40, 24, **f32)),
         ValueError, "rotary_dim"),
        ("cos/sin shapes", dict(rotary_cos=cos, rotary_sin=sin[:, :4]), ValueError, "rotary_sin must have"),
        ("cos 1-D", dict(rotary_cos=cos[:, 0], rotary_sin=sin[:, 0]), ValueError, "rotary_cos must be 2-D"),
        ("cos int", dict(rotary_cos=cos.int(), rotary_sin=sin.int()), TypeError, "rotary_cos must be a floating"),
        ("cos device", dict(rotary_cos=cos.to("meta"), rotary_sin=sin.to("meta")), ValueError, "q's device"),
        ("batch_idx float", dict(cache_batch_idx=torch.tensor([0.0, 1.0], **f32)), TypeError, "cache_batch_idx"),
        ("batch_idx shape", dict(cache_batch_idx=torch.tensor([0, 1, 1], dtype=torch.int32, **f32)), ValueError,
         "cache_batch_idx"),
        ("seqlens int64", dict(cache_seqlens=torch.tensor([3, 5], **f32)), TypeError, "cache_seqlens"),
        ("num_splits bool", dict(num_splits=True), ValueError, "num_splits"),
        # errors of the decode step's own arguments, which used to surface after the append had written
        ("alibi shape", dict(alibi_slopes=torch.rand(3, **f32), causal=True), ValueError, "alibi_slopes"),
        ("softcap", dict(softcap=-1.0), ValueError, "softcap"),
        ("scale", dict(softmax_scale="x"), ValueError, "softmax_scale"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_kvcache_calls("cpu"))))
def test_with_kvcache_refuses_before_writing(case, device):
    """Every refused call leaves the cache exactly as it was, and names the argument: the rotary tables are
    checked as FlashAttention checks them (shape, dtype, rotary_dim <= D, enough rows for the cache's capacity),
    and the decode step's arguments before the append writes anything."""
    name, kw, exc, match = _bad_kvcache_calls(device)[case]
    b, cap, h, d = 2, 32, 2, 32
    kc, vc = torch.randn(b, cap, h, d, device=device), torch.randn(b, cap, h, d, device=device)
    k0, v0 = kc.clone(), vc.clone()
    q = torch.randn(b, 1, h, d, device=device)
    k_new, v_new = torch.randn(b, 1, h, d, device=device), torch.randn(b, 1, h, d, device=device)
    kw.setdefault("cache_seqlens", torch.tensor([3, 5], dtype=torch.int32, device=device))
    with pytest.raises(exc, match=match):
        flash_attn_with_kvcache(q, kc, vc, k=k_new, v=v_new, **kw)
    assert torch.equal(kc, k0) and torch.equal(vc, v0), f"{name}: a refused call changed the cache"


def test_with_kvcache_rotary_past_capacity_stays_inside(device):
    """A length past the cache's capacity (device values, unread) must not index past the rotary tables, which on
    a GPU is a device-side assert that ends the CUDA context: the append skips the token and records it, and
    `attn.check_errors` reports it. Before the fix, the table lookup raised IndexError (CPU) or asserted (GPU)."""
    import attn

    b, cap, h, d = 2, 32, 2, 32
    kc, vc = torch.zeros(b, cap, h, d, device=device), torch.zeros(b, cap, h, d, device=device)
    q = torch.randn(b, 1, h, d, device=device)
    k_new, v_new = torch.randn(b, 1, h, d, device=device), torch.randn(b, 1, h, d, device=device)
    cos, sin = torch.rand(cap, 8, device=device), torch.rand(cap, 8, device=device)
    attn.check_errors()  # nothing pending from earlier tests
    lens = torch.tensor([3, cap + 7], dtype=torch.int32, device=device)
    flash_attn_with_kvcache(q, kc, vc, k=k_new, v=v_new, cache_seqlens=lens, rotary_cos=cos, rotary_sin=sin)
    with pytest.raises(ValueError, match="out-of-range"):
        attn.check_errors()
    assert torch.count_nonzero(kc[1]) == 0, "the token past the capacity was written"
    assert torch.count_nonzero(kc[0, 3]) > 0, "the valid sequence's token was not written"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 239), (3, 799), (127, 512), (113, 203), (1023, 1024), (512, 256)])
@pytest.mark.parametrize("d,hkv", [(64, 8), (59, 2), (128, 1), (256, 4)])
def test_gpu_flash_attn_func(dtype, seqlen_q, seqlen_k, d, hkv):
    """FlashAttention's own seqlen pairs and head dims on the GPU in half precision, against float64."""
    q = torch.randn(2, seqlen_q, 8, d, device="cuda", dtype=dtype)
    k = torch.randn(2, seqlen_k, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn(2, seqlen_k, hkv, d, device="cuda", dtype=dtype)
    for causal in (False, True):
        out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=(100, 0 if causal else 50),
                                      return_attn_probs=True)  # fmt: skip
        ref, ref_lse = ref_attention(q.cpu(), k.cpu(), v.cpu(), causal=causal, window=(100, 0 if causal else 50))
        assert_close("out", ref, out.float().cpu(), TOL[dtype])
        assert_lse_close("lse", ref_lse, lse.cpu(), LSE_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_with_kvcache_rotary_append(paged):
    b, h, hkv, d, max_len = 4, 16, 2, 128, 2048
    dtype = torch.bfloat16
    cached = torch.tensor([1000, 1, 2000, 517], dtype=torch.int32)
    k_cache = torch.randn(b, max_len, hkv, d, dtype=dtype)
    v_cache = torch.randn(b, max_len, hkv, d, dtype=dtype)
    q = torch.randn(b, 1, h, d, dtype=dtype)
    k_new, v_new = torch.randn(b, 1, hkv, d, dtype=dtype), torch.randn(b, 1, hkv, d, dtype=dtype)
    angle = torch.rand(max_len, 32) * 6.0
    cos, sin = torch.cos(angle), torch.sin(angle)
    pos = [[int(c)] for c in cached]
    exp_k = k_cache.clone()
    exp_k[torch.arange(b), cached.long()] = _rotary_ref(k_new, cos, sin, pos, False)[:, 0].to(dtype)
    exp_v = v_cache.clone()
    exp_v[torch.arange(b), cached.long()] = v_new[:, 0]
    # the kernel rotates q in fp32 and rounds it to bf16 for the tensor cores, as the cache write rounds k: the
    # reference takes the same rounded q (unrounded, bf16's 2^-9 on q moved lse by up to 1.8e-3 on the H100)
    q_rot = _rotary_ref(q, cos, sin, pos, False).to(dtype)
    ref, ref_lse = ref_attention(q_rot, exp_k, exp_v, cached + 1, causal=True)
    kc, vc, table = k_cache.cuda(), v_cache.cuda(), None
    if paged:
        kc, vc, table = to_paged(kc, vc, (cached + 1).tolist(), block_size=256)
    out, lse = flash_attn_with_kvcache(
        q.cuda(), kc, vc, k=k_new.cuda(), v=v_new.cuda(), rotary_cos=cos.cuda(), rotary_sin=sin.cuda(),
        cache_seqlens=cached.cuda(), block_table=table, causal=True, rotary_interleaved=False,
        return_softmax_lse=True,
    )  # fmt: skip
    assert_close("out", ref, out.float().cpu(), TOL[dtype])
    assert_lse_close("lse", ref_lse, lse.cpu(), LSE_TOL[dtype])
