# The start every device script shares (sourced, after `ws=FOLDER`): strict mode; the results folder $out,
# packed into $OUT/results.tgz on exit; mg3d installed from this checkout without its dependencies (the
# machine's python3 has torch, onnx, numpy, PIL, rich, yaml and safetensors); the GPU(s) named; and the
# workspace $ws made afresh from DATASET (default .gpudata/lego-400): a workspace whose capture stage is done
# is copied as it is; otherwise `from` holds --dataset FOLDER for bench_student.py.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}/r
mkdir -p "$out"
finish() { tar -czf "${OUT:-/tmp/out}/results.tgz" -C "$out" . ; }
trap finish EXIT
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
rm -rf "$ws"
dataset=${DATASET:-.gpudata/lego-400}
if [ -f "$dataset/capture/manifest.json" ]; then cp -a "$dataset" "$ws" && from=(); else from=(--dataset "$dataset"); fi
