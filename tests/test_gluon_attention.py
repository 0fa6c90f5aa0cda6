"""Parity of the Gluon (sm_90) prefill kernel with the reference, and the dispatch that selects it.

Gluon kernels do not run in Triton's interpreter, so the parity tests are GPU tests, skipped unless the device
is an sm_90 (H100/H200). The CPU tests check only the dispatch's fallback. bench/probes/gluon_compile.py is the
CPU-side check that every variant these tests launch compiles for sm_90a.

Tolerance (GPU tests): the kernel's error is compared with the error of the same computation done by torch in
the same precision, ``softmax`` in fp32 with the unnormalized probabilities rounded to the input dtype before
``P·V`` (fp32 accumulation) and the output rounded to the dtype: the numerics the kernel implements. The
kernel may not be more than twice as far from the float64 reference as that computation (the running max and
the tile order change where the roundings fall, not how many there are), and never beyond the fused kernel's
own bound (`helpers.TOL`: 2·eps).
"""

from __future__ import annotations

import pytest
import torch

import attn.fast as fast
import attn.reference as reference
from attn.fast import gluon_attention as ga
from helpers import LSE_TOL, ON_SM90, TOL, assert_lse_close, dtype_id, rel_err, sm90


def _inputs(b, sq, sk, hq, hkv, d, dtype):
    q = torch.randn(b, sq, hq, d, dtype=dtype, device="cuda")
    k = torch.randn(b, sk, hkv, d, dtype=dtype, device="cuda")
    v = torch.randn(b, sk, hkv, d, dtype=dtype, device="cuda")
    return q, k, v


def _visible(sq, sk, left, right, device):
    """[Sq, Sk] bottom-right-aligned window mask (causal is right = 0), as attn's SPEC defines it."""
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    vis = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    return vis


def _same_precision(q, k, v, scale, left, right, softcap):
    """The torch computation with the kernel's roundings: P (unnormalized, ≤ 1) in the input dtype before P·V."""
    g = q.shape[2] // k.shape[2]
    kf = k.float().repeat_interleave(g, dim=2)
    vf = v.float().repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    vis = _visible(q.shape[1], k.shape[1], left, right, q.device)
    s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l_sum = p.sum(-1, keepdim=True)
    o = torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype).float(), vf)
    l_q = l_sum.permute(0, 2, 1, 3)  # [B, Sq, H, 1], like o
    # rows that see no key: zero, as the reference defines them
    return torch.where(l_q > 0, o / l_q.clamp_min(1e-30), torch.zeros_like(o)).to(q.dtype)


def _check(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, overlap=True, consumers=2, persistent=True,
           block_n=128, name=""):  # fmt: skip
    d = q.shape[-1]
    scale = d**-0.5
    left, right = window
    if causal:
        right = 0
    out, lse = ga.attention_gluon(q, k, v, scale=scale, window_left=left, window_right=right, softcap=softcap,
                                  return_lse=True, overlap=overlap, consumers=consumers,
                                  persistent=persistent, block_n=block_n)  # fmt: skip
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == ref_lse.shape
    assert not torch.isnan(out).any(), f"{name}: NaN in the output (unwritten or invalid)"
    err = rel_err(ref, out)
    torch_err = rel_err(ref, _same_precision(q, k, v, scale, left, right, softcap))
    tol = min(2 * torch_err + 1e-5, TOL[q.dtype])
    print(f"{name}: rel err {err:.3e}, same-precision torch {torch_err:.3e}, tol {tol:.3e}")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.3e} (torch in {q.dtype}: {torch_err:.3e})"
    # rows that see no key: exactly zero, lse −inf
    vis_any = _visible(q.shape[1], k.shape[1], left, right, q.device).any(-1)
    assert torch.equal(out[:, ~vis_any], torch.zeros_like(out[:, ~vis_any])), f"{name}: keyless rows not zero"
    assert_lse_close(f"{name} lse", ref_lse, lse, LSE_TOL[q.dtype])


# (B, Sq, Sk, Hq, Hkv, D): tile multiples, ragged lengths (not multiples of the 128-row tile or the 64-row half),
# Sq != Sk both ways, length 1, Sq > Sk (causal rows that see no key), GQA ratios 1, 4, 8 and MQA
SHAPES = [
    (2, 1024, 1024, 8, 8, 128),
    (4, 1000, 1000, 16, 4, 128),
    (2, 777, 777, 8, 2, 128),
    (1, 1000, 1500, 16, 2, 128),
    (1, 300, 100, 4, 1, 64),
    (1, 1, 1, 2, 2, 128),
    (2, 1, 300, 8, 1, 64),
    (3, 65, 129, 8, 8, 64),
    (1, 2048, 2048, 32, 4, 64),
]
FEATURES = {
    "full": {},
    "causal": {"causal": True},
    "causal-window": {"causal": True, "window": (200, -1)},
    "window-both": {"window": (150, 70)},
    "softcap": {"causal": True, "softcap": 20.0},
}


def _reference_kw(feature: dict) -> dict:
    # FEATURES in attn.reference.attention's names ("window" is its window_size)
    kw = dict(feature)
    if "window" in kw:
        kw["window_size"] = kw.pop("window")
    return kw


def _gluon_kw(feature: dict) -> dict:
    # FEATURES in attention_gluon's names: a causal mask is a right window of 0
    left, right = feature.get("window", (-1, -1))
    return dict(window_left=left, window_right=0 if feature.get("causal") else right,
                softcap=feature.get("softcap", 0.0))  # fmt: skip


def _sid(s):
    return "B{}-Sq{}-Sk{}-Hq{}-Hkv{}-D{}".format(*s)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
def test_gluon_matches_reference(shape, feature):
    q, k, v = _inputs(*shape, torch.bfloat16)
    _check(q, k, v, name=f"{_sid(shape)} {feature}", **FEATURES[feature])


# (consumers, overlap, persistent, dtype, block_n): the default (two 4-warp consumers, overlap, persistent,
# 128-key tiles) in both dtypes, then each structural alternative the benchmark times
VARIANTS = [
    (2, True, True, torch.bfloat16, 128),
    (2, True, True, torch.float16, 128),
    (2, False, True, torch.bfloat16, 128),
    (1, True, True, torch.bfloat16, 128),
    (1, False, True, torch.bfloat16, 128),
    (2, True, False, torch.bfloat16, 128),
    (2, True, True, torch.bfloat16, 64),
    (2, "unmasked", True, torch.bfloat16, 128),
    (2, "pingpong", True, torch.bfloat16, 128),
    (2, "pingpong", True, torch.float16, 128),
    (2, "pingpong", False, torch.bfloat16, 64),
]


def _vid(v):
    ovl = {True: "ovl", False: "ser", "unmasked": "ovlfull", "pingpong": "pp"}[v[1]]
    return f"c{v[0]}-{ovl}-{'pers' if v[2] else 'grid'}-{dtype_id(v[3])}-n{v[4]}"


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gluon_variants(causal, variant):
    # a ragged GQA shape with more work items (8 row blocks x 32 heads x 2) than SMs: persistent programs
    # take several items each, of different lengths
    consumers, overlap, persistent, dtype, block_n = variant
    q, k, v = _inputs(2, 1000, 1100, 32, 4, 128, dtype)
    _check(q, k, v, causal=causal, overlap=overlap, consumers=consumers, persistent=persistent, block_n=block_n,
           name=f"{causal=} {_vid(variant)}")  # fmt: skip


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("l2_bytes", [None, 1, 1_500_000, 1 << 40], ids=["one-section", "per-group", "ragged", "huge"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gluon_l2_sections(causal, l2_bytes):
    # the schedule's sections (_tile_coords): all pairs in one (run 1's order), one GQA group per section, sections
    # of 4 groups over 9 groups (the last one partial), and a budget larger than everything; every work item
    # must run exactly once whatever the cut (a missed or doubled item shows as NaN or a wrong row block)
    q, k, v = _inputs(3, 700, 700, 12, 3, 128, torch.bfloat16)
    sec = ga.l2_section(3, 12, 4, 700, 128, 2, l2_bytes)
    assert sec % 4 == 0 and 4 <= sec <= 36
    d = q.shape[-1]
    out = ga.attention_gluon(q, k, v, scale=d**-0.5, window_right=0 if causal else -1, l2_bytes=l2_bytes)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=causal)
    assert not torch.isnan(out).any()
    assert rel_err(ref, out) <= TOL[torch.bfloat16], f"section {sec}"


def test_l2_section_sizes():
    # whole GQA groups, at least one, at most all pairs; None is all pairs (run 1's order)
    assert ga.l2_section(4, 32, 1, 4096, 128, 2) == 4  # 2 MB of K/V per head: 4 heads in 8 MB
    assert ga.l2_section(4, 32, 4, 4096, 128, 2) == 16  # 4 KV heads = 16 query heads
    assert ga.l2_section(1, 32, 1, 16384, 128, 2) == 1  # 8 MB per head: one head
    assert ga.l2_section(1, 32, 8, 65536, 128, 2) == 8  # over budget: still one whole group
    assert ga.l2_section(2, 8, 2, 100, 64, 2) == 16  # everything fits: all pairs
    assert ga.l2_section(4, 32, 4, 4096, 128, 2, None) == 128


@pytest.mark.gpu
@sm90
def test_gluon_nonfinite_stays_in_its_sequence():
    # a NaN in sequence 1's first key: every row of sequence 1 that sees it is NaN (as in the reference), and
    # sequence 0, whose last tile the TMA copy bounds at its own end, is untouched
    q, k, v = _inputs(2, 200, 200, 4, 4, 128, torch.bfloat16)
    v[1, 0, 0, 0] = float("nan")
    out = ga.attention_gluon(q, k, v, scale=128**-0.5, window_right=0)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert rel_err(ref[0], out[0]) <= TOL[torch.bfloat16]


# (name, kwargs of attention_gluon, dtype, D): the slow path of `_hidden_values_out` in each consumer structure,
# both dtypes (the indicator product is bf16 whatever V's dtype), D64, 64-key tiles, and the window's edges
HIDDEN_VARIANTS = [
    ("default", {}, torch.bfloat16, 128),
    ("fp16", {}, torch.float16, 128),
    ("d64", {}, torch.bfloat16, 64),
    ("c1", {"consumers": 1}, torch.bfloat16, 128),
    ("serial", {"overlap": False}, torch.bfloat16, 128),
    ("n64", {"block_n": 64}, torch.bfloat16, 128),
    ("grid", {"persistent": False}, torch.bfloat16, 128),
    ("ovlfull", {"overlap": "unmasked"}, torch.bfloat16, 128),
    ("pingpong", {"overlap": "pingpong"}, torch.bfloat16, 128),
]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("variant", HIDDEN_VARIANTS, ids=[v[0] for v in HIDDEN_VARIANTS])
@pytest.mark.parametrize("mask", ["causal", "window", "full-ragged"])
def test_gluon_hidden_values_stay_out(mask, variant, bad):
    # SPEC: values of keys hidden from a row never reach its output. Non-finite V rows inside the masked tiles
    # (the causal diagonal, a window's right and left edges, the last tile of a ragged Sk), some hidden from the
    # rows before them, one visible to every row, in several columns; plus a NaN K row hidden from earlier rows.
    # The output is non-finite exactly where the reference's is (an Inf may come out as NaN: SPEC treats both as
    # "what the reference gives", and the kernel's indicator writes NaN), and matches it elsewhere.
    name, kw, dtype, d = variant
    sq, sk = (300, 300) if mask != "full-ragged" else (300, 333)
    q, k, v = _inputs(2, sq, sk, 4, 2, d, dtype)
    val = float(bad)
    v[0, 150, 0, 3] = val  # diagonal tile of rows 128-255: hidden from rows 128-149
    v[0, 170, 1, 5] = -val if bad == "inf" else val
    v[1, 129, 0, 7] = val  # row block 1's first diagonal key: hidden from row 128 only
    v[1, 0, 1, 0] = val  # visible to every row (causal): NaN everywhere in column 0 of head 2, 3
    v[1, 299, 0, 1] = val  # the last key: hidden from every other row under causal
    k[0, 200, 1, 2] = float("nan")
    causal = mask == "causal"
    window = {"causal": (-1, 0), "window": (40, 20), "full-ragged": (-1, -1)}[mask]
    out = ga.attention_gluon(q, k, v, scale=d**-0.5, window_left=window[0], window_right=window[1], **kw)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=causal,
                              window_size=window if not causal else (-1, -1))  # fmt: skip
    bad_ref, bad_out = ~torch.isfinite(ref), ~torch.isfinite(out)
    assert bad_ref.any(), "the draw must reach some output"
    assert torch.equal(bad_out, bad_ref), (
        f"{name} {mask} {bad}: non-finite outputs at {bad_out.sum().item()} places, reference "
        f"{bad_ref.sum().item()}; leaked: {(bad_out & ~bad_ref).sum().item()}"
    )
    fin = ~bad_ref
    assert rel_err(ref[fin], out[fin].to(ref.dtype)) <= TOL[dtype], f"{name} {mask}: finite part off"


# (name, kwargs of attention_gluon, dtype, D) for the per-sequence lengths: the default structure in both dtypes
# and at D64, and each structural alternative
LENS_VARIANTS = [
    ("default", {}, torch.bfloat16, 128),
    ("fp16", {}, torch.float16, 128),
    ("d64", {}, torch.bfloat16, 64),
    ("c1", {"consumers": 1}, torch.bfloat16, 128),
    ("serial", {"overlap": False}, torch.bfloat16, 128),
    ("n64", {"block_n": 64}, torch.bfloat16, 128),
    ("pp", {"overlap": "pingpong"}, torch.bfloat16, 128),
]
# per sequence (len_q, len_k) in [B, 300, ...] / [B, 333, ...] tensors: empty, length 1, full, a query longer than
# its keys (causal rows that see no key), queries without keys, keys ending mid-tile, a row block past len_q
LENS = [(0, 0), (1, 1), (300, 333), (129, 40), (3, 0), (77, 200), (200, 129)]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("variant", LENS_VARIANTS, ids=[v[0] for v in LENS_VARIANTS])
@pytest.mark.parametrize("feature", FEATURES)
def test_gluon_seqlens(feature, variant):
    # padded layout with per-sequence lengths; the padding (rows past each length) holds NaN in q, k and v: none
    # of it may reach an output (SPEC), rows past len_q are zeros with lse -inf, rows that see no key likewise
    name, kw, dtype, d = variant
    b, sq, sk = len(LENS), 300, 333
    q, k, v = _inputs(b, sq, sk, 8, 2, d, dtype)
    lens_q = torch.tensor([x for x, _ in LENS], dtype=torch.int32, device="cuda")
    lens_k = torch.tensor([y for _, y in LENS], dtype=torch.int32, device="cuda")
    qp, kp, vp = q.clone(), k.clone(), v.clone()
    for i, (lq, lk) in enumerate(LENS):
        qp[i, lq:] = float("nan")
        kp[i, lk:] = float("nan")
        vp[i, lk:] = float("nan")
    f = FEATURES[feature]
    out, lse = ga.attention_gluon(qp, kp, vp, scale=d**-0.5, return_lse=True, seqlens_q=lens_q, seqlens_k=lens_k,
                                  **_gluon_kw(f), **kw)  # fmt: skip
    # the reference on the unpoisoned tensors (the same call by SPEC: padding never matters)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), seqlens_q=lens_q, seqlens_k=lens_k,
                                       return_lse=True, **_reference_kw(f))  # fmt: skip
    tag = f"{name} {feature}"
    assert not torch.isnan(out).any(), f"{tag}: NaN in the output (padding leaked, or rows unwritten)"
    assert rel_err(ref, out) <= TOL[dtype], f"{tag}: relative error {rel_err(ref, out):.3e}"
    for i, (lq, _) in enumerate(LENS):
        assert torch.equal(out[i, lq:], torch.zeros_like(out[i, lq:])), f"{tag}: sequence {i} padding rows not zero"
        assert torch.isneginf(lse[i, :, lq:]).all(), f"{tag}: sequence {i} padding rows' lse not -inf"
    # rows that see no key: zero like the reference
    keyless = ref_lse.isneginf().permute(0, 2, 1)  # [B, Sq, Hq]
    assert torch.equal(out[keyless], torch.zeros_like(out[keyless])), f"{tag}: keyless rows not zero"
    assert_lse_close(f"{tag} lse", ref_lse, lse, LSE_TOL[dtype])


@pytest.mark.gpu
@sm90
def test_dispatch_seqlens(monkeypatch):
    # ATTN_GLUON=1 takes the per-sequence lengths (one given: attn fills the other with the padded length); the
    # default keeps them on the tl.* kernel (not measured yet), even in gluon_default's winning regime
    calls = _count_calls(monkeypatch)
    q, k, v = _inputs(2, 4096, 4096, 4, 1, 128, torch.bfloat16)
    lens_k = torch.tensor([4096, 1000], dtype=torch.int32, device="cuda")
    # an fp32 reference (its error ~1e-6 against bf16's tolerance) over 4 query heads: the fp64 one over 8 heads
    # held ~5 GiB of [4096, 4096] scores and ran out of memory beside the other workers of a -n 14 GPU run
    ref = reference.attention(q.float(), k.float(), v.float(), causal=True, seqlens_k=lens_k)
    monkeypatch.delenv("ATTN_GLUON", raising=False)
    fast.attention(q, k, v, causal=True, seqlens_k=lens_k)
    assert calls == []
    monkeypatch.setenv("ATTN_GLUON", "1")
    out = fast.attention(q, k, v, causal=True, seqlens_k=lens_k)
    assert calls == [1]
    assert rel_err(ref, out) <= TOL[torch.bfloat16]


def _packed_inputs(lens, hq, hkv, d, dtype):
    """Packed q [Tq, Hq, D], k, v [Tk, Hkv, D] and their cu_seqlens for per-sequence (len_q, len_k)."""
    cu_q = torch.tensor([0] + [x for x, _ in lens], device="cuda").cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + [y for _, y in lens], device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, d, dtype=dtype, device="cuda")
    k = torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype, device="cuda")
    v = torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype, device="cuda")
    return q, k, v, cu_q, cu_k


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("variant", LENS_VARIANTS, ids=[v[0] for v in LENS_VARIANTS])
@pytest.mark.parametrize("feature", FEATURES)
def test_gluon_packed(feature, variant):
    # packed varlen: the same lengths as test_gluon_seqlens (empty sequences, length 1, queries longer than their
    # keys, queries without keys, sequences ending mid-tile) back to back, so every sequence's last tiles load
    # the next sequence's rows (masked keys, or query rows that must not be stored)
    name, kw, dtype, d = variant
    q, k, v, cu_q, cu_k = _packed_inputs(LENS, 8, 2, d, dtype)
    mq, mk = max(x for x, _ in LENS), max(y for _, y in LENS)
    f = FEATURES[feature]
    out, lse = ga.attention_gluon(q, k, v, scale=d**-0.5, return_lse=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                  max_seqlen_q=mq, max_seqlen_k=mk, **_gluon_kw(f), **kw)  # fmt: skip
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                       max_seqlen_q=mq, max_seqlen_k=mk, return_lse=True,
                                       **_reference_kw(f))  # fmt: skip
    tag = f"{name} {feature}"
    assert out.shape == q.shape and lse.shape == ref_lse.shape == (8, q.shape[0])
    assert not torch.isnan(out).any(), f"{tag}: NaN in the output (rows unwritten)"
    assert rel_err(ref, out) <= TOL[dtype], f"{tag}: relative error {rel_err(ref, out):.3e}"
    keyless = ref_lse.isneginf().t()  # [Tq, Hq]
    assert torch.equal(out[keyless], torch.zeros_like(out[keyless])), f"{tag}: keyless rows not zero"
    assert_lse_close(f"{tag} lse", ref_lse, lse, LSE_TOL[dtype])


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gluon_packed_nonfinite_stays_in_its_sequence(causal):
    # a NaN in the first V row (and an Inf in the first K row) of each sequence after the first: the previous
    # sequence's last tile loads them as keys past its end (hidden), so they may reach only their own sequence's
    # rows, exactly where the reference puts non-finite values
    lens = [(300, 300), (129, 200), (1, 1), (77, 77)]
    q, k, v, cu_q, cu_k = _packed_inputs(lens, 4, 4, 128, torch.bfloat16)
    for start in cu_k[1:-1].tolist():
        v[start, 1, 5] = float("nan")
        k[start, 2, 7] = float("inf")
    out = ga.attention_gluon(q, k, v, scale=128**-0.5, window_right=0 if causal else -1, cu_seqlens_q=cu_q,
                             cu_seqlens_k=cu_k, max_seqlen_q=300, max_seqlen_k=300)  # fmt: skip
    ref = reference.attention(q.double(), k.double(), v.double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                              max_seqlen_q=300, max_seqlen_k=300, causal=causal)  # fmt: skip
    assert (~torch.isfinite(ref)).any()
    assert torch.equal(~torch.isfinite(out), ~torch.isfinite(ref))
    fin = torch.isfinite(ref)
    assert rel_err(ref[fin], out[fin].to(ref.dtype)) <= TOL[torch.bfloat16]


@pytest.mark.gpu
@sm90
def test_dispatch_packed(monkeypatch):
    # ATTN_GLUON=1 takes the packed layout (max_seqlen given or not); the default keeps it on the tl.* kernel
    calls = _count_calls(monkeypatch)
    q, k, v, cu_q, cu_k = _packed_inputs([(4096, 4096), (1000, 1000)], 8, 2, 128, torch.bfloat16)
    ref = reference.attention(q.double(), k.double(), v.double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    monkeypatch.delenv("ATTN_GLUON", raising=False)
    fast.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    assert calls == []
    monkeypatch.setenv("ATTN_GLUON", "1")
    for kw in ({}, {"max_seqlen_q": 4096, "max_seqlen_k": 4096}):
        out = fast.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, **kw)
        assert rel_err(ref, out) <= TOL[torch.bfloat16]
    assert calls == [1, 1]


# ALiBi cases: (name, layout, attention kwargs); layouts "padded", "seqlens" (padded with lengths), "packed"
ALIBI_CASES = [
    ("causal", "padded", {"causal": True}),
    ("window-both", "padded", {"window_size": (150, 70)}),
    ("softcap", "padded", {"causal": True, "softcap": 20.0}),
    ("seqlens-causal", "seqlens", {"causal": True}),
    ("packed-full", "packed", {}),
    ("packed-softcap-window", "packed", {"causal": True, "window_size": (200, -1), "softcap": 30.0}),
]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("slopes_shape", ["Hq", "B,Hq"])
@pytest.mark.parametrize("mode", ["alibi", "alibi_with_scale"])
@pytest.mark.parametrize("case", ALIBI_CASES, ids=[c[0] for c in ALIBI_CASES])
def test_gluon_alibi(case, mode, slopes_shape, monkeypatch):
    # ALiBi through the user's call (ATTN_GLUON=1, dispatch counted), both modes, both slope layouts, with
    # soft-cap, windows, lengths (rows without keys, empty sequences) and packed input; slopes up to 1 make the
    # bias (up to ~300) dominate the scores, so a wrong sign or diagonal shows at once
    name, layout, kw = case
    lens = LENS if layout != "padded" else [(300, 333)] * 3
    b, hq, hkv, d = len(lens), 8, 2, 128
    if slopes_shape == "Hq":
        slopes = torch.exp2(-8.0 * torch.arange(1, hq + 1, device="cuda") / hq)
    else:
        slopes = torch.rand(b, hq, device="cuda")
    if layout == "packed":
        q, k, v, cu_q, cu_k = _packed_inputs(lens, hq, hkv, d, torch.bfloat16)
        lkw = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    else:
        q, k, v = _inputs(b, 300, 333, hq, hkv, d, torch.bfloat16)
        lkw = {}
        if layout == "seqlens":
            lkw = {"seqlens_q": torch.tensor([x for x, _ in lens], dtype=torch.int32, device="cuda"),
                   "seqlens_k": torch.tensor([y for _, y in lens], dtype=torch.int32, device="cuda")}  # fmt: skip
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), alibi_slopes=slopes, alibi_mode=mode,
                                       return_lse=True, **lkw, **kw)  # fmt: skip
    monkeypatch.setenv("ATTN_GLUON", "1")
    calls = _count_calls(monkeypatch)
    out, lse = fast.attention(q, k, v, alibi_slopes=slopes, alibi_mode=mode, return_lse=True, **lkw, **kw)
    tag = f"{name} {mode} slopes[{slopes_shape}]"
    assert calls == [1], f"{tag}: did not run on the Gluon kernel"
    assert not torch.isnan(out).any(), f"{tag}: NaN in the output"
    assert rel_err(ref, out) <= TOL[torch.bfloat16], f"{tag}: relative error {rel_err(ref, out):.3e}"
    assert_lse_close(f"{tag} lse", ref_lse, lse, LSE_TOL[torch.bfloat16])


def _count_calls(monkeypatch):
    calls = []
    real = ga.attention_gluon
    monkeypatch.setattr(ga, "attention_gluon", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.gpu
@sm90
def test_dispatch_opt_in(monkeypatch):
    calls = _count_calls(monkeypatch)
    # a GQA shape below the default's length threshold: the tl.* kernel unless forced
    q, k, v = _inputs(2, 256, 256, 8, 2, 128, torch.bfloat16)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
    monkeypatch.delenv("ATTN_GLUON", raising=False)
    fast.attention(q, k, v, causal=True)
    assert calls == [], "the Gluon kernel ran by default on a shape gluon_default rejects"
    monkeypatch.setenv("ATTN_GLUON", "1")
    out = fast.attention(q, k, v, causal=True)
    assert calls == [1], "ATTN_GLUON=1 did not select the Gluon kernel on sm_90"
    assert rel_err(ref, out) <= TOL[torch.bfloat16]
    # unsupported variants keep the tl.* kernel: other head dims, fp32 (lengths, packed, ALiBi: their own tests)
    fast.attention(q[..., :80].contiguous(), k[..., :80].contiguous(), v[..., :80].contiguous(), causal=True)
    fast.attention(q.float(), k.float(), v.float(), causal=True)
    assert calls == [1]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("env", [None, "0", "1"], ids=["default", "off", "forced"])
def test_dispatch_default(monkeypatch, env):
    # the measured winning regime (causal, D128, S 4096, GQA 4 and MHA) runs on the Gluon kernel by default and
    # with ATTN_GLUON=1, not with ATTN_GLUON=0; an unmeasured one (a soft-cap) only when forced; all correct
    calls = _count_calls(monkeypatch)
    if env is None:
        monkeypatch.delenv("ATTN_GLUON", raising=False)
    else:
        monkeypatch.setenv("ATTN_GLUON", env)
    for hkv, cap, wins in ((2, 0.0, True), (8, 0.0, True), (8, 30.0, False)):
        q, k, v = _inputs(1, 4096, 4096, 8, hkv, 128, torch.bfloat16)
        calls.clear()
        out = fast.attention(q, k, v, causal=True, softcap=cap)
        expect = env == "1" or (env is None and wins)
        assert calls == ([1] if expect else []), f"Hkv={hkv} cap={cap} ATTN_GLUON={env}: gluon ran {len(calls)}"
        ref = reference.attention(q[:, -512:].double(), k.double(), v.double(), causal=True, softcap=cap)
        assert rel_err(ref, out[:, -512:]) <= TOL[torch.bfloat16]


# (Sq, Sk, Hq, Hkv, D, window_left, window_right, softcap) -> default on sm_90, from session 9's table in
# gluon_attention (the rows measured, and one step past each threshold)
DEFAULT_CASES = [
    ((4096, 4096, 32, 8, 128, -1, 0, 0.0), True),  # GQA 4, measured 1.39x
    ((16384, 16384, 32, 32, 128, -1, 0, 0.0), True),  # measured 1.16x
    ((4096, 4096, 32, 32, 128, -1, 0, 0.0), True),  # measured 1.30x
    ((4096, 4096, 32, 32, 128, -1, -1, 0.0), True),  # full, measured 1.48x
    ((4096, 4096, 32, 32, 64, -1, 0, 0.0), True),  # D64, measured 1.11x
    ((8192, 8192, 32, 4, 128, -1, 0, 0.0), True),  # GQA 8
    ((1024, 1024, 32, 32, 128, -1, 0, 0.0), False),  # measured 0.94x (the guard's cost)
    ((2048, 2048, 32, 32, 128, -1, 0, 0.0), False),  # below 4096: not measured
    ((16384, 16384, 32, 8, 128, 1024, 0, 0.0), False),  # sliding window: not measured
    ((16384, 16384, 32, 8, 128, -1, 0, 30.0), False),  # soft-cap: not measured
    ((1, 16384, 32, 32, 128, -1, 0, 0.0), False),  # Sq != Sk (chunk against a long context): not measured
    ((4096, 4096, 32, 32, 128, -1, 5, 0.0), False),  # a right window (neither causal nor full)
]


@pytest.mark.parametrize("case,expected", DEFAULT_CASES, ids=[str(c[0]) for c in DEFAULT_CASES])
def test_default_dispatch_predicate(case, expected):
    sq, sk, hq, hkv, d, left, right, cap = case
    got = ga.gluon_default(seqlen_q=sq, seqlen_k=sk, num_heads_q=hq, num_heads_kv=hkv, head_dim=d,
                           window_left=left, window_right=right, softcap=cap)  # fmt: skip
    assert got is expected


def test_default_dispatch_stays_off_the_cpu(monkeypatch, device):
    # ATTN_GLUON unset: a call in the predicate's winning regime on a device that is not an sm_90 never reaches
    # the Gluon kernel (here the CPU interpreter, where it cannot run; a small stand-in of the same features
    # would be below the threshold, so the predicate is widened for the call)
    if device == "cuda" and ON_SM90:
        pytest.skip("on sm_90 the default dispatch is test_dispatch_default")
    monkeypatch.delenv("ATTN_GLUON", raising=False)
    monkeypatch.setattr(ga, "DEFAULT_MIN_SEQLEN", 1)
    calls = _count_calls(monkeypatch)
    q = torch.randn(1, 9, 4, 128, device=device)
    k, v = (torch.randn(1, 9, 1, 128, device=device) for _ in range(2))
    out = fast.attention(q, k, v, causal=True)
    assert calls == []
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
    assert rel_err(ref, out) <= TOL[q.dtype]


def test_dispatch_falls_back_off_sm90(monkeypatch, device):
    # with the opt-in set, a call the Gluon kernel does not cover (here: not an sm_90 tensor, or D = 16) still
    # runs, on the tl.* kernel, and matches the reference
    monkeypatch.setenv("ATTN_GLUON", "1")
    q, k, v = (torch.randn(1, 9, 2, 16, device=device) for _ in range(3))
    if device == "cuda" and ON_SM90:
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
        kw = {"alibi_slopes": torch.rand(2, device=device)}
    else:
        kw = {}
    out = fast.attention(q, k, v, causal=True, **kw)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True, **kw)
    assert rel_err(ref, out) <= TOL[q.dtype]


def test_launch_args_reject_bad_overlap():
    # overlap="pingpong" alternates two consumer partitions: with one there is nobody to take turns with, and the
    # kernel would wait forever for the other's turn; an unknown mode is refused too. The check comes before any
    # descriptor is built, so CPU tensors do here
    q = torch.zeros(1, 128, 2, 64, dtype=torch.bfloat16)
    kw = dict(scale=1.0, window_left=-1, window_right=0, softcap=0.0)
    with pytest.raises(ValueError, match="consumers=2"):
        ga.launch_args(q, q, q, q, None, overlap="pingpong", consumers=1, **kw)
    with pytest.raises(ValueError, match="overlap must be"):
        ga.launch_args(q, q, q, q, None, overlap="fa3", **kw)
