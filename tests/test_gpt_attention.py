"""The inflight-batching op: the batched kernels against the request-by-request reference, in any request order,
with chunked prompts, RoPE, ALiBi, paged and quantized caches; and the equivalence that defines chunking: a
prompt run in chunks, then decoded token by token, equals one causal attention over the whole sequence."""

from __future__ import annotations

import pytest
import torch

import attn
import attn.fast as fast
import attn.reference as reference
from attn import InflightBatch, calibrate_kv_scales
from attn.inflight import CONTEXT, GENERATION
from helpers import TOL, assert_close, dtype_id

HQ, HKV, D = 4, 2, 32
WIDTH = (HQ + 2 * HKV) * D

# (request types, new tokens, cached tokens before the step), in buffer order
ORDERS = {
    "context-first": ([CONTEXT, CONTEXT, GENERATION, GENERATION], [7, 3, 1, 1], [0, 12, 9, 30]),
    "generation-first": ([GENERATION, CONTEXT, GENERATION, CONTEXT], [1, 5, 1, 11], [20, 0, 3, 17]),
    "only-generation": ([GENERATION] * 3, [1, 1, 1], [1, 8, 40]),
    "one-prompt": ([CONTEXT], [19], [0]),
}


def _paged_cache(dtype, device, past, new, block_size=8, pool=64):
    # every request gets a shuffled run of blocks covering its cache after the step, plus spare pool blocks
    need = [-(-(p + n) // block_size) for p, n in zip(past, new)]
    width = max(need)
    perm = torch.randperm(pool, device=device)
    table = torch.zeros(len(past), width, dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used : used + n].to(torch.int32)
        used += n
    k_pool = torch.randn(pool, block_size, HKV, D, dtype=dtype, device=device)
    return k_pool, torch.randn_like(k_pool), table


def _step_inputs(order, dtype, device, paged):
    types, new, past = ORDERS[order]
    if paged:
        k_cache, v_cache, table = _paged_cache(dtype, device, past, new)
    else:
        k_cache = torch.randn(len(types), max(p + n for p, n in zip(past, new)) + 3, HKV, D, dtype=dtype, device=device)
        v_cache, table = torch.randn_like(k_cache), None
    batch = InflightBatch.build(types, new, past, block_table=table, device=device)
    qkv = torch.randn(batch.num_tokens, WIDTH, dtype=dtype, device=device)
    return qkv, batch, k_cache, v_cache


OPTIONS = {
    "rope": {"rotary_dim": D, "qkv_bias": "bias"},
    "rope-gptj-partial": {"rotary_dim": 16, "rope_style": "gptj"},
    "alibi": {"alibi_slopes": "slopes"},
    "window-softcap": {"rotary_dim": D, "window_size": (5, 0), "softcap": 3.0},
}


def _options(name, device, dtype, batch):
    kw = dict(OPTIONS[name])
    if kw.get("qkv_bias") == "bias":
        kw["qkv_bias"] = torch.randn(WIDTH, dtype=dtype, device=device)
    if kw.get("alibi_slopes") == "slopes":
        kw["alibi_slopes"] = torch.rand(batch.batch, HQ, device=device)
    return kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("mode", ["unified", "split"])
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("order", ORDERS)
def test_gpt_attention_matches_reference(order, option, mode, dtype, device):
    qkv, batch, k_cache, v_cache = _step_inputs(order, dtype, device, paged=True)
    kw = dict(num_heads_q=HQ, num_heads_kv=HKV, **_options(option, device, dtype, batch))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = reference.gpt_attention(qkv, batch, k_ref, v_ref, **kw)
    got = fast.gpt_attention(qkv, batch, k_cache, v_cache, mode=mode, **kw)
    # RoPE rounds q and k once to the input dtype in both (fp32 rotation; operation order may move the last
    # bit), the attention then adds its own 2·eps: the sum stays under 2·eps plus that one rounding
    tol = TOL[dtype] * 1.5
    assert_close("out", want, got, tol)
    assert_close("k cache", k_ref, k_cache, TOL[dtype] / 2)
    assert_close("v cache", v_ref, v_cache, TOL[dtype] / 2)


def test_contiguous_cache_unified(device):
    qkv, batch, k_cache, v_cache = _step_inputs("generation-first", torch.float32, device, paged=False)
    kw = dict(num_heads_q=HQ, num_heads_kv=HKV, rotary_dim=D)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = reference.gpt_attention(qkv, batch, k_ref, v_ref, **kw)
    assert_close("out", want, fast.gpt_attention(qkv, batch, k_cache, v_cache, **kw), TOL[torch.float32])
    assert_close("k cache", k_ref, k_cache, TOL[torch.float32])


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn], ids=dtype_id)
@pytest.mark.parametrize("mode", ["unified", "split"])
def test_quantized_cache(qdtype, mode, device):
    qkv, batch, k_float, v_float = _step_inputs("generation-first", torch.float16, device, paged=True)
    k_scale, v_scale = calibrate_kv_scales(k_float * 3, v_float * 3, qdtype, "head")
    k_cache = reference.quantize(k_float, k_scale, qdtype)
    v_cache = reference.quantize(v_float, v_scale, qdtype)
    kw = dict(num_heads_q=HQ, num_heads_kv=HKV, rotary_dim=D, k_scale=k_scale, v_scale=v_scale)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = reference.gpt_attention(qkv, batch, k_ref, v_ref, **kw)
    got = fast.gpt_attention(qkv, batch, k_cache, v_cache, mode=mode, **kw)
    # the caches may differ where a rotated key landed on the neighbouring code (see test_preprocess), which
    # moves a score by one quantization step: within the fp16 tolerance
    assert_close("out", want, got, TOL[torch.float16] * 1.5)


@pytest.mark.parametrize("mode", ["unified", "split"])
def test_chunked_prompt_then_decoding_equals_full_attention(mode, device):
    # one request: a 13-token prompt in chunks of 5 and 8 (each step also carrying an unrelated request),
    # then 3 generated tokens; every step's output rows must equal causal attention over the whole sequence
    torch.manual_seed(1)
    total = 16
    qkv_all = torch.randn(total, WIDTH, device=device)
    other = torch.randn(total, WIDTH, device=device)
    k_cache, v_cache, table = _paged_cache(torch.float32, device, [0, 0], [total, total])
    k_cache.zero_(), v_cache.zero_()
    steps = [(0, 5), (5, 13), (13, 14), (14, 15), (15, 16)]  # [lo, hi) of the request's tokens per step
    kw = dict(num_heads_q=HQ, num_heads_kv=HKV, rotary_dim=D)
    outs = []
    for lo, hi in steps:
        # the other request is a second sequence (table row 1) that advances one token per step
        kind = CONTEXT if hi - lo > 1 or lo == 0 else GENERATION
        s = len(outs)
        batch = InflightBatch.build([GENERATION if s else CONTEXT, kind], [1, hi - lo], [s, lo],
                                    block_table=table.flip(0), device=device)  # fmt: skip
        qkv = torch.cat([other[s : s + 1], qkv_all[lo:hi]])
        outs.append(fast.gpt_attention(qkv, batch, k_cache, v_cache, mode=mode, **kw)[1:])
    got = torch.cat(outs)
    # the whole sequence at once: rotate q/k at positions 0..15, one causal attention
    heads = qkv_all.view(total, HQ + 2 * HKV, D)
    pos = torch.arange(total, device=device, dtype=torch.int32)
    q = reference.apply_rope(heads[:, :HQ], pos, rotary_dim=D)
    k = reference.apply_rope(heads[:, HQ : HQ + HKV], pos, rotary_dim=D)
    v = heads[:, HQ + HKV :]
    cu = torch.tensor([0, total], dtype=torch.int32, device=device)
    want = reference.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    assert_close("chunked vs whole", want, got, TOL[torch.float32])


@pytest.mark.parametrize("rotary", [0, D], ids=["no-rope", "rope"])
def test_split_step_over_one_byte_cache_bounds_bf16_queries(rotary, device):
    # mode "split" decodes the generation requests over the INT8 cache in fp16 (attn/fast/decode.py), and their
    # queries are only formed by the pre-processing, after the cache is written: the step must be refused
    # before that when a generation query could pass fp16's 65504, with RoPE's factor √2 when it rotates
    qkv, batch, k_float, v_float = _step_inputs("generation-first", torch.float32, device, paged=True)
    k_scale, v_scale = calibrate_kv_scales(k_float, v_float, torch.int8, "head")
    k_cache = reference.quantize(k_float, k_scale, torch.int8)
    v_cache = reference.quantize(v_float, v_scale, torch.int8)
    # (the bound is a value check, made by the validated call; the default call's decode kernel reports an
    # overflowing query instead, checked at the end)
    kw = dict(num_heads_q=HQ, num_heads_kv=HKV, rotary_dim=rotary, k_scale=k_scale, v_scale=v_scale, mode="split",
              validate=True)  # fmt: skip
    qkv = qkv.to(torch.bfloat16)
    big = 5e4  # within fp16's range, but not once √2 times larger
    qkv[int(batch.generation_rows[0]), 3] = big
    before = k_cache.clone(), v_cache.clone()
    if rotary:
        with pytest.raises(ValueError, match="qkv's query part must stay within fp16's range"):
            fast.gpt_attention(qkv, batch, k_cache, v_cache, **kw)
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    qkv[int(batch.generation_rows[0]), 3] = 7e4  # beyond fp16 whatever the rotation
    with pytest.raises(ValueError, match="qkv's query part must stay within fp16's range"):
        fast.gpt_attention(qkv, batch, k_cache, v_cache, **kw)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    # a prompt's query is read in bf16 by the context kernel: the same value in a context row is no error
    qkv[int(batch.generation_rows[0]), 3] = 1.0
    qkv[int(batch.cu_seqlens_new[batch.context_requests[0]]), 3] = 7e4
    fast.gpt_attention(qkv, batch, k_cache, v_cache, **kw)
    # (1e5: whatever RoPE's angle, one feature of the turned pair keeps at least 1e5/√2 > 65504)
    qkv[int(batch.generation_rows[0]), 3] = 1e5
    fast.gpt_attention(qkv, batch, k_cache.clone(), v_cache.clone(), **{**kw, "validate": False})
    with pytest.raises(ValueError, match="beyond fp16's range"):
        attn.check_errors()


BAD = {  # (what to break, error type, words the message must contain)
    "rows-short": (lambda qkv, batch: (qkv[:-1], batch), ValueError, "qkv"),
    "not-a-batch": (lambda qkv, batch: (qkv, {"cu": 1}), TypeError, "batch"),
}


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("case", BAD)
def test_bad_step_leaves_the_cache_untouched(case, impl, device):
    qkv, batch, k_cache, v_cache = _step_inputs("context-first", torch.float32, device, paged=True)
    before = k_cache.clone(), v_cache.clone()
    change, error, words = BAD[case]
    qkv, batch = change(qkv, batch)
    fn = reference.gpt_attention if impl == "reference" else fast.gpt_attention
    with pytest.raises(error, match=words):
        fn(qkv, batch, k_cache, v_cache, num_heads_q=HQ, num_heads_kv=HKV)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_option_error_is_raised_before_the_append(device):
    # a bad attention option is only used after the append; the step must still be refused before it
    qkv, batch, k_cache, v_cache = _step_inputs("context-first", torch.float32, device, paged=True)
    before = k_cache.clone()
    with pytest.raises(ValueError, match="softcap"):
        fast.gpt_attention(qkv, batch, k_cache, v_cache, num_heads_q=HQ, num_heads_kv=HKV, softcap=-1.0)
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("mode", ["unified", "split"])
def test_head_dim_limit_is_raised_before_the_append(mode, device):
    # the kernels take D <= 256; the pre-processing launch that appends does not care, so before this check the
    # step wrote the new tokens and then refused (a rejected call must change nothing)
    d = 264
    types, new, past = [CONTEXT, GENERATION], [3, 1], [0, 5]
    table = torch.arange(4, dtype=torch.int32, device=device).view(2, 2)
    k_cache = torch.randn(5, 8, HKV, d, device=device)
    v_cache = torch.randn_like(k_cache)
    before = k_cache.clone(), v_cache.clone()
    batch = InflightBatch.build(types, new, past, block_table=table, device=device)
    qkv = torch.randn(batch.num_tokens, (HQ + 2 * HKV) * d, device=device)
    with pytest.raises(ValueError, match="head dim must be at most 256"):
        fast.gpt_attention(qkv, batch, k_cache, v_cache, num_heads_q=HQ, num_heads_kv=HKV, mode=mode)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


BAD_BATCH = {
    "lengths": (([0, 1], [3], [0, 2]), ValueError, "one entry per request"),
    "type": (([2], [3], [0]), ValueError, "request_types"),
    "generation-two-tokens": (([1], [2], [5]), ValueError, "new_tokens"),
    "generation-without-cache": (([1], [1], [0]), ValueError, "past_lengths"),
    "context-empty": (([0], [0], [4]), ValueError, "new_tokens"),
    "not-int": (([0], [2.0], [0]), TypeError, "new_tokens"),
}


def test_batch_positions_match_the_layout_helpers():
    # the op takes each row's request and position from the batch instead of computing them per layer
    from attn.layout import new_token_positions

    types, new, past = [GENERATION, CONTEXT, GENERATION, CONTEXT], [1, 7, 1, 3], [9, 0, 30, 12]
    batch = InflightBatch.build(types, new, past)
    bounds = batch.cu_seqlens_new.tolist()
    seq, pos = new_token_positions(bounds, batch.cache_seqlens_before)
    assert torch.equal(batch.token_seq, seq) and torch.equal(batch.token_positions, pos)
    assert batch.token_positions.tolist() == [9, 0, 1, 2, 3, 4, 5, 6, 30, 12, 13, 14]


@pytest.mark.parametrize("case", BAD_BATCH)
def test_batch_rejects_bad_metadata(case):
    lists, error, words = BAD_BATCH[case]
    with pytest.raises(error, match=words):
        InflightBatch.build(*lists)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["unified", "split"])
def test_gpu_mixed_batch(mode):
    # 2 prompt chunks of 384 on 512-token prefixes + 24 generation requests on ~1000 tokens, GQA 32/8, D128,
    # paged 64, bf16, with RoPE; the reference on the same inputs in fp32
    dev, hq, hkv, d, bs = "cuda", 32, 8, 128, 64
    types = [CONTEXT, CONTEXT] + [GENERATION] * 24
    new = [384, 384] + [1] * 24
    past = [512, 512] + [int(x) for x in torch.randint(900, 1100, (24,))]
    need = [-(-(p + n) // bs) for p, n in zip(past, new)]
    table = torch.zeros(len(types), max(need), dtype=torch.int32)
    perm, used = torch.randperm(sum(need) + 8), 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used : used + n]
        used += n
    k_cache = torch.randn(sum(need) + 8, bs, hkv, d, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    batch = InflightBatch.build(types, new, past, block_table=table.to(dev))
    qkv = torch.randn(batch.num_tokens, (hq + 2 * hkv) * d, device=dev, dtype=torch.bfloat16)
    kw = dict(num_heads_q=hq, num_heads_kv=hkv, rotary_dim=d)
    k_ref, v_ref = k_cache.float(), v_cache.float()
    ref_batch = InflightBatch.build(types, new, past, block_table=table.to(dev))
    want = reference.gpt_attention(qkv.float(), ref_batch, k_ref, v_ref, **kw)
    got = fast.gpt_attention(qkv, batch, k_cache, v_cache, mode=mode, **kw)
    assert_close("out", want, got, TOL[torch.bfloat16] * 1.5)


def test_unvalidated_step_reads_nothing_back(monkeypatch, device):
    # validate=False is the hot path (and CUDA-graph capture): no device value may be read on the host. Every
    # way torch hands a value to Python is made to fail, then a whole step runs.
    qkv, batch, k_cache, v_cache = _step_inputs("generation-first", torch.float32, device, paged=True)
    kw = dict(num_heads_q=HQ, num_heads_kv=HKV, rotary_dim=D, qkv_bias=torch.randn(WIDTH, device=device))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = reference.gpt_attention(qkv, batch, k_ref, v_ref, **kw)

    def no_host_read(*args, **kwargs):
        raise AssertionError("a device value was read on the host")

    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    got = fast.gpt_attention(qkv, batch, k_cache, v_cache, validate=False, **kw)
    monkeypatch.undo()
    assert_close("out", want, got, TOL[torch.float32])
