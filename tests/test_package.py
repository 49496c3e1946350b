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
