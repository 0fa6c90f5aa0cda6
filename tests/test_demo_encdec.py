"""The encoder-decoder demo: a tiny T5-style model served with continuous batching over a paged self-attention
cache and a paged cross cache, every sampled token checked against a cache-free recompute."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attn
from attn import demo_encdec


def test_encdec_demo_serves_and_checks_every_token():
    report = demo_encdec.main([])
    assert report["generated_tokens"] > 0
    # every sampled token's logits were compared with the cache-free recompute
    assert report["logits_checked"] == report["generated_tokens"]
    assert report["worst_logit_error"] <= 1e-4
    # both caches were used and every block of both came back when the requests finished
    assert report["peak_blocks"] > 0 and report["blocks_used"][-1] == 0
    assert report["peak_cross_blocks"] > 0 and report["cross_blocks_used"][-1] == 0
    # the batches really were mixed: several requests in flight, prompt chunks beside generation tokens, prompts
    # cut into chunks, and an encoder pass over more than one packed source
    assert max(report["running"]) > 1
    assert report["mixed_steps"] > 0 and report["chunks"] > 0
    assert report["encoder_batch_max"] > 1


def _nudge_one_row(real):
    def wrong(q, *args, **kwargs):
        out = real(q, *args, **kwargs)
        # one decoder row's cross-attention output off by a little: what a cross-cache indexing bug would do
        out[-1] += 0.05 * torch.randn_like(out[-1])
        return out

    return wrong


def _swap_buckets(real):
    def wrong(*args, rel_bias=None, **kwargs):
        # the other stack's buckets: the decoder reading future-and-past buckets, the encoder past-only ones
        flipped = dataclasses.replace(rel_bias, bidirectional=not rel_bias.bidirectional)
        return real(*args, rel_bias=flipped, **kwargs)

    return wrong


@pytest.mark.parametrize(
    "name, corrupt",
    [("cross_attention", _nudge_one_row), ("gpt_attention", _swap_buckets), ("attention", _swap_buckets)],
    ids=["cross-row", "decoder-t5-buckets", "encoder-t5-buckets"],
)
def test_encdec_demo_catches_a_wrong_attention(monkeypatch, name, corrupt):
    monkeypatch.setattr(attn, name, corrupt(getattr(attn, name)))
    with pytest.raises(AssertionError, match="naive"):
        demo_encdec.main([])
