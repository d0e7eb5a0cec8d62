"""Pictures and texts that a training run and a registered model version show in MLflow.

Pure functions: they take plain numbers and write a PNG or return Markdown; the driver
logs the results (`mlflow.log_artifact`, the run's `mlflow.note.content` tag,
`MlflowClient.update_model_version`). Nothing here imports Ray or MLflow, and
matplotlib is imported inside the drawing functions with the Agg backend, so importing
this module is cheap and works on a head node without a display.

Scores travel as histograms, not raw probabilities: `score_histograms` from several
workers add up elementwise (a few hundred ints instead of one float per test row),
and `curve_metrics` computes ROC AUC and average precision from the sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

DPI = 110  # 5.5 x 4.5 in figures -> about 600 x 500 px: readable in MLflow's artifact view
MAX_DESCRIPTION_CHARS = 5000  # MLflow's limit on a model version's description
STEP_COLORS = ("tab:gray", "tab:purple", "tab:brown")  # apart from the per-epoch series' blue, orange, green, red
SETTINGS_SHOWN = ("epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "grad_accum", "num_workers", "seed")


def _pyplot():
    """pyplot on the Agg backend (no display on a head node or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    _pyplot().close(fig)  # figures stay alive in pyplot's registry until closed
    return path


# ---------------------------------------------------------------------------------------
# confusion matrix


def confusion_matrix_png(
    matrix: list[list[int]],
    path,
    labels=("negative", "positive"),
    title="Test set: confusion matrix",
) -> Path:
    """Rows = true label, columns = predicted label; each cell: count and share of its row.

    None counts as 0; a row with no rows at all shows "–" instead of a share.
    """
    plt = _pyplot()
    counts = np.array([[0 if v is None else int(v) for v in row] for row in matrix], dtype=np.int64)  # (true, predicted)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(labels):
        raise ValueError(f"confusion matrix must be {len(labels)}x{len(labels)} for labels {tuple(labels)}, got {matrix!r}")
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_totals, out=np.zeros(counts.shape, dtype=float), where=row_totals > 0)

    fig, ax = plt.subplots(figsize=(5.0, 4.5))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)  # colour = row share, so classes of any size compare
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true label")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            share = f"{100 * shares[i, j]:.1f}%" if row_totals[i, 0] else "–"
            ax.text(j, i, f"{counts[i, j]}\n({share})", ha="center", va="center",
                    color="white" if shares[i, j] > 0.6 else "black", fontsize=11)
    ax.set_xticks(range(len(labels)), labels=list(labels))
    ax.set_yticks(range(len(labels)), labels=list(labels))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------
# training curves


def _points(series) -> tuple[list[float], list[float]]:
    """(x, y) sorted by step, without missing or non-finite values."""
    kept = sorted((float(s), float(v)) for s, v in series or () if s is not None and v is not None and math.isfinite(float(v)))
    return [s for s, _ in kept], [v for _, v in kept]


def _is_per_step(key: str) -> bool:
    return "step" in key.rsplit("/", 1)[-1]  # "train/step_loss": one point per optimizer step


def _draw_panel(ax, history, keys, title, x_label, steps_per_epoch) -> list[float]:
    """Draw `keys` on `ax`; returns the x values drawn on its epoch axis.

    Per-step series use global steps: with `steps_per_epoch` they are rescaled onto the
    epoch axis, else they get their own "optimizer step" axis on top (a twin), so one
    epoch's 60 steps do not squash the per-epoch points against the left edge.
    """
    per_step = [k for k in keys if _is_per_step(k) and _points(history.get(k))[0]]
    per_epoch = [k for k in keys if not _is_per_step(k) and _points(history.get(k))[0]]
    epoch_x: list[float] = []
    step_ax = ax if steps_per_epoch or not per_epoch or not per_step else ax.twiny()
    for index, key in enumerate(per_step):
        x, y = _points(history[key])
        if steps_per_epoch:
            x = [s / steps_per_epoch for s in x]
            epoch_x += x
        # hundreds of noisy points: a thin line behind the per-epoch markers
        step_ax.plot(x, y, linewidth=0.8, alpha=0.7, color=STEP_COLORS[index % len(STEP_COLORS)],
                     marker="o" if len(x) == 1 else None, markersize=4, label=key, zorder=1)
    for key in per_epoch:
        x, y = _points(history[key])
        epoch_x += x
        if key.startswith("test/"):
            ax.plot(x, y, linestyle="none", marker="*", markersize=12, label=key, zorder=3)
        else:
            ax.plot(x, y, marker="o", linewidth=1.5, label=key, zorder=2)  # markers: one epoch is still visible
    ax.set_title(title, pad=22 if step_ax is not ax else None)
    if not per_step and not per_epoch:
        ax.text(0.5, 0.5, f"no {title[0].lower()}{title[1:]} logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
        return []
    ax.set_xlabel(x_label if per_epoch or steps_per_epoch else "optimizer step")
    if step_ax is not ax:
        step_ax.set_xlabel("optimizer step", fontsize=8)
        step_ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if step_ax is not ax:
        more_handles, more_names = step_ax.get_legend_handles_labels()
        handles, names = handles + more_handles, names + more_names
    # under the panel: a legend inside would hide the last epoch's points at the right edge
    ax.legend(handles, names, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    return epoch_x if per_epoch or steps_per_epoch else []


def _align_epoch_axes(axes_and_x) -> None:
    """One x range and whole-number ticks on every panel's epoch axis."""
    from matplotlib.ticker import MaxNLocator

    drawn = [(ax, xs) for ax, xs in axes_and_x if xs]
    if not drawn:
        return
    low = min(min(xs) for _, xs in drawn)
    high = max(max(xs) for _, xs in drawn)
    pad = 0.5 if high - low < 1 else 0.05 * (high - low)  # one epoch: centre the point instead of a 0.1-wide axis
    for ax, _ in drawn:
        ax.set_xlim(low - pad, high + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def training_curves_png(
    history: dict[str, list[tuple[int, float]]],
    path,
    x_label="epoch",
    *,
    steps_per_epoch: int | None = None,
) -> Path:
    """Loss (left) and accuracy/F1 (right) against epochs, from MLflow-style metric history.

    `history` maps metric keys ("train/loss", "val/accuracy", "train/step_loss" ...) to
    (step, value) points. Per-step series ("train/step_loss") use global steps; with
    `steps_per_epoch` they are drawn at step / steps_per_epoch so they share the epoch axis,
    without it they get a second x-axis ("optimizer step") on top of their panel.
    """
    plt = _pyplot()
    history = {key: series for key, series in (history or {}).items() if _points(series)[0]}
    if not history:
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        ax.text(0.5, 0.5, "no metrics logged", ha="center", va="center", transform=ax.transAxes, fontsize=14, color="grey")
        ax.set_axis_off()
        return _save(fig, path)

    loss_keys = sorted(k for k in history if k.endswith("loss") and not k.startswith("test/"))
    score_keys = sorted(k for k in history if k.endswith(("accuracy", "f1")))
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(11.0, 4.5))
    loss_x = _draw_panel(loss_ax, history, loss_keys, "Loss", x_label, steps_per_epoch)
    score_x = _draw_panel(score_ax, history, score_keys, "Accuracy and F1", x_label, steps_per_epoch)
    _align_epoch_axes([(loss_ax, loss_x), (score_ax, score_x)])
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------
# score histograms, ROC and precision-recall


def score_histograms(probabilities, labels, bins=100) -> tuple[list[int], list[int]]:
    """(counts of true-positive rows, counts of true-negative rows) over `bins` equal bins of [0, 1].

    Bin i holds scores in [i/bins, (i+1)/bins); 1.0 goes to the last bin. Histograms of
    disjoint parts of a split add up elementwise to the histogram of the whole split.
    """
    scores = np.asarray(probabilities, dtype=np.float64).ravel()
    truth = np.asarray(labels).ravel()
    if scores.shape != truth.shape:
        raise ValueError(f"{scores.size} probabilities but {truth.size} labels")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if scores.size and (not np.isfinite(scores).all() or scores.min() < 0.0 or scores.max() > 1.0):
        raise ValueError("probabilities must be finite and within [0, 1]")
    index = np.minimum((scores * bins).astype(np.int64), bins - 1)
    positive = truth == 1
    hist_pos = np.bincount(index[positive], minlength=bins)
    hist_neg = np.bincount(index[~positive], minlength=bins)
    return hist_pos.tolist(), hist_neg.tolist()


def curve_metrics(hist_pos, hist_neg) -> dict:
    """ROC AUC, average precision and the curves' points from two score histograms.

    A threshold sits at each bin edge: "positive" = every bin at or above it. Rows in one
    bin are ties: the ROC step across a bin is a straight line, which counts a tied
    (positive, negative) pair as half. Average precision is sum over thresholds of
    (recall gained) x precision, as in scikit-learn. Undefined metrics are NaN: both with
    no positive rows, AUC alone with no negative rows.

    Returns {"roc_auc", "average_precision", "positives", "negatives",
    "roc": {"fpr": [...], "tpr": [...]}, "pr": {"recall": [...], "precision": [...]}}.
    """
    pos = np.asarray(hist_pos, dtype=np.float64)
    neg = np.asarray(hist_neg, dtype=np.float64)
    if pos.shape != neg.shape or pos.ndim != 1:
        raise ValueError(f"histograms must be 1-D and equally long, got {pos.shape} and {neg.shape}")
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    # thresholds from the top bin down: true / false positives when the top k bins say "positive"
    tp = np.concatenate([[0.0], np.cumsum(pos[::-1])])
    fp = np.concatenate([[0.0], np.cumsum(neg[::-1])])

    tpr = tp / n_pos if n_pos else np.full_like(tp, np.nan)
    fpr = fp / n_neg if n_neg else np.full_like(fp, np.nan)
    roc_auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) if n_pos and n_neg else float("nan")

    predicted = tp + fp
    has_rows = (predicted > 0) & (np.concatenate([[True], (pos[::-1] + neg[::-1]) > 0]))  # skip empty bins: no new threshold
    recall = tpr[has_rows] if n_pos else np.array([])
    precision = (tp / np.where(predicted > 0, predicted, 1))[has_rows] if n_pos else np.array([])
    if n_pos:
        average_precision = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    else:
        average_precision = float("nan")  # no positives: recall is undefined

    if n_pos and n_neg:
        roc = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    else:
        roc = {"fpr": [], "tpr": []}
    return {
        "roc_auc": roc_auc,
        "average_precision": average_precision,
        "positives": int(n_pos),
        "negatives": int(n_neg),
        "roc": roc,
        "pr": {"recall": [0.0, *recall.tolist()] if n_pos else [],
               "precision": [1.0, *precision.tolist()] if n_pos else []},
    }


def roc_pr_png(hist_pos, hist_neg, path) -> dict:
    """ROC curve (with the chance diagonal) and precision-recall curve, side by side.

    Returns {"roc_auc": ..., "average_precision": ...} (NaN where undefined), ready for
    mlflow.log_metrics under a prefix of the caller's choice.
    """
    plt = _pyplot()
    result = curve_metrics(hist_pos, hist_neg)
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10.0, 4.5))

    roc_ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    if result["roc"]["fpr"]:
        roc_ax.plot(result["roc"]["fpr"], result["roc"]["tpr"], linewidth=2, label=f"ROC (AUC = {result['roc_auc']:.3f})")
    else:
        roc_ax.text(0.5, 0.3, "undefined: test rows of one class only", ha="center", transform=roc_ax.transAxes, color="grey")
    roc_ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate", title="ROC curve")
    roc_ax.legend(loc="lower right", fontsize=9)
    roc_ax.grid(alpha=0.3)

    if result["pr"]["recall"]:
        share = result["positives"] / max(result["positives"] + result["negatives"], 1)
        pr_ax.axhline(share, linestyle="--", color="grey", linewidth=1, label=f"chance ({share:.2f})")
        pr_ax.step(result["pr"]["recall"], result["pr"]["precision"], where="post", linewidth=2,
                   label=f"PR (AP = {result['average_precision']:.3f})")
        pr_ax.legend(loc="lower left", fontsize=9)
    else:
        pr_ax.text(0.5, 0.5, "undefined: no positive test rows", ha="center", transform=pr_ax.transAxes, color="grey")
    pr_ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title="Precision-recall curve")
    pr_ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return {"roc_auc": result["roc_auc"], "average_precision": result["average_precision"]}


# ---------------------------------------------------------------------------------------
# texts


def _metric(metrics: Mapping[str, Any], name: str) -> float | None:
    """metrics["test/<name>"], else metrics["<name>"]; None when absent or not a number."""
    for key in (f"test/{name}", name):
        value = metrics.get(key)
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
        return None if math.isnan(number) else number
    return None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _scores(metrics: Mapping[str, Any]) -> str:
    """'test accuracy 0.875, F1 0.870, ROC AUC 0.931, loss 0.312' with what is present."""
    parts = []
    for name, label in (("accuracy", "test accuracy"), ("f1", "F1"), ("roc_auc", "ROC AUC"),
                        ("average_precision", "average precision"), ("loss", "loss")):
        value = _metric(metrics, name)
        if value is not None:
            parts.append(f"{label} **{_fmt(value)}**" if name == "accuracy" else f"{label} {_fmt(value)}")
    return ", ".join(parts) if parts else "no test metrics"


def _rows_text(rows: Mapping[str, int] | None) -> str:
    if not rows:
        return ""
    return " / ".join(f"{int(count)} {split}" for split, count in rows.items()) + " reviews"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _is_sample(dataset: str) -> bool:
    return dataset.split("/")[0].split(":")[0] == "sample"


def run_description(
    *,
    model: str,
    dataset: str,
    dataset_uri: str,
    rows: dict[str, int],
    epochs_run: int,
    best_epoch: int,
    metrics: dict,
    stopped_early: bool,
    kind: str = "training run",
) -> str:
    """A few lines of Markdown for the run's description (tag mlflow.note.content)."""
    rows_text = _rows_text(rows)
    lines = [
        f"**{kind[:1].upper()}{kind[1:]}**: fine-tuned `{model}` on `{dataset}`"
        + (f" ({rows_text})" if rows_text else "")
        + f" for {_plural(epochs_run, 'epoch')}"
        + (" (stopped early: validation accuracy stopped improving)" if stopped_early else "")
        + f"; the model of epoch {best_epoch} scored {_scores(metrics)}.",
        "",
        f"Data: `{dataset_uri}`",
    ]
    return "\n".join(lines)


def _confusion_table(metrics: Mapping[str, Any]) -> str | None:
    cells = {name: metrics.get(f"test/{name}", metrics.get(name)) for name in ("tn", "fp", "fn", "tp")}
    if any(value is None for value in cells.values()):
        return None
    c = {name: int(value) for name, value in cells.items()}
    return "\n".join([
        "| true \\ predicted | negative | positive |",
        "|---|---:|---:|",
        f"| **negative** | {c['tn']} | {c['fp']} |",
        f"| **positive** | {c['fn']} | {c['tp']} |",
    ])


def _truncate_markdown(text: str, limit: int = MAX_DESCRIPTION_CHARS) -> str:
    """Cut at a line end under `limit`, close an open code fence, and say so."""
    if len(text) <= limit:
        return text
    suffix = "\n\n_(truncated)_"
    fence = "\n```"
    cut = text[: limit - len(suffix) - len(fence)]
    if "\n" in cut:
        cut = cut[: cut.rindex("\n")]
    if cut.count("```") % 2:
        cut += fence
    return cut + suffix


def model_card(
    *,
    name: str,
    version: str,
    run_id: str,
    model: str,
    dataset: str,
    dataset_uri: str,
    dataset_hash: str,
    metrics: dict,
    gate_promoted: bool | None,
    gate_reason: str,
    best_epoch: int,
    settings: dict,
    serve_hint: str,
    rows: dict[str, int] | None = None,
) -> str:
    """Markdown for a registered model version's description (at most 5000 characters).

    `rows` (split -> review count) is optional; without it the test rows from
    metrics["test/rows"] are shown.
    """
    max_length = settings.get("max_length")
    truncation = settings.get("truncation")
    cut = {"head": "keeps the first tokens", "head_tail": "keeps the head and the tail"}.get(str(truncation), str(truncation))
    model_lines = [
        f"Binary sentiment classifier (labels `0` = negative, `1` = positive) fine-tuned from `{model}` "
        f"in run `{run_id}`; the weights of epoch {best_epoch}.",
    ]
    if max_length is not None:
        model_lines.append(f"Input: up to {max_length} tokens per review; a longer review is cut ({cut})." if truncation
                           else f"Input: up to {max_length} tokens per review.")
    shown = [f"{key}={settings[key]}" for key in SETTINGS_SHOWN if key in settings]
    if shown:
        model_lines.append("Training: " + ", ".join(shown) + ".")

    if rows:
        rows_line = f"Rows: {_rows_text(rows)}."
    elif metrics.get("test/rows") is not None:
        rows_line = f"Rows: {int(metrics['test/rows'])} test reviews."
    else:
        rows_line = None
    data_lines = [f"Dataset `{dataset}` at `{dataset_uri}`, content hash `{dataset_hash}`."]
    if rows_line:
        data_lines.append(rows_line)

    evaluation = [f"On the test split: {_scores(metrics)}."]
    table = _confusion_table(metrics)
    if table:
        evaluation += ["", table]

    if gate_promoted is None:
        gate = f"Not gated. {gate_reason}".strip()
    elif gate_promoted:
        gate = f"Promoted to `@champion`: {gate_reason}"
    else:
        gate = f"Not promoted to `@champion`: {gate_reason}"

    limitations = [
        "- Trained on English movie reviews only; other domains and languages are untested.",
        "- Two labels: mixed or neutral reviews still get `negative` or `positive`.",
    ]
    if _is_sample(dataset):
        limitations.append("- Trained and tested on the synthetic `sample` corpus: these scores say nothing "
                           "about real reviews. Use it to check the pipeline, not to serve.")

    sections = [
        f"# {name} v{version}",
        "## Model", *(f"- {line}" for line in model_lines),
        "## Data", *(f"- {line}" for line in data_lines),
        "## Evaluation", *evaluation,
        "## Gate", gate,
        "## How to use", "Over HTTP:", "", "```bash", serve_hint.strip(), "```", "", "In Python:", "", "```python", "import mlflow",
        f'model = mlflow.pyfunc.load_model("models:/{name}/{version}")',
        'model.predict(["A moving story with wonderful acting."])', "```",
        "## Limitations", *limitations,
    ]
    text = "\n".join(line if not line.startswith("## ") else f"\n{line}\n" for line in sections)
    return _truncate_markdown(text.replace("\n\n\n", "\n\n"))
