"""The tiny random BERT that tests train: built from a config, never downloaded.

2 layers, 64 wide, with the bundled MiniLM's tokenizer, so it reads the same token
ids as the real model and trains in seconds on 2 CPUs. 64 wide is about the smallest
that learns the sample corpus at all within a few dozen steps (32 wide often stays at
chance for several epochs). Shared by tests/conftest.py and the scenario scripts,
which run as their own processes.
"""

from __future__ import annotations

from pathlib import Path

LABELS = {0: "negative", 1: "positive"}


def build_tiny_model(folder: Path, seed: int = 0) -> str:
    """Write the tiny model and tokenizer to `folder`; returns the folder as a string."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipelines.text.tokenization import default_model_path

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        num_labels=len(LABELS),
        id2label=LABELS,
        label2id={name: index for index, name in LABELS.items()},
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
