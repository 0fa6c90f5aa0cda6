"""What bench/probes/decode_sass.py and prefill_sass.py share: Triton's bundled ptxas and cuobjdump run on a
compiled kernel for sm_90a, and the SASS read back as instructions and loops."""

from __future__ import annotations

import os
import re
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TARGET = GPUTarget("cuda", 90, 32)


def compile_for_target(kernel, args, constexprs: dict):
    """Compile a ``triton.jit`` or ``gluon.jit`` kernel for sm_90a without a GPU, specialized as its GPU launch with
    these operands (CPU tensors of the launch's dtypes and strides) would be: Triton's own binder decides the
    dtypes, 16-byte alignments and integer specializations."""
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **constexprs)
    options, signature, consts, attrs = kernel._pack_args(backend, options, bound, specialization, options)
    source = GluonASTSource if isinstance(kernel, GluonJITFunction) else ASTSource
    src = source(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options=options.__dict__)


def sass_of(kern, tmp: str) -> tuple[str, str]:
    """``(ptxas -v report, SASS listing)`` of a kernel compiled by ``triton.compile``, using ``tmp`` for files."""
    ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
    with open(ptx, "w") as f:
        f.write(kern.asm["ptx"])
    info = subprocess.run([os.path.join(TOOLS, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin],
                          capture_output=True, text=True, check=True).stderr  # fmt: skip
    sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    return info, sass


def resources(info: str) -> tuple[str, str]:
    """``(registers, bytes of spill stores)`` from a ptxas -v report."""
    regs = re.search(r"Used (\d+) registers", info).group(1)
    spills = re.search(r"(\d+) bytes spill stores", info).group(1)
    return regs, spills


def parse(sass: str) -> list[tuple[int, str, int | None]]:
    """[(address, full opcode, branch target or None)] in code order (the address regex takes any number of
    hex digits: kernels past 64 KiB of code have five)."""
    out = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", sass):
        addr, op, rest = int(m.group(1), 16), m.group(2), m.group(3)
        target = None
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", rest)
            target = int(t.group(1), 16) if t else None
        out.append((addr, op, target))
    return out


def loops(instrs) -> list[tuple[int, int, list[str]]]:
    """Backward branches and the instructions they jump back over: [(start, end, ops)]."""
    found = []
    for addr, _, target in instrs:
        if target is not None and target <= addr:
            found.append((target, addr, [op for a, op, _ in instrs if target <= a <= addr]))
    # a loop's internal backward jumps would show as overlapping ranges: keep them all
    return found
