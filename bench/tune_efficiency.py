"""What ASHA saves: the same random trials (lr x batch size) with and without early stopping.

    python bench/tune_efficiency.py [--model PATH] [--trials 14] [--epochs 4] [--reduction-factor 3]
                                    [--max-steps-per-epoch 10] [--max-length 64] [--metric val/loss]

Samples the same --trials random (learning rate, batch size) trials twice, with the same
seed, and runs them once under ASHA and once all to the end (FIFO), in one process on one
local Ray, with as many trials at once as the machine holds (--cpus-per-worker 0.25 puts
two on 2 CPUs). Prints every trial, the trial-epochs each sweep used and the best
validation accuracy among the trials each let finish. Last line: `epochs_ratio=<asha / fifo>`
(target <= 0.5, with ASHA's best within 0.5 accuracy points of FIFO's).

Data order is deterministic (--deterministic-data) and every trial has the same seed and
threads in both sweeps, so a trial that ASHA lets finish ends exactly as the same trial
under FIFO: the accuracy gap measures only what ASHA stopped, not noise.

Why these sizes: asynchronous ASHA compares a trial with the trials that reached the same
rung before it, so the first trials at each rung always go on, and a small sweep saves
little (a 6-trial grid of 3 epochs could not go much below 0.6). More trials, more epochs
and a larger reduction factor give it room: with 4 epochs, grace period 1 and reduction
factor 3 the rungs are epochs 1 and 3, and a trial stopped at the first uses a quarter of
what FIFO gives it. The bundled MiniLM (the tiny random BERT of the tests often stays at
chance for dozens of steps) with 10 steps of 16-32 reviews per epoch is what it takes for
the good trials to be clearly above chance by the first rung (0.82-0.85 validation accuracy
after 10 steps at lr 1.6e-4 to 5.2e-4, batch 32); fewer steps, and ASHA compares trials that
all sit at 0.5 and stops them at random. val/loss, not accuracy, is compared: it separates
the trials that have started to learn from those that have not before accuracy moves.

Measured with the defaults on the 2-core machine (two trials at once, 1 torch thread each,
other work running beside it, load average 3 to 18): the same 14 trials in both sweeps;
FIFO 56 trial-epochs, best validation accuracy 0.9293, 1743 s; ASHA 28 trial-epochs, best
0.9293 (lr 5.2e-4, one of FIFO's three trials at 0.9293), 1026 s; epochs_ratio=0.500 (46 min
in all: over the 30 it aims at, on a machine shared with other runs). Every
trial that ASHA let finish ended with FIFO's figures to the fourth decimal. ASHA's time falls
less than its epochs: stopped trials pay the start-up too (Train workers, the model,
tokenizing). The first trial to reach rung 1 (lr 1.2e-5, at chance) ran all 4 epochs: there
was nothing to compare it with.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.data.prepare import prepare_dataset
from pipelines.data.sample_corpus import write_sample_corpus
from pipelines.data.settings import PrepareConfig
from pipelines.training.settings import TrainConfig
from tune.settings import SweepConfig  # noqa: E402
from tune.sweep import run_sweep  # noqa: E402


def sweep_config(scheduler: str, args, data: str, storage: str) -> SweepConfig:
    return SweepConfig(
        search="random",
        num_samples=args.trials,
        max_concurrent=args.max_concurrent,  # None: as many as fit
        scheduler=scheduler,
        grace_period=1,
        reduction_factor=args.reduction_factor,
        metric=args.metric,
        lr_min=args.lr_min,
        lr_max=args.lr_max,
        batch_sizes=tuple(args.batch_sizes),
        sweep_name=f"bench-{scheduler}",
        train=TrainConfig(
            data=data,
            model=args.model,
            epochs=args.epochs,
            batch_size=args.batch_sizes[0],
            max_length=args.max_length,
            max_steps_per_epoch=args.max_steps_per_epoch,
            cpus_per_worker=args.cpus_per_worker,
            storage=storage,
            experiment="bench-tune-efficiency",
            register_as="bench-tune-efficiency",
            promote="never",
            seed=0,  # the searcher's seed too: both sweeps sample the same trials
        ),
    )


def run(scheduler: str, args, data: str, storage: str) -> dict:
    start = time.perf_counter()
    outcome = run_sweep(sweep_config(scheduler, args, data, storage))
    finished = [row for row in outcome.trials if row["status"] == "completed"]
    return {
        "trials": outcome.trials,
        "epochs": sum(row["epochs_run"] for row in outcome.trials),
        "best": max(finished, key=lambda row: row["val_accuracy"]),
        "wall_s": time.perf_counter() - start,
    }


def trial_key(row: dict) -> tuple:
    return (f"{row['lr']:.6e}", row["batch_size"])


def print_trials(name: str, trials: list[dict]) -> None:
    for row in sorted(trials, key=lambda r: (r["batch_size"], r["lr"])):
        loss = f"{row['val_loss']:.4f}" if row["val_loss"] is not None else "-"
        accuracy = f"{row['val_accuracy']:.4f}" if row["val_accuracy"] is not None else "-"
        print(f"{name}: lr={row['lr']:.2e} batch_size={row['batch_size']} epochs_run={row['epochs_run']} "
              f"val_loss={loss} val_accuracy={accuracy} status={row['status']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled MiniLM")
    parser.add_argument("--trials", type=int, default=14, help="random trials, the same in both sweeps")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--metric", default="val/loss", help="what ASHA compares (val/loss separates trials early)")
    parser.add_argument("--lr-min", type=float, default=1e-5)
    parser.add_argument("--lr-max", type=float, default=1e-3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-steps-per-epoch", type=int, default=10)
    parser.add_argument("--cpus-per-worker", type=float, default=0.25, help="Ray CPUs per trial's worker: 0.25 fits two trials on 2 CPUs")
    parser.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as many as fit)")
    parser.add_argument("--train-per-label", type=int, default=1000, help="sample corpus size; validation is 10%% of it")
    parser.add_argument("--keep", action="store_true", help="keep the storage folder (checkpoints, MLflow) and print it")
    args = parser.parse_args()

    storage = tempfile.mkdtemp(prefix="bench-tune-")
    try:
        raw = write_sample_corpus(Path(storage) / "raw", train_per_label=args.train_per_label, test_per_label=100)
        manifest = prepare_dataset(PrepareConfig(source=str(raw), storage=storage, progress=False)).manifest
        fifo = run("fifo", args, manifest.root.uri, storage)
        asha = run("asha", args, manifest.root.uri, storage)
    finally:
        if args.keep:
            print(f"storage: {storage}")
        else:
            shutil.rmtree(storage, ignore_errors=True)

    print_trials("fifo", fifo["trials"])
    print_trials("asha", asha["trials"])
    same = sorted(map(trial_key, fifo["trials"])) == sorted(map(trial_key, asha["trials"]))
    print(f"same_trials={same} ({len(fifo['trials'])} trials of lr x batch_size, seed 0)")
    for name, result in (("fifo", fifo), ("asha", asha)):
        best = result["best"]
        print(f"{name}: trial_epochs={result['epochs']} best_val_accuracy={best['val_accuracy']:.4f} "
              f"(lr={best['lr']:.2e} batch_size={best['batch_size']}) wall_s={result['wall_s']:.0f}")
    print(f"best_accuracy_gap_points={(fifo['best']['val_accuracy'] - asha['best']['val_accuracy']) * 100:.2f}")
    print(f"epochs_ratio={asha['epochs'] / fifo['epochs']:.3f}")


if __name__ == "__main__":
    main()
