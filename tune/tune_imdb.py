"""`python -m tune.tune_imdb`: sweep learning rate and batch size with Ray Tune (ASHA early stopping).

Every trial runs the same Ray Train job as `pipelines.train_imdb`, is an MLflow child run of
the sweep's run, and the best finished trial is registered and gated like a training run.

Examples:
    python -m tune.tune_imdb --data sample --num-samples 4 --epochs 2 --max-steps-per-epoch 20
    python -m tune.tune_imdb --search optuna --num-samples 16 --lr-min 1e-5 --lr-max 1e-4 --batch-sizes 16 32 64
    python -m tune.tune_imdb --sweep-name sweep-... --resume      # continue an interrupted sweep
"""

from __future__ import annotations

import argparse

from pipelines import cli
from tune.settings import SweepConfig


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser("python -m tune.tune_imdb", __doc__, SweepConfig)


def main(argv: list[str] | None = None) -> int:
    config = cli.from_namespace(SweepConfig, build_parser().parse_args(argv))
    from tune.sweep import run_sweep

    run_sweep(config)
    return 0


def cli_entry() -> None:
    cli.run_main(main)


if __name__ == "__main__":
    cli_entry()
