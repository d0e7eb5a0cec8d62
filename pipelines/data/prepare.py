"""Raw IMDB -> validated, cleaned, split, versioned Parquet shards (library side of prepare_imdb)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.errors import DataError
from pipelines.core.storage import is_remote, resolve
from pipelines.data import cleaning, datasets, splitting, validation
from pipelines.data.corpus import RawCorpus
from pipelines.data.datasets import Manifest
from pipelines.data.settings import PrepareConfig
from pipelines.data.sources import resolve_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareResult:
    manifest: Manifest
    created: bool  # False: this exact dataset existed already and nothing was written


def cache_dir_for(config: PrepareConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    if is_remote(config.storage):
        return Path("~/.cache/imdb-platform/cache").expanduser()
    return Path(resolve(config.storage).path) / "cache"


def build_splits(corpus: RawCorpus, config: PrepareConfig) -> tuple[RawCorpus, list[str]]:
    """Carve val (and test, if the source has none) by hash; order every split by hash."""
    notes = []
    train, test = corpus["train"], corpus["test"]
    if len(test) == 0:
        train, test = splitting.stratified_split(train, config.test_fraction, salt="test")
        notes.append(f"the source has no test split: {config.test_fraction:.0%} of it was carved out as test")
    train, val = splitting.stratified_split(train, config.val_fraction, salt="val")
    ordered = {name: splitting.hash_order(split) for name, split in (("train", train), ("val", val), ("test", test))}
    return ordered, notes


def version_id(digest: str, settings: dict) -> str:
    """Same content and layout -> same id, on any machine: what makes re-runs no-ops."""
    key = digest + json.dumps(settings, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def prepare_dataset(config: PrepareConfig) -> PrepareResult:
    resolve(config.storage).check_usable()  # a wrong endpoint, key or bucket: one line, before any work
    corpus, source_info = resolve_source(config.source_uri, cache_dir_for(config), config.seed, config.progress)
    validation.check_rows(corpus)
    cleaned, report = cleaning.clean_corpus(corpus)
    log.info("cleaning report:\n%s", report.summary())
    splits, notes = build_splits(cleaned, config)
    warnings = validation.check_splits(splits, where=source_info.location) + notes
    digest = datasets.content_hash(splits)
    settings = config.layout_settings()
    version = config.version or version_id(digest, settings)

    existing = datasets.find_version(config.storage, config.name, version)
    rebuild = config.force
    if existing is not None and not config.force:
        if existing.content_hash != digest:
            # a named version (--version) that holds other data: never overwrite it silently
            raise DataError(
                f"version {version!r} exists with different content (hash {existing.content_hash[:12]} "
                f"vs {digest[:12]}); pick another --version or pass --force",
                existing.uri,
            )
        try:
            datasets.verify_shards(existing)
        except DataError as damage:
            # the same content, but shards lost or cut short: this run can write them again
            log.warning("%s; writing the version again", damage)
            rebuild = True
        else:
            _point_latest_at(config, version)
            return PrepareResult(existing, created=False)

    manifest = datasets.publish(
        splits,
        storage=config.storage,
        name=config.name,
        version=version,
        source=source_info,
        settings=settings,
        cleaning=report.as_dict(),
        warnings=warnings,
        rows_per_shard=config.rows_per_shard,
        digest=digest,
        force=rebuild,
    )
    return PrepareResult(manifest, created=True)


def _point_latest_at(config: PrepareConfig, version: str) -> None:
    latest = datasets.dataset_root(config.storage, config.name).child(datasets.LATEST_NAME)
    if not latest.exists() or latest.read_text().strip() != version:
        latest.write_text(version + "\n")
