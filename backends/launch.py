"""Launch helpers for multi-node runs: the hostfile, its match with the plan, bounded reachability checks.

DeepSpeed's launcher reads a hostfile (`host slots=N` per line) and ssh-es into every host. A wrong
hostfile shows up late and badly there: a traceback for a name that does not resolve, a silent
override of the slots, or ranks on the good hosts waiting in the rendezvous (30 minutes) for a host
that never answers. `check_cluster` finds these before anything starts, each as one line that names
the fix, in seconds: every network step has a timeout and the hosts are checked in parallel.

    python -m backends.launch --hostfile hosts --plan plan.json            # before `deepspeed --hostfile hosts`
    python -m backends.launch --hostfile hosts --plan plan.json --port 0   # --no_ssh launches: no ssh port check

Exit code 0 and one `ok:` line, or exit code 2 and one `error:` line.
`check_master_reachable` is the same idea for a rank that is about to join the rendezvous.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

EXIT_BAD_INPUT = 2
DEFAULT_TIMEOUT_S = 5.0
SSH_PORT = 22
_LINE = re.compile(r"^(\S+)\s+slots\s*=\s*(\d+)\s*(#.*)?$")
T = TypeVar("T")


class LaunchError(ValueError):
    """Cluster input that cannot launch; the message is one line that names the fix."""


@dataclass(frozen=True)
class HostSlots:
    """One hostfile entry."""

    host: str
    slots: int
    line: int


# ------------------------------------------------------------------------------------------ hostfile
def parse_hostfile(path: str) -> list[HostSlots]:
    """Hosts in DeepSpeed's format (`name slots=N`, `#` comments), in file order (node rank order)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise LaunchError(f"hostfile {path}: {e.strerror}; write one line per node, e.g. 'node0 slots=8'") from None
    hosts: list[HostSlots] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise LaunchError(f"hostfile {path} line {n}: '{line}' is not 'HOST slots=N'; write e.g. 'node0 slots=8'")
        host, slots = m.group(1), int(m.group(2))
        if host in seen:
            raise LaunchError(f"hostfile {path} line {n}: host '{host}' is already listed on line {seen[host]}; "
                              f"list each host once with all its slots")
        if slots < 1:
            raise LaunchError(f"hostfile {path} line {n}: host '{host}' has slots={slots}; give at least 1")
        seen[host] = n
        hosts.append(HostSlots(host, slots, n))
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no hosts; write one line per node, e.g. 'node0 slots=8'")
    return hosts


def launched_slots(hosts: list[HostSlots], num_nodes: int | None = None,
                   num_gpus: int | None = None) -> list[HostSlots]:
    """What DeepSpeed will actually launch: `--num_nodes` keeps the first hosts, `--num_gpus` overrides slots."""
    kept = hosts[:num_nodes] if num_nodes else hosts
    return [HostSlots(h.host, num_gpus, h.line) for h in kept] if num_gpus else list(kept)


def check_world_size(hosts: list[HostSlots], world_size: int, plan_name: str | None = None) -> None:
    """The processes the hostfile launches must be the plan's world size (every rank has a place in the grid)."""
    total = sum(h.slots for h in hosts)
    if total == world_size:
        return
    detail = "+".join(str(h.slots) for h in hosts)
    per_host = world_size // len(hosts) if world_size % len(hosts) == 0 else None
    fix = f"give the hosts {world_size} slots in total" + (f" (slots={per_host} each)" if per_host else "")
    wanted = f"{plan_name} was made for world_size={world_size}" if plan_name else f"{world_size} processes are wanted"
    raise LaunchError(f"hostfile has {len(hosts)} host(s) with {detail} = {total} slots but {wanted}; {fix}, "
                      f"or search a plan with --gpus {total} --nodes {len(hosts)}")


def plan_world_size(plan_path: str) -> int:
    """The world size a plan file was made for."""
    from autotune.plan import Plan, PlanError

    try:
        plan = Plan.load(plan_path)
    except PlanError as e:
        raise LaunchError(str(e)) from None
    if plan.world_size is None:
        raise LaunchError(f"plan {plan_path} does not say its world_size (a Galvatron file?); pass --world-size N")
    return plan.world_size


# ------------------------------------------------------------------------------------------ network
def _bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run `fn` in a daemon thread and give up after `timeout_s` (DNS look-ups cannot be cancelled)."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"{what} took longer than {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def resolve(host: str, timeout_s: float = DEFAULT_TIMEOUT_S, where: str = "") -> str:
    """The host's first IPv4/IPv6 address, or a LaunchError naming the host and `where` it came from."""
    try:
        infos = _bounded(lambda: socket.getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout_s,
                         f"looking up '{host}'")
    except (OSError, TimeoutError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) and e.strerror else str(e)
        src = f" ({where})" if where else ""
        raise LaunchError(f"host '{host}'{src} does not resolve ({reason}); fix the name or add it to /etc/hosts "
                          f"on the launching node") from None
    return infos[0][4][0]


def check_port(host: str, addr: str, port: int, timeout_s: float = DEFAULT_TIMEOUT_S, where: str = "") -> None:
    """A TCP connection to addr:port (ssh, for DeepSpeed's launcher) must open within `timeout_s`."""
    try:
        socket.create_connection((addr, port), timeout=timeout_s).close()
    except OSError as e:
        src = f", {where}" if where else ""
        raise LaunchError(f"host '{host}' ({addr}{src}) is not reachable on port {port} (ssh) within {timeout_s:g} s: "
                          f"{_reason(e)}; check that it is up and runs sshd, or remove it from the hostfile") from None


def _reason(e: OSError) -> str:
    return "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))


def check_hosts_reachable(hosts: list[HostSlots], port: int = SSH_PORT,
                          timeout_s: float = DEFAULT_TIMEOUT_S, path: str = "hostfile") -> None:
    """Every host must resolve, then (unless `port` is 0) accept a connection on `port`. Hosts are checked
    in parallel, so the whole check takes about two timeouts however many hosts there are; the error
    reported is the first bad line of the file, name errors before connection errors."""
    addrs = _parallel(hosts, lambda h: resolve(h.host, timeout_s, f"{path} line {h.line}"), timeout_s)
    if port:
        _parallel(hosts, lambda h: check_port(h.host, addrs[h.line], port, timeout_s, f"{path} line {h.line}"),
                  timeout_s)


def _parallel(hosts: list[HostSlots], fn: Callable[[HostSlots], T], timeout_s: float) -> dict[int, T]:
    """fn(host) for every host at once; results by hostfile line; raises the LaunchError of the first line."""
    results: dict[int, T] = {}
    errors: dict[int, LaunchError] = {}

    def one(h: HostSlots) -> None:
        try:
            results[h.line] = fn(h)
        except LaunchError as e:
            errors[h.line] = e

    threads = [threading.Thread(target=one, args=(h,), daemon=True) for h in hosts]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s + 2
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for h in hosts:
        if h.line in errors:
            raise errors[h.line]
        if h.line not in results:
            raise LaunchError(f"checking host '{h.host}' took longer than {timeout_s:g} s; check the network")
    return results


def check_cluster(hostfile: str, world_size: int, port: int = SSH_PORT, timeout_s: float = DEFAULT_TIMEOUT_S,
                  num_nodes: int | None = None, num_gpus: int | None = None,
                  plan_name: str | None = None) -> list[HostSlots]:
    """Everything a multi-node launch needs from the hostfile; returns the hosts as DeepSpeed will use them."""
    hosts = launched_slots(parse_hostfile(hostfile), num_nodes, num_gpus)
    check_world_size(hosts, world_size, plan_name)
    check_hosts_reachable(hosts, port, timeout_s, hostfile)
    return hosts


def check_master_reachable(timeout_s: float = 60.0, env: dict | None = None) -> None:
    """On ranks other than 0: MASTER_ADDR must resolve and MASTER_PORT accept a connection within
    `timeout_s` (retrying: rank 0 may start a little later), instead of torch's rendezvous waiting its
    full timeout for a host that is not there. Call before init_process_group; rank 0 and one-process
    runs return at once."""
    env = os.environ if env is None else env
    rank = int(env.get("RANK", "0"))
    if rank == 0 or int(env.get("WORLD_SIZE", "1")) == 1 or "MASTER_ADDR" not in env:
        return
    host, port = env["MASTER_ADDR"], int(env.get("MASTER_PORT", "29500"))
    deadline = time.monotonic() + timeout_s
    addr = resolve(host, min(timeout_s, DEFAULT_TIMEOUT_S), "MASTER_ADDR")
    while True:
        left = deadline - time.monotonic()
        try:
            socket.create_connection((addr, port), timeout=max(0.5, min(left, 2.0))).close()
            return
        except OSError as e:
            last = _reason(e)
        if time.monotonic() >= deadline:
            raise LaunchError(f"rank {rank}: MASTER_ADDR {host}:{port} ({addr}) accepted no connection within "
                              f"{timeout_s:g} s ({last}); start node 0, check MASTER_ADDR/MASTER_PORT and that "
                              f"the port is open between the nodes")
        time.sleep(max(0.0, min(0.5, deadline - time.monotonic())))


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hostfile", required=True, help="DeepSpeed hostfile: 'HOST slots=N' per line")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--plan", help="plan.json whose world_size the hostfile must launch")
    size.add_argument("--world-size", type=int, help="number of processes the hostfile must launch")
    p.add_argument("--port", type=int, default=SSH_PORT, help="port every host must answer on (ssh); 0: resolve only")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per look-up / connection")
    p.add_argument("--num_nodes", "--num-nodes", type=int, default=None, help="as given to deepspeed")
    p.add_argument("--num_gpus", "--num-gpus", type=int, default=None, help="as given to deepspeed (overrides slots)")
    args = p.parse_args(argv)
    try:
        world = plan_world_size(args.plan) if args.plan else args.world_size
        name = f"plan {args.plan}" if args.plan else None
        hosts = check_cluster(args.hostfile, world, args.port, args.timeout, args.num_nodes, args.num_gpus, name)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    layout = ", ".join(f"{h.host}: {h.slots}" for h in hosts)
    reach = f"every host answers on port {args.port}" if args.port else "every host resolves"
    print(f"ok: {len(hosts)} host(s) ({layout}) = {world} processes{' for ' + name if name else ''}; {reach}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
