"""Launch N gloo ranks of a script as subprocesses (a tiny torchrun for tests).

Sets MASTER_ADDR/PORT (a free port), RANK, WORLD_SIZE, LOCAL_RANK and OMP_NUM_THREADS=1; keeps each
rank's output in a file; on a failure or timeout kills every rank it started and raises with all
ranks' output, so a hang or crash on rank 3 is visible from the pytest report.

Also what the train.py and many-plans tests share: running train.py in one process (`train_py`,
`main_exit`), reading its --metrics-file (`read_metrics`, `step_losses`), the single-process HF
reference (`train_hf_reference`) and the rank side of many-plans launches (`record_case`, `finish_launch`).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class DistRunError(AssertionError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(script: str | Path, world_size: int, args: list[str] = (), env: dict | None = None,
                python: list[str] | None = None) -> tuple[list[str], list[subprocess.Popen], list]:
    """Start `python script args` on `world_size` ranks, each in a session of its own with its output in a
    file; returns (command, processes, open log files). run_ranks waits for them; a test that kills the
    ranks itself (os.killpg on each pid) uses this directly and reads the logs with read_logs."""
    port = free_port()
    base_env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                    OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    PYTHONUNBUFFERED="1")
    base_env.update(env or {})
    logdir = Path(tempfile.mkdtemp(prefix="dist-ranks-"))
    procs, logs = [], []
    cmd = (python or [sys.executable]) + [str(script), *args]
    for rank in range(world_size):
        log = open(logdir / f"rank{rank}.log", "w+")
        penv = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        logs.append(log)
    return cmd, procs, logs


def read_logs(logs: list) -> list[str]:
    """Each rank's output so far; closes the log files."""
    outputs = []
    for log in logs:
        log.flush()
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return outputs


def run_ranks(script: str | Path, world_size: int, args: list[str] = (), timeout: float = 600,
              env: dict | None = None, python: list[str] | None = None) -> list[str]:
    """Run `python script args` on `world_size` ranks; return each rank's output (raise on failure)."""
    cmd, procs, logs = start_ranks(script, world_size, args, env, python)
    deadline = time.monotonic() + timeout
    failed = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = f"rank {bad[0][0]} exited with code {bad[0][1]}"
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout:.0f} s"
                break
            time.sleep(0.2)
    finally:
        if failed:
            _kill(procs)
        outputs = read_logs(logs)
    if failed:
        tails = "\n".join(f"----- rank {r} -----\n{_tail(o)}" for r, o in enumerate(outputs))
        raise DistRunError(f"{' '.join(cmd)} on {world_size} ranks: {failed}\n{tails}")
    return outputs


def _kill(procs: list[subprocess.Popen]) -> None:
    """Terminate the ranks started here (each leads its own session), then kill what is left."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    end = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _tail(text: str, lines: int = 60) -> str:
    keep = [ln for ln in text.splitlines() if "warnings.warn(" not in ln and "UserWarning" not in ln]
    return "\n".join(keep[-lines:])


def gloo_threads() -> int:
    """This process's gloo threads (Linux thread names): each live gloo group keeps a few, so a count that grows
    from plan to plan means groups leak (backends/megatron/groups.destroy_parallel_groups)."""
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            count += "gloo" in Path(f"/proc/self/task/{tid}/comm").read_text()
        except FileNotFoundError:   # the thread ended after the listing (seen in CI)
            pass
    return count


def record_case(out: dict, entry: dict, res: dict, label: str) -> None:
    """Rank side of a many-plans launch: add a case's results with every rank's losses (rank 0 prints them)."""
    import torch.distributed as dist

    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, res["loss"])
    out["cases"].append({**entry, **res, "loss_by_rank": every})
    if dist.get_rank() == 0:
        print(f"{label}: loss {res['loss']}", flush=True)


def finish_launch(out: dict, path: str) -> None:
    """Rank side: rank 0 writes the launch's results as JSON; every rank leaves the process group."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


# One dist_runtime_plans.py launch trains every plan of a world size: test_runtime_plans' world-4 launch (33 plans)
# took about 16 minutes on a 2-core machine under load (session 14), more than the 900 s it had
PLANS_LAUNCH_TIMEOUT_S = 1800


def launch_plans_once(cache: dict, world: int, cases: list[dict], out: Path,
                      timeout: float = PLANS_LAUNCH_TIMEOUT_S) -> dict:
    """tests/dist_runtime_plans.py's results for `cases` on `world` ranks, launched once per world and cached.
    A failed launch is cached too: the other tests of that world fail at once with its error, instead of each
    launching it again (one timeout per test)."""
    if world not in cache:
        try:
            run_ranks(REPO / "tests" / "dist_runtime_plans.py", world,
                      ["--cases", json.dumps(cases), "--out", str(out)], timeout=timeout)
            cache[world] = json.loads(Path(out).read_text())
        except Exception as e:  # noqa: BLE001 - re-raised below, here and for every later test of this world
            cache[world] = e
    if isinstance(cache[world], Exception):
        raise cache[world]
    return cache[world]


def assert_case_matches_reference(res: dict, index: int, rtol: float) -> None:
    """One plan of a dist_runtime_plans.py launch against its single-process HF reference: the loss and
    the pre-clipping gradient norm of every step within `rtol`, all ranks agreeing on the loss, and a
    reference that really trains (equal flat losses would prove little)."""
    import pytest

    case = res["cases"][index]
    ref = res["reference"][case["key"]]
    assert case["loss"] == pytest.approx(ref["loss"], rel=rtol), f"{case['describe']}: losses differ"
    assert case["grad_norm"] == pytest.approx(ref["grad_norm"], rel=rtol), f"{case['describe']}: grad norms differ"
    for rank_losses in case["loss_by_rank"]:
        assert rank_losses == pytest.approx(case["loss"], rel=1e-6), "ranks disagree on the loss"
    assert len(set(round(x, 6) for x in ref["loss"])) == len(ref["loss"]), "the reference did not train"


# ---------------------------------------------------------------------------------------------- train.py runs
def train_py(*args: str, cwd: str | Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train.py args` in one process (one thread), output captured."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def main_exit(capsys, *args: str) -> tuple[int, list[str]]:
    """train.main in this process (bad input is rejected before any process group exists): the exit code
    and the `error:` lines on stderr."""
    import train

    code = train.main(list(args))
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict], dict | None]:
    """A train.py --metrics-file: (step records, eval records, the summary record or None)."""
    recs = [json.loads(x) for x in Path(path).read_text().splitlines()]
    steps = [r for r in recs if not r.get("summary") and not r.get("eval")]
    summary = [r for r in recs if r.get("summary")]
    return steps, [r for r in recs if r.get("eval")], summary[-1] if summary else None


def step_losses(path: str | Path) -> dict[int, float]:
    """{step: loss} of a train.py --metrics-file, in file order."""
    return {r["step"]: r["loss"] for r in read_metrics(path)[0]}


def train_hf_reference(adapter, model, batches, lr: float, weight_decay: float = 0.01,
                       eps: float = 1e-8) -> tuple[list[float], list[float]]:
    """The single-process reference of the plan tests: the plain HF `model` trained on one global batch per
    step with torch AdamW (DeepSpeed's hyper-parameters) and clipping at DeepSpeed's GRADIENT_CLIPPING;
    returns (losses, gradient norms before clipping)."""
    import torch

    from backends.deepspeed.config import GRADIENT_CLIPPING

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, eps=eps)
    losses, norms = [], []
    for batch in batches:
        loss = adapter.hf_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIPPING)))
        opt.step()
        losses.append(float(loss))
    return losses, norms
