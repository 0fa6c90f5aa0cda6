"""Non-finite inputs give what the reference gives (issue 18, findings 3 and 7).

A row that sees no key is zero with ``lse = -inf``; a row that sees a NaN (in q, or in a visible key or value,
cached or fresh) or a ±inf in q is NaN; values outside every row's visible keys (padding past the lengths,
unused cache slots and pool blocks) never reach an output. Before the fix the kernels turned NaN rows into
zeros with ``lse = -inf`` (the finalization tested ``l > 0``, false for a NaN sum), and
``reference.attention_unfused`` let NaN in padding values through (``0 · NaN``).

A non-finite *value* (V) of a key inside a sequence that the causal mask or a window hides from some rows of
a tile reaches exactly the rows that see it: the kernels used to multiply the hidden key's zero weight by it
(``0 · NaN = NaN``) and so spread it to the whole tile; the `test_hidden_*` tests guard that. A row whose
visible scores are all -inf (a -inf bias, an infinite query) outputs zeros with ``lse = -inf``, as the
reference gives it (the fused prefill kernel gave NaN).
"""

from __future__ import annotations

import pytest
import torch

import attn.fast as fast
import attn.reference as reference
from attn import RelativeBias
from attn.layout import cu_seqlens_from_lengths
from helpers import LSE_TOL, TOL, rel_err, sm90, to_paged, to_paged_fast

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _on_device(device):
    # the tests build their tensors on the default device: the GPU where there is one, since outside the
    # interpreter the kernels take CUDA tensors only
    with torch.device(device):
        yield


def assert_matches(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float = 2e-5, lse: bool = False) -> None:
    """``out`` is non-finite exactly where ``ref`` is (NaN and ±inf alike: the reference writes NaN where a row
    sees a non-finite value, a kernel may carry the inf), and close elsewhere; with ``lse``, -inf (no key) must
    match exactly. fp32 inputs: the tolerance is that of the fp32 parity tests (tests/helpers.py)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    ref, out = ref.double(), out.double()
    if lse:
        assert torch.equal(torch.isneginf(ref), torch.isneginf(out)), f"{name}: -inf (no key) pattern differs"
    bad_ref, bad_out = ~torch.isfinite(ref), ~torch.isfinite(out)
    if not torch.equal(bad_ref, bad_out):
        raise AssertionError(
            f"{name}: non-finite pattern differs: reference {int(bad_ref.sum())} entries, kernel {int(bad_out.sum())}"
            f" (kernel non-finite where reference finite: {int((bad_out & ~bad_ref).sum())}, kernel finite where"
            f" reference non-finite: {int((bad_ref & ~bad_out).sum())})"
        )
    ok = ~bad_ref
    if ok.any():
        err = rel_err(ref[ok], out[ok])
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.1e} on the finite entries"


def _poison(kind: str, q, k, v, q_row, key):
    """A copy of (q, k, v) with one non-finite entry: ``kind`` in q_nan, q_inf, q_ninf, k_nan, v_nan, v_inf."""
    q, k, v = q.clone(), k.clone(), v.clone()
    if kind.startswith("q_"):
        q[q_row + (0,)] = {"q_nan": NAN, "q_inf": INF, "q_ninf": -INF}[kind]
    elif kind == "k_nan":
        k[key + (1,)] = NAN
    else:
        v[key + (2,)] = NAN if kind == "v_nan" else INF
    return q, k, v


KINDS = ["q_nan", "q_inf", "q_ninf", "k_nan", "v_nan", "v_inf"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["attention", "attention_unfused"])
def test_prefill_padded(kind, impl):
    # two sequences padded to 24: sequence 0 holds 20 keys, sequence 1 holds 13; causal with Sq = Sk so every
    # row sees key 0 (the key poisoned in sequence 0 for K and V); the padding of sequence 1 holds NaN
    b, s, hq, hkv, d = 2, 24, 4, 2, 16
    q, k, v = (torch.randn(b, s, h, d) for h in (hq, hkv, hkv))
    lens = torch.tensor([20, 13], dtype=torch.int32)
    k[1, 13:], v[1, 13:] = NAN, NAN
    # keys 0 and 1 (seen by the poisoned row 7) of opposite sign along the poisoned q entry: an infinite query
    # then gives +inf and -inf scores (NaN), never a row of -inf scores alone, whatever the draw
    k[0, 0, :, 0], k[0, 1, :, 0] = 1.0, -1.0
    q, k, v = _poison(kind, q, k, v, (0, 7, 1), (0, 0, 1))
    kw = dict(seqlens_q=lens, seqlens_k=lens, causal=True, return_lse=True)
    out, lse = getattr(fast, impl)(q, k, v, **kw)
    ref, ref_lse = getattr(reference, impl)(q.double(), k.double(), v.double(), **kw)
    assert_matches("out", ref, out)
    assert_matches("lse", ref_lse, lse, tol=1e-5, lse=True)
    # the poison reached at least one row, and sequence 1 (NaN padding only) stayed finite
    assert not torch.isfinite(out[0]).all()
    assert torch.isfinite(out[1]).all()


@pytest.mark.parametrize("kind", ["q_nan", "k_nan", "v_nan"])
def test_prefill_packed_and_empty_rows(kind):
    # Sq > Sk under a causal mask: the first Sq - Sk rows of sequence 0 see no key and stay zero however the
    # others are poisoned; sequence 1 (length 1 against 1) is untouched
    lens_q, lens_k, hq, hkv, d = [9, 1], [4, 1], 2, 1, 8
    q = torch.randn(sum(lens_q), hq, d)
    k, v = torch.randn(sum(lens_k), hkv, d), torch.randn(sum(lens_k), hkv, d)
    q, k, v = _poison(kind, q, k, v, (8, 0), (0, 0))
    kw = dict(
        cu_seqlens_q=cu_seqlens_from_lengths(torch.tensor(lens_q, dtype=torch.int32)),
        cu_seqlens_k=cu_seqlens_from_lengths(torch.tensor(lens_k, dtype=torch.int32)),
        causal=True,
        return_lse=True,
    )
    out, lse = fast.attention(q, k, v, **kw)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), **kw)
    assert_matches("out", ref, out)
    assert_matches("lse", ref_lse, lse, tol=1e-5, lse=True)
    assert torch.equal(out[:5], torch.zeros_like(out[:5])) and torch.isneginf(lse[:, :5]).all()
    assert not torch.isfinite(out[8]).all()


@pytest.mark.parametrize("paged,splits", [(False, 3), (True, 1)], ids=["contiguous-splits3", "paged-splits1"])
@pytest.mark.parametrize("kind", ["q_nan", "q_inf", "k_nan", "v_nan"])
def test_decode(kind, splits, paged):
    # sequence 0 is poisoned (q row, or cached key 5 that its one query sees); the slots past every length
    # and the pool's unused blocks hold NaN and must not matter
    b, hq, hkv, d, max_len = 2, 4, 2, 16, 40
    lens = torch.tensor([37, 21], dtype=torch.int32)
    q = torch.randn(b, 1, hq, d)
    kc, vc = torch.randn(b, max_len, hkv, d), torch.randn(b, max_len, hkv, d)
    for i, n in enumerate(lens.tolist()):
        kc[i, n:], vc[i, n:] = NAN, NAN
    q, kc, vc = _poison(kind, q, kc, vc, (0, 0, 1), (0, 5, 0))
    ref, ref_lse = reference.decode(q.double(), kc.double(), vc.double(), lens, return_lse=True)
    table = None
    if paged:
        kc, vc, table = to_paged(kc, vc, [max_len] * b, block_size=8)
        used = set(table.flatten().tolist())
        for blk in range(kc.shape[0]):
            if blk not in used:
                kc[blk], vc[blk] = NAN, NAN
    out, lse = fast.decode(q, kc, vc, lens, block_table=table, num_splits=splits, return_lse=True)
    assert_matches("out", ref, out)
    assert_matches("lse", ref_lse, lse, tol=1e-5, lse=True)
    assert not torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("kind", ["q_nan", "k_nan", "v_nan"])
def test_context_attention(kind):
    # packed chunks over a paged cache: sequence 0's chunk of 5 sees cached key 2; unused blocks hold NaN
    hq, hkv, d, bs = 4, 2, 16, 4
    cached, new = [11, 6], [5, 3]
    total = [c + n for c, n in zip(cached, new)]
    q = torch.randn(sum(new), hq, d)
    kc, vc = torch.randn(2, 20, hkv, d), torch.randn(2, 20, hkv, d)
    q, kc, vc = _poison(kind, q, kc, vc, (1, 0), (0, 2, 0))
    seqlens = torch.tensor(total, dtype=torch.int32)
    cu = cu_seqlens_from_lengths(torch.tensor(new, dtype=torch.int32))
    ref, ref_lse = reference.context_attention(q.double(), kc.double(), vc.double(), seqlens, cu_seqlens_q=cu,
                                               return_lse=True)  # fmt: skip
    kp, vp, table = to_paged(kc, vc, total, block_size=bs)
    used = set(table.flatten().tolist())
    for blk in range(kp.shape[0]):
        if blk not in used:
            kp[blk], vp[blk] = NAN, NAN
    out, lse = fast.context_attention(q, kp, vp, seqlens, cu_seqlens_q=cu, block_table=table, return_lse=True)
    assert_matches("out", ref, out)
    assert_matches("lse", ref_lse, lse, tol=1e-5, lse=True)
    assert not torch.isfinite(out[:5]).all() and torch.isfinite(out[5:]).all()


def test_reference_unfused_masks_padding_values():
    # finding 7: the unfused reference multiplied the padding keys' zero weights by their values
    b, s, h, d = 2, 10, 2, 8
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64) for _ in range(3))
    lens = torch.tensor([10, 6], dtype=torch.int32)
    k[1, 6:], v[1, 6:] = NAN, NAN
    kw = dict(seqlens_q=lens, seqlens_k=lens, causal=True)
    want = reference.attention(q, k, v, **kw)
    got = reference.attention_unfused(q, k, v, **kw)
    assert torch.isfinite(want).all()
    assert torch.allclose(want, got, atol=1e-12, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["k", "v"])
def test_gpu_fp8_nan_code_propagates(where):
    # e4m3fn's NaN code (0x7F) in a visible cached key or value is NaN after the kernel's conversion on the GPU
    # (Triton's CPU interpreter reads it as 480, so this runs on the GPU only)
    kc, vc = ((torch.randn(2, 32, 2, 64, device="cuda") * 60).to(torch.float8_e4m3fn) for _ in range(2))
    (kc if where == "k" else vc).view(torch.uint8)[0, 5, 1, 3] = 0x7F
    q = torch.randn(2, 1, 4, 64, device="cuda", dtype=torch.float16)
    lens = torch.tensor([32, 20], dtype=torch.int32, device="cuda")
    sc = dict(k_scale=torch.tensor([0.01], device="cuda"), v_scale=torch.tensor([0.01], device="cuda"))
    for splits in (1, 4):
        out, lse = fast.decode(q, kc, vc, lens, num_splits=splits, return_lse=True, **sc)
        ref, ref_lse = reference.decode(q.double(), kc, vc, lens, return_lse=True, **sc)
        assert_matches("out", ref, out, 2 * 2.0**-10)
        assert not torch.isfinite(out[0, 0, 2:]).all() and torch.isfinite(out[1]).all()


# --- values hidden from some rows of a tile (causal diagonal, window edges) never reach those rows ---


def _hidden_case(kind: str, shape, key):
    """Fresh q, k, v of ``shape`` ([B, S, H, D] or [T, H, D]) with one value of ``key`` (an index without the
    feature) set to NaN, +inf or -inf (``kind``), in a random feature."""
    q, k, v = (torch.randn(shape) for _ in range(3))
    d = int(torch.randint(shape[-1], ()))
    v[key + (d,)] = {"nan": NAN, "inf": INF, "ninf": -INF}[kind]
    return q, k, v


@pytest.mark.parametrize("kind", ["nan", "inf", "ninf"])
@pytest.mark.parametrize("impl", ["attention", "attention_unfused"])
@pytest.mark.parametrize(
    "causal,window", [(True, (-1, -1)), (False, (5, -1)), (False, (3, 2))], ids=["causal", "left5", "left3right2"]
)
def test_hidden_values_prefill(impl, causal, window, kind):
    # Sq = Sk = 40 over the interpreter's 32x16 tiles: the poisoned key 21 lies in a diagonal tile, hidden from
    # rows before it under causal (and from rows past 26 or 23 by the left windows, before 19 by right = 2), in a
    # tile the other rows see: only the rows that see key 21 may be non-finite
    q, k, v = _hidden_case(kind, (2, 40, 2, 16), (0, 21, int(torch.randint(2, ()))))
    kw = dict(causal=causal, window_size=window, return_lse=True)
    out, lse = getattr(fast, impl)(q, k, v, **kw)
    ref, ref_lse = getattr(reference, impl)(q.double(), k.double(), v.double(), **kw)
    assert_matches("out", ref, out)
    assert_matches("lse", ref_lse, lse, tol=1e-5, lse=True)
    assert not torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()
    assert torch.isfinite(lse).all()


def test_hidden_values_prefill_packed_gqa():
    # packed sequences of 37 and 19 queries over 45 and 19 keys, GQA 4:1, causal with a left window: the
    # poisoned values sit near both ends of the window and on the diagonal of sequence 0
    lens_q, lens_k = [37, 19], [45, 19]
    q = torch.randn(sum(lens_q), 8, 32)
    k, v = torch.randn(sum(lens_k), 2, 32), torch.randn(sum(lens_k), 2, 32)
    for key, val in [(10, NAN), (30, INF), (40, NAN)]:
        v[key, 1, int(torch.randint(32, ()))] = val
    kw = dict(
        cu_seqlens_q=cu_seqlens_from_lengths(torch.tensor(lens_q, dtype=torch.int32)),
        cu_seqlens_k=cu_seqlens_from_lengths(torch.tensor(lens_k, dtype=torch.int32)),
        causal=True,
        window_size=(12, 0),
        return_lse=True,
    )
    out, lse = fast.attention(q, k, v, **kw)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), **kw)
    assert_matches("out", ref, out)
    assert_matches("lse", ref_lse, lse, tol=1e-5, lse=True)
    assert torch.isfinite(out[37:]).all() and torch.isfinite(out[:, :4]).all()


@pytest.mark.parametrize("feature", ["t5-implicit", "t5-regular", "alibi", "alibi-with-scale-softcap", "softcap"])
def test_hidden_values_prefill_features(feature):
    # the rerun of a block goes through the masked tiles' code for every tile: each score feature there.
    # 70 keys and queries, causal with a 30-key window; values poisoned at keys 20, 37 and 55
    s, hq = 70, 4
    q, k, v = (torch.randn(1, s, h, 16) for h in (hq, 2, 2))
    for key in (20, 37, 55):
        v[0, key, 1, int(torch.randint(16, ()))] = NAN
    kw = dict(causal=True, window_size=(30, 0), return_lse=True)
    if feature == "t5-implicit":
        kw["rel_bias"] = RelativeBias(table=torch.randn(hq, 8), max_distance=10, bidirectional=False)
    elif feature == "t5-regular":
        kw["rel_bias"] = RelativeBias(bias=torch.randn(hq, s, s))
    elif feature.startswith("alibi"):
        kw["alibi_slopes"] = torch.rand(hq) * 0.5
        if feature == "alibi-with-scale-softcap":
            kw.update(alibi_mode="alibi_with_scale", softcap=2.0)
    else:
        kw["softcap"] = 2.0
    out, lse = fast.attention(q, k, v, **kw)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), **kw)
    assert_matches("out", ref, out)
    assert_matches("lse", ref_lse, lse, tol=1e-5, lse=True)
    assert torch.isfinite(out[0, :20]).all() and not torch.isfinite(out[0, 20:]).all()


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize(
    "sq,causal,window",
    [(1, False, (7, -1)), (5, True, (-1, -1)), (5, True, (9, 0))],
    ids=["sq1-left7", "sq5-causal", "sq5-left9"],
)
def test_hidden_values_decode(sq, causal, window, splits):
    # decode over a cache of 45 and 30 tokens (the interpreter's key tiles are 16 wide): a window's left edge
    # falls inside a tile, and with several new tokens under causal the last keys are hidden from the earlier
    # ones; each poisoned value is hidden from some rows of its tile and seen by others
    b, hq, hkv, d, max_len = 2, 4, 2, 16, 48
    lens = torch.tensor([45, 30], dtype=torch.int32)
    q = torch.randn(b, sq, hq, d)
    kc, vc = torch.randn(b, max_len, hkv, d), torch.randn(b, max_len, hkv, d)
    for key, val in [(36, NAN), (37, INF), (43, -INF), (44, NAN)]:
        vc[0, key, int(torch.randint(hkv, ())), int(torch.randint(d, ()))] = val
    kw = dict(causal=causal, window_size=window, return_lse=True)
    ref, ref_lse = reference.decode(q.double(), kc.double(), vc.double(), lens, **kw)
    out, lse = fast.decode(q, kc, vc, lens, num_splits=splits, **kw)
    assert_matches("out", ref, out)
    assert_matches("lse", ref_lse, lse, tol=1e-5, lse=True)
    assert torch.isfinite(out[1]).all()


def test_hidden_values_context_paged():
    # chunked prefill over a paged cache: chunks of 21 and 6 new tokens after 11 and 6 cached ones; values of
    # the chunk's own keys are poisoned, hidden by the causal mask from the chunk's earlier queries
    hq, hkv, d, bs = 4, 2, 16, 4
    cached, new = [11, 6], [21, 6]
    total = [c + n for c, n in zip(cached, new)]
    q = torch.randn(sum(new), hq, d)
    kc, vc = torch.randn(2, 32, hkv, d), torch.randn(2, 32, hkv, d)
    for key, val in [(15, NAN), (24, INF), (25, NAN)]:
        vc[0, key, int(torch.randint(hkv, ())), int(torch.randint(d, ()))] = val
    seqlens = torch.tensor(total, dtype=torch.int32)
    cu = cu_seqlens_from_lengths(torch.tensor(new, dtype=torch.int32))
    ref, ref_lse = reference.context_attention(q.double(), kc.double(), vc.double(), seqlens, cu_seqlens_q=cu,
                                               return_lse=True)  # fmt: skip
    kp, vp, table = to_paged(kc, vc, total, block_size=bs)
    out, lse = fast.context_attention(q, kp, vp, seqlens, cu_seqlens_q=cu, block_table=table, return_lse=True)
    assert_matches("out", ref, out)
    assert_matches("lse", ref_lse, lse, tol=1e-5, lse=True)
    # the chunk's first 4 queries (keys 11..14) see none of them
    assert torch.isfinite(out[:4]).all() and torch.isfinite(out[21:]).all() and not torch.isfinite(out[:21]).all()


# --- a row whose visible scores are all -inf ---


@pytest.mark.parametrize("impl", ["attention", "attention_unfused"])
def test_all_scores_neg_inf(impl):
    # row 70 of head 0 has q = -inf in feature 0 and every key a positive feature 0: each of its scores is -inf.
    # The reference's softmax gives it no weight anywhere: zeros and lse = -inf. 80 keys over the interpreter's
    # 16-key tiles, not causal: the fused kernel's unmasked tiles see it too. Row 71 (head 1) also sees a NaN
    # value, which the reference marks NaN whatever its weight.
    q, k, v = (torch.randn(1, 80, 2, 16) for _ in range(3))
    k[..., 0] = k[..., 0].abs() + 0.1
    q[0, 70, 0, 0] = q[0, 71, 1, 0] = -INF
    v[0, 33, 1, 5] = NAN
    out, lse = getattr(fast, impl)(q, k, v, return_lse=True)
    ref, ref_lse = getattr(reference, impl)(q.double(), k.double(), v.double(), return_lse=True)
    assert_matches("out", ref, out)
    assert_matches("lse", ref_lse, lse, tol=1e-5, lse=True)
    assert torch.equal(out[0, 70, 0], torch.zeros(16)) and torch.isneginf(lse[0, 0, 70])
    assert out[0, 71, 1, 5].isnan() and torch.isneginf(lse[0, 1, 71])


@pytest.mark.parametrize("splits", [1, 2])
def test_all_scores_neg_inf_decode(splits):
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
    kc[..., 0] = kc[..., 0].abs() + 0.1
    q[0, 0, 1, 0] = q[1, 0, 3, 0] = -INF
    vc[1, 7, 1, 2] = NAN
    lens = torch.tensor([40, 33], dtype=torch.int32)
    out, lse = fast.decode(q, kc, vc, lens, num_splits=splits, return_lse=True)
    ref, ref_lse = reference.decode(q.double(), kc.double(), vc.double(), lens, return_lse=True)
    assert_matches("out", ref, out)
    assert_matches("lse", ref_lse, lse, tol=1e-5, lse=True)
    assert torch.equal(out[0, 0, 1], torch.zeros(16)) and out[1, 0, 3, 2].isnan()


# --- FP8 prefill: e4m3fn's NaN code (0x7F) ---


def _fp8_hidden_case(s, device):
    from attn.reference.fp8_attention import quantize_fp8

    q8, qd = quantize_fp8(torch.randn(1, s, 2, 64, device=device), 1)
    k8, kd = quantize_fp8(torch.randn(1, s, 1, 64, device=device), 1)
    v8, vd = quantize_fp8(torch.randn(1, s, 1, 64, device=device), 1)
    key, d = int(torch.randint(s // 3, 2 * s // 3, ())), int(torch.randint(64, ()))
    clean = v8.clone()
    clean.view(torch.uint8)[0, key, 0, d] = 0
    v8.view(torch.uint8)[0, key, 0, d] = 0x7F
    return q8, k8, v8, clean, (qd, kd, vd), key, d


def _check_fp8_hidden(s, device):
    from attn.fast.fp8_prefill import attention_fp8
    from attn.reference.fp8_attention import attention_fp8 as attention_fp8_ref

    q8, k8, v8, clean, descales, key, d = _fp8_hidden_case(s, device)
    out = attention_fp8(q8, k8, v8, *descales, causal=True)
    ref = attention_fp8_ref(q8, k8, v8, *descales, causal=True)
    want = torch.zeros_like(out, dtype=torch.bool)
    want[0, key:, :, d] = True
    assert torch.equal(ref.isnan(), want), "reference: NaN exactly where a row sees the poisoned key"
    assert torch.equal(out.isnan(), want), "kernel: NaN exactly where a row sees the poisoned key"
    # elsewhere, what the reference gives with the code replaced by 0, within test_fp8_prefill's sound bound for
    # kernel against reference (the rerun's 32-key tiles round p against other running maxima: not bit for bit)
    from test_fp8_prefill import _check_against_reference, _exact

    ref_clean = attention_fp8_ref(q8, k8, clean, *descales, causal=True)
    exact, p, l_sum, vf = _exact(q8, k8, clean, *descales, True)
    out[want] = ref_clean[want]
    _check_against_reference(out, ref_clean, exact, p, l_sum, vf, "fp8 hidden NaN code", False)


def test_fp8_prefill_hidden_nan_value(device):
    # 100 keys and queries: one 128x128 tile, the diagonal's, which the kernel masks; the interpreter reads the
    # NaN code as 480 outside the kernel's bit test, so unmasked tiles are the GPU test's
    _check_fp8_hidden(100, device)


@pytest.mark.gpu
def test_gpu_fp8_prefill_nan_codes():
    # 1000 queries over 1000 keys: the poisoned key is seen in the unmasked tiles of later row blocks too
    _check_fp8_hidden(1000, "cuda")
    # a NaN query code makes that row's scores and sum NaN: the row is NaN (l > 0 used to make it zero)
    from attn.fast.fp8_prefill import attention_fp8
    from attn.reference.fp8_attention import attention_fp8 as attention_fp8_ref

    q8, k8, _, v8, descales, _, _ = _fp8_hidden_case(300, "cuda")
    q8.view(torch.uint8)[0, 200, 1, 5] = 0x7F
    out = attention_fp8(q8, k8, v8, *descales, causal=True)
    ref = attention_fp8_ref(q8, k8, v8, *descales, causal=True)
    assert out[0, 200, 1].isnan().all() and ref[0, 200, 1].isnan().all()
    assert torch.isfinite(out[0, :, 0]).all() and torch.isfinite(out[0, :200]).all()


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("s", [100, 1000, 1500])
def test_gpu_fp8_prefill_nan_codes_gluon(s, monkeypatch):
    # the Gluon FP8 kernel (ATTN_GLUON=1): a NaN code in V reaches exactly the rows that see its key, in masked
    # tiles (its slow path: 100 keys is one masked tile) and unmasked ones (1000, 1500: later row blocks)
    from test_fp8_prefill import _count_gluon_fp8

    calls = _count_gluon_fp8(monkeypatch)
    _check_fp8_hidden(s, "cuda")
    assert calls, "the call did not reach the Gluon FP8 kernel"


@pytest.mark.parametrize("where", ["sink", "window"])
def test_hidden_values_context_cyclic(where):
    # chunked prefill over cyclic caches of 8 slots with 3 sinks, both sequences empty before chunks of 7 and
    # 5 tokens: sequence 0's first token is a sink its whole chunk sees. Its value is NaN ("sink"): no query of
    # sequence 1 may see it (the sinks were gathered per query, a hidden sink reading row 0 with weight 0).
    # "window": a NaN value of the chunk's own rolling token 4 in sequence 1, hidden from its earlier queries.
    hq, hkv, d, window, sinks = 4, 2, 16, 8, 3
    new = [7, 5]
    kc, vc = torch.zeros(2, window, hkv, d), torch.zeros(2, window, hkv, d)
    q = torch.randn(sum(new), hq, d)
    k_new, v_new = torch.randn(sum(new), hkv, d), torch.randn(sum(new), hkv, d)
    v_new[0 if where == "sink" else new[0] + 4, 1, 5] = NAN
    seqlens = torch.zeros(2, dtype=torch.int32)
    cu = cu_seqlens_from_lengths(torch.tensor(new, dtype=torch.int32))
    kw = dict(cu_seqlens_q=cu, max_attention_window=window, sink_token_length=sinks, return_lse=True)
    ref, ref_lse = reference.context_attention(q.double(), kc.double(), vc.double(), seqlens,
                                               k_new=k_new.double(), v_new=v_new.double(), **kw)  # fmt: skip
    out, lse = fast.context_attention(q, kc, vc, seqlens, k_new=k_new, v_new=v_new, **kw)
    assert_matches("out", ref, out)
    assert_matches("lse", ref_lse, lse, tol=1e-5, lse=True)
    seen = slice(0, new[0]) if where == "sink" else slice(new[0] + 4, None)
    assert out[seen, 2:, 5].isnan().all()
    assert torch.isfinite(lse).all()


# --- the GPU's tiles (autotuned or the fixed Hopper configs) over longer sequences ---


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [(-1, 0), (200, 0), (100, 50)], ids=["causal", "left200", "left100right50"])
def test_gpu_hidden_values_prefill(window, dtype):
    # 1000 queries over 1000 keys (several 128-row blocks and 64/128-key tiles); values poisoned on diagonals
    # and window edges of different row blocks; GQA 4:1, D128, padded with a shorter second sequence
    b, s, hq, hkv, d = 2, 1000, 8, 2, 128
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for h in (hq, hkv, hkv))
    for key, val in [(5, NAN), (130, INF), (377, -INF), (640, NAN), (999, NAN)]:
        v[0, key, int(torch.randint(hkv, ())), int(torch.randint(d, ()))] = val
    v[1, 700:] = NAN  # padding of sequence 1
    lens = torch.tensor([1000, 700], dtype=torch.int32, device="cuda")
    kw = dict(seqlens_q=lens, seqlens_k=lens, causal=window[1] == 0, window_size=window, return_lse=True)
    out, lse = fast.attention(q, k, v, **kw)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), **kw)
    assert_matches("out", ref, out, TOL[dtype])
    assert_matches("lse", ref_lse, lse, tol=LSE_TOL[dtype], lse=True)
    assert torch.isfinite(out[1]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["bf16", "fp8"])
@pytest.mark.parametrize("splits", [1, 8])
def test_gpu_hidden_values_decode_window(splits, cache):
    # 4 new tokens (causal) over caches of 5000 and 3000 tokens with a 1000-token window, paged: values
    # poisoned left of the window's edge tile, inside it and among the new tokens
    b, sq, hq, hkv, d, bs = 2, 4, 32, 8, 128, 64
    lens = torch.tensor([5000, 3000], dtype=torch.int32, device="cuda")
    q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b, 5000, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn(b, 5000, hkv, d, device="cuda", dtype=torch.bfloat16)
    scales = {}
    if cache == "fp8":
        kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
        scales = dict(k_scale=torch.tensor([0.5], device="cuda"), v_scale=torch.tensor([0.5], device="cuda"))
    # key 3990 is in the first tile of the window, seen by no token; 3998 by tokens 0 and 1 only; 4001 by all;
    # 4998 (among the new tokens) by tokens 2 and 3 only
    for key in (3990, 3998, 4001, 4998):
        if cache == "fp8":
            vc.view(torch.uint8)[0, key, 1, 7] = 0x7F
        else:
            vc[0, key, 1, 7] = NAN
    kw = dict(causal=True, window_size=(999, 0), return_lse=True, **scales)
    ref, ref_lse = reference.decode(q.double(), kc if cache == "fp8" else kc.double(),
                                    vc if cache == "fp8" else vc.double(), lens, **kw)  # fmt: skip
    if cache == "fp8":
        # paged as bytes (padding and scattering need no float8 kernels)
        kp, vp, table = to_paged_fast(kc.view(torch.uint8), vc.view(torch.uint8), bs)
        kp, vp = kp.view(torch.float8_e4m3fn), vp.view(torch.float8_e4m3fn)
    else:
        kp, vp, table = to_paged_fast(kc, vc, bs)
    out, lse = fast.decode(q, kp, vp, lens, block_table=table, num_splits=splits, **kw)
    assert_matches("out", ref, out, TOL[torch.bfloat16])
    assert_matches("lse", ref_lse, lse, tol=LSE_TOL[torch.bfloat16] * 2, lse=True)
    assert torch.isfinite(out[1]).all() and not torch.isfinite(out[0]).all()
