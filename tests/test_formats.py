"""Dataset importers/exporters: nerfstudio, Blender, LLFF and ``load_scene`` autodetection."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mg3d.errors import DatasetError, InputError
from mg3d.formats import detect_format, load_scene
from mg3d.formats.blender import load_blender
from mg3d.formats.llff import llff_to_opengl, load_llff, opengl_to_llff, write_llff
from mg3d.formats.nerfstudio import load_nerfstudio, write_nerfstudio
from mg3d.scene import Normalization, Scene

LEGO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lego-400"
W, H = 8, 6


# ---- helpers -----------------------------------------------------------------------------------------
def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:  # [n, 3, 3], det +1
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    q[np.linalg.det(q) < 0, :, 0] *= -1
    return q


def random_c2w(n: int, seed: int = 0) -> np.ndarray:  # [n, 4, 4]
    rng = np.random.default_rng(seed)
    c2w = np.tile(np.eye(4), (n, 1, 1))
    c2w[:, :3, :3] = random_rotations(n, rng)
    c2w[:, :3, 3] = rng.normal(size=(n, 3)) * 3
    return c2w


def write_pngs(folder: Path, n: int, size: tuple[int, int] = (W, H), mode: str = "RGB", names: list[str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 256, size=(size[1], size[0], len(mode)), dtype=np.uint8)
        path = folder / (names[i] if names else f"img_{i:03d}.png")
        Image.fromarray(pixels, mode).save(path)
        paths.append(path)
    return paths


def make_scene(paths: list[Path], **kw) -> Scene:
    n = len(paths)
    args = dict(image_paths=paths, c2w=random_c2w(n), fx=7.5, fy=7.5, cx=W / 2, cy=H / 2, width=W, height=H)
    args.update(kw)
    return Scene(**args)


def assert_same_cameras(a: Scene, b: Scene, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(a.c2w, b.c2w, atol=atol)
    for name in ("fx", "fy", "cx", "cy"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=atol, err_msg=name)
    np.testing.assert_array_equal(a.width, b.width)
    np.testing.assert_array_equal(a.height, b.height)


def write_transforms(root: Path, meta: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "transforms.json").write_text(json.dumps(meta))
    return root / "transforms.json"


# ---- nerfstudio ----------------------------------------------------------------------------------------
def test_nerfstudio_round_trip_shared_intrinsics(tmp_path):
    scene = make_scene(write_pngs(tmp_path / "src", 4))
    file = write_nerfstudio(scene, tmp_path / "ns")
    meta = json.loads(file.read_text())
    assert meta["fl_x"] == 7.5 and meta["w"] == W and meta["camera_model"] == "PINHOLE"
    assert all("fl_x" not in f for f in meta["frames"])  # shared intrinsics are written once
    back = load_nerfstudio(tmp_path / "ns")
    assert back.source == "nerfstudio" and len(back) == 4
    assert_same_cameras(scene, back)
    assert back.camera_model == ["PINHOLE"] * 4
    for i in range(4):
        np.testing.assert_array_equal(back.image(i), scene.image(i))


def test_nerfstudio_round_trip_per_frame_intrinsics(tmp_path):
    paths = write_pngs(tmp_path / "src", 3)
    scene = make_scene(paths, fx=[7.0, 8.0, 9.0], fy=[7.1, 8.1, 9.1], cx=[4.0, 4.2, 3.9], cy=3.0)
    meta = json.loads(write_nerfstudio(scene, tmp_path / "ns").read_text())
    assert [f["fl_x"] for f in meta["frames"]] == [7.0, 8.0, 9.0]
    assert meta["cy"] == 3.0  # the shared one stays at the top level
    assert_same_cameras(scene, load_nerfstudio(tmp_path / "ns" / "transforms.json"))


@pytest.mark.parametrize(
    "model, distortion",
    [
        ("PINHOLE", [0, 0, 0, 0, 0, 0]),
        ("OPENCV", [0.1, -0.02, 0.003, 0, 0.001, -0.002]),
        ("OPENCV_FISHEYE", [0.05, -0.01, 0.002, -0.0005, 0, 0]),
    ],
)
def test_nerfstudio_camera_models_survive(tmp_path, model, distortion):
    scene = make_scene(write_pngs(tmp_path / "src", 2), camera_model=[model] * 2, distortion=np.tile(distortion, (2, 1)))
    back = load_nerfstudio(write_nerfstudio(scene, tmp_path / "ns"))
    assert back.camera_model == [model, model]
    np.testing.assert_allclose(back.distortion, scene.distortion, atol=1e-12)
    assert back.is_pinhole == (model == "PINHOLE")


def test_nerfstudio_mixed_models_per_frame(tmp_path):
    dist = np.array([[0, 0, 0, 0, 0, 0], [0.1, 0.01, 0, 0, 0.001, 0.002]])
    scene = make_scene(write_pngs(tmp_path / "src", 2), camera_model=["PINHOLE", "OPENCV"], distortion=dist)
    back = load_nerfstudio(write_nerfstudio(scene, tmp_path / "ns"))
    assert back.camera_model == ["PINHOLE", "OPENCV"]
    np.testing.assert_allclose(back.distortion, dist)


def test_nerfstudio_splits_points_normalization_near_far_survive(tmp_path):
    rng = np.random.default_rng(3)
    points = rng.normal(size=(50, 3)).astype(np.float32).astype(np.float64)  # float32 is what PLY stores
    colors = rng.integers(0, 256, size=(50, 3), dtype=np.uint8)
    norm = Normalization(np.concatenate([random_rotations(1, rng)[0], [[0.5], [-1.0], [2.0]]], 1), 0.25)
    scene = make_scene(
        write_pngs(tmp_path / "src", 5),
        splits={"train": [0, 2, 4], "val": [1], "test": [3]},
        points=points, point_colors=colors, normalization=norm,
        near=np.linspace(0.1, 0.5, 5), far=np.linspace(4, 6, 5),
    )
    file = write_nerfstudio(scene, tmp_path / "ns")
    meta = json.loads(file.read_text())
    assert len(meta["train_filenames"]) == 3 and meta["ply_file_path"] == "sparse_pc.ply"
    back = load_nerfstudio(file)
    assert set(back.splits) == {"train", "val", "test"}
    for name, idx in scene.splits.items():
        np.testing.assert_array_equal(back.splits[name], idx)
    np.testing.assert_allclose(back.points, points, atol=1e-7)
    np.testing.assert_array_equal(back.point_colors, colors)
    np.testing.assert_allclose(back.normalization.transform, norm.transform, atol=1e-12)
    assert back.normalization.scale == pytest.approx(0.25)
    np.testing.assert_allclose(back.near, scene.near)
    np.testing.assert_allclose(back.far, scene.far)


def test_nerfstudio_copies_outside_images_and_references_inside_ones(tmp_path):
    out = tmp_path / "ns"
    inside = write_pngs(out / "frames", 2)
    outside = write_pngs(tmp_path / "elsewhere", 2, names=["a.png", "b.png"])
    scene = make_scene(inside + outside)
    meta = json.loads(write_nerfstudio(scene, out).read_text())
    rel = [f["file_path"] for f in meta["frames"]]
    assert rel[:2] == ["frames/img_000.png", "frames/img_001.png"]
    assert all(r.startswith("images/") for r in rel[2:])
    for r, src in zip(rel, scene.image_paths):
        copied = out / r
        assert copied.is_file() and copied.read_bytes() == src.read_bytes()
    back = load_nerfstudio(out)
    assert all(os.path.commonpath([str(out.resolve()), str(p)]) == str(out.resolve()) for p in back.image_paths)


def test_nerfstudio_refuses_outside_images_without_copy(tmp_path):
    scene = make_scene(write_pngs(tmp_path / "src", 2))
    with pytest.raises(DatasetError, match="outside"):
        write_nerfstudio(scene, tmp_path / "ns", copy_images=False)


def _frame(path: str) -> dict:
    return {"file_path": path, "transform_matrix": np.eye(4).tolist()}


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_nerfstudio_file_path_escaping_the_folder_is_refused(tmp_path, kind):
    root = tmp_path / "ds"
    secret = write_pngs(tmp_path / "secret", 1)[0]
    if kind == "dotdot":
        path = "../secret/img_000.png"
    elif kind == "absolute":
        path = "/etc/passwd"
    else:
        (root / "images").mkdir(parents=True)
        os.symlink(secret, root / "images" / "link.png")
        path = "images/link.png"
    write_transforms(root, {"fl_x": 5.0, "w": W, "h": H, "frames": [_frame(path)]})
    with pytest.raises(DatasetError, match="absolute|escapes"):
        load_nerfstudio(root)


def test_nerfstudio_symlink_inside_the_folder_is_fine(tmp_path):
    root = tmp_path / "ds"
    real = write_pngs(root / "images", 1)[0]
    os.symlink(real, root / "link.png")
    write_transforms(root, {"fl_x": 5.0, "w": W, "h": H, "frames": [_frame("link.png")]})
    assert load_nerfstudio(root).image_paths == [real.resolve()]


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "no frames"),
        (json.dumps({"fl_x": 5.0, "w": W, "h": H}), "no frames"),
        (json.dumps({"fl_x": 5.0, "w": W, "h": H, "frames": []}), "no frames"),
        (json.dumps({"fl_x": 5.0, "w": W, "h": H, "frames": [{"file_path": "a.png"}]}), "transform_matrix"),
        (json.dumps({"w": W, "h": H, "frames": [_frame("a.png")]}), "fl_x"),
        (json.dumps({"fl_x": 5.0, "w": W, "h": H, "frames": [{"file_path": "a.png", "transform_matrix": [[1, 0], [0, 1]]}]}), "shape"),
    ],
)
def test_nerfstudio_malformed_files_raise_dataset_error(tmp_path, text, match):
    (tmp_path / "transforms.json").write_text(text)
    with pytest.raises(DatasetError, match=match):
        load_nerfstudio(tmp_path)


def test_nerfstudio_missing_transforms_and_unknown_split_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_nerfstudio(tmp_path / "transforms.json")
    write_transforms(tmp_path, {"fl_x": 5.0, "w": W, "h": H, "frames": [_frame("a.png")], "test_filenames": ["zzz.png"]})
    with pytest.raises(DatasetError, match="zzz.png"):
        load_nerfstudio(tmp_path)


def test_nerfstudio_unknown_camera_model_raises(tmp_path):
    write_transforms(tmp_path, {"fl_x": 5.0, "w": W, "h": H, "camera_model": "EQUIRECTANGULAR", "frames": [_frame("a.png")]})
    with pytest.raises(DatasetError, match="EQUIRECTANGULAR"):
        load_nerfstudio(tmp_path)


# ---- blender -------------------------------------------------------------------------------------------
def make_blender(root: Path, counts: dict[str, int], angle: float = 0.7, size: tuple[int, int] = (W, H)) -> dict[str, list]:
    """A tiny Blender dataset; pixel (0, 0) is fully transparent, (0, 1) half transparent red."""
    matrices = {}
    for s, (split, n) in enumerate(counts.items()):
        (root / split).mkdir(parents=True, exist_ok=True)
        c2w = random_c2w(n, seed=10 + s)
        frames = []
        for i in range(n):
            rgba = np.full((size[1], size[0], 4), 255, dtype=np.uint8)
            rgba[..., :3] = 40 + i
            rgba[0, 0] = (10, 20, 30, 0)
            rgba[0, 1] = (200, 0, 0, 128)
            Image.fromarray(rgba, "RGBA").save(root / split / f"r_{i}.png")
            frames.append({"file_path": f"./{split}/r_{i}", "rotation": 0.1, "transform_matrix": c2w[i].tolist()})
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames}))
        matrices[split] = c2w
    return matrices


def test_blender_synthetic(tmp_path):
    matrices = make_blender(tmp_path, {"train": 3, "val": 1, "test": 2})
    scene = load_blender(tmp_path)
    assert len(scene) == 6 and scene.source == "blender"
    np.testing.assert_array_equal(scene.splits["train"], [0, 1, 2])
    np.testing.assert_array_equal(scene.splits["val"], [3])
    np.testing.assert_array_equal(scene.splits["test"], [4, 5])
    focal = 0.5 * W / math.tan(0.5 * 0.7)
    np.testing.assert_allclose(scene.fx, focal)
    np.testing.assert_allclose(scene.fy, focal)
    np.testing.assert_allclose(scene.cx, W / 2)
    np.testing.assert_allclose(scene.cy, H / 2)
    assert list(scene.width) == [W] * 6 and list(scene.height) == [H] * 6
    np.testing.assert_allclose(scene.c2w, np.concatenate([matrices["train"], matrices["val"], matrices["test"]]))
    np.testing.assert_allclose(scene.near, 2.0)
    np.testing.assert_allclose(scene.far, 6.0)
    assert scene.background == (1.0, 1.0, 1.0) and scene.is_pinhole
    assert scene.image_paths[3] == (tmp_path / "val" / "r_0.png").resolve()


def test_blender_composites_on_white(tmp_path):
    make_blender(tmp_path, {"train": 2})
    scene = load_blender(tmp_path)
    assert scene.image(1).shape == (H, W, 4)
    rgb = scene.rgb(1)
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (255, 255, 255)  # alpha 0 -> the white background
    a = 128 / 255
    assert tuple(rgb[0, 1]) == (round(200 * a + 255 * (1 - a)), round(255 * (1 - a)), round(255 * (1 - a)))
    assert tuple(rgb[2, 2]) == (41, 41, 41)  # opaque pixels are unchanged


def test_blender_train_only_and_explicit_extension(tmp_path):
    make_blender(tmp_path, {"train": 2})
    meta = json.loads((tmp_path / "transforms_train.json").read_text())
    meta["frames"][1]["file_path"] = "train/r_1.png"
    (tmp_path / "transforms_train.json").write_text(json.dumps(meta))
    scene = load_blender(tmp_path)
    assert list(scene.splits) == ["train"] and len(scene) == 2
    assert scene.image_paths[1].name == "r_1.png"


def test_blender_missing_image_is_named(tmp_path):
    make_blender(tmp_path, {"train": 2, "test": 1})
    (tmp_path / "test" / "r_0.png").unlink()
    with pytest.raises(DatasetError, match="test/r_0"):
        load_blender(tmp_path)


@pytest.mark.parametrize("path", ["../outside/r_0", "/etc/passwd"])
def test_blender_escaping_paths_are_refused(tmp_path, path):
    root = tmp_path / "ds"
    make_blender(root, {"train": 1})
    write_pngs(tmp_path / "outside", 1, names=["r_0.png"])
    meta = json.loads((root / "transforms_train.json").read_text())
    meta["frames"][0]["file_path"] = path
    (root / "transforms_train.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="absolute|escapes"):
        load_blender(root)


@pytest.mark.parametrize(
    "meta, match",
    [
        ("{oops", "not valid JSON"),
        ({"frames": []}, "no frames"),
        ({"camera_angle_x": 0.7}, "no frames"),
        ({"frames": [_frame("./train/r_0")]}, "camera_angle_x"),
        ({"camera_angle_x": 0.7, "frames": [{"file_path": "./train/r_0"}]}, "transform_matrix"),
    ],
)
def test_blender_malformed_json(tmp_path, meta, match):
    make_blender(tmp_path, {"train": 1})
    (tmp_path / "transforms_train.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    with pytest.raises(DatasetError, match=match):
        load_blender(tmp_path)


def test_blender_without_train_json(tmp_path):
    make_blender(tmp_path, {"test": 1})
    with pytest.raises(DatasetError, match="transforms_train.json"):
        load_blender(tmp_path)


def test_lego_400(tmp_path):
    if not (LEGO / "transforms_train.json").is_file():
        pytest.skip(f"the shared lego-400 data set is absent ({LEGO})")
    scene = load_blender(LEGO)
    assert len(scene) == 400
    assert {k: len(v) for k, v in scene.splits.items()} == {"train": 100, "val": 100, "test": 200}
    assert set(scene.width) == {400} and set(scene.height) == {400}
    expected = []
    for split in ("train", "val", "test"):
        meta = json.loads((LEGO / f"transforms_{split}.json").read_text())
        focal = 0.5 * 400 / math.tan(0.5 * meta["camera_angle_x"])
        np.testing.assert_allclose(scene.fx[scene.splits[split]], focal, rtol=1e-12)
        expected += [f["transform_matrix"] for f in meta["frames"]]
    assert scene.fx[0] == pytest.approx(555.555, abs=1e-2)
    np.testing.assert_allclose(scene.c2w, np.asarray(expected), atol=1e-12)
    np.testing.assert_allclose(scene.cx, 200.0)
    rgb = scene.rgb(0)
    assert rgb.shape == (400, 400, 3) and tuple(rgb[0, 0]) == (255, 255, 255)  # the corner is background

    back = load_nerfstudio(write_nerfstudio(scene, tmp_path / "ns"))
    assert_same_cameras(scene, back)
    for name, idx in scene.splits.items():
        np.testing.assert_array_equal(back.splits[name], idx)
    np.testing.assert_allclose(back.near, 2.0)
    np.testing.assert_allclose(back.far, 6.0)


# ---- llff ----------------------------------------------------------------------------------------------
def test_llff_axis_convention():
    # LLFF columns [down, right, backwards]: a camera whose "down" is world -y and "right" world +x
    # is the OpenGL identity (right +x, up +y, backwards +z).
    llff = np.array([[[0.0, 1, 0, 1], [-1, 0, 0, 2], [0, 0, 1, 3]]])
    gl = llff_to_opengl(llff)
    np.testing.assert_allclose(gl[0, :3, :3], np.eye(3))
    np.testing.assert_allclose(gl[0, :3, 3], [1, 2, 3])
    np.testing.assert_allclose(opengl_to_llff(gl), llff)


def test_llff_round_trip(tmp_path):
    n = 17
    scene = make_scene(write_pngs(tmp_path / "src", n), near=np.linspace(0.5, 1.0, n), far=np.linspace(10, 20, n))
    file = write_llff(scene, tmp_path / "llff")
    assert np.load(file).shape == (n, 17)
    (tmp_path / "llff" / "images" / "notes.txt").write_text("not an image")  # ignored
    back = load_llff(tmp_path / "llff")
    assert back.source == "llff" and len(back) == n
    assert_same_cameras(scene, back)
    np.testing.assert_allclose(back.near, scene.near)
    np.testing.assert_allclose(back.far, scene.far)
    np.testing.assert_array_equal(back.splits["test"], [0, 8, 16])
    np.testing.assert_array_equal(back.splits["train"], [i for i in range(n) if i % 8])
    for i in (0, 9, 16):
        np.testing.assert_array_equal(back.image(i), scene.image(i))


def test_llff_factor_scales_intrinsics(tmp_path):
    scene = make_scene(write_pngs(tmp_path / "src", 3, size=(16, 12)), fx=20.0, fy=20.0, cx=8, cy=6, width=16, height=12, near=1, far=5)
    write_llff(scene, tmp_path / "llff")
    write_pngs(tmp_path / "llff" / "images_4", 3, size=(4, 3))
    small = load_llff(tmp_path / "llff", factor=4)
    np.testing.assert_allclose(small.fx, 5.0)
    np.testing.assert_allclose(small.fy, 5.0)
    assert list(small.width) == [4] * 3 and list(small.height) == [3] * 3
    np.testing.assert_allclose(small.cx, 2.0)
    np.testing.assert_allclose(small.c2w, scene.c2w, atol=1e-12)
    with pytest.raises(DatasetError, match="images_2"):
        load_llff(tmp_path / "llff", factor=2)


def test_llff_count_mismatch_names_both_counts(tmp_path):
    scene = make_scene(write_pngs(tmp_path / "src", 3), near=1, far=5)
    write_llff(scene, tmp_path / "llff")
    write_pngs(tmp_path / "extra", 1)[0].rename(tmp_path / "llff" / "images" / "zzz.png")
    with pytest.raises(DatasetError, match=r"3 poses.*4 images"):
        load_llff(tmp_path / "llff")


def test_llff_bad_poses_file(tmp_path):
    (tmp_path / "images").mkdir()
    np.save(tmp_path / "poses_bounds.npy", np.zeros((3, 15)))
    with pytest.raises(DatasetError, match="17"):
        load_llff(tmp_path)
    (tmp_path / "poses_bounds.npy").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="npy"):
        load_llff(tmp_path)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"camera_model": ["OPENCV"] * 2, "distortion": [[0.1, 0, 0, 0, 0, 0]] * 2}, "pinhole"),
        ({"fy": 9.0}, "fx != fy"),
        ({"cx": 3.0}, "principal point"),
        ({"near": None, "far": None}, "near/far"),
    ],
)
def test_write_llff_refuses_what_it_cannot_store(tmp_path, change, match):
    kw = {"near": 1.0, "far": 5.0, **change}
    scene = make_scene(write_pngs(tmp_path / "src", 2), **kw)
    with pytest.raises(DatasetError, match=match):
        write_llff(scene, tmp_path / "llff")


def test_write_llff_refuses_a_folder_with_images(tmp_path):
    scene = make_scene(write_pngs(tmp_path / "src", 2), near=1.0, far=5.0)
    write_llff(scene, tmp_path / "llff")
    with pytest.raises(DatasetError, match="already holds images"):
        write_llff(scene, tmp_path / "llff")


# ---- load_scene ----------------------------------------------------------------------------------------
def test_load_scene_detects_each_format(tmp_path):
    scene = make_scene(write_pngs(tmp_path / "src", 3), near=1.0, far=5.0)
    write_nerfstudio(scene, tmp_path / "ns")
    write_llff(scene, tmp_path / "llff")
    make_blender(tmp_path / "blender", {"train": 2, "test": 1})
    assert detect_format(tmp_path / "ns") == "nerfstudio"
    assert detect_format(tmp_path / "blender") == "blender"
    assert detect_format(tmp_path / "llff") == "llff"
    assert load_scene(tmp_path / "ns").source == "nerfstudio"
    assert load_scene(tmp_path / "ns" / "transforms.json").source == "nerfstudio"
    blender = load_scene(tmp_path / "blender")
    assert blender.source == "blender" and len(blender) == 3
    assert load_scene(tmp_path / "blender" / "transforms_test.json").source == "blender"
    llff = load_scene(tmp_path / "llff")
    assert llff.source == "llff"
    assert_same_cameras(scene, llff)
    assert load_scene(tmp_path / "llff" / "poses_bounds.npy").source == "llff"


def test_load_scene_missing_and_empty(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_scene(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no dataset"):
        load_scene(tmp_path / "empty")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        load_scene(tmp_path / "empty", fmt="obj")
