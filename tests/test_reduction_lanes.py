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
    assert len(found) >= 9 and not any(found.values()), found
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_check_sees_a_fused_shuffle():
    # the pattern as ptxas emitted it before the fix (decode's merge, bf16 paged): the partner's product arrives
    # rounded through the shuffle, the lane's own is fused into the add
    sys.path.insert(0, str(ROOT / "bench" / "probes"))
    from reduction_lanes import fused_shuffles

    listing = """
        /*0a10*/                   FMUL R14, R15, R81 ;
        /*0a20*/                   SHFL.BFLY PT, R5, R14, 0x1, 0x1f ;
        /*0a30*/                   FFMA R81, R15, R81, R5 ;
        /*0a40*/                   SHFL.BFLY PT, R6, R81, 0x2, 0x1f ;
        /*0a50*/                   FADD R7, R81, R6 ;
        /*0a60*/                   MOV R5, R7 ;
        /*0a70*/                   FFMA R8, R2, R3, R5 ;
    """
    assert fused_shuffles(listing) == ["FFMA R81, R15, R81, R5"]
