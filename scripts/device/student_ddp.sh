#!/usr/bin/env bash
# The student on several GPUs of one host (DDP through torchrun, NCCL) against the same student on one GPU,
# in one call of the device tool (machine kind nvidia-h200-x2 or larger): one teacher and one set of pseudo
# views, then `mg3d student` for STUDENT_S seconds on 1 GPU and on N GPUs (N = every GPU the host has, or
# GPUS=N), each evaluated on the held-out views, then the N-GPU student's render speed against the teacher.
# GPUS=N above the GPU count puts several processes on a GPU through gloo (MG3D_DIST_BACKEND): on a one-GPU
# machine, a check that the DDP path works on CUDA, not a figure of its scaling.
# Results (each run's manifest, logs, side-by-side PNGs) go to $OUT as one tarball.
#
#   bash scripts/device/background.sh start 560 bash scripts/device/student_ddp.sh 90 2000 240 [--set-like mg3d student options]
#
# Extra arguments go to both `mg3d student` runs (for example --batch 8 --lr 0.001); BENCH_ARGS to
# bench_student.py's teacher, distill and speed phases (a CPU dry run: GPUS=2 BENCH_ARGS="--preset tiny").
# Needs the lego-400 data at .gpudata/lego-400 (carry it), or DATASET=FOLDER as in student_lego.sh.
# NVLink multicast stays off: the machine's NCCL_NVLS_ENABLE=0 and friends are inherited, never overridden.
ws=/tmp/mg3d-ddp
# shellcheck source=scripts/device/common.sh
. "$(dirname "$0")/common.sh"
teacher_s=$1 views=$2 student_s=$3
shift 3
nvidia-smi topo -m >"$out/topo.txt" 2>&1
have=$(nvidia-smi --list-gpus | wc -l)
gpus=${GPUS:-$have}
[ "$gpus" -ge 2 ] || { echo "DDP needs 2 or more processes: this machine has $have GPU(s) (device kind nvidia-h200-x2, or GPUS=2 to share one)"; exit 2; }
if [ "$gpus" -gt "$have" ]; then
  # NCCL wants a GPU for each process: sharing runs the DDP path through gloo, a check that it works on GPUs
  # (CUDA tensors, bf16, compile, the agreement), not a speed figure
  export MG3D_DIST_BACKEND=gloo
  echo "$gpus processes on $have GPU(s): they share them through gloo (a check of the path, not of the scaling)" | tee "$out/shared.txt"
fi
env | grep -E "^(NCCL|TORCH_SYMM|NVSHMEM|MG3D)" | tee "$out/env.txt"
CUDA_VISIBLE_DEVICES=0 python3 scripts/bench_student.py "$ws" "${from[@]}" --phases teacher,distill --teacher-time "$teacher_s" --views "$views" --out "$out" ${BENCH_ARGS:-} 2>&1 \
  | grep --line-buffered -v "━" | tee -a "$out/log.txt"
[ -f "$ws/distill/manifest.json" ] || { echo "no pseudo views: see log.txt"; exit 1; }
for n in 1 "$gpus"; do
  rm -rf "${ws}_$n" && cp -a "$ws" "${ws}_$n"
  start=$SECONDS
  if [ "$n" = 1 ]; then
    CUDA_VISIBLE_DEVICES=0 python3 -m mg3d student "${ws}_$n" --steps 1000000 --max-time-s "$student_s" "$@"
  else
    python3 -m torch.distributed.run --standalone --nproc_per_node "$n" -m mg3d student "${ws}_$n" --steps 1000000 --max-time-s "$student_s" "$@"
  fi 2>&1 | grep --line-buffered -v "━" | tee "$out/log_gpus$n.txt"
  echo "wall_s $((SECONDS - start))" | tee -a "$out/log_gpus$n.txt"
  cp "${ws}_$n/student/manifest.json" "$out/student_gpus$n.json" 2>/dev/null || echo "the $n-GPU run wrote no student"
  for png in "${ws}_$n"/student/renders/*.png; do [ -f "$png" ] && cp "$png" "$out/gpus${n}_$(basename "$png")"; done
done
# the N-GPU student (DDP's weights, saved by rank 0) against the teacher, as bench_student's speed phase times it
if [ -d "${ws}_$gpus/student" ]; then
  cp -a "${ws}_$gpus/student" "${ws}_$gpus/student_ddp"
  CUDA_VISIBLE_DEVICES=0 python3 scripts/bench_student.py "${ws}_$gpus" --phases speed --tag ddp --repeats 20 --rounds 3 --out "$out" ${BENCH_ARGS:-} 2>&1 \
    | grep --line-buffered -v "━" | tee -a "$out/log_speed.txt"
fi
python3 - "$out" "$gpus" <<'PY'
import json
import sys
from pathlib import Path

out, gpus = Path(sys.argv[1]), sys.argv[2]
rows = {}
for n in ("1", gpus):
    path = out / f"student_gpus{n}.json"
    if path.is_file():
        m = json.loads(path.read_text())["metrics"]
        rows[n] = {k: m.get(k) for k in ("steps", "train_time_s", "images_per_s", "train_psnr", "psnr", "ssim", "psnr_vs_teacher", "teacher_psnr", "psnr_gap_to_teacher", "world_size")}
rows["shared_gpus"] = (out / "shared.txt").is_file()  # processes shared GPUs through gloo: no scaling figure
if "1" in rows and gpus in rows and rows["1"]["images_per_s"] and not rows["shared_gpus"]:
    rows["scaling"] = round(rows[gpus]["images_per_s"] / rows["1"]["images_per_s"], 3)
print(json.dumps(rows, indent=1))
(out / "ddp_summary.json").write_text(json.dumps(rows, indent=1))
PY
