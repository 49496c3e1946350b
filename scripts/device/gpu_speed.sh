#!/usr/bin/env bash
# GPU render speed of a trained student against its teacher, in one call of the device tool, from a workspace
# carried without its images (the lego capture's 51 MB and the two fp32 weight files would pass the 64 MiB
# that a call may carry):
#
#   bash scripts/device/gpu_speed.sh DIR frame [ARGS of bench_frame.py gpu]      # forms of a spec, random weights
#   bash scripts/device/gpu_speed.sh DIR speed [ARGS of bench_student.py speed]  # the pair, in rounds
#
# DIR (under .gpudata, carried) holds workspace.json, capture/transforms.json, teacher/ and student_fast/ with
# their JSON and their weights as fp16 safetensors, gzipped (NAME.safetensors.gz; load_state_dict casts them
# back to fp32). The speed phase reads only the cameras, so the images are written here as empty files.
# Results go to $OUT.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: gpu_speed.sh DIR frame|speed [ARGS ...]"; exit 2; }
dir=$1 mode=$2
shift 2
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } | tee "$out/gpu.txt"
if [ "$mode" = frame ]; then
  (cd scripts && python3 bench_frame.py gpu --json "$out/frame.json" "$@") 2>&1 | grep -v Warning | tee "$out/log_frame.txt"
  exit "${PIPESTATUS[0]}"
fi
[ "$mode" = speed ] || { echo "mode $mode is unknown: use frame or speed"; exit 2; }
ws=/tmp/mg3d-speed
rm -rf "$ws" && mkdir -p "$ws"
cp -r "$dir"/. "$ws"/
for f in "$ws"/teacher/*.gz "$ws"/student_fast/*.gz; do gunzip -f "$f"; done
python3 - "$ws/capture/transforms.json" <<'PY'
import json, sys
from pathlib import Path
file = Path(sys.argv[1])
for frame in json.loads(file.read_text())["frames"]:
    path = file.parent / frame["file_path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
PY
python3 scripts/bench_student.py "$ws" --phases speed --tag fast --out "$out" "$@" 2>&1 | grep -v Warning | tee "$out/log_speed.txt"
