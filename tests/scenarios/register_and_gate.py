"""Register a model from a run and gate it, as the end of a training run does: a process to kill -9.

    python tests/scenarios/register_and_gate.py TRACKING_URI RUN_ID MODEL_DIR MANIFEST NAME ACCURACY

The model in MODEL_DIR (a checkpoint's folder) is logged and registered from run RUN_ID with
source `checkpoint-of-<RUN_ID>`, then gated at ACCURACY against @champion on the manifest's
test data (pipelines.tracking.registration and .registry, as pipelines.training.job calls them).
tests/test_gate_faults.py kills it at each step of that and runs it again. Prints
`REGISTERED <version> <promoted>`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str]) -> int:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.data.datasets import load_manifest
    from pipelines.tracking import registration, registry

    tracking_uri, run_id, model_dir, manifest_uri, name, accuracy = argv
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    manifest = load_manifest(manifest_uri)
    with mlflow.start_run(run_id=run_id):
        registered = registration.register_model(model_dir, model_dir, name, manifest, 32, "head_tail", onnx_variants=False,
                                                 source=f"checkpoint-of-{run_id}")
    decision = registry.apply_gate(MlflowClient(tracking_uri, registry_uri=tracking_uri), name, registered.registered_model_version,
                                   "auto", float(accuracy), manifest.content_hash)
    print("REGISTERED", registered.registered_model_version, decision.promote, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
