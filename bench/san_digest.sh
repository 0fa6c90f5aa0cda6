#!/usr/bin/env bash
# A committable digest of one tests/gpu_sanitize.sh run (its full logs carry a host backtrace per error, megabytes):
#   bash bench/san_digest.sh <OUT/sanitizer folder> <tool> "<header line>"... > bench/results/<name>.log
# Prints the header lines as comments, summary.txt, each instance's printed errors by kind (mangled names cut),
# pytest's error lines, the slowest tests, and the monitor (from the first line's time on).
set -uo pipefail
dir=$1 tool=$2
shift 2
for line in "$@"; do echo "# $line"; done
echo "## summary.txt"
cat "$dir/summary.txt"
echo "## errors printed, by kind, per instance"
for log in "$dir/$tool".*.log; do
  case $log in *.pytest.log) continue ;; esac
  echo "-- $(basename "$log")"
  grep -h "^=========" "$log" | grep -v "^=========  \|^========= *$" | sed 's/_Z[A-Za-z0-9_]*//g' \
    | sed 's/at 0x[0-9a-f]*/at 0x.../; s/address 0x[0-9a-f]*/address 0x.../; s/__shared__ 0x[0-9a-f]*/__shared__ 0x.../' \
    | sed 's/block ([0-9,]*)/block (...)/; s/Thread ([0-9,]*)/Thread (...)/; s/Current Value : .*/Current Value : .../' \
    | sort | uniq -c | sort -rn | cut -c1-220
done
echo "## pytest error lines (all instances)"
grep -h "^E  " "$dir/$tool".*.pytest.log | cut -c1-160 | sort | uniq -c | sort -rn | head -15
echo "## failed tests"
grep -h "^FAILED" "$dir/$tool".*.pytest.log | cut -c1-200 | head -40
echo "## slowest tests (pytest --durations, every instance)"
grep -h "^[0-9.]*s \(call\|setup\|teardown\)" "$dir/$tool".*.pytest.log | sort -rn | head -25
if [ -f "$dir/$tool.monitor.txt" ]; then
  echo "## monitor: seconds since the first line, then the line (host MiB used and available, load, GPU MiB, [share:MiB])"
  awk 'NR == 1 {t0 = $1} {$1 = $1 - t0; print}' "$dir/$tool.monitor.txt"
fi
