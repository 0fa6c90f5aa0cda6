#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, synccheck) over a subset of the GPU test suite, logs under $OUT.
#
# Usage, on the GPU machine from the repository root (no network needed):
#   OUT=/tmp/out bash tests/gpu_sanitize.sh                       # the default subset, all three tools
#   SANITIZER_TOOLS=memcheck bash tests/gpu_sanitize.sh tests/test_decode.py -k paged
#   SAN_PYTEST_ARGS="-n 4" OUT=/tmp/out bash tests/gpu_sanitize.sh  # pytest-xdist workers, each one sanitized
#   SHARD=2/8 SAN_PYTEST_ARGS="-n 8" bash tests/gpu_sanitize.sh      # one eighth of the whole suite's files
#   SAN_BUDGET=400 ...                                               # stop the tests cleanly after 400 s
#   SAN_DONE="a.junit.xml b.pytest.log" ...  # resume: leave out the tests that passed or skipped in those runs
#   SAN_PAR=12 ...  # 12 sanitizer instances side by side, one pytest process each, over 1/12 of the test ids
#                   # (the gpu-marked ids in SAN_HEAVY of them, SAN_CHUNK tests per process there)
#
# Writes $OUT/sanitizer/<tool>.log (the sanitizer's report), <tool>.pytest.log (the tests' output),
# <tool>.junit.xml (each test that ran, by name, also when SAN_BUDGET cut the run) and summary.txt (one
# "ERROR SUMMARY" line and the pytest result per tool); with SAN_PAR, one of each per instance (<tool>.<k>.*)
# and a total line. Exits non-zero if a tool reports an error or a test fails.
#
# Notes:
# - PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own allocation: with PyTorch's caching allocator
#   a read past one tensor lands inside the allocator's block and memcheck cannot see it. Only memcheck runs so.
# - ATTN_AUTOTUNE=0: fixed tiles (autotuning would time every config under the sanitizer, for hours).
# - The sanitizer slows kernels 10-100x: the default subset is the parity tests at their CPU sizes, the
#   NaN, transactional and determinism tests, and the fuzzer in its CI profile (skipped when hypothesis is not
#   installed); pass pytest arguments to choose others.
# - Many xdist workers under one sanitizer do not scale: at -n 7 no test started within 100 s, at -n 14 none
#   within 427 s (bench/NOTES.md, sessions 12-13). SAN_PAR gives each pytest process a sanitizer of its own;
#   the ids are collected once, without the sanitizer, and dealt out as described at SAN_PAR below.
set -uo pipefail
# keep a caller's PYTHONPATH after the repository (hypothesis or pytest-xdist may be carried in a folder)
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 ATTN_AUTOTUNE=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1
OUT=${OUT:-/tmp/out}
LOGS="$OUT/sanitizer"
mkdir -p "$LOGS"

SAN=${COMPUTE_SANITIZER:-}
if [ -z "$SAN" ]; then
  for c in "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer \
           /usr/local/cuda-*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
    if [ -n "$c" ] && [ -x "$c" ]; then SAN=$c; break; fi
  done
fi
if [ -z "$SAN" ] || [ ! -x "$SAN" ]; then
  echo "compute-sanitizer not found: install the CUDA toolkit's sanitizer or set COMPUTE_SANITIZER=/path/to/it" >&2
  exit 2
fi
"$SAN" --version | head -2 | tee "$LOGS/version.txt"

if [ $# -gt 0 ]; then
  TESTS=("$@")
elif [ -n "${SHARD:-}" ]; then
  # SHARD=k/n: every n-th test file from the k-th (0-based) of the whole suite, every test in them (gpu-marked
  # too), so that n calls, in any sessions, cover the GPU suite; summary.txt names the shard and its files
  k=${SHARD%/*}; n=${SHARD#*/}
  mapfile -t ALL < <(ls tests/test_*.py | sort)
  TESTS=()
  for i in "${!ALL[@]}"; do
    [ $((i % n)) -eq "$k" ] && TESTS+=("${ALL[$i]}")
  done
  echo "shard $SHARD: ${TESTS[*]}" | tee "$LOGS/shard.txt"
else
  TESTS=(tests/test_nan.py tests/test_transactional.py tests/test_determinism.py tests/test_fuzz.py
         tests/test_decode.py tests/test_context.py tests/test_context_cyclic.py tests/test_beam.py
         tests/test_cross.py tests/test_kv_cache.py tests/test_preprocess.py tests/test_gpt_attention.py
         -m "not gpu")
fi
export ATTN_FUZZ_PROFILE=${ATTN_FUZZ_PROFILE:-ci}

# SAN_DONE: junit files of earlier runs of this tool (a budget cut them); the tests they record as passed or
# skipped are deselected, so that runs over the same kernels add up to the whole suite. The union is what a
# report may claim, and only while the kernels' sources are the same in every run.
status=0
: > "$LOGS/summary.txt"
resume=()
if [ -n "${SAN_DONE:-}" ]; then
  # junit files, or the instances' -v pytest logs (a call cut before pytest wrote its junit file still has them)
  python3 - $SAN_DONE > "$LOGS/done.args" <<'PY'
import re
import sys
import xml.etree.ElementTree as ET

done = {}
for path in sys.argv[1:]:
    if path.endswith(".xml"):
        for case in ET.parse(path).getroot().iter("testcase"):
            if case.find("failure") is None and case.find("error") is None:
                done[f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"] = None
    else:
        for line in open(path, errors="replace"):
            m = re.match(r"(tests/\S.*?) (PASSED|SKIPPED)\b", line)
            if m:
                done[m.group(1)] = None
for test in done:
    print(f"--deselect={test}")
PY
  echo "resuming: $(wc -l < "$LOGS/done.args") tests done in $SAN_DONE" | tee -a "$LOGS/summary.txt"
  resume=("@$LOGS/done.args")
fi

# SAN_PAR=N: the test ids, collected once without the sanitizer (pytest -k/-m and SAN_DONE applied), dealt
# round-robin into argument files. Session 14's first run dealt every id alike and ran out of GPU memory: the ids
# come in file order, so all instances ran a file's big gpu-marked tests (fp32 references over long sequences) at
# once. So the gpu-marked ids go to SAN_HEAVY instances (default a quarter of SAN_PAR), the rest to the others.
# Tests that capture CUDA graphs (SAN_CACHED_K, a regex on the ids) cannot run without PyTorch's caching allocator
# (a cudaMalloc during capture is an error): they get an instance of their own, share "g", with the allocator on,
# where memcheck still sees every access outside the allocator's blocks. static_cache: transformers' generate with
# a StaticCache compiles the model with CUDA graphs (session 15 saw it fail without the allocator). routed_pool:
# test_memo routes allocations into a MemPool and reads the allocator's segments, which exist only with it on.
shares=()
if [ -n "${SAN_PAR:-}" ]; then
  collect() { python3 -m pytest --collect-only -q -p no:cacheprovider "${resume[@]}" "${TESTS[@]}" "$@" 2>/dev/null \
    | grep "::"; }
  collect > "$LOGS/ids.txt"
  collect -m gpu > "$LOGS/gpu_ids.txt"
  grep -E "${SAN_CACHED_K:-graph|reduce_overhead|static_cache|routed_pool}" "$LOGS/ids.txt" > "$LOGS/share_g.args"
  grep -vxFf "$LOGS/share_g.args" "$LOGS/ids.txt" > "$LOGS/rest.txt"
  grep -xFf "$LOGS/gpu_ids.txt" "$LOGS/rest.txt" > "$LOGS/heavy.txt"
  grep -vxFf "$LOGS/gpu_ids.txt" "$LOGS/rest.txt" > "$LOGS/light.txt"
  heavy=0
  if [ -s "$LOGS/heavy.txt" ]; then
    heavy=${SAN_HEAVY:-$(( (SAN_PAR + 3) / 4 ))}
    [ "$heavy" -ge "$SAN_PAR" ] && heavy=$(( SAN_PAR - 1 ))
    [ "$heavy" -lt 1 ] && heavy=1
  fi
  light=$(( SAN_PAR - heavy ))
  for ((k = 0; k < SAN_PAR; k++)); do
    if [ "$k" -lt "$light" ]; then
      awk -v n="$light" -v k="$k" '(NR - 1) % n == k' "$LOGS/light.txt" > "$LOGS/share$k.args"
    else
      awk -v n="$heavy" -v k="$((k - light))" '(NR - 1) % n == k' "$LOGS/heavy.txt" > "$LOGS/share$k.args"
    fi
    [ -s "$LOGS/share$k.args" ] && shares+=("$k")
  done
  [ -s "$LOGS/share_g.args" ] && shares+=("g")
  echo "SAN_PAR=$SAN_PAR: $(wc -l < "$LOGS/ids.txt") test ids in ${#shares[@]} shares" \
    "($(wc -l < "$LOGS/heavy.txt") gpu-marked in $heavy, $(wc -l < "$LOGS/share_g.args") capturing graphs in g)" \
    | tee -a "$LOGS/summary.txt"
fi

# Kernels that are not ours go unchecked (SAN_EXCLUDE, a --kernel-name-exclude filter; empty: check every kernel):
# PyTorch's (mangled C++ names, _Z...), cuBLAS's and cuDNN's, Inductor's. The fp32/fp64 references of the big
# tests spend most of their time in them, and a sanitizer error inside a vendor's kernel is not ours to fix.
# Triton names a kernel after its Python function (_decode_1b_kernel, ...), which the filter leaves alone. A filter
# can also silently check nothing, so the canary below (a Triton kernel reading past its tensor) must be reported
# under it; if it is not, the run checks every kernel, and if not even then, the run fails.
exclude=()
excl=${SAN_EXCLUDE-"regex=^(_Z|sm[0-9]|nvjet|cutlass|ampere|cudnn|triton_).*"}
canary() {  # canary <tag> <sanitizer options...>: 0 iff memcheck reported the canary's read
  "$SAN" --tool memcheck "${@:2}" --log-file "$LOGS/canary_$1.log" python3 tests/gpu_sanitize_canary.py \
    > "$LOGS/canary_$1.out" 2>&1
  grep -q "Invalid __global__ read" "$LOGS/canary_$1.log"
}
if [ -n "$excl" ] && canary filtered --kernel-name-exclude "$excl"; then
  exclude=(--kernel-name-exclude "$excl")
  echo "canary reported under --kernel-name-exclude $excl: those kernels go unchecked" | tee -a "$LOGS/summary.txt"
elif canary unfiltered; then
  echo "canary reported with every kernel checked${excl:+ (not under the filter $excl)}" | tee -a "$LOGS/summary.txt"
else
  echo "canary NOT reported: this sanitizer does not see our kernels, and no count of this run means anything" \
    | tee -a "$LOGS/summary.txt"
  status=1
fi

# the option that bounds the queued launches, if this sanitizer has it (see SAN_SYNC_LIMIT below)
# (the help goes to a file first: under pipefail, "--help | grep -q" fails when grep stops reading early, which is
# how session 15's second run came to go without the option)
sync_opt=""
"$SAN" --help > "$LOGS/help.txt" 2>&1
grep -q -- "--force-synchronization-limit" "$LOGS/help.txt" && sync_opt=--force-synchronization-limit
echo "sanitizer options: ${sync_opt:-no --force-synchronization-limit in --help}" >> "$LOGS/summary.txt"

# one sanitizer instance: sanitize <tool> <tag> <pytest arguments...>; its files are <tag>.log, <tag>.pytest.log
# and <tag>.junit.xml, its line in summary.txt; returns the sanitizer's exit status
sanitize() {
  local tool=$1 tag=$2 extra=() budget=() pre=() start rc summary result
  shift 2
  [ "$tool" = memcheck ] && extra=(--leak-check no --check-device-heap yes)
  [ "$tool" = racecheck ] && extra=(--racecheck-report all)
  extra+=("${exclude[@]}")
  # SAN_BUDGET=<seconds>: pytest gets SIGINT then, stops cleanly and reports what ran; the sanitizer still
  # prints its summary over every kernel launched until then (a partial run, which the pytest line says)
  [ -n "${SAN_BUDGET:-}" ] && budget=(timeout -s INT -k 30 "$SAN_BUDGET")
  # SAN_CACHING=1: PyTorch's caching allocator on (CUDA graph capture needs it). racecheck and synccheck keep it
  # on too: they check shared memory and barriers inside a block, which no global allocation changes, and without
  # the cache every freed tensor is a cudaFree, which waits for the device
  if [ -n "${SAN_CACHING:-}" ] || [ "$tool" != memcheck ]; then pre=(env -u PYTORCH_NO_CUDA_MEMORY_CACHING); fi
  # SAN_SYNC_LIMIT (default 32): the sanitizer synchronizes a stream after that many launches. Its tracking of
  # queued launches takes device memory, and the host can queue PyTorch's small kernels far ahead of a sanitized
  # GPU: session 15's first whole-suite run (10 instances) filled the H100's 80 GB within 180 s, and most of its
  # errors were the sanitizer failing to allocate while launching PyTorch's kernels (the likely cause; the
  # monitor's per-instance memory will say). Not in the graph share (SAN_CACHING): a synchronization inside a
  # stream capture would break the capture.
  if [ -z "${SAN_CACHING:-}" ] && [ "${SAN_SYNC_LIMIT:-32}" != 0 ] && [ -n "$sync_opt" ]; then
    extra+=("$sync_opt" "${SAN_SYNC_LIMIT:-32}")
  fi
  start=$(date +%s)
  # every error printed (a limit hid 900 of session 14's first run's errors: they could not be told apart); -q
  # unless SAN_VERBOSITY says otherwise (-q and -v would cancel out)
  # ATTN_KERNEL_MAP: each test's launched kernel binaries, kmap/<tag>/kmap_<pid>.jsonl (tests/kernel_map.py), so
  # that bench/kernel_coverage.py can say which binaries ran in an instance with 0 errors
  ATTN_KERNEL_MAP="$LOGS/kmap/$tag" "${pre[@]}" "$SAN" --tool "$tool" "${extra[@]}" --error-exitcode 99 \
    --print-limit 1000000 --log-file "$LOGS/$tag.log" "${budget[@]}" \
    python3 -m pytest "${SAN_VERBOSITY:--q}" -p no:cacheprovider --durations=25 --junitxml="$LOGS/$tag.junit.xml" "$@" \
    > "$LOGS/$tag.pytest.log" 2>&1
  rc=$?
  summary=$(grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$LOGS/$tag.log" | grep -v "not printed" | tail -1)
  result=$(tail -1 "$LOGS/$tag.pytest.log")
  echo "$tag${SHARD:+ shard $SHARD}: exit $rc in $(( $(date +%s) - start ))s | ${summary:-no summary line} | pytest: $result" \
    | tee -a "$LOGS/summary.txt"
  return $rc
}

# SAN_CHUNK=N (default 25; 0: off): a gpu-marked share runs as a series of processes of N tests each, one after
# another, all within the share's SAN_BUDGET. Under memcheck a process running the gpu-marked tests only ever
# grew: in session 15 no such instance's GPU memory ever fell between 30 s samples, and each reached 9-45 GB, while the
# light instances stayed at ~1 GB; a fresh process gives back what the last one held. Files: <tool>.<k>.c<NNN>.*
in_chunks() {  # in_chunks <tool> <share> <tests per process>
  local tool=$1 k=$2 n=$3 rc=0 end="" left chunk
  split -l "$n" -d -a 3 --additional-suffix=.args "$LOGS/share$k.args" "$LOGS/share$k.c"
  [ -n "${SAN_BUDGET:-}" ] && end=$(( $(date +%s) + SAN_BUDGET ))
  for chunk in "$LOGS/share$k".c[0-9][0-9][0-9].args; do
    chunk=${chunk#"$LOGS/share$k."}; chunk=${chunk%.args}
    if [ -n "$end" ]; then
      left=$(( end - $(date +%s) ))
      # too little time to start a process and run a test in it
      if [ "$left" -lt 30 ]; then
        echo "$tool.$k.$chunk: not started, ${left}s of the budget left" | tee -a "$LOGS/summary.txt"
        rc=1; continue  # as a run the budget cut: its tests did not all run
      fi
      SAN_BUDGET=$left sanitize "$tool" "$tool.$k.$chunk" "@$LOGS/share$k.$chunk.args" || rc=1
    else
      sanitize "$tool" "$tool.$k.$chunk" "@$LOGS/share$k.$chunk.args" || rc=1
    fi
  done
  return $rc
}

for tool in ${SANITIZER_TOOLS:-memcheck racecheck synccheck}; do
  echo "== $tool: ${TESTS[*]}"
  if [ ${#shares[@]} -eq 0 ]; then
    # shellcheck disable=SC2086  # SAN_PYTEST_ARGS is a list of pytest options
    sanitize "$tool" "$tool" ${SAN_PYTEST_ARGS:-} "${resume[@]}" "${TESTS[@]}" || status=1
    continue
  fi
  # every 10 s: host memory used and available (MiB), the load average, GPU memory used (MiB) in all and by each
  # instance (share:MiB), tests passed so far (sessions 14 and 15 filled the GPU's memory; this shows when, whose,
  # and how fast the tests go)
  per_share() {
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null |
      while IFS=', ' read -r pid mib; do
        share=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -o "share[^ /]*\.args" | head -1)
        share=${share#share}; echo -n "${share%.args}:$mib "
      done
  }
  monitor() {
    while sleep 10; do
      echo "$(date +%s) mem_used_avail $(free -m | awk '/^Mem:/ {print $3, $7}') load $(cut -d' ' -f1 /proc/loadavg)" \
        "gpu_mem $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)" \
        "[ $(per_share)] passed $(cat "$LOGS/$tool".*.pytest.log 2>/dev/null | grep -c " PASSED")"
    done
  }
  monitor > "$LOGS/$tool.monitor.txt" 2>&1 &
  mon=$!
  pids=()
  for k in "${shares[@]}"; do
    # -v: each test's line as it ends, which the monitor counts; SAN_STAGGER s between starts (CUDA and the
    # sanitizer initialize in each process at once otherwise)
    if [ "$k" = g ]; then
      SAN_CACHING=1 SAN_VERBOSITY=-v sanitize "$tool" "$tool.$k" "@$LOGS/share_g.args" &
    elif [ "$k" -ge "$light" ] && [ "${SAN_CHUNK:-25}" -gt 0 ]; then
      SAN_VERBOSITY=-v in_chunks "$tool" "$k" "${SAN_CHUNK:-25}" &
    else
      SAN_VERBOSITY=-v sanitize "$tool" "$tool.$k" "@$LOGS/share$k.args" &
    fi
    pids+=($!)
    sleep "${SAN_STAGGER:-5}"
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  kill "$mon" 2>/dev/null
  # the total: every instance's error count, and the tests their pytest lines report
  python3 - "$tool" "$LOGS" <<'PY' | tee -a "$LOGS/summary.txt"
import re
import sys
from pathlib import Path

from bench.kernel_coverage import instance_errors

tool, logs = sys.argv[1], Path(sys.argv[2])
errors, missing, counts = 0, 0, {}
for log in sorted(logs.glob(f"{tool}.*.log")):
    if log.name.endswith(".pytest.log"):
        continue
    found = instance_errors(log)
    if found is None:
        missing += 1
    else:
        errors += found
    last = log.with_name(log.name[: -len(".log")] + ".pytest.log").read_text().strip().splitlines()[-1:]
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", " ".join(last)):
        counts[what] = counts.get(what, 0) + int(n)
print(f"{tool} total: {errors} errors reported, {missing} instances without a summary line | tests: {counts}")
PY
done
exit $status
