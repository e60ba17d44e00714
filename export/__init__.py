"""SpanRT export stage: checkpoint -> verified ONNX -> INT8/FP16 -> TensorRT, as one bundle.

Importing this package is cheap: torch, transformers, onnx and tensorrt are imported by the
submodules that need them, when they are called.
"""
