"""The prefill sweep's shapes (bench/bench_attention.py ``--sweep``): drawn from issue 17's untuned space, valid,
and spread over every axis of it, so that a GPU run of the sweep measures what its name claims."""

from bench.bench_attention import SWEEP_BATCHES, SWEEP_SEQLENS, SWEEP_TOKENS, sweep_shapes


def test_sweep_shapes_are_valid_and_span_the_space():
    shapes = sweep_shapes(36, seed=0)
    assert len(shapes) == 36 and len({s.name for s in shapes}) == 36
    assert [s.name for s in sweep_shapes(36, seed=0)] == [s.name for s in shapes]  # the seed fixes the draw
    assert [s.name for s in sweep_shapes(36, seed=1)] != [s.name for s in shapes]
    for s in shapes:
        assert s.heads_q % s.heads_kv == 0 and s.heads_q // s.heads_kv in (1, 4, 8)
        assert s.head_dim in (64, 128, 256)
        if s.packed:
            assert s.lengths[0] == 1 and all(1 <= n <= 8192 for n in s.lengths) and sum(s.lengths) >= 16384
            assert s.batch == len(s.lengths) and s.seqlen == max(s.lengths)
        else:
            assert s.seqlen in SWEEP_SEQLENS and s.batch in SWEEP_BATCHES
            assert SWEEP_TOKENS[0] <= s.batch * s.seqlen <= SWEEP_TOKENS[1]
    padded = [s for s in shapes if not s.packed]
    assert sum(s.packed for s in shapes) == 9
    assert {s.head_dim for s in padded} == {64, 128, 256}
    assert {s.heads_q // s.heads_kv for s in padded} == {1, 4, 8}
    assert {s.causal for s in padded} == {True, False}
    assert {s.seqlen for s in padded} == set(SWEEP_SEQLENS)
