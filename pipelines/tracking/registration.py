"""Log the trained model (with its ONNX and int8 variants scored) as an MLflow pyfunc and register it as a new version.

Once per checkpoint: the version is created with a `source_checkpoint` tag and its backends'
figures (in the same call),
and a rerun of the registration of the same run and checkpoint (after a failure at any later
step) finds that version again instead of registering a second one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.core import console

INPUT_EXAMPLE = ["A moving story with wonderful acting.", "Dull, predictable and far too long."]
SOURCE_TAG = "source_checkpoint"


@dataclass(frozen=True)
class Registered:
    model_uri: str
    registered_model_version: str
    rerun: bool  # the version was found from an earlier try, not created now


def existing_version(client: MlflowClient, name: str, run_id: str, source: str) -> str | None:
    """The version of `name` that this run already registered from this checkpoint, if any."""
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if version.tags.get(SOURCE_TAG) == source:
            return str(version.version)
    return None


def log_model(model_dir: str, tokenizer_path: str, register_as: str, settings, eval_texts: list[str], eval_labels: list[int],
              onnx_variants: bool = True, source: str | None = None):
    """The model in `model_dir` as a pyfunc that carries its preprocessing and its ONNX/int8
    variants (pipelines.inference.variants), each scored on `eval_texts`; registered (tagged with
    `source`, the checkpoint it came from), scores as version tags.

    Returns (Registered, the variants' scores).
    """
    import tempfile

    import mlflow
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from pipelines.inference import pyfunc_model, variants

    with tempfile.TemporaryDirectory(prefix="register-") as scratch:
        folder = variants.build_model_folder(model_dir, tokenizer_path, settings, Path(scratch) / pyfunc_model.MODEL_ARTIFACT, onnx=onnx_variants)
        texts, labels = variants.evaluation_sample(eval_texts, eval_labels)
        scores = variants.score_variants(folder, texts, labels)
        variants.save_scores(folder, scores)
        default = variants.default_backend(scores)
        signature = ModelSignature(
            inputs=Schema([ColSpec("string")]),  # unnamed: predict(["a review", ...]) works as is
            outputs=Schema([ColSpec("string", "label"), ColSpec("long", "label_id"), ColSpec("double", "score"),
                            *(ColSpec("double", f"probability_{label}") for label in settings.labels)]),
            params=ParamSchema([ParamSpec("backend", "string", default)]),
        )
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc_model.SentimentModel(),
            artifacts={pyfunc_model.MODEL_ARTIFACT: str(folder)},
            # the preprocessing's code goes with the model: `mlflow models serve` needs no checkout
            code_paths=[str(Path(__file__).parents[1])],  # the whole pipelines package
            signature=signature,
            input_example=INPUT_EXAMPLE,
            pip_requirements=model_requirements(),
        )
    # the version with its source and backend tags in one call: never a version without them,
    # and a rerun finds it by its source whatever fails after this
    tags = {SOURCE_TAG: source or info.model_uri, "backend.default": default, "backend.eval_rows": str(len(texts))}
    for score in scores:
        tags.update(score.tags())
    version = str(mlflow.register_model(info.model_uri, register_as, tags=tags).version)
    return Registered(info.model_uri, version, rerun=False), scores


def register_model(model_dir: str, tokenizer_path: str, register_as: str, manifest, max_length: int, truncation: str,
                   onnx_variants: bool = True, source: str | None = None) -> Registered:
    """log_model with the run's preprocessing, scored on the dataset's test split; says so on the console.

    Inside the active MLflow run: when that run already registered `source`, its version is returned as it is.
    """
    import mlflow

    from pipelines.data.datasets import read_split_table
    from pipelines.inference.classifier import InferenceSettings
    from pipelines.inference.variants import MAX_EVAL_ROWS

    run = mlflow.active_run()
    if source and run is not None:
        found = existing_version(MlflowClient(), register_as, run.info.run_id, source)
        if found:
            console.stage("registration", f"models:/{register_as}/{found} already holds this run's checkpoint (an earlier try): not registered again")
            return Registered(f"models:/{register_as}/{found}", found, rerun=True)
    test = read_split_table(manifest, "test")
    # minutes on a CPU (export, quantization, three passes over the test sample): say what runs
    rows = min(test.num_rows, MAX_EVAL_ROWS)
    console.stage("registration", f"ONNX export and int8 quantization, then torch, onnx and onnx-int8 each scored on {rows} test reviews"
                  if onnx_variants else f"torch alone (--no-onnx-variants), scored on {rows} test reviews")
    info, scores = log_model(model_dir, tokenizer_path, register_as, InferenceSettings(max_length, truncation),
                             test.column("text").to_pylist(), test.column("label").to_pylist(), onnx_variants, source)
    console.stage("registration", "backends on {} test reviews: {}".format(scores[0].rows, "; ".join(
        f"{s.backend} accuracy {s.accuracy:.4f}, agreement {s.agreement:.3f}, {s.texts_per_s:.0f}/s{'' if s.usable else ' (unusable)'}" for s in scores)))
    return info


def model_requirements() -> list[str]:
    from importlib.metadata import version

    torch_version = version("torch").split("+")[0]  # a local tag (+cpu) is not on PyPI
    return [f"torch=={torch_version}", *(f"{name}=={version(name)}" for name in ("transformers", "tokenizers", "safetensors", "onnxruntime", "pandas", "numpy"))]
