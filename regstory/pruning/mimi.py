"""MiMi, mini adapters (thesis sec. 2.5, eq. 2.15; Marouf, Tartaglione & Lathuilière, WACV 2024).

A pre-trained ViT is frozen and an adapter ``h + up(phi(down(h)))`` (no biases, phi = GELU, as the authors' code)
fills every adapter site of the architecture (:func:`regstory.models.vit.adapter_sites`: after the attention and
the MLP sub-layer of every block). Adapters and the classification head are trained. Then, for ``rounds`` pruning
steps, the adapters' hidden units are scored (eq. 2.15, with ``M_i`` the adapter's input width and ``N_i`` its hidden
size now)::

    I_ij = (sum_k |W_down[j, k]| + sum_k |W_up[k, j]|) / (N_i + M_i)

(the authors' code divides by 2 M_i, the unit's number of weights, instead: ``normalization=code``)
and ``rate`` of the remaining units is removed, by **model surgery**: the adapter is rebuilt without them
(``ctx.replace_model`` with a :class:`~regstory.surgery.ModelChange`, so the optimizer state of the surviving
rows/columns follows), then the next round fine-tunes. ``allocation=global`` removes the lowest scores over all
adapters together, so adapters end up with different sizes (thesis Fig. 2.10); ``proportional`` removes ``rate`` of
each adapter's own units (the baseline of Fig. 2.10a: every adapter keeps the same size). An adapter left with no
unit is removed (the site is the identity again). Round r (0-based) trains with the adapters left after r steps;
``rounds.jsonl`` records each round's per-adapter sizes (``adapter_units/<block>.<attn|mlp>``), their total, the
trainable-parameter count (adapters + head) and the round's accuracy. ``scripts/plot_mimi.py`` draws them.

The backbone: the architecture's own weights (``arch.pretrained=true`` for ``vit_b_16``: ImageNet), or
``backbone`` (a regstory run's ``checkpoints/last.pt`` or a state dict, loaded but for the head), or ``pretrain``:
an ``experiment=`` preset that trains it (``mimi_pretrain_digits``). That pre-training is a regstory run of its own,
with this run's ``arch``, ``seed`` and device settings plus ``pretrain_overrides``, kept under
``<data.root>/mimi_backbones/<preset>-seed<seed>-<hash of its config>/`` (a complete run folder): it runs once,
and every run whose pre-training config is the same reuses it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from regstory.checkpoint import LAST, load_checkpoint
from regstory.models.vit import adapter_sites
from regstory.options import ConfigError, OneOf, Range, option
from regstory.plugins import Plugin
from regstory.surgery import ModelChange

if TYPE_CHECKING:
    from regstory.loop import RunContext

log = logging.getLogger("regstory")

BACKBONES = "mimi_backbones"
#: keys of the pre-training config that do not change its result (left out of the cache key)
NOT_HASHED = ("logger", "data", "resume", "trainer.num_threads", "trainer.num_workers", "trainer.checkpoint_every",
              "trainer.checkpoint_interval_s", "trainer.deterministic", "trainer.eval_every")
#: keys this run hands to its pre-training run (where and how it runs, not what it computes)
HANDED_DOWN = ("trainer.device", "trainer.num_threads", "trainer.num_workers", "trainer.deterministic")


class Adapter(nn.Module):
    """``h + up(phi(down(h)))``: ``down`` (width -> hidden), GELU, ``up`` (hidden -> width), no biases."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(width, hidden, bias=False)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, width, bias=False)

    @property
    def hidden(self) -> int:
        return self.down.out_features

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.act(self.down(h)))

    @torch.no_grad()
    def importance(self, normalization: str = "thesis") -> Tensor:
        """Eq. 2.15 per hidden unit j: (||W_down[j, :]||_1 + ||W_up[:, j]||_1) / (N + M), N hidden, M width;
        ``normalization="code"`` divides by 2M instead, the unit's number of weights (the authors' code)."""
        width = self.down.in_features
        norm = self.hidden + width if normalization == "thesis" else 2 * width
        return (self.down.weight.abs().sum(1) + self.up.weight.abs().sum(0)) / norm

    @torch.no_grad()
    def keeping(self, keep: Tensor) -> "Adapter":
        """A copy with only the hidden units ``keep``: their rows of W_down and columns of W_up."""
        w = self.down.weight
        new = Adapter(self.down.in_features, len(keep)).to(device=w.device, dtype=w.dtype)
        new.down.weight.copy_(self.down.weight[keep.to(w.device)])
        new.up.weight.copy_(self.up.weight[:, keep.to(w.device)])
        new.train(self.training)
        return new


def adapters(model: nn.Module, sites: list[str]) -> dict[str, Adapter | None]:
    """The adapter at each site (None where it was removed)."""
    out: dict[str, Adapter | None] = {}
    for site in sites:
        module = model.get_submodule(site)
        out[site] = module if isinstance(module, Adapter) else None
    return out


def site_labels(sites: list[str]) -> list[str]:
    """Short names of the sites for records and plots: ``<block index>.<attn|mlp>`` (``blocks.3.adapter_mlp`` ->
    ``3.mlp``), the block index counting the sites' parent modules in order."""
    parents: list[str] = []
    labels = []
    for site in sites:
        parent, _, slot = site.rpartition(".")
        if parent not in parents:
            parents.append(parent)
        labels.append(f"{parents.index(parent)}.{slot.removeprefix('adapter_')}")
    return labels


def _shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares (does not copy) its frozen parameters: the backbone of a ViT-B/16 is
    330 MB, and the model it is copied from is dropped right after a surgery."""
    memo = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _tensor_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]


def with_adapters(model: nn.Module, hidden: int) -> tuple[nn.Module, ModelChange]:
    """A copy of ``model`` with a fresh :class:`Adapter` of ``hidden`` units at every empty adapter site (PyTorch's
    default Linear initialisation, as the authors' code), and its ModelChange (adapters are new tensors)."""
    new = _shared_copy(model)
    old_names = set(_tensor_names(model))
    for site, width in adapter_sites(new).items():
        if isinstance(new.get_submodule(site), nn.Identity):
            _replace(new, site, Adapter(width, hidden).to(next(model.parameters()).device))
    return new, ModelChange({n: (n, ()) for n in _tensor_names(new) if n in old_names})


def shrink_adapters(model: nn.Module, keep: dict[str, Tensor]) -> tuple[nn.Module, ModelChange]:
    """A copy of ``model`` in which the adapter at each site of ``keep`` keeps only the hidden units ``keep[site]``
    (its rows of W_down and columns of W_up); an adapter keeping none is removed (the site becomes the identity).
    Returns the new model and its :class:`ModelChange`."""
    new = _shared_copy(model)
    sources: dict[str, tuple[str, tuple]] = {}
    for site, kept in keep.items():
        adapter = new.get_submodule(site)
        kept = torch.as_tensor(kept, dtype=torch.long).flatten().sort().values
        if len(kept) == adapter.hidden:
            continue
        _replace(new, site, adapter.keeping(kept) if len(kept) else nn.Identity())
        if len(kept):
            sources[f"{site}.down.weight"] = (f"{site}.down.weight", (kept,))
            sources[f"{site}.up.weight"] = (f"{site}.up.weight", (None, kept))
    names = _tensor_names(new)
    return new, ModelChange({n: sources.get(n, (n, ())) for n in names})


def units_to_keep(scores: dict[str, Tensor], rate: float, allocation: str) -> dict[str, Tensor]:
    """The hidden units each adapter keeps after one pruning step. ``global``: the ``round(rate * total)`` lowest
    scores over all adapters go (at least one); ``proportional``: each adapter of n units keeps its
    ``round(n * (1 - rate))`` highest. Ties go by position (lower index kept)."""
    if allocation == "proportional":
        out = {}
        for site, s in scores.items():
            n_keep = int(round(len(s) * (1 - rate)))
            order = torch.sort(s, descending=True, stable=True).indices
            out[site] = order[:n_keep].sort().values
        return out
    flat = torch.cat([s.float().cpu() for s in scores.values()])
    n_remove = min(len(flat), max(1, int(round(rate * len(flat)))))
    removed = torch.zeros(len(flat), dtype=torch.bool)
    removed[torch.sort(flat, stable=True).indices[:n_remove]] = True
    out, start = {}, 0
    for site, s in scores.items():
        out[site] = torch.nonzero(~removed[start:start + len(s)]).flatten()
        start += len(s)
    return out


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@option("method", "mimi")
class MiMi(Plugin):
    """Options: ``size`` (hidden units of every adapter at the start), ``rounds`` (pruning steps; ``rounds + 1``
    trainings), ``rate`` (fraction of the remaining units removed per step), ``allocation`` (``global`` |
    ``proportional``), ``normalization`` (``thesis``: eq. 2.15's N_i + M_i; ``code``: 2 M_i, the authors' code,
    which ranks adapters of one width by their raw L1 sums), ``finetune_lr`` (null: every round replays the
    trainer's lr schedule, as the authors' code; a number: rounds after the first train at that constant lr),
    ``backbone`` / ``pretrain`` / ``pretrain_overrides`` (where the frozen weights come from; see the module
    docstring)."""

    def __init__(self, size: Annotated[int, Range(ge=1)] = 32, rounds: Annotated[int, Range(ge=0)] = 5,
                 rate: Annotated[float, Range(gt=0, lt=1)] = 0.5,
                 allocation: Annotated[str, OneOf("global", "proportional")] = "global",
                 normalization: Annotated[str, OneOf("thesis", "code")] = "thesis",
                 finetune_lr: Annotated[float | None, Range(gt=0)] = None, backbone: str | None = None,
                 pretrain: str | None = None, pretrain_overrides: list[str] = ()):
        if backbone and pretrain:
            raise ConfigError("method.backbone and method.pretrain both say where the backbone comes from: "
                              "give one (or neither: the arch's own weights)")
        if pretrain:
            from regstory.train import conf_dir

            if not (Path(conf_dir()) / "experiment" / f"{pretrain}.yaml").exists():
                raise ConfigError(f"method.pretrain={pretrain}: no such experiment preset "
                                  f"(conf/experiment/{pretrain}.yaml)")
        self.size, self.rounds, self.rate, self.allocation = size, rounds, rate, allocation
        self.normalization = normalization
        self.finetune_lr, self.backbone, self.pretrain = finetune_lr, backbone, pretrain
        self.pretrain_overrides = list(pretrain_overrides or [])
        self.sites: list[str] = []

    # -- set-up ---------------------------------------------------------------------------------------------------
    def num_rounds(self) -> int:
        return self.rounds + 1

    def setup(self, ctx: "RunContext") -> None:
        """Check the arch, load the backbone and freeze it, in place. The adapters come at the start of round 0
        (:meth:`start_round`): a surgery here would reach plugins that are not set up yet."""
        model = ctx.model
        resumed = getattr(model, "mimi_sites", None)
        if resumed is not None:  # rebuilt from a checkpoint of this run: adapters in place, backbone loaded
            self.sites = list(resumed)
            freeze_backbone(model)
            return
        sites = adapter_sites(model)
        if not sites:
            name = str(ctx.cfg.arch.get("_target_", "")).rsplit(".", 1)[-1]
            raise ConfigError(f"method=mimi puts adapters into a transformer's blocks, and arch {name} has no adapter "
                              f"sites: use arch=vit_tiny or arch=vit_b_16")
        state = self.backbone_state(ctx)
        if state is not None:
            load_backbone(model, state, self.backbone or f"the pre-training run of experiment={self.pretrain}")
        freeze_backbone(model)
        self.sites = list(sites)

    def add_adapters(self, ctx: "RunContext") -> None:
        """Fill every empty site with an adapter of ``size`` units (model surgery: new tensors, trainable)."""
        new, change = with_adapters(ctx.model, self.size)
        new.mimi_sites = list(self.sites)  # a plain attribute: pickled with the structure a checkpoint records
        freeze_backbone(new)
        ctx.replace_model(new, change)
        log.info("mimi: %d adapters of %d units, %d trainable parameters (adapters and head) of %d",
                 len(self.sites), self.size, trainable_parameters(ctx.model),
                 sum(p.numel() for p in ctx.model.parameters()))

    def backbone_state(self, ctx: "RunContext") -> dict[str, Tensor] | None:
        if self.backbone:
            path = Path(self.backbone).expanduser()
            if not path.exists():
                raise ConfigError(f"method.backbone='{path}' does not exist: give a regstory run's checkpoints/last.pt "
                                  f"or a state dict")
            state = load_checkpoint(path)
            return state["model"] if "model" in state else state
        if self.pretrain:
            run_dir = pretrained_backbone(ctx.cfg, self.pretrain, self.pretrain_overrides)
            return load_checkpoint(run_dir / "checkpoints" / LAST)["model"]
        return None

    # -- rounds ---------------------------------------------------------------------------------------------------
    def start_round(self, ctx: "RunContext") -> None:
        if getattr(ctx.model, "mimi_sites", None) is None:  # round 0 of a new run
            self.add_adapters(ctx)
        if ctx.round > 0 and self.finetune_lr is not None:
            ctx.rebuild_optimizer(lr=self.finetune_lr, schedule="constant")

    def sizes(self, model: nn.Module) -> dict[str, int]:
        return {site: (a.hidden if a is not None else 0) for site, a in adapters(model, self.sites).items()}

    def end_round(self, ctx: "RunContext") -> dict[str, Any]:
        sizes = self.sizes(ctx.model)
        total = sum(sizes.values())
        record: dict[str, Any] = {
            "adapter_units": total, "adapters_kept": sum(1 for n in sizes.values() if n > 0),
            "trainable_params": trainable_parameters(ctx.model),
            "adapter_params": sum(p.numel() for a in adapters(ctx.model, self.sites).values() if a is not None
                                  for p in a.parameters()),
        }
        record.update({f"adapter_units/{label}": n for label, n in zip(site_labels(self.sites), sizes.values())})
        if total == 0:
            ctx.stop_rounds = True
        if not ctx.stop_rounds and ctx.round + 1 < self.num_rounds():
            self.prune(ctx)
        return record

    def prune(self, ctx: "RunContext") -> None:
        """One pruning step: eq. 2.15 scores, the units to keep by ``allocation``, the surgery."""
        alive = {site: a for site, a in adapters(ctx.model, self.sites).items() if a is not None}
        scores = {site: a.importance(self.normalization) for site, a in alive.items()}
        keep = units_to_keep(scores, self.rate, self.allocation)
        new, change = shrink_adapters(ctx.model, keep)
        ctx.replace_model(new, change)

    def finalize(self, ctx: "RunContext") -> dict[str, Any]:
        sizes = self.sizes(ctx.model)
        return {"adapter_units": sum(sizes.values()), "adapters_removed": sum(1 for n in sizes.values() if n == 0),
                "trainable_params": trainable_parameters(ctx.model),
                "adapter_sizes": dict(zip(site_labels(self.sites), sizes.values()))}

    def state_dict(self) -> dict[str, Any]:
        return {"sites": self.sites}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sites = list(state.get("sites", self.sites))


def freeze_backbone(model: nn.Module) -> None:
    """Only the adapters and the classification head (``model.head``) train."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, Adapter):
            module.requires_grad_(True)
    model.head.requires_grad_(True)


def load_backbone(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load every tensor of ``state`` but the head's into ``model``; anything else that does not fit is one line."""
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.startswith("head."))
    extra = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or extra or wrong:
        what = (f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the arch lacks" if extra else
                f"has {wrong[0]} of shape {tuple(state[wrong[0]].shape)}, the arch {tuple(own[wrong[0]].shape)}")
        raise ConfigError(f"the backbone from {source} does not fit this arch: it {what} "
                          f"({len(missing) + len(extra) + len(wrong)} tensor(s) differ)")
    model.load_state_dict(state, strict=False)


# -- the backbone's pre-training, a preset of its own, cached by its config -----------------------------------------
def pretraining_config(cfg: DictConfig, preset: str, overrides: list[str]) -> DictConfig:
    """The config of ``experiment=<preset>`` with this run's seed and ``overrides``, then this run's ``arch`` (so the
    backbone fits), data root, device and thread settings; no W&B."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from regstory.config import compose_checked
    from regstory.train import conf_dir

    args = [f"experiment={preset}", f"seed={int(cfg.seed)}", *overrides]
    if GlobalHydra.instance().is_initialized():  # inside regstory-run (Hydra's app)
        pre = compose_checked(args)
    else:  # run(cfg) called from Python
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            pre = compose_checked(args)
    if "MiMi" in str(pre.method.get("_target_", "")):
        raise ConfigError(f"method.pretrain={preset} is itself a MiMi run: the pre-training must train a backbone")
    with open_dict(pre):
        pre.arch = copy.deepcopy(cfg.arch)
        pre.data = copy.deepcopy(cfg.data)
        for key in HANDED_DOWN:
            OmegaConf.update(pre, key, OmegaConf.select(cfg, key), merge=False)
        pre.logger.progress = cfg.logger.progress
        pre.logger.wandb.mode = "disabled"
    return pre


def config_key(cfg: DictConfig) -> str:
    """A short hash of what a config computes (the keys of :data:`NOT_HASHED` left out)."""
    data = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in NOT_HASHED:
        *path, last = key.split(".")
        parent = data
        for part in path:
            parent = parent.get(part, {})
        parent.pop(last, None)
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


def pretrained_backbone(cfg: DictConfig, preset: str, overrides: list[str]) -> Path:
    """The run folder of the pre-training ``experiment=<preset>`` for this run (:func:`pretraining_config`), under
    ``<data.root>/mimi_backbones``; trained now (a regstory run, in a temporary folder renamed when done) unless a
    finished one with the same config is there. The global RNG states are left as they were."""
    from regstory.train import run
    from regstory.utils import rng_states, set_rng_states

    pre = pretraining_config(cfg, preset, overrides)
    root = Path(str(cfg.data.root)).expanduser() / BACKBONES
    folder = root / f"{preset}-seed{int(pre.seed)}-{config_key(pre)}"
    if (folder / "summary.json").exists():
        log.info("mimi: backbone of experiment=%s from %s", preset, folder)
        return folder
    from regstory.distributed import env_from_torchrun

    if env_from_torchrun().active:  # a nested run would join, then shut down, this run's process group
        raise ConfigError(f"method.pretrain={preset}: the backbone is not pre-trained yet; under torchrun pre-train it "
                          f"once without torchrun (e.g. the same overrides with method.rounds=0 trainer.epochs=1); "
                          f"later runs reuse it")
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("mimi: pre-training the backbone (experiment=%s, seed %d) in %s", preset, int(pre.seed), folder)
    states = rng_states()
    try:
        summary = run(pre, run_dir=tmp)
    finally:
        set_rng_states(states)
    try:
        tmp.rename(folder)
    except OSError:  # another run finished the same pre-training first
        if not (folder / "summary.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("mimi: backbone pre-trained: test_acc=%.4f", summary.get("final_test_acc", float("nan")))
    return folder
