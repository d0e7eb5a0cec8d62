"""Build time: the trained model exported to ONNX (logits only) and its weights quantized to int8."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ONNX_OPSET = 18


def _logits_module(model):
    """The HF model as (input_ids, attention_mask) -> logits: one named output to export."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    return LogitsOnly(model)


def export_onnx(model, tokenizer, path: str | Path) -> Path:
    """`torch.onnx.export` with the dynamo exporter (torch's supported path; Optimum would add a
    dependency for the same graph), dynamic batch and sequence axes, then fused for ONNX
    Runtime (pipelines.inference.onnx_graph) and checked against the plain export's logits."""
    import torch

    from pipelines.inference.onnx_graph import optimize_exported

    model = model.eval().to("cpu")
    # padded on purpose: the fused graph is checked on a batch whose mask matters
    example = tokenizer(["A moving story.", "Dull and far too long. " * 20], padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=model.config.max_position_embeddings)
    path = Path(path)
    os.environ.setdefault("TORCH_ONNX_VERBOSE", "0")
    torch.onnx.export(
        _logits_module(model).eval(),
        (example["input_ids"], example["attention_mask"]),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
        opset_version=ONNX_OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    feeds = {name: example[name].numpy().astype(np.int64) for name in ("input_ids", "attention_mask")}
    optimize_exported(path, feeds)
    return path


def quantize_int8(onnx_path: str | Path, path: str | Path) -> Path:
    """Dynamic int8 quantization: the weights of MatMul/Gemm and of the fused Attention's QKV
    projection (a QAttention), per output channel (closer to fp32 than one scale per matrix,
    at the same speed); activations are quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(onnx_path), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm", "Attention"], per_channel=True
    )
    return Path(path)
