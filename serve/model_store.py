"""The model-serving core, without Serve: find a registered version, load it once, predict batches.

- `ModelSelector` names what to serve: `models:/<name>@<alias>` (the default alias is
  `champion`) or a pinned `models:/<name>/<version>`.
- `LoadedModel` is one version in memory: model, tokenizer, and the preprocessing that
  training used (the dataset's `clean_text`, the run's `max_length` and `truncation`
  params, head+tail truncation from `pipelines.tokenization`), so a served review is
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

from pipelines import tracking
from pipelines.cleaning import clean_text
from pipelines.errors import ConfigError, PlatformError
from pipelines.model import LABEL_NAMES
from pipelines.registry import CHAMPION
from pipelines.tokenization import TRUNCATION_MODES, pad_batch, special_token_frame, truncate

log = logging.getLogger(__name__)

# Used when a version's run has no `max_length` / `truncation` params (a model
# registered by hand): the training defaults of pipelines.config.TrainConfig.
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
    """One registered version in memory, ready to classify batches of texts."""

    name: str
    version: str
    run_id: str | None
    model: Any
    tokenizer: Any
    max_length: int
    truncation: str
    device: torch.device
    test_metrics: dict[str, float] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    loaded_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.model.eval()
        self.prefix, self.suffix = special_token_frame(self.tokenizer)
        self.budget = self.max_length - len(self.prefix) - len(self.suffix)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        id2label = getattr(self.model.config, "id2label", None) or LABEL_NAMES
        self.labels = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(self.model.config.num_labels)]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text as training saw it: cleaned like the dataset (markup, entities, unicode,
        whitespace), then special tokens around a head(+tail) cut of `max_length`."""
        cleaned = [clean_text(text) for text in texts]
        encoded = self.tokenizer(cleaned, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return [self.prefix + truncate(ids, self.budget, self.truncation) + self.suffix for ids in encoded]

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(B, num_labels) float32 class probabilities; one tokenizer call and one forward pass."""
        ids, mask = pad_batch(self.token_ids(texts), self.pad_token_id)  # (B, T), padded to the batch's longest
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def predict(self, texts: list[str]) -> list[dict]:
        """For each text: label, its probability, every class's probability, and who answered."""
        probs = self.probabilities(texts)
        best = probs.argmax(axis=-1)
        return [
            {
                "label": self.labels[int(b)],
                "score": float(row[b]),
                "probabilities": {label: float(p) for label, p in zip(self.labels, row)},
                "model_name": self.name,
                "model_version": self.version,
            }
            for row, b in zip(probs.tolist(), best)
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
            "test_metrics": dict(self.test_metrics),
            "device": str(self.device),
            "loaded_at": self.loaded_at,
        }


def pick_device() -> torch.device:
    """The GPU when this process has one (Ray sets CUDA_VISIBLE_DEVICES per replica), else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class ModelStore:
    """Resolves selectors in the MLflow registry and holds the model being served.

    `current` is a single reference: readers take it once per batch, `swap_to`
    replaces it only after the new model is loaded and warm.
    """

    def __init__(self, storage: str | None = None, tracking_uri: str | None = None, device: torch.device | None = None):
        from pipelines.storage import default_storage

        # Sets MLflow's process-wide tracking and registry URIs: load_model resolves
        # models:/ URIs through them.
        self.tracking_uri, _ = tracking.configure(storage or default_storage(), tracking_uri)
        self.client = MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)
        self.device = device or pick_device()
        self._current: LoadedModel | None = None
        self._swap_lock = threading.Lock()  # one load at a time (registry poll vs reconfigure)

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

    def load(self, model_version) -> LoadedModel:
        """Load and warm one version (seconds to minutes: never call it per request)."""
        import mlflow.transformers

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
        # mlflow copies the artifacts to a local folder first: give it a private one
        # so that concurrent replicas on one node never share a half-written copy.
        with tempfile.TemporaryDirectory(prefix="serve-model-") as scratch:
            components = mlflow.transformers.load_model(f"models:/{name}/{version}", dst_path=scratch, return_type="components")
        loaded = LoadedModel(
            name=name,
            version=version,
            run_id=model_version.run_id,
            model=components["model"].to(self.device),
            tokenizer=components["tokenizer"],
            max_length=max_length,
            truncation=truncation,
            device=self.device,
            test_metrics={k: float(v) for k, v in metrics.items() if k.startswith("test/")},
            aliases=list(getattr(model_version, "aliases", []) or []),
        )
        warm_s = loaded.warm_up()
        log.info("loaded %s v%s in %.1fs (warm-up %.2fs) on %s", name, version, time.perf_counter() - start, warm_s, self.device)
        return loaded

    def swap_to(self, selector: ModelSelector) -> LoadedModel | None:
        """Make the selector's version current if it is not already; returns the new model or None.

        The old model stays referenced by any batch running on it, and is freed when
        the last one finishes.
        """
        with self._swap_lock:
            target = self.resolve(selector)
            current = self._current
            if current is not None and current.name == target.name and current.version == str(target.version):
                current.aliases = list(getattr(target, "aliases", []) or [])
                return None
            loaded = self.load(target)
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
