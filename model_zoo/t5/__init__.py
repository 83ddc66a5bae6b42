"""T5 family: planner description (spec.py)."""
from model_zoo.t5.spec import (describe, layer_inputs, make_layer, rebuilt_inputs, shared_inputs,  # noqa: F401
                                tp_shard_config)
