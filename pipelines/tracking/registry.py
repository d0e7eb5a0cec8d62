"""The model registry: new versions, and the gate that decides who is `champion`.

The gate compares test accuracy, and only on the same test data: a champion that
was evaluated on another dataset version is not comparable, so `auto` keeps it and
says why (use --promote always to override). The decision and both figures are
written as tags on the new version, so the registry explains itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHAMPION = "champion"
ACCURACY_TAG = "test_accuracy"
DATASET_TAG = "dataset_content_hash"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate_accuracy: float
    champion_version: str | None
    champion_accuracy: float | None


def current_champion(client: MlflowClient, name: str):
    """The version behind @champion, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide(mode: str, candidate_accuracy: float, candidate_dataset: str, champion) -> GateDecision:
    """Pure decision: `champion` is a ModelVersion or None."""
    if champion is None:
        return GateDecision(mode != "never", "no champion yet" if mode != "never" else "--promote never", candidate_accuracy, None, None)
    champion_accuracy = float(champion.tags[ACCURACY_TAG]) if ACCURACY_TAG in champion.tags else None
    base = dict(candidate_accuracy=candidate_accuracy, champion_version=champion.version, champion_accuracy=champion_accuracy)
    if mode == "always":
        return GateDecision(True, "--promote always", **base)
    if mode == "never":
        return GateDecision(False, "--promote never", **base)
    if champion_accuracy is None:
        return GateDecision(True, f"champion v{champion.version} has no recorded test accuracy", **base)
    if champion.tags.get(DATASET_TAG) != candidate_dataset:
        return GateDecision(
            False,
            f"champion v{champion.version} was tested on other data ({champion.tags.get(DATASET_TAG, '?')[:12]} vs "
            f"{candidate_dataset[:12]}): not comparable; use --promote always to replace it",
            **base,
        )
    if candidate_accuracy >= champion_accuracy:
        return GateDecision(True, f"test accuracy {candidate_accuracy:.4f} >= champion's {champion_accuracy:.4f}", **base)
    return GateDecision(False, f"test accuracy {candidate_accuracy:.4f} < champion's {champion_accuracy:.4f}", **base)


def apply_gate(client: MlflowClient, name: str, version: str, mode: str, test_accuracy: float, dataset_hash: str) -> GateDecision:
    """Tag the new version with its figures, decide, and move the alias if it wins."""
    client.set_model_version_tag(name, version, ACCURACY_TAG, f"{test_accuracy:.6f}")
    client.set_model_version_tag(name, version, DATASET_TAG, dataset_hash)
    decision = decide(mode, test_accuracy, dataset_hash, current_champion(client, name))
    tags = {
        "gate.decision": "promoted" if decision.promote else "kept_champion",
        "gate.reason": decision.reason,
        "gate.candidate_accuracy": f"{decision.candidate_accuracy:.6f}",
        "gate.champion_version": decision.champion_version or "none",
        "gate.champion_accuracy": "none" if decision.champion_accuracy is None else f"{decision.champion_accuracy:.6f}",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    return decision
