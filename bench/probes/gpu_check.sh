#!/usr/bin/env bash
# The GPU session's batch: the GPU test suite, then the benchmark, with logs under $OUT.
# Usage (on the device machine, from the repo root): bash bench/probes/gpu_check.sh [tests] [bench] [decode] [features] [inflight] [demo] [host] [cache]
# Compiling dominates the test run, so the suite runs as several pytest processes side by side, and the
# Triton cache is handed back as one archive (.triton_cache/cache.tgz is unpacked first when present).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export TRITON_CACHE_DIR=/tmp/triton_cache
mkdir -p "$TRITON_CACHE_DIR"
[ -f .triton_cache/cache.tgz ] && tar xzf .triton_cache/cache.tgz -C "$TRITON_CACHE_DIR"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
status=0
for job in "$@"; do
  case "$job" in
    tests)
      # "file :: -k expression" per shard, balanced by how many kernel variants each compiles
      shards=(
        "tests/test_attention.py :: test_padded_matches_reference and float32 and not gpu"
        "tests/test_attention.py :: test_padded_matches_reference and float16 and not gpu"
        "tests/test_attention.py :: test_gpu_padded_matches_reference and bfloat16"
        "tests/test_attention.py :: test_gpu_padded_matches_reference and float16 and not bfloat16"
        "tests/test_attention.py :: test_gpu_padded_matches_reference and float32"
        "tests/test_attention.py :: not test_padded_matches_reference and not test_gpu_padded_matches_reference"
        "tests/test_decode.py :: not gpu"
        "tests/test_decode.py tests/test_beam.py tests/test_cyclic.py :: gpu or beam or cyclic"
        "tests/test_alibi.py tests/test_relative_bias.py :: "
        "tests/test_kv_quant.py tests/test_kv_cache.py tests/test_preprocess.py :: "
        "tests/test_checks.py tests/test_layout.py :: "
      )
      # every test file no shard above names gets a shard of its own, so new files are never left out
      named=$(printf '%s\n' "${shards[@]}" | sed 's/ :: .*//' | tr ' ' '\n' | sort -u)
      for f in tests/test_*.py; do
        grep -qx "$f" <<<"$named" || shards+=("$f :: ")
      done
      pids=()
      for i in "${!shards[@]}"; do
        files=${shards[$i]%% :: *}
        expr=${shards[$i]#* :: }
        # shellcheck disable=SC2086
        ATTN_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q $files ${expr:+-k "$expr"} \
          >"$OUT/tests_$i.log" 2>&1 &
        pids+=($!)
      done
      for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || status=1
        echo "shard $i (${shards[$i]}): $(tail -1 "$OUT/tests_$i.log")"
      done
      cat "$OUT"/tests_*.log > "$OUT/gpu_tests.log"; rm -f "$OUT"/tests_*.log
      grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
      ;;
    features) python3 -m bench.bench_features --out "$OUT/bench_features.json" 2>&1 | tee "$OUT/bench_features.log" ;;
    inflight) python3 -m bench.bench_inflight --out "$OUT/bench_inflight.json" 2>&1 | tee "$OUT/bench_inflight.log" ;;
    demo)
      python3 -m attn.demo --device cuda --large --requests 10 2>&1 | tr '\r' '\n' | grep -v "^\[" | tee "$OUT/demo.log" || status=1
      python3 -m attn.demo_encdec --device cuda --large 2>&1 | tr '\r' '\n' | grep -v "^\[" | tee "$OUT/demo_encdec.log" || status=1
      ;;
    host) python3 bench/probes/host_probe.py 2>&1 | tee "$OUT/host_probe.log" ;;
    bench) python3 -m bench.bench_attention --out "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench.log" ;;
    decode) python3 -m bench.bench_decode --out "$OUT/bench_decode.json" 2>&1 | tee "$OUT/bench_decode.log" ;;
    cache)
      # hand the compiled kernels back for the next machine, if the archive fits what comes back
      tar czf "$OUT/triton_cache.tgz" -C "$TRITON_CACHE_DIR" .
      [ "$(stat -c %s "$OUT/triton_cache.tgz")" -lt 15000000 ] || rm -f "$OUT/triton_cache.tgz"
      ;;
  esac
done
exit $status
