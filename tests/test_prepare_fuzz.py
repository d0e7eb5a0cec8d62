"""Bad input at the door: prepare_imdb's readers under generated malformed input.

Every input either prepares into a whole, valid dataset whose row counts add up
(rows read = rows written + rows dropped, as the cleaning report says), or fails
with one DataError/ConfigError line that names the file and, where one row is at
fault, that row (`FILE#row=N` or `row N`, counted from 0 as pyarrow and pandas
count) and its column. Never another exception type, never a half-written dataset.

Hypothesis draws Parquet tables (missing, duplicated and wrongly typed columns,
nulls, empty and whitespace-only strings, odd unicode, invalid UTF-8 bytes, huge
texts, zero rows, one label only, Spark-style folders), corrupted Parquet and
tarball bytes, and tarball/folder members with odd names and contents.

The examples are derandomized (the same inputs on every run, so CI is not flaky);
set PREPARE_FUZZ_EXAMPLES=2000 PREPARE_FUZZ_RANDOM=1 to explore further by hand.
No Ray: prepare_dataset runs in-process.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipelines import prepare_imdb
from pipelines.core import cli
from pipelines.core.errors import ConfigError, DataError
from pipelines.data.datasets import load_manifest, read_split_table
from pipelines.data.prepare import PrepareResult, prepare_dataset
from pipelines.data.settings import PrepareConfig
from pipelines.data.sources import resolve_source
from pipelines.text.cleaning import clean_text

EXAMPLES = int(os.environ.get("PREPARE_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(
    deadline=None,
    database=None,  # nothing written into the repository
    derandomize=not os.environ.get("PREPARE_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


def fuzz(max_examples: int) -> settings:
    return settings(FUZZ, max_examples=EXAMPLES or max_examples)


HUGE_TEXT = "a very long review " * 12_000  # ~230k characters: far longer than any real review
ODD_TEXTS = [
    "",
    " ",
    "\t\r\n  ",
    "<br /><br />",
    "\u200b\ufeff\u2060",  # invisible only: empty after cleaning
    "\x00",
    "nul\x00inside",
    "\u202eright-to-left override\u202c",
    "مرحبا بالعالم، فيلم رائع",
    "emoji 😀🎬👍🏽 and a flag 🇫🇷",
    "\\ud800 an escaped lone surrogate",
    "ﬁne ligatures ①②",
    "&amp; &lt;b&gt; entities",
    "<b>bold</b> and <a href='x'>link</a>",
    "a < b and c > d",
    "Z̴̡̛a̷l̸g̵o̶ text",
    "line\u2028separator\u2029paragraph",
    HUGE_TEXT,
]
# Bytes that are not UTF-8, for columns typed string whose data lies about it.
BAD_UTF8 = [b"\xff", b"ok \xc3\x28 bad", b"\xed\xa0\x80 encoded surrogate", b"\x80abc", b"caf\xe9"]
ROW_REFERENCE = re.compile(r"#row=(\d+)|\brow (\d+)\b")
SPLIT_PROBLEM = re.compile(r"split '(train|val|test)' (is empty|has no rows with label)|no rows")


def prepare_config(source: Path, storage: Path) -> PrepareConfig:
    return PrepareConfig(source=str(source), storage=str(storage), rows_per_shard=16, progress=False, cache_dir=str(storage / "cache"))


def prepare_or_error(source: Path, storage: Path) -> PrepareResult | DataError | ConfigError:
    """prepare_dataset's result, or the user-facing error it raised; anything else propagates (and fails)."""
    try:
        return prepare_dataset(prepare_config(source, storage))
    except (DataError, ConfigError) as error:
        return error


def assert_nothing_written(storage: Path) -> None:
    datasets_dir = storage / "datasets"
    written = sorted(str(p.relative_to(datasets_dir)) for p in datasets_dir.rglob("*")) if datasets_dir.exists() else []
    assert written == [], f"a failed prepare left {written}"


def assert_one_line_naming(error: Exception, source: Path) -> str:
    message = str(error)
    assert "\n" not in message and "\r" not in message, f"not one line: {message!r}"
    assert len(message) < 2000, f"message too long ({len(message)} chars): {message[:300]!r}"
    assert str(source) in message or str(source.resolve()) in message, f"the source is not named: {message!r}"
    return message


def named_row(message: str) -> int | None:
    match = ROW_REFERENCE.search(message)
    if match is None:
        return None
    return int(match[1] if match[1] is not None else match[2])


def assert_whole_dataset(result: PrepareResult, rows_read: int, inputs: set[tuple[str, int]]) -> None:
    """Shards checked against the manifest; every row read is written or counted as dropped."""
    manifest = load_manifest(result.manifest.root.path)  # verifies every shard's presence and size
    cleaning = manifest.cleaning["splits"]
    train, test = cleaning["train"], cleaning["test"]
    assert train["rows_in"] + test["rows_in"] == rows_read
    for report in (train, test):
        dropped = report["empty_dropped"] + report["duplicates_dropped"] + report["conflicting_label_dropped"]
        overlap = manifest.cleaning["train_test_overlap_dropped"] if report is train else 0
        assert report["rows_out"] == report["rows_in"] - dropped - overlap, report
    rows = {name: info.rows for name, info in manifest.splits.items()}
    if test["rows_in"] == 0:  # test was carved out of train
        assert rows["train"] + rows["val"] + rows["test"] == train["rows_out"]
    else:
        assert rows["train"] + rows["val"] == train["rows_out"]
        assert rows["test"] == test["rows_out"]
    cleaned_inputs = {(clean_text(text), label) for text, label in inputs}
    for split, info in manifest.splits.items():
        table = read_split_table(manifest, split)
        assert table.num_rows == info.rows
        labels = table["label"].to_pylist()
        assert info.labels == {"0": labels.count(0), "1": labels.count(1)}
        for text, label in zip(table["text"].to_pylist(), labels):
            assert text and (text, label) in cleaned_inputs


def check_outcome(outcome, source: Path, storage: Path) -> str | None:
    """The shared half of every check: a DataError is one line naming the source, and nothing was written."""
    if isinstance(outcome, PrepareResult):
        return None
    message = assert_one_line_naming(outcome, source)
    assert_nothing_written(storage)
    return message


# ---------------------------------------------------------------- generated Parquet tables


@dataclass
class TableSpec:
    """A generated table and what is wrong with it, worked out independently of the readers."""

    columns: dict[str, pa.Array] = field(default_factory=dict)
    duplicate: str | None = None
    texts: list = field(default_factory=list)  # Python values; bytes where the data is not UTF-8
    labels: list = field(default_factory=list)
    splits: list | None = None
    bad_columns: set[str] = field(default_factory=set)  # schema-level problems
    spark_folder: bool = False

    def table(self) -> pa.Table:
        names = list(self.columns)
        arrays = list(self.columns.values())
        if self.duplicate:
            names.append(self.duplicate)
            arrays.append(self.columns[self.duplicate])
        return pa.Table.from_arrays(arrays, names=names)

    @property
    def rows(self) -> int:
        return len(self.texts)

    def bad_rows(self) -> dict[int, set[str]]:
        """Row -> the columns at fault in it (only meaningful when no column is at fault)."""
        bad: dict[int, set[str]] = {}
        for row, text in enumerate(self.texts):
            if not isinstance(text, str):
                bad.setdefault(row, set()).add("text")
        for row, label in enumerate(self.labels):
            if label not in (0, 1) or isinstance(label, bool):
                bad.setdefault(row, set()).add("label")
        for row, split in enumerate(self.splits or []):
            if split not in ("train", "test", "", None):
                bad.setdefault(row, set()).add("split")
        return bad


TEXT_TYPES = ["string"] * 6 + ["large_string", "bad_bytes", "int64", "float64", "bool", "binary", "list", "struct", "null", "dictionary", "missing"]
LABEL_TYPES = ["int64"] * 6 + ["int8", "uint8", "int32", "string", "float64", "bool", "null", "missing"]
SPLIT_TYPES = ["absent"] * 5 + ["string", "string", "dictionary", "int64", "list"]


@st.composite
def text_values(draw, n: int, nulls: bool) -> list:
    texts: list = []
    for row in range(n):
        kind = draw(st.sampled_from(["unique"] * 6 + ["odd", "generated"] + ["null"] * nulls))
        odd = draw(st.sampled_from(ODD_TEXTS))
        if kind == "unique":  # a distinct review, so that cleaning and de-duplication leave rows to split
            suffix = draw(st.sampled_from([odd, ""]) | st.text(max_size=30))
            texts.append(f"review {row}: {suffix}")
        elif kind == "odd":
            texts.append(odd)
        elif kind == "generated":  # any unicode hypothesis can encode: controls, combining marks, RTL...
            texts.append(draw(st.text(max_size=40)))
        else:
            texts.append(None)
    return texts


@st.composite
def label_values(draw, n: int, unsigned: bool, bad: bool) -> list:
    out_of_range = [2, 7, 100] if unsigned else [2, -1, 7, 100]
    return [
        draw(st.sampled_from([None] + out_of_range))
        if bad and draw(st.integers(0, 9)) == 0
        else draw(st.sampled_from([0, 1]))
        for _ in range(n)
    ]


@st.composite
def tables(draw) -> TableSpec:
    # val takes 10% of each label of train: ~20 rows per label are needed for a dataset
    n = draw(st.sampled_from([0, 1, 5, 12]) | st.integers(40, 80) | st.integers(40, 80))
    spec = TableSpec()
    one_label = draw(st.integers(0, 9)) == 0
    # about half the tables are well-formed, so the success path (a whole dataset) is exercised too
    bad_types, bad_values = draw(st.booleans()), draw(st.booleans())

    text_type = draw(st.sampled_from(TEXT_TYPES)) if bad_types else "string"
    texts = draw(text_values(n, nulls=bad_values))
    if text_type in ("string", "large_string"):
        spec.columns["text"] = pa.array(texts, pa.string() if text_type == "string" else pa.large_string())
    elif text_type == "bad_bytes":  # a string column whose bytes are not UTF-8 (a buggy writer)
        raw = [t.encode("utf-8") if isinstance(t, str) else t for t in texts]
        if n:
            raw[draw(st.integers(0, n - 1))] = draw(st.sampled_from(BAD_UTF8))
        spec.columns["text"] = pa.array(raw, pa.binary()).view(pa.string())
        texts = [b.decode("utf-8", errors="strict") if _is_utf8(b) else b for b in raw]
    elif text_type == "int64":
        spec.columns["text"] = pa.array(range(n), pa.int64())
    elif text_type == "float64":
        spec.columns["text"] = pa.array([float(i) / 3 for i in range(n)], pa.float64())
    elif text_type == "bool":
        spec.columns["text"] = pa.array([i % 2 == 0 for i in range(n)], pa.bool_())
    elif text_type == "binary":
        spec.columns["text"] = pa.array([t.encode("utf-8") if t is not None else None for t in texts], pa.binary())
    elif text_type == "list":
        spec.columns["text"] = pa.array([[t] if t is not None else None for t in texts], pa.list_(pa.string()))
    elif text_type == "struct":
        spec.columns["text"] = pa.array([{"body": t} for t in texts], pa.struct([("body", pa.string())]))
    elif text_type == "null":
        spec.columns["text"] = pa.nulls(n)
    elif text_type == "dictionary":
        spec.columns["text"] = pa.array(texts, pa.string()).dictionary_encode()
    if text_type not in ("string", "large_string", "bad_bytes"):
        spec.bad_columns.add("text")
    spec.texts = texts

    label_type = draw(st.sampled_from(LABEL_TYPES)) if bad_types else draw(st.sampled_from(["int64", "int8", "uint8"]))
    labels = draw(label_values(n, unsigned=label_type == "uint8", bad=bad_values))
    if one_label:
        labels = [1 if label in (0, 1) else label for label in labels]
    if label_type in ("int64", "int8", "uint8", "int32"):
        spec.columns["label"] = pa.array(labels, getattr(pa, label_type)())
    elif label_type == "string":
        spec.columns["label"] = pa.array([None if v is None else str(v) for v in labels], pa.string())
    elif label_type == "float64":
        spec.columns["label"] = pa.array([None if v is None else float(v) for v in labels], pa.float64())
    elif label_type == "bool":
        spec.columns["label"] = pa.array([None if v is None else bool(v) for v in labels], pa.bool_())
    elif label_type == "null":
        spec.columns["label"] = pa.nulls(n)
    if label_type not in ("int64", "int8", "uint8", "int32"):
        spec.bad_columns.add("label")
    spec.labels = labels

    split_type = draw(st.sampled_from(SPLIT_TYPES if bad_types else ["absent", "string", "dictionary"]))
    if split_type != "absent":
        values = [draw(st.sampled_from(["train"] * 4 + ["test"] * 3 + [None, ""])) for _ in range(n)]
        if n and bad_values and draw(st.booleans()):
            values[draw(st.integers(0, n - 1))] = draw(st.sampled_from(["validation", "Train", "test ", "unsupervised", "\u202etest"]))
        if split_type == "string":
            spec.columns["split"] = pa.array(values, pa.string())
        elif split_type == "dictionary":  # what pandas categoricals become
            spec.columns["split"] = pa.array(values, pa.string()).dictionary_encode()
        elif split_type == "int64":
            spec.columns["split"] = pa.array([None if v is None else len(v) for v in values], pa.int64())
            spec.bad_columns.add("split")
        else:
            spec.columns["split"] = pa.array([[v] for v in values], pa.list_(pa.string()))
            spec.bad_columns.add("split")
        spec.splits = values

    if draw(st.integers(0, 4)) == 0:  # columns the reader should ignore
        spec.columns["id"] = pa.array(range(n), pa.int64())
        spec.columns["notes"] = pa.array([{"x": i} for i in range(n)], pa.struct([("x", pa.int64())]))
    if bad_types and draw(st.integers(0, 4)) == 0:
        present = [name for name in ("text", "label") if name in spec.columns]
        dropped = draw(st.sampled_from(present)) if present else None
        if dropped and draw(st.booleans()):
            del spec.columns[dropped]  # a missing column
            spec.bad_columns.add(dropped)
        elif dropped:
            spec.duplicate = dropped  # the same column name twice
            spec.bad_columns.add(dropped)
    if "text" not in spec.columns:
        spec.bad_columns.add("text")
    if "label" not in spec.columns:
        spec.bad_columns.add("label")
    # reorder so the missing column is not always last; keeps the data intact
    if draw(st.booleans()):
        spec.columns = dict(reversed(list(spec.columns.items())))
    spec.spark_folder = draw(st.integers(0, 4)) == 0
    return spec


def _is_utf8(data) -> bool:
    if not isinstance(data, bytes):
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def write_source(spec: TableSpec, root: Path) -> tuple[Path, Path]:
    """(what --source gets, the file holding the rows)."""
    if spec.spark_folder:  # Spark and pandas write a folder named like a file: reviews.parquet/part-*.parquet
        file = root / "in" / "reviews.parquet" / "part-00000-c000.snappy.parquet"
        source = root / "in"
    else:
        file = root / "in" / "reviews.parquet"
        source = file
    file.parent.mkdir(parents=True)
    pq.write_table(spec.table(), file)
    return source, file


@pytest.mark.timeout(240)
@fuzz(max_examples=200)
@given(spec=tables())
def test_generated_parquet_prepares_whole_or_fails_with_one_line(spec: TableSpec) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source, file = write_source(spec, root)
        storage = root / "storage"
        outcome = prepare_or_error(source, storage)
        bad_rows = spec.bad_rows()

        event("prepared" if isinstance(outcome, PrepareResult) else "refused: " + re.sub(r"\d+", "N", str(outcome).split(": ", 1)[-1])[:30])
        if isinstance(outcome, PrepareResult):
            assert not spec.bad_columns, f"columns {spec.bad_columns} are wrong but prepare succeeded"
            assert not bad_rows, f"rows {bad_rows} are wrong but prepare succeeded"
            inputs = {(t, l) for t, l in zip(spec.texts, spec.labels)}
            assert_whole_dataset(outcome, spec.rows, inputs)
            return

        message = check_outcome(outcome, source, storage)
        if spec.bad_columns:
            assert str(file) in message, message
            assert any(f"'{column}'" in message for column in spec.bad_columns), message
        elif bad_rows:
            assert str(file) in message, message
            row = named_row(message)
            assert row is not None, f"no row named: {message!r}"
            assert row in bad_rows, f"row {row} is fine ({spec.texts[row]!r:.60}, {spec.labels[row]!r}); {message!r}"
            assert any(column in message for column in bad_rows[row]), message
        else:  # valid rows, too few or too one-sided to split
            assert SPLIT_PROBLEM.search(message), message


# ---------------------------------------------------------------- corrupted Parquet bytes


def _valid_parquet_bytes() -> bytes:
    texts = [f"review {i}: " + ("good " if i % 2 else "bad ") * (i % 7 + 1) for i in range(60)]
    table = pa.table({"text": texts, "label": [i % 2 for i in range(60)], "split": ["train", "train", "test"] * 20})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=25)
    return buffer.getvalue()


VALID_PARQUET = _valid_parquet_bytes()


@st.composite
def corrupted_parquet(draw) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "flip", "random", "empty", "magic_only"]))
    if kind == "truncate":
        return VALID_PARQUET[: draw(st.integers(0, len(VALID_PARQUET) - 1))]
    if kind == "flip":
        data = bytearray(VALID_PARQUET)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=2000))
    if kind == "magic_only":
        return b"PAR1" + draw(st.binary(max_size=64)) + b"PAR1"
    return b""


@pytest.mark.timeout(180)
@fuzz(max_examples=200)
@given(data=corrupted_parquet())
def test_corrupted_parquet_is_one_line_naming_the_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "reviews.parquet"
        source.write_bytes(data)
        storage = Path(tmp) / "storage"
        outcome = prepare_or_error(source, storage)
        if isinstance(outcome, PrepareResult):  # a flip in a page that still decodes: a valid dataset anyway
            table = pq.read_table(source)
            inputs = set(zip(table["text"].to_pylist(), table["label"].to_pylist()))
            assert_whole_dataset(outcome, table.num_rows, inputs)
        else:
            check_outcome(outcome, source, storage)


# ---------------------------------------------------------------- tarballs and folders

GOOD_REVIEWS = {
    ("train", "pos"): ["A wonderful film.", "Loved every minute.", "Great cast, great story."],
    ("train", "neg"): ["Dull and long.", "A waste of time.", "Awful acting."],
    ("test", "pos"): ["Brilliant.", "Moving and funny."],
    ("test", "neg"): ["Terrible plot.", "Boring."],
}


def _tar_bytes(members: list[tuple[str, bytes | None, str]], compression: str) -> bytes:
    """members: (name, data, kind) with kind file|dir|symlink; compression: gz|bz2|xz|none."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "../../etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    compress = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress, "none": lambda b: b}[compression]
    return compress(raw.getvalue())


def _good_members() -> list[tuple[str, bytes, str]]:
    return [
        (f"aclImdb/{split}/{folder}/{i}_{9 if folder == 'pos' else 2}.txt", text.encode("utf-8"), "file")
        for (split, folder), texts in GOOD_REVIEWS.items()
        for i, text in enumerate(texts)
    ]


member_contents = st.one_of(
    st.sampled_from([t.encode("utf-8") for t in ODD_TEXTS]),
    st.sampled_from(BAD_UTF8),
    st.text(max_size=40).map(lambda t: t.encode("utf-8")),
    st.binary(max_size=40),
)
member_names = st.one_of(
    st.builds("aclImdb/{}/{}/{}_{}.txt".format, st.sampled_from(["train", "test"]), st.sampled_from(["pos", "neg"]), st.integers(100, 999), st.integers(0, 10)),
    st.sampled_from(["aclImdb/train/unsup/5_0.txt", "aclImdb/README", "aclImdb/train/pos/line\nbreak/7_9.txt", "../../train/pos/8_9.txt", "aclImdb/test/neg/\u202e9_1.txt"]),
)


REVIEW_MEMBER = re.compile(r"(?:^|/)(train|test)/(pos|neg)/\d+_\d+\.txt$")


@st.composite
def tarballs(draw) -> tuple[bytes, int | None]:
    """(archive bytes, how many reviews it holds if it is read whole; None: no archive at all)."""
    members = _good_members()
    for _ in range(draw(st.integers(0, 4))):
        members.append((draw(member_names), draw(member_contents), draw(st.sampled_from(["file"] * 4 + ["dir", "symlink"]))))
    if draw(st.integers(0, 5)) == 0:  # an incomplete copy: one label folder gone
        gone = draw(st.sampled_from(["train/pos", "test/neg"]))
        members = [m for m in members if f"/{gone}/" not in m[0]]
    reviews = sum(1 for name, _, kind in members if kind == "file" and REVIEW_MEMBER.search(name))
    data = _tar_bytes(members, draw(st.sampled_from(["gz", "gz", "bz2", "xz", "none"])))
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "garbage"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        corrupted = bytearray(data)
        corrupted[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        data = bytes(corrupted)
    elif damage == "garbage":
        return draw(st.binary(max_size=512)), None
    return data, reviews


@pytest.mark.timeout(180)
@fuzz(max_examples=150)
@given(archive=tarballs(), suffix=st.sampled_from([".tar.gz", ".tgz", ".tar"]))
def test_generated_tarball_prepares_whole_or_fails_with_one_line(archive: tuple[bytes, int | None], suffix: str) -> None:
    data, reviews = archive
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"aclImdb_v1{suffix}"
        source.write_bytes(data)
        storage = Path(tmp) / "storage"
        outcome = prepare_or_error(source, storage)
        if isinstance(outcome, PrepareResult):
            manifest = outcome.manifest
            rows_read = sum(report["rows_in"] for report in manifest.cleaning["splits"].values())
            # a damaged archive may still hold the same members (a flipped bit in review text), never fewer
            assert rows_read == reviews, f"{rows_read} reviews read, the archive holds {reviews}"
            with tarfile.open(source) as tar:
                members = [m for m in tar if m.isfile() and REVIEW_MEMBER.search(m.name)]
                inputs = {(tar.extractfile(m).read().decode("utf-8"), 1 if "/pos/" in m.name else 0) for m in members}
            assert_whole_dataset(outcome, rows_read, inputs)
        else:
            message = check_outcome(outcome, source, storage)
            if "UTF-8" in message:  # the member at fault is named too
                assert re.search(r"(train|test)/(pos|neg)/", message), message


@pytest.mark.timeout(120)
@fuzz(max_examples=60)
@given(extra=st.lists(st.tuples(member_names, member_contents, st.sampled_from(["file", "file", "dir"])), max_size=4))
def test_generated_acl_folder_prepares_whole_or_fails_with_one_line(extra) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "src"
        for name, data, kind in _good_members() + extra:
            if ".." in name or "\n" in name:
                continue  # a folder cannot hold these names the way a tarball can
            path = source / name
            if kind == "dir" and not path.is_file():
                path.mkdir(parents=True, exist_ok=True)  # a folder named like a review
            elif kind == "file" and not path.is_dir():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        storage = Path(tmp) / "storage"
        outcome = prepare_or_error(source, storage)
        if isinstance(outcome, PrepareResult):
            rows_read = sum(report["rows_in"] for report in outcome.manifest.cleaning["splits"].values())
            files = [p for p in source.glob("aclImdb/*/*/*.txt") if p.is_file() and p.parent.name in ("pos", "neg")]
            assert rows_read == len(files)
            inputs = {(p.read_text(encoding="utf-8"), 1 if p.parent.name == "pos" else 0) for p in files}
            assert_whole_dataset(outcome, rows_read, inputs)
        else:
            check_outcome(outcome, source, storage)


def test_tarball_with_a_damaged_late_header_is_not_a_smaller_dataset(tmp_path: Path) -> None:
    """tarfile lists members up to a header it cannot parse and stops there without a word."""
    members = _good_members()
    data = bytearray(_tar_bytes(members, "none"))
    last_header = data.index(members[-1][0].encode())  # the name opens the header block
    data[last_header] ^= 0x01
    source = tmp_path / "aclImdb_v1.tar"
    source.write_bytes(bytes(data))
    outcome = prepare_or_error(source, tmp_path / "storage")
    assert isinstance(outcome, DataError)
    assert "no end-of-archive marker" in assert_one_line_naming(outcome, source)
    assert_nothing_written(tmp_path / "storage")


def test_tarball_cut_at_a_member_boundary_is_not_a_smaller_dataset(tmp_path: Path) -> None:
    members = _good_members()
    whole = _tar_bytes(members, "none")
    without_last = _tar_bytes(members[:-1], "none")
    end_of_members = len(without_last.rstrip(b"\0"))  # the last review but one ends here...
    end_of_members += -end_of_members % tarfile.BLOCKSIZE  # ...padded to a block: a header boundary
    source = tmp_path / "aclImdb_v1.tar"
    source.write_bytes(whole[:end_of_members])
    outcome = prepare_or_error(source, tmp_path / "storage")
    assert isinstance(outcome, DataError)
    assert "no end-of-archive marker" in assert_one_line_naming(outcome, source)


def test_folder_named_like_a_review_is_skipped(tmp_path: Path) -> None:
    for name, data, _ in _good_members():
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(data)
    (tmp_path / "src" / "aclImdb" / "train" / "pos" / "99_9.txt").mkdir()
    corpus, _ = resolve_source(str(tmp_path / "src"), tmp_path / "cache")
    assert sum(len(split) for split in corpus.values()) == len(_good_members())


# ---------------------------------------------------------------- sources that are not data


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("reviews.csv", b"text,label\ngood,1\nbad,0\n", "unknown source type"),
        ("reviews.jsonl", b'{"text": "good", "label": 1}\n', "unknown source type"),
        ("reviews.json", b'[{"text": "good", "label": 1}]', "unknown source type"),
        ("reviews.parquet.gz", gzip.compress(VALID_PARQUET), "unknown source type"),
        ("reviews.parquet", b"", "cannot read Parquet"),
        ("aclImdb_v1.tar.gz", b"", "corrupt or truncated"),
        ("aclImdb_v1.tgz", b"\x1f\x8b\x08\x00", "corrupt or truncated"),
        ("aclImdb_v1.tar.gz", lzma.compress(b"\x00" * 100)[:-10], "corrupt or truncated"),
        ("aclImdb_v1.tar", b"not a tar" * 200, "corrupt or truncated"),
    ],
)
def test_files_that_are_not_a_source_are_one_line(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    source = tmp_path / name
    source.write_bytes(content)
    outcome = prepare_or_error(source, tmp_path / "storage")
    assert isinstance(outcome, DataError)
    assert expected in assert_one_line_naming(outcome, source)
    assert_nothing_written(tmp_path / "storage")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("layout", ["empty", "empty_parquet_named_folder", "only_unsupervised", "zero_row_files"])
def test_folders_without_rows_are_one_line(tmp_path: Path, layout: str) -> None:
    source = tmp_path / "in"
    source.mkdir()
    empty = pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())})
    if layout == "empty_parquet_named_folder":
        (source / "reviews.parquet").mkdir()
    elif layout == "only_unsupervised":
        pq.write_table(pa.table({"text": ["u1", "u2"], "label": [-1, -1]}), source / "unsupervised-00000.parquet")
    elif layout == "zero_row_files":
        pq.write_table(empty, source / "train-00000.parquet")
        pq.write_table(empty, source / "test-00000.parquet")
    outcome = prepare_or_error(source, tmp_path / "storage")
    assert isinstance(outcome, DataError)
    message = assert_one_line_naming(outcome, source)
    assert "no .parquet files" in message or "no rows" in message or "not an aclImdb folder" in message, message
    assert_nothing_written(tmp_path / "storage")


def test_spark_style_folder_is_read_once(tmp_path: Path) -> None:
    """A folder named *.parquet holding part files: each row once, not once per way of finding it."""
    folder = tmp_path / "in" / "reviews.parquet"
    folder.mkdir(parents=True)
    texts = [f"review {i} is {'good' if i % 2 else 'bad'}" for i in range(40)]
    pq.write_table(pa.table({"text": texts[:20], "label": [i % 2 for i in range(20)]}), folder / "part-00000.parquet")
    pq.write_table(pa.table({"text": texts[20:], "label": [i % 2 for i in range(20, 40)]}), folder / "part-00001.parquet")
    result = prepare_dataset(prepare_config(tmp_path / "in", tmp_path / "storage"))
    assert result.manifest.cleaning["splits"]["train"]["rows_in"] == 40
    assert result.manifest.cleaning["splits"]["train"]["duplicates_dropped"] == 0
    assert sum(info.rows for info in result.manifest.splits.values()) == 40


# ---------------------------------------------------------------- the command line, in-process


def _null_label(path: Path) -> Path:
    pq.write_table(pa.table({"text": [f"review {i}" for i in range(10)], "label": pa.array([0, 1, 0, None, 1, 0, 1, 0, 1, 0], pa.int64())}), path)
    return path


def _bad_bytes(path: Path) -> Path:
    raw = [f"review {i}".encode() for i in range(10)]
    raw[6] = b"caf\xe9"
    pq.write_table(pa.table({"text": pa.array(raw, pa.binary()).view(pa.string()), "label": [i % 2 for i in range(10)]}), path)
    return path


def _null_text(path: Path) -> Path:
    texts = pa.array([f"review {i}" if i != 4 else None for i in range(10)], pa.string())
    pq.write_table(pa.table({"text": texts, "label": [i % 2 for i in range(10)]}), path)
    return path


def _int_split(path: Path) -> Path:
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1], "split": [0, 1]}), path)
    return path


def _huge_split_value(path: Path) -> Path:
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1], "split": ["train", HUGE_TEXT]}), path)
    return path


def _duplicate_text(path: Path) -> Path:
    table = pa.Table.from_arrays([pa.array(["a", "b"]), pa.array(["c", "d"]), pa.array([0, 1])], names=["text", "text", "label"])
    pq.write_table(table, path)
    return path


def _all_empty(path: Path) -> Path:
    pq.write_table(pa.table({"text": ["", "  ", "<br />", "\u200b"] * 10, "label": [0, 1] * 20}), path)
    return path


def _list_split(path: Path) -> Path:
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1], "split": [["train"], ["test"]]}), path)
    return path


def _zero_rows(path: Path) -> Path:
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), path)
    return path


def _truncated(path: Path) -> Path:
    path.write_bytes(VALID_PARQUET[: len(VALID_PARQUET) // 2])
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_null_label, r"reviews\.parquet#row=3: label must be 0 or 1, found None"),
        (_null_text, r"reviews\.parquet#row=4: text must be a string, found NoneType"),
        (_int_split, r"reviews\.parquet: column 'split' must be strings"),
        (_huge_split_value, r"reviews\.parquet: row 1: split 'a very long review .*\.\.\. \(\d+ characters\) is not one of"),
        (_duplicate_text, r"reviews\.parquet: column 'text' appears 2 times"),
        (_all_empty, r"reviews\.parquet: split 'train' is empty after cleaning"),
        (_bad_bytes, r"reviews\.parquet#row=6: .*text.*not valid UTF-8"),
        (_list_split, r"reviews\.parquet: column 'split' must be strings"),
        (_zero_rows, r"reviews\.parquet: no rows"),
        (_truncated, r"reviews\.parquet: cannot read Parquet"),
    ],
)
def test_cli_prints_one_error_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture, make, expected: str) -> None:
    source = make(tmp_path / "reviews.parquet")
    argv = ["--source", str(source), "--storage", str(tmp_path / "storage"), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(prepare_imdb.main, argv)
    assert exit_info.value.code == cli.EXIT_USER_ERROR
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, stderr
    assert str(source) in error_lines[0]
    assert re.search(expected, error_lines[0]), error_lines[0]
    assert_nothing_written(tmp_path / "storage")
