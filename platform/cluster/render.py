"""Write cluster.yaml and platform/cluster/onprem.yaml from their parts, so that they share one nodes' part.

    python platform/cluster/render.py           # after editing platform/cluster/parts/*.yaml
    python platform/cluster/render.py --check   # exit 1 if a written file is stale (the tests run this)

Each file is a provider part (`parts/aws.yaml`: AWS and its node types; `parts/onprem.yaml`:
Ray's local provider, the machines and SSH) followed by `parts/nodes.yaml`, everything that is
not the cloud: file mounts, the settings file every shell loads, the software, the start
commands with their ports. Text is joined, not re-dumped, so the comments stay.

The functions below make a copy of a config for a different place (the cluster rehearsal:
tests/scenarios/cluster_rehearsal.py): other settings values, software that is already there,
start flags for machines that share cores. They change only what they name.
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
import sys
from pathlib import Path

CLUSTER_DIR = Path(__file__).resolve().parent
REPO = CLUSTER_DIR.parents[1]
PARTS = CLUSTER_DIR / "parts"
NODES_PART = PARTS / "nodes.yaml"
OUTPUTS = {REPO / "cluster.yaml": PARTS / "aws.yaml", CLUSTER_DIR / "onprem.yaml": PARTS / "onprem.yaml"}
# the keys of the nodes' part: the same in every output
SHARED_KEYS = ("file_mounts", "rsync_exclude", "rsync_filter", "initialization_commands", "setup_commands",
               "head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
ENV_FILE = "~/imdb-platform.env"
# commands that install software: the setup of a machine that has the project's venv already skips them
INSTALL = re.compile(r"\bpip install\b|\buv venv\b|install\.sh")


def render(provider_part: Path) -> str:
    header = (f"# Written by platform/cluster/render.py from {provider_part.relative_to(REPO)} and "
              f"{NODES_PART.relative_to(REPO)}: edit those, then run it.\n")
    return header + provider_part.read_text().rstrip("\n") + "\n\n" + NODES_PART.read_text()


def stale() -> list[Path]:
    return [output for output, part in OUTPUTS.items() if not output.exists() or output.read_text() != render(part)]


def with_settings(config: dict, values: dict[str, str]) -> dict:
    """A copy whose settings file gives `values`: existing `export NAME=` lines changed, new names added."""
    config = copy.deepcopy(config)
    remaining = dict(values)
    commands = []
    for command in config["setup_commands"]:
        if ENV_FILE in command and "export " in command:
            for name in [n for n in remaining if re.search(rf"\b{n}=", command)]:
                replacement = f"{name}={remaining.pop(name)}"
                command = re.sub(rf"\b{name}=[^\s']*", lambda _, text=replacement: text, command)
        commands.append(command)
    first = next(i for i, c in enumerate(commands) if ENV_FILE in c and "export " in c)
    added = [f"echo {shlex.quote(f'export {name}={value}')} >> {ENV_FILE}" for name, value in remaining.items()]
    config["setup_commands"] = commands[: first + 1] + added + commands[first + 1 :]
    return config


def without_install(config: dict, existing: dict[str, str]) -> dict:
    """A copy for machines that have the software: no install command, and `existing` linked in
    place of what file_mounts and the installs would put there (remote path -> path on the machine)."""
    config = copy.deepcopy(config)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        config[key] = [c for c in config.get(key, []) if not INSTALL.search(c)]
    config["file_mounts"] = {remote: local for remote, local in config["file_mounts"].items() if remote not in existing}
    config["setup_commands"] = [f"ln -sfn {shlex.quote(path)} {remote}" for remote, path in existing.items()] + config["setup_commands"]
    return config


def with_start_args(config: dict, head: str = "", worker: str = "") -> dict:
    """A copy whose `ray start` commands take more flags (e.g. --num-cpus where machines share cores)."""
    config = copy.deepcopy(config)
    for key, extra in (("head_start_ray_commands", head), ("worker_start_ray_commands", worker)):
        config[key] = [f"{c} {extra}" if extra and re.search(r"\bray start\b", c) else c for c in config[key]]
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether the written files are current")
    args = parser.parse_args(argv)
    if args.check:
        old = stale()
        for path in old:
            print(f"{path.relative_to(REPO)} is stale: run python platform/cluster/render.py", file=sys.stderr)
        return 1 if old else 0
    for output, part in OUTPUTS.items():
        output.write_text(render(part))
        print(f"wrote {output.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
