"""Credentials in URIs: masked wherever a URI is shown, moved out of it before it is recorded.

A tracking URI such as `postgresql://mlflow:<password>@db:5432/mlflow` or
`https://user:<token>@mlflow.example.com` would otherwise be written wherever the URI goes:
MLflow params, settings files in the bucket, checkpoints, Ray's runtime_env (shown in the
dashboard), Serve's deployment config, log lines. So the entry points call `take_credentials`
first: the password goes into the environment variable the standard client reads
(`PGPASSWORD` for libpq, `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD` for MLflow's
HTTP client), and only the URI without it travels on. Processes started after that (a local
Ray's workers) inherit the variable; on a cluster, each node has its own (`~/.pgpass`, the
node's environment, an IAM role).

`mask` is for anything shown: it hides a URI's password and the values of query parameters
that name a secret (`token=`, `key=`, `password=`, ...).
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

MASK = "***"
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "access_token", "api_key", "apikey", "key", "secret", "sig", "signature")
_USERINFO_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@", re.IGNORECASE)
_SECRET_QUERY = re.compile(r"(?P<key>[?&;](?:%s)=)[^&;#\s]+" % "|".join(SECRET_QUERY_KEYS), re.IGNORECASE)
# the variable each kind of store's standard client reads its password from
PASSWORD_ENV = {"http": "MLFLOW_TRACKING_PASSWORD", "https": "MLFLOW_TRACKING_PASSWORD", "postgresql": "PGPASSWORD"}
USERNAME_ENV = {"http": "MLFLOW_TRACKING_USERNAME", "https": "MLFLOW_TRACKING_USERNAME"}


def mask(text: str) -> str:
    """`text` with every URI password and secret query value replaced by ***."""
    text = _USERINFO_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def _kind(uri: str) -> str:
    return uri.split(":", 1)[0].split("+", 1)[0].lower()


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """(the URI without its password, {environment variable: value} that carries it instead).

    A URI without a password comes back as it is, with {}. For a kind of store whose client
    reads no password variable, the URI keeps it (and `mask` still hides it wherever it is shown).
    """
    parts = urlsplit(uri)
    kind = _kind(uri)
    if parts.password is None or kind not in PASSWORD_ENV:
        return uri, {}
    user = unquote(parts.username or "")
    env = {PASSWORD_ENV[kind]: unquote(parts.password)}
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    if kind in USERNAME_ENV:
        env[USERNAME_ENV[kind]] = user  # MLflow's HTTP client sends them as basic auth
    elif user:
        netloc = f"{quote(user, safe='')}@{netloc}"  # libpq: the user stays in the URI
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), env


def take_credentials(uri: str | None) -> str | None:
    """The URI without its password; the password into this process's environment for its clients and children."""
    if not uri:
        return uri
    clean, env = split_credentials(uri)
    os.environ.update(env)
    return clean
