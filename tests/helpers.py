"""Comparison and input helpers shared by the parity tests."""

from __future__ import annotations

import pytest
import torch

from attn.layout import cu_seqlens_from_lengths


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Relative RMS error ``‖out − ref‖ / ‖ref‖`` in float64 (``‖out‖`` when ``ref`` is all zeros)."""
    ref, out = ref.double(), out.double()
    denom = ref.norm().item() or out.norm().item() or 1.0
    return (out - ref).norm().item() / denom


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    """Fails on any NaN in ``out`` and on a relative RMS error above ``tol``; prints the error either way."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    nan = torch.isnan(out)
    assert not nan.any(), f"{name}: {int(nan.sum())} NaN entries (unwritten or invalid output)"
    err = rel_err(ref, out)
    print(f"{name}: rel err {err:.3e} (tol {tol:.1e})")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def assert_lse_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    """LSE rows that see no key must be exactly -inf in both; the others agree to ``tol·max(1, |lse|)``."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in lse"
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(out), empty), f"{name}: -inf pattern differs from the reference"
    diff = (out.double() - ref.double())[~empty].abs()
    bound = tol * ref.double()[~empty].abs().clamp_min(1.0)
    worst = (diff / bound).max().item() if diff.numel() else 0.0
    assert worst <= 1.0, f"{name}: lse error {worst:.2f}x over its tolerance {tol:.1e}"


# the Gluon kernels (prefill, FP8 prefill, one-byte decode) compile for sm_90 only and do not run in Triton's
# interpreter: their tests run on an H100/H200 and are skipped elsewhere
ON_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
sm90 = pytest.mark.skipif(not ON_SM90, reason="the Gluon kernels are for sm_90 (H100/H200)")

# Why these tolerances (relative RMS error against a float64 reference):
# - float32 inputs: products run in IEEE fp32 with fp32 accumulation, so the error is a few fp32 ulps
#   amplified by the reduction length; 2e-5 leaves a wide margin over the ~1e-6 observed.
# - float16 / bfloat16 inputs: the kernel rounds P to the input dtype before P·V and rounds the output, each a
#   relative error of at most eps/2 per element; 2·eps bounds their sum with margin (eps = 2^-10 and 2^-7).
TOL = {torch.float32: 2e-5, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}
# the lse is computed entirely in fp32 from exactly-represented inputs: rounding of the scores only
LSE_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def random_packed(lens_q, lens_k, hq, hkv, d, dtype, device):
    """Packed q, k, v with the given per-sequence lengths, plus their ``cu_seqlens``."""
    lens_q = torch.tensor(lens_q, dtype=torch.int32, device=device)
    lens_k = torch.tensor(lens_k, dtype=torch.int32, device=device)
    q = torch.randn(int(lens_q.sum()), hq, d, dtype=dtype, device=device)
    k = torch.randn(int(lens_k.sum()), hkv, d, dtype=dtype, device=device)
    v = torch.randn(int(lens_k.sum()), hkv, d, dtype=dtype, device=device)
    return q, k, v, cu_seqlens_from_lengths(lens_q), cu_seqlens_from_lengths(lens_k)


def shape_id(b, sq, sk, hq, hkv, d) -> str:
    return f"B{b}-Sq{sq}-Sk{sk}-Hq{hq}-Hkv{hkv}-D{d}"


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_paged(k_cache, v_cache, lens, block_size, extra_blocks=3):
    """The same cache as a shuffled block pool: equal contents, scattered blocks (and unused pool blocks)."""
    b, max_len, hkv, d = k_cache.shape
    blocks_per_seq = -(-max_len // block_size)
    num_blocks = b * blocks_per_seq + extra_blocks
    perm = torch.randperm(num_blocks, device=k_cache.device)[: b * blocks_per_seq]
    block_table = perm.view(b, blocks_per_seq).to(torch.int32)
    k_pool = torch.randn(num_blocks, block_size, hkv, d, dtype=k_cache.dtype, device=k_cache.device)
    v_pool = torch.randn_like(k_pool)
    for i in range(b):
        for t in range(int(lens[i])):
            blk, slot = int(block_table[i, t // block_size]), t % block_size
            k_pool[blk, slot] = k_cache[i, t]
            v_pool[blk, slot] = v_cache[i, t]
    return k_pool, v_pool, block_table


def to_paged_fast(k_cache, v_cache, block_size):
    """Vectorized ``to_paged`` for long caches: whole blocks moved to shuffled pool positions."""
    b, max_len, hkv, d = k_cache.shape
    n = -(-max_len // block_size)
    pad = n * block_size - max_len
    kc = torch.nn.functional.pad(k_cache, (0, 0, 0, 0, 0, pad)).view(b * n, block_size, hkv, d)
    vc = torch.nn.functional.pad(v_cache, (0, 0, 0, 0, 0, pad)).view(b * n, block_size, hkv, d)
    perm = torch.randperm(b * n, device=k_cache.device)
    k_pool, v_pool = torch.empty_like(kc), torch.empty_like(vc)
    k_pool[perm], v_pool[perm] = kc, vc
    return k_pool, v_pool, perm.view(b, n).to(torch.int32)
