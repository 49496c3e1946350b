"""Where a student's error lies on held-out views with an alpha channel (synthetic scenes such as lego): the
share of the squared error and the PSNR in the background, in a band of +-2 px around the silhouette, in the
interior, and in the interior's 20% of pixels with the strongest image gradient (part edges, fine texture).

    python scripts/bench_student_errors.py WS/student WS/capture/transforms.json --every 20 [--teacher WS/teacher]

With ``--teacher`` the teacher is scored the same way on the same views (its own breakdown, for comparison),
and a detail student also with its planes read at the teacher's surface instead of its own depth.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path, help="a student folder (student.safetensors + student.json) or a workspace")
    parser.add_argument("transforms", type=Path, help="the capture's transforms.json (its test split is scored)")
    parser.add_argument("--every", type=int, default=20, help="score every n-th test view")
    parser.add_argument("--teacher", type=Path, help="also score this teacher folder the same way")
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()

    import torch

    from mg3d.formats.nerfstudio import load_nerfstudio
    from mg3d.student.model import NeLF

    torch.set_num_threads(opts.threads)
    model = NeLF.load(opts.student).eval()
    scene = load_nerfstudio(opts.transforms)
    split = next(s for s in ("test", "val") if len(scene.splits.get(s, [])))
    views = scene.splits[split][:: opts.every]
    renderers = {"student": lambda c2w: model(c2w[None])[0].permute(1, 2, 0)}
    if opts.teacher:
        from mg3d.teacher.model import Teacher

        teacher = Teacher.load(opts.teacher, torch.device("cpu"))
        s, renders = model.spec, {}

        def render_teacher(c2w: torch.Tensor) -> dict:
            """The teacher's render of a camera, kept: its colours are scored and its surface is read."""
            key = c2w.numpy().tobytes()
            if key not in renders:
                out = teacher.render(c2w[None], s.fx, s.fy, s.cx, s.cy, s.width_px, s.height_px)
                renders[key] = {"rgb": out["rgb"][0], "surface": teacher.surface(out)}
            return renders[key]

        renderers["teacher"] = lambda c2w: render_teacher(c2w)["rgb"]
        if model.spec.detail:  # the detail planes read at the teacher's surface: what the student's own depth costs
            errors = []
            renderers["student_at_teacher_depth"] = lambda c2w: model(c2w[None], surface=teacher_surface(render_teacher(c2w)["surface"], model, c2w, errors))[0].permute(1, 2, 0)
    result = {"views": len(views)}
    for name, render in renderers.items():
        result[name] = breakdown(scene, views, render)
    if "student_at_teacher_depth" in renderers:
        gaps = torch.cat(errors)
        result["depth_error"] = {"median": round(float(gaps.median()), 4), "p90": round(float(gaps.quantile(0.9)), 4), "pixel_at_far": round(model.spec.far / model.spec.fx, 4)}
    print(json.dumps(result))


def teacher_surface(surface: tuple, model, c2w, errors: list):
    """Distances [1, 1, H, W] along each pixel's ray: the teacher's surface (``Teacher.surface`` of its render)
    where it is opaque, as the pseudo data stores it, the student's own depth elsewhere. Appends |student depth
    - teacher's| there to ``errors``."""
    import torch

    distance, opaque = (t[0] for t in surface)
    _, depth = model(c2w[None], with_depth=True)
    errors.append((depth[0, 0] - distance)[opaque].abs().flatten()[::16])  # every 16th pixel: quantile() has a size limit
    return torch.where(opaque, distance, depth[0, 0])[None, None]


def breakdown(scene, views, render) -> dict:
    """Error shares and PSNRs of ``render`` (c2w [4, 4] -> rgb [H, W, 3]) by region over ``views``."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from mg3d.student.evaluate import truth_at

    sums = {k: [0.0, 0] for k in ("background", "silhouette", "interior", "interior_gradient")}
    grow = lambda m, k: F.max_pool2d(m[None, None].float(), 2 * k + 1, 1, k)[0, 0] > 0  # noqa: E731
    for i in views:
        rgba = scene.image(i)
        if rgba.shape[-1] != 4:
            raise SystemExit(f"{scene.image_paths[i]} has no alpha channel: this benchmark needs a synthetic scene's RGBA views")
        with torch.no_grad():
            pred = render(torch.from_numpy(scene.c2w[i].astype(np.float32))).float()
        h, w = pred.shape[:2]
        truth = torch.from_numpy(truth_at(scene, i, w, h))  # composited as the evaluation does
        alpha = torch.from_numpy(np.asarray(Image.fromarray(rgba[..., 3]).resize((w, h))) / 255.0)
        error = ((pred - truth) ** 2).mean(-1)
        fg = alpha > 0.5
        band = grow(fg, 2) & grow(~fg, 2)  # within 2 px of both sides of the silhouette
        inside = fg & ~band
        gray = truth.mean(-1)
        gradient = torch.zeros_like(gray)
        gradient[:-1, :] += (gray[1:, :] - gray[:-1, :]).abs()
        gradient[:, :-1] += (gray[:, 1:] - gray[:, :-1]).abs()
        strong = inside & (gradient >= torch.quantile(gradient[inside], 0.8))
        for key, mask in (("background", ~fg & ~band), ("silhouette", band), ("interior", inside), ("interior_gradient", strong)):
            sums[key][0] += float(error[mask].sum())
            sums[key][1] += int(mask.sum())
    total = sum(sums[k][0] for k in ("background", "silhouette", "interior"))
    pixels = sum(sums[k][1] for k in ("background", "silhouette", "interior"))
    result = {"psnr_pooled": round(-10 * np.log10(total / pixels), 2)}
    for key, (sse, n) in sums.items():
        result[key] = {"pixels": round(n / pixels, 4), "error_share": round(sse / total, 3), "psnr": round(-10 * np.log10(max(sse / max(n, 1), 1e-12)), 2)}
    return result


if __name__ == "__main__":
    main()
