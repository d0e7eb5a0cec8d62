"""Real servers on 127.0.0.1 for tests and the whole-cluster rehearsal.

- `S3Server`: moto's standalone S3-compatible server (PyPI `moto[server]`);
- `PostgresServer`: a throwaway PostgreSQL cluster (Debian's `postgresql` package), trust
  authentication on 127.0.0.1 only, so no password exists anywhere;
- `MlflowServer`: `platform/mlflow/start_mlflow_server.sh` in the foreground, e.g. over the
  two above (PostgreSQL backend store, artifacts proxied to S3).

Each listens on 127.0.0.1 only (or on the private address `host=` names: the cluster
rehearsal's bridge to its hosts), on a free port, and keeps its files (data, logs) under the
`workdir` it is given. Every `start()` is bounded and raises RuntimeError with the end of the
server's log; every `stop()` is safe to call twice; each is a context manager.

Imported by pytest tests and by standalone scripts (repo root on sys.path): no pytest here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Mapping

from pipelines.core.ports import free_port

REPO = Path(__file__).resolve().parents[1]
START_MLFLOW_SCRIPT = REPO / "platform" / "mlflow" / "start_mlflow_server.sh"
HOST = "127.0.0.1"


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:] or "(empty log)"
    except OSError:
        return f"(no log at {path})"


def _http_ok(url: str, timeout_s: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except OSError:  # URLError, HTTPError, connection refused, timeouts
        return False


def _wait_until(ready: Callable[[], bool], process: subprocess.Popen, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before answering; end of {log}:\n{_log_tail(log)}")
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer within {timeout_s:.0f} s; end of {log}:\n{_log_tail(log)}")


def _spawn(command: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen:
    """In its own process group (stop() ends the server's children too), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            command, env=dict(env), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop_group(process: subprocess.Popen | None, timeout_s: float = 20) -> None:
    """SIGTERM the process group, SIGKILL what is left after `timeout_s`. Safe to call twice."""
    if process is None:
        return

    def signal_group(sig: int) -> None:
        # the group id stays reserved while the (unreaped) leader or any member exists
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    if process.returncode is None:
        signal_group(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            process.wait(timeout=10)
    signal_group(signal.SIGKILL)  # children that outlived their leader


class S3Server:
    """moto's S3-compatible server: `python -m moto.server -H 127.0.0.1 -p PORT`, in memory."""

    access_key = "testing"
    secret_key = "testing"
    region = "us-east-1"

    def __init__(self, workdir: Path, *, start_timeout_s: float = 60, host: str = HOST) -> None:
        self.workdir = Path(workdir)
        self.start_timeout_s = start_timeout_s
        self.host = host  # another private address than loopback: the rehearsal's bridge to its hosts
        self.log_path = self.workdir / "s3-server.log"
        self.port: int | None = None
        self._process: subprocess.Popen | None = None
        self._client = None

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the S3 server is not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> "S3Server":
        if self._process is not None and self._process.poll() is None:
            return self
        self.port = self.port or free_port()  # a restart keeps the endpoint (the data is gone: in memory)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        command = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        self._process = _spawn(command, env, self.log_path)
        try:
            _wait_until(lambda: _http_ok(self.endpoint_url + "/moto-api/"), self._process, self.start_timeout_s,
                        f"the S3 server (moto) at {self.endpoint_url}", self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        _stop_group(self._process)
        self._process = None
        self._client = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The standard AWS variables (pyarrow, boto3) and MLflow's, pointing at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        """A boto3 S3 client for this server (explicit settings: the caller's environment is not read)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name=self.region,
                config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}, connect_timeout=5, read_timeout=30),
            )
        return self._client

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        keys: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def get_object(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def delete_object(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)


def find_postgres_bin() -> Path | None:
    """The folder with initdb and pg_ctl: PATH first, then Debian's /usr/lib/postgresql/<version>/bin, newest first."""
    on_path = shutil.which("initdb")
    if on_path:
        for folder in (Path(on_path).resolve().parent, Path(on_path).parent):
            if (folder / "pg_ctl").exists():
                return folder

    def version(folder: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", folder.parent.name)) or (0,)

    found = [folder for folder in Path("/usr/lib/postgresql").glob("*/bin") if (folder / "initdb").exists() and (folder / "pg_ctl").exists()]
    return max(found, key=version) if found else None


def _service_user() -> tuple[str, int, int]:
    """The account PostgreSQL runs as when we are root: `postgres` (Debian's package makes it), else nobody."""
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return name, entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root, PostgreSQL needs a non-root account: there is no `postgres` or `nobody` user")


@functools.lru_cache(maxsize=None)
def _userns_prefix() -> tuple[str, ...] | None:
    """As root: a user namespace in which root is seen as `_service_user()` (PostgreSQL refuses uid 0).

    The server then reads and writes as root does, so its files stay root's, under any workdir
    (pytest's 0700 folders included), and no folder changes mode. None where user namespaces
    are not allowed (Docker's default seccomp profile, for one).
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    _, uid, gid = _service_user()
    prefix = (unshare, "--user", f"--map-user={uid}", f"--map-group={gid}", "--")
    try:
        probe = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if probe.returncode == 0 else None


# Root without user namespaces: modes of folders made traversable for `postgres`: path -> [mode, users].
_TRAVERSE_GRANTS: dict[Path, list[int]] = {}


def _grant_traverse(folder: Path) -> list[Path]:
    """Let other users pass through `folder` and its parents (x, not r: no listing); stop() puts the modes back.

    Only where `_userns_prefix()` is None. The server needs these paths for as long as it runs:
    a folder made private again meanwhile (a new pytest session does so to /tmp/pytest-of-root)
    makes its next checkpoint fail.
    """
    granted = []
    for path in (folder, *folder.parents):
        if path in _TRAVERSE_GRANTS:
            _TRAVERSE_GRANTS[path][1] += 1
            granted.append(path)
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if not mode & stat.S_IXOTH:
            os.chmod(path, mode | stat.S_IXOTH)
            _TRAVERSE_GRANTS[path] = [mode, 1]
            granted.append(path)
    return granted


def _revoke_traverse(paths: list[Path]) -> None:
    for path in paths:
        grant = _TRAVERSE_GRANTS.get(path)
        if grant is None:
            continue
        grant[1] -= 1
        if grant[1] == 0:
            del _TRAVERSE_GRANTS[path]
            try:
                os.chmod(path, grant[0])
            except OSError:
                pass


class PostgresServer:
    """A throwaway PostgreSQL cluster under `workdir`/postgres: trust auth, 127.0.0.1 only.

    initdb and pg_ctl come from `find_postgres_bin()`. PostgreSQL refuses to run as root: as
    root, it runs in a user namespace where root is seen as `postgres` (its files stay root's);
    where namespaces are not allowed, as the `postgres` user itself (runuser), who then owns
    `workdir`/postgres and needs the folders above it traversable (see `_grant_traverse`).
    The unix socket goes in `workdir`/postgres, not /var/run. `start()` after `stop()`
    restarts on the same data and port.
    """

    superuser = "postgres"

    def __init__(self, workdir: Path, database: str = "mlflow", user: str = "mlflow", *, start_timeout_s: float = 60,
                 password: str | None = None, host: str = HOST, clients: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.host = host  # the address it listens on
        self.clients = clients  # a network (CIDR) whose hosts may also connect, with trust auth: the rehearsal's bridge
        self.database = database
        self.user = user
        self.password = password  # given: `user` must log in with it over TCP (scram-sha-256), as on a real server
        self.start_timeout_s = start_timeout_s
        self.root = self.workdir / "postgres"
        self.data_dir = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port: int | None = None
        self._running = False
        self._prefix: list[str] = []  # how initdb and pg_ctl run (as root: not as root)
        self._granted: list[Path] = []

    @property
    def uri(self) -> str:
        if self.port is None:
            raise RuntimeError("the PostgreSQL server is not started")
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def _not_as_root(self) -> None:
        userns = _userns_prefix()
        if userns is not None:
            self._prefix = list(userns)
            return
        name, uid, gid = _service_user()
        runuser = shutil.which("runuser")
        if runuser is None:
            raise RuntimeError("running as root, PostgreSQL must run as another user: neither unshare nor runuser (util-linux) works here")
        self._prefix = [runuser, "-u", name, "--"]
        os.chown(self.root, uid, gid)
        self._granted = _grant_traverse(self.root.parent)

    def _run(self, command: list[str], timeout_s: float, what: str) -> None:
        result = subprocess.run(self._prefix + command, cwd=self.root, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}\n"
                               f"end of {self.log_path}:\n{_log_tail(self.log_path)}")

    def start(self) -> "PostgresServer":
        if self._running:
            return self
        bin_dir = find_postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): "
                               "install Debian's `postgresql` package (apt-get install postgresql)")
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            if os.geteuid() == 0:
                self._not_as_root()
            fresh = not (self.data_dir / "PG_VERSION").exists()
            if fresh:
                self.port = free_port()
                self._run([str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.superuser, "--auth=trust",
                           "--encoding=UTF8", "--locale=C", "--no-sync"], timeout_s=120, what="initdb")
                settings = {
                    "listen_addresses": f"'{self.host}'",
                    "port": str(self.port),
                    "unix_socket_directories": f"'{self.root}'",
                    # a throwaway cluster: speed over durability
                    "fsync": "off",
                    "synchronous_commit": "off",
                    "full_page_writes": "off",
                }
                with open(self.data_dir / "postgresql.conf", "a") as conf:
                    conf.write("\n# tests/services.py\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
                if self.clients:
                    with open(self.data_dir / "pg_hba.conf", "a") as hba:
                        hba.write(f"host all all {self.clients} trust\n")
            self._run([str(bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path), "-w",
                       "-t", str(int(self.start_timeout_s)), "start"], timeout_s=self.start_timeout_s + 15, what="pg_ctl start")
            self._running = True
            if fresh:
                self._create_role_and_database()
                if self.password is not None:
                    self._require_password(bin_dir)
        except BaseException:
            self.stop()
            raise
        return self

    def _connect(self, user: str, database: str):
        import psycopg2

        password = self.password if user == self.user else None
        return psycopg2.connect(host=self.host, port=self.port, user=user, dbname=database, password=password, connect_timeout=10)

    def _create_role_and_database(self) -> None:
        from psycopg2 import sql

        connection = self._connect(self.superuser, "postgres")
        try:
            connection.autocommit = True  # CREATE DATABASE refuses to run in a transaction
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.user,))
                if cursor.fetchone() is None:
                    cursor.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(self.user)))
                if self.password is not None:
                    cursor.execute(sql.SQL("ALTER ROLE {} PASSWORD %s").format(sql.Identifier(self.user)), (self.password,))
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cursor.fetchone() is None:
                    cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(self.database), sql.Identifier(self.user)))
        finally:
            connection.close()

    def _require_password(self, bin_dir: Path) -> None:
        """`user` over TCP: password (scram-sha-256) from now on; the superuser keeps trust (the tests' own handle)."""
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(f"host all {self.user} {self.host}/32 scram-sha-256\n" + hba.read_text())
        self._run([str(bin_dir / "pg_ctl"), "-D", str(self.data_dir), "reload"], timeout_s=30, what="pg_ctl reload")

    def query(self, sql: str, params=None) -> list[tuple]:
        """Run one statement as `user` in `database`; the rows it returns (none: [])."""
        connection = self._connect(self.user, self.database)
        try:
            with connection, connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall() if cursor.description is not None else []
        finally:
            connection.close()

    def _is_postmaster(self, pid: int) -> bool:
        """Whether `pid` is this cluster's postmaster, alive (a zombie's command line is empty)."""
        try:
            return str(self.data_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    def _postmaster_pid(self) -> int | None:
        """The server's pid from postmaster.pid, if that process still runs."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if self._is_postmaster(pid) else None

    def stop(self, timeout_s: float = 30) -> None:
        """What `pg_ctl stop -m fast` does: SIGINT to the postmaster, then wait until it has exited
        (not only until postmaster.pid is gone: a restart right after must find the port free).
        SIGKILL after `timeout_s`; its backends exit when they see the postmaster die."""
        try:
            pid = self._postmaster_pid()  # None: not running (a clean exit removes postmaster.pid)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGINT)
                deadline = time.monotonic() + timeout_s
                while self._is_postmaster(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if self._is_postmaster(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        finally:
            self._running = False
            _revoke_traverse(self._granted)
            self._granted = []

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MlflowServer:
    """`platform/mlflow/start_mlflow_server.sh` in the foreground, configured through its environment.

    MLFLOW_* variables of the caller are not passed on; `extra_env` (e.g. `S3Server.env()`)
    is added last and may override MLFLOW_WORKERS (1 here: 2-core test machines).
    """

    def __init__(self, workdir: Path, backend_store_uri: str, artifact_root: str, extra_env: Mapping[str, str] | None = None,
                 *, start_timeout_s: float = 120) -> None:
        self.workdir = Path(workdir)
        self.backend_store_uri = backend_store_uri
        self.artifact_root = artifact_root
        self.extra_env = dict(extra_env or {})
        self.start_timeout_s = start_timeout_s
        self.home = self.workdir / "mlflow-home"
        self.log_path = self.workdir / "mlflow-server.log"
        self.port: int | None = None
        self._process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        if self.port is None:
            raise RuntimeError("the MLflow server is not started")
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's mlflow and python
        env.update(
            MLFLOW_HOME=str(self.home),
            MLFLOW_BACKEND_STORE_URI=self.backend_store_uri,
            MLFLOW_ARTIFACT_ROOT=self.artifact_root,
            MLFLOW_HOST=HOST,
            MLFLOW_PORT=str(self.port),
            MLFLOW_WORKERS="1",
            MLFLOW_DISABLE_TELEMETRY="true",  # else the server may write ~/.config/mlflow/telemetry.json (the rehearsal's HOME)
        )
        env.update(self.extra_env)
        return env

    def start(self) -> "MlflowServer":
        if self._process is not None and self._process.poll() is None:
            return self
        self.port = self.port or free_port()
        self._process = _spawn([str(START_MLFLOW_SCRIPT), "foreground"], self.env(), self.log_path)
        try:
            _wait_until(lambda: _http_ok(self.uri + "/health"), self._process, self.start_timeout_s,
                        f"the MLflow server at {self.uri}", self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        _stop_group(self._process)
        self._process = None

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
