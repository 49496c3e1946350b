"""Image quality metrics on [0, 1] images: PSNR and SSIM.

SSIM takes [N, C, H, W] (channels first). The MobileR2L/R2L code passes [N, H, W, C], which makes the
11x11 window slide over width and channels and reports an inflated SSIM; do not repeat that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import numpy as np


def mean_psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean PSNR in dB over numpy images [N, C, H, W] in [0, 1] (identical images count as 120 dB)."""
    import numpy as np

    mse = np.mean((pred.astype(np.float64) - target.astype(np.float64)) ** 2, axis=tuple(range(1, pred.ndim)))
    return float(np.mean(-10.0 * np.log10(np.maximum(mse, 1e-12))))


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1], per image.

    Args:
        pred, target: [N, ...] in [0, 1].
    Returns:
        [N] dB.

    Example:
        >>> psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1)).round()
        tensor([20.])
    """
    mse = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()  # [C, 1, k, k]


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004; Gaussian 11x11, sigma 1.5, as the NeRF literature), per image.

    Args:
        pred, target: [N, C, H, W] in [0, 1] (channels first: see the module docstring).
    Returns:
        [N], 1.0 for identical images.
    """
    if pred.dim() != 4 or pred.shape != target.shape:
        raise ValueError(f"ssim expects two [N, C, H, W] tensors of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.shape[1] > 4 and pred.shape[-1] <= 4:
        raise ValueError(f"ssim got {tuple(pred.shape)}: that looks like [N, H, W, C]; permute to [N, C, H, W]")
    x, y = pred.float(), target.float()
    c = x.shape[1]
    w = _gaussian_window(window, sigma, c, x.device)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)
