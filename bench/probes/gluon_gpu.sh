#!/usr/bin/env bash
# The Gluon prefill kernel's GPU batch (issue 17), logs under $OUT. From the repo root on the device machine:
#   bash bench/probes/gluon_gpu.sh smoke tests     # ~5-8 min: hang watchdog first, then the parity tests in 4 shards
#   bash bench/probes/gluon_gpu.sh bench           # ~2-3 min: bench/bench_gluon.py (+ FP8 rows), one JSON in $OUT
# (run the two in one warm session: the second reuses the Triton cache in $TRITON_CACHE_DIR)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
mkdir -p "$TRITON_CACHE_DIR"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
status=0
for job in "$@"; do
  case "$job" in
    smoke)
      # every variant once in a child process; a hang is reported and killed after 120 s without output
      timeout 420 python bench/probes/gluon_smoke.py --stall 120 2>&1 | tee "$OUT/gluon_smoke.log" || status=1
      ;;
    tests)
      # shards run side by side (compiling dominates); each under its own timeout in case a variant hangs
      pids=()
      i=0
      for k in "test_gluon_matches_reference and D64" "test_gluon_matches_reference and D128" \
               "test_gluon_variants" "not test_gluon_matches_reference and not test_gluon_variants"; do
        timeout 540 python -m pytest tests/test_gluon_attention.py -q -rfE -k "$k" > "$OUT/gluon_tests_$i.log" 2>&1 &
        pids+=($!)
        i=$((i + 1))
      done
      # FP8 prefill (tests/test_fp8_prefill.py: CPU-interpreter cases run on the GPU too, plus the GPU shapes)
      timeout 540 python -m pytest tests/test_fp8_prefill.py -q -rfE -s > "$OUT/gluon_tests_$i.log" 2>&1 &
      pids+=($!)
      for p in "${pids[@]}"; do wait "$p" || status=1; done
      tail -n 3 "$OUT"/gluon_tests_*.log
      grep -h "FAILED\|ERROR\|rel err" "$OUT"/gluon_tests_*.log | head -40
      ;;
    bench)
      timeout 580 python -m bench.bench_gluon --out "$OUT" 2>&1 | tee "$OUT/gluon_bench.log" || status=1
      ;;
    *) echo "unknown job $job"; status=2 ;;
  esac
done
exit $status
