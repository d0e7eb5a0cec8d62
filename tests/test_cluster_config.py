"""cluster.yaml and platform/cluster/onprem.yaml: valid for the Ray we ship with, one nodes' part, and
what they run exists in this repository.

Offline, the same checks `ray up` makes before it calls the cloud: the JSON schema that the
ray package ships for cluster configs, then `prepare_config` + `validate_config`. Both files are
written by platform/cluster/render.py from a provider part and one shared nodes' part; the
cluster rehearsal (tests/scenarios/cluster_rehearsal.py) runs `ray up` on a copy of onprem.yaml.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
ONPREM_YAML = REPO / "platform" / "cluster" / "onprem.yaml"
CLUSTER_FILES = [CLUSTER_YAML, ONPREM_YAML]
sys.path.insert(0, str(REPO / "platform" / "cluster"))
import render  # noqa: E402  (platform/ is not a package)
REMOTE_REPO = "~/imdb-platform"  # where file_mounts puts the repository on every node

# key-looking strings that must never be in a config file
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key setting": re.compile(r"aws_secret_access_key\s*[:=]", re.I),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "credentials in a URI": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@"),
    "password setting": re.compile(r"\b(password|passwd|pgpassword)\b\s*[:=]\s*['\"]?[^\s'\"{$<]{4,}", re.I),
    "token setting": re.compile(r"(api[_-]?key|auth[_-]?token|secret)\s*[:=]\s*['\"]?[A-Za-z0-9_\-]{16,}", re.I),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9]{20,}\b"),
}


def find_secrets(text: str) -> list[str]:
    return [f"{kind}: {match.group(0)}" for kind, pattern in SECRET_PATTERNS.items() for match in pattern.finditer(text)]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    commands = [command for key in keys for command in config.get(key, [])]
    for node_type in config.get("available_node_types", {}).values():
        commands += node_type.get("worker_setup_commands", []) + node_type.get("initialization_commands", [])
    return commands


def exported(commands: list[str], name: str) -> list[str]:
    """Values given to `export NAME=...` in the commands (the settings file lines)."""
    return [m.group(1) for command in commands for m in re.finditer(rf"\b{name}=([^\s'\"]+)", command)]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_valid_against_the_schema_ray_ships(path):
    import jsonschema

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_passes_the_checks_ray_up_makes_before_it_calls_the_cloud(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    # the merged command lists a node actually runs
    assert prepared["head_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    if config["provider"]["type"] == "aws":
        assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_the_written_files_are_what_render_py_writes_from_the_parts():
    result = subprocess.run([sys.executable, str(REPO / "platform" / "cluster" / "render.py"), "--check"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr


def test_cloud_and_own_machines_share_everything_that_is_not_the_cloud():
    nodes = yaml.safe_load(render.NODES_PART.read_text())
    assert set(nodes) == set(render.SHARED_KEYS)
    for path in CLUSTER_FILES:
        config = yaml.safe_load(path.read_text())
        for key in render.SHARED_KEYS:
            assert config[key] == nodes[key], f"{path.name}: {key} differs from platform/cluster/parts/nodes.yaml"
    # ... and the provider parts hold nothing of the nodes' part
    for part in (render.PARTS / "aws.yaml", render.PARTS / "onprem.yaml"):
        assert not set(yaml.safe_load(part.read_text())) & set(render.SHARED_KEYS), part.name


def test_onprem_uses_rays_local_provider_over_ssh():
    config = yaml.safe_load(ONPREM_YAML.read_text())
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert config["auth"]["ssh_user"] and config["auth"]["ssh_private_key"]
    # the local provider has one node type of its own: `ray up` aborts on these
    assert not {"available_node_types", "head_node_type", "head_node", "worker_nodes"} & set(config)


def test_a_rendered_copy_changes_only_what_it_names():
    config = yaml.safe_load(ONPREM_YAML.read_text())
    copy_ = render.without_install(config, {"~/imdb-platform": "/src/repo", "~/venv": "/src/repo/.venv"})
    copy_ = render.with_settings(copy_, {"PLATFORM_STORAGE": "s3://b/p", "AWS_ENDPOINT_URL": "http://10.0.0.1:9000"})
    copy_ = render.with_start_args(copy_, head="--num-cpus=1", worker="--num-cpus=2")
    commands = all_commands(copy_)
    assert not [c for c in commands if "pip install" in c or "uv venv" in c], "nothing installed"
    assert all(c in config["setup_commands"] or c.startswith(("ln -sfn", "echo 'export")) for c in copy_["setup_commands"])
    assert "~/imdb-platform" not in copy_["file_mounts"] and copy_["file_mounts"]["~/.ray/auth_token"]
    assert exported(commands, "PLATFORM_STORAGE") == ["s3://b/p"] and exported(commands, "AWS_ENDPOINT_URL") == ["http://10.0.0.1:9000"]
    assert exported(commands, "MLFLOW_HOST") == ["0.0.0.0"]  # what it does not name stays
    starts = [c for c in copy_["head_start_ray_commands"] + copy_["worker_start_ray_commands"] if "ray start" in c]
    assert all(c.endswith(("--num-cpus=1", "--num-cpus=2")) for c in starts) and len(starts) == 2
    assert copy_["head_start_ray_commands"][-1] == config["head_start_ray_commands"][-1]  # the MLflow server as shipped


def test_a_cpu_head_that_never_trains_and_autoscaling_gpu_workers(config):
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must not take training, data or replicas"
    assert not re.match(r"^(g|p)\d", head["node_config"]["InstanceType"]), "the head is a CPU instance"
    workers = {name: node for name, node in nodes.items() if name != config["head_node_type"]}
    gpu_workers = {name: node for name, node in workers.items() if re.match(r"^(g|p)\d", node["node_config"]["InstanceType"])}
    assert gpu_workers, "a GPU worker type"
    for node in gpu_workers.values():
        assert node["min_workers"] == 0 and 1 <= node["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]


def test_every_node_type_names_its_machine_image(config):
    # Ray's default AMI is not ours to rely on (Ray 2.60 needs Python >= 3.10; drivers for the GPUs)
    for name, node in config["available_node_types"].items():
        assert re.fullmatch(r"ami-[0-9a-f]{8}([0-9a-f]{9})?", node["node_config"]["ImageId"]), name
    # no docker: the nodes install the project themselves (an image would be the Dockerfile's)
    assert not config.get("docker")


def test_setup_pins_our_ray_and_installs_this_project_with_constraints(config):
    commands = config["setup_commands"]
    extras_and_versions = [m.groups() for c in commands for m in re.finditer(r"ray\[([a-z,]+)\]==([\d.]+)", c)]
    assert extras_and_versions, "setup_commands must pin ray (the defaults install a nightly wheel)"
    constraint = re.search(r"^ray==([\d.]+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    for extras, version in extras_and_versions:
        assert version == ray.__version__ == constraint
        assert set(extras.split(",")) == {"default", "train", "tune", "serve", "data"}
    assert any(re.search(r"cd ~/imdb-platform && .*pip install .*-c constraints\.txt -e \.", c) for c in commands)
    # the repository reaches every node through file_mounts, from the directory of `ray up`
    assert config["file_mounts"][REMOTE_REPO] == "."
    assert ".venv" in config["rsync_exclude"]


def test_ports_dashboard_metrics_and_the_mlflow_server_on_the_head(config):
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head_start
    assert "--metrics-export-port=8080" in head_start
    assert "--metrics-export-port=8080" in " ".join(config["worker_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert re.search(r"platform/mlflow/start_mlflow_server\.sh --daemon", head_start)


def test_settings_storage_mlflow_store_and_tracking_uri(config):
    commands = all_commands(config)
    # SQLite on the head by default; PostgreSQL and S3 are a change of these lines
    assert exported(commands, "MLFLOW_BACKEND_STORE_URI") == ["sqlite:///$HOME/mlflow/mlflow.db"]
    assert len(exported(commands, "MLFLOW_ARTIFACT_ROOT")) == 1
    assert exported(commands, "MLFLOW_HOST") == ["0.0.0.0"]
    storage = exported(commands, "PLATFORM_STORAGE")
    assert len(storage) == 1 and storage[0].startswith("s3://"), "checkpoints need storage every node reaches"
    # jobs on the head and on workers find the server on the head
    head_uri = [c for c in config["head_setup_commands"] if "MLFLOW_TRACKING_URI" in c]
    assert len(head_uri) == 1 and re.search(r"MLFLOW_TRACKING_URI=http://\$\(hostname -I .*\):5000", head_uri[0])
    assert exported(config["worker_setup_commands"], "MLFLOW_TRACKING_URI") == ["http://$RAY_HEAD_IP:5000"]
    assert exported(commands, "RAY_AUTH_MODE") == ["token"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_what_it_runs_exists_in_this_repository(config):
    commands = all_commands(config)
    text = "\n".join(commands)
    scripts = set(re.findall(rf"{re.escape(REMOTE_REPO)}/([\w./-]+)", text))
    assert "platform/mlflow/start_mlflow_server.sh" in scripts
    for relative in scripts:
        path = REPO / relative
        assert path.is_file(), f"{relative} is referenced in cluster.yaml but not in the repository"
        if relative.endswith(".sh"):
            assert os.access(path, os.X_OK), f"{relative} must be executable"
    for module in re.findall(r"python3? -m ([\w.]+)", text):
        assert (REPO / module.replace(".", "/")).with_suffix(".py").is_file(), module
    for command in commands:
        # pip's -c/-r files are relative to the folder the command changed to (the repository)
        for referenced in re.findall(r"(?:-c|-r) (?:~/imdb-platform/)?([\w.-]+\.txt)", command):
            assert (REPO / referenced).is_file(), referenced


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_no_secrets_in_the_cluster_files(path):
    assert find_secrets(path.read_text()) == []


def test_the_secret_scan_catches_what_it_should():
    leaks = [
        "aws_access_key_id: AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = abc",
        "MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:hunter22@db:5432/mlflow",
        "password: hunter2hunter2",
        "SERVE_API_KEY=0123456789abcdef0123",
        "-----BEGIN RSA PRIVATE KEY-----",
        "hf_" + "a" * 34,
    ]
    for leak in leaks:
        assert find_secrets(leak), leak
    fine = ["postgresql://mlflow@CHANGE-ME-db-host:5432/mlflow", "password in ~/.pgpass, never here", "s3://bucket/x"]
    for text in fine:
        assert find_secrets(text) == [], text
