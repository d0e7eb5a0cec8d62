"""What ASHA saves: the same grid of learning rates x batch sizes, with and without early stopping.

    python bench/tune_efficiency.py [--model PATH] [--epochs 4] [--lr-grid-points 3] [--batch-sizes 16 32]
                                    [--max-steps-per-epoch 15] [--reduction-factor 3]

Runs the grid once under ASHA and once to the end (FIFO), in one process on one
local Ray, and prints the trial-epochs each used and the best validation accuracy
each found. Last line: `epochs_ratio=<asha / grid>` (target <= 0.5, with ASHA's best
within 0.5 accuracy point of the grid's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import PrepareConfig  # noqa: E402
from pipelines.prepare import prepare_dataset  # noqa: E402
from pipelines.sample_corpus import write_sample_corpus  # noqa: E402
from tune.settings import SweepConfig  # noqa: E402
from tune.sweep import run_sweep  # noqa: E402


def sweep(scheduler: str, args, data: str, storage: str):
    config = SweepConfig(
        data=data,
        model=args.model,
        search="grid",
        scheduler=scheduler,
        num_samples=1,
        epochs=args.epochs,
        grace_period=1,
        reduction_factor=args.reduction_factor,
        lr_min=args.lr_min,
        lr_max=args.lr_max,
        lr_grid_points=args.lr_grid_points,
        batch_sizes=tuple(args.batch_sizes),
        max_length=args.max_length,
        max_steps_per_epoch=args.max_steps_per_epoch,
        storage=storage,
        experiment="bench-tune-efficiency",
        register_as="bench-tune-efficiency",
        promote="never",
        sweep_name=f"bench-{scheduler}",
        seed=0,
    )
    outcome = run_sweep(config)
    epochs = sum(row["epochs_run"] for row in outcome.trials)
    best = max(row["val_accuracy"] for row in outcome.trials if row["val_accuracy"] is not None)
    return epochs, best, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled MiniLM")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr-min", type=float, default=1e-5)
    parser.add_argument("--lr-max", type=float, default=1e-3)
    parser.add_argument("--lr-grid-points", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--max-steps-per-epoch", type=int, default=15)
    parser.add_argument("--reduction-factor", type=int, default=3)
    args = parser.parse_args()

    storage = tempfile.mkdtemp(prefix="bench-tune-")
    raw = write_sample_corpus(Path(storage) / "raw", train_per_label=400, test_per_label=100)
    manifest = prepare_dataset(PrepareConfig(source=str(raw), storage=storage, progress=False)).manifest

    asha_epochs, asha_best, _ = sweep("asha", args, manifest.root.uri, storage)
    grid_epochs, grid_best, _ = sweep("fifo", args, manifest.root.uri, storage)
    print(f"grid: trial_epochs={grid_epochs} best_val_accuracy={grid_best:.4f}")
    print(f"asha: trial_epochs={asha_epochs} best_val_accuracy={asha_best:.4f}")
    print(f"best_accuracy_gap_points={(grid_best - asha_best) * 100:.2f}")
    print(f"epochs_ratio={asha_epochs / grid_epochs:.3f}")


if __name__ == "__main__":
    main()
