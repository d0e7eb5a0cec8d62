"""Replace a dataset version (`prepare --force`) or a prediction output (`--overwrite`), killed at step N.

    python tests/scenarios/overwrite_steps.py prepare STORAGE CORPUS GENERATION [KILL_AT]
    python tests/scenarios/overwrite_steps.py predict OUTPUT GENERATION [KILL_AT]
    python tests/scenarios/overwrite_steps.py found-prepare STORAGE
    python tests/scenarios/overwrite_steps.py found-predict OUTPUT

A step is one change to storage (a file or object written, moved or deleted: the methods of
pipelines.core.storage.Location that change something). With KILL_AT the process SIGKILLs
itself right before its KILL_AT-th step, as `kill -9` would; without, it runs to the end and
prints `STEPS <n>`. GENERATION makes each run's content differ from the last one's:
`prepare` rebuilds version `v1` of the dataset with the validation fraction
`val_fraction_of(GENERATION)`; `predict` commits rows whose `generation` column holds it,
through the writer `pipelines.predict` uses (pipelines.core.committed_parts).

`found-*` read what a reader finds there, as a reader does (LATEST, the manifest and every
shard it lists; `_SUCCESS` and every part it lists) and print `FOUND <generation>` (modulo
20 for prepare) and `UNLISTED <n>`, the files that the manifest or `_SUCCESS` does not list;
or `FOUND error: <why>` when what they find is not whole.
tests/test_overwrite_kills.py and tests/test_storage_faults.py run these.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PREDICT_ROWS, PREDICT_PARTS = 90, 3
MUTATIONS = ("write_bytes", "delete_file", "delete_dir", "move_file_to", "move_to", "makedirs")  # write_text and write_json write through write_bytes


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


GENERATIONS = 20  # prepare: the validation fractions taken in turn


def val_fraction_of(generation: int) -> float:
    return round(0.05 + 0.01 * (generation % GENERATIONS), 2)


def prepare(storage: str, corpus: str, generation: int) -> None:
    from pipelines.data.prepare import prepare_dataset
    from pipelines.data.settings import PrepareConfig

    config = PrepareConfig(source=corpus, storage=storage, version="v1", val_fraction=val_fraction_of(generation),
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


def found_prepare(storage: str) -> tuple[int, int]:
    from pipelines.core.storage import resolve
    from pipelines.data.datasets import LATEST_NAME, MANIFEST_NAME, load_manifest, read_split_table

    manifest = load_manifest("imdb", storage=storage)  # LATEST -> manifest -> every shard's size
    latest = resolve(storage).child("datasets", "imdb", LATEST_NAME).read_text().strip()
    if latest != "v1":
        raise AssertionError(f"LATEST names {latest!r}")
    for split, info in manifest.splits.items():
        if read_split_table(manifest, split).num_rows != info.rows:
            raise AssertionError(f"{split}: rows differ from the manifest's")
    listed = {shard.path for info in manifest.splits.values() for shard in info.files} | {MANIFEST_NAME}
    generation = round((manifest.settings["val_fraction"] - 0.05) / 0.01)
    return generation, len(set(manifest.root.file_sizes()) - listed)


def found_predict(output: str) -> tuple[int, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.core.committed_parts import SUCCESS_MARKER, committed_files
    from pipelines.core.storage import resolve

    folder = resolve(output)
    parts = committed_files(folder)
    if not parts:
        raise AssertionError("no committed output")
    table = pa.concat_tables([pq.read_table(folder.child(part).path, filesystem=folder.filesystem) for part in parts])
    if sorted(table["row"].to_pylist()) != list(range(PREDICT_ROWS)):
        raise AssertionError("rows lost or doubled")
    generations = set(table["generation"].to_pylist())
    if len(generations) != 1:
        raise AssertionError(f"a mix of results: generations {sorted(generations)}")
    return generations.pop(), len(set(folder.file_sizes()) - {SUCCESS_MARKER, *parts})


def main(argv: list[str]) -> int:
    kind, *rest = argv
    if kind.startswith("found-"):
        try:
            generation, unlisted = (found_prepare if kind == "found-prepare" else found_predict)(rest[0])
        except Exception as exc:  # noqa: BLE001 - what a reader would meet, reported to the test
            print(f"FOUND error: {type(exc).__name__}: {exc}", flush=True)
            return 0
        print(f"FOUND {generation}\nUNLISTED {unlisted}", flush=True)
        return 0
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
