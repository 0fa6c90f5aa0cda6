"""Out-of-range index values in default (unvalidated) fast calls, for ``compute-sanitizer --tool memcheck``.

Every public entry is called with huge and negative lengths, block-table entries, beam indirection entries,
``cu_seqlens`` offsets and parents. The kernels must clamp or drop them (no access outside any tensor), give
finite results, and record each violation for `attn.check_errors`, which must raise after every call.

Run on a GPU (the caching allocator is turned off below, so each tensor is its own allocation and memcheck sees
an access one element outside it)::

    PYTHONPATH=. ATTN_AUTOTUNE=0 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python tests/gpu_memcheck.py

The exit status is 0 iff memcheck found nothing and every call behaved as above (this script exits 2 when a
call did not report its violation or gave a non-finite result).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")
os.environ.setdefault("ATTN_AUTOTUNE", "0")

import torch  # noqa: E402

import attn  # noqa: E402
import attn.fast as fast  # noqa: E402

HUGE = 2**31 - 1
NEG = -(2**31)


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dev = "cuda"
    torch.manual_seed(0)
    b, hq, hkv, d, page, per_seq = 4, 8, 2, 64, 16, 4
    pool = b * per_seq
    k = torch.randn(pool, page, hkv, d, device=dev, dtype=torch.float16)
    v = torch.randn_like(k)
    table = torch.randperm(pool, device=dev).view(b, per_seq).to(torch.int32)
    bad_table = table.clone()
    bad_table[0, 0], bad_table[1, 1], bad_table[2, 3], bad_table[3, 2] = HUGE, NEG, pool, -1
    lens = torch.tensor([5, 17, 64, 40], dtype=torch.int32, device=dev)
    bad_lens = torch.tensor([HUGE, NEG, 64, -1], dtype=torch.int32, device=dev)
    q = torch.randn(b, 1, hq, d, device=dev, dtype=torch.float16)
    contiguous_k, contiguous_v = k[:b].contiguous(), v[:b].contiguous()
    ind = torch.zeros(1, b, page * per_seq, dtype=torch.int32, device=dev)
    bad_ind = ind.clone()
    bad_ind[0, 0, 3], bad_ind[0, 1, 7], bad_ind[0, 2, 0] = HUGE, NEG, b
    cu = torch.tensor([0, 2, 5, 9, 12], dtype=torch.int32, device=dev)
    bad_cu = torch.tensor([0, HUGE, 5, NEG, 12], dtype=torch.int32, device=dev)
    rows = torch.randn(12, hq, d, device=dev, dtype=torch.float16)
    kv_rows = torch.randn(12, hkv, d, device=dev, dtype=torch.float16)
    qkv = torch.randn(12, (hq + 2 * hkv) * d, device=dev, dtype=torch.float16)
    qp = torch.randn(b, 8, hq, d, device=dev, dtype=torch.float16)
    kp = torch.randn(b, 9, hkv, d, device=dev, dtype=torch.float16)
    parents = torch.tensor([[0, HUGE, NEG, 1]], dtype=torch.int32, device=dev)

    heads = dict(num_heads_q=hq, num_heads_kv=hkv)
    calls = {
        "decode paged, bad lengths": lambda: fast.decode(q, k, v, bad_lens, block_table=table),
        "decode paged, bad table": lambda: fast.decode(q, k, v, lens, block_table=bad_table),
        "decode paged split, bad table": lambda: fast.decode(q, k, v, lens, block_table=bad_table, num_splits=4),
        "decode contiguous, bad lengths": lambda: fast.decode(q, contiguous_k, contiguous_v, bad_lens),
        "decode beam, bad indirection": lambda: fast.decode(q, k, v, lens, block_table=table,
                                                             cache_indirection=bad_ind),
        "decode beam, bad table": lambda: fast.decode(q, k, v, lens, block_table=bad_table, cache_indirection=ind),
        "decode cyclic, bad table": lambda: fast.decode(q, k, v, lens + 100, block_table=bad_table,
                                                         max_attention_window=32),
        "attention packed, bad cu_seqlens_k": lambda: fast.attention(rows, kv_rows, kv_rows, cu_seqlens_q=cu,
                                                                      cu_seqlens_k=bad_cu, causal=True),
        "attention packed, bad cu_seqlens_q": lambda: fast.attention(rows, kv_rows, kv_rows, cu_seqlens_q=bad_cu,
                                                                      cu_seqlens_k=cu),
        "attention padded, bad lengths": lambda: fast.attention(qp, kp, kp, seqlens_q=bad_lens, seqlens_k=bad_lens),
        "context, bad lengths": lambda: fast.context_attention(rows, k, v, bad_lens, cu_seqlens_q=cu,
                                                               block_table=table),
        "context, bad table": lambda: fast.context_attention(rows, k, v, lens.clamp(min=4), cu_seqlens_q=cu,
                                                             block_table=bad_table),
        "context, bad cu_seqlens_q": lambda: fast.context_attention(rows, k, v, lens, cu_seqlens_q=bad_cu,
                                                                    block_table=table, causal=False),
        "cross, bad lengths": lambda: fast.cross_attention(q, k, v, bad_lens, block_table=table),
        "append, bad lengths": lambda: fast.append_kv(k, v, kv_rows, kv_rows, bad_lens, cu_seqlens_new=cu,
                                                      block_table=table),
        "append, bad table": lambda: fast.append_kv(k, v, kv_rows, kv_rows, lens, cu_seqlens_new=cu,
                                                    block_table=bad_table),
        "append, bad cu": lambda: fast.append_kv(k, v, kv_rows, kv_rows, lens, cu_seqlens_new=bad_cu,
                                                 block_table=table),
        "preprocess, bad lengths": lambda: fast.preprocess(qkv, k, v, bad_lens, **heads, cu_seqlens_new=cu,
                                                           block_table=table, rotary_dim=d),
        "preprocess, bad table": lambda: fast.preprocess(qkv, k, v, lens, **heads, cu_seqlens_new=cu,
                                                         block_table=bad_table, rotary_dim=d),
        "update_indirection, bad parents": lambda: fast.update_indirection(ind, parents, 3,
                                                                           out=torch.empty_like(ind)),
    }  # fmt: skip
    failures = []
    for name, call in calls.items():
        out = call()
        torch.cuda.synchronize()
        # (malformed cu_seqlens leave packed rows that no sequence owns unwritten: their values are not defined)
        defined = "cu" not in name
        if (
            defined
            and isinstance(out, torch.Tensor)
            and out.dtype.is_floating_point
            and not bool(torch.isfinite(out).all())
        ):
            failures.append(f"{name}: non-finite output")
        try:
            attn.check_errors()
            failures.append(f"{name}: check_errors did not raise")
        except ValueError:
            pass
        print(f"ok  {name}", flush=True)
    for f in failures:
        print(f"FAIL {f}", flush=True)
    return 2 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
