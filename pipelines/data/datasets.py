"""Versioned datasets of Parquet shards with a manifest, published atomically.

Layout under the storage root:

    datasets/<name>/<version>/manifest.json
    datasets/<name>/<version>/{train,val,test}/part-00000-<sha256[:12]>.parquet ...
    datasets/<name>/LATEST            (the newest version's id)

The manifest (every shard's path, rows, size and sha256) is the commit marker and
the dataset's identity: readers open shards only through it, and only after
checking that every shard it lists exists with the recorded size.

Shard names carry the first 12 hex digits of their bytes' sha256 (`part-00000-<sha>.parquet`),
so a name always holds the same bytes.

- A new version on local disk is written into a hidden staging folder and renamed into
  place with its manifest (atomic on POSIX).
- Object stores (s3://, gs://) have no rename, and a version that exists (`--force`, or a
  repair of lost shards) must stay readable while it is rebuilt: the shards are written
  under the version's folder beside the old ones, the manifest replaces the old one in one
  write (os.replace, or one PUT), and only then do the files it does not list go (the old
  shards, a killed run's leftovers). A crash at any point leaves a manifest whose shards
  all exist, the old one or the new one; shards without a manifest are never trusted.
  Rewriting the same content writes the same names with the same bytes, so two runs
  racing on one version end with one valid version.

`LATEST` moves only after the manifest is in place.
"""

from __future__ import annotations

import hashlib
import io
import logging
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.errors import DataError
from pipelines.core.storage import Location, explain, resolve
from pipelines.data.corpus import RawCorpus, SourceInfo
from pipelines.data.validation import label_counts

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
    sha256: str = ""  # empty in manifests written before checksums were recorded


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


def _write_split(version_dir: Location, split: str, texts: list[str], labels: list[int], rows_per_shard: int) -> list[ShardInfo]:
    """Each shard is serialized in memory (checksum and size known before it is stored), then written in one go."""
    version_dir.child(split).makedirs()
    shards = []
    for index, start in enumerate(range(0, len(texts), rows_per_shard)):
        table = pa.table(
            {"text": texts[start : start + rows_per_shard], "label": labels[start : start + rows_per_shard]},
            schema=SCHEMA,
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        data = buffer.getvalue()
        sha256 = hashlib.sha256(data).hexdigest()
        relative = f"{split}/part-{index:05d}-{sha256[:12]}.parquet"
        version_dir.child(*relative.split("/")).write_bytes(data)
        shards.append(ShardInfo(path=relative, rows=table.num_rows, bytes=len(data), sha256=sha256))
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
    """Write shards, then the manifest that commits them, into datasets/<name>/<version>."""
    store = dataset_root(storage, name)
    final = store.child(version)

    def build_manifest(version_dir: Location) -> Manifest:
        split_infos = {}
        for split_name in SPLITS:
            split = splits[split_name]
            files = _write_split(version_dir, split_name, split.texts, split.labels, rows_per_shard)
            split_infos[split_name] = SplitInfo(rows=len(split), labels=label_counts(split.labels), files=files)
        return Manifest(
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

    try:
        if final.child(MANIFEST_NAME).exists():
            if not force:
                raise DataError("this version exists already (use --force to rebuild it)", final.uri)
            manifest = _publish_in_place(final, build_manifest)
        elif final.is_object_store:
            manifest = _publish_in_place(final, build_manifest)
        else:
            manifest = _publish_by_rename(store, final, build_manifest)
        store.child(LATEST_NAME).write_text(version + "\n")  # only after the manifest
    except OSError as exc:  # the object store refused (endpoint, credentials, bucket)
        raise explain(exc, final.uri) from exc
    manifest.root = final
    return manifest


def _publish_by_rename(store: Location, final: Location, build_manifest) -> Manifest:
    """A new version on local disk: a staging folder with its manifest, renamed into place."""
    staging = store.child(f".staging-{final.path.rsplit('/', 1)[-1]}-{uuid.uuid4().hex[:8]}")
    try:
        manifest = build_manifest(staging)
        # The manifest is written last: a folder without one is never a dataset.
        staging.child(MANIFEST_NAME).write_json(manifest.to_json())
        final.delete_dir()  # a folder without a manifest: not a version, nothing a reader trusts
        staging.move_to(final)
    except BaseException:
        staging.delete_dir()
        raise
    return manifest


def _publish_in_place(final: Location, build_manifest) -> Manifest:
    """Shards beside the old ones, the manifest replaced last, then what it does not list removed."""
    if final.exists() and not final.child(MANIFEST_NAME).exists():
        log.warning("%s: shards without a manifest (an unfinished earlier publish) are replaced", final.uri)
    manifest = build_manifest(final)
    final.child(MANIFEST_NAME).write_json(manifest.to_json())
    listed = {shard.path for info in manifest.splits.values() for shard in info.files} | {MANIFEST_NAME}
    for name in final.file_sizes():
        if name not in listed:
            final.child(*name.split("/")).delete_file()
    return manifest


def verify_shards(manifest: Manifest) -> None:
    """Every shard the manifest lists exists with its recorded size, or one DataError naming it."""
    assert manifest.root is not None
    try:
        sizes = manifest.root.file_sizes()
    except OSError as exc:
        raise explain(exc, manifest.uri) from exc
    for split, info in manifest.splits.items():
        for shard in info.files:
            size = sizes.get(shard.path)
            where = manifest.root.child(*shard.path.split("/")).uri
            if size is None:
                raise DataError(f"the manifest lists this {split} shard but it is missing: the dataset is damaged; prepare it again with --force", where)
            if size != shard.bytes:
                raise DataError(
                    f"this {split} shard has {size} bytes, the manifest says {shard.bytes}: truncated or replaced; prepare it again with --force",
                    where,
                )


def find_version(storage: str, name: str, version: str) -> Manifest | None:
    """The manifest of datasets/<name>/<version>, unchecked, or None if that version is not committed."""
    folder = dataset_root(storage, name).child(version)
    if not folder.child(MANIFEST_NAME).exists():
        return None
    return _read(folder, verify=False)


def _read(folder: Location, verify: bool = True) -> Manifest:
    manifest_file = folder.child(MANIFEST_NAME)
    try:
        payload = manifest_file.read_json()
    except FileNotFoundError as exc:
        raise DataError("no manifest.json here: not a prepared dataset (run python -m pipelines.prepare_imdb)", folder.uri) from exc
    except ValueError as exc:
        raise DataError(f"manifest.json is not valid JSON ({exc})", manifest_file.uri) from exc
    except OSError as exc:
        raise explain(exc, manifest_file.uri) from exc
    try:
        manifest = Manifest.from_json(payload, folder)
    except (KeyError, TypeError) as exc:
        raise DataError(f"manifest.json is missing or has a malformed field ({exc})", manifest_file.uri) from exc
    if verify:
        verify_shards(manifest)
    return manifest


def load_manifest(reference: str, storage: str | None = None) -> Manifest:
    """Find a dataset by manifest path, version folder, dataset folder, or name.

    `imdb` -> <storage>/datasets/imdb/LATEST; `imdb/<version>` works too.
    The version's shards are checked against the manifest before it is returned.
    """
    try:
        return _find_manifest(reference, storage)
    except OSError as exc:  # an object store that cannot be reached or refuses us
        raise explain(exc, reference if "://" in reference else (storage or reference)) from exc


def _find_manifest(reference: str, storage: str | None) -> Manifest:
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
