"""What the platform's data path costs: Ray Data -> Ray Train vs a bare PyTorch loop.

Both sides train the bundled MiniLM with the same max length, batch size, thread
count and number of optimizer steps; the bare loop steps over batches tokenized and
padded in advance (the fastest a single process can go), the platform streams
Parquet through the tokenizer actors into a Ray Train worker. Run side by side in
one process tree, so the ratio holds even where absolute times are noisy.

    python bench/train_overhead.py [--steps 40] [--batch-size 16] [--max-length 128] [--threads 1]

Prints samples/s of each, the platform's data-wait fractions, and on the last line
`ratio=<platform steady samples/s / bare samples/s>` (target >= 0.95). The platform's
whole-epoch rate, which includes the pipeline start-up (actors, tokenizer load), is
printed too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipelines.config import PrepareConfig, TrainConfig  # noqa: E402
from pipelines.datasets import read_split_table  # noqa: E402
from pipelines.model import load_classifier  # noqa: E402
from pipelines.prepare import prepare_dataset  # noqa: E402
from pipelines.sample_corpus import write_sample_corpus  # noqa: E402
from pipelines.tokenization import PadCollate, TokenizeBatch, TokenizerSettings, default_model_path  # noqa: E402
from pipelines.training import build_optimizer  # noqa: E402

WARMUP_STEPS = 3


def bare_loop(manifest, model_path: str, steps: int, batch_size: int, max_length: int, threads: int) -> float:
    """Samples/s of fwd+bwd+AdamW over pre-tokenized, pre-padded batches (after warm-up)."""
    torch.set_num_threads(threads)
    table = read_split_table(manifest, "train")
    tokenize = TokenizeBatch(TokenizerSettings(model_path, max_length, "head_tail").as_dict())
    needed = (steps + WARMUP_STEPS) * batch_size
    tokens = tokenize({"text": np.asarray(table["text"].to_pylist()[:needed], dtype=object), "label": table["label"].to_numpy()[:needed]})
    collate = PadCollate(tokenize.tokenizer.pad_token_id)
    batches = [
        collate({key: value[i : i + batch_size] for key, value in tokens.items()}) for i in range(0, needed, batch_size)
    ]
    torch.manual_seed(0)
    model = load_classifier(model_path)
    model.train()
    optimizer = build_optimizer(model, 5e-5, 0.01)
    start = None
    for index, batch in enumerate(batches):
        if index == WARMUP_STEPS:
            start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch_size / (time.perf_counter() - start)


def platform_run(manifest, storage: str, steps: int, batch_size: int, max_length: int, threads: int) -> dict:
    from pipelines.fine_tune import run_training

    config = TrainConfig(
        data=manifest.root.uri,
        epochs=1,
        batch_size=batch_size,
        max_length=max_length,
        max_steps_per_epoch=steps + WARMUP_STEPS,
        threads_per_worker=threads,
        group_by_length=False,  # the bare loop does not group either: same padding work
        storage=storage,
        register_as="bench-overhead",
        experiment="bench",
        promote="never",
    )
    return run_training(config).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    storage = tempfile.mkdtemp(prefix="bench-overhead-")
    rows_needed = (args.steps + WARMUP_STEPS) * args.batch_size
    per_label = max(200, int(rows_needed / 0.9 / 2) + 50)
    raw = write_sample_corpus(Path(storage) / "raw", train_per_label=per_label, test_per_label=50)
    manifest = prepare_dataset(PrepareConfig(source=str(raw), storage=storage, progress=False)).manifest
    model_path = default_model_path()

    platform = platform_run(manifest, storage, args.steps, args.batch_size, args.max_length, args.threads)
    bare = bare_loop(manifest, model_path, args.steps, args.batch_size, args.max_length, args.threads)
    steady = platform["train/steady_samples_per_s"]
    print(f"setup: MiniLM, max_length={args.max_length}, batch_size={args.batch_size}, threads={args.threads}, steps={args.steps}")
    print(f"bare_samples_per_s={bare:.2f}")
    print(f"platform_steady_samples_per_s={steady:.2f}")
    print(f"platform_epoch_samples_per_s={platform['train/samples_per_s']:.2f} (includes start-up wait {platform['train/startup_wait_s']:.1f}s)")
    print(f"platform_data_wait_fraction={platform['train/data_wait_fraction']:.3f} steady={platform['train/steady_data_wait_fraction']:.3f}")
    print(f"ratio={steady / bare:.3f}")


if __name__ == "__main__":
    main()
