"""How decode bandwidth moves with the number of splits (multi-block mode), on the long-cache shapes.

    PYTHONPATH=. python bench/probes/split_probe.py            # bf16 caches, event-timed (as the heuristic was set)
    PYTHONPATH=. python bench/probes/split_probe.py --one-byte # INT8 and FP8 caches, contiguous and 64-token pages
    PYTHONPATH=. python bench/probes/split_probe.py --one-byte --shapes 1:131072,2:65536,4:32768,1:32768

The split heuristic (`attn.fast.choose_num_splits`) was set on bf16 caches. A one-byte cache holds half the
bytes per key, so each part of the same length carries half the work against the same fixed costs (partial
writes, the arrival counter, the merge), while its loop is bound by latency more than a bf16 one's
(bench/NOTES.md): whether it wants fewer or more parts is measured here, from CUDA-graph replays as
bench_features times one-byte caches.
"""

import argparse
import functools

import torch

import attn.fast as fast
from attn import calibrate_kv_scales
from bench import common
from bench.bench_decode import to_paged


def probe(b, length):
    q = torch.randn(b, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b, length, 8, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.full((b,), length, dtype=torch.int32, device="cuda")
    nbytes = 2 * b * length * 8 * 128 * 2
    auto = fast.choose_num_splits(b, 8, length, 132)
    for n in (auto, 16, 33, 66, 132, 264):
        ms = common.bench_ms(lambda n=n: fast.decode(q, kc, vc, lens, num_splits=n, validate=False))
        print(f"B{b} L{length} splits {n:4d}{' (auto)' if n == auto else ''}: {common.tbps(nbytes, ms):.2f} TB/s")


def probe_one_byte(b, length):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b, length, 8, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.full((b,), length, dtype=torch.int32, device="cuda")
    auto = fast.choose_num_splits(b, 8, length, 132)
    hints = {"max_seqlen_k": length, "total_seqlen_k": b * length}
    for name, dt in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        ks, vs = calibrate_kv_scales(kc, vc, dt, "head")
        kq, vq = (torch.empty(kc.shape, dtype=dt, device="cuda") for _ in range(2))
        fast.append_kv(kq, vq, kc, vc, torch.zeros_like(lens), k_scale=ks, v_scale=vs)
        nbytes = 2 * b * length * 8 * 128
        for layout in ("contiguous", "paged64"):
            if layout == "contiguous":
                k_, v_, table = kq, vq, None
            else:
                k_, v_, table = to_paged(kq, vq, 64, gen)
            for n in sorted({max(auto // 2, 1), auto, auto * 2}):
                fn = functools.partial(fast.decode, q, k_, v_, lens, block_table=table, num_splits=n, k_scale=ks,
                                       v_scale=vs, validate=False, **hints)  # fmt: skip
                ms = common.graph_ms(fn, calls_per_graph=10)
                tag = " (auto)" if n == auto else ""
                print(f"B{b} L{length} {name} {layout} splits {n:4d}{tag}: {ms * 1e3:.1f} us "
                      f"{common.tbps(nbytes, ms):.2f} TB/s", flush=True)  # fmt: skip
            del k_, v_
        del kq, vq
        common.free_memory()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--one-byte", action="store_true")
    p.add_argument("--shapes", default="1:131072,8:32768", help="batch:length pairs, comma-separated")
    args = p.parse_args()
    for shape in args.shapes.split(","):
        b, length = (int(x) for x in shape.split(":"))
        (probe_one_byte if args.one_byte else probe)(b, length)
