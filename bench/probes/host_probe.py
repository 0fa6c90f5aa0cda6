"""Probe: where the host time of one `attn.fast.decode` call, and of one `gpt_attention` step, goes.

    PYTHONPATH=. python bench/probes/host_probe.py          # on the GPU machine
    PYTHONPATH=. python bench/probes/host_probe.py --cpu    # the Python side alone, on a machine without a GPU

Prints microseconds per call for the whole decode call and for its parts: the checks, the output
allocations, the autotuned launch, a launch of the plain kernel with a fixed config, and the split decode (its
merge runs in the same kernel: one launch). Then the issue-4 case, B1 H32/8 L131072 bf16: host time per call,
event-timed (do_bench, no CUDA graph) and graph-timed kernel time and bandwidth. Then profiles the
issue-7 mixed-batch step (`gpt_attention(validate=False)`, 4 prompts of 2048 + 60 generation requests on
4096 tokens, paged) with cProfile, no device sync between calls, and prints the functions that hold the
most host time.

With ``--cpu`` (Triton's interpreter, so the device check passes, and the launch stubbed out), it times the
decode wrapper at B1 H32/8 D128 with the serving loop's arguments, `check_decode` and `arg_key` on the
decode kernel's arguments: the parts of the host cost that are plain Python, which a CPU times in proportion
(the H200 machines' hosts ran them 1.5-2.5x slower than a developer's CPU).
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys

import torch

import attn.fast as fast
from attn.checks import check_decode
from bench import common

# the package exports the function `decode`, which hides the module of the same name
dec = sys.modules["attn.fast.decode"]
common_autotune = dec.autotune_enabled


def main() -> None:
    b, hq, hkv, d, n = 64, 32, 8, 128, 4096
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b, n, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.full((b,), n, device="cuda", dtype=torch.int32)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    rows = {
        "decode, validate=False (1 launch)": lambda: fast.decode(q, kc, vc, lens, validate=False),
        "decode, validate=True": lambda: fast.decode(q, kc, vc, lens),
        "decode, 4 splits forced (1 launch)": lambda: fast.decode(q, kc, vc, lens, validate=False, num_splits=4),
        "decode, 8 splits forced (1 launch)": lambda: fast.decode(q, kc, vc, lens, validate=False, num_splits=8),
        "check_decode(validate=False)": lambda: check_decode(q, kc, vc, lens, validate=False, dtypes=dtypes),
        "4 x torch.empty": lambda: [torch.empty(b, 1, hq, 4, d, device="cuda") for _ in range(4)],
    }
    # each row with Triton's own launch path and with attn's direct one (attn.fast._triton.launch)
    for fast_launch in ("0", "1"):
        os.environ["ATTN_FAST_LAUNCH"] = fast_launch
        print(f"ATTN_FAST_LAUNCH={fast_launch}")
        for name, fn in rows.items():
            print(f"{common.host_us(fn):8.1f} us  {name}", flush=True)
        # the same launch without the autotuner in front
        dec.autotune_enabled = lambda: False
        print(f"{common.host_us(lambda: fast.decode(q, kc, vc, lens, validate=False)):8.1f} us  decode, fixed config")
        dec.autotune_enabled = common_autotune
    launch_parts(lambda: fast.decode(q, kc, vc, lens, validate=False))
    launch_parts(lambda: fast.decode(q, kc, vc, lens, validate=False, num_splits=8), "8 splits")
    long_cache()
    for fast_launch in ("0", "1"):
        os.environ["ATTN_FAST_LAUNCH"] = fast_launch
        print(f"ATTN_FAST_LAUNCH={fast_launch}")
        profile_step()


def launch_parts(call, label: str = "1 split") -> None:
    """The direct launch path's parts for one decode call: the Python wrapper alone (launch stubbed out),
    the key, the stream query, and the compiled kernel's C launcher."""
    from attn.fast import _triton as tr

    os.environ["ATTN_FAST_LAUNCH"] = "1"
    seen = {}
    real = dec.launch

    def record(kernel, grid, *args, **constexprs):
        seen.update(kernel=kernel, grid=grid, operands=dict(constexprs))
        if not args:  # operands by keyword: launch's positional form
            args, constexprs = tr.bind(kernel, constexprs)
        seen.update(args=args, constexprs=constexprs)
        seen["compiled"] = real(kernel, grid, *args, **constexprs)
        return seen["compiled"]

    dec.launch = record
    call()
    dec.launch = lambda *a, **k: None
    print(f"{common.host_us(call):8.1f} us  decode wrapper, launch stubbed out ({label})")
    dec.launch = real
    args, constexprs = seen["args"], seen["constexprs"]
    operands = seen["operands"]
    print(f"{common.host_us(lambda: tr.bind(seen['kernel'], dict(operands))):8.1f} us  bind ({len(operands)} keywords)")
    print(f"{common.host_us(lambda: tr.arg_key(args)):8.1f} us  arg_key ({len(args)} arguments)")
    print(f"{common.host_us(lambda: torch.cuda.current_stream().cuda_stream):8.1f} us  current stream (Stream object)")
    print(f"{common.host_us(lambda: tr.current_stream(0)):8.1f} us  current stream (raw handle, as launch asks)")
    print(f"{common.host_us(lambda: tr.launch(seen['kernel'], seen['grid'], *args, **constexprs)):8.1f} us  launch()")
    print(f"{common.host_us(lambda: tr.launch(seen['kernel'], seen['grid'], **operands)):8.1f} us  launch() by keyword")
    # the entry of this very specialization (split and unsplit calls compile different kernels)
    entry = next(v for v in tr._LAUNCHES.values() if v and v[0] is seen["compiled"])
    compiled, tail, _ = entry
    stream = torch.cuda.current_stream().cuda_stream
    g = seen["grid"]

    def raw():
        compiled.run(g[0], g[1], 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args,
                     *tail)  # fmt: skip

    print(f"{common.host_us(raw):8.1f} us  compiled.run alone (the C launcher)")


def long_cache() -> None:
    """Issue 4's case: one sequence of 131072 tokens, H32/8, D128, bf16, as a serving loop calls it (no checks,
    the lengths as hints). Event timing pays the host's launch cost whenever it exceeds the kernel's time."""
    os.environ["ATTN_FAST_LAUNCH"] = "1"
    hq, hkv, d, n = 32, 8, 128, 131072
    q = torch.randn(1, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.full((1,), n, device="cuda", dtype=torch.int32)
    nbytes = 2 * kc.numel() * kc.element_size()
    for splits in (None, 8):
        call = lambda s=splits: fast.decode(q, kc, vc, lens, validate=False, max_seqlen_k=n, total_seqlen_k=n,
                                            num_splits=s)  # fmt: skip
        host = common.host_us(call)
        event = common.bench_ms(call)
        graph = common.graph_ms(call)
        print(
            f"{host:8.1f} us  B1 L{n} decode host, splits={splits}; event-timed {event * 1e3:.1f} us "
            f"({common.tbps(nbytes, event):.2f} TB/s), graph-timed {graph * 1e3:.1f} us "
            f"({common.tbps(nbytes, graph):.2f} TB/s)",
            flush=True,
        )


def profile_step() -> None:
    from attn.inflight import CONTEXT, GENERATION, InflightBatch

    hq, hkv, d, bs = 32, 8, 128, 64
    types = [CONTEXT] * 4 + [GENERATION] * 60
    new, past = [2048] * 4 + [1] * 60, [0] * 4 + [4095] * 60
    need = [-(-(x + n) // bs) for x, n in zip(past, new)]
    table = torch.zeros(len(types), max(need), dtype=torch.int32)
    perm, used = torch.randperm(sum(need)), 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used : used + n]
        used += n
    k_cache = torch.randn(sum(need), bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    batch = InflightBatch.build(types, new, past, block_table=table.to("cuda"))
    qkv = torch.randn(batch.num_tokens, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    for mode in ("unified", "split"):
        step = lambda mode=mode: fast.gpt_attention(qkv, batch, k_cache, v_cache, num_heads_q=hq, num_heads_kv=hkv,
                                                    rotary_dim=d, mode=mode, validate=False)  # fmt: skip
        print(f"{common.host_us(step, calls=30):8.1f} us  gpt_attention step, mode={mode}", flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(30):
            step()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def cpu_wrapper() -> None:
    import time

    from attn.fast import _triton as tr

    def us(fn, calls=5000, reps=7):
        fn()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        return best

    b, hq, hkv, d = 1, 32, 8, 128
    # a small cache: the wrapper reads shapes, never data; the hints stand for a 131072-token sequence
    q = torch.randn(b, 1, hq, d, dtype=torch.bfloat16)
    kc = torch.randn(b, 64, hkv, d, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.full((b,), 64, dtype=torch.int32)
    seen = {}
    dec.launch = lambda kernel, grid, *args, **kw: seen.update(kernel=kernel, operands=kw)
    n = 131072
    rows = {
        "decode wrapper, validate=False, hints (split chosen)": lambda: fast.decode(
            q, kc, vc, lens, validate=False, max_seqlen_k=n, total_seqlen_k=n
        ),
        "decode wrapper, validate=False, 8 splits": lambda: fast.decode(q, kc, vc, lens, validate=False, num_splits=8),
        "decode wrapper, validate=False, 1 split": lambda: fast.decode(q, kc, vc, lens, validate=False, num_splits=1),
        "check_decode(validate=False)": lambda: check_decode(
            q, kc, vc, lens, validate=False, dtypes=(torch.float16, torch.bfloat16, torch.float32)
        ),
    }
    for name, fn in rows.items():
        print(f"{us(fn):8.2f} us  {name}", flush=True)
    fast.decode(q, kc, vc, lens, validate=False, num_splits=8)
    kernel, operands = seen["kernel"], seen["operands"]
    args = tr.bind(kernel, dict(operands))[0]
    print(f"{us(lambda: tr.bind(kernel, dict(operands)), calls=20000):8.2f} us  bind ({len(operands)} keywords)")
    print(f"{us(lambda: tr.arg_key(args), calls=20000):8.2f} us  arg_key ({len(args)} arguments)")


if __name__ == "__main__":
    if "--cpu" in sys.argv:
        cpu_wrapper()
    else:
        main()
