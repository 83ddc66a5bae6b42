"""autotune/profile_workspace.py: what runs on CPU (its plumbing and its refusal), and how the cost
model uses measured backward workspaces (hand arithmetic on the bert-test profile)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from autotune.cost_model import CostModel, LayerStrategy, Setting
from autotune.hardware import load_hardware
from autotune.model_profile import ModelProfile
from model_zoo import get_model_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1024 * 1024

# On CPU there are no allocator statistics: the measurement is replaced by one that runs the backward
# and reports which parameters got gradients, so the test sees what head_workspace differentiates.
PLUMBING = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import autotune.profile_workspace as pw
seen = []
def fake(run_backward, device, params):
    run_backward()
    seen.append([p.grad is not None for p in params])
    return 0
pw._peak_above_start = fake
out = pw.head_workspace(sys.argv[1], None, "fp32", (1, 2))
print(json.dumps({"batches": sorted(out), "head_grads": seen}))
"""


@pytest.mark.parametrize("model,port", [("bert-test", "29611"), ("t5-test", "29612")])
def test_head_workspace_differentiates_only_the_head(model, port):
    r = subprocess.run([sys.executable, "-c", PLUMBING, model, port], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["batches"] == [1, 2]
    # every head parameter received a gradient from the loss, in the untimed first run and at both sizes
    assert len(got["head_grads"]) == 3 and all(all(g) and g for g in got["head_grads"])


def test_cli_refuses_without_cuda(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{}")
    r = subprocess.run([sys.executable, "autotune/profile_workspace.py", "--model", "bert-test", "--model-profile",
                        str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "GPU" in r.stderr
    assert path.read_text() == "{}"


@pytest.mark.parametrize("batches", ["8", "32,8", "8,x"])
def test_cli_refuses_bad_batches(tmp_path, batches):
    path = tmp_path / "p.json"
    path.write_text("{}")
    r = subprocess.run([sys.executable, "autotune/profile_workspace.py", "--model", "bert-test", "--model-profile",
                        str(path), "--batches", batches], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--batches" in r.stderr.strip().splitlines()[-1]
    assert path.read_text() == "{}"


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ws") / "bert-test.json")
    r = subprocess.run([sys.executable, "autotune/profile_model.py", "--model", "bert-test", "--device", "cpu",
                        "--batch-sizes", "1,2", "--tp", "1", "--out", out], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return ModelProfile.load(out)


def test_cost_model_uses_measured_workspace(profile):
    spec = get_model_spec("bert-test", precision=profile.precision)
    lt = spec.layer_types[0]
    hw = load_hardware("1xH100")
    setting = Setting(world=1, pp=1, zero=0, chunks=1, global_bsz=4)
    full = profile.act_bytes(lt.name, 1, False)
    head_act = profile.other_act_bytes("last", 1)
    before = CostModel(spec, hw, profile)
    # unmeasured: one layer's full activations; checkpointed: recompute (full) + that again
    assert before.layer_cost(lt, LayerStrategy(), setting, 0).transient_bytes == pytest.approx(4 * full)
    assert before.layer_cost(lt, LayerStrategy(checkpoint=True), setting, 0).transient_bytes == \
        pytest.approx(4 * 2 * full)
    assert before.other_cost("last", setting, 0, 1).transient_bytes == pytest.approx(4 * head_act)
    profile.layer_types[lt.name].tp[1].raw["bwd_workspace_bytes"] = 1000
    profile.other["last"][1].raw["bwd_workspace_bytes"] = 3000
    try:
        cm = CostModel(spec, hw, profile)
        assert cm.layer_cost(lt, LayerStrategy(), setting, 0).transient_bytes == pytest.approx(4 * 1000)
        assert cm.layer_cost(lt, LayerStrategy(checkpoint=True), setting, 0).transient_bytes == \
            pytest.approx(4 * (full + 1000))
        assert cm.other_cost("last", setting, 0, 1).transient_bytes == pytest.approx(4 * 3000)
        # saved activations are not touched by the workspace
        assert cm.layer_cost(lt, LayerStrategy(), setting, 0).act_bytes == \
            before.layer_cost(lt, LayerStrategy(), setting, 0).act_bytes
    finally:
        del profile.layer_types[lt.name].tp[1].raw["bwd_workspace_bytes"]
        del profile.other["last"][1].raw["bwd_workspace_bytes"]
