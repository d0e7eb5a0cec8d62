"""Datasets on an object store: a real S3-compatible server (moto) on 127.0.0.1.

Object stores have no rename: a version is committed by its manifest, written last.
These tests publish to the server through the same code a cluster uses (pyarrow's
S3FileSystem, endpoint and keys from the standard AWS variables), then break it the ways
a cluster breaks it: a crash mid-publish, two publishers at once, a lost or cut shard, a
wrong endpoint, a missing bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipelines.core.errors import DataError
from pipelines.core.storage import StorageError, resolve
from pipelines.data import datasets
from pipelines.data.datasets import load_manifest
from pipelines.data.prepare import prepare_dataset
from pipelines.data.sample_corpus import write_sample_corpus
from pipelines.data.settings import PrepareConfig
from tests.services import S3Server

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())  # what a cluster node has in its environment
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_sample_corpus(tmp_path_factory.mktemp("raw") / "aclImdb", train_per_label=40, test_per_label=20, seed=5)


@pytest.fixture
def bucket(s3, request) -> str:
    name = "t-" + request.node.name.replace("_", "-")[:50].lower().rstrip("-")
    s3.create_bucket(name)
    return name


def config(corpus: Path, bucket: str, **overrides) -> PrepareConfig:
    return PrepareConfig(source=str(corpus), storage=f"s3://{bucket}/platform", rows_per_shard=16, progress=False, **overrides)


def version_keys(s3: S3Server, bucket: str, version: str) -> list[str]:
    return s3.list_keys(bucket, f"platform/datasets/imdb/{version}/")


def test_publish_writes_shards_then_manifest_and_a_rerun_writes_nothing(s3, corpus, bucket):
    manifest = prepare_dataset(config(corpus, bucket)).manifest
    keys = version_keys(s3, bucket, manifest.version)
    prefix = f"platform/datasets/imdb/{manifest.version}/"
    shard_keys = sorted(prefix + shard.path for info in manifest.splits.values() for shard in info.files)
    # exactly the shards the manifest lists, plus the manifest: no staging copies, no folder markers
    assert keys == sorted(shard_keys + [prefix + "manifest.json"])
    stored = json.loads(s3.get_object(bucket, prefix + "manifest.json"))
    for info in stored["splits"].values():
        for shard in info["files"]:
            data = s3.get_object(bucket, prefix + shard["path"])
            assert len(data) == shard["bytes"]
            import hashlib

            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert s3.get_object(bucket, "platform/datasets/imdb/LATEST").decode().strip() == manifest.version

    etags = {k: s3.client().head_object(Bucket=bucket, Key=k)["ETag"] for k in keys}
    again = prepare_dataset(config(corpus, bucket))
    assert not again.created
    assert {k: s3.client().head_object(Bucket=bucket, Key=k)["ETag"] for k in version_keys(s3, bucket, manifest.version)} == etags
    # and a reader on "another node" finds it by name
    assert load_manifest("imdb", storage=f"s3://{bucket}/platform").content_hash == manifest.content_hash


def test_crash_mid_publish_leaves_no_manifest_and_the_next_run_cleans_up_and_rebuilds(s3, corpus, bucket, monkeypatch):
    real = datasets._write_split
    calls = []

    def crash_on_second_split(version_dir, split, *args):
        calls.append(split)
        if len(calls) == 2:
            raise OSError("connection reset (simulated crash)")
        return real(version_dir, split, *args)

    monkeypatch.setattr(datasets, "_write_split", crash_on_second_split)
    with pytest.raises(StorageError, match="connection reset"):
        prepare_dataset(config(corpus, bucket))
    monkeypatch.undo()
    version = next(k.split("/")[3] for k in s3.list_keys(bucket, "platform/datasets/imdb/"))
    leftovers = version_keys(s3, bucket, version)
    assert leftovers and not any(k.endswith("manifest.json") for k in leftovers), "shards without a manifest"
    assert not s3.list_keys(bucket, "platform/datasets/imdb/LATEST"), "LATEST moved before a manifest existed"
    with pytest.raises(DataError, match="no prepared dataset"):
        load_manifest("imdb", storage=f"s3://{bucket}/platform")

    # a stray object from the crashed attempt that the new run would not write itself
    stray = f"platform/datasets/imdb/{version}/train/part-09999.parquet"
    s3.put_object(bucket, stray, b"half a shard")
    manifest = prepare_dataset(config(corpus, bucket)).manifest
    assert manifest.version == version
    assert stray not in version_keys(s3, bucket, version), "the leftovers were not removed"
    assert load_manifest("imdb", storage=f"s3://{bucket}/platform").version == version


def test_two_publishers_racing_on_one_version_end_with_one_valid_version(s3, corpus, bucket):
    errors, results = [], []
    barrier = threading.Barrier(2)

    def publish():
        try:
            barrier.wait(timeout=30)
            results.append(prepare_dataset(config(corpus, bucket)))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    # one may find the other's version and stop there; neither may fail or leave it broken
    assert not errors, errors
    versions = {r.manifest.version for r in results}
    assert len(versions) == 1
    manifest = load_manifest("imdb", storage=f"s3://{bucket}/platform")  # checks every shard's size
    assert manifest.version in versions
    listed = {manifest.root.child(*s.path.split("/")).path.split("/", 1)[1] for i in manifest.splits.values() for s in i.files}
    on_store = {k for k in version_keys(s3, bucket, manifest.version) if k.endswith(".parquet")}
    assert listed == on_store


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_manifest_whose_shard_is_missing_or_cut_is_refused_by_readers_and_repaired_by_prepare(s3, corpus, bucket, damage):
    manifest = prepare_dataset(config(corpus, bucket)).manifest
    shard = manifest.splits["val"].files[0]
    key = f"platform/datasets/imdb/{manifest.version}/{shard.path}"
    if damage == "missing":
        s3.delete_object(bucket, key)
        expected = "missing"
    else:
        s3.put_object(bucket, key, s3.get_object(bucket, key)[: shard.bytes // 2])
        expected = f"{shard.bytes // 2} bytes, the manifest says {shard.bytes}"
    with pytest.raises(DataError, match=expected) as error:
        load_manifest("imdb", storage=f"s3://{bucket}/platform")
    assert f"s3://{bucket}/platform/datasets/imdb/{manifest.version}/{shard.path}" in str(error.value)

    repaired = prepare_dataset(config(corpus, bucket))
    assert repaired.created
    assert load_manifest("imdb", storage=f"s3://{bucket}/platform").version == manifest.version


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.prepare_imdb", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize(
    "case",
    ["missing bucket", "unreachable endpoint"],
)
def test_bad_object_store_settings_give_one_line_naming_the_uri(s3, corpus, tmp_path, case):
    env = {**os.environ, **s3.env()}
    storage = "s3://no-such-bucket/platform"
    if case == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # discard port: nothing answers
        storage = "s3://anything/platform"
    result = cli(["--source", str(corpus), "--storage", storage, "--no-progress", "--cache-dir", str(tmp_path)], env)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and storage in errors[0], result.stderr
    assert ("does not exist" if case == "missing bucket" else "cannot reach") in errors[0]
    assert "Traceback" not in result.stderr


def test_storage_location_never_renames_on_an_object_store(s3, bucket):
    location = resolve(f"s3://{bucket}/platform/a")
    with pytest.raises(StorageError, match="cannot rename"):
        location.move_to(resolve(f"s3://{bucket}/platform/b"))


def test_object_store_storage_without_a_tracking_uri_says_where_runs_go(s3, monkeypatch, capsys, tmp_path):
    import mlflow

    from pipelines.tracking import store_uri

    previous = mlflow.get_tracking_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(store_uri, "DEFAULT_STORAGE", str(tmp_path / "cache"))
    uri, artifact_root = store_uri.configure("s3://somewhere/platform")
    assert uri == f"sqlite:///{tmp_path / 'cache' / 'mlflow' / 'mlflow.db'}"
    assert artifact_root.startswith("file://")
    out = capsys.readouterr().out
    assert uri in out and "MLFLOW_TRACKING_URI" in out
    mlflow.set_tracking_uri(previous)


def test_an_mlflow_server_that_does_not_answer_gives_one_line(monkeypatch):
    from pipelines.core.errors import ConfigError
    from pipelines.tracking import store_uri

    with pytest.raises(ConfigError, match=r"MLflow tracking server http://127.0.0.1:9: not reachable .*refused"):
        store_uri.configure("/tmp/unused", "http://127.0.0.1:9")


def test_a_database_that_refuses_the_connection_gives_one_line_without_the_password(monkeypatch):
    from pipelines.core.errors import ConfigError
    from pipelines.tracking import store_uri

    monkeypatch.setenv("PGPASSWORD", "")  # the password moves here: put back unset after the test
    with pytest.raises(ConfigError, match=r"postgresql://mlflow@127.0.0.1:9/mlflow: cannot connect .*refused") as error:
        store_uri.configure("/tmp/unused", "postgresql://mlflow:s3cret@127.0.0.1:9/mlflow")
    assert "s3cret" not in str(error.value)
    assert os.environ["PGPASSWORD"] == "s3cret", "libpq reads the password from PGPASSWORD, not from a URI that gets recorded"


def test_wrong_credentials_give_one_line_naming_the_uri(corpus, tmp_path, monkeypatch):
    # moto checks signatures once its free actions are used up: a key it does not know is refused
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "1")
    with S3Server(tmp_path / "s3-with-auth") as strict:
        strict.create_bucket("guarded")  # the one free action
        env = {**os.environ, **strict.env(), "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0", "AWS_SECRET_ACCESS_KEY": "wrong"}
        result = cli(["--source", str(corpus), "--storage", "s3://guarded/platform", "--no-progress", "--cache-dir", str(tmp_path)], env)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "s3://guarded/platform" in errors[0] and "access denied" in errors[0], result.stderr
    assert "wrong" not in errors[0], "a secret in the message"
    assert "Traceback" not in result.stderr


def test_paths_ray_gives_back_on_an_object_store_become_uris(s3, bucket, tmp_path):
    remote = resolve(f"s3://{bucket}/platform")
    # Ray's Checkpoint.path on S3 has no scheme: opened as is it would be a local path
    assert remote.uri_of(f"{bucket}/platform/ray_results/r/checkpoint_1") == f"s3://{bucket}/platform/ray_results/r/checkpoint_1"
    assert remote.uri_of(f"s3://{bucket}/x") == f"s3://{bucket}/x"
    assert resolve(str(tmp_path)).uri_of(str(tmp_path / "ckpt")) == str(tmp_path / "ckpt")


# any text a user may pass as --storage, and bucket names that do not exist on the server
storage_texts = st.one_of(
    st.text(max_size=60),
    st.builds(lambda scheme, rest: f"{scheme}{rest}", st.sampled_from(["s3://", "gs://", "file://", "hdfs://", "ftp://", "s3:/", "://"]), st.text(max_size=40)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=storage_texts)
@example(text="~0")  # found by this test in CI: the home of a user that does not exist
def test_any_storage_text_is_a_location_or_one_clear_error(s3, text):
    """The --storage door: whatever is typed, a usable Location or a PlatformError, never another exception."""
    from pipelines.core.errors import PlatformError

    if text.startswith("gs://"):
        text = "s3://" + text[5:]  # no GCS server here: the same code path against the S3 one
    try:
        location = resolve(text)
        location.check_usable()
    except PlatformError as error:
        assert str(error).strip() and "\n" not in str(error).strip(), repr(str(error))
