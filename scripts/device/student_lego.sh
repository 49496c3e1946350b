#!/usr/bin/env bash
# GPU benchmark of the student on lego-400 in one call of the device tool (10-minute limit per command):
# teacher -> pseudo views -> one student per variant -> PSNR/SSIM on the 200 test views -> render speed of
# student vs teacher. Results (JSON per phase, side-by-side PNGs, the log) go to $OUT as one tarball.
#
#   bash scripts/device/student_lego.sh TEACHER_S VIEWS STUDENT_S "tag:--set k=v --set k=v" ["tag2:..."]
#   PARALLEL=1 bash scripts/device/student_lego.sh ...   # the variants side by side on the one GPU
#
# Needs the lego-400 data at .gpudata/lego-400 (copy ../shared/data/lego-400 there; .gpudata is in
# .gitignore and travels with carry=[".gpudata/lego-400"]). DATASET=FOLDER takes another dataset, or a workspace
# whose capture stage is done (a real capture, made on the CPU: `mg3d capture VIDEO --out .gpudata/ws-woman`),
# which is copied and used as it is (its held-out frames are the test views). The start is common.sh's.
ws=/tmp/mg3d-lego
# shellcheck source=scripts/device/common.sh
. "$(dirname "$0")/common.sh"
teacher_s=$1 views=$2 student_s=$3
shift 3
# BENCH_ARGS: extra options for every call (a CPU dry run: --preset tiny --teacher-set eval_views=2)
# shellcheck disable=SC2086
python3 scripts/bench_student.py "$ws" "${from[@]}" --phases teacher,distill --teacher-time "$teacher_s" --views "$views" --out "$out" ${BENCH_ARGS:-} 2>&1 | grep --line-buffered -v "━" | tee -a "$out/log.txt"
# PARALLEL=1 trains the variants at the same time on the one GPU (each gets part of it: a conservative figure
# for each, and several in one call); otherwise one after the other
for variant in "$@"; do  # "tag:args" trains and evaluates; "tag+speed:args" also times student vs teacher
  tag=${variant%%:*}
  args=${variant#*:}
  phases=student
  case $tag in *+speed) tag=${tag%+speed} phases=student,speed ;; esac
  # side by side, the speed is timed after every variant has finished (no other training on the GPU then)
  if [ "${PARALLEL:-0}" = 1 ] && [ $phases = student,speed ]; then phases=student timed="${timed:-} $tag"; fi
  # shellcheck disable=SC2086  # args holds several --set options
  vws=$ws
  if [ "${PARALLEL:-0}" = 1 ]; then vws=${ws}_$tag && rm -rf "$vws" && cp -a "$ws" "$vws"; fi  # a workspace each: one student stage per workspace
  run() { python3 scripts/bench_student.py "$vws" --phases "$phases" --tag "$tag" --student-time "$student_s" --repeats 20 $args --out "$out" ${BENCH_ARGS:-} 2>&1 | grep --line-buffered -v "━" | tee -a "$out/log_$tag.txt"; }
  if [ "${PARALLEL:-0}" = 1 ]; then run & else run; fi
done
wait
for t in ${timed:-}; do
  # shellcheck disable=SC2086
  python3 scripts/bench_student.py "${ws}_$t" --phases speed --tag "$t" --repeats 20 --out "$out" ${BENCH_ARGS:-} 2>&1 | grep --line-buffered -v "━" | tee -a "$out/log_$t.txt"
done
# the last variant's student and the teacher, in fp16, gzipped (their occupancy grids are mostly zeros; with
# the results tarball the raw files came to 67.2 MB, over the 64 MiB that may come back) and cut into parts
# under the 16 MiB a returned file may have (join with `cat NAME.part* | gunzip`): CPU export and speed checks
# on the developer's machine
python3 - "${vws:-$ws}" "${OUT:-/tmp/out}" "${tag:-}" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
ws, out, tag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
for folder, name in ((ws / f"student_{tag}", "student"), (ws / "teacher", "teacher")):
    if (folder / f"{name}.safetensors").is_file():
        tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(folder / f"{name}.safetensors").items()}
        save_file(tensors, out / f"{name}.fp16.safetensors")
        (out / "r" / f"{name}.json").write_text((folder / f"{name}.json").read_text())  # in results.tgz: few files come back
PY
for f in "${OUT:-/tmp/out}"/*.fp16.safetensors; do
  [ -f "$f" ] && gzip -1 "$f" && f=$f.gz
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 15000000 ] && split -b 15000000 -d "$f" "$f.part" && rm "$f"
done
ls -la "${OUT:-/tmp/out}"
