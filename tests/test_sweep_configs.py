"""scripts/sweep_single_gpu.py --configs: a targeted list of configurations replaces the built-in one for the
models it names; a malformed file is refused with one line naming the entry (exit 2) before anything runs."""
import json
import os
import subprocess
import sys

import pytest

from scripts.sweep_single_gpu import CALIBRATION_RUNS, configs, load_configs, model_configs, process_groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"vit-large": [{"bsz": 32, "chunks": 2, "ckpt": 0, "zero": 2, "precision": "fp32"}]}


def test_configs_file_replaces_only_the_models_it_names(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(GOOD))
    custom = load_configs(str(path))
    assert model_configs("vit-large", 24, custom) == GOOD["vit-large"]
    assert model_configs("bert-large", 24, custom) == configs("bert-large", 24)


@pytest.mark.parametrize("data,needle", [
    ([1, 2], "expected {model"),
    ({"vit-large": [{"bsz": 32, "chunks": 2, "ckpt": 0, "zero": 2}]}, "missing: precision"),
    ({"vit-large": [{**GOOD["vit-large"][0], "bsz": "32"}]}, "wrong or missing: bsz"),
    ({"vit-large": [{**GOOD["vit-large"][0], "steps": 3}]}, "steps"),
])
def test_malformed_configs_are_refused(tmp_path, data, needle):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=needle.replace("{", r"\{")):
        load_configs(str(path))
    out = tmp_path / "sweep.jsonl"
    r = subprocess.run([sys.executable, "scripts/sweep_single_gpu.py", "--configs", str(path), "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_precision_filter_keeps_the_order_of_the_rest(tmp_path):
    every = configs("bert-large", 24)
    bf16 = model_configs("bert-large", 24, {}, {"bf16"})
    assert bf16 == [c for c in every if c["precision"] == "bf16"] and 0 < len(bf16) < len(every)
    assert model_configs("vit-large", 24, GOOD, {"bf16"}) == []
    out = tmp_path / "sweep.jsonl"
    r = subprocess.run([sys.executable, "scripts/sweep_single_gpu.py", "--precisions", "bf8", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--precisions bf8" in r.stderr and not out.exists()


def test_processes_zero3_apart_and_calibration_repeats(tmp_path):
    every = configs("bert-large", 24)
    z3 = [i for i, c in enumerate(every) if c["zero"] == 3]
    cal = [[i] for i in range(CALIBRATION_RUNS)]
    groups = process_groups(every, list(range(len(every))), calibration_repeats=3)
    assert groups[:CALIBRATION_RUNS] == cal                                           # each alone, first
    assert groups[CALIBRATION_RUNS] == [i for i in range(CALIBRATION_RUNS, len(every)) if i not in z3]
    assert groups[CALIBRATION_RUNS + 1:CALIBRATION_RUNS + 1 + len(z3)] == [[i] for i in z3]
    assert groups[CALIBRATION_RUNS + 1 + len(z3):] == cal * 2                        # two more fresh processes each
    assert process_groups(every, [5, 6], calibration_repeats=3) == [[5, 6]]         # --skip past them: none
    alone = process_groups(every, list(range(len(every))), per_config=True)
    assert alone == [[i] for i in range(len(every))]                                 # --process-per-config
    out = tmp_path / "sweep.jsonl"
    r = subprocess.run([sys.executable, "scripts/sweep_single_gpu.py", "--calibration-repeats", "0", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--calibration-repeats 0" in r.stderr and not out.exists()


def test_rounds_repeat_the_whole_list_round_after_round(tmp_path):
    every = configs("vit-large", 24)
    one = process_groups(every, list(range(len(every))))
    three = process_groups(every, list(range(len(every))), rounds=3)
    assert three == one * 3 and len(one) == CALIBRATION_RUNS + 1 + 2                 # 3 alone, shared, 2 ZeRO-3
    runs = [i for g in three for i in g]
    assert all(runs.count(i) == 3 for i in range(len(every)))                      # each configuration 3 times
    assert three[len(one)] == [0]                                                    # round 2 starts afresh
    out = tmp_path / "sweep.jsonl"
    r = subprocess.run([sys.executable, "scripts/sweep_single_gpu.py", "--rounds", "0", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--rounds 0" in r.stderr and not out.exists()


def test_a_cpu_sweep_records_its_machine_and_reports(tmp_path):
    """Two bert-test configurations through train.py on CPU: each record names the machine that ran it (host name
    and boot, read here independently), and sweep_report.py scores the second against the first's calibration."""
    cfg = tmp_path / "configs.json"
    cfg.write_text(json.dumps({"bert-test": [dict(bsz=4, chunks=1, ckpt=0, zero=1, precision="fp32"),
                                             dict(bsz=4, chunks=2, ckpt=0, zero=0, precision="fp32")]}))
    out, report = tmp_path / "sweep.jsonl", tmp_path / "report.md"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29641"}
    r = subprocess.run([sys.executable, "scripts/sweep_single_gpu.py", "--models", "bert-test", "--configs", str(cfg),
                        "--steps", "3", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    with open("/proc/sys/kernel/random/boot_id") as f:
        want = f"{os.uname().nodename}/{f.read().strip()[:8]}"
    assert [x["rc"] for x in recs] == [0, 0] and {x["machine"] for x in recs} == {want}
    r = subprocess.run([sys.executable, "scripts/sweep_report.py", "--sweep", str(out), "--hardware", "1xH100",
                        "--calibrate", "1", "--out", str(report)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(report.with_suffix(".json").read_text())["rows"]
    assert [x["status"] for x in rows] == ["calibration", "scored"]        # one machine: no machine in the roles


def test_graphed_sweep_runs_zero3_eager_and_the_rest_graphed():
    """--train-args=--cuda-graphs: train.py refuses to graph ZeRO-3 (exit 2), so the sweep runs those eager and
    records them as such; ZeRO 0-2 keep the flag and every other flag stays."""
    from autotune.plan import Plan
    from scripts.sweep_single_gpu import graph_args

    args = ["--cuda-graphs", "--dropout", "0"]
    for zero, graphed in ((0, True), (1, True), (2, True), (3, False)):
        plan = Plan.uniform(num_layers=4, world_size=1, global_bsz=8, chunks=1, zero_stage=zero, precision="bf16",
                            checkpoint=[0] * 4, model={"name": "bert-test"})
        assert graph_args(plan, args) == (args if graphed else ["--dropout", "0"])
    assert graph_args(plan, ["--dropout", "0"]) == ["--dropout", "0"]


def test_built_in_list_has_twenty_scored_bf16_configurations_without_repeats():
    for model, n in (("bert-large", 24), ("vit-large", 24), ("t5-large", 48), ("swin-base", 24)):
        bf16 = [c for c in configs(model, n) if c["precision"] == "bf16"]
        assert len(bf16) - CALIBRATION_RUNS >= 20
        assert len({tuple(sorted(c.items())) for c in bf16}) == len(bf16)
