"""Typed settings of the serving application, one frozen dataclass per concern.

- `ModelSource`: where the registry is and which registered model (fixed per deployment).
- `ServingConfig`: the deployment's `user_config`. Every key can change on a live
  deployment (`serve deploy` with a new `user_config`, or `serve.run` again): Serve
  calls `reconfigure` on the running replicas in place, so moving `model_version` (or
  `model_alias`) there is a zero-downtime rollout.
- `ScalingSettings`: replicas, autoscaling and per-replica resources (Serve deployment
  options; in serve/config.yaml they sit under `deployments:`).

`AppArgs` is what `app_builder(args)` accepts (config.yaml `args:`): the keys of
`ModelSource` and `ServingConfig` in one flat mapping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from pipelines.core.cli import field
from pipelines.core.errors import ConfigError
from pipelines.core.storage import default_storage
from pipelines.tracking.registry import CHAMPION

# pipelines.inference.classifier.BACKENDS plus auto (here as text: the ingress imports no torch)
BACKEND_CHOICES = ("auto", "torch", "onnx", "onnx-int8")
API_KEY_ENV = "SERVE_API_KEY"
API_KEY_FILE_ENV = "SERVE_API_KEY_FILE"


@dataclass(frozen=True)
class ModelSource:
    """Which registry, and which registered model in it."""

    model_name: str = field("imdb-sentiment", "MLflow registered model name")
    storage: str = field(default_storage(), "storage root whose local MLflow store is used when no tracking URI is set ($PLATFORM_STORAGE)")
    tracking_uri: str | None = field(None, "MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else the SQLite store under --storage)")

    def __post_init__(self) -> None:
        if not self.model_name or not self.model_name.strip():
            raise ConfigError("--model-name must not be empty")


@dataclass(frozen=True)
class ServingConfig:
    """Reconfigurable at run time (the deployment's user_config)."""

    model_alias: str = field(CHAMPION, "registry alias to serve; replicas follow it when it moves")
    model_version: str | None = field(None, "serve this registered version instead of the alias (pins it)")
    poll_interval_s: float = field(30.0, "how often replicas check whether the alias moved (0: never)")
    max_batch_size: int = field(32, "most texts run through the model in one forward pass (1 turns batching off)")
    batch_wait_timeout_s: float = field(0.005, "longest a text waits for others to fill a batch")
    max_texts: int = field(64, "most texts one request may carry")
    max_text_chars: int = field(20_000, "longest text accepted, in characters (IMDB's longest review is ~14k)")
    max_body_bytes: int = field(2 * 1024 * 1024, "largest request body accepted, in bytes")
    num_threads: int | None = field(None, "torch intra-op threads per replica (default: the replica's CPUs, at least 1)")
    backend: str = field("auto", "inference backend: auto (the version's default: the fastest whose accuracy check passed), torch, onnx or onnx-int8",
                         choices=BACKEND_CHOICES)
    allow_anonymous: bool = field(False, "serve /v1 and /v2 with no API key to anyone who can reach the address: off loopback, "
                                          "without $SERVE_API_KEY or $SERVE_API_KEY_FILE, serving refuses to start unless this is set")

    def __post_init__(self) -> None:
        if self.model_version is not None:
            version = str(self.model_version).strip()
            if not version.isdigit() or int(version) < 1:
                raise ConfigError(f"model_version must be a positive integer, got {self.model_version!r}")
            object.__setattr__(self, "model_version", str(int(version)))
        if not self.model_alias and self.model_version is None:
            raise ConfigError("give model_alias or model_version")
        checks = {
            "max_batch_size": self.max_batch_size >= 1,
            "max_texts": self.max_texts >= 1,
            "max_text_chars": self.max_text_chars >= 1,
            "max_body_bytes": self.max_body_bytes >= 64,
            "poll_interval_s": self.poll_interval_s >= 0,
            "batch_wait_timeout_s": 0 <= self.batch_wait_timeout_s <= 10,
            "num_threads": self.num_threads is None or self.num_threads >= 1,
            "backend": self.backend in BACKEND_CHOICES,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is out of range")

    @classmethod
    def from_user_config(cls, user_config: dict[str, Any] | None) -> "ServingConfig":
        """Defaults overlaid with the keys given; an unknown key is an error (typos must not pass)."""
        user_config = dict(user_config or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(user_config) - known)
        if unknown:
            raise ConfigError(f"unknown user_config keys {unknown}; known: {sorted(known)}")
        return cls(**user_config)

    def as_user_config(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScalingSettings:
    """Replicas and what each reserves (Serve deployment options)."""

    min_replicas: int = field(1, "fewest replicas kept running")
    max_replicas: int = field(2, "most replicas autoscaling may start (2 x 0.5 CPU fits a 2-core machine)")
    target_ongoing_requests: float = field(16.0, "requests in flight per replica that autoscaling aims for")
    upscale_delay_s: float = field(5.0, "load must stay above target this long before a replica is added")
    downscale_delay_s: float = field(30.0, "load must stay below target this long before a replica is removed")
    max_ongoing_requests: int = field(64, "requests one replica accepts at once (>= max_batch_size); more wait in the proxy")
    num_cpus: float = field(0.5, "CPUs each replica reserves (Serve's default 1 fits only 2 replicas on 2 cores)")
    num_gpus: float = field(0.0, "GPUs each replica reserves (a replica with one runs the model on it)")

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ConfigError(f"need 0 <= --min-replicas <= --max-replicas, >= 1; got {self.min_replicas}..{self.max_replicas}")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ConfigError("--num-cpus must be positive and --num-gpus >= 0")
        if self.max_ongoing_requests < 1 or self.target_ongoing_requests <= 0:
            raise ConfigError("--max-ongoing-requests and --target-ongoing-requests must be positive")

    def deployment_options(self) -> dict[str, Any]:
        return {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {})},
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            },
        }


def split_app_args(args: dict[str, Any] | None) -> tuple[ModelSource, ServingConfig]:
    """config.yaml `args:` (one flat mapping) -> (ModelSource, ServingConfig); unknown keys are errors."""
    args = {k: v for k, v in (args or {}).items() if v is not None}
    source_keys = {f.name for f in dataclasses.fields(ModelSource)}
    serving_keys = {f.name for f in dataclasses.fields(ServingConfig)}
    unknown = sorted(set(args) - source_keys - serving_keys)
    if unknown:
        raise ConfigError(f"unknown application args {unknown}; known: {sorted(source_keys | serving_keys)}")
    source = ModelSource(**{k: v for k, v in args.items() if k in source_keys})
    serving = ServingConfig(**{k: _coerce(ServingConfig, k, v) for k, v in args.items() if k in serving_keys})
    return source, serving


def _coerce(cls: type, name: str, value: Any) -> Any:
    """`serve run ... key=value` passes strings: turn them into the field's type."""
    if not isinstance(value, str):
        return value
    default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if name == "num_threads":
        return int(value)
    return value
