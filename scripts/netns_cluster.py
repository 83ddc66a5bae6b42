"""Two "hosts" on one Linux machine: network namespaces joined by a veth pair, for multi-node tests.

Multi-node launch (a hostfile, ssh/pdsh, `torchrun --nnodes 2`, gloo across a real interface, a slow
link between nodes) can only be exercised with separate network stacks. Each host here gets
  * its own network namespace: loopback, one veth end named `gds0` with one address, private ports
    (so a fixed master port never collides with anything else on the machine);
  * its own hostname: commands run under `unshare --uts`, so `socket.gethostname()` differs per host
    (the hardware profiler counts nodes by host name);
  * its own /etc/hosts and /etc/ssh: `ip netns exec` bind-mounts /etc/netns/NAME/* over /etc/*, so
    host names resolve to the veth addresses and ssh/sshd use keys and settings made here;
  * optionally an sshd (root login by a key made here), for DeepSpeed's pdsh/ssh launcher.
`tc` shapes the link (netem delay + rate where the kernel has netem, else tbf rate).

Everything is named after the cluster name; `down` removes all of it (processes inside the
namespaces, the namespaces, /etc/netns/NAME-h*, the work folder) and is safe to call twice.

    python scripts/netns_cluster.py up --name demo --rate-mbit 100 --delay-ms 1 --sshd
    python scripts/netns_cluster.py exec --name demo --host 1 -- hostname -I
    python scripts/netns_cluster.py down --name demo

Needs root, `ip` (iproute2) and `unshare` (util-linux); `--sshd` also needs openssh-server
(scripts/install_multinode_deps.sh installs it and pdsh).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

IFNAME = "gds0"                       # the veth end inside every host (same name on each: one GLOO_SOCKET_IFNAME)
SUBNET = "10.213.7"                   # private to the namespaces: clusters never see each other's addresses
NETNS_ETC = Path("/etc/netns")
SSHD = "/usr/sbin/sshd"
SSH_PORT = 22
# Run a command as host `$0`: own hostname, then exec the command (argv after the host name).
_AS_HOST = 'hostname "$0" && exec "$@"'


class ClusterError(RuntimeError):
    """The namespaces could not be made or used; the message says which step failed."""


@dataclass(frozen=True)
class Host:
    """One simulated node: its namespace, host name and address on the link."""

    index: int
    name: str          # host name, as written in hostfiles and resolved through the host's /etc/hosts
    netns: str
    addr: str


def unsupported_reason() -> str | None:
    """Why namespaces cannot be used here (None when they can), so tests can skip with the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (iproute2 / util-linux)"
    probe = f"gds-probe-{os.getpid()}"
    r = _run(["ip", "netns", "add", probe], check=False)
    if r.returncode != 0:
        return f"'ip netns add' is not permitted here: {r.stderr.strip() or r.returncode}"
    try:
        veth = ["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"]
        for what, argv in (("ip netns exec", ["ip", "netns", "exec", probe, "true"]), ("a veth pair", veth)):
            r = _run(argv, check=False)
            if r.returncode != 0:
                return f"{what} is not permitted here: {r.stderr.strip() or r.returncode}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


def remove_stale(prefix: str) -> list[str]:
    """Remove clusters named PREFIX<pid> whose process is gone (a test run killed before its clean-up)."""
    pattern = re.compile(rf"^({re.escape(prefix)}(\d+))-h\d+$")
    removed = []
    for ns in _run(["ip", "netns", "list"], check=False).stdout.split():
        m = pattern.match(ns)
        if m and not Path(f"/proc/{m.group(2)}").exists() and m.group(1) not in removed:
            NetnsCluster(m.group(1)).down()
            removed.append(m.group(1))
    return removed


def _run(argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed (exit {r.returncode}): {r.stderr.strip()}")
    return r


class NetnsCluster:
    """Two hosts joined by a veth pair; see the module docstring. Use as a context manager."""

    def __init__(self, name: str, num_hosts: int = 2):
        if num_hosts != 2:
            raise ClusterError("a veth pair joins exactly two hosts")
        if len(name) > 20 or not name.replace("-", "").isalnum():
            raise ClusterError(f"cluster name '{name}' must be at most 20 letters, digits or '-'")
        self.name = name
        self.hosts = [Host(i, f"{name}-h{i}", f"{name}-h{i}", f"{SUBNET}.{i + 1}") for i in range(num_hosts)]
        self.workdir = Path(tempfile.gettempdir()) / f"{name}-netns"
        self.sshd: list[subprocess.Popen] = []
        self.shaping = "none"

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> "NetnsCluster":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        """Create the namespaces, the link, addresses and per-host /etc files; undo all on failure."""
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            for h in self.hosts:
                _run(["ip", "netns", "add", h.netns])
            a, b = self.hosts
            _run(["ip", "link", "add", IFNAME, "netns", a.netns, "type", "veth", "peer", "name", IFNAME,
                  "netns", b.netns])
            for h in self.hosts:
                _run(["ip", "-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", IFNAME])
                _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
                _run(["ip", "-n", h.netns, "link", "set", IFNAME, "up"])
                self._write_etc(h, "hosts", self._hosts_file())
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Remove everything `up` made, killing whatever still runs inside the namespaces."""
        for h in self.hosts:
            self._kill_inside(h)
        for p in self.sshd:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.sshd = []
        for h in self.hosts:
            _run(["ip", "netns", "del", h.netns], check=False)
            shutil.rmtree(NETNS_ETC / h.netns, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def stop_jobs(self) -> None:
        """End every process inside the hosts except the sshd daemons (between runs, and after a failed one:
        ranks started over ssh are not children of the launching process)."""
        keep = {p.pid for p in self.sshd}
        for h in self.hosts:
            self._kill_inside(h, keep)

    def leftovers(self) -> list[str]:
        """Namespaces or /etc/netns folders of this cluster that still exist (empty after `down`)."""
        listed = _run(["ip", "netns", "list"], check=False).stdout.split()
        return [h.netns for h in self.hosts if h.netns in listed or (NETNS_ETC / h.netns).exists()]

    # ------------------------------------------------------------------ running commands
    def argv(self, host: Host, cmd: list[str]) -> list[str]:
        """`cmd` run inside `host`: its namespace, its /etc overlay and its own host name."""
        return ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--", "sh", "-c", _AS_HOST, host.name, *cmd]

    def run(self, host: Host, cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(host, cmd), capture_output=True, text=True, timeout=timeout, **kw)

    def popen(self, host: Host, cmd: list[str], **kw) -> subprocess.Popen:
        """Start `cmd` inside `host` in its own session, so that it and its children can be killed together."""
        return subprocess.Popen(self.argv(host, cmd), start_new_session=True, **kw)

    # ------------------------------------------------------------------ link shaping
    def shape(self, rate_mbit: float, delay_ms: float = 0.0) -> str:
        """Limit both directions of the link; returns what was applied (netem is absent from some kernels)."""
        rate = f"{rate_mbit:g}mbit"
        applied = ""
        for h in self.hosts:
            dev = ["dev", IFNAME, "root"]
            netem = ["ip", "netns", "exec", h.netns, "tc", "qdisc", "replace", *dev, "netem",
                     "delay", f"{delay_ms:g}ms", "rate", rate, "limit", "10000"]
            if delay_ms > 0 and _run(netem, check=False).returncode == 0:
                applied = f"netem delay {delay_ms:g} ms, rate {rate}"
                continue
            burst = max(32 * 1024, int(rate_mbit * 1e6 / 8 / 250))     # >= one 4 ms tick of traffic
            _run(["ip", "netns", "exec", h.netns, "tc", "qdisc", "replace", *dev, "tbf", "rate", rate,
                  "burst", str(burst), "latency", "100ms"])
            applied = f"tbf rate {rate}" + (" (netem unavailable: no added delay)" if delay_ms > 0 else "")
        self.shaping = applied
        return applied

    # ------------------------------------------------------------------ ssh
    def start_sshd(self, timeout: float = 15) -> None:
        """An sshd in every host, root login with a key made here; the hosts' ssh clients use that key."""
        if not Path(SSHD).exists():
            raise ClusterError(f"{SSHD} is missing; install openssh-server (scripts/install_multinode_deps.sh)")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)        # sshd's privilege-separation folder
        keys = self.workdir / "keys"
        keys.mkdir(exist_ok=True)
        for kind in ("id", "hostkey"):
            if not (keys / kind).exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f", str(keys / kind)])
        for h in self.hosts:
            self._write_etc(h, "ssh/sshd_config", _sshd_config(h.addr))
            self._write_etc(h, "ssh/ssh_config", _SSH_CONFIG)
            self._write_etc(h, "ssh/ssh_host_ed25519_key", (keys / "hostkey").read_text(), mode=0o600)
            self._write_etc(h, "ssh/authorized_keys", (keys / "id.pub").read_text(), mode=0o600)
            self._write_etc(h, "ssh/id_ed25519", (keys / "id").read_text(), mode=0o600)
        for h in self.hosts:
            log = open(self.workdir / f"sshd-{h.index}.log", "w")
            self.sshd.append(self.popen(h, [SSHD, "-D", "-e", "-f", "/etc/ssh/sshd_config"], stdout=log,
                                        stderr=subprocess.STDOUT))
        self._wait_for_sshd(timeout)

    def _wait_for_sshd(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for h, proc in zip(self.hosts, self.sshd):
            log = self.workdir / f"sshd-{h.index}.log"
            while "Server listening" not in log.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ClusterError(f"sshd on {h.name} did not start: {log.read_text().strip()[-500:]}")
                time.sleep(0.1)

    # ------------------------------------------------------------------ helpers
    def _hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost", "::1 localhost"] + [f"{h.addr} {h.name}" for h in self.hosts]
        return "\n".join(lines) + "\n"

    def _write_etc(self, host: Host, rel: str, text: str, mode: int = 0o644) -> None:
        path = NETNS_ETC / host.netns / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)

    def pids(self, host: Host) -> list[int]:
        """The processes inside the host's namespace (none once it is gone)."""
        r = _run(["ip", "netns", "pids", host.netns], check=False)
        return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []

    def _kill_inside(self, host: Host, keep: set[int] = frozenset(), grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL, every process inside the host's namespace but `keep` (all were started here)."""
        def pids() -> list[int]:
            return [p for p in self.pids(host) if p not in keep]

        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while pids() and time.monotonic() < deadline:
                time.sleep(0.1)


def _sshd_config(addr: str) -> str:
    return "\n".join([
        f"ListenAddress {addr}", f"Port {SSH_PORT}", "HostKey /etc/ssh/ssh_host_ed25519_key",
        "AuthorizedKeysFile /etc/ssh/authorized_keys", "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "StrictModes no", "PidFile none", "PrintMotd no", "MaxStartups 64", "LogLevel INFO", ""])


_SSH_CONFIG = "\n".join([
    "Host *", "  IdentityFile /etc/ssh/id_ed25519", "  IdentitiesOnly yes", "  StrictHostKeyChecking no",
    "  UserKnownHostsFile /dev/null", "  GlobalKnownHostsFile /dev/null", "  BatchMode yes", "  ConnectTimeout 5",
    "  LogLevel ERROR", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create the two hosts (prints name and address of each)")
    up.add_argument("--rate-mbit", type=float, default=None, help="shape the link to this rate")
    up.add_argument("--delay-ms", type=float, default=0.0, help="added one-way delay (needs netem)")
    up.add_argument("--sshd", action="store_true", help="start an sshd in each host")
    ex = sub.add_parser("exec", help="run a command inside one host")
    ex.add_argument("--host", type=int, choices=(0, 1), required=True)
    ex.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("down", help="remove the hosts and everything running in them")
    for sp in (up, ex, sub.choices["down"]):
        sp.add_argument("--name", required=True, help="cluster name (namespaces are NAME-h0, NAME-h1)")
    args = p.parse_args(argv)
    try:
        cluster = NetnsCluster(args.name)
        if args.cmd == "down":
            cluster.down()
            return 0
        if args.cmd == "exec":
            cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
            return subprocess.call(cluster.argv(cluster.hosts[args.host], cmd))
        reason = unsupported_reason()
        if reason:
            raise ClusterError(reason)
        cluster.up()
        if args.rate_mbit:
            print(f"link: {cluster.shape(args.rate_mbit, args.delay_ms)}")
        if args.sshd:
            cluster.start_sshd()                      # the daemons outlive this process; `down` ends them
        for h in cluster.hosts:
            print(f"{h.name} {h.addr} (netns {h.netns}, interface {IFNAME})")
        return 0
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
