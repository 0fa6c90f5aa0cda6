"""The Gluon prefill's non-finite slow path alone, for racecheck: is its WAR hazard attn's race or racecheck's?

    python bench/probes/slowpath_racecheck_probe.py tma|plain|mixed|lag|nolag|lag2   # on a GPU, under racecheck
    TRITON_INTERPRET=0 python bench/probes/slowpath_racecheck_probe.py --ptx   # on a CPU: every variant's PTX

Session 20's racecheck run of `_attn_fwd_gluon` reported WAR hazards between consumer 0 reading a V stage in
`_has_nonfinite` and consumer 1 writing the indicator rows there in `_hidden_values_out`, which
`_sync_consumers` orders. Its control (`ws_racecheck_probe._ws_handoff`) showed no hazard, but its buffer
accesses compile to ldmatrix/stmatrix, while the kernel's check and stores are ``ld/st.shared.v4``: the control
did not test the kernel's accesses. This kernel is the prefill with Q·Kᵀ, softmax and P·V taken out: the same
partitions (consumer 0 in the default warps, consumer 1 in 4 worker warps, a 1-warp producer), the same
[128, 128] bf16 stages in the TMA's swizzled layout, and the kernel's own `_has_nonfinite` and
`_hidden_values_out` over every tile, each of which holds a NaN.

- ``tma``: the producer fills a 2-stage ring by TMA (the async proxy), as the prefill does; ``n_tiles`` tiles.
- ``plain``: the default warps fill one stage with ordinary stores before the partitions start; one tile.
- ``mixed``: closer to the prefill's loop: a 3-stage ring, 9 tiles of which 2, 5, 8 hold the NaN, 0, 3, 6 are
  checked and clean, 1, 4, 7 are not checked (the unmasked range), and a P·V wgmma reads every stage.

- ``lag`` / ``nolag``: one stage, the slow path's first two phases; in ``lag`` consumer 1 sleeps ~20 ms between
  its arrival and its wait, so that it waits for phase 0 when the barrier is already in phase 1 (consumer 0 went
  on and arrived there), an order PTX defines (try_wait.parity returns once the phase of that parity completed).
  ``lag2``: the same lag with the second phase on a second barrier, so the awaited barrier never holds an
  arrival past the awaited phase.

A hazard in ``plain`` is racecheck's model of `_sync_consumers` over these accesses; one only in ``tma`` ties it
to the TMA-written stage.
"""

import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from attn.fast.gluon_attention import (
    CONSUMER_REGS,
    PRODUCER_REGS,
    _chunk_layout,
    _has_nonfinite,
    _hidden_values_out,
    _sync_consumers,
)

BLOCK_N, HEAD_DIM, BAD_COL = 128, 128, 7


@gluon.jit
def _sp_consumer(bufs, ready, empty, fix_bar, v_ptr, out_ptr, n_tiles, TMA: gl.constexpr, MIXED: gl.constexpr,
                 HALF: gl.constexpr):  # fmt: skip
    STAGES: gl.constexpr = bufs.shape[0]
    BLOCK_N: gl.constexpr = bufs.shape[1]
    HEAD_DIM: gl.constexpr = bufs.shape[2]
    WG_M: gl.constexpr = 64
    NW: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    offs_m = HALF * WG_M + gl.arange(0, WG_M, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([WG_M, HEAD_DIM], gl.float32, o_layout)
    fixes = 0
    for t in range(n_tiles):
        slot = t % STAGES
        if TMA:
            mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
        v = bufs.index(slot)
        # MIXED: tiles 1, 4, 7, ... stand for the unmasked range, which is never checked
        if not MIXED or t % 3 != 1:
            # every key visible (no window): the slow path's product makes acc NaN in each bad column
            if _has_nonfinite(v, BLOCK_N, HEAD_DIM) != 0:
                acc, fixes = _hidden_values_out(v, acc, fix_bar, fixes, v_ptr, 0, HEAD_DIM, t * BLOCK_N, offs_m, 0,
                                                n_tiles * BLOCK_N, 0, 0, False, False, HALF, 2, WG_M, BLOCK_N,
                                                HEAD_DIM, s_layout, o_layout, p_layout)  # fmt: skip
        if MIXED:
            # P·V's read of the stage by the tensor cores (P = 0 adds nothing), as the prefill issues it
            p = gl.zeros([WG_M, BLOCK_N], gl.bfloat16, p_layout)
            acc = warpgroup_mma_wait(0, deps=[warpgroup_mma(p, v, acc, is_async=True)])
        if TMA:
            mbarrier.arrive(empty.index(slot), count=1)
    # out[HALF]: this consumer's fix_bar phases; out[2 + HALF]: its NaN outputs
    gl.store(out_ptr + HALF, fixes)
    gl.store(out_ptr + 2 + HALF, gl.sum(gl.sum((acc != acc).to(gl.int32), 1), 0))


@gluon.jit
def _sp_producer(v_desc, bufs, ready, empty, n_tiles, TMA: gl.constexpr):
    STAGES: gl.constexpr = bufs.shape[0]
    BLOCK_N: gl.constexpr = bufs.shape[1]
    if TMA:
        for t in range(n_tiles):
            slot = t % STAGES
            # a fresh barrier's "previous phase" (parity 1) counts as complete: the first lap does not wait
            mbarrier.wait(empty.index(slot), ((t // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [t * BLOCK_N, 0], ready.index(slot), bufs.index(slot))


@gluon.jit
def _fill_stage(stage, v_ptr):
    """The stage's rows from V in global memory by ordinary stores (the generic proxy), fenced for the async one."""
    BLOCK_N: gl.constexpr = stage.shape[0]
    HEAD_DIM: gl.constexpr = stage.shape[1]
    layout: gl.constexpr = _chunk_layout(HEAD_DIM, gl.num_warps())
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    stage.store(gl.load(v_ptr + gl.expand_dims(rows * HEAD_DIM, 1) + gl.expand_dims(cols, 0)))
    fence_async_shared()


@gluon.jit
def _sp_kernel(v_desc, v_ptr, out_ptr, n_tiles, TMA: gl.constexpr, MIXED: gl.constexpr, STAGES: gl.constexpr):
    BLOCK_N: gl.constexpr = v_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = v_desc.block_type.shape[1]
    bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    fix_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(fix_bar, count=2)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    if not TMA:
        _fill_stage(bufs.index(0), v_ptr)
    gl.thread_barrier()
    gl.warp_specialize(
        [
            (_sp_consumer, (bufs, ready, empty, fix_bar, v_ptr, out_ptr, n_tiles, TMA, MIXED, 0)),
            (_sp_consumer, (bufs, ready, empty, fix_bar, v_ptr, out_ptr, n_tiles, TMA, MIXED, 1)),
            (_sp_producer, (v_desc, bufs, ready, empty, n_tiles, TMA)),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )  # fmt: skip


@gluon.jit
def _sleep(ns):
    """Sleep about ``ns`` nanoseconds (PTX nanosleep; an int32 in and out, so that the call stays in order)."""
    return gl.inline_asm_elementwise("nanosleep.u32 $1; mov.u32 $0, $1;", "=r,r", [ns], dtype=gl.int32,
                                     is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _lag_consumer(bufs, fix_bars, out_ptr, LAG: gl.constexpr, HALF: gl.constexpr):
    # the slow path's first two steps with the kernel's own check and store: both read the stage, both arrive at
    # phase 0; consumer 0 goes straight on to arrive at phase 1, while consumer 1 (LAG) sleeps between its arrival
    # and its wait, so that it waits for phase 0 when the barrier is already in phase 1 with consumer 0's arrival.
    # With two barriers (``lag2``) step 1 arrives at the second one: the first has no arrival past the phase
    # consumer 1 waits for, whatever the lag (the candidate fix for `_sync_consumers`)
    fix_bar = fix_bars.index(0)
    BLOCK_N: gl.constexpr = bufs.shape[1]
    HEAD_DIM: gl.constexpr = bufs.shape[2]
    NW: gl.constexpr = gl.num_warps()
    CH: gl.constexpr = (32 // (HEAD_DIM // 8)) * NW
    ROWS: gl.constexpr = BLOCK_N // 2
    layout: gl.constexpr = _chunk_layout(HEAD_DIM, NW)
    v = bufs.index(0)
    bad = _has_nonfinite(v, BLOCK_N, HEAD_DIM)
    gl.thread_barrier()
    mbarrier.arrive(fix_bar, count=1)
    if LAG and HALF == 1:
        # ~20 ms in 1 ms naps (nanosleep's cap): under racecheck consumer 0's stores take far longer than natively
        t = gl.full([32 * NW], 1000000, gl.int32, gl.BlockedLayout([1], [32], [NW], [0]))
        for _ in gl.static_range(20):
            t = _sleep(t)
        bad += gl.max(t, 0) * 0  # keeps the sleeps
    mbarrier.wait(fix_bar, 0)
    for c in gl.static_range(ROWS // CH):
        v.slice(HALF * ROWS + c * CH, CH).store(gl.full([CH, HEAD_DIM], 0.0, gl.bfloat16, layout))
    fence_async_shared()
    if fix_bars.shape[0] == 2:
        _sync_consumers(fix_bars.index(1), 0)
    else:
        _sync_consumers(fix_bar, 1)
    gl.store(out_ptr + HALF, bad)


@gluon.jit
def _lag_kernel(v_desc, v_ptr, out_ptr, LAG: gl.constexpr, BARS: gl.constexpr):
    BLOCK_N: gl.constexpr = v_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = v_desc.block_type.shape[1]
    bufs = gl.allocate_shared_memory(v_desc.dtype, [1, BLOCK_N, HEAD_DIM], v_desc.layout)
    fix_bars = gl.allocate_shared_memory(gl.int64, [BARS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(BARS):
        mbarrier.init(fix_bars.index(i), count=2)
    _fill_stage(bufs.index(0), v_ptr)
    gl.thread_barrier()
    gl.warp_specialize([(_lag_consumer, (bufs, fix_bars, out_ptr, LAG, 0)),
                        (_lag_consumer, (bufs, fix_bars, out_ptr, LAG, 1))], [4], [CONSUMER_REGS])  # fmt: skip


def args(mode: str, device: str):
    n_tiles = {"tma": 4, "plain": 1, "mixed": 9}[mode]
    v = torch.randn(n_tiles * BLOCK_N, HEAD_DIM, device=device).to(torch.bfloat16)
    # one NaN per bad tile, all in one column: every tile, or (mixed) tiles 2, 5, 8
    bad = torch.arange(2 if mode == "mixed" else 0, n_tiles, 3 if mode == "mixed" else 1)
    v[bad * BLOCK_N + 5, BAD_COL] = float("nan")
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], gl.bfloat16)
    desc = TensorDescriptor(v, [n_tiles * BLOCK_N, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM], layout)
    out = torch.full((4,), -1, dtype=torch.int32, device=device)
    return (desc, v, out, n_tiles, bad.numel()), {
        "TMA": mode != "plain",
        "MIXED": mode == "mixed",
        "STAGES": 3 if mode == "mixed" else 2,
    }


def main() -> None:
    if "--ptx" in sys.argv:
        sys.path.insert(0, __file__.rsplit("/", 1)[0])
        from sass_tools import compile_for_target

        for mode in ("tma", "plain", "mixed"):
            a, c = args(mode, "cpu")
            print(compile_for_target(_sp_kernel, a[:4], c).asm["ptx"])
        a, _ = args("plain", "cpu")
        lag_args = (a[0], a[1], torch.empty(2, dtype=torch.int32))
        for bars in (1, 2):
            print(compile_for_target(_lag_kernel, lag_args, {"LAG": True, "BARS": bars}).asm["ptx"])
        return
    mode = sys.argv[1]
    if mode in ("lag", "nolag", "lag2"):
        a, _ = args("plain", "cuda")
        out = torch.full((2,), -1, dtype=torch.int32, device="cuda")
        _lag_kernel[(1,)](a[0], a[1], out, LAG=mode != "nolag", BARS=2 if mode == "lag2" else 1, num_warps=4)
        torch.cuda.synchronize()
        assert out.tolist() == [1, 1], out  # both saw the NaN before either wrote
        print(f"lag probe ({mode}) ran: {out.tolist()}")
        return
    a, c = args(mode, "cuda")
    _sp_kernel[(1,)](*a[:4], **c, num_warps=4)
    torch.cuda.synchronize()
    out, n_bad = a[2].tolist(), a[4]
    # each bad tile takes the slow path (four fix_bar phases per consumer); its NaN reaches column BAD_COL of all
    # 64 rows of each consumer
    assert out == [4 * n_bad, 4 * n_bad, 64, 64], out
    print(f"slow path probe ({mode}) ran: {out}")


if __name__ == "__main__":
    main()
