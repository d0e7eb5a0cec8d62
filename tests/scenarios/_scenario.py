"""What the scenario scripts share: environment, a tiny model, waiting, and the one result line.

The scenarios run as their own processes (tests/test_multinode.py starts them): a process
joins one Ray cluster only, and the pytest process already holds the session-wide Ray.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

RESULT_PREFIX = "SCENARIO_RESULT "
REPO = Path(__file__).resolve().parents[2]


def setup_environment() -> None:
    """Before Ray is imported: offline, quiet, and no token auth on the throwaway cluster.

    RAY_AUTH_MODE is set explicitly: with it unset, a driver that finds ~/.ray/auth_token
    (left by any earlier local `ray.init()`) turns token auth on and cannot talk to
    nodes that were started without it.
    """
    os.environ.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # the local SQLite store under the scenario's storage, never a server from the environment
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PLATFORM_STORAGE"):
        os.environ.pop(name, None)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def build_tiny_model(folder: Path) -> str:
    """The tests' tiny random BERT (tests/tiny_model.py)."""
    from tests.tiny_model import build_tiny_model as build

    return build(folder)


def wait_for(predicate, timeout_s: float, interval_s: float = 0.2, what: str = "a condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def emit(result: dict) -> None:
    """The one line the test parses (everything else on stdout is Ray's and training's log)."""
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
