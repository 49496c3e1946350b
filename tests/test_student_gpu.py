"""The student's GPU form (mg3d.student.gpu): the residual stack as one Triton kernel, checked on the CPU with
Triton's interpreter (a subprocess: TRITON_INTERPRET must be set before Triton compiles the kernel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

CHECK = r"""
import json, sys
import numpy as np
import torch
from mg3d.student.model import NeLF, StudentSpec, plane_features
from mg3d.student.gpu import FusedBlocks, gpu_form, plane_reads
from mg3d.student.synthetic import sphere_occupancy

def student(**changes):
    # a 9x9 ray grid: 81 rows, not a multiple of the kernel's row tiles (the last tile is masked)
    spec = StudentSpec(**{**dict(width_px=36, height_px=36, fx=45, fy=45, cx=18, cy=18, near=1.5, far=4.5, depth=3, width=32, sr_factor=4,
                         detail=4, detail_resolution=16, occupancy=16, march_box=True, march_steps=16, head_layers=1, head_width=8), **changes})
    torch.manual_seed(0)
    model = NeLF(spec)
    model.detail.set_occupancy(torch.from_numpy(sphere_occupancy(((np.zeros(3), 0.5),), 16)))
    for name, p in model.named_parameters():  # weights that make every block and texel matter
        p.data.normal_(0, 0.15 if "blocks" in name else 1.0 if "planes" in name or "coarse" in name else 0.3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
    return model.eval()

c2w = torch.eye(4)[None]
c2w[0, :3, 3] = torch.tensor([0.3, 0.2, 3.0])
out = {}
with torch.no_grad():
    forms = {"concat": {}, "product": dict(detail_product=True, detail_scales=2, detail_points=3, detail_coarse_once=True, detail_view=1)}
    for name, changes in forms.items():
        model = student(**changes)
        ref = model(c2w)
        out[f"ref_std_{name}"] = float(ref.std())
        out[f"err_plain_{name}"] = float((gpu_form(model, fuse=False)(c2w).float() - ref).abs().max())
        for config in ((32, 64, 4), (16, 16, 4)):
            fused = gpu_form(model, config=config)
            out[f"kernels_{name}_{config[0]}"] = fused.kernels
            out[f"is_fused_{name}_{config[0]}"] = isinstance(fused.blocks, FusedBlocks) and fused.detail.read_planes is not None
            image = fused(c2w)
            out[f"err_{name}_{config[0]}"] = float((image.float() - ref).abs().max())
            out[f"dtype_{name}_{config[0]}"] = str(image.dtype)
    stem = model.stem(model.encode(c2w))
    blocks = gpu_form(model).blocks(stem.half())  # the stack alone, a plain (not channels-last) input
    out["err_blocks"] = float((blocks.float() - model.blocks(stem)).abs().max() / model.blocks(stem).abs().max())
    # the reads alone: points inside, on the border, and outside the planes (border padding); 2 cameras, 300 points
    points = torch.cat([torch.rand(2, 3, 1, 290) * 2.4 - 1.2, torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 1, 10)], 3)
    planes = torch.randn(3 * 16 * 16, 4)
    for product in (True, False):
        f = plane_features(points, planes, 16, 1.0, 1, 300)  # [B, 3, 1, C, P]
        expected = f[:, 0, 0] * f[:, 1, 0] * f[:, 2, 0] if product else f.reshape(2, 12, 300)
        got = plane_reads(points, planes, 16, 1.0, product, block=64)
        out[f"reads_{product}"] = [list(got.shape), float((got - expected).abs().max())]
    out["kernels_fp32"] = gpu_form(model, dtype=torch.float32).kernels
    out["kernels_width"] = gpu_form(student(width=24)).kernels
    out["kernels_gelu"] = gpu_form(student(activation="gelu")).kernels
    out["kernels_lines"] = gpu_form(student(detail_lines=True)).kernels
    out["kernels_channels"] = gpu_form(student(detail=3)).kernels
    out["kernels_unasked"] = gpu_form(model, fuse=False).kernels
json.dump(out, sys.stdout)
"""


def test_gpu_kernels_draw_the_students_image_in_tritons_interpreter() -> None:
    """The residual stack as one kernel (rows in tiles, the last one masked; hidden channels in chunks, each
    multiplied into the second convolution at once) and the texture's plane reads as one (border padding,
    the planes multiplied or concatenated) draw the fp32 student's image as the unfused fp16 form does, in
    two tile and chunk sizes, for the plain texture and the multi-scale product read at several points; and
    the students they cannot run keep their layers and say why."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    for name in ("concat", "product"):
        assert out[f"ref_std_{name}"] > 0.05  # an image with content, not a flat one
        assert out[f"err_plain_{name}"] < 2.5e-2  # fp16 weights and activations (unit-scale texels: errors of 1-2%)
        for tile in (32, 16):
            assert out[f"kernels_{name}_{tile}"] == {"blocks": "fused", "texture": "fused"} and out[f"is_fused_{name}_{tile}"]
            assert out[f"dtype_{name}_{tile}"] == "torch.float16"
            assert out[f"err_{name}_{tile}"] <= 1.1 * out[f"err_plain_{name}"] + 1e-3, out  # as close as the unfused fp16 form
    assert out["err_blocks"] < 5e-3, out  # relative to the stack's output
    assert out["reads_True"][0] == [2, 4, 300] and out["reads_True"][1] < 1e-5
    assert out["reads_False"][0] == [2, 12, 300] and out["reads_False"][1] < 1e-5
    assert "float32" in out["kernels_fp32"]["blocks"] and out["kernels_fp32"]["texture"] == "fused"
    assert "width 24" in out["kernels_width"]["blocks"]
    assert "gelu" in out["kernels_gelu"]["blocks"]
    assert "lines" in out["kernels_lines"]["texture"] and out["kernels_lines"]["blocks"] == "fused"
    assert "3 texture channels" in out["kernels_channels"]["texture"]
    assert out["kernels_unasked"] == {"blocks": "not asked", "texture": "not asked"}


def test_gpu_form_on_a_cpu_keeps_its_layers_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from mg3d.student import gpu
    from mg3d.student.gpu import gpu_form
    from mg3d.student.model import NeLF, StudentSpec

    monkeypatch.setattr(gpu, "_interpreted", lambda: False)  # a plain CPU, even where TRITON_INTERPRET is set
    spec = StudentSpec(width_px=32, height_px=32, fx=40, fy=40, cx=16, cy=16, near=1.5, far=4.5, depth=2, width=16, sr_factor=4)
    torch.manual_seed(0)
    model = NeLF(spec).eval()
    form = gpu_form(model)
    assert isinstance(form.blocks, torch.nn.Sequential)
    assert all("not a CUDA GPU" in why or "Triton is not installed" in why for why in form.kernels.values())
    assert all(p.dtype == torch.float16 for p in form.parameters())
    c2w = torch.eye(4)[None]
    c2w[0, 2, 3] = 3.0
    with torch.no_grad():
        np.testing.assert_allclose(form(c2w).float().numpy(), model(c2w).numpy(), atol=1e-2)
