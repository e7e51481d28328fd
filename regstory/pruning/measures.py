"""Optional per-round measurements of a pruning sweep, each switched by the sweep's existing options.

The core (:class:`regstory.pruning.base.PruningSweep`) calls, in list order, ``setup`` once, ``measure`` at the end
of each round (before pruning; it adds keys to the round's record) and ``summary`` in ``finalize``; ``state_dict``
entries go into the sweep's checkpoint state. The sweep builds:

- :class:`ActivationEntropy` (always; eq. 2.16-2.17): ``entropy_*`` keys;
- :class:`Memorization` (``measure_memorization``): ``noisy_memorized``, ``noisy_true_label_acc``;
- :class:`SDDPhases` (always): the four SDD phases of the round curve (``summary.json`` "sdd");
- :class:`BestValModel` (always; acts when a val split exists): ``checkpoints/best.pt``, "best_val_model";
- :class:`StopRule` (``stop``, sec. 2.4.2): ``stopped`` / ``entropy_onset`` keys, ends the sweep;
- :class:`Footprint` (``footprint``: final / rounds / none): Table 2.1's sizes, compressed size and latencies.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from regstory.checkpoint import save_checkpoint
from regstory.config import ConfigError
from regstory.data.dataset_loader import DatasetLoader
from regstory.data.device_loader import TensorLoader
from regstory.pruning.entropy import entropy_summary, neuron_entropies
from regstory.pruning.phases import describe_phases
from regstory.pruning.stop import StopCriterion
from regstory.tracking import ROUNDS_FILE, read_jsonl

if TYPE_CHECKING:
    from regstory.loop import RunContext
    from regstory.pruning.base import PruningSweep

BEST = "best.pt"


class Measurement:
    """One optional measurement of a sweep; every hook is a no-op."""

    def setup(self, sweep: "PruningSweep", ctx: "RunContext") -> None:
        pass

    def measure(self, sweep: "PruningSweep", ctx: "RunContext", record: dict[str, Any]) -> None:
        """End of a round, before pruning: add keys to the round's record."""

    def summary(self, sweep: "PruningSweep", ctx: "RunContext", rounds: list[dict]) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ActivationEntropy(Measurement):
    """Eq. 2.16-2.17 on a fixed, seeded subset of the train split (``samples``; None = all), one layer per ReLU call
    site. Tensor-held sets give it un-augmented; a DataLoader-backed set (:class:`DatasetLoader`: ImageNet, CelebA,
    image folders) applies its split's own transforms, drawn identically at every round."""

    def __init__(self, samples: int | None, zero_is_on: bool):
        self.samples, self.zero_is_on = samples, zero_is_on
        self.loader: TensorLoader | DatasetLoader | None = None

    def subset(self, ctx: "RunContext") -> TensorLoader | DatasetLoader:
        """The fixed, seeded subset of the train split the entropies are measured on (made once)."""
        if self.loader is None:
            train = ctx.loaders["train"]
            n = len(train.split)
            chosen = torch.arange(n)
            if self.samples and self.samples < n:
                gen = torch.Generator().manual_seed(int(ctx.cfg.seed))
                chosen = torch.randperm(n, generator=gen)[: self.samples].sort().values
            self.loader = train.subset(chosen, int(ctx.cfg.trainer.eval_batch_size))
        return self.loader

    def __call__(self, ctx: "RunContext") -> dict[str, float]:
        return entropy_summary(neuron_entropies(ctx.model, self.subset(ctx), self.zero_is_on))

    def measure(self, sweep: "PruningSweep", ctx: "RunContext", record: dict[str, Any]) -> None:
        record.update(self(ctx))


class Memorization(Measurement):
    """On the train samples whose label noise flipped: the fraction fitted to the wrong and to the true label."""

    def __init__(self) -> None:
        self.loader: TensorLoader | DatasetLoader | None = None
        self.built = False

    def measure(self, sweep: "PruningSweep", ctx: "RunContext", record: dict[str, Any]) -> None:
        if not self.built:
            self.loader, self.built = noisy_samples_loader(ctx), True
        record.update(memorization(ctx.model, self.loader))


class SDDPhases(Measurement):
    """The four sparse-double-descent phases of the ``metric`` curve over rounds (:mod:`regstory.pruning.phases`,
    thesis sec. 2.4.1). ``metric="auto"`` reads them on the clean validation split when the run holds one out
    (``val_acc``: choosing a model by its phase must not look at the test set), else on ``test_acc``; summary.json's
    ``sdd.metric`` names the curve used."""

    def __init__(self, metric: str, tol: float):
        self.requested, self.tol = metric, tol
        self.metric = "test_acc" if metric == "auto" else metric

    def setup(self, sweep: "PruningSweep", ctx: "RunContext") -> None:
        if self.requested == "auto":
            self.metric = "val_acc" if "val" in ctx.loaders else "test_acc"

    def summary(self, sweep: "PruningSweep", ctx: "RunContext", rounds: list[dict]) -> dict[str, Any]:
        curve = [(r["sparsity"], r[self.metric]) for r in rounds if r.get(self.metric) is not None]
        if not curve:
            return {}
        sparsity, acc = zip(*curve)
        return {"sdd": {"metric": self.metric, "tol": self.tol, **describe_phases(sparsity, acc, self.tol)}}


class BestValModel(Measurement):
    """Saves the model with the best clean validation accuracy so far to ``checkpoints/best.pt``."""

    def __init__(self) -> None:
        self.best: dict[str, Any] = {}

    def measure(self, sweep: "PruningSweep", ctx: "RunContext", record: dict[str, Any]) -> None:
        val_acc = ctx.history[-1].get("val_acc") if ctx.history else None
        if val_acc is None or (self.best and val_acc <= self.best["val_acc"]):
            return
        self.best = {"round": ctx.round, "val_acc": val_acc, "sparsity": record["sparsity"],
                     "test_acc": ctx.history[-1].get("test_acc")}
        if ctx.is_main_process:
            save_checkpoint(ctx.run_dir / "checkpoints" / BEST,
                            {"model": ctx.model.state_dict(), "masks": sweep.masks.state_dict(), **self.best})

    def summary(self, sweep: "PruningSweep", ctx: "RunContext", rounds: list[dict]) -> dict[str, Any]:
        return {"best_val_model": self.best} if self.best else {}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]


class StopRule(Measurement):
    """Sec. 2.4.2: the accuracy or entropy stop criterion (:class:`StopCriterion`) on the round's mean entropy
    (``average``: all neurons or the non-constant ones) and val accuracy; records every round, stops in ``mode`` only."""

    def __init__(self, criterion: StopCriterion, average: str):
        self.criterion, self.average = criterion, average

    def setup(self, sweep: "PruningSweep", ctx: "RunContext") -> None:
        if self.criterion.mode != "none" and "val" not in ctx.loaders:
            raise ConfigError(f"method.stop={self.criterion.mode} judges accuracy on a clean validation split: "
                              f"set dataset.val_fraction > 0 (e.g. dataset.val_fraction=0.1)")

    def measure(self, sweep: "PruningSweep", ctx: "RunContext", record: dict[str, Any]) -> None:
        val_acc = ctx.history[-1].get("val_acc") if ctx.history else None
        entropy = record["entropy_mean" if self.average == "all" else "entropy_mean_nonconstant"]
        if self.criterion.update(entropy, val_acc):
            ctx.stop_rounds = True
            record["stopped"] = True
        if self.criterion.onset is not None and self.criterion.onset == len(self.criterion.accs) - 1:
            record["entropy_onset"] = True

    def summary(self, sweep: "PruningSweep", ctx: "RunContext", rounds: list[dict]) -> dict[str, Any]:
        return {"entropy_onset_round": self.criterion.onset} if self.criterion.onset is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {"stop": self.criterion.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.criterion.load_state_dict(state["stop"])


def noisy_samples_loader(ctx: "RunContext") -> TensorLoader | DatasetLoader | None:
    """The train samples whose label was flipped by label noise (read from the split's ``is_noisy`` flags, on either
    loader kind; un-augmented for tensor-held sets); None when the set has no flags or no flipped sample."""
    train = ctx.loaders["train"]
    is_noisy = train.split.extras.get("is_noisy")
    if is_noisy is None or not bool(is_noisy.any()):
        return None
    return train.subset(torch.nonzero(is_noisy).flatten(), int(ctx.cfg.trainer.eval_batch_size))


@torch.no_grad()
def memorization(model: torch.nn.Module, noisy: TensorLoader | DatasetLoader | None) -> dict[str, float]:
    """On the noisy train samples: the fraction predicted as their (wrong) training label and as their true label
    (counted on the device, read once)."""
    if noisy is None:
        return {}
    was_training = model.training
    model.eval()
    hits = torch.zeros(2, dtype=torch.long, device=noisy.device)  # predicted as the noisy label, as the true one
    for batch in noisy:
        pred = model(batch["x"]).argmax(1)
        hits += torch.stack([(pred == batch["y"]).sum(), (pred == batch["true_y"]).sum()])
    model.train(was_training)
    fit_noisy, fit_true = (hits.double() / len(noisy.split)).tolist()
    return {"noisy_memorized": fit_noisy, "noisy_true_label_acc": fit_true}


def rounds_of(ctx: "RunContext") -> list[dict]:
    return read_jsonl(ctx.run_dir / ROUNDS_FILE)


class Footprint(Measurement):
    """The measures of Table 2.1 (:mod:`regstory.pruning.footprint`): pruning ratio, non-zero parameters and
    compression ratio, MACs, the simplified model's size (:mod:`regstory.pruning.simplify`, BN folded; MB = 10**6
    bytes, fp32; bytes on disk), the compressed size of the pruned state (``codec``; the test accuracy of the decoded
    model and its max abs error), and CPU latency (median of ``repeats``, ``threads`` threads) of the pruned and the
    simplified model at batch 1, and of the simplified one at batch 64. The dense model is
    round 0's (measured once: ``dense_mb``, ``latency_ms_dense``). ``when``: ``rounds`` (every round's record and the
    summary) or ``final`` (the summary only: the model the sweep ends with)."""

    def __init__(self, when: str, codec: str, repeats: int, threads: int):
        self.when, self.codec, self.repeats, self.threads = when, codec, repeats, threads
        self.dense: dict[str, Any] = {}

    def setup(self, sweep: "PruningSweep", ctx: "RunContext") -> None:
        from regstory.pruning.footprint import NNC_MISSING, nncodec_available
        from regstory.pruning.simplify import SimplificationError, check_simplifiable

        if self.codec == "nncodec" and not nncodec_available():
            raise ConfigError(f"method.footprint_codec=nncodec: {NNC_MISSING}")
        try:
            check_simplifiable(ctx.model, tuple(ctx.data.input_shape))
        except SimplificationError as err:
            raise ConfigError(f"method.footprint={self.when} simplifies the pruned model: {err} "
                              f"(method.footprint=none skips the Table 2.1 measures)") from None

    def measure(self, sweep: "PruningSweep", ctx: "RunContext", record: dict[str, Any]) -> None:
        if ctx.round == 0 and not self.dense:
            self.dense = self.dense_measures(ctx)
            record.update(self.dense)
        if self.when == "rounds" and ctx.is_main_process:
            record.update(self.of(ctx))

    def summary(self, sweep: "PruningSweep", ctx: "RunContext", rounds: list[dict]) -> dict[str, Any]:
        return {**self.dense, **self.of(ctx)} if ctx.is_main_process else {}

    @torch.no_grad()
    def dense_measures(self, ctx: "RunContext") -> dict[str, Any]:
        from regstory.pruning.footprint import dense_measures

        return dense_measures(ctx.model, tuple(ctx.data.input_shape), self.repeats, self.threads)

    @torch.no_grad()
    def of(self, ctx: "RunContext") -> dict[str, Any]:
        """The measures of the model as it is now (:func:`regstory.pruning.footprint.model_measures`) and the test
        accuracy of its compressed-then-decoded copy."""
        import copy

        from regstory.pruning.footprint import model_measures
        from regstory.pruning.simplify import fold_batchnorm, simplify

        shape = tuple(ctx.data.input_shape)
        small = fold_batchnorm(simplify(ctx.model, shape)[0], shape)
        row, packed = model_measures(ctx.model, small, shape, self.codec, self.repeats, self.threads)
        decoded = copy.deepcopy(ctx.model)
        decoded.load_state_dict({k: v.to(t.device) for (k, v), t in zip(packed.decoded.items(),
                                                                         ctx.model.state_dict().values())})
        row["compressed_test_acc"] = ctx.evaluate("test", model=decoded)["acc"]
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"footprint_dense": self.dense}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense = state.get("footprint_dense", {})
