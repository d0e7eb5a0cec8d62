"""Shared fixtures: one local Ray for the whole session, a prepared sample dataset,
and a tiny random BERT built from a config (fast enough for 2 CPUs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The sample corpus is small, but tests use an even smaller one to stay quick.
TEST_TRAIN_PER_LABEL = 300
TEST_TEST_PER_LABEL = 100


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray sized like the CI machine (2 CPUs), shared by every test that needs it."""
    from pipelines.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=2)
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="session")
def sample_manifest(storage_root):
    """A small sample corpus prepared through the real prepare path."""
    from pipelines.config import PrepareConfig
    from pipelines.prepare import prepare_dataset
    from pipelines.sample_corpus import write_sample_corpus

    raw = write_sample_corpus(
        storage_root / "raw", train_per_label=TEST_TRAIN_PER_LABEL, test_per_label=TEST_TEST_PER_LABEL, seed=1
    )
    config = PrepareConfig(source=str(raw), storage=str(storage_root), rows_per_shard=128, progress=False)
    return prepare_dataset(config).manifest


@pytest.fixture(scope="session")
def bundled_model_path() -> str:
    from pipelines.tokenization import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_model_path) -> str:
    """A 2-layer, 64-wide random BERT with the bundled tokenizer: trains in seconds on CPU.

    64 wide is about the smallest that learns the sample corpus reliably in a few
    dozen steps (32 wide often stays at chance for several epochs).
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    model = BertForSequenceClassification(config)
    folder = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
