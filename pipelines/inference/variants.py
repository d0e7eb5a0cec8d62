"""At registration: the model folder every consumer loads, its ONNX and int8 variants, and their scores.

The folder (logged as the pyfunc model's `model` artifact, pipelines.inference.pyfunc_model):

    hf/                 the trained model and its tokenizer (Hugging Face format)
    inference.json      max_length, truncation, labels: how training read a text
    model.onnx          the same graph for ONNX Runtime
    model.int8.onnx     with dynamically quantized int8 weights
    variants.json       each backend's test accuracy, agreement with torch, speed, usable

A variant whose accuracy falls more than `MAX_ACCURACY_DROP` below torch's is marked
unusable and is never chosen by default; the default is the fastest usable one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipelines.core import console
from pipelines.core.errors import ConfigError
from pipelines.inference.classifier import BACKENDS, ONNX_FILE, InferenceSettings, load_classifier_from
from pipelines.inference.export import export_onnx, quantize_int8

log = logging.getLogger(__name__)
VARIANTS_FILE = "variants.json"
MAX_ACCURACY_DROP = 0.005  # 0.5 points of accuracy
EVAL_BATCH = 32
# test rows scored per backend at registration: all of the sample corpus's, a stratified
# share of IMDB's 25,000 (three backends over all of them would take longer than training)
MAX_EVAL_ROWS = 2000


@dataclass(frozen=True)
class VariantScore:
    backend: str
    accuracy: float
    agreement: float  # share of texts whose label equals the torch model's
    texts_per_s: float
    usable: bool
    rows: int

    def tags(self) -> dict[str, str]:
        prefix = f"backend.{self.backend}"
        return {
            f"{prefix}.accuracy": f"{self.accuracy:.4f}",
            f"{prefix}.agreement": f"{self.agreement:.4f}",
            f"{prefix}.texts_per_s": f"{self.texts_per_s:.1f}",
            f"{prefix}.usable": str(self.usable).lower(),
        }


def build_model_folder(model_dir: str, tokenizer_path: str, settings: InferenceSettings, folder: Path, onnx: bool = True) -> Path:
    """Write hf/, inference.json and (with `onnx`) model.onnx and model.int8.onnx into `folder`."""
    from pipelines.text.model import load_classifier
    from pipelines.text.tokenization import load_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_classifier(model_dir), load_tokenizer(tokenizer_path)
    model.save_pretrained(folder / "hf", safe_serialization=True)
    tokenizer.save_pretrained(folder / "hf")
    settings.save(folder)
    if onnx:
        onnx_path = export_onnx(model, tokenizer, folder / ONNX_FILE["onnx"])
        quantize_int8(onnx_path, folder / ONNX_FILE["onnx-int8"])
    return folder


def built_backends(folder: Path) -> tuple[str, ...]:
    """The backends a model folder holds: torch always, each ONNX variant whose file is there."""
    return tuple(b for b in BACKENDS if b == "torch" or (Path(folder) / ONNX_FILE[b]).exists())


def evaluation_sample(texts: list[str], labels: list[int], max_rows: int = MAX_EVAL_ROWS, seed: int = 0) -> tuple[list[str], list[int]]:
    """At most `max_rows` rows, the same share of each label as the whole split."""
    if len(texts) <= max_rows:
        return list(texts), list(labels)
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    keep = []
    for label in np.unique(labels_array):
        rows = np.flatnonzero(labels_array == label)
        keep += rng.choice(rows, size=round(max_rows * len(rows) / len(labels_array)), replace=False).tolist()
    keep.sort()
    return [texts[i] for i in keep], [int(labels_array[i]) for i in keep]


def score_variants(folder: Path, texts: list[str], labels: list[int], threads: int | None = None) -> list[VariantScore]:
    """Each backend's accuracy, agreement with torch and texts/s on the same texts, in batches of 32."""
    predictions, speeds = {}, {}
    backends = built_backends(folder)
    for backend in backends:
        classifier = load_classifier_from(folder, backend, threads=threads)
        classifier.probabilities(texts[:2])  # warm-up: allocator, kernel choice
        start, labels_out = time.perf_counter(), []
        with console.progress(len(texts), f"score {backend}", unit="reviews") as progress:
            for first in range(0, len(texts), EVAL_BATCH):
                labels_out.append(classifier.probabilities(texts[first:first + EVAL_BATCH]).argmax(axis=-1))
                progress.update(len(labels_out[-1]))
        speeds[backend] = len(texts) / max(time.perf_counter() - start, 1e-9)
        predictions[backend] = np.concatenate(labels_out) if labels_out else np.zeros(0, dtype=np.int64)
    truth = np.asarray(labels)
    torch_accuracy = float((predictions["torch"] == truth).mean()) if len(truth) else float("nan")
    scores = []
    for backend in backends:
        accuracy = float((predictions[backend] == truth).mean()) if len(truth) else float("nan")
        agreement = float((predictions[backend] == predictions["torch"]).mean()) if len(truth) else float("nan")
        usable = backend == "torch" or (len(truth) > 0 and accuracy >= torch_accuracy - MAX_ACCURACY_DROP - 1e-12)
        scores.append(VariantScore(backend, accuracy, agreement, speeds[backend], usable, len(truth)))
    return scores


def default_backend(scores: list[VariantScore]) -> str:
    """The fastest backend whose accuracy check passed (torch always passes)."""
    return max((s for s in scores if s.usable), key=lambda s: s.texts_per_s).backend


def save_scores(folder: Path, scores: list[VariantScore]) -> None:
    payload = {"default_backend": default_backend(scores), "max_accuracy_drop": MAX_ACCURACY_DROP, "variants": [asdict(s) for s in scores]}
    (folder / VARIANTS_FILE).write_text(json.dumps(payload, indent=2))


def load_scores(folder: Path) -> dict:
    """variants.json, or (a folder scored by hand) only torch as usable."""
    path = Path(folder) / VARIANTS_FILE
    if not path.exists():
        return {"default_backend": "torch", "variants": [{"backend": "torch", "usable": True}]}
    return json.loads(path.read_text())


def choose_backend(requested: str, tags: dict, what: str, on_gpu: bool = False) -> str:
    """`auto` -> the version's default backend (the fastest whose accuracy check passed, measured
    on a CPU at registration), or on a GPU the GPU backend (`gpu_backend`); a named one is
    refused when registration marked it unusable."""
    if requested not in ("auto", *BACKENDS):
        raise ConfigError(f"backend {requested!r} is not one of auto, {', '.join(BACKENDS)}")
    if requested == "auto":
        return gpu_backend(tags) if on_gpu else tags.get("backend.default", "torch")
    if on_gpu and requested == "onnx-int8":
        log.warning("%s: backend onnx-int8 runs on the CPU although this replica has a GPU (asked for by name)", what)
    if requested != "torch" and "backend.default" in tags and f"backend.{requested}.usable" not in tags:
        raise ConfigError(f"backend {requested} is not in {what}: it was registered with --no-onnx-variants (torch only)")
    if tags.get(f"backend.{requested}.usable") == "false":
        raise ConfigError(
            f"backend {requested} of {what} is marked unusable: accuracy {tags.get(f'backend.{requested}.accuracy')} "
            f"vs torch {tags.get('backend.torch.accuracy')} (more than 0.5 points lower)"
        )
    return requested


def gpu_backend(tags: dict) -> str:
    """On a GPU: ONNX Runtime's CUDA provider where it is installed and the onnx variant passed its
    check, else torch; never int8, which ONNX Runtime runs on the CPU only (beside an idle GPU)."""
    if tags.get("backend.onnx.usable") == "true" and cuda_onnx_runtime():
        return "onnx"
    return "torch"


def cuda_onnx_runtime() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()
