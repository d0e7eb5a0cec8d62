"""What a person sees while a job runs: one line per stage, progress bars, a log file for the rest.

Ray, MLflow, transformers and the workers all write to stdout and stderr: scheduler
internals, deprecation warnings, execution plans, C++ core messages. Inside
`session()` the process's file descriptors 1 and 2 point at the job's log file, so
all of that (and whatever child processes inherit) lands there, and this module
keeps a handle on the terminal for the lines meant for a person. `--verbose`
leaves the descriptors alone and shows everything, as a plain Python program would.

Without a session (library use, the tests) `say` prints to stdout and bars are off.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

from tqdm import tqdm

from pipelines.core import stopping
from pipelines.core.credentials import mask

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# a bar redraws at most this often on a terminal; in a pipe (CI logs, `| tee`) it
# prints a plain line at most this often, and its final state, instead of redrawing
REFRESH_S_TERMINAL = 0.5
LINE_EVERY_S_PIPE = 30.0


@dataclass
class _Session:
    log_path: Path
    terminal: TextIO  # where a person reads
    redirected: bool  # fds 1 and 2 go to the log file
    interactive: bool
    stage: str = "start"


_SESSION: _Session | None = None
_LAST: _Session | None = None  # for the error line after the session closed
# An entry point's process ends with its session. What runs after it (interpreter
# shutdown, atexit handlers, library threads still logging, a signal's aftermath) keeps
# writing to the log file; the terminal gets only `tell` lines (see hold_output_until_exit).
_HOLD_UNTIL_EXIT = False
_HELD_TERMINALS: tuple[TextIO, TextIO] | None = None  # (stdout, stderr) of a held session


def hold_output_until_exit() -> None:
    """Sessions opened from now on leave fds 1 and 2 on the log file when they end.

    For entry points (pipelines.core.cli.run_main): the process exits right after the session,
    and anything printed on the way out (Ray's and MLflow's threads, atexit handlers,
    "Exception ignored in ..." lines after a Ctrl-C) belongs in the log, not on the console.
    """
    global _HOLD_UNTIL_EXIT
    _HOLD_UNTIL_EXIT = True


def tell(line: str) -> None:
    """A line for the person after the session ended (the error lines): stderr of the terminal."""
    line = mask(line)  # an error's text may quote a URI with its password
    stream = _HELD_TERMINALS[1] if _HELD_TERMINALS else sys.stderr
    stream.write(line + "\n")
    stream.flush()
    if _HELD_TERMINALS:
        print(line, file=sys.stderr, flush=True)  # stderr is the log file


def log_dir_for(storage: str) -> Path:
    """`<storage>/logs` for a local storage root, else this machine's cache."""
    from pipelines.core.storage import DEFAULT_STORAGE, is_remote, resolve

    root = resolve(DEFAULT_STORAGE if is_remote(storage) else storage).path
    return Path(root) / "logs"


def active() -> bool:
    return _SESSION is not None


def log_path() -> Path | None:
    """The current (or last) session's log file."""
    last = _SESSION or _LAST
    return last.log_path if last else None


def current_stage() -> str | None:
    """The stage running now, or the one the last session ended in."""
    last = _SESSION or _LAST
    return last.stage if last else None


def say(line: str) -> None:
    """A line for the person at the terminal (and the log file)."""
    line = mask(line)
    if _SESSION is None or not _SESSION.redirected:
        print(line, flush=True)
        return
    _SESSION.terminal.write(line + "\n")
    _SESSION.terminal.flush()
    print(line, flush=True)  # stdout is the log file


def enter(name: str) -> None:
    """Name the stage now running, without a line: a failure in it is reported as in `name`."""
    if _SESSION is not None:
        _SESSION.stage = name


def stage(name: str, detail: str) -> None:
    """Enter a stage of the job: `[name] detail`; a failure names the stage it happened in."""
    if _SESSION is not None:
        _SESSION.stage = name
    say(f"[{name}] {detail}")


def warn(text: str) -> None:
    """A warning a person can act on: it says what to do."""
    say(f"warning: {text}")


class Bar:
    """A tqdm bar (rate, ETA) redrawn on a terminal, or plain lines now and then in a pipe."""

    def __init__(self, total: int | None, desc: str, unit: str, session: _Session | None):
        self.session = session
        self.pipe = session is not None and not session.interactive
        self.last_line = time.monotonic()
        self.done_shown = False  # a finished bar is printed once, whoever prints it
        self.tqdm = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            disable=session is None,
            file=io.StringIO() if self.pipe or session is None else session.terminal,
            mininterval=REFRESH_S_TERMINAL,
            dynamic_ncols=not self.pipe,
            ncols=100 if self.pipe else None,
            leave=True,
            smoothing=0.1,
        )

    def update(self, rows: int) -> None:
        self.tqdm.update(rows)
        if self.pipe and time.monotonic() - self.last_line > LINE_EVERY_S_PIPE:
            self._line()

    def set_done(self, done: int, postfix: str = "") -> None:
        if postfix:
            self.tqdm.set_postfix_str(postfix, refresh=False)
        if done != self.tqdm.n:
            self.update(done - self.tqdm.n)

    def close(self) -> None:
        """Close the bar; its final state stays on the console and in the log file."""
        if self.tqdm.disable:
            return
        self.tqdm.close()
        if self.pipe:
            self._line()
        elif self.session is not None and self.session.redirected:
            print(str(self.tqdm), flush=True)

    def _line(self) -> None:
        self.last_line = time.monotonic()
        finished = self.tqdm.total is not None and self.tqdm.n >= self.tqdm.total
        if finished and self.done_shown:
            return
        self.done_shown = finished
        say(str(self.tqdm))


def bar(total: int | None, desc: str, unit: str = "rows") -> Bar:
    """A progress bar with rate and ETA; disabled without a session."""
    return Bar(total, desc, unit, _SESSION)


def close_bar(progress: Bar) -> None:
    progress.close()


@contextmanager
def progress(total: int | None, desc: str, unit: str = "rows") -> Iterator[Bar]:
    progress_bar = bar(total, desc, unit)
    try:
        yield progress_bar
    finally:
        close_bar(progress_bar)


@contextmanager
def session(job: str, log_dir: Path, verbose: bool = False) -> Iterator[Path]:
    """Route this process's output to `log_dir/<job>-<time>.log`; the terminal gets `say` lines.

    On an exception the traceback goes to the log file; the caller prints the one line.
    """
    global _SESSION, _LAST, _HELD_TERMINALS
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    interactive = os.isatty(saved_out)
    terminal = open(os.dup(saved_out), "w", encoding="utf-8", errors="replace", buffering=1)
    if not verbose:
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    else:
        path.touch()
    handler, removed = _log_handlers(path, verbose)
    _SESSION = _LAST = _Session(path, terminal, redirected=not verbose, interactive=interactive)
    say(f"log: {path}{'' if verbose else '  (Ray and library output; --verbose shows it here)'}")
    try:
        yield path
    except BaseException as exc:
        if not isinstance(exc, SystemExit):
            log.error("%s failed in stage %r:\n%s", job, _SESSION.stage, "".join(traceback.format_exception(exc)))
        raise
    finally:
        _shutdown_ray()  # inside the session: Ray's last words go to the log file
        _SESSION = None
        logging.getLogger().removeHandler(handler)
        handler.close()
        for existing in removed:
            logging.getLogger().addHandler(existing)
        sys.stdout.flush()
        sys.stderr.flush()
        if _HOLD_UNTIL_EXIT and not verbose:
            _HELD_TERMINALS = (terminal, open(saved_err, "w", encoding="utf-8", errors="replace", buffering=1))
            os.close(saved_out)
        else:
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            terminal.close()


def _log_handlers(path: Path, verbose: bool) -> tuple[logging.Handler, list[logging.Handler]]:
    """Python logging and warnings into the log file; on the terminal only with --verbose.

    Returns the file handler and the console handlers taken off for the session.
    """
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    removed = []
    if not verbose:
        # basicConfig's stderr handler would now write to the log file too: one copy is enough
        for existing in list(root.handlers):
            if type(existing) is logging.StreamHandler:
                root.removeHandler(existing)
                removed.append(existing)
    root.addHandler(handler)
    logging.captureWarnings(True)
    return handler, removed


def _shutdown_ray() -> None:
    stopping.shutdown_ray()  # and whatever of the local Ray outlives ray.shutdown()
