"""Swin runtime adapter: image classification (SwinForImageClassification).

Layer sequence:
    embed:  patch embedding + LayerNorm (+ absolute positions when configured) + dropout   -> (hidden,)
    layers: every SwinLayer of every stage in order, on (hidden,); the last layer of a stage also runs
            that stage's patch merging (HF runs it at the end of the stage), so the plan's per-layer
            lists cover exactly the SwinLayers and stage boundaries need no entries of their own
    head:   final LayerNorm, average pool over tokens, classifier

A layer's spatial size (height, width of its token grid) is fixed by the config, so each entry
knows it and only the hidden state crosses pipeline stages; shifted-window masks are rebuilt by
the SwinLayer itself from its shift size.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn
from transformers import SwinConfig, SwinForImageClassification

from model_zoo.adapter import Batch, FamilyAdapter, LayerSequence, PipeEntry, TPGroups
from model_zoo.common import batch_generator, classification_loss, record_label
from model_zoo.tp import column_parallel, fork_rng_in_forward, heads_per_partition, row_parallel

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


# ---------------------------------------------------------------------------------------------- entries
class Embed(nn.Module):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, inputs: tuple) -> tuple:
        return (self.embeddings(inputs[0])[0],)


class LayerEntry(nn.Module):
    """One SwinLayer at its stage's resolution, plus the stage's patch merging when it is the last layer."""

    def __init__(self, layer: nn.Module, input_dimensions: tuple[int, int], downsample: nn.Module | None):
        super().__init__()
        self.layer, self.input_dimensions, self.downsample = layer, input_dimensions, downsample

    def forward(self, inputs: tuple) -> tuple:
        hidden = self.layer(inputs[0], self.input_dimensions)[0]
        if self.downsample is not None:
            hidden = self.downsample(hidden, self.input_dimensions)
        return (hidden,)


class ClassifierHead(nn.Module):
    def __init__(self, layernorm: nn.Module, pooler: nn.Module, classifier: nn.Module):
        super().__init__()
        self.layernorm, self.pooler, self.classifier = layernorm, pooler, classifier

    def forward(self, inputs: tuple) -> torch.Tensor:
        hidden = self.layernorm(inputs[0])
        return self.classifier(torch.flatten(self.pooler(hidden.transpose(1, 2)), 1))


# ---------------------------------------------------------------------------------------------- geometry
def _pair(x: Any) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def stage_resolutions(config: SwinConfig) -> list[tuple[int, int]]:
    """Token grid (height, width) entering each stage, as SwinModel computes it (padding rounds up)."""
    (ih, iw), (ph, pw) = _pair(config.image_size), _pair(config.patch_size)
    h, w = math.ceil(ih / ph), math.ceil(iw / pw)
    out = []
    for _ in config.depths:
        out.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return out


def _pixels(record: dict, config: SwinConfig) -> torch.Tensor:
    if "pixel_values" in record:
        return torch.as_tensor(record["pixel_values"], dtype=torch.float32)
    if "image" not in record:
        raise KeyError(f"Swin data records need 'pixel_values' or 'image'; this one has {', '.join(record)}")
    h, w = _pair(config.image_size)
    img = record["image"].convert("RGB").resize((w, h), resample=3)          # 3 = PIL bicubic
    x = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255.0
    return (x - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]


# ---------------------------------------------------------------------------------------------- TP
def _shard_bias_table(bias: nn.Module, group: Any) -> None:
    """Keep this rank's heads of the relative position bias table.

    The table is (relative positions, heads) and the index buffer selects rows (positions), so
    slicing the head columns gives each rank exactly the bias of its own heads; the index is unchanged.
    """
    table = bias.relative_position_bias_table
    local = heads_per_partition(table.shape[1], group, "Swin relative position bias")
    rank = group.rank()
    shard = nn.Parameter(table.detach()[:, rank * local:(rank + 1) * local].clone())
    set_tensor_model_parallel_attributes(shard, True, 1, 1)
    bias.relative_position_bias_table = shard
    bias.tp_group = group             # the shard's group, for exports (backends/export.py)


def _parallelize_layer(layer: nn.Module, group: Any) -> None:
    att = layer.attention
    att.num_attention_heads = heads_per_partition(att.num_attention_heads, group, "Swin window attention")
    att.q_proj, att.k_proj, att.v_proj = (column_parallel(m, group) for m in (att.q_proj, att.k_proj, att.v_proj))
    att.o_proj = row_parallel(att.o_proj, group)
    _shard_bias_table(att.relative_position_bias, group)
    fork_rng_in_forward(att)          # dropout on attention probabilities of this rank's heads
    layer.mlp.fc1 = column_parallel(layer.mlp.fc1, group)
    layer.mlp.fc2 = row_parallel(layer.mlp.fc2, group)


def _layers(model: nn.Module) -> list[nn.Module]:
    return [layer for stage in model.swin.encoder.layers for layer in stage.blocks]


# ---------------------------------------------------------------------------------------------- adapter
class SwinAdapter(FamilyAdapter):
    family = "swin"
    tasks = ("image-classification",)
    default_task = "image-classification"

    def build_model(self, config: SwinConfig, task: str, state_dict: dict | None = None) -> nn.Module:
        self.check_task(task)
        model = SwinForImageClassification(config)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model.train()

    def num_layers(self, config: SwinConfig) -> int:
        return sum(config.depths)

    def tensor_parallelize(self, model: nn.Module, task: str, tp: TPGroups) -> nn.Module:
        for i, layer in enumerate(_layers(model)):
            g = tp.layer(i)
            if g.size() > 1:
                _parallelize_layer(layer, g)
        return model

    def layer_sequence(self, model: nn.Module, task: str) -> LayerSequence:
        swin = model.swin
        layers = []
        for stage, dims in zip(swin.encoder.layers, stage_resolutions(model.config)):
            for j, layer in enumerate(stage.blocks):
                down = stage.downsample if j == len(stage.blocks) - 1 else None
                layers.append(PipeEntry(LayerEntry(layer, dims, down), "layer"))
        return LayerSequence(
            embed=[PipeEntry(Embed(swin.embeddings), "embed")],
            layers=layers,
            head=[PipeEntry(ClassifierHead(swin.layernorm, swin.pooler, model.classifier), "head")],
            loss_fn=classification_loss(model.config.num_labels))

    # ------------------------------------------------------------------ data
    def synthetic_batch(self, config: SwinConfig, task: str, num_samples: int, seed: int, step: int,
                        seq_len: int | None = None) -> Batch:
        g = batch_generator(seed, step)
        h, w = _pair(config.image_size)
        pixels = torch.randn(num_samples, config.num_channels, h, w, generator=g)
        n = max(config.num_labels, 1)
        labels = torch.randn(num_samples, generator=g) if n == 1 else torch.randint(0, n, (num_samples,), generator=g)
        return {"pixel_values": pixels, "labels": labels}

    def collate(self, config: SwinConfig, task: str, records: list[dict], seed: int, step: int,
                seq_len: int | None = None) -> Batch:
        """Records with `pixel_values` ([C, H, W] at the model's size) or `image` (PIL), and `label`.

        Images are converted to RGB, resized (bicubic) to the model's size and normalized with the
        ImageNet mean and std, as Swin's image processor does.
        """
        pixels = torch.stack([_pixels(r, config) for r in records])
        dtype = torch.float if config.num_labels == 1 else torch.long
        labels = torch.tensor([record_label(r) for r in records], dtype=dtype)
        return {"pixel_values": pixels, "labels": labels}

    def split_batch(self, batch: Batch, task: str) -> tuple[tuple, torch.Tensor]:
        return (batch["pixel_values"],), batch["labels"]

    def flops_per_sample(self, config: SwinConfig, task: str, seq_len: int | None = None) -> float:
        ph, pw = _pair(config.patch_size)
        res = stage_resolutions(config)
        dim = config.embed_dim
        fwd = 2.0 * res[0][0] * res[0][1] * config.num_channels * ph * pw * dim            # patch projection
        for k, ((h, w), depth) in enumerate(zip(res, config.depths)):
            dim = int(config.embed_dim * 2 ** k)
            ws = min(config.window_size, h, w)
            tokens = math.ceil(h / ws) * ws * math.ceil(w / ws) * ws                       # padded to windows
            ffn = int(config.mlp_ratio * dim)
            layer = 2 * tokens * dim * dim * 4 + 2 * tokens * ws * ws * dim * 2 + 2 * h * w * dim * ffn * 2
            fwd += depth * layer
            if k < len(config.depths) - 1:                                                # patch merging
                fwd += 2 * ((h + 1) // 2) * ((w + 1) // 2) * 4 * dim * 2 * dim
        fwd += 2 * dim * max(config.num_labels, 1)
        return 3.0 * fwd


ADAPTER = SwinAdapter()
