"""Encodings of the teacher field: multi-resolution hash grid (instant-NGP) and spherical harmonics.

Pure PyTorch: the hash-table lookup is ``F.embedding`` (whose backward is a sorted scatter-add on CUDA),
so it runs on CPU and CUDA and is the reference that any fused kernel must match.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_PRIMES = (1, 2654435761, 805459861)  # instant-NGP's spatial hash primes (uint32)
_PRIMES_32 = tuple(p - (1 << 32) if p >= (1 << 31) else p for p in _PRIMES)  # the same bits as int32


class HashGrid(nn.Module):
    """Multi-resolution hash encoding (Müller et al. 2022).

    Level ``l`` has resolution ``floor(base * b**l)`` with ``b`` chosen so the last level reaches
    ``max_resolution``; coarse levels whose grid fits in the table are stored densely, finer ones are
    hashed into ``2**log2_size`` entries. Features are trilinearly interpolated.

    Example:
        >>> enc = HashGrid(levels=4, features=2, log2_size=10, base_resolution=4, max_resolution=32)
        >>> enc(torch.rand(5, 3)).shape
        torch.Size([5, 8])
    """

    def __init__(self, levels: int = 16, features: int = 2, log2_size: int = 19, base_resolution: int = 16, max_resolution: int = 2048) -> None:
        super().__init__()
        self.levels, self.features = levels, features
        growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / max(levels - 1, 1))
        res = [int(math.floor(base_resolution * growth**lvl)) for lvl in range(levels)]
        table = 2**log2_size
        sizes = [min(table, (r + 1) ** 3) for r in res]
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        self.register_buffer("resolution", torch.tensor(res, dtype=torch.float32), persistent=False)  # [L]
        self.register_buffer("size", torch.tensor(sizes, dtype=torch.int32), persistent=False)  # [L]
        self.register_buffer("dense", torch.tensor([(r + 1) ** 3 <= table for r in res]), persistent=False)  # [L]
        self.register_buffer("offset", torch.tensor(offsets[:-1], dtype=torch.int32), persistent=False)  # [L]
        self.table = nn.Parameter(torch.empty(offsets[-1], features).uniform_(-1e-4, 1e-4))  # [T_total, F]

    @property
    def out_dim(self) -> int:
        return self.levels * self.features

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, 3] in [0, 1] -> [N, levels * features]."""
        n = x.shape[0]
        pos = x.float()[:, None, :] * self.resolution[None, :, None]  # [N, L, 3]
        base = pos.floor()
        frac = pos - base  # [N, L, 3]
        lo = base.int()  # int32: hashing keeps the low bits of the products, which int32 wraps identically
        # Per axis, the two corner coordinates [N, L, 2] and weights; corners are their outer product.
        ax = [torch.stack([lo[..., i], lo[..., i] + 1], -1) for i in range(3)]
        wx = [torch.stack([1.0 - frac[..., i], frac[..., i]], -1) for i in range(3)]
        stride = (self.resolution.int() + 1)[None, :, None]  # [1, L, 1]
        dense = ax[0][..., :, None, None] + (ax[1] * stride)[..., None, :, None] + (ax[2] * stride * stride)[..., None, None, :]
        hashed = (ax[0] * _PRIMES_32[0])[..., :, None, None] ^ (ax[1] * _PRIMES_32[1])[..., None, :, None] ^ (ax[2] * _PRIMES_32[2])[..., None, None, :]
        level = lambda t: t[:, :, None, None, None]  # noqa: E731  [1, L] -> [1, L, 1, 1, 1]
        idx = torch.where(level(self.dense[None]), dense, hashed) % level(self.size[None]) + level(self.offset[None])
        w = wx[0][..., :, None, None] * wx[1][..., None, :, None] * wx[2][..., None, None, :]  # [N, L, 2, 2, 2]
        feats = F.embedding(idx.reshape(n, self.levels, 8).long(), self.table)  # [N, L, 8, F]
        return (feats * w.reshape(n, self.levels, 8, 1)).sum(2).reshape(n, self.out_dim)


def spherical_harmonics(d: Tensor) -> Tensor:
    """Real spherical harmonics up to degree 3 (16 values) of unit directions: [N, 3] -> [N, 16]."""
    x, y, z = d.unbind(-1)
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    return torch.stack(
        [
            torch.full_like(x, 0.28209479177387814),
            -0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x,
            1.0925484305920792 * xy, -1.0925484305920792 * yz, 0.94617469575755997 * zz - 0.31539156525251999,
            -1.0925484305920792 * xz, 0.54627421529603959 * (xx - yy),
            0.59004358992664352 * y * (-3.0 * xx + yy), 2.8906114426405538 * xy * z,
            0.45704579946446572 * y * (1.0 - 5.0 * zz), 0.3731763325901154 * z * (5.0 * zz - 3.0),
            0.45704579946446572 * x * (1.0 - 5.0 * zz), 1.4453057213202769 * z * (xx - yy),
            0.59004358992664352 * x * (-xx + 3.0 * yy),
        ],
        dim=-1,
    )
