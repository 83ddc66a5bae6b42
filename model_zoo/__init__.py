"""Model families (bert, t5, vit, swin): planner descriptions and runtime adapters.

`get_model_spec(name_or_path)` is the planner's entry point: a preset name, an HF config file, or an
HF checkpoint folder. Family knowledge lives only in model_zoo/<family>/. Names are resolved lazily
so that importing model_zoo.base does not import transformers.
"""
_REGISTRY_NAMES = ("FAMILIES", "PRESETS", "ModelInputError", "get_model_spec", "load_hf_config")


def __getattr__(name):
    if name in _REGISTRY_NAMES:
        from model_zoo import registry
        return getattr(registry, name)
    raise AttributeError(f"module 'model_zoo' has no attribute {name!r}")
