"""The model registry's gate: who is `champion`, decided so that it fails closed.

The gate compares test accuracy, and only on the same test data: a champion that was
evaluated on another dataset version is not comparable, so `auto` keeps it and says why
(use --promote always to override). The decision and both figures are written as tags on
the new version, so the registry explains itself.

It fails closed: when the registry cannot be read or written (a 503, a timeout, a refused
connection), nothing is promoted. The version stays registered, tagged
`gate.decision=error` with the reason where the registry still takes a tag, and the command
ends with one line and exit 1; `python -m pipelines.promote` runs the gate again on that
version once the registry is back.

The alias moves last: the version's figures, gate tags and model card are written first
(`before_promotion`). Right before the move the champion is read again, and the decision
taken again if it changed; right after, the alias is read back, and if another registration
moved it in between, the two are compared and the better one is left as champion. And a
registration that finds itself champion after its move looks for a rival that compared with the
same champion and beats it (`better_rival`, from the records each writes before its move): a
move that lands after the other's read-back would otherwise leave the worse one champion.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.core.errors import PlatformError

log = logging.getLogger(__name__)

CHAMPION = "champion"
ACCURACY_TAG = "test_accuracy"
DATASET_TAG = "dataset_content_hash"
DECISION_TAG = "gate.decision"  # pending -> promoted | kept_champion | error
CHAMPION_VERSION_TAG = "gate.champion_version"  # the champion a version's gate compared with
SUPERSEDED_TAG = "gate.superseded_by"  # on a version that held @champion until a concurrent, better one took it
PENDING, PROMOTED, KEPT, ERROR = "pending", "promoted", "kept_champion", "error"
MOVE_ATTEMPTS = 4  # alias moves before giving up on a registry that others keep moving
SETTLE_S = 1.0  # after a move, how long a concurrent registration's move may take to land


class GateError(PlatformError):
    """The gate could not check; the version stays registered and unpromoted."""


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate_accuracy: float
    champion_version: str | None
    champion_accuracy: float | None


def read_champion(client: MlflowClient, name: str):
    """The version behind @champion, or None when the model has none. Any other answer of the
    registry (an error, a timeout) raises: "cannot tell" is not "no champion"."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(CHAMPION)
    return None if version is None else client.get_model_version(name, str(version))


def decide(mode: str, candidate_accuracy: float, candidate_dataset: str, champion, candidate_version: str | None = None) -> GateDecision:
    """Pure decision: `champion` is a ModelVersion or None. A tie promotes a newer version only."""
    if champion is None:
        return GateDecision(mode != "never", "no champion yet" if mode != "never" else "--promote never", candidate_accuracy, None, None)
    champion_accuracy = float(champion.tags[ACCURACY_TAG]) if ACCURACY_TAG in champion.tags else None
    base = dict(candidate_accuracy=candidate_accuracy, champion_version=str(champion.version), champion_accuracy=champion_accuracy)
    if candidate_version is not None and str(champion.version) == str(candidate_version):  # a gate run again after a failure
        return GateDecision(True, f"v{champion.version} is @{CHAMPION} already", **base)
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
    candidate = round(candidate_accuracy, 6)  # as the champion's tag holds it
    newer = candidate_version is None or int(candidate_version) > int(champion.version)
    if candidate > champion_accuracy or (candidate == champion_accuracy and newer):
        return GateDecision(True, f"test accuracy {candidate_accuracy:.4f} >= champion's {champion_accuracy:.4f}", **base)
    return GateDecision(False, f"test accuracy {candidate_accuracy:.4f} does not beat champion v{champion.version}'s {champion_accuracy:.4f}", **base)


def gate_tags(decision: GateDecision, state: str) -> dict[str, str]:
    return {
        DECISION_TAG: state,
        "gate.reason": decision.reason,
        "gate.candidate_accuracy": f"{decision.candidate_accuracy:.6f}",
        CHAMPION_VERSION_TAG: decision.champion_version or "none",
        "gate.champion_accuracy": "none" if decision.champion_accuracy is None else f"{decision.champion_accuracy:.6f}",
    }


def _set_tags(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def apply_gate(client: MlflowClient, name: str, version: str, mode: str, test_accuracy: float, dataset_hash: str,
               before_promotion: Callable[[GateDecision], None] | None = None) -> GateDecision:
    """Tag the version with its figures, decide, record (`before_promotion`), then move the alias if it won.

    Raises GateError (one line) when the registry fails at any step; nothing is promoted then.
    """
    record = before_promotion or (lambda decision: None)
    try:
        _set_tags(client, name, version, {ACCURACY_TAG: f"{test_accuracy:.6f}", DATASET_TAG: dataset_hash})
        decision = decide(mode, test_accuracy, dataset_hash, read_champion(client, name), version)
        _set_tags(client, name, version, gate_tags(decision, PENDING if decision.promote else KEPT))
        record(decision)
        if decision.promote:
            decision = _promote(client, name, version, mode, test_accuracy, dataset_hash, decision, record)
        return decision
    except Exception as exc:  # MLflow, HTTP and network errors alike: fail closed
        reason = str(exc) if isinstance(exc, GateError) else one_line(exc)
        _tag_error(client, name, version, reason)
        raise GateError(f"the gate could not check models:/{name}/{version} ({reason}): not promoted; once the registry "
                        f"answers, run: python -m pipelines.promote --model-name {name} --version {version}") from exc


def _promote(client, name, version, mode, test_accuracy, dataset_hash, decision, record) -> GateDecision:
    """Move the alias to `version` if it still wins against the champion read right now, and check that it held.

    Two registrations that finish together both decide against the old champion; whichever
    reads the alias back and finds the other there compares the two again: the better stays
    (on a tie, the newer version). `--promote always` moves once and does not compare.
    """
    raced_against = decision.champion_version  # the champion every racing registration compared with
    for _ in range(MOVE_ATTEMPTS):
        champion = read_champion(client, name)
        holder = None if champion is None else str(champion.version)
        if holder == version:
            return _keep_or_hand_over(client, name, version, mode, test_accuracy, dataset_hash, decision, raced_against, record)
        displaced = None
        if holder != decision.champion_version:  # another registration moved it since we decided
            decision = decide(mode, test_accuracy, dataset_hash, champion, version)
            _set_tags(client, name, version, gate_tags(decision, PENDING if decision.promote else KEPT))
            record(decision)
            if not decision.promote:
                return decision
            displaced = holder
        client.set_registered_model_alias(name, CHAMPION, version)
        if displaced is not None:
            _set_tags(client, name, displaced, {SUPERSEDED_TAG: version})
        if mode == "always":
            _set_tags(client, name, version, {DECISION_TAG: PROMOTED})
            return decision
        # a registration that read the old champion just before this move may land its own
        # move just after: give it the time, then read the alias back (the loop's top)
        time.sleep(SETTLE_S)
    champion = read_champion(client, name)  # the last move's read-back: it may have held
    if champion is not None and str(champion.version) == version:
        return _keep_or_hand_over(client, name, version, mode, test_accuracy, dataset_hash, decision, raced_against, record)
    raise GateError(f"@{CHAMPION} of {name} kept moving under this registration ({MOVE_ATTEMPTS} tries)")


def better_rival(client: MlflowClient, name: str, version: str, mode: str, test_accuracy: float, dataset_hash: str,
                 raced_against: str | None):
    """A concurrent registration that beats `version`: it compared with the same champion, decided to
    promote (its record says pending or promoted) and wins by the gate's rule; None when there is none.

    Timing alone cannot settle a race: a registration that read the old champion may land its move
    after this one's read-back (seconds later on a loaded machine). Records can: each writes its own
    before it moves, so whichever moves last sees every rival that moved before it.
    """
    if mode != "auto":
        return None
    best = None
    for other in client.search_model_versions(f"name='{name}'"):
        tags = other.tags or {}
        if str(other.version) == version or tags.get(DECISION_TAG) not in (PENDING, PROMOTED):
            continue
        if tags.get(CHAMPION_VERSION_TAG) != (raced_against or "none") or ACCURACY_TAG not in tags:
            continue
        beats_this = not decide(mode, test_accuracy, dataset_hash, other, version).promote
        if beats_this and (best is None or decide(mode, float(tags[ACCURACY_TAG]), dataset_hash, best, str(other.version)).promote):
            best = other
    return best


def _keep_or_hand_over(client, name, version, mode, test_accuracy, dataset_hash, decision, raced_against, record) -> GateDecision:
    """This version holds @champion after its move: promoted, unless a concurrent, better one decided
    to promote too; then the alias goes to that one."""
    rival = better_rival(client, name, version, mode, test_accuracy, dataset_hash, raced_against)
    if rival is None:
        _set_tags(client, name, version, {DECISION_TAG: PROMOTED})
        return decision
    decision = decide(mode, test_accuracy, dataset_hash, rival, version)
    _set_tags(client, name, version, gate_tags(decision, KEPT))
    record(decision)
    client.set_registered_model_alias(name, CHAMPION, str(rival.version))
    _set_tags(client, name, version, {SUPERSEDED_TAG: str(rival.version)})
    log.info("models:/%s/%s: @%s handed to v%s, a concurrent registration that beats it", name, version, CHAMPION, rival.version)
    return decision


def _tag_error(client: MlflowClient, name: str, version: str, reason: str) -> None:
    """Where the registry still takes a tag: say on the version why it was not gated."""
    try:
        _set_tags(client, name, version, {DECISION_TAG: ERROR, "gate.reason": reason[:500]})
    except Exception as exc:  # the registry is down: the command's one line says it
        log.warning("could not tag models:/%s/%s with the gate's error: %s", name, version, one_line(exc))


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
