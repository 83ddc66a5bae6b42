"""Plan schema: round trip, Galvatron files, and errors that name the key."""
import json
import os

import pytest

from autotune.plan import Plan, PlanError, write_json_atomic
from backends.deepspeed.config import make_ds_config

# A Galvatron 2.4 BERT-large plan (its keys only), as in galvatron-algorithm.md section 4.5.
GALVATRON_BERT = {"pp_deg": 1, "tp_sizes_enc": ",".join(["2"] * 24), "tp_consecutive_flags": ",".join(["1"] * 24),
                  "dp_types_enc": ",".join(["0"] * 24), "use_sp": ",".join(["0"] * 24),
                  "checkpoint": ",".join(["0"] * 24), "global_bsz": 128, "chunks": 4, "pp_division": "24",
                  "pipeline_type": "pipedream_flush", "default_dp_type": "zero2", "vtp": 2, "vsp": 0}


def test_round_trip(tmp_path):
    p = Plan.uniform(num_layers=6, world_size=8, pp=2, tp=2, zero_stage=1, chunks=4, global_bsz=32,
                     checkpoint=[1, 0, 0, 1, 0, 0], model={"name": "bert-test"})
    path = tmp_path / "plan.json"
    p.save(str(path))
    raw = json.loads(path.read_text())
    assert raw["tp_sizes_enc"] == "2,2,2,2,2,2" and raw["checkpoint"] == "1,0,0,1,0,0"
    assert raw["pp_division"] == "3,3" and raw["micro_batch_size"] == 32 // (4 * 2)
    q = Plan.load(str(path))
    assert q == p


def test_galvatron_plan_loads():
    p = Plan.from_dict(GALVATRON_BERT)
    assert p.zero_stage == 2 and p.pp_deg == 1 and p.tp_sizes_enc == [2] * 24 and p.vtp == 2
    p.validate(world_size=8, num_layers=24)
    assert p.dp_deg == 4 and p.micro_batch_size == 128 // (4 * 4)
    ds = make_ds_config(p)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] * 4 * 4 == ds["train_batch_size"] == 128


def test_galvatron_all_zero3_means_stage3():
    d = dict(GALVATRON_BERT, dp_types_enc=",".join(["1"] * 24))
    assert Plan.from_dict(d).zero_stage == 3


@pytest.mark.parametrize("change,needle", [
    ({"tp_sizes_enc": None}, "'tp_sizes_enc' is missing"),
    ({"checkpoint": "0,1"}, "'checkpoint' has 2 entries"),
    ({"tp_sizes_enc": "2,x"}, "'tp_sizes_enc' must hold integers"),
    ({"pp_deg": 2, "pp_division": "12,12", "default_dp_type": "zero2"}, "DeepSpeed pipelines allow ZeRO 0 or 1"),
    ({"dp_types_enc": ",".join(["0", "1"] * 12)}, "mixes ZeRO-3"),
    ({"use_sp": "1"}, "'use_sp'"),
    ({"pp_division": "20"}, "'pp_division'"),
    ({"default_dp_type": "fsdp"}, "'default_dp_type'"),
    ({"schema_version": 99}, "newer"),
])
def test_errors_name_the_key(change, needle):
    d = dict(GALVATRON_BERT)
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    with pytest.raises(PlanError, match=needle.replace("(", r"\(")):
        Plan.from_dict(d)


def test_world_size_checks():
    p = Plan.from_dict(GALVATRON_BERT)
    with pytest.raises(PlanError, match="not divisible"):
        Plan.from_dict(dict(GALVATRON_BERT, chunks=3)).validate(world_size=8)
    with pytest.raises(PlanError, match="does not factor"):
        p.validate(world_size=7)
    with pytest.raises(PlanError, match="'pp_deg'=4 does not divide world_size=2"):
        Plan.from_dict({"pp_deg": 4, "tp_sizes_enc": "1,1,1,1", "global_bsz": 4, "chunks": 1}).validate(world_size=2)
    q = Plan.uniform(num_layers=4, world_size=4, tp=2, global_bsz=8)
    with pytest.raises(PlanError, match="made for world_size=4"):
        q.validate(world_size=8)
    with pytest.raises(PlanError, match="model has 5"):
        q.validate(num_layers=5)


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(str(bad))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"x": object()})
    assert os.listdir(tmp_path) == []
    write_json_atomic(str(path), {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1} and os.listdir(tmp_path) == ["out.json"]


def test_describe():
    p = Plan.uniform(num_layers=4, world_size=8, tp=2, zero_stage=3, checkpoint=[1, 1, 0, 0], global_bsz=8)
    assert p.describe() == "1-2*-4f-c x2, 1-2*-4f x2"


def test_ds_config_zero0_bf16_accumulates_in_model_dtype():
    p = Plan.uniform(num_layers=2, world_size=2, global_bsz=4, zero_stage=0)
    assert "data_types" not in make_ds_config(p)  # DeepSpeed rejects fp32 accumulation without ZeRO
    p1 = Plan.uniform(num_layers=2, world_size=2, global_bsz=4, zero_stage=1)
    assert make_ds_config(p1)["data_types"]["grad_accum_dtype"] == "fp32"
