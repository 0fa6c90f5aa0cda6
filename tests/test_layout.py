"""The padded <-> packed converters, and the interpreter itself (a known-answer smoke test)."""

import pytest
import torch
import triton
import triton.language as tl

from attn.layout import cu_seqlens_from_lengths, pad, unpad


def test_unpad_pad_round_trip():
    lens = torch.tensor([3, 0, 5], dtype=torch.int32)
    x = torch.randn(3, 5, 2, 4)
    packed, cu, max_len = unpad(x, lens)
    assert packed.shape == (8, 2, 4) and cu.tolist() == [0, 3, 3, 8] and max_len == 5
    back = pad(packed, cu, 5)
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(back[b, :n], x[b, :n]) and (back[b, n:] == 0).all()


def test_layout_errors():
    with pytest.raises(ValueError, match="seqlens entries must be <="):
        unpad(torch.randn(2, 4, 3), torch.tensor([5, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen=2 is smaller"):
        pad(torch.randn(5, 3), torch.tensor([0, 4, 5], dtype=torch.int32), 2)
    with pytest.raises(TypeError, match="integer"):
        cu_seqlens_from_lengths(torch.tensor([1.0, 2.0]))


@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


def test_triton_runs_correctly_here(device):
    # some Triton/numpy pairings silently return garbage in the interpreter; catch that before anything else
    x, y = torch.randn(1000, device=device), torch.randn(1000, device=device)
    out = torch.full_like(x, float("nan"))
    _add_kernel[(triton.cdiv(1000, 128),)](x, y, out, 1000, BLOCK=128)
    assert torch.equal(out, x + y)


def test_device_token_positions_match_host_ones():
    from attn.layout import device_token_positions, new_token_positions

    counts = [3, 0, 5, 1, 0]
    cached = torch.tensor([4, 9, 0, 7, 2], dtype=torch.int32)
    bounds = [0]
    for n in counts:
        bounds.append(bounds[-1] + n)
    want = new_token_positions(bounds, cached)
    got = device_token_positions(torch.tensor(bounds, dtype=torch.int32), cached, bounds[-1])
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
