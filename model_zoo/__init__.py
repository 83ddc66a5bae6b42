"""Model families (bert, t5, vit, swin): planner descriptions and runtime adapters.

`get_model_spec(name_or_path)` is the planner's entry point: a preset name, an HF config file, or an
HF checkpoint folder. Family knowledge lives only in model_zoo/<family>/.
"""
from model_zoo.registry import FAMILIES, PRESETS, ModelInputError, get_model_spec, load_hf_config  # noqa: F401
