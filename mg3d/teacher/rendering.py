"""Rays, samples and volume rendering for the teacher (pure PyTorch, packed samples as in nerfacc).

Samples along a ray follow one fixed sequence of distances: steps of ``dt_min`` that grow as
``cone * t`` further out (instant-NGP's cone stepping; ``cone = 0`` gives uniform steps). Each ray keeps
only the samples inside its [t_min, t_max) whose grid cell is occupied; those are packed into one flat
list (``ray`` says which ray each belongs to), evaluated once, and composited with cumulative sums.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def distance_sequence(near: float, far: float, dt_min: float, cone: float, max_steps: int = 8192) -> tuple[Tensor, Tensor]:
    """Sample distances t [K] and step lengths dt [K] from ``near`` to ``far``.

    Example:
        >>> t, dt = distance_sequence(2.0, 6.0, 0.5, 0.0)
        >>> t.tolist()
        [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5]
    """
    ts, t = [], near
    while t < far and len(ts) < max_steps:
        ts.append(t)
        t += max(dt_min, cone * t)
    t_arr = torch.tensor(ts, dtype=torch.float64)
    dt = torch.diff(t_arr, append=t_arr.new_tensor([t]))
    return t_arr.float(), dt.float()


def camera_rays(c2w: Tensor, fx: Tensor, fy: Tensor, cx: Tensor, cy: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """World rays through pixel positions (OpenGL cameras; u right, v down, pixel centres at +0.5).

    Args:
        c2w: [R, 4, 4] (or [R, 3, 4]) camera of each ray; fx, fy, cx, cy: [R]; u, v: [R] pixel coordinates.
    Returns:
        origins [R, 3], unit directions [R, 3].
    """
    d_cam = torch.stack([(u - cx) / fx, -(v - cy) / fy, -torch.ones_like(u)], -1)  # [R, 3]
    d = (c2w[:, :3, :3] @ d_cam[..., None]).squeeze(-1)
    return c2w[:, :3, 3].expand_as(d), d / d.norm(dim=-1, keepdim=True)


def ray_aabb(origins: Tensor, dirs: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Entry and exit distances [R] of rays through the cube [-bound, bound]^3 (exit < entry: a miss)."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0, t1 = (-bound - origins) * inv, (bound - origins) * inv
    return torch.minimum(t0, t1).amax(-1).clamp_min(0.0), torch.maximum(t0, t1).amin(-1)


def ray_starts(ray: Tensor, num_rays: int) -> Tensor:
    """Index of each ray's first sample [num_rays] in a packed list whose ray indices [S] are sorted (a ray
    without samples gets the index where it would be). A binary search: a histogram of sorted indices
    serialises on its atomics (H100: about 6 ms per call on a 512 px view's samples).

    Example:
        >>> ray_starts(torch.tensor([0, 0, 2, 2, 2]), 4).tolist()
        [0, 2, 2, 5]
    """
    return torch.searchsorted(ray, torch.arange(num_rays, device=ray.device, dtype=ray.dtype))


def transmittance(ray: Tensor, tau: Tensor, num_rays: int) -> Tensor:
    """Transmittance before each packed sample: exp(-sum of earlier optical depths on its ray).

    Args:
        ray: [S] ray index of each sample, non-decreasing; tau: [S] optical depth sigma * dt.
    Returns:
        [S]
    """
    csum = torch.cumsum(tau.double(), 0)  # float64: the running sum spans many rays
    exclusive = csum - tau.double()
    starts = ray_starts(ray, num_rays)
    ray_base = exclusive[starts.clamp(max=max(len(tau) - 1, 0))] if len(tau) else exclusive
    return torch.exp(-(exclusive - ray_base[ray])).float()


def composite(ray: Tensor, sigma: Tensor, rgb: Tensor, t: Tensor, dt: Tensor, num_rays: int) -> dict[str, Tensor]:
    """Volume rendering of packed samples: colour [R, 3], depth [R], opacity [R], and weights [S]."""
    tau = sigma * dt
    weights = transmittance(ray, tau, num_rays) * (1.0 - torch.exp(-tau))
    color = torch.zeros(num_rays, 3, device=rgb.device, dtype=torch.float32).index_add_(0, ray, weights[:, None] * rgb.float())
    opacity = torch.zeros(num_rays, device=rgb.device).index_add_(0, ray, weights)
    depth = torch.zeros(num_rays, device=rgb.device).index_add_(0, ray, weights * t)
    return {"rgb": color, "depth": depth, "opacity": opacity, "weights": weights}


def distortion(ray: Tensor, weights: Tensor, s: Tensor, ds: Tensor, num_rays: int) -> Tensor:
    """mip-NeRF 360's distortion loss of each ray [R]: sum_ij w_i w_j |s_i - s_j| + 1/3 sum_i w_i^2 ds_i, over
    packed samples sorted along their rays at normalised distances s [S] with widths ds [S]. Small when a
    ray's weight sits in one short interval (a surface), large when it is spread out (fog, floaters).
    The pairwise sum in O(S): 2 sum_i w_i (s_i W_i - Q_i), with W_i, Q_i the sums of w and w s before i.

    Example:
        >>> float(distortion(torch.tensor([0, 0]), torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0]), torch.zeros(2), 1)[0])
        0.5
    """
    w = weights.double()
    ws = w * s.double()
    before_w, before_ws = torch.cumsum(w, 0) - w, torch.cumsum(ws, 0) - ws  # float64: the sums span many rays
    starts = ray_starts(ray, num_rays).clamp(max=max(len(w) - 1, 0))
    if len(w):
        before_w, before_ws = before_w - before_w[starts][ray], before_ws - before_ws[starts][ray]
    per_sample = 2 * w * (s.double() * before_w - before_ws) + w * w * ds.double() / 3
    return torch.zeros(num_rays, device=weights.device, dtype=torch.float64).index_add_(0, ray, per_sample).float()


def occupied_candidates(
    origins: Tensor, dirs: Tensor, t_min: Tensor, t_max: Tensor, t_seq: Tensor, dt_seq: Tensor, shift: Tensor, occupied,
) -> Tensor:
    """Which candidate samples lie in [t_min, t_max) and in an occupied cell: bool [R, K].

    Candidate k of ray r sits at ``t_seq[k] + shift[r] * dt_seq[k]``. This is the march's pass over every
    candidate of every ray (grid lookups only, no field); compiled, it is one fused kernel that writes
    the mask alone instead of [R, K, 3] points and their intermediates.

    Args:
        occupied: function world points [..., 3] -> bool [...].
        shift: [R] in [0, 1): where each ray's samples sit within a step (random in training, 0.5 to render).
    """
    t = t_seq[None, :] + shift[:, None] * dt_seq[None, :]  # [R, K]
    x = origins[:, None, :] + t[..., None] * dirs[:, None, :]  # [R, K, 3]
    return (t >= t_min[:, None]) & (t < t_max[:, None]) & occupied(x)


def pack_samples(keep: Tensor, shift: Tensor, t_seq: Tensor, dt_seq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The candidates of a mask [R, K] packed ray by ray: ray index [S], t [S], dt [S]."""
    ray, k = keep.nonzero(as_tuple=True)
    return ray, t_seq[k] + shift[ray] * dt_seq[k], dt_seq[k]


#: Transmittance below which a ray counts as opaque: later samples are not evaluated.
EARLY_STOP = 1e-4


def grid_threshold(dt_min: float, alpha: float = 0.01) -> float:
    """Density above which a cell counts as occupied: opacity ``alpha`` over one smallest step."""
    return -math.log(1.0 - alpha) / dt_min
