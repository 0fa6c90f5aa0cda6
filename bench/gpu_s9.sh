#!/usr/bin/env bash
# Session 9's device batch (one call): the shards that failed or ran out of time in the first call of the
# session, the GPU fuzz as one process per entry, then benchmarks one at a time on a quiet GPU.
# Usage (device, repo root): OUT=... bash bench/gpu_s9.sh   (carry .gpu_pkgs: hypothesis, pytest-xdist)
export PYTHONPATH=.:.gpu_pkgs PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc ATTN_AUTOTUNE=0
mkdir -p "$OUT"
T=${T:-220}
t() { name=$1; shift; ( timeout "$T" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? :: $name" >> "$OUT/$name.log" ) & }
t t_launch_nan python3 -m pytest -q -p no:cacheprovider tests/test_launch.py tests/test_nan.py
t t_hf python3 -m pytest -q -p no:cacheprovider tests/test_integrations_transformers.py
t t_gluon python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_gluon_attention.py
for e in prefill decode context append_and_preprocess cross gpt_attention; do
  ATTN_FUZZ_PROFILE=gpu ATTN_FUZZ_SCALE=${FUZZ_SCALE:-2} t "fuzz_$e" python3 -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py -k "test_fuzz_$e"
done
wait
unset ATTN_AUTOTUNE
tail -n 3 "$OUT"/t_*.log "$OUT"/fuzz_*.log | grep -v "^$"
b() { name=$1; lim=$2; shift 2; timeout "$lim" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?" >> "$OUT/$name.log"; tail -${TAIL:-40} "$OUT/$name.log"; }
[ -n "${GLUON_T:-}" ] && b gluon "$GLUON_T" python3 -m bench.bench_gluon --out "$OUT" --repeat 1 --rep 30 --warmup 10
[ -n "${TF_T:-}" ] && TAIL=8 b transformers "$TF_T" python3 -m bench.bench_transformers --out "$OUT" --layers 4 --new 64 --impls attn,attn:dynamic,sdpa,flex_attention
true
