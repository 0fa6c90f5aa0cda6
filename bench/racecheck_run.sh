# Racecheck helpers for the device scripts (bench/gpu_s21*.sh), sourced after setting L, the log folder:
#   racecheck <tag> <limit s> <print limit> <command...>   every hazard reported into $L/<tag>.log, the command's
#                                                          own output (and its exit status) into $L/<tag>.out
#   race_digests <log>...                                  each log's hazards by access pair and by CTA
#                                                          (bench/race_digest.py), then its command's last lines
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -1)
racecheck() {
  local tag=$1 lim=$2 limit=$3
  shift 3
  timeout -s INT -k 10 "$lim" "$SAN" --tool racecheck --racecheck-report all --print-limit "$limit" \
    --log-file "$L/$tag.log" "$@" > "$L/$tag.out" 2>&1
  echo "rc=$?" >> "$L/$tag.out"
}
race_digests() {
  local f
  for f in "$@"; do
    python3 -m bench.race_digest "$f" | cut -c1-250
    tail -2 "${f%.log}.out" | cut -c1-200
  done
}
