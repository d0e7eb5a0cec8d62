"""On the head of a cluster on your own machines: `ray stop` on every worker, which `ray down` does not do.

    ray exec platform/cluster/onprem.yaml "python ~/imdb-platform/platform/cluster/stop_workers.py"
    ray down platform/cluster/onprem.yaml -y

With Ray's local provider, `ray down` runs `ray stop` on the head only and marks the workers
terminated in its state file: a worker's raylet exits a minute later, when it gives up on the
head, and its agents may stay (seen with Ray 2.60). This reaches every worker of
`provider.worker_ips` the way the autoscaler does: over SSH, as `auth.ssh_user`, with the key
`ray up` copied to the head (~/ray_bootstrap_config.yaml names both). Run it right before
`ray down`: the autoscaler restarts Ray on a worker it has seen gone for 30 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import yaml

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def stop(ip: str, user: str, key: str) -> tuple[str, int, str]:
    # a login shell that reads ~/.bashrc, as Ray's own commands do: that is where the venv and
    # the settings file are loaded (Debian's .bashrc returns early for non-interactive shells)
    command = ["ssh", "-i", key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
               "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", f"{user}@{ip}", "bash --login -c -i 'source ~/.bashrc; ray stop'"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    # ray stop's own last line ("Stopped all 5 Ray processes."), else ssh's error
    lines = [line for line in (result.stdout.strip().splitlines() or result.stderr.strip().splitlines()) if line.strip()]
    return ip, result.returncode, lines[-1] if lines else ""


def main() -> int:
    path = os.path.expanduser(BOOTSTRAP_CONFIG)
    if not os.path.exists(path):
        print(f"error: no {BOOTSTRAP_CONFIG}: run this on the head of a cluster that `ray up` started", file=sys.stderr)
        return 2
    with open(path) as file:
        config = yaml.safe_load(file)
    worker_ips = config["provider"].get("worker_ips") or []
    key = os.path.expanduser(config["auth"]["ssh_private_key"])
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda ip: stop(ip, config["auth"]["ssh_user"], key), worker_ips))
    for ip, code, last in results:
        print(f"{ip}: {'stopped' if code == 0 else f'ray stop failed (exit {code})'}: {last}")
    return 1 if any(code != 0 for _, code, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
