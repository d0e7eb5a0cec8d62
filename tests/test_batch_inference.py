"""One preprocessing everywhere: the registered pyfunc, batch prediction on Ray Data and the
classifier itself give the same labels; batch output is atomic; evaluation is an MLflow run.

A tiny model registered through the real registration path (ONNX export, int8 variant,
scores as version tags) in a SQLite MLflow store; the shared local Ray.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from pipelines.core.errors import ConfigError, DataError
from pipelines.data.datasets import read_split_table
from pipelines.tracking import registration, runs, store_uri

REPO = Path(__file__).resolve().parents[1]
MODEL = "batch-test"
MAX_LENGTH = 48


@pytest.fixture(scope="module")
def registered(tmp_path_factory, sample_manifest, tiny_model_dir):
    """(tracking URI, version) of the tiny model registered with max length 48, head+tail."""
    store = tmp_path_factory.mktemp("batch-mlflow")
    uri, artifact_root = store_uri.configure(str(store))
    # an experiment of our own: the store's Default one keeps its artifacts in ./mlruns
    with mlflow.start_run(experiment_id=runs.ensure_experiment("batch-test", artifact_root)):
        info = registration.register_model(tiny_model_dir, tiny_model_dir, MODEL, sample_manifest, MAX_LENGTH, "head_tail")
    return uri, str(info.registered_model_version)


@pytest.fixture(scope="module")
def review_texts(sample_manifest) -> list[str]:
    """200 test reviews, a quarter wrapped in HTML markup, a quarter far longer than the max length."""
    texts = read_split_table(sample_manifest, "test").column("text").to_pylist()[:200]
    marked = [f"<p><b>{t}</b><br/>&amp; more</p>" if i % 4 == 1 else t for i, t in enumerate(texts)]
    return [" ".join([t] * 4) if i % 4 == 2 else t for i, t in enumerate(marked)]


def parquet_of(folder: Path, texts: list[str], labels: list[int] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    columns = {"text": texts, **({"label": labels} if labels is not None else {})}
    pq.write_table(pa.table(columns), folder / "part-0.parquet")
    return folder


@pytest.mark.timeout(600)
def test_registration_scores_the_variants_as_version_tags(registered):
    uri, version = registered
    tags = MlflowClient(uri, registry_uri=uri).get_model_version(MODEL, version).tags
    for backend in ("torch", "onnx", "onnx-int8"):
        assert 0.0 <= float(tags[f"backend.{backend}.accuracy"]) <= 1.0
        assert 0.0 <= float(tags[f"backend.{backend}.agreement"]) <= 1.0
        assert tags[f"backend.{backend}.usable"] in ("true", "false")
    assert float(tags["backend.torch.agreement"]) == 1.0 and tags["backend.torch.usable"] == "true"
    assert tags["backend.default"] in ("torch", "onnx", "onnx-int8") and tags[f"backend.{tags['backend.default']}.usable"] == "true"


@pytest.mark.timeout(300)
def test_without_onnx_variants_only_torch_is_registered_and_the_others_are_refused_in_one_line(registered, sample_manifest, tiny_model_dir):
    from pipelines.inference.variants import choose_backend

    uri, _ = registered
    name = "batch-test-torch-only"
    with mlflow.start_run(experiment_id=runs.ensure_experiment("batch-test", None)):
        info = registration.register_model(tiny_model_dir, tiny_model_dir, name, sample_manifest, MAX_LENGTH, "head_tail", onnx_variants=False)
    tags = MlflowClient(uri, registry_uri=uri).get_model_version(name, str(info.registered_model_version)).tags
    assert tags["backend.default"] == "torch" and tags["backend.torch.usable"] == "true"
    assert not [key for key in tags if key.startswith(("backend.onnx.", "backend.onnx-int8."))]
    assert choose_backend("auto", tags, name) == "torch" and choose_backend("torch", tags, name) == "torch"
    for backend in ("onnx", "onnx-int8"):
        with pytest.raises(ConfigError, match="--no-onnx-variants"):
            choose_backend(backend, tags, name)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{info.registered_model_version}")
    assert len(model.predict(["a fine film"])) == 1
    with pytest.raises(ConfigError, match="not in the model folder"):
        model.predict(["a fine film"], params={"backend": "onnx"})


@pytest.mark.timeout(300)
def test_the_registered_model_carries_the_whole_pipelines_package(registered):
    """`mlflow models serve` and a pyfunc load elsewhere need no checkout: every layer the
    preprocessing and the backends import travels in the model's code folder."""
    uri, version = registered
    mlflow.set_registry_uri(uri)
    code = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}/{version}", tracking_uri=uri)) / "code"
    carried = {p.relative_to(code).as_posix() for p in code.rglob("*.py")}
    for module in ("pipelines/inference/pyfunc_model.py", "pipelines/inference/classifier.py",
                   "pipelines/text/tokenization.py", "pipelines/text/cleaning.py", "pipelines/core/errors.py"):
        assert module in carried, f"{module} is not in the registered model's code ({sorted(carried)[:8]}...)"


@pytest.mark.timeout(900)
def test_pyfunc_batch_prediction_and_the_classifier_give_the_same_labels(registered, review_texts, tmp_path, ray_session):
    from pipelines.inference import batch_prediction
    from pipelines.inference.classifier import load_classifier_from

    uri, version = registered
    model = batch_prediction.resolve_model(f"models:/{MODEL}/{version}", uri, "torch")
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}").predict(review_texts, params={"backend": "torch"})
    direct = load_classifier_from(batch_prediction.download_model_folder(model, str(tmp_path / "dl")), "torch").predict(review_texts)
    dataset = batch_prediction.predictions(str(parquet_of(tmp_path / "in", review_texts)), model, batch_size=32)
    batch = pa.concat_tables(list(batch_prediction.iter_tables(dataset, len(review_texts), "test")))

    assert batch.column("text").to_pylist() == review_texts  # order kept, every row once
    assert list(pyfunc["label"]) == [p["label"] for p in direct] == batch.column("predicted_label").to_pylist()
    np.testing.assert_allclose(pyfunc["probability_positive"], batch.column("probability_positive").to_numpy(), atol=1e-5)
    # the preprocessing really ran: markup changes nothing once cleaned, and a long text is cut to the max length
    from pipelines.inference.classifier import TextEncoder

    encoder = load_classifier_from(batch_prediction.download_model_folder(model, str(tmp_path / "dl2")), "torch").encoder
    assert isinstance(encoder, TextEncoder)
    assert encoder.token_ids(["<b>Great</b> film &amp; cast"]) == encoder.token_ids(["Great film & cast"])
    assert max(len(ids) for ids in encoder.token_ids(review_texts)) == MAX_LENGTH


@pytest.mark.timeout(300)
def test_a_batch_model_actor_keeps_its_model_in_memory_and_no_copy_on_disk(registered, review_texts, tmp_path, monkeypatch):
    """One actor per CPU per job: a downloaded copy left behind by each would fill the nodes' disks."""
    import tempfile

    from pipelines.inference.batch_prediction import PredictBatch, resolve_model

    uri, version = registered
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    actor = PredictBatch(resolve_model(f"models:/{MODEL}/{version}", uri, "onnx-int8"), "text", threads=1)
    assert list(tmp_path.iterdir()) == []
    scored = actor(pa.table({"text": review_texts[:8]}))
    assert scored.num_rows == 8 and set(scored.column("predicted_label").to_pylist()) <= {"negative", "positive"}
    # a call of many rows runs the model on batches of model_batch, in order
    actor.model_batch = 3
    in_threes = actor(pa.table({"text": review_texts[:8]}))
    np.testing.assert_allclose(in_threes.column("probability_positive").to_numpy(), scored.column("probability_positive").to_numpy(), atol=1e-6)


@pytest.mark.timeout(900)
def test_predict_writes_its_output_whole_or_not_at_all(registered, review_texts, tmp_path, ray_session):
    from pipelines.predict import PredictConfig, run_predict

    uri, version = registered
    source = parquet_of(tmp_path / "in", review_texts[:60])
    output = tmp_path / "scored"
    config = PredictConfig(input=str(source), output=str(output), model=f"models:/{MODEL}/{version}", tracking_uri=uri, batch_size=16)
    assert run_predict(config) == (60, 1)
    scored = pq.read_table(output)
    assert scored.num_rows == 60 and {"text", "predicted_label", "predicted_label_id", "score", "probability_positive"} <= set(scored.column_names)
    assert (output / "_SUCCESS").exists()
    with pytest.raises(ConfigError, match="exists already"):
        run_predict(config)

    # a damaged input fails the run: the earlier result stays as it was, and no staging folder is left
    (source / "part-1.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    with pytest.raises(Exception):
        run_predict(PredictConfig(**{**config.__dict__, "overwrite": True}))
    assert pq.read_table(output).num_rows == 60
    assert not list(output.glob("_temporary-*")), "a staging folder was left"
    with pytest.raises(DataError, match="no column 'review'"):
        run_predict(PredictConfig(**{**config.__dict__, "input": str(parquet_of(tmp_path / "in2", ["x"])), "text_column": "review", "overwrite": True}))


def probabilities_of(frame) -> np.ndarray:
    return np.stack([np.asarray(frame[f"probability_{label}"], dtype=np.float64) for label in ("negative", "positive")], axis=-1)


TOLERANCE = {"torch": 1e-4, "onnx": 1e-4, "onnx-int8": 1e-6}  # int8 runs a text per pass: the same run alone or not


@pytest.fixture(scope="module")
def int8_alone(registered, review_texts) -> tuple[list[str], np.ndarray]:
    """500 texts (the 200 reviews first) and the int8 probabilities of each sent alone through the pyfunc."""
    _, version = registered
    texts = review_texts + [t[: len(t) // 2] for t in review_texts] + [t.upper() for t in review_texts[:100]]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}")
    return texts, np.concatenate([probabilities_of(pyfunc.predict([text], params={"backend": "onnx-int8"})) for text in texts])


@pytest.mark.timeout(900)
def test_an_int8_answer_is_the_same_alone_and_in_any_batch_in_pyfunc_and_batch_prediction(registered, int8_alone, tmp_path, ray_session):
    """500 texts: each alone through the pyfunc, then all in one pyfunc call, then through batch prediction.

    int8 is the backend whose activation scales span a forward pass (tests/test_onnx_graph.py
    checks every backend's classifier the same way); /v1 and /v2 are checked in the Serve test.
    """
    from pipelines.predict import PredictConfig, run_predict

    backend = "onnx-int8"
    uri, version = registered
    texts, alone = int8_alone
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}")
    together = probabilities_of(pyfunc.predict(texts, params={"backend": backend}))
    np.testing.assert_allclose(together, alone, atol=TOLERANCE[backend])

    source = parquet_of(tmp_path / "in", texts)
    config = PredictConfig(input=str(source), output=str(tmp_path / "out"), model=f"models:/{MODEL}/{version}", tracking_uri=uri,
                           batch_size=32, backend=backend)
    assert run_predict(config)[0] == len(texts)
    scored = pq.read_table(tmp_path / "out").to_pandas()
    assert list(scored["text"]) == texts
    np.testing.assert_allclose(probabilities_of(scored), alone, atol=TOLERANCE[backend])
    assert (probabilities_of(scored).argmax(-1) == alone.argmax(-1)).all()


@pytest.mark.timeout(900)
def test_evaluate_logs_a_run_against_the_model_version(registered, review_texts, tmp_path, ray_session):
    from pipelines.evaluate import EvaluateConfig, run_evaluation

    uri, version = registered
    labels = [i % 2 for i in range(80)]
    data = parquet_of(tmp_path / "labelled", review_texts[:80], labels)
    outcome = run_evaluation(EvaluateConfig(model=f"models:/{MODEL}/{version}", data=str(data / "part-0.parquet"), tracking_uri=uri, backend="torch"))

    predicted = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}").predict(review_texts[:80], params={"backend": "torch"})["label_id"]
    expected_accuracy = float(np.mean(np.asarray(predicted) == np.asarray(labels)))
    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(outcome.run_id)
    assert run.data.metrics["eval/accuracy"] == pytest.approx(expected_accuracy)
    assert run.data.metrics["eval/rows"] == 80
    assert run.data.tags["model_version"] == version and run.data.params["model_uri"] == f"models:/{MODEL}/{version}"
    pictures = {a.path for a in client.list_artifacts(outcome.run_id, "pictures")}
    assert {"pictures/confusion_matrix.png", "pictures/roc_pr_curves.png"} <= pictures
    assert client.get_model_version(MODEL, version).tags["evaluation.last_run"] == outcome.run_id


@pytest.mark.timeout(120)
def test_predict_cli_refuses_an_unknown_model_in_one_line(tmp_path):
    storage = tmp_path / "storage"
    source = parquet_of(tmp_path / "in", ["a review"])
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.predict", "--model", "models:/nothing-here@champion", "--input", str(source),
         "--output", str(tmp_path / "out"), "--storage", str(storage)],
        cwd=REPO, env={**os.environ, "MLFLOW_TRACKING_URI": ""}, capture_output=True, text=True, timeout=100,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[0].startswith("error: --model models:/nothing-here@champion: not found"), result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_answers_v1_and_v2_with_the_pyfunc_labels_on_each_backend(registered, review_texts, int8_alone, ray_session):
    """The Serve endpoint, the Open Inference Protocol and the pyfunc agree on 200 reviews; a
    user_config backend switch reloads the model on ONNX Runtime and still agrees."""
    import socket

    import httpx
    import ray
    from ray import serve
    from ray.util.state import list_actors

    from serve.app import build_app
    from serve.settings import ModelSource, ServingConfig

    uri, version = registered
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = ModelSource(MODEL, str(Path(uri.removeprefix("sqlite:///")).parent.parent), uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}")
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    rng = np.random.default_rng(3)
    int8_alone = int8_alone[1][: len(review_texts)]  # the fixture's texts start with these
    replicas: set[str] = set()
    try:
        for backend in ("torch", "onnx", "onnx-int8"):
            serving = ServingConfig(model_version=version, poll_interval_s=0, backend=backend, max_text_chars=100_000, max_body_bytes=8 * 1024**2)
            app = build_app(source, serving, num_replicas=1, autoscaling_config=None, ray_actor_options={"num_cpus": 0.5})
            # a code version that stays, as `serve deploy` of a config file keeps it: the next backend
            # is then a user_config change, which Serve hands to the running replica's reconfigure
            # (it reloads the model) instead of starting a new replica (serve.run draws a new version)
            app._bound_deployment._version = "agreement"
            serve.run(app, name="agreement", route_prefix="/")
            replicas |= {a.actor_id for a in list_actors(address=ray.get_runtime_context().gcs_address,  # other Rays run beside the suite
                                                         filters=[("class_name", "=", "ServeReplica:agreement:SentimentClassifier"), ("state", "=", "ALIVE")])}
            expected = list(pyfunc.predict(review_texts, params={"backend": backend})["label"])
            v1, v2, v1_probabilities, v2_probabilities = [], [], [], []
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
                assert http.get("/v1/model").json()["backend"] == backend
                first = 0
                while first < len(review_texts):  # int8: requests of 1 to 32 texts, batches of every size
                    chunk = review_texts[first:first + (int(rng.integers(1, 33)) if backend == "onnx-int8" else 50)]
                    first += len(chunk)
                    answer = http.post("/v1/predict", json={"texts": chunk})
                    assert answer.status_code == 200, answer.text
                    v1 += [p["label"] for p in answer.json()["predictions"]]
                    v1_probabilities += [[p["probabilities"]["negative"], p["probabilities"]["positive"]] for p in answer.json()["predictions"]]
                    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(chunk)], "data": chunk}]}
                    answer = http.post(f"/v2/models/{MODEL}/infer", json=body).json()
                    label_ids = next(o for o in answer["outputs"] if o["name"] == "label")["data"]
                    v2 += [("negative", "positive")[i] for i in label_ids]
                    v2_probabilities += next(o for o in answer["outputs"] if o["name"] == "probabilities")["data"]
            assert v1 == expected, f"{backend}: /v1 differs from the pyfunc"
            assert v2 == expected, f"{backend}: /v2 differs from the pyfunc"
            if backend == "onnx-int8":  # a text's answer does not depend on the batch its request made
                np.testing.assert_allclose(np.array(v1_probabilities), int8_alone, atol=1e-6)
                np.testing.assert_allclose(np.array(v2_probabilities).reshape(-1, 2), int8_alone, atol=1e-6)
        assert len(replicas) == 1, f"a backend switch started new replicas {replicas}: it is a user_config change, applied in place"
    finally:
        serve.shutdown()


@pytest.mark.timeout(30)
def test_backend_choice_follows_the_version_tags():
    from pipelines.inference.variants import choose_backend

    tags = {"backend.default": "onnx-int8", "backend.onnx-int8.usable": "true", "backend.onnx.usable": "false",
            "backend.onnx.accuracy": "0.80", "backend.torch.accuracy": "0.90"}
    assert choose_backend("auto", tags, "m v1") == "onnx-int8"
    assert choose_backend("torch", tags, "m v1") == "torch"
    assert choose_backend("auto", {}, "m v1") == "torch"  # a version registered before the variants
    with pytest.raises(ConfigError, match="onnx of m v1 is marked unusable: accuracy 0.80 vs torch 0.90"):
        choose_backend("onnx", tags, "m v1")
    with pytest.raises(ConfigError, match="'tensorrt' is not one of auto, torch, onnx, onnx-int8"):
        choose_backend("tensorrt", tags, "m v1")


@pytest.mark.timeout(30)
def test_on_a_gpu_auto_takes_a_gpu_backend_never_cpu_int8(monkeypatch, caplog):
    from pipelines.inference import variants
    from pipelines.inference.variants import choose_backend

    tags = {"backend.default": "onnx-int8", "backend.onnx-int8.usable": "true", "backend.onnx.usable": "true"}
    monkeypatch.setattr(variants, "cuda_onnx_runtime", lambda: False)  # onnxruntime without its CUDA provider (this machine)
    assert choose_backend("auto", tags, "m v1", on_gpu=True) == "torch"
    monkeypatch.setattr(variants, "cuda_onnx_runtime", lambda: True)  # onnxruntime-gpu
    assert choose_backend("auto", tags, "m v1", on_gpu=True) == "onnx"
    assert choose_backend("auto", {**tags, "backend.onnx.usable": "false"}, "m v1", on_gpu=True) == "torch"
    assert choose_backend("auto", {}, "m v1", on_gpu=True) == "torch"  # registered before the variants
    assert choose_backend("auto", tags, "m v1", on_gpu=False) == "onnx-int8"  # a CPU replica keeps the measured default
    with caplog.at_level("WARNING"):
        assert choose_backend("onnx-int8", tags, "m v1", on_gpu=True) == "onnx-int8"  # asked for by name: as asked, said
    assert "runs on the CPU although this replica has a GPU" in caplog.text


@pytest.mark.timeout(300)
def test_a_replica_reports_the_device_its_backend_runs_on(registered, monkeypatch):
    """A GPU replica told to run int8 reports cpu (ONNX Runtime runs int8 there), and /v2 metadata says so too."""
    import torch

    from serve.model_store import ModelSelector, ModelStore
    from serve.schemas import model_metadata

    uri, version = registered
    store = ModelStore(str(Path(uri.removeprefix("sqlite:///")).parent.parent), uri, device=torch.device("cpu"))
    store.swap_to(ModelSelector(MODEL, version=version), backend="onnx-int8")
    info = store.current.describe()
    assert (info["backend"], info["device"]) == ("onnx-int8", "cpu")
    assert model_metadata(info)["parameters"] == {"backend": "onnx-int8", "device": "cpu"}
    store.device = torch.device("cuda")  # as pick_device() gives a replica that Ray gave a GPU
    assert store.on_gpu
    store.swap_to(ModelSelector(MODEL, version=version), backend="onnx-int8")
    assert store.current.describe()["device"] == "cpu", "int8 runs on the CPU: the replica must not claim the GPU"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "requested, files, cpus, expected",
    [
        (None, 16, 2, (2, 0.875, 1)),  # one single-threaded actor per CPU, after the reads' 0.25
        (None, 16, 8, (8, 0.96875, 1)),
        (None, 3, 8, (3, 7.75 / 3, 3)),  # no more actors than files (blocks): the CPUs go to threads
        (None, 1, 2, (1, 1.75, 2)),
        (4, 1, 2, (4, 0.4375, 1)),  # asked for: as asked
        (None, 16, 1, (1, 0.75, 1)),
    ],
)
def test_actor_plan_gives_each_cpu_a_single_threaded_model(requested, files, cpus, expected):
    from pipelines.inference.batch_prediction import plan_actors

    plan = plan_actors(requested, files, total_cpus=cpus)
    assert (plan.actors, plan.cpus_per_actor, plan.threads) == pytest.approx(expected)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "rows, actors, batch_size, expected",
    [
        (2048, 2, 64, 512),  # small Parquet parts joined up to 512 rows a call
        (10**6, 8, 64, 512),
        (1000, 2, 48, 288),  # two calls or more per actor: 250 rows, rounded up to 6 batches of 48
        (300, 2, 64, 128),
        (10, 4, 64, 64),  # never less than one model batch
    ],
)
def test_an_actor_call_holds_a_few_seconds_of_work_and_every_actor_gets_two(rows, actors, batch_size, expected):
    from pipelines.inference.batch_prediction import rows_per_call

    assert rows_per_call(rows, actors, batch_size) == expected
