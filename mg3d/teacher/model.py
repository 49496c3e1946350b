"""The trained teacher: a field, its occupancy grid and its sampler, with the render API later stages use.

    teacher = Teacher.load("ws/teacher", device="cuda")
    out = teacher.render(c2w, fx, fy, cx, cy, width=400, height=400)   # rgb [B, H, W, 3], depth, opacity

Weights are safetensors, settings JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mg3d.errors import Mg3dError
from mg3d.teacher.field import Field
from mg3d.teacher.occupancy import OccupancyGrid
from mg3d.teacher.rendering import EARLY_STOP, camera_rays, composite, distance_sequence, pack_samples, ray_aabb, transmittance


#: Most candidate samples (rays x steps) materialised at once on the CPU; bounds memory in training and
#: rendering. A GPU takes 16 times more (about 3 GB of candidates), which keeps its kernels large.
CANDIDATE_BUDGET = 1 << 22


#: Most samples the field is evaluated on at once when rendering (bounds the hash grid's intermediates).
FIELD_CHUNK = 1 << 21

#: Candidate steps marched at a time; rays that are opaque after a segment are not marched further.
MARCH_SEGMENT = 32


def candidate_budget(device: torch.device) -> int:
    return CANDIDATE_BUDGET * (16 if device.type == "cuda" else 1)


class TeacherError(Mg3dError):
    """The teacher cannot train or load."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network and its sampler (saved as ``teacher.json``)."""

    unbounded: bool
    bound: float  # half side of the cube (bounded) or of the inner, uncontracted region (unbounded: 1)
    near: float
    far: float
    steps_per_ray: int  # smallest step = 2 * sqrt(3) * bound / steps_per_ray
    cone: float  # step growth with distance (0: uniform steps)
    levels: int
    features: int
    log2_size: int
    max_resolution: int
    hidden: int
    grid_resolution: int
    appearance: int
    num_images: int
    pose_refine: bool
    background: tuple[float, float, float] | None  # fixed colour (RGBA data); None: learned
    density_bias: float = -1.0  # log density of the untrained field

    @property
    def dt_min(self) -> float:
        return 2.0 * math.sqrt(3.0) * self.bound / self.steps_per_ray


def so3_exp(w: Tensor) -> Tensor:
    """Rotation matrices [N, 3, 3] from axis-angle vectors [N, 3] (Rodrigues)."""
    theta = w.norm(dim=-1, keepdim=True).clamp_min(1e-9)[..., None]  # [N, 1, 1]
    k = w / theta[..., 0]
    zero = torch.zeros_like(k[:, 0])
    kx = torch.stack([zero, -k[:, 2], k[:, 1], k[:, 2], zero, -k[:, 0], -k[:, 1], k[:, 0], zero], -1).view(-1, 3, 3)
    eye = torch.eye(3, device=w.device, dtype=w.dtype).expand_as(kx)
    return eye + torch.sin(theta) * kx + (1 - torch.cos(theta)) * kx @ kx


class Teacher(nn.Module):
    """Field + occupancy grid + background + optional per-image pose corrections."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.field = Field(
            unbounded=spec.unbounded, bound=spec.bound, levels=spec.levels, features=spec.features,
            log2_size=spec.log2_size, max_resolution=spec.max_resolution, hidden=spec.hidden,
            appearance=spec.appearance, num_images=spec.num_images, density_bias=spec.density_bias,
        )
        self.grid = OccupancyGrid(spec.grid_resolution)
        self.background_logit = nn.Parameter(torch.zeros(3)) if spec.background is None else None
        self.pose_delta = nn.Parameter(torch.zeros(spec.num_images, 6)) if spec.pose_refine else None
        t, dt = distance_sequence(spec.near, spec.far, spec.dt_min, spec.cone)
        self.register_buffer("t_seq", t, persistent=False)
        self.register_buffer("dt_seq", dt, persistent=False)

    def compile_encoding(self) -> None:
        """Fuse the hash encoding's elementwise work with ``torch.compile`` (the fast path; the eager
        encoding is its reference, see tests/test_teacher_parity.py). Weights and outputs are unchanged."""
        encoding = self.field.encoding
        encoding.forward = torch.compile(type(encoding).forward.__get__(encoding), dynamic=True)

    # ---- pieces -------------------------------------------------------------------------------------
    def background(self, n: int, device: torch.device) -> Tensor:  # [n, 3]
        if self.background_logit is None:
            return torch.tensor(self.spec.background, device=device).expand(n, 3)
        return torch.sigmoid(self.background_logit).expand(n, 3)

    def refine(self, c2w: Tensor, image: Tensor | None) -> Tensor:
        """Apply learned pose corrections to training cameras c2w [R, 4, 4] of images [R]."""
        if self.pose_delta is None or image is None:
            return c2w
        delta = self.pose_delta[image]
        out = c2w.clone()
        out[:, :3, :3] = c2w[:, :3, :3] @ so3_exp(delta[:, :3])
        out[:, :3, 3] = c2w[:, :3, 3] + delta[:, 3:]
        return out

    def ray_bounds(self, origins: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
        n = origins.shape[0]
        near = torch.full((n,), self.spec.near, device=origins.device)
        far = torch.full((n,), self.spec.far, device=origins.device)
        if self.spec.unbounded:
            return near, far
        t0, t1 = ray_aabb(origins, dirs, self.spec.bound)
        return torch.maximum(t0, near), torch.minimum(t1, far)

    def occupied(self, x: Tensor) -> Tensor:
        return self.grid.occupied(self.field.normalize(x.reshape(-1, 3))).reshape(x.shape[:-1])

    # ---- rendering ----------------------------------------------------------------------------------
    def render_rays(
        self, origins: Tensor, dirs: Tensor, image: Tensor | None = None, background: Tensor | None = None,
        jitter: Tensor | None = None, max_samples: int = 0,
    ) -> dict[str, Tensor]:
        """Render rays [R, 3] (unit directions). Returns rgb [R, 3], depth [R], opacity [R], samples (int).

        With gradients, at most ``max_samples`` samples are evaluated (0: no limit): rays past the budget
        get no samples and are marked False in ``used`` [R], so a loss should skip them.
        """
        n = origins.shape[0]
        if not torch.is_grad_enabled():  # rendering: encode each sample once, colour only the visible ones
            ray, t, dt, sigma, geo = self.march(origins, dirs, jitter, with_features=True)
            rgb = torch.cat([
                self.field.color(geo[s : s + FIELD_CHUNK], dirs[ray[s : s + FIELD_CHUNK]], None if image is None else image[ray[s : s + FIELD_CHUNK]])
                for s in range(0, len(ray), FIELD_CHUNK)
            ]) if len(ray) else torch.zeros(0, 3, device=origins.device)
            return self._finish(composite(ray, sigma, rgb, t, dt, n), n, origins.device, background)
        with torch.no_grad():  # the visible samples first, without gradients, before the (costly) pass with them
            ray, t, dt, _, _ = self.march(origins, dirs, jitter, segmented=False)
        if max_samples and len(ray) > max_samples:  # keep whole rays up to the budget; the rest are marked unused
            last = int(ray[max_samples])
            cut = int(torch.searchsorted(ray, torch.tensor(last, device=ray.device)))
            ray, t, dt = ray[:cut], t[:cut], dt[:cut]
            used = torch.arange(n, device=origins.device) < last
        else:
            used = torch.ones(n, dtype=torch.bool, device=origins.device)
        x = origins[ray] + t[:, None] * dirs[ray]
        sigma, rgb = self.field(x, dirs[ray], None if image is None else image[ray])
        out = self._finish(composite(ray, sigma, rgb, t, dt, n), n, origins.device, background)
        out["used"] = used
        return out

    @torch.no_grad()
    def march(
        self, origins: Tensor, dirs: Tensor, jitter: Tensor | None = None, with_features: bool = False, segmented: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """The visible samples of rays [R, 3]: ray index [S] (sorted), t [S], dt [S], density [S] and, with
        ``with_features``, the geometry features [S, G].

        Visible means in an occupied cell, not empty, and with transmittance above ``EARLY_STOP`` before it:
        the same samples as one pass over the whole distance sequence. On a CPU, unbounded scenes are
        marched ``MARCH_SEGMENT`` candidate steps at a time, so rays stop once they are opaque (3.1x faster
        renders of the demo's teacher: the density of hidden samples is what costs there). On a GPU, and
        for training batches (``segmented`` False), one pass: there the per-segment synchronisations cost
        more than they save (H100: lego renders 17 instead of 21 FPS, woman-512 1.6 instead of 2.2 FPS,
        woman-512 training at a third of its speed).
        """
        n, device = origins.shape[0], origins.device
        t_min, t_max = self.ray_bounds(origins, dirs)
        alive = torch.arange(n, device=device)
        log_t = torch.zeros(n, device=device)  # log transmittance in front of the current segment
        parts: list[tuple[Tensor, ...]] = []
        stop = math.log(EARLY_STOP)
        segment = self._march_segment(device) if segmented else len(self.t_seq)
        for s in range(0, len(self.t_seq), segment):
            if not len(alive):
                break
            seq, dseq = self.t_seq[s : s + segment], self.dt_seq[s : s + segment]
            ahead = t_max[alive] > seq[0]  # rays that end before this segment are done
            alive = alive[ahead]
            if not len(alive):
                break
            if float(seq[-1] + dseq[-1]) <= float(t_min[alive].min()):
                continue  # every ray starts after this segment
            local, t, dt = pack_samples(origins[alive], dirs[alive], t_min[alive], t_max[alive], seq, dseq, self.occupied, None if jitter is None else jitter[alive])
            if not len(local):
                continue
            ray = alive[local]
            sigma, geo = self._density_chunked(origins[ray] + t[:, None] * dirs[ray], with_features)
            tau = sigma.float() * dt
            inside = torch.log(transmittance(local, tau, len(alive)).clamp_min(1e-30))  # [S] within the segment
            keep = (inside + log_t[ray] > stop) & (tau > 0)
            parts.append((ray[keep], t[keep], dt[keep], sigma[keep], geo[keep] if geo is not None else None))
            log_t.index_add_(0, ray, -tau)
            alive = alive[log_t[alive] > stop]
        if not parts:
            empty = origins.new_zeros(0)
            return empty.long(), empty, empty, empty, origins.new_zeros(0, self.field.density_net[-1].out_features - 1) if with_features else None
        ray, t, dt, sigma = (torch.cat([p[i] for p in parts]) for i in range(4))
        geo = torch.cat([p[4] for p in parts]) if with_features else None
        if len(parts) > 1:  # segments come in distance order: a stable sort by ray packs each ray's samples in order
            order = torch.sort(ray, stable=True).indices
            ray, t, dt, sigma = ray[order], t[order], dt[order], sigma[order]
            geo = geo[order] if geo is not None else None
        return ray, t, dt, sigma, geo

    def _march_segment(self, device: torch.device) -> int:
        """Candidate steps per march segment when rendering: short ones only for unbounded scenes on a CPU."""
        return min(len(self.t_seq), MARCH_SEGMENT) if self.spec.unbounded and device.type == "cpu" else len(self.t_seq)

    def _density_chunked(self, x: Tensor, with_features: bool = False) -> tuple[Tensor, Tensor | None]:
        """Density [S] (and geometry features [S, G]) at world points, FIELD_CHUNK points at a time."""
        sigmas, feats = [], []
        for s in range(0, len(x), FIELD_CHUNK):
            sigma, geo = self.field.density_and_features(x[s : s + FIELD_CHUNK])
            sigmas.append(sigma)
            if with_features:
                feats.append(geo)
        if not sigmas:
            return x.new_zeros(0), x.new_zeros(0, self.field.density_net[-1].out_features - 1) if with_features else None
        return torch.cat(sigmas), torch.cat(feats) if with_features else None

    def _finish(self, out: dict[str, Tensor], n: int, device: torch.device, background: Tensor | None) -> dict[str, Tensor]:
        """Composite on the background and count the samples used."""
        bg = self.background(n, device) if background is None else background
        out["rgb"] = out["rgb"] + (1.0 - out["opacity"][:, None]) * bg
        out["samples"] = torch.tensor(len(out["weights"]))
        return out

    @torch.no_grad()
    def render(
        self, c2w: Tensor, fx: Any, fy: Any, cx: Any, cy: Any, width: int, height: int, chunk: int = 1 << 16,
        background: tuple[float, float, float] | None = None,
    ) -> dict[str, Tensor]:
        """Render B cameras (OpenGL c2w [B, 4, 4]; intrinsics scalars or [B]) at width x height.

        Eval mode, no gradients, bf16 autocast on CUDA, ``chunk`` rays at a time so memory stays bounded.
        Returns rgb [B, H, W, 3] in [0, 1], depth [B, H, W] (distance along the ray), opacity [B, H, W].
        """
        was_training = self.training
        self.eval()
        device = self.t_seq.device
        c2w = torch.as_tensor(c2w, dtype=torch.float32, device=device).reshape(-1, 4, 4)
        b = c2w.shape[0]
        k = [torch.as_tensor(v, dtype=torch.float32, device=device).expand(b) for v in (fx, fy, cx, cy)]
        v, u = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
        u, v = u.reshape(-1).float() + 0.5, v.reshape(-1).float() + 0.5
        outs: dict[str, list[Tensor]] = {"rgb": [], "depth": [], "opacity": []}
        bg = None if background is None else torch.tensor(background, device=device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        chunk = max(1, min(chunk, candidate_budget(device) // self._march_segment(device)))  # bounds the [rays, K, 3] candidates
        for i in range(b):
            for s in range(0, u.numel(), chunk):
                uu, vv = u[s : s + chunk], v[s : s + chunk]
                n = uu.numel()
                o, d = camera_rays(c2w[i].expand(n, 4, 4), *(kk[i].expand(n) for kk in k), uu, vv)
                with autocast:
                    out = self.render_rays(o, d, background=None if bg is None else bg.expand(n, 3))
                for key in outs:
                    outs[key].append(out[key].float())
        self.train(was_training)
        return {
            "rgb": torch.cat(outs["rgb"]).reshape(b, height, width, 3).clamp(0, 1),
            "depth": torch.cat(outs["depth"]).reshape(b, height, width),
            "opacity": torch.cat(outs["opacity"]).reshape(b, height, width),
        }

    # ---- files --------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Write ``teacher.safetensors`` (weights, grid) and ``teacher.json`` (the spec)."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / "teacher.safetensors"))
        (folder / "teacher.json").write_text(json.dumps({"schema": 1, "spec": asdict(self.spec)}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Teacher:
        """Load a saved teacher (a ``WS/teacher`` folder or a workspace)."""
        folder = Path(folder)
        if (folder / "teacher" / "teacher.json").is_file():
            folder = folder / "teacher"
        try:
            meta = json.loads((folder / "teacher.json").read_text())
            spec = meta["spec"]
            spec["background"] = None if spec["background"] is None else tuple(spec["background"])
            model = cls(ModelSpec(**spec))
        except FileNotFoundError:
            raise TeacherError(f"no trained teacher in {folder}", hint="run mg3d teacher WS first") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TeacherError(f"{folder / 'teacher.json'} is corrupt ({exc.__class__.__name__})", hint="retrain with mg3d teacher WS --force") from None
        model.load_state_dict(load_tensors(folder / "teacher.safetensors"))
        return model.to(device)


def load_tensors(path: Path) -> dict[str, Tensor]:
    """Read a safetensors file; any failure is a TeacherError (never a pickle traceback)."""
    from mg3d.checkpoint import load_tensors as load

    return load(path, TeacherError)
