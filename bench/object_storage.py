"""What object storage costs the platform: local disk vs an S3-compatible server, side by side.

    python bench/object_storage.py [--repeats 3]

Starts moto's S3 server on 127.0.0.1 (tests/services.py) and measures, alternating the two
targets so that machine noise hits both alike:
- publishing the sample corpus (`prepare_dataset`, every version rebuilt with --force):
  shards + manifest (local: staging folder + rename; S3: shards, then the manifest);
- storing a training checkpoint the way Ray Train does (`pyarrow.fs.copy_files` of the folder
  that pipelines.training.checkpoints.save_checkpoint writes: the bundled MiniLM in Hugging Face format
  plus the optimizer state), and reading it back.

Prints one line per measurement and `ratio_publish=` / `ratio_checkpoint=` (S3 time over
local time, medians). moto keeps objects in memory on the same machine: the figures are a
floor for a real bucket (no network), and show the platform's own overhead per target.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.services import S3Server  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build_checkpoint(folder: Path) -> int:
    """The folder save_checkpoint writes for the bundled MiniLM after one step: model + optimizer state."""
    import torch

    from pipelines.text.model import load_classifier
    from pipelines.text.tokenization import default_model_path
    from pipelines.training.checkpoints import save_checkpoint
    from pipelines.training.loop import build_optimizer

    model = load_classifier(default_model_path())
    optimizer = build_optimizer(model, 5e-5, 0.01)
    loss = model(input_ids=torch.ones(2, 16, dtype=torch.long), labels=torch.tensor([0, 1])).loss
    loss.backward()
    optimizer.step()  # Adam's moments exist only after a step: a real checkpoint's size
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    written = save_checkpoint(model, optimizer, scheduler, 0, [0], {"seed": 0})
    shutil.copytree(written, folder)
    shutil.rmtree(written)
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    server = S3Server(work / "s3").start()
    os.environ.update(server.env())
    server.create_bucket("bench")
    try:
        import pyarrow.fs as pafs

        from pipelines.data.prepare import prepare_dataset
        from pipelines.data.sample_corpus import write_sample_corpus
        from pipelines.data.settings import PrepareConfig

        raw = write_sample_corpus(work / "raw" / "aclImdb", seed=0)
        targets = {"local": str(work / "local-storage"), "s3": "s3://bench/platform"}
        prepare_dataset(PrepareConfig(source=str(raw), storage=targets["local"], progress=False))  # warm imports and caches
        publish = {name: [] for name in targets}
        for _ in range(args.repeats):
            for name, storage in targets.items():
                config = PrepareConfig(source=str(raw), storage=storage, progress=False, force=True)
                publish[name].append(timed(lambda: prepare_dataset(config)))
        rows = sum(info.rows for info in prepare_dataset(PrepareConfig(source=str(raw), storage=targets["s3"], progress=False)).manifest.splits.values())
        for name, times in publish.items():
            print(f"publish sample corpus ({rows} reviews) to {name:<5}: median {statistics.median(times):.2f} s  {[round(t, 2) for t in times]}")

        checkpoint = work / "checkpoint"
        size = build_checkpoint(checkpoint)
        local_fs = pafs.LocalFileSystem()
        stores = {"local": (local_fs, str(work / "local-results")), "s3": pafs.FileSystem.from_uri("s3://bench/ray_results")}
        upload = {name: [] for name in stores}
        download = {name: [] for name in stores}
        for index in range(args.repeats):
            for name, (fs, root) in stores.items():
                target = f"{root}/checkpoint_{index:06d}"
                if fs is local_fs:
                    Path(target).mkdir(parents=True)  # as Ray Train does before copying to a local storage path
                upload[name].append(timed(lambda: pafs.copy_files(str(checkpoint), target, source_filesystem=local_fs, destination_filesystem=fs)))
                back = work / f"restored-{name}-{index}"
                back.mkdir()
                download[name].append(timed(lambda: pafs.copy_files(target, str(back), source_filesystem=fs, destination_filesystem=local_fs)))
        for name in stores:
            print(f"checkpoint ({size / 1e6:.0f} MB: MiniLM + optimizer state) to {name:<5}: store median {statistics.median(upload[name]):.2f} s, "
                  f"restore median {statistics.median(download[name]):.2f} s")
        print(f"ratio_publish={statistics.median(publish['s3']) / statistics.median(publish['local']):.2f}")
        print(f"ratio_checkpoint={statistics.median(upload['s3']) / statistics.median(upload['local']):.2f}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
