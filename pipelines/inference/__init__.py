"""Inference without Ray or Serve (classifier backends, ONNX export), the registered model's variants and pyfunc wrapper, and batch prediction on Ray Data."""
