#!/usr/bin/env bash
# Session 22's batch for the next GPU call (issue 18), one GPU, ~560 s:
#   OUT=$OUT bash bench/gpu_s22.sh     (device, repo root, carry .gpu_pkgs)
# 1. The whole suite on the GPU (-n 14, fixed tiles), since session 22 changed what every entry does before its
#    launch (strided index tensors copied, switches and options checked, hints cut, checks before the
#    FlashAttention-named append) and added tests/test_malformed.py, which runs on CUDA tensors there; then the
#    FP8-prefill fuzz with the gpu profile (Gluon FP8 kernel at D 64/128 on sm_90).
# 2. bench/gpu_s21c.sh's step 1: racecheck on the 64-key Gluon prefill's hidden-values tests and on
#    slowpath_racecheck_probe.py lag / nolag / lag2 (RACE_SAN_T=0: no sweep after it).
export PYTHONPATH=.:.gpu_pkgs PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
L=/tmp/s22; mkdir -p $L "$OUT"
timeout -s INT -k 20 "${SUITE_T:-300}" env ATTN_AUTOTUNE=0 python3 -m pytest -v -p no:cacheprovider -n 14 -rf \
  --tb=short --durations=15 --timeout 240 --timeout-method thread tests > $L/suite.log 2>&1
echo "rc=$?" >> $L/suite.log
pkill -9 -f pytest; sleep 2
timeout -s INT -k 20 "${FUZZ_T:-90}" env ATTN_AUTOTUNE=0 ATTN_FUZZ_PROFILE=gpu ATTN_FUZZ_SCALE=10 python3 -m pytest -q \
  -s -p no:cacheprovider tests/test_fuzz.py -k fp8_prefill > $L/fuzz_fp8.log 2>&1
echo "rc=$?" >> $L/fuzz_fp8.log
grep -h "^FAILED\|passed\|failed\|rc=" $L/suite.log | cut -c1-220 | tail -40
grep -h "fuzzed\|passed\|failed\|rc=" $L/fuzz_fp8.log | tail -5
tar czf "$OUT/s22_tests.tgz" -C $L .
RACE_SAN_T=0 OUT="$OUT" bash bench/gpu_s21c.sh
