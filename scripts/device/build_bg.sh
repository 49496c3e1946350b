#!/usr/bin/env bash
# `mg3d build` on the GPU machine past the device tool's 10-minute limit per command: `start` launches the
# build in its own process session (it outlives the command while the machine is held), every call then
# waits up to SECONDS for it and copies its log, stage manifests and report to $OUT. A machine is held at
# most 30 minutes, so the whole build must fit in one hold: call `wait` again at once after each return.
#
#   bash scripts/device/build_bg.sh start 560 SOURCE [mg3d build options ...]
#   bash scripts/device/build_bg.sh wait 560
#
# Carry .gpudata (SOURCE there, e.g. .gpudata/woman: `mg3d capture ../shared/data/woman-512/woman-512.mp4
# --out .gpudata/woman --frames 70` made on the developer's machine) and .whl (diffusers and
# importlib_metadata wheels for Python 3.12, for the edit: the machine has transformers but not diffusers).
set -uo pipefail
mode=$1 seconds=$2
shift 2
out=${OUT:-/tmp/out}
ws=/tmp/mg3d-build
if [ "$mode" = start ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/install.log 2>&1 || { cat /tmp/install.log; exit 1; }
  source=$1
  shift
  rm -rf "$ws" /tmp/build.log
  PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 setsid nohup python3 -m mg3d build "$source" --out "$ws" "$@" >/tmp/build.log 2>&1 < /dev/null &
  echo $! >/tmp/build.pid
fi
pid=$(cat /tmp/build.pid 2>/dev/null || echo 0)
end=$((SECONDS + seconds))
while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
kill -0 "$pid" 2>/dev/null && echo "build still running (pid $pid): call wait again" || echo "build finished"
grep -v "━" /tmp/build.log | tail -40 >"$out/build_log_tail.txt"
cat "$out/build_log_tail.txt"
# every stage's manifest (times, key figures; the edit's is under edit/<name>/) and the report, in one file
(cd "$ws" 2>/dev/null && find . -maxdepth 3 \( -name manifest.json -o -path "./report*" \) | tar -czf "$out/build.tgz" -T -)
ls "$out"
