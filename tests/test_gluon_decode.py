"""The Gluon one-byte decode kernel (`attn.fast.gluon_decode`): its relabelling on the CPU, its parity with the
reference and its dispatch on an sm_90 GPU.

The relabelling tests run everywhere: they check, with torch index arithmetic, that the permutations
the kernel applies to its loaded tiles read each logical index from the physical index the kernel's own
arithmetic (the score columns' keys, the output's columns) assumes. A wrong permutation there would pair Q's
feature d with another feature of K, or store an output column in the wrong place.

The parity tests need the GPU (Gluon does not run in the interpreter). Tolerance: the reference reads the same
stored codes and dequantizes them in float64; the kernel's products run in fp16 with float32 accumulation, as the
``tl.*`` kernel's do over a one-byte cache (tests/test_kv_quant.py uses the same bound, `helpers.TOL` of the
query's dtype: two ulps of the output).
"""

from __future__ import annotations

import pytest
import torch

import attn
import attn.fast as fast
import attn.reference as reference
from attn.fast import gluon_decode as gd
from attn.reference.kv_quant import calibrate_kv_scales, quantize
from helpers import LSE_TOL, TOL, assert_close, assert_lse_close, dtype_id, sm90

QDTYPES = [torch.int8, torch.float8_e4m3fn]


def _relabelled(shape, perm):
    """What a tensor of physical indices becomes under the kernel's reshape-permute-reshape: entry [i, j] is the
    flat physical index that logical (i, j) is read from."""
    flat = torch.arange(shape[0] * shape[1]).view(shape)
    bits = [2] * ((shape[0] * shape[1]).bit_length() - 1)
    return flat.reshape(bits).permute(perm).reshape(shape)


@pytest.mark.parametrize("head_dim", gd.HEAD_DIMS)
def test_relabelling_reads_what_the_kernel_assumes(head_dim):
    lay = gd.layouts(head_dim, 16)
    t = gd.TILE_KEYS
    # Kᵀ [d, key]: logical (d, n) holds physical (k_dim_map(d), key_map(n))
    kt = _relabelled((head_dim, t), lay["K_PERM"])
    for d in range(head_dim):
        for n in range(t):
            pd, pn = divmod(int(kt[d, n]), t)
            assert pd == gd.phys_index(d, gd.k_dim_map(head_dim)) and pn == gd.phys_index(n, gd.key_map())
    # V [key, d]: the same keys as Kᵀ (P's columns are Q·Kᵀ's), features by v_dim_map
    v = _relabelled((t, head_dim), lay["V_PERM"])
    for n in range(t):
        for d in range(head_dim):
            pn, pd = divmod(int(v[n, d]), head_dim)
            assert pn == gd.phys_index(n, gd.key_map()) and pd == gd.phys_index(d, gd.v_dim_map(head_dim))
    # Q [row, d]: rows untouched, features as Kᵀ's (the reduction of Q·Kᵀ pairs them)
    q = torch.arange(16 * head_dim).view([16] + [2] * (head_dim.bit_length() - 1))
    q = q.permute(lay["Q_PERM"]).reshape(16, head_dim)
    for d in range(head_dim):
        assert int(q[3, d]) == 3 * head_dim + gd.phys_index(d, gd.k_dim_map(head_dim))
    # the kernel's arithmetic: score column n is key _key_phys(n); output column l is feature (l >> 3) + (D/8)(l & 7)
    for n in range(t):
        phys = (n & 1) | (((n >> 1) & 1) << 2) | (((n >> 2) & 1) << 3) | (((n >> 3) & 1) << 1)
        assert phys == gd.phys_index(n, gd.key_map())
    for col in range(head_dim):
        assert (col >> 3) + (head_dim // 8) * (col & 7) == gd.phys_index(col, gd.v_dim_map(head_dim))
    # and each map is a permutation of the bits (every physical index read once)
    for m in (gd.k_dim_map(head_dim), gd.v_dim_map(head_dim), gd.key_map()):
        assert sorted(m) == list(range(len(m)))


def test_split_choice():
    # one-warp programs: about PROGRAMS_PER_SM per SM, chunks of at least MIN_SPLIT_KEYS keys
    assert gd.choose_num_splits(8, 8, 32768, 132) == -(-gd.PROGRAMS_PER_SM * 132 // 64)
    assert gd.choose_num_splits(128, 32, 2048, 132) == 1
    assert gd.choose_num_splits(1, 1, 100, 132) == 1
    assert gd.choose_num_splits(1, 8, 1 << 20, 132) == gd.MAX_SPLITS


def _cache(b, n, hkv, d, qdtype, page, device="cuda"):
    """A quantized cache (contiguous, or a shuffled pool of ``page``-token blocks) of random values."""
    k = torch.randn(b, n, hkv, d, device=device) * (1 + torch.arange(hkv, device=device))[:, None]
    v = torch.randn(b, n, hkv, d, device=device)
    ks, vs = calibrate_kv_scales(k, v, qdtype, "head")
    kq, vq = quantize(k, ks, qdtype), quantize(v, vs, qdtype)
    if not page:
        return kq, vq, ks, vs, None
    blocks = n // page
    order = torch.randperm(b * blocks, device=device)
    pool_k = torch.empty(b * blocks, page, hkv, d, device=device).to(qdtype)
    pool_v = torch.empty_like(pool_k)
    pool_k[order] = kq.reshape(b * blocks, page, hkv, d)
    pool_v[order] = vq.reshape(b * blocks, page, hkv, d)
    return pool_k, pool_v, ks, vs, order.to(torch.int32).view(b, blocks)


CASES = {
    # name: (B, capacity, Hq, Hkv, D, page (0: contiguous), lengths, splits)
    "G4 D128 contiguous": (3, 256, 8, 2, 128, 0, [1, 200, 256], None),
    "G4 D128 pages of 16": (3, 256, 8, 2, 128, 16, [17, 0, 256], None),
    "G4 D128 pages of 64, 5 splits": (3, 256, 8, 2, 128, 64, [130, 64, 255], 5),
    "MHA D64 contiguous, 3 splits": (2, 192, 4, 4, 64, 0, [191, 33], 3),
    "G8 D64 pages of 32": (2, 128, 16, 2, 64, 32, [128, 5], None),
    "MQA G32 D128, 2 splits": (2, 160, 32, 1, 128, 0, [160, 47], 2),
    "G6 (padded to 16) D128": (1, 96, 12, 2, 128, 0, [96], 1),
    # sliding windows (left, right): the new token sees its last left + 1 keys; a right window hides nothing
    "G4 D128 pages of 16, window 40, 3 splits": (3, 256, 8, 2, 128, 16, [256, 30, 41], 3, {"window_size": (40, -1)}),
    "MHA D64 contiguous, window 0": (2, 64, 4, 4, 64, 0, [64, 1], None, {"window_size": (0, -1)}),
    "G4 D128 contiguous, window (17, 5)": (2, 128, 8, 2, 128, 0, [128, 100], 2, {"window_size": (17, 5)}),
    # soft-capping (Gemma 2's 50; a small cap that bends most scores), alone and with a window
    "G4 D128 pages of 64, softcap 50": (2, 256, 8, 2, 128, 64, [256, 77], 3, {"softcap": 50.0}),
    "G8 D64 contiguous, softcap 2, window 30": (
        2,
        96,
        16,
        2,
        64,
        0,
        [96, 31],
        2,
        {"softcap": 2.0, "window_size": (30, -1)},
    ),  # fmt: skip
}


@sm90
@pytest.mark.parametrize("qdtype", QDTYPES, ids=dtype_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, qdtype, monkeypatch):
    b, n, hq, hkv, d, page, lens, splits, *extra = CASES[case]
    monkeypatch.setenv("ATTN_GLUON_DECODE", "1")
    k, v, ks, vs, table = _cache(b, n, hkv, d, qdtype, page)
    q = torch.randn(b, 1, hq, d, dtype=dtype, device="cuda")
    lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    calls = []
    real = gd.decode_1b
    monkeypatch.setattr(gd, "decode_1b", lambda *a, **kw: calls.append(kw["num_splits"]) or real(*a, **kw))
    kw = dict(block_table=table, k_scale=ks, v_scale=vs, num_splits=splits)
    if extra:
        kw.update(extra[0])
    out, lse = fast.decode(q, k, v, lens, return_lse=True, **kw)
    assert calls, "the call did not reach the Gluon kernel"
    ref, ref_lse = reference.decode(q.double(), k, v, lens, return_lse=True, **kw)
    assert_close(f"{case} (splits {calls[0]})", ref, out, TOL[dtype])
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[dtype])
    assert torch.equal(out[lens == 0], torch.zeros_like(out[lens == 0]))
    attn.check_errors()


@sm90
@pytest.mark.parametrize("stages", [3, 4], ids=lambda s: f"ring{s}")
@pytest.mark.parametrize("qdtype", QDTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "case", ["G4 D128 pages of 16", "G4 D128 pages of 64, 5 splits", "MHA D64 contiguous, 3 splits"]
)
def test_ring_matches_reference(case, qdtype, stages, monkeypatch):
    """The cp.async ring variant (`gluon_decode.RING_STAGES`): same numbers as the direct loads."""
    monkeypatch.setattr(gd, "RING_STAGES", stages)
    test_matches_reference(case, torch.bfloat16, qdtype, monkeypatch)


@sm90
@pytest.mark.parametrize("page", [0, 16], ids=["contiguous", "paged"])
def test_nan_in_a_visible_key_is_nan_and_past_the_end_is_not(page, monkeypatch):
    monkeypatch.setenv("ATTN_GLUON_DECODE", "1")
    b, n, hkv, d = 2, 64, 2, 128
    k, v, ks, vs, table = _cache(b, n, hkv, d, torch.float8_e4m3fn, page)
    lens = torch.tensor([40, 64], dtype=torch.int32, device="cuda")
    # e4m3's NaN code 0x7F: in sequence 0's V at key 5 of head 1 (visible), and at key 50 (past its end)
    kb, vb = k.view(torch.uint8), v.view(torch.uint8)

    def at(seq, key):
        if table is None:
            return seq, key
        return int(table[seq, key // page]), key % page

    vb[at(0, 5)][1, 7] = 0x7F
    vb[at(0, 50)][0, 3] = 0x7F
    kb[at(0, 52)][0, 0] = 0x7F
    q = torch.randn(b, 1, 8, d, dtype=torch.float16, device="cuda")
    kw = dict(block_table=table, k_scale=ks, v_scale=vs, num_splits=3)
    out = fast.decode(q, k, v, lens, **kw)
    ref = reference.decode(q.double(), k, v, lens, **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    # exactly feature 7 of the four query heads of KV head 1: the key is visible to them, and a NaN in V poisons
    # only its own column of P·V; the NaN codes past the sequence's end reach nothing
    assert torch.isnan(out[0, 0, 4:8, 7]).all() and int(torch.isnan(out).sum()) == 4


@sm90
@pytest.mark.parametrize("page", [0, 16], ids=["contiguous", "paged"])
def test_nan_left_of_the_window_stays_out(page, monkeypatch):
    """A key the window hides shares its 16-key tile with visible ones; its NaN codes must not reach the output
    (the kernel reads the first visible key in its place, never the hidden row)."""
    monkeypatch.setenv("ATTN_GLUON_DECODE", "1")
    b, n, hkv, d = 1, 64, 2, 128
    k, v, ks, vs, table = _cache(b, n, hkv, d, torch.float8_e4m3fn, page)
    kb, vb = k.view(torch.uint8), v.view(torch.uint8)
    lens = torch.tensor([64], dtype=torch.int32, device="cuda")
    # window 20: the new token (key 63) sees keys 43..63; key 40 is hidden, in the tile 32..47 with visible ones
    row, slot = (0, 40) if table is None else (int(table[0, 40 // page]), 40 % page)
    vb[row, slot] = 0x7F
    kb[row, slot] = 0x7F
    q = torch.randn(b, 1, 8, d, dtype=torch.float16, device="cuda")
    kw = dict(block_table=table, k_scale=ks, v_scale=vs, window_size=(20, -1), num_splits=2)
    out = fast.decode(q, k, v, lens, **kw)
    ref = reference.decode(q.double(), k, v, lens, **kw)
    assert not torch.isnan(out).any() and not torch.isnan(ref).any()
    assert_close("window over a hidden NaN", ref, out, TOL[torch.float16])


@sm90
def test_out_of_range_entries_and_lengths_are_clamped_and_reported(monkeypatch):
    monkeypatch.setenv("ATTN_GLUON_DECODE", "1")
    k, v, ks, vs, table = _cache(2, 64, 2, 128, torch.int8, 16)
    q = torch.randn(2, 1, 4, 128, dtype=torch.float16, device="cuda")
    bad_table = table.clone()
    bad_table[0, 1] = 1 << 20
    bad_table[1, 0] = -3
    lens = torch.tensor([64, 64], dtype=torch.int32, device="cuda")
    out = fast.decode(q, k, v, lens, block_table=bad_table, k_scale=ks, v_scale=vs)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="block_table entry"):
        attn.check_errors()
    out = fast.decode(q, k, v, torch.tensor([65, -1], dtype=torch.int32, device="cuda"), block_table=table,
                      k_scale=ks, v_scale=vs)  # fmt: skip
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="length"):
        attn.check_errors()
    ref = reference.decode(q.double(), k, v, torch.tensor([64, 0], dtype=torch.int32, device="cuda"),
                           block_table=table, k_scale=ks, v_scale=vs)  # fmt: skip
    assert_close("clamped lengths", ref, out, TOL[torch.float16])


@sm90
def test_dispatch(monkeypatch):
    k, v, ks, vs, _ = _cache(1, 64, 2, 128, torch.int8, 0)
    q = torch.randn(1, 1, 8, 128, dtype=torch.float16, device="cuda")
    lens = torch.tensor([64], dtype=torch.int32, device="cuda")
    calls = []
    real = gd.decode_1b
    monkeypatch.setattr(gd, "decode_1b", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("ATTN_GLUON_DECODE", "0")
    fast.decode(q, k, v, lens, k_scale=ks, v_scale=vs)
    assert not calls
    monkeypatch.setenv("ATTN_GLUON_DECODE", "1")
    fast.decode(q, k, v, lens, k_scale=ks, v_scale=vs)
    assert calls == [1]
    # features the kernel lacks stay with the tl.* kernel, opted in or not; windows and soft-cap it covers
    fast.decode(q, k, v, lens, k_scale=ks, v_scale=vs, alibi_slopes=torch.ones(8, device="cuda"))
    fast.decode(q, k, v, lens, k_scale=ks, v_scale=vs, max_attention_window=32)
    assert calls == [1]
    fast.decode(q, k, v, lens, k_scale=ks, v_scale=vs, window_size=(16, 0))
    fast.decode(q, k, v, lens, k_scale=ks, v_scale=vs, softcap=30.0)
    assert calls == [1, 1, 1]


@sm90
@pytest.mark.parametrize("page", [0, 64], ids=["contiguous", "paged"])
def test_plan_replays_the_gluon_launch(page, monkeypatch):
    """A DecodePlan over a one-byte cache records the Gluon launch (through attn's launcher) and replays it:
    the planned run equals the flat call, for new queries and a cache that changed in place."""
    monkeypatch.setenv("ATTN_GLUON_DECODE", "1")
    b, n, hkv, d = 2, 256, 2, 128
    k, v, ks, vs, table = _cache(b, n, hkv, d, torch.float8_e4m3fn, page)
    lens = [200, 256]
    plan = attn.DecodePlan(k, v, lens, block_table=table, num_heads_q=8, k_scale=ks, v_scale=vs)
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for step in range(3):
        q = torch.randn(b, 1, 8, d, dtype=torch.bfloat16, device="cuda")
        got = plan.run(q)
        want = fast.decode(q, k, v, lens_t, block_table=table, k_scale=ks, v_scale=vs)
        assert torch.equal(got, want)
        k.view(torch.uint8)[..., step] = 0  # the cache changes in place between steps, as appends do
    assert plan.replayable, plan.refusal
