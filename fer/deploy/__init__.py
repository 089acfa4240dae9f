"""Deployment: exports (SavedModel, TFLite, ONNX) that check themselves (`export`), running an
export (`exported`), and size and latency figures (`latency`)."""
