#!/usr/bin/env bash
# Session 21 call 2 (issue 18), on one GPU, ~590 s:
#   OUT=$OUT bash bench/gpu_s21b.sh     (device, repo root, carry .gpu_pkgs)
# 1. Which structure of the Gluon prefill brings racecheck's WAR (consumer 0's check at gluon_attention.py:384,
#    consumer 1's indicator store at :449)? racecheck on test_gluon_hidden_values_stay_out[causal-<variant>-nan]
#    for each consumer structure, side by side, and on slowpath_racecheck_probe.py's `mixed` loop. Logs and
#    digests in $OUT/race.tgz.
# 2. Then the three tools over the suite's ids not yet run clean (bench/gpu_s10.sh sanall, SAN_T=RACE_SAN_T).
export PYTHONPATH=.:.gpu_pkgs PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
L=/tmp/s21b; mkdir -p $L "$OUT"
. bench/racecheck_run.sh
for v in default fp16 d64 c1 serial n64 grid ovlfull pingpong; do
  racecheck "hidden_$v" 110 2000 python3 -m pytest -q -p no:cacheprovider \
    "tests/test_gluon_attention.py::test_gluon_hidden_values_stay_out[causal-$v-nan]" &
  sleep 1
done
racecheck slow_mixed 110 2000 python3 bench/probes/slowpath_racecheck_probe.py mixed &
wait
race_digests $L/*.log | tee $L/digest.txt
tar czf "$OUT/race.tgz" -C $L .
MODE=sanall TOOL="racecheck synccheck memcheck" SAN_TOGETHER=1 SAN_PAR_racecheck=7 SAN_HEAVY_racecheck=1 \
  SAN_PAR_synccheck=6 SAN_HEAVY_synccheck=1 SAN_PAR_memcheck=2 SAN_HEAVY_memcheck=1 \
  SAN_DONE_racecheck=bench/results/sanitizer_racecheck_H100_2026-12-07_s18_done.txt \
  SAN_DONE_synccheck=bench/results/sanitizer_synccheck_H100_2026-12-07_s20_done.txt \
  SAN_DONE_memcheck=bench/results/sanitizer_memcheck_H100_2026-12-07_s15_done.txt \
  SAN_T=${RACE_SAN_T:-440} bash bench/gpu_s10.sh
