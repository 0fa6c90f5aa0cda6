"""Every lane of a cross-lane sum computes the same value, so the copies that lanes write to one shared-memory
slot agree (no race for compute-sanitizer's racecheck to report, and no copy-dependent result).

The kernels are compiled for sm_90a without a GPU (Triton's bundled ptxas), in a process of their own: this
one runs them in the interpreter. `bench/probes/reduction_lanes.py` says how the SASS is read; before
`attn.fast._triton.mul_rn` it named one fused FFMA in each of the seven split-merge kernels it compiles.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_multiply_is_fused_into_a_butterfly_add():
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run([sys.executable, "bench/probes/reduction_lanes.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.stdout.strip(), proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert len(found) >= 12 and not any(found.values()), found
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_check_sees_a_fused_shuffle():
    # the pattern as ptxas emitted it before the fix (decode's merge, bf16, paged): the lane's product goes to its
    # partner rounded (FMUL, SHFL.BFLY), and its own copy is fused into the add (FFMA). Not the pattern: an FFMA
    # that reads a shuffled value of another kind (here a broadcast maximum, the same bits in every lane).
    sys.path.insert(0, str(ROOT / "bench" / "probes"))
    from reduction_lanes import fused_shuffles

    listing = """
        /*7980*/                   FMUL R5, R14, R81.reuse ;
        /*79a0*/                   SHFL.IDX PT, R12, R12, R22, 0x1f ;
        /*79d0*/                   SHFL.BFLY PT, R5, R5, 0x4, 0x1f ;
        /*79e0*/                   FFMA R81, R14, R81, R5 ;
        /*79f0*/                   SHFL.BFLY PT, R4, R81, 0x2, 0x1f ;
        /*7a00*/                   FADD R4, R81, R4 ;
        /*7a10*/                   FMNMX R9, R3, R2, !PT ;
        /*7a20*/                   SHFL.BFLY PT, R6, R9, 0x1, 0x1f ;
        /*7a30*/                   FFMA R40, R56, UR9, -R6.reuse ;
    """
    assert fused_shuffles(listing) == ["FFMA R81, R14, R81, R5"]
    assert fused_shuffles(listing.replace("FMUL R5, R14", "FMUL R5, R13")) == []
