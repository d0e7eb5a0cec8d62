"""TrainConfig: the typed settings of a training run, each field with its help text.

The same keys flow into command-line flags (pipelines.core.cli), the training loop
config, Tune's search space, MLflow params and every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.core.cli import field
from pipelines.core.errors import ConfigError
from pipelines.core.storage import default_storage

PROMOTE_CHOICES = ("auto", "never", "always")
USE_GPU_CHOICES = ("auto", "yes", "no")
PLACEMENT_CHOICES = ("pack", "spread")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tune a transformer classifier with Ray Train; track, register and gate it in MLflow."""

    data: str = field(
        "imdb",
        "dataset: 'imdb' (prepared IMDB shards; prepared from the official download if absent), "
        "'sample' (the synthetic offline corpus), or a dataset folder / manifest.json path",
    )
    model: str | None = field(None, "Hugging Face model id or local folder (default: the bundled all-MiniLM-L6-v2)")
    epochs: int = field(3, "training epochs")
    batch_size: int = field(32, "global batch size per optimizer step (all workers x gradient accumulation)")
    eval_batch_size: int = field(64, "batch size per worker for validation and test")
    lr: float = field(5e-5, "peak learning rate of AdamW")
    weight_decay: float = field(0.01, "AdamW weight decay (not applied to biases and LayerNorm)")
    warmup_ratio: float = field(0.06, "fraction of steps with linear warm-up, then linear decay to 0")
    grad_accum: int = field(1, "micro-batches accumulated per optimizer step")
    max_grad_norm: float = field(1.0, "gradient clipping norm (0 disables)")
    max_length: int = field(256, "max tokens per review, special tokens included")
    truncation: str = field("head_tail", "how long reviews are cut: keep the head, or the head and the tail", choices=("head", "head_tail"))
    group_by_length: bool = field(True, "batch reviews of similar length together (less padding)")
    shuffle_window: int = field(
        8192,
        "rows per worker shuffled together; every epoch gets its own order from --seed and the epoch "
        "(larger mixes more, and holds more token ids in the worker's memory)",
    )
    deterministic_data: bool = field(
        True,
        "feed rows in the same order on every run (Ray Data preserve_order), so the same --seed and data "
        "give the same model with one worker; off lets whichever block is ready first go first",
    )
    cache_tokenized: str = field(
        "auto",
        "tokenize once before training and keep the token ids in Ray's object store, instead of reading and "
        "tokenizing again every epoch; auto = when they fill under 10%% of the object store",
        choices=("auto", "yes", "no"),
    )
    num_workers: int = field(1, "Ray Train workers (one per GPU on a GPU cluster)")
    use_gpu: str = field("auto", "train on GPUs: auto uses them when the cluster has enough", choices=USE_GPU_CHOICES)
    cpu_fallback: bool = field(False, "with --use-gpu auto on a cluster that can add GPU nodes: train on CPUs if they do not come up "
                                      "in time ($PLATFORM_RESOURCE_WAIT_S), instead of failing")
    cpus_per_worker: float = field(1.0, "CPUs reserved per training worker (fractions allowed)")
    placement: str = field(
        "pack",
        "where the workers go: pack fills a node before using the next (faster gradient exchange); spread puts "
        "them on as many nodes as can hold one (losing a node stops fewer); either takes what fits when it cannot",
        choices=PLACEMENT_CHOICES,
    )
    threads_per_worker: int | None = field(
        None,
        "torch intra-op threads per worker (default on CPUs: the node's CPUs that Ray Data does not need, "
        "shared by the workers on it; on GPUs: --cpus-per-worker)",
    )
    max_failures: int = field(2, "worker failures tolerated; training resumes from the last checkpoint")
    max_steps_per_epoch: int | None = field(None, "cap on optimizer steps per epoch (smoke tests, benchmarks)")
    early_stopping_patience: int | None = field(
        None,
        "stop after this many epochs without a better validation accuracy; the best epoch's model is "
        "the one tested, registered and gated either way",
    )
    seed: int = field(42, "random seed (classifier head init, dropout, and with the epoch number each epoch's order)")
    storage: str = field(default_storage(), "storage root for datasets, checkpoints and the local MLflow store; a folder or s3:// / gs:// URI")
    run_name: str | None = field(None, "name of the run (default: a fresh unique name); an existing name with --resume continues it")
    resume: bool = field(False, "continue the interrupted run named by --run-name from its last checkpoint")
    tracking_uri: str | None = field(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a SQLite store under <storage>/mlflow)")
    experiment: str = field("imdb-sentiment", "MLflow experiment name")
    register_as: str = field("imdb-sentiment", "MLflow registered model name")
    promote: str = field("auto", "move the 'champion' alias: auto = only if test accuracy >= the champion's", choices=PROMOTE_CHOICES)
    onnx_variants: bool = field(
        True,
        "at registration, also export the model to ONNX and int8 and score both beside torch; "
        "--no-onnx-variants registers the torch model alone (GPU serving, quick experiments)",
    )
    ray_address: str | None = field(None, "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")

    def __post_init__(self) -> None:
        positive_ints = {"epochs": self.epochs, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
                         "grad_accum": self.grad_accum, "num_workers": self.num_workers}
        for name, value in positive_ints.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        if self.max_length < 8:
            raise ConfigError(f"--max-length must be at least 8, got {self.max_length}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"--cpus-per-worker must be positive, got {self.cpus_per_worker}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ConfigError(f"--threads-per-worker must be at least 1, got {self.threads_per_worker}")
        if self.shuffle_window < 1:
            raise ConfigError(f"--shuffle-window must be at least 1, got {self.shuffle_window}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError(f"--early-stopping-patience must be at least 1, got {self.early_stopping_patience}")
        if self.max_failures < 0:
            raise ConfigError(f"--max-failures must be >= 0, got {self.max_failures}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"--max-steps-per-epoch must be at least 1, got {self.max_steps_per_epoch}")
        if self.batch_size % (self.num_workers * self.grad_accum):
            raise ConfigError(
                f"--batch-size {self.batch_size} must be a multiple of --num-workers x --grad-accum "
                f"({self.num_workers} x {self.grad_accum}): it is the global batch per optimizer step"
            )
        if self.resume and not self.run_name:
            raise ConfigError("--resume needs --run-name: the name of the run to continue")
        if self.model is not None and not self.model.strip():
            raise ConfigError("--model must not be empty")

    @property
    def per_worker_batch_size(self) -> int:
        return self.batch_size // (self.num_workers * self.grad_accum)
