"""Compile the kernels that real calls launch, for sm_90a on a machine without a GPU, and write their SASS.

    TRITON_INTERPRET=0 PYTHONPATH=. python bench/probes/launch_sass.py DIR [CASE ...]

Each case calls a public function on small CPU tensors with its module's `launch` replaced by a recorder (and
the device check passed as under the interpreter), so the launch carries exactly the arguments a GPU call
would pass; the recorded kernel is then compiled with the specialization Triton's JIT would give it (16-byte
aligned pointers, ints divisible by 16) and a fixed GPU config. DIR/CASE.sass holds its instructions with
addresses, encodings and the parameters' constant-bank offsets masked, so that the SASS of two versions of the
code (two worktrees, each run with its own PYTHONPATH) can be diffed: a change to how operands are passed
should leave the code between the first and the last tensor-core instruction (the key loops) unchanged.
Prints registers, instruction counts and that span's size per case.
"""

# ruff: noqa: E501  (the cases read best one to a line)
from __future__ import annotations

import os
import re
import sys
import tempfile

import torch
import triton
from sass_tools import TARGET, resources, sass_of
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

import attn.fast  # noqa: F401  (sets up Triton before anything else imports it)
from attn.fast import _triton
from attn.reference.relative_bias import RelativeBias

mods = {
    m: sys.modules[f"attn.fast.{m}"] for m in ("attention", "context", "decode", "kv_cache", "preprocess", "unfused")
}
BACKEND = make_backend(TARGET)
captured = []


def record(kernel, grid, *args, _stream=None, **constexprs):
    if not args and hasattr(_triton, "bind"):  # operands by keyword (older code passed them by position)
        args, constexprs = _triton.bind(kernel, constexprs)
    captured.append((kernel, args, constexprs))


def compile_launch(kernel, args, constexprs, config):
    jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    kw = {k: v for k, v in constexprs.items() if k not in config} | config
    binder = create_function_from_signature(jit.signature, jit.params, BACKEND)
    bound, specialization, options = binder(*args, **kw)
    options, signature, consts, attrs = jit._pack_args(BACKEND, kw, bound, specialization, options)
    return triton.compile(ASTSource(jit, signature, consts, attrs), target=TARGET, options=options.__dict__)


def cases():
    h = torch.float16
    q4 = torch.randn(2, 64, 4, 128, dtype=h)
    kv2 = torch.randn(2, 64, 2, 128, dtype=h)
    qt, cu, lens = torch.randn(24, 8, 128, dtype=h), torch.tensor([0, 10, 24], dtype=torch.int32), None
    lens = torch.tensor([100, 200], dtype=torch.int32)
    kc = torch.randn(2, 256, 2, 128, dtype=h)
    pool = torch.randn(16, 32, 2, 128, dtype=h)
    k8 = torch.zeros(16, 32, 2, 128, dtype=torch.int8)
    bt = torch.arange(16, dtype=torch.int32).view(2, 8)
    sc = torch.rand(2) + 0.5
    qd, lens4 = torch.randn(4, 1, 8, 128, dtype=h), torch.tensor([100, 200, 300, 512], dtype=torch.int32)
    kd, pd, bd = (
        torch.randn(4, 512, 2, 128, dtype=h),
        torch.randn(64, 64, 2, 128, dtype=h),
        torch.arange(32, dtype=torch.int32).view(4, 8),
    )
    kn, cu7 = torch.randn(7, 2, 128, dtype=h), torch.tensor([0, 3, 7], dtype=torch.int32)
    qkv, t5 = torch.randn(7, 12 * 128, dtype=h), RelativeBias(table=torch.randn(8, 32), max_distance=64)
    a, c, d = mods["attention"], mods["context"], mods["decode"]
    kv, pre, unf = mods["kv_cache"], mods["preprocess"], mods["unfused"]
    big = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    ctx = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    dec = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "MERGE_TILE": 4096, "INT8_ASM": True}
    small = {"BLOCK_T": 32, "num_warps": 4}
    return {
        "prefill_causal": (lambda: a.attention(q4, kv2, kv2, causal=True), big),
        "prefill_alibi_lse": (lambda: a.attention(q4, kv2, kv2, causal=True, alibi_slopes=torch.rand(4), return_lse=True), big),
        "prefill_softcap_window": (lambda: a.attention(q4, kv2, kv2, window_size=(16, 0), softcap=30.0), big),
        "prefill_t5": (lambda: a.attention(q4, q4, q4, causal=True, rel_bias=RelativeBias(table=torch.randn(4, 32), max_distance=64)), big),
        "context_paged_lse": (lambda: c.context_attention(qt, pool, pool, lens, cu_seqlens_q=cu, max_seqlen_q=14, block_table=bt, return_lse=True), ctx),
        "context_int8_alibi": (lambda: c.context_attention(qt, k8, k8, lens, cu_seqlens_q=cu, max_seqlen_q=14, block_table=bt, k_scale=sc, v_scale=sc, alibi_slopes=torch.rand(8)), ctx),
        "decode": (lambda: d.decode(qd, kd, kd, lens4, num_splits=1), dec),
        "decode_split_lse": (lambda: d.decode(qd, kd, kd, lens4, num_splits=4, return_lse=True), dec),
        "decode_paged_t5": (lambda: d.decode(qd, pd, pd, lens4, block_table=bd, rel_bias=t5, num_splits=2), dec),
        "append_paged_int8": (lambda: kv.append_kv(k8, k8.clone(), kn, kn, lens, cu_seqlens_new=cu7, block_table=bt, k_scale=sc, v_scale=sc), small),
        "preprocess_rope_bias": (lambda: pre.preprocess(qkv, kc, kc.clone(), lens, num_heads_q=8, num_heads_kv=2, cu_seqlens_new=cu7, qkv_bias=torch.randn(12 * 128, dtype=h), rotary_dim=64), small),
        "unfused_scores": (lambda: unf.attention_unfused(q4, q4, q4, causal=True), {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4}),
    }  # fmt: skip


def main() -> None:
    out = sys.argv[1]
    wanted = sys.argv[2:]
    for m in mods.values():
        m.launch, m.is_interpreter = record, (lambda: True)
        if hasattr(m, "autotune_enabled"):
            m.autotune_enabled = lambda: False
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (call, config) in cases().items():
            if wanted and name not in wanted:
                continue
            captured.clear()
            call()
            kernel, args, constexprs = captured[0]
            info, sass = sass_of(compile_launch(kernel, args, constexprs, config), tmp)
            lines = []
            for ln in sass.splitlines():
                ln = re.sub(r"/\*[0-9a-f]{4,}\*/|/\* 0x[0-9a-f]+ \*/", "", ln).strip()
                if ln and not ln.startswith(("//", ".", "code for", "Function", "-")) and not ln.endswith(":"):
                    if ln not in ("{", "}"):
                        lines.append(re.sub(r"c\[0x0\]\[0x[0-9a-f]+\]", "c[param]", ln))
            ops = [ln.split()[1] if ln.startswith("@") else ln.split()[0] for ln in lines]
            mma = [i for i, op in enumerate(ops) if op.startswith(("HMMA", "HGMMA"))]
            span = (mma[-1] - mma[0] + 1) if mma else 0
            with open(os.path.join(out, name + ".sass"), "w") as f:
                f.write("\n".join(lines) + "\n")
            print(
                f"{name:24s} {resources(info)[0]:>4s} registers {len(lines):6d} instructions, tensor-core span {span}"
            )


if __name__ == "__main__":
    main()
