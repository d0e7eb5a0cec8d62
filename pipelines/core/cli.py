"""Typed settings -> command-line flags, and one way to report errors on the console.

A settings dataclass declares each field with `help=` in its metadata; this module
turns the fields into `--flags` (like transformers' HfArgumentParser), builds the
dataclass back from the parsed namespace (so `__post_init__` validation runs),
and runs an entry point so that a PlatformError prints one line, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from typing import Any, Callable, TypeVar

from pipelines.core import console, stopping
from pipelines.core.errors import ConfigError, DataError, PlatformError

T = TypeVar("T")
EXIT_USER_ERROR = 2  # bad flags, bad data: the user can fix it
EXIT_FAILURE = 1  # the platform (or the cluster) failed


def field(default: Any, help: str, choices: typing.Sequence[Any] | None = None, exclude: typing.Iterable[str] = (), **kwargs: Any) -> Any:
    """A dataclass field with the help text (and choices) that its --flag shows.

    A field that holds another settings dataclass contributes that class's flags, with
    its default instance's values as their defaults, except the fields named in `exclude`.
    """
    metadata = {"help": help, "choices": choices, "exclude": frozenset(exclude)}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def build_parser(prog: str, doc: str, *settings_classes: type) -> argparse.ArgumentParser:
    """An entry point's parser: first doc line as description, the rest (examples) as epilog."""
    lines = doc.strip().splitlines()
    parser = argparse.ArgumentParser(
        prog=prog,
        description=lines[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(lines[2:]),
    )
    for settings_cls in settings_classes:
        add_arguments(parser, settings_cls)
    parser.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' output on the console too (it always goes to the log file)")
    return parser


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser, settings_cls: type, defaults: Any = None, exclude: typing.Collection[str] = (), description: str | None = None
) -> None:
    """Add one --flag per field of `settings_cls`, typed from its annotation.

    `defaults`: an instance whose values are the flags' defaults (else the fields' own);
    `exclude`: fields that get no flag. A field holding a settings dataclass adds its flags.
    """
    hints = typing.get_type_hints(settings_cls)
    group = parser.add_argument_group(settings_cls.__name__, description or (settings_cls.__doc__ or "").strip().splitlines()[0])
    nested = []
    for f in dataclasses.fields(settings_cls):
        if not f.init or f.name in exclude:
            continue
        kind = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        if dataclasses.is_dataclass(kind):
            nested.append((kind, default, f.metadata.get("exclude", ()), f.metadata.get("help")))
            continue
        options: dict[str, Any] = {"default": default, "dest": f.name, "help": f.metadata.get("help", "")}
        if f.metadata.get("choices"):
            options["choices"] = f.metadata["choices"]
        base, is_optional = _unwrap_optional(kind)
        if base is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) in (list, tuple):
            item_type = typing.get_args(base)[0]
            options.update(nargs="+", type=item_type)
        else:
            options["type"] = base
        if options["help"] and "action" not in options:
            options["help"] += " (default: %(default)s)"
        group.add_argument(_flag(f.name), **options)
    for kind, default, excluded, help_text in nested:
        add_arguments(parser, kind, default, excluded, help_text)


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    args = typing.get_args(kind)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return kind, False


def from_namespace(settings_cls: type[T], namespace: argparse.Namespace, defaults: Any = None, exclude: typing.Collection[str] = ()) -> T:
    """Build the dataclass from parsed flags, so its validation runs once, here.

    Nested settings are built first; excluded fields keep the values of `defaults`.
    """
    hints = typing.get_type_hints(settings_cls)
    values = {}
    for f in dataclasses.fields(settings_cls):
        if not f.init or f.name in exclude:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            nested_defaults = getattr(defaults, f.name) if defaults is not None else _default(f)
            values[f.name] = from_namespace(hints[f.name], namespace, nested_defaults, f.metadata.get("exclude", ()))
        elif hasattr(namespace, f.name):
            values[f.name] = getattr(namespace, f.name)
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value) if _is_tuple_field(settings_cls, name) else value
    if defaults is not None:
        return dataclasses.replace(defaults, **values)
    return settings_cls(**values)


def _is_tuple_field(settings_cls: type, name: str) -> bool:
    base, _ = _unwrap_optional(typing.get_type_hints(settings_cls)[name])
    return typing.get_origin(base) is tuple


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run an entry point: an error prints what failed, in which stage, and where the log is.

    Exit 2 for what the user can fix (flags, data: ConfigError, DataError), 1 for a
    failure of the platform or the cluster (any other error; its traceback is in the log),
    128 + the signal when SIGINT (Ctrl-C: 130) or SIGTERM (143) stopped it: both end the
    run as Ctrl-C does, and the local Ray it started stops with it (pipelines.core.stopping).
    """
    logging.basicConfig(level=logging.INFO, format=console.LOG_FORMAT)
    console.hold_output_until_exit()
    with stopping.signals_handled():
        try:
            code = main(argv)
        except (ConfigError, DataError) as exc:
            _report(f"error: {exc}")
            sys.exit(EXIT_USER_ERROR)
        except PlatformError as exc:
            _report(f"error: {exc}")
            sys.exit(EXIT_FAILURE)
        except KeyboardInterrupt:
            _report(stopping.stop_line())
            sys.exit(stopping.exit_code())
        except Exception as exc:  # a bug or a cluster failure: one line here, the traceback in the log
            first_line = (str(exc).strip().splitlines() or [""])[0][:500]
            if console.log_path() is None:
                raise
            _report(f"error: {type(exc).__name__}: {first_line}")
            sys.exit(EXIT_FAILURE)
    sys.exit(code or 0)


def _report(line: str) -> None:
    """The error line, then (when the job ran in a console session) its stage and the full log."""
    console.tell(line)
    if console.log_path() is not None:
        console.tell(f"failed in stage: {console.current_stage()}; full log: {console.log_path()}")
