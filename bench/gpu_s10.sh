#!/usr/bin/env bash
# Device calls (written in sessions 9 and 10), one per MODE, each under the 600 s limit.
# The device tool returns at most 8 files from $OUT, so every log goes into one archive, $OUT/logs.tgz, and a
# summary is printed. Usage (device, repo root, carry .gpu_pkgs: hypothesis, pytest-xdist):
#   MODE=verify OUT=$OUT bash bench/gpu_s10.sh    # the whole suite on the GPU beside the GPU fuzz (~320 s)
#   MODE=bench OUT=$OUT bash bench/gpu_s10.sh     # the default decode call, plan.run's host time, generate(),
#                                                 # the Gluon dispatch grid, one at a time (~480 s)
#   MODE=sanitize OUT=$OUT bash bench/gpu_s10.sh  # memcheck, racecheck, synccheck over tests/gpu_sanitize.sh's
#                                                 # default subset, the three tools side by side (~560 s)
#   MODE=final OUT=$OUT bash bench/gpu_s10.sh     # the Gluon decode's tests and benchmark, plan.run's host time
#                                                 # (GRID=1: the Gluon prefill grid; SWEEP=1: the split sweep)
#   MODE=shards SHARDS="0/8" OUT=$OUT bash ...    # the three sanitizers over shards of the whole suite
#   MODE=s11 SWEEP=1 OUT=$OUT bash bench/gpu_s10.sh # final's work plus the Gluon FP8 prefill's tests and table
#   MODE=suite OUT=$OUT bash bench/gpu_s10.sh     # the whole suite alone, -n 14 (~300 s)
#   MODE=s12 OUT=$OUT bash bench/gpu_s10.sh       # the whole suite beside memcheck's subset, then plan.run host
#   MODE=s12san DECODE=1 OUT=$OUT bash ...        # the decode benchmark, then the three sanitizers on budgets
#   MODE=sanall TOOL=racecheck OUT=$OUT bash ...  # one sanitizer over the whole suite (8 instances, 500 s;
#                                                 # SAN_DONE=<junit files> resumes where earlier runs stopped)
#   MODE=s13 GRID=1 OUT=$OUT bash ...             # Nsight Compute on the Gluon FP8 prefill and one-byte decode
#   MODE=pingpong OUT=$OUT bash ...               # the consumers' ping-pong: its GPU tests, then both tables
#   MODE=sweep OUT=$OUT bash ...                  # the untuned prefill sweep (36 drawn shapes) against cuDNN, FA2
#   MODE=pools OUT=$OUT bash ...                  # kept buffers outside CUDA graph pools: their GPU tests (session 15)
export PYTHONPATH=.:.gpu_pkgs PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
L=/tmp/s10; mkdir -p $L "$OUT"
# timeout sends SIGINT first: pytest stops cleanly and still prints its failures and durations; -k: then SIGKILL
t() { name=$1; lim=$2; shift 2; ( timeout -s INT -k 20 "$lim" "$@" > "$L/$name.log" 2>&1; echo "rc=$? :: $name" >> "$L/$name.log" ) & }
# b runs one step alone and archives what there is, also every 30 s while it runs: a call cut at the device's
# limit (which is the budget left after the machine's start, not timeout_s: session 14's call 2 was cut at 369 s of
# a 400 s step and brought back nothing) still returns its logs. The archive is written aside, then renamed.
save() { tar czf "$OUT/.logs.tgz.part" -C $L . 2>/dev/null && mv "$OUT/.logs.tgz.part" "$OUT/logs.tgz"; }
saving() { ( while sleep 30; do save; done ) & saver=$!; }
saved() { kill $saver 2>/dev/null; wait $saver 2>/dev/null; save; }
b() { name=$1; lim=$2; shift 2
      saving
      timeout -s INT -k 20 "$lim" "$@" > "$L/$name.log" 2>&1; echo "rc=$?" >> "$L/$name.log"
      saved; }
case "${MODE:-verify}" in
final)
  # the fixed Gluon decode tests beside the suite's last files (earlier calls ran out before them), then on a
  # quiet GPU: the one-byte decode benchmark, plan.run's host time, memcheck, then the optional sweep and grid
  t gluon1b_tests 90 env ATTN_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n 6 -rf --tb=short \
    tests/test_gluon_decode.py
  t suite_tail 90 env ATTN_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n 8 -rf --tb=short \
    tests/test_relative_bias.py tests/test_sinks.py tests/test_soak.py tests/test_transactional.py
  wait
  b gluon1b_bench 130 python3 -m bench.bench_decode_1b --out $L/decode_1b.json --variants gluon_step2,gluon_ring4
  b plan_host 40 python3 bench/probes/plan_host_profile.py
  b memcheck_1b "${SAN_T:-70}" env OUT=$L/memcheck_1b SANITIZER_TOOLS=memcheck SAN_PYTEST_ARGS="-n 6" \
    bash tests/gpu_sanitize.sh tests/test_gluon_decode.py
  [ -n "${SWEEP:-}" ] && b gluon1b_sweep 90 python3 -m bench.bench_decode_1b --sweep --out $L/decode_1b_sweep.json
  [ -n "${GRID:-}" ] && b gluon_grid 150 python3 -m bench.bench_gluon --grid --out $L --repeat 1 --rep 30 --warmup 10
  grep -h "FAILED\|passed\|failed\|rc=" $L/gluon1b_tests.log $L/suite_tail.log | cut -c1-200
  grep -v "^ *$" $L/gluon1b_bench.log | tail -45
  grep "run=\|rc=" $L/plan_host.log
  grep -sh "sweep\|rc=" $L/gluon1b_sweep.log
  grep -sh "==\|gluon \|serial\|ovl\|noguard\| tl \|default \|cudnn \|rc=" $L/gluon_grid.log | cut -c1-120 | tail -40
  cat $L/memcheck_1b/sanitizer/summary.txt ;;
s11)
  # session 11: the Gluon FP8 prefill's tests beside the Gluon decode's and the suite's last files; then on a
  # quiet GPU the one-byte decode benchmark, the FP8 table (tl.* and Gluon FP8 against our bf16), plan.run's host
  # time, memcheck over the Gluon decode tests, and (SWEEP=1) the decode split sweep
  t gluon1b_tests 100 env ATTN_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n 5 -rf --tb=short \
    tests/test_gluon_decode.py
  t fp8_tests 100 env ATTN_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n 4 -rf --tb=short \
    tests/test_fp8_prefill.py tests/test_nan.py -k "fp8"
  [ -z "${NOTAIL:-}" ] && t suite_tail 100 env ATTN_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n 5 -rf --tb=short \
    tests/test_relative_bias.py tests/test_sinks.py tests/test_soak.py tests/test_transactional.py
  wait
  b gluon1b_bench 130 python3 -m bench.bench_decode_1b --out $L/decode_1b.json --variants ${VARIANTS:-gluon_step2,gluon_ring4}
  b fp8_bench 90 python3 -m bench.bench_gluon --fp8-only --out $L/fp8.json --repeat 1 --rep 30 --warmup 10
  b plan_host 40 python3 bench/probes/plan_host_profile.py
  [ -z "${NOSAN:-}" ] && b memcheck_1b "${SAN_T:-60}" env OUT=$L/memcheck_1b SANITIZER_TOOLS=memcheck SAN_PYTEST_ARGS="-n 6" \
    bash tests/gpu_sanitize.sh tests/test_gluon_decode.py
  [ -n "${SWEEP:-}" ] && b gluon1b_sweep 80 python3 -m bench.bench_decode_1b --sweep --out $L/decode_1b_sweep.json
  grep -h "FAILED\|passed\|failed\|rc=" $L/gluon1b_tests.log $L/fp8_tests.log $L/suite_tail.log 2>/dev/null | cut -c1-200
  grep -v "^ *$" $L/gluon1b_bench.log | tail -45
  grep -A12 "^FP8 prefill, TFLOP" $L/fp8_bench.log; grep "WRONG\|not launched\|rc=\|Error" $L/fp8_bench.log
  grep "run=\|rc=" $L/plan_host.log
  grep -sh "sweep\|rc=" $L/gluon1b_sweep.log
  cat $L/memcheck_1b/sanitizer/summary.txt 2>/dev/null ;;
s12)
  # session 12 call 1: the whole suite (-n 10) beside memcheck over tests/gpu_sanitize.sh's default subset (-n 4
  # sanitized workers); then plan.run's host time on a quiet GPU
  t suite "${SUITE_T:-450}" env ATTN_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n ${SUITE_N:-10} -rf \
    --tb=short --durations=25 tests
  t memcheck "${SAN_T:-450}" env OUT=$L/memcheck SANITIZER_TOOLS=memcheck SAN_PYTEST_ARGS="-n 4" \
    bash tests/gpu_sanitize.sh
  wait
  pkill -9 -f "pytest|compute-sanitizer" ; sleep 2  # no worker left to share the host with the probe
  tar czf "$OUT/logs.tgz" -C $L .
  b plan_host 80 python3 bench/probes/plan_host_profile.py
  grep -h "^FAILED\|passed\|failed\|rc=\|^[0-9.]*s call" $L/suite.log | cut -c1-200 | tail -45
  grep "run=\|rc=\|pass" $L/plan_host.log
  cat $L/memcheck/sanitizer/summary.txt; tail -3 $L/memcheck/sanitizer/memcheck.pytest.log ;;
s12san)
  # session 12 call 3: (DECODE=1) the decode benchmark on a quiet GPU first; the fixed OOM test, then the three sanitizers side by side, each stopping its tests
  # cleanly at SAN_BUDGET: memcheck over the default subset and tests/gpu_memcheck.py, racecheck and synccheck
  # over the default subset's decode/NaN files
  [ -n "${DECODE:-}" ] && b decode 230 python3 -m bench.bench_decode --peers cudnn,flash --out $L/decode.json
  t fixed 90 env ATTN_AUTOTUNE=0 python3 -m pytest -v -p no:cacheprovider -rf --tb=short \
    tests/test_gluon_attention.py::test_dispatch_seqlens
  t memcheck 330 env OUT=$L/memcheck SANITIZER_TOOLS=memcheck SAN_BUDGET=${SAN_BUDGET:-250} \
    SAN_PYTEST_ARGS="-n 7 -v" bash tests/gpu_sanitize.sh
  t racecheck 330 env OUT=$L/racecheck SANITIZER_TOOLS=racecheck SAN_BUDGET=${SAN_BUDGET:-250} \
    SAN_PYTEST_ARGS="-n 3 -v" bash tests/gpu_sanitize.sh tests/test_nan.py tests/test_decode.py tests/test_beam.py \
    tests/test_context.py -m "not gpu"
  t synccheck 330 env OUT=$L/synccheck SANITIZER_TOOLS=synccheck SAN_BUDGET=${SAN_BUDGET:-250} \
    SAN_PYTEST_ARGS="-n 3 -v" bash tests/gpu_sanitize.sh tests/test_nan.py tests/test_decode.py tests/test_beam.py \
    tests/test_context.py -m "not gpu"
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -1)
  ( timeout 200 "$san" --tool memcheck --error-exitcode 1 python3 tests/gpu_memcheck.py \
    > $L/gpu_memcheck.log 2>&1; echo "rc=$?" >> $L/gpu_memcheck.log ) &
  wait
  grep -hs "default-call\|==\|rc=" $L/decode.log; grep -hs -A12 "^TB/s" $L/decode.log | cut -c1-250
  grep -h "passed\|failed\|rc=" $L/fixed.log
  cat $L/*/sanitizer/summary.txt; grep -h "ERROR SUMMARY\|rc=" $L/gpu_memcheck.log ;;
pingpong)
  # the consumers' ping-pong (overlap="pingpong", session 12, compiled on the CPU only): the Gluon tests first, each
  # under a 120 s timeout (a turn that never comes would hang, not fail; the thread method ends the worker), then
  # the FP8 table (its fp8_gluon_pp column) and the bf16 table on the PERF.md shapes (gluon_pingpong is timed on
  # every shape); b's limits bound the tables if the variant hangs there
  # both files whole: the default Gluon tile loop gained the turn bookkeeping's setup too (session 12)
  b pp_tests 240 env ATTN_AUTOTUNE=0 python3 -m pytest -v -p no:cacheprovider -n 12 -rf --tb=short --timeout 120 \
    --timeout-method thread tests/test_gluon_attention.py tests/test_fp8_prefill.py ${PP_K:+-k "$PP_K"}
  b pp_fp8 100 python3 -m bench.bench_gluon --fp8-only --out $L/fp8.json --repeat 1 --rep 30 --warmup 10
  b pp_bf16 250 python3 -m bench.bench_gluon --no-fp8 --no-alibi --no-seqlens --out $L/bf16.json --repeat 1 \
    --rep 30 --warmup 10
  grep -h "FAILED\|passed\|failed\|Timeout\|rc=" $L/pp_tests.log | cut -c1-200 | tail -20
  grep -A12 "^FP8 prefill, TFLOP" $L/pp_fp8.log; grep -v "^ *$" $L/pp_bf16.log | tail -30 ;;
s13)
  # issue 17's open "where does the time go": Nsight Compute on the Gluon FP8 prefill beside the tl.* FP8 kernel,
  # the bf16 Gluon kernel and cuDNN (B4 H32 S4096 D128 causal), and on the Gluon one-byte decode beside the tl.*
  # one; then (GRID=1) the Gluon prefill grid that decides overlap="unmasked" (session 9's prediction in NOTES)
  # the reports stay in /tmp/ncu (too large to bring back); the summaries, details pages and raw CSVs come back
  mkdir -p $L/ncu
  b ncu "${NCU_T:-330}" env OUT=/tmp/ncu bash bench/probes/ncu_profile.sh ${NCU_CASES:-fp8_long fp8_long_tl \
    gluon_long prefill_long_cudnn gdecode_fp8 decode_fp8}
  cp /tmp/ncu/*.txt /tmp/ncu/*.csv /tmp/ncu/*.log $L/ncu/ 2>/dev/null; tar czf "$OUT/logs.tgz" -C $L .
  [ -n "${GRID:-}" ] && b gluon_grid 200 python3 -m bench.bench_gluon --grid --out $L --repeat 1 --rep 30 --warmup 10
  cat $L/ncu/summary_*.txt | cut -c1-200 | head -150
  grep -sh "==\|gluon \|serial\|ovl\|noguard\| tl \|default \|cudnn \|rc=" $L/gluon_grid.log | cut -c1-120 | tail -40 ;;
sweep)
  # issue 17's untuned prefill sweep: 36 shapes drawn from S 512-16k, D 64/128/256, GQA 1/4/8, batch 1-32,
  # causal and full, packed ragged batches (bench_attention.sweep_shapes, seed 0); the call a user makes against
  # cuDNN and FlashAttention-2, one pass (prediction in bench/NOTES.md). Each new shape autotunes on its first
  # call, as a user's would, outside the timing; the JSON is written after every shape, so a cut run keeps them
  b sweep "${SWEEP_T:-560}" python3 -m bench.bench_attention --sweep ${SWEEP_N:-36} --peers cudnn,flash --repeat 1 \
    --out $L/sweep.json
  grep -v "^ *$" $L/sweep.log | tail -50 ;;
sanall)
  # issue 18: one sanitizer (TOOL, default memcheck) over the whole suite, the tests stopped cleanly at SAN_BUDGET;
  # the junit files name every test that ran, and SAN_DONE=<those files> resumes a cut run in a later call.
  # Session 12 measured memcheck at ~0.32 tests/s per worker (the suite unsanitized: ~0.86); xdist workers under
  # one sanitizer never started at -n 7 (100 s) or -n 14 (427 s, session 13), while -n 4 ran. So SAN_PAR separate
  # sanitizer instances, one pytest process each, share the collected ids, started SAN_STAGGER s apart. Eight
  # filled the H100's memory in session 14's first run (the gpu-marked tests now go to SAN_HEAVY of them);
  # <tool>.monitor.txt records host and GPU memory (also per instance) and the tests passed every 10 s. In
  # session 15 a process running gpu-marked tests under memcheck only ever grew (9-45 GB), so those shares now
  # run SAN_CHUNK tests per process. Its memcheck runs passed 1739 of the 2089 ids; the rest:
  #   MODE=sanall TOOL=memcheck SAN_PAR=6 SAN_HEAVY=3 SAN_DONE=bench/results/sanitizer_memcheck_H100_2026-12-07_s15_done.txt
  # Left out by default: the 3000-step GPU soak (97 s unsanitized), which repeats the kernels of the short soak,
  # and test_sanitize_script, which runs this script on the CPU with a stand-in sanitizer (no kernel of ours)
  # TOOL may name several ("memcheck racecheck"): each runs in the time the ones before it left, until SAN_T; with
  # SAN_TOGETHER=1 side by side, each for the whole SAN_T (the GPU held 9 instances of ~1-2 GB and 3 heavy ones in
  # session 15, on 16 cores; but in session 18 memcheck's 3 heavy shares beside racecheck's heavy one filled the
  # H100's 80 GB and ~30 tests failed on it: give SAN_TOGETHER one heavy share in all). Per tool, SAN_DONE_<tool>,
  # SAN_PAR_<tool> and SAN_HEAVY_<tool> override SAN_DONE, SAN_PAR and SAN_HEAVY (a memcheck resume file must not
  # deselect racecheck's tests). PROBE=1 runs the graph-pool probe (the compiled model plain and under memcheck,
  # ~150 s) and then the pools tests (test_memo, test_compile, ~50 s) beside them, one process at a time.
  # DECODE=1 first runs the decode benchmark alone on the quiet GPU (the call a user makes, against cuDNN and FA2),
  # inside SAN_T: the sanitizers get what it leaves
  end=$(( $(date +%s) + ${SAN_T:-570} ))
  san_k=${SAN_K:-not test_gpu_long_soak and not test_sanitize_script}  # the ids the plain map and the tools run
  [ -n "${DECODE:-}" ] && b decode "${DECODE_T:-200}" python3 -m bench.bench_decode --peers cudnn,flash \
    --out $L/decode.json
  # KMAP=1 (after DECODE): the suite once, plainly (-n KMAP_N), recording the kernel binaries each test launches
  # (tests/kernel_map.py); bench/kernel_coverage.py then picks, per tool, tests that launch every one of them, and
  # SAN_PICK=1 gives each tool its pick instead of the suite. The sanitized instances record their own maps, so
  # coverage per binary is read from what they ran (`--ran`), not from the pick
  if [ -n "${KMAP:-}" ]; then
    b kmap "${KMAP_T:-200}" env ATTN_AUTOTUNE=0 ATTN_KERNEL_MAP=$L/kmap python3 -m pytest -q -p no:cacheprovider \
      -n "${KMAP_N:-14}" -rf --tb=line tests -k "$san_k"
    # shellcheck disable=SC2046,SC2086  # one --tool per word of TOOL
    python3 -m bench.kernel_coverage --suite $L/kmap $(printf -- "--tool %s " ${TOOL:-memcheck}) --pick $L/pick \
      > $L/kmap_coverage.txt 2>&1
  fi
  [ -n "${PROBE:-}" ] && t pools_probe 330 env ATTN_AUTOTUNE=0 bash -c "timeout 220 python3 \
    bench/probes/graph_pool_probe.py; python3 -m pytest -v -p no:cacheprovider -rf --tb=short tests/test_memo.py \
    tests/test_compile.py"
  one_tool() {  # one_tool <tool>: its instances over the whole suite, within the time left
    local tool=$1 left budget done_v par_v heavy_v
    done_v=SAN_DONE_$tool; par_v=SAN_PAR_$tool; heavy_v=SAN_HEAVY_$tool
    local par=${!par_v:-${SAN_PAR:-8}}
    # the instances' budget leaves room for collecting the ids (~30 s), the staggered starts and the summaries
    left=$(( end - $(date +%s) - 10 ))
    budget=$(( left - 70 - 5 * par ))
    budget=$(( budget < ${SAN_BUDGET:-500} ? budget : ${SAN_BUDGET:-500} ))
    [ "$budget" -lt 60 ] && { echo "$tool: ${left}s left, not started" > "$L/san_$tool.log"; return; }
    local what=tests
    [ -n "${SAN_PICK:-}" ] && [ -s "$L/pick/pick_$tool.txt" ] && what=@$L/pick/pick_$tool.txt
    timeout -s INT -k 20 "$left" env OUT=$L/$tool SANITIZER_TOOLS=$tool SAN_BUDGET=$budget SAN_PAR=$par \
      SAN_HEAVY=${!heavy_v:-${SAN_HEAVY:-}} SAN_DONE="${!done_v:-${SAN_DONE:-}}" bash tests/gpu_sanitize.sh "$what" \
      -k "$san_k" > "$L/san_$tool.log" 2>&1
    echo "rc=$?" >> "$L/san_$tool.log"
  }
  saving
  for tool in ${TOOL:-memcheck}; do
    if [ -n "${SAN_TOGETHER:-}" ]; then one_tool "$tool" & sleep 20; else one_tool "$tool"; fi
  done
  steps=$(jobs -p | grep -vx "$saver")
  [ -n "$steps" ] && wait $steps  # (a bare wait would also wait for the saver, which never ends)
  saved
  [ -n "${DECODE:-}" ] && { grep -hs "default-call\|==\|rc=" $L/decode.log; grep -hs -A14 "^TB/s" $L/decode.log | cut -c1-250; }
  for tool in ${TOOL:-memcheck}; do
    tail -3 $L/san_$tool.log
    awk 'NR % 3 == 1' $L/$tool/sanitizer/$tool.monitor.txt 2>/dev/null
    cat $L/$tool/sanitizer/summary.txt 2>/dev/null
  done
  if [ -n "${KMAP:-}" ]; then
    tail -4 $L/kmap.log | cut -c1-300
    # shellcheck disable=SC2046,SC2086
    python3 -m bench.kernel_coverage --suite $L/kmap $(for t in ${TOOL:-memcheck}; do echo "--ran $t=$L/$t/sanitizer"; done) \
      > $L/kmap_after.txt 2>&1
    cat $L/kmap_coverage.txt $L/kmap_after.txt | cut -c1-300
    save
  fi
  [ -n "${PROBE:-}" ] && grep -v "PASSED\|^ *$" $L/pools_probe.log | cut -c1-300 | tail -60 ;;
pools)
  # session 15's kept buffers outside CUDA graph pools (df54a22): the MemPool test, the fresh-process compile test,
  # the reduce-overhead test first in its own process under memcheck with the caching allocator (as the graph
  # share runs it), where calls 1-3 of session 15 saw it fail; then the probe (in session 16's call 1 its no-helper
  # controls; since then its variants with the helper and torch's allocation history)
  b pools_tests 180 env ATTN_AUTOTUNE=0 python3 -m pytest -v -p no:cacheprovider -rf --tb=short \
    tests/test_memo.py tests/test_compile.py
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -1)
  b pools_memcheck 180 env -u PYTORCH_NO_CUDA_MEMORY_CACHING ATTN_AUTOTUNE=0 "$san" --tool memcheck \
    --error-exitcode 99 python3 -m pytest -q -p no:cacheprovider --tb=short \
    tests/test_compile.py::test_compiled_model_equals_eager_gpu_reduce_overhead
  b pools_probe 200 env ATTN_AUTOTUNE=0 python3 bench/probes/graph_pool_probe.py
  grep -h "PASSED\|FAILED\|passed\|failed\|rc=" $L/pools_tests.log | cut -c1-200
  cat $L/pools_probe.log
  grep -h "ERROR SUMMARY\|passed\|failed\|rc=" $L/pools_memcheck.log | cut -c1-200 ;;
suite)
  # the whole suite on the GPU alone (GPU tests and the CPU tests on CUDA tensors), fixed tiles; -v names each
  # test as it ends, so a cut run still says what failed; a test over 300 s (a hung kernel: the thread method ends
  # the worker, which a blocking CUDA call would not let a signal do) is reported and the rest go on; then
  # (HOST=1) plan.run's host time on a quiet GPU
  b suite "${SUITE_T:-480}" env ATTN_AUTOTUNE=0 python3 -m pytest -v -p no:cacheprovider -n 14 -rf --tb=short \
    --durations=25 --timeout 300 --timeout-method thread tests
  pkill -9 -f pytest; sleep 2
  [ -n "${HOST:-}" ] && b plan_host 80 python3 bench/probes/plan_host_profile.py
  grep -h "FAILED\|ERROR\|passed\|failed\|rc=\|^[0-9.]*s call" $L/suite.log | cut -c1-220 | tail -60
  grep -hs "run=\|rc=\|pass" $L/plan_host.log ;;
gluon1b)
  # the Gluon one-byte decode: its GPU tests, its benchmark on a quiet GPU, then the whole suite
  b gluon1b_tests 150 env ATTN_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n 8 -rf --tb=short \
    tests/test_gluon_decode.py
  b gluon1b_bench 200 python3 -m bench.bench_decode_1b --out $L/decode_1b.json
  b suite "${SUITE_T:-240}" env ATTN_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n 14 -rf --tb=short tests
  grep -h "FAILED\|passed\|failed\|rc=\|Error" $L/gluon1b_tests.log | cut -c1-300 | tail -30
  grep -v "^ *$" $L/gluon1b_bench.log | tail -30
  grep -h "^FAILED\|passed\|failed\|rc=" $L/suite.log | cut -c1-200 | tail -20 ;;
shards)
  # issue 18's "0 errors over the GPU suite", a few shards a call: SHARDS="0/8 1/8" (tests/gpu_sanitize.sh's
  # SHARD), the three tools side by side; commit each shard's summary.txt
  for sh in ${SHARDS:-0/8}; do
    for tool in memcheck racecheck synccheck; do
      t "san_${tool}_${sh/\//of}" "${SAN_T:-540}" env OUT="$L/${tool}_${sh/\//of}" SANITIZER_TOOLS=$tool SHARD=$sh \
        SAN_PYTEST_ARGS="-n ${SAN_N:-4}" bash tests/gpu_sanitize.sh
    done
  done
  wait
  cat $L/*/sanitizer/summary.txt ;;
sanitize)
  for tool in memcheck racecheck synccheck; do
    t "san_$tool" "${SAN_T:-540}" env OUT=$L/$tool SANITIZER_TOOLS=$tool SAN_PYTEST_ARGS="-n ${SAN_N:-4}" \
      bash tests/gpu_sanitize.sh
  done
  wait
  cat $L/*/sanitizer/summary.txt; tail -n 3 $L/*/sanitizer/*.pytest.log; grep -h "ERROR SUMMARY" $L/*/sanitizer/*.log ;;
verify)
  # the whole suite, GPU tests and the CPU tests on CUDA tensors, with fixed tiles (tuning every test's shape
  # would take hours); the GPU fuzz beside it, one process per entry
  t suite "${SUITE_T:-300}" env ATTN_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -n 8 -rf --tb=short tests
  for e in prefill decode context append_and_preprocess cross gpt_attention; do
    t "fuzz_$e" "${SUITE_T:-300}" env ATTN_AUTOTUNE=0 ATTN_FUZZ_PROFILE=gpu ATTN_FUZZ_SCALE=${FUZZ_SCALE:-3} \
      python3 -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py -k "test_fuzz_$e"
  done
  wait
  grep -h "^FAILED\|passed\|failed\|fuzzed\|rc=" $L/suite.log $L/fuzz_*.log | cut -c1-180 | tail -40 ;;
bench)
  b decode 120 python3 -m bench.bench_decode --quick --out $L/decode_quick.json
  b plan_host 40 python3 bench/probes/plan_host_profile.py
  if [ -n "${TRANSFORMERS:-}" ]; then  # generate() was timed in session 9; sdpa@flash is the new row
    b transformers 150 python3 -m bench.bench_transformers --out $L --layers 4 --new 64 \
      --impls attn,sdpa,sdpa@flash,flex_attention
  fi
  b gluon_grid 150 python3 -m bench.bench_gluon --grid --out $L --repeat 1 --rep 30 --warmup 10
  # the new one-byte decode kernel under memcheck (its clamped loads, its out-of-range tests)
  b memcheck_1b "${SAN_T:-120}" env OUT=$L/memcheck_1b SANITIZER_TOOLS=memcheck SAN_PYTEST_ARGS="-n 4" \
    bash tests/gpu_sanitize.sh tests/test_gluon_decode.py
  grep -h "x\|rc=" $L/decode.log | tail -25; grep "run=" $L/plan_host.log; grep -sv Warn $L/transformers.log | tail -6
  grep -h "==\|gluon \|serial\|noguard\| tl \|default \|cudnn \|rc=" $L/gluon_grid.log | cut -c1-120
  cat $L/memcheck_1b/sanitizer/summary.txt ;;
esac
tar czf "$OUT/logs.tgz" -C $L .
