"""What the platform's training path costs against a bare PyTorch loop, at matched threads and on the whole machine.

Both sides train the bundled MiniLM on the same rows, max length and batch size.
The bare loop steps over batches tokenized and padded in advance (the fastest a
single process can go); the platform streams Parquet through the tokenizer actors
into a Ray Train worker. Side by side in one process tree, so the ratios hold even
where absolute times are noisy. Ray is shut down before the bare loops run, so its
background processes take nothing from them.

    python bench/train_overhead.py [--steps 24] [--batch-size 16] [--max-length 256] [--threads 1]

Two comparisons:
- `ratio=`: the data path's overhead. Both sides with --threads torch threads, no
  length grouping, the platform's steady-state samples/s (start-up left out) over
  the bare loop's after warm-up. Target >= 0.95.
- `ratio_machine=` (last line): what a user gets. The platform with its default
  settings (threads, token cache, length grouping, per-epoch shuffle) over one whole
  epoch, start-up wait included, against a bare loop with torch's default threads
  (all cores) over the same epoch, first step included. Target >= 0.9.
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

from pipelines.data.datasets import read_split_table
from pipelines.data.prepare import prepare_dataset
from pipelines.data.sample_corpus import write_sample_corpus
from pipelines.data.settings import PrepareConfig
from pipelines.text.model import load_classifier
from pipelines.text.tokenization import PadCollate, TokenizeBatch, TokenizerSettings, default_model_path
from pipelines.training.loop import build_optimizer
from pipelines.training.settings import TrainConfig

WARMUP_STEPS = 3
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before anything sets it: what a bare script gets


def bare_batches(manifest, model_path: str, batch_size: int, max_length: int, rows: int | None = None, shuffle: bool = False) -> list:
    """The train split's first `rows` rows (all by default), tokenized and padded per batch, in advance."""
    table = read_split_table(manifest, "train")
    rows = rows or table.num_rows
    tokenize = TokenizeBatch(TokenizerSettings(model_path, max_length, "head_tail").as_dict())
    tokens = tokenize({"text": np.asarray(table["text"].to_pylist()[:rows], dtype=object), "label": table["label"].to_numpy()[:rows]})
    if shuffle:  # what a user's DataLoader(shuffle=True) does
        order = np.random.default_rng(0).permutation(rows)
        tokens = {key: value[order] for key, value in tokens.items()}
    collate = PadCollate(tokenize.tokenizer.pad_token_id)
    return [collate({key: value[i : i + batch_size] for key, value in tokens.items()}) for i in range(0, rows, batch_size)]


def bare_loop(batches: list, model_path: str, threads: int, skip_steps: int) -> float:
    """Samples/s of fwd+bwd+AdamW over `batches`, timed from step `skip_steps` on."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_classifier(model_path)
    model.train()
    optimizer = build_optimizer(model, 5e-5, 0.01)
    start, samples = time.perf_counter(), 0
    for index, batch in enumerate(batches):
        if index == skip_steps:
            start, samples = time.perf_counter(), 0
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples += len(batch["labels"])
    return samples / (time.perf_counter() - start)


def platform_run(manifest, storage: str, batch_size: int, max_length: int, **settings) -> dict:
    from pipelines.training.job import run_training

    config = TrainConfig(
        data=manifest.root.uri, epochs=1, batch_size=batch_size, max_length=max_length, storage=storage,
        register_as="bench-overhead", experiment="bench", promote="never", **settings,
    )
    return run_training(config).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256, help="the sample corpus's reviews: median ~240 tokens, like IMDB's")
    parser.add_argument("--threads", type=int, default=1, help="threads of both sides in the matched comparison")
    args = parser.parse_args()

    storage = tempfile.mkdtemp(prefix="bench-overhead-")
    rows_needed = (args.steps + WARMUP_STEPS) * args.batch_size
    per_label = max(100, int(rows_needed / 0.9 / 2) + 10)  # train: about the matched run's rows
    raw = write_sample_corpus(Path(storage) / "raw", train_per_label=per_label, test_per_label=50)
    manifest = prepare_dataset(PrepareConfig(source=str(raw), storage=storage, progress=False)).manifest
    model_path = default_model_path()
    train_rows = manifest.splits["train"].rows

    matched = platform_run(manifest, storage, args.batch_size, args.max_length, max_steps_per_epoch=args.steps + WARMUP_STEPS,
                           threads_per_worker=args.threads, group_by_length=False)  # the bare loop does not group either
    machine = platform_run(manifest, storage, args.batch_size, args.max_length)  # every default: one whole epoch
    import ray

    ray.shutdown()  # the bare loops get the machine to themselves
    bare = bare_loop(bare_batches(manifest, model_path, args.batch_size, args.max_length, rows=rows_needed), model_path, args.threads, WARMUP_STEPS)
    bare_machine = bare_loop(bare_batches(manifest, model_path, args.batch_size, args.max_length, shuffle=True), model_path, TORCH_DEFAULT_THREADS, 0)

    steady = matched["train/steady_samples_per_s"]
    print(f"setup: MiniLM, max_length={args.max_length}, batch_size={args.batch_size}, train rows={train_rows}, cpus={os.cpu_count()}")
    print(f"matched ({args.threads} thread(s), {args.steps} steps after {WARMUP_STEPS} warm-up): bare_samples_per_s={bare:.2f} "
          f"platform_steady_samples_per_s={steady:.2f} platform_data_wait_fraction={matched['train/steady_data_wait_fraction']:.3f}")
    print(f"ratio={steady / bare:.3f}")
    print(f"machine (one whole epoch; bare: torch's default {TORCH_DEFAULT_THREADS} threads; platform: its defaults): "
          f"bare_samples_per_s={bare_machine:.2f} platform_epoch_samples_per_s={machine['train/samples_per_s']:.2f} "
          f"(start-up wait {machine['train/startup_wait_s']:.1f}s, data wait {machine['train/data_wait_fraction']:.3f}, "
          f"padding efficiency {machine['train/padding_efficiency']:.2f})")
    print(f"ratio_machine={machine['train/samples_per_s'] / bare_machine:.3f}")


if __name__ == "__main__":
    main()
