#!/usr/bin/env bash
# `mg3d build` on the GPU machine past the device tool's 10-minute limit per command: `start` launches the
# build in its own process session (it outlives the command while the machine is held), every call then
# waits up to SECONDS for it and copies its log, stage manifests and report to $OUT. A machine is held at
# most 30 minutes, so the whole build must fit in one hold: call `wait` again at once after each return.
#
#   bash scripts/device/build_bg.sh start 560 SOURCE [mg3d build options ...]
#   bash scripts/device/build_bg.sh wait 560
#   bash scripts/device/build_bg.sh resume 560 SOURCE [options]   # same, in the workspace a stopped build left
#
# Carry .gpudata (SOURCE there: the video, e.g. .gpudata/woman-512.mp4, or a captured workspace) and .whl:
# the Python 3.12 packages the machine lacks (it has torch, transformers, onnx, onnxruntime), as wheels or,
# when the wheels exceed the 64 MiB carry limit, as one .whl/site.tar.xz of a `pip install --target site`:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d /tmp/w diffusers importlib_metadata pycolmap av
#   pip install --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --target /tmp/site /tmp/w/*.whl && tar -cJf .whl/site.tar.xz -C /tmp site
set -uo pipefail
mode=$1 seconds=$2
shift 2
out=${OUT:-/tmp/out}
ws=/tmp/mg3d-build
if [ "$mode" = start ] || [ "$mode" = resume ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  if [ -f .whl/site.tar.xz ]; then tar -xJf .whl/site.tar.xz -C /tmp || exit 1; fi
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/install.log 2>&1 || { cat /tmp/install.log; exit 1; }
  source=$1
  shift
  if [ "$mode" = start ]; then rm -rf "$ws"; fi
  rm -f /tmp/build.log
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
