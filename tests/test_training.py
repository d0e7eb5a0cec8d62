"""The training job for real: local Ray, Ray Data, Ray Train, a SQLite MLflow store.

A tiny random BERT (tests/conftest.py) keeps each run around a minute on 2 CPUs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.core.errors import ConfigError, DataError
from pipelines.tracking import registry
from pipelines.training.settings import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def tiny_config(manifest, storage, model, **overrides) -> TrainConfig:
    settings = dict(
        data=manifest.root.uri,
        model=model,
        epochs=2,
        batch_size=8,
        eval_batch_size=64,
        lr=3e-3,  # a tiny random BERT needs a large step to learn in a few dozen steps
        warmup_ratio=0.1,
        # a random tiny BERT is a fragile learner: length-sorted batches often keep it at
        # chance for the few epochs a test affords (pretrained models do not mind)
        group_by_length=False,
        max_length=64,
        # these runs test the plumbing (restarts, resume, registration), not learning (minilm_run
        # does): a dozen steps of an epoch's 67, the rest of the shard drained unmeasured
        max_steps_per_epoch=12,
        storage=str(storage),
        register_as="tiny-imdb",
        experiment="tests",
        max_failures=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def first_run(ray_session, sample_manifest, tmp_path_factory, tiny_model_dir):
    """One real training run, shared by the assertions below (it is the slow part): it fails,
    once within its restarts and once beyond them, and `--run-name NAME --resume` finishes it.

    A worker crashes at the start of epoch 2 (injected), twice. With one restart allowed, Ray
    Train restarts the worker group the first time and it resumes from epoch 1's checkpoint; the
    second crash ends the run. The same name without --resume is then refused, and so is
    --resume with settings that would make it another model; --resume with --epochs raised to 3
    finishes it in the same MLflow run. So every assertion below holds across a restart and a
    resume. The lazy pipeline (read + tokenize every epoch) runs under the restart; other runs
    cache the token ids.
    """
    from pipelines.training.job import TrainingFailed, run_training

    storage = tmp_path_factory.mktemp("train-storage")
    marker = storage / "fault-injected"
    # torch alone: a run that registers the ONNX variants is tests/first_run.py's (through the CLI)
    # and the rehearsal's; test_batch_inference.py checks the variants themselves
    config = tiny_config(sample_manifest, storage, tiny_model_dir, epochs=2, cache_tokenized="no", onnx_variants=False, run_name="resume-me")
    with pytest.raises(TrainingFailed, match="injected failure") as failed:
        run_training(config, loop_overrides={"fail_at_epoch": 1, "fault_marker": str(marker), "fail_times": 2})
    refusals = {}
    with pytest.raises(ConfigError, match="--resume") as refusals["same_name"]:
        run_training(config)  # the same name again without --resume is refused, not silently resumed
    with pytest.raises(ConfigError) as refusals["changed"]:
        # another run's settings would be mixed into this one's model
        run_training(replace(config, resume=True, lr=1e-4, batch_size=16, max_length=32))
    # raising --epochs is allowed: the run goes on for one more epoch
    resumed = replace(config, epochs=3, resume=True)
    return resumed, run_training(resumed), {"marker": marker.read_text(), "failed": str(failed.value),
                                            **{k: str(v.value) for k, v in refusals.items()}}


@pytest.fixture(scope="module")
def minilm_run(ray_session, sample_manifest, tmp_path_factory):
    """The end-to-end run: the bundled, pretrained MiniLM, a few dozen steps on the sample corpus.

    A random tiny BERT learns this corpus only now and then within a test's budget; the
    pretrained model always does, so the learning assertions live here.
    """
    from pipelines.training.job import run_training

    config = TrainConfig(
        # one whole epoch of the test corpus (34 steps of 16) with the default length grouping, as
        # `make train` runs. 2 x 15 steps was not enough: the result then hung on the batch order
        # (test accuracy 0.51 to 0.82 across orders); one whole epoch gave 0.91 test, 0.88 val.
        data=sample_manifest.root.uri, model=None, epochs=1, batch_size=16,
        max_length=64, lr=2e-4, storage=str(tmp_path_factory.mktemp("minilm-storage")),
        register_as="minilm-imdb", experiment="tests-e2e", max_failures=0,
        onnx_variants=False,  # learning is what is tested here; tests/first_run.py's run registers the variants
    )
    return config, run_training(config)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bundled_minilm_learns_end_to_end(minilm_run, sample_manifest):
    config, outcome = minilm_run
    client = MlflowClient(outcome.tracking_uri, registry_uri=outcome.tracking_uri)
    assert [m.step for m in client.get_metric_history(outcome.run_id, "train/loss")] == [1]
    # the per-step curve (every optimizer step: 34 of them) falls from chance (ln 2 = 0.69)
    curve = [m.value for m in sorted(client.get_metric_history(outcome.run_id, "train/step_loss"), key=lambda m: m.step)]
    assert len(curve) == outcome.metrics["train/optimizer_steps"]
    assert sum(curve[-8:]) / 8 < 0.8 * sum(curve[:8]) / 8, f"the training loss did not fall: {curve}"
    assert outcome.metrics["train/optimizer_steps"] == math.ceil(sample_manifest.splits["train"].rows / config.batch_size)
    assert outcome.metrics["test/accuracy"] > 0.7, "the sample corpus has a learnable signal"
    assert outcome.gate.promote and outcome.registered_version == "1"


@pytest.mark.timeout(600)
def test_training_reports_every_epoch_and_counts_every_row(first_run, sample_manifest):
    config, outcome, _ = first_run
    client = MlflowClient(outcome.tracking_uri, registry_uri=outcome.tracking_uri)
    assert [m.step for m in client.get_metric_history(outcome.run_id, "train/loss")] == [1, 2, 3]
    # every test and val row evaluated exactly once
    assert outcome.metrics["test/rows"] == sample_manifest.splits["test"].rows
    assert outcome.metrics["val/rows"] == sample_manifest.splits["val"].rows
    confusion = sum(outcome.metrics[f"test/{k}"] for k in ("tp", "fp", "fn", "tn"))
    assert confusion == sample_manifest.splits["test"].rows
    for key in ("train/samples_per_s", "train/tokens_per_s", "train/data_wait_fraction", "val/accuracy", "val/f1"):
        assert len(client.get_metric_history(outcome.run_id, key)) == 3, f"{key} missing from MLflow"
    wait = client.get_metric_history(outcome.run_id, "train/data_wait_fraction")[0].value
    assert 0.0 <= wait <= 1.0


@pytest.mark.timeout(600)
def test_mlflow_run_holds_params_tags_and_artifacts(first_run, sample_manifest):
    config, outcome, _ = first_run
    run = MlflowClient(outcome.tracking_uri, registry_uri=outcome.tracking_uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == str(config.lr)
    assert run.data.params["batch_size"] == str(config.batch_size)
    assert run.data.params["truncation"] == "head_tail"
    tags = run.data.tags
    assert tags["dataset_content_hash"] == sample_manifest.content_hash
    for tag in ("git_commit", "ray_version", "torch_version", "transformers_version"):
        assert tags[tag]
    assert run.data.metrics["test/accuracy"] == pytest.approx(outcome.metrics["test/accuracy"])
    artifacts = {a.path for a in MlflowClient(outcome.tracking_uri, registry_uri=outcome.tracking_uri).list_artifacts(outcome.run_id)}
    assert {"confusion_matrix.json", "console.log", "dataset_manifest.json"} <= artifacts
    confusion = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=outcome.run_id, artifact_path="confusion_matrix.json", tracking_uri=outcome.tracking_uri)).read_text())
    assert sum(sum(row) for row in confusion["matrix"]) == outcome.metrics["test/rows"]


@pytest.mark.timeout(600)
def test_model_is_registered_promoted_and_loadable(first_run):
    config, outcome, _ = first_run
    mlflow.set_tracking_uri(outcome.tracking_uri)
    client = MlflowClient(outcome.tracking_uri, registry_uri=outcome.tracking_uri)
    champion = client.get_model_version_by_alias(config.register_as, registry.CHAMPION)
    assert str(champion.version) == outcome.registered_version
    assert champion.tags["gate.decision"] == "promoted"
    assert float(champion.tags[registry.ACCURACY_TAG]) == pytest.approx(outcome.metrics["test/accuracy"], abs=1e-6)
    # the registered pyfunc carries the run's preprocessing; scored on torch alone (--no-onnx-variants)
    assert champion.tags["backend.torch.usable"] == "true" and champion.tags["backend.default"] == "torch"
    answers = mlflow.pyfunc.load_model(f"models:/{config.register_as}@champion").predict(["a wonderful film", "<p>dull</p> " * 400])
    assert list(answers["label"]) == [("negative", "positive")[i] for i in answers["label_id"]] and len(answers) == 2
    assert answers[["probability_negative", "probability_positive"]].sum(axis=1).round(5).eq(1.0).all()


@pytest.fixture(scope="module")
def stopped_early_after_minilm(minilm_run, sample_manifest, tiny_model_dir):
    """A learning rate too small to change a prediction, patience 1, registered under the MiniLM's
    name: early stopping must end it at epoch 2, and the gate must keep the MiniLM champion."""
    from pipelines.training.job import run_training

    champion_config, _ = minilm_run
    config = tiny_config(sample_manifest, champion_config.storage, tiny_model_dir, epochs=4, lr=1e-9, max_steps_per_epoch=2,
                         early_stopping_patience=1, register_as=champion_config.register_as, experiment=champion_config.experiment,
                         onnx_variants=False)
    return config, run_training(config)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gate_keeps_the_better_champion(minilm_run, stopped_early_after_minilm):
    """A nearly untrained model arrives after a good one: registered, but not promoted."""
    config, champion_run = minilm_run
    _, worse = stopped_early_after_minilm
    assert worse.metrics["test/accuracy"] < champion_run.metrics["test/accuracy"]
    # the registry named too: another test's run may have pointed MLflow's process-wide registry elsewhere
    client = MlflowClient(champion_run.tracking_uri, registry_uri=champion_run.tracking_uri)
    assert worse.registered_version != champion_run.registered_version
    champion = client.get_model_version_by_alias(config.register_as, registry.CHAMPION)
    assert str(champion.version) == champion_run.registered_version
    version = client.get_model_version(config.register_as, worse.registered_version)
    assert version.tags["gate.decision"] == "kept_champion"
    assert version.tags["gate.champion_version"] == champion_run.registered_version
    assert float(version.tags["gate.champion_accuracy"]) == pytest.approx(champion_run.metrics["test/accuracy"], abs=1e-6)


@pytest.mark.timeout(600)
def test_a_restart_then_a_resume_by_name_train_every_epoch_once(first_run):
    """The worker group restarted once from epoch 1's checkpoint, the run then ran out of restarts,
    and `--resume` trained epochs 2 and 3 into the same MLflow run."""
    config, outcome, interrupted = first_run
    assert interrupted["marker"].count("failed at epoch 1") == 2, "the second crash came after a restart"
    assert "restarts allowed: 1" in interrupted["failed"]
    assert "--resume" in interrupted["same_name"]
    for difference in ("--lr 0.003 -> 0.0001", "--batch-size 8 -> 16", "--max-length 64 -> 32"):
        assert difference in interrupted["changed"]
    assert outcome.metrics["epochs_trained"] == "1,2,3", "every epoch trained exactly once"
    client = MlflowClient(outcome.tracking_uri, registry_uri=outcome.tracking_uri)
    assert [m.step for m in client.get_metric_history(outcome.run_id, "train/loss")] == [1, 2, 3]
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_with_epochs"] == "3"
    assert outcome.registered_version is not None


def test_registry_decisions():
    class Version:
        def __init__(self, version, accuracy=None, dataset="d1"):
            self.version = version
            self.tags = {registry.DATASET_TAG: dataset}
            if accuracy is not None:
                self.tags[registry.ACCURACY_TAG] = str(accuracy)

    assert registry.decide("auto", 0.8, "d1", None).promote
    assert not registry.decide("never", 0.8, "d1", None).promote
    assert registry.decide("auto", 0.8, "d1", Version("1", 0.8)).promote, "a tie promotes (at least as good)"
    assert not registry.decide("auto", 0.79, "d1", Version("1", 0.8)).promote
    assert registry.decide("always", 0.1, "d1", Version("1", 0.8)).promote
    assert not registry.decide("never", 0.99, "d1", Version("1", 0.8)).promote
    different = registry.decide("auto", 0.99, "d2", Version("1", 0.8, dataset="d1"))
    assert not different.promote and "not comparable" in different.reason


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "10", "--num-workers", "3"], "multiple of"),
        (["--resume"], "--run-name"),
    ],
)
@pytest.mark.timeout(60)
def test_bad_flags_exit_with_one_line(flags, message):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.train_imdb", *flags], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(120)
def test_unknown_data_and_model_paths_fail_before_training(tmp_path, sample_manifest):
    from pipelines.text.model import resolve_model_path
    from pipelines.training.job import resolve_dataset

    with pytest.raises(DataError, match="prepare_imdb"):
        resolve_dataset(TrainConfig(data=str(tmp_path / "nowhere"), storage=str(tmp_path)))
    with pytest.raises(ConfigError, match="--model"):
        resolve_model_path(str(tmp_path / "no-model"))
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        resolve_model_path(str(empty))


@pytest.mark.timeout(120)
def test_imdb_offline_names_the_way_out(tmp_path, monkeypatch):
    """--data imdb with nothing prepared and no network: the message says what to do."""
    import socket

    from pipelines.data import settings as data_settings
    from pipelines.training.job import resolve_dataset

    with socket.socket() as probe:  # a port that was just free: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setitem(data_settings.SOURCE_ALIASES, "imdb", f"http://127.0.0.1:{port}/aclImdb_v1.tar.gz")
    with pytest.raises(DataError) as error:
        resolve_dataset(TrainConfig(data="imdb", storage=str(tmp_path)))
    assert "--data sample" in str(error.value) and "prepare_imdb --source" in str(error.value)


@pytest.mark.timeout(120)
def test_more_workers_than_the_cluster_holds(ray_session):
    from pipelines.training.resources import plan_resources

    with pytest.raises(ConfigError, match="CPUs"):
        plan_resources(TrainConfig(num_workers=4, batch_size=32), tokenized_up_front=True)
    with pytest.raises(ConfigError, match="GPUs"):
        plan_resources(TrainConfig(use_gpu="yes"), tokenized_up_front=True)


@pytest.mark.timeout(120)
def test_token_cache_is_used_when_it_fits_the_object_store(ray_session, sample_manifest):
    from pipelines.cluster import runtime
    from pipelines.training.feed import should_cache_tokenized

    small, store = TrainConfig(max_length=64), runtime.object_store_bytes()
    assert should_cache_tokenized(small, sample_manifest, 1, store), "a few hundred reviews fit any object store"
    assert not should_cache_tokenized(TrainConfig(max_length=64, cache_tokenized="no"), sample_manifest, 1, store)
    assert not should_cache_tokenized(small, sample_manifest, 1, 1e6), "1 MB: far too small"
    assert should_cache_tokenized(TrainConfig(max_length=64, cache_tokenized="yes"), sample_manifest, 1, 1e6)
    assert not should_cache_tokenized(small, sample_manifest, 3, store), "a lost node would take its cached blocks"


def test_optimizer_and_schedule_reduce_loss_on_a_fixed_batch(tiny_model_dir):
    """The loop's optimizer pieces alone, without Ray: loss falls over a few steps."""
    from transformers import get_linear_schedule_with_warmup

    from pipelines.text.model import load_classifier
    from pipelines.training.loop import build_optimizer

    torch.manual_seed(0)
    model = load_classifier(tiny_model_dir)
    optimizer = build_optimizer(model, lr=3e-3, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, 30)
    ids = torch.randint(1000, 2000, (8, 16))
    labels = torch.tensor([0, 1] * 4)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(id(p) not in decayed for n, p in model.named_parameters() if "LayerNorm" in n or n.endswith("bias"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_early_stopping_registers_the_best_epoch(stopped_early_after_minilm, sample_manifest):
    """Epoch 2 is no better than epoch 1 (lr 1e-9), so patience 1 stops there and epoch 1 is registered."""
    config, outcome = stopped_early_after_minilm
    assert outcome.metrics["epochs_trained"] == "1,2", "training went on past the patience"
    assert outcome.metrics["stopped_early"] == 1 and outcome.metrics["best_epoch"] == 1
    assert outcome.metrics["test/rows"] == sample_manifest.splits["test"].rows, "the test split was not evaluated"
    client = MlflowClient(outcome.tracking_uri, registry_uri=outcome.tracking_uri)
    assert client.get_model_version(config.register_as, outcome.registered_version).tags["best_epoch"] == "1"
    assert client.get_run(outcome.run_id).data.tags["best_epoch"] == "1"


def test_the_best_epoch_is_kept_and_checkpointed(tiny_model_dir):
    """Bare: epoch 2 is best, epoch 3 is worse; the checkpoint of epoch 3 carries epoch 2's model for registration."""
    import shutil

    from pipelines.text.model import load_classifier
    from pipelines.training.checkpoints import best_model_folder, save_checkpoint
    from pipelines.training.loop import BestEpoch, build_optimizer, build_scheduler

    model = load_classifier(tiny_model_dir)
    optimizer = build_optimizer(model, 1e-3, 0.0)
    scheduler = build_scheduler(optimizer, {"batch_size": 8, "grad_accum": 1, "train_rows": 80, "epochs": 3, "warmup_ratio": 0.0}, 1)
    best, snapshots = BestEpoch(), []
    for epoch, accuracy in enumerate([0.6, 0.7, 0.65]):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01)  # "training" moves every weight
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        best.offer(epoch, {"accuracy": accuracy, "loss": 1.0, "f1": accuracy - 0.1}, model, keep_copy=True)
        assert not best.patience_spent(epoch, patience=2)
    assert best.epoch == 1 and best.patience_spent(3, patience=2)
    folder = save_checkpoint(model, optimizer, scheduler, 2, [0, 1, 2], {"lr": 1e-3}, best)
    try:
        registered = load_classifier(best_model_folder(folder)).state_dict()
        for name, value in snapshots[1].items():
            torch.testing.assert_close(registered[name], value, msg=f"{name} is not epoch 2's")
        state = torch.load(folder / "training_state.pt", weights_only=False)
        assert state["best"] == {"epoch": 1, "accuracy": 0.7, "loss": 1.0, "f1": pytest.approx(0.6)}
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize(
    "options, cached, node_cpus, use_gpu, threads",
    [
        ({}, True, 2, False, 2),  # token ids cached: Ray Data is idle while training, both cores train
        ({}, False, 2, False, 1),  # streaming: the tokenizer actors keep their reserve
        ({}, True, 16, False, 16),
        ({"num_workers": 2, "batch_size": 16}, True, 16, False, 8),
        ({"threads_per_worker": 3}, True, 2, False, 3),  # what the user says
        ({"cpus_per_worker": 4}, True, 16, True, 4),  # GPUs: as before
    ],
)
def test_threads_use_the_cpus_ray_data_does_not_need(options, cached, node_cpus, use_gpu, threads):
    from pipelines.training.resources import plan_threads

    assert plan_threads(TrainConfig(**options), use_gpu, cached, node_cpus) == threads


def test_a_checkpoint_folder_ray_never_registered_is_removed_and_nothing_else(tmp_path, first_run):
    """A lost worker's cut-off upload (a checkpoint_* folder Ray's snapshot does not name) goes once the run
    finished; the registered checkpoints, the run's other files and a run without a snapshot stay."""
    from pipelines.core.storage import resolve
    from pipelines.training.leftovers import SNAPSHOT_FILE, remove_unregistered_checkpoints, unregistered_checkpoints

    # the fixture's real run (Ray's own snapshot): nothing to remove, every named checkpoint in place
    config, _, _ = first_run
    run_dir = resolve(config.storage).child("ray_results", config.run_name)
    named = [r["checkpoint_dir_name"] for r in run_dir.child(SNAPSHOT_FILE).read_json()["checkpoint_results"]]
    assert len(named) == 2 and unregistered_checkpoints(run_dir) == [] and set(named) <= set(run_dir.subfolders())

    run = tmp_path / "run"
    for name in ("checkpoint_2026-12-07_17-51-58.1", "checkpoint_2026-12-07_17-52-32.2", "checkpoint_2026-12-07_17-52-35.3", "other"):
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_bytes(b"x")
    location = resolve(str(run))
    assert remove_unregistered_checkpoints(location) == [], "no snapshot: nothing is known, nothing is removed"
    (run / SNAPSHOT_FILE).write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": "checkpoint_2026-12-07_17-52-32.2"}, {"checkpoint_dir_name": "checkpoint_2026-12-07_17-52-35.3"}]}))
    assert remove_unregistered_checkpoints(location) == ["checkpoint_2026-12-07_17-51-58.1"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_2026-12-07_17-52-32.2", "checkpoint_2026-12-07_17-52-35.3", SNAPSHOT_FILE, "other"]
    (run / SNAPSHOT_FILE).write_text(json.dumps({"checkpoint_results": []}))
    assert remove_unregistered_checkpoints(location) == [], "a snapshot that names nothing removes nothing"


@pytest.mark.parametrize(("placement", "strategy"), [("pack", "PACK"), ("spread", "SPREAD")])
def test_placement_is_ray_trains_placement_strategy(placement, strategy, tmp_path):
    """--placement reaches the workers' placement group (the rehearsal spreads two workers over two hosts)."""
    from ray.train import RunConfig

    from pipelines.training.job import build_trainer

    config = TrainConfig(data="sample", num_workers=2, batch_size=8, placement=placement)
    trainer = build_trainer({}, {}, config, use_gpu=False, run_config=RunConfig(name="placement", storage_path=str(tmp_path)))
    assert trainer.scaling_config.placement_strategy == strategy
    assert trainer.scaling_config.num_workers == 2


def test_a_checkpoint_that_holds_code_is_refused_not_run(tmp_path, tiny_model_dir):
    """Training state loads with weights_only: a real checkpoint's loads; a pickle with a payload does not run."""
    import pickle

    from pipelines.text.model import load_classifier
    from pipelines.training.checkpoints import (
        TRAINING_STATE,
        load_training_state,
        save_checkpoint,
    )
    from pipelines.training.loop import BestEpoch, build_optimizer, build_scheduler

    model = load_classifier(tiny_model_dir)
    optimizer = build_optimizer(model, 1e-3, 0.0)
    scheduler = build_scheduler(optimizer, {"batch_size": 8, "grad_accum": 1, "train_rows": 80, "epochs": 2, "warmup_ratio": 0.1}, 1)
    best = BestEpoch()
    best.offer(0, {"accuracy": 0.6, "loss": 0.7, "f1": 0.5}, model, keep_copy=False)
    folder = save_checkpoint(model, optimizer, scheduler, 0, [1], {"lr": 1e-3, "model_path": tiny_model_dir}, best)
    state = load_training_state(folder)
    assert state["epoch"] == 0 and state["best"]["f1"] == 0.5 and "state" in state["optimizer"]

    ran = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (ran,))

    (folder / TRAINING_STATE).write_bytes(pickle.dumps({"epoch": 1, "x": Payload()}))
    with pytest.raises(DataError, match="refused") as refused:
        load_training_state(folder)
    assert str(folder / TRAINING_STATE) in str(refused.value)
    assert not ran.exists(), "loading the checkpoint ran its code"


def test_precision_follows_what_the_device_computes_natively(monkeypatch):
    """bf16 from compute capability 8.0 (A100, L4, H100); fp16 with a gradient scaler below it (T4, V100,
    where is_bf16_supported() says yes by slow emulation); fp32 on CPU."""
    from pipelines.training.loop import autocast_for, grad_scaler_for, precision_for

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert precision_for(cpu) == "fp32" and grad_scaler_for(cpu) is None
    for capability, expected in [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # T4 and V100 say so too
        assert precision_for(gpu) == expected, capability
        autocast = autocast_for(gpu)
        assert autocast.fast_dtype == (torch.bfloat16 if expected == "bf16" else torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert grad_scaler_for(gpu) is not None


def test_train_epoch_with_a_gradient_scaler_scales_the_loss_and_unscales_before_clipping(tiny_model_dir):
    """The fp16 path's bookkeeping, run on CPU with a scaler (torch.amp.GradScaler("cpu")): the steps happen."""
    import numpy as np

    from pipelines.text.model import load_classifier
    from pipelines.training.loop import build_optimizer, build_scheduler, train_epoch

    model = load_classifier(tiny_model_dir)
    config = {"pad_token_id": 0, "batch_size": 4, "grad_accum": 1, "train_rows": 8, "epochs": 1, "warmup_ratio": 0.0,
              "max_grad_norm": 1.0, "max_steps_per_epoch": None}
    optimizer = build_optimizer(model, 1e-3, 0.0)
    scheduler = build_scheduler(optimizer, config, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    micro = {"input_ids": [np.array([101, 2204, 102]), np.array([101, 2919, 2204, 102])] * 2, "label": np.array([0, 1, 0, 1])}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    totals = train_epoch(model, optimizer, scheduler, [[micro], [micro]], config, torch.device("cpu"), scaler=scaler)
    assert totals.optimizer_steps == 2 and scaler.get_scale() > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "the scaled steps changed no weight"
