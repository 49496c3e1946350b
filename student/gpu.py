"""The student as it renders on a CUDA GPU: BatchNorm folded, fp16, channels-last, its residual stack and its
texture reads as Triton kernels, the whole frame captured into one CUDA graph.

On an H200 the lego student (28 blocks of width 256 on a 50x50 ray grid, 400x400 output, the 3-scale product
texture read at 3 points) took 1.03-1.15 ms a frame compiled in inductor's reduce-overhead mode, 0.85 ms of it
in kernels (BENCHMARKS.md). Three parts of that frame are done differently here:

- the texture reads (:func:`plane_reads`): inductor's ``grid_sample`` gives each channel of each corner its
  own thread and load, 0.21 ms for the five plane sets of a frame; one kernel that loads a corner's C
  channels as one vector, and multiplies or concatenates the three planes in place, takes 0.03 ms;
- the residual stack (:class:`FusedBlocks`): 56 matrix products of 2,500 x 256 x 256 and as many
  element-wise kernels for bias, GELU and residual add become one kernel. Each program keeps a tile of
  ray-grid rows in registers through every block, in fp32, and reads the weights (3.7 MB in fp16, held in
  L2) chunk by chunk. A block's hidden layer is never stored: each chunk of ``BK`` hidden channels,
  ``h = gelu(x W1[:, k] + b1[k])``, is multiplied at once into the rows ``W2[k, :]`` and summed,
  ``x += sum_k h_k W2[k, :] + b2`` (the same sum, in another order). With 4 warps a program the kernel
  takes as long as the 112 it replaces (0.30 ms); with 8 (:data:`DEFAULT_CONFIG`) the frame is 0.10 ms
  shorter;
- the launch (:func:`graphed`): inductor's reduce-overhead mode spends 0.1-0.2 ms of Python per frame on
  guards and graph trees; a compiled frame captured once into a CUDA graph replays with one launch.

Together: 0.64-0.73 ms a frame for the trained lego student, 23-29x its teacher (BENCHMARKS.md).

Triton is an optional dependency (``pip install mg3d[cuda]``; torch's CUDA wheels bring it). Without it, on a
CPU, or for a student a kernel does not cover, :func:`gpu_form` keeps those layers as they are and says why
in ``form.kernels``. ``TRITON_INTERPRET=1`` (set before the first import of this module) runs the kernels
on the CPU in Triton's interpreter: how the tests check them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mg3d.student.model import NeLF, TanhGELU, fold_batchnorm

#: the stack's kernel: rows (ray-grid pixels) per program, hidden channels per chunk, warps per program. On
#: the lego frame (2,500 rows) on an H200: 0.66 ms a frame against 0.76 for (32, 64, 4), 0.85 for (16, 64, 4),
#: 1.00 for (64, 64, 4), 0.74-1.12 for five others with 8 or 16 warps; chunks of 128 need more shared memory
#: than it has (scripts/bench_frame.py gpu --fused-config, BENCHMARKS.md)
DEFAULT_CONFIG = (32, 64, 8)


try:  # optional: the kernel below exists only with Triton installed
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _gelu_tanh(x):  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) = x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))
        return x * tl.sigmoid(x * (1.5957691216057308 + 0.07135481627159958 * x * x))

    @triton.jit
    def _stack(x_ptr, out_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, rows, DEPTH: tl.constexpr, WIDTH: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
        # x [rows, WIDTH]; w1, w2 [DEPTH, WIDTH in, WIDTH out] (the convolutions' weights transposed); b1, b2 [DEPTH, WIDTH]
        r = tl.program_id(0) * BM + tl.arange(0, BM)
        c = tl.arange(0, WIDTH)
        k = tl.arange(0, BK)
        inside = r[:, None] < rows
        x = tl.load(x_ptr + r[:, None] * WIDTH + c[None, :], mask=inside, other=0.0).to(tl.float32)
        for layer in range(DEPTH):
            w1_layer, w2_layer = w1_ptr + layer * WIDTH * WIDTH, w2_ptr + layer * WIDTH * WIDTH
            xin = x.to(w1_ptr.dtype.element_ty)
            acc = tl.zeros((BM, WIDTH), dtype=tl.float32)
            for k0 in range(0, WIDTH, BK):
                w1 = tl.load(w1_layer + c[:, None] * WIDTH + (k0 + k)[None, :])  # [WIDTH, BK]
                h = tl.dot(xin, w1) + tl.load(b1_ptr + layer * WIDTH + k0 + k).to(tl.float32)[None, :]
                w2 = tl.load(w2_layer + (k0 + k)[:, None] * WIDTH + c[None, :])  # [BK, WIDTH]
                acc += tl.dot(_gelu_tanh(h).to(w2_ptr.dtype.element_ty), w2)
            x = x + acc + tl.load(b2_ptr + layer * WIDTH + c).to(tl.float32)[None, :]
        tl.store(out_ptr + r[:, None] * WIDTH + c[None, :], x.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _bilinear(planes_ptr, u, v, inside, PLANE: tl.constexpr, R: tl.constexpr, C: tl.constexpr, EXTENT: tl.constexpr):
        # plane PLANE of planes [3 R R, C] at (u, v) [BLOCK] (encoded coordinates): [BLOCK, C] in fp32, as
        # grid_sample with align_corners and border padding (the student's plane_features)
        gu = (tl.minimum(tl.maximum(u, -EXTENT), EXTENT) / EXTENT * 0.5 + 0.5) * (R - 1)
        gv = (tl.minimum(tl.maximum(v, -EXTENT), EXTENT) / EXTENT * 0.5 + 0.5) * (R - 1)
        cu = tl.minimum(tl.floor(gu), R - 2)
        cv = tl.minimum(tl.floor(gv), R - 2)
        fu = (gu - cu)[:, None]
        fv = (gv - cv)[:, None]
        c = tl.arange(0, C)
        row = planes_ptr + (PLANE * R * R + cv.to(tl.int32) * R + cu.to(tl.int32))[:, None] * C + c[None, :]  # C channels: one vector load
        mask = inside[:, None]
        top = tl.load(row, mask=mask, other=0.0).to(tl.float32) * (1 - fu) + tl.load(row + C, mask=mask, other=0.0).to(tl.float32) * fu
        bottom = tl.load(row + R * C, mask=mask, other=0.0).to(tl.float32) * (1 - fu) + tl.load(row + (R + 1) * C, mask=mask, other=0.0).to(tl.float32) * fu
        return top * (1 - fv) + bottom * fv

    @triton.jit
    def _planes(x_ptr, planes_ptr, out_ptr, n, R: tl.constexpr, C: tl.constexpr, EXTENT: tl.constexpr, PRODUCT: tl.constexpr, BLOCK: tl.constexpr):
        # points x [B, 3, n] fp32 -> the xy, xz and yz planes' reads, multiplied [B, C, n] or concatenated [B, 3 C, n]
        b = tl.program_id(1)
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = p < n
        x = tl.load(x_ptr + b * 3 * n + p, mask=inside, other=0.0)
        y = tl.load(x_ptr + b * 3 * n + n + p, mask=inside, other=0.0)
        z = tl.load(x_ptr + b * 3 * n + 2 * n + p, mask=inside, other=0.0)
        xy = _bilinear(planes_ptr, x, y, inside, 0, R, C, EXTENT)
        xz = _bilinear(planes_ptr, x, z, inside, 1, R, C, EXTENT)
        yz = _bilinear(planes_ptr, y, z, inside, 2, R, C, EXTENT)
        c = tl.arange(0, C)[None, :]
        mask = inside[:, None]
        dtype = out_ptr.dtype.element_ty
        if PRODUCT:
            tl.store(out_ptr + (b * C + c) * n + p[:, None], (xy * xz * yz).to(dtype), mask=mask)
        else:
            tl.store(out_ptr + (b * 3 * C + c) * n + p[:, None], xy.to(dtype), mask=mask)
            tl.store(out_ptr + (b * 3 * C + C + c) * n + p[:, None], xz.to(dtype), mask=mask)
            tl.store(out_ptr + (b * 3 * C + 2 * C + c) * n + p[:, None], yz.to(dtype), mask=mask)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class FusedBlocks(nn.Module):
    """The residual blocks of a folded student (``x + conv2(gelu(conv1(x)))`` each) as one Triton kernel.
    Inference only (no backward); fp16 or bf16 weights; the input any layout of [B, C, H, W]."""

    def __init__(self, blocks: nn.Sequential, config: tuple[int, int, int] = DEFAULT_CONFIG) -> None:
        super().__init__()
        weight = lambda conv: conv.weight.detach()[:, :, 0, 0].t()  # noqa: E731 - [in, out]
        self.w1 = nn.Parameter(torch.stack([weight(b.conv1) for b in blocks]).contiguous(), requires_grad=False)
        self.w2 = nn.Parameter(torch.stack([weight(b.conv2) for b in blocks]).contiguous(), requires_grad=False)
        self.b1 = nn.Parameter(torch.stack([b.conv1.bias.detach() for b in blocks]).contiguous(), requires_grad=False)
        self.b2 = nn.Parameter(torch.stack([b.conv2.bias.detach() for b in blocks]).contiguous(), requires_grad=False)
        self.config = config

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c).contiguous()  # no copy when x is channels-last
        out = torch.empty_like(rows)
        bm, bk, warps = self.config
        n = rows.shape[0]
        _stack[((n + bm - 1) // bm,)](rows, out, self.w1, self.b1, self.w2, self.b2, n, DEPTH=self.w1.shape[0], WIDTH=c, BM=bm, BK=min(bk, c), num_warps=warps)
        return out.view(b, h, w, c).permute(0, 3, 1, 2)  # channels-last


def plane_reads(points: Tensor, planes: Tensor, resolution: int, extent: float, product: bool, block: int = 128) -> Tensor:
    """The surface texture's three planes read at points [B, 3, 1, P] (encoded coordinates, fp32) in one
    Triton kernel: their product [B, C, P] or the three concatenated [B, 3 C, P], in the planes' dtype.
    The same bilinear reads as :func:`mg3d.student.model.plane_features`, but each corner's C channels come
    in one vector load: inductor's ``grid_sample`` reads them one channel per thread, which made the finest
    planes' read at three points 0.11 ms of a lego frame on an H200 (BENCHMARKS.md)."""
    b, _, _, n = points.shape
    c = planes.shape[1]
    x = points.reshape(b, 3, n).float().contiguous()
    out = torch.empty(b, c if product else 3 * c, n, dtype=planes.dtype, device=planes.device)
    _planes[((n + block - 1) // block, b)](x, planes, out, n, R=resolution, C=c, EXTENT=float(extent), PRODUCT=product, BLOCK=block)
    return out


def _power_of_two(n: int, least: int = 1) -> bool:
    return n >= least and not n & (n - 1)


def fusible(model: NeLF) -> dict[str, str]:
    """For each part :func:`gpu_form` can run as a Triton kernel ("blocks": the residual stack, "texture": the
    surface texture's plane reads): "fused", or why not on this (folded, cast) student here."""
    if triton is None:
        return dict.fromkeys(("blocks", "texture"), "Triton is not installed (pip install 'mg3d[cuda]')")
    weight = model.blocks[0].conv1.weight
    if weight.device.type != "cuda" and not _interpreted():
        return dict.fromkeys(("blocks", "texture"), f"the student is on {weight.device.type}, not a CUDA GPU")
    spec, block = model.spec, model.blocks[0]
    blocks = texture = "fused"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        blocks = f"the weights are {str(weight.dtype).removeprefix('torch.')}, not fp16 or bf16"
    elif not _power_of_two(spec.width, 16):
        blocks = f"width {spec.width} is not a power of two of 16 or more"
    elif not isinstance(block.norm1, nn.Identity) or not isinstance(block.norm2, nn.Identity):
        blocks = "the BatchNorms are not folded into the convolutions"
    elif not isinstance(block.act, TanhGELU):
        blocks = f"the activation is {spec.activation}, not gelu_tanh"
    if not spec.detail:
        texture = "no surface texture"
    elif spec.detail_lines:
        texture = "detail_lines (the planes times lines) has no kernel"
    elif not _power_of_two(spec.detail):
        texture = f"{spec.detail} texture channels are not a power of two"
    return {"blocks": blocks, "texture": texture}


def gpu_form(model: NeLF, dtype: torch.dtype = torch.float16, fuse: bool = True, config: tuple[int, int, int] = DEFAULT_CONFIG,
             device: str | torch.device | None = None) -> NeLF:
    """A copy of ``model`` (on ``device``, else where it is) as it renders on a GPU: BatchNorm folded into the
    convolutions, weights in ``dtype`` (the geometry stays fp32, see ``NeLF._apply``), channels-last, and with
    ``fuse`` the residual stack and the texture reads as Triton kernels where :func:`fusible` allows.
    ``form.kernels`` says, for each, "fused" or why not. Feed it fp32 poses."""
    form = fold_batchnorm(model).to(device=device, dtype=dtype).to(memory_format=torch.channels_last)  # (a copy)
    form.kernels = fusible(form) if fuse else dict.fromkeys(("blocks", "texture"), "not asked")
    if form.kernels["blocks"] == "fused":
        form.blocks = FusedBlocks(form.blocks, config)
    if form.kernels["texture"] == "fused":
        form.detail.read_planes = plane_reads
    return form


def graphed(form: NeLF, pose: Tensor, compile: bool = True, warmup: int = 3) -> Callable[[Tensor], Tensor]:
    """``form`` (a :func:`gpu_form`), compiled by inductor with ``compile`` and captured whole into one CUDA
    graph for cameras shaped like ``pose`` [B, 4, 4]: the returned function copies a pose in and replays the
    graph, one launch for the frame. Its image is the graph's own output tensor, overwritten by the next
    call (copy it to keep it). A student's shapes are fixed, so one capture serves every camera; inductor's
    "reduce-overhead" mode does the same capture but spends 0.1-0.2 ms of Python per call on its guards
    and its graph trees, a fifth of a lego frame on an H200 (BENCHMARKS.md). Call it under no_grad."""
    net = torch.compile(form) if compile else form
    static = pose.detach().to(device="cuda", dtype=torch.float32).clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compiles, and lets every lazy allocation happen before the capture
        for _ in range(warmup):
            net(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = net(static)

    def render(c2w: Tensor) -> Tensor:
        static.copy_(c2w)
        graph.replay()
        return out

    # the graph reads the form's weights where they lay at capture: they must live as long as the function (a
    # caller that dropped its form had the graph read freed memory: an illegal address on an H200, BENCHMARKS.md)
    render.form = net  # type: ignore[attr-defined]
    return render
