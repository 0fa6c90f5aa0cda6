#!/usr/bin/env bash
# Session 8's closing device batch (one call): the test shards, fuzz, soak and sanitizers beside each other, then
# the benchmarks one at a time on a quiet GPU. Usage (device, repo root): OUT=... bash bench/gpu_final_s8.sh
export PYTHONPATH=.:.gpu_pkgs PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
mapfile -t S < bench/gpu_batch_specs_s8_run2.txt
TEST_TIMEOUT=${TEST_TIMEOUT:-100} CMD_TIMEOUT=${CMD_TIMEOUT:-100} SAN_TIMEOUT=${SAN_TIMEOUT:-100} bash bench/gpu_batch.sh "${S[@]}"
b() { name=$1; t=$2; shift 2; timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?" >> "$OUT/$name.log"; tail -${TAIL:-25} "$OUT/$name.log"; }
b gluon 45 python3 -m bench.bench_gluon --out "$OUT" --repeat 1 --rep 20 --warmup 5 --no-fp8 --no-seqlens --no-alibi --only "H32 S4096" --only S1024
[ -n "${TF_TIMEOUT:-}" ] && TAIL=12 b transformers "$TF_TIMEOUT" python3 -m bench.bench_transformers --out "$OUT" --layers 4 --new 64 --impls attn,sdpa,flex_attention
[ -n "${HOST_PROBE:-}" ] && b plan_host 30 python3 bench/probes/plan_host_profile.py
grep -h "fuzzed\|passed\|failed\|rc=" "$OUT"/c_*.log | tail -20; cat "$OUT"/rc/sanitizer/summary.txt 2>/dev/null
