"""Capture end to end: video and photos -> frames -> SfM -> normalized scene; and every kind of bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import demo_frames, read_manifest, shared_data, textured_frames, write_video
from mg3d.formats import load_scene


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Similarity (R, t, s) minimising |s R src + t - dst|: [N, 3], [N, 3] -> [3, 3], [3], float."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    u, d, vt = np.linalg.svd((dst - mu_d).T @ (src - mu_s) / len(src))
    fix = np.diag([1, 1, np.sign(np.linalg.det(u @ vt))])
    rot = u @ fix @ vt
    scale = np.trace(np.diag(d) @ fix) / ((src - mu_s) ** 2).sum(1).mean()
    return rot, mu_d - scale * rot @ mu_s, scale


@pytest.fixture
def demo_ws(tiny_demo_capture: Path) -> Path:
    return tiny_demo_capture


def test_demo_capture_recovers_the_true_cameras(demo_ws: Path) -> None:
    from mg3d.demo import ground_truth

    metrics = read_manifest(demo_ws)["metrics"]
    assert metrics["frames_selected"] == 24 and metrics["frames_registered"] >= 23
    assert metrics["mean_reprojection_error_px"] < 1.0
    scene = load_scene(demo_ws)
    frames = {f["name"]: f for f in json.loads((demo_ws / "capture" / "frames.json").read_text())}
    truth = ground_truth()
    gt = np.array([truth["frames"][frames[p.name]["source_index"]]["transform_matrix"] for p in scene.image_paths])
    rot, trans, scale = umeyama(scene.centers, gt[:, :3, 3])
    aligned = scale * scene.centers @ rot.T + trans
    extent = np.ptp(gt[:, :3, 3], axis=0).max()
    assert np.sqrt(((aligned - gt[:, :3, 3]) ** 2).sum(1).mean()) < 0.01 * extent
    cos = (np.trace(np.swapaxes(rot @ scene.c2w[:, :3, :3], 1, 2) @ gt[:, :3, :3], axis1=1, axis2=2) - 1) / 2
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 1.0  # OpenGL axes, not OpenCV's
    # intrinsics in the (shrunk) frames: the truth is 320 wide with fl 277.13, the frames are 256 wide
    assert abs(scene.fx[0] * 320 / 256 - truth["fl_x"]) < 0.02 * truth["fl_x"]


def test_demo_capture_picks_sharp_frames_and_normalizes(demo_ws: Path) -> None:
    from mg3d.demo import ground_truth

    frames = json.loads((demo_ws / "capture" / "frames.json").read_text())
    blurred = set(ground_truth()["blurred_frames"])
    assert not {f["source_index"] for f in frames} & blurred
    scene = load_scene(demo_ws)
    assert scene.is_pinhole and max(scene.width[0], scene.height[0]) <= 256
    assert np.linalg.norm(scene.centers, axis=1).max() <= 1.0 + 1e-6  # cameras inside the unit sphere
    assert scene.c2w[:, :3, 1].mean(0) @ [0, 0, 1] > 0.9  # z is up
    assert np.all(scene.near > 0) and np.all(scene.far > scene.near)
    assert scene.split_indices("test").tolist() == list(range(0, len(scene), 8))
    assert len(scene.points) > 500
    assert (demo_ws / "capture" / "overview.png").is_file()


def test_demo_capture_colmap_model_matches_transforms(demo_ws: Path) -> None:
    from mg3d.formats.colmap import load_colmap

    ns = load_scene(demo_ws)
    colmap = load_colmap(demo_ws / "capture").transformed(ns.normalization)
    assert [p.name for p in colmap.image_paths] == [p.name for p in ns.image_paths]
    np.testing.assert_allclose(colmap.c2w, ns.c2w, atol=1e-6)
    np.testing.assert_allclose(colmap.fx, ns.fx)


def test_global_mapper(tmp_path: Path, cli) -> None:
    result = cli("capture", "--demo", "--out", tmp_path / "ws", "--preset", "tiny", "--mapper", "global")
    assert result.exit_code == 0, result.output
    metrics = read_manifest(tmp_path / "ws")["metrics"]
    assert metrics["frames_registered"] >= 23 and metrics["mean_reprojection_error_px"] < 1.0


def test_rerun_is_skipped(demo_ws: Path, cli) -> None:
    before = read_manifest(demo_ws)
    result = cli("capture", "--demo", "--out", demo_ws, "--preset", "tiny")
    assert result.exit_code == 0 and "up to date" in result.output
    assert read_manifest(demo_ws)["finished"] == before["finished"]


def test_failed_rerun_keeps_the_good_capture(demo_ws: Path, cli, tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    before = read_manifest(demo_ws)
    result = cli("capture", bad, "--out", demo_ws, "--force")
    assert result.exit_code == 1 and "cannot read video" in result.output
    assert read_manifest(demo_ws) == before
    assert not list(demo_ws.glob(".*partial"))


def test_woman_video_acceptance(tmp_path: Path, cli) -> None:
    """The issue's acceptance run: all 70 frames of the real capture, >= 68 registered, < 1.5 px."""
    video = shared_data("woman-512") / "woman-512.mp4"
    result = cli("capture", video, "--out", tmp_path / "ws", "--frames", "70")
    assert result.exit_code == 0, result.output
    metrics = read_manifest(tmp_path / "ws")["metrics"]
    assert metrics["frames_selected"] == 70
    assert metrics["frames_registered"] >= 68
    assert metrics["mean_reprojection_error_px"] < 1.5
    info = cli("info", tmp_path / "ws")
    assert info.exit_code == 0 and re.search(r"(68|69|70)/70 frames", info.output)


def test_photo_folder_with_exif_rotation(tmp_path: Path) -> None:
    from mg3d.capture.frames import select_photos

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, frame in enumerate(textured_frames(6, size=(64, 48))):
        image = Image.fromarray(frame)
        image.paste((255, 0, 0), (0, 0, 8, 8))
        exif = Image.Exif()
        exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
        image.save(folder / f"IMG_{i + 1}.jpg", exif=exif, quality=100, subsampling=0)
    (folder / "notes.txt").write_text("not an image: ignored")
    frames = select_photos(folder, None, 512)
    assert len(frames) == 6 and frames[0].image.size == (48, 64)  # portrait, as the phone showed it
    red = np.asarray(frames[0].image)[3, -4]  # the stored top-left corner is now top-right
    assert red[0] > 180 and red[1] < 90
    assert [f.source_name for f in frames][:2] == ["IMG_1.jpg", "IMG_2.jpg"]


def test_photo_folder_capture_end_to_end(tmp_path: Path, cli) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, frame in zip(range(0, 24, 2), demo_frames(list(range(0, 24, 2)))):
        Image.fromarray(frame).save(folder / f"photo_{i:02d}.jpg", quality=95)
    result = cli("capture", folder, "--out", tmp_path / "ws", "--max-size", "256")
    assert result.exit_code == 0, result.output
    metrics = read_manifest(tmp_path / "ws")["metrics"]
    assert metrics["matcher"] == "exhaustive" and metrics["frames_registered"] >= 11


def test_video_frame_selection_spreads_over_time(tmp_path: Path) -> None:
    from mg3d.capture.frames import select_video_frames

    video = write_video(tmp_path / "pan.mp4", textured_frames(30))
    frames = select_video_frames(video, 10, 512)
    windows = [f.source_index // 3 for f in frames]
    assert windows == list(range(10))  # one frame from each tenth of the video
    assert frames[0].image.size == (160, 120)
    small = select_video_frames(video, None, 64, default=100)
    assert len(small) == 30 and max(small[0].image.size) == 64  # all it has, shrunk


# ---- bad input: one line, non-zero exit, nothing half-written -----------------------------------------
def _assert_clean_failure(result, ws: Path, *needles: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not ws.exists() or not (ws / "capture" / "manifest.json").exists()
    assert not ws.exists() or not list(ws.glob(".*partial"))


def _file(path: Path, data: bytes | str = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda d: d / "missing.mp4", ("does not exist",)),
        (lambda d: _folder(d / "empty"), ("is empty",)),
        (lambda d: _file(d / "docs" / "a.txt", "x").parent, ("holds no images", "a.txt")),
        (lambda d: _file(d / "zero.mp4"), ("empty (0 bytes)",)),
        (lambda d: _file(d / "junk.mp4", np.random.default_rng(0).bytes(5000)), ("cannot read video",)),
        (lambda d: write_video(d / "short.mp4", textured_frames(3)), ("only 3 frame(s)",)),
        (lambda d: Image.new("RGB", (8, 8)).save(d / "one.png") or d / "one.png", ("single image",)),
    ],
    ids=["missing", "empty-folder", "non-images", "zero-length", "corrupt", "too-few-frames", "single-image"],
)
def test_bad_input_gets_one_line_error(tmp_path: Path, cli, make, needles) -> None:
    source = make(tmp_path)
    ws = tmp_path / "ws"
    _assert_clean_failure(cli("capture", source, "--out", ws), ws, *needles)


def test_video_shorter_than_requested(tmp_path: Path, cli) -> None:
    video = write_video(tmp_path / "v.mp4", textured_frames(12))
    result = cli("capture", video, "--out", tmp_path / "ws", "--frames", "20")
    _assert_clean_failure(result, tmp_path / "ws", "has 12 frames but 20 were requested", "--frames 12")


def test_corrupt_photo_is_named(tmp_path: Path, cli) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, frame in enumerate(textured_frames(5)):
        Image.fromarray(frame).save(folder / f"{i}.png")
    (folder / "5.jpg").write_bytes(b"not a jpeg")
    _assert_clean_failure(cli("capture", folder, "--out", tmp_path / "ws"), tmp_path / "ws", "cannot read image", "5.jpg")


def test_dataset_path_escaping_its_folder(tmp_path: Path, cli) -> None:
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    frame = {"file_path": "../secret.png", "transform_matrix": np.eye(4).tolist()}
    (data / "transforms.json").write_text(json.dumps({"fl_x": 10, "w": 8, "h": 8, "frames": [frame]}))
    _assert_clean_failure(cli("capture", data, "--out", tmp_path / "ws"), tmp_path / "ws", "escapes the dataset folder")


def test_sfm_registering_nothing(tmp_path: Path, cli) -> None:
    folder = tmp_path / "noise"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):  # unrelated random images: nothing matches
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    result = cli("capture", folder, "--out", tmp_path / "ws")
    _assert_clean_failure(result, tmp_path / "ws", "registered none of the 6 frames", "--matcher sequential")


def test_sfm_registering_less_than_half(tmp_path: Path, cli) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, frame in zip(range(8), demo_frames(list(range(0, 16, 2)))):
        Image.fromarray(frame).save(folder / f"a{i}.png")
    rng = np.random.default_rng(2)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(folder / f"b{i}.png")
    result = cli("capture", folder, "--out", tmp_path / "ws", "--max-size", "256")
    _assert_clean_failure(result, tmp_path / "ws", "of 18 frames (needs at least 50%)", "more overlap")


def test_lego_imports_as_a_workspace(tmp_path: Path, cli) -> None:
    lego = shared_data("lego-400")
    result = cli("capture", lego, "--out", tmp_path / "ws")
    assert result.exit_code == 0, result.output
    scene = load_scene(tmp_path / "ws")
    truth = json.loads((lego / "transforms_train.json").read_text())
    assert abs(scene.fx[0] - 0.5 * 400 / np.tan(0.5 * truth["camera_angle_x"])) < 1e-6
    assert {k: len(v) for k, v in scene.splits.items()} == {"train": 100, "val": 100, "test": 200}
    np.testing.assert_allclose(scene.c2w[0], truth["frames"][0]["transform_matrix"], atol=1e-9)
    assert scene.background == (1.0, 1.0, 1.0) and scene.rgb(0)[0, 0].tolist() == [255, 255, 255]
