"""Read the raw IMDB corpus from wherever it lives, without changing a byte of text.

Sources: the official tarball URL (downloaded, checksummed, cached), a local
`aclImdb_v1.tar.gz`, an extracted `aclImdb/` folder, Parquet file(s) with `text`
and `label` columns, or `sample` (a synthetic corpus written in the aclImdb layout,
read through the same folder reader as the real one).

Every reader returns a RawCorpus: per split ("train", "test"), texts, labels and
the file each row came from, so later errors can point at it. A Parquet row is
named `FILE#row=N`, N counted from 0 as pyarrow and pandas count rows.

Malformed input of any kind ends in one DataError line that names the file (and
the row and column, where one row is at fault), never in a library's traceback:
tests/test_prepare_fuzz.py feeds every reader generated bad input to hold that.
"""

from __future__ import annotations

import lzma
import re
import tarfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.errors import DataError, DownloadError
from pipelines.data import download, validation
from pipelines.data.corpus import RawCorpus, RawSplit, SourceInfo, fingerprint
from pipelines.data.validation import short_repr

SPLITS_IN_SOURCE = ("train", "test")
LABEL_FOLDERS = {"neg": 0, "pos": 1}
# aclImdb/<split>/<pos|neg>/<id>_<rating>.txt; unsup/ and the .feat files are skipped.
REVIEW_PATH = re.compile(r"(?:^|/)(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def _one_line(exc: BaseException) -> str:
    """Library messages (Arrow's, tarfile's) can span lines; the command line prints one."""
    return " ".join(str(exc).split())


def _visible(name: str) -> str:
    """A name from inside an archive, with control characters (a newline...) escaped."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in name)


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


def _header_recorder() -> type[tarfile.TarInfo]:
    """A TarInfo class that keeps the last 512-byte header block tarfile parsed (or failed to)."""

    class RecordingTarInfo(tarfile.TarInfo):
        last_block = b""

        @classmethod
        def frombuf(cls, buf, encoding, errors):
            cls.last_block = buf
            return super().frombuf(buf, encoding, errors)

    return RecordingTarInfo


def read_tarball(path: Path) -> RawCorpus:
    """Stream reviews out of the archive: nothing is extracted to disk (no path traversal)."""
    corpus: RawCorpus = {split: RawSplit() for split in SPLITS_IN_SOURCE}
    headers = _header_recorder()
    try:
        with tarfile.open(path, mode="r:*", tarinfo=headers) as archive:
            for member in archive:
                match = REVIEW_PATH.search(member.name)
                if not member.isfile() or not match:
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                where = f"{path}:{_visible(member.name)}"
                corpus[match[1]].add(_decode(handle.read(), where), LABEL_FOLDERS[match[2]], where)
            # Past the first member, tarfile ends the listing quietly at a header it cannot
            # parse or at the end of the data: only a zero block is a real end of archive.
            if headers.last_block != bytes(tarfile.BLOCKSIZE):
                raise tarfile.ReadError(f"no end-of-archive marker after byte {archive.offset}: damaged header or missing tail")
            # tarfile stops at the end-of-archive marker, before gzip's trailer: read to
            # the end so a flipped bit or a missing tail fails the CRC instead of passing
            while archive.fileobj is not None and archive.fileobj.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        raise DataError(f"corrupt or truncated archive ({type(exc).__name__}: {_one_line(exc)})", str(path)) from exc
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
                if review.is_dir():
                    continue  # a folder named like a review holds no review
                try:
                    data = review.read_bytes()
                except OSError as exc:
                    raise DataError(f"cannot read ({exc.strerror or _one_line(exc)})", str(review)) from exc
                corpus[split].add(_decode(data, str(review)), label, str(review))
    _require_all_folders(corpus, str(root))
    return corpus


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    # is_file: Spark and pandas write a folder named reviews.parquet holding the part files;
    # read as a file too, it would give every row twice
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file() and not p.name.startswith("."))
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


def _is_text_type(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _read_parquet_columns(file: Path) -> pa.Table:
    """The text, label and (if any) split columns of one file, their names and types checked first."""
    where = str(file)
    try:
        with pq.ParquetFile(file) as parquet:
            schema = parquet.schema_arrow
            names = schema.names
            for column in ("text", "label", "split"):
                if names.count(column) > 1:
                    raise DataError(f"column {column!r} appears {names.count(column)} times", where)
            for column in ("text", "label"):
                if column not in names:
                    raise DataError(f"missing column {column!r} (columns: {short_repr(names, 200)})", where)
            text_type, label_type = schema.field("text").type, schema.field("label").type
            if not _is_text_type(text_type):
                raise DataError(f"column 'text' must be strings, found {text_type}", where)
            if not pa.types.is_integer(label_type):
                raise DataError(f"column 'label' must be integers 0/1, found {label_type}", where)
            if "split" in names:
                split_type = schema.field("split").type
                values_type = split_type.value_type if pa.types.is_dictionary(split_type) else split_type
                if not (_is_text_type(values_type) or pa.types.is_null(values_type)):
                    raise DataError(f"column 'split' must be strings ('train'/'test'), found {split_type}", where)
            # only the columns used: an unrelated wide or odd column costs nothing
            return parquet.read(columns=[c for c in ("text", "label", "split") if c in names])
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read Parquet ({_one_line(exc)})", where) from exc


def _column_values(table: pa.Table, column: str, where: str) -> list:
    """Python values of a column; bytes that are not UTF-8 in a string column are named by row."""
    values = table[column]
    try:
        return values.to_pylist()
    except UnicodeDecodeError as exc:
        failure = exc
    for row in range(len(values)):  # one row at a time: slow, but only for a file known to be bad
        try:
            values[row].as_py()
        except UnicodeDecodeError as exc:
            raise DataError(f"column {column!r} is not valid UTF-8 at byte {exc.start} ({exc.reason})", f"{where}#row={row}") from exc
    raise DataError(f"column {column!r} is not valid UTF-8 ({failure.reason})", where) from failure


def read_parquet(path: Path) -> RawCorpus:
    """Parquet with `text` and `label` (0/1); the split comes from a `split` column or the file name.

    Rows with no split assigned go to train; test is then carved out by hash later
    (prepare notes that in the report).
    """
    corpus: RawCorpus = {split: RawSplit() for split in SPLITS_IN_SOURCE}
    for file in _parquet_files(path):
        where = str(file)
        file_split = _split_of_parquet_file(file, path)
        if file_split == "skip":
            continue
        table = _read_parquet_columns(file)
        texts = _column_values(table, "text", where)
        labels = _column_values(table, "label", where)
        splits = _column_values(table, "split", where) if "split" in table.column_names else [file_split] * table.num_rows
        for row, (text, label, split) in enumerate(zip(texts, labels, splits)):
            split = split or "train"
            if split not in corpus:
                raise DataError(f"row {row}: split {short_repr(split)} is not one of {SPLITS_IN_SOURCE}", where)
            # None values are kept here and reported by validation with their row
            corpus[split].add(text, label, f"{where}#row={row}")
    if not any(len(split) for split in corpus.values()):
        raise DataError("no rows: the Parquet data holds no labelled reviews", str(path))
    return corpus


def resolve_source(source: str, cache_dir: Path, sample_seed: int = 0, progress: bool = True) -> tuple[RawCorpus, SourceInfo]:
    """Read `source` (a URL, a path, or "sample") into a RawCorpus."""
    if source == "sample":
        from pipelines.data.sample_corpus import write_sample_corpus

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
    validation.check_rows(corpus)  # before the fingerprint, which sorts rows: a None label cannot be sorted
    return corpus, SourceInfo(kind, str(path.resolve()), fingerprint(corpus))
