"""Fake quantization for QAT: LSQ quantizers, quantized modules, model conversion, BN folding."""
