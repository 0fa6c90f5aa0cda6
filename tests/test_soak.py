"""Soak of the continuous-batching demo (issue 18): random arrivals and ends, a pool kept short so that steps
find it exhausted and preempt, every sampled token checked against the naive recompute, no block or slot
leaked at the end. CI runs a few steps of a one-layer model through the interpreter; the GPU batch runs
``python -m attn.demo --soak 5000`` (or the gpu test below)."""

from __future__ import annotations

import pytest
import torch

from attn import demo
from attn.kv_cache import PoolExhaustedError


def _soak(steps, device, layers=1, num_blocks=10, seed=0, **kw):
    cfg = demo.ModelConfig(vocab=32, layers=layers, heads_q=4, heads_kv=2, head_dim=8, mlp=16)
    model = demo.TinyGPT(cfg, device, torch.float32, seed=seed)
    naive = model.as_float32()
    server = demo.SoakServer(model, num_blocks=num_blocks, block_size=4, max_seqs=4, max_blocks_per_seq=16,
                             token_budget=12)  # fmt: skip

    def check(r):
        want = naive.naive_logits(torch.tensor(r.tokens[:-1], device=device))[-1]
        return demo.relative_error(r.last_logits, want)

    return server, demo.soak(server, steps, check, 1e-4, vocab=cfg.vocab, seed=seed, **kw)


def test_short_soak_preempts_checks_and_leaks_nothing(device):
    # 10 blocks of 4 tokens: two requests of up to 20 tokens each, growing, overrun it
    server, stats = _soak(10, device, arrival_p=0.9, cancel_p=0.1, prompt_range=(3, 12), output_range=(2, 8))
    print(stats)
    assert stats["checked"] > 0 and stats["worst"] <= 1e-4
    assert stats["preemptions"] > 0, "the pool never ran out: the soak did not exercise preemption"
    assert stats["cancelled"] > 0
    assert stats["leaked_blocks"] == 0 and server.cache.allocator.num_free == 10


def test_a_request_larger_than_the_pool_is_a_clear_error(device):
    # one request alone needs more blocks than the pool has: no eviction can help, the error says so
    with pytest.raises(PoolExhaustedError, match="free"):
        _soak(6, device, num_blocks=2, arrival_p=1.0, cancel_p=0.0, prompt_range=(12, 12), output_range=(1, 1))


@pytest.mark.gpu
def test_gpu_long_soak():
    stats = demo.main(["--soak", "3000", "--device", "cuda"])
    assert stats["preemptions"] > 0 and stats["leaked_blocks"] == 0 and stats["worst"] <= 1e-4
