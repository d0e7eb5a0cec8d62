"""Settings of a sweep: the search space, the scheduler, and what each trial trains with."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pipelines.cli import field
from pipelines.config import PROMOTE_CHOICES, TrainConfig
from pipelines.errors import ConfigError
from pipelines.storage import default_storage

SCHEDULERS = ("asha", "fifo")
# the per-epoch validation metric that ASHA compares and the best trial is chosen by
METRICS = {"val/accuracy": "max", "val/f1": "max", "val/loss": "min"}
SEARCHERS = ("random", "optuna", "grid")


@dataclass(frozen=True)
class SweepConfig:
    """Sweep learning rate and batch size with Ray Tune; every trial is an MLflow run."""

    data: str = field("imdb", "dataset, as for train_imdb: 'imdb', 'sample', or a dataset folder / manifest.json")
    model: str | None = field(None, "Hugging Face model id or local folder (default: the bundled all-MiniLM-L6-v2)")
    num_samples: int = field(6, "trials to run (random/optuna); with grid, repeats of the whole grid")
    max_concurrent: int | None = field(None, "trials at once (default: as many as the cluster's CPUs/GPUs hold)")
    epochs: int = field(3, "the most epochs any trial gets (ASHA stops poor trials sooner)")
    scheduler: str = field("asha", "asha: stop trials that trail at an epoch milestone; fifo: run every trial to the end", choices=SCHEDULERS)
    metric: str = field("val/accuracy", "validation metric that ASHA compares at each epoch and that picks the best trial", choices=tuple(METRICS))
    grace_period: int = field(1, "ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: int = field(2, "ASHA: keep the top 1/reduction_factor of trials at each milestone")
    search: str = field("random", "how trials are chosen: random, optuna (TPE), or grid", choices=SEARCHERS)
    lr_min: float = field(1e-5, "smallest learning rate (log-uniform search)")
    lr_max: float = field(1e-3, "largest learning rate")
    lr_grid_points: int = field(3, "grid search: learning rates, log-spaced from --lr-min to --lr-max")
    batch_sizes: tuple[int, ...] = field((16, 32), "global batch sizes to choose from")
    max_length: int = field(256, "max tokens per review")
    max_steps_per_epoch: int | None = field(None, "cap on optimizer steps per epoch: a small budget per trial")
    group_by_length: bool = field(True, "batch reviews of similar length together (less padding)")
    num_workers: int = field(1, "Ray Train workers per trial")
    cpus_per_worker: float = field(1.0, "CPUs per training worker")
    use_gpu: str = field("auto", "train on GPUs: auto uses them when the cluster has enough", choices=("auto", "yes", "no"))
    seed: int = field(42, "seed of the search and of every trial")
    storage: str = field(default_storage(), "storage root (datasets, tune_results/, the local MLflow store)")
    sweep_name: str | None = field(None, "name of the sweep (default: a fresh unique name); with --resume, the sweep to continue")
    resume: bool = field(False, "continue the interrupted sweep named by --sweep-name")
    tracking_uri: str | None = field(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local store)")
    experiment: str = field("imdb-sentiment-sweeps", "MLflow experiment of the sweep and its trials")
    register_as: str = field("imdb-sentiment", "registered model name for the best trial")
    promote: str = field("auto", "move 'champion' to the best trial: auto = only if it beats the champion", choices=PROMOTE_CHOICES)
    ray_address: str | None = field(None, "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")

    def __post_init__(self) -> None:
        for name in ("num_samples", "epochs", "grace_period", "lr_grid_points", "num_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be at least 1, got {self.max_concurrent}")
        if self.reduction_factor < 2:
            raise ConfigError(f"--reduction-factor must be at least 2, got {self.reduction_factor}")
        if self.scheduler == "asha" and self.grace_period >= self.epochs:
            raise ConfigError(f"--grace-period {self.grace_period} must be below --epochs {self.epochs}, or ASHA can never stop a trial early")
        if not (self.lr_min > 0 and math.isfinite(self.lr_max)):
            raise ConfigError(f"--lr-min must be positive, got {self.lr_min}")
        if self.lr_min > self.lr_max:
            raise ConfigError(f"the learning-rate range is inverted: --lr-min {self.lr_min} > --lr-max {self.lr_max}")
        if self.lr_min == self.lr_max and self.search != "grid":
            raise ConfigError(f"the learning-rate range is empty (--lr-min = --lr-max = {self.lr_min}); widen it or use --search grid")
        if not self.batch_sizes:
            raise ConfigError("--batch-sizes is empty: give at least one batch size")
        bad = [b for b in self.batch_sizes if b < 1 or b % self.num_workers]
        if bad:
            raise ConfigError(f"--batch-sizes {bad}: each must be a positive multiple of --num-workers {self.num_workers}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ConfigError(f"--batch-sizes {list(self.batch_sizes)} repeats a value")
        if self.resume and not self.sweep_name:
            raise ConfigError("--resume needs --sweep-name: the sweep to continue")

    def trial_config(self, lr: float, batch_size: int, run_name: str, data: str) -> TrainConfig:
        """The TrainConfig one trial trains with: the sweep's settings + its sampled values."""
        return TrainConfig(
            data=data,
            model=self.model,
            epochs=self.epochs,
            batch_size=batch_size,
            lr=lr,
            max_length=self.max_length,
            max_steps_per_epoch=self.max_steps_per_epoch,
            group_by_length=self.group_by_length,
            num_workers=self.num_workers,
            cpus_per_worker=self.cpus_per_worker,
            use_gpu=self.use_gpu,
            max_failures=0,  # Tune owns retries of whole trials
            seed=self.seed,
            storage=self.storage,
            run_name=run_name,
            tracking_uri=self.tracking_uri,
            experiment=self.experiment,
            register_as=self.register_as,
            promote="never",
        )

    @property
    def mode(self) -> str:
        return METRICS[self.metric]

    def as_dict(self) -> dict:
        return asdict(self)
