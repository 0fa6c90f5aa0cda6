#!/usr/bin/env bash
# Session 21 call 3 (issue 18), on one GPU, ~450 s:
#   OUT=$OUT bash bench/gpu_s21c.sh     (device, repo root, carry .gpu_pkgs)
# 1. racecheck on the 64-key Gluon prefill's hidden-values tests (where session 21 call 2 saw the slow path's
#    intermittent WAR, in one CTA), twice for causal and once for each other mask; and on
#    slowpath_racecheck_probe.py's lag/nolag (consumer 1 waits for phase 0 after consumer 0 arrived at phase 1)
#    and lag2 (the same lag, phase 1 on a second barrier: the candidate fix).
# 2. Then synccheck and racecheck over the ids not yet run clean (mostly the gpu-marked ones), memcheck's rest.
export PYTHONPATH=.:.gpu_pkgs PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
L=/tmp/s21c; mkdir -p $L "$OUT"
. bench/racecheck_run.sh
racecheck lag 150 4000 python3 bench/probes/slowpath_racecheck_probe.py lag &
racecheck nolag 150 4000 python3 bench/probes/slowpath_racecheck_probe.py nolag &
racecheck lag2 150 4000 python3 bench/probes/slowpath_racecheck_probe.py lag2 &
for run in causal-n64-nan:a causal-n64-nan:b causal-n64-inf:a window-n64-nan:a full-ragged-n64-nan:a; do
  racecheck "n64_${run/:/_}" 150 4000 python3 -m pytest -q -p no:cacheprovider \
    "tests/test_gluon_attention.py::test_gluon_hidden_values_stay_out[${run%:*}]" &
  sleep 1
done
wait
race_digests $L/lag.log $L/nolag.log $L/lag2.log $L/n64_*.log | tee $L/digest.txt
tar czf "$OUT/race.tgz" -C $L .
[ "${RACE_SAN_T:-400}" -gt 0 ] || exit 0  # RACE_SAN_T=0: step 1 only
MODE=sanall TOOL="synccheck racecheck memcheck" SAN_TOGETHER=1 SAN_PAR_racecheck=3 SAN_HEAVY_racecheck=2 \
  SAN_PAR_synccheck=3 SAN_HEAVY_synccheck=2 SAN_PAR_memcheck=1 SAN_HEAVY_memcheck=1 \
  SAN_DONE_racecheck=bench/results/sanitizer_racecheck_H100_2026-12-08_s21_done.txt \
  SAN_DONE_synccheck=bench/results/sanitizer_synccheck_H100_2026-12-08_s21_done.txt \
  SAN_DONE_memcheck=bench/results/sanitizer_memcheck_H100_2026-12-08_s21_done.txt \
  SAN_T=${RACE_SAN_T:-400} bash bench/gpu_s10.sh
