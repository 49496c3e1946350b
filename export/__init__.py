"""``mg3d.export``: ONNX export and simplification, verification against torch, fp16/int8 variants, Core ML,
Android and web bundles."""
