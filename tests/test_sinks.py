"""StreamingLLM attention sinks (TensorRT-LLM's sink_token_length) in a cyclic cache of N slots: the first S tokens
stay in slots 0..S-1, the rest roll through the other N - S, keys are cached unrotated and RoPE turns each one by
its position within the cache. Appending past the window, then decoding, must equal attention over the sinks and
the last N - S tokens of the whole sequence with keys rotated at 0..min(L, N)-1, computed here from scratch."""

from __future__ import annotations

import functools
import types

import pytest
import torch

import attn.fast as fast
import attn.reference as reference
from helpers import LSE_TOL, TOL, assert_close, assert_lse_close

BASE = 10000.0


def rotate(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, style: str) -> torch.Tensor:
    """RoPE from its definition, in float64 complex arithmetic: pair i turns by position · BASE^(-2i/r)."""
    i = torch.arange(rotary_dim // 2, dtype=torch.float64, device=x.device)
    first, second = (i.long(), i.long() + rotary_dim // 2) if style == "neox" else (2 * i.long(), 2 * i.long() + 1)
    angle = positions.double()[:, None] * BASE ** (-2 * i / rotary_dim)  # [T, r/2]
    turned = (
        torch.complex(x[..., first].double(), x[..., second].double())
        * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    )
    out = x.double().clone()
    out[..., first], out[..., second] = turned.real, turned.imag
    return out


def frame_tokens(length: int, window: int, sinks: int) -> list[int]:
    """The tokens a cache of `window` slots with `sinks` sinks holds after `length` tokens, in token order."""
    rolling = range(max(sinks, length - (window - sinks)), length)
    return list(range(min(sinks, length))) + list(rolling)


def _cache(b, window, hkv, d, paged, dtype, device):
    if paged:
        # 3 blocks of 4 = 12 slots per sequence, scattered through a pool with spare blocks
        k_cache = torch.zeros(3 * b + 2, 4, hkv, d, device=device, dtype=dtype)
        table = torch.randperm(3 * b + 2, device=device)[: 3 * b].to(torch.int32).view(b, 3)
    else:
        k_cache = torch.zeros(b, window, hkv, d, device=device, dtype=dtype)
        table = None
    return k_cache, torch.zeros_like(k_cache), table


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("rope", [(40, "neox"), (16, "gptj")], ids=lambda r: f"rot{r[0]}-{r[1]}")
def test_sinks_equal_attention_over_sinks_and_window(impl, paged, splits, rope, device):
    b, hq, hkv, d, window, sinks = 3, 4, 2, 40, 12, 3
    rotary_dim, style = rope
    total = [41, 9, 13]  # wraps the rolling part several times / never fills the cache / just past it
    k_all = torch.randn(b, max(total), hkv, d, device=device, dtype=torch.float16)
    v_all = torch.randn_like(k_all)
    k_cache, v_cache, table = _cache(b, window, hkv, d, paged, torch.float16, device)
    append = reference.append_kv if impl == "reference" else fast.append_kv
    # uneven chunks, as prefill chunks and decode steps would come; none longer than the N - S rolling slots
    seqlens = torch.zeros(b, dtype=torch.int32, device=device)
    for step in (2, 9, 1, 1, 7, 9, 5, 9, 1):
        counts = [max(0, min(step, t - int(n))) for t, n in zip(total, seqlens.tolist())]
        cu = torch.tensor([0] + counts, device=device).cumsum(0).to(torch.int32)
        k_new = torch.cat([k_all[i, int(seqlens[i]) : int(seqlens[i]) + counts[i]] for i in range(b)])
        v_new = torch.cat([v_all[i, int(seqlens[i]) : int(seqlens[i]) + counts[i]] for i in range(b)])
        append(k_cache, v_cache, k_new, v_new, seqlens, cu_seqlens_new=cu, block_table=table,
               max_attention_window=window, sink_token_length=sinks)  # fmt: skip
        seqlens += torch.tensor(counts, dtype=torch.int32, device=device)
    assert seqlens.tolist() == total
    # the query of the newest token, turned by its place in the cache: the last of the frame
    q_raw = torch.randn(b, 1, hq, d, device=device, dtype=torch.float16)
    q_pos = torch.tensor([min(n, window) - 1 for n in total], device=device)
    q = torch.stack([rotate(q_raw[i], q_pos[i : i + 1], rotary_dim, style) for i in range(b)]).half()
    rope_kw = dict(rotary_dim=rotary_dim, rope_style=style, rope_base=BASE)
    out, lse = fast.decode(q, k_cache, v_cache, seqlens, block_table=table, max_attention_window=window,
                           sink_token_length=sinks, num_splits=splits, return_lse=True, **rope_kw)  # fmt: skip
    # the definition: the sinks and the last N - S tokens, keys turned by 0, 1, ... in token order
    for i, n in enumerate(total):
        tokens = frame_tokens(n, window, sinks)
        k = rotate(k_all[i, tokens], torch.arange(len(tokens), device=device), rotary_dim, style)
        ref, ref_lse = reference.attention(q[i : i + 1].double(), k[None], v_all[i : i + 1, tokens].double(),
                                           return_lse=True)  # fmt: skip
        assert_close("sinks + window", ref, out[i : i + 1], TOL[torch.float16])
        assert_lse_close("lse", ref_lse, lse[i : i + 1], LSE_TOL[torch.float16])
    ref_decode = reference.decode(q.double(), k_cache.double(), v_cache.double(), seqlens, block_table=table,
                                  max_attention_window=window, sink_token_length=sinks, **rope_kw)  # fmt: skip
    assert_close("vs reference decode", ref_decode, out, TOL[torch.float16])


def test_sink_slots_hold_the_first_tokens(device):
    # the layout itself, token by token: sinks pinned, the rest rolling through slots S..N-1
    window, sinks = 7, 2
    k_cache = torch.full((1, window, 1, 16), -1.0, device=device)
    for t in range(20):
        k_new = torch.full((1, 1, 1, 16), float(t), device=device)
        fast.append_kv(k_cache, k_cache.clone(), k_new, k_new, torch.tensor([t], dtype=torch.int32, device=device),
                       max_attention_window=window, sink_token_length=sinks)  # fmt: skip
        held = sorted(k_cache[0, :, 0, 0].tolist())
        expected = sorted(frame_tokens(t + 1, window, sinks)) + [-1.0] * (window - min(t + 1, window))
        assert held == sorted(expected), (t, held)
    assert k_cache[0, :sinks, 0, 0].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("layout", ["packed-contiguous", "padded-paged"])
@pytest.mark.parametrize("qdtype", [None, torch.int8, torch.float8_e4m3fn], ids=["fp16", "int8", "fp8"])
def test_preprocess_with_sinks_then_decode(layout, qdtype, device):
    """The whole generation pipeline with sinks: the fused pre-processing appends unrotated keys and turns q
    by its place in the cache; decode turns the keys. Fast == reference, and both equal the definition."""
    hq, hkv, d, window, sinks, rotary_dim = 4, 2, 40, 10, 2, 24
    b = 2
    total = 23
    width = (hq + 2 * hkv) * d
    qkv_all = torch.randn(b, total, width, device=device, dtype=torch.float16)
    paged = layout.endswith("paged")
    caches = {}
    for impl in ("reference", "fast"):
        k_cache, v_cache, table = _cache(b, window, hkv, d, paged, qdtype or torch.float16, device)
        if table is not None:
            table = torch.arange(3 * b, device=device, dtype=torch.int32).view(b, 3).flip(1)
        caches[impl] = (k_cache, v_cache, table)
    scales = {}
    if qdtype is not None:
        scales = dict(k_scale=torch.tensor([0.03, 0.05], device=device), v_scale=torch.tensor([0.04], device=device))
    kw = dict(num_heads_q=hq, num_heads_kv=hkv, rotary_dim=rotary_dim, max_attention_window=window,
              sink_token_length=sinks, **scales)  # fmt: skip
    seqlens = torch.zeros(b, dtype=torch.int32, device=device)
    start = 0
    for step in (5, 8, 1, 8, 1):
        chunk = qkv_all[:, start : start + step]
        qs = {}
        for impl, mod in (("reference", reference), ("fast", fast)):
            k_cache, v_cache, table = caches[impl]
            if layout.startswith("packed"):
                cu = torch.arange(0, (b + 1) * step, step, device=device, dtype=torch.int32)
                qs[impl] = mod.preprocess(chunk.reshape(b * step, width), k_cache, v_cache, seqlens,
                                          cu_seqlens_new=cu, block_table=table, **kw).view(b, step, hq, d)  # fmt: skip
            else:
                qs[impl] = mod.preprocess(chunk, k_cache, v_cache, seqlens, block_table=table, **kw)
        assert_close("q", qs["reference"].float(), qs["fast"].float(), TOL[torch.float16])
        for ref_t, fast_t in zip(caches["reference"][:2], caches["fast"][:2]):
            # unrotated keys and values: the kernel writes the reference's bytes
            assert torch.equal(ref_t.view(torch.uint8), fast_t.view(torch.uint8))
        seqlens += step
        start += step
    assert start == total
    q_last = qs["fast"][:, -1:]
    k_cache, v_cache, table = caches["fast"]
    dec = dict(max_attention_window=window, sink_token_length=sinks, rotary_dim=rotary_dim, block_table=table,
               **scales)  # fmt: skip
    out = fast.decode(q_last, k_cache, v_cache, seqlens, **dec)
    if qdtype is None:
        k_cache, v_cache = k_cache.double(), v_cache.double()
    ref = reference.decode(q_last.double(), k_cache, v_cache, seqlens, **dec)
    # a quantized cache's keys are stored rounded: compare with the reference reading the same bytes, within
    # fp16 tolerance (rotating int codes then rounding to fp16 in the kernel is one extra fp16 rounding)
    assert_close("fast vs reference decode", ref, out, TOL[torch.float16])
    if qdtype is None:
        # and the definition, from the raw projections: sinks + last N - S tokens, keys at 0..N-1, q at N-1
        tokens = frame_tokens(total, window, sinks)
        heads = qkv_all.float().view(b, total, hq + 2 * hkv, d)
        k = heads[:, tokens, hq : hq + hkv].half()
        v = heads[:, tokens, hq + hkv :].half()
        pos = torch.arange(window, device=device)
        k_rot = torch.stack([rotate(k[i], pos, rotary_dim, "neox") for i in range(b)])
        q_rot = torch.stack([rotate(heads[i, -1:, :hq].half(), pos[-1:], rotary_dim, "neox") for i in range(b)])
        direct = reference.attention(q_rot, k_rot, v.double())
        assert_close("definition", direct, out, TOL[torch.float16])


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_sinks_bad_input(impl, device):
    mod = reference
    if impl == "fast":
        # the value checks (rolling tokens, pool entries) are the validated call's; tests/test_no_sync.py covers
        # the default call
        mod = types.SimpleNamespace(
            **{name: functools.partial(getattr(fast, name), validate=True) for name in ("decode", "append_kv",
                                                                                        "preprocess")}
        )  # fmt: skip
    k_cache = torch.zeros(2, 8, 1, 16, device=device)
    v_cache = torch.zeros_like(k_cache)
    q = torch.randn(2, 1, 2, 16, device=device)
    lens = torch.tensor([20, 3], dtype=torch.int32, device=device)
    k_new = torch.randn(2, 2, 1, 16, device=device)
    cases = [
        (dict(max_attention_window=8, sink_token_length=8), "sink_token_length \\(8\\) must be below"),
        (dict(max_attention_window=8, sink_token_length=-1), "sink_token_length must be an int >= 0"),
        (dict(sink_token_length=2), "sink_token_length needs max_attention_window"),
        (dict(max_attention_window=8, sink_token_length=True), "sink_token_length must be an int"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            mod.decode(q, k_cache, v_cache, lens, **kwargs)
        with pytest.raises(ValueError, match=message):
            mod.append_kv(k_cache, v_cache, k_new, k_new, lens, **kwargs)
    with pytest.raises(ValueError, match="rotary_dim must be an even int"):
        mod.decode(q, k_cache, v_cache, lens, max_attention_window=8, sink_token_length=2, rotary_dim=3)
    with pytest.raises(ValueError, match="rotary_dim \\(32\\) must be at most the head dim"):
        mod.decode(q, k_cache, v_cache, lens, max_attention_window=8, sink_token_length=2, rotary_dim=32)
    # 7 tokens past the sinks would need the 6 rolling slots twice over: rejected, the cache untouched
    too_many = torch.randn(2, 7, 1, 16, device=device)
    with pytest.raises(ValueError, match="at most 6 rolling tokens"):
        mod.append_kv(k_cache, v_cache, too_many, too_many, lens, max_attention_window=8, sink_token_length=2)
    # ... but from an empty cache the first 2 of 8 land in the sinks
    start = torch.zeros(2, dtype=torch.int32, device=device)
    mod.append_kv(k_cache, v_cache, torch.ones(2, 8, 1, 16, device=device), torch.ones(2, 8, 1, 16, device=device),
                  start, max_attention_window=8, sink_token_length=2)  # fmt: skip
    assert bool((k_cache == 1).all())
    # a paged append whose slots map to a block outside the pool: rejected before any write
    pool = torch.zeros(4, 4, 1, 16, device=device)
    before = pool.clone()
    table = torch.tensor([[0, 9], [1, 2]], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="outside the pool"):
        # sequence 0 at token 20 writes slot 2 + (20 - 2) mod 6 = 2 (block 0), then 3, 4 (block 1 = 9)
        mod.append_kv(pool, pool.clone(), torch.randn(2, 3, 1, 16, device=device),
                      torch.randn(2, 3, 1, 16, device=device), lens, block_table=table, max_attention_window=8,
                      sink_token_length=2)  # fmt: skip
    assert torch.equal(pool, before)
    qkv = torch.randn(2, 2, 4 * 16, device=device)
    with pytest.raises(ValueError, match="sink_token_length needs max_attention_window"):
        mod.preprocess(qkv, k_cache, v_cache, lens, num_heads_q=2, num_heads_kv=1, rotary_dim=16,
                       sink_token_length=2)  # fmt: skip


@pytest.mark.gpu
def test_gpu_sinks_bf16():
    device = "cuda"
    # a Llama-3-8B layer's heads, a 1024-slot window, lengths past it and short of it
    b, hq, hkv, d, window, sinks, rotary_dim = 4, 32, 8, 128, 1024, 4, 128
    total = [5000, 1024, 1500, 77]
    k_cache = torch.zeros(b, window, hkv, d, device=device, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k_all = torch.randn(b, max(total), hkv, d, device=device, dtype=torch.bfloat16)
    v_all = torch.randn_like(k_all)
    seqlens = torch.zeros(b, dtype=torch.int32, device=device)
    while seqlens.tolist() != total:
        counts = [min(1000, t - int(n)) for t, n in zip(total, seqlens.tolist())]
        cu = torch.tensor([0] + counts, device=device).cumsum(0).to(torch.int32)
        k_new = torch.cat([k_all[i, int(seqlens[i]) : int(seqlens[i]) + counts[i]] for i in range(b)])
        v_new = torch.cat([v_all[i, int(seqlens[i]) : int(seqlens[i]) + counts[i]] for i in range(b)])
        fast.append_kv(k_cache, v_cache, k_new, v_new, seqlens, cu_seqlens_new=cu, max_attention_window=window,
                       sink_token_length=sinks)  # fmt: skip
        seqlens += torch.tensor(counts, dtype=torch.int32, device=device)
    q_raw = torch.randn(b, 1, hq, d, device=device, dtype=torch.bfloat16)
    q = torch.stack(
        [rotate(q_raw[i], torch.tensor([min(n, window) - 1], device=device), rotary_dim, "neox") for i, n in
         enumerate(total)]
    ).bfloat16()  # fmt: skip
    out = fast.decode(q, k_cache, v_cache, seqlens, max_attention_window=window, sink_token_length=sinks,
                      rotary_dim=rotary_dim)  # fmt: skip
    for i, n in enumerate(total):
        tokens = frame_tokens(n, window, sinks)
        k = rotate(k_all[i, tokens], torch.arange(len(tokens), device=device), rotary_dim, "neox")
        ref = reference.attention(q[i : i + 1].double(), k[None], v_all[i : i + 1, tokens].double())
        assert_close("bf16 sinks", ref, out[i : i + 1], TOL[torch.bfloat16])


@pytest.mark.parametrize("seqlen", [0, 1, 3, 4, 5, 9, 30])
def test_window_tokens_while_the_sinks_fill(seqlen):
    # a cache shorter than its sinks holds every token so far (this raised before: arange(S, L) with S > L)
    from attn.reference.kv_cache import window_tokens

    got = window_tokens(seqlen, 8, sinks=4).tolist()
    want = list(range(min(seqlen, 4))) + list(range(max(4, seqlen - 4), seqlen))
    assert got == want
