"""Bad input gets a clear error naming the argument, from the reference and the kernel alike."""

import functools

import pytest
import torch

import attn.fast as fast
import attn.reference as reference

IMPLS = {
    "reference": reference.attention,
    "reference-unfused": reference.attention_unfused,
    # value checks (lengths, cu_seqlens, max_seqlen hints) are the validated call's; test_no_sync covers the default
    "fast": functools.partial(fast.attention, validate=True),
    "fast-unfused": fast.attention_unfused,
}


def _qkv(b=2, s=8, hq=4, hkv=2, d=16, dtype=torch.float32):
    return (
        torch.randn(b, s, hq, d, dtype=dtype),
        torch.randn(b, s, hkv, d, dtype=dtype),
        torch.randn(b, s, hkv, d, dtype=dtype),
    )


def _packed(lens=(3, 5)):
    t = sum(lens)
    cu = torch.tensor([0, lens[0], t], dtype=torch.int32)
    return torch.randn(t, 4, 16), torch.randn(t, 2, 16), torch.randn(t, 2, 16), cu


CASES = {
    "q-not-tensor": (lambda: ([1.0], *_qkv()[1:]), {}, TypeError, "q must be a torch.Tensor"),
    "int-dtype": (lambda: (_qkv()[0].int(), *_qkv()[1:]), {}, TypeError, "q must have dtype"),
    "mixed-dtype": (lambda: (_qkv()[0].half(), *_qkv()[1:]), {}, TypeError, "share one dtype"),
    "rank": (lambda: (_qkv()[0][0], *_qkv()[1:]), {}, ValueError, "q must be 4-D"),
    "heads-divide": (lambda: _qkv(hq=4, hkv=3), {}, ValueError, "must divide q's head count"),
    "head-dim": (lambda: (_qkv()[0], _qkv(d=8)[1], _qkv(d=8)[2]), {}, ValueError, "k's head dim"),
    "kv-shape": (lambda: (*_qkv()[:2], _qkv(s=9)[2]), {}, ValueError, "k and v must have the same shape"),
    "batch": (lambda: (_qkv(b=3)[0], *_qkv()[1:]), {}, ValueError, "k's batch"),
    "window-type": (lambda: _qkv(), {"window_size": 3}, TypeError, "window_size"),
    "window-neg": (lambda: _qkv(), {"window_size": (-2, 0)}, ValueError, "window_size"),
    "window-causal": (lambda: _qkv(), {"window_size": (4, 2), "causal": True}, ValueError, "window_size"),
    "softcap-neg": (lambda: _qkv(), {"softcap": -1.0}, ValueError, "softcap"),
    "scale-zero": (lambda: _qkv(), {"softmax_scale": 0.0}, ValueError, "softmax_scale"),
    "qscaling-nan": (lambda: _qkv(), {"q_scaling": float("nan")}, ValueError, "q_scaling"),
    "seqlens-dtype": (lambda: _qkv(), {"seqlens_q": torch.tensor([1, 2])}, TypeError, "seqlens_q must be int32"),
    "seqlens-range": (
        lambda: _qkv(), {"seqlens_k": torch.tensor([1, 9], dtype=torch.int32)}, ValueError, "seqlens_k entries",
    ),
    "cu-alone": (lambda: _packed()[:3], {"cu_seqlens_q": _packed()[3]}, ValueError, "given together"),
    "cu-dtype": (
        lambda: _packed()[:3], {"cu_seqlens_q": _packed()[3].long(), "cu_seqlens_k": _packed()[3]},
        TypeError, "cu_seqlens_q must be int32",
    ),
    "cu-decreasing": (
        lambda: _packed()[:3],
        {"cu_seqlens_q": torch.tensor([0, 6, 8], dtype=torch.int32),
         "cu_seqlens_k": torch.tensor([0, 9, 8], dtype=torch.int32)},
        ValueError, "cu_seqlens_k must be non-decreasing",
    ),
    "cu-total": (
        lambda: _packed()[:3],
        {"cu_seqlens_q": torch.tensor([0, 3, 7], dtype=torch.int32), "cu_seqlens_k": _packed()[3]},
        ValueError, "cu_seqlens_q\\[-1\\] must equal",
    ),
    "cu-start": (
        lambda: _packed()[:3],
        {"cu_seqlens_q": torch.tensor([1, 3, 8], dtype=torch.int32), "cu_seqlens_k": _packed()[3]},
        ValueError, "cu_seqlens_q\\[0\\] must be 0",
    ),
    "max-seqlen-small": (
        lambda: _packed()[:3], {"cu_seqlens_q": _packed()[3], "cu_seqlens_k": _packed()[3], "max_seqlen_q": 4},
        ValueError, "max_seqlen_q=4 is smaller",
    ),
    "max-seqlen-padded": (lambda: _qkv(), {"max_seqlen_q": 8}, ValueError, "max_seqlen_q"),
}  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_rejected(case, impl):
    make, kwargs, exc, match = CASES[case]
    with pytest.raises(exc, match=match):
        IMPLS[impl](*make(), **kwargs)


def test_fast_rejects_what_only_the_reference_takes():
    q, k, v = _qkv(dtype=torch.float64)
    reference.attention(q, k, v)
    with pytest.raises(TypeError, match="q must have dtype"):
        fast.attention(q, k, v)
    q, k, v = _qkv(d=272)
    with pytest.raises(ValueError, match="head dim must be at most 256"):
        fast.attention(q, k, v)


def test_per_tensor_scale_copy_follows_in_place_writes():
    # the [Hkv] copy of a [1] scale is kept between calls (a copy kernel per call otherwise); it must never
    # outlive a change of the scale's value, or a kernel would dequantize with the old scale
    from attn.checks import check_kv_scales

    cache = torch.zeros(2, 4, 3, 8, dtype=torch.int8)
    k_scale, v_scale = torch.tensor([0.5]), torch.tensor([0.25], dtype=torch.float64)
    k1, v1 = check_kv_scales(cache, k_scale, v_scale, 3)
    k2, v2 = check_kv_scales(cache, k_scale, v_scale, 3)
    assert k2 is k1 and v2 is v1
    assert torch.equal(k1, torch.full((3,), 0.5)) and v1.dtype == torch.float32
    k_scale.mul_(3.0)
    k3, _ = check_kv_scales(cache, k_scale, v_scale, 3)
    assert torch.equal(k3, torch.full((3,), 1.5))
    # a new tensor at a recycled address is not mistaken for the old one
    del k_scale
    fresh = torch.tensor([0.125])
    assert torch.equal(check_kv_scales(cache, fresh, v_scale, 3)[0], torch.full((3,), 0.125))
    per_head = torch.tensor([0.1, 0.2, 0.3])
    assert check_kv_scales(cache, per_head, v_scale, 3)[0] is per_head


def test_padded_lengths_default_to_full_and_stay_full():
    # padded calls without lengths share one cached all-full tensor per shape: a caller's later in-place use
    # of a returned tensor is not expected, but every call must still see full lengths
    from attn.checks import check_attention

    q = torch.randn(3, 5, 4, 8)
    k = torch.randn(3, 7, 2, 8)
    a = check_attention(q, k, k, dtypes=(torch.float32,))
    b = check_attention(q, k, k, dtypes=(torch.float32,))
    assert a.seqlens_q.tolist() == [5, 5, 5] and a.seqlens_k.tolist() == [7, 7, 7]
    assert b.seqlens_q is a.seqlens_q
