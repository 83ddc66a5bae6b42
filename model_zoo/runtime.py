"""Runtime dispatch: family name -> its FamilyAdapter (model_zoo/<family>/model.py defines `ADAPTER`).

Imported lazily so that the planner never pays for (or depends on) the runtime model code.
"""
from __future__ import annotations

import importlib

from model_zoo.adapter import FamilyAdapter

RUNTIME_FAMILIES = ("bert", "vit", "t5", "swin")


def get_adapter(family: str) -> FamilyAdapter:
    if family not in RUNTIME_FAMILIES:
        raise ValueError(f"no runtime adapter for model family {family!r}; known: {', '.join(RUNTIME_FAMILIES)}")
    module = importlib.import_module(f"model_zoo.{family}.model")
    adapter = getattr(module, "ADAPTER", None)
    if not isinstance(adapter, FamilyAdapter):
        raise TypeError(f"model_zoo/{family}/model.py must define ADAPTER, an instance of FamilyAdapter")
    return adapter
