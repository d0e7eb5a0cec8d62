"""The whole cluster path, rehearsed on one machine: `ray up` on hosts that share nothing but S3 and MLflow.

    python tests/scenarios/cluster_rehearsal.py WORKDIR        (make rehearsal; as root)

The machines (tests/netns_hosts.py): a head and two workers, each a Linux network namespace
on a private bridge with its own IP, PID namespace, /tmp and HOME, each running sshd.
What a real cluster has around it, in this (root) namespace, listening on the bridge's address
only (tests/services.py): an S3-compatible object store (moto's server, bucket `platform`)
and PostgreSQL. The MLflow server runs on the head, as `ray up` starts it there
(platform/mlflow/start_mlflow_server.sh): runs and the registry in PostgreSQL, artifacts
proxied to s3://platform/mlflow-artifacts.

Then, as a user on a laptop (HOME and TMPDIR of its own under WORKDIR/launcher):
`ray up` of a copy of platform/cluster/onprem.yaml with the hosts' addresses, the SSH key, the
settings pointing at the services, and the software already there (platform/cluster/render.py:
the repository and its venv are on every host's filesystem, nothing is installed); the head
starts over SSH, the autoscaler on the head starts the workers over SSH. Prometheus runs on
the head with platform/monitoring/prometheus.yml (tests/prometheus_check.py). Then, through
`ray job submit`: prepare a small synthetic corpus to S3 -> train three epochs with two
workers spread over the two worker hosts (--placement spread); one of those hosts is killed
(every process of the machine, at once) after the first epoch's checkpoint; training resumes
from the checkpoint in S3 on the host left, the model is registered and promoted in the PostgreSQL-backed registry, and
Prometheus fires TrainRunRestarting -> a one-trial sweep, typed on the surviving worker
machine (over SSH, its driver there), registers its best trial without promoting it -> Serve
on the cluster loads the champion through the MLflow server (tried on the head with
`ray exec`), then follows the alias to the sweep's version ->
every metric an alert or a dashboard panel uses had series in Prometheus -> `ray down`
(after platform/cluster/stop_workers.py, which ray down does not do) and no Ray process is
left on any host.

Checked at the end: the dataset, checkpoints (the oldest pruned) and model files are objects
in the bucket, the run, version and alias are rows in PostgreSQL, and no file was written
outside the hosts' and servers' folders (the repository, $HOME and the system temp folder are
scanned for files newer than the start; in the test suite's lane (tests/lane.py), $HOME and
$TMPDIR are the lane's own, as the suite beside it writes in the shared ones).

Prints what it checked, one summary line, and one `SCENARIO_RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.dont_write_bytecode = True  # the repository must stay untouched (checked at the end)
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "platform" / "cluster"))
import _scenario  # noqa: E402  (the scenario folder is not a package)
import render  # noqa: E402  (platform/ is not a package: platform/cluster/render.py)

from pipelines.data.sample_corpus import write_sample_corpus  # noqa: E402
from tests.netns_hosts import NetnsHosts, missing_tools  # noqa: E402
from tests.prometheus_check import Prometheus, render_config, used_metrics  # noqa: E402
from tests.services import PostgresServer, S3Server  # noqa: E402

BUCKET = "platform"
STORAGE = f"s3://{BUCKET}/platform"
ARTIFACTS = f"s3://{BUCKET}/mlflow-artifacts"
MODEL_NAME = "imdb-sentiment"
RUN_NAME = "rehearsal"
HOST_NAMES = ("head", "worker-1", "worker-2")
# Three hosts share this machine's cores: each says how many it has, or Ray would count every
# core on every host. Each worker host holds two Train workers of 1.5 CPUs, the head none: with
# --placement spread the run starts with one on each worker host (training across machines), and
# once one host is killed, the restart puts both on the other. The head's one CPU runs the data
# pipeline's tasks and the Serve replicas.
HEAD_START_ARGS = "--num-cpus=1 --object-store-memory=200000000"
WORKER_START_ARGS = "--num-cpus=3 --object-store-memory=200000000"
TRAIN_CPUS_PER_WORKER = "1.5"
TRAIN_EPOCHS = 3  # a worker host dies after epoch 1 or 2: the restart then has an epoch left to train
# a training run here lasts about a minute: Prometheus's 15 s intervals would see the worker
# failure's counter late in it (the rules, the jobs and service discovery stay as shipped)
PROMETHEUS_INTERVAL = "5s"
PROMETHEUS_PORT = 9090
SERVE_PORT = 8000
COMMAND_TIMEOUT_S = 600
# the dataset training and the sweep read by name (--data reviews), prepared once to S3 as a user would.
DATASET = "reviews"
# A synthetic corpus smaller than `--source sample`'s (as tests/conftest.py's): training is
# capped at a few steps anyway, and each registration scores every backend on the whole test split
CORPUS_PER_LABEL = {"train_per_label": 300, "test_per_label": 100}
VENV = Path(sys.prefix)


def prepare_args(corpus: str) -> list[str]:
    return ["-m", "pipelines.prepare_imdb", "--source", corpus, "--name", DATASET, "--storage", STORAGE, "--no-progress"]


def log(message: str) -> None:
    print(f"[rehearsal] {message}", flush=True)


class Launcher:
    """The user's machine: the `ray` CLI against the rendered config, with a HOME and TMPDIR of its own."""

    def __init__(self, folder: Path, config_path: Path, head_ip: str, logs: Path):
        self.folder, self.config_path, self.head_ip, self.logs = folder, config_path, head_ip, logs
        self.home, self.tmp = folder / "home", folder / "tmp"
        for path in (self.home, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        self.token_path = self.home / ".ray" / "auth_token"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "PLATFORM_"))}
        env.update(HOME=str(self.home), TMPDIR=str(self.tmp), PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
                   RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", PYTHONDONTWRITEBYTECODE="1",
                   # Ray 2.60's v2 autoscaler counts the local provider's head as one of its worker
                   # machines and starts one worker fewer than worker_ips (seen here): v1 starts them all
                   RAY_UP_enable_autoscaler_v2="0")
        self.env = env
        self.dashboard = f"http://{head_ip}:8265"

    def ray(self, args: list[str], log_name: str | None, timeout_s: float = COMMAND_TIMEOUT_S, check: bool = True) -> str:
        """Run `ray ARGS`; its output (kept in logs/LOG_NAME unless None: a token is not written anywhere else).
        A failure raises RuntimeError, unless `check` is False."""
        started = time.monotonic()
        result = subprocess.run([str(VENV / "bin" / "ray"), *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                                timeout=timeout_s, stdin=subprocess.DEVNULL, check=False)
        output = result.stdout + result.stderr
        if log_name is not None:
            (self.logs / log_name).write_text(output)
        if check and result.returncode != 0:
            raise RuntimeError(f"`ray {' '.join(args)[:300]}` exited {result.returncode} after {time.monotonic() - started:.0f} s:\n{output[-5000:]}")
        return output

    def submit(self, args: list[str], log_name: str, wait: bool = True) -> str:
        """`ray job submit`: the command runs on the head, in the environment Ray started with there."""
        submission_id = f"{log_name}-{int(time.time())}"
        return self.ray(["job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
                         *([] if wait else ["--no-wait"]), "--", "python", *args], f"{log_name}.log")

    def exec(self, command: str, log_name: str, timeout_s: float = COMMAND_TIMEOUT_S, check: bool = True) -> str:
        return self.ray(["exec", str(self.config_path), command], f"{log_name}.log", timeout_s, check)


def render_cluster_config(path: Path, hosts: NetnsHosts, settings: dict[str, str]) -> dict:
    """platform/cluster/onprem.yaml for these hosts: their addresses and key, the services, the software in place."""
    config = yaml.safe_load((REPO / "platform" / "cluster" / "onprem.yaml").read_text())
    config["cluster_name"] = f"rehearsal-{os.getpid()}"
    config["provider"].update(head_ip=hosts["head"].ip, worker_ips=[hosts[n].ip for n in HOST_NAMES[1:]])
    config["auth"] = {"ssh_user": hosts.ssh_user, "ssh_private_key": str(hosts.ssh_key)}
    config = render.without_install(config, {"~/imdb-platform": str(REPO), "~/venv": str(VENV)})
    config = render.with_settings(config, settings)
    config = render.with_start_args(config, head=HEAD_START_ARGS, worker=WORKER_START_ARGS)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def host_path(hosts: NetnsHosts, host: str, path: str) -> Path:
    """Where a path of a host's own (its /tmp or HOME) is seen from this machine."""
    for mount, folder in (("/tmp", hosts[host].tmp), ("/root", hosts[host].home)):
        if path == mount or path.startswith(mount + "/"):
            return folder / path[len(mount) + 1 :]
    return Path(path)


def checkpoint_times(output: str, hosts: NetnsHosts, host: str) -> dict[str, float]:
    """Epoch -> seconds rank 0 spent storing its checkpoint (into S3), from "[train] epoch N: checkpoint stored in X s".

    The workers' lines are in the command's log file on the host that ran it, whose path is the output's `log:` line.
    """
    log_file = next((line.split()[1] for line in output.splitlines() if line.startswith("log: ")), None)
    local = host_path(hosts, host, log_file) if log_file else None
    full_log = local.read_text(errors="replace") if local and local.exists() else output
    times = {}
    for line in full_log.splitlines():
        if "checkpoint stored in" in line and "[train] epoch " in line:
            epoch = line.split("[train] epoch ")[1].split(":")[0]
            times[epoch] = float(line.split("stored in ")[1].split(" s")[0])
    return times


def node_ips(gcs_address: str) -> dict[str, str]:
    """Ray node id -> IP of every alive node."""
    from ray.util.state import list_nodes

    return {n.node_id: n.node_ip for n in list_nodes(address=gcs_address, limit=100, raise_on_missing_output=False) if n.state == "ALIVE"}


def train_worker_nodes(gcs_address: str) -> list[dict]:
    from ray.util.state import list_actors

    actors = list_actors(address=gcs_address, filters=[("class_name", "=", "RayTrainWorker")], limit=1000, raise_on_missing_output=False)
    return [{"node_id": a.node_id, "state": a.state} for a in actors]


class NodeKiller(threading.Thread):
    """Once epoch 1 is reported (its checkpoint is in S3), kill a worker host that runs Train workers."""

    def __init__(self, hosts: NetnsHosts, gcs_address: str, tracking_uri: str, timeout_s: float = 600):
        super().__init__(daemon=True, name="node-killer")
        self.hosts, self.gcs_address, self.tracking_uri, self.timeout_s = hosts, gcs_address, tracking_uri, timeout_s
        self.killed: str | None = None
        self.killed_at: float | None = None
        self.train_hosts: dict[str, int] = {}  # host name -> Train workers on it, before the kill
        self.processes_killed = 0
        self.epochs_seen = 0  # the newest epoch MLflow showed just before the kill
        self.error: str | None = None

    def _epoch_reported(self) -> bool:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name("imdb-sentiment")
        if experiment is None:
            return False
        runs = client.search_runs([experiment.experiment_id], f"tags.ray_run_name = '{RUN_NAME}'")
        # MlflowEpochLogger logs an epoch after Ray Train registered its checkpoint
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] if runs else []
        self.epochs_seen = max(steps, default=0)
        return self.epochs_seen >= 1

    def run(self) -> None:
        try:
            _scenario.wait_for(self._epoch_reported, self.timeout_s, 1.0, "epoch 1's report in MLflow")
            ips = node_ips(self.gcs_address)
            busy = [ips.get(w["node_id"]) for w in train_worker_nodes(self.gcs_address) if w["state"] == "ALIVE"]
            self.train_hosts = {name: busy.count(self.hosts[name].ip) for name in HOST_NAMES if self.hosts[name].ip in busy}
            victims = [name for name in HOST_NAMES[1:] if self.hosts[name].ip in busy]
            if not victims:
                raise RuntimeError(f"no worker host runs a Train worker: {busy}")
            self.killed = victims[0]
            self.processes_killed = self.hosts[self.killed].kill()
            self.killed_at = time.monotonic()
            log(f"killed host {self.killed} ({self.processes_killed} processes, SIGKILL) after epoch 1's checkpoint")
        except Exception:  # noqa: BLE001 - reported in the result
            self.error = traceback.format_exc()


class AlertWatcher(threading.Thread):
    """From the kill on, asks Prometheus every 2 s whether TrainRunRestarting fires; notes when it first does."""

    def __init__(self, prometheus: Prometheus, killer: NodeKiller, alert: str = "TrainRunRestarting", timeout_s: float = 600):
        super().__init__(daemon=True, name="alert-watcher")
        self.prometheus, self.killer, self.alert, self.timeout_s = prometheus, killer, alert, timeout_s
        self.fired_after_s: float | None = None
        self.labels: dict | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.stopped.is_set() and time.monotonic() < deadline:
            if self.killer.killed_at is not None:
                try:
                    firing = self.prometheus.firing(self.alert)
                except OSError:
                    firing = []
                if firing:
                    self.fired_after_s = round(time.monotonic() - self.killer.killed_at, 1)
                    self.labels = firing[0]["labels"]
                    return
            self.stopped.wait(2)


def sweep_args(model: str) -> list[str]:
    return ["-m", "tune.tune_imdb", "--data", DATASET, "--storage", STORAGE, "--sweep-name", "rehearsal-sweep", "--model", model,
            "--num-samples", "1", "--epochs", "1", "--max-steps-per-epoch", "2", "--max-length", "64", "--batch-sizes", "8",
            "--scheduler", "fifo", "--num-workers", "1", "--cpus-per-worker", "1", "--use-gpu", "no", "--promote", "never", "--no-onnx-variants"]


def train_args(epochs: int, model: str) -> list[str]:
    """Two workers spread over the worker hosts (a worker host holds both); a few steps per epoch keep it short."""
    return ["-m", "pipelines.train_imdb", "--data", DATASET, "--storage", STORAGE, "--run-name", RUN_NAME, "--model", model,
            "--num-workers", "2", "--cpus-per-worker", TRAIN_CPUS_PER_WORKER, "--placement", "spread", "--use-gpu", "no", "--epochs", str(epochs),
            "--max-steps-per-epoch", "4", "--max-length", "64", "--batch-size", "8", "--eval-batch-size", "64",
            "--max-failures", "2", "--promote", "auto"]


def files_written_since(start: float, roots: list[Path], allowed: list[Path]) -> list[str]:
    """Files under `roots` modified after `start`, outside `allowed` folders."""
    found = []
    allowed_text = [str(a) + os.sep for a in allowed]
    for root in roots:
        if not root.exists():
            continue
        for folder, dirnames, filenames in os.walk(root):
            if any((folder + os.sep).startswith(a) for a in allowed_text):
                dirnames[:] = []
                continue
            # the test suite's, not a cluster's: beside it (tests/lane.py) its processes compile
            # the repository's modules and Hypothesis keeps its examples while this runs
            dirnames[:] = [d for d in dirnames if d not in (".git", "__pycache__", ".hypothesis")]
            for name in filenames:
                path = os.path.join(folder, name)
                # a link into an allowed folder belongs to it: another Ray on this machine (the test
                # suite's own) re-points /tmp/ray/prom_metrics_service_discovery.json into its session
                if os.path.islink(path) and any(os.path.realpath(path).startswith(a) for a in allowed_text):
                    continue
                try:
                    if os.lstat(path).st_mtime > start:
                        found.append(path)
                except OSError:
                    continue
    return sorted(found)


def system_tmp_roots(system_tmp: Path, start: float) -> list[Path]:
    """What of the shared temp folder to scan: Ray's default folder, and new entries that look like ours.

    Not all of it: other programs on the machine (a CI runner, a shell) write there too.
    Our processes would leave Python temp folders (tmp*), checkpoints (ckpt-*), logs
    (train-log-*), an MLflow store (mlruns) or a Ray session (ray/).
    """
    patterns = ("tmp*", "ckpt-*", "train-log-*", "mlruns", "ray", "*.parquet", "*.safetensors")
    roots = set()
    for pattern in patterns:
        for path in system_tmp.glob(pattern):
            try:
                if path.name == "ray" or path.stat().st_mtime > start:
                    roots.add(path)
            except OSError:
                continue
    return sorted(roots)


def ray_processes(hosts: NetnsHosts, name: str) -> list[str]:
    """Ray's processes on a host (raylet, GCS, dashboard, agents, workers, the monitor, `ray::*`)."""
    markers = ("/site-packages/ray/", "ray::", "ray-dashboard-", "raylet", "gcs_server", "default_worker.py")
    return [cmd[:160] for _, cmd in hosts.processes(name) if any(m in cmd for m in markers)]


def start_prometheus(hosts: NetnsHosts, logs: Path) -> tuple[subprocess.Popen, Prometheus]:
    """Prometheus on the head, where Ray writes its service discovery file (/tmp/ray/...): the shipped config, shorter intervals."""
    prometheus_bin = shutil.which("prometheus")
    folder = hosts["head"].home / "prometheus"  # /root/prometheus on the head
    render_config(folder, PROMETHEUS_INTERVAL, PROMETHEUS_INTERVAL)
    address = f"{hosts['head'].ip}:{PROMETHEUS_PORT}"
    command = ["nsenter", "-t", str(hosts["head"].init_pid()), "--mount", "--net", "--",
               prometheus_bin, "--config.file=/root/prometheus/prometheus.yml", "--storage.tsdb.path=/root/prometheus/data",
               f"--web.listen-address={address}", "--log.level=warn"]
    with open(logs / "prometheus.log", "wb") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    prometheus = Prometheus(f"http://{address}")
    _scenario.wait_for(lambda: prometheus.ready() or process.poll() is not None, 60, 0.5, "Prometheus to be ready")
    if process.poll() is not None:
        raise RuntimeError(f"prometheus exited {process.returncode}: {(logs / 'prometheus.log').read_text()[-2000:]}")
    return process, prometheus


def stop_process(process: subprocess.Popen | None, timeout_s: float = 20) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def client_answer(output: str) -> dict:
    """serve_client.py's JSON line, among `ray exec`'s own lines."""
    lines = [line for line in output.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": output[-2000:]}


def ssh_control_folders(cluster_name: str) -> list[Path]:
    """The launcher's SSH control sockets of this cluster: Ray keeps them in /tmp/ray_ssh_<user>/<cluster>, whatever TMPDIR says."""
    return list(Path("/tmp").glob(f"ray_ssh_*/{hashlib.sha256(cluster_name.encode()).hexdigest()[:10]}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args(argv)
    missing = missing_tools() + ([] if shutil.which("prometheus") else ["prometheus (Debian package prometheus)"]) \
        + ([] if shutil.which("nsenter") else ["nsenter (Debian package util-linux)"])
    if missing:
        print(f"error: the rehearsal needs {', '.join(missing)}: `make sshd promtool` installs them (as root)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("error: the rehearsal's machines are network namespaces with sshd: run it as root", file=sys.stderr)
        return 2
    root: Path = args.workdir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    start_time = time.time() - 1  # mtime resolution
    system_tmp = Path(tempfile.gettempdir())
    preexisting_ray = set(Path(system_tmp, "ray").glob("*")) if Path(system_tmp, "ray").exists() else set()
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    result: dict = {"checks": []}
    logs = root / "logs"
    logs.mkdir(exist_ok=True)

    def check(ok: bool, what: str) -> None:
        result["checks"].append({"what": what, "ok": bool(ok)})
        log(f"{'ok  ' if ok else 'FAIL'} {what}")

    def lap(name: str, since: float) -> None:
        timings[name] = round(time.monotonic() - since, 1)

    # SIGINT (Ctrl-C, the lane's stop) and SIGTERM: the `finally` below removes hosts and servers.
    # SIGINT explicitly too: a shell's background job starts with it ignored, and Python keeps that
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # the hosts see the repository, the venv and its Python (pyenv keeps it under /root) at their paths
    hosts = NetnsHosts(list(HOST_NAMES), shared_paths=[REPO, VENV, Path(sys.base_prefix).resolve()])
    s3 = postgres = prometheus_process = launcher = config = None
    cluster_up = False
    try:
        hosts.start()
        (root / "hosts").symlink_to(hosts.root, target_is_directory=True)
        bridge = hosts.gateway
        s3 = S3Server(root / "services" / "s3", host=bridge).start()
        s3.create_bucket(BUCKET)
        postgres = PostgresServer(root / "services", host=bridge, clients=str(hosts.subnet)).start()
        log(f"hosts {', '.join(f'{n} {hosts[n].ip}' for n in HOST_NAMES)} on bridge {hosts.bridge} ({bridge}); "
            f"S3 {s3.endpoint_url}, PostgreSQL {postgres.uri}")
        lap("hosts_and_services_s", t0)

        # what every node's settings file says (the shipped lines, other values); credentials are
        # the test server's, as each node of a real cluster has its own
        settings = {
            "PLATFORM_STORAGE": STORAGE,
            "MLFLOW_BACKEND_STORE_URI": postgres.uri,
            "MLFLOW_ARTIFACT_ROOT": ARTIFACTS,
            **s3.env(),
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "PYTHONDONTWRITEBYTECODE": "1",  # the repository is every host's: no __pycache__ in it
            # this checkout's code on every host, whichever checkout the venv was installed from
            "PYTHONPATH": str(REPO),
        }
        config_path = root / "onprem.yaml"
        config = render_cluster_config(config_path, hosts, settings)
        head_ip = hosts["head"].ip
        launcher = Launcher(root / "launcher", config_path, head_ip, logs)
        launcher.ray(["get-auth-token", "--generate"], None)  # it prints the token: not logged
        # this process's own Ray clients (the State API) use the launcher's token
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(launcher.token_path))
        gcs_address = f"{head_ip}:6379"
        tracking_uri = f"http://{head_ip}:5000"

        step = time.monotonic()
        with ThreadPoolExecutor(max_workers=1) as pool:
            cluster_up = True  # from here on, the `finally` runs `ray down`
            up = pool.submit(launcher.ray, ["up", str(config_path), "-y", "--no-config-cache"], "ray-up.log")
            # meanwhile, what a user has at hand before the cluster: the corpus on the head, and
            # the model every host reads at the same path, as from a machine image: the tests'
            # tiny BERT (the bundled MiniLM goes the same way, at minutes per registration on 2 cores)
            corpus = write_sample_corpus(hosts["head"].home / "corpus", seed=1, **CORPUS_PER_LABEL)
            corpus_on_head = "/root/" + str(corpus.relative_to(hosts["head"].home))
            model = _scenario.build_tiny_model(hosts.root / "image" / "tiny-bert")
            up.result()
        lap("ray_up_s", step)
        _scenario.wait_for(lambda: len(node_ips(gcs_address)) == 3, 180, 1.0, "the head and both workers in the cluster")
        lap("cluster_start_s", step)
        ips = set(node_ips(gcs_address).values())
        check(ips == {hosts[n].ip for n in HOST_NAMES},
              f"`ray up` of platform/cluster/onprem.yaml: head over SSH, both workers started by the autoscaler over SSH ({sorted(ips)})")
        check(bool(ray_processes(hosts, "head")) and not any(hosts["head"].ip in c for n in HOST_NAMES[1:] for c in ray_processes(hosts, n)),
              "each host runs its own Ray processes, in its own PID namespace")

        prometheus_process, prometheus = start_prometheus(hosts, logs)

        step = time.monotonic()
        out = launcher.submit(prepare_args(corpus_on_head), "prepare-1")
        lap("prepare_s", step)
        check("written" in out, "prepare_imdb (ray job submit) wrote the sample corpus to S3")
        keys = s3.list_keys(BUCKET, f"platform/datasets/{DATASET}/")
        manifests = [k for k in keys if k.endswith("/manifest.json")]
        check(len(manifests) == 1 and any(k.endswith(".parquet") for k in keys), f"shards and one manifest in the bucket ({len(keys)} objects)")

        killer = NodeKiller(hosts, gcs_address, tracking_uri)
        watcher = AlertWatcher(prometheus, killer)
        killer.start()
        watcher.start()
        step = time.monotonic()
        out = launcher.submit(train_args(epochs=TRAIN_EPOCHS, model=model), "train")
        lap("train_s", step)
        killer.join(timeout=10)
        check(killer.error is None and killer.killed is not None, f"a worker host was killed mid-run ({killer.killed}): {killer.error or 'ok'}")
        check(killer.train_hosts == {"worker-1": 1, "worker-2": 1},
              f"--placement spread: one Train worker on each worker host, none on the head, before the kill ({killer.train_hosts})")
        # The kill follows the first poll that sees an epoch; on a loaded machine that poll can be late, or
        # one more epoch can be registered between it and the kill: the run resumes from the newest checkpoint.
        resumed = sorted(set(re.findall(r"resuming from the checkpoint of epoch (\d+)", out)))
        newest = {killer.epochs_seen, killer.epochs_seen + 1} - {0}
        check(len(resumed) == 1 and int(resumed[0]) in newest and int(resumed[0]) < TRAIN_EPOCHS,
              f"the restarted workers resumed from the newest checkpoint in S3 (epoch {resumed}; MLflow showed epoch {killer.epochs_seen} at the kill)")
        result["checkpoint_store_s"] = checkpoint_times(out, hosts, "head")
        check("promoted to @champion" in out, "the model was registered and promoted to @champion")

        checkpoint_keys = s3.list_keys(BUCKET, f"platform/ray_results/{RUN_NAME}/")
        in_bucket = sorted({k.split("/")[3] for k in checkpoint_keys if k.split("/")[3].startswith("checkpoint_") and k.count("/") > 3})
        # Ray's own list of the run's checkpoints, and the bucket holds those alone: the killed workers'
        # upload of epoch 2, cut off before it was reported (Ray never registers it, so never prunes
        # it), was removed by the job once the run finished (pipelines/training/leftovers.py)
        snapshot = json.loads(s3.get_object(BUCKET, f"platform/ray_results/{RUN_NAME}/checkpoint_manager_snapshot.json"))
        kept = sorted(r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"])
        removed = re.findall(r"removed \d+ checkpoint folder\(s\) a lost worker left unreported: (.*)", out)
        check(len(kept) == 2 and in_bucket == kept
              and all(any(k.startswith(f"platform/ray_results/{RUN_NAME}/{c}/") and k.endswith("model.safetensors") for k in checkpoint_keys) for c in kept),
              f"checkpoints in the bucket: Ray's two newest, nothing else (num_to_keep=2: {kept}; the lost worker's cut-off "
              f"upload removed by the job: {removed or 'none this run'}; {len(checkpoint_keys)} objects under ray_results/{RUN_NAME}/)")
        artifact_keys = s3.list_keys(BUCKET, "mlflow-artifacts/")
        check(any(k.endswith("model.safetensors") for k in artifact_keys) and any(k.endswith("console.log") for k in artifact_keys),
              f"model files and the run's console.log in the bucket through the MLflow server on the head ({len(artifact_keys)} objects)")

        runs = postgres.query("SELECT run_uuid, status FROM runs WHERE name = %s", (RUN_NAME,))
        check(len(runs) == 1 and runs[0][1] == "FINISHED", f"the run is a row in PostgreSQL, FINISHED ({runs})")
        epochs = postgres.query("SELECT step FROM metrics WHERE run_uuid = %s AND key = 'train/loss' ORDER BY step", (runs[0][0],)) if runs else []
        check([e[0] for e in epochs] == list(range(1, TRAIN_EPOCHS + 1)), f"each epoch logged once in PostgreSQL, across the kill ({[e[0] for e in epochs]})")
        latest = dict(postgres.query("SELECT key, value FROM latest_metrics WHERE run_uuid = %s", (runs[0][0],))) if runs else {}
        test_rows = json.loads(s3.get_object(BUCKET, manifests[0]))["splits"]["test"]["rows"] if manifests else None
        ranks = [latest.get(f"train/rank{rank}/samples_per_s") for rank in (0, 1)]
        check(None not in ranks and abs(latest.get("train/samples_per_s", -1) - sum(ranks)) < 1e-6 * max(1.0, sum(ranks))
              and "train/rank1/loss" in latest and latest.get("test/rows") == test_rows,
              f"both workers' figures in MLflow: samples/s the sum over ranks ({latest.get('train/samples_per_s')} = {ranks}), "
              f"every test row evaluated once across them ({latest.get('test/rows')} of {test_rows})")
        alias = postgres.query("SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'champion'", (MODEL_NAME,))
        versions = postgres.query("SELECT version, run_id FROM model_versions WHERE name = %s", (MODEL_NAME,))
        check(len(versions) == 1 and {v[1] for v in versions} == {runs[0][0]} and bool(alias),
              f"the registered version and the @champion alias are rows in PostgreSQL ({versions}, champion {alias})")

        # a sweep on the same cluster, typed on the worker machine that is left (its driver runs
        # there): everything it needs is in the bucket and MLflow; trials are Train jobs, every
        # one an MLflow run in PostgreSQL
        survivor = next((n for n in HOST_NAMES[1:] if n != killer.killed), "worker-1")
        sweep = " ".join(shlex.quote(a) for a in ["python", *sweep_args(model)])
        step = time.monotonic()
        swept = subprocess.run(hosts.ssh_command(hosts[survivor], f"bash --login -c -i {shlex.quote(f'source ~/.bashrc; RAY_ADDRESS={gcs_address} {sweep}')}"),
                               capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
        (logs / "sweep.log").write_text(swept.stdout + swept.stderr)
        lap("sweep_s", step)
        check(swept.returncode == 0, f"the sweep typed on {survivor} (SSH) ran on the cluster (exit {swept.returncode})")
        sweep_runs = postgres.query(
            "SELECT r.status, EXISTS (SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = 'mlflow.parentRunId') "
            "FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id WHERE e.name = 'imdb-sentiment-sweeps'"
        )
        # one trial: ranking trials is tests/test_tune.py's; here, that a sweep runs on the cluster through S3 and PostgreSQL
        check(len(sweep_runs) == 2 and sum(child for _, child in sweep_runs) == 1 and all(status == "FINISHED" for status, _ in sweep_runs),
              f"the sweep: a parent run and its trial run, FINISHED, rows in PostgreSQL ({sweep_runs})")
        versions_after = postgres.query("SELECT version FROM model_versions WHERE name = %s", (MODEL_NAME,))
        alias_after = postgres.query("SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'champion'", (MODEL_NAME,))
        check(len(versions_after) == 2 and alias_after == alias and s3.list_keys(BUCKET, "platform/tune_results/rehearsal-sweep/"),
              "the sweep's best trial registered as version 2, @champion kept (--promote never), sweep state in the bucket")

        # Serve as a job on the cluster; tried on the head (`ray exec`), where it listens
        step = time.monotonic()
        launcher.submit(["-m", "serve.app", "--port", str(SERVE_PORT), "--proxy-location", "HeadOnly", "--min-replicas", "1",
                         "--max-replicas", "1", "--poll-interval-s", "2"], "serve", wait=False)
        client = f"python {REPO / 'tests' / 'scenarios' / 'serve_client.py'} http://127.0.0.1:{SERVE_PORT}"
        answer = client_answer(launcher.exec(client, "serve-client-1"))
        lap("serve_ready_s", step)
        served = {str(p.get("model_version")) for p in answer.get("answer", {}).get("predictions", [])}
        check(answer.get("status") == 200 and served == {str(alias[0][0])} and 400 <= answer.get("refused_status", 0) < 500,
              f"Serve on the cluster loaded the champion (version {served}) through the MLflow server, answered /v1/predict "
              f"and refused an empty request ({answer.get('refused_status')})")
        # a rollout: the alias moves to the sweep's version and the replica follows it (a hot swap)
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri).set_registered_model_alias(MODEL_NAME, "champion", "2")
        answer = client_answer(launcher.exec(f"{client} --wait-for-version 2 --timeout-s 60", "serve-client-2"))
        served = {str(p.get("model_version")) for p in answer.get("answer", {}).get("predictions", [])}
        check(served == {"2"}, f"the replica followed @champion to version 2 ({served})")

        # Prometheus: the restarting-run alert, then every metric an alert or a panel uses
        watcher.join(timeout=max(0.0, 60 - (time.monotonic() - (killer.killed_at or time.monotonic()))))
        watcher.stopped.set()
        result["alert_fired_after_kill_s"] = watcher.fired_after_s
        check(watcher.fired_after_s is not None,
              f"Prometheus fired TrainRunRestarting {watcher.fired_after_s} s after the kill ({(watcher.labels or {}).get('ray_train_run_name')})")
        # the DCGM job's targets (no exporter here: down) keep their job's name, not Ray's file's job="ray"
        dcgm_jobs = prometheus.target_jobs("dcgm")
        check(dcgm_jobs == {"dcgm"}, f"the dcgm scrape job's targets are labelled job=\"dcgm\" ({sorted(dcgm_jobs)})")
        must, cannot = used_metrics()
        targets = prometheus.targets_up("ray")
        missing_series: list[str] = []

        def all_have_series() -> bool:
            missing_series[:] = [m for m in sorted(must) if prometheus.series_count(m, start_time) == 0]
            return not missing_series

        try:
            _scenario.wait_for(all_have_series, 30, 3.0, "series of every metric the alerts and panels use")
        except TimeoutError:
            pass
        result["metrics_checked"] = sorted(must)
        result["metrics_not_on_this_cluster"] = cannot
        result["metrics_missing"] = missing_series
        check(not missing_series, f"{len(must) - len(missing_series)}/{len(must)} metrics that alerts and panels use had series "
              f"(targets up: {len(targets)}; missing: {missing_series}; {len(cannot)} exist only on GPU, Kubernetes or after a fault)")

        # down: the workers' Ray first (ray down does not reach them), then the head's
        step = time.monotonic()
        # the killed host does not answer: stop_workers.py says so (exit 1) and stops the other
        out = launcher.exec("python ~/imdb-platform/platform/cluster/stop_workers.py", "stop-workers", check=False)
        check(f"{hosts[survivor].ip}: stopped" in out, f"stop_workers.py stopped Ray on {survivor} over SSH from the head")
        launcher.ray(["down", str(config_path), "-y"], "ray-down.log")
        cluster_up = False
        lap("ray_down_s", step)
        left = {n: ray_processes(hosts, n) for n in HOST_NAMES if n != killer.killed}
        check(not any(left.values()), f"no Ray process left on any host after stop_workers.py and `ray down` ({ {n: len(v) for n, v in left.items()} })")
        result["left_after_down"] = left
    except BaseException as error:  # noqa: BLE001 - reported, then the cleanup below (KeyboardInterrupt too)
        result["error"] = traceback.format_exc()
        log(f"error:\n{result['error']}")
        if not isinstance(error, Exception):
            result["interrupted"] = True
    finally:
        if cluster_up and launcher is not None:
            try:
                launcher.ray(["down", str(launcher.config_path), "-y"], "ray-down-cleanup.log", timeout_s=60)
            except Exception as error:  # noqa: BLE001 - the hosts go below anyway
                log(f"ray down in the cleanup failed ({str(error).splitlines()[0]}); the hosts are removed anyway")
        stop_process(prometheus_process)
        hosts.stop(keep_folders=True)  # every process of every host (the MLflow server too), namespaces, bridge
        for server in (postgres, s3):
            if server is not None:
                server.stop()
        if config is not None:
            for folder in ssh_control_folders(config["cluster_name"]):
                shutil.rmtree(folder, ignore_errors=True)
                with contextlib.suppress(OSError):  # Ray's folder for this user, if no other cluster uses it
                    folder.parent.rmdir()

    # the hosts' folders, the servers' folders and the bucket: nothing else may have changed
    stray = files_written_since(
        start_time,
        roots=[REPO, Path.home(), *system_tmp_roots(system_tmp, start_time)],
        allowed=[root, hosts.root, *preexisting_ray],
    )
    check(not stray, f"nothing written outside the hosts' folders and the bucket ({len(stray)} stray files{': ' + ', '.join(stray[:5]) if stray else ''})")
    result["stray_files"] = stray[:50]
    timings["total_s"] = round(time.monotonic() - t0, 1)
    result["timings"] = timings
    failed = [c["what"] for c in result["checks"] if not c["ok"]]
    ok = not failed and "error" not in result
    result["ok"] = ok
    if ok:
        shutil.rmtree(hosts.root, ignore_errors=True)  # kept after a failure: the hosts' Ray logs are there
    log(f"{'PASSED' if ok else 'FAILED'}: {sum(c['ok'] for c in result['checks'])}/{len(result['checks'])} checks, "
        f"`ray up` on {len(HOST_NAMES)} SSH hosts, TrainRunRestarting fired {result.get('alert_fired_after_kill_s')} s after the kill, "
        f"{timings['total_s']:.0f} s" + (f"; failed: {failed}" if failed else ""))
    _scenario.emit(result)
    return 0 if ok else 1


if __name__ == "__main__":
    _scenario.setup_environment()
    sys.exit(main())
