"""Export: torch -> Q/DQ ONNX and the graph passes on the exported model."""
