"""The student as a Core ML ML Program (``.mlpackage``, iOS 16+), converted from the traced torch model.

Compute is fp16 except the ray points and positional encoding, which stay fp32 (their phases need it), and
a surface-detail student's point placement, occupancy march and plane reads (cell indices need it).
Optional weight compression of the convolutions through ``coremltools.optimize``: palettization (k-means
look-up tables of 4, 6 or 8 bits) and int8 linear quantization; other constants (ray directions, planes,
the occupancy grid) stay as they are. Core ML predicts only on macOS; elsewhere the package's spec is
checked (input/output names and shapes, op list, size) and the sidecar says that no prediction was run.
"""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import torch


def convert(model: torch.nn.Module, in_channels: int, half: bool = True) -> Any:
    """ML Program of ``model`` (input ``c2w`` [1, 4, 4], output ``rgb`` [1, 3, H, W]); fp16 compute unless
    ``half`` is False."""
    import coremltools as ct

    model = model.eval().float().cpu()
    example = torch.eye(4)[None]
    example[0, 2, 3] = float(model.spec.near + model.spec.far) / 2

    kept: dict[int, set[int]] = {}  # per block: ids of the ops that stay fp32, found once

    def fp16(op: Any) -> bool:
        """Half precision for the network, not for the encoding (everything before the input convolution)
        nor for the surface detail's ops between its depth convolution (one output channel) and the next
        convolution (the fuse)."""
        block = op.enclosing_block
        if id(block) not in kept:
            ops = list(block.operations)
            convs = [k for k, o in enumerate(ops) if o.op_type == "conv"]
            stem = next((k for k in convs if ops[k].weight.shape[1] == in_channels), 0)
            depth = next((k for k in convs if ops[k].weight.shape[0] == 1), None)
            fuse = next((k for k in convs if depth is not None and k > depth), len(ops))
            kept[id(block)] = {id(o) for k, o in enumerate(ops) if k < stem or (depth is not None and depth < k < fuse)}
        return id(op) not in kept[id(block)]

    from mg3d.export.onnxmodel import quiet

    with quiet(), torch.no_grad():
        traced = torch.jit.trace(model, (example,))
        return ct.convert(
            traced, inputs=[ct.TensorType(name="c2w", shape=(1, 4, 4), dtype=np.float32)], outputs=[ct.TensorType(name="rgb", dtype=np.float32)],
            convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
            compute_precision=ct.transform.FP16ComputePrecision(op_selector=fp16) if half else ct.precision.FLOAT32,
        )


def palettize(mlmodel: Any, bits: int) -> Any:
    import coremltools.optimize.coreml as cto

    # the convolutions only: a global config would also cluster the ray directions (and a detail student's planes)
    config = cto.OptimizationConfig(op_type_configs={"conv": cto.OpPalettizerConfig(mode="kmeans", nbits=bits, weight_threshold=512)})
    from mg3d.export.onnxmodel import quiet

    with quiet():
        return cto.palettize_weights(mlmodel, config)


def quantize_int8(mlmodel: Any) -> Any:
    import coremltools.optimize.coreml as cto

    config = cto.OptimizationConfig(op_type_configs={"conv": cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=512)})
    from mg3d.export.onnxmodel import quiet

    with quiet():
        return cto.linear_quantize_weights(mlmodel, config)


def describe(mlmodel: Any) -> dict[str, Any]:
    """Input/output names and shapes, op counts and the spec version, read from the model's spec."""
    spec = mlmodel.get_spec()

    def shape(feature: Any) -> list[int]:
        return [int(d) for d in feature.type.multiArrayType.shape]

    ops: dict[str, int] = {}
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                ops[op.type] = ops.get(op.type, 0) + 1
    return {
        "inputs": [{"name": f.name, "shape": shape(f)} for f in spec.description.input],
        "outputs": [{"name": f.name, "shape": shape(f)} for f in spec.description.output],
        "ops": dict(sorted(ops.items())),
        "spec_version": int(spec.specificationVersion),
    }


def check(mlmodel: Any, width: int, height: int) -> None:
    """Raise ExportError when the package does not have the promised interface."""
    from mg3d.export.onnxmodel import ExportError

    info = describe(mlmodel)
    expected = ([{"name": "c2w", "shape": [1, 4, 4]}], [{"name": "rgb", "shape": [1, 3, height, width]}])
    got = (info["inputs"], info["outputs"])
    # coremltools leaves the output shape empty when it is not declared; then only the name is checked
    if got[0] != expected[0] or [o["name"] for o in got[1]] != ["rgb"] or (got[1][0]["shape"] and got[1] != expected[1]):
        raise ExportError(f"the Core ML model has inputs {got[0]} and outputs {got[1]}, expected {expected[0]} -> {expected[1]}", hint="this is a bug in mg3d's Core ML export; please report it")


def can_predict() -> bool:
    return platform.system() == "Darwin"


def predict(mlmodel: Any, poses: np.ndarray) -> np.ndarray:
    """Images [N, 3, H, W] from Core ML (macOS only)."""
    return np.concatenate([np.asarray(mlmodel.predict({"c2w": p[None].astype(np.float32)})["rgb"]) for p in poses])
