"""The ONNX export fused for ONNX Runtime (pipelines.inference.onnx_graph): faster kernels, the same answers.

On the tiny BERT: the exported graph runs ORT's fused Attention (fed the padding mask
as mask_index) and BiasGelu, its layer norms as Add + LayerNormalization (ORT's
SkipLayerNormalization is the slower kernel on CPU); the int8 variant quantizes the
fused attention's QKV projection (QAttention); both give torch's probabilities on
padded batches of very different lengths; and a graph the fusions break is kept plain.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from pipelines.inference import onnx_graph
from pipelines.inference.classifier import BACKENDS, CPU_ROWS_PER_PASS, InferenceSettings, load_classifier_from
from pipelines.inference.export import export_onnx, quantize_int8

pytestmark = pytest.mark.timeout(600)

# lengths from 0 to far past the max length, so that most rows of a batch are padding for some
TEXTS = ["", "Great!", "<br />", "A moving story with wonderful acting."] + [
    " ".join(["Dull, predictable and far too long."] * n) for n in (3, 10, 40, 120)
] + ["A wonderful film. " * 30 + "Awful ending. " * 5]


def op_counts(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from pipelines.text.model import load_classifier
    from pipelines.text.tokenization import load_tokenizer
    from tests.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("onnx-graph")
    source = build_tiny_model(root / "source")
    model, tokenizer = load_classifier(source), load_tokenizer(source)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    InferenceSettings(max_length=128, truncation="head_tail").save(root)
    export_onnx(model, tokenizer, root / "model.onnx")
    quantize_int8(root / "model.onnx", root / "model.int8.onnx")
    return root


def test_the_export_runs_ort_fused_kernels(folder):
    ops = op_counts(folder / "model.onnx")
    layers = 2  # tests/tiny_model.py
    assert ops["Attention"] == layers and ops["BiasGelu"] == layers, ops
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 1 + 2 * layers, ops  # embeddings + 2 a layer
    assert ops["Softmax"] == 0, "every attention is one fused op"
    graph = onnx.load(str(folder / "model.onnx")).graph
    for node in (n for n in graph.node if n.op_type == "Attention"):
        assert list(node.input)[3:] == [onnx_graph.MASK_AS_INDEX], "the padding mask goes in as mask_index"
        assert "qkv_hidden_sizes" not in {a.name for a in node.attribute}
    initializers = {i.name for i in graph.initializer}
    read = {name for node in graph.node for name in node.input}
    assert initializers <= read, "no initializer left that nothing reads (ORT warns about each)"


def test_int8_quantizes_the_attention_projections_too(folder):
    ops = op_counts(folder / "model.int8.onnx")
    assert ops["QAttention"] == 2 and ops["Attention"] == 0, ops
    assert ops["MatMulInteger"] >= 2 * 3, ops  # attention output + the two FFN matrices per layer


@pytest.mark.parametrize("backend, tolerance", [("onnx", 1e-5), ("onnx-int8", 0.05)])
def test_fused_graphs_answer_like_torch_on_padded_batches(folder, backend, tolerance):
    reference = load_classifier_from(folder, "torch").probabilities(TEXTS)
    fused = load_classifier_from(folder, backend)
    together = fused.probabilities(TEXTS)
    one_by_one = np.concatenate([fused.probabilities([text]) for text in TEXTS])
    np.testing.assert_allclose(together, reference, atol=tolerance)
    # padding must not change a row: the same text alone (no padding) and in the batch;
    # int8 runs a text per pass, so alone and in a batch are the same run
    np.testing.assert_allclose(together, one_by_one, atol=1e-5 if backend == "onnx" else 1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_passes_of_similar_lengths_answer_as_one_pass_in_the_callers_order(folder, backend):
    """On a CPU a call runs in passes of at most CPU_ROWS_PER_PASS texts, shortest first."""
    texts = TEXTS[::-1] + TEXTS  # lengths up and down: the passes reorder them
    one_pass = load_classifier_from(folder, backend)
    one_pass.rows_per_pass = 0
    in_passes = load_classifier_from(folder, backend)
    # this machine has no GPU; int8's activation scales span a pass: a text per pass
    assert in_passes.rows_per_pass == (1 if backend == "onnx-int8" else CPU_ROWS_PER_PASS)
    in_passes.rows_per_pass = 4
    shapes = []
    logits = in_passes.backend.logits
    in_passes.backend.logits = lambda ids, mask: shapes.append(ids.shape) or logits(ids, mask)

    np.testing.assert_allclose(in_passes.probabilities(texts), one_pass.probabilities(texts), atol=1e-5 if backend != "onnx-int8" else 0.02)
    assert [rows for rows, _ in shapes] == [4, 4, 4, 4, 2]
    widths = [width for _, width in shapes]
    assert widths == sorted(widths) and widths[0] < widths[-1], "each pass holds texts of similar length"


@pytest.mark.parametrize(("backend", "tolerance", "count"), [("torch", 1e-4, 150), ("onnx", 1e-4, 500), ("onnx-int8", 1e-6, 500)])
def test_a_texts_answer_does_not_depend_on_the_other_texts_of_its_batch(folder, backend, tolerance, count):
    """500 texts of every length (torch: 150, at 10 ms a call), alone and in random batches of 1 to 32: the same
    label, the same probabilities (int8: exactly, as each text runs in a pass of its own; the issue allows 1e-3)."""
    rng = np.random.default_rng(7)
    words = "good bad great awful moving dull film plot acting ending <br /> wonderful predictable long".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 200)))) for _ in range(count)]
    classifier = load_classifier_from(folder, backend)
    alone = np.concatenate([classifier.probabilities([text]) for text in texts])
    batched, start = [], 0
    while start < len(texts):
        size = int(rng.integers(1, 33))
        batched.append(classifier.probabilities(texts[start:start + size]))
        start += size
    batched = np.concatenate(batched)
    np.testing.assert_allclose(batched, alone, atol=tolerance)
    assert (batched.argmax(-1) == alone.argmax(-1)).all()


def test_a_graph_the_fusions_break_is_kept_plain(folder, tmp_path, monkeypatch):
    from pipelines.inference.classifier import Classifier, OnnxBackend
    from pipelines.text.model import load_classifier
    from pipelines.text.tokenization import load_tokenizer

    hf = str(folder / "hf")
    reference = load_classifier_from(folder, "torch")
    original_fuse = onnx_graph.fuse_for_ort

    def wrong_fusion(proto):  # a rewrite that changes the answers: must be refused
        fused, counts = original_fuse(proto)
        for initializer in fused.graph.initializer:
            if initializer.data_type == onnx.TensorProto.FLOAT and len(initializer.dims) == 2:
                array = onnx.numpy_helper.to_array(initializer) * 1.5
                initializer.CopyFrom(onnx.numpy_helper.from_array(array, initializer.name))
        return fused, counts

    def failing_fusion(proto):
        raise ValueError("a graph the rewriter does not know")

    for broken in (wrong_fusion, failing_fusion):
        plain = tmp_path / f"{broken.__name__}.onnx"
        monkeypatch.setattr(onnx_graph, "fuse_for_ort", broken)
        export_onnx(load_classifier(hf), load_tokenizer(hf), plain)
        ops = op_counts(plain)
        assert ops["Attention"] == 0 and ops["Softmax"] > 0, f"{broken.__name__}: the plain export was kept"
        kept = Classifier(reference.encoder, OnnxBackend(plain), reference.labels)
        np.testing.assert_allclose(kept.probabilities(TEXTS), reference.probabilities(TEXTS), atol=1e-5)
