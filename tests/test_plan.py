"""attn.plan: plan.run equals the flat call it plans, bit for bit, replays without the flat function, updates
in place, refuses bad metadata at planning, and (on the GPU) is captured in a CUDA graph."""

import sys

import pytest
import torch
import triton
import triton.language as tl

import attn
from attn import plan as plan_mod

H_Q, H_KV, D = 4, 2, 16


def _paged_cache(device, lengths, dtype=torch.float32, block=8, num_blocks=24, width=8):
    cache = attn.PagedKVCache(num_blocks=num_blocks, block_size=block, num_heads_kv=H_KV, head_dim=D,
                              max_seqs=len(lengths), max_blocks_per_seq=width, dtype=dtype, device=device)  # fmt: skip
    slots = [cache.add_sequence() for _ in lengths]
    for s, n in zip(slots, lengths):
        k = torch.randn(1, n, H_KV, D, device=device, dtype=dtype)
        cache.append([s], k, torch.randn_like(k))
    return cache, slots


def _no_flat_calls(monkeypatch, module_name, fn_name):
    """Makes the flat function fail if called: a replay must not go through it."""
    import sys

    def boom(*a, **k):
        raise AssertionError(f"{fn_name} was called by a replay")

    monkeypatch.setattr(sys.modules[module_name], fn_name, boom)
    monkeypatch.setattr(attn.fast, fn_name, boom)


def test_decode_plan_equals_flat_call_and_replays(device, monkeypatch):
    cache, slots = _paged_cache(device, [5, 40, 17])
    q = torch.randn(3, 1, H_Q, D, device=device)
    p = cache.plan_decode(slots, num_heads_q=H_Q, softcap=5.0)
    first = p.run(q)
    assert p.replayable
    seqlens, table = cache.metadata(slots)
    flat = attn.decode(q, cache.k, cache.v, seqlens, block_table=table, softcap=5.0, validate=False, **p.hints)
    assert torch.equal(first, flat)
    ref = attn.reference.decode(q, cache.k, cache.v, seqlens, block_table=table, softcap=5.0)
    torch.testing.assert_close(first, ref, atol=1e-5, rtol=1e-5)
    # a second layer's pools and a new query, through the replay alone
    k2, v2 = torch.randn_like(cache.k), torch.randn_like(cache.v)
    q2 = torch.randn_like(q)
    want = attn.decode(q2, k2, v2, seqlens, block_table=table, softcap=5.0, validate=False, **p.hints)
    _no_flat_calls(monkeypatch, "attn.fast.decode", "decode")
    out = torch.empty_like(q2)
    got = p.run(q2, k2, v2, out=out)
    assert got is out and torch.equal(got, want)


def test_decode_plan_update_in_place(device):
    cache, slots = _paged_cache(device, [5, 9])
    q = torch.randn(2, 1, H_Q, D, device=device)
    p = cache.plan_decode(slots, num_heads_q=H_Q, round_to=8)
    p.run(q)
    assert p.hints["max_seqlen_k"] == 16
    assert p.update([4, 9]) is True  # within the hints: recorded launches stay valid
    seqlens = torch.tensor([4, 9], dtype=torch.int32, device=device)
    _, table = cache.metadata(slots)
    want = attn.reference.decode(q, cache.k, cache.v, seqlens, block_table=table)
    torch.testing.assert_close(p.run(q), want, atol=1e-5, rtol=1e-5)
    # past the hints: re-planned, and the next run records the flat call with the new hints
    assert p.update([4, 17], block_table=cache.metadata(slots)[1].cpu()) is False
    assert p.hints["max_seqlen_k"] == 24
    seqlens = torch.tensor([4, 17], dtype=torch.int32, device=device)
    assert torch.equal(p.run(q), attn.decode(q, cache.k, cache.v, seqlens, block_table=table, validate=False,
                                             **p.hints))  # fmt: skip
    with pytest.raises(ValueError, match="cache_seqlens"):
        p.update([4, 10_000])


def test_decode_plan_contiguous_and_split(device):
    k = torch.randn(2, 64, H_KV, D, device=device)
    v = torch.randn_like(k)
    q = torch.randn(2, 1, H_Q, D, device=device)
    p = attn.DecodePlan(k, v, [64, 33], num_heads_q=H_Q, num_splits=3)
    got = p.run(q)
    got = p.run(q)  # the replay
    assert p.replayable
    seqlens = torch.tensor([64, 33], dtype=torch.int32, device=device)
    assert torch.equal(got, attn.decode(q, k, v, seqlens, validate=False, num_splits=3, **p.hints))
    torch.testing.assert_close(got, attn.reference.decode(q, k, v, seqlens), atol=1e-5, rtol=1e-5)


def test_context_and_prefill_plans(device):
    cache, slots = _paged_cache(device, [6, 13])
    q = torch.randn(9, H_Q, D, device=device)
    p = cache.plan_context(slots, [4, 5])
    seqlens, table = cache.metadata(slots)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    flat = attn.context_attention(q, cache.k, cache.v, seqlens, cu_seqlens_q=cu, block_table=table)
    assert torch.equal(p.run(q), flat) and torch.equal(p.run(q), flat)
    assert p.replayable

    qp, kp, vp = (torch.randn(9, h, D, device=device) for h in (H_Q, H_KV, H_KV))
    pp = attn.PrefillPlan([4, 5], causal=True, device=device)
    flat = attn.attention(qp, kp, vp, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    assert torch.equal(pp.run(qp, kp, vp), flat) and torch.equal(pp.run(qp, kp, vp), flat)
    assert pp.replayable

    # padded, one prompt shorter than the padding (its length goes to the kernel as seqlens_q/seqlens_k)
    qd, kd, vd = (torch.randn(2, 5, h, D, device=device) for h in (H_Q, H_KV, H_KV))
    pd = attn.PrefillPlan([4, 5], causal=True, packed=False, device=device)
    lens = torch.tensor([4, 5], dtype=torch.int32, device=device)
    flat = attn.attention(qd, kd, vd, seqlens_q=lens, seqlens_k=lens, causal=True)
    assert torch.equal(pd.run(qd, kd, vd)[:, :4], flat[:, :4]) and pd.replayable
    assert torch.equal(pd.run(qd, kd, vd)[:, :4], flat[:, :4])


def test_replays_keep_and_feed_the_error_word(device, monkeypatch):
    """Replays pass the device's error word to the kernels as the flat call does, and never clear it: a plan
    recorded as a process's first call must not replay the word's creation (its zeroing) as a fill."""
    from attn.fast import _errors

    monkeypatch.setattr(_errors, "_WORDS", {})  # no word yet: the recorded call would make it
    k = torch.randn(2, 32, H_KV, D, device=device)
    v = torch.randn_like(k)
    q = torch.randn(2, 1, H_Q, D, device=device)
    p = attn.DecodePlan(k, v, [32, 9], num_heads_q=H_Q)
    p.run(q)
    word = _errors.error_word(torch.device(device))
    assert p.replayable
    assert all(plan_mod._storage(st[2]) != plan_mod._storage(word) for st in p._replay.steps if st[0] == "fill"
               and st[2] is not None)  # fmt: skip
    word.fill_(_errors.BLOCK_TABLE)  # a violation recorded by some earlier call survives the replay
    p.run(q)
    with pytest.raises(ValueError, match="block_table entry"):
        attn.check_errors(device)
    # a length corrupted on the device after planning: the replayed kernel clamps it and records it
    p.cache_seqlens[0] = 1000
    out = p.run(q)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="a length"):
        attn.check_errors(device)


@pytest.mark.parametrize("mode", ["unified", "split"])
def test_gpt_attention_plan(device, mode):
    cache, slots = _paged_cache(device, [7, 0])
    cache.reserve_tokens(slots, [1, 5])
    batch = attn.InflightBatch.build([1, 0], [1, 5], [7, 0], block_table=cache.metadata(slots)[1])
    p = batch.plan(cache.k, cache.v, num_heads_q=H_Q, num_heads_kv=H_KV, rotary_dim=D, mode=mode)
    for _ in range(2):  # the recorded call, then a replay (unified) or the flat call again (split)
        qkv = torch.randn(6, (H_Q + 2 * H_KV) * D, device=device)
        k0, v0 = cache.k.clone(), cache.v.clone()
        got = p.run(qkv)
        want = attn.gpt_attention(qkv, batch, k0, v0, num_heads_q=H_Q, num_heads_kv=H_KV, rotary_dim=D, mode=mode)
        assert torch.equal(got, want) and torch.equal(cache.k, k0) and torch.equal(cache.v, v0)
    # unified: pre-processing and one attention launch, the qkv slices rebuilt on each new buffer; split: index
    # operations on the pre-processed q between launches, which only the flat call redoes
    assert p.replayable is (mode == "unified"), p.refusal


def test_planning_refuses_bad_metadata(device):
    cache, slots = _paged_cache(device, [5, 9])
    with pytest.raises(TypeError, match="host-side"):
        attn.DecodePlan(cache.k, cache.v, torch.tensor([5, 9], dtype=torch.int32, device="meta"),
                        block_table=[[0], [1, 2]], num_heads_q=H_Q)  # fmt: skip
    with pytest.raises(ValueError, match="outside the pool"):
        attn.DecodePlan(cache.k, cache.v, [5, 9], block_table=[[0], [1, 99]], num_heads_q=H_Q)
    with pytest.raises(ValueError, match="must lie in"):
        attn.DecodePlan(cache.k, cache.v, [5, 90], block_table=[[0], [1, 2]], num_heads_q=H_Q)
    with pytest.raises(ValueError, match="num_heads_q"):
        cache.plan_decode(slots, num_heads_q=3)


def test_replay_falls_back_when_inputs_change_layout(device):
    cache, slots = _paged_cache(device, [5, 9])
    q = torch.randn(2, 1, H_Q, D, device=device)
    p = cache.plan_decode(slots, num_heads_q=H_Q)
    p.run(q)
    # a query with another stride is not what was recorded: the flat call serves it
    q_t = torch.randn(2, H_Q, 1, D, device=device).transpose(1, 2)
    seqlens, table = cache.metadata(slots)
    assert torch.equal(p.run(q_t), attn.decode(q_t, cache.k, cache.v, seqlens, block_table=table))


def test_recording_rejects_work_on_the_inputs():
    """A flat call that computes on its input outside a launch must not be replayed."""

    def flat(x):
        return x * 2

    class P(plan_mod._Plan):
        def _flat(self, x):
            return flat(x)

    p = P()
    x = torch.randn(4)
    assert torch.equal(p._execute((x,), None), x * 2)
    assert p.replayable is False
    y = torch.randn(4)
    assert torch.equal(p._execute((y,), None), y * 2)


@pytest.mark.gpu
def test_plans_in_cuda_graphs():
    device = "cuda"
    cache, slots = _paged_cache(device, [70, 300, 1000], dtype=torch.bfloat16, block=64, num_blocks=64, width=20)
    q = torch.randn(3, 1, H_Q, D, device=device, dtype=torch.bfloat16)
    p = cache.plan_decode(slots, num_heads_q=H_Q)
    want = p.run(q)
    out = torch.empty_like(q)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        p.run(q, out=out)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, p.run(q)) and not torch.equal(out, want)
    # lengths updated in place within the hints: the same graph reads them
    assert p.update([71, 301, 1001]) is True  # within the hints (1024 keys): the graph stays valid
    g.replay()
    seqlens, table = cache.metadata(slots)
    torch.testing.assert_close(out.float(), attn.reference.decode(q, cache.k, cache.v, torch.tensor(
        p.lengths, dtype=torch.int32, device=device), block_table=table).float(), atol=2e-2, rtol=2e-2)  # fmt: skip


# ---- on the GPU: every public entry (default arguments) and every plan.run, captured and replayed

GRAPH_ENTRIES = [
    "attention-padded", "attention-packed", "attention_unfused-padded", "decode-paged", "decode-contiguous",
    "decode-split", "decode-beam", "context_attention", "cross_attention", "cross_attention-packed", "append_kv",
    "preprocess", "gpt_attention", "gpt_attention-unified", "update_indirection",
    "plan-decode-paged", "plan-decode-contiguous", "plan-decode-split", "plan-context", "plan-prefill-packed",
    "plan-prefill-padded", "plan-gpt-unified", "plan-gpt-split",
]  # fmt: skip


def _graph_calls(name, dev="cuda"):
    """``(call, fresh, written)``: the call as a user makes it, the float/int inputs a test rewrites between
    capture and replay (tensor, or (tensor, high) for an index tensor), and the tensors the call writes."""
    dt = torch.float16 if dev == "cuda" else torch.float32
    b, hq, hkv, d, page, width = 4, 8, 2, 64, 16, 8
    pool = b * width + 1
    k = torch.randn(pool, page, hkv, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    table = torch.randperm(pool)[: b * width].view(b, width).to(torch.int32).to(dev)
    lens_list = [5, 17, 128, 64]
    lens = torch.tensor(lens_list, dtype=torch.int32, device=dev)
    short = lens.clamp(max=100)  # room for the appended tokens
    q = torch.randn(b, 1, hq, d, device=dev, dtype=dt)
    new = [2, 3, 4, 3]
    cu = torch.tensor([0, 2, 5, 9, 12], dtype=torch.int32, device=dev)
    rows = torch.randn(12, hq, d, device=dev, dtype=dt)
    kn, vn = torch.randn(12, hkv, d, device=dev, dtype=dt), torch.randn(12, hkv, d, device=dev, dtype=dt)
    qkv = torch.randn(12, (hq + 2 * hkv) * d, device=dev, dtype=dt)
    qp, kp, vp = (torch.randn(b, 24, h, d, device=dev, dtype=dt) for h in (hq, hkv, hkv))
    ind = torch.randint(0, 4, (1, b, 128), dtype=torch.int32, device=dev)
    parents = torch.randint(0, 4, (1, b), dtype=torch.int32, device=dev)
    step = attn.InflightBatch.build([0, 1, 0, 1], [3, 1, 3, 1], [0, 40, 10, 70], block_table=table)
    qkv_step = torch.randn(step.num_tokens, (hq + 2 * hkv) * d, device=dev, dtype=dt)
    kc, vc = k[:b], v[:b]  # a contiguous cache [B, 16, Hkv, D]
    lens_c = [min(n, page) for n in lens_list]
    lens_ct = torch.tensor(lens_c, dtype=torch.int32, device=dev)
    gpt = {"num_heads_q": hq, "num_heads_kv": hkv, "rotary_dim": d}
    if name.startswith("plan-"):
        plans = {
            "plan-decode-paged": lambda: attn.DecodePlan(k, v, lens_list, block_table=table, num_heads_q=hq),
            "plan-decode-contiguous": lambda: attn.DecodePlan(kc, vc, lens_c, num_heads_q=hq),
            "plan-decode-split": lambda: attn.DecodePlan(
                k, v, lens_list, block_table=table, num_heads_q=hq, num_splits=4
            ),
            "plan-context": lambda: attn.ContextPlan(k, v, lens_list, new, block_table=table),
            "plan-prefill-packed": lambda: attn.PrefillPlan(new, causal=True, device=dev),
            "plan-prefill-padded": lambda: attn.PrefillPlan([24, 9, 17, 1], causal=True, packed=False, device=dev),
            "plan-gpt-unified": lambda: step.plan(k, v, mode="unified", **gpt),
            "plan-gpt-split": lambda: step.plan(k, v, mode="split", **gpt),
        }
        p = plans[name]()
        if name.startswith("plan-decode"):
            return (lambda: p.run(q)), [q], [], p
        if name == "plan-context":
            return (lambda: p.run(rows)), [rows], [], p
        if name == "plan-prefill-packed":
            return (lambda: p.run(rows, kn, vn)), [rows, kn, vn], [], p
        if name == "plan-prefill-padded":
            return (lambda: p.run(qp, kp, vp)), [qp, kp, vp], [], p
        return (lambda: p.run(qkv_step)), [qkv_step], [k, v], p
    calls = {
        "attention-padded": (lambda: attn.attention(qp, kp, vp, causal=True), [qp, kp, vp], []),
        "attention-packed": (lambda: attn.attention(rows, kn, vn, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True),
                             [rows, kn, vn], []),
        "attention_unfused-padded": (lambda: attn.attention_unfused(qp, kp, vp, causal=True), [qp, kp, vp], []),
        "decode-paged": (lambda: attn.decode(q, k, v, lens, block_table=table), [q, k, v], []),
        "decode-contiguous": (lambda: attn.decode(q, kc, vc, lens_ct), [q], []),
        "decode-split": (lambda: attn.decode(q, k, v, lens, block_table=table, num_splits=4), [q], []),
        "decode-beam": (lambda: attn.decode(q, k, v, lens, block_table=table, cache_indirection=ind),
                        [q, (ind, 4)], []),
        "context_attention": (lambda: attn.context_attention(rows, k, v, lens, cu_seqlens_q=cu, block_table=table),
                              [rows], []),
        "cross_attention": (lambda: attn.cross_attention(q, k, v, lens, block_table=table), [q], []),
        "cross_attention-packed": (lambda: attn.cross_attention(rows, k, v, lens, cu_seqlens_q=cu,
                                                                block_table=table), [rows], []),
        "append_kv": (lambda: attn.append_kv(k, v, kn, vn, short, cu_seqlens_new=cu, block_table=table),
                      [kn, vn], [k, v]),
        "preprocess": (lambda: attn.preprocess(qkv, k, v, short, num_heads_q=hq, num_heads_kv=hkv,
                                               cu_seqlens_new=cu, block_table=table, rotary_dim=d), [qkv], [k, v]),
        "gpt_attention": (lambda: attn.gpt_attention(qkv_step, step, k, v, **gpt), [qkv_step], [k, v]),
        "gpt_attention-unified": (lambda: attn.gpt_attention(qkv_step, step, k, v, mode="unified", **gpt),
                                  [qkv_step], [k, v]),
        "update_indirection": (lambda: attn.update_indirection(ind, parents, 3), [(ind, 4), (parents, 4)], []),
    }  # fmt: skip
    return (*calls[name], None)


@pytest.mark.gpu
@pytest.mark.parametrize("name", GRAPH_ENTRIES)
def test_gpu_entry_in_cuda_graph(name):
    """Each public entry with its default arguments (no validate=False, no hints) and each plan's ``run`` is
    captured in a CUDA graph; new inputs are written into the captured ones, and the replay equals the eager
    call, bit for bit, outputs and written caches alike. A host read inside capture would raise."""
    call, fresh, written, plan = _graph_calls(name)
    attn.check_errors()
    before = [w.clone() for w in written]

    def restore():
        for w, b in zip(written, before):
            w.copy_(b)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, makes the error word; a plan records, then replays
        for _ in range(2):
            restore()
            warm = [t.clone() for t in plan_mod._tensors(call())]
    torch.cuda.current_stream().wait_stream(side)
    if plan is not None:
        # replays, except gpt_attention's split schedule, which has index operations between its launches
        assert plan.replayable is (name != "plan-gpt-split"), (name, plan.refusal)
    restore()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = plan_mod._tensors(call())
    for item in fresh:
        t, high = item if isinstance(item, tuple) else (item, None)
        t.copy_(torch.randn_like(t) if high is None else torch.randint_like(t, high))
    restore()
    g.replay()
    torch.cuda.synchronize()
    got, got_written = [t.clone() for t in out], [w.clone() for w in written]
    restore()
    want = plan_mod._tensors(call())
    torch.cuda.synchronize()
    assert len(got) == len(want)
    for x, y in zip(got, want):
        assert torch.equal(x, y), name
    for x, y in zip(got_written, written):
        assert torch.equal(x, y), name
    # the replay read the new inputs (not a stale copy of the captured ones)
    changed = [not torch.equal(x, y) for x, y in zip(got, warm)] + [
        not torch.equal(x, y) for x, y in zip(got_written, before)]  # fmt: skip
    assert any(changed), name
    attn.check_errors()  # valid inputs: nothing recorded


def test_contiguous_cache_hands_out_plans(device):
    cache = attn.ContiguousKVCache(max_seqs=3, max_len=32, num_heads_kv=H_KV, head_dim=D, dtype=torch.float32,
                                   device=device)  # fmt: skip
    slots = [cache.add_sequence() for _ in range(3)]
    for s, n in zip(slots, [4, 20, 9]):
        k = torch.randn(1, n, H_KV, D, device=device)
        cache.append([s], k, torch.randn_like(k))
    q = torch.randn(3, 1, H_Q, D, device=device)
    every = cache.plan_decode(slots, num_heads_q=H_Q)  # all rows in order: the cache itself, no table
    assert every.block_table is None
    torch.testing.assert_close(every.run(q), attn.reference.decode(q, cache.k, cache.v, cache.seqlens),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    some = cache.plan_decode([2, 0], num_heads_q=H_Q)  # a subset: a one-column table of rows
    seqlens, table = cache.metadata([2, 0])
    want = attn.reference.decode(q[:2], cache.k, cache.v, seqlens, block_table=table)
    torch.testing.assert_close(some.run(q[:2]), want, atol=1e-5, rtol=1e-5)


def test_direct_replay_bookkeeping(monkeypatch):
    """The GPU replay path (the compiled kernel's launcher called with the recorded grid and constexpr tail) has
    no compiled kernels to call under the interpreter; here a stand-in launcher runs the interpreted kernel from
    exactly the arguments a replay hands it, so the substitution, the tail order and the alignment fallback are
    checked on the CPU too. The replay hands the launcher the substituted tensors as their addresses (Triton's
    launcher then skips a driver call per pointer); the stand-in maps them back to the tensors they belong to."""
    if torch.cuda.is_available():
        pytest.skip("the GPU runs the real path (test_decode_plan_equals_flat_call_and_replays)")
    import triton

    direct_runs = []
    by_address = {}
    addresses_given = []

    def fake_handle(kernel, grid, args, constexprs):
        kernel[grid](*args, **constexprs)
        jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        names = jit.arg_names[len(args) :]
        tensor_at = [isinstance(a, torch.Tensor) for a in args]

        class Launcher:
            function = packed_metadata = None

            def run(self, g0, g1, g2, stream, function, packed, a, b, c, *rest):
                direct_runs.append((g0, g1, g2))
                n = len(rest) - len(names)
                given = list(rest[:n])
                swapped = [i for i, was_tensor in enumerate(tensor_at) if was_tensor and isinstance(given[i], int)]
                for i in swapped:
                    given[i] = by_address[given[i]]  # an address the replay substituted
                addresses_given.append(len(swapped))
                opts = {k: constexprs[k] for k in ("num_warps", "num_stages") if k in constexprs}
                kernel[(g0, g1, g2)](*given, **dict(zip(names, rest[n:])), **opts)

        g = (*grid, 1, 1)[:3]
        return Launcher(), g, tuple(constexprs[n] for n in names), 0

    monkeypatch.setattr(plan_mod, "_direct_handle", fake_handle)
    monkeypatch.setattr(plan_mod._triton, "current_stream", lambda device: 0)
    cache, slots = _paged_cache("cpu", [5, 20, 9])
    p = cache.plan_decode(slots, num_heads_q=H_Q, num_splits=2)
    q = torch.randn(3, 1, H_Q, D)
    p.run(q)
    assert p.replayable and not direct_runs
    q2 = torch.randn_like(q)
    out = torch.empty_like(q)
    by_address.update({t.data_ptr(): t for t in (q2, cache.k, cache.v, out)})
    seqlens, table = cache.metadata(slots)
    want = attn.decode(q2, cache.k, cache.v, seqlens, block_table=table, validate=False, num_splits=2, **p.hints)
    assert p.run(q2, out=out) is out and torch.equal(out, want) and direct_runs == [(3 * H_KV, 2, 1)]
    assert addresses_given == [4]  # q, the two pools and the output, as addresses
    # a query 4 bytes off the 16-byte grid: the compiled kernel assumed alignment, so _triton.launch serves it
    buf = torch.randn(q.numel() + 1)
    q3 = buf[1:].view_as(q)
    assert q3.stride() == q.stride() and q3.data_ptr() % 16 != q.data_ptr() % 16
    want = attn.decode(q3, cache.k, cache.v, seqlens, block_table=table, validate=False, num_splits=2, **p.hints)
    assert torch.equal(p.run(q3), want) and len(direct_runs) == 1


def test_replay_reinitializes_zeroed_workspaces(monkeypatch):
    """A buffer the flat call creates zeroed or filled (a kernel may count into it) is filled again by every
    replay, as the flat call would; an output created so is filled on each run's new output."""
    # the stand-in kernel is not a Triton kernel: on a GPU machine, launch through kernel[grid] as Triton's path
    monkeypatch.setenv("ATTN_FAST_LAUNCH", "0")

    class P(plan_mod._Plan):
        def _flat(self, x):
            work = torch.full((4,), 2.0)
            sys.modules["attn.fast.decode"].launch(_AddKernel, (1,), x, work)  # as a launcher module does
            return work

    p = P()
    x = torch.randn(4)
    assert torch.equal(p._execute((x,), None), x + 2) and p.replayable
    y = torch.randn(4)
    # replayed: full(2.0) again on a new output, then the launch (which adds x into it)
    out = p._execute((y,), None)
    assert torch.equal(out, y + 2)
    assert [s[0] for s in p._replay.steps] == ["fill", "launch"]


@triton.jit
def _add_codes(x_ptr, out_ptr, N: tl.constexpr):
    """out += x (codes read as they are typed, widened to float32): the kernel for the dtype-view test."""
    i = tl.arange(0, N)
    tl.store(out_ptr + i, tl.load(out_ptr + i) + tl.load(x_ptr + i).to(tl.float32))


def test_replay_rebuilds_a_view_of_another_dtype(device):
    """A kernel that reads an input through a view of another dtype of the same element size (the Gluon decode
    reads an FP8 cache as int8 codes) is replayed on the new input viewed the same way; a view of another element
    size is refused (its sizes and strides would mean other bytes)."""

    def launch(*a, **kw):  # as a launcher module calls it (recording swaps the module's launch)
        return sys.modules["attn.fast.decode"].launch(*a, **kw)

    class Bytes(plan_mod._Plan):
        def _flat(self, x):
            out = torch.zeros(4, device=x.device)
            launch(_add_codes, (1,), x.view(torch.uint8)[1:5], out, N=4)
            return out

    class Halves(plan_mod._Plan):
        def _flat(self, x):
            out = torch.zeros(4, device=x.device)
            launch(_add_codes, (1,), x.view(torch.int16), out, N=4)
            return out

    p = Bytes()
    x = torch.tensor([-1, -2, -3, -4, 5, 6, 7, 8], dtype=torch.int8, device=device)
    assert p._execute((x,), None).tolist() == [254.0, 253.0, 252.0, 5.0]
    assert p.replayable, p.refusal
    y = torch.tensor([7, -8, 9, -10, 11, 12, 13, 14], dtype=torch.int8, device=device)
    assert p._execute((y,), None).tolist() == [248.0, 9.0, 246.0, 11.0]
    q = Halves()
    q._execute((x,), None)
    assert q.replayable is False and "element size" in q.refusal


class _AddKernelType:
    """Stands for a Triton kernel in `_triton.launch(kernel, grid, x, work)`: adds x into work."""

    def __getitem__(self, grid):
        return lambda x, work: work.add_(x)


_AddKernel = _AddKernelType()
