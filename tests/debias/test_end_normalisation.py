"""EnD's normalised bottleneck (authors' ``Sequential(GAP, pattern_norm)``): with ``normalize_classifier_input``
(default, as the authors) the classifier is trained and evaluated on unit-norm features, and the features the model
returns (the regulariser's and the probe's input) are those same unit-norm features."""
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from regstory.debias.end import EnD
from regstory.models.simple_convnet import simple_convnet
from tests.conftest import make_cfg


def ctx_for(model):
    data = SimpleNamespace(num_bias_classes=10, train=SimpleNamespace(extras={"bias": None}), val=object(),
                           name="biased_digits")
    return SimpleNamespace(model=model, data=data)


def raw_outputs(model, x):
    z = model.features(x)
    return model.head(z), z


def test_the_classifier_sees_unit_norm_features_by_default():
    torch.manual_seed(0)
    model = simple_convnet((3, 8, 8), 10, channels=[8, 16], kernel_size=3).eval()
    x = torch.randn(4, 3, 8, 8)
    logits_before, z = raw_outputs(model, x)
    assert not torch.allclose(z.norm(dim=1), torch.ones(4))  # the raw bottleneck is not unit-norm
    plugin = EnD()
    assert plugin.normalize_classifier_input is True and make_cfg("debias=end").debias.normalize_classifier_input
    plugin.setup(ctx_for(model))
    logits, features = model(x, return_features=True)
    unit = F.normalize(z, dim=1)
    assert torch.allclose(features, unit, atol=1e-6) and torch.allclose(features.norm(dim=1), torch.ones(4))
    assert torch.allclose(logits, F.linear(unit, model.head.weight, model.head.bias), atol=1e-6)
    assert torch.allclose(model(x), logits) and not torch.allclose(logits, logits_before)


def test_false_leaves_the_network_as_built_and_the_regulariser_unchanged():
    torch.manual_seed(0)
    model = simple_convnet((3, 8, 8), 10, channels=[8, 16], kernel_size=3).eval()
    x = torch.randn(4, 3, 8, 8)
    expected = raw_outputs(model, x)
    EnD(normalize_classifier_input=False).setup(ctx_for(model))
    logits, z = model(x, return_features=True)
    assert torch.equal(logits, expected[0]) and torch.equal(z, expected[1])


def test_a_replaced_model_is_hooked_and_the_old_one_released():
    torch.manual_seed(0)
    old = simple_convnet((3, 8, 8), 10, channels=[8, 16], kernel_size=3).eval()
    new = simple_convnet((3, 8, 8), 10, channels=[8, 16], kernel_size=3).eval()
    plugin = EnD()
    plugin.setup(ctx_for(old))
    plugin.model_replaced(SimpleNamespace(model=new), change=None)
    x = torch.randn(3, 3, 8, 8)
    assert torch.allclose(new(x, return_features=True)[1].norm(dim=1), torch.ones(3))
    assert torch.equal(old(x, return_features=True)[1], old.features(x))
