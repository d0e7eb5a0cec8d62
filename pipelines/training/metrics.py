"""Classification metrics from confusion counts: pure Python, so evaluation imports no torch for them."""

from __future__ import annotations


def metrics_from_counts(counts: list[float]) -> dict:
    loss_sum, rows, tp, fp, fn, tn = counts
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "loss": loss_sum / rows if rows else float("nan"),
        "accuracy": (tp + tn) / rows if rows else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "rows": int(rows),
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "tn": int(tn),
    }
