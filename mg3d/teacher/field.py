"""The teacher's radiance field: hash grid -> density MLP -> (geometry features, view direction,
appearance) -> colour MLP. Bounded scenes (Blender) live in an axis-aligned cube; unbounded captures are
contracted (mip-NeRF 360 style, L-infinity norm) into a cube of side 4 first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mg3d.teacher.encoding import HashGrid, spherical_harmonics


class _TruncExp(torch.autograd.Function):
    """exp with a gradient clamped for large inputs, as instant-NGP does for density."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: Tensor) -> Tensor:
    return _TruncExp.apply(x)


def contract(x: Tensor) -> Tensor:
    """Scene contraction: identity inside the unit L-inf ball, (2 - 1/|x|) x/|x| outside: [N, 3] -> [-2, 2]^3."""
    norm = x.abs().amax(-1, keepdim=True).clamp_min(1e-9)
    return torch.where(norm <= 1.0, x, (2.0 - 1.0 / norm) * x / norm)


class Field(nn.Module):
    """Density and view-dependent colour at world points.

    Args:
        unbounded: contract space (real captures); otherwise points are mapped from [-bound, bound]^3.
        appearance: per-image embedding size (0: none); ``num_images`` embeddings are learned.
    """

    def __init__(
        self, *, unbounded: bool, bound: float = 1.5, levels: int = 16, features: int = 2, log2_size: int = 19,
        max_resolution: int = 2048, hidden: int = 64, geo_features: int = 15, appearance: int = 0, num_images: int = 0,
        density_bias: float = -1.0,
    ) -> None:
        super().__init__()
        self.density_bias = density_bias  # exp(bias) is the density of an untrained field
        self.unbounded, self.bound = unbounded, bound
        self.encoding = HashGrid(levels, features, log2_size, 16, max_resolution)
        self.density_net = nn.Sequential(nn.Linear(self.encoding.out_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1 + geo_features))
        self.appearance = nn.Embedding(num_images, appearance) if appearance and num_images else None
        color_in = geo_features + 16 + (appearance if self.appearance is not None else 0)
        self.color_net = nn.Sequential(
            nn.Linear(color_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 3)
        )
        if self.appearance is not None:
            nn.init.zeros_(self.appearance.weight)

    def normalize(self, x: Tensor) -> Tensor:
        """World points [N, 3] -> the unit cube the grid covers (values outside it are outside the scene)."""
        if self.unbounded:
            return (contract(x) + 2.0) / 4.0
        return (x + self.bound) / (2.0 * self.bound)

    def density_unit(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Density [N] and geometry features [N, G] at unit-cube points u [N, 3]."""
        h = self.density_net(self.encoding(u))
        return trunc_exp(h[:, 0].float() + self.density_bias), h[:, 1:]

    def density_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Density [N] (zero outside a bounded scene's cube) and geometry features [N, G] at world points x [N, 3]."""
        u = self.normalize(x)
        sigma, geo = self.density_unit(u.clamp(0, 1))
        return sigma * ((u >= 0) & (u <= 1)).all(-1), geo

    def forward(self, x: Tensor, d: Tensor, image: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Density [N] and colour [N, 3] in [0, 1] at points x [N, 3] seen along unit directions d [N, 3].

        ``image`` [N] selects appearance embeddings; None uses their mean (novel views).
        """
        sigma, geo = self.density_and_features(x)
        return sigma, self.color(geo, d, image)

    def color(self, geo: Tensor, d: Tensor, image: Tensor | None = None) -> Tensor:
        """Colour [N, 3] in [0, 1] from geometry features [N, G] (of :meth:`density_unit`) and directions [N, 3]."""
        parts = [geo, spherical_harmonics(d).to(geo.dtype)]
        if self.appearance is not None:
            if image is None:
                emb = self.appearance.weight.mean(0, keepdim=True).expand(geo.shape[0], -1)
            else:
                emb = self.appearance(image)
            parts.append(emb.to(geo.dtype))
        return torch.sigmoid(self.color_net(torch.cat(parts, -1)).float())
