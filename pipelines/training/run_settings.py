"""What a training run was started with, and which changes `--resume` may make.

A resumed run continues the optimizer, the schedule and the model of the
checkpoint. Resuming with another model, dataset, batch size, max length or
learning-rate schedule would mix two runs into one model under the first run's
MLflow parameters; that is refused, with every difference listed. Raising
`--epochs` continues training (the linear decay is laid out again over the new
total); how the work is spread (workers, threads, CPUs) may change freely.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from pipelines.core.errors import ConfigError
from pipelines.core.storage import Location
from pipelines.training.settings import TrainConfig

SETTINGS_FILE = "train_settings.json"
# TrainConfig fields whose change would make the resumed run a different run
FIXED_FIELDS = (
    "model", "batch_size", "max_length", "truncation", "lr", "weight_decay", "warmup_ratio",
    "max_steps_per_epoch",
)


def settings_of(config: TrainConfig, dataset: str, content_hash: str) -> dict:
    return {"config": asdict(config), "dataset": dataset, "dataset_content_hash": content_hash}


def save(run_dir: Location, settings: dict) -> None:
    run_dir.child(SETTINGS_FILE).write_json(json.loads(json.dumps(settings, default=str)))


def load(run_dir: Location) -> dict | None:
    target = run_dir.child(SETTINGS_FILE)
    return target.read_json() if target.exists() else None


def differences(saved: dict, settings: dict) -> list[str]:
    """Human-readable changes that a resume must not make (empty: the resume may go on)."""
    before, after = saved["config"], settings["config"]
    changes = [
        f"--{name.replace('_', '-')} {before.get(name)!r} -> {after.get(name)!r}"
        for name in FIXED_FIELDS
        if name in before and before[name] != after[name]
    ]
    if saved.get("dataset_content_hash") != settings["dataset_content_hash"]:
        changes.append(f"dataset {saved.get('dataset')} -> {settings['dataset']} (other content)")
    if after["epochs"] < before["epochs"]:
        changes.append(f"--epochs {before['epochs']} -> {after['epochs']} (only raising --epochs is allowed)")
    return changes


def check_resume(run_dir: Location, settings: dict, run_name: str) -> dict | None:
    """Refuse a resume whose settings break the run; returns what the run was started with."""
    saved = load(run_dir)
    if saved is None:
        return None  # a run from before settings were saved: nothing to compare with
    changes = differences(saved, settings)
    if changes:
        raise ConfigError(
            f"--resume of run {run_name!r} with changed settings: " + "; ".join(changes)
            + ". Resume with the run's own settings, or start a new run without --resume"
        )
    return saved
