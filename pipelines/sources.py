"""Read the raw IMDB corpus from wherever it lives, without changing a byte of text.

Sources: the official tarball URL (downloaded, checksummed, cached), a local
`aclImdb_v1.tar.gz`, an extracted `aclImdb/` folder, Parquet file(s) with `text`
and `label` columns, or `sample` (a synthetic corpus written in the aclImdb layout,
read through the same folder reader as the real one).

Every reader returns a RawCorpus: per split ("train", "test"), texts, labels and
the file each row came from, so later errors can point at it.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import download
from pipelines.errors import DataError, DownloadError

SPLITS_IN_SOURCE = ("train", "test")
LABEL_FOLDERS = {"neg": 0, "pos": 1}
# aclImdb/<split>/<pos|neg>/<id>_<rating>.txt; unsup/ and the .feat files are skipped.
REVIEW_PATH = re.compile(r"(?:^|/)(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass
class RawSplit:
    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)

    def add(self, text: str, label: int, origin: str) -> None:
        self.texts.append(text)
        self.labels.append(label)
        self.origins.append(origin)

    def __len__(self) -> int:
        return len(self.texts)


RawCorpus = dict[str, RawSplit]


@dataclass(frozen=True)
class SourceInfo:
    """What was read: recorded in the manifest so a dataset can be traced back."""

    kind: str  # url | tarball | folder | parquet | sample
    location: str
    fingerprint: str  # sha256 over every (split, label, text) read, in a fixed order


def fingerprint(corpus: RawCorpus) -> str:
    digest = hashlib.sha256()
    for split in sorted(corpus):
        rows = sorted(zip(corpus[split].labels, corpus[split].texts))
        for label, text in rows:
            digest.update(f"{split}\x1f{label}\x1f{text}\x1e".encode("utf-8"))
    return digest.hexdigest()


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 at byte {exc.start} ({exc.reason})", where) from exc


def _require_all_folders(corpus: RawCorpus, where: str) -> None:
    """A partial copy (say, test/pos missing) must not become a silently smaller dataset."""
    if not any(len(split) for split in corpus.values()):
        raise DataError(
            "no reviews found; expected files like aclImdb/train/pos/0_9.txt and aclImdb/test/neg/0_2.txt",
            where,
        )
    for split in SPLITS_IN_SOURCE:
        for folder, label in LABEL_FOLDERS.items():
            if label not in corpus[split].labels:
                raise DataError(f"no reviews in {split}/{folder}/: the copy is incomplete", where)


def read_tarball(path: Path) -> RawCorpus:
    """Stream reviews out of the archive: nothing is extracted to disk (no path traversal)."""
    corpus: RawCorpus = {split: RawSplit() for split in SPLITS_IN_SOURCE}
    try:
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:
                match = REVIEW_PATH.search(member.name)
                if not member.isfile() or not match:
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                where = f"{path}:{member.name}"
                corpus[match[1]].add(_decode(handle.read(), where), LABEL_FOLDERS[match[2]], where)
            # tarfile stops at the end-of-archive marker, before gzip's trailer: read to
            # the end so a flipped bit or a missing tail fails the CRC instead of passing
            while archive.fileobj is not None and archive.fileobj.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"corrupt or truncated archive ({type(exc).__name__}: {exc})", str(path)) from exc
    _require_all_folders(corpus, str(path))
    return corpus


def find_acl_root(folder: Path) -> Path:
    """Accept the aclImdb/ folder itself or a folder that contains it."""
    for candidate in (folder, folder / "aclImdb"):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise DataError("not an aclImdb folder: expected train/ and test/ (or aclImdb/train, aclImdb/test)", str(folder))


def _looks_like_acl(folder: Path) -> bool:
    try:
        find_acl_root(folder)
    except DataError:
        return False
    return True


def read_folder(folder: Path) -> RawCorpus:
    root = find_acl_root(folder)
    corpus: RawCorpus = {split: RawSplit() for split in SPLITS_IN_SOURCE}
    for split in SPLITS_IN_SOURCE:
        for label_folder, label in LABEL_FOLDERS.items():
            directory = root / split / label_folder
            if not directory.is_dir():
                continue
            # sorted: the same folder reads the same way on every machine
            for review in sorted(directory.glob("*.txt")):
                corpus[split].add(_decode(review.read_bytes(), str(review)), label, str(review))
    _require_all_folders(corpus, str(root))
    return corpus


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise DataError("no .parquet files in this folder", str(path))
    return files


def _split_of_parquet_file(file: Path, root: Path) -> str | None:
    """HF-style layouts: train/part-0.parquet, test-00000-of-00001.parquet, unsupervised-*."""
    relative = file.relative_to(root).as_posix() if root.is_dir() else file.name
    for token in re.split(r"[/\-_.]", relative):
        if token in SPLITS_IN_SOURCE:
            return token
        if token in ("unsup", "unsupervised"):
            return "skip"
    return None


def read_parquet(path: Path) -> RawCorpus:
    """Parquet with `text` and `label` (0/1); the split comes from a `split` column or the file name.

    Rows with no split assigned go to train; test is then carved out by hash later
    (prepare notes that in the report).
    """
    corpus: RawCorpus = {split: RawSplit() for split in SPLITS_IN_SOURCE}
    for file in _parquet_files(path):
        where = str(file)
        try:
            table = pq.read_table(file)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"cannot read Parquet ({exc})", where) from exc
        for column in ("text", "label"):
            if column not in table.column_names:
                raise DataError(f"missing column {column!r} (columns: {table.column_names})", where)
        if not (pa.types.is_string(table["text"].type) or pa.types.is_large_string(table["text"].type)):
            raise DataError(f"column 'text' must be strings, found {table['text'].type}", where)
        if not pa.types.is_integer(table["label"].type):
            raise DataError(f"column 'label' must be integers 0/1, found {table['label'].type}", where)
        file_split = _split_of_parquet_file(file, path)
        if file_split == "skip":
            continue
        splits = table["split"].to_pylist() if "split" in table.column_names else [file_split] * table.num_rows
        for row, (text, label, split) in enumerate(zip(table["text"].to_pylist(), table["label"].to_pylist(), splits)):
            split = split or "train"
            if split not in corpus:
                raise DataError(f"row {row}: split {split!r} is not one of {SPLITS_IN_SOURCE}", where)
            # None values are kept here and reported by validation with their row
            corpus[split].add(text, label, f"{where}#row={row}")
    return corpus


def resolve_source(source: str, cache_dir: Path, sample_seed: int = 0, progress: bool = True) -> tuple[RawCorpus, SourceInfo]:
    """Read `source` (a URL, a path, or "sample") into a RawCorpus."""
    if source == "sample":
        from pipelines.sample_corpus import write_sample_corpus

        folder = write_sample_corpus(cache_dir / f"sample-seed{sample_seed}", seed=sample_seed)
        corpus = read_folder(folder)
        return corpus, SourceInfo("sample", f"sample (seed {sample_seed})", fingerprint(corpus))
    if source.startswith(("http://", "https://")):
        sha256 = download.IMDB_SHA256 if source == download.IMDB_URL else None
        try:
            tarball = download.fetch_to_cache(source, cache_dir / "downloads", sha256=sha256, progress=progress)
        except DownloadError as exc:
            raise DataError(
                f"could not download the dataset ({exc.reason}). Offline? Give a local copy with "
                "--source /path/to/aclImdb_v1.tar.gz, --source /path/to/aclImdb/, "
                "--source /path/to/parquet/, or use the built-in --source sample",
                source,
            ) from exc
        corpus = read_tarball(tarball)
        return corpus, SourceInfo("url", source, fingerprint(corpus))
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError("no such file or folder; --source takes a URL, a .tar.gz, an aclImdb/ folder, Parquet, or 'sample'", source)
    if path.is_file() and path.name.endswith(TARBALL_SUFFIXES):
        kind, corpus = "tarball", read_tarball(path)
    elif path.is_file() and path.suffix == ".parquet":
        kind, corpus = "parquet", read_parquet(path)
    elif path.is_dir() and _looks_like_acl(path):
        kind, corpus = "folder", read_folder(path)
    elif path.is_dir() and any(path.rglob("*.parquet")):
        kind, corpus = "parquet", read_parquet(path)
    elif path.is_dir():
        kind, corpus = "folder", read_folder(path)  # raises, naming what an aclImdb folder needs
    else:
        raise DataError("unknown source type: expected .tar.gz/.tgz, .parquet, or a folder", str(path))
    return corpus, SourceInfo(kind, str(path.resolve()), fingerprint(corpus))
