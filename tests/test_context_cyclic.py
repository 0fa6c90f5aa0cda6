"""Chunked context over a cyclic cache (TensorRT-LLM's max_attention_window_size), with and without StreamingLLM
sinks: the chunk attends to the cache as it was before it plus its own fresh keys (``k_new``/``v_new``), and is
appended afterwards. Fast vs reference on random caches; and the equivalence that needs no tolerance argument:
a prompt run through the ring in chunks (attend, then append) equals one sliding-window pass over the whole
prompt, or, with sinks, what each token would get from decode, computed here from scratch."""

from __future__ import annotations

import pytest
import torch
from test_sinks import frame_tokens, rotate

import attn.fast as fast
import attn.reference as reference
from attn import RelativeBias
from helpers import LSE_TOL, TOL, assert_close, assert_lse_close, dtype_id

IMPLS = {"reference": reference, "fast": fast}


def _cache(b, window, hkv, d, block_size, dtype, device):
    """An empty cache of ``window`` slots per sequence: contiguous, or a shuffled pool with spare blocks."""
    if block_size is None:
        k_cache = torch.zeros(b, window, hkv, d, device=device, dtype=dtype)
        return k_cache, torch.zeros_like(k_cache), None
    per_seq = -(-window // block_size)
    pool = b * per_seq + 2
    k_cache = torch.zeros(pool, block_size, hkv, d, device=device, dtype=dtype)
    table = torch.randperm(pool, device=device)[: b * per_seq].to(torch.int32).view(b, per_seq)
    return k_cache, torch.zeros_like(k_cache), table


def _append(mod, k_cache, v_cache, k_chunk, v_chunk, seqlens, counts, table, window, sinks, **scales):
    """Appends a packed chunk with the existing append, in pieces of at most N - S tokens: one append may not
    write a slot twice, and a chunk longer than the rolling part overwrites its own first tokens."""
    device = k_chunk.device
    piece = window - sinks
    starts = torch.tensor([0] + counts).cumsum(0).tolist()
    done = 0
    while done < max(counts, default=0):
        take = [max(0, min(piece, n - done)) for n in counts]
        rows = torch.cat([torch.arange(starts[i] + done, starts[i] + done + t) for i, t in enumerate(take)]).long()
        cu = torch.tensor([0] + take, device=device).cumsum(0).to(torch.int32)
        at = seqlens + torch.tensor([min(done, n) for n in counts], dtype=torch.int32, device=device)
        mod.append_kv(k_cache, v_cache, k_chunk[rows], v_chunk[rows], at, cu_seqlens_new=cu, block_table=table,
                      max_attention_window=window, sink_token_length=sinks, **scales)  # fmt: skip
        done += piece


def _pick(per_seq, seqlens, counts):
    """The packed chunk: ``counts[i]`` rows of sequence i's tensor from its current length on."""
    return torch.cat([x[int(n) : int(n) + c] for x, n, c in zip(per_seq, seqlens.tolist(), counts)])


def _decode_style(q, k_all, v_all, p, window, sinks, rotary_dim, style, **kw):
    """Token ``p``'s output by definition: it sees the sinks and the last N - S tokens up to itself, their keys
    turned by their places 0, 1, .. in that frame (with RoPE); ``q`` is already turned at ``min(p, N - 1)``."""
    tokens = frame_tokens(p + 1, window, sinks)
    k = k_all[tokens].double()
    if rotary_dim:
        k = rotate(k, torch.arange(len(tokens), device=k.device), rotary_dim, style)
    return reference.attention(q[None, None].double(), k[None], v_all[None, tokens].double(), **kw)[0, 0]


# name: (window N, sinks S, rotary_dim, rope style)
SCHEMES = {
    "window": (16, 0, 0, "neox"),
    "window-rope-gptj": (16, 0, 16, "gptj"),
    "sinks": (16, 4, 0, "neox"),
    "sinks-rope": (16, 3, 24, "neox"),
}


# paged caches on two schemes only: the layout matters to the gather alone, and the interpreter is slow
RING = [(s, None, i) for s in SCHEMES for i in IMPLS] + [(s, 5, i) for s in ("window", "sinks-rope") for i in IMPLS]


@pytest.mark.parametrize(
    "scheme,block_size,impl", [pytest.param(*r, id=f"{r[0]}-{'paged' if r[1] else 'contiguous'}-{r[2]}") for r in RING]
)
def test_chunks_through_the_ring_equal_one_pass(scheme, block_size, impl, device):
    window, sinks, rotary_dim, style = SCHEMES[scheme]
    mod = IMPLS[impl]
    hq, hkv, d, dtype = 4, 2, 32, torch.float16
    # wraps the ring several times / an empty sequence / a few wraps / shorter than the window
    total = [45, 0, 29, 7]
    # chunks of 1, chunks longer than N - S and than N, chunks that wrap the ring mid-way
    schedule = (5, 1, 19, 1, 9, 20)
    b = len(total)
    k_all = [torch.randn(n, hkv, d, device=device, dtype=dtype) for n in total]
    v_all = [torch.randn(n, hkv, d, device=device, dtype=dtype) for n in total]
    q_raw = [torch.randn(n, hq, d, device=device, dtype=dtype) for n in total]
    # each query turned at min(p, N - 1), its place in the cache once its own token is appended
    q_all = [
        rotate(x, torch.arange(len(x), device=device).clamp(max=window - 1), rotary_dim, style).to(dtype)
        if rotary_dim
        else x
        for x in q_raw
    ]
    k_cache, v_cache, table = _cache(b, window, hkv, d, block_size, dtype, device)
    seqlens = torch.zeros(b, dtype=torch.int32, device=device)
    outs = [[] for _ in range(b)]
    for step in schedule:
        counts = [max(0, min(step, t - int(n))) for t, n in zip(total, seqlens.tolist())]
        q, k_new, v_new = (_pick(xs, seqlens, counts) for xs in (q_all, k_all, v_all))
        cu = torch.tensor([0] + counts, device=device).cumsum(0).to(torch.int32)
        before = (k_cache.clone(), v_cache.clone())
        out = mod.context_attention(
            q, k_cache, v_cache, seqlens, cu_seqlens_q=cu, block_table=table, max_attention_window=window,
            sink_token_length=sinks, k_new=k_new, v_new=v_new, rotary_dim=rotary_dim, rope_style=style,
        )  # fmt: skip
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), "the call wrote the cache"
        for i in range(b):
            outs[i].append(out[int(cu[i]) : int(cu[i + 1])])
        # only now may the chunk overwrite the slots its own earlier queries read
        _append(mod, k_cache, v_cache, k_new, v_new, seqlens, counts, table, window, sinks)
        seqlens += torch.tensor(counts, dtype=torch.int32, device=device)
    assert seqlens.tolist() == total
    for i, n in enumerate(total):
        got = torch.cat(outs[i])
        if sinks == 0 and rotary_dim == 0:
            # the definition in one call: a sliding window of N over the whole prompt
            ref = reference.attention(q_all[i][None].double(), k_all[i][None].double(), v_all[i][None].double(),
                                      causal=True, window_size=(window - 1, 0))[0]  # fmt: skip
        else:
            ref = torch.stack(
                [_decode_style(q_all[i][p], k_all[i], v_all[i], p, window, sinks, rotary_dim, style) for p in range(n)]
            ) if n else got.double()  # fmt: skip
        assert_close(f"sequence {i}", ref, got, TOL[dtype])


def test_chunked_equals_token_by_token_decode(device):
    """With sinks and RoPE, one chunk gives each query what decode gives it when the prompt comes one token at a
    time (append, then decode): the decode-style semantics, checked against the decode kernel itself."""
    window, sinks, rotary_dim, hq, hkv, d, dtype = 10, 2, 16, 4, 1, 16, torch.float16
    prefix, chunk = 13, 12  # a full ring, then a chunk longer than N - S
    n = prefix + chunk
    k_all = torch.randn(n, hkv, d, device=device, dtype=dtype)
    v_all = torch.randn_like(k_all)
    q = rotate(torch.randn(n, hq, d, device=device, dtype=dtype), torch.arange(n, device=device).clamp(max=window - 1),
               rotary_dim, "neox").to(dtype)  # fmt: skip
    k_cache, v_cache, _ = _cache(1, window, hkv, d, None, dtype, device)
    one = torch.tensor([0, 1], dtype=torch.int32, device=device)
    steps = []
    for p in range(n):
        at = torch.tensor([p], dtype=torch.int32, device=device)
        if p == prefix:
            chunked = fast.context_attention(
                q[prefix:], k_cache, v_cache, at, cu_seqlens_q=torch.tensor([0, chunk], dtype=torch.int32,
                device=device), max_attention_window=window, sink_token_length=sinks, k_new=k_all[prefix:],
                v_new=v_all[prefix:], rotary_dim=rotary_dim,
            )  # fmt: skip
        fast.append_kv(k_cache, v_cache, k_all[p : p + 1], v_all[p : p + 1], at, cu_seqlens_new=one,
                       max_attention_window=window, sink_token_length=sinks)  # fmt: skip
        if p >= prefix:
            steps.append(fast.decode(q[None, p : p + 1], k_cache, v_cache, at + 1, max_attention_window=window,
                                     sink_token_length=sinks, rotary_dim=rotary_dim)[0, 0])  # fmt: skip
    assert_close("chunk vs decode steps", torch.stack(steps).double(), chunked, TOL[dtype])


def _random_state(lens, new, window, hq, hkv, d, dtype, device, block_size=None, quant=None):
    """A random cache (contents need no history: both implementations read the same slots) and a chunk."""
    b = len(lens)
    k_cache, v_cache, table = _cache(b, window, hkv, d, block_size, torch.float32, device)
    k_cache.normal_()
    v_cache.normal_()
    scales = {}
    if quant == torch.int8:
        k_cache, v_cache = (torch.randint(-127, 128, x.shape, device=device).to(torch.int8) for x in (k_cache, v_cache))
    elif quant is not None:
        k_cache, v_cache = (x.mul(60).to(quant) for x in (k_cache, v_cache))
    else:
        k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    if quant is not None:
        scales = dict(
            k_scale=torch.rand(hkv, device=device) * 0.02 + 0.01, v_scale=torch.tensor([0.015], device=device)
        )
    t = sum(new)
    q = torch.randn(t, hq, d, device=device, dtype=dtype)
    k_new = torch.randn(t, hkv, d, device=device, dtype=dtype)
    v_new = torch.randn_like(k_new)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    cu = torch.tensor([0] + new, device=device).cumsum(0).to(torch.int32)
    return q, k_cache, v_cache, seqlens, cu, k_new, v_new, table, scales


FEATURES = {
    "plain": {},
    "softcap": {"softcap": 2.0, "softmax_scale": 0.3},
    "narrower-window": {"window_size": (6, 0)},
    "alibi": {"alibi_slopes": "slopes"},
    "alibi-with-scale": {"alibi_slopes": "slopes", "alibi_mode": "alibi_with_scale"},
    "t5-implicit": {"rel_bias": "implicit"},
}


def _feature(name, hq, device):
    kw = dict(FEATURES[name])
    if kw.get("alibi_slopes") == "slopes":
        kw["alibi_slopes"] = torch.rand(hq, device=device) * 0.5
    if kw.get("rel_bias") == "implicit":
        kw["rel_bias"] = RelativeBias(table=torch.randn(hq, 8, device=device), max_distance=12, bidirectional=False)
    return kw


# cached before the chunk: empty, inside the sinks, not yet full, wrapped many times; chunks of 0 to past N
LENS, NEW = [0, 2, 9, 57, 30], [6, 9, 1, 0, 15]


# every feature in fp16 without and with sinks + RoPE; the other two schemes on fewer features, and fp32 (whose
# tolerance sees any slip of the RoPE angles) on plain scores: the grid CI's two cores can afford
SCHEME_IDS = {(0, 0): "window", (3, 0): "sinks", (3, 16): "sinks-rope", (0, 16): "window-rope"}
PARITY = (
    [(f, torch.float16, s) for f in FEATURES for s in ((0, 0), (3, 16))]
    + [(f, torch.float16, s) for f in ("plain", "alibi") for s in ((3, 0), (0, 16))]
    + [("plain", torch.float32, s) for s in SCHEME_IDS]
)


@pytest.mark.parametrize(
    "feature,dtype,scheme", [pytest.param(*p, id=f"{p[0]}-{dtype_id(p[1])}-{SCHEME_IDS[p[2]]}") for p in PARITY]
)
def test_fast_matches_reference(feature, dtype, scheme, device):
    sinks, rotary_dim = scheme
    window, hq, hkv, d = 12, 6, 2, 24
    q, kc, vc, seqlens, cu, k_new, v_new, table, _ = _random_state(LENS, NEW, window, hq, hkv, d, dtype, device)
    kw = dict(max_attention_window=window, sink_token_length=sinks, rotary_dim=rotary_dim, return_lse=True,
              **_feature(feature, hq, device))  # fmt: skip
    ref, ref_lse = reference.context_attention(q.double(), kc.double(), vc.double(), seqlens, cu_seqlens_q=cu,
                                               k_new=k_new.double(), v_new=v_new.double(), **kw)  # fmt: skip
    out, lse = fast.context_attention(q, kc, vc, seqlens, cu_seqlens_q=cu, k_new=k_new, v_new=v_new, **kw)
    assert_close("out", ref, out, TOL[dtype])
    # RoPE adds two roundings to the kernel's operands (keys turned in fp32 then stored in q's dtype, and the
    # queries' extra turn), each a relative eps/2 of a score: a few times the plain rounding of the scores
    assert_lse_close("lse", ref_lse, lse, LSE_TOL[dtype] * (4 if rotary_dim else 1))


@pytest.mark.parametrize("quant", [torch.int8, torch.float8_e4m3fn], ids=dtype_id)
@pytest.mark.parametrize("block_size", [None, 4], ids=lambda s: "contiguous" if s is None else f"paged{s}")
def test_quantized_and_paged_cache(quant, block_size, device):
    window, sinks, hq, hkv, d, dtype = 12, 2, 4, 2, 32, torch.float16
    q, kc, vc, seqlens, cu, k_new, v_new, table, scales = _random_state(
        LENS, NEW, window, hq, hkv, d, dtype, device, block_size=block_size, quant=quant
    )
    kw = dict(max_attention_window=window, sink_token_length=sinks, rotary_dim=32, block_table=table,
              return_lse=True, **scales)  # fmt: skip
    ref, ref_lse = reference.context_attention(q.double(), kc, vc, seqlens, cu_seqlens_q=cu, k_new=k_new.double(),
                                               v_new=v_new.double(), **kw)  # fmt: skip
    out, lse = fast.context_attention(q, kc, vc, seqlens, cu_seqlens_q=cu, k_new=k_new, v_new=v_new, **kw)
    # the gather dequantizes and turns each key in fp32 and rounds it once to fp16, as in the other RoPE cases;
    # the keys here are larger (codes × scales reach |k| ≈ 6), and a score's rounding error grows with |q·k|
    assert_close("out", ref, out, TOL[dtype])
    assert_lse_close("lse", ref_lse, lse, 8 * LSE_TOL[dtype])


def test_gather_writes_every_row(device):
    """The temporary the fast path packs: rolling tokens from their slots (dequantized), then the chunk."""
    from attn.fast.kv_cache import gather_window

    window, sinks, hkv, d = 6, 2, 2, 8
    k_cache = torch.arange(1 * window * hkv * d, device=device, dtype=torch.float32).view(1, window, hkv, d)
    k_new = -torch.arange(3 * hkv * d, device=device, dtype=torch.float32).view(3, hkv, d) - 1
    seqlens = torch.tensor([11], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 3], dtype=torch.int32, device=device)
    tokens = [0, 1, 8, 9, 10, 11, 12, 13]  # the sinks, the cached rolling part, the chunk
    row_seq = torch.zeros(len(tokens), dtype=torch.int32, device=device)
    row_tok = torch.tensor(tokens, dtype=torch.int32, device=device)
    k, v = gather_window(k_cache, k_cache, k_new, k_new, seqlens, cu, row_seq, row_tok, window=window, sinks=sinks)
    slots = [t if t < sinks else sinks + (t - sinks) % (window - sinks) for t in tokens[:5]]
    assert torch.equal(k[:5], k_cache[0, slots]) and torch.equal(v[:5], k_cache[0, slots])
    assert torch.equal(k[5:], k_new)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_bad_input(impl, device):
    mod = IMPLS[impl]
    window, hq, hkv, d = 8, 2, 1, 16
    q, kc, vc, seqlens, cu, k_new, v_new, _, _ = _random_state([3, 20], [2, 4], window, hq, hkv, d, torch.float32,
                                                               device)  # fmt: skip
    base = dict(cu_seqlens_q=cu, max_attention_window=window, k_new=k_new, v_new=v_new)
    cases = [
        (dict(k_new=None), ValueError, "needs k_new and v_new"),
        (dict(v_new=v_new[:-1]), ValueError, "v_new must be \\[T, Hkv, D\\]"),
        (dict(k_new=k_new.half()), TypeError, "k_new must have q's dtype"),
        (dict(k_new=k_new.tolist()), TypeError, "k_new must be a torch.Tensor"),
        (dict(causal=False), ValueError, "max_attention_window needs causal=True"),
        (dict(max_attention_window=9), ValueError, "max_attention_window must be an int in \\[1, 8\\]"),
        (dict(sink_token_length=8), ValueError, "sink_token_length \\(8\\) must be below"),
        (dict(sink_token_length=-1), ValueError, "sink_token_length must be an int >= 0"),
        (dict(rotary_dim=3), ValueError, "rotary_dim must be an even int"),
        (dict(rotary_dim=32), ValueError, "rotary_dim \\(32\\) must be at most the head dim"),
        (dict(rel_bias=RelativeBias(bias=torch.zeros(hq, 40, 40, device=device))), ValueError, "regular mode"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            mod.context_attention(q, kc, vc, seqlens, **{**base, **change})
    # without a window: the chunk is appended first, and sinks and read-time RoPE have nothing to attach to
    plain = dict(cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="k_new/v_new are the chunk's keys for a cyclic cache"):
        mod.context_attention(q, kc, vc, torch.tensor([5, 8], dtype=torch.int32, device=device), k_new=k_new,
                              v_new=v_new, **plain)  # fmt: skip
    with pytest.raises(ValueError, match="sink_token_length needs max_attention_window"):
        mod.context_attention(q, kc, vc, torch.tensor([5, 8], dtype=torch.int32, device=device), sink_token_length=2,
                              **plain)  # fmt: skip
    with pytest.raises(ValueError, match="rotary_dim \\(RoPE when reading the cache\\) needs max_attention_window"):
        mod.context_attention(q, kc, vc, torch.tensor([5, 8], dtype=torch.int32, device=device), rotary_dim=8, **plain)
    with pytest.raises(ValueError, match="cache_seqlens entries"):
        mod.context_attention(q, kc, vc, torch.tensor([-1, 8], dtype=torch.int32, device=device), **base)


@pytest.mark.gpu
@pytest.mark.parametrize("sinks,rotary_dim", [(0, 0), (4, 128)], ids=["window", "sinks-rope"])
def test_gpu_chunked_prompt_bf16(sinks, rotary_dim):
    """A Llama-sized head layout in bf16 on a paged 256-slot ring: a long prompt in chunks of 300 and 1, against
    the definition (one windowed pass, or decode-style frames for a sample of tokens)."""
    device, dtype = "cuda", torch.bfloat16
    window, hq, hkv, d = 256, 32, 8, 128
    total = [1000, 0, 300, 77]
    b = len(total)
    k_all = [torch.randn(n, hkv, d, device=device, dtype=dtype) for n in total]
    v_all = [torch.randn(n, hkv, d, device=device, dtype=dtype) for n in total]
    q_all = [torch.randn(n, hq, d, device=device, dtype=dtype) for n in total]
    if rotary_dim:
        q_all = [rotate(x, torch.arange(len(x), device=device).clamp(max=window - 1), rotary_dim, "neox").to(dtype)
                 for x in q_all]  # fmt: skip
    k_cache, v_cache, table = _cache(b, window, hkv, d, 16, dtype, device)
    seqlens = torch.zeros(b, dtype=torch.int32, device=device)
    outs = [[] for _ in range(b)]
    for step in (300, 1, 300, 1, 300, 300):
        counts = [max(0, min(step, t - int(n))) for t, n in zip(total, seqlens.tolist())]
        q, k_new, v_new = (_pick(xs, seqlens, counts) for xs in (q_all, k_all, v_all))
        cu = torch.tensor([0] + counts, device=device).cumsum(0).to(torch.int32)
        out = fast.context_attention(q, k_cache, v_cache, seqlens, cu_seqlens_q=cu, block_table=table,
                                     max_attention_window=window, sink_token_length=sinks, k_new=k_new, v_new=v_new,
                                     rotary_dim=rotary_dim)  # fmt: skip
        for i in range(b):
            outs[i].append(out[int(cu[i]) : int(cu[i + 1])])
        _append(fast, k_cache, v_cache, k_new, v_new, seqlens, counts, table, window, sinks)
        seqlens += torch.tensor(counts, dtype=torch.int32, device=device)
    assert seqlens.tolist() == total
    for i, n in enumerate(total):
        got = torch.cat(outs[i]) if n else None
        if not n:
            continue
        if not sinks:
            ref = reference.attention(q_all[i][None].float(), k_all[i][None].float(), v_all[i][None].float(),
                                      causal=True, window_size=(window - 1, 0))[0]  # fmt: skip
            assert_close(f"sequence {i}", ref, got, TOL[dtype])
        else:
            sample = sorted({0, 3, window - 2, window - 1, window, n // 2, n - 1} & set(range(n)))
            ref = torch.stack([_decode_style(q_all[i][p], k_all[i], v_all[i], p, window, sinks, rotary_dim, "neox")
                               for p in sample])  # fmt: skip
            assert_close(f"sequence {i}", ref, got[sample], TOL[dtype])
