"""Tests for prepare_dataset, the versioned dataset store and the prepare_imdb command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import prepare_imdb
from pipelines.core.errors import ConfigError, DataError
from pipelines.core.storage import StorageError
from pipelines.data import datasets
from pipelines.data.cleaning import clean_corpus
from pipelines.data.corpus import RawSplit, fingerprint
from pipelines.data.datasets import load_manifest, read_split_table
from pipelines.data.prepare import prepare_dataset
from pipelines.data.sample_corpus import write_sample_corpus
from pipelines.data.settings import PrepareConfig
from pipelines.data.sources import read_folder

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
TRAIN_PER_LABEL, TEST_PER_LABEL = 20, 10


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny aclImdb tree, shared read-only by the tests of this module."""
    return write_sample_corpus(tmp_path_factory.mktemp("raw"), train_per_label=TRAIN_PER_LABEL, test_per_label=TEST_PER_LABEL)


@pytest.fixture(scope="module")
def corpus_tarball(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tar") / "aclImdb_v1.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(corpus_dir, arcname="aclImdb")
    return path


def config(source: Path | str, storage: Path, **overrides) -> PrepareConfig:
    options = {"rows_per_shard": 7, "progress": False, "cache_dir": str(storage / "cache")}
    options.update(overrides)
    return PrepareConfig(source=str(source), storage=str(storage), **options)


def store(storage: Path, name: str = "imdb") -> Path:
    return storage / "datasets" / name


def latest(storage: Path, name: str = "imdb") -> str:
    return (store(storage, name) / "LATEST").read_text().strip()


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(storage: Path, name: str = "imdb") -> list[str]:
    root = store(storage, name)
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".staging-", ".trash-")))


def write_parquet(path: Path, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def parquet_corpus(n_neg: int, n_pos: int, prefix: str = "review") -> dict[str, list]:
    texts = [f"{prefix} negative number {i}" for i in range(n_neg)] + [f"{prefix} positive number {i}" for i in range(n_pos)]
    return {"text": texts, "label": [0] * n_neg + [1] * n_pos}


# ---------------------------------------------------------------- what is written


def test_prepare_writes_shards_manifest_and_latest(corpus_dir: Path, tmp_path: Path) -> None:
    result = prepare_dataset(config(corpus_dir, tmp_path))
    manifest = result.manifest
    assert result.created is True
    version_dir = store(tmp_path) / manifest.version
    assert manifest.root is not None and Path(manifest.root.path) == version_dir
    assert latest(tmp_path) == manifest.version
    assert sorted(p.name for p in version_dir.iterdir()) == ["manifest.json", "test", "train", "val"]

    payload = json.loads((version_dir / "manifest.json").read_text())
    assert payload["name"] == "imdb" and payload["version"] == manifest.version
    assert payload["content_hash"] == manifest.content_hash and len(manifest.content_hash) == 64
    assert datetime.fromisoformat(payload["created_at"]).tzinfo is not None
    assert payload["settings"] == {"val_fraction": 0.1, "test_fraction": 0.5, "rows_per_shard": 7}

    # the source is traceable
    assert payload["source"]["kind"] == "folder"
    assert payload["source"]["location"] == str(corpus_dir.resolve())
    assert payload["source"]["fingerprint"] == fingerprint(read_folder(corpus_dir))

    # the cleaning report is the one cleaning gives for this corpus
    _, report = clean_corpus(read_folder(corpus_dir))
    assert payload["cleaning"] == report.as_dict()
    assert payload["cleaning"]["splits"]["train"]["rows_in"] == 2 * TRAIN_PER_LABEL
    assert payload["cleaning"]["splits"]["test"]["rows_in"] == 2 * TEST_PER_LABEL

    # every split: shards exist, rows and label counts in the manifest match the Parquet
    read_back: dict[str, RawSplit] = {}
    for split in ("train", "val", "test"):
        files = sorted((version_dir / split).glob("part-*.parquet"))
        assert files, split
        info = payload["splits"][split]
        assert [f["path"] for f in info["files"]] == [f"{split}/{f.name}" for f in files]
        table = pa.concat_tables([pq.read_table(f) for f in files])
        assert table.schema.field("text").type == pa.string()
        assert table.schema.field("label").type == pa.int64()
        assert info["rows"] == table.num_rows
        labels = table["label"].to_pylist()
        assert info["labels"] == {"0": labels.count(0), "1": labels.count(1)}
        for shard, file in zip(info["files"], files):
            assert shard["rows"] == pq.read_metadata(file).num_rows <= 7
            assert shard["bytes"] == file.stat().st_size
        read_back[split] = RawSplit(table["text"].to_pylist(), labels, [""] * table.num_rows)
    # the content hash describes exactly what was written
    assert datasets.content_hash(read_back) == manifest.content_hash

    # splits: disjoint, complete with respect to cleaning, val stratified
    train_out = report.splits["train"].rows_out
    assert payload["splits"]["train"]["rows"] + payload["splits"]["val"]["rows"] == train_out
    assert payload["splits"]["test"]["rows"] == report.splits["test"].rows_out
    texts = [set(s.texts) for s in read_back.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    train_val_labels = read_back["train"].labels + read_back["val"].labels
    for label in (0, 1):
        assert read_back["val"].labels.count(label) == round(train_val_labels.count(label) * 0.1)


def test_rerun_is_a_no_op(corpus_dir: Path, tmp_path: Path) -> None:
    first = prepare_dataset(config(corpus_dir, tmp_path))
    before = mtimes(store(tmp_path))
    second = prepare_dataset(config(corpus_dir, tmp_path))
    assert second.created is False
    assert second.manifest.version == first.manifest.version
    assert second.manifest.content_hash == first.manifest.content_hash
    assert mtimes(store(tmp_path)) == before  # LATEST included: nothing was rewritten


def test_force_rebuilds(corpus_dir: Path, tmp_path: Path) -> None:
    first = prepare_dataset(config(corpus_dir, tmp_path))
    manifest_file = store(tmp_path) / first.manifest.version / "manifest.json"
    before = manifest_file.stat().st_mtime_ns
    os.utime(manifest_file, ns=(before - 10**9, before - 10**9))  # so a rewrite shows
    rebuilt = prepare_dataset(config(corpus_dir, tmp_path, force=True))
    assert rebuilt.created is True
    assert rebuilt.manifest.version == first.manifest.version
    assert rebuilt.manifest.content_hash == first.manifest.content_hash
    assert manifest_file.stat().st_mtime_ns != before - 10**9
    assert leftovers(tmp_path) == []
    assert load_manifest(str(manifest_file)).splits["train"].rows == first.manifest.splits["train"].rows


def test_different_val_fraction_is_a_new_version(corpus_dir: Path, tmp_path: Path) -> None:
    a = prepare_dataset(config(corpus_dir, tmp_path, val_fraction=0.1)).manifest
    b = prepare_dataset(config(corpus_dir, tmp_path, val_fraction=0.2)).manifest
    assert a.version != b.version
    assert (store(tmp_path) / a.version / "manifest.json").exists()
    assert (store(tmp_path) / b.version / "manifest.json").exists()
    assert latest(tmp_path) == b.version
    assert b.splits["val"].rows > a.splits["val"].rows
    # re-running the older settings moves LATEST back without writing anything
    again = prepare_dataset(config(corpus_dir, tmp_path, val_fraction=0.1))
    assert again.created is False and latest(tmp_path) == a.version


def test_tarball_and_folder_give_the_same_dataset(corpus_dir: Path, corpus_tarball: Path, tmp_path: Path) -> None:
    from_dir = prepare_dataset(config(corpus_dir, tmp_path / "a")).manifest
    from_tar = prepare_dataset(config(corpus_tarball, tmp_path / "b")).manifest
    assert from_tar.source["kind"] == "tarball"
    assert from_tar.content_hash == from_dir.content_hash
    assert from_tar.version == from_dir.version
    assert from_tar.source["fingerprint"] == from_dir.source["fingerprint"]
    # and into one storage, the second is recognised as the same data
    assert prepare_dataset(config(corpus_tarball, tmp_path / "a")).created is False


def test_named_version_with_other_content_is_refused(corpus_dir: Path, tmp_path: Path) -> None:
    prepare_dataset(config(corpus_dir, tmp_path, version="v1"))
    before = mtimes(store(tmp_path))
    with pytest.raises(DataError, match="exists with different content"):
        prepare_dataset(config(corpus_dir, tmp_path, version="v1", val_fraction=0.2))
    assert mtimes(store(tmp_path)) == before


# ---------------------------------------------------------------- failures leave nothing behind


def failing_after_first_split(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    real = datasets._write_split
    calls: list[str] = []

    def flaky(version_dir, split, texts, labels, rows_per_shard):
        calls.append(split)
        if len(calls) > 1:
            raise OSError("disk full (simulated)")
        return real(version_dir, split, texts, labels, rows_per_shard)

    monkeypatch.setattr(datasets, "_write_split", flaky)
    return calls


def test_failure_while_writing_leaves_no_version_and_latest_unchanged(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = prepare_dataset(config(corpus_dir, tmp_path, val_fraction=0.1)).manifest
    calls = failing_after_first_split(monkeypatch)
    # one line naming the storage and the reason, not a traceback
    with pytest.raises(StorageError, match=r"storage .*: disk full"):
        prepare_dataset(config(corpus_dir, tmp_path, val_fraction=0.2))
    assert len(calls) == 2  # the first split really was written before the failure
    assert sorted(p.name for p in store(tmp_path).iterdir()) == sorted(["LATEST", old.version])
    assert leftovers(tmp_path) == []
    assert latest(tmp_path) == old.version
    assert load_manifest("imdb", storage=str(tmp_path)).version == old.version


def test_failure_on_first_prepare_leaves_no_dataset(corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing_after_first_split(monkeypatch)
    with pytest.raises(StorageError):
        prepare_dataset(config(corpus_dir, tmp_path))
    root = store(tmp_path)
    assert not root.exists() or list(root.iterdir()) == []
    with pytest.raises(DataError, match="prepare_imdb"):
        load_manifest("imdb", storage=str(tmp_path))


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_force_rebuild_keeps_the_old_version(corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = prepare_dataset(config(corpus_dir, tmp_path)).manifest
    version_dir = store(tmp_path) / old.version
    before = contents(version_dir)
    failing_after_first_split(monkeypatch)
    with pytest.raises(StorageError):
        prepare_dataset(config(corpus_dir, tmp_path, force=True))
    # the same content is rewritten under the same names with the same bytes: nothing else changed
    assert contents(version_dir) == before
    assert leftovers(tmp_path) == []
    assert read_split_table(load_manifest(str(version_dir)), "test").num_rows == old.splits["test"].rows


def test_a_forced_rebuild_with_other_content_replaces_the_version_only_once_whole(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = prepare_dataset(config(corpus_dir, tmp_path, version="v1", val_fraction=0.1)).manifest
    version_dir = store(tmp_path) / "v1"
    failing_after_first_split(monkeypatch)
    with pytest.raises(StorageError):
        prepare_dataset(config(corpus_dir, tmp_path, version="v1", val_fraction=0.2, force=True))
    monkeypatch.undo()
    # the new train shards were written beside the old ones, but the old manifest still rules
    current = load_manifest("imdb", storage=str(tmp_path))
    assert current.content_hash == old.content_hash and latest(tmp_path) == "v1"
    assert read_split_table(current, "val").num_rows == old.splits["val"].rows
    assert len(list(version_dir.rglob("*.parquet"))) > sum(len(i.files) for i in old.splits.values())

    new = prepare_dataset(config(corpus_dir, tmp_path, version="v1", val_fraction=0.2, force=True)).manifest
    assert new.content_hash != old.content_hash
    listed = {s.path for i in new.splits.values() for s in i.files} | {"manifest.json"}
    assert set(contents(version_dir)) == listed, "the old shards and the failed run's were not all removed"
    assert load_manifest("imdb", storage=str(tmp_path)).content_hash == new.content_hash


@pytest.mark.parametrize("problem", ["label", "truncated", "missing_label_in_test"])
def test_bad_input_writes_nothing(tmp_path: Path, corpus_tarball: Path, problem: str) -> None:
    if problem == "label":
        columns = parquet_corpus(30, 30)
        columns["label"][5] = 2
        source = write_parquet(tmp_path / "in" / "reviews.parquet", **columns)
        match = r"reviews.parquet#row=5: label must be 0 or 1, found 2"
    elif problem == "truncated":
        source = tmp_path / "in" / "aclImdb_v1.tar.gz"
        source.parent.mkdir()
        data = corpus_tarball.read_bytes()
        source.write_bytes(data[: len(data) // 2])
        match = "corrupt or truncated"
    else:
        columns = parquet_corpus(30, 30)
        split = ["train"] * 60
        for i in range(45, 60):
            split[i] = "test"  # test holds positives only
        source = write_parquet(tmp_path / "in" / "reviews.parquet", **columns, split=split)
        match = r"split 'test' has no rows with label 0"
    storage = tmp_path / "storage"
    with pytest.raises(DataError, match=match):
        prepare_dataset(config(source, storage))
    datasets_dir = storage / "datasets"
    assert not datasets_dir.exists() or [p for p in datasets_dir.rglob("*")] == []


# ---------------------------------------------------------------- Parquet through prepare


def test_parquet_without_test_gets_a_carved_test_split(tmp_path: Path) -> None:
    source = write_parquet(tmp_path / "reviews.parquet", **parquet_corpus(40, 60))
    manifest = prepare_dataset(config(source, tmp_path / "storage", test_fraction=0.5, val_fraction=0.1)).manifest
    assert manifest.source["kind"] == "parquet"
    assert manifest.splits["test"].labels == {"0": 20, "1": 30}
    assert manifest.splits["val"].labels == {"0": 2, "1": 3}
    assert manifest.splits["train"].labels == {"0": 18, "1": 27}
    assert any("no test split" in w and "50%" in w for w in manifest.warnings)


def test_parquet_with_split_column_keeps_its_test(tmp_path: Path) -> None:
    columns = parquet_corpus(20, 20)
    split = ["test" if i % 4 == 0 else "train" for i in range(40)]
    source = write_parquet(tmp_path / "reviews.parquet", **columns, split=split)
    manifest = prepare_dataset(config(source, tmp_path / "storage")).manifest
    test_texts = set(read_split_table(manifest, "test")["text"].to_pylist())
    assert test_texts == {t for t, s in zip(columns["text"], split) if s == "test"}
    assert not any("no test split" in w for w in manifest.warnings)


def test_prepare_keeps_every_test_row_and_dedups_train(tmp_path: Path) -> None:
    """Duplicates inside test are published (and counted), so accuracy is over the whole official set."""
    train = parquet_corpus(10, 10, prefix="train")
    train_texts = train["text"] + ["train positive number 0", "test negative number 0"]  # a duplicate, an overlap
    train_labels = train["label"] + [1, 0]
    test = parquet_corpus(5, 5, prefix="test")
    test_texts = test["text"] + ["test positive number 1", "test positive number 1", "test both labels", "test both labels"]
    test_labels = test["label"] + [1, 1, 0, 1]
    source = write_parquet(
        tmp_path / "reviews.parquet",
        text=train_texts + test_texts,
        label=train_labels + test_labels,
        split=["train"] * len(train_texts) + ["test"] * len(test_texts),
    )
    manifest = prepare_dataset(config(source, tmp_path / "storage")).manifest

    written = read_split_table(manifest, "test")
    assert sorted(zip(written["text"].to_pylist(), written["label"].to_pylist())) == sorted(zip(test_texts, test_labels))
    assert manifest.splits["test"].rows == len(test_texts) == 14
    assert manifest.cleaning["splits"]["test"]["duplicates_kept"] == 2
    assert manifest.cleaning["splits"]["test"]["conflicting_label_kept"] == 2
    assert manifest.cleaning["splits"]["test"]["duplicates_dropped"] == 0
    # train (and val carved out of it) lost its duplicate and the review test also holds
    assert manifest.cleaning["splits"]["train"]["duplicates_dropped"] == 1
    assert manifest.cleaning["train_test_overlap_dropped"] == 1
    assert manifest.splits["train"].rows + manifest.splits["val"].rows == 20
    train_val = read_split_table(manifest, "train")["text"].to_pylist() + read_split_table(manifest, "val")["text"].to_pylist()
    assert sorted(train_val) == sorted(train["text"])


def test_imbalanced_data_is_prepared_with_a_warning(tmp_path: Path) -> None:
    columns = parquet_corpus(180, 20)
    split = ["test" if i % 2 else "train" for i in range(200)]
    source = write_parquet(tmp_path / "reviews.parquet", **columns, split=split)
    result = prepare_dataset(config(source, tmp_path / "storage"))
    assert result.created
    assert any("imbalanced" in w and "'train'" in w for w in result.manifest.warnings)
    payload = json.loads((Path(result.manifest.root.path) / "manifest.json").read_text())
    assert payload["warnings"] == result.manifest.warnings


# ---------------------------------------------------------------- loading


def test_load_manifest_every_way(corpus_dir: Path, tmp_path: Path) -> None:
    manifest = prepare_dataset(config(corpus_dir, tmp_path)).manifest
    version_dir = store(tmp_path) / manifest.version
    storage = str(tmp_path)
    found = [
        load_manifest("imdb", storage=storage),
        load_manifest(f"imdb/{manifest.version}", storage=storage),
        load_manifest(str(version_dir)),
        load_manifest(str(version_dir / "manifest.json")),
        load_manifest(str(store(tmp_path))),  # the dataset folder: follows LATEST
    ]
    for loaded in found:
        assert loaded.version == manifest.version
        assert loaded.content_hash == manifest.content_hash
        assert Path(loaded.root.path) == version_dir
    loaded = found[0]
    for split in ("train", "val", "test"):
        table = read_split_table(loaded, split)
        assert table.num_rows == loaded.splits[split].rows
        assert table.column_names == ["text", "label"]
        assert sorted(table["label"].to_pylist()).count(1) == loaded.splits[split].labels["1"]
    with pytest.raises(DataError, match="no split 'dev'"):
        read_split_table(loaded, "dev")


def test_load_manifest_of_a_missing_dataset_says_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"python -m pipelines.prepare_imdb"):
        load_manifest("imdb", storage=str(tmp_path))
    with pytest.raises(DataError, match="prepare_imdb"):
        load_manifest(str(tmp_path / "nowhere"))


def test_load_manifest_with_broken_json_is_a_data_error(corpus_dir: Path, tmp_path: Path) -> None:
    manifest = prepare_dataset(config(corpus_dir, tmp_path)).manifest
    (store(tmp_path) / manifest.version / "manifest.json").write_text("{ not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest("imdb", storage=str(tmp_path))


def test_load_manifest_relative_manifest_path(corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = prepare_dataset(config(corpus_dir, tmp_path)).manifest
    monkeypatch.chdir(store(tmp_path) / manifest.version)
    assert load_manifest("manifest.json").version == manifest.version


def test_load_manifest_by_name_ignores_an_unrelated_folder_in_cwd(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = tmp_path / "storage"
    manifest = prepare_dataset(config(corpus_dir, storage)).manifest
    workdir = tmp_path / "work"
    (workdir / "imdb").mkdir(parents=True)  # e.g. where the user keeps the raw download
    monkeypatch.chdir(workdir)
    assert load_manifest("imdb", storage=str(storage)).version == manifest.version


# ---------------------------------------------------------------- command line


def test_val_fraction_out_of_range_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--val-fraction"):
        PrepareConfig(source="sample", storage=str(tmp_path), val_fraction=0.7)
    with pytest.raises(ConfigError, match="--test-fraction"):
        PrepareConfig(source="sample", storage=str(tmp_path), test_fraction=1.0)
    with pytest.raises(ConfigError, match="--rows-per-shard"):
        PrepareConfig(source="sample", storage=str(tmp_path), rows_per_shard=0)
    with pytest.raises(ConfigError, match="--version"):
        PrepareConfig(source="sample", storage=str(tmp_path), version="../x")


def test_main_prepares_then_reports_no_change(corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--source", str(corpus_dir), "--storage", str(tmp_path), "--rows-per-shard", "16", "--no-progress"]
    assert prepare_imdb.main(argv) == 0
    out = capsys.readouterr().out
    version = latest(tmp_path)
    assert "written" in out
    assert f"manifest: {store(tmp_path) / version / 'manifest.json'}" in out
    manifest = load_manifest("imdb", storage=str(tmp_path))
    assert manifest.settings["rows_per_shard"] == 16
    assert prepare_imdb.main(argv) == 0
    assert "already prepared" in capsys.readouterr().out
    assert latest(tmp_path) == version


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PLATFORM_STORAGE": str(cwd / "default-storage")}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.prepare_imdb", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=50,
    )


def test_cli_bad_source_exits_2_with_one_error_line(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "aclImdb_v1.tar.gz"
    proc = run_cli("--source", str(missing), "--storage", str(tmp_path / "storage"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, proc.stderr
    assert str(missing) in error_lines[0]
    assert not (tmp_path / "storage" / "datasets").exists()


def test_cli_bad_val_fraction_exits_2_naming_the_flag(tmp_path: Path) -> None:
    proc = run_cli("--source", "sample", "--storage", str(tmp_path / "storage"), "--val-fraction", "0.7", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "--val-fraction" in error_lines[0], proc.stderr
    assert not (tmp_path / "storage").exists()
