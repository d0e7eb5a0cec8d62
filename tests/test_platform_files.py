"""platform/: the files operators run parse, agree with each other and with the code.

- every YAML and JSON file parses;
- the KubeRay manifests name one image and our Ray version, run commands and modules that
  exist, and the RayService runs the app of serve/config.yaml;
- the Dockerfile builds that image from our Ray version with constraints.txt;
- Prometheus scrapes Ray's service discovery file; the Grafana dashboard and the alerts use
  metric names that Ray and serve/metrics.py export;
- the runbook has a section per failure of the issue, and names real metrics and fields;
- no secrets anywhere.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import ray
import yaml
from test_cluster_config import find_secrets  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
KUBERAY = PLATFORM / "kuberay"
DOCKERFILE = PLATFORM / "docker" / "Dockerfile"
DASHBOARD = PLATFORM / "monitoring" / "grafana" / "imdb-platform.json"
RUNBOOK = PLATFORM / "RUNBOOK.md"
RUNBOOK_SECTIONS = [
    "Out of memory",
    "A GPU idle for lack of data",
    "A stalled training run",
    "A failing GPU",
    "A full disk",
    "Slow inference",
    "Unhealthy Serve replicas",
    "Slow convergence",
    "A lost node",
    "The MLflow server down",
    "A bad dataset",
]
MONITORING = PLATFORM / "monitoring"
# exported by processes other than Ray's nodes: NVIDIA's DCGM exporter on GPU nodes (the fields
# of dcgm-counters.csv) and, on Kubernetes, the kubelet's volume stats
KUBELET_METRICS = {"kubelet_volume_stats_available_bytes", "kubelet_volume_stats_capacity_bytes"}
METRIC_SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@lru_cache(maxsize=1)
def manifests() -> dict[str, dict]:
    """kind -> the KubeRay resource of that kind."""
    found = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in load_all(path):
            if doc.get("apiVersion", "").startswith("ray.io/"):
                found[doc["kind"]] = doc
    return found


def cluster_specs() -> dict[str, dict]:
    specs = manifests()
    return {
        "RayCluster": specs["RayCluster"]["spec"],
        "RayJob": specs["RayJob"]["spec"]["rayClusterSpec"],
        "RayService": specs["RayService"]["spec"]["rayClusterConfig"],
    }


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def dockerfile_workdir() -> str:
    return re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)


# --- every file parses; platform stays a folder ---------------------------------------------

def test_every_yaml_and_json_file_parses():
    files = sorted(p for p in PLATFORM.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert len(files) >= 8
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert load_all(path), f"{path} is empty"


def test_platform_is_a_folder_of_operator_files_not_a_package():
    assert not list(PLATFORM.rglob("__init__.py"))
    assert not (REPO / "platform.py").exists()


# --- KubeRay ------------------------------------------------------------------------------

def test_kuberay_manifests_name_one_image_and_our_ray_version():
    specs = cluster_specs()
    assert set(manifests()) == {"RayCluster", "RayJob", "RayService"}
    images = {c["image"] for spec in specs.values() for c in containers(spec)}
    assert len(images) == 1, f"one image for every container: {images}"
    for kind, spec in specs.items():
        assert spec["rayVersion"] == ray.__version__ == "2.60.0", kind
        assert spec["authOptions"]["mode"] == "token", f"{kind}: Ray token authentication"
        head = spec["headGroupSpec"]["rayStartParams"]
        assert head["num-cpus"] == "0" and head["dashboard-host"] == "0.0.0.0" and head["metrics-export-port"] == "8080", kind
    for path in KUBERAY.glob("*.yaml"):
        # a quoted string: unquoted, 2.60 would be a float somewhere down the line
        assert "rayVersion: '2.60.0'" in path.read_text(), path.name
    # the image is the one the Dockerfile documents building
    (image,) = images
    assert f"-t {image} " in DOCKERFILE.read_text()


def test_raycluster_autoscales_gpu_workers_from_zero_and_runs_mlflow_beside_the_head():
    spec = manifests()["RayCluster"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    head_containers = {c["name"]: c for c in spec["headGroupSpec"]["template"]["spec"]["containers"]}
    assert list(head_containers)[0] == "ray-head", "KubeRay takes the first container as Ray's"
    mlflow = head_containers["mlflow"]
    env = {e["name"]: e.get("value") for e in mlflow["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("sqlite:////") and env["MLFLOW_HOST"] == "0.0.0.0"
    assert mlflow["readinessProbe"]["httpGet"]["path"] == "/health"
    # the service in front of it is the URI that jobs and replicas use
    services = [d for d in load_all(KUBERAY / "raycluster.yaml") if d["kind"] == "Service"]
    (service,) = [s for s in services if s["metadata"]["name"] == "imdb-mlflow"]
    assert service["spec"]["selector"] == {"ray.io/cluster": "imdb-platform", "ray.io/node-type": "head"}
    port = service["spec"]["ports"][0]["port"]
    for kind, cluster_spec in cluster_specs().items():
        for container in containers(cluster_spec):
            uris = [e["value"] for e in container.get("env", []) if e["name"] == "MLFLOW_TRACKING_URI"]
            if container["name"] != "mlflow":
                assert uris == [f"http://imdb-mlflow:{port}"], f"{kind}/{container['name']}"
    assert "imdb-mlflow:*" in env["MLFLOW_ALLOWED_HOSTS"], "the server must accept its service name as Host"


def test_commands_in_the_manifests_exist_in_the_image():
    workdir = dockerfile_workdir()
    commands = [
        c.get("command", []) + c.get("args", [])
        for spec in cluster_specs().values()
        for c in containers(spec)
    ]
    scripts = [part for command in commands for part in command if part.startswith(workdir)]
    assert scripts, "the MLflow container runs the start script"
    for script in scripts:
        path = REPO / Path(script).relative_to(workdir)
        assert path.is_file() and os.access(path, os.X_OK), script


def test_rayjob_runs_train_imdb_with_flags_it_accepts():
    from pipelines.core import cli
    from pipelines.train_imdb import build_parser
    from pipelines.training.settings import TrainConfig

    spec = manifests()["RayJob"]["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.train_imdb"]
    assert (REPO / "pipelines" / "train_imdb.py").is_file()
    config = cli.from_namespace(TrainConfig, build_parser().parse_args(argv[3:]))
    gpu_workers = sum(g["replicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert config.use_gpu == "yes" and config.num_workers == gpu_workers, "one worker per GPU pod"
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayservice_serves_the_app_of_serve_config_yaml():
    from ray.serve.schema import ServeDeploySchema

    from serve.settings import ServingConfig, split_app_args

    serve_config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    service_config = yaml.safe_load(manifests()["RayService"]["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(service_config)

    def shape(config):
        return {
            app["name"]: (app["import_path"], app.get("route_prefix"), sorted(d["name"] for d in app.get("deployments", [])))
            for app in config["applications"]
        }

    assert shape(service_config) == shape(serve_config)
    for app in schema.applications:
        module, attribute = app.import_path.split(":")
        assert (REPO / module.replace(".", "/")).with_suffix(".py").is_file()
        source, _ = split_app_args(app.args)
        assert source.tracking_uri == "http://imdb-mlflow:5000", "replicas read the cluster's registry"
        for deployment in app.deployments:
            if deployment.name == "SentimentIngress":
                continue  # no user_config: it reads the model deployment's limits
            ServingConfig.from_user_config(deployment.user_config)
            assert deployment.max_ongoing_requests >= deployment.user_config["max_batch_size"]
        # the builder exists (read, not imported: importing Serve's app costs seconds)
        tree = ast.parse((REPO / module.replace(".", "/")).with_suffix(".py").read_text())
        assert attribute in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, app.import_path
    # the API key arrives as a file, never as a value in the manifest
    env = [e for c in containers(manifests()["RayService"]["spec"]["rayClusterConfig"]) for e in c.get("env", [])]
    assert not [e for e in env if e["name"] == "SERVE_API_KEY"]
    assert {e["value"] for e in env if e["name"] == "SERVE_API_KEY_FILE"} == {"/var/run/secrets/imdb-serve/api-key"}


# --- the image ----------------------------------------------------------------------------

def test_dockerfile_builds_on_our_ray_and_installs_with_constraints():
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-{python}(-gpu|-cu\d+)", base), base
    constraint = re.search(r"^ray==([\d.]+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert constraint == ray.__version__
    assert re.search(r"pip install -c constraints\.txt -e \.", text)
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M):
        for part in source.split():
            assert (REPO / part).exists(), f"COPY {part}: not in the repository"
    assert f"ray.__version__ == '{ray.__version__}'" in text, "the build checks the image's Ray"


# --- monitoring ---------------------------------------------------------------------------

@lru_cache(maxsize=1)
def exported_metric_names() -> frozenset[str]:
    """Names Ray's dashboards and source use for its metrics, plus serve/metrics.py's, as exported."""
    ray_dir = Path(ray.__file__).parent
    names = set()
    for panels in (ray_dir / "dashboard" / "modules" / "metrics" / "dashboards").glob("*.py"):
        names |= set(re.findall(r"\bray_[a-z0-9_]+", panels.read_text()))
    for library in ("serve", "data", "train"):
        for source in (ray_dir / library).rglob("*.py"):
            text = source.read_text(errors="replace")
            names |= {f"ray_{name}" for name in re.findall(rf"[\"']({library}_[a-z0-9_]+)[\"']", text)}
    # every node's reporter agent: ray_node_* (CPU, memory, disk, GPU), whether a dashboard plots it or not
    reporter = (ray_dir / "dashboard" / "modules" / "reporter" / "reporter_agent.py").read_text()
    names |= {f"ray_{name}" for name in re.findall(r"\"(node_[a-z0-9_]+)\": Gauge\(", reporter)}
    return frozenset(names | our_metric_names())


OUR_METRIC_FILES = ("serve/metrics.py", "pipelines/training/run_metrics.py", "pipelines/tracking/callbacks.py")


@lru_cache(maxsize=1)
def our_metric_names() -> frozenset[str]:
    text = "\n".join((REPO / path).read_text() for path in OUR_METRIC_FILES)
    names = set()
    for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"([a-z0-9_]+)\"", text):
        base = f"ray_{name}"
        names |= {"Counter": {f"{base}_total"}, "Gauge": {base}, "Histogram": {f"{base}_bucket", f"{base}_sum", f"{base}_count"}}[kind]
    assert names, f"{OUR_METRIC_FILES} define no metrics?"
    return frozenset(names)


def unknown_metrics(expressions: list[str]) -> set[str]:
    known = exported_metric_names()
    unknown = set()
    for token in {t for expr in expressions for t in re.findall(r"\bray_[a-z0-9_]+", expr)}:
        base = token
        for suffix in METRIC_SUFFIXES:
            base = base.removesuffix(suffix)
        if token not in known and base not in known and base.removesuffix("_total") not in known:
            unknown.add(token)
    return unknown


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_prometheus_scrapes_ray_service_discovery_and_loads_the_alerts():
    from ray._private import ray_constants

    config = yaml.safe_load((PLATFORM / "monitoring" / "prometheus.yml").read_text())
    ray_job = next(job for job in config["scrape_configs"] if job["job_name"] == "ray")
    files = [f for sd in ray_job["file_sd_configs"] for f in sd["files"]]
    assert files == [f"/tmp/ray/{ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    assert files == ["/tmp/ray/prom_metrics_service_discovery.json"]
    for rule_file in config["rule_files"]:
        assert (PLATFORM / "monitoring" / rule_file).is_file()


def test_grafana_dashboard_uses_metrics_that_are_exported():
    expressions = dashboard_expressions()
    assert unknown_metrics(expressions) == set()
    text = "\n".join(expressions)
    for family in ("ray_train_", "ray_data_", "ray_serve_", "ray_imdb_"):
        assert family in text, f"no {family}* panel"
    # ours: every metric serve/metrics.py and the training run's metrics define has a panel
    for name in our_metric_names():
        base = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        assert base in text or name in text, f"{name} has no panel"
    # goodput (the Ray Data iterator's blocked vs user time) and the model version per replica
    assert re.search(r"ray_data_iter_total_blocked_seconds.*ray_data_iter_user_seconds", text)
    assert "ray_imdb_model_version" in text


def test_unknown_metric_names_are_caught():
    assert unknown_metrics(["rate(ray_serve_num_http_requests_total[1m])", "ray_imdb_model_version"]) == set()
    assert unknown_metrics(["rate(ray_serve_num_http_requestz_total[1m])"]) == {"ray_serve_num_http_requestz_total"}
    assert unknown_metrics(["ray_imdb_goodput"]) == {"ray_imdb_goodput"}


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for rule in group["rules"]]


def dcgm_fields() -> set[str]:
    lines = (MONITORING / "dcgm-counters.csv").read_text().splitlines()
    return {line.split(",")[0].strip() for line in lines if line.strip() and not line.startswith("#")}


def test_alerts_use_exported_metrics_and_point_at_runbook_sections():
    rules = alert_rules()
    assert rules
    assert unknown_metrics([rule["expr"] for rule in rules]) == set()
    outside_ray = {t for rule in rules for t in re.findall(r"\b(DCGM_[A-Z0-9_]+|kubelet_[a-z_]+)", rule["expr"])}
    assert outside_ray - dcgm_fields() - KUBELET_METRICS == set(), "a DCGM field the exporter is not told to collect"
    anchors = {slug(section) for section in RUNBOOK_SECTIONS}
    for rule in rules:
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in anchors, f"{rule['alert']}: no runbook section #{anchor}"
        assert rule["alert"] in RUNBOOK.read_text(), f"{rule['alert']}: RUNBOOK.md does not name it"


def test_the_issues_failures_each_have_an_alert():
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    wanted = {
        "GpuIdleWhileTraining": "ray_node_gpus_utilization",
        "WorkersKilledForMemory": "ray_memory_manager_worker_eviction_total",
        "GpuMemoryNearFull": "DCGM_FI_DEV_FB_USED",
        "GpuTooHot": "DCGM_FI_DEV_GPU_TEMP",
        "GpuXidError": "DCGM_FI_DEV_XID_ERRORS",
        "GpuEccDoubleBitErrors": "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "TrainRunStalled": "ray_imdb_train_steps_total",
        "ServeReplicasUnhealthy": "ray_serve_deployment_replica_healthy",
        "HeadDiskFilling": "ray_node_disk_",
        "MlflowStoreVolumeFilling": "imdb-mlflow-store",
    }
    for alert, metric in wanted.items():
        assert metric in exprs.get(alert, ""), alert


def test_no_alert_or_panel_reads_a_gauge_that_ray_sets_once():
    """Ray 2.60 exports a gauge ~30 s after it was last set (pipelines/core/ray_metrics.py). These
    are set on transitions or once per report; panels may show their last value (last_over_time)."""
    set_once = ("ray_train_controller_state", "ray_train_worker_group_start_total_time_s",
                "ray_train_worker_group_shutdown_total_time_s", "ray_train_report_total_blocked_time_s",
                "ray_train_checkpoint_transfer_total_time_s", "ray_train_checkpoint_sync_total_time_s")
    for rule in alert_rules():
        assert not any(name in rule["expr"] for name in set_once), rule["alert"]
    for expr in dashboard_expressions():
        for name in set_once:
            assert name not in expr or f"last_over_time({name}" in expr, expr
    # ours: the one gauge is kept; the counters that alerts use start at 0
    serve_metrics = (REPO / "serve" / "metrics.py").read_text()
    assert re.search(r"KeptGauge\(\s*Gauge\(\"imdb_model_version\"", serve_metrics)
    assert "start_at_zero(self.registry_errors)" in serve_metrics
    assert "ray_data_spilled_bytes" not in "\n".join(dashboard_expressions()), "needs DataContext.enable_get_object_locations_for_metrics (off)"


# --- promtool: the config and the rules, and the rules' unit tests --------------------------

def promtool() -> str:
    import shutil

    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; `make test` installs it as root "
                    "with apt-get): the alerts' unit tests did not run")
    return path


def run_promtool(*args: str) -> str:
    proc = subprocess.run([promtool(), *args], check=False, capture_output=True, text=True, timeout=60, cwd=MONITORING)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output


@pytest.mark.timeout(60)
def test_promtool_checks_the_config_and_the_rules():
    output = run_promtool("check", "config", "prometheus.yml")
    assert "is valid prometheus config file" in output and f"{len(alert_rules())} rules found" in output, output
    assert f"SUCCESS: {len(alert_rules())} rules found" in run_promtool("check", "rules", "alerts.yml")


@pytest.mark.timeout(60)
def test_promtool_unit_tests_of_every_alert_pass():
    assert "SUCCESS" in run_promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    suite = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())
    assert suite["rule_files"] == ["alerts.yml"]
    fires, quiet = set(), set()
    for case in suite["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - fires == set(), "alerts that no test sees firing"
    assert alerts - quiet == set(), "alerts that no test sees quiet"
    assert (fires | quiet) - alerts == set(), "tests of alerts that do not exist"


def test_prometheus_scrapes_dcgm_on_ray_nodes_and_kuberay_has_the_monitors():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    dcgm = next(job for job in config["scrape_configs"] if job["job_name"] == "dcgm")
    assert [f for sd in dcgm["file_sd_configs"] for f in sd["files"]] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    address, job = dcgm["relabel_configs"]
    assert re.sub(address["regex"], address["replacement"].replace("${1}", r"\1"), "10.0.0.7:8080") == "10.0.0.7:9400"
    # Ray's discovery file gives its targets job="ray": the job is named again (the rehearsal sees it on its targets)
    assert job == {"target_label": "job", "replacement": "dcgm"}
    monitors = {doc["kind"]: doc for doc in load_all(MONITORING / "kuberay-monitors.yaml")}
    assert monitors["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert monitors["ServiceMonitor"]["spec"]["selector"]["matchLabels"] == {"app": "nvidia-dcgm-exporter"}
    for spec in cluster_specs().values():
        for container in containers(spec):
            if container["name"] != "mlflow":
                assert {"containerPort": 8080, "name": "metrics"} in container["ports"], container["name"]
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_XID_ERRORS"} <= dcgm_fields()


def test_grafana_provisioning_points_at_prometheus():
    datasource = yaml.safe_load((PLATFORM / "monitoring" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    assert json.loads(DASHBOARD.read_text())["templating"]["list"][0]["type"] == "datasource"


# --- runbook ------------------------------------------------------------------------------

def slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    parts = re.split(r"^## (.+)$", RUNBOOK.read_text(), flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_runbook_has_a_section_per_failure_with_signals_and_fixes():
    sections = runbook_sections()
    for title in RUNBOOK_SECTIONS:
        assert title in sections, f"RUNBOOK.md has no section '## {title}'"
        body = sections[title]
        assert "**Signals**" in body and "**What to change**" in body, title
        assert "`" in body.split("**What to change**")[0], f"{title}: name the signal (metric, log line, field)"


def test_runbook_names_metrics_and_mlflow_fields_that_exist():
    text = RUNBOOK.read_text()
    metrics = re.findall(r"\bray_(?:serve|data|train|node|imdb)_[a-z0-9_]+", text)
    assert metrics and unknown_metrics(metrics) == set()
    code = "\n".join(p.read_text() for p in [*(REPO / "pipelines").rglob("*.py"), *(REPO / "serve").glob("*.py")])
    for field in set(re.findall(r"`((?:train|val|test)/[a-z_]+)`", text)):
        metric = field.split("/", 1)[1]
        assert f'"{field}"' in code or f'"{metric}"' in code, f"RUNBOOK names {field}, which nothing logs"
    for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", text)):
        if flag in {"--force", "--source", "--rows-per-shard", "--stop", "--daemon", "--num-samples", "--lr-min",
                    "--lr-max", "--batch-sizes", "--shm-size", "--verbose"}:
            continue  # prepare_imdb, the start script, tune, docker, every command's --verbose
        known = _train_fields() | _promote_fields() | _serve_fields() | _predict_fields()
        assert flag[2:].replace("-", "_") in known, f"RUNBOOK names {flag}, not a train_imdb, promote, predict or serve.app flag"


def _predict_fields() -> frozenset[str]:
    import dataclasses

    from pipelines.predict import PredictConfig

    return frozenset(f.name for f in dataclasses.fields(PredictConfig))


def _serve_fields() -> frozenset[str]:
    """serve.app's flags: its settings dataclasses' fields and the HTTP ones (host, port...)."""
    import dataclasses

    from serve.app import main  # noqa: F401 - the flags below are main's
    from serve.settings import ModelSource, ScalingSettings, ServingConfig

    fields = {f.name for cls in (ModelSource, ServingConfig, ScalingSettings) for f in dataclasses.fields(cls)}
    return frozenset(fields | {"host", "port", "route_prefix", "request_timeout_s", "app_name", "proxy_location", "http_proxy", "ray_address"})


def _promote_fields() -> frozenset[str]:
    import dataclasses

    from pipelines.promote import PromoteConfig

    return frozenset(f.name for f in dataclasses.fields(PromoteConfig))


@lru_cache(maxsize=1)
def _train_fields() -> frozenset[str]:
    import dataclasses

    from pipelines.training.settings import TrainConfig

    return frozenset(f.name for f in dataclasses.fields(TrainConfig))


# --- scripts and secrets ------------------------------------------------------------------

def test_scale_gpus_script_parses_its_arguments():
    script = PLATFORM / "cluster" / "scale_gpus.py"
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 0 and "request" in proc.stdout.lower(), proc.stderr
    bad = subprocess.run([sys.executable, str(script), "-1"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert bad.returncode == 2


def test_no_secrets_in_platform_files():
    leaks = {}
    for path in sorted(p for p in PLATFORM.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        found = find_secrets(path.read_text(errors="replace"))
        if found:
            leaks[str(path.relative_to(REPO))] = found
    assert leaks == {}
