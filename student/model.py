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

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mg3d.errors import ConfigError, Mg3dError


class StudentError(Mg3dError):
    """The student cannot be built, trained or loaded."""


UPSAMPLERS = ("shuffle", "transpose")


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

    def __post_init__(self) -> None:
        check_resolution(self.width_px, self.height_px, self.sr_factor)
        if self.upsample not in UPSAMPLERS:
            raise ConfigError(f"upsample {self.upsample!r} is unknown", hint="use shuffle or transpose")
        if self.spacing not in ("linear", "disparity"):
            raise ConfigError(f"spacing {self.spacing!r} is unknown", hint="use linear or disparity")
        if min(self.samples, self.depth, self.width) < 1 or self.frequencies < 0:
            raise ConfigError("samples, depth and width must be positive and frequencies not negative")
        if not 0 < self.near < self.far:
            raise ConfigError(f"near {self.near} and far {self.far} must satisfy 0 < near < far")

    @property
    def grid(self) -> tuple[int, int]:
        """Size of the ray grid (width, height)."""
        return self.width_px // self.sr_factor, self.height_px // self.sr_factor

    @property
    def in_channels(self) -> int:
        return 3 * self.samples * (1 + 2 * self.frequencies)


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
    """mip-NeRF 360 contraction: points inside the unit ball stay, the rest map into the ball of radius 2."""
    norm = x.norm(dim=dim, keepdim=True).clamp_min(1e-6)
    return torch.where(norm <= 1.0, x, (2.0 - 1.0 / norm) * x / norm)


def sample_distances(spec: StudentSpec) -> Tensor:
    """The fixed distances [S] of the samples on every ray (bin centres)."""
    s = (torch.arange(spec.samples, dtype=torch.float64) + 0.5) / spec.samples
    if spec.spacing == "linear":
        t = spec.near + (spec.far - spec.near) * s
    else:
        t = 1.0 / (1.0 / spec.near * (1 - s) + 1.0 / spec.far * s)
    return t.float()


def grid_directions(spec: StudentSpec, intrinsics: Tensor | None = None) -> Tensor:
    """Camera-space unit ray directions through the ray-grid cells: [3, h*w], or [B, 3, h*w] for intrinsics [B, 4]
    (fx, fy, cx, cy at the output size). Each cell is an sr_factor x sr_factor block of output pixels."""
    gw, gh = spec.grid
    s = spec.sr_factor
    v, u = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij")
    u, v = (u.reshape(-1) + 0.5) * s, (v.reshape(-1) + 0.5) * s  # block centres in output pixels
    if intrinsics is None:
        k = torch.tensor([[spec.fx, spec.fy, spec.cx, spec.cy]], dtype=torch.float32)
    else:
        k = intrinsics.float()
        u, v = u.to(k.device), v.to(k.device)
    fx, fy, cx, cy = (k[:, i : i + 1] for i in range(4))  # [B, 1]
    d = torch.stack([(u - cx) / fx, -(v - cy) / fy, -torch.ones_like(fx * u)], 1)  # [B, 3, P]
    d = d / d.norm(dim=1, keepdim=True)
    return d[0] if intrinsics is None else d


class ResBlock(nn.Module):
    """x + conv(gelu(conv(x))) with 1x1 convolutions; the second starts at zero, so a deep stack starts as
    the identity and trains without normalisation layers (nothing to fold at export)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 1)
        self.conv2 = nn.Conv2d(width, width, 1)
        self.act = nn.GELU()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


def sr_channels(width: int, stages: int) -> list[int]:
    """Channels after each x2 super-resolution stage: halving from ``width``, at least 16."""
    return [max(width >> (i + 1), 16) for i in range(stages)]


class NeLF(nn.Module):
    """Pose in, image out. See the module docstring."""

    def __init__(self, spec: StudentSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("dirs", grid_directions(spec), persistent=False)  # [3, P]
        self.register_buffer("t", sample_distances(spec), persistent=False)  # [S]
        self.register_buffer("center", torch.tensor(spec.center, dtype=torch.float32), persistent=False)  # [3]
        freqs = 2.0 ** torch.arange(spec.frequencies, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)  # [F]
        self.stem = nn.Sequential(nn.Conv2d(spec.in_channels, spec.width, 1), nn.GELU())
        self.blocks = nn.Sequential(*[ResBlock(spec.width) for _ in range(spec.depth)])
        self.act = nn.GELU()
        stages, c_in, layers = int(math.log2(spec.sr_factor)), spec.width, []
        for c_out in sr_channels(spec.width, stages):
            if spec.upsample == "shuffle":
                layers += [nn.Conv2d(c_in, 4 * c_out, 1), nn.PixelShuffle(2)]
            else:
                layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
            layers += [nn.GELU(), nn.Conv2d(c_out, c_out, 3, padding=1), nn.GELU()]
            c_in = c_out
        self.upsampler = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, 3, 1)

    def encode(self, c2w: Tensor, intrinsics: Tensor | None = None) -> Tensor:
        """Positionally encoded ray points [B, 3 S (1 + 2 F), h, w] for cameras c2w [B, 4, 4]."""
        spec = self.spec
        gw, gh = spec.grid
        b = c2w.shape[0]
        rot, origin = c2w[:, :3, :3], c2w[:, :3, 3:4]  # [B, 3, 3], [B, 3, 1]
        dirs = self.dirs if intrinsics is None else grid_directions(spec, intrinsics)
        d = torch.matmul(rot, dirs)  # [B, 3, P]
        pts = origin[:, :, None, :] + d[:, :, None, :] * self.t.view(1, 1, -1, 1)  # [B, 3, S, P]
        x = contract((pts - self.center.view(1, 3, 1, 1)) / spec.radius, dim=1)  # [B, 3, S, P]
        x = x.reshape(b, 3 * spec.samples, gh, gw)
        if spec.frequencies:
            xf = x[:, :, None] * self.freqs.view(1, 1, -1, 1, 1)  # [B, 3S, F, h, w]
            xf = xf.reshape(b, -1, gh, gw)
            x = torch.cat([x, torch.sin(xf), torch.cos(xf)], 1)
        return x

    def forward(self, c2w: Tensor, intrinsics: Tensor | None = None) -> Tensor:
        """Images rgb [B, 3, H, W] in [0, 1] for OpenGL cameras c2w [B, 4, 4] (intrinsics [B, 4] optional)."""
        x = self.encode(c2w, intrinsics)
        x = self.act(self.blocks(self.stem(x)))
        return torch.sigmoid(self.head(self.upsampler(x)))

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
            spec = json.loads((folder / "student.json").read_text())["spec"]
            spec["center"] = tuple(spec["center"])
            model = cls(StudentSpec(**spec))
        except FileNotFoundError:
            raise StudentError(f"no trained student in {folder}", hint="run mg3d student WS first") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise StudentError(f"{folder / 'student.json'} is corrupt ({exc.__class__.__name__})", hint="retrain with mg3d student WS --force") from None
        try:
            model.load_state_dict(load_tensors(folder / "student.safetensors", StudentError))
        except RuntimeError as exc:
            raise StudentError(f"{folder / 'student.safetensors'} does not fit student.json ({str(exc)[:80]})", hint="retrain with --force") from None
        return model.to(device)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs_per_frame(spec: StudentSpec) -> int:
    """Multiply-accumulates of one forward pass (convolutions only), for size/speed tables."""
    gw, gh = spec.grid
    p = gw * gh
    total = p * (spec.in_channels * spec.width + spec.depth * 2 * spec.width * spec.width)
    c_in, scale = spec.width, 1
    for c_out in sr_channels(spec.width, int(math.log2(spec.sr_factor))):
        up = c_in * 4 * c_out if spec.upsample == "shuffle" else c_in * c_out * 16
        scale *= 2
        total += p * (scale // 2) ** 2 * up + p * scale**2 * 9 * c_out * c_out
        c_in = c_out
    return int(total + p * scale**2 * 3 * c_in)
