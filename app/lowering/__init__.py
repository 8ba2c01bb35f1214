"""Lowered forms of a ModelSpec: the ONNX graph the serving engines run, the Keras 3 model,
and exports."""
