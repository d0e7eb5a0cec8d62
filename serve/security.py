"""API-key authentication for `/v1/*` and `/v2/*` (the health probes `/v2/health/*` stay open).

The key comes from the environment of the replica: `SERVE_API_KEY`, or a file named by
`SERVE_API_KEY_FILE` (a mounted secret; the file wins when both are set), never from a
config file in git. With neither set, serving refuses to start where others can connect (an
address other than loopback, or the app of serve/config.yaml) unless anonymous access is asked
for by name (`--allow-anonymous`, `allow_anonymous: true`); an open endpoint says so in the log.
The key is compared in constant time and never logged; only a fingerprint is, so an
operator can tell which key a replica holds.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from pathlib import Path

from pipelines.core.errors import ConfigError
from serve.settings import API_KEY_ENV, API_KEY_FILE_ENV

log = logging.getLogger(__name__)
MIN_KEY_LENGTH = 16


def load_api_key(environ: dict[str, str] | None = None) -> str | None:
    """The configured key, or None when authentication is off."""
    environ = os.environ if environ is None else environ
    key_file = environ.get(API_KEY_FILE_ENV)
    if key_file:
        path = Path(key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"${API_KEY_FILE_ENV}={key_file}: cannot read the API key file ({exc.strerror})") from exc
        if not key:
            raise ConfigError(f"${API_KEY_FILE_ENV}={key_file}: the file is empty")
    else:
        key = (environ.get(API_KEY_ENV) or "").strip() or None
    if key is not None and len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"the API key is {len(key)} characters; use at least {MIN_KEY_LENGTH} (e.g. `openssl rand -hex 32`)")
    return key


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def refuse_open_endpoint(api_key: str | None, allow_anonymous: bool, where: str) -> None:
    """Fail closed: no key where others can connect is an error unless anonymous access was asked for by name."""
    if api_key is None and not allow_anonymous:
        raise ConfigError(
            f"{where}: no API key (${API_KEY_ENV} or ${API_KEY_FILE_ENV}), so /v1 and /v2 would answer anyone who reaches it; "
            "set a key, or serve it open on purpose with --allow-anonymous (allow_anonymous: true)"
        )


def fingerprint(key: str) -> str:
    """A short, non-reversible id of the key for logs."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


class ApiKeyGuard:
    """Checks `Authorization: Bearer <key>`; a guard without a key lets everything through."""

    def __init__(self, api_key: str | None):
        self._key = api_key.encode("utf-8") if api_key else None
        if api_key:
            log.info("API key authentication on for /v1/* and /v2/* (key fingerprint %s)", fingerprint(api_key))
        else:
            log.warning("no API key configured ($%s or $%s): /v1/* and /v2/* are open to anyone who can reach them", API_KEY_ENV, API_KEY_FILE_ENV)

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def problem(self, authorization: str | None) -> str | None:
        """None if the header grants access, else what is wrong with it (safe to return to the client)."""
        if self._key is None:
            return None
        if not authorization:
            return "missing Authorization header: send 'Authorization: Bearer <API key>'"
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return "Authorization header must be 'Bearer <API key>'"
        if not hmac.compare_digest(credentials.strip().encode("utf-8"), self._key):
            return "invalid API key"
        return None
