"""Occupancy grid for empty-space skipping (instant-NGP): a 3D grid over the field's unit cube holding a
running maximum of density; samples in cells below the threshold are never evaluated."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class OccupancyGrid(nn.Module):
    """Density EMA per cell of a ``resolution``^3 grid over the unit cube, and the occupied mask.

    Example:
        >>> grid = OccupancyGrid(8)
        >>> grid.occupied(torch.rand(4, 3)).all()   # everything counts as occupied before the first update
        tensor(True)
    """

    def __init__(self, resolution: int = 128) -> None:
        super().__init__()
        self.resolution = resolution
        self.register_buffer("density", torch.full((resolution**3,), -1.0))  # [R^3]; -1: not measured yet
        self.register_buffer("mask", torch.ones(resolution**3, dtype=torch.bool))  # [R^3]
        #: cells that may ever be occupied (None: all); not saved: the edit sets it from the teacher's mask
        self.limit: Tensor | None = None

    def limit_to_dilated(self, margin: int) -> float:
        """Let later updates occupy only today's occupied cells grown by ``margin`` cells (a cube around each).
        Returns the fraction of the grid allowed."""
        r = self.resolution
        grid = self.mask.view(1, 1, r, r, r).float()
        if margin > 0:
            grid = torch.nn.functional.max_pool3d(grid, 2 * margin + 1, stride=1, padding=margin)
        self.limit = grid.view(-1) > 0
        self.mask &= self.limit
        return float(self.limit.float().mean())

    def cell_index(self, u: Tensor) -> Tensor:
        """Unit-cube points [..., 3] -> flat cell index [...] (points outside are clamped)."""
        r = self.resolution
        c = (u * r).long().clamp(0, r - 1)
        return (c[..., 0] * r + c[..., 1]) * r + c[..., 2]

    def occupied(self, u: Tensor) -> Tensor:
        """Unit-cube points [..., 3] -> bool [...]; False outside the cube."""
        inside = ((u >= 0) & (u <= 1)).all(-1)
        return self.mask[self.cell_index(u)] & inside

    @torch.no_grad()
    def update(self, density_fn, threshold: float, decay: float = 0.95, all_cells: bool = False, chunk: int = 1 << 18) -> None:
        """Re-measure density in cells (all, or a quarter at random plus a quarter of the occupied ones),
        keep the running maximum with ``decay``, and mark cells above min(threshold, mean density)."""
        n = self.resolution**3
        device = self.density.device
        if all_cells:
            cells = torch.arange(n, device=device)
        else:
            occupied = self.mask.nonzero().squeeze(-1)
            pick = occupied[torch.randint(len(occupied), (n // 4,), device=device)] if len(occupied) else occupied
            cells = torch.cat([torch.randint(n, (n // 4,), device=device), pick])
        r = self.resolution
        coords = torch.stack([cells // (r * r), (cells // r) % r, cells % r], -1).float()
        fresh = torch.empty(len(cells), device=device)
        for start in range(0, len(cells), chunk):
            u = (coords[start : start + chunk] + torch.rand_like(coords[start : start + chunk])) / r
            fresh[start : start + chunk] = density_fn(u).float()
        measured = self.density >= 0
        decayed = torch.where(measured, self.density * decay, self.density)
        decayed[cells] = torch.maximum(decayed[cells] * (decayed[cells] >= 0), fresh)
        self.density.copy_(decayed)
        measured = self.density >= 0
        mean = float(self.density[measured].mean()) if measured.any() else threshold
        self.mask.copy_((self.density > min(threshold, mean)) | ~measured)
        if self.limit is not None:
            self.mask &= self.limit
