"""Which $MLFLOW_TRACKING_URI is the user's: MLflow's own export for an earlier run in this process is not."""

from __future__ import annotations

import os

# `mlflow.set_tracking_uri` also exports $MLFLOW_TRACKING_URI (for subprocesses). The value
# exported for a run that had no URI from the user is ours, not the user's choice: a later
# run in the same process (a notebook, a test session) with another --storage must not
# take it for one and log into the first run's store.
_exported_for_us: str | None = None


def users_tracking_uri() -> str | None:
    """$MLFLOW_TRACKING_URI as the user set it; None when unset or only MLflow's export for an earlier run here."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    return None if uri is not None and uri == _exported_for_us else uri


def mark_exported(uri: str | None) -> None:
    """Record the URI that MLflow exported for a run the user gave no URI (None: the user's own)."""
    global _exported_for_us
    _exported_for_us = uri
