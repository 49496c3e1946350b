"""Teacher end to end on CPU at tiny scale: it learns the demo, loads and renders, resumes after an
interruption, stops clearly on divergence and corrupt files, and refuses bad workspaces in one line."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import interrupt_at, one_line_error, read_manifest

#: Mechanics tests: the tiny preset, evaluated on one small view (they check behaviour, not quality).
SHORT = ("--preset", "tiny", "--downscale", "4", "--eval-views", "1", "--save-views", "1", "--chunk", "2048")


@pytest.fixture(scope="module")
def captured(tiny_demo_capture: Path) -> Path:
    """The built-in demo captured with the tiny preset; tests copy it, never change it."""
    return tiny_demo_capture


@pytest.fixture(scope="module")
def learned(tiny_demo_teacher: tuple[Path, str]) -> tuple[Path, str]:
    """The capture with the tiny teacher trained on it (conftest), and the command's output."""
    return tiny_demo_teacher


@pytest.fixture
def ws(captured: Path, tmp_path: Path) -> Path:
    """A fresh copy of the captured demo with no teacher."""
    return Path(shutil.copytree(captured, tmp_path / "ws"))


# ---- learning -----------------------------------------------------------------------------------------
def test_tiny_preset_learns_the_demo(learned: tuple[Path, str], cli) -> None:
    ws, output = learned
    manifest = read_manifest(ws, "teacher")
    metrics = manifest["metrics"]
    # on these held-out views a constant mean colour scores 13.3 dB, the nearest training view 13.5 dB
    assert metrics["psnr"] > 15.5, metrics
    assert 0 < metrics["ssim"] <= 1
    assert metrics["steps"] == 600 and metrics["resumed_from_step"] == 0
    assert metrics["eval_split"] == "test" and metrics["eval_views"] == 3
    assert manifest["config"]["steps"] == 600 and manifest["config"]["downscale"] == 2  # the tiny preset
    assert manifest["inputs"]["capture"]["sha256"]
    folder = ws / "teacher"
    assert (folder / "teacher.safetensors").stat().st_size > 0
    assert json.loads((folder / "teacher.json").read_text())["spec"]["unbounded"] is True  # a capture: unbounded
    picture = Image.open(folder / "renders" / "test_000.png")
    w, h = metrics["eval_resolution"]
    assert picture.size == (3 * w, h)  # truth | render | depth
    assert not list(folder.glob("checkpoint*")) and not list(ws.glob(".teacher.*"))
    # the summary after the run
    assert "teacher done" in output and "psnr" in output and str(folder / "renders") in output
    info = cli("info", ws)
    assert info.exit_code == 0
    row = next(line for line in info.output.splitlines() if line.strip("│┃| ").startswith("teacher"))
    assert "done" in row and "600 steps" in row and "PSNR" in row, info.output
    assert re.search(rf"psnr\s*│\s*{metrics['psnr']:.4g}", info.output), info.output  # the teacher metrics table


def test_load_and_render_a_held_out_view(learned: tuple[Path, str]) -> None:
    import torch

    from mg3d.formats import load_scene
    from mg3d.metrics import psnr
    from mg3d.teacher.evaluate import ground_truth
    from mg3d.teacher.model import Teacher

    ws, _ = learned
    teacher = Teacher.load(ws)
    scene = load_scene(ws)
    i = int(scene.splits["test"][0])
    truth = ground_truth(scene, i, 2)  # [H, W, 3], shrunk like the tiny preset's images
    h, w = truth.shape[:2]
    sx, sy = w / scene.width[i], h / scene.height[i]
    out = teacher.render(torch.as_tensor(scene.c2w[i], dtype=torch.float32)[None], scene.fx[i] * sx, scene.fy[i] * sy, scene.cx[i] * sx, scene.cy[i] * sy, w, h)
    assert out["rgb"].shape == (1, h, w, 3) and out["depth"].shape == (1, h, w) and out["opacity"].shape == (1, h, w)
    rgb = out["rgb"]
    assert torch.isfinite(rgb).all() and rgb.min() >= 0 and rgb.max() <= 1
    assert torch.isfinite(out["depth"]).all() and (out["opacity"] >= 0).all() and (out["opacity"] <= 1 + 1e-5).all()
    # the loaded weights (field and occupancy grid) are the ones that were evaluated: it still learned
    score = float(psnr(rgb.permute(0, 3, 1, 2), torch.from_numpy(truth).permute(2, 0, 1)[None])[0])
    assert score > 14.5, score  # 15.8 dB on this view; a broken load scores far lower
    # the stage folder loads the same model as the workspace
    again = Teacher.load(ws / "teacher").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in teacher.state_dict().items())


def test_march_rounds_render_what_one_pass_renders(learned: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluating an unbounded scene's samples in rounds by rank (opaque rays stop) keeps exactly the
    samples, and so the image, of one pass over every occupied candidate, and evaluates fewer; so do rays
    marched in pieces and a field evaluated in small chunks."""
    import numpy as np
    import torch

    import mg3d.teacher.model as model
    from mg3d.formats import load_scene

    ws, _ = learned
    teacher = model.Teacher.load(ws)
    assert teacher.spec.unbounded
    scene = load_scene(ws)
    i = int(scene.splits["test"][0])
    s = 48 / scene.width[i]
    args = (torch.as_tensor(scene.c2w[i], dtype=torch.float32)[None], scene.fx[i] * s, scene.fy[i] * s, scene.cx[i] * s, scene.cy[i] * s, 48, int(scene.height[i] * s))
    evaluated: list[int] = []
    field = teacher._field_chunked

    def counted(x, features=False, color=False, **kw):
        if not color:
            evaluated.append(len(x))  # density evaluations
        return field(x, features, color, **kw)

    monkeypatch.setattr(teacher, "_field_chunked", counted)
    rounds = teacher.render(*args)
    in_rounds = sum(evaluated)
    evaluated.clear()
    monkeypatch.setattr(model, "MARCH_ROUNDS", ())
    whole = teacher.render(*args)
    assert float(whole["opacity"].mean()) > 0.5  # rays do turn opaque, so rounds do stop some of them
    assert in_rounds < 0.9 * sum(evaluated), (in_rounds, sum(evaluated))
    monkeypatch.setattr(model, "FIELD_CHUNK", 500)  # the field in many chunks, written into one output
    monkeypatch.setattr(model, "SAMPLE_BUDGET", 3000)  # and the rays in pieces of at most 3,000 candidates
    chunked = teacher.render(*args)
    for key in ("rgb", "depth", "opacity"):
        np.testing.assert_allclose(rounds[key].numpy(), whole[key].numpy(), atol=1e-5)
        np.testing.assert_allclose(chunked[key].numpy(), whole[key].numpy(), atol=1e-5)


def test_rerun_is_up_to_date(learned: tuple[Path, str], cli) -> None:
    ws, _ = learned
    before = read_manifest(ws, "teacher")
    weights = (ws / "teacher" / "teacher.safetensors").read_bytes()
    result = cli("teacher", ws, "--preset", "tiny")
    assert result.exit_code == 0 and "up to date" in result.output
    assert read_manifest(ws, "teacher") == before
    assert (ws / "teacher" / "teacher.safetensors").read_bytes() == weights
    assert not list(ws.glob(".teacher.*"))


# ---- interruption, divergence, corrupt files ------------------------------------------------------------
def test_interrupted_training_resumes(ws: Path, cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args = ("teacher", ws, *SHORT, "--steps", "60", "--checkpoint-every", "20")
    straight = Path(shutil.copytree(ws, tmp_path / "straight"))
    with monkeypatch.context() as patch:
        interrupt_at(patch, "mg3d.teacher.train", 40)
        result = cli(*args)
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output
    partial = ws / ".teacher.partial"
    assert json.loads((partial / "checkpoint.json").read_text())["step"] == 40
    assert (partial / "checkpoint.safetensors").is_file()
    assert not (ws / "teacher" / "manifest.json").exists()
    assert "unfinished" in cli("info", ws).output

    result = cli(*args)
    assert result.exit_code == 0, result.output
    metrics = read_manifest(ws, "teacher")["metrics"]
    assert metrics["resumed_from_step"] == 40 and metrics["steps"] == 60
    assert not partial.exists() and not list((ws / "teacher").glob("checkpoint*"))

    # no worse than the same run without the interruption (the checkpoint also keeps the random streams)
    assert cli("teacher", straight, *SHORT, "--steps", "60", "--checkpoint-every", "20").exit_code == 0
    reference = read_manifest(straight, "teacher")["metrics"]
    assert metrics["psnr"] >= reference["psnr"] - 0.05, (metrics["psnr"], reference["psnr"])
    assert metrics["final_loss"] == pytest.approx(reference["final_loss"], rel=0.05)


def test_force_starts_over_instead_of_resuming(ws: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("teacher", ws, *SHORT, "--steps", "40", "--checkpoint-every", "20")
    with monkeypatch.context() as patch:
        interrupt_at(patch, "mg3d.teacher.train", 20)
        assert cli(*args).exit_code == 130
    result = cli(*args, "--force")
    assert result.exit_code == 0, result.output
    assert read_manifest(ws, "teacher")["metrics"]["resumed_from_step"] == 0


def test_divergence_stops_with_one_line_and_keeps_the_good_checkpoint(ws: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from mg3d.teacher.model import Teacher

    real, calls = Teacher.render_rays, [0]

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] > 30:  # from training step 31 on, the colours (and then the weights) are NaN
            out["rgb"] = out["rgb"] * float("nan")
        return out

    monkeypatch.setattr(Teacher, "render_rays", poisoned)
    result = cli("teacher", ws, *SHORT, "--steps", "60", "--checkpoint-every", "16")
    assert result.exit_code == 1
    line = one_line_error(result, "diverged", "step 32", "--lr")
    assert "step 16" in line  # the last good checkpoint is named
    meta = json.loads((ws / ".teacher.partial" / "checkpoint.json").read_text())
    assert meta["step"] == 16  # the checkpoint before the NaNs, not a poisoned one
    assert not (ws / "teacher" / "manifest.json").exists()


def test_out_of_memory_names_the_setting_to_lower(ws: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from mg3d.teacher.model import Teacher

    def exhausted(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Teacher, "render_rays", exhausted)
    result = cli("teacher", ws, *SHORT, "--steps", "20")
    assert result.exit_code == 1
    one_line_error(result, "ran out of memory", "step 0", "--target-samples")
    assert not (ws / "teacher").exists()


def test_corrupt_checkpoint_is_aone_line_error(ws: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("teacher", ws, *SHORT, "--steps", "40", "--checkpoint-every", "20")
    with monkeypatch.context() as patch:
        interrupt_at(patch, "mg3d.teacher.train", 20)
        assert cli(*args).exit_code == 130
    partial = ws / ".teacher.partial"
    meta = json.loads((partial / "checkpoint.json").read_text())
    assert meta["key"]
    (partial / "checkpoint.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    result = cli(*args)
    assert result.exit_code == 1
    one_line_error(result, "corrupt", "checkpoint.safetensors")
    assert not (ws / "teacher" / "manifest.json").exists()
    # a broken checkpoint.json is reported the same way
    (partial / "checkpoint.json").write_text("{not json")
    one_line_error(cli(*args), "corrupt", "checkpoint.json")


def test_corrupt_teacher_weights_raise_teacher_error(tmp_path: Path) -> None:
    from mg3d.teacher import TeacherConfig  # noqa: F401  (the package imports)
    from mg3d.teacher.model import ModelSpec, Teacher, TeacherError

    spec = ModelSpec(
        unbounded=True, bound=1.0, near=0.05, far=100.0, steps_per_ray=32, cone=0.0625, levels=2, features=2,
        log2_size=8, max_resolution=32, hidden=16, grid_resolution=8, appearance=0, num_images=2,
        pose_refine=False, background=None,
    )
    folder = tmp_path / "teacher"
    Teacher(spec).save(folder)
    assert Teacher.load(folder).spec == spec  # the round trip works ...
    (folder / "teacher.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(TeacherError, match="corrupt"):  # ... and garbage is named, not unpickled
        Teacher.load(folder)
    (folder / "teacher.json").write_text("{")
    with pytest.raises(TeacherError, match="corrupt"):
        Teacher.load(folder)
    with pytest.raises(TeacherError, match="no trained teacher"):
        Teacher.load(tmp_path / "nothing")


# ---- refused before training ---------------------------------------------------------------------------
def test_workspace_without_capture(tmp_path: Path, cli) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("teacher", empty)
    assert result.exit_code == 1
    one_line_error(result, "no finished capture stage", "mg3d capture")
    assert not any(empty.iterdir())
    missing = tmp_path / "missing"
    one_line_error(cli("teacher", missing), "does not exist", "mg3d capture")
    assert not missing.exists()


def test_capture_without_training_images(tmp_path: Path, cli) -> None:
    from mg3d.scene import look_at_rotation

    data = tmp_path / "data"
    data.mkdir()
    frames = []
    for i in range(3):
        pose = np.eye(4)
        pose[:3, 3] = [3 * np.cos(i), 3 * np.sin(i), 1.0]
        pose[:3, :3] = look_at_rotation(-pose[:3, 3], np.array([0.0, 0, 1]))
        Image.fromarray(np.full((24, 32, 3), 60 * i, np.uint8)).save(data / f"{i}.png")
        frames.append({"file_path": f"{i}.png", "transform_matrix": pose.tolist()})
    meta = {"fl_x": 30.0, "w": 32, "h": 24, "camera_model": "PINHOLE", "frames": frames,
            "train_filenames": [], "test_filenames": [f["file_path"] for f in frames]}
    (data / "transforms.json").write_text(json.dumps(meta))
    ws = tmp_path / "ws"
    assert cli("capture", data, "--out", ws).exit_code == 0
    result = cli("teacher", ws, "--preset", "tiny")
    assert result.exit_code == 1
    one_line_error(result, "no training images")
    assert not (ws / "teacher").exists()


def test_cuda_requested_without_a_gpu(ws: Path, cli) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    result = cli("teacher", ws, *SHORT, "--steps", "4", "--device", "cuda")
    assert result.exit_code == 1
    one_line_error(result, "no CUDA GPU is visible", "--device cpu")
    assert not (ws / "teacher").exists()


# ---- options ---------------------------------------------------------------------------------------------
def test_every_config_field_is_an_option(cli) -> None:
    from mg3d.cli import _TEACHER_OPTIONS, teacher
    from mg3d.teacher import TeacherConfig

    fields = [f.name for f in dataclasses.fields(TeacherConfig)]
    assert sorted(_TEACHER_OPTIONS) == sorted(fields)
    params = {p.name: p for p in teacher.params}
    assert set(fields) <= set(params)
    help_text = cli("teacher", "--help").output
    for name in fields:
        assert f"--{name.replace('_', '-')}" in help_text, name
    for flag in ("--no-pose-refine", "--no-mixed-precision", "--no-random-background"):
        assert flag in help_text


def test_options_layer_over_preset_and_config(ws: Path, cli, tmp_path: Path) -> None:
    config = tmp_path / "teacher.yaml"
    config.write_text("teacher:\n  steps: 30\n  hidden: 16\n  save_views: 0\n")
    small = ("--downscale", "4", "--chunk", "2048", "--eval-views", "1")
    result = cli("teacher", ws, "--preset", "tiny", *small, "--config", config, "--steps", "20", "--no-random-background")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(ws, "teacher")
    saved = manifest["config"]
    assert (saved["steps"], saved["hidden"], saved["levels"], saved["random_background"], saved["eval_views"]) == (20, 16, 8, False, 1)
    assert manifest["metrics"]["steps"] == 20 and manifest["metrics"]["eval_views"] == 1
    assert not list((ws / "teacher" / "renders").glob("*.png"))  # save_views 0 from the file
    bad = cli("teacher", ws, "--scene", "flat")
    assert bad.exit_code == 2 and "flat" in bad.output  # click refuses it before anything runs


def test_distortion_loss_matches_the_pairwise_sum_and_prefers_one_surface() -> None:
    """The O(S) distortion equals mip-NeRF 360's O(S^2) definition on packed rays of different lengths, and is
    smaller for weight on one surface than for the same weight spread along the ray (fog)."""
    import torch

    from mg3d.teacher.rendering import distortion

    g = torch.Generator().manual_seed(0)
    ray = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    w, ds = torch.rand(9, generator=g), torch.rand(9, generator=g) * 0.1
    s = torch.cat([torch.sort(torch.rand(k, generator=g))[0] for k in (3, 2, 4)])
    want = torch.zeros(3)
    for r in range(3):
        i = ray == r
        wi, si = w[i], s[i]
        want[r] = (wi[:, None] * wi[None] * (si[:, None] - si[None]).abs()).sum() + (wi * wi * ds[i]).sum() / 3
    torch.testing.assert_close(distortion(ray, w, s, ds, 3), want, atol=1e-6, rtol=1e-5)
    s8, ds8 = torch.linspace(0, 1, 8), torch.full((8,), 1 / 8)
    surface = torch.tensor([0, 0, 0, 0.9, 0.1, 0, 0, 0])
    fog = torch.full((8,), 1 / 8)
    ray8 = torch.zeros(8, dtype=torch.long)
    assert distortion(ray8, surface, s8, ds8, 1) < 0.2 * distortion(ray8, fog, s8, ds8, 1)
