"""PrepareConfig: the typed settings of `prepare_imdb` (source, storage, split sizes), each field with its help text."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.core.cli import field
from pipelines.core.errors import ConfigError
from pipelines.core.storage import default_storage
from pipelines.data.download import IMDB_URL

SOURCE_ALIASES = {"imdb": IMDB_URL}


@dataclass(frozen=True)
class PrepareConfig:
    """Turn a raw IMDB copy into validated, versioned Parquet shards."""

    source: str = field(
        "imdb",
        "where the raw data is: 'imdb' (download the official tarball), a URL, a local "
        "aclImdb_v1.tar.gz, an extracted aclImdb/ folder, Parquet file(s) with text/label "
        "columns, or 'sample' (a small synthetic corpus for offline runs)",
    )
    storage: str = field(default_storage(), "storage root: a folder, or an s3:// / gs:// URI ($PLATFORM_STORAGE)")
    name: str = field("imdb", "dataset name: shards go to <storage>/datasets/<name>/<version>/")
    version: str | None = field(None, "version id to write (default: derived from the content and settings)")
    val_fraction: float = field(0.1, "fraction of train, per label, carved out as the validation split")
    test_fraction: float = field(0.5, "fraction carved out as test when the source has no test split (Parquet only)")
    rows_per_shard: int = field(1024, "rows per Parquet shard (smaller: more parallel streaming; larger: fewer files)")
    seed: int = field(0, "seed of the synthetic corpus (--source sample only)")
    cache_dir: str | None = field(None, "where downloads and the sample corpus are kept (default: <storage>/cache, or ~/.cache/imdb-platform/cache for remote storage)")
    force: bool = field(False, "rebuild the version even if it exists")
    progress: bool = field(True, "show a download progress bar")

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"--val-fraction must be in (0, 0.5), got {self.val_fraction}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if self.rows_per_shard < 1:
            raise ConfigError(f"--rows-per-shard must be at least 1, got {self.rows_per_shard}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"--name must be a plain folder name, got {self.name!r}")
        if self.version is not None and ("/" in self.version or self.version.startswith(".") or not self.version):
            raise ConfigError(f"--version must be a plain folder name, got {self.version!r}")

    @property
    def source_uri(self) -> str:
        return SOURCE_ALIASES.get(self.source, self.source)

    def layout_settings(self) -> dict:
        """The settings that shape the written dataset (part of its version id)."""
        return {
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "rows_per_shard": self.rows_per_shard,
        }
