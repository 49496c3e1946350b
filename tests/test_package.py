"""Packaging: the layout of the design card, and a light `import mg3d` / `mg3d --help`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_map_to_top_level_folders() -> None:
    import mg3d.bench
    import mg3d.export
    import mg3d.student

    for module, folder in ((mg3d.student, "student"), (mg3d.export, "export"), (mg3d.bench, "bench")):
        assert Path(module.__file__).resolve().parent.name == folder


def test_import_and_help_do_not_import_heavy_modules() -> None:
    code = (
        "import sys, mg3d, mg3d.cli, mg3d.demo\n"
        "from click.testing import CliRunner\n"
        "assert CliRunner().invoke(mg3d.cli.main, ['--help']).exit_code == 0\n"
        "heavy = [m for m in ('torch', 'diffusers', 'coremltools', 'pycolmap', 'av', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_console_script_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "mg3d", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "mg3d" in out.stdout


def test_demo_and_presets_ship_with_the_package() -> None:
    from importlib import resources

    from mg3d.demo import ground_truth, video_path

    assert video_path().stat().st_size > 100_000
    assert len(ground_truth()["frames"]) == 60
    for name in ("tiny", "default", "quality"):
        assert (resources.files("mg3d.configs") / f"{name}.yaml").is_file()


def test_pyproject_holds_only_the_build_system() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert "[build-system]" in text and "[project]" not in text and "[tool." not in text


def test_background_runner_returns_the_files_and_refuses_a_fresh_machine(tmp_path: Path) -> None:
    """scripts/device/background.sh (the GPU runs past the 10-minute limit per call): a run's files come back
    once it has finished; a `wait` on a machine where nothing was started (the last one went back) says so
    at once instead of spending the wait."""
    script = ROOT / "scripts" / "device" / "background.sh"
    out = tmp_path / "out"
    out.mkdir()
    env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "BACKGROUND_DIR": str(tmp_path / "bg")}
    fresh = subprocess.run(["bash", str(script), "wait", "60"], capture_output=True, text=True, env=env, timeout=30)
    assert fresh.returncode == 3 and "start it again" in fresh.stdout
    job = 'sleep 1; echo "{\\"psnr\\": 30}" > "$OUT/result.json"; echo done'
    started = subprocess.run(["bash", str(script), "start", "0", "bash", "-c", job], capture_output=True, text=True, env=env, timeout=30)
    assert started.returncode == 0 and "still running" in started.stdout and not (out / "result.json").exists()
    waited = subprocess.run(["bash", str(script), "wait", "20"], capture_output=True, text=True, env=env, timeout=60)
    assert waited.returncode == 0 and "finished" in waited.stdout
    assert (out / "result.json").read_text().strip() == '{"psnr": 30}' and "done" in (out / "log_tail.txt").read_text()


def test_bench_frame_exports_a_spec_and_times_files_in_turn(tmp_path: Path) -> None:
    """scripts/bench_frame.py: `export` writes a student of the spec (changed by --set) that onnxruntime runs;
    `time` gives each file's median and its ratio to the first; `profile` onnxruntime's time per op type and
    node; a missing file or field gets one clear line, and
    `gpu` on a machine without CUDA says so."""
    script = str(ROOT / "scripts" / "bench_frame.py")
    small = [f"--set={kv}" for kv in ("width_px=32", "height_px=32", "fx=40", "fy=40", "cx=16", "cy=16", "depth=1", "width=8",
                                       "detail_resolution=16", "occupancy=8", "head_width=8", "detail_points=2")]
    for name, extra in (("a", []), ("b", ["--set=march_box=false"])):
        done = subprocess.run([sys.executable, script, "export", str(tmp_path / f"{name}.onnx"), *small, *extra], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    timed = subprocess.run([sys.executable, script, "time", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--rounds", "2", "--json", str(tmp_path / "t.json")],
                           capture_output=True, text=True, timeout=300)
    assert timed.returncode == 0, timed.stderr
    result = json.loads((tmp_path / "t.json").read_text())
    first, second = (result[str(tmp_path / n)] for n in ("a.onnx", "b.onnx"))
    assert first["median_ratio_to_first"] == 1.0 and first["median_ms"] > 0 and second["median_ratio_to_first"] > 0
    missing = subprocess.run([sys.executable, script, "time", str(tmp_path / "none.onnx")], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "no such ONNX file" in missing.stderr
    profiled = subprocess.run([sys.executable, script, "profile", str(tmp_path / "a.onnx"), "--runs", "2", "--rows", "40"], capture_output=True, text=True, timeout=300)
    assert profiled.returncode == 0, profiled.stderr
    report = json.loads(profiled.stdout)  # ms a frame per op type and for the costliest nodes, with their shapes
    assert {"Conv", "Gather", "DepthToSpace"} <= set(report["ops"]) and report["frame_ms"] > 0
    assert len(report["nodes"]) == 40 and all(ms >= 0 and "[" in shape for _, ms, shape in report["nodes"])
    assert sum(ms for ms, _ in report["ops"].values()) <= report["kernels_ms"] + 0.5
    missing = subprocess.run([sys.executable, script, "profile", str(tmp_path / "none.onnx")], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "no such ONNX file" in missing.stderr
    wrong = subprocess.run([sys.executable, script, "export", str(tmp_path / "c.onnx"), "--set=depthh=2"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and "depthh is no StudentSpec field" in wrong.stderr and not (tmp_path / "c.onnx").exists()
    import torch

    if not torch.cuda.is_available():  # as on CI
        nogpu = subprocess.run([sys.executable, script, "gpu", "--json", str(tmp_path / "g.json")], capture_output=True, text=True, timeout=60)
        assert nogpu.returncode != 0 and "no CUDA device" in nogpu.stderr and not (tmp_path / "g.json").exists()
