"""Where the platform keeps its files: a local folder, or an s3:// / gs:// URI.

Everything goes through pyarrow filesystems so that the same code writes to a
laptop's disk and to a bucket that every node of a cluster can read. Endpoint and
credentials of an object store come from the standard environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, an instance
profile; `GOOGLE_APPLICATION_CREDENTIALS` for gs://): nothing secret is ever
passed as an argument or written to a file.

Object stores have no directories and no rename: code that must commit several
objects at once writes a marker last (see datasets.publish) instead of moving a
folder into place.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from pipelines.core.errors import ConfigError

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")
DEFAULT_STORAGE = "~/.cache/imdb-platform"
STORAGE_ENV = "PLATFORM_STORAGE"


def default_storage() -> str:
    """The storage root: $PLATFORM_STORAGE, else a folder in the user's cache."""
    return os.environ.get(STORAGE_ENV, DEFAULT_STORAGE)


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


class StorageError(ConfigError):
    """The storage cannot be reached or used; the message names the URI and the reason."""


def explain(exc: BaseException, uri: str) -> StorageError:
    """One line for an object-store failure, from pyarrow's AWS/GCS error text."""
    text = str(exc)
    lowered = text.lower()
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if "network_connection" in lowered or "could not connect" in lowered or "couldn't connect" in lowered or "resolve host" in lowered:
        where = f"the endpoint {endpoint} ($AWS_ENDPOINT_URL)" if endpoint else "the object store"
        return StorageError(f"storage {uri}: cannot reach {where}: is it up, and is the address right?")
    if "no_such_bucket" in lowered or "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        return StorageError(f"storage {uri}: the bucket {bucket_of(uri)!r} does not exist; create it or fix the URI")
    if any(mark in lowered for mark in ("access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden")):
        return StorageError(
            f"storage {uri}: access denied; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the node's instance profile)"
        )
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return StorageError(f"storage {uri}: {first_line}")


def bucket_of(uri: str) -> str:
    return uri.split("://", 1)[1].split("/", 1)[0] if "://" in uri else ""


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

    @property
    def is_object_store(self) -> bool:
        """No directories, no rename: commit by writing a marker last."""
        return not isinstance(self.filesystem, pafs.LocalFileSystem)

    def exists(self) -> bool:
        return self.filesystem.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.filesystem.get_file_info(self.path).type == pafs.FileType.Directory

    def read_text(self) -> str:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read().decode("utf-8")

    def write_text(self, text: str) -> None:
        """Write a small file so that readers see the old or the new content, never half (write_bytes)."""
        self.write_bytes(text.encode("utf-8"))

    def read_json(self) -> dict:
        return json.loads(self.read_text())

    def write_json(self, payload: dict) -> None:
        self.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    def uri_of(self, path: str) -> str:
        """A path that pyarrow or Ray gives back on this filesystem, as a URI anyone can open.

        Object-store paths come back without their scheme ("bucket/key"), which every
        reader would otherwise take for a local path.
        """
        if not self.is_object_store or "://" in path:
            return path
        return f"{self.uri.split('://', 1)[0]}://{path.lstrip('/')}"

    def write_bytes(self, data: bytes) -> None:
        """One object or one file, whole or not at all: readers see the old or the new content, never half.

        Local: a sibling temporary file, then os.replace (atomic on POSIX).
        Object stores: a single PUT is already all-or-nothing.
        """
        if self.is_object_store:
            with self.filesystem.open_output_stream(self.path) as stream:
                stream.write(data)
            return
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def makedirs(self) -> None:
        """Local folders only: object stores have none (an empty marker object would only mislead listings)."""
        if not self.is_object_store:
            self.filesystem.create_dir(self.path, recursive=True)

    def delete_dir(self) -> None:
        if self.exists():
            self.filesystem.delete_dir(self.path)

    def delete_file(self) -> None:
        self.filesystem.delete_file(self.path)

    def move_file_to(self, target: "Location") -> None:
        """One file: a rename on local disk, a server-side copy then a delete on object stores."""
        self.filesystem.move(self.path, target.path)

    def subfolders(self) -> list[str]:
        """The names of the folders right below this one (object stores: the key prefixes)."""
        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        return sorted(info.base_name for info in self.filesystem.get_file_info(selector) if info.type == pafs.FileType.Directory)

    def file_sizes(self) -> dict[str, int]:
        """Every file below this folder -> its size, relative paths; one listing call on object stores."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        prefix = self.path.rstrip("/") + "/"
        return {
            info.path[len(prefix) :]: info.size
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File and info.path.startswith(prefix)
        }

    def move_to(self, target: "Location") -> None:
        """Rename a folder: local disks only (atomic there). Object stores cannot rename a folder."""
        if self.is_object_store:
            raise StorageError(f"storage {self.uri}: object stores cannot rename a folder (commit with a marker instead)")
        self.filesystem.move(self.path, target.path)

    def check_usable(self) -> None:
        """Fail fast with one line when an object store's endpoint, credentials or bucket are wrong."""
        if not self.is_object_store:
            return
        bucket = self.path.split("/", 1)[0]
        try:
            info = self.filesystem.get_file_info(bucket)
        except OSError as exc:
            raise explain(exc, self.uri) from exc
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"storage {self.uri}: the bucket {bucket!r} does not exist; create it or fix the URI")


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
            # one line: pyarrow's text can run to dozens (hdfs:// lists every libjvm it tried)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"storage {text!r}: cannot open this filesystem ({reason})") from exc
        return Location(filesystem, path, text.rstrip("/"))
    if "://" in text and not text.startswith("file://"):
        raise ConfigError(
            f"storage {text!r}: unsupported scheme; use a local folder or one of "
            + ", ".join(REMOTE_SCHEMES)
        )
    try:
        local = Path(text.removeprefix("file://")).expanduser().resolve()
    except (ValueError, OSError) as exc:  # a NUL byte, a symlink loop, a name too long
        raise ConfigError(f"storage {text!r}: not a usable folder path ({exc})") from exc
    except RuntimeError as exc:  # ~name of a user this machine does not have
        raise ConfigError(f"storage {text!r}: not a usable folder path (no home folder for {text.split('/')[0]!r})") from exc
    return Location(pafs.LocalFileSystem(), str(local), str(local))
