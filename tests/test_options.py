"""attn/options.py: options as values (ScoreOptions, CacheView, RopeOptions), taken alike by attn.reference and
attn.fast (and attn.ops, and the plans), equal to the flat keywords; and the reference and fast signatures kept
equal, so that one call spelled for one runs on the other."""

import dataclasses
import inspect

import pytest
import torch

import attn
import attn.fast as fast
import attn.reference as reference
from attn import ops
from attn.options import CacheView, RopeOptions, ScoreOptions

ENTRIES = sorted(
    n for n in set(reference.__all__) & set(fast.__all__) if inspect.isfunction(getattr(fast, n, None))
)  # fmt: skip


def test_entries_are_all_there():
    assert set(ENTRIES) >= {"append_kv", "attention", "attention_unfused", "context_attention", "cross_attention",
                            "decode", "gpt_attention", "preprocess", "update_indirection"}  # fmt: skip


@pytest.mark.parametrize("name", ENTRIES)
def test_reference_and_fast_signatures_are_equal(name):
    """Same parameters, in the same order, of the same kinds, with the same defaults; the one exception is
    ``validate``: the fast entries take ``validate=None`` (no host read unless ATTN_DEBUG=1), the reference
    reads values on the host by design (it defaults to True, or has no switch at all)."""
    f, r = inspect.signature(getattr(fast, name)).parameters, inspect.signature(getattr(reference, name)).parameters
    # attention_unfused (a path to measure, not to serve) has no switch: it pads packed input on the host
    assert ("validate" in f) is (name != "attention_unfused")
    if "validate" in f:
        assert f["validate"].default is None
    if "validate" in r:
        assert r["validate"].default is True
    strip = lambda ps: [(p.name, p.kind, p.default) for p in ps.values() if p.name != "validate"]
    assert strip(f) == strip(r)
    public = getattr(attn, name)
    assert inspect.signature(public) == inspect.signature(getattr(fast, name))


def test_option_groups_cover_their_keywords():
    # every field maps onto a keyword of some entry, and decode takes all three groups
    params = inspect.signature(fast.decode).parameters
    for name in ("scores", "cache_view", "rope"):
        assert name in params
    for kw in ("softmax_scale", "q_scaling", "causal", "window_size", "softcap", "alibi_slopes", "alibi_mode",
               "rel_bias", "block_table", "k_scale", "v_scale", "max_attention_window", "sink_token_length",
               "cache_indirection", "rotary_dim", "rope_base", "rope_style", "rope_scaling"):  # fmt: skip
        assert kw in params
    assert "scores" not in inspect.signature(fast.append_kv).parameters  # only the groups a function has
    assert "cache_view" in inspect.signature(reference.append_kv).parameters


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: ScoreOptions(softcap=-1.0), ValueError, "softcap"),
        (lambda: ScoreOptions(softmax_scale=0.0), ValueError, "softmax_scale"),
        (lambda: ScoreOptions(window_size=(4,)), TypeError, "window_size"),
        (lambda: ScoreOptions(causal=True, window_size=(4, 2)), ValueError, "causal"),
        (lambda: ScoreOptions(causal=1), TypeError, "causal"),
        (lambda: ScoreOptions(alibi_mode="nope"), ValueError, "alibi_mode"),
        (lambda: ScoreOptions(alibi_slopes=torch.ones(4, dtype=torch.int32)), TypeError, "alibi_slopes"),
        (lambda: ScoreOptions(alibi_slopes=torch.ones(4), rel_bias=attn.RelativeBias(table=torch.zeros(4, 8))),
         ValueError, "one"),
        (lambda: CacheView(block_table=torch.zeros(2, 3)), TypeError, "block_table"),
        (lambda: CacheView(cache_indirection=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "cache_indirection"),
        (lambda: CacheView(k_scale=torch.ones(2)), ValueError, "k_scale and v_scale"),
        (lambda: CacheView(max_attention_window=0), ValueError, "max_attention_window"),
        (lambda: CacheView(sink_token_length=4), ValueError, "sink_token_length"),
        (lambda: RopeOptions(rotary_dim=3), ValueError, "rotary_dim"),
        (lambda: RopeOptions(style="llama"), ValueError, "style"),
        (lambda: RopeOptions(base=float("nan")), ValueError, "base"),
        (lambda: RopeOptions(scaling="linear"), TypeError, "scaling"),
    ],
)  # fmt: skip
def test_options_are_checked_when_made(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_options_are_frozen():
    s = ScoreOptions(softcap=5.0, window_size=[8, -1])
    assert s.window_size == (8, -1)  # a list becomes a tuple
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.softcap = 1.0


def _paged(device, lengths=(5, 19), hkv=2, d=16, block=8, blocks=12):
    k = torch.randn(blocks, block, hkv, d, device=device)
    v = torch.randn_like(k)
    table = torch.randperm(blocks)[: len(lengths) * 3].view(len(lengths), 3).to(torch.int32).to(device)
    return k, v, torch.tensor(lengths, dtype=torch.int32, device=device), table


def test_options_equal_the_flat_keywords(device):
    """The same call spelled with objects and with flat keywords gives the same bits, in attn.fast, in
    attn.reference, and through the custom operator."""
    k, v, lens, table = _paged(device)
    q = torch.randn(2, 1, 4, 16, device=device)
    flat = dict(softcap=5.0, window_size=(9, -1), block_table=table, rotary_dim=16, rope_style="gptj",
                rope_scaling=attn.RopeScaling("linear", factor=2.0))  # fmt: skip
    rope = RopeOptions(rotary_dim=16, style="gptj", scaling=attn.RopeScaling("linear", factor=2.0))
    objs = dict(scores=ScoreOptions(softcap=5.0, window_size=(9, -1)), cache_view=CacheView(block_table=table),
                rope=rope)  # fmt: skip
    for fn in (fast.decode, reference.decode, ops._decode_call):
        assert torch.equal(fn(q, k, v, lens, **objs), fn(q, k, v, lens, **flat)), fn
    # mixed: an object for one group, flat keywords for another
    want = reference.decode(q, k, v, lens, **flat)
    got = attn.decode(q, k, v, lens, scores=objs["scores"], block_table=table, rope=objs["rope"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # causal=None keeps the function's default (True for context_attention); False is passed as False
    rows = torch.randn(5, 4, 16, device=device)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    for causal in (None, False):
        kw = {} if causal is None else {"causal": causal}
        a = fast.context_attention(rows, k, v, lens, cu_seqlens_q=cu, block_table=table, **kw)
        b = fast.context_attention(rows, k, v, lens, cu_seqlens_q=cu, scores=ScoreOptions(causal=causal),
                                   cache_view=CacheView(block_table=table))  # fmt: skip
        assert torch.equal(a, b)


def test_options_refuse_conflicts_and_foreign_fields():
    q = torch.randn(2, 1, 4, 16)
    k, v, lens, table = _paged("cpu")
    with pytest.raises(TypeError, match="softcap given both"):
        fast.decode(q, k, v, lens, softcap=1.0, scores=ScoreOptions(softcap=2.0))
    with pytest.raises(TypeError, match="takes no window_size"):
        reference.cross_attention(q, k, v, lens, scores=ScoreOptions(window_size=(4, -1)))
    with pytest.raises(TypeError, match="must be an attn.ScoreOptions"):
        attn.decode(q, k, v, lens, scores=CacheView())
    with pytest.raises(TypeError, match="scores"):
        fast.append_kv(k, v, q[:, :, :2], q[:, :, :2], lens, scores=ScoreOptions())


def test_plans_take_options(device):
    k, v, lens, table = _paged(device)
    q = torch.randn(2, 1, 4, 16, device=device)
    p = attn.DecodePlan(k, v, [5, 19], num_heads_q=4, scores=ScoreOptions(softcap=5.0),
                        cache_view=CacheView(block_table=table.cpu()))  # fmt: skip
    assert p.options == {"softcap": 5.0} and p.paged
    want = fast.decode(q, k, v, lens, block_table=table, softcap=5.0, validate=False, **p.hints)
    assert torch.equal(p.run(q), want)
    with pytest.raises(TypeError, match="block_table given both"):
        attn.DecodePlan(k, v, [5, 19], num_heads_q=4, block_table=table.cpu(), cache_view=CacheView(block_table=table))
