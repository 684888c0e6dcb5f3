"""qkd-deploy: knowledge distillation inside quantization-aware training, exported as Q/DQ ONNX."""

__version__ = "0.1.0"
