"""The student as one ONNX file: ``c2w`` [1, 4, 4] in, ``rgb`` [1, 3, H, W] in [0, 1] out.

Ray generation, sampling and encoding are inside the graph (intrinsics baked in), so an app runs one model
and nothing else. The graph is exported at opset 17 (where the tanh GELU is written as Mul/Add/Sigmoid, which NNAPI
and Core ML run; opset 20's Gelu op they do not), simplified with onnxslim, and its depth-to-space nodes are
rewritten from PyTorch's CRD order to DCR (the only order NNAPI takes) by permuting the channels of the
convolution before each one. Variants: fp16 (weights and compute; fp32 inputs/outputs; the positional
encoding stays fp32, where half precision would shift the phases of the high frequencies) and int8 (static
QDQ quantization of the input convolution and the residual blocks, calibrated on camera poses,
per-channel weights; the super-resolution convolutions stay fp32).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mg3d.errors import Mg3dError

if TYPE_CHECKING:  # only for annotations: importing mg3d.export must not need the export extra
    import onnx
    import onnxruntime


class ExportError(Mg3dError):
    """An export could not be made, or it does not compute what the student computes."""


INPUT, OUTPUT = "c2w", "rgb"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the converters' own prints, progress bars, log lines and warnings (errors still raise)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def export_fp32(model: torch.nn.Module, opset: int = 17) -> "onnx.ModelProto":
    """Trace the student into a simplified single-file ONNX model (fp32)."""
    import onnx
    import onnxslim

    from mg3d.student.model import onnx_forms

    model = model.eval().float().cpu()
    example = torch.eye(4)[None]
    example[0, 2, 3] = float(model.spec.near + model.spec.far) / 2
    buffer = io.BytesIO()
    with quiet(), torch.no_grad(), onnx_forms():  # the TorchScript exporter's deprecation and tracer notices
        # dynamo=False: the TorchScript-based exporter writes opset 17 directly; the dynamo exporter starts at
        # opset 18 and cannot convert this graph down.
        torch.onnx.export(model, (example,), buffer, opset_version=opset, input_names=[INPUT], output_names=[OUTPUT], dynamo=False, do_constant_folding=True)
    graph = onnxslim.slim(onnx.load_from_string(buffer.getvalue()))
    depth_to_space_dcr(graph)
    graph.producer_name, graph.doc_string = "mg3d", "mg3d student: OpenGL camera-to-world c2w [1,4,4] -> rgb [1,3,H,W] in [0,1]"
    onnx.checker.check_model(graph, full_check=True)
    return graph


def depth_to_space_dcr(graph: "onnx.ModelProto") -> int:
    """Rewrite DepthToSpace(mode=CRD) after a Conv with constant weights into DCR, in place; returns how many.

    CRD reads input channel ``c b^2 + k`` for output channel c and sub-pixel k; DCR reads ``k C + c``. Reordering
    the convolution's output channels by that map gives the same image.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.graph.initializer}
    producers = {out: node for node in graph.graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in graph.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    changed = 0
    for node in graph.graph.node:
        if node.op_type != "DepthToSpace":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("mode", b"DCR")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "CRD":
            continue
        conv = producers.get(node.input[0])
        params = list(conv.input[1:]) if conv is not None and conv.op_type == "Conv" else []
        # only a Conv that feeds nothing else, with constant weights used by no other node, can be reordered
        if not params or uses.get(node.input[0], 0) != 1 or any(name not in inits or uses.get(name, 0) != 1 for name in params):
            continue
        b = int(attrs["blocksize"])
        channels = numpy_helper.to_array(inits[params[0]]).shape[0] // (b * b)
        order = np.array([c * b * b + k for k in range(b * b) for c in range(channels)])
        for name in params:
            inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name])[order], name))
        for attr in node.attribute:
            if attr.name == "mode":
                attr.s = b"DCR"
        changed += 1
    return changed


def encoding_nodes(graph: "onnx.ModelProto", in_channels: int) -> list[str]:
    """Names of the nodes before the network's first convolution (ray points and positional encoding):
    the part that stays fp32 and unquantized, because its phases need the precision."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.graph.initializer}
    names = []
    for node in graph.graph.node:  # ONNX graphs are topologically sorted
        if node.op_type == "Conv" and node.input[1] in inits and numpy_helper.to_array(inits[node.input[1]]).shape[1] == in_channels:
            return names
        names.append(node.name)
    raise ExportError("the exported graph has no input convolution of the student", hint="this is a bug in mg3d's exporter; please report it")


def detail_nodes(graph: "onnx.ModelProto") -> list[str]:
    """Names of the surface-detail nodes that place each pixel's point and read the planes (depth, ray,
    contraction, plane indices, Gathers): they stay fp32, since in fp16 the cell indices of a 512-cell plane
    and the point positions lose whole cells. The fusing convolution after them may run in fp16."""
    return [node.name for node in graph.graph.node if node.name.startswith("/detail/") and not node.name.startswith("/detail/fuse/")]


def block_convs(graph: "onnx.ModelProto", width: int, in_channels: int) -> list[str]:
    """Names of the input convolution and the residual blocks' 1x1 convolutions: what int8 quantizes.

    The super-resolution convolutions after them stay fp32: quantizing them costs 0.15-2.7 dB each (the
    later, the more) on the lego student, while the input conv and the blocks together cost ~0.1 dB and
    hold about 60% of the multiply-adds (BENCHMARKS.md).
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.graph.initializer}
    names = []
    for node in graph.graph.node:
        if node.op_type in ("DepthToSpace", "ConvTranspose"):
            break
        if node.op_type == "Conv" and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]]).shape
            if shape[0] == width and shape[1] in (width, in_channels) and shape[2:] == (1, 1):
                names.append(node.name)
    return names


def to_fp16(graph: "onnx.ModelProto", keep_fp32: list[str]) -> "onnx.ModelProto":
    """fp16 weights and compute, fp32 inputs and outputs; ``keep_fp32`` nodes stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet():
        half = convert_float_to_float16(graph, keep_io_types=True, node_block_list=keep_fp32)
    drop_cast_round_trips(half)
    drop_duplicate_nodes(half)
    return half


def drop_duplicate_nodes(graph: "onnx.ModelProto") -> int:
    """Remove nodes that repeat an earlier node's outputs with the same op, inputs and attributes, in place;
    then give every node its own name. Returns how many nodes were removed.

    onnxruntime 1.30's fp16 converter (on the GPU machine) adds the Cast after a constant once for each
    kept-fp32 node that reads it, each time with the same name and output, and onnxruntime then refuses the
    model ("Duplicate definition of name"). The copies compute the same value, so one is enough.
    """
    def body(node: "onnx.NodeProto") -> bytes:
        copy = type(node)()
        copy.CopyFrom(node)
        copy.name = ""
        return copy.SerializeToString()

    first: dict[str, bytes] = {}
    removed = 0
    for node in list(graph.graph.node):
        repeats = [first.get(out) for out in node.output]
        if node.output and all(r is not None for r in repeats):
            if any(r != body(node) for r in repeats):
                raise ValueError(f"two different nodes write {node.output[0]}")
            graph.graph.node.remove(node)
            removed += 1
            continue
        for out in node.output:
            first[out] = body(node)
    seen: set[str] = set()
    for node in graph.graph.node:
        if node.name and node.name in seen:
            n = 1
            while f"{node.name}_{n}" in seen:
                n += 1
            node.name = f"{node.name}_{n}"
        seen.add(node.name)
    return removed


def drop_cast_round_trips(graph: "onnx.ModelProto") -> int:
    """Remove fp32 -> fp16 -> fp32 Cast pairs, in place; returns how many.

    onnxruntime's fp16 converter casts every float edge of a kept-fp32 node to fp16 and back, also between
    two kept nodes, so values on such edges still pass through fp16: 510 * 512, a plane index, becomes inf,
    and the phases of the positional encoding are rounded. Consumers of such a pair read the fp32 tensor.
    """
    from onnx import TensorProto, helper, shape_inference

    types = {v.name: v.type.tensor_type.elem_type for v in shape_inference.infer_shapes(graph).graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in graph.graph.input})
    producers = {out: node for node in graph.graph.node for out in node.output}
    outputs = {o.name for o in graph.graph.output}

    def cast_to(node: "onnx.NodeProto") -> int | None:
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rename: dict[str, str] = {}
    for node in graph.graph.node:
        first = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if (first is not None and cast_to(node) == TensorProto.FLOAT and cast_to(first) == TensorProto.FLOAT16
                and types.get(first.input[0]) == TensorProto.FLOAT and node.output[0] not in outputs):
            rename[node.output[0]] = first.input[0]
    for node in graph.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {name for node in graph.graph.node for name in node.input} | outputs
    for node in [n for n in graph.graph.node if n.op_type == "Cast" and n.output[0] not in used]:
        graph.graph.node.remove(node)  # the dropped second casts, and first casts that nothing else reads
    return len(rename)


def half_tables(graph: "onnx.ModelProto", min_elements: int = 1 << 16) -> int:
    """Store the tables that Gather nodes read (the student's feature planes) in fp16, with a Cast back to
    fp32 after each read: the variant's file halves there while the arithmetic around the reads stays as it
    was. Returns how many tables changed."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in graph.graph.initializer}
    halves: dict[str, str] = {}
    for node in list(graph.graph.node):
        if node.op_type != "Gather":
            continue
        name = node.input[0]
        if name not in halves:
            table = inits.get(name)
            if table is None or table.data_type != TensorProto.FLOAT or int(np.prod(table.dims)) < min_elements:
                continue
            half = numpy_helper.from_array(numpy_helper.to_array(table).astype(np.float16), name + "_fp16")
            graph.graph.initializer.remove(table)
            graph.graph.initializer.append(half)
            halves[name] = half.name
        out = node.output[0]
        node.input[0], node.output[0] = halves[name], out + "_fp16"
        cast = helper.make_node("Cast", [out + "_fp16"], [out], name=node.name + "_to_fp32", to=TensorProto.FLOAT)
        graph.graph.node.insert(list(graph.graph.node).index(node) + 1, cast)
    return len(halves)


class _Poses:
    """onnxruntime's CalibrationDataReader protocol over camera poses."""

    def __init__(self, poses: np.ndarray) -> None:
        self._feeds = [{INPUT: p[None].astype(np.float32)} for p in poses]
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        """Start again from the first pose (calibrators that make several passes call it)."""
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._feeds)


def to_int8(fp32_path: Path, out_path: Path, poses: np.ndarray, nodes: list[str], method: str = "minmax") -> None:
    """Static QDQ int8 of the convolutions ``nodes`` (see :func:`block_convs`): uint8 activations calibrated
    on ``poses``, symmetric int8 per-channel weights."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    with quiet():
        quantize_static(
            str(fp32_path), str(out_path), _Poses(poses), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"], nodes_to_quantize=nodes,
            calibrate_method=methods[method], extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )


def session(path: Path, threads: int = 0) -> "onnxruntime.InferenceSession":
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if Path(path).suffix == ".ort":  # our own file: replay the optimizations saved into it
        options.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - the runtime's own reason, in one line (it raises its own types)
        reason = str(exc).splitlines()[0].split(" : ")[-1][:240] if str(exc) else exc.__class__.__name__
        raise ExportError(f"onnxruntime {ort.__version__} cannot load {Path(path).name}: {reason}",
                          hint="a file written by mg3d export is checked when it is made: export again with --force, or use the onnxruntime version it was made with") from None


def render(sess: "onnxruntime.InferenceSession", poses: np.ndarray) -> np.ndarray:
    """Images [N, 3, H, W] float32 for poses [N, 4, 4] (one run per pose: the model's batch is 1)."""
    return np.concatenate([sess.run([OUTPUT], {INPUT: p[None].astype(np.float32)})[0] for p in poses])
