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


# A script, not a call: the lane's jobs (tests/lane.py) run in a thread of the pytest process,
# and building the model seeds torch for the whole process.
_SETUP = """
import sys
from pathlib import Path
from tests.tiny_model import build_tiny_model
workdir, per_label = Path(sys.argv[1]), int(sys.argv[2])
build_tiny_model(workdir / "tiny-bert")
if per_label:
    from pipelines.data.prepare import prepare_dataset
    from pipelines.data.sample_corpus import write_sample_corpus
    from pipelines.data.settings import PrepareConfig
    raw = write_sample_corpus(workdir / "raw", train_per_label=per_label, test_per_label=per_label // 2, seed=int(sys.argv[3]))
    manifest = prepare_dataset(PrepareConfig(source=str(raw), storage=str(workdir / "storage"), progress=False)).manifest
    print(manifest.root.uri, manifest.content_hash)
"""


def build_in_subprocess(workdir: Path, env: dict, corpus_per_label: int = 0, seed: int = 5) -> tuple[str, str | None, str | None]:
    """In a process of its own: the tiny model in `workdir`/tiny-bert and, if asked, a small sample
    corpus prepared under `workdir`/storage. Returns (model folder, dataset folder URI, content hash)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _SETUP, str(workdir), str(corpus_per_label), str(seed)], cwd=Path(__file__).resolve().parents[1],
                            env=env, check=True, capture_output=True, text=True, timeout=300)
    dataset, content_hash = result.stdout.split()[-2:] if corpus_per_label else (None, None)
    return str(Path(workdir) / "tiny-bert"), dataset, content_hash
