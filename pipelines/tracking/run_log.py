"""The job's console log: teed to a file when no console session holds it, and uploaded into the run."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.core import console

log = logging.getLogger(__name__)


def upload_console_log(run_id: str, log_path: Path) -> None:
    """The job's log as the run's `console.log`; a failure to upload must not hide the run's own error."""
    import shutil
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="console-log-") as folder:
            copy = Path(folder) / "console.log"
            sys.stdout.flush()
            sys.stderr.flush()
            shutil.copyfile(log_path, copy)
            MlflowClient().log_artifact(run_id, str(copy))
    except Exception as exc:
        log.warning("could not upload %s to the MLflow run %s: %s", log_path, run_id, exc)


@contextmanager
def console_log():
    """The file that holds this job's output: the console session's log, or a tee of stdout/stderr."""
    if console.active():
        yield console.log_path()
        return
    import tempfile

    # the caller uploads the log inside this block (tracking.upload_console_log); then it goes
    with tempfile.TemporaryDirectory(prefix="train-log-") as folder, _tee(Path(folder) / "console.log") as path:
        yield path


@contextmanager
def _tee(path: Path):
    """Tee stdout/stderr into `path` (Ray forwards worker output through them), for in-process use."""

    class Tee:
        def __init__(self, stream, sink):
            self.stream, self.sink = stream, sink

        def write(self, text):
            self.sink.write(text)
            return self.stream.write(text)

        def flush(self):
            self.sink.flush()
            self.stream.flush()

        def __getattr__(self, name):
            return getattr(self.stream, name)

    with open(path, "a", encoding="utf-8") as sink:
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(old[0], sink), Tee(old[1], sink)
        try:
            yield path
        finally:
            sys.stdout, sys.stderr = old
