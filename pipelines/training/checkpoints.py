"""The checkpoint format: the model, optimizer, scheduler, epoch history and best epoch a run resumes from."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import torch

from pipelines.core.errors import DataError
from pipelines.text.model import load_classifier
from pipelines.training.loop import BestEpoch, unwrap

TRAINING_STATE = "training_state.pt"
BEST_MODEL_DIR = "best_model"  # in a checkpoint whose own epoch is not the best one


def save_checkpoint(model, optimizer, scheduler, epoch: int, history: list[int], config: dict, best: BestEpoch) -> Path:
    """Model in Hugging Face format (loadable as is) + everything needed to resume.

    When this epoch is not the best one, the best epoch's model goes along in
    `best_model/`: it is what gets evaluated on test and registered.
    """
    folder = Path(tempfile.mkdtemp(prefix="ckpt-"))
    unwrap(model).save_pretrained(folder, safe_serialization=True)
    if best.epoch != epoch and best.weights is not None:
        unwrap(model).save_pretrained(folder / BEST_MODEL_DIR, state_dict=best.weights, safe_serialization=True)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "history": history,
            "best": best.state(),
            "config": {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool, type(None)))},
        },
        folder / TRAINING_STATE,
    )
    return folder


def best_model_folder(checkpoint_dir: str | Path) -> Path:
    """Where a checkpoint keeps the model to register: the best epoch's."""
    best = Path(checkpoint_dir) / BEST_MODEL_DIR
    return best if best.is_dir() else Path(checkpoint_dir)


def load_training_state(folder: str | Path) -> dict:
    """The optimizer, scheduler and progress of a checkpoint: tensors and plain values only.

    `weights_only=True`: a checkpoint is read from shared storage, and a pickle that holds code
    would run it on every worker that resumes from it. Such a file is refused, with its path.
    """
    path = Path(folder) / TRAINING_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise DataError(f"holds more than tensors and plain values, refused (it could run code when loaded): {reason}", str(path)) from exc


def restore(config: dict, rank: int):
    """(model, training state or None, best epoch) from Ray's latest checkpoint, or a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return load_classifier(config["model_path"]), None, BestEpoch()
    with checkpoint.as_directory() as folder:
        model = load_classifier(folder)
        state = load_training_state(folder)
        best = BestEpoch(**state.get("best", {"epoch": state["epoch"]}))
        if best.epoch != state["epoch"] and (Path(folder) / BEST_MODEL_DIR).is_dir():
            best.weights = load_classifier(Path(folder) / BEST_MODEL_DIR).state_dict()
        elif best.epoch == state["epoch"]:  # the checkpoint's own model is the best: keep it as later epochs train on
            best.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, state, best
