"""Where a command's CPU goes, by kind of process: `python bench/suite_cpu.py -- make test`.

The suite is CPU-bound on 2 cores, and a test's wall time there says little about its cost (a
test that takes 9 s alone takes 60 s beside the lane). This runs the command and reads every
process's CPU time from /proc every --interval seconds, adds the increments up by kind of
process (a Ray actor's class, Ray's own daemons, a `python -m` module, a server), and prints
the table with the machine's own busy time (/proc/stat) beside it. What processes spent
between their last reading and their exit is not seen: the "not attributed" line is that.

Linux only; processes in other PID namespaces (the rehearsal's hosts) are seen from the root one.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict

TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICKS  # all but idle and iowait


def processes() -> dict[tuple[int, int], tuple[int, str]]:
    """(pid, start time) -> (CPU ticks so far, command line); the start time tells a reused pid apart."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # the name in parentheses may hold spaces
        ticks, started = int(fields[11]) + int(fields[12]), int(fields[19])
        found[(int(entry), started)] = (ticks, command or stat[stat.find("(") + 1:stat.rfind(")")])
    return found


RAY_DAEMONS = (("gcs_server", "ray gcs_server"), ("/raylet", "ray raylet"), ("ray-dashboard-", "ray dashboard modules"),
               ("dashboard/dashboard.py", "ray dashboard"), ("dashboard/agent.py", "ray dashboard agent"),
               ("runtime_env/agent", "ray runtime_env agent"), ("log_monitor.py", "ray log_monitor"),
               ("autoscaler/_private/monitor.py", "ray autoscaler monitor"), ("ray/util/client/server", "ray client server"))


def kind(command: str) -> str:
    """A short name for what a process is, from its command line."""
    if command.startswith("ray::"):
        return "ray::" + re.split(r"[:(.\s]", command[5:], maxsplit=1)[0]
    for marker, name in RAY_DAEMONS:
        if marker in command:
            return name
    module = re.search(r"\s-m\s+(\S+)", command)
    if module:
        return f"python -m {module.group(1)}"
    script = re.search(r"(\S+\.py)\b", command)
    if script:
        return f"python {os.path.basename(script.group(1))}"
    program = command.split()[0] if command.split() else command
    return os.path.basename(program)


class Sampler(threading.Thread):
    def __init__(self, interval_s: float):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.seen = {key: ticks for key, (ticks, _) in processes().items()}  # what ran before is not counted
        self.by_kind: dict[str, float] = defaultdict(float)
        self.stopped = threading.Event()

    def sample(self) -> None:
        for key, (ticks, command) in processes().items():
            spent = ticks - self.seen.get(key, 0)
            if spent > 0:
                self.by_kind[kind(command)] += spent / TICKS
            self.seen[key] = ticks

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.sample()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between readings of /proc (default 2)")
    parser.add_argument("--top", type=int, default=30, help="kinds of process to list (default 30)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: python bench/suite_cpu.py -- make test")
    sampler = Sampler(args.interval)
    busy, start = machine_busy_s(), time.monotonic()
    sampler.start()
    returncode = subprocess.call(command)
    sampler.stopped.set()
    sampler.join()
    sampler.sample()
    wall, busy = time.monotonic() - start, machine_busy_s() - busy
    attributed = sum(sampler.by_kind.values())
    print(f"\n=== CPU by kind of process: {' '.join(command)} (exit {returncode}) ===")
    print(f"{'CPU s':>9} {'share':>6}  kind")
    for name, seconds in sorted(sampler.by_kind.items(), key=lambda item: -item[1])[: args.top]:
        print(f"{seconds:9.1f} {seconds / busy:6.1%}  {name}")
    print(f"{busy - attributed:9.1f} {(busy - attributed) / busy:6.1%}  not attributed (processes that ended between readings, the kernel)")
    print(f"machine: {busy:.0f} CPU s busy in {wall:.0f} s of wall time on {os.cpu_count()} CPUs ({busy / wall / os.cpu_count():.1%} busy)")
    return returncode


if __name__ == "__main__":
    sys.exit(main())
