"""attn.ops: the custom operators (opcheck on each), the wrappers' signatures, and the forward-only error.

opcheck runs each operator's schema, fake (meta) and dispatch checks on tiny shapes through the interpreter.
Its ``test_aot_dispatch_dynamic`` utility traces the operator with AOTAutograd and, for inputs that require
grad, runs a backward: our operators are forward-only (their autograd rule raises), so that utility runs only
on inputs that do not require grad; the raise itself is tested below.
"""

import inspect

import pytest
import torch

import attn
from attn import ops

# schema, fake tensor, autograd registration, and AOT dispatch (forward) checks
UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _paged(device, b=2, lengths=(5, 19), hkv=2, d=16, block=8, blocks=12, dtype=torch.float32):
    k = torch.randn(blocks, block, hkv, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    perm = torch.randperm(blocks)[: b * 3].view(b, 3).to(torch.int32).to(device)
    return k, v, torch.tensor(lengths, dtype=torch.int32, device=device), perm


@pytest.mark.parametrize("name", sorted(ops.OP_CALLS))
def test_op_calls_mirror_the_fast_signatures(name):
    fast_fn, call = ops.OP_CALLS[name]
    a, b = inspect.signature(fast_fn).parameters, inspect.signature(call).parameters
    assert list(a) == list(b)
    assert [(p.kind, p.default) for p in a.values()] == [(p.kind, p.default) for p in b.values()]
    # the public function keeps the fast function's signature and docstring
    public = getattr(attn, name)
    assert inspect.signature(public) == inspect.signature(fast_fn) and public.__doc__ == fast_fn.__doc__


def test_rope_scaling_round_trips():
    for rs in (None, attn.RopeScaling("linear", factor=2.0),
               attn.RopeScaling("llama3", factor=8.0, original_max_position=64, low_freq_factor=1.0,
                                high_freq_factor=4.0),
               attn.RopeScaling("yarn", factor=4.0, original_max_position=32, truncate=False)):  # fmt: skip
        assert ops._rope_unflat(*ops._rope_flat(rs)) == rs


def test_opcheck_decode(device):
    k, v, lens, table = _paged(device)
    q = torch.randn(2, 1, 4, 16, device=device)
    rel = attn.RelativeBias(table=torch.randn(4, 8, device=device), max_distance=16, bidirectional=False)
    for extra in ({}, {"rel_bias": rel, "return_lse": True}):
        fast = ops._decode_call(q, k, v, lens, block_table=table, **extra)
        ref = attn.reference.decode(q, k, v, lens, block_table=table, **extra)
        as_tuple = lambda r: (r,) if isinstance(r, torch.Tensor) else r
        for x, y in zip(as_tuple(fast), as_tuple(ref), strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
        args = (q, k, v, lens, table, False, None, 1.0, -1, -1, 0.0, None, "alibi", *ops._rel_flat(extra.get(
            "rel_bias")), None, None, None, 0, 0, 10000.0, "neox", None, [], None, bool(extra), None, None, None,
            True)  # fmt: skip
        torch.library.opcheck(torch.ops.attn.decode.default, args, test_utils=UTILS)


def test_opcheck_attention_and_context(device):
    q = torch.randn(9, 4, 16, device=device)
    k, v = torch.randn(9, 2, 16, device=device), torch.randn(9, 2, 16, device=device)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    args = (q, k, v, cu, cu, 5, 5, None, None, True, None, 1.0, -1, -1, 0.0, None, "alibi", None, None, 128, True,
            True, None)  # fmt: skip
    torch.library.opcheck(torch.ops.attn.attention.default, args, test_utils=UTILS)
    out, lse = torch.ops.attn.attention(*args)
    ref, ref_lse = attn.reference.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)

    kc, vc, lens, table = _paged(device)
    qc = torch.randn(7, 4, 16, device=device)
    cuq = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    args = (qc, kc, vc, lens, cuq, 4, table, True, None, 1.0, -1, -1, 0.0, None, "alibi", None, None, 128, True,
            None, None, None, 0, None, None, 0, 10000.0, "neox", None, [], False, True)  # fmt: skip
    torch.library.opcheck(torch.ops.attn.context_attention.default, args, test_utils=UTILS)


def test_opcheck_cache_writers(device):
    k, v, lens, table = _paged(device)
    k_new, v_new = torch.randn(2, 3, 2, 16, device=device), torch.randn(2, 3, 2, 16, device=device)
    args = (k, v, k_new, v_new, lens, None, table, None, None, None, 0, None)
    # opcheck runs the operator several times on clones of the caches, each time writing the same rows
    torch.library.opcheck(torch.ops.attn.append_kv.default, args, test_utils=UTILS)
    k2, v2 = k.clone(), v.clone()
    torch.ops.attn.append_kv(*args)
    attn.reference.append_kv(k2, v2, k_new, v_new, lens, block_table=table)
    assert torch.equal(k, k2) and torch.equal(v, v2)

    qkv = torch.randn(2, 3, (4 + 2 * 2) * 16, device=device)
    args = (qkv, k, v, lens, 4, 2, None, table, None, 16, 10000.0, "neox", "linear", ops._rope_flat(
        attn.RopeScaling("linear", factor=2.0))[1], None, None, None, 0, True)  # fmt: skip
    torch.library.opcheck(torch.ops.attn.preprocess.default, args, test_utils=UTILS)

    batch = attn.InflightBatch.build([0, 1], [3, 1], [0, 6], block_table=table)
    qkv = torch.randn(4, (4 + 2 * 2) * 16, device=device)
    flat = [list(batch.request_types), list(batch.new_tokens), list(batch.past_lengths),
            *(getattr(batch, n) for n in ops._BATCH_TENSORS)]  # fmt: skip
    args = (qkv, k, v, *flat, 4, 2, None, 0, 10000.0, "neox", None, [], None, 1.0, -1, -1, 0.0, None, "alibi", None,
            None, 128, True, None, None, None, True)  # fmt: skip
    torch.library.opcheck(torch.ops.attn.gpt_attention.default, args, test_utils=UTILS)


def test_backward_raises_forward_only(device):
    k, v, lens, table = _paged(device)
    q = torch.randn(2, 1, 4, 16, device=device, requires_grad=True)
    out = attn.decode(q, k, v, lens, block_table=table)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="forward-only"):
        out.sum().backward()
    with torch.no_grad():  # inference: the direct call, nothing recorded
        assert not attn.decode(q, k, v, lens, block_table=table).requires_grad
