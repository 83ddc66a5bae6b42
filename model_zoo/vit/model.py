"""ViT runtime adapter: image classification (ViTForImageClassification).

Layer sequence:
    embed: patch embedding + [CLS] + position embeddings
    layers: ViTLayer x L on (hidden,)
    head:  final LayerNorm, classifier on the [CLS] token
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from model_zoo.adapter import Batch, FamilyAdapter, LayerSequence, PipeEntry, TPGroups
from model_zoo.common import batch_generator, classification_loss, encoder_layer_flops, record_label
from model_zoo.tp import column_parallel, fork_rng_in_forward, heads_per_partition, row_parallel


class Embed(nn.Module):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, inputs: tuple) -> tuple:
        return (self.embeddings(inputs[0]),)


class LayerEntry(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, inputs: tuple) -> tuple:
        return (self.layer(inputs[0], None),)


class ClassifierHead(nn.Module):
    def __init__(self, layernorm: nn.Module, classifier: nn.Module):
        super().__init__()
        self.layernorm, self.classifier = layernorm, classifier

    def forward(self, inputs: tuple) -> torch.Tensor:
        return self.classifier(self.layernorm(inputs[0])[:, 0, :])


def _pixels(record: dict, config: ViTConfig) -> torch.Tensor:
    if "pixel_values" in record:
        return torch.as_tensor(record["pixel_values"], dtype=torch.float32)
    if "image" not in record:
        raise KeyError("ViT data records need 'pixel_values' or 'image'")
    size = config.image_size
    img = record["image"].convert("RGB").resize((size, size), resample=2)   # 2 = PIL bilinear
    x = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255.0
    return (x - 0.5) / 0.5


def _num_tokens(config: ViTConfig) -> int:
    return (config.image_size // config.patch_size) ** 2 + 1


class ViTAdapter(FamilyAdapter):
    family = "vit"
    tasks = ("image-classification",)
    default_task = "image-classification"

    def build_model(self, config: ViTConfig, task: str, state_dict: dict | None = None) -> nn.Module:
        self.check_task(task)
        model = ViTForImageClassification(config)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model.train()

    def num_layers(self, config: ViTConfig) -> int:
        return config.num_hidden_layers

    def tensor_parallelize(self, model: nn.Module, task: str, tp: TPGroups) -> nn.Module:
        for i, layer in enumerate(model.vit.layers):
            g = tp.layer(i)
            if g.size() == 1:
                continue
            att = layer.attention
            att.num_attention_heads = heads_per_partition(att.num_attention_heads, g)
            att.q_proj, att.k_proj, att.v_proj = (column_parallel(m, g) for m in (att.q_proj, att.k_proj, att.v_proj))
            att.o_proj = row_parallel(att.o_proj, g)
            fork_rng_in_forward(att)
            layer.mlp.fc1 = column_parallel(layer.mlp.fc1, g)
            layer.mlp.fc2 = row_parallel(layer.mlp.fc2, g)
        return model

    def layer_sequence(self, model: nn.Module, task: str) -> LayerSequence:
        return LayerSequence(
            embed=[PipeEntry(Embed(model.vit.embeddings), "embed")],
            layers=[PipeEntry(LayerEntry(layer), "layer") for layer in model.vit.layers],
            head=[PipeEntry(ClassifierHead(model.vit.layernorm, model.classifier), "head")],
            loss_fn=classification_loss(model.config.num_labels))

    def synthetic_batch(self, config: ViTConfig, task: str, num_samples: int, seed: int, step: int,
                        seq_len: int | None = None) -> Batch:
        g = batch_generator(seed, step)
        pixels = torch.randn(num_samples, config.num_channels, config.image_size, config.image_size, generator=g)
        labels = torch.randint(0, max(config.num_labels, 1), (num_samples,), generator=g)
        return {"pixel_values": pixels, "labels": labels}

    def collate(self, config: ViTConfig, task: str, records: list[dict], seed: int, step: int,
                seq_len: int | None = None) -> Batch:
        """Records with `pixel_values` ([C, H, W] at the model's size) or `image` (PIL), and `label`.

        Images are converted to RGB, resized to the model's size and scaled to [-1, 1] (ViT's
        default image processor: mean = std = 0.5).
        """
        pixels = torch.stack([_pixels(r, config) for r in records])
        labels = torch.tensor([record_label(r) for r in records], dtype=torch.long)
        return {"pixel_values": pixels, "labels": labels}

    def split_batch(self, batch: Batch, task: str) -> tuple[tuple, torch.Tensor]:
        return (batch["pixel_values"],), batch["labels"]

    def flops_per_sample(self, config: ViTConfig, task: str, seq_len: int | None = None) -> float:
        S, H = _num_tokens(config), config.hidden_size
        patch = 2 * (S - 1) * config.num_channels * config.patch_size ** 2 * H
        fwd = patch + config.num_hidden_layers * encoder_layer_flops(S, H, config.intermediate_size)
        fwd += 2 * H * config.num_labels
        return 3.0 * fwd


ADAPTER = ViTAdapter()
