"""Vision Transformers with adapter sites: a small ViT of regstory's own (``vit_tiny``, CPU-sized for 8x8 digits) and
torchvision's ``vit_b_16`` (ImageNet weights with ``arch.pretrained=true``).

Every encoder block has two **adapter sites**, empty (``nn.Identity``) until a method fills them: after the
multi-head self-attention and after the MLP sub-layer, before each residual sum (Houlsby et al. 2019; thesis
Fig. 2.9)::

    x = x + adapter_attn(MSA(LN_1(x)))
    x = x + adapter_mlp(MLP(LN_2(x)))

A block declares its sites with ``adapter_slots`` (attribute names) and ``width`` (the token dimension M);
:func:`adapter_sites` lists them for any model (``{"blocks.0.adapter_attn": 64, ...}``; none for a model without
such blocks). Empty sites hold no tensors, so a plain run of these architectures saves the same state dict as the
backbone alone, and a MiMi run (:mod:`regstory.pruning.mimi`) loads it before filling the sites.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regstory.models.base import Classifier, model_option
from regstory.models.torchvision_models import build_torchvision
from regstory.options import Range

SLOTS = ("adapter_attn", "adapter_mlp")


def adapter_sites(model: nn.Module) -> dict[str, int]:
    """``{site module name: width}`` of every adapter site of ``model``, in forward order (empty: no sites)."""
    sites: dict[str, int] = {}
    for name, module in model.named_modules():
        for slot in getattr(module, "adapter_slots", ()):
            sites[f"{name}.{slot}" if name else slot] = int(module.width)
    return sites


class Block(nn.Module):
    """Pre-norm transformer encoder block with an adapter site after each sub-layer."""

    adapter_slots = SLOTS

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.width = dim
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.adapter_attn: nn.Module = nn.Identity()
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                                 nn.Dropout(dropout))
        self.adapter_mlp: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        x = x + self.adapter_attn(h)
        return x + self.adapter_mlp(self.mlp(self.ln_2(x)))


class ViT(Classifier):
    """ViT (Dosovitskiy et al. 2021) at small scale: non-overlapping ``patch`` x ``patch`` patches embedded by a strided
    convolution, a class token and learnt position embeddings, ``depth`` pre-norm blocks, a final LayerNorm; the
    bottleneck is the class token's output."""

    def __init__(self, input_shape, num_classes: int, patch: int = 2, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"vit takes images (channels, height, width), got inputs of shape {tuple(input_shape)}")
        c, h, w = (int(d) for d in input_shape)
        if h % patch or w % patch:
            raise ValueError(f"arch.patch={patch} must divide the image size {h}x{w}")
        if dim % heads:
            raise ValueError(f"arch.dim={dim} must be a multiple of arch.heads={heads}")
        self.patch_embed = nn.Conv2d(c, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (h // patch) * (w // patch), dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's ViT initialisation: truncated normal (std 0.02) for position embeddings, class token and Linear
        weights, zero biases, LayerNorm 1/0."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


Positive = Annotated[int, Range(ge=1)]


@model_option("vit_tiny", data="digits")
def vit_tiny(input_shape, num_classes: int, patch: Positive = 2, dim: Positive = 64, depth: Positive = 4,
             heads: Positive = 4, mlp_dim: Positive = 128,
             dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0) -> ViT:
    """A ViT small enough for CPU runs: 2x2 patches of the 8x8 digits (16 tokens + class token), width 64, 4 blocks of
    4 heads, MLP 128 (~0.14M parameters); 8 adapter sites."""
    return ViT(input_shape, num_classes, patch, dim, depth, heads, mlp_dim, dropout)


# -- torchvision's ViT -------------------------------------------------------------------------------------------
class SiteEncoderBlock(nn.Module):
    """torchvision's ``EncoderBlock`` (same sub-modules, same state-dict names) with the two adapter sites."""

    adapter_slots = SLOTS

    def __init__(self, block: nn.Module):
        super().__init__()
        self.num_heads = block.num_heads
        self.ln_1, self.self_attention, self.dropout = block.ln_1, block.self_attention, block.dropout
        self.ln_2, self.mlp = block.ln_2, block.mlp
        self.width = int(block.ln_1.normalized_shape[0])
        self.adapter_attn: nn.Module = nn.Identity()
        self.adapter_mlp: nn.Module = nn.Identity()

    def forward(self, inputs: Tensor) -> Tensor:
        x = self.ln_1(inputs)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.adapter_attn(self.dropout(x)) + inputs
        return x + self.adapter_mlp(self.mlp(self.ln_2(x)))


class TorchvisionViT(Classifier):
    """A torchvision ``VisionTransformer`` behind the :class:`Classifier` interface, with adapter sites in every
    encoder block; the bottleneck is the class token after the final LayerNorm. Inputs of another size than the
    network's ``image_size`` (224 for ``vit_b_16``: its position embeddings' grid) are resized to it (bilinear)."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        layers = net.encoder.layers
        for name, block in list(layers.named_children()):
            setattr(layers, name, SiteEncoderBlock(block))
        old_head = net.heads.head if hasattr(net.heads, "head") else None
        if old_head is not None and old_head.out_features == num_classes:
            self.head = old_head
        else:  # ImageNet weights for another number of classes: a fresh head
            self.head = nn.Linear(net.hidden_dim, num_classes)
        net.heads = nn.Identity()
        self.body = net
        self.image_size = int(net.image_size)

    def features(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.body(x)


@model_option("vit_b_16", data="flowers102")
def vit_b_16(input_shape, num_classes: int, pretrained: bool = False) -> TorchvisionViT:
    """torchvision's ViT-B/16 (86M parameters, 224x224 inputs, 12 blocks: 24 adapter sites); ``pretrained``: its
    ImageNet weights (``IMAGENET1K_V1``; the head is new when the classes differ)."""
    return TorchvisionViT(build_torchvision("vit_b_16", pretrained), num_classes)
