"""A folder of Parquet parts committed as a whole: its `_SUCCESS` lists the parts of the result.

Object stores have no rename, so a folder cannot be swapped for another. Instead a result
is written in four steps, each safe to die in:

1. the parts go under `<folder>/_temporary-<run>/` (a name Parquet tools skip: `_` prefix);
2. each is moved to `<folder>/part-<run>-NNNNN.parquet` (a rename on local disk, a copy and a
   delete on object stores), next to the previous result's parts;
3. `_SUCCESS` is replaced in one write (os.replace, or one PUT): from here on the new result
   is the folder's;
4. what `_SUCCESS` does not list goes: the previous result, a killed run's leftovers.

A `kill -9` anywhere leaves a `_SUCCESS` whose parts all exist: the previous result up to
step 3, the new one after it. Readers take the parts that `_SUCCESS` lists
(`committed_files`), never a listing of the folder, which between steps 2 and 4 holds both
results.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.errors import DataError
from pipelines.core.storage import Location

SUCCESS_MARKER = "_SUCCESS"
STAGING_PREFIX = "_temporary-"


@dataclass(frozen=True)
class Committed:
    rows: int
    files: list[str]  # relative to the folder, in order


def write_committed(tables: Iterable[pa.Table], folder: Location) -> Committed:
    """Write the tables as the folder's new result, replacing whatever it held only at the end."""
    run = uuid.uuid4().hex[:8]
    staging = folder.child(f"{STAGING_PREFIX}{run}")
    staging.makedirs()
    staged, rows = [], 0
    try:
        for table in tables:
            if table.num_rows == 0:
                continue
            part = staging.child(f"part-{len(staged):05d}.parquet")
            buffer = io.BytesIO()  # a block of rows: small enough to write in one go, whole or not at all
            pq.write_table(table, buffer, compression="zstd")
            part.write_bytes(buffer.getvalue())
            staged.append(part)
            rows += table.num_rows
    except BaseException:
        staging.delete_dir()  # an error, not a kill: nothing of this run stays
        raise
    names = [f"part-{run}-{index:05d}.parquet" for index in range(len(staged))]
    for part, name in zip(staged, names):
        part.move_file_to(folder.child(name))
    folder.child(SUCCESS_MARKER).write_json({"rows": rows, "files": names, "run": run})
    _remove_unlisted(folder, set(names))
    return Committed(rows, names)


def _remove_unlisted(folder: Location, keep: set[str]) -> None:
    for name in folder.file_sizes():
        if name != SUCCESS_MARKER and name not in keep:
            folder.child(*name.split("/")).delete_file()
    for name in folder.subfolders():  # local disk: the folders that the deletes left empty
        if name.startswith(STAGING_PREFIX):
            folder.child(name).delete_dir()


def committed_files(folder: Location) -> list[str] | None:
    """The parts of the folder's committed result (relative paths), checked to exist; None without a list.

    None: no `_SUCCESS`, or one of an older release (a line of text, not the list).
    """
    marker = folder.child(SUCCESS_MARKER)
    if not marker.exists():
        return None
    try:
        listed = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return None
    sizes = folder.file_sizes()
    missing = [name for name in listed if name not in sizes]
    if missing:
        raise DataError(f"{SUCCESS_MARKER} lists {len(missing)} part(s) that are missing (first: {missing[0]}): the output is damaged", folder.uri)
    return list(listed)


def visible_parquet_files(folder: Location) -> list[str]:
    """Relative paths of the folder's Parquet data: the committed parts, else every file not under a hidden name."""
    listed = committed_files(folder)
    if listed is not None:
        return listed
    return sorted(name for name in folder.file_sizes() if name.endswith(".parquet") and not _hidden(name))


def _hidden(relative: str) -> bool:
    return any(piece.startswith(("_", ".")) for piece in relative.split("/"))
