"""Replace a dataset version (`prepare --force`) or a prediction output (`--overwrite`), killed at step N.

    python tests/scenarios/overwrite_steps.py prepare STORAGE CORPUS GENERATION [KILL_AT]
    python tests/scenarios/overwrite_steps.py predict OUTPUT GENERATION [KILL_AT]

A step is one change to storage (a file or object written, moved or deleted: the methods of
pipelines.core.storage.Location that change something). With KILL_AT the process SIGKILLs
itself right before its KILL_AT-th step, as `kill -9` would; without, it runs to the end and
prints `STEPS <n>`. GENERATION makes each run's content differ from the last one's:
`prepare` rebuilds version `v1` of the dataset with another validation fraction (20 in turn);
`predict` commits rows whose `generation` column holds it, through the writer
`pipelines.predict` uses (pipelines.core.committed_parts). tests/test_overwrite_kills.py
runs it at every step and checks that the previous result or the new one is whole.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PREDICT_ROWS, PREDICT_PARTS = 90, 3
MUTATIONS = ("write_bytes", "write_text", "delete_file", "delete_dir", "move_file_to", "move_to", "makedirs")


def count_steps(kill_at: int | None) -> list[int]:
    """Wrap every Location method that changes storage; kill -9 before the kill_at-th call."""
    from pipelines.core.storage import Location

    steps = [0]

    def wrap(method):
        @functools.wraps(method)
        def counted(self, *args, **kwargs):
            steps[0] += 1
            if kill_at is not None and steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return method(self, *args, **kwargs)

        return counted

    for name in MUTATIONS:
        setattr(Location, name, wrap(getattr(Location, name)))
    return steps


def prepare(storage: str, corpus: str, generation: int) -> None:
    from pipelines.data.prepare import prepare_dataset
    from pipelines.data.settings import PrepareConfig

    config = PrepareConfig(source=corpus, storage=storage, version="v1", val_fraction=0.05 + 0.01 * (generation % 20),
                           rows_per_shard=40, progress=False, force=True, cache_dir=str(Path(corpus).parent / "cache"))
    prepare_dataset(config)


def predict(output: str, generation: int) -> None:
    import pyarrow as pa

    from pipelines.core.committed_parts import write_committed
    from pipelines.core.storage import resolve

    per_part = PREDICT_ROWS // PREDICT_PARTS
    tables = (pa.table({"row": list(range(i * per_part, (i + 1) * per_part)), "generation": [generation] * per_part})
              for i in range(PREDICT_PARTS))
    write_committed(tables, resolve(output))


def main(argv: list[str]) -> int:
    kind, *rest = argv
    kill_at = int(rest.pop()) if (kind == "prepare" and len(rest) == 4) or (kind == "predict" and len(rest) == 3) else None
    steps = count_steps(kill_at)
    if kind == "prepare":
        prepare(rest[0], rest[1], int(rest[2]))
    else:
        predict(rest[0], int(rest[1]))
    print("STEPS", steps[0], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
