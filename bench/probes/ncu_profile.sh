#!/usr/bin/env bash
# Nsight Compute on the H200: hardware counters of our prefill and decode kernels beside cuDNN's prefill.
#
#   OUT=results_dir bash bench/probes/ncu_profile.sh [CASE ...]     # on the GPU machine, PYTHONPATH set to the repo
#
# Each case of bench/probes/ncu_target.py runs under `ncu --set full` restricted to its NVTX range `profile`, with
# the clocks left alone (--clock-control none, as the device notes ask). Writes per case the report
# (CASE.ncu-rep), its details page (CASE.txt) and its raw metrics (CASE.csv), then side-by-side summaries.
set -uo pipefail
OUT=${OUT:-/tmp/ncu}
mkdir -p "$OUT"
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(prefill prefill_cudnn prefill_long prefill_long_cudnn decode decode_fp8 decode_int8)
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for c in "${cases[@]}"; do
  echo "== $c" >&2
  "$NCU" --nvtx --nvtx-include "profile/" --set full --import-source no --clock-control none \
    -f -o "$OUT/$c" python3 bench/probes/ncu_target.py "$c" > "$OUT/$c.log" 2>&1 || { tail -20 "$OUT/$c.log"; continue; }
  "$NCU" -i "$OUT/$c.ncu-rep" --page details > "$OUT/$c.txt" 2>&1
  "$NCU" -i "$OUT/$c.ncu-rep" --page raw --csv > "$OUT/$c.csv" 2>&1
done
cd "$OUT"
pairs=("prefill prefill_cudnn" "prefill_long prefill_long_cudnn" "decode decode_fp8 decode_int8"
       "fp8_long fp8_long_tl gluon_long prefill_long_cudnn" "gdecode_fp8 decode_fp8 gdecode_int8 decode_int8")
for p in "${pairs[@]}"; do
  files=()
  for c in $p; do [ -s "$c.csv" ] && files+=("$c.csv"); done
  [ ${#files[@]} -gt 0 ] && python3 "$OLDPWD/bench/probes/ncu_summary.py" "${files[@]}" > "summary_${p%% *}.txt" 2>&1
done
cat summary_*.txt 2>/dev/null
