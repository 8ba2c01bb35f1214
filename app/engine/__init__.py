"""Runs and checks a spec: the engines (ONNX Runtime, OpenVINO, Keras), the runner (length
buckets, right padding, true lengths), the choice of engine and the parity self-check."""
