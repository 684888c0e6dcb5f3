"""The torch-free deploy side: the Q/DQ linter, TensorRT engine building and deploy bundles.

Everything here imports without torch (a Jetson often has none): the standard library, numpy,
onnx, onnxruntime, and tensorrt inside the functions that build engines.
"""
