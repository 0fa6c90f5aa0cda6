"""bench/race_digest.py: racecheck hazards counted by access pair, on a log written the way racecheck writes one."""

from bench.race_digest import by_cta, digest

LOG = """\
========= COMPUTE-SANITIZER
========= Error: Potential WAR hazard detected at __shared__ 0x29410 in block (5,0,0) :
=========     Read Thread (1,0,0) at _attn_fwd_gluon+0x21af0 in /x/attn/fast/gluon_attention.py:384
=========     Write Thread (129,0,0) at _attn_fwd_gluon+0xf7d0 in /x/attn/fast/gluon_attention.py:449
=========     Current Value : 0, Incoming Value : 0
=========
========= Error: Potential WAR hazard detected at __shared__ 0x29411 in block (5,0,0) :
=========     Read Thread (1,0,0) at _attn_fwd_gluon+0x21af0 in /x/attn/fast/gluon_attention.py:384
=========     Write Thread (129,0,0) at _attn_fwd_gluon+0xf7d0 in /x/attn/fast/gluon_attention.py:449
=========     Current Value : 0, Incoming Value : 0
=========
========= Error: Potential RAW hazard detected at __shared__ 0x628 in block (1,0,0) :
=========     Write Thread (127,0,0) at _ws_handoff+0x470 in ws_racecheck_probe.py:61
=========     Read Thread (288,0,0) at _ws_handoff+0x140 in ws_racecheck_probe.py:61
=========     Current Value : 0
========= RACECHECK SUMMARY: 3 hazards displayed (3 errors, 0 warnings)
"""


def test_digest_counts_each_hazard_by_kind_threads_and_lines():
    got = digest(LOG)
    war = ("WAR", "_attn_fwd_gluon", "Read wg0 gluon_attention.py:384", "Write wg1 gluon_attention.py:449")
    assert got[war + ("0x29410",)] == 1 and got[war + ("0x29411",)] == 1
    # thread 288 is in the third group of 128 threads (the second worker partition)
    raw = ("RAW", "_ws_handoff", "Write wg0 ws_racecheck_probe.py:61", "Read wg2 ws_racecheck_probe.py:61", "0x628")
    assert got[raw] == 1
    assert sum(got.values()) == 3


def test_digest_skips_a_report_cut_before_its_accesses():
    cut = "========= Error: Potential WAR hazard detected at __shared__ 0x10 in block (0,0,0) :\n=========     Read Th"
    assert not digest(cut)
    assert sum(digest(LOG + cut).values()) == 3


def test_hazards_are_counted_by_cta():
    assert by_cta(LOG) == {("WAR", "5,0,0"): 2, ("RAW", "1,0,0"): 1}
