"""How well can a surface texture alone draw a scene? The ceiling of the detail student's texture.

Three feature planes (xy, xz, yz), or a 3-D hash grid, and a small per-pixel decoder are fitted to a
teacher's renders, read where each pixel's ray meets the teacher's own surface: no student network, no
depth error. ``--teacher-point`` also scores the teacher's own field colour at that point, and
``--teacher-blend N`` counts the points the teacher blends per opaque pixel. The teacher renders ``--views``
test cameras; 3 of every 4 are fitted and the 4th scored, on the pixels the teacher draws opaque, against
its renders. With ``--pseudo WS/distill`` the fit is to the pseudo views the student
trains on (the teacher's renders and surface distances) and every rendered test view is scored. A plane
layout whose ceiling is near the student's own score limits the student; one far above it does not.

    python scripts/bench_texture_ceiling.py TEACHER_DIR WS/capture/transforms.json --views 24 --steps 3000 \
        --variant "r512c4:resolution=512,channels=4" --variant "r1024c4:resolution=1024,channels=4"
    python scripts/bench_texture_ceiling.py WS/teacher WS/capture/transforms.json --views 200 --pseudo WS/distill \
        --device cuda --batch 262144 --variant "r512c4:" --variant "r512c4v:view=1"

Variant keys: grid (planes, or hash: a 3-D multi-resolution hash grid, the teacher's encoding, with levels
and log2_size), resolution (cells per side; a hash grid's finest level), channels (per plane or hash level),
hidden (decoder width), layers (decoder hidden layers), box (cube: the student's [-radius, radius]^3;
tight: the box of the surface points, per axis), view (1: the decoder also sees the viewing direction),
vm (1: each plane's features times those of a line along the third axis, TensoRF's vector-matrix form: the
same read cost as planes plus two reads per line, and no two points that share a plane cell share features),
line_res (cells of those lines; 0: the planes' resolution), scales (planes at resolution, resolution/2, ...:
that many sets, their features concatenated, as K-planes' multi-scale planes), prod (1: the three planes'
features multiplied instead of concatenated, K-planes' Hadamard product: C features per point that depend
on all three coordinates, planes starting in [0.1, 0.5]), points (read at that many points along the
viewing ray around the surface, ``spread`` plane cells apart, their features concatenated: a shell instead
of one point).
Prints one JSON line per variant; the teacher's renders are cached in --cache.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

DEFAULTS = {"grid": "planes", "resolution": 512, "channels": 4, "hidden": 32, "layers": 1, "box": "cube", "view": 0, "levels": 16, "log2_size": 19, "vm": 0, "line_res": 0, "scales": 1, "prod": 0, "points": 1, "spread": 1}
WORDS = {"grid": ("planes", "hash"), "box": ("cube", "tight")}


def test_cameras(transforms: Path) -> tuple[np.ndarray, list[float], int, int]:
    """The test cameras of a capture's nerfstudio ``transforms.json`` (c2w [N, 4, 4]; fx, fy, cx, cy; w; h),
    read from the file alone (the images need not be there: this runs on a GPU machine without them)."""
    meta = json.loads(transforms.read_text())
    names = set(meta.get("test_filenames") or [])
    frames = [f for f in meta["frames"] if f["file_path"] in names] or meta["frames"]
    if any(k in f for f in frames for k in ("fl_x", "w")):
        raise SystemExit(f"{transforms} has per-frame intrinsics: this benchmark takes one camera model")
    c2w = np.asarray([f["transform_matrix"] for f in frames], np.float32)
    return c2w, [float(meta[k]) for k in ("fl_x", "fl_y", "cx", "cy")], int(meta["w"]), int(meta["h"])


def pixel_directions(fx: float, fy: float, cx: float, cy: float, w: int, h: int) -> np.ndarray:
    """Unit directions [H, W, 3] float32 through the pixel centres, camera space (OpenGL: looking down -z)."""
    v, u = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    d = np.stack([(u + 0.5 - cx) / fx, -(v + 0.5 - cy) / fy, -np.ones_like(u)], -1).astype(np.float32)
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def render_views(teacher_dir: Path, transforms: Path, views: int, cache: Path, device: torch.device) -> dict:
    """Teacher renders of ``views`` test cameras at the capture's size: rgb, surface points, opaque masks."""
    source = f"{teacher_dir.resolve()}|{transforms.resolve()}|{views}"
    if cache.is_file():
        data = dict(np.load(cache))
        if str(data.get("source", "")) == source:
            return data
        print(f"{cache} holds other renders: rendering again", flush=True)
    from mg3d.teacher.model import Teacher
    from mg3d.ui import progress

    cameras, (fx, fy, cx, cy), w, h = test_cameras(transforms)
    chosen = cameras[np.linspace(0, len(cameras) - 1, views).round().astype(int)]
    teacher = Teacher.load(teacher_dir, device)
    dirs = torch.from_numpy(pixel_directions(fx, fy, cx, cy, w, h)).to(device)
    rgbs, points, masks, origins = [], [], [], []
    with progress() as bar, torch.no_grad():
        task = bar.add_task("teacher renders", total=len(chosen))
        for pose in chosen:
            c2w = torch.from_numpy(pose).to(device)[None]
            out = teacher.render(c2w, fx, fy, cx, cy, w, h)
            surface, opaque = (t[0] for t in teacher.surface(out))
            rgbs.append(out["rgb"][0].float().cpu().numpy())
            points.append((c2w[0, :3, 3] + dirs @ c2w[0, :3, :3].T * surface[..., None]).cpu().numpy())
            masks.append(opaque.cpu().numpy())
            origins.append(pose[:3, 3])
            bar.advance(task)
    data = {"rgb": np.stack(rgbs), "points": np.stack(points), "mask": np.stack(masks), "origins": np.stack(origins), "bound": np.float32(teacher.spec.bound), "source": np.array(source)}
    np.savez(cache, **data)
    return data


class Texture(nn.Module):
    """Three feature planes over [-1, 1]^2 read bilinearly (border clamp), or a 3-D multi-resolution hash
    grid (the teacher's encoding: ``levels`` levels of ``channels`` features up to ``resolution`` cells,
    2^``log2_size`` entries each), decoded per point to rgb; with ``view`` the decoder also takes the viewing
    direction and sines of it (2 frequencies): 15 more inputs."""

    def __init__(self, options: dict) -> None:
        super().__init__()
        channels, hidden, layers, resolution = (options[k] for k in ("channels", "hidden", "layers", "resolution"))
        self.view = bool(options["view"])
        if options["grid"] == "hash":
            from mg3d.teacher.encoding import HashGrid

            self.hash = HashGrid(options["levels"], channels, options["log2_size"], 16, resolution)
            self.planes = nn.ParameterList([self.hash.table])
            width = self.hash.out_dim
        else:
            self.hash = None
            self.prod = bool(options["prod"])
            self.resolutions = [max(2, resolution >> i) for i in range(options["scales"])]
            low, high = (0.1, 0.5) if self.prod else (-1e-2, 1e-2)
            self.planes = nn.ParameterList([nn.Parameter(torch.empty(3, channels, r, r).uniform_(low, high)) for r in self.resolutions])
            width = len(self.resolutions) * channels * (1 if self.prod else 3)
        # vm: lines along z, y, x (the axes the xy, xz, yz planes lack), starting at 1: the planes alone
        self.line_res = options["line_res"] or resolution
        self.lines = nn.Parameter(torch.ones(3 * self.line_res, channels)) if options["vm"] and self.hash is None else None  # the student's layout
        self.points, self.spread = options["points"], options["spread"] * 2.0 / resolution  # read points, their spacing in [-1, 1] units
        width *= self.points
        dims = [width + (15 if self.view else 0)] + [hidden] * layers
        body: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.GELU(approximate="tanh")]
        self.decoder = nn.Sequential(*body, nn.Linear(dims[-1], 3))

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """x [N, 3] in [-1, 1]^3, unit viewing directions d [N, 3] -> rgb [N, 3]."""
        offsets = [(k - (self.points - 1) / 2) * self.spread for k in range(self.points)]  # [-1, 1] units along the ray
        reads = [self.features((x + d * o).clamp(-1, 1)) for o in offsets]
        return self.decode(torch.cat(reads, 1), d)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3] in [-1, 1]^3 -> the texture's features [N, width / points]."""
        if self.hash is not None:
            return self.hash((x + 1) / 2)
        uv = torch.stack([x[:, [0, 1]], x[:, [0, 2]], x[:, [1, 2]]])[:, :, None, :]  # [3, N, 1, 2]
        out = []
        for planes in self.planes:
            f = nn.functional.grid_sample(planes, uv, mode="bilinear", padding_mode="border", align_corners=True)[..., 0]  # [3, C, N]
            if self.lines is not None:  # the student's own line reads (mg3d.student.model)
                from mg3d.student.model import sampled_line_features

                f = f * sampled_line_features(x.T[None, :, None, :], self.lines, self.line_res, 1.0, len(x))[0]
            out.append((f[0] * f[1] * f[2]).T if self.prod else f.permute(2, 0, 1).reshape(len(x), -1))
        return torch.cat(out, 1)

    def decode(self, f: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if self.view:
            angles = torch.cat([d * math.pi, d * 2 * math.pi], 1)
            f = torch.cat([f, d, torch.sin(angles), torch.cos(angles)], 1)
        return torch.sigmoid(self.decoder(f))


def encode(points: np.ndarray, box: str, bound: float, train_points: np.ndarray) -> torch.Tensor:
    """Surface points [N, 3] -> plane coordinates in [-1, 1]^3: the student's contraction of p / radius
    (cube; surface points of a bounded scene lie inside, where it is the identity), or per axis over the
    box of the training views' surface points with a 2% margin (tight)."""
    p = torch.from_numpy(points).float()
    if box == "cube":
        return (p / bound).clamp(-1, 1)
    lo, hi = (torch.from_numpy(q).float() for q in (train_points.min(0), train_points.max(0)))
    centre, half = (lo + hi) / 2, (hi - lo) / 2 * 1.02
    return ((p - centre) / half).clamp(-1, 1)


def flatten(data: dict, views: np.ndarray) -> dict:
    """The opaque pixels of the given rendered views as flat arrays: points, rgb and unit viewing directions
    [N, 3] (directions need the cameras' origins, which caches made before they were stored lack)."""
    mask = data["mask"][views]
    points = data["points"][views][mask]
    out = {"points": points, "rgb": data["rgb"][views][mask], "fraction": float(mask.mean())}
    if "origins" in data:
        origin = np.broadcast_to(data["origins"][views][:, None, None, :], data["points"][views].shape)[mask]
        d = points - origin
        out["dirs"] = d / np.linalg.norm(d, axis=1, keepdims=True)
    return out


def pseudo_views(folder: Path, limit: int) -> dict:
    """The opaque pixels of a workspace's pseudo views (``WS/distill``: the teacher's renders and surface
    distances at the cameras the student trains on) as flat arrays, like :func:`flatten`."""
    from mg3d.student.distill import PseudoData

    data = PseudoData(folder)
    if not data.has_surfaces:
        raise SystemExit(f"the pseudo views in {folder} have no surface distances: redo them with mg3d distill WS --force")
    m = data.meta
    cam = pixel_directions(m["fx"], m["fy"], m["cx"], m["cy"], m["width"], m["height"])
    points, rgb, dirs = [], [], []
    for i in range(min(limit, len(data)) if limit else len(data)):
        surface = data.surface(np.array([i]))[0].astype(np.float32)
        opaque = surface > 0
        d = cam[opaque] @ data.cameras[i, :3, :3].T
        points.append(data.cameras[i, :3, 3] + d * surface[opaque][:, None])
        image = data.images(np.array([i]))[0][opaque]
        rgb.append(image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32))
        dirs.append(d)
    return {"points": np.concatenate(points), "rgb": np.concatenate(rgb), "dirs": np.concatenate(dirs), "views": len(points)}


def fit(train: dict, test: dict, bound: float, options: dict, steps: int, batch: int, seed: int, device: torch.device) -> dict:
    """Fit one texture to ``train`` and score it on ``test`` (flat arrays of :func:`flatten`)."""
    torch.manual_seed(seed)
    if options["view"] and "dirs" not in train:
        raise SystemExit("view=1 needs the cameras' origins, which this cache lacks: delete it (--cache) and render again")
    x_train = encode(train["points"], options["box"], bound, train["points"]).to(device)
    x_test = encode(test["points"], options["box"], bound, train["points"]).to(device)
    y_train, y_test = (torch.from_numpy(np.ascontiguousarray(a["rgb"])).float().to(device) for a in (train, test))
    d_train, d_test = (torch.from_numpy(np.ascontiguousarray(a["dirs"])).float().to(device) if "dirs" in a else torch.zeros(len(a["points"]), 3, device=device) for a in (train, test))
    model = Texture(options).to(device)
    optimizer = torch.optim.Adam([{"params": list(model.planes) + ([model.lines] if model.lines is not None else []), "lr": 1e-2}, {"params": model.decoder.parameters(), "lr": 1e-3}], eps=1e-15)
    t0 = time.perf_counter()
    for step in range(steps):
        for group, base in zip(optimizer.param_groups, (1e-2, 1e-3)):
            group["lr"] = base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(len(x_train), (batch,), device=device)
        loss = nn.functional.mse_loss(model(x_train[idx], d_train[idx]), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def psnr(x: torch.Tensor, d: torch.Tensor, y: torch.Tensor) -> float:
        chunk = 1 << 16
        with torch.no_grad():
            mse = torch.cat([(model(x[i : i + chunk], d[i : i + chunk]) - y[i : i + chunk]).square().mean(1) for i in range(0, len(x), chunk)]).mean()
        return float(-10 * torch.log10(mse))

    test_psnr = psnr(x_test, d_test, y_test)
    return {
        "options": options, "steps": steps, "fit_s": round(time.perf_counter() - t0, 1),
        "fit_pixels": len(x_train), "test_pixels": len(x_test),
        "train_psnr_opaque": round(psnr(x_train, d_train, y_train), 2), "test_psnr_opaque": round(test_psnr, 2),
        "test_psnr_image": round(test_psnr - 10 * math.log10(test["fraction"]), 2),  # the same error over whole images with an exact background
        "parameters": sum(p.numel() for p in model.parameters()),
    }


@torch.no_grad()
def teacher_point(teacher_dir: Path, test: dict, device: torch.device) -> dict:
    """The teacher's own field colour at each opaque pixel's surface point, seen along the pixel's ray, vs the
    teacher's volume-rendered pixel (flat arrays of :func:`flatten`): how far one point per pixel of the
    teacher's field is from what the teacher draws."""
    from mg3d.teacher.model import Teacher

    if "dirs" not in test:
        raise SystemExit("--teacher-point needs the cameras' origins, which this cache lacks: delete it (--cache) and render again")
    field = Teacher.load(teacher_dir, device).field
    chunk, errors = 1 << 16, []
    for i in range(0, len(test["points"]), chunk):
        x, d, y = (torch.from_numpy(np.ascontiguousarray(test[k][i : i + chunk])).float().to(device) for k in ("points", "dirs", "rgb"))
        errors.append((field(x, d)[1].float() - y).square().mean(1))
    mse = float(torch.cat(errors).mean())
    return {"test_pixels": len(test["points"]), "test_psnr_opaque": round(-10 * math.log10(mse), 2), "test_psnr_image": round(-10 * math.log10(mse * test["fraction"]), 2)}


@torch.no_grad()
def teacher_blend(teacher_dir: Path, transforms: Path, views: int, device: torch.device) -> dict:
    """How many points the teacher blends per pixel, over ``views`` test cameras: the visible samples it
    colours per opaque ray, and how many of them (heaviest first) carry 90% and 99% of the ray's weight. A
    student that is to redraw the teacher exactly reads about that many points of teacher-like capacity."""
    from mg3d.teacher.model import Teacher
    from mg3d.teacher.rendering import composite, ray_starts

    teacher = Teacher.load(teacher_dir, device).eval()
    cameras, (fx, fy, cx, cy), w, h = test_cameras(transforms)
    dirs = torch.from_numpy(pixel_directions(fx, fy, cx, cy, w, h)).to(device).reshape(-1, 3)
    n = len(dirs)
    counts: dict[str, list[torch.Tensor]] = {"visible": [], "carry90": [], "carry99": []}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for pose in cameras[np.linspace(0, len(cameras) - 1, views).round().astype(int)]:
        c2w = torch.from_numpy(pose).to(device)
        d = dirs @ c2w[:3, :3].T
        with autocast:
            ray, t, dt, sigma, rgb = teacher.march(c2w[:3, 3].expand(n, 3), d, color=True)
        out = composite(ray, sigma.float(), rgb.float(), t, dt, n)
        opaque = out["opacity"] > 0.5
        share = out["weights"] / out["opacity"][ray].clamp_min(1e-8)
        order = torch.argsort(ray.double() * 2 - share.double())  # by ray, heaviest first
        r, sh = ray[order], share[order]
        before = torch.cumsum(sh, 0) - sh
        before = before - before[ray_starts(r, n)[r]]  # the share of the heavier samples of the same ray
        for key, level in (("carry90", 0.9), ("carry99", 0.99)):
            counts[key].append(torch.bincount(r[before < level], minlength=n)[opaque].float())
        counts["visible"].append(torch.bincount(ray, minlength=n)[opaque].float())
    result: dict = {"views": views, "opaque_pixels": int(sum(len(c) for c in counts["visible"]))}
    for key, parts in counts.items():
        x = torch.cat(parts)
        result[key] = {"mean": round(float(x.mean()), 2), "median": float(x.median()), "p90": float(torch.quantile(x[:1 << 24], 0.9))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path, help="the teacher's folder (teacher.json + teacher.safetensors)")
    parser.add_argument("transforms", type=Path, help="the capture's transforms.json (its test cameras are used)")
    parser.add_argument("--views", type=int, default=24)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=1 << 16, help="pixels per step")
    parser.add_argument("--variant", action="append", default=[], help="TAG:KEY=VALUE,... (keys: " + ", ".join(DEFAULTS) + ")")
    parser.add_argument("--cache", type=Path, default=Path("texture_views.npz"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, help="also append each JSON line to this file")
    parser.add_argument("--pseudo", type=Path, help="fit a workspace's pseudo views (WS/distill) and score all the rendered test views")
    parser.add_argument("--pseudo-views", type=int, default=0, help="use the first N pseudo views (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-point", action="store_true", help="also score the teacher's own colour at the surface point (no fit)")
    parser.add_argument("--teacher-blend", type=int, default=0, metavar="N", help="also count the points the teacher blends per opaque pixel on N test cameras")
    opts = parser.parse_args()

    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    data = render_views(opts.teacher, opts.transforms, opts.views, opts.cache, device)
    every = np.arange(len(data["rgb"]))
    if opts.pseudo:  # fit the student's own pseudo views, score every rendered test view
        train = pseudo_views(opts.pseudo, opts.pseudo_views)
        test = flatten(data, every >= 0)
        split = {"fit_views": train["views"], "fit_on": "pseudo views", "test_views": len(every)}
    else:  # fit 3 of every 4 rendered test views, score the 4th
        train, test = flatten(data, every % 4 != 3), flatten(data, every % 4 == 3)
        split = {"fit_views": int((every % 4 != 3).sum()), "fit_on": "test views", "test_views": int((every % 4 == 3).sum())}

    def emit(tag: str, result: dict) -> None:  # one JSON line, printed and appended to --out
        line = json.dumps({"tag": tag, "device": str(device), **result})
        print(line, flush=True)
        if opts.out:
            with opts.out.open("a") as f:
                f.write(line + "\n")

    if opts.teacher_blend:
        emit("teacher_blend", teacher_blend(opts.teacher, opts.transforms, opts.teacher_blend, device))
    if opts.teacher_point:
        emit("teacher_point", teacher_point(opts.teacher, test, device))
    for item in opts.variant or ["base:"]:
        tag, _, sets = item.partition(":")
        options = dict(DEFAULTS)
        for pair in filter(None, sets.split(",")):
            key, value = pair.split("=", 1)
            if key not in DEFAULTS:
                raise SystemExit(f"unknown variant key {key!r}: use " + ", ".join(DEFAULTS))
            options[key] = value if key in WORDS else int(value)
        for key, words in WORDS.items():
            if options[key] not in words:
                raise SystemExit(f"{key} {options[key]!r} is unknown: use " + " or ".join(words))
        emit(tag, {**split, **fit(train, test, float(data["bound"]), options, opts.steps, opts.batch, opts.seed, device)})


if __name__ == "__main__":
    main()
