#!/usr/bin/env bash
# Session 20 call 2 (issue 18): are racecheck's hazards in the Gluon prefill attn's own? Two controls from
# bench/probes/ws_racecheck_probe.py (warp specialization with no shared memory of ours; the consumers' mbarrier
# handoff alone), the first again with racecheck's sync trace, then one hidden-values test of the Gluon prefill.
#   OUT=$OUT bash bench/gpu_s20_race.sh     (device, repo root, carry .gpu_pkgs)
export PYTHONPATH=.:.gpu_pkgs PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc ATTN_AUTOTUNE=0
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -1)
mkdir -p "$OUT"
r() {  # r <tag> [sanitizer options] <command...>; LIM seconds (default 100)
  local tag=$1; shift
  timeout -s INT -k 10 "${LIM:-100}" "$SAN" --tool racecheck --racecheck-report all --print-limit 200 \
    --log-file "$OUT/$tag.log" "$@" > "$OUT/$tag.out" 2>&1
  echo "== $tag: rc=$? $(grep -h 'SUMMARY' "$OUT/$tag.log" | tail -1)"
  grep -h -A2 "hazard detected" "$OUT/$tag.log" | grep -oE "(Read|Write) Thread \([0-9]+,0,0\) at \S+ in \S+" \
    | sed 's/Thread ([0-9]*,0,0)//' | sort | uniq -c | head -8
  tail -2 "$OUT/$tag.out" | cut -c1-200
}
LIM=70 r probe python3 bench/probes/ws_racecheck_probe.py
LIM=40 r probe_trace --racecheck-trace-sync yes python3 bench/probes/ws_racecheck_probe.py
id=$(python3 -m pytest --collect-only -q tests/test_gluon_attention.py -k "hidden_values and causal and nan" \
  2>/dev/null | grep "::" | head -1)
LIM=100 r hidden python3 -m pytest -q -p no:cacheprovider "$id"
echo "hidden test: $id"
