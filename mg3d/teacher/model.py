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
from mg3d.teacher.rendering import (
    EARLY_STOP, camera_rays, composite, distance_sequence, distortion, occupied_candidates, pack_samples, ray_aabb, ray_starts, transmittance,
)


#: Most candidate samples (rays x steps) materialised at once on the CPU; bounds memory in training and
#: rendering. A GPU takes 16 times more (about 3 GB of candidates), which keeps its kernels large.
CANDIDATE_BUDGET = 1 << 22

#: Renders with the compiled march keep only a mask per candidate (plus the occupied ones' samples): the
#: GPU budget is then this many candidates, or a 64th of the GPU's memory in candidates if that is less.
#: A 512 px view of an unbounded scene (2,050 steps per ray) is one chunk: a few dozen rounds of kernels
#: and synchronisations per view instead of hundreds.
COMPILED_BUDGET = 1 << 29


def candidate_budget(device: torch.device, compiled: bool = False) -> int:
    if device.type != "cuda":
        return CANDIDATE_BUDGET
    if compiled:
        return min(COMPILED_BUDGET, torch.cuda.get_device_properties(device).total_memory // 64)
    return CANDIDATE_BUDGET * 16


#: Most samples the field is evaluated on at once when rendering (bounds the hash grid's intermediates).
FIELD_CHUNK = 1 << 21

#: Most occupied candidates marched at once when rendering on a GPU (~40 bytes of bookkeeping each: ~5 GB).
#: A 512 px view of a trained unbounded scene has about 120M; a foggy field (an edit with random weights)
#: about 290M, marched in pieces of rays.
SAMPLE_BUDGET = 1 << 27

#: Rank boundaries (along each ray) of the occupied samples the field evaluates per march round; a ray
#: that is opaque after a round is not evaluated further.
MARCH_ROUNDS = (16, 32, 64, 128, 256, 512, 1024)


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
        self._candidates = self._occupied_candidates
        self.compiled = False

    def compile_kernels(self) -> None:
        """Fuse the hash encoding's and the march's elementwise work with ``torch.compile`` (the fast path on
        a GPU; the eager code is its reference, see tests/test_teacher_parity.py). Weights and outputs are
        unchanged."""
        encoding = self.field.encoding
        encoding.forward = torch.compile(type(encoding).forward.__get__(encoding), dynamic=True)
        self._candidates = torch.compile(self._occupied_candidates, dynamic=True)
        self.compiled = True

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

    def _occupied_candidates(self, origins: Tensor, dirs: Tensor, t_min: Tensor, t_max: Tensor, shift: Tensor) -> Tensor:
        return occupied_candidates(origins, dirs, t_min, t_max, self.t_seq, self.dt_seq, shift, self.occupied)

    # ---- rendering ----------------------------------------------------------------------------------
    def render_rays(
        self, origins: Tensor, dirs: Tensor, image: Tensor | None = None, background: Tensor | None = None,
        jitter: Tensor | None = None, max_samples: int = 0, with_distortion: bool = False,
    ) -> dict[str, Tensor]:
        """Render rays [R, 3] (unit directions). Returns rgb [R, 3], depth [R], opacity [R], samples (int).

        With gradients, at most ``max_samples`` samples are evaluated (0: no limit): rays past the budget
        get no samples and are marked False in ``used`` [R], so a loss should skip them; ``with_distortion``
        adds each ray's distortion loss [R] (see :func:`distortion`).
        """
        n = origins.shape[0]
        if not torch.is_grad_enabled():  # rendering: encode each sample once, colour only the visible ones
            ray, t, dt, sigma, rgb = self.march(origins, dirs, jitter, image=image, color=True)
            return self._finish(composite(ray, sigma, rgb, t, dt, n), n, origins.device, background)
        with torch.no_grad():  # the visible samples first, without gradients, before the (costly) pass with them
            ray, t, dt, _, _ = self.march(origins, dirs, jitter, rounds=False)
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
        if with_distortion:
            s, ds = self.step_coordinate(t)
            out["distortion"] = distortion(ray, out["weights"], s, ds, n)
        return out

    def step_coordinate(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Distances t [S] as a fraction of the march's steps, s in [0, 1), and each sample's width there
        ([S], one step): uniform near the cameras, logarithmic in t far out, as mip-NeRF 360 normalises
        distances for its distortion loss."""
        k = (torch.searchsorted(self.t_seq, t.contiguous(), right=True) - 1).clamp(0, len(self.t_seq) - 1)
        steps = len(self.t_seq)
        s = (k + ((t - self.t_seq[k]) / self.dt_seq[k]).clamp(0, 1)) / steps
        return s, torch.full_like(t, 1.0 / steps)

    @torch.no_grad()
    def march(
        self, origins: Tensor, dirs: Tensor, jitter: Tensor | None = None, image: Tensor | None = None, color: bool = False,
        rounds: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """The visible samples of rays [R, 3]: ray index [S] (sorted), t [S], dt [S], density [S] and, with
        ``color``, their colour [S, 3] (seen from ``dirs``, with the appearance of ``image`` [R] if given).

        Visible means in an occupied cell, not empty, and with transmittance above ``EARLY_STOP`` before it.
        The occupied candidates of every ray are packed first (grid lookups only); the field then sees them
        in rounds by their rank along the ray (``MARCH_ROUNDS``), and a ray that is opaque after a round
        is not evaluated further. The samples are exactly those of one pass over all candidates, but the
        density of hidden ones (behind an opaque surface: most of an unbounded scene's) is never computed,
        and a handful of rounds keeps the kernels large and the synchronisations few. Training batches
        (``rounds`` False) take one round: a few thousand rays, where each round's synchronisation costs
        more than it saves (woman-512 on an H100: 10,000 steps in 296 s with rounds, 219 s without).
        """
        t_min, t_max = self.ray_bounds(origins, dirs)
        shift = jitter if jitter is not None else torch.full_like(t_min, 0.5)
        keep = self._candidates(origins, dirs, t_min, t_max, shift)  # [R, K]
        if keep.numel() <= SAMPLE_BUDGET:
            return self._march_packed(keep, shift, origins, dirs, image, color, rounds)
        # at most SAMPLE_BUDGET occupied candidates at a time (their bookkeeping takes ~40 bytes each): the
        # rays go in consecutive pieces, so the pieces' samples stay sorted by ray
        ends = torch.cumsum(keep.sum(1), 0).cpu()
        pieces, start = [], 0
        while start < len(ends):
            base = int(ends[start - 1]) if start else 0
            stop = max(start + 1, int(torch.searchsorted(ends, torch.tensor(base + SAMPLE_BUDGET), right=True)))
            rows = slice(start, stop)
            out = self._march_packed(keep[rows], shift[rows], origins[rows], dirs[rows], None if image is None else image[rows], color, rounds)
            pieces.append((out[0] + start, *out[1:]))
            start = stop
        if len(pieces) == 1:
            return pieces[0]
        return (*(torch.cat([p[i] for p in pieces]) for i in range(4)), torch.cat([p[4] for p in pieces]) if color else None)  # type: ignore[return-value]

    def _march_packed(
        self, keep: Tensor, shift: Tensor, origins: Tensor, dirs: Tensor, image: Tensor | None, color: bool, rounds: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """:meth:`march` from the candidate mask keep [R, K] on: pack, evaluate in rounds, keep the visible."""
        n, device = origins.shape[0], origins.device
        ray, t, dt = pack_samples(keep, shift, self.t_seq, self.dt_seq)
        rank = torch.arange(len(ray), device=device) - ray_starts(ray, n)[ray]  # [S] along its ray
        log_t = torch.zeros(n, device=device)  # log transmittance in front of the current round
        stop = math.log(EARLY_STOP)
        parts: list[tuple[Tensor, ...]] = []
        bounds = MARCH_ROUNDS if rounds else ()
        for lo, hi in zip((0,) + bounds, bounds + (len(self.t_seq),)):
            pick = ((rank >= lo) & (rank < hi) & (log_t[ray] > stop)).nonzero().squeeze(-1)
            if not len(pick):
                break  # ranks past this round exist only on rays that had samples in it
            r = ray[pick]
            sigma, geo = self._field_chunked(origins[r] + t[pick, None] * dirs[r], color)
            tau = sigma.float() * dt[pick]
            inside = torch.log(transmittance(r, tau, n).clamp_min(1e-30))  # [P] within the round
            keep = ((inside + log_t[r] > stop) & (tau > 0)).nonzero().squeeze(-1)
            rk = r[keep]
            rgb = self._field_chunked(geo[keep], color=True, dirs=dirs[rk], image=None if image is None else image[rk])[0] if color else None
            parts.append((rk, t[pick[keep]], dt[pick[keep]], sigma[keep], rgb))
            log_t.index_add_(0, r, -tau)
        if not parts:
            empty = origins.new_zeros(0)
            return empty.long(), empty, empty, empty, origins.new_zeros(0, 3) if color else None
        ray, t, dt, sigma = (torch.cat([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(4))
        rgb = (torch.cat([p[4] for p in parts]) if len(parts) > 1 else parts[0][4]) if color else None
        if len(parts) > 1:  # rounds come in rank order: a stable sort by ray packs each ray's samples in order
            order = torch.sort(ray, stable=True).indices
            ray, t, dt, sigma = ray[order], t[order], dt[order], sigma[order]
            rgb = rgb[order] if rgb is not None else None
        return ray, t, dt, sigma, rgb

    def _field_chunked(
        self, x: Tensor, features: bool = False, color: bool = False, dirs: Tensor | None = None, image: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``FIELD_CHUNK`` rows at a time, written into preallocated outputs: density [N] (and geometry
        features [N, G] with ``features``) at world points x [N, 3]; or, with ``color``, colour [N, 3] of
        geometry features x [N, G] seen from ``dirs`` [N, 3] (returned first)."""
        def one(s: slice) -> tuple[Tensor, Tensor | None]:
            if color:
                return self.field.color(x[s], dirs[s], None if image is None else image[s]), None
            sigma, geo = self.field.density_and_features(x[s])
            return sigma, geo if features else None
        if len(x) <= FIELD_CHUNK:
            if len(x):
                return one(slice(None))
            g = self.field.density_net[-1].out_features - 1
            return (x.new_zeros(0, 3), None) if color else (x.new_zeros(0), x.new_zeros(0, g) if features else None)
        first: Tensor | None = None
        second: Tensor | None = None
        for s in range(0, len(x), FIELD_CHUNK):
            a, b = one(slice(s, s + FIELD_CHUNK))
            if first is None:
                first = a.new_empty((len(x), *a.shape[1:]))
                second = b.new_empty((len(x), *b.shape[1:])) if b is not None else None
            first[s : s + len(a)] = a
            if b is not None:
                second[s : s + len(b)] = b
        return first, second

    def _finish(self, out: dict[str, Tensor], n: int, device: torch.device, background: Tensor | None) -> dict[str, Tensor]:
        """Composite on the background and count the samples used."""
        bg = self.background(n, device) if background is None else background
        out["rgb"] = out["rgb"] + (1.0 - out["opacity"][:, None]) * bg
        out["samples"] = torch.tensor(len(out["weights"]))
        return out

    @torch.no_grad()
    def render(
        self, c2w: Tensor, fx: Any, fy: Any, cx: Any, cy: Any, width: int, height: int, chunk: int = 1 << 20,
        background: tuple[float, float, float] | None = None,
    ) -> dict[str, Tensor]:
        """Render B cameras (OpenGL c2w [B, 4, 4]; intrinsics scalars or [B]) at width x height.

        Eval mode, no gradients, bf16 autocast on CUDA. The rays of all cameras are rendered ``chunk`` at a
        time, fewer where the candidate budget says so, so that memory stays bounded.
        Returns rgb [B, H, W, 3] in [0, 1], depth [B, H, W] (distance along the ray), opacity [B, H, W].
        """
        was_training = self.training
        self.eval()
        device = self.t_seq.device
        c2w = torch.as_tensor(c2w, dtype=torch.float32, device=device).reshape(-1, 4, 4)
        b, pixels = c2w.shape[0], height * width
        k = [torch.as_tensor(v, dtype=torch.float32, device=device).expand(b) for v in (fx, fy, cx, cy)]
        v, u = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
        u, v = u.reshape(-1).float() + 0.5, v.reshape(-1).float() + 0.5
        outs: dict[str, list[Tensor]] = {"rgb": [], "depth": [], "opacity": []}
        bg = None if background is None else torch.tensor(background, device=device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        chunk = max(1, min(chunk, candidate_budget(device, self.compiled) // len(self.t_seq)))  # bounds the candidates
        for s in range(0, b * pixels, chunk):
            ids = torch.arange(s, min(s + chunk, b * pixels), device=device)
            cam, pix = ids // pixels, ids % pixels
            o, d = camera_rays(c2w[cam], *(kk[cam] for kk in k), u[pix], v[pix])
            with autocast:
                out = self.render_rays(o, d, background=None if bg is None else bg.expand(len(ids), 3))
            for key in outs:
                outs[key].append(out[key].float())
        self.train(was_training)
        return {
            "rgb": torch.cat(outs["rgb"]).reshape(b, height, width, 3).clamp(0, 1),
            "depth": torch.cat(outs["depth"]).reshape(b, height, width),
            "opacity": torch.cat(outs["opacity"]).reshape(b, height, width),
        }

    @staticmethod
    def surface(out: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The surface in a :meth:`render` result: the distance along each pixel's ray (the weights' mean
        distance, depth / opacity, opacity floored at 0.5; 0 where not opaque) and where the pixel is opaque
        (opacity over 0.5), both [B, H, W]. The student's pseudo data stores these distances."""
        opacity = out["opacity"].float()
        opaque = opacity > 0.5
        return torch.where(opaque, out["depth"].float() / opacity.clamp(min=0.5), 0.0), opaque

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
