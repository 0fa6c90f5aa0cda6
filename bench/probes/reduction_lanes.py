"""Do the lanes of a cross-lane sum agree? Compile the kernels whose reductions add products for sm_90a, on a
machine without a GPU, and look in their SASS for a multiply fused into the add of a shuffled value.

    TRITON_INTERPRET=0 PYTHONPATH=. python bench/probes/reduction_lanes.py    # prints JSON; exit 1 if any

Why. A ``tl.sum`` across lanes is a butterfly: each lane adds its value to its partner's (``SHFL.BFLY``). When the
summed value is a product, ptxas may fuse the lane's own multiply into that add (``FFMA a, b, shuffled``), while
the partner received the product rounded. Two lanes that should hold the same sum then differ by an ulp, and each
writes its copy to the same shared-memory slot: compute-sanitizer's racecheck reported 1,369 such WAW hazards in
decode's split merge on an H100 (session 18, `bench/results/sanitizer_racecheck_H100_2026-12-07_s18_call1.log`;
triton-lang/triton#7264), and which copy lands is up to the hardware. `attn.fast._triton.mul_rn` rounds those
products explicitly. This check finds the pattern without a GPU (see `fused_shuffles`);
`tests/test_reduction_lanes.py` runs it. Before the fix it named one FFMA in each split-merge kernel.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import gluon_sass  # noqa: E402
import prefill_sass  # noqa: E402
import torch  # noqa: E402
from decode_sass import compile_decode  # noqa: E402
from gluon_decode_sass import compile_case  # noqa: E402
from sass_tools import compile_for_target, sass_of  # noqa: E402

from attn.fast import unfused  # noqa: E402

INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*);")
OPERAND = re.compile(r"[-|!]*(U?R\w+?)(?:\.reuse)?\|?")


def fused_shuffles(sass: str) -> list[str]:
    """The FFMAs that add a shuffled product to the same product unrounded, in code order.

    The pattern: ``FMUL t, a, b`` (the lane's product, rounded, for its partner), ``SHFL.BFLY s, t`` (the
    partner's), then ``FFMA r, a, b, s``: the lane's own product fused into the add. A straight scan, with each
    register's last writer: the butterflies are branch-free. An FFMA that merely reads a shuffled value (a
    broadcast row maximum, say) is not this pattern: every lane reads the same bits there."""
    writer, found = {}, []  # register -> (opcode, source registers, a shuffle's source's writer)
    for m in INSTR.finditer(sass):
        op, text = m.group(1), m.group(2).strip()
        regs = [r.group(1) if (r := OPERAND.fullmatch(o.strip())) else None for o in text.split(",")]
        # SHFL's operands are (predicate out, destination, source, lane, clamp); the others write their first
        dst, srcs = (regs[1], regs[2:]) if op.startswith("SHFL") else (regs[0] if regs else None, regs[1:])
        if op.startswith("FFMA") and len(srcs) == 3:
            shuffle = writer.get(srcs[2])
            product = shuffle[2] if shuffle and shuffle[0].startswith("SHFL.BFLY") else None
            if product and product[0].startswith("FMUL") and sorted(product[1][:2]) == sorted(srcs[:2]):
                found.append(f"{op} {text}")
        if dst is not None:
            # (read before the write: a shuffle's source may be its destination)
            writer[dst] = (op, srcs, writer.get(srcs[0]) if op.startswith("SHFL") and srcs else None)
    return found


def kernels():
    """(name, compile()) of each kernel that sums products across lanes, in the specializations it runs with."""
    for quant in (0, 1, 2):
        for paged in (False, True):
            yield (f"decode split merge, cache {['bf16', 'int8', 'fp8'][quant]}, paged {paged}",
                   lambda q=quant, p=paged: compile_decode(q, p, 64, 4, 3, SPLIT_MERGE=True, MERGE_ROWS=4))  # fmt: skip
    yield "decode split merge, GQA 8, D 64", lambda: compile_decode(0, True, 64, 4, 3, SPLIT_MERGE=True, MERGE_ROWS=8,
                                                                    GROUP=8, HEAD_DIM=64, HEAD_DIM_PAD=64)  # fmt: skip
    scores, lse = torch.empty(4, 2048), torch.empty(4)
    yield (
        "unfused softmax",
        lambda: compile_for_target(unfused._softmax_kernel, (scores, lse, 2048), dict(BLOCK_N=1024)),
    )
    yield ("Gluon one-byte decode, split", lambda: compile_case(8, 4096, 32, 8, 128, torch.int8, torch.bfloat16, 64,
                                                                16, True))  # fmt: skip
    # no product is summed across lanes in the prefill kernels today; these keep it so
    prefill_module = importlib.import_module("attn.fast.attention")  # the module (attn.fast.attention is a function)
    yield "prefill (tl), plain", lambda: prefill_sass.compile_prefill(prefill_module, {}, (128, 128, 8, 3))
    for case in ("causal_d128", "full_d128_lse_pp"):
        yield f"Gluon prefill, {case}", lambda c=case: gluon_sass.compile_case(gluon_sass.cases()[c])


def main() -> int:
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in kernels():
            found[name] = fused_shuffles(sass_of(make(), tmp)[1])
    print(json.dumps(found, indent=1))
    return 1 if any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
