"""Does racecheck report hazards in a warp-specialized Gluon kernel that has no shared memory of its own?

    python bench/probes/ws_racecheck_probe.py            # on a GPU, under compute-sanitizer --tool racecheck
    TRITON_INTERPRET=0 python bench/probes/ws_racecheck_probe.py --ptx   # on a CPU: the kernel's PTX

Session 20's racecheck run of the Gluon prefill (`_attn_fwd_gluon`) reported RAW hazards on 8 bytes of shared
memory that the kernel never names: the warp-specialization state, one byte per worker warp, which Triton's
lowering writes from the default warps (which partition to run, then "exit") and each worker warp reads in its
switch loop. In the PTX every such write and read are separated by a CTA-wide ``barrier.sync 1``. This kernel
keeps only that protocol: two partitions that do nothing but one global store each. Hazards here belong to
Triton's warp specialization (or to racecheck's model of it), not to attn's kernels.

The same run reported WAR hazards between the Gluon prefill's two consumer partitions in its non-finite slow path
(`_hidden_values_out`): one reads the V stage, then `_sync_consumers` (the partition's own barrier, one thread's
mbarrier arrive, every thread's wait), then the other writes it. ``_ws_handoff`` keeps only that handoff: one
4-warp partition reads a shared buffer and the other writes it, ordered by the kernel's own `_sync_consumers`.
The order is valid in the PTX memory model (the bar.sync orders each thread's read before the arriving thread's
release; the waiters acquire it); a hazard here is racecheck not following that chain.
Session 20's run of these two showed the state-byte hazard in ``_ws_handoff`` and none on its buffer, so
``_ws_rounds`` comes closer to the kernel: both partitions read the whole buffer, sync, rewrite their halves and
sync again, three rounds, the barrier's phase parity alternating as the kernel's does across tiles.
Both of these access their buffer with ldmatrix/stmatrix, not the kernel's ``ld/st.shared.v4``:
`slowpath_racecheck_probe.py` runs the kernel's own slow path instead. ``_ws_probe4`` and ``_ws_probe4_bar``
split the state-byte question: a 4-warp worker alone, then with a barrier in the default warps.
"""

import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from attn.fast.gluon_attention import _sync_consumers


@gluon.jit
def _store_one(out_ptr, at: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    offs = gl.arange(0, 32 * gl.num_warps(), layout=layout)
    gl.store(out_ptr + at * 1024 + offs, offs.to(gl.float32))


@gluon.jit
def _ws_probe(out_ptr):
    gl.warp_specialize([(_store_one, (out_ptr, 0)), (_store_one, (out_ptr, 1))], [1], [24])


@gluon.jit
def _ws_probe4(out_ptr):
    # as _ws_probe with a 4-warp worker partition (the prefill's consumer 1): session 20 saw the state-byte
    # hazard with one (_ws_handoff) and not with a 1-warp worker
    gl.warp_specialize([(_store_one, (out_ptr, 0)), (_store_one, (out_ptr, 1))], [4], [24])


@gluon.jit
def _barrier_then_store(out_ptr, at: gl.constexpr):
    gl.thread_barrier()  # in a partition: bar.sync <id>, 128 (the default warps' id is 0)
    _store_one(out_ptr, at)


@gluon.jit
def _ws_probe4_bar(out_ptr):
    # _ws_probe4 plus one partition barrier in the default warps, as `_sync_consumers` has
    gl.warp_specialize([(_barrier_then_store, (out_ptr, 0)), (_store_one, (out_ptr, 1))], [4], [24])


@gluon.jit
def _reader(buf, bar, out_ptr):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    x = buf.load(layout)
    gl.store(out_ptr + gl.arange(0, 128, layout=layout), x)
    _sync_consumers(bar, 0)


@gluon.jit
def _writer(buf, bar, out_ptr):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    _sync_consumers(bar, 0)
    buf.store(gl.full([128], 2.0, gl.float32, layout))


@gluon.jit
def _buffer_and_barrier():
    """128 floats of shared memory, all 1.0, and an mbarrier for two partitions' arrivals, as fix_bar is."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    buf = gl.allocate_shared_memory(gl.float32, [128], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    buf.store(gl.full([128], 1.0, gl.float32, layout))
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=2)
    gl.thread_barrier()
    return buf, bar


@gluon.jit
def _ws_handoff(out_ptr):
    buf, bar = _buffer_and_barrier()
    gl.warp_specialize([(_reader, (buf, bar, out_ptr)), (_writer, (buf, bar, out_ptr))], [4], [24])


@gluon.jit
def _rounds(buf, bar, out_ptr, HALF: gl.constexpr, ROUNDS: gl.constexpr):
    # as `_hidden_values_out`: both partitions read the whole buffer, sync, each rewrites its own half, sync; the
    # barrier's phase parity alternates, as fix_bar's does over a kernel's tiles
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    phase = 0
    total = gl.zeros([128], gl.float32, layout)
    for r in gl.static_range(ROUNDS):
        total += buf.load(layout)
        phase = _sync_consumers(bar, phase)
        buf.slice(HALF * 64, 64).store(gl.full([64], r + 2.0, gl.float32, layout))
        phase = _sync_consumers(bar, phase)
    gl.store(out_ptr + HALF * 128 + gl.arange(0, 128, layout=layout), total)


@gluon.jit
def _ws_rounds(out_ptr, ROUNDS: gl.constexpr):
    buf, bar = _buffer_and_barrier()
    gl.warp_specialize([(_rounds, (buf, bar, out_ptr, 0, ROUNDS)), (_rounds, (buf, bar, out_ptr, 1, ROUNDS))],
                       [4], [24])  # fmt: skip


def main() -> None:
    if "--ptx" in sys.argv:
        sys.path.insert(0, __file__.rsplit("/", 1)[0])
        from sass_tools import compile_for_target

        print(compile_for_target(_ws_probe, (torch.empty(2048),), {}).asm["ptx"])
        print(compile_for_target(_ws_probe4, (torch.empty(2048),), {}).asm["ptx"])
        print(compile_for_target(_ws_probe4_bar, (torch.empty(2048),), {}).asm["ptx"])
        print(compile_for_target(_ws_handoff, (torch.empty(128),), {}).asm["ptx"])
        print(compile_for_target(_ws_rounds, (torch.empty(256),), {"ROUNDS": 3}).asm["ptx"])
        return
    out = torch.zeros(2048, device="cuda")
    _ws_probe[(4,)](out, num_warps=4)
    torch.cuda.synchronize()
    assert torch.equal(out[:128], torch.arange(128.0, device="cuda")), "default partition's store"
    assert torch.equal(out[1024:1056], torch.arange(32.0, device="cuda")), "worker partition's store"
    print("ws probe ran: both partitions stored")
    for k in (_ws_probe4, _ws_probe4_bar):
        out.zero_()
        k[(4,)](out, num_warps=4)
        torch.cuda.synchronize()
        assert torch.equal(out[1024:1152], torch.arange(128.0, device="cuda")), f"{k.__name__}: worker's store"
        print(f"{k.__name__} ran: both partitions stored")
    got = torch.zeros(128, device="cuda")
    _ws_handoff[(4,)](got, num_warps=4)
    torch.cuda.synchronize()
    # the reader saw the first value: the writer's store came after its read
    assert torch.equal(got, torch.ones(128, device="cuda")), got
    print("handoff probe ran: the reader read before the writer wrote")
    sums = torch.zeros(256, device="cuda")
    _ws_rounds[(4,)](sums, ROUNDS=3)
    torch.cuda.synchronize()
    # each partition sums the buffer before each round's writes: 1 + 2 + 3 in every element
    assert torch.equal(sums, torch.full((256,), 6.0, device="cuda")), sums
    print("rounds probe ran: every round read the previous round's writes")


if __name__ == "__main__":
    main()
