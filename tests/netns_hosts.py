"""Hosts for `ray up` on one machine: Linux network namespaces on a bridge, each running sshd.

Each host has its own IP on a private bridge, its own PID namespace (it sees only its own
processes: `ray stop` on one host cannot touch another, nor the test suite's Ray) and its own
mount namespace, where a folder of its own is bound over /tmp (Ray's session folder, the
autoscaler's state file) and another over root's HOME (~/ray_bootstrap_key.pem: ssh resolves
`~` through the password database, not $HOME, so HOME must be the real /root).

Everything else is the machine's filesystem, as an NFS mount would be: the repository and its
venv are usable on every host at the same path. Those of them that live under /tmp or /root
(the venv's Python, from pyenv, may) are bound back into the host at their own path.

    hosts = NetnsHosts(["head", "worker-1", "worker-2"]).start()   # as root
    hosts["head"].ip, hosts.ssh_key, hosts.ssh_user
    hosts["worker-1"].kill()        # the machine is gone: every process of it, at once
    hosts.processes("head")         # what still runs there
    hosts.stop()                    # namespaces, veths, bridge and folders gone

Names carry this process's pid (`rh<pid>...`): two runs cannot collide, and `start()` first
removes what a crashed earlier run (its pid gone) left behind.

`python tests/netns_hosts.py init ...` is a host's first process (PID 1 of its PID namespace,
see `_init`): it binds the host's /tmp, starts sshd and reaps orphans, as init does. When it
dies, the kernel kills every process of the host.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "rh"  # every namespace, link and folder this module makes starts with it
MS_BIND = 4096  # <sys/mount.h>
HOSTS_BASE = Path("/var/tmp")  # not /tmp: each host binds its own /tmp over the machine's
SSHD = Path("/usr/sbin/sshd")
HOME = "/root"  # the hosts' user is root (ip netns and unshare need root anyway)
NEEDED_TOOLS = {
    "ip": "iproute2",
    "unshare": "util-linux",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "rsync": "rsync",  # `ray up` copies its file_mounts (the bootstrap config, the key) with rsync over SSH
}


def missing_tools() -> list[str]:
    """One line per missing tool, naming the Debian package; [] when all are here."""
    missing = [f"{tool} (Debian package {package})" for tool, package in NEEDED_TOOLS.items() if shutil.which(tool) is None]
    if not SSHD.exists():
        missing.append(f"{SSHD} (Debian package openssh-server)")
    return missing


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Namespaces, bridges and folders of earlier runs whose process is gone (a crash, a SIGKILL)."""
    removed = []
    for line in _run("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = re.fullmatch(rf"{PREFIX}(\d+)-\w+", name)
        if match and not _pid_alive(int(match.group(1))):
            for pid in _run("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "delete", name, check=False)
            removed.append(f"netns {name}")
    for match in re.finditer(rf"^\d+: ({PREFIX}(\d+)(?:br|v\d+))[:@]", _run("ip", "-o", "link", "show").stdout, re.MULTILINE):
        if not _pid_alive(int(match.group(2))):
            _run("ip", "link", "delete", match.group(1), check=False)
            removed.append(f"link {match.group(1)}")
    for folder in HOSTS_BASE.glob(f"{PREFIX}-*"):
        match = re.fullmatch(rf"{PREFIX}-(\d+)", folder.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f"folder {folder}")
    return removed


def _free_subnet(pid: int) -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no route of this machine uses yet (the pid picks where to start)."""
    used = _run("ip", "-4", "route", "show").stdout + _run("ip", "-4", "-o", "addr", "show").stdout
    for offset in range(256):
        third = (pid + offset) % 250 + 3
        if f"10.213.{third}." not in used:
            return ipaddress.IPv4Network(f"10.213.{third}.0/24")
    raise RuntimeError("no free /24 in 10.213.0.0/16 for the rehearsal's bridge")


class Host:
    """One machine: a network namespace, its sshd (under a PID-1 init of its own), its folders."""

    def __init__(self, name: str, index: int, hosts: NetnsHosts, ip: str):
        self.name, self.hosts, self.ip = name, hosts, ip
        self.netns = f"{PREFIX}{hosts.pid}-{name.replace('-', '')}"
        self.veth = f"{PREFIX}{hosts.pid}v{index}"  # <= 15 characters, the kernel's limit
        self.folder = hosts.root / name
        self.home, self.tmp = self.folder / "home", self.folder / "tmp"
        self.init: subprocess.Popen | None = None

    def create(self) -> None:
        for folder in (self.home, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        prefix = self.hosts.subnet.prefixlen
        _run("ip", "netns", "add", self.netns)
        _run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        _run("ip", "link", "set", self.veth, "master", self.hosts.bridge, "up")
        _run("ip", "-n", self.netns, "addr", "add", f"{self.ip}/{prefix}", "dev", "eth0")
        _run("ip", "-n", self.netns, "link", "set", "eth0", "up")
        _run("ip", "-n", self.netns, "link", "set", "lo", "up")
        # a default route (to the bridge, which forwards nothing further): Ray finds a node's
        # own address by the route to a public one
        _run("ip", "-n", self.netns, "route", "add", "default", "via", self.hosts.gateway)
        self._write_sshd_config()

    def _write_sshd_config(self) -> None:
        ssh = self.hosts.ssh_dir
        self.sshd_config = self.folder / "sshd_config"
        self.sshd_config.write_text(
            f"ListenAddress {self.ip}\nPort 22\nHostKey {ssh / 'host_key'}\nPidFile none\n"
            f"AuthorizedKeysFile {ssh / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            # the keys sit in a folder of the test, not in ~/.ssh with the modes sshd wants
            "StrictModes no\n"
            # the autoscaler opens a few connections per worker at once
            "MaxStartups 100\nMaxSessions 100\nLogLevel ERROR\nSubsystem sftp internal-sftp\n"
        )

    def start(self) -> None:
        binds = {str(self.tmp): "/tmp", str(self.home): HOME}
        # shared paths under the bound folders stay visible on the host (a checkout in /tmp, pyenv's Python in /root)
        keep = [str(p) for p in self.hosts.shared_paths if any(str(p).startswith(target + "/") for target in binds.values())]
        command = ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork", "--mount-proc", "--mount", "--propagation", "private",
                   sys.executable, str(Path(__file__).resolve()), "init",
                   *[arg for source, target in binds.items() for arg in ("--bind", f"{source}:{target}")],
                   *[arg for path in keep for arg in ("--keep", path)], "--", str(SSHD), "-D", "-e", "-f", str(self.sshd_config)]
        with open(self.folder / "sshd.log", "ab") as log:
            self.init = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def init_pid(self) -> int | None:
        """The host's PID 1, seen from here (unshare's child)."""
        if self.init is None:
            return None
        for pid in _run("ip", "netns", "pids", self.netns, check=False).stdout.split():
            if _ppid(int(pid)) == self.init.pid:
                return int(pid)
        return None

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every live process on this host (zombies left out)."""
        found = []
        for pid in _run("ip", "netns", "pids", self.netns, check=False).stdout.split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if cmdline:
                found.append((int(pid), cmdline))
        return found

    def kill(self) -> int:
        """As when the machine disappears: SIGKILL its PID 1; the kernel kills every other process of it."""
        count = len(self.processes())
        if self.init is not None and self.init.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.init.pid, signal.SIGKILL)  # `ip netns exec` -> unshare
            init = self.init_pid()
            if init:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(init, signal.SIGKILL)
            self.init.wait(timeout=30)
        for pid, _ in self.processes():  # nothing should be left; anything that is, goes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return count


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class NetnsHosts:
    """The bridge, the hosts on it, the SSH key that reaches them; `stop()` removes it all."""

    ssh_user = "root"

    def __init__(self, names: list[str], shared_paths: list[Path] = ()):
        self.pid = os.getpid()
        self.names = names
        self.shared_paths = list(shared_paths)
        self.root = HOSTS_BASE / f"{PREFIX}-{self.pid}"
        self.ssh_dir = self.root / "ssh"
        self.ssh_key = self.ssh_dir / "id_ed25519"
        self.bridge = f"{PREFIX}{self.pid}br"
        self.hosts: dict[str, Host] = {}

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def start(self, timeout_s: float = 30) -> NetnsHosts:
        if os.geteuid() != 0:
            raise RuntimeError("the rehearsal's hosts are network namespaces: run it as root")
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"missing for the rehearsal's SSH hosts: {', '.join(missing)} (make sshd installs them)")
        remove_leftovers()
        self.subnet = _free_subnet(self.pid)
        addresses = list(self.subnet.hosts())
        self.gateway = str(addresses[0])  # the bridge, in this (root) namespace: where the services listen
        try:
            self.ssh_dir.mkdir(parents=True)
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rehearsal", "-f", str(self.ssh_key))
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.ssh_dir / "host_key"))
            shutil.copy(self.ssh_dir / "id_ed25519.pub", self.ssh_dir / "authorized_keys")
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder (Debian's service makes it)
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for index, name in enumerate(self.names):
                host = Host(name, index, self, str(addresses[index + 1]))
                self.hosts[name] = host
                host.create()
                host.start()
            for host in self.hosts.values():
                self._wait_for_ssh(host, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def ssh_command(self, host: Host, command: str) -> list[str]:
        return ["ssh", "-i", str(self.ssh_key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", f"{self.ssh_user}@{host.ip}", command]

    def _wait_for_ssh(self, host: Host, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            # the host's own HOME: the folder bound over /root (same inode)
            result = subprocess.run(self.ssh_command(host, "stat -c %i ~"), capture_output=True, text=True, timeout=15, check=False)
            if result.returncode == 0 and result.stdout.strip() == str(host.home.stat().st_ino):
                return
            if time.monotonic() > deadline or (host.init is not None and host.init.poll() is not None):
                log = (host.folder / "sshd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"host {host.name} ({host.ip}) does not answer SSH with its own HOME: {result.stderr.strip() or result.stdout.strip()}\nsshd log:\n{log}")
            time.sleep(0.2)

    def processes(self, name: str) -> list[tuple[int, str]]:
        return self.hosts[name].processes()

    def stop(self, keep_folders: bool = False) -> None:
        """Every host's processes, namespaces, veths and the bridge; the folders too unless kept (logs)."""
        for host in self.hosts.values():
            with contextlib.suppress(Exception):
                host.kill()
            # the veth pair first, from this side: a namespace outlives `ip netns delete` while any
            # other mount namespace still holds its /run/netns mount (seen here: a leftover veth)
            _run("ip", "link", "delete", host.veth, check=False)
            _run("ip", "netns", "delete", host.netns, check=False)
        _run("ip", "link", "delete", self.bridge, check=False)
        if not keep_folders:
            shutil.rmtree(self.root, ignore_errors=True)


def _init(argv: list[str]) -> int:
    """PID 1 of a host: bind its /tmp and HOME, keep the shared paths under them visible, run sshd, reap orphans."""
    parser = argparse.ArgumentParser(prog="netns_hosts.py init")
    parser.add_argument("--bind", action="append", default=[], help="SOURCE:TARGET")
    parser.add_argument("--keep", action="append", default=[])
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    # handles on the shared paths, taken before the host's /tmp hides them
    kept = {path: os.open(path, os.O_RDONLY | os.O_DIRECTORY) for path in args.keep}
    for bind in args.bind:
        source, target = bind.split(":")
        subprocess.run(["mount", "--bind", source, target], check=True)
    libc = ctypes.CDLL(None, use_errno=True)
    for path, fd in kept.items():
        os.makedirs(path, exist_ok=True)
        # mount(2) itself: mount(8) would resolve /proc/self/fd/N to its path, which /tmp now hides
        if libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND, None) != 0:
            raise OSError(ctypes.get_errno(), f"bind {path} back on the host")
        os.close(fd)
    # PID 1 gets no default signal actions: a SIGTERM from outside must end the host
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    sshd = subprocess.Popen(args.command)
    while True:
        try:
            pid, _ = os.wait()  # Ray's daemons are re-parented here when `ray start` exits
        except ChildProcessError:
            return 0
        if pid == sshd.pid:
            return 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "init":
        sys.exit(_init(sys.argv[2:]))
    print(__doc__)
