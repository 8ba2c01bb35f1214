"""Lowered forms of a ModelSpec: the ONNX graph the serving engine runs, and exports."""
