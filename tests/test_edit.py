"""Edit: the 3D machinery with a deterministic editor (the edit must reach views that were never edited),
the real InstructPix2Pix code path with a tiny random-weight pipeline, preview, resume, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mg3d.cli import main
from tests.conftest import one_line_error, read_manifest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

# small and quick on 2 cores: 63x47 images, one round of edits, a short fine-tune
QUICK = ["--preset", "tiny", "--downscale", "4", "--eval-views", "3"]


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def ip2p(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete diffusers InstructPix2Pix folder with random weights and a local tokenizer (no download)."""
    from mg3d.edit.random_models import save_pipeline

    return save_pipeline(tmp_path_factory.mktemp("models") / "ip2p-tiny", size="tiny")


@pytest.fixture
def ws(tiny_demo_teacher: tuple[Path, str], tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_demo_teacher[0], tmp_path / "ws"))


def test_color_edit_reaches_held_out_views_resumes_and_feeds_distill(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mg3d.edit.editors import ColorShift

    # 1. Ctrl-C during the second batch of edits: the finished edits are kept for the next run
    calls = {"n": 0}
    real_edit = ColorShift.edit

    def interrupted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_edit(self, *args, **kwargs)

    monkeypatch.setattr(ColorShift, "edit", interrupted)
    args = ["edit", ws, "--prompt", "recolour the scene", "--edit-model", "builtin:color", *QUICK, "--rounds", "1", "--steps", "300"]
    result = invoke(*args)
    assert result.exit_code == 130
    partial = ws / "edit" / ".recolour-the-scene.partial"
    assert len(list((partial / "images").glob("*.png"))) == 4  # one batch of --edit-batch 4
    assert not (ws / "edit" / "recolour-the-scene").exists() and not (ws / "edit" / "active.json").exists()

    # 2. another prompt under the same name is refused, not mixed into the interrupted one
    result = invoke(*args[:3], "make it blue", *args[4:], "--name", "recolour-the-scene")
    one_line_error(result, "interrupted edit", "recolour the scene", "--force")
    assert result.exit_code == 1

    # 3. the same command resumes and finishes
    monkeypatch.setattr(ColorShift, "edit", real_edit)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    folder = ws / "edit" / "recolour-the-scene"
    m = read_manifest(ws, "edit/recolour-the-scene")["metrics"]
    assert m["edits"] == 4 + 21 and m["mode"] == "rounds" and m["editor"] == "builtin:color"
    # the held-out views were never edited; they must now look like the transform of the original renders
    assert m["held_out_psnr_vs_transform"] > 24.0, m
    assert m["held_out_psnr_vs_transform"] > m["held_out_psnr_unedited_vs_transform"] + 8.0, m
    assert not partial.exists() and json.loads((ws / "edit" / "active.json").read_text()) == {"name": "recolour-the-scene"}
    from mg3d.formats.nerfstudio import load_nerfstudio

    edited = load_nerfstudio(folder / "transforms.json")
    assert len(edited.splits["train"]) == 21 and edited.image(0).shape == (47, 63, 3)
    assert len(list((folder / "renders").glob("view_*.png"))) == 3

    # 4. later stages read the active edit; --use none switches back to the teacher
    result = invoke("distill", ws, "--preset", "tiny", "--views", "4")
    assert result.exit_code == 0, result.output
    distill = read_manifest(ws, "distill")
    assert distill["metrics"]["source"] == "edit/recolour-the-scene" and "edit" in distill["inputs"]
    info = json.loads(invoke("info", ws, "--json").output)
    assert info["stages"]["edit/recolour-the-scene"]["metrics"]["edits"] == 25
    assert invoke("edit", ws, "--use", "none").exit_code == 0
    from mg3d.workspace import Workspace

    assert Workspace(ws).field_source() == "teacher"
    one_line_error(invoke("edit", ws, "--use", "nonexistent"), "no finished edit named 'nonexistent'", "recolour-the-scene")


def test_instruct_pix2pix_runs_end_to_end_with_a_tiny_random_pipeline(ws: Path, ip2p: Path) -> None:
    result = invoke("edit", ws, "--prompt", "make it snowy", "--edit-model", ip2p, *QUICK, "--mode", "idu", "--steps", "30", "--edit-every", "10")
    assert result.exit_code == 0, result.output
    m = read_manifest(ws, "edit/make-it-snowy")["metrics"]
    assert m["edits"] == 3 and m["mode"] == "idu" and m["editor"] == str(ip2p)
    assert m["edit_s"] > 0 and np.isfinite(m["train_view_psnr_vs_edits"])
    assert "held_out_psnr_vs_transform" not in m  # only a known transform has an expected picture
    # a second prompt keeps its own result next to the first
    result = invoke("edit", ws, "--prompt", "make it autumn", "--edit-model", ip2p, *QUICK, "--mode", "idu", "--steps", "10", "--edit-every", "10")
    assert result.exit_code == 0, result.output
    from mg3d.workspace import Workspace

    assert Workspace(ws).edits() == ["make-it-autumn", "make-it-snowy"] and Workspace(ws).active_edit() == "make-it-autumn"
    # rerunning the same edit is skipped and makes it active again
    result = invoke("edit", ws, "--prompt", "make it snowy", "--edit-model", ip2p, *QUICK, "--mode", "idu", "--steps", "30", "--edit-every", "10")
    assert result.exit_code == 0 and "up to date" in result.output and Workspace(ws).active_edit() == "make-it-snowy"


def test_preview_edits_photos_in_2d_from_the_capture_alone(tiny_demo_capture: Path, tmp_path: Path, ip2p: Path) -> None:
    ws = Path(shutil.copytree(tiny_demo_capture, tmp_path / "ws"))
    result = invoke("edit", ws, "--prompt", "Turn it into a Van Gogh painting", "--edit-model", ip2p, "--preview", "--preview-views", "2")
    assert result.exit_code == 0, result.output
    picture = ws / "edit" / "previews" / "turn-it-into-a-van-gogh-painting.png"
    from PIL import Image

    width, height = Image.open(picture).size
    photo = Image.open(next((ws / "capture" / "images").iterdir())).size
    assert (width, height) == (2 * photo[0], 2 * photo[1])
    assert not (ws / "teacher").exists() and not (ws / "edit" / "active.json").exists()


def test_bad_input_gets_one_line_and_writes_nothing(ws: Path, ip2p: Path, tiny_demo_capture: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = sorted(p.name for p in ws.iterdir())
    one_line_error(invoke("edit", ws, "--prompt", "   ", "--edit-model", "builtin:color"), "prompt is empty")
    # no weights: the default model id is neither cached nor reachable here
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_error(invoke("edit", ws, "--prompt", "make it snowy"), "timbrooks/instruct-pix2pix", "--edit-model FOLDER", "--no-edit")
    assert "huggingface-cli download" in line
    one_line_error(invoke("edit", ws, "--prompt", "x", "--edit-model", tmp_path / "nowhere"), "does not exist")
    broken = Path(shutil.copytree(ip2p, tmp_path / "broken"))
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    one_line_error(invoke("edit", ws, "--prompt", "x", "--edit-model", broken), "incomplete", "unet weights")
    one_line_error(invoke("edit", ws, "--prompt", "x", "--edit-model", "builtin:color", "--name", "../up"), "simple folder name")
    assert sorted(p.name for p in ws.iterdir()) == before  # nothing written, nothing trained
    no_teacher = Path(shutil.copytree(tiny_demo_capture, tmp_path / "capture-only"))
    one_line_error(invoke("edit", no_teacher, "--prompt", "x", "--edit-model", "builtin:color"), "no finished teacher stage", "mg3d teacher")
    one_line_error(invoke("distill", no_teacher, "--source", "edit"), "no finished teacher")


def test_editor_pieces() -> None:
    from mg3d.edit import slug
    from mg3d.edit.editors import ColorShift, noise_range
    from mg3d.edit.random_models import build
    from mg3d.edit.editors import InstructPixPix

    assert slug("Turn her into a Van Gogh painting!") == "turn-her-into-a-van-gogh-painting"
    assert slug("!!!").startswith("edit-") and slug("!!!") != slug("???")
    assert noise_range(0.02, 0.98, 0, 3) == (0.02, 0.98) and noise_range(0.02, 0.98, 2, 3) == pytest.approx((0.02, 0.5))
    white = torch.ones(1, 2, 2, 3)
    assert torch.allclose(ColorShift().edit(white, white, "x"), torch.full_like(white, 0.9))
    editor = InstructPixPix(**build("tiny"), device=torch.device("cpu"), dtype=torch.float32)
    steps = editor.timesteps(600)
    assert len(steps) == 20 and steps == sorted(steps, reverse=True) and steps[0] <= 600 and steps[-1] == 1
    assert editor.size_for(511, 300) == (512, 300) and editor.multiple == 4
    # the same seed gives the same edit; the output keeps the input's size and range
    image = torch.rand(1, 30, 40, 3)
    a = editor.edit(image, image, "snow", generator=torch.Generator().manual_seed(1))
    b = editor.edit(image, image, "snow", generator=torch.Generator().manual_seed(1))
    assert a.shape == image.shape and torch.equal(a, b) and 0 <= float(a.min()) and float(a.max()) <= 1


def test_nested_stage_folders(tmp_path: Path) -> None:
    from mg3d.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    with pytest.raises(RuntimeError):
        with ws.begin("edit/a", {}, {}, resumable=True) as run_:
            assert run_.path == tmp_path / "ws" / "edit" / ".a.partial"
            (run_.path / "checkpoint.json").write_text("{}")  # something to resume from: the folder stays
            raise RuntimeError
    assert ws.partial_stages() == ["edit/a"]
    with ws.begin("edit/b", {}, {}) as run_:
        (run_.path / "x.txt").write_text("x")
    assert ws.edits() == ["b"] and "edit/b" in ws.stages() and ws.manifest("edit/b") is not None


def test_occupancy_limit_grows_the_teachers_cells_and_holds_through_updates() -> None:
    from mg3d.teacher.occupancy import OccupancyGrid

    grid = OccupancyGrid(8)
    grid.mask.zero_()
    grid.mask[(3 * 8 + 4) * 8 + 5] = True  # cell (3, 4, 5)
    assert grid.limit_to_dilated(1) == pytest.approx(27 / 512)
    assert int(grid.mask.sum()) == 1  # the mask itself is not grown, only what later updates may occupy
    grid.update(lambda u: torch.full((len(u),), 10.0), threshold=0.01, all_cells=True)  # dense everywhere
    cells = grid.mask.nonzero().squeeze(-1)
    coords = torch.stack([cells // 64, (cells // 8) % 8, cells % 8], -1)
    assert len(cells) == 27 and (coords - torch.tensor([3, 4, 5])).abs().max() == 1
    assert grid.limit_to_dilated(0) == pytest.approx(27 / 512)


def test_edit_fills_only_cells_near_the_teachers_unless_told(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise edits (random weights, or wildly inconsistent ones) fitted freely turn into fog in empty space;
    by default the edit may occupy only the teacher's occupied cells grown by --grow-cells."""
    from mg3d.edit.editors import ColorShift
    from mg3d.teacher.model import Teacher

    monkeypatch.setattr(ColorShift, "edit", lambda self, renders, *a, **k: torch.rand(renders.shape, generator=torch.Generator().manual_seed(0)))
    teacher = Teacher.load(ws / "teacher")
    r = teacher.grid.resolution
    cells = torch.arange(r**3)
    x = cells // (r * r)
    teacher.grid.mask &= x < r // 2  # the teacher's far half of the grid is free space
    teacher.save(ws / "teacher")
    occupied_teacher = float(teacher.grid.mask.float().mean())  # about 0.5: the near half, where the tiny teacher sees something
    free = x >= r // 2
    occupied = {}
    for grow in (-1, 0, 2):
        name = f"noise{grow}"
        result = invoke("edit", ws, "--prompt", "noise", "--name", name, "--edit-model", "builtin:color", *QUICK, "--eval-views", "1", "--rounds", "1",
                        "--steps", "40", "--grow-cells", grow)
        assert result.exit_code == 0, result.output
        m = read_manifest(ws, f"edit/{name}")["metrics"]
        mask = Teacher.load(ws / "edit" / name).grid.mask
        assert m["grid_occupied_edited"] == pytest.approx(float(mask.float().mean()), abs=1e-4)
        assert m["grid_occupied_teacher"] == pytest.approx(occupied_teacher, abs=1e-4) and 0.4 < occupied_teacher <= 0.5
        occupied[grow] = mask
    assert int((occupied[-1] & free).sum()) > 0.5 * int(free.sum())  # free: the dense field fills the free half again
    assert not (occupied[0] & free).any()  # kept to the teacher's cells
    grown = occupied[2] & free
    assert grown.any() and int(x[grown].max()) <= r // 2 + 1  # two cells into the free half, no further
