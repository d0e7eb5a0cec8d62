"""Where the platform keeps its files: a local folder, or an s3:// / gs:// URI.

Everything goes through pyarrow filesystems so that the same code writes to a
laptop's disk and to a bucket that every node of a cluster can read.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from pipelines.errors import ConfigError

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")
DEFAULT_STORAGE = "~/.cache/imdb-platform"
STORAGE_ENV = "PLATFORM_STORAGE"


def default_storage() -> str:
    """The storage root: $PLATFORM_STORAGE, else a folder in the user's cache."""
    return os.environ.get(STORAGE_ENV, DEFAULT_STORAGE)


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


@dataclass(frozen=True)
class Location:
    """A path on a filesystem; `uri` is how a person (or Ray) names it."""

    filesystem: pafs.FileSystem
    path: str
    uri: str

    def child(self, *parts: str) -> "Location":
        path = "/".join([self.path.rstrip("/"), *parts])
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return Location(self.filesystem, path, uri)

    def exists(self) -> bool:
        return self.filesystem.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.filesystem.get_file_info(self.path).type == pafs.FileType.Directory

    def read_text(self) -> str:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read().decode("utf-8")

    def write_text(self, text: str) -> None:
        """Write a small file so that readers see the old or the new content, never half.

        Local: write a sibling temporary file, then os.replace (atomic on POSIX).
        Object stores: a single PUT is already all-or-nothing.
        """
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)
        else:
            with self.filesystem.open_output_stream(self.path) as stream:
                stream.write(text.encode("utf-8"))

    def read_json(self) -> dict:
        return json.loads(self.read_text())

    def write_json(self, payload: dict) -> None:
        self.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    def makedirs(self) -> None:
        self.filesystem.create_dir(self.path, recursive=True)

    def delete_dir(self) -> None:
        if self.exists():
            self.filesystem.delete_dir(self.path)

    def move_to(self, target: "Location") -> None:
        """Rename a folder: atomic on a local disk; copy-then-delete on object stores.

        On object stores readers must therefore trust only folders whose manifest
        exists: the manifest is written last (see datasets.publish).
        """
        self.filesystem.move(self.path, target.path)


def resolve(uri: str | os.PathLike) -> Location:
    """Turn a folder path or a storage URI into a Location.

    Raises ConfigError naming the URI when no filesystem can handle it (for
    example s3:// without credentials configured is only found out on first use).
    """
    text = str(uri)
    if is_remote(text):
        try:
            filesystem, path = pafs.FileSystem.from_uri(text)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError variants
            raise ConfigError(f"storage {text!r}: cannot open this filesystem ({exc})") from exc
        return Location(filesystem, path, text.rstrip("/"))
    if "://" in text and not text.startswith("file://"):
        raise ConfigError(
            f"storage {text!r}: unsupported scheme; use a local folder or one of "
            + ", ".join(REMOTE_SCHEMES)
        )
    local = Path(text.removeprefix("file://")).expanduser().resolve()
    return Location(pafs.LocalFileSystem(), str(local), str(local))
