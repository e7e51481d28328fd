"""The ViTs with adapter sites: regstory's vit_tiny and the torchvision wrapper behind vit_b_16."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from regstory.models.vit import SiteEncoderBlock, TorchvisionViT, adapter_sites, vit_tiny
from regstory.options import ConfigError


def tiny_torchvision_vit(num_classes: int = 1000):
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=num_classes)


def test_vit_tiny_forward_features_and_sites():
    torch.manual_seed(0)
    model = vit_tiny((1, 8, 8), num_classes=5).eval()
    logits, feats = model(torch.rand(3, 1, 8, 8), return_features=True)
    assert logits.shape == (3, 5) and feats.shape == (3, 64)
    assert torch.allclose(model.head(feats), logits)
    sites = adapter_sites(model)
    assert list(sites) == [f"blocks.{b}.adapter_{s}" for b in range(4) for s in ("attn", "mlp")]
    assert set(sites.values()) == {64}
    assert all(isinstance(model.get_submodule(s), nn.Identity) for s in sites)  # empty sites hold no tensors
    assert not any("adapter" in name for name in model.state_dict())


def test_vit_tiny_options_and_bad_shapes():
    model = vit_tiny((3, 8, 8), 10, patch=4, dim=16, depth=2, heads=2, mlp_dim=32)
    assert model.pos_embed.shape == (1, 1 + 4, 16) and len(adapter_sites(model)) == 4
    with pytest.raises(ValueError, match="arch.patch=3 must divide the image size 8x8"):
        vit_tiny((1, 8, 8), 10, patch=3)
    with pytest.raises(ValueError, match="arch.dim=10 must be a multiple of arch.heads=4"):
        vit_tiny((1, 8, 8), 10, dim=10)
    with pytest.raises(ConfigError, match="arch.depth must be an integer >= 1, got 0"):
        vit_tiny((1, 8, 8), 10, depth=0)


def test_torchvision_wrapper_computes_torchvisions_function_with_empty_sites():
    net = tiny_torchvision_vit()
    x = torch.rand(2, 3, 32, 32)
    reference = net.eval()(x)
    names = set(net.state_dict())
    model = TorchvisionViT(net, num_classes=1000).eval()
    assert torch.equal(model(x), reference)  # the ImageNet head is kept when the classes match
    renamed = {k.replace("body.", "", 1).replace("head.", "heads.head.") for k in model.state_dict()}
    assert renamed == names  # same tensors, same names: torchvision's weights load as they are
    assert all(isinstance(b, SiteEncoderBlock) for b in model.body.encoder.layers)
    assert list(adapter_sites(model).values()) == [32] * 4
    other = TorchvisionViT(tiny_torchvision_vit(), num_classes=7).eval()
    assert other(torch.rand(2, 3, 20, 20)).shape == (2, 7)  # another input size is resized to the grid's 32


def test_vit_b_16_without_its_imagenet_weights_is_one_line(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    from regstory.models.vit import vit_b_16

    with pytest.raises(ConfigError) as err:
        vit_b_16((3, 224, 224), 102, pretrained=True)
    message = str(err.value)
    assert "\n" not in message and "vit_b_16" in message and "arch.pretrained=false" in message
