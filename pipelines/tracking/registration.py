"""Log the trained model (with its ONNX and int8 variants scored) as an MLflow pyfunc and register it as a new version."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.core import console

INPUT_EXAMPLE = ["A moving story with wonderful acting.", "Dull, predictable and far too long."]


def log_model(model_dir: str, tokenizer_path: str, register_as: str, settings, eval_texts: list[str], eval_labels: list[int],
              onnx_variants: bool = True):
    """The model in `model_dir` as a pyfunc that carries its preprocessing and its ONNX/int8
    variants (pipelines.inference.variants), each scored on `eval_texts`; registered, scores as version tags.

    Returns (ModelInfo, the variants' scores).
    """
    import tempfile

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
            registered_model_name=register_as,
            pip_requirements=model_requirements(),
        )
    if info.registered_model_version:
        client = MlflowClient()
        for score in scores:
            for key, value in score.tags().items():
                client.set_model_version_tag(register_as, str(info.registered_model_version), key, value)
        client.set_model_version_tag(register_as, str(info.registered_model_version), "backend.default", default)
        client.set_model_version_tag(register_as, str(info.registered_model_version), "backend.eval_rows", str(len(texts)))
    return info, scores


def register_model(model_dir: str, tokenizer_path: str, register_as: str, manifest, max_length: int, truncation: str,
                   onnx_variants: bool = True):
    """log_model with the run's preprocessing, scored on the dataset's test split; says so on the console."""
    from pipelines.data.datasets import read_split_table
    from pipelines.inference.classifier import InferenceSettings
    from pipelines.inference.variants import MAX_EVAL_ROWS

    test = read_split_table(manifest, "test")
    # minutes on a CPU (export, quantization, three passes over the test sample): say what runs
    rows = min(test.num_rows, MAX_EVAL_ROWS)
    console.stage("registration", f"ONNX export and int8 quantization, then torch, onnx and onnx-int8 each scored on {rows} test reviews"
                  if onnx_variants else f"torch alone (--no-onnx-variants), scored on {rows} test reviews")
    info, scores = log_model(model_dir, tokenizer_path, register_as, InferenceSettings(max_length, truncation),
                             test.column("text").to_pylist(), test.column("label").to_pylist(), onnx_variants)
    console.stage("registration", "backends on {} test reviews: {}".format(scores[0].rows, "; ".join(
        f"{s.backend} accuracy {s.accuracy:.4f}, agreement {s.agreement:.3f}, {s.texts_per_s:.0f}/s{'' if s.usable else ' (unusable)'}" for s in scores)))
    return info


def model_requirements() -> list[str]:
    from importlib.metadata import version

    torch_version = version("torch").split("+")[0]  # a local tag (+cpu) is not on PyPI
    return [f"torch=={torch_version}", *(f"{name}=={version(name)}" for name in ("transformers", "tokenizers", "safetensors", "onnxruntime", "pandas", "numpy"))]
