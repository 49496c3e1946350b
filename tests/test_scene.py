"""The Scene type: derived scenes, normalizations, validation, path safety and PLY files."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from mg3d.errors import DatasetError
from mg3d.formats.ply import read_ply, write_ply
from mg3d.scene import Normalization, Scene, auto_normalization, look_at_rotation, resolve_inside, rotation_between


def random_normalization(seed: int) -> Normalization:
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return Normalization(np.concatenate([q, rng.normal(size=(3, 1))], 1), float(rng.uniform(0.2, 3.0)))


def orbit_scene(n: int = 8, tmp_path=None, **kw) -> Scene:
    """Cameras on a tilted circle of radius 4 around (10, -5, 3), all looking at the centre."""
    centre = np.array([10.0, -5.0, 3.0])
    up = np.array([0.0, 1.0, 0.3]) / np.linalg.norm([0.0, 1.0, 0.3])
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    e1 = np.cross(up, [1.0, 0, 0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(up, e1)
    c2w = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        pos = centre + 4 * (np.cos(a[i]) * e1 + np.sin(a[i]) * e2) + 1.0 * up
        c2w[i, :3, :3] = look_at_rotation(centre - pos, up)
        c2w[i, :3, 3] = pos
    paths = [tmp_path / f"{i}.png" if tmp_path else f"/nowhere/{i}.png" for i in range(n)]
    args = dict(image_paths=paths, c2w=c2w, fx=50.0, fy=50.0, cx=32, cy=24, width=64, height=48)
    args.update(kw)
    return Scene(**args)


# ---- derived scenes ------------------------------------------------------------------------------------
def test_subset_reindexes_splits():
    scene = orbit_scene(8, near=np.arange(8.0), far=10.0, splits={"train": [0, 1, 2, 4, 5, 6], "test": [3, 7]})
    sub = scene.subset([7, 2, 3, 5])
    assert len(sub) == 4
    np.testing.assert_array_equal(sub.c2w, scene.c2w[[7, 2, 3, 5]])
    np.testing.assert_array_equal(sub.near, [7, 2, 3, 5])
    assert sub.image_paths == [scene.image_paths[i] for i in (7, 2, 3, 5)]
    np.testing.assert_array_equal(sub.splits["train"], [1, 3])  # old 2, 5 -> new 1, 3
    np.testing.assert_array_equal(sub.splits["test"], [2, 0])  # old 3, 7 -> new 2, 0, in the split's order
    assert scene.splits["test"].tolist() == [3, 7]  # the original is untouched


def test_transformed_keeps_rotations_and_scales_bounds():
    scene = orbit_scene(near=0.5, far=8.0, points=np.random.default_rng(0).normal(size=(20, 3)))
    norm = random_normalization(1)
    moved = scene.transformed(norm)
    rot = moved.c2w[:, :3, :3]
    np.testing.assert_allclose(rot @ np.swapaxes(rot, 1, 2), np.broadcast_to(np.eye(3), rot.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0)
    np.testing.assert_allclose(moved.centers, norm.apply_points(scene.centers))
    np.testing.assert_allclose(moved.points, norm.apply_points(scene.points))
    np.testing.assert_allclose(moved.near, 0.5 * norm.scale)
    np.testing.assert_allclose(moved.far, 8.0 * norm.scale)
    # Distances between cameras scale by exactly `scale`.
    d0 = np.linalg.norm(scene.centers[0] - scene.centers[3])
    d1 = np.linalg.norm(moved.centers[0] - moved.centers[3])
    assert d1 == pytest.approx(norm.scale * d0)
    assert scene.normalization.scale == 1.0  # the original is untouched


def test_normalizations_compose():
    scene = orbit_scene(points=np.random.default_rng(2).normal(size=(10, 3)))
    a, b = random_normalization(3), random_normalization(4)
    twice = scene.transformed(a).transformed(b)
    once = scene.transformed(a.then(b))
    np.testing.assert_allclose(twice.c2w, once.c2w, atol=1e-10)
    np.testing.assert_allclose(twice.points, once.points, atol=1e-10)
    np.testing.assert_allclose(twice.normalization.matrix, once.normalization.matrix, atol=1e-12)
    np.testing.assert_allclose(twice.normalization.matrix, b.matrix @ a.matrix, atol=1e-10)
    x = np.random.default_rng(5).normal(size=(6, 3))
    np.testing.assert_allclose(a.then(b).apply_points(x), b.apply_points(a.apply_points(x)), atol=1e-10)


def test_normalization_dict_round_trip_and_shape_check():
    norm = random_normalization(6)
    back = Normalization.from_dict(norm.to_dict())
    np.testing.assert_allclose(back.matrix, norm.matrix)
    with pytest.raises(DatasetError, match="shape"):
        Normalization.from_dict({"transform": np.eye(3).tolist(), "scale": 1.0})


@pytest.mark.parametrize("with_points", [False, True])
def test_auto_normalization_fits_cameras_and_turns_up_to_z(with_points):
    scene = orbit_scene(12)
    points = None
    if with_points:
        points = np.array([10.0, -5.0, 3.0]) + np.random.default_rng(7).normal(size=(200, 3))
    norm = auto_normalization(scene.c2w, points)
    moved = scene.transformed(norm)
    assert np.all(np.linalg.norm(moved.centers, axis=1) <= 1 + 1e-9)
    assert np.linalg.norm(moved.centers, axis=1).max() == pytest.approx(1.0, abs=1e-6)  # it fills the sphere
    up = moved.c2w[:, :3, 1].mean(0)
    np.testing.assert_allclose(up / np.linalg.norm(up), [0, 0, 1], atol=1e-9)


def test_rotation_between_handles_opposite_directions():
    for a, b in (([1.0, 0, 0], [0, 0, 1.0]), ([0, 0, 1.0], [0, 0, -1.0]), ([1.0, 2, 3], [-1.0, -2, -3])):
        r = rotation_between(np.array(a), np.array(b))
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0)
        np.testing.assert_allclose(r @ (np.array(a) / np.linalg.norm(a)), np.array(b) / np.linalg.norm(b), atol=1e-12)


# ---- validation ----------------------------------------------------------------------------------------
def test_validate_rejects_non_orthonormal_rotation():
    c2w = orbit_scene(2).c2w.copy()
    c2w[1, :3, :3] *= 1.1
    with pytest.raises(DatasetError, match="orthonormal"):
        orbit_scene(2, c2w=c2w)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_validate_rejects_non_finite_poses(bad):
    c2w = orbit_scene(2).c2w.copy()
    c2w[0, 1, 3] = bad
    with pytest.raises(DatasetError, match="NaN"):
        orbit_scene(2, c2w=c2w)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"camera_model": ["PINHOLE", "KANNALA"]}, "unsupported camera model KANNALA"),
        ({"camera_model": ["PINHOLE"]}, "1 camera models for 2 images"),
        ({"fx": [50.0, 0.0]}, "positive"),
        ({"width": 0}, "positive"),
        ({"splits": {"test": [0, 2]}}, "split 'test'"),
        ({"image_paths": []}, "no images"),
    ],
)
def test_validate_rejects_bad_fields(change, match):
    with pytest.raises(DatasetError, match=match):
        orbit_scene(2, **change) if "image_paths" not in change else Scene(image_paths=[], c2w=np.zeros((0, 4, 4)), fx=[], fy=[], cx=[], cy=[], width=[], height=[])


def test_defaults_and_intrinsics():
    scene = orbit_scene(3)
    assert scene.camera_model == ["PINHOLE"] * 3 and scene.is_pinhole
    assert scene.distortion.shape == (3, 6) and not scene.distortion.any()
    np.testing.assert_array_equal(scene.splits["train"], [0, 1, 2])
    np.testing.assert_allclose(scene.K(1), [[50, 0, 32], [0, 50, 24], [0, 0, 1]])
    with pytest.raises(DatasetError, match="no 'val' split"):
        scene.split_indices("val")


def test_rgb_uses_the_scene_background(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (100, 150, 200, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "0.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "1.png")
    scene = orbit_scene(2, tmp_path=tmp_path, width=2, height=2, background=(0.0, 0.0, 1.0))
    rgb = scene.rgb(0)
    assert tuple(rgb[0, 0]) == (100, 150, 200)
    assert tuple(rgb[1, 1]) == (0, 0, 255)


# ---- path safety ---------------------------------------------------------------------------------------
def test_resolve_inside(tmp_path):
    (tmp_path / "a").mkdir()
    assert resolve_inside(tmp_path, "a/../a/x.png") == (tmp_path / "a" / "x.png").resolve()
    for bad in ("../x.png", "a/../../x.png", "/etc/passwd"):
        with pytest.raises(DatasetError):
            resolve_inside(tmp_path, bad)
    os.symlink(tmp_path.parent, tmp_path / "a" / "up")
    with pytest.raises(DatasetError, match="escapes"):
        resolve_inside(tmp_path, "a/up/x.png")


# ---- PLY -----------------------------------------------------------------------------------------------
def test_ply_binary_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    points = rng.normal(size=(100, 3)).astype(np.float32)
    colors = rng.integers(0, 256, size=(100, 3), dtype=np.uint8)
    write_ply(tmp_path / "p.ply", points, colors)
    assert (tmp_path / "p.ply").read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")
    back, back_colors = read_ply(tmp_path / "p.ply")
    assert back.dtype == np.float64 and back.shape == (100, 3)
    np.testing.assert_array_equal(back, points)
    np.testing.assert_array_equal(back_colors, colors)
    write_ply(tmp_path / "white.ply", points[:3])
    np.testing.assert_array_equal(read_ply(tmp_path / "white.ply")[1], np.full((3, 3), 255))


def test_ply_ascii_and_big_endian(tmp_path):
    header = "ply\nformat {fmt} 1.0\ncomment made by hand\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\n"
    (tmp_path / "a.ply").write_text(
        header.format(fmt="ascii") + "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        "element face 0\nproperty list uchar int vertex_indices\nend_header\n1.5 -2 3 255 0 10\n4 5 6.25 1 2 3\n"
    )
    points, colors = read_ply(tmp_path / "a.ply")
    np.testing.assert_array_equal(points, [[1.5, -2, 3], [4, 5, 6.25]])
    np.testing.assert_array_equal(colors, [[255, 0, 10], [1, 2, 3]])

    body = np.array([(1.0, 2.0, 3.0), (-1.0, 0.5, 8.0)], dtype=[("x", ">f8"), ("y", ">f8"), ("z", ">f8")]).tobytes()
    text = header.format(fmt="binary_big_endian").replace("float", "double") + "end_header\n"
    (tmp_path / "b.ply").write_bytes(text.encode() + body)
    points, colors = read_ply(tmp_path / "b.ply")
    np.testing.assert_array_equal(points, [[1, 2, 3], [-1, 0.5, 8]])
    assert colors is None


def test_ply_rejects_bad_files(tmp_path):
    (tmp_path / "x.ply").write_bytes(b"not a ply")
    with pytest.raises(DatasetError, match="not a PLY"):
        read_ply(tmp_path / "x.ply")
    write_ply(tmp_path / "t.ply", np.zeros((10, 3)))
    (tmp_path / "t.ply").write_bytes((tmp_path / "t.ply").read_bytes()[:-5])
    with pytest.raises(DatasetError, match="truncated"):
        read_ply(tmp_path / "t.ply")
    (tmp_path / "n.ply").write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float a\nend_header\n1\n")
    with pytest.raises(DatasetError, match="no x, y, z"):
        read_ply(tmp_path / "n.ply")
