"""Put a run's pictures and summary, and a version's model card, into MLflow (the content comes from pipelines.tracking.report_content)."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.tracking.runs import CURVE_KEYS, metric_entity


def log_run_report(run_id: str, final: dict, manifest, model: str, kind: str = "training run", history_run_id: str | None = None) -> dict:
    """PNG pictures (confusion matrix, curves, ROC/PR) and the run's description; returns ROC/PR metrics.

    `final`: the last report of the run's training (test/* keys, epoch, best_epoch);
    `history_run_id`: the run whose per-epoch metrics the curves draw (a sweep's best trial).
    """
    import tempfile

    from pipelines.tracking import report_content

    client = MlflowClient()
    extra: dict = {}
    step = int(final.get("epoch", 1))
    with tempfile.TemporaryDirectory(prefix="run-report-") as folder:
        pictures = [report_content.confusion_matrix_png(
            [[final.get("test/tn"), final.get("test/fp")], [final.get("test/fn"), final.get("test/tp")]], Path(folder) / "confusion_matrix.png"
        )]
        if final.get("test/score_hist_pos") is not None:
            extra = {f"test/{k}": v for k, v in report_content.roc_pr_png(final["test/score_hist_pos"], final["test/score_hist_neg"], Path(folder) / "roc_pr_curves.png").items()}
            pictures.append(Path(folder) / "roc_pr_curves.png")
            client.log_batch(run_id, metrics=[metric_entity(k, v, step) for k, v in extra.items() if v == v])  # NaN: undefined
        history = {key: [(m.step, m.value) for m in client.get_metric_history(history_run_id or run_id, key)] for key in CURVE_KEYS}
        one_epoch = len(history.get("val/loss", [])) <= 1
        steps = int(final.get("train/optimizer_steps") or 0) or None
        pictures.append(report_content.training_curves_png(history, Path(folder) / "training_curves.png", steps_per_epoch=steps if one_epoch else None))
        for picture in pictures:
            client.log_artifact(run_id, str(picture), "pictures")
    rows = {split: info.rows for split, info in manifest.splits.items()}
    description = report_content.run_description(
        model=model, dataset=f"{manifest.name}/{manifest.version}", dataset_uri=manifest.uri, rows=rows,
        epochs_run=int(final.get("epoch", 1)), best_epoch=int(final.get("best_epoch", final.get("epoch", 1))),
        metrics={**final, **extra}, stopped_early=bool(final.get("stopped_early")), kind=kind,
    )
    client.set_tag(run_id, "mlflow.note.content", description)
    return extra


def write_model_card(name: str, version: str, run_id: str, final: dict, manifest, model: str, decision, settings: dict) -> None:
    """The registered version's description: a short model card (data, scores, the gate, how to serve)."""
    from pipelines.tracking import report_content
    from pipelines.tracking.registry import CHAMPION

    card = report_content.model_card(
        name=name, version=version, run_id=run_id, model=model, dataset=f"{manifest.name}/{manifest.version}",
        dataset_uri=manifest.uri, dataset_hash=manifest.content_hash, metrics=final,
        gate_promoted=decision.promote if decision else None, gate_reason=decision.reason if decision else "not gated",
        best_epoch=int(final.get("best_epoch", final.get("epoch", 1))), settings=settings,
        serve_hint=f"python -m serve.app --model-name {name}  (serves @{CHAMPION}; or: make serve)",
        rows={split: info.rows for split, info in manifest.splits.items()},
    )
    MlflowClient().update_model_version(name, version, description=card)
