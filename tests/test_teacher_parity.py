"""Fast paths against the plain-torch reference: the torch.compile'd hash encoding (forward and
gradients, on every device here) and march candidates, the hash grid against naive trilinear interpolation, and the packed
renderer against a dense per-ray loop."""

from __future__ import annotations

import pytest
import torch

from mg3d.teacher.encoding import HashGrid
from mg3d.teacher.rendering import composite, transmittance

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _grid(device: str) -> HashGrid:
    torch.manual_seed(0)
    grid = HashGrid(levels=4, features=2, log2_size=10, base_resolution=4, max_resolution=64).to(device)
    with torch.no_grad():
        grid.table.uniform_(-1, 1)  # not the tiny init: differences must show
    return grid


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_hash_encoding_matches_eager(device: str) -> None:
    grid = _grid(device)
    compiled = torch.compile(HashGrid.forward.__get__(grid), dynamic=True)
    for n in (3000, 777):  # two sizes: the dynamic-shape graph must serve both
        x = torch.rand(n, 3, device=device)
        grad_out = torch.randn(n, grid.out_dim, device=device)
        eager_y = grid(x)
        fast_y = compiled(x)
        torch.testing.assert_close(fast_y, eager_y, rtol=1e-5, atol=1e-5)
        eager_g = torch.autograd.grad((eager_y * grad_out).sum(), grid.table)[0]
        fast_g = torch.autograd.grad((compiled(x) * grad_out).sum(), grid.table)[0]
        torch.testing.assert_close(fast_g, eager_g, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_march_finds_the_candidates_of_the_eager_one(device: str) -> None:
    """The compiled candidate pass (one fused kernel) marks the occupied candidates the eager code marks,
    for two ray counts (one dynamic-shape graph), and the march packs the same samples from them."""
    from mg3d.teacher.model import ModelSpec, Teacher
    from mg3d.teacher.rendering import camera_rays

    spec = ModelSpec(
        unbounded=True, bound=1.0, near=0.05, far=100.0, steps_per_ray=64, cone=1 / 64, levels=4, features=2, log2_size=10,
        max_resolution=64, hidden=16, grid_resolution=16, appearance=0, num_images=1, pose_refine=False, background=None,
        density_bias=-20.0,  # nearly empty: every occupied candidate stays visible, so the march keeps them all
    )
    torch.manual_seed(0)
    teacher = Teacher(spec).to(device)
    teacher.grid.mask.copy_(torch.rand(16**3, device=device) < 0.3)
    eager = teacher._candidates
    teacher.compile_kernels()
    for n in (4096, 1000):
        c2w = torch.eye(4, device=device).expand(n, 4, 4).clone()
        c2w[:, :3, 3] = torch.tensor([0.2, -0.1, 1.5], device=device)
        uv = torch.rand(n, 2, device=device) * 64
        origins, dirs = camera_rays(c2w, *(torch.full((n,), v, device=device) for v in (50.0, 50.0, 32.0, 32.0)), uv[:, 0], uv[:, 1])
        t_min, t_max = teacher.ray_bounds(origins, dirs)
        shift = torch.rand(n, device=device)
        want, got = eager(origins, dirs, t_min, t_max, shift), teacher._candidates(origins, dirs, t_min, t_max, shift)
        assert want.shape == (n, len(teacher.t_seq)) and 0.05 < float(want.float().mean()) < 0.5
        assert float((want != got).float().mean()) < 1e-5  # a candidate on a cell face may round either way
    ray, t, dt, sigma, _ = teacher.march(origins, dirs, shift)
    assert len(ray) == int(got.sum()) and bool((ray[1:] >= ray[:-1]).all()) and bool((sigma > 0).all())
    torch.testing.assert_close(t, (teacher.t_seq[None] + shift[:, None] * teacher.dt_seq[None])[got])


def test_dense_level_is_trilinear_interpolation() -> None:
    grid = HashGrid(levels=1, features=1, log2_size=12, base_resolution=4, max_resolution=4)
    with torch.no_grad():
        grid.table.uniform_(-1, 1)
    x = torch.rand(200, 3)
    table = grid.table[:, 0].detach().view(5, 5, 5).permute(2, 1, 0)  # index x + 5y + 25z -> [x, y, z]
    p = x * 4
    i, f = p.floor().long(), p - p.floor()
    ref = torch.zeros(200)
    for c in range(8):
        o = [(c >> 2) & 1, (c >> 1) & 1, c & 1]
        w = torch.ones(200)
        for k in range(3):
            w = w * (f[:, k] if o[k] else 1 - f[:, k])
        ref += w * table[i[:, 0] + o[0], i[:, 1] + o[1], i[:, 2] + o[2]]
    torch.testing.assert_close(grid(x)[:, 0], ref, rtol=1e-5, atol=1e-6)


def test_packed_compositing_matches_a_per_ray_loop() -> None:
    torch.manual_seed(1)
    counts = [0, 5, 1, 12, 3]
    ray = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    sigma, dt = torch.rand(len(ray)) * 20, torch.rand(len(ray)) * 0.1
    rgb, t = torch.rand(len(ray), 3), torch.cumsum(torch.rand(len(ray)), 0)
    out = composite(ray, sigma, rgb, t, dt, len(counts))
    start = 0
    for r, n in enumerate(counts):
        trans, color, opacity = 1.0, torch.zeros(3), 0.0
        for s in range(start, start + n):
            alpha = 1 - torch.exp(-sigma[s] * dt[s])
            color += trans * alpha * rgb[s]
            opacity += trans * alpha
            trans = trans * (1 - alpha)
        torch.testing.assert_close(out["rgb"][r], color, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["opacity"][r], torch.as_tensor(opacity).float(), rtol=1e-5, atol=1e-6)
        start += n
    assert transmittance(ray, sigma * dt, len(counts))[counts[1]] == 1.0  # first sample of a ray sees everything
