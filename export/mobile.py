"""Which parts of an ONNX model the mobile delegates take: NNAPI (Android), Core ML ML Program (the ORT
Core ML EP on iOS) and XNNPACK, counted the way onnxruntime's ``check_onnx_model_mobile_usability`` does.

NNAPI and Core ML use onnxruntime's own operator tables and partitioning rules (from its mobile helper).
onnxruntime ships no such table for XNNPACK; its coverage is counted from the operators the XNNPACK EP
implements (``XNNPACK_OPS``), so it is labelled an estimate.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

#: Operators the XNNPACK execution provider implements (fp32 and QDQ groups around them). Everything else
#: runs on the CPU EP on the same cores, so XNNPACK has no copy cost at partition borders.
XNNPACK_OPS = ("AveragePool", "Conv", "ConvTranspose", "Gemm", "MatMul", "MaxPool", "Resize", "Softmax", "QuantizeLinear", "DequantizeLinear")


def delegate_coverage(onnx_path: Path) -> dict[str, dict[str, Any]]:
    """Nodes, supported nodes, fraction and partitions for NNAPI, Core ML (ML Program) and XNNPACK."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    from mg3d.export.onnxmodel import quiet

    with tempfile.TemporaryDirectory() as tmp, quiet():
        # like the tool: look at the graph after onnxruntime's basic optimizations (what a mobile session runs)
        optimized = Path(tmp) / "basic.onnx"
        optimize_model(Path(onnx_path), optimized, use_external_initializers=False)
        model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
        table = Path(tmp) / "xnnpack_ops.md"
        table.write_text("|Operator|Note|\n|--------|------|\n" + "".join(f"|ai.onnx:{op}||\n" for op in XNNPACK_OPS))
        infos = {
            "nnapi": uc.check_nnapi_partitions(model, True),
            "coreml_mlprogram": uc.check_coreml_partitions(model, True, "coreml_supported_mlprogram_ops.md"),
            "xnnpack": uc._check_ep_partitioning(model, table, True),
        }
    report = {}
    for name, info in infos.items():
        report[name] = {
            "nodes": info.num_nodes,
            "supported_nodes": info.num_supported_nodes,
            "fraction": round(info.num_supported_nodes / max(info.num_nodes, 1), 4),
            "partitions": info.num_partitions,
            "unsupported_ops": sorted(op.split(":")[-1] for op in info.unsupported_ops),
            "verdict": info.suitability().name if name != "xnnpack" else "estimate",
        }
    return report
