"""Torch-free model runners: ONNX Runtime and TensorRT behind one ``Runner`` interface."""

from qkd_deploy.runtime.base import Runner

__all__ = ["Runner"]
