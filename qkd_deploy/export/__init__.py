"""Export: torch -> Q/DQ ONNX, graph passes, TensorRT lint and engines, deploy bundles."""
