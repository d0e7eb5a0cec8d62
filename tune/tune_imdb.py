"""`python -m tune.tune_imdb`: sweep any train_imdb settings with Ray Tune (ASHA early stopping).

Every train_imdb flag sets what each trial trains with; --space says which of them are
swept and how. Every trial runs the same Ray Train job as `pipelines.train_imdb`, is an
MLflow child run of the sweep's run, and the best finished trial is registered and gated
like a training run.

Examples:
    python -m tune.tune_imdb --data sample --num-samples 4 --epochs 2 --max-steps-per-epoch 20
    python -m tune.tune_imdb --search optuna --num-samples 16 --lr-min 1e-5 --lr-max 1e-4 --batch-sizes 16 32 64
    python -m tune.tune_imdb --space lr=loguniform:1e-5:1e-4 warmup_ratio=uniform:0:0.2 truncation=choice:head,head_tail
    python -m tune.tune_imdb --sweep-name sweep-... --resume      # continue an interrupted sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pipelines.core import cli, console
from pipelines.core.errors import ConfigError
from pipelines.training.settings import TrainConfig
from tune.settings import SweepConfig, flag, space_rows


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser("python -m tune.tune_imdb", __doc__, SweepConfig)


def flags_given(argv: list[str]) -> set[str]:
    """The TrainConfig fields whose flags are on the command line (abbreviated or not)."""
    parser = build_parser()
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for action in parser._actions:  # argparse has no public way to list a parser's arguments
        if action.dest in train_fields:
            action.default = argparse.SUPPRESS  # only a flag on the command line sets its dest
    return set(vars(parser.parse_args(argv))) & train_fields


def parse_settings(argv: list[str] | None = None) -> SweepConfig:
    """Flags -> SweepConfig (see settings_from)."""
    argv = sys.argv[1:] if argv is None else argv
    return settings_from(build_parser().parse_args(argv), argv)


def settings_from(args: argparse.Namespace, argv: list[str]) -> SweepConfig:
    """Parsed flags -> SweepConfig; a swept field's flag given as well is refused (the space would win)."""
    rows = space_rows(tuple(args.space), args.lr_min, args.lr_max, tuple(args.batch_sizes) if args.batch_sizes is not None else None)
    given = flags_given(argv)
    for row in rows:
        if row.name in given:
            raise ConfigError(f"{flag(row.name)} is given, but {row.name} is swept ({row.where}): drop one of them")
        # the base's value of a swept field is never trained with; one the trials may get
        # keeps TrainConfig's checks of the base meaningful (e.g. batch size vs --num-workers)
        setattr(args, row.name, row.check_values()[0])
    return cli.from_namespace(SweepConfig, args)


def main(argv: list[str] | None = None) -> int:
    # flags and the search space are checked here, before Ray or MLflow start
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    config = settings_from(args, argv)
    from tune.sweep import run_sweep

    # Ray's, Tune's and the trials' output goes to the log file; the console gets stage
    # lines, a line per trial event and the results table
    with console.session("sweep", console.log_dir_for(config.train.storage), verbose=args.verbose):
        run_sweep(config)
    return 0


def cli_entry() -> None:
    cli.run_main(main)


if __name__ == "__main__":
    cli_entry()
