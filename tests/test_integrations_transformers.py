"""The "attn" transformers backend, its patches and PagedCache against transformers' eager attention.

Tiny random-weight models built from configs (no downloads). On the CPU the kernels run in Triton's interpreter in
fp32; eager runs the same fp32 math in another order, so logits agree to ~1e-6 relative to their size: the
tolerance (1e-4 absolute on logits of magnitude ~1) leaves room for accumulation order only. A wrong mask, window,
scale or cap moves logits by 1e-2 or more. Padding rows are excluded (their outputs are junk in every backend).
"""

import inspect
import warnings

import pytest
import torch

import attn  # noqa: F401  (before transformers: sets up the interpreter)

transformers = pytest.importorskip("transformers")
import attn.integrations.transformers as ah  # noqa: E402

ah.register()
# the CPU tests run on the GPU too where there is one (fp32 there; the bf16 tests below are GPU-only)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

VOCAB = 101
# one layer keeps the interpreter's launches few; the architectures whose point is two kinds of layers get two
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             max_position_embeddings=128)  # fmt: skip
TWO = {**SMALL, "num_hidden_layers": 2}


def _configs():
    t = transformers
    return {
        "llama3": t.LlamaConfig(
            **SMALL,
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),  # fmt: skip
        "llama_yarn": t.LlamaConfig(
            **SMALL,
            num_key_value_heads=1,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),  # fmt: skip
        "mistral": t.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=5),
        "qwen2": t.Qwen2Config(
            **TWO, num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1
        ),  # fmt: skip
        "gemma2": t.Gemma2Config(
            **TWO,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=4,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=0.5,
            final_logit_softcapping=30.0,
        ),  # fmt: skip
        "gemma3": t.Gemma3TextConfig(
            **TWO,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=4,
            query_pre_attn_scalar=12,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "phi3": t.Phi3Config(**SMALL, num_key_value_heads=2, sliding_window=5, pad_token_id=0),
        "gpt_neox": t.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            rotary_pct=0.5,
            max_position_embeddings=128,
        ),
        "falcon": t.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            multi_query=True,
            new_decoder_architecture=False,
            alibi=False,
            parallel_attn=True,
        ),
    }


def _on_attention_interface(cfg):
    # a custom backend reaches a model only through transformers' AttentionInterface; Falcon moved onto it after
    # 5.17 (5.17 picks its attention class from its own FALCON_ATTENTION_CLASSES table, and "attn" is not in it)
    import sys

    cls = transformers.AutoModelForCausalLM._model_mapping[type(cfg)]
    return not any(name.endswith("_ATTENTION_CLASSES") for name in vars(sys.modules[cls.__module__]))


ARCHS = [
    pytest.param(name, marks=pytest.mark.skipif(not _on_attention_interface(cfg), reason=f"{cfg.model_type} in "
                 f"transformers {transformers.__version__} does not dispatch through the AttentionInterface"))
    for name, cfg in _configs().items()
]  # fmt: skip


def _model(name, dtype=torch.float32, device=DEVICE, impl="eager"):
    """A tiny random model; the same weights for every ``impl`` (some models, Falcon in transformers 5.17 for
    one, cannot switch their implementation after loading: the tests then load one model per implementation)."""
    torch.manual_seed(0)
    cfg = _configs()[name]
    cls = transformers.AutoModelForCausalLM
    model = cls.from_config(cfg, attn_implementation=impl, dtype=dtype).to(device).eval()
    if name == "gemma2" or name == "gemma3":
        # Gemma's embeddings are scaled by sqrt(hidden); small random weights keep the soft cap in play
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2.0)
    return model


def _batch(device=DEVICE):
    # left padding (what generate wants for decoder-only models): lengths 9, 6 and 3
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB - 1, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.to(device), mask.to(device)


def _cache_kw(model):
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _use(model, impl):
    if model.config._attn_implementation != impl:
        model.set_attn_implementation(impl)


def _greedy(model, ids, mask, impl, steps=16, cache=None):
    _use(model, impl)
    kw = {_cache_kw(model): cache} if cache is not None else {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="attn:")  # the kernels ran: no fallback
        warnings.filterwarnings("ignore", category=FutureWarning)
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None,
            output_logits=True, return_dict_in_generate=True, **kw,
        )  # fmt: skip
    return out.sequences, torch.stack(out.logits, 1)


def _prefill(model, ids, mask, impl):
    _use(model, impl)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="attn:")
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("name", ARCHS)
def test_prefill_and_generate_match_eager(name):
    model = _model(name)
    ids, mask = _batch()
    ref = _prefill(model, ids, mask, "eager")
    out = _prefill(model, ids, mask, "attn")
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)

    tokens_ref, logits_ref = _greedy(model, ids, mask, "eager")
    tokens, logits = _greedy(model, ids, mask, "attn")
    assert torch.equal(tokens, tokens_ref)
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)

    cache = ah.PagedCache(model.config, max_batch_size=3, max_cache_len=32, block_size=4)
    tokens_p, logits_p = _greedy(model, ids, mask, "attn", cache=cache)
    assert torch.equal(tokens_p, tokens_ref)
    torch.testing.assert_close(logits_p, logits_ref, atol=1e-4, rtol=1e-4)
    # the paged cache holds the valid tokens only: prompt lengths 9/6/3 plus 16, the last token never cached
    assert cache.kv.seqlens[:3].tolist() == [9 + 15, 6 + 15, 3 + 15]


def test_paged_cache_int8():
    """INT8 storage with per-tensor scales amax/127 taken from an eager prefill's cache: each value moves by at
    most half a step (0.4% of amax), and the logits by ~1e-3 of their size (6.5e-4 observed on logits of ~0.36);
    5e-3 allows that and fails a wrong scale, a missing dequantization or a misplaced token (>= 1e-1)."""
    model = _model("llama3")
    ids, mask = _batch()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
    eager_cache = getattr(out, "cache", None) or out.past_key_values
    k_amax = max(layer.keys.abs().max().item() for layer in eager_cache.layers)
    v_amax = max(layer.values.abs().max().item() for layer in eager_cache.layers)
    tokens_ref, logits_ref = _greedy(model, ids, mask, "eager", steps=4)
    cache = ah.PagedCache(model.config, max_batch_size=3, max_cache_len=16, block_size=4, dtype=torch.int8,
                          k_scale=k_amax / 127, v_scale=v_amax / 127)  # fmt: skip
    tokens, logits = _greedy(model, ids, mask, "attn", steps=4, cache=cache)
    assert cache.kv.k.dtype == torch.int8 and cache.kv.k.abs().max() > 60
    assert torch.equal(tokens, tokens_ref)
    err = (logits - logits_ref).abs().max().item()
    assert err < 5e-3, err


def test_right_padding_and_fallback_warns_once():
    model = _model("mistral")
    ids, mask = _batch()
    right = torch.flip(mask, [1])  # right padding: valid keys are still one run per row
    ref = _prefill(model, ids, right, "eager")
    out = _prefill(model, ids, right, "attn")
    torch.testing.assert_close(out[right.bool()], ref[right.bool()], atol=1e-4, rtol=1e-4)
    holes = mask.clone()
    holes[0, 4] = 0  # a hole: not lengths; SDPA computes it, with one warning
    ref = model.set_attn_implementation("eager") or model(ids, attention_mask=holes).logits
    model.set_attn_implementation("attn")
    ah._WARNED.clear()
    with pytest.warns(UserWarning, match="attn: a padding mask"):
        with torch.no_grad():
            out = model(ids, attention_mask=holes).logits
    torch.testing.assert_close(out[holes.bool()], ref[holes.bool()], atol=1e-4, rtol=1e-4)


def test_patch_bloom():
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1,
                                                                   n_head=4)).to(DEVICE).eval()  # fmt: skip
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        gen_ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                                 eos_token_id=None, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    ah.patch_bloom(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="attn:")
        out = model(ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                             eos_token_id=None, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen.sequences, gen_ref.sequences)
    torch.testing.assert_close(torch.stack(gen.logits), torch.stack(gen_ref.logits), atol=1e-4, rtol=1e-4)


def test_patch_t5_with_cross_attention():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=VOCAB - 1)  # fmt: skip
    model = transformers.T5ForConditionalGeneration(cfg).to(DEVICE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # livelier random logits: greedy tokens that differ from step to step
    g = torch.Generator().manual_seed(2)
    enc = torch.randint(2, VOCAB - 1, (2, 20), generator=g)
    emask = torch.ones(2, 20, dtype=torch.long)
    emask[1, 13:] = 0  # right-padded encoder input; distances beyond max_distance exercise the far buckets
    dec = torch.randint(2, VOCAB - 1, (2, 6), generator=g)
    enc, emask, dec = enc.to(DEVICE), emask.to(DEVICE), dec.to(DEVICE)
    kw = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model(input_ids=enc, attention_mask=emask, decoder_input_ids=dec).logits
        gen_ref = model.generate(enc, attention_mask=emask, **kw)
    ah.patch_t5(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="attn:")
        out = model(input_ids=enc, attention_mask=emask, decoder_input_ids=dec).logits
        gen = model.generate(enc, attention_mask=emask, **kw)
    # T5 does not scale its scores: with these weights they reach the hundreds and the softmax is nearly one-hot,
    # so fp32 rounding of a score (~1e-5 relative) moves the logits by up to ~2e-4 of their largest value
    tol = 5e-4 * ref.abs().max().item()
    torch.testing.assert_close(out, ref, atol=tol, rtol=1e-4)
    assert torch.equal(gen.sequences, gen_ref.sequences)
    assert len(set(gen.sequences[0].tolist())) > 2
    torch.testing.assert_close(torch.stack(gen.logits), torch.stack(gen_ref.logits), atol=tol, rtol=1e-4)


# --- GPU (bf16) -------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ARCHS)
def test_gpu_bf16_matches_eager(name):
    """bf16: eager rounds its probabilities to bf16 before the product with V, the kernels keep them in fp32, so
    logits differ by a few bf16 ulps of the hidden states (~1e-2 on logits of magnitude ~1); greedy tokens may
    flip where two logits tie within that, so tokens are compared up to the first such near-tie."""
    eager = _model(name, dtype=torch.bfloat16, device="cuda")
    model = _model(name, dtype=torch.bfloat16, device="cuda", impl="attn")  # attn_implementation at load
    ids, mask = _batch("cuda")
    ref = _prefill(eager, ids, mask, "eager").float()
    out = _prefill(model, ids, mask, "attn").float()
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=5e-2, rtol=5e-2)
    for cache in (None, ah.PagedCache(model.config, max_batch_size=3, max_cache_len=32, block_size=16)):
        tokens_ref, logits_ref = _greedy(eager, ids, mask, "eager")
        tokens, logits = _greedy(model, ids, mask, "attn", cache=cache)
        prompt = ids.shape[1]
        for b in range(ids.shape[0]):
            for t in range(tokens.shape[1] - prompt):
                top2 = logits_ref[b, t].float().topk(2).values
                if tokens[b, prompt + t] != tokens_ref[b, prompt + t]:
                    assert (top2[0] - top2[1]) < 0.1, (b, t)  # a near-tie flipped: the rest of the row diverges
                    break
                torch.testing.assert_close(logits[b, t].float(), logits_ref[b, t].float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_gpu_compile_no_graph_break_in_attention():
    """torch.compile of a model running "attn" (no padding mask: the path without host reads) compiles the
    attention calls without a graph break; needs attn's custom ops (attn/ops.py)."""
    import torch._dynamo

    model = _model("llama3", dtype=torch.bfloat16, device="cuda")
    model.set_attn_implementation("attn")
    ids = torch.randint(2, VOCAB - 1, (2, 16), device="cuda")
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(lambda x: model(x).logits)(ids)
    reasons = [str(b.reason) for b in explained.break_reasons]
    assert not any("attn" in r or "triton" in r.lower() for r in reasons), reasons
    assert explained.graph_break_count == 0, reasons


def test_serve_continuous_batching_matches_generate():
    """Requests arriving and finishing at different steps, served in packed inflight steps over one paged cache,
    produce the tokens transformers' own greedy generate gives each request alone (eager attention)."""
    from attn.integrations import serve

    model = serve.tiny_llama(device=DEVICE)
    requests = serve.make_requests(4, VOCAB, prompt_range=(3, 9), output_range=(3, 6), arrival_every=1)
    server = serve.Server(model, num_blocks=12, block_size=4, max_seqs=3, max_blocks_per_seq=4)
    stats = server.serve(requests, log=None)
    assert all(r.done for r in requests) and server.kv.allocator.num_used == 0
    assert stats["steps"] < sum(r.max_new for r in requests)  # requests overlapped
    assert serve.check_against_generate(model, requests) == 0


def test_static_cache_left_padding():
    """transformers' StaticCache hands keys of the cache's full length with a mask shorter than them: the
    queries sit after the last valid column, not at the end."""
    model = _model("llama3")
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None,
              cache_implementation="static", output_logits=True, return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="attn:")
        model.set_attn_implementation("eager")
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("attn")
        out = model.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-4, rtol=1e-4)


def test_packed_position_ids_fall_back_to_sdpa():
    """Sequences packed in one row (position_ids restarting, no mask): transformers' mask function is not one
    the kernels express, so the mask function hands the dense mask and the call runs SDPA, warning once."""
    model = _model("llama3")
    ids = torch.randint(2, VOCAB - 1, (1, 10), device=DEVICE)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]], device=DEVICE)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(ids, position_ids=pos, use_cache=False).logits
        model.set_attn_implementation("attn")
        ah._WARNED.clear()
        with pytest.warns(UserWarning, match="attn: a mask that lengths"):
            out = model(ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
