"""The student: a neural light field (MobileR2L class) that maps a camera to an image in one forward pass.

    c2w [B, 4, 4] --rays of a low-res grid (H/s x W/s)--> S points per ray --positional encoding-->
    [B, 3 S (1 + 2 F), H/s, W/s] --1x1 conv stem, D residual blocks of width C--> super-resolution x s
    --> rgb [B, 3, H, W] in [0, 1]

Ray generation, point sampling and encoding are part of the module, so an exported model takes a pose and
returns an image (no ray-marching code in the app). Cameras are OpenGL camera-to-world matrices; the
intrinsics are baked in (``StudentSpec``) and may be overridden per call (``intrinsics`` [B, 4]).

    spec = StudentSpec(width_px=400, height_px=400, fx=555.6, fy=555.6, cx=200, cy=200, near=2, far=6)
    model = NeLF(spec)
    rgb = model(c2w)          # [B, 3, 400, 400]
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mg3d.errors import ConfigError, Mg3dError


class StudentError(Mg3dError):
    """The student cannot be built, trained or loaded."""


UPSAMPLERS = ("shuffle", "transpose")
ACTIVATIONS = ("gelu_tanh", "gelu")
NORMS = ("batch", "none")


@dataclass(frozen=True)
class StudentSpec:
    """Everything needed to rebuild the network (saved as ``student.json``)."""

    width_px: int  # output image size
    height_px: int
    fx: float  # intrinsics at the output size, pixels
    fy: float
    cx: float
    cy: float
    near: float  # sample range along each ray, scene units
    far: float
    spacing: str = "linear"  # linear in distance (bounded scenes) or in disparity (unbounded captures)
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)  # points are encoded as contract((x - center) / radius)
    radius: float = 1.0
    samples: int = 8  # points per ray
    frequencies: int = 6  # positional-encoding frequencies
    depth: int = 28  # residual blocks
    width: int = 256  # channels of the blocks
    sr_factor: int = 8  # super-resolution factor (a power of two)
    upsample: str = "shuffle"  # shuffle: 1x1 conv + depth-to-space; transpose: 4x4 transposed conv (MobileR2L)
    activation: str = "gelu_tanh"  # gelu_tanh: tanh-approximate GELU (ops every mobile delegate has); gelu: exact (Erf)
    norm: str = "batch"  # batch: BatchNorm after each 1x1 conv of the stem and blocks (folded into the convs at export); none
    planes: int = 0  # learned feature planes (xy, xz, yz) read at every ray point: channels per plane (0: none, MobileR2L)
    plane_resolution: int = 128  # cells per side of each plane
    detail: int = 0  # per-pixel surface texture: channels of three planes read where each output pixel's ray meets the predicted surface (0: none)
    detail_resolution: int = 512  # cells per side of each detail plane
    occupancy: int = 0  # detail students: cells per side of an occupancy grid (baked from the teacher) each pixel's ray is marched through for its first hit (0: none)
    march_steps: int = 128  # fixed steps of that march over the sample range
    march_box: bool = False  # the march's steps spread over each ray's chord through the occupied cells' bounding box, not the whole sample range
    head_layers: int = 0  # hidden 1x1 layers of the per-pixel head before the rgb conv (0: the rgb conv reads the last stage, as MobileR2L)
    head_width: int = 64  # channels of those layers
    detail_lines: bool = False  # detail students: each plane's features times those of a line along the axis it lacks (TensoRF's vector-matrix form)
    detail_view: int = 0  # detail students: frequencies of the viewing direction's encoding that the fuse conv also reads at every pixel (0: none)
    detail_scales: int = 1  # detail students: sets of texture planes at detail_resolution, half of it, ... (K-planes' multi-scale planes)
    detail_product: bool = False  # detail students: the three planes' features multiplied (K-planes' Hadamard product) instead of concatenated
    detail_points: int = 1  # detail students: points along each pixel's ray around the surface where the texture is read, features concatenated
    detail_spread: float = 2.0  # their spacing, in cells of the finest planes
    detail_coarse_once: bool = False  # detail students with several points and scales: the coarser scales read once, at the surface, not at every point

    def __post_init__(self) -> None:
        check_resolution(self.width_px, self.height_px, self.sr_factor)
        if self.upsample not in UPSAMPLERS:
            raise ConfigError(f"upsample {self.upsample!r} is unknown", hint="use shuffle or transpose")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is unknown", hint="use " + " or ".join(ACTIVATIONS))
        if self.norm not in NORMS:
            raise ConfigError(f"norm {self.norm!r} is unknown", hint="use " + " or ".join(NORMS))
        if self.spacing not in ("linear", "disparity"):
            raise ConfigError(f"spacing {self.spacing!r} is unknown", hint="use linear or disparity")
        if min(self.samples, self.depth, self.width) < 1 or self.frequencies < 0 or self.planes < 0:
            raise ConfigError("samples, depth and width must be positive; frequencies and planes not negative")
        if self.planes and self.plane_resolution < 2:
            raise ConfigError(f"plane_resolution {self.plane_resolution} is too small", hint="use 2 cells or more (128 is the default)")
        if self.occupancy < 0 or (self.occupancy and not self.detail) or self.march_steps < 1:
            raise ConfigError(f"occupancy {self.occupancy} needs the surface detail and march_steps ({self.march_steps}) at least 1", hint="set detail > 0 too, or occupancy=0")
        if self.head_layers < 0 or self.head_width < 1:
            raise ConfigError(f"head_layers {self.head_layers} / head_width {self.head_width} are out of range", hint="use head_layers >= 0 and head_width >= 1")
        if self.detail_lines and not self.detail:
            raise ConfigError("detail_lines needs the surface detail", hint="set detail > 0 too, or detail_lines=false")
        if self.detail_view < 0 or (self.detail_view and not self.detail):
            raise ConfigError(f"detail_view {self.detail_view} needs the surface detail", hint="set detail > 0 too, or detail_view=0")
        if self.detail_scales < 1 or ((self.detail_scales > 1 or self.detail_product) and not self.detail):
            raise ConfigError(f"detail_scales {self.detail_scales} / detail_product {self.detail_product} need the surface detail", hint="set detail > 0 too; detail_scales is at least 1")
        if self.march_box and not self.occupancy:
            raise ConfigError("march_box bounds the occupancy march", hint="set occupancy > 0 too, or march_box=false")
        if self.detail_coarse_once and not (self.detail_points > 1 and self.detail_scales > 1):
            raise ConfigError(f"detail_coarse_once reads the coarser scales once instead of at each of several points ({self.detail_points} points, {self.detail_scales} scales here)",
                              hint="set detail_points > 1 and detail_scales > 1 too, or detail_coarse_once=false")
        if self.detail_points < 1 or (self.detail_points > 1 and not self.detail) or self.detail_spread <= 0:
            raise ConfigError(f"detail_points {self.detail_points} needs the surface detail and detail_spread ({self.detail_spread}) must be positive", hint="set detail > 0 too; detail_points is at least 1")
        if self.detail and self.detail_resolution >> (self.detail_scales - 1) < 2:
            raise ConfigError(f"{self.detail_scales} scales of {self.detail_resolution}-cell planes end below 2 cells", hint="use fewer detail_scales or a larger detail_resolution")
        if self.detail < 0 or (self.detail and self.detail_resolution < 2):
            raise ConfigError(f"detail {self.detail} / detail_resolution {self.detail_resolution} are out of range", hint="use detail >= 0 and a resolution of 2 cells or more (512 is the default)")
        if not 0 < self.near < self.far:
            raise ConfigError(f"near {self.near} and far {self.far} must satisfy 0 < near < far")

    @property
    def grid(self) -> tuple[int, int]:
        """Size of the ray grid (width, height)."""
        return self.width_px // self.sr_factor, self.height_px // self.sr_factor

    @property
    def in_channels(self) -> int:
        return 3 * self.samples * (1 + 2 * self.frequencies + self.planes)

    @property
    def view_channels(self) -> int:
        """Channels of the viewing-direction encoding the surface detail's fuse reads: the unit direction, then
        sin and cos of it times pi 2^f for each of ``detail_view`` frequencies (0 without it)."""
        return 3 * (1 + 2 * self.detail_view) if self.detail_view else 0

    @property
    def detail_resolutions(self) -> list[int]:
        """Cells per side of each scale's texture planes, finest first."""
        return [self.detail_resolution >> k for k in range(self.detail_scales)]

    @property
    def detail_channels(self) -> int:
        """Texture channels the surface detail's fuse reads per pixel: C per scale and point with the product, else 3 C
        (with ``detail_coarse_once`` the coarser scales count once, not per point)."""
        reads = self.detail_points + self.detail_scales - 1 if self.detail_coarse_once else self.detail_scales * self.detail_points
        return self.detail * reads * (1 if self.detail_product else 3)

    @property
    def plane_extent(self) -> float:
        """Half side of the square the feature planes cover in encoded coordinates: contracted points of an
        unbounded capture lie in the ball of radius 2, a bounded scene's in the unit ball."""
        return 2.0 if self.spacing == "disparity" else 1.0


def check_resolution(width: int, height: int, sr_factor: int) -> None:
    """Raise a ConfigError that lists nearby sizes that work when ``width x height`` does not fit ``sr_factor``."""
    if sr_factor < 1 or sr_factor & (sr_factor - 1):
        raise ConfigError(f"sr_factor {sr_factor} is not a power of two", hint="use 1, 2, 4, 8 or 16")
    if width % sr_factor or height % sr_factor or width < sr_factor or height < sr_factor:
        near = lambda n: sorted({max(sr_factor, n // sr_factor * sr_factor), (n + sr_factor - 1) // sr_factor * sr_factor})  # noqa: E731
        options = ", ".join(f"{w}x{h}" for w in near(width) for h in near(height))
        raise ConfigError(
            f"resolution {width}x{height} is not divisible by the super-resolution factor {sr_factor}",
            hint=f"sizes that work nearby: {options} (or change --sr-factor)",
        )


def contract(x: Tensor, dim: int) -> Tensor:
    """mip-NeRF 360 contraction: points inside the unit ball stay, the rest map into the ball of radius 2.

    Written as ``x (2 m - 1) / m^2`` with ``m = max(|x|, 1)`` (equal to ``(2 - 1/|x|) x/|x|`` outside the
    ball and to ``x`` inside), so the exported graph needs no Where/ReduceL2/Clip, which NNAPI partitions on.
    """
    n2 = (x * x).mean(dim=dim, keepdim=True) * 3.0  # |x|^2; x holds 3 coordinates along dim
    m = torch.sqrt(torch.relu(n2 - 1.0) + 1.0)  # max(|x|, 1) in ops that every delegate has
    return x * ((2.0 * m - 1.0) / (m * m))


def distance_at(spec: StudentSpec, s: Tensor) -> Tensor:
    """Distance along the ray at the fraction s in [0, 1] of the sample range: linear in distance from near to
    far (bounded scenes) or in disparity (unbounded captures). Any shape."""
    if spec.spacing == "linear":
        return spec.near + (spec.far - spec.near) * s
    return 1.0 / (1.0 / spec.near * (1 - s) + 1.0 / spec.far * s)


def fraction_at(spec: StudentSpec, t: Tensor) -> Tensor:
    """The inverse of :func:`distance_at`: distances t -> fractions s (not clamped)."""
    if spec.spacing == "linear":
        return (t - spec.near) / (spec.far - spec.near)
    return (1.0 / spec.near - 1.0 / t) / (1.0 / spec.near - 1.0 / spec.far)


def sample_distances(spec: StudentSpec) -> Tensor:
    """The fixed distances [S] of the samples on every ray (bin centres)."""
    return distance_at(spec, (torch.arange(spec.samples, dtype=torch.float64) + 0.5) / spec.samples).float()


def grid_directions(spec: StudentSpec, intrinsics: Tensor | None = None, step: int | None = None) -> Tensor:
    """Camera-space unit ray directions through the ray-grid cells: [3, h*w], or [B, 3, h*w] for intrinsics [B, 4]
    (fx, fy, cx, cy at the output size). Each cell is a ``step`` x ``step`` block of output pixels (default
    sr_factor: the low-resolution grid; 1: every output pixel)."""
    s = spec.sr_factor if step is None else step
    gw, gh = spec.width_px // s, spec.height_px // s
    # made where the intrinsics are: a copy from the host at every training step with photos (a full-size grid
    # for the surface texture) would make the CPU wait for the GPU each time
    device = None if intrinsics is None else intrinsics.device
    v, u = torch.meshgrid(torch.arange(gh, dtype=torch.float32, device=device), torch.arange(gw, dtype=torch.float32, device=device), indexing="ij")
    u, v = (u.reshape(-1) + 0.5) * s, (v.reshape(-1) + 0.5) * s  # block centres in output pixels
    k = torch.tensor([[spec.fx, spec.fy, spec.cx, spec.cy]], dtype=torch.float32) if intrinsics is None else intrinsics.float()
    fx, fy, cx, cy = (k[:, i : i + 1] for i in range(4))  # [B, 1]
    d = torch.stack([(u - cx) / fx, -(v - cy) / fy, -torch.ones_like(fx * u)], 1)  # [B, 3, P]
    d = d / d.norm(dim=1, keepdim=True)
    return d[0] if intrinsics is None else d


def plane_features(x: Tensor, planes: Tensor, resolution: int, extent: float, samples: int, points: int) -> Tensor:
    """Bilinear reads of three feature planes at points x [B, 3, S, P] (encoded coordinates): [B, 3, S, C, P].

    ``planes`` [3 R R, C] holds the xy, xz and yz planes one after the other, flattened. Points outside the
    planes read their border; ``samples`` (S) and ``points`` (P) keep shapes constant in traced graphs.
    A traced graph (ONNX, Core ML) gets :func:`gathered_plane_features`, which mobile runtimes run; torch
    itself runs :func:`sampled_plane_features`, the same reads in one kernel."""
    read = gathered_plane_features if torch.jit.is_tracing() else sampled_plane_features
    return read(x, planes, resolution, extent, samples, points)


def gathered_plane_features(x: Tensor, planes: Tensor, resolution: int, extent: float, samples: int, points: int) -> Tensor:
    """:func:`plane_features` in Floor, Cast and Gather (no GridSample, which mobile delegates lack): one Gather
    reads a corner of every plane at once. Cell indices are computed in fp32 (in fp16 integers above 2,048
    are not exact)."""
    r = resolution
    g = (x.float().clamp(-extent, extent) / extent * 0.5 + 0.5) * (r - 1)  # [B, 3, S, P] in cells, [0, R - 1]
    cell = torch.floor(g).clamp(max=r - 2)
    frac = g - cell
    axes = ((0, 1), (0, 2), (1, 2))
    u = torch.stack([cell[:, a] for a, _ in axes], 1)  # [B, 3 planes, S, P]
    v = torch.stack([cell[:, b] for _, b in axes], 1)
    fu = torch.stack([frac[:, a] for a, _ in axes], 1).unsqueeze(-1)  # [B, 3, S, P, 1]
    fv = torch.stack([frac[:, b] for _, b in axes], 1).unsqueeze(-1)
    # the planes' offsets are int64 constants: an fp16 converter turns float constants into fp16 even for the
    # nodes it keeps in fp32, and offsets past 65,504 (planes of more than 181 cells) would become inf
    base = torch.arange(3, dtype=torch.long, device=x.device).view(1, 3, 1, 1) * (r * r)
    index = (v * r + u).long() + base  # [B, 3, S, P], corner (u, v)
    c = planes.shape[1]

    def read(offset: int) -> Tensor:
        return torch.index_select(planes, 0, (index + offset).reshape(-1)).reshape(-1, 3, samples, points, c).float()

    # the four corners' weights on the small [B, 3, S, P, 1] tensors, then 4 products and 3 sums over the C
    # channels (blending along u, then v, took 6 and 3: on the CPU these full-size ops are a fifth of a frame)
    gu, gv = 1 - fu, 1 - fv
    blend = read(0) * (gu * gv) + read(1) * (fu * gv) + read(r) * (gu * fv) + read(r + 1) * (fu * fv)
    return blend.permute(0, 1, 2, 4, 3).to(planes.dtype)  # [B, 3, S, C, P]


def sampled_plane_features(x: Tensor, planes: Tensor, resolution: int, extent: float, samples: int, points: int) -> Tensor:
    """:func:`plane_features` through ``grid_sample`` (align_corners, border padding: the same bilinear reads,
    computed in fp32). Training the lego occupancy student on an H200 ran 1.66x (batch 8) to 1.88x (batch 32)
    as many images per second as with the Gather form, whose four reads alone had taken 9 of 40 ms (batch 8)
    and 37 of 114 ms (batch 32) per step (scripts/profile_student.py, BENCHMARKS.md)."""
    c = planes.shape[1]
    grids = planes.float().view(3, resolution, resolution, c).permute(0, 3, 1, 2)  # [plane, C, v, u]
    xn = x.float().clamp(-extent, extent) / extent  # [B, 3, S, P]
    uv = torch.stack([torch.stack([xn[:, a], xn[:, b]], -1) for a, b in ((0, 1), (0, 2), (1, 2))])  # [3, B, S, P, 2] as (u, v)
    out = nn.functional.grid_sample(grids, uv.reshape(3, -1, 1, 2), mode="bilinear", padding_mode="border", align_corners=True)  # [3, C, B S P, 1]
    return out.view(3, c, -1, samples, points).permute(2, 0, 3, 1, 4).to(planes.dtype)  # [B, 3, S, C, P]


def line_features(x: Tensor, lines: Tensor, resolution: int, extent: float, points: int) -> Tensor:
    """Linear reads of three feature lines at points x [B, 3, 1, P] (encoded coordinates): [B, 3, C, P].

    ``lines`` [3 R, C] holds the lines along z, y and x one after the other: the axes the xy, xz and yz
    planes of :func:`plane_features` lack, so a plane's features times its line's (TensoRF's vector-matrix
    form) differ between two points that share a plane cell. Like the planes: Gather in a traced graph (two
    reads per line), ``grid_sample`` in torch; fp32 positions."""
    read = gathered_line_features if torch.jit.is_tracing() else sampled_line_features
    return read(x, lines, resolution, extent, points)


def gathered_line_features(x: Tensor, lines: Tensor, resolution: int, extent: float, points: int) -> Tensor:
    """:func:`line_features` in Floor, Cast and Gather."""
    r, c = resolution, lines.shape[1]
    w = torch.stack([x[:, 2, 0], x[:, 1, 0], x[:, 0, 0]], 1).float()  # [B, 3, P]: z, y, x
    g = (w.clamp(-extent, extent) / extent * 0.5 + 0.5) * (r - 1)
    cell = torch.floor(g).clamp(max=r - 2)
    frac = (g - cell).unsqueeze(-1)  # [B, 3, P, 1]
    index = cell.long() + torch.arange(3, dtype=torch.long, device=x.device).view(1, 3, 1) * r  # int64 offsets, as the planes'
    lo = torch.index_select(lines, 0, index.reshape(-1)).reshape(-1, 3, points, c).float()
    hi = torch.index_select(lines, 0, (index + 1).reshape(-1)).reshape(-1, 3, points, c).float()
    return (lo * (1 - frac) + hi * frac).permute(0, 1, 3, 2).to(lines.dtype)  # [B, 3, C, P]


def sampled_line_features(x: Tensor, lines: Tensor, resolution: int, extent: float, points: int) -> Tensor:
    """:func:`line_features` through ``grid_sample`` on 1-pixel-high images (the same linear reads)."""
    c = lines.shape[1]
    grids = lines.float().view(3, 1, resolution, c).permute(0, 3, 1, 2)  # [line, C, 1, R]
    xn = x[:, :, 0].float().clamp(-extent, extent) / extent  # [B, 3, P]
    u = torch.stack([xn[:, 2], xn[:, 1], xn[:, 0]])  # [3, B, P]
    uv = torch.stack([u, torch.zeros_like(u)], -1).reshape(3, -1, 1, 2)
    out = nn.functional.grid_sample(grids, uv, mode="bilinear", padding_mode="border", align_corners=True)  # [3, C, B P, 1]
    return out.view(3, c, -1, points).permute(2, 0, 1, 3).to(lines.dtype)  # [B, 3, C, P]


_ONNX_FORMS: contextvars.ContextVar[bool] = contextvars.ContextVar("mg3d_onnx_forms", default=False)


@contextlib.contextmanager
def onnx_forms() -> Iterator[None]:
    """While tracing inside this block, the student takes the forms that ONNX runtimes run fastest, with the
    same maths (:class:`TanhGELU`). Core ML's converter traces outside it and keeps its one fused GELU."""
    token = _ONNX_FORMS.set(True)
    try:
        yield
    finally:
        _ONNX_FORMS.reset(token)


class TanhGELU(nn.GELU):
    """The tanh-approximate GELU. In a traced ONNX graph (:func:`onnx_forms`) it is written
    ``x sigmoid(x (a + b x^2))`` with a = 2 sqrt(2/pi), b = 0.044715 a: equal to ``0.5 x (1 + tanh(sqrt(2/pi)
    (x + 0.044715 x^3)))`` (0.5 (1 + tanh(z)) = sigmoid(2 z)), in 6 element-wise ops instead of the 9 that the
    exporter writes for it, all of which NNAPI and Core ML run (Sigmoid is their LOGISTIC). In fp16, x^2 overflows
    only past |x| = 256, and then the sigmoid saturates to the right side (x or 0), as the tanh does."""

    A, B = 2.0 * math.sqrt(2.0 / math.pi), 0.044715 * 2.0 * math.sqrt(2.0 / math.pi)

    def __init__(self) -> None:
        super().__init__(approximate="tanh")

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing() and _ONNX_FORMS.get():
            return x * torch.sigmoid(x * (self.A + self.B * (x * x)))
        return super().forward(x)


def activation(name: str) -> nn.Module:
    return TanhGELU() if name == "gelu_tanh" else nn.GELU()


def norm_layer(name: str, width: int) -> nn.Module:
    return nn.BatchNorm2d(width) if name == "batch" else nn.Identity()


class ResBlock(nn.Module):
    """x + norm(conv(gelu(norm(conv(x))))) with 1x1 convolutions. The branch starts at zero (the last norm's
    scale, or the last conv when there is no norm), so a deep stack starts as the identity.

    Without normalisation the residual stream of a trained 28-block student grows to ~1e3 and most blocks end
    up dead behind a saturated GELU (measured on lego-400); BatchNorm keeps every branch's input in range and
    costs nothing on the phone: :func:`fold_batchnorm` merges it into the convolutions before export.
    """

    def __init__(self, width: int, act: str = "gelu_tanh", norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 1)
        self.norm1 = norm_layer(norm, width)
        self.conv2 = nn.Conv2d(width, width, 1)
        self.norm2 = norm_layer(norm, width)
        self.act = activation(act)
        if isinstance(self.norm2, nn.BatchNorm2d):
            nn.init.zeros_(self.norm2.weight)
        else:
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


def fold_batchnorm(model: NeLF) -> NeLF:
    """An eval-mode copy of ``model`` with every BatchNorm merged into the convolution before it (same output
    up to rounding; no normalisation layers left for an exporter or a phone runtime)."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    pairs = [(folded.stem, "0", "1")] + [(block, f"conv{i}", f"norm{i}") for block in folded.blocks for i in (1, 2)]
    for parent, conv_name, norm_name in pairs:  # (a Sequential's children are attributes "0", "1", ... too)
        norm = getattr(parent, norm_name)
        if isinstance(norm, nn.BatchNorm2d):
            setattr(parent, conv_name, fuse_conv_bn_eval(getattr(parent, conv_name), norm))
            setattr(parent, norm_name, nn.Identity())
    return folded


def sr_channels(width: int, stages: int) -> list[int]:
    """Channels after each x2 super-resolution stage: halving from ``width``, at least 16."""
    return [max(width >> (i + 1), 16) for i in range(stages)]


class SurfaceDetail(nn.Module):
    """Per-pixel texture from where each output pixel's ray meets the surface.

    The ray grid is ``sr_factor`` times coarser than the image, so without help the super-resolution layers
    must invent every pixel inside a block from the block's features: a perfect 50x50 lego image upsampled
    to 400x400 scores 22.1 dB, about where minutes-trained MobileR2L students stop (BENCHMARKS.md). Here the
    upsampled features predict a distance along each pixel's own ray (``depth``, trained on the teacher's
    depth), and three learned feature planes (xy, xz, yz) are read there: a texture atlas that every view of a
    surface point reads from the same cells, so it learns at the speed of a feature grid. Exports read them
    with Gather, no GridSample (see :func:`plane_features`); everything here runs in fp32 (positions, indices).

    A regressed depth is smooth across pixels, so at an occlusion edge it lands in the empty space between the
    near and the far surface. With ``spec.occupancy`` each pixel's ray is marched through an occupancy grid
    baked from the teacher (:meth:`march`) and the learned depth only places the surface inside the first
    occupied cell: the edge is as sharp as the pixel grid.

    The texture itself (:meth:`texture`): one set of planes, concatenated, by default; ``detail_lines``,
    ``detail_scales`` and ``detail_product`` give TensoRF's and K-planes' forms, and ``detail_points`` reads it
    at several points along the ray around the surface (a shell, as a volume render blends one);
    ``detail_coarse_once`` reads the coarser scales at the surface alone.
    """

    def __init__(self, spec: StudentSpec, channels: int) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("dirs", grid_directions(spec, step=1), persistent=False)  # [3, H*W]
        self.register_buffer("center", torch.tensor(spec.center, dtype=torch.float32), persistent=False)  # [3]
        # small random values, as instant-NGP starts its tables; with the product in [0.1, 0.5], as K-planes does
        # (products of three small values would start near zero)
        low, high = (0.1, 0.5) if spec.detail_product else (-1e-2, 1e-2)
        self.planes = nn.Parameter(torch.empty(3 * spec.detail_resolution**2, spec.detail).uniform_(low, high))
        # the coarser scales, coarse1, coarse2, ... (none by default, so older students load unchanged; plain
        # attributes, not a ParameterList, which torch 2.11's compiler cannot unpack)
        for k, r in enumerate(spec.detail_resolutions[1:], 1):
            self.register_parameter(f"coarse{k}", nn.Parameter(torch.empty(3 * r * r, spec.detail).uniform_(low, high)))
        if spec.detail_lines:  # ones: the student starts as with the planes alone
            self.lines = nn.Parameter(torch.ones(3 * spec.detail_resolution, spec.detail))
        self.depth = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.depth.weight)  # starts at the middle of the sample range
        nn.init.zeros_(self.depth.bias)
        self.fuse = nn.Conv2d(channels + spec.detail_channels + spec.view_channels, channels, 1)
        if spec.detail_view:  # pi 2^f for each frequency f, per coordinate: [1, 3 F, 1] against the direction repeated F times
            scales = math.pi * 2.0 ** torch.arange(spec.detail_view, dtype=torch.float32).repeat_interleave(3)
            self.register_buffer("view_scales", scales.view(1, -1, 1), persistent=False)
        # a GPU form's one-kernel plane reads (mg3d.student.gpu.plane_reads, set by gpu_form), else None
        self.read_planes: Callable[..., Tensor] | None = None
        if spec.occupancy:  # filled from the teacher (or a synthetic scene's exact grid) by set_occupancy; saved with the weights
            r, n = spec.occupancy, spec.march_steps
            self.register_buffer("occupied", torch.zeros(r**3, dtype=torch.uint8))  # 0/1 (uint8: DDP and NCCL broadcast it)
            # what the march reads: the same cells inside an empty border, so a point outside the box needs no test
            self.register_buffer("bordered", torch.zeros((r + 2) ** 3, dtype=torch.uint8), persistent=False)
            self.register_buffer("march_t", distance_at(spec, (torch.arange(n, dtype=torch.float64) + 0.5) / n).float(), persistent=False)
            self.register_buffer("march_step", torch.arange(n, dtype=torch.int32), persistent=False)
            # [start, spacing] @ march_k: every step's position at once, one MatMul per coordinate; march_k [2, n] is
            # [1 ...; t_0, t_1, ...] (the steps' distances) or with the box [1 ...; 0.5, 1.5, ...] (steps of each chord)
            along = torch.arange(n, dtype=torch.float32) + 0.5 if spec.march_box else self.march_t
            self.register_buffer("march_k", torch.stack([torch.ones(n), along]), persistent=False)
            if spec.march_box:  # the occupied cells' bounding box [lo, hi] in scene units (set_occupancy)
                self.register_buffer("box", torch.zeros(2, 3), persistent=False)
            self.register_load_state_dict_post_hook(lambda module, _keys: module.set_occupancy(module.occupied))

    def forward(self, c2w: Tensor, features: Tensor, intrinsics: Tensor | None = None, surface: Tensor | None = None, first: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """features [B, C, H, W] -> (fused features [B, C, H, W], distance along each pixel's ray [B, 1, H, W]).
        ``surface`` [B, 1, H, W]: read the planes at these distances instead of the predicted ones (a diagnostic:
        how much of the error is the predicted depth's). ``first`` [B, 1, H, W]: the march's result for these
        cameras (:meth:`first_hits`), computed once per training view instead of at every step."""
        spec = self.spec
        p = spec.width_px * spec.height_px
        s = torch.sigmoid(self.depth(features).float())  # [B, 1, H, W]: fraction of the sample range
        with torch.autocast(c2w.device.type, enabled=False):  # positions and plane indices need fp32
            origin, d = self.rays(c2w, intrinsics)
            if spec.occupancy and surface is None:
                hit, lo, hi = self.window(self.march(origin, d) if first is None else first.reshape(-1, 1, 1, p), origin, d)  # [B, 1, 1, P] each
                s = s.reshape(-1, 1, 1, p)
                t = torch.where(hit, lo + (hi - lo) * s, distance_at(spec, s))  # the learned depth, inside the window of the first hit
            else:
                t = (distance_at(spec, s) if surface is None else surface.float()).reshape(-1, 1, 1, p)  # [B, 1, 1, P]
            # the texture at detail_points points along the ray, detail_spread cells apart, centred on the surface
            step = spec.detail_spread * 2 * spec.radius * spec.plane_extent / spec.detail_resolution  # scene units
            offsets = [(k - (spec.detail_points - 1) / 2) * step for k in range(spec.detail_points)]
            centre = self.center.float().view(1, 3, 1, 1)
            finest = slice(0, 1) if spec.detail_coarse_once else slice(None)  # the scales read at every point
            reads = [self.texture(contract((origin + d * (t + o if o else t) - centre) / spec.radius, dim=1), finest) for o in offsets]
            if spec.detail_coarse_once:  # the coarser scales once, at the surface: the points lie within a cell or two of them
                reads.append(self.texture(contract((origin + d * t - centre) / spec.radius, dim=1), slice(1, None)))
            feats = torch.cat(reads, 1) if len(reads) > 1 else reads[0]
            if spec.detail_view:
                feats = torch.cat([feats, self.view_encoding(d[:, :, 0]).to(feats.dtype)], 1)
        feats = feats.reshape(-1, spec.detail_channels + spec.view_channels, spec.height_px, spec.width_px)
        fused = self.fuse(torch.cat([features, feats.to(features.dtype)], 1))
        return fused, t.reshape(-1, 1, spec.height_px, spec.width_px)

    def scales(self) -> list[nn.Parameter]:
        """The texture planes of every scale, finest first."""
        return [self.planes] + [getattr(self, f"coarse{k}") for k in range(1, self.spec.detail_scales)]

    def texture(self, points: Tensor, scales: slice = slice(None)) -> Tensor:
        """The texture's features [B, C or 3 C per scale, P] at points [B, 3, 1, P] (encoded coordinates): per scale
        (all, or those ``scales`` picks, finest first), the three planes' reads (times the lines'), concatenated
        or multiplied."""
        spec, p = self.spec, self.spec.width_px * self.spec.height_px  # constants: traced graphs keep no shape arithmetic
        lines = line_features(points, self.lines, spec.detail_resolution, spec.plane_extent, p).unsqueeze(2) if spec.detail_lines else None  # [B, 3, 1, C, P]
        out = []
        for planes, r in zip(self.scales()[scales], spec.detail_resolutions[scales]):
            if self.read_planes is not None and not torch.jit.is_tracing():  # lines excluded (gpu.fusible)
                out.append(self.read_planes(points, planes, r, spec.plane_extent, spec.detail_product))  # [B, C or 3 C, P]
                continue
            f = plane_features(points, planes, r, spec.plane_extent, 1, p)  # [B, 3, 1, C, P]
            if lines is not None:
                f = f * lines
            out.append(f[:, 0] * f[:, 1] * f[:, 2] if spec.detail_product else f)
        return torch.cat([f.reshape(-1, spec.detail * (1 if spec.detail_product else 3), p) for f in out], 1)

    def view_encoding(self, d: Tensor) -> Tensor:
        """Ray directions d [B, 3, P] (any length) -> [B, view_channels, P]: the unit direction u, then sin and
        cos of u pi 2^f per frequency, as one Sin (cos(a) = sin(a + pi/2); NNAPI has no Cos). The norm is
        ReduceSum and Sqrt, which every runtime has."""
        u = d / torch.sqrt((d * d).sum(1, keepdim=True))
        a = u.repeat(1, self.spec.detail_view, 1) * self.view_scales  # [B, 3 F, P]
        return torch.cat([u, torch.sin(torch.cat([a, a + math.pi / 2], 1))], 1)

    def rays(self, c2w: Tensor, intrinsics: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """fp32 origins [B, 3, 1, 1] and directions [B, 3, 1, P] of every output pixel's ray."""
        dirs = self.dirs.float() if intrinsics is None else grid_directions(self.spec, intrinsics, step=1)
        c2w = c2w.float()
        return c2w[:, :3, 3:4][:, :, None, :], torch.matmul(c2w[:, :3, :3], dirs)[:, :, None, :]

    @torch.no_grad()
    def first_hits(self, c2w: Tensor, intrinsics: Tensor | None = None) -> Tensor:
        """:meth:`march` for every pixel of cameras c2w [B, 4, 4]: the first occupied step [B, 1, H, W]."""
        return self.march(*self.rays(c2w, intrinsics)).reshape(-1, 1, self.spec.height_px, self.spec.width_px)

    def march_cameras(self, c2w: Tensor, intrinsics: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The windows of :meth:`window` for every pixel of cameras c2w [B, 4, 4]: hit, lo, hi [B, 1, H, W]."""
        origin, d = self.rays(c2w, intrinsics)
        shape = (-1, 1, self.spec.height_px, self.spec.width_px)
        return tuple(x.reshape(shape) for x in self.window(self.march(origin, d), origin, d))  # type: ignore[return-value]

    @torch.no_grad()
    def set_occupancy(self, occupied: Tensor) -> None:
        """Set the occupancy grid (0/1 per cell, [occupancy^3] in x-major order) and the march's bordered copy."""
        r = self.spec.occupancy
        self.occupied.copy_(occupied.reshape(-1))
        self.bordered.zero_()
        self.bordered.view(r + 2, r + 2, r + 2)[1:-1, 1:-1, 1:-1] = self.occupied.view(r, r, r)
        if self.spec.march_box:
            cells = self.occupied.view(r, r, r).nonzero()  # [N, 3]: x, y, z cell indices
            size, corner = 2 * self.spec.radius / r, self.center.float() - self.spec.radius
            if len(cells):  # half a cell of margin: the bounds survive rounding (an fp16 export stores them in fp16)
                self.box.copy_(torch.stack([corner + (cells.amin(0) - 0.5) * size, corner + (cells.amax(0) + 1.5) * size]))
            else:  # no occupied cell: a point outside the grid, which every ray misses
                self.box.copy_((self.center.float() + 2 * self.spec.radius).expand(2, 3))

    @torch.no_grad()
    def march(self, origin: Tensor, d: Tensor) -> Tensor:
        """March rays (origin [B, 3, 1, 1], directions [B, 3, 1, P]) through the occupancy grid at fixed steps:
        the first occupied step [B, 1, 1, P] (int64; ``march_steps`` when the ray meets none).

        The work is over [B, 3, P, steps] (20 M points for one 400x400 view), so each operation counts:
        positions are taken in cells of the bordered grid, all of a coordinate's steps as one MatMul
        (:meth:`_cells`), a point outside the grid clamps into its empty border (no inside test), the grid is
        read as bool (no compare), and the first hit is one minimum over the last axis. The steps span the
        sample range, or with ``march_box`` each ray's chord through the occupied cells' box (:meth:`box_range`),
        whose points need no clamp: on lego 64 such steps find more of the surface than 128 over the range.
        In onnxruntime on this 2-core CPU the box's 64 steps take 120 ms against 146-153 for the earlier
        element-wise form (BENCHMARKS.md)."""
        spec, r, n = self.spec, self.spec.occupancy, self.spec.march_steps
        cells = 0.5 * r / spec.radius  # grid cells per unit of length
        o = (origin - self.center.float().view(1, 3, 1, 1)) * cells + (0.5 * r + 1)  # [B, 3, 1, 1]: cell coordinates, border included
        hit = None
        if spec.march_box:  # from where each ray enters the box, at its own spacing; a ray that misses it starts in the border
            t0, dt = self.box_range(origin, d)  # [B, 1, 1, P]
            hit = dt > 0
            start, spacing = torch.where(hit, o + d * (cells * t0), 0.5), d * (cells * dt)
        else:
            start, spacing = o.expand_as(d), d * cells
        gx, gy, gz = self._cells(start, spacing, clamp=not spec.march_box, elementwise=d.is_cuda and not torch.jit.is_tracing())  # [B, P, n] each
        index = (gx * (r + 2) + gy) * (r + 2) + gz  # int32: 258^3 is past fp32's integers
        if torch.jit.is_tracing() and not _ONNX_FORMS.get():  # Core ML: the bytes and a compare (it would read a bool table in fp16)
            occ = self.bordered[index] > 0
        else:  # the grid as bool, no compare: ONNX folds the Cast into the constant, eager torch views the 0/1 bytes
            traced = torch.jit.is_tracing() or torch.compiler.is_compiling()  # (a compiled graph converts them, 17 MB)
            occ = (self.bordered.bool() if traced else self.bordered.view(torch.bool))[index]
        first = torch.where(occ, self.march_step, n).amin(-1).unsqueeze(1).unsqueeze(1)  # [B, 1, 1, P]
        return (first if hit is None else torch.where(hit, first, n)).long()  # a ray that misses the box misses

    def _cells(self, start: Tensor, spacing: Tensor, clamp: bool, elementwise: bool) -> tuple[Tensor, ...]:
        """Cells (x, y, z) [B, P, n] int32 of the march's steps: ``start`` [B, 3, 1, P] + ``spacing`` [B, 3, 1, P]
        x the second row of ``march_k``, in cells of the bordered grid; ``clamp``: into the grid (the plain march's
        points leave it; the box's lie inside). One MatMul per coordinate, or element-wise (on a GPU, where a
        MatMul may run in TF32)."""
        r = self.spec.occupancy
        if elementwise:
            pos = start.squeeze(2).unsqueeze(-1) + spacing.squeeze(2).unsqueeze(-1) * self.march_k[1]  # [B, 3, P, n]
            floor = pos.floor().clamp(0, r + 1) if clamp else pos.floor()
            return floor.int().unbind(1)
        ab = torch.stack([start, spacing], -1)  # [B, 3, 1, P, 2]
        out = []
        with torch.autocast(start.device.type, enabled=False):  # fp32 positions under an autocast too
            for c in range(3):
                floor = torch.matmul(ab[:, c, 0].float(), self.march_k).floor()
                out.append((floor.clamp(0, r + 1) if clamp else floor).int())
        return tuple(out)

    def box_range(self, origin: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        """``march_box``: where each ray (origin [B, 3, 1, 1], directions [B, 3, 1, P]) enters the occupied cells'
        box within the sample range, and the spacing of the march's steps from there to where it leaves (0
        when it misses the box): t0, dt [B, 1, 1, P]. Slabs: Div, Min, Max, ReduceMax, ReduceMin."""
        n = self.spec.march_steps
        safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)  # parallel to a slab: entered at -huge, left at +huge
        ta, tb = (self.box[0].view(1, 3, 1, 1) - origin) / safe, (self.box[1].view(1, 3, 1, 1) - origin) / safe
        t_in = torch.minimum(ta, tb).amax(1, keepdim=True).clamp(min=self.spec.near)  # within the sample range (Python floats: no
        t_out = torch.maximum(ta, tb).amin(1, keepdim=True).clamp(max=self.spec.far)  # tensor-to-number step to break a compiled graph)
        return t_in, (t_out - t_in).clamp(min=0) / n

    def window(self, first: Tensor, origin: Tensor | None = None, d: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """First occupied steps [B, 1, 1, P] of the rays (origin, d) -> (hit, lo, hi) [B, 1, 1, P]: from the step
        before (the surface entered the cell in between) to one cell diagonal past it (it may lie that far
        inside). Only ``march_box`` students need the rays (their steps lie on each ray's own chord)."""
        n, ts = self.spec.march_steps, self.march_t
        first = first.long()
        diagonal = 2 * math.sqrt(3) * self.spec.radius / self.spec.occupancy
        if self.spec.march_box:
            if origin is None or d is None:
                raise ValueError("a march_box student's window needs the rays")
            t0, dt = self.box_range(origin, d)
            k = first.to(t0.dtype)
            return first < n, t0 + (k - 0.5).clamp(min=0) * dt, t0 + (k + 0.5) * dt + diagonal
        return first < n, ts[(first - 1).clamp(0, n - 1)], ts[first.clamp(max=n - 1)] + diagonal


class NeLF(nn.Module):
    """Pose in, image out. See the module docstring."""

    def __init__(self, spec: StudentSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("dirs", grid_directions(spec), persistent=False)  # [3, P]
        self.register_buffer("t", sample_distances(spec), persistent=False)  # [S]
        self.register_buffer("center", torch.tensor(spec.center, dtype=torch.float32), persistent=False)  # [3]
        # x * 2^f for every coordinate c and frequency f, as a fixed 1x1 convolution: output channel c F + f
        # (one exact product each), so the graph stays 4-D for mobile delegates.
        n, f = 3 * spec.samples, spec.frequencies
        freqs = torch.zeros(n * f, n, 1, 1)
        for c in range(n):
            freqs[c * f : (c + 1) * f, c, 0, 0] = 2.0 ** torch.arange(f, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)  # [3 S F, 3 S, 1, 1]
        if spec.planes:  # small random values, as instant-NGP starts its tables
            self.planes = nn.Parameter(torch.empty(3 * spec.plane_resolution**2, spec.planes).uniform_(-1e-2, 1e-2))
        self.stem = nn.Sequential(nn.Conv2d(spec.in_channels, spec.width, 1), norm_layer(spec.norm, spec.width), activation(spec.activation))
        self.blocks = nn.Sequential(*[ResBlock(spec.width, spec.activation, spec.norm) for _ in range(spec.depth)])
        self.act = activation(spec.activation)
        stages, c_in, layers = int(math.log2(spec.sr_factor)), spec.width, []
        for c_out in sr_channels(spec.width, stages):
            if spec.upsample == "shuffle":
                layers += [nn.Conv2d(c_in, 4 * c_out, 1), nn.PixelShuffle(2)]
            else:
                layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
            layers += [activation(spec.activation), nn.Conv2d(c_out, c_out, 3, padding=1), activation(spec.activation)]
            c_in = c_out
        self.upsampler = nn.Sequential(*layers)
        if spec.detail:
            self.detail = SurfaceDetail(spec, c_in)
        hidden: list[nn.Module] = []  # a per-pixel MLP after the last stage (empty: none; no weights, so older students load)
        for _ in range(spec.head_layers):
            hidden += [nn.Conv2d(c_in, spec.head_width, 1), activation(spec.activation)]
            c_in = spec.head_width
        self.hidden = nn.Sequential(*hidden)
        self.head = nn.Conv2d(c_in, 3, 1)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - torch's signature
        """``half()``, ``to(dtype)`` and the like cast the weights only. The floating-point buffers are all
        geometry (ray directions, sample distances, frequencies, the march's steps and box), which fp16 would
        move by a quarter pixel and more; they keep fp32 wherever the model goes (:meth:`forward` computes
        positions in fp32 from an fp32 pose)."""
        kept = {name: b for name, b in self.named_buffers() if b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            owner, _, attr = name.rpartition(".")
            module = self.get_submodule(owner)
            if module._buffers[attr].dtype != old.dtype:
                module._buffers[attr] = old.to(module._buffers[attr].device)
        return self

    def encode(self, c2w: Tensor, intrinsics: Tensor | None = None) -> Tensor:
        """Positionally encoded ray points (and their plane features) [B, in_channels, h, w] for cameras c2w [B, 4, 4]."""
        spec = self.spec
        gw, gh = spec.grid
        rot, origin = c2w[:, :3, :3], c2w[:, :3, 3:4]  # [B, 3, 3], [B, 3, 1]
        dirs = self.dirs if intrinsics is None else grid_directions(spec, intrinsics)
        d = torch.matmul(rot, dirs)  # [B, 3, P]
        pts = origin[:, :, None, :] + d[:, :, None, :] * self.t.view(1, 1, -1, 1)  # [B, 3, S, P]
        points = contract((pts - self.center.view(1, 3, 1, 1)) / spec.radius, dim=1)  # [B, 3, S, P]
        x = points.reshape(-1, 3 * spec.samples, gh, gw)  # -1, not B: traced graphs keep no shape arithmetic
        if spec.frequencies:
            xf = nn.functional.conv2d(x, self.freqs)  # [B, 3 S F, h, w]
            # cos(a) = sin(a + pi/2): one Sin for both halves (NNAPI has Sin but no Cos)
            x = torch.cat([x, torch.sin(torch.cat([xf, xf + math.pi / 2], 1))], 1)
        if spec.planes:
            feats = plane_features(points, self.planes, spec.plane_resolution, spec.plane_extent, spec.samples, gh * gw)
            x = torch.cat([x, feats.reshape(-1, 3 * spec.samples * spec.planes, gh, gw)], 1)
        return x

    def forward(self, c2w: Tensor, intrinsics: Tensor | None = None, with_depth: bool = False, surface: Tensor | None = None, first: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor | None]:
        """Images rgb [B, 3, H, W] in [0, 1] for OpenGL cameras c2w [B, 4, 4] (intrinsics [B, 4] optional).
        ``with_depth``: (rgb, distance along each pixel's ray [B, 1, H, W], or None without ``detail``).
        ``surface``, ``first``: given distances for the detail planes instead of the predicted ones, and the
        occupancy march's result for these cameras (:class:`SurfaceDetail`)."""
        with torch.autocast(c2w.device.type, enabled=False):  # the phases of 2^5 x need fp32, not bf16 (ulp 0.25 at 32)
            x = self.encode(c2w.float(), intrinsics)
        weight = self.stem[0].weight
        if x.dtype != weight.dtype:  # an fp16 model (how it ships to a GPU): fp16 from the first convolution on
            x = x.to(weight.dtype)
        x = self.upsampler(self.act(self.blocks(self.stem(x))))
        depth = None
        if self.spec.detail:
            x, depth = self.detail(c2w, x, intrinsics, surface, first)
            x = self.act(x)
        rgb = torch.sigmoid(self.head(self.hidden(x)))
        return (rgb, depth) if with_depth else rgb

    # ---- files --------------------------------------------------------------------------------------
    def save(self, folder: Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``student.safetensors`` and ``student.json`` (the spec, plus ``extra`` metadata)."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / "student.safetensors"))
        meta = {"schema": 1, "spec": asdict(self.spec), **(extra or {})}
        (folder / "student.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> NeLF:
        """Load a saved student (a ``WS/student`` folder or a workspace)."""
        from mg3d.checkpoint import load_tensors

        folder = Path(folder)
        if (folder / "student" / "student.json").is_file():
            folder = folder / "student"
        try:
            model = cls(read_spec(folder / "student.json"))
        except FileNotFoundError:
            raise StudentError(f"no trained student in {folder}", hint="run mg3d student WS first") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise StudentError(f"{folder / 'student.json'} is corrupt ({exc.__class__.__name__})", hint="retrain with mg3d student WS --force") from None
        try:
            model.load_state_dict(load_tensors(folder / "student.safetensors", StudentError))
        except RuntimeError as exc:
            raise StudentError(f"{folder / 'student.safetensors'} does not fit student.json ({str(exc)[:80]})", hint="retrain with --force") from None
        return model.to(device)


def read_spec(path: Path) -> StudentSpec:
    """The spec in a saved ``student.json``, with the defaults of students saved before some options existed."""
    spec = json.loads(Path(path).read_text())["spec"]
    spec["center"] = tuple(spec["center"])
    spec.setdefault("activation", "gelu")  # students saved before these options existed
    spec.setdefault("norm", "none")
    spec.setdefault("planes", 0)
    spec.setdefault("detail", 0)
    return StudentSpec(**spec)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs_per_frame(spec: StudentSpec) -> int:
    """Multiply-accumulates of one forward pass (convolutions only), for size/speed tables."""
    gw, gh = spec.grid
    p = gw * gh
    total = p * (spec.in_channels * spec.width + spec.depth * 2 * spec.width * spec.width)  # (plane reads: a few per point, not counted)
    c_in, scale = spec.width, 1
    for c_out in sr_channels(spec.width, int(math.log2(spec.sr_factor))):
        up = c_in * 4 * c_out if spec.upsample == "shuffle" else c_in * c_out * 16
        scale *= 2
        total += p * (scale // 2) ** 2 * up + p * scale**2 * 9 * c_out * c_out
        c_in = c_out
    if spec.detail:  # depth and fuse convolutions at every pixel (plane reads not counted)
        total += p * scale**2 * (c_in + (c_in + spec.detail_channels + spec.view_channels) * c_in)
    for _ in range(spec.head_layers):  # the head's hidden layers
        total += p * scale**2 * c_in * spec.head_width
        c_in = spec.head_width
    return int(total + p * scale**2 * 3 * c_in)
