"""Knowledge distillation (thesis sec. 2.4.3, Fig. 2.8; DSD^2, Quétu & Tartaglione 2023).

The student's loss is a * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - a) * CE(s, y), with t the teacher's and
s the student's logits and y the (possibly noisy) training label. The teacher is frozen, in eval mode, and is
either loaded from a checkpoint (``teacher``: a regstory run's ``checkpoints/last.pt`` - its ``model`` entry - or a
plain state dict) or, when ``teacher`` is null, trained first in the same run on the same (noisy) training data with
the run's trainer settings for ``teacher_epochs`` epochs (saved to ``checkpoints/teacher.pt`` and reused on resume).
Its architecture is ``teacher_arch`` (an ``arch`` option as a dict with ``_target_``) or the student's.
As a plugin it composes with any pruning method: the student is pruned while it is distilled.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from regstory.checkpoint import load_checkpoint, save_checkpoint
from regstory.config import ConfigError
from regstory.options import Range, option
from regstory.plugins import Plugin, StepOutput

if TYPE_CHECKING:
    from regstory.loop import RunContext

log = logging.getLogger("regstory")
TEACHER = "teacher.pt"


def distillation_loss(student: Tensor, teacher: Tensor, y: Tensor, alpha: float, temperature: float,
                      ce: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """a * T^2 * KL(p_t^T || p_s^T) + (1 - a) * CE(student, y) (Hinton et al. 2015), per sample
    (``reduction="none"``) or its batch mean. ``ce``: the per-sample CE when already computed (the loop's
    ``per_sample_loss``)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                  reduction="none", log_target=True).sum(1)
    if ce is None:
        ce = F.cross_entropy(student.float(), y, reduction="none")
    per_sample = alpha * t * t * kl + (1 - alpha) * ce
    return per_sample if reduction == "none" else per_sample.mean()


@option("distill", "kd", extra={"_recursive_": (bool, False)})  # teacher_arch is built by the plugin, not by Hydra
class Distillation(Plugin):
    """``teacher``: a regstory checkpoint (its "model") or a state dict; null trains it first in this run for
    ``teacher_epochs`` (null: trainer.epochs). ``teacher_arch``: an arch option as a dict; null: the student's."""

    def __init__(self, teacher: str | None = None, teacher_arch: dict[str, Any] | None = None,
                 alpha: Annotated[float, Range(ge=0, le=1)] = 0.8, temperature: Annotated[float, Range(gt=0)] = 10.0,
                 teacher_epochs: Annotated[int | None, Range(ge=1)] = None):
        self.teacher_path, self.teacher_arch = teacher, teacher_arch
        self.alpha, self.temperature, self.teacher_epochs = alpha, temperature, teacher_epochs
        self.teacher: nn.Module | None = None

    def setup(self, ctx: "RunContext") -> None:
        self.teacher = self.build_teacher(ctx)
        saved = ctx.run_dir / "checkpoints" / TEACHER
        if self.teacher_path:
            path = Path(self.teacher_path).expanduser()
            if not path.exists():
                raise ConfigError(f"distill.teacher='{path}' does not exist: give a regstory checkpoints/last.pt, "
                                  f"or distill.teacher=null to train the teacher first in this run")
            state = load_checkpoint(path, ctx.device)
            self.teacher.load_state_dict(state["model"] if "model" in state else state)
        elif saved.exists():
            self.teacher.load_state_dict(load_checkpoint(saved, ctx.device)["model"])
        else:
            self.train_teacher(ctx)
            if ctx.is_main_process:
                save_checkpoint(saved, {"model": self.teacher.state_dict()})
        self.teacher.eval().requires_grad_(False)
        test = ctx.evaluate("test", model=self.teacher)
        log.info("distillation teacher: test_acc=%.4f test_loss=%.4f", test["acc"], test["loss"])

    def build_teacher(self, ctx: "RunContext") -> nn.Module:
        arch = OmegaConf.create(self.teacher_arch) if self.teacher_arch else ctx.cfg.arch
        return instantiate(arch, input_shape=list(ctx.data.input_shape), num_classes=ctx.data.num_classes).to(ctx.device)

    def train_teacher(self, ctx: "RunContext") -> None:
        """Plain training of the teacher with the run's trainer settings, by the same loop (no plugins)."""
        from regstory.loop import HookCaller, train_one_epoch

        epochs = self.teacher_epochs or ctx.epochs
        tctx = dataclasses.replace(ctx, model=self.teacher, forward_model=None, plugins=[], history=[])
        tctx.rebuild_optimizer()
        loader = ctx.loaders["train"]
        for epoch in range(epochs):
            loader.set_epoch(-1, epoch)  # round -1: the teacher's own shuffling stream
            metrics = train_one_epoch(tctx, HookCaller([]), loader)
            tctx.scheduler.step()
            log.info("teacher epoch %d/%d: train_loss=%.4f train_acc=%.4f", epoch + 1, epochs,
                     metrics["train_loss"], metrics["train_acc"])

    def sample_loss(self, ctx: "RunContext", batch: dict[str, Tensor], out: StepOutput) -> Tensor:
        """The per-sample distillation loss replaces the cross-entropy (other plugins' sample weights apply to it)."""
        with torch.no_grad():
            teacher_logits = self.teacher(batch["x"])
        return distillation_loss(out.logits, teacher_logits, batch["y"], self.alpha, self.temperature,
                                 ce=out.per_sample_loss, reduction="none")
