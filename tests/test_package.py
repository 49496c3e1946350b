"""Packaging: the layout of the design card, and a light `import mg3d` / `mg3d --help`."""

from __future__ import annotations

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
