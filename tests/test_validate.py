"""autotune/validate.py end to end on CPU: it runs train.py, and its report carries the measured numbers of the
metrics file (recomputed here from the step records), the model's predictions, and the step's bound."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

from autotune.plan import Plan
from tests.dist_launcher import REPO


def _validate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "autotune" / "validate.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


def test_report_matches_the_metrics_file(tmp_path):
    plan = Plan.uniform(num_layers=4, world_size=1, global_bsz=4, chunks=2, checkpoint=[1, 0, 0, 0], precision="fp32",
                        model={"name": "bert-test"})
    plan_path = tmp_path / "plan.json"
    plan.save(str(plan_path))
    out = tmp_path / "v"
    r = _validate("--galvatron-plan", str(plan_path), "--model", "bert-test", "--steps", "4", "--nproc", "1",
                  "--hardware", "1xH100", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [s for s in steps if not s.get("summary")]
    assert len(steps) == 4
    timed = steps[1:]                                     # the first step is warm-up
    want = statistics.median(s["step_time_s"] for s in timed)
    rows = {x["quantity"]: x for x in report["rows"]}
    assert rows["step_time_s"]["measured"] == want
    assert rows["step_time_s"]["rel_err"] == (rows["step_time_s"]["predicted"] - want) / want
    assert rows["stage0_peak_memory_mb"]["measured"] == max(s["peak_memory_mb"] for s in steps)
    share = report["bound"]["measured_host_share"]
    host, dev = (statistics.median(s[k] for s in timed) for k in ("host_backward_s", "device_backward_s"))
    assert share == host / dev and 0.9 < share < 1.1       # on CPU the host runs the backward as it queues it
    assert report["bound"]["predicted"] == ["?"]          # analytic profile: no host / GPU split
    assert (out / "report.png").stat().st_size > 1000
    assert "bound by (model, per stage): unknown" in r.stdout


def test_plan_without_world_size_exits_2(tmp_path):
    d = Plan.uniform(num_layers=2, world_size=1, global_bsz=4, model={"name": "bert-test"}).to_json_dict()
    d.pop("world_size")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    r = _validate("--galvatron-plan", str(path), "--model", "bert-test", "--out", str(tmp_path / "v"))
    assert r.returncode == 2 and "world_size" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "v").exists()


def test_plan_for_another_model_exits_2_before_training(tmp_path):
    path = tmp_path / "plan.json"
    Plan.uniform(num_layers=2, world_size=1, global_bsz=4, model={"name": "bert-test"}).save(str(path))
    r = _validate("--galvatron-plan", str(path), "--model", "bert-test", "--nproc", "1", "--out", str(tmp_path / "v"))
    assert r.returncode == 2 and "lists 2 layers but the model has 4" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "v").exists()
