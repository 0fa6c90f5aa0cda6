"""How decode bandwidth moves with the number of splits (multi-block mode), on the long-cache shapes."""

import torch

import attn.fast as fast
from bench import common


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


for shape in ((1, 131072), (8, 32768)):
    probe(*shape)
