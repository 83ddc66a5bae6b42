"""T5 family: planner description (spec.py)."""
from model_zoo.t5.spec import describe, layer_inputs, make_layer, shared_inputs, tp_shard_config  # noqa: F401
