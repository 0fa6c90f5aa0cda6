#!/usr/bin/env bash
# Session 21 call 1 (issues 18, 17), on one GPU, ~450 s:
#   OUT=$OUT bash bench/gpu_s21.sh     (device, repo root, carry .gpu_pkgs)
# 1. racecheck on the controls: bench/probes/ws_racecheck_probe.py (the warp-specialization state bytes: a 4-warp
#    worker alone, then with a barrier in the default warps) and bench/probes/slowpath_racecheck_probe.py (the
#    Gluon prefill's own non-finite slow path over TMA-filled stages, then over one stage filled by plain stores);
# 2. on the quiet GPU, the decode benchmark (the call a user makes, against cuDNN and FA2) and the one-byte decode
#    benchmark (INT8/FP8 against the bf16 cache), neither run since session 18's mul_rn change.
# Logs go into $OUT/logs.tgz (rewritten after each step, so a cut call still returns what ran), the JSON beside it.
export PYTHONPATH=.:.gpu_pkgs PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
L=/tmp/s21; mkdir -p $L "$OUT"
. bench/racecheck_run.sh
save() { tar czf "$OUT/.logs.tgz.part" -C $L . 2>/dev/null && mv "$OUT/.logs.tgz.part" "$OUT/logs.tgz"; }
r() {  # r <tag> <limit s> <print limit> <command...>: racecheck, then the digest
  racecheck "$@" && echo "== $1: $(tail -1 "$L/$1.out")"
  race_digests "$L/$1.log"
  save
}
r ws 90 400 python3 bench/probes/ws_racecheck_probe.py
r slow_tma 120 400 python3 bench/probes/slowpath_racecheck_probe.py tma
r slow_plain 120 400 python3 bench/probes/slowpath_racecheck_probe.py plain
timeout -s INT -k 20 170 python3 -m bench.bench_decode --peers cudnn,flash --out "$OUT/decode.json" \
  > "$L/decode.log" 2>&1; echo "decode rc=$?"; save
grep -h -A14 "^TB/s" "$L/decode.log" | cut -c1-250
timeout -s INT -k 20 130 python3 -m bench.bench_decode_1b --out "$OUT/decode_1b.json" > "$L/decode_1b.log" 2>&1
echo "decode_1b rc=$?"; save
grep -v "^ *$" "$L/decode_1b.log" | tail -40 | cut -c1-250
