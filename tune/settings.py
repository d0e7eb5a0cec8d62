"""Settings of a sweep: what is swept and how, over a TrainConfig that every trial starts from.

A sweep is its own few settings (trials, scheduler, search) plus a `TrainConfig`, the
base of every trial: every `train_imdb` flag is a `tune_imdb` flag too. The search
space is a table of rows `FIELD=DISTRIBUTION:ARGS` over TrainConfig fields:

    lr=loguniform:1e-5:1e-3      floats, log-spaced        (grid: --grid-points values)
    warmup_ratio=uniform:0:0.1   floats, evenly spread     (grid: --grid-points values)
    grad_accum=randint:1:4       integers, both ends in    (grid: up to --grid-points values)
    batch_size=choice:16,32      listed values; any field  (grid: every value; 'none' for unset)

A trial trains with `dataclasses.replace(base, **sampled)`, so TrainConfig's own checks
run on every combination; the table is checked against them before anything starts.
"""

from __future__ import annotations

import difflib
import itertools
import math
import typing
from dataclasses import asdict, dataclass, fields, replace

from pipelines.core.cli import field
from pipelines.core.errors import ConfigError
from pipelines.training.settings import TrainConfig

SCHEDULERS = ("asha", "fifo")
# the per-epoch validation metric that ASHA compares and the best trial is chosen by
METRICS = {"val/accuracy": "max", "val/f1": "max", "val/loss": "min"}
SEARCHERS = ("random", "optuna", "grid")
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
SWEEP_EXPERIMENT = "imdb-sentiment-sweeps"
DEFAULT_SPACE = ("lr=loguniform:1e-5:1e-3", "batch_size=choice:16,32")
# the ends of the lr row when only one of --lr-min / --lr-max is given
DEFAULT_LR_RANGE = (1e-5, 1e-3)

# Set by the sweep on every trial: Tune owns retries of whole trials, and only the best
# trial is registered and gated (with the sweep's --promote).
PER_TRIAL = {"max_failures": 0, "promote": "never", "resume": False}
# TrainConfig fields that are no tune_imdb flag: per trial, they would mean nothing.
NOT_FLAGS = ("run_name", "resume", "max_failures")
# TrainConfig fields that stay the same across a sweep, and why.
FIXED_PER_SWEEP = {
    "data": "the dataset is resolved once for the sweep",
    "model": "the model and its tokenizer are resolved once for the sweep",
    "epochs": "--epochs is every trial's budget and ASHA's horizon",
    "num_workers": "trial resources are planned once for the sweep",
    "cpus_per_worker": "trial resources are planned once for the sweep",
    "use_gpu": "trial resources are planned once for the sweep",
    "threads_per_worker": "trial resources are planned once for the sweep",
    "placement": "trial resources are planned once for the sweep",
    "storage": "it says where the sweep runs and records",
    "tracking_uri": "it says where the sweep runs and records",
    "experiment": "it says where the sweep runs and records",
    "register_as": "only the best trial is registered, as --register-as",
    "promote": "only the best trial is gated, by --promote",
    "ray_address": "it says where the sweep runs and records",
    **{name: "the sweep sets it on every trial" for name in NOT_FLAGS},
}
_TRAIN_TYPES = typing.get_type_hints(TrainConfig)
_TRAIN_CHOICES = {f.name: f.metadata.get("choices") for f in fields(TrainConfig)}
# up-front check: combinations of row ends (and small integer ranges) tried against TrainConfig
MAX_CHECKED_COMBINATIONS = 4096
MAX_CHECKED_INTEGERS = 64


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_type(name: str) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a TrainConfig field."""
    kind = _TRAIN_TYPES[name]
    args = typing.get_args(kind)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return kind, False


def coerce(name: str, value):
    """A sampled value as the field's own type (Tune hands back numpy numbers)."""
    if value is None:
        return None
    kind, _ = field_type(name)
    return kind(value)


@dataclass(frozen=True)
class Dimension:
    """One row of the search space: a TrainConfig field and the distribution of its values."""

    name: str
    distribution: str  # one of DISTRIBUTIONS
    values: tuple  # (low, high) for loguniform/uniform/randint; the listed values for choice
    where: str  # the row as the user gave it, for error messages

    @property
    def low(self):
        return self.values[0]

    @property
    def high(self):
        return self.values[-1]

    def grid(self, points: int) -> list:
        """The values a grid search tries."""
        if self.distribution == "choice":
            return list(self.values)
        if points == 1:
            return [self.low]
        steps = range(points)
        if self.distribution == "loguniform":
            ratio = (self.high / self.low) ** (1 / (points - 1))
            return [self.low * ratio**i for i in steps]
        spread = [self.low + (self.high - self.low) * i / (points - 1) for i in steps]
        if self.distribution == "randint":
            return sorted({round(value) for value in spread})
        return spread

    def check_values(self) -> list:
        """Values tried against TrainConfig up front: every listed value, a range's ends."""
        if self.distribution == "randint" and self.high - self.low < MAX_CHECKED_INTEGERS:
            return list(range(self.low, self.high + 1))
        return list(self.values) if self.distribution == "choice" else [self.low, self.high]

    def as_dict(self, grid_points: int | None = None) -> dict:
        """The row for search_space.json."""
        row = {"distribution": self.distribution, "row": self.where}
        if self.distribution == "choice":
            row["values"] = list(self.values)
        else:
            row.update(low=self.low, high=self.high)
        if grid_points:
            row["grid"] = self.grid(grid_points)
        return row


def parse_dimension(text: str, where: str | None = None) -> Dimension:
    """'warmup_ratio=uniform:0:0.1' -> Dimension; one clear line for anything wrong."""
    where = where or f"--space {text}"
    name, sep, spec = text.partition("=")
    name = name.strip().lstrip("-").replace("-", "_")
    distribution, _, args = spec.partition(":")
    if not (sep and name and args):
        raise ConfigError(f"{where}: write FIELD=DISTRIBUTION:ARGS, e.g. lr=loguniform:1e-5:1e-3 or batch_size=choice:16,32")
    if name not in _TRAIN_TYPES:
        close = difflib.get_close_matches(name, list(_TRAIN_TYPES), n=1)
        raise ConfigError(f"{where}: {name!r} is not a train_imdb flag" + (f" (did you mean {close[0]}?)" if close else ""))
    if name in FIXED_PER_SWEEP:
        raise ConfigError(f"{where}: {name} cannot be swept: {FIXED_PER_SWEEP[name]}")
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if distribution == "choice":
        values = tuple(_parse_value(name, item.strip(), where) for item in args.split(","))
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}: a value is listed twice")
        return Dimension(name, distribution, values, where)
    kind, _ = field_type(name)
    if kind not in (int, float):
        options = _TRAIN_CHOICES.get(name) or ((True, False) if kind is bool else None)
        hint = f"choice:{','.join(str(o).lower() if kind is bool else str(o) for o in options)}" if options else "choice:A,B"
        raise ConfigError(f"{where}: {distribution} needs a numeric field, and {name} is a {kind.__name__}: use {hint}")
    if distribution == "randint" and kind is not int:
        raise ConfigError(f"{where}: randint draws integers, and {name} is a float: use uniform or loguniform")
    if distribution != "randint" and kind is int:
        raise ConfigError(f"{where}: {name} is an integer: use randint:LOW:HIGH or choice:A,B,...")
    bounds = args.split(":")
    if len(bounds) != 2:
        raise ConfigError(f"{where}: write {name}={distribution}:LOW:HIGH")
    low, high = (_parse_number(kind, bound.strip(), where) for bound in bounds)
    return range_dimension(name, distribution, low, high, where)


def range_dimension(name: str, distribution: str, low, high, where: str) -> Dimension:
    if distribution == "loguniform" and not low > 0:
        raise ConfigError(f"{where}: a log-uniform range must start above 0, got {low:g}")
    if low > high:
        raise ConfigError(f"{where}: the range is inverted ({low:g} > {high:g})")
    if low == high:
        raise ConfigError(f"{where}: the range is empty ({low:g} to {high:g}); widen it, or fix the value with {flag(name)} {low:g}")
    return Dimension(name, distribution, (low, high), where)


def _parse_number(kind: type, text: str, where: str):
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {text!r} is not a finite number")
    return value


def _parse_value(name: str, text: str, where: str):
    kind, optional = field_type(name)
    if optional and text.lower() == "none":
        return None
    if kind is bool:
        truth = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if text.lower() not in truth:
            raise ConfigError(f"{where}: {text!r} is not true or false")
        return truth[text.lower()]
    if kind in (int, float):
        return _parse_number(kind, text, where)
    allowed = _TRAIN_CHOICES.get(name)
    if allowed and text not in allowed:
        raise ConfigError(f"{where}: {text!r} is not one of {', '.join(allowed)}")
    return text


@dataclass(frozen=True)
class SweepConfig:
    """Sweep any train_imdb settings with Ray Tune; every trial is an MLflow run."""

    num_samples: int = field(6, "trials to run (random/optuna); with grid, repeats of the whole grid")
    max_concurrent: int | None = field(None, "trials at once (default: as many as the cluster's CPUs/GPUs hold)")
    scheduler: str = field("asha", "asha: stop trials that trail at an epoch milestone; fifo: run every trial to the end", choices=SCHEDULERS)
    metric: str = field("val/accuracy", "validation metric that ASHA compares at each epoch and that picks the best trial", choices=tuple(METRICS))
    grace_period: int = field(1, "ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: int = field(2, "ASHA: keep the top 1/reduction_factor of trials at each milestone")
    search: str = field("random", "how trials are chosen: random, optuna (TPE), or grid", choices=SEARCHERS)
    space: tuple[str, ...] = field(
        DEFAULT_SPACE,
        "the search space: rows FIELD=DISTRIBUTION:ARGS over train_imdb's settings, with DISTRIBUTION "
        "loguniform:LOW:HIGH, uniform:LOW:HIGH, randint:LOW:HIGH (both ends included) or choice:A,B,... "
        "('none' unsets an optional field); a swept field's own flag is not given",
    )
    lr_min: float | None = field(None, "shorthand: the lr row becomes loguniform:LR_MIN:LR_MAX (missing end: 1e-5 or 1e-3)")
    lr_max: float | None = field(None, "shorthand: see --lr-min")
    batch_sizes: tuple[int, ...] | None = field(None, "shorthand: the batch_size row becomes choice of these global batch sizes")
    grid_points: int = field(3, "grid search: values per loguniform/uniform/randint row (choice rows: every value)")
    sweep_name: str | None = field(None, "name of the sweep (default: a fresh unique name); with --resume, the sweep to continue")
    resume: bool = field(False, "continue the interrupted sweep named by --sweep-name")
    train: TrainConfig = field(
        TrainConfig(experiment=SWEEP_EXPERIMENT),
        "What every trial trains with, as for train_imdb; --space replaces the swept ones.\n"
        "--epochs: the most any trial gets; --register-as, --promote: for the best trial.",
        exclude=NOT_FLAGS,
    )

    def __post_init__(self) -> None:
        for name in ("num_samples", "grace_period", "grid_points"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be at least 1, got {self.max_concurrent}")
        if self.reduction_factor < 2:
            raise ConfigError(f"--reduction-factor must be at least 2, got {self.reduction_factor}")
        if self.scheduler == "asha" and self.grace_period >= self.train.epochs:
            raise ConfigError(f"--grace-period {self.grace_period} must be below --epochs {self.train.epochs}, or ASHA can never stop a trial early")
        if self.resume and not self.sweep_name:
            raise ConfigError("--resume needs --sweep-name: the sweep to continue")
        check_trials_accepted(self.train, self.dimensions())

    def dimensions(self) -> tuple[Dimension, ...]:
        """The search space as rows: --space, with the shorthands' lr and batch_size rows."""
        return space_rows(self.space, self.lr_min, self.lr_max, self.batch_sizes)

    def swept(self) -> tuple[str, ...]:
        return tuple(row.name for row in self.dimensions())

    def possible_values(self, name: str) -> list:
        """What trials may get for `name`: its row's checked values, else the base value."""
        row = next((row for row in self.dimensions() if row.name == name), None)
        return row.check_values() if row else [getattr(self.train, name)]

    def trial_config(self, sampled: dict, run_name: str, data: str | None = None) -> TrainConfig:
        """The TrainConfig one trial trains with: the base, its sampled values, the per-trial settings."""
        values = {name: coerce(name, value) for name, value in sampled.items()}
        return replace(self.train, **values, **({"data": data} if data else {}), run_name=run_name, **PER_TRIAL)

    @property
    def mode(self) -> str:
        return METRICS[self.metric]

    def as_dict(self) -> dict:
        """For MLflow params: the swept fields of the base show their row, not a value no trial uses."""
        settings = asdict(self)
        settings["train"].update({row.name: f"swept: {row.where}" for row in self.dimensions()})
        for name in NOT_FLAGS:
            settings["train"].pop(name)
        return settings


def space_rows(space: tuple[str, ...], lr_min: float | None, lr_max: float | None, batch_sizes: tuple[int, ...] | None) -> tuple[Dimension, ...]:
    """--space rows; --lr-min/--lr-max and --batch-sizes replace the lr and batch_size rows."""
    rows = {}
    for text in space:
        row = parse_dimension(text)
        if row.name in rows:
            raise ConfigError(f"--space names {row.name} twice: {rows[row.name].where} and {row.where}")
        rows[row.name] = row
    if lr_min is not None or lr_max is not None:
        low = DEFAULT_LR_RANGE[0] if lr_min is None else lr_min
        high = DEFAULT_LR_RANGE[1] if lr_max is None else lr_max
        rows["lr"] = range_dimension("lr", "loguniform", low, high, f"--lr-min {low:g} --lr-max {high:g}")
    if batch_sizes is not None:
        where = f"--batch-sizes {' '.join(map(str, batch_sizes))}"
        if not batch_sizes:
            raise ConfigError("--batch-sizes is empty: give at least one batch size")
        if len(set(batch_sizes)) != len(batch_sizes):
            raise ConfigError(f"{where}: a value is listed twice")
        rows["batch_size"] = Dimension("batch_size", "choice", tuple(batch_sizes), where)
    if not rows:
        raise ConfigError("the search space is empty: give --space rows (or --lr-min/--lr-max, --batch-sizes)")
    return tuple(rows.values())


def check_trials_accepted(base: TrainConfig, rows: tuple[Dimension, ...]) -> None:
    """Refuse, before anything runs, a space with values that TrainConfig would refuse in a trial.

    Every combination of the rows' checked values (ends of ranges, listed values); past
    MAX_CHECKED_COMBINATIONS, each row on its own against the base.
    """
    candidates = [[(row, value) for value in row.check_values()] for row in rows]
    if math.prod(len(values) for values in candidates) <= MAX_CHECKED_COMBINATIONS:
        combinations: typing.Iterable = itertools.product(*candidates)
    else:
        combinations = ([pair] for values in candidates for pair in values)
    for combination in combinations:
        try:
            replace(base, **{row.name: value for row, value in combination}, **PER_TRIAL)
        except ConfigError as exc:
            # TrainConfig's messages name their flags: show only the rows the message is about
            named = [(row, value) for row, value in combination if flag(row.name) in str(exc)] or list(combination)
            chosen = ", ".join(f"{row.name}={value}" for row, value in named)
            rows_given = "; ".join(row.where for row, _ in named)
            raise ConfigError(f"{rows_given}: a trial with {chosen} would be refused: {exc}") from None
