"""Model presets and the planner's entry point `get_model_spec`.

A model is named by a preset (below), a path to a Hugging Face config .json file, or an HF checkpoint
folder (containing config.json). Nothing is downloaded: presets are plain config kwargs.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from transformers import AutoConfig, PretrainedConfig

from model_zoo.base import PRECISION_BYTES, ModelSpec

# HF model_type -> family module under model_zoo/. RoBERTa is not accepted: its embeddings and LM head
# differ from BERT's (position offset, separate head classes), so BERT's accounting would be wrong.
FAMILIES: dict[str, str] = {"bert": "bert", "t5": "t5", "vit": "vit", "swin": "swin"}

# Family -> (tasks it supports, default task).
TASKS: dict[str, tuple[tuple[str, ...], str]] = {
    "bert": (("mlm", "text-classification"), "mlm"),
    "t5": (("seq2seq",), "seq2seq"),
    "vit": (("image-classification",), "image-classification"),
    "swin": (("image-classification",), "image-classification"),
}


class ModelInputError(ValueError):
    """A model name, path, task, precision or sequence length the planner cannot use (message says the fix)."""


@dataclass(frozen=True)
class Preset:
    family: str                       # key of FAMILIES' values
    config: Mapping[str, Any]         # HF config kwargs (everything else: the HF config class defaults)
    task: str                         # default task
    seq_len: int | tuple[int, int] | None  # default tokens per sample (T5: (encoder, decoder)); vision: None
    source: str                       # where the numbers come from


# Every dropout of the test presets is 0 so that parallel layouts can be compared exactly; their vocab
# (1003) is not a multiple of any TP degree > 1, to exercise vocab padding; heads are divisible by 4.
_NO_DROPOUT_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
_NO_DROPOUT_VISION = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_T5_TOKENS = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)   # as in google-t5 configs

PRESETS: dict[str, Preset] = {
    "bert-base": Preset("bert", dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072),
                        "mlm", 512, "google-bert/bert-base-uncased config"),
    "bert-large": Preset("bert", dict(model_type="bert", vocab_size=30522, hidden_size=1024, num_hidden_layers=24,
                                      num_attention_heads=16, intermediate_size=4096),
                         "mlm", 512, "google-bert/bert-large-uncased config"),
    "bert-huge-32": Preset("bert", dict(model_type="bert", vocab_size=30522, hidden_size=1280, num_hidden_layers=32,
                                        num_attention_heads=16, intermediate_size=5120),
                           "mlm", 512, "Galvatron's bert-huge-32 (BERT-large vocab, hidden 1280, 32 layers)"),
    "bert-test": Preset("bert", dict(model_type="bert", vocab_size=1003, hidden_size=64, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=256, max_position_embeddings=64,
                                     **_NO_DROPOUT_BERT),
                        "mlm", 32, "tiny test model (dropout 0, odd vocab)"),
    "t5-base": Preset("t5", dict(model_type="t5", vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                                 num_decoder_layers=12, num_heads=12, **_T5_TOKENS),
                      "seq2seq", (512, 128), "google-t5/t5-base config"),
    "t5-large": Preset("t5", dict(model_type="t5", vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24,
                                  num_decoder_layers=24, num_heads=16, **_T5_TOKENS),
                       "seq2seq", (512, 128), "google-t5/t5-large config"),
    "t5-3b": Preset("t5", dict(model_type="t5", vocab_size=32128, d_model=1024, d_kv=128, d_ff=16384, num_layers=24,
                               num_decoder_layers=24, num_heads=32, **_T5_TOKENS),
                    "seq2seq", (512, 128), "google-t5/t5-3b config"),
    "t5-test": Preset("t5", dict(model_type="t5", vocab_size=1003, d_model=64, d_kv=16, d_ff=256, num_layers=2,
                                 num_decoder_layers=2, num_heads=4, dropout_rate=0.0, classifier_dropout=0.0,
                                 **_T5_TOKENS),
                      "seq2seq", (32, 16), "tiny test model (dropout 0, odd vocab)"),
    "vit-base": Preset("vit", dict(model_type="vit", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                   intermediate_size=3072, image_size=224, patch_size=16, num_labels=1000),
                       "image-classification", None, "google/vit-base-patch16-224 config"),
    "vit-large": Preset("vit", dict(model_type="vit", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    intermediate_size=4096, image_size=224, patch_size=16, num_labels=1000),
                        "image-classification", None, "google/vit-large-patch16-224 config"),
    "vit-huge": Preset("vit", dict(model_type="vit", hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                   intermediate_size=5120, image_size=224, patch_size=14, num_labels=1000),
                       "image-classification", None,
                       "google/vit-huge-patch14-224-in21k config, with a 1000-class head"),
    "vit-test": Preset("vit", dict(model_type="vit", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   intermediate_size=256, image_size=32, patch_size=4, num_labels=10,
                                   **_NO_DROPOUT_VISION),
                       "image-classification", None, "tiny test model (dropout 0, 32 px)"),
    "swin-base": Preset("swin", dict(model_type="swin", embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                                     window_size=7, image_size=224, patch_size=4, num_labels=1000),
                        "image-classification", None, "microsoft/swin-base-patch4-window7-224 config"),
    "swin-large": Preset("swin", dict(model_type="swin", embed_dim=192, depths=[2, 2, 18, 2],
                                      num_heads=[6, 12, 24, 48], window_size=7, image_size=224, patch_size=4,
                                      num_labels=1000),
                         "image-classification", None, "microsoft/swin-large-patch4-window7-224 config"),
    "swin-huge": Preset("swin", dict(model_type="swin", embed_dim=384, depths=[2, 2, 42, 2],
                                     num_heads=[12, 24, 48, 96], window_size=7, image_size=224, patch_size=4,
                                     num_labels=1000),
                        "image-classification", None, "Galvatron's swin-huge (embed 384, depths 2-2-42-2)"),
    "swin-test": Preset("swin", dict(model_type="swin", embed_dim=32, depths=[2, 2], num_heads=[4, 8], window_size=4,
                                     image_size=32, patch_size=2, num_labels=10, drop_path_rate=0.0,
                                     **_NO_DROPOUT_VISION),
                        "image-classification", None,
                        "tiny test model (dropout 0, 32 px, shifted windows in both stages)"),
}


def _unknown(name: str) -> ModelInputError:
    return ModelInputError(f"unknown model '{name}': use a preset ({', '.join(PRESETS)}) "
                           f"or a path to an HF config file or checkpoint folder")


def _config_from_preset(preset: Preset) -> PretrainedConfig:
    kwargs = dict(preset.config)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def _config_from_path(path: Path, name: str) -> PretrainedConfig:
    """Read an HF config without going to the hub; a folder must hold config.json."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise _unknown(name)
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelInputError(f"cannot read HF config '{file}': {exc}; give a valid config.json") from exc
    if model_type not in FAMILIES:
        raise ModelInputError(f"model '{name}' has model_type '{model_type}', which is not supported: "
                              f"use a {', '.join(FAMILIES)} config")
    return AutoConfig.from_pretrained(str(file))


def load_hf_config(name_or_path: str | Path) -> PretrainedConfig:
    """HF config of a preset name, an HF config .json file, or an HF checkpoint folder."""
    name = str(name_or_path)
    if name in PRESETS:
        return _config_from_preset(PRESETS[name])
    path = Path(name).expanduser()
    if path.exists():
        return _config_from_path(path, name)
    raise _unknown(name)


def family_module(model_type: str):
    """The model_zoo.<family> module for an HF model_type."""
    if model_type not in FAMILIES:
        raise ModelInputError(f"model_type '{model_type}' is not supported: use a {', '.join(FAMILIES)} config")
    return importlib.import_module(f"model_zoo.{FAMILIES[model_type]}")


# HF architecture names (config.architectures of a checkpoint) -> the task they were saved for.
ARCHITECTURE_TASKS = {"BertForMaskedLM": "mlm", "BertForPreTraining": "mlm",
                      "BertForSequenceClassification": "text-classification"}


def default_task(config: PretrainedConfig, preset: Preset | None) -> str:
    """The preset's task, else the one the checkpoint's architecture was saved for, else the family's."""
    if preset is not None:
        return preset.task
    for arch in getattr(config, "architectures", None) or ():
        if arch in ARCHITECTURE_TASKS:
            return ARCHITECTURE_TASKS[arch]
    return TASKS[FAMILIES[config.model_type]][1]


def _check_task(family: str, task: str | None, default: str) -> str:
    tasks, _ = TASKS[family]
    task = task or default
    if task not in tasks:
        raise ModelInputError(f"task '{task}' is not supported for {family}: use one of {', '.join(tasks)}")
    return task


def _check_seq_len(seq_len: Any) -> None:
    values = seq_len if isinstance(seq_len, tuple) else (seq_len,)
    if seq_len is not None and not all(isinstance(v, int) and v > 0 for v in values):
        raise ModelInputError(f"bad seq_len {seq_len!r}: give a positive int (T5: int or (encoder, decoder))")


def get_model_spec(name_or_path: str | Path, precision: str = "bf16", seq_len: int | tuple[int, int] | None = None,
                   task: str | None = None, device: str = "cuda") -> ModelSpec:
    """The planner's description of a model (see model_zoo/base.py).

    seq_len overrides the tokens per sample of text models (T5: an int sets the encoder length and keeps
    the preset's decoder/encoder ratio; a tuple sets both). `device` picks whose attention kernels the
    activation bytes model ("cuda" for planning, "cpu" for the CPU tests).
    """
    if precision not in PRECISION_BYTES:
        raise ModelInputError(f"unknown precision '{precision}': use one of {', '.join(PRECISION_BYTES)}")
    if device not in ("cuda", "cpu"):
        raise ModelInputError(f"unknown device '{device}': use 'cuda' or 'cpu'")
    _check_seq_len(seq_len)
    config = load_hf_config(name_or_path)
    module = family_module(config.model_type)
    family = FAMILIES[config.model_type]
    preset = PRESETS.get(str(name_or_path))
    task = _check_task(family, task, default_task(config, preset))
    if seq_len is None and preset is not None:
        seq_len = preset.seq_len
    return module.describe(config, precision, seq_len, task, name=str(name_or_path), device=device)
