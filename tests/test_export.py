"""Export: one pose-in, image-out model per target, verified against the torch student, quantized."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import one_line_error, read_manifest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(trained: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the tiny student's workspace exported for onnx, and the command's output."""
    from click.testing import CliRunner

    from mg3d.cli import main

    ws = Path(shutil.copytree(trained[0], tmp_path_factory.mktemp("export") / "ws"))
    result = CliRunner().invoke(main, ["export", str(ws), "--target", "onnx"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return ws, result.output


@pytest.fixture
def student_ws(trained: tuple[Path, str], tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained[0], tmp_path / "ws"))


def _pose(ws: Path) -> np.ndarray:
    from mg3d.formats.nerfstudio import load_nerfstudio

    scene = load_nerfstudio(ws / "capture" / "transforms.json")
    return scene.c2w[scene.splits["test"][0]].astype(np.float32)


def test_onnx_export_is_one_verified_file_per_precision(exported: tuple[Path, str]) -> None:
    from mg3d.student.model import NeLF

    ws, output = exported
    folder = ws / "export" / "onnx"
    meta = json.loads((folder / "model.json").read_text())
    student = NeLF.load(ws).eval()
    w, h = student.spec.width_px, student.spec.height_px
    assert meta["inputs"][0]["name"] == "c2w" and meta["inputs"][0]["shape"] == [1, 4, 4]
    assert meta["outputs"][0]["name"] == "rgb" and meta["outputs"][0]["shape"] == [1, 3, h, w]
    assert meta["pose_convention"] == "opengl_c2w" and meta["resolution"] == [w, h]
    assert [v["precision"] for v in meta["variants"]] == ["fp32", "fp16", "int8"]
    assert meta["verification"]["max_abs_error_fp32"] <= 1e-4
    pose = _pose(ws)
    with torch.no_grad():
        expected = student(torch.from_numpy(pose)[None]).numpy()
    for v in meta["variants"]:
        model = onnx.load(str(folder / v["file"]), load_external_data=False)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer), "must be a single file"
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert not any(n.op_type == "BatchNormalization" for n in model.graph.node), "normalisation must be folded"
        sess = ort.InferenceSession(str(folder / v["file"]), providers=["CPUExecutionProvider"])
        got = sess.run(["rgb"], {"c2w": pose[None]})[0]
        assert got.shape == (1, 3, h, w) and got.dtype == np.float32 and 0 <= got.min() and got.max() <= 1
        if v["precision"] == "fp32":
            assert np.abs(got - expected).max() <= 1e-4
        else:
            assert v["psnr_vs_fp32"] > (40 if v["precision"] == "fp16" else 25), v
            assert v["psnr_loss_db"] <= (0.1 if v["precision"] == "fp16" else 0.5), v
    assert all(n.attribute[1].s == b"DCR" or n.attribute[0].s == b"DCR" for n in onnx.load(str(folder / "model.onnx")).graph.node if n.op_type == "DepthToSpace")
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(files) == {"model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.json"}
    assert all(files[name]["bytes"] == (folder / name).stat().st_size for name in files)
    assert "model.int8.onnx" in output and "exported models" in output


def _ring_poses() -> np.ndarray:
    """Three cameras [3, 4, 4] on a ring of radius 4 around the origin, looking at it."""
    from mg3d.scene import look_at_rotation

    poses = np.tile(np.eye(4, dtype=np.float32), (3, 1, 1))
    for pose, a in zip(poses, (0.2, 1.4, 2.9)):
        pose[:3, 3] = [4 * np.cos(a), 4 * np.sin(a), 1.0]
        pose[:3, :3] = look_at_rotation(-pose[:3, 3], np.array([0.0, 0.0, 1.0]))
    return poses


def _matches_torch(model: torch.nn.Module, graph: "onnx.ModelProto", path: Path) -> np.ndarray:
    """Save ``graph`` to ``path``, render the ring poses with onnxruntime, assert they match ``model`` within
    1e-4 and return them."""
    from mg3d.export import onnxmodel as ox

    poses = _ring_poses()
    with torch.no_grad():
        expected = model(torch.from_numpy(poses)).numpy()
    onnx.save(graph, str(path))
    got = ox.render(ox.session(path), poses)
    assert np.abs(got - expected).max() < 1e-4
    return got


def test_feature_planes_export_as_gathers_with_fp16_tables(tmp_path: Path) -> None:
    """A student with feature planes exports with Gather (no GridSample, which mobile delegates lack),
    matches torch in fp32, and its fp16 variant stores the planes in fp16 (half the bytes) and stays close."""
    from mg3d.export import onnxmodel as ox
    from mg3d.student.model import NeLF, StudentSpec, fold_batchnorm

    torch.manual_seed(0)
    spec = StudentSpec(width_px=64, height_px=64, fx=80, fy=80, cx=32, cy=32, near=2, far=6, radius=1.5, depth=2, width=16, sr_factor=8, planes=4, plane_resolution=128)
    model = NeLF(spec).eval()
    torch.nn.init.normal_(model.planes, std=0.5)
    graph = ox.export_fp32(fold_batchnorm(model), 17)
    ops = [n.op_type for n in graph.graph.node]
    assert "Gather" in ops and "GridSample" not in ops
    got = _matches_torch(model, graph, tmp_path / "fp32.onnx")
    half = ox.to_fp16(graph, ox.encoding_nodes(graph, spec.in_channels))
    assert ox.half_tables(half) == 1
    tables = [t for t in half.graph.initializer if t.name.endswith("_fp16")]
    assert len(tables) == 1 and tables[0].data_type == onnx.TensorProto.FLOAT16 and list(tables[0].dims) == [3 * 128 * 128, 4]
    onnx.save(half, str(tmp_path / "fp16.onnx"))
    low = ox.render(ox.session(tmp_path / "fp16.onnx"), _ring_poses())
    assert -10 * np.log10(np.mean((low - got) ** 2)) > 40


def test_surface_detail_exports_with_gathers_and_an_fp32_read_path(tmp_path: Path) -> None:
    """A student with the per-pixel surface detail exports as one graph (Gather reads, no GridSample) that
    matches torch in fp32; its fp16 variant keeps the point placement and the plane reads in fp32 (indices into
    512-cell planes are not exact in fp16) and stores the planes in fp16."""
    from mg3d.export import onnxmodel as ox
    from mg3d.student.model import NeLF, StudentSpec, fold_batchnorm

    torch.manual_seed(0)
    spec = StudentSpec(width_px=64, height_px=48, fx=70, fy=70, cx=32, cy=24, near=2, far=6, radius=1.5, depth=2, width=16, sr_factor=8, detail=4, detail_resolution=512)
    model = NeLF(spec).eval()
    torch.nn.init.normal_(model.detail.planes, std=0.5)
    torch.nn.init.normal_(model.detail.depth.weight, std=0.5)  # a depth that varies across the image
    graph = ox.export_fp32(fold_batchnorm(model), 17)
    ops = [n.op_type for n in graph.graph.node]
    assert "Gather" in ops and "GridSample" not in ops
    keep = ox.detail_nodes(graph)
    assert any(graph.graph.node[i].op_type == "Gather" for i, n in enumerate(graph.graph.node) if n.name in keep)
    got = _matches_torch(model, graph, tmp_path / "fp32.onnx")
    half = ox.to_fp16(graph, ox.encoding_nodes(graph, spec.in_channels) + keep)  # (all in fp16: Gather indices out of bounds)
    assert ox.half_tables(half) == 1
    # no value between two kept nodes passes through fp16 (510 * 512, a plane index, would be inf there)
    producers = {out: node for node in half.graph.node for out in node.output}
    to = lambda node: next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "to"), None)  # noqa: E731
    for node in half.graph.node:
        if node.name in keep:
            for name in node.input:
                cast = producers.get(name)
                if cast is not None and cast.op_type == "Cast" and to(cast) == onnx.TensorProto.FLOAT:
                    first = producers.get(cast.input[0])
                    assert first is None or first.op_type != "Cast" or to(first) != onnx.TensorProto.FLOAT16, (node.name, name)
    onnx.save(half, str(tmp_path / "fp16.onnx"))
    low = ox.render(ox.session(tmp_path / "fp16.onnx"), _ring_poses())
    assert -10 * np.log10(np.mean((low - got) ** 2)) > 40


@pytest.mark.parametrize("texture", [{}, {"detail_scales": 2, "detail_product": True, "detail_points": 2},
                                     {"detail_scales": 2, "detail_product": True, "detail_points": 3, "detail_coarse_once": True, "march_box": True}],
                         ids=["planes", "scales+product+points", "coarse-once+box"])
def test_occupancy_student_exports_with_its_march(tmp_path: Path, texture: dict) -> None:
    """The occupancy grid and the march (Gather, ReduceMin) go into the one graph: fp32 matches torch, and the
    fp16 variant, which keeps the march in fp32, stays within 40 dB of it (with a per-pixel head MLP, the
    viewing direction in the fuse and feature lines; and with two scales of planes, multiplied, read at two
    points along each ray; and with the coarse scale read once and the march inside the occupied box)."""
    from mg3d.export import onnxmodel as ox
    from mg3d.student.model import NeLF, StudentSpec, fold_batchnorm
    from mg3d.student.synthetic import sphere_occupancy

    torch.manual_seed(0)
    spec = StudentSpec(width_px=64, height_px=48, fx=70, fy=70, cx=32, cy=24, near=2, far=6, radius=1.5, depth=2, width=16, sr_factor=8, detail=4,
                       detail_resolution=512, occupancy=32, march_steps=64, head_layers=1, head_width=24, detail_view=2, detail_lines=True, **texture)
    model = NeLF(spec).eval()
    for planes in model.detail.scales():
        torch.nn.init.normal_(planes, mean=0.5 if spec.detail_product else 0.0, std=0.5)
    torch.nn.init.normal_(model.detail.depth.weight, std=0.5)
    torch.nn.init.normal_(model.detail.lines, mean=1.0, std=0.5)
    model.detail.set_occupancy(torch.from_numpy(sphere_occupancy(((np.zeros(3), 0.6 - 1 / 32),), 32)))  # a ball of radius 0.6
    hit = model.detail.march_cameras(torch.from_numpy(_ring_poses()))[0]
    assert 0.05 < float(hit.float().mean()) < 0.95  # the ring's views see the ball and past it
    graph = ox.export_fp32(fold_batchnorm(model), 17)
    assert {"ReduceMin", "Gather"} <= {n.op_type for n in graph.graph.node}
    got = _matches_torch(model, graph, tmp_path / "fp32.onnx")
    half = ox.to_fp16(graph, ox.encoding_nodes(graph, spec.in_channels) + ox.detail_nodes(graph))
    onnx.save(half, str(tmp_path / "fp16.onnx"))
    low = ox.render(ox.session(tmp_path / "fp16.onnx"), _ring_poses())
    assert -10 * np.log10(np.mean((low - got) ** 2)) > 40


def test_the_check_of_a_marching_student_allows_a_grazing_pixel_in_ten_thousand() -> None:
    """A pixel whose ray grazes an occupancy cell may take the next cell in another runtime's rounding: a
    student with a march is checked on all but 1 pixel in 10,000 (and the largest error is still recorded);
    a student without one on every pixel."""
    from mg3d.export.build import onnx_error
    from mg3d.student.model import StudentSpec

    base = dict(width_px=80, height_px=64, fx=70, fy=70, cx=40, cy=32, near=2, far=6, sr_factor=8)
    plain, marching = StudentSpec(**base), StudentSpec(**base, detail=2, occupancy=16)
    ref = np.random.default_rng(0).random((4, 3, 64, 80)).astype(np.float32)  # 20,480 pixels: 2 may graze
    onnx_rgb = ref + 5e-6
    onnx_rgb[1, :, 10, 10] += 0.1
    error, figures = onnx_error(marching, onnx_rgb, ref, 1e-4)
    assert error < 1e-4 and figures["max_abs_error_fp32"] == pytest.approx(0.1, abs=1e-5) and figures["pixels_past_tolerance"] == 1
    assert onnx_error(plain, onnx_rgb, ref, 1e-4)[0] == pytest.approx(0.1, abs=1e-5)  # no march: every pixel counts
    onnx_rgb[2, :, :3, :3] += 0.1  # 10 pixels, past the share a march explains
    assert onnx_error(marching, onnx_rgb, ref, 1e-4)[0] > 1e-4


def test_tanh_gelu_exports_as_a_sigmoid_with_the_same_values(tmp_path: Path) -> None:
    """The tanh GELU goes into ONNX graphs as x sigmoid(x (a + b x^2)): 6 element-wise ops, no Tanh, the same
    values as torch's (fp32 to rounding; fp16 too where x^2 overflows); traced outside an ONNX export (Core ML's
    converter) it stays torch's own GELU."""
    from mg3d.export import onnxmodel as ox
    from mg3d.student.model import TanhGELU, onnx_forms

    gelu = TanhGELU()
    x = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([-6e4, -300.0, -1e-6, 0.0, 1e-6, 300.0, 6e4])])
    with onnx_forms():
        traced = torch.jit.trace(gelu, (x,), check_trace=False)
    assert "sigmoid" in str(traced.graph) and "gelu" not in str(traced.graph)
    assert "gelu" in str(torch.jit.trace(gelu, (x,), check_trace=False).graph)
    expected = torch.nn.functional.gelu(x, approximate="tanh")
    torch.testing.assert_close(traced(x), expected, rtol=1e-6, atol=1e-6)
    with onnx_forms():  # the same form in fp16
        half = torch.jit.trace(gelu, (x.half(),), check_trace=False)(x.half()).float()
    assert bool(torch.isfinite(half).all())
    torch.testing.assert_close(half, expected.half().float(), rtol=2e-3, atol=2e-3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), TanhGELU()).eval()
    model.spec = type("Spec", (), {"near": 2.0, "far": 6.0})()  # export_fp32 reads the sample range for its example pose
    ops = [n.op_type for n in ox.export_fp32(_PoseAsImage(model), 17).graph.node]
    assert "Sigmoid" in ops and "Tanh" not in ops


class _PoseAsImage(torch.nn.Module):
    """c2w [1, 4, 4] -> a [1, 3, 4, 4] image through ``net`` (to export a bare layer with the student's input)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.spec = net, net.spec

    def forward(self, c2w: torch.Tensor) -> torch.Tensor:
        return self.net(c2w[:, :3].unsqueeze(1).expand(-1, 3, 3, 4))


def test_depth_to_space_rewrite_keeps_the_image() -> None:
    """PyTorch's pixel shuffle (CRD) becomes DCR, the order NNAPI takes, with the conv's channels permuted."""
    import io

    from mg3d.export.onnxmodel import depth_to_space_dcr

    net = torch.nn.Sequential(torch.nn.Conv2d(5, 3 * 4, 1), torch.nn.PixelShuffle(2)).eval()
    x = torch.randn(1, 5, 6, 7)
    buffer = io.BytesIO()
    torch.onnx.export(net, (x,), buffer, opset_version=17, input_names=["x"], output_names=["y"], dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    assert depth_to_space_dcr(model) == 1
    modes = [a.s for n in model.graph.node if n.op_type == "DepthToSpace" for a in n.attribute if a.name == "mode"]
    assert modes == [b"DCR"]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, net(x).detach().numpy(), atol=1e-5)


def test_repeated_nodes_from_the_fp16_converter_are_dropped(tmp_path: Path) -> None:
    """onnxruntime 1.30's converter writes the Cast after a constant once per kept node that reads it, with one
    name and one output; onnxruntime then refuses the model. One copy stays and the model runs."""
    from onnx import TensorProto, helper

    from mg3d.export.onnxmodel import drop_duplicate_nodes

    constant = helper.make_node("Constant", [], ["k"], value=helper.make_tensor("v", TensorProto.FLOAT16, [1], [2.0]))
    casts = [helper.make_node("Cast", ["k"], ["k32"], name="k_cast_to_fp32", to=TensorProto.FLOAT) for _ in range(2)]
    uses = [helper.make_node("Mul", ["x", "k32"], ["a"], name="m"), helper.make_node("Add", ["a", "k32"], ["y"], name="m")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph([constant, *casts, *uses], "g", io[:1], io[1:]))
    with pytest.raises(Exception, match="Duplicate definition|same node name"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    from mg3d.export.onnxmodel import ExportError, session

    onnx.save(model, str(tmp_path / "twice.onnx"))
    with pytest.raises(ExportError, match=r"onnxruntime [\d.]+ cannot load twice.onnx: .*(Duplicate definition|same node name)"):
        session(tmp_path / "twice.onnx")  # what a build says when a runtime refuses a model, in one line
    assert drop_duplicate_nodes(model) == 1
    assert len({n.name for n in model.graph.node}) == len(model.graph.node) == 4  # the two "m" got names of their own
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": np.ones(1, np.float32)})[0]
    assert got.tolist() == [4.0]
    # two different nodes writing one tensor is not something to paper over
    clash = helper.make_model(helper.make_graph([constant, casts[0], helper.make_node("Cast", ["k"], ["k32"], to=TensorProto.DOUBLE)], "g", [], []))
    with pytest.raises(ValueError, match="two different nodes write k32"):
        drop_duplicate_nodes(clash)


def test_android_export_has_ort_files_and_delegate_coverage(student_ws: Path, cli) -> None:
    result = cli("export", student_ws, "--target", "android")
    assert result.exit_code == 0, result.output
    folder = student_ws / "export" / "android"
    meta = json.loads((folder / "model.json").read_text())
    assert [(v["file"], v["format"]) for v in meta["variants"]] == [("model.ort", "ort"), ("model.int8.ort", "ort")]
    fp32 = meta["variants"][0]
    # the default student (pixel shuffle, tanh GELU, no Where/Erf/Cos) runs whole on NNAPI and Core ML
    for delegate in ("nnapi", "coreml_mlprogram"):
        assert fp32["delegates"][delegate]["fraction"] == 1.0 and fp32["delegates"][delegate]["partitions"] == 1, fp32["delegates"]
    assert 0 < fp32["delegates"]["xnnpack"]["fraction"] < 1
    assert fp32["psnr_vs_fp32"] > 60  # the .ort file computes what the ONNX file computes
    sess = ort.InferenceSession(str(folder / "model.ort"), providers=["CPUExecutionProvider"])
    assert sess.run(["rgb"], {"c2w": _pose(student_ws)[None]})[0].shape[:2] == (1, 3)


def test_transposed_convolution_splits_nnapi(tmp_path: Path) -> None:
    """MobileR2L's transposed convolutions are the one op NNAPI lacks: measured, not assumed."""
    from mg3d.export.mobile import delegate_coverage
    from mg3d.export.onnxmodel import export_fp32
    from mg3d.student.model import NeLF, StudentSpec

    spec = StudentSpec(width_px=32, height_px=32, fx=40, fy=40, cx=16, cy=16, near=1, far=4, depth=2, width=16, sr_factor=4, upsample="transpose")
    onnx.save(export_fp32(NeLF(spec)), str(tmp_path / "t.onnx"))
    report = delegate_coverage(tmp_path / "t.onnx")
    assert report["nnapi"]["unsupported_ops"] == ["ConvTranspose"] and report["nnapi"]["partitions"] > 1
    assert report["coreml_mlprogram"]["fraction"] == 1.0


def test_web_export_and_targets_kept_side_by_side(exported: tuple[Path, str], tmp_path: Path, cli) -> None:
    ws = Path(shutil.copytree(exported[0], tmp_path / "ws"))
    result = cli("export", ws, "--target", "web")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (ws / "export" / "web").iterdir()) == ["manifest.json", "model.fp16.onnx", "model.half.onnx", "model.json", "model.onnx"]
    half = next(v for v in json.loads((ws / "export" / "web" / "model.json").read_text())["variants"] if v["file"] == "model.half.onnx")
    w, h = json.loads((ws / "export" / "web" / "model.json").read_text())["resolution"]
    assert half["resolution"] == [w // 2, h // 2] and half["psnr_vs_full_downsampled"] > 15
    assert (ws / "export" / "onnx" / "model.int8.onnx").is_file(), "exporting web must keep the onnx export"
    assert set(read_manifest(ws, "export")["metrics"]["targets"]) == {"onnx", "web"}
    again = cli("export", ws, "--target", "web")
    assert again.exit_code == 0 and "up to date" in again.output
    info = cli("info", ws)
    assert info.exit_code == 0 and "exported models" in info.output and "model.int8.onnx" in info.output and "web" in info.output


def test_ios_export_writes_a_checked_mlpackage(student_ws: Path, cli) -> None:
    pytest.importorskip("coremltools")
    from mg3d.export.coreml import can_predict

    result = cli("export", student_ws, "--target", "ios", "--precision", "fp16,int8", "--palettize", "6")
    assert result.exit_code == 0, result.output
    folder = student_ws / "export" / "ios"
    meta = json.loads((folder / "model.json").read_text())
    names = [v["file"] for v in meta["variants"]]
    assert names == ["model.mlpackage", "model.int8.mlpackage", "model.palettized-6bit.mlpackage"]
    sizes = {v["file"]: v["bytes"] for v in meta["variants"]}
    assert sizes["model.int8.mlpackage"] < sizes["model.mlpackage"] and sizes["model.palettized-6bit.mlpackage"] < sizes["model.mlpackage"]
    for v in meta["variants"]:
        assert (folder / v["file"] / "Manifest.json").is_file()
        assert v["spec"]["inputs"] == [{"name": "c2w", "shape": [1, 4, 4]}] and v["spec"]["outputs"][0]["name"] == "rgb"
        assert {"conv", "sin", "pixel_shuffle"} <= set(v["spec"]["ops"])
        if can_predict():  # macOS: Core ML's own output against torch
            assert v["psnr_vs_fp32"] > 30
        else:
            assert "only on macOS" in v["prediction"]


# ---- bad input -------------------------------------------------------------------------------------------
def test_export_without_a_student_says_which_command_makes_one(distilled: Path, tmp_path: Path, cli) -> None:
    ws = Path(shutil.copytree(distilled, tmp_path / "ws"))
    result = cli("export", ws)
    assert result.exit_code == 1
    one_line_error(result, "no finished student stage", "mg3d student")
    assert not (ws / "export").exists()


@pytest.mark.parametrize(("args", "needles"), [
    (["--target", "windows"], ["unknown target 'windows'", "onnx, android, ios, web"]),
    (["--precision", "fp8"], ["unknown precision 'fp8'", "fp32, fp16, int8"]),
    (["--target", "web", "--precision", "int8"], ["not offered for target web"]),
    (["--target", "onnx", "--palettize", "4"], ["Core ML only", "--target ios"]),
    (["--target", "ios", "--palettize", "3"], ["4, 6 or 8"]),
])
def test_export_rejects_unknown_choices(student_ws: Path, cli, args: list[str], needles: list[str]) -> None:
    result = cli("export", student_ws, *args)
    assert result.exit_code == 1
    one_line_error(result, *needles)
    assert not (student_ws / "export").exists()


def test_missing_coremltools_names_the_extra(student_ws: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "coremltools" else real(name, *a))
    result = cli("export", student_ws, "--target", "ios")
    assert result.exit_code == 1
    one_line_error(result, "coremltools is not installed", "pip install 'mg3d[coreml]'")
    assert not (student_ws / "export").exists()


@pytest.mark.parametrize("extra", [{}, {"detail_points": 2, "detail_coarse_once": True, "march_box": True}], ids=["scales", "coarse-once+box"])
def test_ios_export_keeps_the_surface_detail_in_fp32_and_compresses_only_convolutions(extra: dict) -> None:
    """Core ML: an occupancy student converts with its point placement, march and plane reads in fp32 (plane
    and grid indices need it; the viewing direction, the feature lines and a second, coarser plane scale too;
    the march inside the occupied box) and the rest in fp16; int8 and palettized variants compress the
    convolutions' weights only, never the ray directions or the planes."""
    pytest.importorskip("coremltools")
    from coremltools.converters.mil.mil import types

    from mg3d.export import coreml
    from mg3d.student.model import NeLF, StudentSpec, fold_batchnorm

    torch.manual_seed(0)
    spec = StudentSpec(width_px=64, height_px=48, fx=70, fy=70, cx=32, cy=24, near=2, far=6, radius=1.5, depth=2, width=16, sr_factor=8, detail=4,
                       detail_resolution=64, occupancy=16, march_steps=32, detail_view=2, detail_lines=True, detail_scales=2, detail_product=True, **extra)
    base = coreml.convert(fold_batchnorm(NeLF(spec).eval()), spec.in_channels)
    coreml.check(base, spec.width_px, spec.height_px)
    ops = list(base._mil_program.functions["main"].operations)
    convs = [k for k, o in enumerate(ops) if o.op_type == "conv"]
    depth = next(k for k in convs if ops[k].weight.shape[0] == 1)
    fuse = next(k for k in convs if k > depth)
    detail = [o for o in ops[depth + 1 : fuse] if o.op_type != "const"]
    assert {"gather", "floor", "reduce_min"} <= {o.op_type for o in detail}
    half = [o for o in detail if types.builtin_to_string(o.outputs[0].dtype) == "fp16"]
    assert [o.op_type for o in half] == ["cast"] and list(half[0].outputs[0].child_ops) == [ops[fuse]]  # fp16 only into the fuse
    assert [o for o in ops[fuse:] if types.builtin_to_string(o.outputs[0].dtype) == "fp16"]  # the fuse and head run in fp16
    for compressed in (coreml.quantize_int8(base), coreml.palettize(base, 6)):
        users = {c.op_type for o in compressed._mil_program.functions["main"].operations if o.op_type.startswith("constexpr") for c in o.outputs[0].child_ops}
        assert users == {"conv"}, users


def test_failed_verification_is_not_marked_done_and_says_by_how_much(exported: tuple[Path, str], tmp_path: Path, cli) -> None:
    ws = Path(shutil.copytree(exported[0], tmp_path / "ws"))
    before = (ws / "export" / "manifest.json").read_bytes()
    result = cli("export", ws, "--target", "web", "--tolerance", "1e-12")
    assert result.exit_code == 1
    line = one_line_error(result, "differs from the torch student by", "tolerance 1e-12")
    assert "e-" in line.split("by")[1]
    assert (ws / "export" / "manifest.json").read_bytes() == before, "the earlier export stays as it was"
    assert not (ws / "export" / "web").exists() and not (ws / ".export.partial").exists()


def test_int8_beyond_the_allowed_loss_fails(student_ws: Path, cli) -> None:
    result = cli("export", student_ws, "--precision", "int8", "--max-int8-loss-db", "0")
    if result.exit_code == 0:  # a perfect int8 model cannot fail this check
        meta = json.loads((student_ws / "export" / "onnx" / "model.json").read_text())
        assert meta["variants"][0]["psnr_loss_db"] <= 0
        return
    one_line_error(result, "int8 model loses", "allowed: 0.0 dB", "--precision fp32,fp16")
    assert not (student_ws / "export").exists()


def test_calibration_reader_gives_every_pose_and_rewinds() -> None:
    from mg3d.export.onnxmodel import _Poses

    poses = np.stack([np.eye(4, dtype=np.float32) * (i + 1) for i in range(3)])
    reader = _Poses(poses)
    first = [reader.get_next() for _ in range(4)]
    assert [f["c2w"][0, 0, 0] for f in first[:3]] == [1, 2, 3] and first[3] is None
    reader.rewind()
    assert reader.get_next()["c2w"].shape == (1, 4, 4)
