"""Student end to end on CPU at tiny scale: pseudo views from the tiny teacher, a tiny NeLF that learns the
demo, resume after an interruption, DDP with two gloo processes, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import interrupt_at, one_line_error, read_manifest

#: Mechanics tests: short runs, evaluated on one view (they check behaviour, not quality).
SHORT = ("--preset", "tiny", "--eval-views", "1", "--save-views", "0")


@pytest.fixture
def ws(distilled: Path, tmp_path: Path) -> Path:
    """A fresh copy of the distilled workspace with no student."""
    return Path(shutil.copytree(distilled, tmp_path / "ws"))


# ---- pseudo data --------------------------------------------------------------------------------------
def test_distill_writes_shards_of_teacher_views(distilled: Path, cli) -> None:
    from mg3d.student.distill import PseudoData

    metrics = read_manifest(distilled, "distill")["metrics"]
    assert metrics["views"] == 48 and metrics["resolution"] == [64, 48] and metrics["kind"] == "orbit"
    assert 0 < metrics["near"] < metrics["far"]
    data = PseudoData(distilled / "distill")
    assert len(data) == 48 and len(data.shards) == 1 + (48 - 1) // 50
    assert isinstance(data.shards[0], np.memmap) and data.shards[0].dtype == np.uint8
    images = data.images(np.array([0, 47]))
    assert images.shape == (2, 48, 64, 3) and images.std() > 5  # rendered content, not a blank
    rot = data.cameras[:, :3, :3].astype(np.float64)
    assert np.allclose(rot @ rot.transpose(0, 2, 1), np.eye(3), atol=1e-5) and np.allclose(np.linalg.det(rot), 1, atol=1e-5)
    assert (distilled / "distill" / "preview.png").is_file() and not list(distilled.glob(".distill.*"))
    assert data.has_surfaces  # the teacher's distance to the surface per pixel (0 where it sees nothing)
    surface = data.surface(np.array([0, 47])).astype(np.float32)
    assert surface.shape == (2, 48, 64) and (surface > 0).mean() > 0.5
    assert metrics["near"] * 0.8 < np.percentile(surface[surface > 0], 50) < metrics["far"] * 1.25
    again = cli("distill", distilled, "--preset", "tiny")
    assert again.exit_code == 0 and "up to date" in again.output


def test_orbit_cameras_stay_on_the_training_shell() -> None:
    from mg3d.scene import look_at_rotation
    from mg3d.student.cameras import camera_kind, sample_cameras

    rng = np.random.default_rng(0)
    az, el, r = rng.uniform(0, 2 * np.pi, 40), rng.uniform(0.2, 0.8, 40), rng.uniform(3.5, 4.5, 40)
    pos = np.stack([r * np.cos(el) * np.cos(az), r * np.cos(el) * np.sin(az), r * np.sin(el)], 1)
    c2w = np.tile(np.eye(4), (40, 1, 1))
    for i in range(40):
        c2w[i, :3, :3] = look_at_rotation(-pos[i], np.array([0, 0, 1.0]))
    c2w[:, :3, 3] = pos
    assert camera_kind(c2w) == "orbit"
    new = sample_cameras(c2w, 500, seed=1).astype(np.float64)
    radius = np.linalg.norm(new[:, :3, 3], axis=1)
    assert radius.min() >= 3.5 - 1e-3 and radius.max() <= 4.5 + 1e-3
    forward = -new[:, :3, 2]
    to_centre = -new[:, :3, 3] / radius[:, None]
    assert np.all(np.sum(forward * to_centre, 1) > 0.999)  # every new camera looks at the centre
    assert np.allclose(new[:, :3, :3] @ new[:, :3, :3].transpose(0, 2, 1), np.eye(3), atol=1e-5)


def test_orbit_cameras_spread_over_the_sphere_as_the_training_cameras_do() -> None:
    """Training cameras evenly over a hemisphere band (as lego's): the new ones have their elevations (the
    mean and the share above 60 deg), not a uniform elevation that crowds them towards the pole."""
    from mg3d.scene import look_at_rotation
    from mg3d.student.cameras import sample_cameras

    rng = np.random.default_rng(0)
    n = 300
    az, el = rng.uniform(0, 2 * np.pi, n), np.arcsin(rng.uniform(np.sin(0.1), np.sin(1.5), n))
    pos = 4.0 * np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], 1)
    c2w = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        c2w[i, :3, :3] = look_at_rotation(-pos[i], np.array([0, 0, 1.0]))
    c2w[:, :3, 3] = pos
    new = sample_cameras(c2w, 2000, seed=3).astype(np.float64)
    elevation = lambda c: np.degrees(np.arcsin(c[:, 2, 3] / np.linalg.norm(c[:, :3, 3], axis=1)))  # noqa: E731
    old, got = elevation(c2w), elevation(new)
    assert abs(got.mean() - old.mean()) < 3, (got.mean(), old.mean())  # uniform elevations: about 46 against 37
    assert abs((got > 60).mean() - (old > 60).mean()) < 0.05


def test_path_cameras_follow_the_trajectory() -> None:
    from mg3d.student.cameras import camera_kind, sample_cameras

    n = 30  # a hand-held sweep: walking along x, looking down -z (forward-facing)
    c2w = np.tile(np.eye(4), (n, 1, 1))
    c2w[:, 0, 3] = np.linspace(0, 3, n)
    angle = np.radians(np.linspace(-10, 10, n))
    c2w[:, 0, 0], c2w[:, 0, 2], c2w[:, 2, 0], c2w[:, 2, 2] = np.cos(angle), np.sin(angle), -np.sin(angle), np.cos(angle)
    assert camera_kind(c2w) == "path"
    new = sample_cameras(c2w, 400, seed=2).astype(np.float64)
    spacing = 3 / (n - 1)
    assert new[:, 0, 3].min() > -4 * spacing and new[:, 0, 3].max() < 3 + 4 * spacing
    assert np.abs(new[:, 1:3, 3]).max() < 4 * spacing  # close to the path, not anywhere
    rot = new[:, :3, :3]
    assert np.allclose(rot @ rot.transpose(0, 2, 1), np.eye(3), atol=1e-5) and np.allclose(np.linalg.det(rot), 1, atol=1e-5)
    assert np.all(rot[:, 2, 2] > np.cos(np.radians(25)))  # the forward axis -z still points roughly along world -z


# ---- the model ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("upsample", ["shuffle", "transpose"])
def test_nelf_maps_a_pose_to_an_image(upsample: str) -> None:
    import torch

    from mg3d.student.model import NeLF, StudentSpec, macs_per_frame, parameter_count

    spec = StudentSpec(width_px=64, height_px=32, fx=50, fy=50, cx=32, cy=16, near=1, far=4, depth=3, width=32, sr_factor=8, upsample=upsample)
    model = NeLF(spec)
    c2w = torch.eye(4).repeat(2, 1, 1)
    c2w[1, :3, 3] = torch.tensor([0.3, 0.0, 1.0])
    out = model(c2w)
    assert out.shape == (2, 3, 32, 64) and out.min() >= 0 and out.max() <= 1
    assert spec.in_channels == 3 * 8 * 13 == 312  # MobileR2L's 312 input channels
    # the baked intrinsics and the same intrinsics given per call are the same camera
    same = model(c2w, torch.tensor([[50.0, 50, 32, 16]] * 2))
    assert torch.allclose(out, same, atol=1e-6)
    assert not torch.allclose(out[0], out[1])  # another pose, another image
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert parameter_count(model) > 0 and macs_per_frame(spec) > 0


def test_head_layers_are_a_per_pixel_mlp_before_the_rgb_conv() -> None:
    import torch

    from mg3d.errors import ConfigError
    from mg3d.student.model import NeLF, StudentSpec, macs_per_frame

    base = dict(width_px=32, height_px=32, fx=40, fy=40, cx=16, cy=16, near=1, far=4, depth=2, width=32, sr_factor=4)
    plain, deep = NeLF(StudentSpec(**base)), NeLF(StudentSpec(**base, head_layers=2, head_width=24))
    assert not any(k.startswith("hidden.") for k in plain.state_dict())  # students saved before the option load as they were
    convs = [m for m in deep.hidden if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(16, 24, (1, 1)), (24, 24, (1, 1))]
    assert deep.head.in_channels == 24
    assert macs_per_frame(deep.spec) - macs_per_frame(plain.spec) == 32 * 32 * (16 * 24 + 24 * 24 + 3 * 24 - 3 * 16)
    c2w = torch.eye(4)[None]
    c2w[0, 2, 3] = 2.5
    out = deep(c2w)
    assert out.shape == (1, 3, 32, 32)
    out.mean().backward()
    assert all(p.grad is not None for p in deep.parameters())
    with pytest.raises(ConfigError, match="head_layers"):
        StudentSpec(**base, head_layers=1, head_width=0)


def test_detail_view_feeds_the_viewing_direction_to_the_fuse() -> None:
    """--detail-view F: the fuse conv also reads the unit ray direction and its sin/cos at pi 2^f (f < F), so
    one surface point may look different from two sides; off, the student is as before."""
    import math

    import torch

    from mg3d.errors import ConfigError
    from mg3d.student.model import NeLF, StudentSpec, macs_per_frame

    base = dict(width_px=32, height_px=32, fx=40, fy=40, cx=16, cy=16, near=1, far=4, depth=2, width=32, sr_factor=4, detail=2, detail_resolution=16)
    plain, viewed = NeLF(StudentSpec(**base)), NeLF(StudentSpec(**base, detail_view=2))
    assert viewed.spec.view_channels == 15 and plain.spec.view_channels == 0
    assert viewed.detail.fuse.in_channels == plain.detail.fuse.in_channels + 15
    assert macs_per_frame(viewed.spec) - macs_per_frame(plain.spec) == 32 * 32 * 15 * 16
    d = torch.tensor([[[3.0, 0.0], [0.0, -2.0], [4.0, 0.0]]])  # [1, 3, 2]: two directions, not unit
    u = d / d.norm(dim=1, keepdim=True)
    want = torch.cat([u] + [torch.sin(u * math.pi * 2**f) for f in range(2)] + [torch.cos(u * math.pi * 2**f) for f in range(2)], 1)
    assert torch.allclose(viewed.detail.view_encoding(d), want, atol=1e-6)
    c2w = torch.eye(4)[None].repeat(2, 1, 1)
    c2w[:, 2, 3] = 2.5
    c2w[1, :3, :3] = torch.tensor([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])  # the same spot of the axis seen from x
    c2w[1, :3, 3] = torch.tensor([2.5, 0, 0])
    out = viewed(c2w)
    assert out.shape == (2, 3, 32, 32)
    out.mean().backward()
    assert viewed.detail.fuse.weight.grad[:, -15:].abs().sum() > 0  # the direction channels learn
    with pytest.raises(ConfigError, match="detail_view"):
        StudentSpec(**{**base, "detail": 0}, detail_view=2)


def test_detail_lines_give_each_plane_the_axis_it_lacks() -> None:
    """--detail-lines: each texture plane's features times a line's along the third axis (TensoRF's VM form).
    The Gather form (exports) and grid_sample (torch) read the same values as plain linear interpolation;
    the lines start at one, so the student starts as with the planes alone; they learn."""
    import torch

    from mg3d.errors import ConfigError
    from mg3d.student.model import NeLF, StudentSpec, gathered_line_features, sampled_line_features

    torch.manual_seed(0)
    r, c, p = 16, 3, 50
    lines = torch.randn(3 * r, c)
    x = torch.rand(2, 3, 1, p) * 2.4 - 1.2  # some past the border
    want = torch.empty(2, 3, c, p)
    for k, axis in enumerate((2, 1, 0)):  # the xy plane's line runs along z, xz's along y, yz's along x
        g = (x[:, axis, 0].clamp(-1, 1) + 1) / 2 * (r - 1)
        lo = g.floor().clamp(max=r - 2).long()
        t = (g - lo).unsqueeze(1)
        want[:, k] = lines[k * r + lo].permute(0, 2, 1) * (1 - t) + lines[k * r + lo + 1].permute(0, 2, 1) * t
    for read in (gathered_line_features, sampled_line_features):
        assert torch.allclose(read(x, lines, r, 1.0, p), want, atol=1e-5)
    base = dict(width_px=32, height_px=32, fx=40, fy=40, cx=16, cy=16, near=1, far=4, depth=2, width=32, sr_factor=4, detail=2, detail_resolution=16)
    plain, lined = NeLF(StudentSpec(**base)), NeLF(StudentSpec(**base, detail_lines=True))
    assert lined.detail.lines.shape == (3 * 16, 2)
    lined.load_state_dict(plain.state_dict(), strict=False)
    c2w = torch.eye(4)[None]
    c2w[0, 2, 3] = 2.5
    assert torch.allclose(lined(c2w), plain(c2w), atol=1e-6)  # lines of ones: the planes alone
    torch.nn.init.normal_(lined.detail.planes, std=0.5)
    lined(c2w).mean().backward()
    assert lined.detail.lines.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="detail_lines"):
        StudentSpec(**{**base, "detail": 0}, detail_lines=True)


def test_detail_scales_and_product_read_multi_scale_planes_and_multiply_them() -> None:
    """--detail-scales S: plane sets at R, R/2, ... (the coarse ones' weights are tables: a plane rate, no decay);
    --detail-product: the three planes' features multiplied (K-planes), C channels per scale instead of 3 C.
    The texture the fuse reads is exactly those reads; every scale learns; bad combinations are refused."""
    import torch

    from mg3d.errors import ConfigError
    from mg3d.student.model import NeLF, StudentSpec, sampled_line_features, sampled_plane_features
    from mg3d.student.train import is_table

    torch.manual_seed(0)
    base = dict(width_px=32, height_px=32, fx=40, fy=40, cx=16, cy=16, near=1, far=4, depth=2, width=32, sr_factor=4, detail=2, detail_resolution=16)
    for product, per_scale in ((False, 6), (True, 2)):
        spec = StudentSpec(**base, detail_scales=3, detail_product=product, detail_lines=True)
        model = NeLF(spec)
        assert spec.detail_resolutions == [16, 8, 4] and spec.detail_channels == 3 * per_scale
        assert [tuple(p.shape) for p in model.detail.scales()] == [(3 * 256, 2), (3 * 64, 2), (3 * 16, 2)]
        assert model.detail.fuse.in_channels == 16 + 3 * per_scale  # 16 channels after the x4 upsampling
        for table in (*model.detail.scales(), model.detail.lines):
            torch.nn.init.normal_(table, mean=1.0, std=0.5)
        x = torch.rand(2, 3, 1, 32 * 32) * 2 - 1
        want = []
        for planes, r in zip(model.detail.scales(), (16, 8, 4)):
            f = sampled_plane_features(x, planes, r, 1.0, 1, 32 * 32)[:, :, 0]  # [B, 3, C, P]
            f = f * sampled_line_features(x, model.detail.lines, 16, 1.0, 32 * 32)  # the lines at the finest resolution, for every scale
            want.append(f[:, 0] * f[:, 1] * f[:, 2] if product else f.reshape(2, 6, -1))
        assert torch.allclose(model.detail.texture(x), torch.cat(want, 1), atol=1e-6)
        c2w = torch.eye(4)[None]
        c2w[0, 2, 3] = 2.5
        model(c2w).mean().backward()
        assert all(p.grad.abs().sum() > 0 for p in model.detail.scales())
    assert [name for name, _ in model.named_parameters() if is_table(name)] == ["detail.planes", "detail.coarse1", "detail.coarse2", "detail.lines"]
    plain = NeLF(StudentSpec(**base))  # the defaults: one scale, concatenated, no new weights (older students load)
    assert plain.detail.scales() == [plain.detail.planes] and plain.detail.fuse.in_channels == 16 + 6
    with pytest.raises(ConfigError, match="detail_scales"):
        StudentSpec(**{**base, "detail": 0}, detail_scales=2)
    with pytest.raises(ConfigError, match="detail_product"):
        StudentSpec(**{**base, "detail": 0}, detail_product=True)
    with pytest.raises(ConfigError, match="below 2 cells"):
        StudentSpec(**base, detail_scales=5)


def _read_at_surface(model, distance: float) -> tuple:
    """A 32x32 detail student's texture planes set to varied values, and its surface detail run for a camera at
    z = 2.5 looking down -z with the surface at ``distance``: (features, fused, origin, d)."""
    import torch

    for planes in model.detail.scales():
        torch.nn.init.normal_(planes, mean=1.0, std=0.5)
    c2w = torch.eye(4)[None]
    c2w[0, 2, 3] = 2.5
    features, surface = torch.randn(1, 16, 32, 32), torch.full((1, 1, 32, 32), distance)
    with torch.no_grad():
        fused, _ = model.detail(c2w, features, surface=surface)
    return (features, fused, *model.detail.rays(c2w))


def test_detail_points_read_the_texture_along_the_ray_around_the_surface() -> None:
    """--detail-points K --detail-spread S: the texture is read at K points along each pixel's ray, S cells of
    the finest planes apart and centred on the surface, and the fuse reads their features side by side."""
    import torch

    from mg3d.errors import ConfigError
    from mg3d.student.model import NeLF, StudentSpec, contract

    torch.manual_seed(0)
    base = dict(width_px=32, height_px=32, fx=40, fy=40, cx=16, cy=16, near=1, far=4, depth=2, width=32, sr_factor=4, detail=2, detail_resolution=16)
    spec = StudentSpec(**base, detail_points=3, detail_spread=2.0, detail_scales=2, detail_product=True)
    model = NeLF(spec)
    assert spec.detail_channels == 2 * 2 * 3 and model.detail.fuse.in_channels == 16 + 12
    features, fused, origin, d = _read_at_surface(model, 2.4)
    with torch.no_grad():
        step = 2.0 * 2 / 16  # two cells of the 16-cell planes over [-1, 1], radius 1
        reads = [model.detail.texture(contract(origin + d * (2.4 + k * step), dim=1)) for k in (-1, 0, 1)]
        want = model.detail.fuse(torch.cat([features, torch.cat(reads, 1).reshape(1, 12, 32, 32)], 1))
    assert torch.allclose(fused, want, atol=1e-5)
    assert not torch.allclose(reads[0], reads[2])  # the points differ: a shell, not one point thrice
    with pytest.raises(ConfigError, match="detail_points"):
        StudentSpec(**{**base, "detail": 0}, detail_points=2)
    with pytest.raises(ConfigError, match="detail_spread"):
        StudentSpec(**base, detail_points=2, detail_spread=0.0)


def test_detail_coarse_once_reads_the_coarser_scales_at_the_surface_alone() -> None:
    """--detail-coarse-once: with several points and scales, the finest planes are read at every point and the
    coarser ones once, at the surface (fewer reads, fewer fuse inputs)."""
    import torch

    from mg3d.errors import ConfigError
    from mg3d.student.model import NeLF, StudentSpec, contract

    torch.manual_seed(0)
    base = dict(width_px=32, height_px=32, fx=40, fy=40, cx=16, cy=16, near=1, far=4, depth=2, width=32, sr_factor=4, detail=2, detail_resolution=16,
                detail_points=3, detail_scales=3, detail_product=True)
    spec = StudentSpec(**base, detail_coarse_once=True)
    assert spec.detail_channels == 2 * (3 + 2) and StudentSpec(**base).detail_channels == 2 * 3 * 3
    model = NeLF(spec)
    assert model.detail.fuse.in_channels == 16 + 10
    features, fused, origin, d = _read_at_surface(model, 2.4)
    with torch.no_grad():
        at = [contract(origin + d * (2.4 + k * 2.0 * 2 / 16), dim=1) for k in (-1, 0, 1)]
        reads = [model.detail.texture(x, slice(0, 1)) for x in at] + [model.detail.texture(at[1], slice(1, None))]
        want = model.detail.fuse(torch.cat([features, torch.cat(reads, 1).reshape(1, 10, 32, 32)], 1))
        everything = model.detail.texture(at[1])  # all three scales at the surface: the finest first, then the coarse ones
    assert torch.allclose(fused, want, atol=1e-5)
    assert torch.allclose(everything, torch.cat([reads[1], reads[3]], 1))
    for bad in ({"detail_points": 1}, {"detail_scales": 1}):
        with pytest.raises(ConfigError, match="detail_coarse_once"):
            StudentSpec(**{**base, **bad}, detail_coarse_once=True)


def test_march_box_spreads_the_steps_over_the_occupied_box(tmp_path: Path) -> None:
    """--march-box: the march's steps lie on each ray's chord through the occupied cells' bounding box, so with
    the same number of reads its windows are narrower than the plain march's and still hold the surface; rays
    that miss the box miss; an empty grid is missed by every ray; a saved student's box comes back."""
    import torch

    from mg3d.errors import ConfigError
    from mg3d.student.model import NeLF, StudentSpec

    torch.manual_seed(0)
    r, n = 32, 24
    base = dict(width_px=32, height_px=32, fx=24, fy=24, cx=16, cy=16, near=0.5, far=5.0, radius=1.0, center=(0.1, -0.2, 0.05),
                depth=1, width=8, sr_factor=8, detail=2, detail_resolution=8, occupancy=r)
    grid = torch.zeros(r, r, r, dtype=torch.uint8)
    grid[10:20, 12:18, 8:22] = (torch.rand(10, 6, 14) < 0.3).to(torch.uint8)  # a cloud of cells in a box a third of the grid's side
    c2w = torch.eye(4).repeat(3, 1, 1)
    c2w[:, :3, 3] = torch.tensor([[0.1, -0.2, 2.5], [0.4, -0.3, 1.6], [0.1, -0.1, 0.3]])  # outside, near and inside the grid
    models = {}
    for name, steps, box in (("plain", n, False), ("box", n, True), ("fine", 4096, False)):
        models[name] = NeLF(StudentSpec(**base, march_steps=steps, march_box=box))
        models[name].detail.set_occupancy(grid.reshape(-1))
    with torch.no_grad():
        hit, lo, hi = models["box"].detail.march_cameras(c2w)
        plain_hit, plain_lo, plain_hi = models["plain"].detail.march_cameras(c2w)
        true_hit, true_t, _ = models["fine"].detail.march_cameras(c2w)  # 4,096 steps: the first occupied point, nearly exactly
    assert float(true_hit.float().mean()) > 0.1 and bool((~true_hit).any())
    assert not bool((hit & ~true_hit).any())  # a box hit is a true hit
    assert float(hit.float().sum()) >= float(plain_hit.float().sum())  # finer steps skip no more thin cells than the plain march
    def holds(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:  # share of true hits whose window holds the surface
        return float((h & (a <= true_t + 1e-3) & (true_t <= b)).float().sum() / true_hit.float().sum())

    assert holds(hit, lo, hi) > max(0.9, holds(plain_hit, plain_lo, plain_hi))  # here 91% against 16%; a step may pass a thin cell the fine march meets
    assert float((hi - lo)[hit].mean()) < 0.7 * float((plain_hi - plain_lo)[plain_hit].mean())  # and is narrower
    model = models["box"]
    start, spacing = torch.rand(3, 3, 1, 50) * 30 + 1, torch.rand(3, 3, 1, 50) - 0.5
    for a, b in zip(model.detail._cells(start, spacing, clamp=False, elementwise=True), model.detail._cells(start, spacing, clamp=False, elementwise=False)):
        assert a.dtype == b.dtype == torch.int32 and a.shape == (3, 50, n) and float((a != b).float().mean()) < 1e-3  # the GPU's form: the same cells
    model.save(tmp_path / "student")
    again = NeLF.load(tmp_path / "student")
    assert torch.equal(again.detail.box, model.detail.box)
    assert torch.equal(again.detail.first_hits(c2w), model.detail.first_hits(c2w))
    model.detail.set_occupancy(torch.zeros(r**3, dtype=torch.uint8))
    assert not bool(model.detail.march_cameras(c2w)[0].any())
    with pytest.raises(ConfigError, match="march_box"):
        StudentSpec(**{**base, "occupancy": 0}, march_box=True)


def test_mobile_r2l_size() -> None:
    from mg3d.student.model import NeLF, StudentSpec, parameter_count

    spec = StudentSpec(width_px=400, height_px=400, fx=555.6, fy=555.6, cx=200, cy=200, near=2, far=6)
    params = parameter_count(NeLF(spec))
    assert 7.5 < params * 2 / 1e6 < 9.0  # MobileR2L reports 8.3 MB in fp16


def test_contraction_and_encoding_use_delegate_friendly_ops_with_the_same_values() -> None:
    """contract() without Where/ReduceL2 equals mip-NeRF 360's formula; sin(x + pi/2) stands for cos(x)."""
    import torch

    from mg3d.student.model import NeLF, StudentSpec, contract

    x = torch.randn(2, 3, 5, 7) * 2
    norm = x.norm(dim=1, keepdim=True)
    reference = torch.where(norm <= 1.0, x, (2.0 - 1.0 / norm) * x / norm)
    torch.testing.assert_close(contract(x, dim=1), reference, atol=1e-6, rtol=1e-6)
    spec = StudentSpec(width_px=32, height_px=32, fx=40, fy=40, cx=16, cy=16, near=1, far=4, depth=1, width=16, sr_factor=4, frequencies=3)
    model = NeLF(spec)
    c2w = torch.eye(4)[None]
    c2w[0, 2, 3] = 2.5
    enc = model.encode(c2w)
    raw = enc[:, : 3 * spec.samples]  # [x, sin(2^f x) ..., cos(2^f x) ...], coordinate-major, frequency-minor
    scaled = (raw[:, :, None] * torch.tensor([1.0, 2.0, 4.0]).view(1, 1, 3, 1, 1)).flatten(1, 2)
    n = scaled.shape[1]
    torch.testing.assert_close(enc[:, 3 * spec.samples : 3 * spec.samples + n], torch.sin(scaled), atol=1e-5, rtol=0)
    torch.testing.assert_close(enc[:, 3 * spec.samples + n :], torch.cos(scaled), atol=1e-5, rtol=0)


def test_feature_planes_read_bilinearly_and_learn() -> None:
    """Both forms of the plane reads (Gather, which exports trace, and grid_sample, which torch runs) equal a
    per-plane bilinear interpolation with border clamp and give the same gradients; a traced graph holds the
    Gather form and no GridSample; the planes learn; a half-precision student still reads the right cells
    (indices in fp32)."""
    import torch
    import torch.nn.functional as F

    from mg3d.student.model import NeLF, StudentSpec, gathered_plane_features, plane_features, sampled_plane_features

    torch.manual_seed(0)
    spec = StudentSpec(width_px=64, height_px=64, fx=80, fy=80, cx=32, cy=32, near=2, far=6, radius=1.5, depth=2, width=16, sr_factor=8, planes=4, plane_resolution=16)
    model = NeLF(spec)
    torch.nn.init.normal_(model.planes)
    assert spec.in_channels == 3 * 8 * (13 + 4)
    x = (torch.rand(2, 3, 5, 7) * 2.4 - 1.2).requires_grad_()  # some points outside the planes
    grids = model.planes.detach().reshape(3, 16, 16, 4).permute(0, 3, 1, 2)  # [plane, C, v, u]
    grads = []
    for read in (gathered_plane_features, sampled_plane_features):
        got = read(x, model.planes, 16, 1.0, 5, 7)  # [B, 3, S, C, P]
        for k, (a, b) in enumerate(((0, 1), (0, 2), (1, 2))):
            where = torch.stack([x[:, a], x[:, b]], -1).detach().clamp(-1, 1)  # [B, S, P, 2] as (u, v)
            expected = F.grid_sample(grids[k : k + 1].expand(2, -1, -1, -1), where, align_corners=True)  # [B, C, S, P]
            torch.testing.assert_close(got[:, k].detach(), expected.permute(0, 2, 1, 3), atol=1e-5, rtol=0)
        grads.append(torch.autograd.grad(got.square().sum(), (x, model.planes)))
    for gathered, sampled in zip(*grads):
        torch.testing.assert_close(sampled, gathered, atol=1e-4, rtol=1e-4)
    traced = torch.jit.trace(lambda p, table: plane_features(p, table, 16, 1.0, 5, 7), (x.detach(), model.planes.detach()))
    nodes = {n.kind() for n in traced.graph.nodes()}
    assert "aten::index_select" in nodes and "aten::grid_sampler" not in nodes
    c2w = torch.eye(4)[None].repeat(2, 1, 1)
    c2w[:, 2, 3] = torch.tensor([4.0, 3.5])
    model(c2w).mean().backward()
    assert model.planes.grad is not None and model.planes.grad.abs().sum() > 0
    x = (torch.rand(1, 3, 8, 64) * 2 - 1).half()
    table = torch.randn(3 * 512 * 512, 2).half()
    for read in (gathered_plane_features, sampled_plane_features):
        reference = read(x.float(), table.float(), 512, 1.0, 8, 64)  # the same points and values in fp32
        half = read(x, table, 512, 1.0, 8, 64)
        assert half.dtype == torch.float16 and (half.float() - reference).abs().max() < 0.02  # fp16 indices would be off by up to 64 cells there


def test_surface_detail_learns_texture_finer_than_the_ray_grid(tmp_path: Path) -> None:
    """With x8 super-resolution the ray grid is 8x coarser than the image: a texture with periods of a few
    pixels is out of reach of the plain student's blocks, while the surface detail (planes read where each
    pixel's ray meets the surface, placed by the teacher's depth) learns it in the same number of steps."""
    import torch

    from mg3d.student import StudentConfig
    from mg3d.student.distill import PseudoData
    from mg3d.student.model import NeLF, StudentSpec
    from mg3d.student.synthetic import textured_spheres
    from mg3d.student.train import train

    textured_spheres(tmp_path / "data", 150, 64, seed=0)
    data = PseudoData(tmp_path / "data")
    test_images, test_c2w = textured_spheres(None, 6, 64, seed=1)
    scores = {}
    for detail in (0, 4):
        torch.manual_seed(0)
        spec = StudentSpec(width_px=64, height_px=64, fx=data.meta["fx"], fy=data.meta["fx"], cx=32, cy=32, near=2.0, far=4.0, radius=1.0, depth=2, width=32,
                           sr_factor=8, detail=detail, detail_resolution=128)
        model = NeLF(spec)
        config = StudentConfig(depth=2, width=32, detail=detail, steps=300, batch=8, lr=3e-3, warmup=20, finetune_fraction=0, checkpoint_every=10**6, device="cpu")
        train(model, data, None, config, tmp_path / f"run{detail}", "key", torch.device("cpu"))
        model.eval()
        with torch.no_grad():
            _, depth = model(torch.from_numpy(test_c2w), with_depth=True)
            pred = model(torch.from_numpy(test_c2w)).permute(0, 2, 3, 1).numpy()
        scores[detail] = -10 * np.log10(np.mean((pred - test_images) ** 2))
        if detail:
            assert depth.shape == (6, 1, 64, 64) and float(depth.min()) >= 2.0 and float(depth.max()) <= 4.0
            with torch.no_grad():  # the diagnostic that reads the planes at given distances: the predicted ones
                same = model(torch.from_numpy(test_c2w), surface=depth).permute(0, 2, 3, 1).numpy()  # change nothing,
                moved = model(torch.from_numpy(test_c2w), surface=depth + 0.3).permute(0, 2, 3, 1).numpy()  # others do
            np.testing.assert_allclose(same, pred, atol=1e-6)
            assert np.abs(moved - pred).mean() > 1e-3
    assert scores[4] > scores[0] + 3, scores


def test_depth_loss_counts_only_pixels_with_a_surface() -> None:
    import torch

    from mg3d.student.model import StudentSpec
    from mg3d.student.train import depth_loss

    spec = StudentSpec(width_px=16, height_px=16, fx=20, fy=20, cx=8, cy=8, near=2, far=6, sr_factor=8)
    depth = torch.full((1, 1, 2, 2), 4.0)
    surface = torch.tensor([[[[5.0, 0.0], [0.0, 0.0]]]])  # one pixel with a surface 1 unit (1/4 of the range) behind
    assert float(depth_loss(spec, depth, surface)) == pytest.approx(0.25)
    assert float(depth_loss(spec, depth, torch.zeros_like(surface))) == 0.0
    unbounded = StudentSpec(width_px=16, height_px=16, fx=20, fy=20, cx=8, cy=8, near=0.5, far=100, spacing="disparity", sr_factor=8)
    assert float(depth_loss(unbounded, torch.full((1, 1, 1, 1), 1.0), torch.full((1, 1, 1, 1), 1.0))) < 1e-6


def test_batchnorm_folds_into_the_convolutions() -> None:
    import torch

    from mg3d.student.model import NeLF, StudentSpec, fold_batchnorm

    spec = StudentSpec(width_px=32, height_px=32, fx=40, fy=40, cx=16, cy=16, near=1, far=4, depth=3, width=16, sr_factor=4)
    model = NeLF(spec)
    for module in model.modules():  # trained-looking statistics and scales
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), "the student itself is left as it was"
    c2w = torch.eye(4)[None]
    c2w[0, 2, 3] = 2.5
    with torch.no_grad():
        torch.testing.assert_close(folded(c2w), model(c2w), atol=1e-5, rtol=0)


def test_an_fp16_student_keeps_its_geometry_in_fp32() -> None:
    """How a student ships to a GPU (BatchNorm folded, ``half()``): the weights turn fp16, the geometry (ray
    directions, sample distances, frequencies, the march's steps and box) stays fp32, positions are computed in
    fp32 from the fp32 pose, and the image matches the fp32 student's (the lego student: 77-79 dB apart, where
    an fp16 pose and fp16 directions had left 35-42 dB)."""
    import copy

    import torch

    from mg3d.student.model import NeLF, StudentSpec, fold_batchnorm
    from mg3d.student.synthetic import sphere_occupancy

    spec = StudentSpec(width_px=32, height_px=32, fx=40, fy=40, cx=16, cy=16, near=1.5, far=4.5, depth=2, width=16, sr_factor=4,
                       detail=4, detail_resolution=16, detail_view=2, detail_scales=2, detail_product=True, detail_points=2,
                       detail_coarse_once=True, occupancy=16, march_box=True, march_steps=16, head_layers=1, head_width=8)
    torch.manual_seed(0)
    model = NeLF(spec)
    model.detail.set_occupancy(torch.from_numpy(sphere_occupancy(((np.zeros(3), 0.5),), 16)))
    for p in model.parameters():  # weights that make every input matter
        p.data.normal_(0, 0.3)
    model = fold_batchnorm(model.eval())
    half = copy.deepcopy(model).half().to(memory_format=torch.channels_last)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    buffers = {n: b for n, b in half.named_buffers() if b.is_floating_point()}
    assert {"dirs", "t", "freqs", "detail.dirs", "detail.march_k", "detail.box"} <= set(buffers)
    assert all(b.dtype == torch.float32 for b in buffers.values()), [n for n, b in buffers.items() if b.dtype != torch.float32]
    torch.testing.assert_close(half.detail.box, model.detail.box, atol=0, rtol=0)
    c2w = torch.eye(4)[None]
    c2w[0, :3, 3] = torch.tensor([0.3, 0.2, 3.0])
    with torch.no_grad():
        ref, out = model(c2w), half(c2w)
    assert out.dtype == torch.float16
    assert float((out.float() - ref).abs().max()) < 1e-2 and float(ref.std()) > 0.1  # the same image, not a flat one


def test_students_saved_before_norm_and_activation_options_still_load(tmp_path: Path) -> None:
    import json

    import torch

    from mg3d.student.model import NeLF, StudentSpec

    old = NeLF(StudentSpec(width_px=32, height_px=32, fx=40, fy=40, cx=16, cy=16, near=1, far=4, depth=2, width=16, sr_factor=4, norm="none", activation="gelu"))
    old.save(tmp_path)
    meta = json.loads((tmp_path / "student.json").read_text())
    del meta["spec"]["norm"], meta["spec"]["activation"]  # as written by mg3d before they existed
    (tmp_path / "student.json").write_text(json.dumps(meta))
    loaded = NeLF.load(tmp_path)
    assert loaded.spec.norm == "none" and loaded.spec.activation == "gelu"
    c2w = torch.eye(4)[None]
    c2w[0, 2, 3] = 2.5
    torch.testing.assert_close(loaded(c2w), old(c2w))


def test_bad_resolution_lists_sizes_that_work(ws: Path, cli) -> None:
    result = cli("student", ws, *SHORT, "--resolution", "66x48")
    assert result.exit_code == 1
    line = one_line_error(result, "not divisible by the super-resolution factor 4", "64x48")
    assert "68x48" in line
    assert not (ws / "student").exists() and not list(ws.glob(".student.*"))
    assert one_line_error(cli("student", ws, *SHORT, "--resolution", "big"), "not understood")


def test_detail_on_pseudo_data_without_surfaces_says_to_redo_distill(ws: Path, cli) -> None:
    meta_path = ws / "distill" / "distill.json"
    meta = json.loads(meta_path.read_text())
    del meta["surfaces"]  # as pseudo data made before the surfaces were stored
    meta_path.write_text(json.dumps(meta))
    result = cli("student", ws, *SHORT, "--surface", "on", "--detail", "2")
    assert result.exit_code == 1
    one_line_error(result, "no surface distances", "mg3d distill", "--force", "--surface off")
    assert not (ws / "student").exists() and not list(ws.glob(".student.*"))


@pytest.mark.parametrize("extra", [(), ("--march-box", "--detail-points", "2", "--detail-scales", "2", "--detail-coarse-once")], ids=["plain", "box+coarse-once"])
def test_occupancy_is_baked_from_the_teacher(ws: Path, cli, extra: tuple[str, ...]) -> None:
    """--occupancy bakes the grid from the workspace's teacher (the tiny one here: cells where its density
    is high), the march finds hits in it, and the grid travels with the weights (also with the march inside
    the occupied box and the coarse texture read once)."""
    import torch

    from mg3d.student.distill import PseudoData
    from mg3d.student.model import NeLF

    result = cli("student", ws, *SHORT, "--surface", "on", "--detail", "2", "--occupancy", "32", "--steps", "10", *extra)
    assert result.exit_code == 0, result.output
    fraction = read_manifest(ws, "student")["metrics"]["occupied_fraction"]
    model = NeLF.load(ws)
    assert 0 < fraction < 0.5 and float(model.detail.occupied.float().mean()) == pytest.approx(fraction, abs=1e-4)  # saved and loaded
    data = PseudoData(ws / "distill")
    c2w = torch.from_numpy(data.cameras[:6])
    hit, lo, hi = model.detail.march_cameras(c2w)
    assert 0.3 < float(hit.float().mean()) and bool((lo < hi).all())
    with torch.no_grad():
        _, depth = model(c2w, with_depth=True)
    assert bool(((depth >= lo - 1e-4) & (depth <= hi + 1e-4))[hit].all())  # the depth stays in its window


TEXTURE_OPTIONS = [(("--occupancy", "32"), "occupancy"), (("--detail-view", "1"), "detail_view"), (("--detail-lines",), "detail_lines"),
                   (("--detail-scales", "2"), "detail_scales"), (("--no-detail-product",), "detail_product"), (("--detail-points", "2"), "detail_points"),
                   (("--no-detail-coarse-once",), "detail_coarse_once"), (("--detail", "2"), "detail 2")]
TEXTURE_OFF = {"unbounded": ("--surface", "auto"), "surface is off": (), "detail is 0": ("--detail", "0")}


@pytest.mark.parametrize(("why", "option", "needle"), [(why, option, needle) for why in TEXTURE_OFF for option, needle in TEXTURE_OPTIONS
                                                         if not (why == "detail is 0" and option[0] == "--detail")])
def test_texture_options_with_the_texture_off_are_refused(ws: Path, cli, why: str, option: tuple[str, ...], needle: str) -> None:
    """The demo is an unbounded capture, so --surface auto (the default) trains MobileR2L's student there; the
    tiny preset turns the texture off; --detail 0 does too. A texture option changed on top is reported, not
    dropped."""
    result = cli("student", ws, *SHORT, *TEXTURE_OFF[why], *option)
    assert result.exit_code != 0
    one_line_error(result, needle, "surface detail", why, "--surface on")
    assert not (ws / "student").exists() and not list(ws.glob(".student.*"))


def test_surface_choice_follows_the_scene_and_the_pseudo_data() -> None:
    """auto: the texture for a bounded scene whose pseudo views hold surface distances, MobileR2L's student for
    an unbounded capture or older pseudo data; on and off as said; the spec then has the texture's form or
    none of it, and the head's -1 means 2 layers with the texture and none without."""
    from mg3d.student import StudentConfig, surface_choice
    from mg3d.student.train import build_spec

    meta = {"width": 64, "height": 64, "fx": 70.0, "fy": 70.0, "cx": 32.0, "cy": 32.0, "near": 2.0, "far": 6.0, "bound": 1.5, "unbounded": False,
            "shards": ["shard_0000.npy"], "surfaces": ["surface_0000.npy"]}
    older = {k: v for k, v in meta.items() if k != "surfaces"}
    assert surface_choice(StudentConfig(), meta)[0]
    assert not surface_choice(StudentConfig(), {**meta, "unbounded": True})[0]
    assert "older mg3d" in surface_choice(StudentConfig(), older)[1]
    assert surface_choice(StudentConfig(surface="on"), {**meta, "unbounded": True})[0]
    assert not surface_choice(StudentConfig(surface="off"), meta)[0]
    # a bare on/off in YAML (a config file, --set student.surface=off) reads as a bool
    from mg3d.config import resolve_config

    assert [resolve_config(StudentConfig, "student", overrides=yaml.safe_load(f"surface: {v}")).surface for v in ("off", "on", "auto")] == ["off", "on", "auto"]
    on, off = build_spec(meta, StudentConfig()), build_spec(meta, StudentConfig(surface="off"))
    assert (on.detail, on.occupancy, on.march_steps, on.march_box, on.detail_scales, on.detail_product, on.detail_points, on.detail_coarse_once, on.detail_view, on.head_layers) == (
        8, 256, 64, True, 3, True, 3, True, 2, 2)
    assert (off.detail, off.occupancy, off.detail_scales, off.detail_points, off.detail_view, off.head_layers) == (0, 0, 1, 1, 0, 0)
    assert build_spec(meta, StudentConfig(surface="off", head_layers=1)).head_layers == 1
    # refinements of an option that is off are moot, not errors
    moot = build_spec(meta, StudentConfig(occupancy=0, detail_points=1))
    assert (moot.occupancy, moot.march_box, moot.detail_points, moot.detail_coarse_once) == (0, False, 1, False)


def test_march_box_without_occupancy_is_refused_by_the_spec() -> None:
    from mg3d.errors import ConfigError
    from mg3d.student.model import StudentSpec

    with pytest.raises(ConfigError, match="march_box bounds the occupancy march"):
        StudentSpec(width_px=32, height_px=32, fx=40, fy=40, cx=16, cy=16, near=1, far=4, sr_factor=4, detail=2, occupancy=0, march_box=True)


def test_stage_order_is_enforced(tiny_demo_capture: Path, tmp_path: Path, cli) -> None:
    ws = Path(shutil.copytree(tiny_demo_capture, tmp_path / "ws"))
    result = cli("distill", ws, "--preset", "tiny")
    assert result.exit_code == 1
    one_line_error(result, "no finished teacher stage", "mg3d teacher")
    result = cli("student", ws, "--preset", "tiny")
    assert result.exit_code == 1
    one_line_error(result, "no finished distill stage", "mg3d distill")
    assert sorted(p.name for p in ws.iterdir()) == sorted(p.name for p in tiny_demo_capture.iterdir())


# ---- learning -----------------------------------------------------------------------------------------
def test_tiny_student_learns_the_demo(trained: tuple[Path, str], cli) -> None:
    from mg3d.formats import load_scene
    from mg3d.student.evaluate import truth_at

    ws, output = trained
    metrics = read_manifest(ws, "student")["metrics"]
    # a student that predicts the mean colour of the pseudo views is the floor a broken model reaches
    scene = load_scene(ws)
    mean = np.load(ws / "distill" / "shard_0000.npy").reshape(-1, 3).mean(0) / 255.0
    floor = np.mean([-10 * np.log10(np.mean((truth_at(scene, int(i), 64, 48) - mean) ** 2)) for i in scene.splits["test"]])
    assert metrics["psnr"] > floor + 1.5, (metrics["psnr"], floor)
    assert metrics["psnr_vs_teacher"] > 18.0, metrics  # it imitates the teacher
    assert metrics["steps"] == 600 and metrics["resolution"] == [64, 48] and metrics["eval_views"] == 3
    assert metrics["eval_student_fps"] > metrics["eval_teacher_fps"]
    folder = ws / "student"
    assert json.loads((folder / "student.json").read_text())["spec"]["sr_factor"] == 4
    picture = Image.open(folder / "renders" / "test_000.png")
    assert picture.size == (3 * 64, 48)  # truth | teacher | student
    assert not list(folder.glob("checkpoint*")) and not list(ws.glob(".student.*"))
    assert "student done" in output
    info = cli("info", ws)
    row = next(line for line in info.output.splitlines() if line.strip("│┃| ").startswith("student"))
    assert "done" in row and "600 steps, 4x48" in row, info.output
    assert "below the teacher" in info.output and f"{metrics['psnr']:.4g}" in info.output


def test_load_and_render(trained: tuple[Path, str]) -> None:
    import torch

    from mg3d.metrics import psnr
    from mg3d.student.model import NeLF, StudentError

    ws, _ = trained
    model = NeLF.load(ws).eval()
    c2w = torch.from_numpy(np.load(ws / "distill" / "cameras.npy")[:4])
    with torch.no_grad():
        pred = model(c2w)
    target = torch.from_numpy(np.load(ws / "distill" / "shard_0000.npy")[:4]).permute(0, 3, 1, 2).float() / 255
    assert float(psnr(pred, target).mean()) > 18.0  # it reproduces its training views
    bad = ws.parent / "corrupt"
    shutil.copytree(ws / "student", bad)
    (bad / "student.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(StudentError, match="corrupt"):
        NeLF.load(bad)


def test_interrupted_training_resumes_no_worse(ws: Path, cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args = ("student", ws, *SHORT, "--steps", "60", "--checkpoint-every", "20", "--finetune-fraction", "0.2")
    straight = Path(shutil.copytree(ws, tmp_path / "straight"))
    with monkeypatch.context() as patch:
        interrupt_at(patch, "mg3d.student.train", 40)
        result = cli(*args)
    assert result.exit_code == 130, result.output
    assert json.loads((ws / ".student.partial" / "checkpoint.json").read_text())["step"] == 40
    result = cli(*args)
    assert result.exit_code == 0, result.output
    metrics = read_manifest(ws, "student")["metrics"]
    assert metrics["resumed_from_step"] == 40 and metrics["steps"] == 60
    assert cli("student", straight, *args[2:]).exit_code == 0
    reference = read_manifest(straight, "student")["metrics"]
    assert metrics["final_loss"] == pytest.approx(reference["final_loss"], rel=0.02)
    assert metrics["psnr"] >= reference["psnr"] - 0.05


def test_divergence_stops_and_keeps_the_good_checkpoint(ws: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from mg3d.student.model import NeLF

    real, calls = NeLF.forward, [0]

    def poisoned(self, *args, **kwargs):
        calls[0] += 1
        out = real(self, *args, **kwargs)
        return out * float("nan") if calls[0] > 40 else out

    monkeypatch.setattr(NeLF, "forward", poisoned)
    result = cli("student", ws, *SHORT, "--steps", "80", "--checkpoint-every", "32")
    assert result.exit_code == 1
    one_line_error(result, "diverged", "step 48", "step 32", "--lr")
    assert json.loads((ws / ".student.partial" / "checkpoint.json").read_text())["step"] == 32
    assert not (ws / "student").exists()


def test_weights_spoilt_with_a_finite_loss_stop_before_the_checkpoint(ws: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """An infinite gradient makes NaN weights while the loss read at that step (from before the update) is
    still finite: the weights are checked before a checkpoint is written, so no spoilt one is kept."""
    import torch

    real, calls = torch.optim.AdamW.step, [0]

    def spoiling(self, *args, **kwargs):
        calls[0] += 1
        out = real(self, *args, **kwargs)
        if calls[0] == 40:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", spoiling)
    result = cli("student", ws, *SHORT, "--steps", "80", "--checkpoint-every", "20")
    assert result.exit_code == 1
    one_line_error(result, "diverged", "a weight became nan at step 40", "(step 20)")
    assert json.loads((ws / ".student.partial" / "checkpoint.json").read_text())["step"] == 20
    assert not (ws / "student").exists()


def test_a_failed_evaluation_keeps_the_checkpoint_to_resume_from(ws: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training done, weights saved, then the evaluation fails: the next run resumes from the last checkpoint
    instead of training from step 0 again."""
    import mg3d.student.evaluate
    from mg3d.student.model import StudentError

    def failing(*args, **kwargs):
        raise StudentError("the evaluation failed")

    args = ("student", ws, *SHORT, "--steps", "50", "--checkpoint-every", "20")
    with monkeypatch.context() as patch:
        patch.setattr(mg3d.student.evaluate, "evaluate", failing)
        result = cli(*args)
    assert result.exit_code == 1
    one_line_error(result, "the evaluation failed")
    assert json.loads((ws / ".student.partial" / "checkpoint.json").read_text())["step"] == 40
    result = cli(*args)
    assert result.exit_code == 0, result.output
    metrics = read_manifest(ws, "student")["metrics"]
    assert metrics["resumed_from_step"] == 40 and metrics["steps"] == 50 and "psnr" in metrics
    assert not list((ws / "student").glob("checkpoint*"))


def test_checkpoint_progress_travels_with_its_weights(tmp_path: Path) -> None:
    """A kill between the two renames of a checkpoint leaves new weights beside the previous checkpoint.json:
    the progress written into the weights' own header wins, so the resumed schedule matches the weights."""
    import torch

    from mg3d.checkpoint import load_checkpoint, save_checkpoint

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        return model, torch.optim.AdamW(model.parameters())

    model, optimizer = fresh()
    save_checkpoint(tmp_path, model, optimizer, {"key": "k", "step": 10})
    old_json = (tmp_path / "checkpoint.json").read_text()
    with torch.no_grad():
        model.weight.add_(1.0)
    save_checkpoint(tmp_path, model, optimizer, {"key": "k", "step": 20})
    (tmp_path / "checkpoint.json").write_text(old_json)  # as if killed between the renames
    restored, restored_optimizer = fresh()
    meta = load_checkpoint(tmp_path, restored, restored_optimizer, "k")
    assert meta is not None and meta["step"] == 20
    assert torch.equal(restored.weight, model.weight)


def test_out_of_memory_names_the_settings_to_lower(ws: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from mg3d.student.model import NeLF

    def exhausted(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(NeLF, "forward", exhausted)
    result = cli("student", ws, *SHORT, "--steps", "10")
    assert result.exit_code == 1
    one_line_error(result, "does not fit", "--batch", "--resolution")


def _torchrun(ws: Path, *args: str, script: Path | None = None) -> subprocess.CompletedProcess:
    """``mg3d student WS --preset tiny ...`` (or ``script`` with those arguments) as two gloo processes under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    entry = [str(script)] if script else ["-m", "mg3d"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry, "student", str(ws), *SHORT, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_ddp_with_two_gloo_processes(ws: Path) -> None:
    """torchrun with two CPU processes (gloo) through the normal entry point."""
    done = _torchrun(ws, "--steps", "40", "--checkpoint-every", "20")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    manifest = read_manifest(ws, "student")
    assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["steps"] == 40
    assert "x2 processes" in manifest["device"]["kind"]
    assert np.isfinite(manifest["metrics"]["final_loss"]) and manifest["metrics"]["psnr"] > 8


def test_ddp_time_limit_stops_every_process_at_the_same_step(ws: Path) -> None:
    """With --max-time-s the processes agree every 16 steps on the slowest clock: they stop at the same step
    (one that stopped alone would leave the other waiting in DDP's all-reduce until torchrun killed it)."""
    done = _torchrun(ws, "--steps", "100000", "--max-time-s", "6")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    metrics = read_manifest(ws, "student")["metrics"]
    assert metrics["world_size"] == 2 and 16 < metrics["steps"] < 100000
    assert 6 <= metrics["train_time_s"] < 30

def test_ddp_divergence_on_one_process_stops_every_process_before_a_spoilt_checkpoint(ws: Path, tmp_path: Path) -> None:
    """Under torchrun, the loss of one process alone turns NaN at a step where the loss is read and a checkpoint
    is due. DDP averages the NaN gradients into every process's weights, so rank 0 (whose own loss is finite)
    must not save them: every process stops with the one-line divergence error and the step-16 checkpoint stays."""
    script = tmp_path / "diverge.py"
    script.write_text(
        "import os\n"
        "from mg3d.cli import main\n"
        "from mg3d.student.model import NeLF\n"
        "real, calls = NeLF.forward, [0]\n"
        "def poisoned(self, *args, **kwargs):  # rank 1's 32nd step\n"
        "    calls[0] += 1\n"
        "    out = real(self, *args, **kwargs)\n"
        "    return out * float('nan') if os.environ['RANK'] == '1' and calls[0] == 32 else out\n"
        "NeLF.forward = poisoned\n"
        "main(prog_name='mg3d')\n"
    )
    done = _torchrun(ws, "--steps", "80", "--checkpoint-every", "16", script=script)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("diverged" in e and "step 32" in e and "(step 16)" in e for e in errors), output[-3000:]
    assert json.loads((ws / ".student.partial" / "checkpoint.json").read_text())["step"] == 16
    from safetensors.numpy import load_file

    weights = load_file(ws / ".student.partial" / "checkpoint.safetensors")
    assert weights and all(np.isfinite(v).all() for v in weights.values() if v.dtype.kind == "f")
    assert not (ws / "student").exists()


def test_ddp_interrupted_run_resumes_on_every_process(ws: Path, tmp_path: Path) -> None:
    """Both torchrun processes stopped at step 25 (say, a preempted job); the next run resumes every process
    from rank 0's step-16 checkpoint (they check that they found the same one) and finishes the schedule."""
    script = tmp_path / "interrupt.py"
    script.write_text(
        "from mg3d.cli import main\n"
        "from mg3d.student.model import NeLF\n"
        "real, calls = NeLF.forward, [0]\n"
        "def stopping(self, *args, **kwargs):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 25:\n"
        "        raise KeyboardInterrupt\n"
        "    return real(self, *args, **kwargs)\n"
        "NeLF.forward = stopping\n"
        "main(prog_name='mg3d')\n"
    )
    done = _torchrun(ws, "--steps", "40", "--checkpoint-every", "16", script=script)
    assert done.returncode != 0 and not (ws / "student").exists(), done.stdout[-2000:] + done.stderr[-3000:]
    assert json.loads((ws / ".student.partial" / "checkpoint.json").read_text())["step"] == 16
    done = _torchrun(ws, "--steps", "40", "--checkpoint-every", "16")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    metrics = read_manifest(ws, "student")["metrics"]
    assert metrics["world_size"] == 2 and metrics["resumed_from_step"] == 16 and metrics["steps"] == 40
    assert np.isfinite(metrics["final_loss"])


def test_pseudo_data_with_a_broken_camera_is_refused(ws: Path, cli) -> None:
    """A NaN in one stored pose would end training as a "divergence" with the advice to lower the learning rate."""
    cameras = np.load(ws / "distill" / "cameras.npy")
    cameras[5, 0, 3] = np.nan
    np.save(ws / "distill" / "cameras.npy", cameras)
    result = cli("student", ws, *SHORT, "--steps", "10")
    assert result.exit_code == 1
    one_line_error(result, "1 camera(s)", "view 5", "mg3d distill WS --force")
    assert not (ws / "student").exists() and not (ws / ".student.partial").exists()
    np.save(ws / "distill" / "cameras.npy", cameras[:, :3])  # [N, 3, 4]: not poses
    one_line_error(cli("student", ws, *SHORT, "--steps", "10"), "not [N, 4, 4] poses")


@pytest.mark.parametrize("command", ["distill", "student"])
def test_every_config_field_is_an_option(command: str, cli) -> None:
    import dataclasses

    import mg3d.cli as cli_module
    from mg3d.student import StudentConfig
    from mg3d.student.distill import DistillConfig

    cls = StudentConfig if command == "student" else DistillConfig
    fields = [f.name for f in dataclasses.fields(cls)]
    assert sorted(getattr(cli_module, f"_{command.upper()}_OPTIONS")) == sorted(fields)
    help_text = cli(command, "--help").output
    for name in fields:
        assert f"--{name.replace('_', '-')}" in help_text, name


def test_occupancy_march_finds_the_first_occupied_cell() -> None:
    """Each pixel's ray is marched through the occupancy grid: the window it returns holds the distance where
    the ray enters the first occupied cells; a ray that meets none has no hit."""
    import torch

    from mg3d.student.model import NeLF, StudentSpec

    spec = StudentSpec(width_px=16, height_px=16, fx=40, fy=40, cx=8, cy=8, near=2.0, far=4.0, radius=1.0, depth=1, width=8, sr_factor=8,
                       detail=2, detail_resolution=8, occupancy=8, march_steps=64)
    model = NeLF(spec)
    r = 8
    i, j, k = np.meshgrid(*[np.arange(r)] * 3, indexing="ij")  # cells (x, y, z); centres at (index + 0.5) / 4 - 1
    slab = (k == 5) & (np.abs(i - 3.5) < 1) & (np.abs(j - 3.5) < 1)  # z in [0.25, 0.5], x and y in [-0.25, 0.25]
    model.detail.set_occupancy(torch.from_numpy(slab.reshape(-1).astype(np.uint8)))
    c2w = torch.eye(4)[None]
    c2w[0, 2, 3] = 3.0  # at z = 3 looking down -z: the slab's top is 2.5 away
    hit, lo, hi = (x.reshape(16, 16) for x in model.detail.march_cameras(c2w))
    assert bool(hit[8, 8]) and not bool(hit[0, 0])  # the centre pixel sees the slab, a corner misses it
    assert float(lo[8, 8]) <= 2.5 <= float(hi[8, 8]) and float(hi[8, 8] - lo[8, 8]) < 0.5
    # training marches each view once and passes the result in: the same images as marching in the forward
    c2w = torch.cat([c2w, c2w @ torch.tensor([[0.8, 0.0, 0.6, 0.0], [0.0, 1.0, 0.0, 0.0], [-0.6, 0.0, 0.8, 0.0], [0.0, 0.0, 0.0, 1.0]])])
    intr = torch.tensor([[40.0, 40.0, 8.0, 8.0], [30.0, 30.0, 7.0, 9.0]])
    first = model.detail.first_hits(c2w, intr)
    assert bool((first < spec.march_steps).any()) and bool((first == spec.march_steps).any())
    with torch.no_grad():
        assert torch.equal(model(c2w, intr, first=first.to(torch.uint8)), model(c2w, intr))


def test_occupancy_march_matches_a_plain_march_and_survives_a_reload(tmp_path: Path) -> None:
    """The fast march (cell coordinates, an empty border instead of an inside test, one minimum) finds the same
    first step as the plain one on a random grid, for rays that start outside the box and leave it; a saved
    and reloaded student marches the same (the bordered copy is rebuilt when the weights load)."""
    import torch

    from mg3d.student.model import NeLF, StudentSpec

    torch.manual_seed(0)
    r, n = 16, 96
    spec = StudentSpec(width_px=32, height_px=32, fx=20, fy=20, cx=16, cy=16, near=0.5, far=5.0, radius=1.0, center=(0.1, -0.2, 0.05),
                       depth=1, width=8, sr_factor=8, detail=2, detail_resolution=8, occupancy=r, march_steps=n)
    model = NeLF(spec)
    model.detail.set_occupancy((torch.rand(r**3) < 0.03).to(torch.uint8))
    c2w = torch.eye(4).repeat(3, 1, 1)
    c2w[:, :3, 3] = torch.tensor([[0.0, 0.0, 2.5], [0.4, -0.3, 1.5], [0.2, 0.1, 0.5]])  # outside, near and inside the box
    origin, d = model.detail.rays(c2w)
    x = (origin + d * model.detail.march_t.view(1, 1, n, 1) - torch.tensor(spec.center).view(1, 3, 1, 1)) / spec.radius  # plain form
    cell = ((x * 0.5 + 0.5) * r).floor().clamp(0, r - 1).long()
    occ = (model.detail.occupied[(cell[:, 0] * r + cell[:, 1]) * r + cell[:, 2]] > 0) & (x.abs() < 1).all(1)
    plain = torch.where(occ.any(1), occ.to(torch.uint8).argmax(1), n)
    fast = model.detail.march(origin, d).reshape(plain.shape)
    assert 0.05 < float((plain < n).float().mean()) < 0.95  # hits and misses both
    assert float((fast == plain).float().mean()) > 0.999  # a point on a cell face may round either way
    cells = 0.5 * r / spec.radius  # the GPU's element-wise form of the steps' cells, clamped into the grid: the same cells
    start = ((origin - torch.tensor(spec.center).view(1, 3, 1, 1)) * cells + (0.5 * r + 1)).expand_as(d)
    for a, b in zip(*(model.detail._cells(start, d * cells, clamp=True, elementwise=e) for e in (True, False))):
        assert int(a.min()) == 0 and int(a.max()) == r + 1 and float((a != b).float().mean()) < 1e-3
    model.save(tmp_path / "student")
    again = NeLF.load(tmp_path / "student")
    assert torch.equal(again.detail.first_hits(c2w), model.detail.first_hits(c2w))


def test_occupancy_makes_depth_right_at_occlusion_edges(tmp_path: Path) -> None:
    """Five overlapping spheres: the regressed depth blends near and far surfaces at every occlusion edge. With
    the rays marched through the (here exact) occupancy grid, the detail student learns much better images in
    the same number of steps."""
    import torch

    from mg3d.student import StudentConfig
    from mg3d.student.distill import PseudoData
    from mg3d.student.model import NeLF, StudentSpec
    from mg3d.student.synthetic import FIVE, sphere_occupancy, textured_spheres
    from mg3d.student.train import train

    size = 64
    textured_spheres(tmp_path / "data", 150, size, seed=0, spheres=FIVE)
    data = PseudoData(tmp_path / "data")
    test_images, test_c2w = textured_spheres(None, 6, size, seed=1, spheres=FIVE)
    r = 32
    scores = {}
    for occupancy in (0, r):
        torch.manual_seed(0)
        spec = StudentSpec(width_px=size, height_px=size, fx=data.meta["fx"], fy=data.meta["fx"], cx=size / 2, cy=size / 2, near=2.0, far=4.0, radius=1.0,
                           depth=2, width=32, sr_factor=8, detail=4, detail_resolution=128, occupancy=occupancy, march_steps=64)
        model = NeLF(spec)
        if occupancy:  # exact: cells within half a cell of a sphere (mg3d student bakes it from the teacher)
            model.detail.set_occupancy(torch.from_numpy(sphere_occupancy(FIVE, r)))
        config = StudentConfig(depth=2, width=32, detail=4, steps=300, batch=8, lr=3e-3, warmup=20, finetune_fraction=0, checkpoint_every=10**6, device="cpu")
        train(model, data, None, config, tmp_path / f"run{occupancy}", "key", torch.device("cpu"))
        model.eval()
        with torch.no_grad():
            pred = model(torch.from_numpy(test_c2w)).permute(0, 2, 3, 1).numpy()
        scores[occupancy] = -10 * np.log10(np.mean((pred - test_images) ** 2))
    assert scores[r] > scores[0] + 1.5, scores  # measured: 13.85 vs 16.22 dB


def test_more_processes_than_gpus_under_nccl_is_refused(ws: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun with more processes than the host has GPUs: NCCL would fail deep in its first all-reduce
    ("duplicate GPU"); mg3d says what to run instead before it writes anything."""
    import torch

    import mg3d.teacher

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MG3D_DIST_BACKEND", raising=False)
    monkeypatch.setattr(mg3d.teacher, "_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = cli("student", ws, *SHORT, "--steps", "10")
    assert result.exit_code == 1
    one_line_error(result, "2 processes", "1 GPU(s)", "--nproc_per_node 1", "MG3D_DIST_BACKEND=gloo")
    assert not (ws / "student").exists() and not (ws / ".student.partial").exists()


@pytest.mark.parametrize("backend", ["fast", "nccl"])
def test_an_unavailable_distributed_backend_is_refused(ws: Path, cli, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """MG3D_DIST_BACKEND naming a backend this torch lacks (a typo; NCCL on a CPU build) is one line that names
    the usable ones, before anything is written."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MG3D_DIST_BACKEND", backend)
    result = cli("student", ws, *SHORT, "--steps", "10", "--device", "cpu")
    assert result.exit_code == 1
    one_line_error(result, repr(backend), "MG3D_DIST_BACKEND", "gloo")
    assert not (ws / "student").exists() and not (ws / ".student.partial").exists()
