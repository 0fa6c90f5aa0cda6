"""First contact of the Gluon prefill kernel with a GPU: every variant once, in a child process with a watchdog.

    PYTHONPATH=. python bench/probes/gluon_smoke.py [--stall 90]

A wrong barrier phase in a warp-specialized kernel does not fail, it hangs; in the pytest run that would eat the
whole GPU session. Here a child process runs the cases one after another and prints a line after each; if
none comes for ``--stall`` seconds (compilation included), the parent kills the child, reports the case as
HANG, and starts a new child at the next case. Each case compares against the float64 reference (relative
RMS error; bf16 is fine below ~1e-2) and checks that the output has no NaN.
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import threading
import time

# (name, B, Sq, Sk, Hq, Hkv, D, causal, window_left, softcap, lse, overlap, consumers, persistent, block_n
#  [, extra]): extra "nan" puts NaN in V rows hidden from earlier rows of their diagonal tile (the masked tiles'
#  slow path, whose consumer rendezvous would hang if the partitions disagreed), "seqlens" / "packed" the
#  per-sequence layouts (second sequence shorter), "alibi" ALiBi slopes [Hq]
CASES = [
    ("default causal D128", 2, 1000, 1000, 8, 2, 128, True, -1, 0.0, False, True, 2, True, 128),
    ("default full D128 lse", 2, 777, 901, 8, 2, 128, False, -1, 0.0, True, True, 2, True, 128),
    ("default causal D64", 2, 1000, 1000, 8, 8, 64, True, -1, 0.0, False, True, 2, True, 128),
    ("serial 2x4", 2, 1000, 1000, 8, 2, 128, True, -1, 0.0, False, False, 2, True, 128),
    ("overlap 1x8", 2, 1000, 1000, 8, 2, 128, True, -1, 0.0, False, True, 1, True, 128),
    ("serial 1x8", 2, 1000, 1000, 8, 2, 128, True, -1, 0.0, False, False, 1, True, 128),
    ("grid (not persistent)", 2, 1000, 1000, 8, 2, 128, True, -1, 0.0, False, True, 2, False, 128),
    ("window+softcap lse", 1, 700, 700, 4, 4, 128, True, 150, 20.0, True, True, 2, True, 128),
    ("Sq>Sk causal, D64", 1, 300, 100, 4, 1, 64, True, -1, 0.0, True, True, 2, True, 128),
    ("length 1", 1, 1, 1, 2, 2, 128, False, -1, 0.0, True, True, 2, True, 128),
    ("64-key tiles", 2, 1000, 1000, 8, 2, 128, True, -1, 0.0, False, True, 2, True, 64),
    ("64-key tiles D64 full lse", 2, 777, 901, 8, 8, 64, False, -1, 0.0, True, True, 2, True, 64),
    ("hidden NaN 2x4", 2, 1000, 1000, 8, 2, 128, True, -1, 0.0, True, True, 2, True, 128, "nan"),
    ("hidden NaN 1x8", 2, 1000, 1000, 8, 2, 128, True, -1, 0.0, True, True, 1, True, 128, "nan"),
    ("hidden NaN serial n64 window", 2, 1000, 1000, 8, 2, 128, True, 200, 0.0, True, False, 2, True, 64, "nan"),
    ("hidden NaN D64 full", 2, 777, 901, 8, 8, 64, False, -1, 0.0, True, True, 2, True, 128, "nan"),
    ("seqlens causal", 2, 1000, 1000, 8, 2, 128, True, -1, 0.0, True, True, 2, True, 128, "seqlens"),
    ("packed causal", 2, 1000, 1000, 8, 2, 128, True, -1, 0.0, True, True, 2, True, 128, "packed"),
    ("alibi causal", 2, 1000, 1000, 8, 2, 128, True, -1, 0.0, True, True, 2, True, 128, "alibi"),
]


def child(start: int) -> None:
    import torch

    import attn.reference as reference
    from attn.fast import gluon_attention as ga

    for i in range(start, len(CASES)):
        name, b, sq, sk, hq, hkv, d, causal, left, cap, want_lse, overlap, consumers, persistent, block_n, *extra = (
            CASES[i])  # fmt: skip
        extra = extra[0] if extra else ""
        print(f"START {i} {name}", flush=True)
        torch.manual_seed(i)
        q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
        kw, rkw = {}, {}
        if extra == "nan":
            v[0, sk - sq + 150, 0, 3] = float("nan")  # the diagonal tile of rows 128-255: hidden from rows < 150
            v[1, sk - 1, 1, 0] = float("nan")  # the last key: hidden from all but the last row (causal)
        elif extra == "seqlens":
            lq = torch.tensor([sq, sq // 3], dtype=torch.int32, device="cuda")
            lk = torch.tensor([sk, sk // 2], dtype=torch.int32, device="cuda")
            kw = rkw = {"seqlens_q": lq, "seqlens_k": lk}
        elif extra == "packed":
            cu_q = torch.tensor([0, sq, sq + sq // 3], dtype=torch.int32, device="cuda")
            cu_k = torch.tensor([0, sk, sk + sk // 2], dtype=torch.int32, device="cuda")
            q, k, v = q.flatten(0, 1)[: sq + sq // 3], k.flatten(0, 1)[: sk + sk // 2], v.flatten(0, 1)[: sk + sk // 2]
            rkw = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
            kw = dict(rkw, max_seqlen_q=sq, max_seqlen_k=sk)
        elif extra == "alibi":
            slopes = torch.exp2(-8.0 * torch.arange(1, hq + 1, device="cuda") / hq)
            kw = rkw = {"alibi_slopes": slopes}
        t0 = time.perf_counter()
        res = ga.attention_gluon(q, k, v, scale=d**-0.5, window_left=left, window_right=0 if causal else -1,
                                 softcap=cap, return_lse=want_lse, overlap=overlap, consumers=consumers,
                                 persistent=persistent, block_n=block_n, **kw)  # fmt: skip
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out = res[0] if want_lse else res
        ref = reference.attention(q.double(), k.double(), v.double(), causal=causal, window_size=(left, -1),
                                  softcap=cap, **rkw)  # fmt: skip
        if extra == "nan":
            # NaN exactly where the reference has it, the rest close
            same = torch.equal(torch.isnan(out), torch.isnan(ref))
            fin = ~torch.isnan(ref)
            err = ((out.double()[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30)).item()
            nan = 0 if same else int((torch.isnan(out) != torch.isnan(ref)).sum())
        else:
            err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            nan = int(torch.isnan(out).sum())
        verdict = "OK" if err < 1e-2 and nan == 0 else "WRONG"
        print(f"DONE {i} {verdict} {name}: rel err {err:.2e}, NaN {nan}, first call {dt:.1f} s", flush=True)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stall", type=float, default=90.0, help="seconds without progress before a case is a HANG")
    p.add_argument("--child", type=int, default=-1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child >= 0:
        child(a.child)
        return 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start, bad = 0, 0
    while start < len(CASES):
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(start)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        current, last = start, time.monotonic()
        while True:
            try:
                line = lines.get(timeout=0.5).rstrip("\n")
            except queue.Empty:
                if proc.poll() is not None:
                    # the child is gone and has said everything (the reader ends with its stdout)
                    if proc.returncode == 0:
                        start = len(CASES)
                    else:
                        print(f"ERROR {current} {CASES[current][0]}: child exited with {proc.returncode}")
                        bad += 1
                        start = current + 1
                    break
                if time.monotonic() - last > a.stall:
                    proc.kill()
                    proc.wait()
                    print(f"HANG {current} {CASES[current][0]}: no output for {a.stall:.0f} s, killed", flush=True)
                    bad += 1
                    start = current + 1
                    break
                continue
            last = time.monotonic()
            print(line, flush=True)
            if line.startswith("START "):
                current = int(line.split()[1])
            elif line.startswith("DONE ") and " WRONG " in line:
                bad += 1
    print(f"smoke: {len(CASES)} cases, {bad} failed or hung")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
