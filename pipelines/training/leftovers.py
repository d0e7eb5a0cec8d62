"""Checkpoint folders a lost worker left in a run's folder: Ray never registered them, so never prunes them.

Ray Train names a checkpoint folder when the workers start uploading a checkpoint, and
registers it once every worker has reported it. A worker killed mid-upload leaves that folder
behind, and the restarted workers write the epoch again under a new name (the cluster
rehearsal, tests/scenarios/cluster_rehearsal.py, sees one in most runs). Ray's own list of the
run's checkpoints is `checkpoint_manager_snapshot.json` beside them, written before Ray deletes
the ones it prunes. Once the run has finished, a `checkpoint_*` folder that list does not
name is nobody's: nothing resumes from it and nothing registers it.
"""

from __future__ import annotations

import logging

from pipelines.core.storage import Location

log = logging.getLogger(__name__)
# ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME (Ray 2.60)
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def unregistered_checkpoints(run_dir: Location) -> list[str]:
    """The `checkpoint_*` folders of a finished run that Ray's snapshot does not name (none without a snapshot)."""
    snapshot = run_dir.child(SNAPSHOT_FILE)
    if not snapshot.exists():
        return []
    state = snapshot.read_json()
    named = {result["checkpoint_dir_name"] for key in ("checkpoint_results", "pending_training_results") for result in state.get(key) or []}
    if not named:  # an unknown layout, or a run that kept nothing: leave everything as it is
        return []
    return [name for name in run_dir.subfolders() if name.startswith("checkpoint_") and name not in named]


def remove_unregistered_checkpoints(run_dir: Location) -> list[str]:
    """Delete what unregistered_checkpoints finds; the names removed. A storage error is logged, never raised:
    the run itself succeeded."""
    removed = []
    try:
        for name in unregistered_checkpoints(run_dir):
            run_dir.child(name).delete_dir()
            removed.append(name)
    except (OSError, ValueError) as exc:
        log.warning("could not remove the unregistered checkpoint folders of %s: %r", run_dir.uri, exc)
    return removed
