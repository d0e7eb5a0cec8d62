#!/usr/bin/env bash
# Start the MLflow tracking server: UI, REST API, model registry and artifact proxy.
#
#   start_mlflow_server.sh             in the foreground (containers, systemd, tests)
#   start_mlflow_server.sh --daemon    in the background; returns once /health answers
#                                      (cluster.yaml runs this on the head node)
#   start_mlflow_server.sh --stop      stop the one started with --daemon
#
# Settings, from the environment (cluster.yaml writes them to ~/imdb-platform.env):
#   MLFLOW_BACKEND_STORE_URI  runs, metrics and the registry.
#                             default sqlite:///$MLFLOW_HOME/mlflow.db (a file on this machine);
#                             postgresql://user@host:5432/db for a managed database (the
#                             password comes from ~/.pgpass or PGPASSWORD, never from a file
#                             in the repository)
#   MLFLOW_ARTIFACT_ROOT      where artifacts and model files go: a folder (default
#                             $MLFLOW_HOME/artifacts) or s3://bucket/prefix. Clients upload and
#                             download through this server (mlflow-artifacts:/ URIs), so they
#                             need no storage credentials of their own; the server does.
#   MLFLOW_SERVE_ARTIFACTS    true (default): the proxy above. false: clients use the
#                             artifact root directly (each needs access to it).
#   MLFLOW_HOST               interface to listen on (default 127.0.0.1; 0.0.0.0 on a cluster:
#                             keep the port closed to the internet, open it to the cluster)
#   MLFLOW_PORT               default 5000
#   MLFLOW_WORKERS            server processes (default 1 with SQLite: one writer at a time)
#   MLFLOW_ALLOWED_HOSTS      Host headers accepted besides localhost and private IPs
#                             (e.g. a Kubernetes service name: imdb-mlflow,imdb-mlflow:5000)
#   MLFLOW_HOME               state folder: default SQLite file, local artifacts, pid and log
#                             (default ~/mlflow)
#   MLFLOW_BIN                the mlflow executable (default: `mlflow` on PATH)
#   MLFLOW_PYTHON             the python of mlflow's environment, for the checks below
#                             (default: `python` beside MLFLOW_BIN, else python3)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION
#                             MLflow's job runner for GenAI scorer jobs (default false here:
#                             this platform runs none, and the runner forks 8 more Python
#                             processes, 170-290 MB each in `ps`, and a folder in /dev/shm)
#
# Before starting, a postgresql:// backend store must accept a connection and an s3:// artifact
# root (when proxied) must be a reachable bucket (endpoint from MLFLOW_S3_ENDPOINT_URL or
# AWS_ENDPOINT_URL, credentials from the standard AWS sources); otherwise the script prints one
# line naming the database or bucket and what is wrong, and exits 1.
set -euo pipefail

MLFLOW_HOME="${MLFLOW_HOME:-$HOME/mlflow}"
BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$MLFLOW_HOME/mlflow.db}"
ARTIFACT_ROOT="${MLFLOW_ARTIFACT_ROOT:-$MLFLOW_HOME/artifacts}"
SERVE_ARTIFACTS="${MLFLOW_SERVE_ARTIFACTS:-true}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"
PID_FILE="$MLFLOW_HOME/server.pid"
LOG_FILE="$MLFLOW_HOME/server.log"
START_TIMEOUT_S="${MLFLOW_START_TIMEOUT_S:-120}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

if [[ "$BACKEND_STORE_URI" == sqlite:* ]]; then
  WORKERS="${MLFLOW_WORKERS:-1}"
else
  WORKERS="${MLFLOW_WORKERS:-4}"
fi

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

health_url() {
  local host="$HOST"
  [[ "$host" == "0.0.0.0" || "$host" == "::" ]] && host=127.0.0.1
  echo "http://$host:$PORT/health"
}

is_up() {
  # curl is not in every image; python is wherever mlflow is
  python3 - "$(health_url)" <<'EOF' > /dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
    sys.exit(0 if response.status == 200 else 1)
EOF
}

server_args() {
  local args=(server --backend-store-uri "$BACKEND_STORE_URI" --host "$HOST" --port "$PORT" --workers "$WORKERS")
  if [[ "$SERVE_ARTIFACTS" == "true" ]]; then
    # new experiments get mlflow-artifacts:/ locations; the server stores under the root
    args+=(--serve-artifacts --artifacts-destination "$ARTIFACT_ROOT")
  else
    args+=(--no-serve-artifacts --default-artifact-root "$ARTIFACT_ROOT")
  fi
  if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
    # --allowed-hosts replaces mlflow's default list: keep localhost and private IPs in it
    local defaults="localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,192.168.*" i
    for ((i = 16; i < 32; i++)); do defaults+=",172.$i.*"; done
    args+=(--allowed-hosts "$defaults,$MLFLOW_ALLOWED_HOSTS")
  fi
  printf '%s\n' "${args[@]}"
}

prepare_local_paths() {
  mkdir -p "$MLFLOW_HOME"
  if [[ "$BACKEND_STORE_URI" == sqlite:///* ]]; then
    mkdir -p "$(dirname "${BACKEND_STORE_URI#sqlite:///}")"
  fi
  if [[ "$ARTIFACT_ROOT" != *://* ]]; then
    mkdir -p "$ARTIFACT_ROOT"
  fi
}

stop_daemon() {
  if [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2> /dev/null; then
    # the whole process group: mlflow runs its web server processes as children
    kill -- "-$(cat "$PID_FILE")" 2> /dev/null || kill "$(cat "$PID_FILE")"
    rm -f "$PID_FILE"
    echo "mlflow server stopped"
  else
    echo "no mlflow server started by this script is running (no live pid in $PID_FILE)"
  fi
}

# the URI with any password masked, for messages
redacted() { sed -E 's#^([^:/]+://[^:/@]+):[^@]*@#\1:***@#' <<< "$1"; }

check_backend_store() {
  # the driver's reason, first line only: '... port 5432 failed: Connection refused'
  "$MLFLOW_PYTHON" - "$BACKEND_STORE_URI" << 'EOF'
import sys

uri = sys.argv[1]
try:
    import sqlalchemy

    url = sqlalchemy.engine.make_url(uri)
    shown = url.render_as_string(hide_password=True)
    connect_args = {"connect_timeout": 5} if url.get_driver_name() in ("psycopg2", "psycopg") else {}
    engine = sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
except ImportError as error:  # SQLAlchemy 2.1 opens postgresql:// with psycopg (3)
    package = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary"}.get(error.name, error.name)
    sys.exit(f"mlflow server: cannot check the backend store: {error.name} is not installed for {sys.executable} (pip install '{package}')")
except Exception as error:
    sys.exit(f"mlflow server: bad backend store URI: {str(error).splitlines()[0]}")
try:
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1")
except Exception as error:
    reason = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    sys.exit(f"mlflow server: cannot connect to the backend store {shown}: {lines[0] if lines else type(reason).__name__}")
EOF
}

check_artifact_bucket() {
  "$MLFLOW_PYTHON" - "$ARTIFACT_ROOT" << 'EOF'
import os
import sys
from urllib.parse import urlparse

root = sys.argv[1]
bucket = urlparse(root).netloc
# mlflow's S3 store takes MLFLOW_S3_ENDPOINT_URL first; boto3 itself reads AWS_ENDPOINT_URL(_S3)
endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
shown = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
if not bucket:
    sys.exit(f"mlflow server: no bucket in the artifact root {root}")
try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError
except ImportError as error:
    sys.exit(f"mlflow server: cannot check bucket {bucket}: {error.name} is not installed for {sys.executable} (pip install boto3)")
try:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        verify=os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() != "true",
        config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}),
    )
    client.head_bucket(Bucket=bucket)
except ClientError as error:
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status == 404 or code in ("404", "NoSuchBucket"):
        reason = "no such bucket"
    elif status == 403 or code in ("403", "AccessDenied"):
        reason = "access denied (check this server's AWS credentials)"
    else:
        reason = f"{code or status}: {error}"
except (EndpointConnectionError, ConnectTimeoutError) as error:
    reason = f"endpoint unreachable ({error})"
except NoCredentialsError:
    reason = "no AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws or an instance role)"
except (BotoCoreError, ValueError) as error:
    reason = str(error).splitlines()[0]
else:
    sys.exit(0)
sys.exit(f"mlflow server: artifact bucket {bucket} at {shown} is not usable: {reason}")
EOF
}

check_stores() {
  if [[ "$BACKEND_STORE_URI" == postgresql* ]]; then
    check_backend_store || exit 1
  fi
  if [[ "$SERVE_ARTIFACTS" == "true" && "$ARTIFACT_ROOT" == s3://* ]]; then
    check_artifact_bucket || exit 1
  fi
}

mode="${1:-foreground}"
case "$mode" in
  -h | --help) usage; exit 0 ;;
  --stop) stop_daemon; exit 0 ;;
  foreground | --foreground | --daemon) ;;
  *) echo "unknown argument: $mode" >&2; usage >&2; exit 2 ;;
esac

MLFLOW_PATH="$(command -v "$MLFLOW_BIN")" || { echo "mlflow not found (MLFLOW_BIN=$MLFLOW_BIN): install this project first" >&2; exit 1; }
if [[ -z "${MLFLOW_PYTHON:-}" ]]; then
  MLFLOW_PYTHON="$(dirname "$MLFLOW_PATH")/python"
  [[ -x "$MLFLOW_PYTHON" ]] || MLFLOW_PYTHON=python3
fi
if [[ "$mode" == "--daemon" ]] && is_up; then
  echo "an MLflow server already answers at $(health_url)"
  exit 0
fi
prepare_local_paths
check_stores
mapfile -t ARGS < <(server_args)
# the backend URI may hold a user name; never a password (see above); masked all the same
echo "mlflow server: backend $(redacted "$BACKEND_STORE_URI"), artifacts $ARTIFACT_ROOT (proxied: $SERVE_ARTIFACTS), http://$HOST:$PORT, $WORKERS worker(s)"

if [[ "$mode" != "--daemon" ]]; then
  exec "$MLFLOW_BIN" "${ARGS[@]}"
fi

# setsid + nohup: the server outlives the SSH session of `ray up`
setsid nohup "$MLFLOW_BIN" "${ARGS[@]}" >> "$LOG_FILE" 2>&1 < /dev/null &
echo $! > "$PID_FILE"
for ((waited = 0; waited < START_TIMEOUT_S; waited++)); do
  if is_up; then
    echo "mlflow server up at $(health_url) (pid $(cat "$PID_FILE"), log $LOG_FILE)"
    exit 0
  fi
  if ! kill -0 "$(cat "$PID_FILE")" 2> /dev/null; then
    break
  fi
  sleep 1
done
echo "the mlflow server did not come up; the end of $LOG_FILE:" >&2
tail -n 30 "$LOG_FILE" >&2
exit 1
