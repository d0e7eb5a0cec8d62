"""Tests for pipelines.data.sources (tarball, folder, Parquet, URL readers) and validation.check_rows."""

from __future__ import annotations

import io
import socket
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core.errors import DataError
from pipelines.data.corpus import RawSplit, fingerprint
from pipelines.data.sample_corpus import write_sample_corpus
from pipelines.data.sources import find_acl_root, read_folder, read_parquet, read_tarball, resolve_source
from pipelines.data.validation import check_rows

pytestmark = pytest.mark.timeout(60)

# A tiny hand-made aclImdb: (split, label folder) -> reviews
REVIEWS = {
    ("train", "pos"): ["A wonderful film.", "Loved every minute."],
    ("train", "neg"): ["Dull and long.", "A waste of time.", "Awful acting."],
    ("test", "pos"): ["Brilliant cast."],
    ("test", "neg"): ["Terrible plot.", "Boring."],
}


def write_acl(root: Path, reviews: dict = REVIEWS, extra: dict[str, bytes] | None = None) -> Path:
    """root/aclImdb/<split>/<pos|neg>/<i>_<rating>.txt, plus unsup/ and the files a real copy has."""
    acl = root / "aclImdb"
    for (split, folder), texts in reviews.items():
        (acl / split / folder).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            rating = 9 if folder == "pos" else 2
            (acl / split / folder / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
    (acl / "train" / "unsup").mkdir(parents=True, exist_ok=True)
    (acl / "train" / "unsup" / "0_0.txt").write_text("UNSUPERVISED REVIEW", encoding="utf-8")
    (acl / "train" / "labeledBow.feat").write_text("0 9:1\n", encoding="utf-8")
    (acl / "imdb.vocab").write_text("the\nand\n", encoding="utf-8")
    for relative, data in (extra or {}).items():
        (acl / relative).parent.mkdir(parents=True, exist_ok=True)
        (acl / relative).write_bytes(data)
    return acl


def make_tarball(acl: Path, path: Path, compresslevel: int = 9) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=compresslevel) as tar:
        tar.add(acl, arcname="aclImdb")
    return path


def as_sets(corpus) -> dict[str, set[tuple[int, str]]]:
    return {name: set(zip(split.labels, split.texts)) for name, split in corpus.items()}


EXPECTED = {
    "train": {(1, t) for t in REVIEWS[("train", "pos")]} | {(0, t) for t in REVIEWS[("train", "neg")]},
    "test": {(1, t) for t in REVIEWS[("test", "pos")]} | {(0, t) for t in REVIEWS[("test", "neg")]},
}


# ---------------------------------------------------------------- tarball


def test_read_tarball_reads_labelled_reviews_and_ignores_unsup(tmp_path: Path) -> None:
    tarball = make_tarball(write_acl(tmp_path / "src"), tmp_path / "aclImdb_v1.tar.gz")
    corpus = read_tarball(tarball)
    assert as_sets(corpus) == EXPECTED
    assert len(corpus["train"]) == 5 and len(corpus["test"]) == 3
    assert all("UNSUPERVISED" not in t for split in corpus.values() for t in split.texts)
    # each row says where it came from: the archive and the member
    assert all(o.startswith(f"{tarball}:aclImdb/train/") for o in corpus["train"].origins)
    assert any(o.endswith("aclImdb/train/pos/0_9.txt") for o in corpus["train"].origins)


def test_tarball_and_folder_read_the_same_corpus(tmp_path: Path) -> None:
    acl = write_sample_corpus(tmp_path / "raw", train_per_label=20, test_per_label=10)
    tarball = make_tarball(acl, tmp_path / "aclImdb_v1.tar.gz")
    from_tar, tar_info = resolve_source(str(tarball), tmp_path / "cache")
    from_dir, dir_info = resolve_source(str(acl), tmp_path / "cache")
    assert as_sets(from_tar) == as_sets(from_dir)
    assert (len(from_tar["train"]), len(from_tar["test"])) == (40, 20)
    assert tar_info.kind == "tarball" and dir_info.kind == "folder"
    assert tar_info.location == str(tarball.resolve())
    assert dir_info.location == str(acl.resolve())
    assert tar_info.fingerprint == dir_info.fingerprint == fingerprint(from_dir)


def test_fingerprint_changes_with_one_label(tmp_path: Path) -> None:
    corpus = read_folder(write_acl(tmp_path))
    before = fingerprint(corpus)
    corpus["train"].labels[0] = 1 - corpus["train"].labels[0]
    assert fingerprint(corpus) != before


def test_truncated_tarball_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    acl = write_sample_corpus(tmp_path / "raw", train_per_label=20, test_per_label=10)
    data = make_tarball(acl, tmp_path / "whole.tar.gz").read_bytes()
    cut = tmp_path / "aclImdb_v1.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as info:
        resolve_source(str(cut), tmp_path / "cache")
    assert str(cut) in str(info.value)


def test_garbage_named_tar_gz_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "aclImdb_v1.tar.gz"
    garbage.write_bytes(b"<html>404 not found</html>" * 50)
    with pytest.raises(DataError, match="corrupt or truncated") as info:
        resolve_source(str(garbage), tmp_path / "cache")
    assert str(garbage) in str(info.value)


def _stored_tarball(tmp_path: Path) -> tuple[Path, bytes]:
    """A tar.gz whose deflate blocks are stored: review bytes appear verbatim in the file."""
    acl = write_acl(tmp_path / "src", {**REVIEWS, ("train", "pos"): ["A wonderful film.", "MARKERTEXT is here."]})
    tarball = make_tarball(acl, tmp_path / "stored.tar.gz", compresslevel=0)
    return tarball, tarball.read_bytes()


def test_corrupted_byte_in_tarball_is_a_data_error(tmp_path: Path) -> None:
    tarball, data = _stored_tarball(tmp_path)
    position = data.index(b"MARKERTEXT")
    corrupted = bytearray(data)
    corrupted[position] ^= 0x20  # "M" -> "m": still valid deflate (stored block), wrong content
    tarball.write_bytes(bytes(corrupted))
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_tarball(tarball)


def test_tarball_missing_its_last_bytes_is_a_data_error(tmp_path: Path) -> None:
    tarball, data = _stored_tarball(tmp_path)
    tarball.write_bytes(data[:-8])  # the gzip trailer (CRC32 + length) is gone
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_tarball(tarball)


def test_invalid_utf8_in_tarball_names_the_member(tmp_path: Path) -> None:
    acl = write_acl(tmp_path / "src", extra={"test/pos/7_8.txt": b"Caf\xe9 latte was \xff great"})
    tarball = make_tarball(acl, tmp_path / "aclImdb_v1.tar.gz")
    with pytest.raises(DataError, match="UTF-8") as info:
        read_tarball(tarball)
    assert "aclImdb/test/pos/7_8.txt" in str(info.value)
    assert str(tarball) in str(info.value)


def test_incomplete_tarball_is_a_data_error(tmp_path: Path) -> None:
    reviews = {key: texts for key, texts in REVIEWS.items() if key != ("test", "neg")}
    tarball = make_tarball(write_acl(tmp_path / "src", reviews), tmp_path / "aclImdb_v1.tar.gz")
    with pytest.raises(DataError, match=r"test/neg/.*incomplete") as info:
        read_tarball(tarball)
    assert str(tarball) in str(info.value)


def test_tarball_without_reviews_is_a_data_error(tmp_path: Path) -> None:
    tarball = tmp_path / "empty.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("aclImdb/README")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    with pytest.raises(DataError, match="no reviews found"):
        resolve_source(str(tarball), tmp_path / "cache")


# ---------------------------------------------------------------- folder


def test_folder_as_parent_or_as_acl_root(tmp_path: Path) -> None:
    acl = write_acl(tmp_path / "parent")
    assert find_acl_root(tmp_path / "parent") == acl
    assert find_acl_root(acl) == acl
    via_parent, info_parent = resolve_source(str(tmp_path / "parent"), tmp_path / "cache")
    via_root, info_root = resolve_source(str(acl), tmp_path / "cache")
    assert as_sets(via_parent) == as_sets(via_root) == EXPECTED
    assert info_parent.kind == info_root.kind == "folder"
    assert info_parent.fingerprint == info_root.fingerprint
    assert all(o.startswith(str(acl)) for o in via_root["test"].origins)


def test_invalid_utf8_in_folder_names_the_file(tmp_path: Path) -> None:
    acl = write_acl(tmp_path, extra={"train/neg/9_1.txt": b"bad \xc3\x28 bytes"})
    with pytest.raises(DataError, match="not valid UTF-8") as info:
        read_folder(acl)
    assert str(acl / "train" / "neg" / "9_1.txt") in str(info.value)


def test_incomplete_folder_is_a_data_error(tmp_path: Path) -> None:
    reviews = {key: texts for key, texts in REVIEWS.items() if key != ("test", "neg")}
    acl = write_acl(tmp_path, reviews)
    (acl / "test" / "neg").mkdir()  # present but empty counts as missing too
    with pytest.raises(DataError, match=r"test/neg/.*incomplete") as info:
        resolve_source(str(tmp_path), tmp_path / "cache")
    assert str(acl) in str(info.value)


def test_folder_without_test_is_a_data_error(tmp_path: Path) -> None:
    acl = write_acl(tmp_path, {key: t for key, t in REVIEWS.items() if key[0] == "train"})
    with pytest.raises(DataError, match="not an aclImdb folder") as info:
        resolve_source(str(acl), tmp_path / "cache")
    assert str(acl) in str(info.value)


def test_unknown_source_path_is_a_data_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "aclImdb_v1.tar.gz"
    with pytest.raises(DataError, match="no such file or folder") as info:
        resolve_source(str(missing), tmp_path / "cache")
    assert str(missing) in str(info.value)


def test_unknown_file_type_is_a_data_error(tmp_path: Path) -> None:
    odd = tmp_path / "reviews.csv"
    odd.write_text("text,label\nok,1\n")
    with pytest.raises(DataError, match="unknown source type") as info:
        resolve_source(str(odd), tmp_path / "cache")
    assert str(odd) in str(info.value)


def test_folder_with_nothing_usable_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not an aclImdb folder"):
        resolve_source(str(tmp_path / "empty"), tmp_path / "cache")


# ---------------------------------------------------------------- Parquet


def write_parquet(path: Path, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_with_split_column(tmp_path: Path) -> None:
    file = write_parquet(
        tmp_path / "imdb.parquet",
        text=["good", "bad", "fine", "poor", "nice"],
        label=[1, 0, 1, 0, 1],
        split=["train", "train", "test", "test", None],
    )
    corpus, info = resolve_source(str(file), tmp_path / "cache")
    assert info.kind == "parquet"
    assert as_sets(corpus) == {"train": {(1, "good"), (0, "bad"), (1, "nice")}, "test": {(1, "fine"), (0, "poor")}}
    assert corpus["test"].origins == [f"{file}#row=2", f"{file}#row=3"]


def test_parquet_split_column_with_unknown_value_is_a_data_error(tmp_path: Path) -> None:
    file = write_parquet(tmp_path / "d.parquet", text=["a", "b"], label=[1, 0], split=["train", "validation"])
    with pytest.raises(DataError, match=r"row 1: split 'validation'") as info:
        read_parquet(file)
    assert str(file) in str(info.value)


def test_parquet_folder_with_train_and_test_file_names(tmp_path: Path) -> None:
    folder = tmp_path / "plain_text"
    write_parquet(folder / "train-00000-of-00001.parquet", text=["t1", "t2"], label=[0, 1])
    write_parquet(folder / "test-00000-of-00001.parquet", text=["s1", "s2", "s3"], label=[1, 0, 1])
    write_parquet(folder / "unsupervised-00000-of-00001.parquet", text=["u1"], label=[-1])
    corpus, info = resolve_source(str(folder), tmp_path / "cache")
    assert info.kind == "parquet"
    assert info.location == str(folder.resolve())
    assert as_sets(corpus) == {"train": {(0, "t1"), (1, "t2")}, "test": {(1, "s1"), (0, "s2"), (1, "s3")}}


def test_parquet_split_subfolders(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data" / "train" / "part-0.parquet", text=["t1", "t2"], label=[0, 1])
    write_parquet(tmp_path / "data" / "test" / "part-0.parquet", text=["s1"], label=[1])
    corpus = read_parquet(tmp_path / "data")
    assert as_sets(corpus) == {"train": {(0, "t1"), (1, "t2")}, "test": {(1, "s1")}}


def test_parquet_without_test_puts_everything_in_train(tmp_path: Path) -> None:
    file = write_parquet(tmp_path / "reviews.parquet", text=["a", "b", "c"], label=[0, 1, 0])
    corpus = read_parquet(file)
    assert len(corpus["train"]) == 3 and len(corpus["test"]) == 0


@pytest.mark.parametrize("missing", ["text", "label"])
def test_parquet_missing_column_names_file_and_column(tmp_path: Path, missing: str) -> None:
    columns = {"text": ["a", "b"], "label": [0, 1]}
    del columns[missing]
    file = write_parquet(tmp_path / "reviews.parquet", **columns)
    with pytest.raises(DataError, match=f"missing column '{missing}'") as info:
        resolve_source(str(file), tmp_path / "cache")
    assert str(file) in str(info.value)


def test_parquet_label_as_string_names_file_and_column(tmp_path: Path) -> None:
    file = write_parquet(tmp_path / "reviews.parquet", text=["a", "b"], label=["pos", "neg"])
    with pytest.raises(DataError, match="column 'label' must be integers") as info:
        read_parquet(file)
    assert str(file) in str(info.value)


def test_parquet_label_as_bool_is_refused(tmp_path: Path) -> None:
    file = write_parquet(tmp_path / "reviews.parquet", text=["a", "b"], label=[True, False])
    with pytest.raises(DataError, match="column 'label'"):
        read_parquet(file)


def test_parquet_text_as_int_names_file_and_column(tmp_path: Path) -> None:
    file = write_parquet(tmp_path / "reviews.parquet", text=[1, 2], label=[0, 1])
    with pytest.raises(DataError, match="column 'text' must be strings") as info:
        read_parquet(file)
    assert str(file) in str(info.value)


def test_parquet_that_is_not_parquet_is_a_data_error(tmp_path: Path) -> None:
    file = tmp_path / "reviews.parquet"
    file.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError, match="cannot read Parquet") as info:
        resolve_source(str(file), tmp_path / "cache")
    assert str(file) in str(info.value)


def test_parquet_bad_rows_are_named_by_check_rows(tmp_path: Path) -> None:
    file = write_parquet(tmp_path / "reviews.parquet", text=["a", "b", "c", "d"], label=[0, 1, 0, 2])
    corpus = read_parquet(file)
    with pytest.raises(DataError, match=r"label must be 0 or 1, found 2") as info:
        check_rows(corpus)
    assert f"{file}#row=3" in str(info.value)

    nulls = write_parquet(
        tmp_path / "nulls.parquet", text=pa.array(["a", None, "c"], pa.string()), label=[0, 1, 0]
    )
    with pytest.raises(DataError, match="text must be a string") as info:
        check_rows(read_parquet(nulls))
    assert f"{nulls}#row=1" in str(info.value)

    no_label = write_parquet(tmp_path / "nolabel.parquet", text=["a", "b"], label=pa.array([0, None], pa.int64()))
    with pytest.raises(DataError, match="found None") as info:
        check_rows(read_parquet(no_label))
    assert f"{no_label}#row=1" in str(info.value)


# ---------------------------------------------------------------- validation.check_rows


def raw(text, label, origin="some/file.txt") -> dict[str, RawSplit]:
    good = RawSplit()
    good.add("fine", 1, "ok.txt")
    bad = RawSplit()
    bad.add("fine too", 0, "ok2.txt")
    bad.add(text, label, origin)
    return {"train": good, "test": bad}


@pytest.mark.parametrize(
    ("text", "label", "message"),
    [
        (123, 0, "text must be a string, found int"),
        (None, 1, "text must be a string, found NoneType"),
        (b"bytes", 1, "text must be a string, found bytes"),
        ("ok", 2, "label must be 0 or 1, found 2"),
        ("ok", -1, "label must be 0 or 1, found -1"),
        ("ok", True, "label must be 0 or 1, found True"),
        ("ok", False, "label must be 0 or 1, found False"),
        ("ok", None, "label must be 0 or 1, found None"),
        ("ok", "1", "label must be 0 or 1, found '1'"),
    ],
)
def test_check_rows_names_the_origin(text, label, message: str) -> None:
    with pytest.raises(DataError) as info:
        check_rows(raw(text, label, "aclImdb/test/pos/3_9.txt"))
    assert message in str(info.value)
    assert info.value.location == "aclImdb/test/pos/3_9.txt"
    assert str(info.value).startswith("aclImdb/test/pos/3_9.txt: ")


def test_check_rows_accepts_good_rows() -> None:
    corpus = raw("ok", 1)
    check_rows(corpus)  # no error
    assert corpus["test"].labels == [0, 1]


# ---------------------------------------------------------------- URL


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


def test_unreachable_url_says_how_to_work_offline(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/aclImdb_v1.tar.gz"
    with pytest.raises(DataError) as info:
        resolve_source(url, tmp_path / "cache", progress=False)
    message = str(info.value)
    assert "--source sample" in message
    assert "local copy" in message
    assert "--source /path/to/aclImdb_v1.tar.gz" in message
    assert url in message
    assert not (tmp_path / "cache" / "downloads" / "aclImdb_v1.tar.gz").exists()
