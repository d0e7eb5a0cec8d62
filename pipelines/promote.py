"""`python -m pipelines.promote`: run the champion gate again on a version already registered.

Examples:
    python -m pipelines.promote --model-name imdb-sentiment --version 7        # the gate, as training runs it
    python -m pipelines.promote --model-name imdb-sentiment --version 7 --promote always

For a version whose gate could not check (the registry failed while it ran: the version is
tagged `gate.decision=error` and a training run ended with exit 1), once the registry answers
again. The candidate's figures are the version's own: its `test_accuracy` and
`dataset_content_hash` tags, else the test accuracy and dataset its training run logged.
Fails closed like the gate in training: an error reading or writing the registry promotes
nothing, prints one line and exits 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from pipelines.core import cli, console
from pipelines.core.cli import field
from pipelines.core.errors import ConfigError
from pipelines.core.storage import default_storage
from pipelines.tracking import registry, store_uri


@dataclass(frozen=True)
class PromoteConfig:
    """Run the champion gate on a registered version: promote it if it beats @champion on the same test data."""

    model_name: str = field("imdb-sentiment", "registered model name")
    version: str = field("", "the version to gate (required)")
    promote: str = field("auto", "auto: if at least as good as @champion on the same test data; always; never (only record the comparison)",
                         choices=("auto", "always", "never"))
    storage: str = field(default_storage(), "storage root (the local MLflow store without a tracking URI)")
    tracking_uri: str | None = field(None, "MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else the store under --storage)")

    def __post_init__(self) -> None:
        if not self.version.isdigit():
            raise ConfigError(f"--version must be a version number of {self.model_name}, not {self.version!r}")


def candidate_figures(client: MlflowClient, name: str, version: str) -> tuple[float, str]:
    """(test accuracy, dataset content hash) of a registered version, from its tags or its run."""
    model_version = client.get_model_version(name, version)
    tags = model_version.tags
    run = client.get_run(model_version.run_id) if model_version.run_id else None
    accuracy = tags.get(registry.ACCURACY_TAG) or (run and run.data.metrics.get("test/accuracy"))
    dataset = tags.get(registry.DATASET_TAG) or (run and run.data.tags.get(registry.DATASET_TAG))
    if accuracy is None or not dataset:
        raise ConfigError(f"models:/{name}/{version} has no test accuracy or dataset on record (neither as tags nor in its run): "
                          "the gate has nothing to compare it by")
    return float(accuracy), dataset


def run_promote(config: PromoteConfig) -> registry.GateDecision:
    tracking_uri, _ = store_uri.configure(config.storage, config.tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    console.enter("registration")
    try:
        accuracy, dataset = candidate_figures(client, config.model_name, config.version)
    except ConfigError:
        raise
    except Exception as exc:  # the registry did not answer: fail closed
        raise registry.GateError(f"models:/{config.model_name}/{config.version} cannot be read ({registry.one_line(exc)}): not promoted") from exc
    decision = registry.apply_gate(client, config.model_name, config.version, config.promote, accuracy, dataset)
    verdict = f"promoted to @{registry.CHAMPION}" if decision.promote else f"@{registry.CHAMPION} unchanged"
    console.stage("registration", f"models:/{config.model_name}/{config.version}: {verdict} ({decision.reason})")
    return decision


def build_parser():
    return cli.build_parser("python -m pipelines.promote", __doc__, PromoteConfig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = cli.from_namespace(PromoteConfig, args)
    with console.session("promote", console.log_dir_for(config.storage), verbose=args.verbose):
        run_promote(config)
    return 0


def cli_entry() -> None:
    cli.run_main(main)


if __name__ == "__main__":
    cli_entry()
