"""Inference without Ray or Serve: texts -> the training's preprocessing -> a backend -> labels.

One `Classifier` = one `TextEncoder` (the dataset's `clean_text`, head(+tail)
truncation to the run's `max_length`, special tokens; the same steps training saw)
and one backend:

- `torch`: the Hugging Face model, as trained;
- `onnx`: the same graph exported with `torch.onnx`, its attention and GELUs fused into
  ONNX Runtime's own kernels (pipelines.inference.onnx_graph), run by ONNX Runtime;
- `onnx-int8`: that graph with dynamically quantized int8 weights (MatMul/Gemm and the
  fused attention's QKV projection), about 4x smaller and, on CPUs with VNNI/AMX, about
  2x faster again, at a small accuracy cost that registration measures
  (pipelines.inference.variants) before the variant may be served. Its activations are
  quantized with a scale computed over the whole input of a run, so it runs one text per
  pass: a text's answer must not depend on which other users' texts share its batch.

The pyfunc model in MLflow (pipelines.inference.pyfunc_model), batch prediction and the Serve
replicas all call this, so they return the same labels for the same texts. It runs
with torch, transformers and onnxruntime alone: a GPU check can time it bare.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pipelines.text.cleaning import clean_text
from pipelines.text.model import LABEL_NAMES
from pipelines.text.tokenization import special_token_frame, truncate

BACKENDS = ("torch", "onnx", "onnx-int8")
# texts per forward pass on a CPU (Classifier). bench/forward_pass.py, MiniLM at max length
# 256, batches of 32 review-length texts, 2-core AMD EPYC: passes of 4 sorted by length gave
# 1.38x (torch), 1.12x (onnx), 1.30x (onnx-int8) the texts/s of one pass of 32 on 1 thread,
# 1.28x, 1.16x, 1.12x on 2 threads; 2 to 4 was best for every backend
CPU_ROWS_PER_PASS = 4
ONNX_FILE = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
SETTINGS_FILE = "inference.json"


@dataclass(frozen=True)
class InferenceSettings:
    """What a registered model needs to read a text as its training run did."""

    max_length: int
    truncation: str
    labels: tuple[str, ...] = tuple(LABEL_NAMES[i] for i in sorted(LABEL_NAMES))

    def save(self, folder: Path) -> Path:
        path = Path(folder) / SETTINGS_FILE
        path.write_text(json.dumps({**asdict(self), "labels": list(self.labels)}, indent=2))
        return path

    @classmethod
    def load(cls, folder: Path) -> "InferenceSettings":
        payload = json.loads((Path(folder) / SETTINGS_FILE).read_text())
        return cls(max_length=int(payload["max_length"]), truncation=payload["truncation"], labels=tuple(payload["labels"]))


class TextEncoder:
    """Texts -> padded token ids (B, T) and attention mask, as training tokenized them."""

    def __init__(self, tokenizer, max_length: int, truncation: str):
        self.tokenizer = tokenizer
        self.prefix, self.suffix = special_token_frame(tokenizer)
        self.budget = max_length - len(self.prefix) - len(self.suffix)
        self.truncation = truncation
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        cleaned = [clean_text(text) for text in texts]
        encoded = self.tokenizer(cleaned, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return [self.prefix + truncate(ids, self.budget, self.truncation) + self.suffix for ids in encoded]

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int64 (B, T), padded to the batch's longest text."""
        return self.pad(self.token_ids(texts))

    def pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Token id rows -> (input_ids, attention_mask), padded to the longest row."""
        width = max((len(row) for row in rows), default=0)
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask


class Backend(Protocol):
    name: str
    on_cpu: bool
    device: str  # where the forward pass runs ("cpu", "cuda", "cuda:0"): what /v1/model reports

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class TorchBackend:
    name = "torch"

    def __init__(self, model, device=None):
        import torch

        self.torch_device = device or torch.device("cpu")
        self.model = model.to(self.torch_device).eval()
        self.on_cpu = self.torch_device.type == "cpu"
        self.device = str(self.torch_device)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.torch_device)
            mask = torch.from_numpy(attention_mask).to(self.torch_device)
            return self.model(input_ids=ids, attention_mask=mask).logits.float().cpu().numpy()


class OnnxBackend:
    """An ONNX Runtime session; CUDA when onnxruntime-gpu and a GPU are there, else CPU."""

    def __init__(self, path: str | Path, name: str = "onnx", threads: int | None = None):
        import onnxruntime as ort

        from pipelines.inference.onnx_graph import ORT_FUSIONS_OFF

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if name == "onnx" else ["CPUExecutionProvider"]
        providers = [p for p in wanted if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers, disabled_optimizers=ORT_FUSIONS_OFF)
        self.name = name
        self.on_cpu = "CUDAExecutionProvider" not in self.session.get_providers()
        self.device = "cpu" if self.on_cpu else "cuda"
        # dynamic quantization: each run's activation scale comes from all of its rows
        self.scales_span_the_pass = name == "onnx-int8"

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]


def default_rows_per_pass(backend: Backend) -> int:
    """1 where a pass's rows would share activation scales; CPU_ROWS_PER_PASS on a CPU; 0 (all) on a GPU."""
    if getattr(backend, "scales_span_the_pass", False):
        return 1
    return CPU_ROWS_PER_PASS if getattr(backend, "on_cpu", False) else 0


class Classifier:
    """Texts -> class probabilities and labels, through one encoder and one backend.

    On a CPU, a call's texts run in passes of at most `rows_per_pass`, texts of similar
    length together: less padding, and activations that stay in the CPU's caches (on a
    GPU, one pass: a larger batch is what keeps it busy). A backend whose activation
    scales span a pass (dynamic int8) runs one text per pass, each at its own length:
    then a text gets the same answer alone and in any batch. On a CPU that costs nothing:
    bench/forward_pass.py measured one text per pass as the fastest int8 layout.
    """

    def __init__(self, encoder: TextEncoder, backend: Backend, labels: tuple[str, ...], rows_per_pass: int | None = None):
        self.encoder, self.backend, self.labels = encoder, backend, tuple(labels)
        if rows_per_pass is None:
            rows_per_pass = default_rows_per_pass(backend)
        self.rows_per_pass = rows_per_pass  # 0: every text of a call in one pass

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(B, num_labels) float32, rows summing to 1."""
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        logits = self.logits(self.encoder.token_ids(texts)).astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)  # a stable softmax
        exp = np.exp(logits)
        return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)

    def logits(self, rows: list[list[int]]) -> np.ndarray:
        """(B, num_labels) logits of token id rows, in their order."""
        if not self.rows_per_pass or len(rows) <= self.rows_per_pass:
            return self.backend.logits(*self.encoder.pad(rows))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        passes = [order[start : start + self.rows_per_pass] for start in range(0, len(order), self.rows_per_pass)]
        out = [(chunk, self.backend.logits(*self.encoder.pad([rows[i] for i in chunk]))) for chunk in passes]
        logits = np.empty((len(rows), out[0][1].shape[-1]), dtype=out[0][1].dtype)
        for chunk, values in out:
            logits[chunk] = values
        return logits

    def predict(self, texts: list[str]) -> list[dict]:
        """For each text: label, label id, its probability, and every class's probability."""
        probs = self.probabilities(texts)
        best = probs.argmax(axis=-1) if len(probs) else np.zeros(0, dtype=np.int64)
        return [
            {
                "label": self.labels[int(b)],
                "label_id": int(b),
                "score": float(row[b]),
                "probabilities": {label: float(p) for label, p in zip(self.labels, row)},
            }
            for row, b in zip(probs.tolist(), best.tolist())
        ]


def load_classifier_from(folder: str | Path, backend: str = "torch", threads: int | None = None, device=None) -> Classifier:
    """A classifier from a model folder as registration writes it (pipelines.inference.variants):
    `hf/` (model + tokenizer), `inference.json`, and `model.onnx` / `model.int8.onnx`."""
    from pipelines.text.tokenization import load_tokenizer

    if backend not in BACKENDS:
        from pipelines.core.errors import ConfigError

        raise ConfigError(f"backend {backend!r} is not one of {BACKENDS}")
    folder = Path(folder)
    settings = InferenceSettings.load(folder)
    tokenizer = load_tokenizer(str(folder / "hf"))
    encoder = TextEncoder(tokenizer, settings.max_length, settings.truncation)
    if backend == "torch":
        import torch

        from pipelines.text.model import load_classifier

        if threads:
            torch.set_num_threads(threads)
        return Classifier(encoder, TorchBackend(load_classifier(str(folder / "hf")), device), settings.labels)
    if not (folder / ONNX_FILE[backend]).exists():
        from pipelines.core.errors import ConfigError

        raise ConfigError(f"backend {backend} is not in the model folder {folder}: it was registered with --no-onnx-variants (torch only)")
    return Classifier(encoder, OnnxBackend(folder / ONNX_FILE[backend], backend, threads), settings.labels)
