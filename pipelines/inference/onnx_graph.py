"""The exported ONNX graph, made fast for ONNX Runtime before it is saved and quantized.

`torch.onnx.export(dynamo=True)` writes a graph of plain ONNX ops: every attention is a
dozen MatMul/Softmax/Transpose nodes, every layer norm and GELU a handful. ONNX
Runtime runs those one by one. Two rewrites make it run the encoder as ORT's own fused
kernels, which is where both the onnx and the int8 speed come from:

1. `onnxscript.rewriter.ort_fusions.optimize_for_ort`, the fusions made for dynamo
   exports: `Attention` (QKV projection + attention in one op), `SkipLayerNormalization`,
   `BiasGelu`. Then constants are folded, so each packed QKV weight is one initializer
   (the fusion leaves it a Concat of three, which the quantizer cannot read as a weight).
2. Each `Attention` takes the key-padding mask as ORT's `mask_index` (the model's own
   `attention_mask`, int32) instead of the additive bias the export computed from it,
   and loses the `qkv_hidden_sizes` attribute when Q, K and V are equally wide. Both are
   what ORT's quantizer needs to turn an `Attention` into a `QAttention`: without them
   the QKV projections, 3 of the 6 big matrix products of a layer, stay float.
3. Each `SkipLayerNormalization` goes back to `Add(input, bias)`, `Add(skip)` and a
   standard `LayerNormalization`: ORT 1.32's CPU kernel for the fused op is about 4x
   slower than the three (6.8 against 1.8 ms for a (16, 256, 384) batch on one thread;
   the int8 model's forward pass 26.2 -> 22.1 ms per review of 256 tokens). Sessions are
   opened with ORT's own `SkipLayerNormFusion` off (pipelines.inference.classifier.OnnxBackend),
   which would fuse them again.

Each step is checked: the rewritten graph must give the plain export's logits on a
padded example batch, else the plain graph is kept and the reason logged. Only graphs
with one `attention_mask` input are rewritten in step 2 (a BERT-style encoder).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
MASK_INPUT = "attention_mask"
MASK_AS_INDEX = "attention_mask_int32"
FOLD_LIMIT = 1 << 26  # elements: large enough for any packed QKV weight of a BERT-size model
MAX_LOGIT_DIFF = 1e-3  # fp32 fusions change sums' order, not results
ORT_FUSIONS_OFF = ["SkipLayerNormFusion"]  # step 3 undone by ORT at session start otherwise


def fuse_for_ort(model_proto):
    """(fused model proto, fusion counts). Raises whatever onnxscript raises on a graph it cannot read."""
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.serde.deserialize_model(model_proto)
    model, counts = optimize_for_ort(model)
    onnxscript.optimizer.optimize(model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT)
    return ir.serde.serialize_model(model), {name: count for name, count in counts.items() if count}


def mask_as_index(model_proto) -> int:
    """Feed every fused Attention the padding mask as mask_index, in place; returns how many."""
    from onnx import TensorProto, helper

    graph = model_proto.graph
    if MASK_INPUT not in {i.name for i in graph.input}:
        return 0
    attentions = [n for n in graph.node if n.op_type == "Attention" and n.domain == "com.microsoft"]
    rewired = 0
    for node in attentions:
        inputs = list(node.input)
        sizes = next((a for a in node.attribute if a.name == "qkv_hidden_sizes"), None)
        if len(inputs) < 3 or any(inputs[4:5]) or (sizes is not None and len(set(sizes.ints)) != 1):
            continue  # a past state, or Q/K/V of different widths: leave it as fused
        if sizes is not None:
            node.attribute.remove(sizes)
        del node.input[:]
        node.input.extend(inputs[:3] + [MASK_AS_INDEX])
        rewired += 1
    if rewired:
        graph.node.insert(0, helper.make_node("Cast", [MASK_INPUT], [MASK_AS_INDEX], to=TensorProto.INT32, name="attention_mask_as_index"))
    return rewired


def skip_layer_norms_as_add_and_layer_norm(model_proto) -> int:
    """Replace every SkipLayerNormalization whose mean/inverse-std outputs nothing reads by
    Add(input, bias) -> Add(skip) -> LayerNormalization, in place; returns how many."""
    from onnx import helper

    graph = model_proto.graph
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    nodes, replaced = [], 0
    for node in graph.node:
        inputs = list(node.input) + [""] * (5 - len(node.input))  # input, skip, gamma, beta, bias
        outputs = list(node.output) + [""] * (4 - len(node.output))  # output, mean, inv_std, input+skip+bias
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft" or read & set(filter(None, outputs[1:3])):
            nodes.append(node)
            continue
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        first, total = inputs[0], outputs[3] if outputs[3] in read else f"{node.name}_sum"
        if inputs[4]:
            first = f"{node.name}_biased"
            nodes.append(helper.make_node("Add", [inputs[0], inputs[4]], [first], name=f"{node.name}_bias"))
        nodes.append(helper.make_node("Add", [first, inputs[1]], [total], name=f"{node.name}_skip"))
        norm_inputs = [total, inputs[2]] + ([inputs[3]] if inputs[3] else [])
        nodes.append(helper.make_node("LayerNormalization", norm_inputs, [outputs[0]], name=f"{node.name}_norm", axis=-1, epsilon=epsilon))
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return replaced


def without_unused(model_proto):
    """The model without the nodes and initializers nothing reads any more (the bias
    computation mask_as_index replaced): ORT would warn about each at every session start."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    model = ir.serde.deserialize_model(model_proto)
    RemoveUnusedNodesPass()(model)
    return ir.serde.serialize_model(model)


def logits(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"], disabled_optimizers=ORT_FUSIONS_OFF)
    return session.run(["logits"], feeds)[0]


def optimize_exported(path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Rewrite the exported graph at `path` in place for ORT; returns what was fused ({} = kept plain)."""
    import onnx

    path = Path(path)
    plain = onnx.load(str(path))
    expected = logits(plain.SerializeToString(), feeds)
    try:
        fused, counts = fuse_for_ort(plain)
        counts["attention_mask_index"] = mask_as_index(fused)
        counts["skip_layer_norm_unfused"] = skip_layer_norms_as_add_and_layer_norm(fused)
        fused_bytes = without_unused(fused).SerializeToString()
        difference = float(np.abs(logits(fused_bytes, feeds) - expected).max())
    except Exception as exc:  # a graph the fusions do not know: the plain export still runs
        log.warning("ONNX graph kept unfused: the ORT fusions failed (%s: %s)", type(exc).__name__, exc)
        return {}
    if not difference <= MAX_LOGIT_DIFF:
        log.warning("ONNX graph kept unfused: the fused graph's logits differ by %.2g (over %g)", difference, MAX_LOGIT_DIFF)
        return {}
    path.write_bytes(fused_bytes)
    log.info("ONNX graph fused for ONNX Runtime: %s (logits within %.1g)", counts, difference)
    return counts
