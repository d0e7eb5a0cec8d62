"""`python -m pipelines.train_imdb`: fine-tune a classifier with Ray Train, tracked in MLflow.

Examples:
    python -m pipelines.train_imdb --data sample --epochs 1          # offline, 2 CPUs
    python -m pipelines.train_imdb --num-workers 4 --use-gpu yes     # a GPU cluster (RAY_ADDRESS)
    python -m pipelines.train_imdb --run-name imdb-... --resume      # continue an interrupted run
"""

from __future__ import annotations

import argparse

from pipelines.core import cli, console
from pipelines.training.settings import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser("python -m pipelines.train_imdb", __doc__, TrainConfig)


def main(argv: list[str] | None = None) -> int:
    # flags are validated here, before Ray or MLflow start
    args = build_parser().parse_args(argv)
    config = cli.from_namespace(TrainConfig, args)
    from pipelines.training.job import run_training

    with console.session("train", console.log_dir_for(config.storage), verbose=args.verbose):
        run_training(config)
    return 0


def cli_entry() -> None:
    cli.run_main(main)


if __name__ == "__main__":
    cli_entry()
