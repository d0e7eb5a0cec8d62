"""The classifier: any Hugging Face encoder with a 2-class sequence-classification head."""

from __future__ import annotations

import os
import re

from pipelines.core.errors import ConfigError

LABEL_NAMES = {0: "negative", 1: "positive"}


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_path(model: str | None) -> str:
    """None -> the bundled MiniLM; a path must be a model folder; else a hub id (`org/name`)."""
    if model is None:
        from pipelines.text.tokenization import default_model_path

        return default_model_path()
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        if not os.path.exists(os.path.join(expanded, "config.json")):
            raise ConfigError(f"--model {model!r}: the folder has no config.json, so it is not a Hugging Face model")
        return os.path.abspath(expanded)
    if model.startswith((".", "/", "~")) or not HUB_ID.match(model):
        raise ConfigError(f"--model {model!r}: no such folder (give a local model folder or a Hugging Face id like org/name)")
    return model  # a hub id: loading it needs the network (or a filled HF cache)


def load_classifier(model_name_or_path: str):
    """AutoModelForSequenceClassification with our two labels; a fresh head if the checkpoint has none."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # "Some weights were newly initialized" is expected for a sentence encoder.
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path,
            num_labels=len(LABEL_NAMES),
            id2label=LABEL_NAMES,
            label2id={name: index for index, name in LABEL_NAMES.items()},
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--model {model_name_or_path!r}: cannot load a sequence classifier "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0]})"
        ) from exc
