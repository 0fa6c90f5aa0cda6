"""torch.compile(fullgraph=True) through attn's public functions: a small model equals eager, with no graph break.

The model: an embedding, then two layers, each writing its K/V into a paged cache with `attn.preprocess` and
attending with `attn.context_attention` (the prompt) and then `attn.decode` (each generated token). On the CPU
the compiled graph runs with backend "aot_eager" (the operators run the interpreter; inductor would add only
C++ compile time here); on the GPU with inductor, and with mode="reduce-overhead" (CUDA graphs).
"""

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attn

ROOT = Path(__file__).resolve().parent.parent

H_Q, H_KV, D, VOCAB, LAYERS, BLOCK, NUM_BLOCKS = 4, 2, 16, 32, 2, 8, 16


class TinyModel(torch.nn.Module):
    def __init__(self, device, lib=attn):
        super().__init__()
        self.lib = lib  # attn, or attn.reference (same signatures) for the check against the definition
        self.emb = torch.nn.Embedding(VOCAB, H_Q * D, device=device)
        self.qkv = torch.nn.ModuleList(
            torch.nn.Linear(H_Q * D, (H_Q + 2 * H_KV) * D, device=device) for _ in range(LAYERS)
        )
        self.proj = torch.nn.ModuleList(torch.nn.Linear(H_Q * D, H_Q * D, device=device) for _ in range(LAYERS))
        # the paged pools are buffers: under mode="reduce-overhead" CUDA graphs keep them static (in place writes
        # into graph inputs that are not static would make torch skip the graphs)
        for layer in range(LAYERS):
            for name in ("k", "v"):
                self.register_buffer(f"{name}{layer}", torch.zeros(NUM_BLOCKS, BLOCK, H_KV, D, device=device))

    def reset(self):
        for layer in range(LAYERS):
            getattr(self, f"k{layer}").zero_()
            getattr(self, f"v{layer}").zero_()

    def pools(self):
        return [(getattr(self, f"k{layer}").clone(), getattr(self, f"v{layer}").clone()) for layer in range(LAYERS)]

    def forward(self, tokens, seqlens_before, seqlens_after, block_table, cu_seqlens=None, max_new=None):
        """tokens [T] packed (prefill, with cu_seqlens) or [B] (one decode step)."""
        x = self.emb(tokens)
        for layer in range(LAYERS):
            k_pool, v_pool = getattr(self, f"k{layer}"), getattr(self, f"v{layer}")
            qkv = self.qkv[layer](x)
            if cu_seqlens is None:
                qkv = qkv[:, None]  # padded [B, 1, ...]: one new token per sequence
            # the cache write and RoPE, then attention: default calls, which read no tensor value on the host (the
            # kernels clamp bad indices and record them for attn.check_errors), so nothing breaks the graph
            q = self.lib.preprocess(
                qkv, k_pool, v_pool, seqlens_before, num_heads_q=H_Q, num_heads_kv=H_KV, cu_seqlens_new=cu_seqlens,
                block_table=block_table, rotary_dim=D,
            )  # fmt: skip
            if cu_seqlens is not None:
                o = self.lib.context_attention(
                    q, k_pool, v_pool, seqlens_after, cu_seqlens_q=cu_seqlens, max_seqlen_q=max_new,
                    block_table=block_table,
                )  # fmt: skip
            else:
                o = self.lib.decode(q, k_pool, v_pool, seqlens_after, block_table=block_table)[:, 0]
            x = x + self.proj[layer](o.reshape(o.shape[0], -1))
        return x


def _serve(model, device, prompt_lens=(5, 11), steps=3):
    """Prefill both prompts, then ``steps`` decode steps; returns every step's hidden states."""
    gen = torch.Generator().manual_seed(0)
    model_ = getattr(model, "_orig_mod", model)
    model_.reset()
    table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32, device=device)
    tokens = torch.randint(0, VOCAB, (sum(prompt_lens),), generator=gen).to(device)
    cu = torch.tensor([0, prompt_lens[0], sum(prompt_lens)], dtype=torch.int32, device=device)
    before = torch.zeros(2, dtype=torch.int32, device=device)
    after = torch.tensor(prompt_lens, dtype=torch.int32, device=device)
    outs = [model(tokens, before, after, table, cu, max(prompt_lens)).clone()]
    for _ in range(steps):
        before, after = after, after + 1
        step_tokens = torch.randint(0, VOCAB, (2,), generator=gen).to(device)
        outs.append(model(step_tokens, before, after, table).clone())
    return outs, model_.pools()


def _check_compiled(device, eager_first=True, **compile_kw):
    torch.manual_seed(0)
    model = TinyModel(device)
    with torch.no_grad():
        if eager_first:
            eager, eager_pools = _serve(model, device)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, **compile_kw)
        # served twice: under mode="reduce-overhead" a function's first call warms up, its second is recorded in
        # a CUDA graph, later ones replay it (the prompt runs once per serve, each decode step once per token).
        # With the allocation history on, a failure to record ("tensor(s) in the cudagraph pool not tracked as
        # outputs") names where each tensor left in the pool was made (the warm-ups and recordings only)
        with torch._inductor.config.patch({"triton.cudagraph_trees_history_recording": True}):
            for _ in range(2):
                got, got_pools = _serve(compiled, device)
        if not eager_first:
            eager, eager_pools = _serve(model, device)
    for a, b in zip(got, eager):
        # the same kernels on the same inputs; inductor may fuse the linear layers' epilogues differently
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for (ka, va), (kb, vb) in zip(got_pools, eager_pools):
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)


def test_compiled_model_equals_eager_cpu():
    if torch.cuda.is_available():
        pytest.skip("the GPU variants below run on a GPU")
    _check_compiled("cpu", backend="aot_eager")


def test_model_matches_the_reference():
    """The eager model against the same model over attn.reference, so that compiled == eager is not a comparison
    of two equally wrong runs (fp32, interpreter vs torch: a few ulps per step)."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fast_model = TinyModel(device)
    ref_model = TinyModel(device, lib=attn.reference)
    ref_model.load_state_dict(fast_model.state_dict())
    with torch.no_grad():
        got, _ = _serve(fast_model, device)
        want, _ = _serve(ref_model, device)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_compiled_model_equals_eager_gpu_inductor():
    _check_compiled("cuda")


@pytest.mark.gpu
def test_reduce_overhead_as_the_first_attn_call_in_a_process():
    """A model compiled with mode="reduce-overhead" before attn ever ran in the process, as a user's would be: the
    buffers attn keeps (the error word, split-K counters, RoPE tables, memos) are then first made during the
    graphs' warm-up, and must not be made in their memory pool, or torch refuses to record the graph ("tensor(s) in
    the cudagraph pool not tracked as outputs"). A fresh process here, so that no earlier test has made them."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); import test_compile as t; "
        "t._check_compiled('cuda', eager_first=False, mode='reduce-overhead')"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.gpu
def test_compiled_model_equals_eager_gpu_reduce_overhead(monkeypatch):
    """Equal to eager, and the attn kernels really ran inside CUDA-graph capture: the operators call
    ``attn.fast.*`` while the stream is capturing, inductor skipped no graph, and graphs were replayed."""
    from torch._dynamo.utils import counters

    captured = collections.Counter()

    def spy(name):
        real = getattr(attn.fast, name)

        def fn(*args, **kwargs):
            captured[name] += torch.cuda.is_current_stream_capturing()
            return real(*args, **kwargs)

        return fn

    for name in ("preprocess", "context_attention", "decode"):
        monkeypatch.setattr(attn.fast, name, spy(name))  # what the operators call (attn.ops looks it up per call)
    replayed = set()
    real_replay = torch.cuda.CUDAGraph.replay

    def replay(self):
        replayed.add(id(self))
        return real_replay(self)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", replay)
    counters.clear()
    _check_compiled("cuda", mode="reduce-overhead")
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    # the decode step's graph (recorded on its second call) and the prompt's (on the second serve) were captured
    # with every layer's kernels in them
    assert captured["decode"] >= LAYERS and captured["preprocess"] >= 2 * LAYERS, captured
    assert captured["context_attention"] >= LAYERS, captured
    assert replayed, "no CUDA graph was replayed"
