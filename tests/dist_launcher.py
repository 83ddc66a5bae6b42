"""Launch N gloo ranks of a script as subprocesses (a tiny torchrun for tests).

Sets MASTER_ADDR/PORT (a free port), RANK, WORLD_SIZE, LOCAL_RANK and OMP_NUM_THREADS=1; keeps each
rank's output in a file; on a failure or timeout kills every rank it started and raises with all
ranks' output, so a hang or crash on rank 3 is visible from the pytest report.
"""
from __future__ import annotations

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


def run_ranks(script: str | Path, world_size: int, args: list[str] = (), timeout: float = 600,
              env: dict | None = None, python: list[str] | None = None) -> list[str]:
    """Run `python script args` on `world_size` ranks; return each rank's output (raise on failure)."""
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
        outputs = []
        for log in logs:
            log.flush()
            log.seek(0)
            outputs.append(log.read())
            log.close()
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
    import json

    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


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
