#!/usr/bin/env bash
# Usage (device machine, repo root): mapfile -t S < bench/gpu_batch_specs.txt; bash bench/gpu_batch.sh "${S[@]}"
# .gpu_pkgs (carried, git-ignored) holds hypothesis built for the device's Python 3.12 (pip install --target .gpu_pkgs
# --python-version 3.12 --only-binary=:all: hypothesis sortedcontainers attrs).
# Session batch on the device: test shards in parallel ("files :: -k expr"), memcheck beside them ("san:script"),
# any command beside them ("cmd:NAME command", its log named after NAME), then benchmarks one at a time on a quiet
# GPU ("bench:module args"). Logs under $OUT.
set -uo pipefail
export PYTHONPATH=.:.gpu_pkgs PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/logs
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import sys,torch,triton;print(sys.version,torch.__version__,triton.__version__)"; python3 -c "import transformers;print('transformers',transformers.__version__)"; } > /tmp/logs/00_env.txt 2>&1
i=0
for spec in "$@"; do
  case $spec in
    bench:*) ;;
    cmd:*) c=${spec#cmd:}; name=${c%% *}; ( eval "timeout ${CMD_TIMEOUT:-300} ${c#* }" > /tmp/logs/c_$name.log 2>&1; echo "rc=$? :: $name" >> /tmp/logs/c_$name.log ) & ;;
    san:*) ( timeout ${SAN_TIMEOUT:-200} compute-sanitizer --tool memcheck --error-exitcode 1 python3 ${spec#san:} > /tmp/logs/san.log 2>&1; echo "rc=$? :: memcheck" >> /tmp/logs/san.log ) & ;;
    *) i=$((i+1)); files=${spec%% :: *}; expr=""; [[ $spec == *" :: "* ]] && expr=${spec#* :: }
       ( ATTN_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider $files ${expr:+-k "$expr"} > /tmp/logs/t$(printf %02d $i).log 2>&1; echo "rc=$? :: $spec" >> /tmp/logs/t$(printf %02d $i).log ) & ;;
  esac
done
wait
cat /tmp/logs/00_env.txt /tmp/logs/t*.log /tmp/logs/san.log > $OUT/tests.log 2>/dev/null
for f in /tmp/logs/c_*.log; do [ -e "$f" ] && cp "$f" $OUT/; done
for spec in "$@"; do
  case $spec in
    bench:*) b=${spec#bench:}; name=${b%% *}; eval "timeout ${BENCH_TIMEOUT:-200} python3 -m bench.$b" > $OUT/$name.log 2>&1; echo "rc=$?" >> $OUT/$name.log; tail -15 $OUT/$name.log;;
  esac
done
grep -h "rc=" /tmp/logs/c_*.log 2>/dev/null
grep -h "rc=\|^FAILED\|^ERROR\| passed\| failed" $OUT/tests.log | cut -c1-160 | tail -60
