#!/usr/bin/env bash
# Any benchmark on the GPU machine past the device tool's 10-minute limit per command: `start` launches
# COMMAND in its own process session (it outlives the call while the machine is held) with OUT pointing at
# /tmp/bg/out; every call then waits up to SECONDS for it and copies the files it wrote there, and its log
# tail, to this call's $OUT (while it runs: its JSON files and logs so far, as partial.tgz). A machine is held
# at most 30 minutes: call `wait` again at once after each return, with SECONDS well under the call's limit
# (the device tool lowers that limit to the session's device time left): a call cut off returns nothing.
#
#   bash scripts/device/background.sh start 560 bash scripts/device/student_lego.sh 90 3000 1080 "tag:--set lr=0.001"
#   bash scripts/device/background.sh wait 560
set -uo pipefail
[ $# -ge 2 ] || { echo "usage: background.sh start SECONDS COMMAND [ARGS ...] | background.sh wait SECONDS"; exit 2; }
mode=$1 seconds=$2
shift 2
out=${OUT:-/tmp/out}
bg=${BACKGROUND_DIR:-/tmp/bg}
if [ "$mode" = start ]; then
  [ $# -gt 0 ] || { echo "usage: background.sh start SECONDS COMMAND [ARGS ...]"; exit 2; }
  rm -rf "$bg" && mkdir -p "$bg/out"
  OUT=$bg/out PYTHONUNBUFFERED=1 setsid nohup "$@" >"$bg/log" 2>&1 </dev/null &
  echo $! >"$bg/pid"
elif [ "$mode" != wait ]; then
  echo "mode $mode is unknown: use start or wait"
  exit 2
fi
pid=$(cat "$bg/pid" 2>/dev/null)
if ! [[ "$pid" =~ ^[1-9][0-9]*$ ]]; then
  # a fresh machine (the last one went back: idle past its release time, or taken): `kill -0 0` would hold
  # for the whole wait, spending device time on nothing
  echo "no run was started on this machine (a fresh one: the run on the last was lost with it): start it again"
  exit 3
fi
end=$((SECONDS + seconds))
while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
if kill -0 "$pid" 2>/dev/null; then
  echo "still running (pid $pid): call wait again"
  # what it has written so far (JSON results, logs) comes back too, in case no later call does
  (cd "$bg/out" && find . -name "*.json" -o -name "log*.txt" | tar -czf "$out/partial.tgz" -T -) 2>/dev/null
else
  echo "finished"
  find "$bg/out" -maxdepth 1 -type f -exec cp {} "$out/" \;  # its files, not its folders (few files come back)
fi
grep -v "━" "$bg/log" 2>/dev/null | tail -60 >"$out/log_tail.txt"
cat "$out/log_tail.txt"
ls -la "$out"
