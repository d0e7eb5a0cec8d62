"""Pictures and texts for MLflow runs and model versions: real files, real numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from pipelines.tracking.report_content import (
    MAX_DESCRIPTION_CHARS,
    confusion_matrix_png,
    curve_metrics,
    model_card,
    roc_pr_png,
    run_description,
    score_histograms,
    training_curves_png,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_width=200, min_height=200):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        width, height = image.size
        assert width >= min_width and height >= min_height, image.size
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 1.0  # something was drawn, not a blank canvas
    return width, height


# --- confusion matrix ------------------------------------------------------------------


def test_confusion_matrix_png(tmp_path):
    path = confusion_matrix_png([[430, 70], [55, 445]], tmp_path / "cm" / "confusion.png")
    assert path == tmp_path / "cm" / "confusion.png"
    assert_png(path)


def test_confusion_matrix_zeros_and_none(tmp_path):
    assert_png(confusion_matrix_png([[0, 0], [None, 12]], tmp_path / "zeros.png"))
    assert_png(confusion_matrix_png([[None, None], [None, None]], tmp_path / "empty.png"))


def test_confusion_matrix_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="2x2"):
        confusion_matrix_png([[1, 2, 3], [4, 5, 6]], tmp_path / "bad.png")


# --- training curves -------------------------------------------------------------------


def test_training_curves_several_epochs(tmp_path):
    history = {
        "train/loss": [(1, 0.61), (2, 0.40), (3, 0.31)],
        "val/loss": [(1, 0.52), (2, 0.41), (3, 0.39)],
        "val/accuracy": [(1, 0.78), (2, 0.84), (3, 0.86)],
        "val/f1": [(1, 0.77), (2, 0.83), (3, 0.86)],
        "train/step_loss": [(s, 0.7 - s / 300) for s in range(1, 181)],
        "test/accuracy": [(3, 0.85)],
        "test/loss": [(3, 0.38)],
        "train/samples_per_s": [(1, 40.0)],  # neither panel: ignored
    }
    width, height = assert_png(training_curves_png(history, tmp_path / "curves.png", steps_per_epoch=60))
    assert width > height  # two panels side by side


def test_training_curves_one_point_per_series(tmp_path):
    history = {
        "train/loss": [(1, 0.45)],
        "val/loss": [(1, 0.40)],
        "val/accuracy": [(1, 0.875)],
        "train/step_loss": [(62, 0.33)],
    }
    assert_png(training_curves_png(history, tmp_path / "one.png"))
    assert_png(training_curves_png(history, tmp_path / "one_scaled.png", steps_per_epoch=62))


def test_training_curves_missing_series_and_empty(tmp_path):
    assert_png(training_curves_png({"train/loss": [(1, 0.5), (2, 0.4)]}, tmp_path / "loss_only.png"))
    assert_png(training_curves_png({"val/accuracy": [], "val/loss": [(1, float("nan"))]}, tmp_path / "nan.png"))
    empty = assert_png(training_curves_png({}, tmp_path / "empty.png"))
    two_panels = assert_png(training_curves_png({"train/loss": [(1, 0.5)]}, tmp_path / "two.png"))
    assert empty[0] < two_panels[0]  # the empty history draws one "no metrics logged" panel


# --- histograms and curve metrics ------------------------------------------------------


def test_score_histograms_binning():
    hist_pos, hist_neg = score_histograms([0.0, 0.05, 0.29, 0.1, 0.95, 1.0, 0.5, 0.999], [1, 1, 1, 0, 1, 0, 0, 1], bins=10)
    assert hist_pos == [2, 0, 1, 0, 0, 0, 0, 0, 0, 2]  # 0.29 -> [0.2, 0.3): bins are floors, not rounding
    assert hist_neg == [0, 1, 0, 0, 0, 1, 0, 0, 0, 1]  # 1.0 lands in the last bin
    assert all(isinstance(v, int) for v in hist_pos + hist_neg)


def test_score_histograms_of_halves_add_up():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=1001)
    scores = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0.0, 1.0)
    whole = score_histograms(scores, labels)
    first = score_histograms(scores[:400], labels[:400])
    second = score_histograms(scores[400:], labels[400:])
    assert [a + b for a, b in zip(first[0], second[0])] == whole[0]
    assert [a + b for a, b in zip(first[1], second[1])] == whole[1]
    assert sum(whole[0]) == int(labels.sum()) and sum(whole[1]) == int((labels == 0).sum())
    assert len(whole[0]) == 100


def test_score_histograms_rejects_bad_input():
    with pytest.raises(ValueError):
        score_histograms([0.2, 0.3], [1])
    with pytest.raises(ValueError):
        score_histograms([0.2, 1.3], [1, 0])


def test_curve_metrics_perfect_separation():
    hist_pos, hist_neg = score_histograms([0.9, 0.8, 0.95], [1, 1, 1], bins=10)
    neg_pos, neg_neg = score_histograms([0.1, 0.2], [0, 0], bins=10)
    result = curve_metrics(hist_pos, [a + b for a, b in zip(hist_neg, neg_neg)])
    assert result["roc_auc"] == pytest.approx(1.0)
    assert result["average_precision"] == pytest.approx(1.0)
    assert result["positives"] == 3 and result["negatives"] == 2
    assert result["roc"]["fpr"][0] == 0.0 and result["roc"]["tpr"][-1] == 1.0


def test_curve_metrics_identical_distributions():
    counts = [5, 0, 3, 7, 1, 0, 0, 4, 2, 9]
    result = curve_metrics(counts, counts)
    assert result["roc_auc"] == pytest.approx(0.5)
    # reversed: every positive below every negative
    assert curve_metrics([3, 0, 0, 0], [0, 0, 0, 4])["roc_auc"] == pytest.approx(0.0)


def test_curve_metrics_hand_computed():
    # ranking 0.9 (pos), 0.6 (neg), 0.4 (pos), 0.1 (neg): 3 of 4 pairs ordered -> AUC 0.75;
    # precision at each positive: 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    hist_pos, hist_neg = score_histograms([0.9, 0.6, 0.4, 0.1], [1, 0, 1, 0], bins=10)
    result = curve_metrics(hist_pos, hist_neg)
    assert result["roc_auc"] == pytest.approx(0.75)
    assert result["average_precision"] == pytest.approx(5 / 6)
    assert result["pr"]["recall"] == pytest.approx([0.0, 0.5, 0.5, 1.0, 1.0])
    assert result["pr"]["precision"] == pytest.approx([1.0, 1.0, 0.5, 2 / 3, 0.5])


def test_curve_metrics_ties_within_a_bin_count_half():
    # one positive and two negatives in the same bin, one more negative below
    result = curve_metrics([0, 0, 1, 0], [1, 0, 2, 0])
    # pairs: (pos, tied neg) x2 -> 0.5 each, (pos, lower neg) -> 1: (0.5 + 0.5 + 1) / 3
    assert result["roc_auc"] == pytest.approx(2 / 3)
    assert result["average_precision"] == pytest.approx(1 / 3)  # all three tied rows at once


def test_curve_metrics_one_class_is_nan_not_error():
    only_negatives = curve_metrics([0, 0, 0], [2, 1, 0])
    assert math.isnan(only_negatives["roc_auc"]) and math.isnan(only_negatives["average_precision"])
    only_positives = curve_metrics([0, 4, 1], [0, 0, 0])
    assert math.isnan(only_positives["roc_auc"])
    assert only_positives["average_precision"] == pytest.approx(1.0)
    nothing = curve_metrics([0, 0], [0, 0])
    assert math.isnan(nothing["roc_auc"]) and math.isnan(nothing["average_precision"])


def test_roc_pr_png(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=500)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0.0, 1.0)
    hist_pos, hist_neg = score_histograms(scores, labels)
    numbers = roc_pr_png(hist_pos, hist_neg, tmp_path / "roc_pr.png")
    assert_png(tmp_path / "roc_pr.png")
    expected = curve_metrics(hist_pos, hist_neg)
    assert numbers == {"roc_auc": expected["roc_auc"], "average_precision": expected["average_precision"]}
    assert 0.85 < numbers["roc_auc"] < 0.99


def test_roc_pr_png_one_class(tmp_path):
    numbers = roc_pr_png([0] * 10, [1] * 10, tmp_path / "one_class.png")
    assert_png(tmp_path / "one_class.png")
    assert math.isnan(numbers["roc_auc"]) and math.isnan(numbers["average_precision"])


# --- texts -----------------------------------------------------------------------------

METRICS = {
    "test/accuracy": 0.875, "test/f1": 0.8712, "test/loss": 0.3141, "test/roc_auc": 0.9432,
    "test/rows": 1000, "test/tn": 440, "test/fp": 60, "test/fn": 65, "test/tp": 435,
}


def card(**overrides):
    arguments = dict(
        name="imdb-sentiment", version="7", run_id="0123abcd", model="all-MiniLM-L6-v2",
        dataset="imdb", dataset_uri="file:///data/datasets/imdb/v2", dataset_hash="sha256:feedbeef42",
        metrics=METRICS, gate_promoted=True, gate_reason="test accuracy 0.875 >= champion's 0.861",
        best_epoch=2, settings={"max_length": 256, "truncation": "head_tail", "lr": 5e-5, "epochs": 3},
        serve_hint="Serve it with `make serve MODEL=imdb-sentiment@champion`.",
    )
    arguments.update(overrides)
    return model_card(**arguments)


def test_run_description():
    text = run_description(
        model="all-MiniLM-L6-v2", dataset="sample/v3", dataset_uri="file:///data/datasets/sample/v3",
        rows={"train": 1971, "val": 219, "test": 1000}, epochs_run=1, best_epoch=1,
        metrics=METRICS, stopped_early=False,
    )
    assert "`all-MiniLM-L6-v2`" in text and "`sample/v3`" in text
    assert "1971 train / 219 val / 1000 test reviews" in text
    assert "for 1 epoch;" in text
    assert "0.875" in text and "F1 0.871" in text and "ROC AUC 0.943" in text
    assert "**" in text  # Markdown
    assert "stopped early" not in text
    assert "file:///data/datasets/sample/v3" in text


def test_run_description_early_stop_and_no_auc():
    text = run_description(
        model="m", dataset="imdb", dataset_uri="u", rows={"train": 10}, epochs_run=4, best_epoch=2,
        metrics={"test/accuracy": 0.5, "test/f1": 0.0}, stopped_early=True, kind="tuning trial",
    )
    assert text.startswith("**Tuning trial**")
    assert "for 4 epochs" in text and "stopped early" in text and "epoch 2" in text
    assert "AUC" not in text


def test_model_card_contents():
    text = card()
    assert "imdb-sentiment v7" in text
    assert "sha256:feedbeef42" in text and "file:///data/datasets/imdb/v2" in text
    assert "0.875" in text and "0.871" in text and "0.943" in text
    assert "test accuracy 0.875 >= champion's 0.861" in text and "Promoted to `@champion`" in text
    assert "make serve MODEL=imdb-sentiment@champion" in text
    assert 'mlflow.pyfunc.load_model("models:/imdb-sentiment/7")' in text
    assert "256 tokens" in text and "head and the tail" in text
    assert "| **negative** | 440 | 60 |" in text and "| **positive** | 65 | 435 |" in text
    for section in ("## Model", "## Data", "## Evaluation", "## Gate", "## How to use", "## Limitations"):
        assert section in text
    assert "English movie reviews" in text
    assert "synthetic" not in text
    assert len(text) < 2200


def test_model_card_sample_caveat_and_gate_outcomes():
    assert "synthetic `sample` corpus" in card(dataset="sample")
    assert "synthetic" not in card(dataset="imdb")
    refused = card(gate_promoted=False, gate_reason="0.80 < champion's 0.86")
    assert "Not promoted to `@champion`: 0.80 < champion's 0.86" in refused
    assert "Not gated" in card(gate_promoted=None, gate_reason="--promote never")


def test_model_card_without_auc_or_confusion():
    text = card(metrics={"test/accuracy": 0.9, "test/f1": 0.9, "test/loss": 0.2})
    assert "ROC AUC" not in text and "| **negative**" not in text
    assert "0.900" in text


def test_model_card_truncated_safely():
    text = card(serve_hint="x" * 3000 + "\n" + "y" * 3000)
    assert len(text) <= MAX_DESCRIPTION_CHARS
    assert text.endswith("_(truncated)_")
    assert text.count("```") % 2 == 0  # no code fence left open
    assert "imdb-sentiment v7" in text


def test_import_is_light():
    """The driver imports this module on every run: no matplotlib, Ray or MLflow until a picture is drawn."""
    import subprocess
    import sys

    code = "import sys, pipelines.tracking.report_content; print(sorted(m for m in ('matplotlib', 'ray', 'mlflow') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
