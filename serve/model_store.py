"""The model-serving core, without Serve: find a registered version, load it once, predict batches.

- `ModelSelector` names what to serve: `models:/<name>@<alias>` (the default alias is
  `champion`) or a pinned `models:/<name>/<version>`.
- `LoadedModel` is one version in memory: model, tokenizer, and the preprocessing that
  training used (the dataset's `clean_text`, the run's `max_length` and `truncation`
  params, head+tail truncation from `pipelines.text.tokenization`), so a served review is
  cleaned and cut exactly like a trained one.
  It is warmed up before anyone calls it.
- `ModelStore` resolves a selector through the registry and hot-swaps versions: the new
  one is loaded and warmed completely before a single reference moves, so batches that
  already hold the old model finish on it and no request ever sees a half-loaded model.

The Serve deployment (serve/app.py) wraps this; tests and the benchmark use it as is.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.core.errors import ConfigError, PlatformError
from pipelines.inference.classifier import Classifier, TextEncoder, TorchBackend, load_classifier_from
from pipelines.inference.variants import choose_backend
from pipelines.text.model import LABEL_NAMES
from pipelines.text.tokenization import TRUNCATION_MODES
from pipelines.tracking import store_uri
from pipelines.tracking.registry import CHAMPION

log = logging.getLogger(__name__)

# Used when a version's run has no `max_length` / `truncation` params (a model
# registered by hand): the training defaults of pipelines.training.settings.TrainConfig.
DEFAULT_MAX_LENGTH = 256
DEFAULT_TRUNCATION = "head_tail"
# A short and a full-length batch: the first calls of a fresh model pay for
# allocator growth and kernel selection; warm-up pays it before readiness.
WARMUP_TEXTS = ("A moving story with wonderful acting.", "Dull, predictable and far too long. " * 200)


class ModelNotFound(PlatformError):
    """The registry has no such model, alias or version."""


@dataclass(frozen=True)
class ModelSelector:
    """Which registered version to serve: an alias (moves over time) or a pinned version."""

    name: str
    alias: str | None = CHAMPION
    version: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model name must not be empty")
        if self.version is not None:
            if not str(self.version).isdigit():
                raise ConfigError(f"model version must be a positive integer, got {self.version!r}")
            object.__setattr__(self, "version", str(int(self.version)))
            object.__setattr__(self, "alias", None)  # a pinned version ignores any alias
        elif not self.alias:
            raise ConfigError("give a model alias (e.g. champion) or a version")

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else f"models:/{self.name}@{self.alias}"

    @property
    def follows_alias(self) -> bool:
        return self.version is None


@dataclass
class LoadedModel:
    """One registered version in memory, ready to classify batches of texts.

    `classifier` (pipelines.inference.classifier) holds the preprocessing and the backend chosen
    for this deployment. Given a torch `model` and `tokenizer` instead (a version
    registered before the pyfunc format, or a test), it is built from them.
    """

    name: str
    version: str
    run_id: str | None
    classifier: Classifier | None = None
    model: Any = None
    tokenizer: Any = None
    max_length: int = DEFAULT_MAX_LENGTH
    truncation: str = DEFAULT_TRUNCATION
    device: torch.device | None = None
    backend: str = "torch"
    test_metrics: dict[str, float] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    loaded_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.classifier is None:
            id2label = getattr(self.model.config, "id2label", None) or LABEL_NAMES
            labels = tuple(str(id2label.get(i, id2label.get(str(i), i))) for i in range(self.model.config.num_labels))
            encoder = TextEncoder(self.tokenizer, self.max_length, self.truncation)
            self.classifier = Classifier(encoder, TorchBackend(self.model, self.device or torch.device("cpu")), labels)
        self.labels = list(self.classifier.labels)
        self.max_length = self.classifier.encoder.budget + len(self.classifier.encoder.prefix) + len(self.classifier.encoder.suffix)
        self.truncation = self.classifier.encoder.truncation

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text as training saw it: cleaned like the dataset (markup, entities, unicode,
        whitespace), then special tokens around a head(+tail) cut of `max_length`."""
        return self.classifier.encoder.token_ids(texts)

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(B, num_labels) float32 class probabilities; one tokenizer call and one forward pass."""
        return self.classifier.probabilities(texts)

    def predict(self, texts: list[str]) -> list[dict]:
        """For each text: label, its probability, every class's probability, and who answered."""
        return [
            {
                "label": p["label"],
                "score": p["score"],
                "probabilities": p["probabilities"],
                "model_name": self.name,
                "model_version": self.version,
            }
            for p in self.classifier.predict(texts)
        ]

    def warm_up(self) -> float:
        """Run a short and a full-length batch; returns the seconds it took."""
        start = time.perf_counter()
        self.predict(list(WARMUP_TEXTS))
        self.predict([WARMUP_TEXTS[0]])
        return time.perf_counter() - start

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "aliases": list(self.aliases),
            "uri": f"models:/{self.name}/{self.version}",
            "labels": list(self.labels),
            "max_length": self.max_length,
            "truncation": self.truncation,
            "backend": self.backend,
            "test_metrics": dict(self.test_metrics),
            "device": self.classifier.backend.device,  # where it runs: int8 stays on the CPU of a GPU replica
            "loaded_at": self.loaded_at,
        }


def pick_device() -> torch.device:
    """The GPU when Ray gave this process one, else CPU.

    Not `torch.cuda.is_available()` alone: a replica that asked Ray for no GPU still sees the
    node's GPUs, and one of them may be a training worker's (cluster.yaml: the head has no
    CPUs for Serve, so CPU replicas land on GPU nodes). Outside Ray (a bare benchmark): whatever torch sees.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    import ray

    if ray.is_initialized() and not ray.get_gpu_ids():
        return torch.device("cpu")
    return torch.device("cuda")


class ModelStore:
    """Resolves selectors in the MLflow registry and holds the model being served.

    `current` is a single reference: readers take it once per batch, `swap_to`
    replaces it only after the new model is loaded and warm.
    """

    def __init__(self, storage: str | None = None, tracking_uri: str | None = None, device: torch.device | None = None):
        from pipelines.core.storage import default_storage

        # Sets MLflow's process-wide tracking and registry URIs: load_model resolves
        # models:/ URIs through them.
        self.tracking_uri, _ = store_uri.configure(storage or default_storage(), tracking_uri)
        self.client = MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)
        self.device = device or pick_device()
        self.backend = "auto"  # the deployment's user_config.backend
        self.threads: int | None = None  # intra-op threads for the backend (the replica's CPUs)
        self._current: LoadedModel | None = None
        self._swap_lock = threading.Lock()  # one load at a time (registry poll vs reconfigure)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def resolve(self, selector: ModelSelector):
        """The ModelVersion the selector points at now."""
        try:
            if selector.follows_alias:
                return self.client.get_model_version_by_alias(selector.name, selector.alias)
            return self.client.get_model_version(selector.name, selector.version)
        except MlflowException as exc:
            raise ModelNotFound(
                f"{selector.uri} not found in the registry at {self.tracking_uri} ({exc.error_code}). "
                "Train and register a model first (make train), or name an existing alias or version."
            ) from exc

    def load(self, model_version, backend: str = "auto") -> LoadedModel:
        """Load and warm one version with `backend` (seconds to minutes: never call it per request).

        A version registered as the platform's pyfunc brings its model folder
        (pipelines.inference.variants): `auto` takes its default backend, and a backend marked
        unusable is refused. An older version (transformers flavor) runs on torch.
        """
        import mlflow

        name, version = model_version.name, str(model_version.version)
        params, metrics = {}, {}
        if model_version.run_id:
            try:
                run = self.client.get_run(model_version.run_id)
                params, metrics = run.data.params, run.data.metrics
            except MlflowException as exc:
                log.warning("run %s of %s v%s is unreadable (%s): default tokenization", model_version.run_id, name, version, exc)
        max_length = int(params.get("max_length", DEFAULT_MAX_LENGTH))
        truncation = params.get("truncation", DEFAULT_TRUNCATION)
        if truncation not in TRUNCATION_MODES:
            raise ConfigError(f"{name} v{version}: run param truncation={truncation!r} is not one of {TRUNCATION_MODES}")
        start = time.perf_counter()
        common = dict(name=name, version=version, run_id=model_version.run_id, device=self.device,
                      test_metrics={k: float(v) for k, v in metrics.items() if k.startswith("test/")},
                      aliases=list(getattr(model_version, "aliases", []) or []))
        # mlflow copies the artifacts to a local folder first: give it a private one
        # so that concurrent replicas on one node never share a half-written copy.
        with tempfile.TemporaryDirectory(prefix="serve-model-") as scratch:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=scratch)
            folder = os.path.join(local, "artifacts", "model")
            if os.path.exists(os.path.join(folder, "inference.json")):
                chosen = choose_backend(backend, getattr(model_version, "tags", None) or {}, f"{name} v{version}", on_gpu=self.on_gpu)
                classifier = load_classifier_from(folder, chosen, threads=self.threads, device=self.device)
                loaded = LoadedModel(classifier=classifier, backend=chosen, **common)
            else:
                import mlflow.transformers

                if backend not in ("auto", "torch"):
                    log.warning("%s v%s has no ONNX variants (registered before them): serving it on torch, not %s", name, version, backend)
                components = mlflow.transformers.load_model(local, return_type="components")
                loaded = LoadedModel(model=components["model"].to(self.device), tokenizer=components["tokenizer"],
                                     max_length=max_length, truncation=truncation, **common)
        warm_s = loaded.warm_up()
        log.info("loaded %s v%s in %.1fs (warm-up %.2fs): %s on %s", name, version, time.perf_counter() - start, warm_s,
                 loaded.backend, loaded.classifier.backend.device)
        return loaded

    def swap_to(self, selector: ModelSelector, backend: str | None = None) -> LoadedModel | None:
        """Make the selector's version current if it is not already; returns the new model or None.

        The old model stays referenced by any batch running on it, and is freed when
        the last one finishes.
        """
        with self._swap_lock:
            if backend is not None:
                self.backend = backend
            target = self.resolve(selector)
            current = self._current
            wanted = choose_backend(self.backend, getattr(target, "tags", None) or {}, f"{target.name} v{target.version}", on_gpu=self.on_gpu)
            same_backend = current is not None and (current.backend == wanted or current.backend == "torch" and self.backend == "auto")
            if current is not None and current.name == target.name and current.version == str(target.version) and same_backend:
                current.aliases = list(getattr(target, "aliases", []) or [])
                return None
            loaded = self.load(target, self.backend)
            self._current = loaded
            if current is not None:
                log.info("now serving %s v%s (was v%s)", loaded.name, loaded.version, current.version)
            return loaded

    def predict(self, texts: list[str]) -> list[dict]:
        model = self._current
        if model is None:
            raise RuntimeError("no model loaded yet")
        return model.predict(texts)


def torch_threads_for(cpus: float | None) -> int:
    """Intra-op threads for a replica given its CPU share: at least 1, never above the machine's."""
    machine = os.cpu_count() or 1
    if not cpus:
        return machine
    return max(1, min(machine, int(cpus)))
