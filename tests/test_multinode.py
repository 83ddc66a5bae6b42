"""Two hosts on one machine: multi-node launch end to end, on CPU with gloo.

The hosts are network namespaces joined by a veth pair shaped to 100 Mbit/s with tc
(scripts/netns_cluster.py); each has its own address, host name, /etc/hosts and, when openssh-server
and pdsh are installed (scripts/install_multinode_deps.sh), an sshd for DeepSpeed's pdsh runner.
  * training: scripts/train_bert_hp_layerwise_dist_2nodes.sh runs bert-test under a pp=2 x dp=2
    plan (ZeRO 1), pipeline stages on different hosts and data parallelism inside each, through
    `deepspeed --hostfile` with ssh/pdsh and with --no_ssh on each host; the losses must equal a
    one-host run of the same plan;
  * hardware: autotune/profile_hardware.py under `torchrun --nnodes 2` sees the shaped link as slower
    than the inside of a host, and the search given that profile keeps TP groups inside a host;
  * bad cluster input ends with one `error:` line in seconds.
The module fixture removes namespaces, sshd and every process in them, even when a test fails, and
checks that nothing is left. Skips with the reason where namespaces cannot be made.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from itertools import count
from pathlib import Path

import pytest

from autotune.hardware import load_hardware
from autotune.plan import Plan
from backends.launch import LaunchError, check_master_reachable, check_world_size, parse_hostfile
from tests.dist_launcher import REPO, run_ranks, step_losses

pytestmark = pytest.mark.distributed

RATE_MBIT, DELAY_MS = 100, 1           # the link between the hosts (delay only where the kernel has netem)
SLOTS = 2                              # ranks per host
STEPS = 3
LAUNCH_TIMEOUT_S = 240
TRAIN_SCRIPT = "scripts/train_bert_hp_layerwise_dist_2nodes.sh"
_ports = count(29500)                  # ports are private to each namespace pair; a new one per launch anyway


def _load_netns_cluster():
    spec = importlib.util.spec_from_file_location("netns_cluster", REPO / "scripts" / "netns_cluster.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                     # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


netns = _load_netns_cluster()


def ssh_missing() -> str | None:
    """Why the ssh/pdsh launcher path cannot run here (None when it can)."""
    missing = [name for name, ok in (("openssh-server", Path(netns.SSHD).exists()),
                                     ("pdsh", shutil.which("pdsh") is not None),
                                     ("ssh-keygen", shutil.which("ssh-keygen") is not None)) if not ok]
    return f"{', '.join(missing)} not installed: run scripts/install_multinode_deps.sh as root" if missing else None


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster():
    reason = netns.unsupported_reason()
    if reason:
        pytest.skip(reason)
    netns.remove_stale("gdsmn")                          # left by a run that was killed before its clean-up
    c = netns.NetnsCluster(f"gdsmn{os.getpid()}")
    c.up()
    try:
        c.shape(RATE_MBIT, DELAY_MS)
        if ssh_missing() is None:
            c.start_sshd()
        yield c
    finally:
        c.down()
    assert c.leftovers() == [], "namespaces left behind"


@pytest.fixture
def jobs(cluster):
    """Per test: end whatever the test started inside the hosts (ranks started over ssh included)."""
    yield cluster
    cluster.stop_jobs()
    for h in cluster.hosts:
        left = cluster.pids(h)
        assert set(left) <= {p.pid for p in cluster.sshd}, f"processes left in {h.netns}: {left}"


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    """pp=2 x dp=2 on 2 hosts x 2 ranks: stage 0 on host 0, stage 1 on host 1, DP (ZeRO 1) inside each."""
    plan = Plan.uniform(num_layers=4, world_size=2 * SLOTS, pp=2, zero_stage=1, chunks=2, global_bsz=8,
                        precision="fp32", model={"name": "bert-test"})
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan.save(str(path))
    return path


@pytest.fixture(scope="module")
def one_host_losses(plan_file, tmp_path_factory) -> list[float]:
    """The same plan on one host: 4 local ranks."""
    metrics = tmp_path_factory.mktemp("one-host") / "metrics.jsonl"
    run_ranks(REPO / "train.py", 2 * SLOTS, ["--model", "bert-test", "--galvatron-plan", str(plan_file),
                                             "--steps", str(STEPS), "--metrics-file", str(metrics)],
              timeout=LAUNCH_TIMEOUT_S)
    return list(step_losses(metrics).values())


# ---------------------------------------------------------------------------------------------- helpers
def _env(**extra: str) -> dict:
    """The test's environment for commands inside the hosts: this venv first on PATH, one thread per rank."""
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHON=sys.executable,
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=netns.IFNAME, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _hostfile(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_on_hosts(cluster, commands: list[tuple[object, list[str]]], env: dict, logdir: Path,
                  timeout: float = LAUNCH_TIMEOUT_S) -> list[tuple[int, str]]:
    """Start each (host, command) at once, wait for all with one deadline; (exit code, output) per command.
    On a timeout every job inside the hosts is ended and the test fails with the outputs."""
    procs, logs = [], []
    for i, (host, cmd) in enumerate(commands):
        log = open(logdir / f"job{i}-{host.name}.log", "w+")
        procs.append(cluster.popen(host, cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    timed_out = any(p.poll() is None for p in procs)
    if timed_out:
        cluster.stop_jobs()
    outputs = []
    for p, log in zip(procs, logs):
        p.wait()
        log.seek(0)
        outputs.append((p.returncode, log.read()))
        log.close()
    if timed_out:
        pytest.fail(f"timed out after {timeout:.0f} s:\n" + "\n".join(o[-3000:] for _, o in outputs))
    return outputs


def _check_ok(outputs: list[tuple[int, str]]) -> None:
    for rc, out in outputs:
        assert rc == 0, out[-4000:]


def tp_groups(plan: Plan, layer: int) -> list[list[int]]:
    """The TP rank groups of one layer as the runtime makes them (backends/megatron/layerwise.Layout): stage k
    owns ranks [k*W/pp, (k+1)*W/pp); inside it TP ranks are consecutive (flag 1) or strided by the DP degree."""
    from backends.megatron.layerwise import Layout

    B = plan.world_size // plan.pp_deg
    layout = Layout.make(plan.tp_sizes_enc[layer], bool(plan.tp_consecutive_flags[layer]), B)
    return [[k * B + j for j in group] for k in range(plan.pp_deg) for group in layout.groups(B)]


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("runner", ["ssh", "no_ssh"])
def test_two_hosts_train_like_one_host(jobs, runner, plan_file, one_host_losses, tmp_path):
    """deepspeed --hostfile through the 2-node script: with pdsh over ssh from host 0, or --no_ssh on each host.
    Same plan, same rank layout, same data and seeds, fp32: the arithmetic is the same as on one host, so
    the losses agree to rounding (1e-6; they come out bit-identical)."""
    cluster = jobs
    if runner == "ssh" and ssh_missing():
        pytest.skip(ssh_missing())
    head = cluster.hosts[0]
    hostfile = _hostfile(tmp_path / "hostfile", [f"{h.name} slots={SLOTS}" for h in cluster.hosts])
    metrics = tmp_path / "metrics.jsonl"
    ds_env = _hostfile(tmp_path / "ds_env", [f"GLOO_SOCKET_IFNAME={netns.IFNAME}", "OMP_NUM_THREADS=1"])
    env = _env(HOSTFILE=str(hostfile), PLAN=str(plan_file), MODEL="bert-test", STEPS=str(STEPS),
               METRICS=str(metrics), MASTER_ADDR=head.addr, MASTER_PORT=str(next(_ports)),
               DS_ENV_FILE=str(ds_env))       # what pdsh exports to the remote ranks besides PYTHON*
    if runner == "ssh":
        commands = [(head, ["bash", TRAIN_SCRIPT])]
    else:
        commands = [(h, ["env", "NO_SSH=1", f"NODE_RANK={h.index}", "bash", TRAIN_SCRIPT]) for h in cluster.hosts]
    outputs = _run_on_hosts(cluster, commands, env, tmp_path)
    _check_ok(outputs)
    if runner == "ssh":                        # pdsh prefixes every remote line with the host's name
        assert f"{cluster.hosts[1].name}: " in outputs[0][1]
    assert list(step_losses(metrics).values()) == pytest.approx(one_host_losses, rel=1e-6)
    assert len(one_host_losses) == STEPS


# ---------------------------------------------------------------------------------------------- hardware + search
def test_profiler_sees_slow_link_and_search_keeps_tp_in_host(jobs, tmp_path):
    cluster = jobs
    head = cluster.hosts[0]
    hw_path = tmp_path / "hardware.json"
    port = str(next(_ports))
    commands = [(h, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(SLOTS),
                     "--node_rank", str(h.index), "--master_addr", head.addr, "--master_port", port,
                     "autotune/profile_hardware.py", "--device", "cpu", "--quick", "--allreduce-mb", "1", "--out",
                     str(hw_path)])
                for h in cluster.hosts]
    _check_ok(_run_on_hosts(cluster, commands, _env(), tmp_path))
    hw = load_hardware(str(hw_path))
    raw = json.loads(hw_path.read_text())
    assert (hw.nodes, hw.gpus_per_node) == (2, SLOTS)            # counted from the hosts' names
    # all-reduce across the hosts vs inside one (the shaped link: ~12 MB/s; loopback: far more)
    assert hw.inter_node_busbw_gbps < hw.intra_node_busbw_gbps / 2, raw["allreduce_busbw_gbps"]
    assert hw.allreduce_busbw_gbps["2_0"] < hw.allreduce_busbw_gbps["2_1"] / 2   # strided pairs cross hosts
    # p2p at pp=4: 0->1 and 2->3 inside a host, 1->2 across. A link's time is its slower rank's, and rank 2
    # also receives across the link, so 2->3 reads as slow too: compare the fastest link of each kind.
    links = raw["measurements"]["p2p"]["4"]["links"]
    across = [lk["gbps"] for lk in links if lk["crosses_node"]]
    inside = [lk["gbps"] for lk in links if not lk["crosses_node"]]
    # 1 MiB messages (--quick alone uses 64 KiB, which loopback gloo moves at latency-bound speed, no faster
    # than the shaped link's burst): the link's rate, not latency, decides.
    assert across and inside and max(inside) > 2 * max(across), links

    plan_path = tmp_path / "searched.json"
    r = subprocess.run([sys.executable, "autotune/search.py", "--hardware", str(hw_path), "--model", "bert-test",
                        "--gpus", "4", "--nodes", "2", "--precision", "fp32", "--quiet", "--out", str(plan_path)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    plan = Plan.load(str(plan_path))
    for layer in range(plan.num_layers):
        assert plan.tp_sizes_enc[layer] <= SLOTS
        for group in tp_groups(plan, layer):
            assert len({rank // SLOTS for rank in group}) == 1, (layer, group, plan.describe())
    _assert_tp_layout_follows_link(hw)


def _assert_tp_layout_follows_link(hw) -> None:
    """Where the search has a TP layout to choose (pp=1, tp=2, dp=2 on 2x2 ranks), the profile makes the
    in-host layout (consecutive pairs) faster than the strided one whose pairs cross the link; so a
    plan with TP keeps it inside a host for a reason, not by accident of tp=1."""
    from autotune.search import Searcher
    from model_zoo import get_model_spec

    spec = get_model_spec("bert-test", precision="fp32")
    results = Searcher(spec, hw, hw.gpu_memory_gb, max_tp=2).run([16], prune=False)
    best = {}
    for res in results:
        c = res.cand
        if (c.pp, c.tp) == (1, 2):
            key = c.tp_consecutive
            best[key] = min(best.get(key, float("inf")), res.step_time_s)
    assert set(best) == {True, False}, "the search offered no TP layout choice"
    assert best[True] < best[False], best


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["unknown host", "slots != world size", "unreachable host"])
def test_bad_cluster_input_is_one_line_in_seconds(jobs, case, plan_file, tmp_path):
    """What a user gets from the 2-node script on node 0 with a bad hostfile: exit 2, one `error:` line,
    within seconds (the check's timeouts are 5 s per step), and no rank started."""
    cluster = jobs
    a, b = cluster.hosts
    if case == "unreachable host" and ssh_missing():
        pytest.skip(f"the good host must answer on the ssh port: {ssh_missing()}")
    lines = {"unknown host": [f"{a.name} slots={SLOTS}", f"no-such-host-{os.getpid()} slots={SLOTS}"],
             "slots != world size": [f"{a.name} slots=1", f"{b.name} slots=1"],
             "unreachable host": [f"{a.name} slots={SLOTS}", f"{netns.SUBNET}.99 slots={SLOTS}"]}[case]
    needle = {"unknown host": "does not resolve", "slots != world size": "world_size=4",
              "unreachable host": "is not reachable on port 22"}[case]
    hostfile = _hostfile(tmp_path / "hostfile", lines)
    env = _env(HOSTFILE=str(hostfile), PLAN=str(plan_file), MODEL="bert-test", MASTER_ADDR=a.addr)
    t0 = time.monotonic()
    [(rc, out)] = _run_on_hosts(cluster, [(a, ["bash", TRAIN_SCRIPT])], env, tmp_path, timeout=60)
    elapsed = time.monotonic() - t0
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and needle in errors[0], out[-3000:]
    assert out.strip() == errors[0], out[-3000:]                  # nothing else: the launcher never started
    assert elapsed < 20, f"{case}: {elapsed:.1f} s"


# ---------------------------------------------------------------------------------------------- no namespaces
@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("train_*_dist_2nodes.sh")))
@pytest.mark.parametrize("no_ssh", ["0", "1"])
def test_every_2node_script_checks_the_hostfile_first(script, no_ssh, plan_file, tmp_path):
    """Each family's 2-node script, with or without ssh, stops at a hostfile that does not fit the plan."""
    hostfile = _hostfile(tmp_path / "hostfile", ["localhost slots=1", "127.0.0.1 slots=1"])
    env = _env(HOSTFILE=str(hostfile), PLAN=str(plan_file), MASTER_ADDR="127.0.0.1", NO_SSH=no_ssh, NODE_RANK="0")
    r = subprocess.run(["bash", f"scripts/{script}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.startswith("error: hostfile has 2 host(s) with 1+1 = 2 slots but plan") and \
        r.stderr.count("\n") == 1, r.stderr[-2000:]


def test_parse_hostfile_errors_name_the_line(tmp_path):
    good = _hostfile(tmp_path / "good", ["# two nodes", "node0 slots=8", "", "node1 slots=8  # spare"])
    assert [(h.host, h.slots, h.line) for h in parse_hostfile(str(good))] == [("node0", 8, 2), ("node1", 8, 4)]
    cases = {"bad": (["node0 slots=8", "node1 8"], "line 2"), "dup": (["n0 slots=1", "n0 slots=1"], "already listed"),
             "zero": (["n0 slots=0"], "at least 1"), "empty": (["# nothing"], "lists no hosts")}
    for name, (lines, needle) in cases.items():
        with pytest.raises(LaunchError, match=needle):
            parse_hostfile(str(_hostfile(tmp_path / name, lines)))
    with pytest.raises(LaunchError, match="No such file"):
        parse_hostfile(str(tmp_path / "missing"))
    with pytest.raises(LaunchError, match="2\\+2 = 4 slots but plan p.json was made for world_size=8.*slots=4 each"):
        check_world_size(parse_hostfile(str(_hostfile(tmp_path / "h", ["a slots=2", "b slots=2"]))), 8, "plan p.json")


def test_master_check_is_bounded():
    """A rank whose master never opens its port fails after the timeout instead of waiting in the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]                        # bound, never listening: connections refused
        env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(closed_port)}
        t0 = time.monotonic()
        with pytest.raises(LaunchError, match="rank 1: MASTER_ADDR 127.0.0.1:.* within 1.5 s"):
            check_master_reachable(timeout_s=1.5, env=env)
        assert time.monotonic() - t0 < 5
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        check_master_reachable(timeout_s=5, env=dict(env, MASTER_PORT=str(srv.getsockname()[1])))
    check_master_reachable(timeout_s=0.1, env=dict(env, RANK="0"))      # rank 0 hosts the rendezvous
