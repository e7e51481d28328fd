"""Model surgery: replacing modules mid-run, and the map that lets everything holding parameters follow.

Simplification (LOBSTER/SeReNe), NEPENTHE's layer removal and the shrinking of mini adapters build a new, smaller
model from the current one. They describe how its tensors come from the old ones with a :class:`ModelChange`
(new name -> old name and the indices kept along each dimension) and hand both to ``ctx.replace_model``, which
carries the optimizer state, keeps the schedule where it is, re-wraps the model (compile / DDP / channels_last) and
lets every plugin move its own state (masks, rewind snapshots) with :meth:`ModelChange.carry_dict`.

A changed model is checkpointed with its structure (:func:`structure_of`: the module tree on the meta device, no
weights), so a resumed run rebuilds the shrunk model before loading its weights (:func:`rebuild`). Non-persistent
buffers are not in a state dict: a model that has any is refused by :func:`structure_of`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

#: per dimension of a tensor, the indices kept from the old tensor (None: the whole dimension)
Index = tuple[Tensor | None, ...]


@dataclass
class ModelChange:
    """Where each tensor (parameter or buffer) of a new model comes from: ``sources[new_name] = (old_name, index)``.
    A new tensor without a source is new (fresh optimizer state, no mask: dense)."""

    sources: dict[str, tuple[str, Index]] = field(default_factory=dict)

    @classmethod
    def identity(cls, model: nn.Module) -> "ModelChange":
        """Every tensor of ``model`` kept whole under its own name."""
        return cls({name: (name, ()) for name in _tensor_names(model)})

    def carry(self, new_name: str, old: Tensor) -> Tensor:
        """The part of ``old`` (the source of ``new_name``) that the new tensor keeps."""
        return select(old, self.sources[new_name][1])

    def carry_dict(self, old: dict[str, Tensor], fill: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Move tensors keyed by the old model's names (masks, snapshots) to the new names. A new name whose source
        is not in ``old`` takes ``fill[new_name]`` when given (e.g. the new model's own value), else is left out."""
        out: dict[str, Tensor] = {}
        for new_name, (old_name, index) in self.sources.items():
            if old_name in old:
                out[new_name] = select(old[old_name], index)
        for new_name, value in (fill or {}).items():
            out.setdefault(new_name, value)
        return out


def select(tensor: Tensor, index: Index) -> Tensor:
    """``tensor`` restricted to ``index`` along each dimension (a new tensor when anything is dropped)."""
    for dim, kept in enumerate(index):
        if kept is not None:
            tensor = tensor.index_select(dim, kept.to(tensor.device))
    return tensor


def _tensor_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]


# -- one surgery: remove output units of a layer --------------------------------------------------------------------
@torch.no_grad()
def remove_units(model: nn.Module, layer: str, keep: Tensor, consumers: list[str],
                 norm: str | None = None) -> tuple[nn.Module, ModelChange]:
    """A copy of ``model`` in which ``layer`` (a Linear or Conv) keeps only the output units / channels ``keep``,
    the normalisation layer ``norm`` right after it (if any) the same features, and each of ``consumers`` (Linear
    or Conv layers reading those units) the matching input columns. Everything else is copied unchanged.
    Returns the new model and its :class:`ModelChange`. Grouped convolutions are refused."""
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().sort().values
    new = copy.deepcopy(model)
    change = ModelChange.identity(new)
    _replace(new, layer, _sliced(new.get_submodule(layer), out_keep=keep))
    change.sources.update(_sliced_sources(layer, new.get_submodule(layer), out_dim=keep))
    if norm is not None:
        _replace(new, norm, _sliced_norm(new.get_submodule(norm), keep))
        change.sources.update({f"{norm}.{n}": (f"{norm}.{n}", (keep,)) for n, t in
                               new.get_submodule(norm).state_dict().items() if t.dim() == 1})
    for name in consumers:
        _replace(new, name, _sliced(new.get_submodule(name), in_keep=keep))
        change.sources[f"{name}.weight"] = (f"{name}.weight", (None, keep))
    return new, change


def _sliced_sources(layer: str, module: nn.Module, out_dim: Tensor) -> dict[str, tuple[str, Index]]:
    sources = {f"{layer}.weight": (f"{layer}.weight", (out_dim,))}
    if module.bias is not None:
        sources[f"{layer}.bias"] = (f"{layer}.bias", (out_dim,))
    return sources


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _sliced(module: nn.Module, out_keep: Tensor | None = None, in_keep: Tensor | None = None) -> nn.Module:
    """A Linear / Conv with only the given output rows and input columns of ``module``'s weights."""
    weight = select(module.weight, (out_keep, in_keep))
    bias = select(module.bias, (out_keep,)) if module.bias is not None else None
    factory = dict(device=weight.device, dtype=weight.dtype)
    if isinstance(module, nn.Linear):
        fresh: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, **factory)
    elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        if module.groups != 1:
            raise ValueError(f"remove_units: grouped convolution {type(module).__name__}(groups={module.groups}) "
                             f"cannot be sliced")
        fresh = type(module)(weight.shape[1], weight.shape[0], module.kernel_size, stride=module.stride,
                             padding=module.padding, dilation=module.dilation, bias=bias is not None,
                             padding_mode=module.padding_mode, **factory)
    else:
        raise TypeError(f"remove_units: cannot slice a {type(module).__name__} (Linear or Conv only)")
    fresh.weight.copy_(weight)
    if bias is not None:
        fresh.bias.copy_(bias)
    fresh.train(module.training)
    return fresh


def _sliced_norm(module: nn.Module, keep: Tensor) -> nn.Module:
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"remove_units: norm must be a BatchNorm layer, not {type(module).__name__}")
    fresh = type(module)(len(keep), eps=module.eps, momentum=module.momentum, affine=module.affine,
                         track_running_stats=module.track_running_stats)
    fresh.to(device=keep.device if module.weight is None else module.weight.device)
    state = {k: (select(v, (keep,)) if v.dim() == 1 else v) for k, v in module.state_dict().items()}
    fresh.load_state_dict(state)
    fresh.train(module.training)
    return fresh


# -- the architecture in a checkpoint -------------------------------------------------------------------------------
def structure_of(model: nn.Module) -> nn.Module:
    """The module tree of ``model`` without its data (every tensor on the meta device): a few kB to pickle."""
    for name, module in model.named_modules():
        if module._non_persistent_buffers_set:
            raise ValueError(f"model surgery: module '{name}' has non-persistent buffers "
                             f"({sorted(module._non_persistent_buffers_set)}), which a checkpoint cannot restore")
    skeleton = copy.deepcopy(model)
    for module in skeleton.modules():  # hooks are plugins' run-time state (re-attached at set-up); closures do not pickle
        for name, value in vars(module).items():
            if name.startswith(("_forward", "_backward")) and "hooks" in name and isinstance(value, dict):
                value.clear()
    return skeleton.to_empty(device="meta")


def rebuild(structure: nn.Module, state: dict[str, Tensor], device: torch.device | str = "cpu") -> nn.Module:
    """The model of a checkpoint's ``structure`` with the weights and buffers of ``state``."""
    model = copy.deepcopy(structure).to_empty(device=device)
    model.load_state_dict(state)
    return model
