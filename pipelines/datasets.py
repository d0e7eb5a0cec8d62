"""Versioned datasets of Parquet shards with a manifest, published atomically.

Layout under the storage root:

    datasets/<name>/<version>/manifest.json
    datasets/<name>/<version>/{train,val,test}/part-00000.parquet ...
    datasets/<name>/LATEST            (the newest version's id)

A version is written into a hidden staging folder and renamed into place only when
every shard and the manifest are written, so a reader sees a whole dataset or
none. The manifest is the dataset's identity: readers open shards only through it.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import DataError
from pipelines.sources import RawCorpus, SourceInfo
from pipelines.storage import Location, resolve
from pipelines.validation import label_counts

MANIFEST_NAME = "manifest.json"
LATEST_NAME = "LATEST"
MANIFEST_FORMAT = 1
SPLITS = ("train", "val", "test")
SCHEMA = pa.schema([pa.field("text", pa.string(), nullable=False), pa.field("label", pa.int64(), nullable=False)])
log = logging.getLogger(__name__)


@dataclass
class ShardInfo:
    path: str  # relative to the version folder, so the folder can move
    rows: int
    bytes: int


@dataclass
class SplitInfo:
    rows: int
    labels: dict[str, int]
    files: list[ShardInfo]


@dataclass
class Manifest:
    name: str
    version: str
    content_hash: str
    created_at: str
    source: dict
    settings: dict
    splits: dict[str, SplitInfo]
    cleaning: dict
    warnings: list[str] = field(default_factory=list)
    format: int = MANIFEST_FORMAT
    # Where the version folder is; set when loaded or published, never serialized.
    root: Location | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        payload = asdict(self)
        payload.pop("root")
        return payload

    @classmethod
    def from_json(cls, payload: dict, root: Location) -> "Manifest":
        if payload.get("format") != MANIFEST_FORMAT:
            raise DataError(f"unsupported manifest format {payload.get('format')!r} (expected {MANIFEST_FORMAT})", root.uri)
        splits = {
            name: SplitInfo(rows=info["rows"], labels=info["labels"], files=[ShardInfo(**f) for f in info["files"]])
            for name, info in payload["splits"].items()
        }
        fields = {k: v for k, v in payload.items() if k != "splits"}
        return cls(**fields, splits=splits, root=root)

    def split_uris(self, split: str) -> list[str]:
        """Full paths (on `filesystem`) of the split's shards."""
        if split not in self.splits:
            raise DataError(f"the dataset has no split {split!r} (has {sorted(self.splits)})", self.uri)
        assert self.root is not None
        return [self.root.child(*shard.path.split("/")).path for shard in self.splits[split].files]

    @property
    def filesystem(self):
        assert self.root is not None
        return self.root.filesystem

    @property
    def uri(self) -> str:
        return self.root.uri if self.root else f"{self.name}/{self.version}"

    def describe(self) -> str:
        parts = [f"{name}={info.rows} {info.labels}" for name, info in self.splits.items()]
        return f"dataset {self.name}/{self.version} at {self.uri}: " + ", ".join(parts)


def content_hash(splits: RawCorpus) -> str:
    """sha256 over every split's rows in written order: equal hash, equal data."""
    digest = hashlib.sha256()
    for name in SPLITS:
        if name not in splits:
            continue
        digest.update(f"[{name}]".encode())
        for text, label in zip(splits[name].texts, splits[name].labels):
            digest.update(f"{label}\x1f{text}\x1e".encode("utf-8"))
    return digest.hexdigest()


def dataset_root(storage: str, name: str) -> Location:
    return resolve(storage).child("datasets", name)


def _write_split(split_dir: Location, texts: list[str], labels: list[int], rows_per_shard: int) -> list[ShardInfo]:
    split_dir.makedirs()
    shards = []
    for index, start in enumerate(range(0, len(texts), rows_per_shard)):
        table = pa.table(
            {"text": texts[start : start + rows_per_shard], "label": labels[start : start + rows_per_shard]},
            schema=SCHEMA,
        )
        shard = split_dir.child(f"part-{index:05d}.parquet")
        pq.write_table(table, shard.path, filesystem=shard.filesystem, compression="zstd")
        size = shard.filesystem.get_file_info(shard.path).size
        relative = f"{split_dir.path.rsplit('/', 1)[-1]}/{shard.path.rsplit('/', 1)[-1]}"
        shards.append(ShardInfo(path=relative, rows=table.num_rows, bytes=size))
    return shards


def publish(
    splits: RawCorpus,
    *,
    storage: str,
    name: str,
    version: str,
    source: SourceInfo,
    settings: dict,
    cleaning: dict,
    warnings: list[str],
    rows_per_shard: int,
    digest: str,
    force: bool = False,
) -> Manifest:
    """Write shards + manifest to staging, then rename into datasets/<name>/<version>."""
    store = dataset_root(storage, name)
    final = store.child(version)
    staging = store.child(f".staging-{version}-{uuid.uuid4().hex[:8]}")
    trash: Location | None = None
    try:
        split_infos = {}
        for split_name in SPLITS:
            split = splits[split_name]
            files = _write_split(staging.child(split_name), split.texts, split.labels, rows_per_shard)
            split_infos[split_name] = SplitInfo(rows=len(split), labels=label_counts(split.labels), files=files)
        manifest = Manifest(
            name=name,
            version=version,
            content_hash=digest,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            source=asdict(source),
            settings=settings,
            splits=split_infos,
            cleaning=cleaning,
            warnings=warnings,
        )
        # The manifest is written last: a folder without one is never a dataset.
        staging.child(MANIFEST_NAME).write_json(manifest.to_json())
        if final.exists():
            if not force:
                raise DataError("this version exists already (use --force to rebuild it)", final.uri)
            trash = store.child(f".trash-{version}-{uuid.uuid4().hex[:8]}")
            final.move_to(trash)
        staging.move_to(final)
    except BaseException:
        staging.delete_dir()
        if trash is not None and not final.exists():
            trash.move_to(final)  # put the old version back rather than leave nothing
        raise
    if trash is not None:
        trash.delete_dir()
    store.child(LATEST_NAME).write_text(version + "\n")
    manifest.root = final
    return manifest


def find_version(storage: str, name: str, version: str) -> Manifest | None:
    """The manifest of datasets/<name>/<version>, or None if that version is absent."""
    folder = dataset_root(storage, name).child(version)
    if not folder.child(MANIFEST_NAME).exists():
        return None
    return _read(folder)


def _read(folder: Location) -> Manifest:
    manifest_file = folder.child(MANIFEST_NAME)
    try:
        payload = manifest_file.read_json()
    except FileNotFoundError as exc:
        raise DataError("no manifest.json here: not a prepared dataset (run python -m pipelines.prepare_imdb)", folder.uri) from exc
    except ValueError as exc:
        raise DataError(f"manifest.json is not valid JSON ({exc})", manifest_file.uri) from exc
    try:
        return Manifest.from_json(payload, folder)
    except (KeyError, TypeError) as exc:
        raise DataError(f"manifest.json is missing or has a malformed field ({exc})", manifest_file.uri) from exc


def load_manifest(reference: str, storage: str | None = None) -> Manifest:
    """Find a dataset by manifest path, version folder, dataset folder, or name.

    `imdb` -> <storage>/datasets/imdb/LATEST; `imdb/<version>` works too.
    """
    if reference == MANIFEST_NAME or reference.endswith("/" + MANIFEST_NAME):
        reference = reference[: -len(MANIFEST_NAME)].rstrip("/") or ("/" if reference.startswith("/") else ".")
    candidates: list[Location] = []
    location = resolve(reference)
    if location.exists():
        candidates.append(location)
    is_plain_name = "://" not in reference and not reference.startswith(("/", ".", "~"))
    if storage is not None and is_plain_name:
        # a dataset name: <storage>/datasets/<name>[/<version>], even if ./<name> exists
        candidates.append(resolve(storage).child("datasets", *reference.strip("/").split("/")))
    if not candidates:
        candidates.append(location)
    for folder in candidates:
        if folder.child(MANIFEST_NAME).exists():
            return _read(folder)
        latest = folder.child(LATEST_NAME)
        if latest.exists():
            version = latest.read_text().strip()
            return _read(folder.child(version))
    where = candidates[0].uri if candidates else reference
    raise DataError(
        "no prepared dataset here (no manifest.json or LATEST); run "
        "`python -m pipelines.prepare_imdb --source sample` (or --source PATH) first",
        where,
    )


def read_split_table(manifest: Manifest, split: str) -> pa.Table:
    """A whole split in memory: for small splits and tests; training streams instead."""
    tables = [pq.read_table(path, filesystem=manifest.filesystem) for path in manifest.split_uris(split)]
    return pa.concat_tables(tables)
