"""Simplification of a pruned MLP to a smaller dense one: the same function, fewer units."""
import pytest
import torch

from regstory.models.mlp import MLP
from regstory.pruning.simplify import simplify


def pruned_mlp(activation: str = "relu") -> MLP:
    torch.manual_seed(0)
    model = MLP((10,), 3, [16, 12], activation=activation)
    with torch.no_grad():
        model.layers[0].weight[[1, 4, 7]] = 0      # units with no incoming weight: constant act(b)
        model.layers[1].weight[:, [2, 9]] = 0      # layer-0 units 2 and 9: nothing reads them
        model.layers[1].weight[[0, 5]] = 0         # layer-1 units 0 and 5: constant
        model.head.weight[:, 3] = 0                # layer-1 unit 3: nothing reads it
    return model


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_the_simplified_model_computes_the_same_function_with_fewer_units(activation):
    model = pruned_mlp(activation)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, change, kept = simplify(model)
    x = torch.randn(64, 10)
    assert (small(x) - model(x)).abs().max() <= 1e-5
    assert kept == {"layers.0": 16 - 5, "layers.1": 12 - 3}
    assert small.layers[0].weight.shape == (11, 10) and small.layers[1].weight.shape == (9, 11)
    assert small.head.weight.shape == (3, 9)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the pruned model is untouched


def test_the_change_maps_the_small_models_tensors_back_to_the_pruned_ones():
    model = pruned_mlp()
    small, change, _ = simplify(model)
    old = model.state_dict()
    for name, tensor in small.state_dict().items():
        if name.endswith("weight"):  # weights are slices of the old ones (biases may take folded constants)
            assert torch.equal(change.carry(name, old[change.sources[name][0]]), tensor), name


def test_residual_and_non_mlp_models_are_refused():
    with pytest.raises(ValueError, match="residual"):
        simplify(MLP((10,), 3, [8, 8], residual=True))
    with pytest.raises(ValueError, match="not Sequential"):
        simplify(torch.nn.Sequential(torch.nn.Linear(2, 2)))
