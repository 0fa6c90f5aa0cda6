#!/usr/bin/env bash
# The Gluon prefill kernel's GPU batch (issue 17), logs under $OUT. From the repo root on the device machine:
#   bash bench/probes/gluon_gpu.sh smoke tests     # ~6-10 min: hang watchdog first, then the parity tests in 8 shards
#   bash bench/probes/gluon_gpu.sh bench           # ~3-4 min: bench/bench_gluon.py (+ FP8 rows), one JSON in $OUT
#   bash bench/probes/gluon_gpu.sh bench-extra     # ~2-4 min: the packed/seqlens and ALiBi tables
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
      timeout 560 python bench/probes/gluon_smoke.py --stall 120 2>&1 | tee "$OUT/gluon_smoke.log" || status=1
      ;;
    tests)
      # shards run side by side (compiling dominates); each under its own timeout in case a variant hangs
      pids=()
      i=0
      for k in "test_gluon_matches_reference and D64" "test_gluon_matches_reference and D128" \
               "test_gluon_variants" "test_gluon_hidden" "test_gluon_seqlens" "test_gluon_packed" \
               "test_gluon_alibi" \
               "not (test_gluon_matches_reference or test_gluon_variants or test_gluon_hidden or test_gluon_seqlens or test_gluon_packed or test_gluon_alibi)"; do
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
      # the padded shapes (with the gluon_noguard baseline column) and the FP8 rows
      timeout 580 python -m bench.bench_gluon --no-seqlens --no-alibi --out "$OUT" 2>&1 | tee "$OUT/gluon_bench.log" || status=1
      ;;
    bench-extra)
      # only the packed/seqlens and ALiBi tables (no padded shape matches "none")
      timeout 580 python -m bench.bench_gluon --only none --no-fp8 --out "$OUT/gluon_extra.json" 2>&1 \
        | tee "$OUT/gluon_bench_extra.log" || status=1
      ;;
    *) echo "unknown job $job"; status=2 ;;
  esac
done
exit $status
