"""The end-to-end demo: a small decoder served with continuous batching, checked against a naive recompute."""

from __future__ import annotations

import pytest
import torch

import attn
from attn import demo


def test_demo_serves_and_checks_every_token():
    report = demo.main(["--requests", "5"])
    assert report["generated_tokens"] > 0
    # every sampled token's logits were compared with the cache-free recompute
    assert report["logits_checked"] == report["generated_tokens"]
    assert report["worst_logit_error"] <= 1e-4
    # blocks were taken as sequences grew and all returned when they finished
    assert report["peak_blocks"] > 0 and report["blocks_used"][-1] == 0
    # more than one request was in flight at some step: the batches really were mixed
    assert max(report["running"]) > 1


def test_demo_catches_a_wrong_attention(monkeypatch):
    real = attn.gpt_attention

    def off_by_a_bit(qkv, batch, *args, **kwargs):
        out = real(qkv, batch, *args, **kwargs)
        # a generation row's output nudged: what a cache-indexing bug would do to one request
        if 1 in batch.request_types:
            out[batch.generation_rows[0]] += 0.05 * torch.randn_like(out[0])
        return out

    monkeypatch.setattr(attn, "gpt_attention", off_by_a_bit)
    with pytest.raises(AssertionError, match="naive"):
        demo.main(["--requests", "5"])
