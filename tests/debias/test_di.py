"""Domain-independent training (Wang et al. 2020): one head per bias value; each training sample is
classified by the head of its own bias value (softmax over that head's classes); at inference the heads' scores are
summed, y^ = argmax_y sum_d s(y, d, x)."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from regstory.debias.domain_independent import DomainIndependent, di_cross_entropy, di_inference, per_domain_logits
from regstory.models.base import Classifier
from regstory.plugins import StepOutput
from regstory.train import run
from tests.conftest import interrupt_then_resume, make_cfg, read_jsonl
from tests.debias.test_end_to_end import TINY, run_preset_cli
from tests.debias.test_rubi import plain_model_test_accuracy


def ce(logits, y):
    return -logits[y] + math.log(sum(math.exp(v) for v in logits))


class Identity2(Classifier):
    """features = the input (2-d); a 2-class head."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 2)

    def features(self, x):
        return x


W = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]),  # head of bias value 0 (the model's own head)
     torch.tensor([[0.0, 2.0], [1.0, 0.0]]),  # bias value 1
     torch.tensor([[-1.0, 0.0], [0.0, 3.0]])]  # bias value 2
C = [torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, -1.0])]


def plugin_with_heads():
    """A DI plugin set up on a 2-feature model with 3 bias values, every head's weights set by hand."""
    model = Identity2()
    cfg = make_cfg()
    ctx = SimpleNamespace(model=model, device=torch.device("cpu"), cfg=cfg, plugins=[],
                          data=SimpleNamespace(num_bias_classes=3, num_classes=2, name="toy", val=None,
                                               train=SimpleNamespace(extras={"bias": None})))
    plugin = DomainIndependent(selection="last")
    plugin.setup(ctx)
    with torch.no_grad():
        model.head.weight.copy_(W[0])
        model.head.bias.copy_(C[0])
        plugin.heads.module.weight.copy_(torch.cat(W[1:]))
        plugin.heads.module.bias.copy_(torch.cat(C[1:]))
    return plugin, model


def scores(x, d):
    return (W[d] @ x + C[d]).tolist()


def test_the_model_predicts_with_the_summed_heads_at_inference():
    plugin, model = plugin_with_heads()
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    with torch.no_grad():
        logits = model.eval()(x)
    for i in range(2):
        want = [sum(scores(x[i], d)[k] for d in range(3)) for k in range(2)]
        assert logits[i].tolist() == pytest.approx(want)
    # x0: head 0 says [1, 2.5], head 1 [5, 1], head 2 [-1, 5]: sum [5, 8.5] -> class 1 (head 1 alone says 0)
    assert logits.argmax(1).tolist()[0] == 1


def test_each_sample_is_trained_on_its_own_bias_values_head_only():
    plugin, model = plugin_with_heads()
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [-1.0, 0.5]], requires_grad=True)
    y, bias = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0])
    logits, z = model.train()(x, return_features=True)
    out = StepOutput(logits=logits, per_sample_loss=torch.zeros(3), features=z)
    ctx = SimpleNamespace(model=model)
    task = plugin.sample_loss(ctx, {"y": y, "bias": bias}, out)
    want = [ce(scores(x[0].detach(), 1), 0), ce(scores(x[1].detach(), 2), 0), ce(scores(x[2].detach(), 0), 1)]
    assert task.tolist() == pytest.approx(want, rel=1e-5) and out.per_sample_loss is task  # float32
    task[0].backward()  # sample 0 (bias value 1) trains head 1 only
    grads = plugin.heads.module.weight.grad
    assert model.head.weight.grad is None or not model.head.weight.grad.any()
    assert grads[:2].abs().sum() > 0 and not grads[2:].any()


def test_di_loss_and_inference_helpers_by_hand():
    domain = per_domain_logits(torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0, -1.0, 1.0]]), 2)
    assert domain.tolist() == [[[0.0, 1.0], [2.0, 0.0], [-1.0, 1.0]]]
    assert di_inference(domain).tolist() == [[1.0, 2.0]]
    assert di_cross_entropy(domain, torch.tensor([0]), torch.tensor([1])).item() == pytest.approx(ce([2.0, 0.0], 0))


def test_run_evaluates_the_summed_heads_and_resumes(tmp_path, monkeypatch):
    overrides = [*TINY, "debias=di"]
    straight = run(make_cfg(*overrides), run_dir=tmp_path / "straight")
    assert straight["bias_agnostic"] is False

    def summed(model, x, ckpt):
        heads = ckpt["plugins"]["debias"]["heads"]["module"]
        _, z = model(x, return_features=True)
        own = model.head(z)
        others = (z @ heads["weight"].t() + heads["bias"]).reshape(len(z), -1, own.shape[1])
        return di_inference(torch.cat([own[:, None], others], 1))

    assert plain_model_test_accuracy(overrides, tmp_path / "straight", summed) == pytest.approx(
        straight["last_test_acc"], abs=1e-6)
    resumed = interrupt_then_resume(monkeypatch, DomainIndependent, "start_epoch", (0, 1), overrides,
                                    tmp_path / "resumed")
    for key in ("last_test_unbiased_acc", "last_test_conflicting_acc", "last_bias_probe_acc", "selected_epoch"):
        assert resumed[key] == straight[key], key


def test_cli_di_preset(tmp_path):
    run_dir, summary = run_preset_cli(tmp_path, "debias_digits_di", epochs=2)
    assert summary["bias_agnostic"] is False and 0 <= summary["last_test_unbiased_acc"] <= 1
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 2


def test_heads_follow_a_surgery_that_narrows_the_bottleneck():
    """After a model surgery that keeps features 0 and 2 of 3, the plugin's heads keep those columns (and their lr)."""
    from regstory.debias.rubi import OwnedModule, follow_bottleneck
    from regstory.surgery import ModelChange

    cfg = make_cfg()
    heads = OwnedModule(nn.Linear(3, 4), cfg.trainer)
    with torch.no_grad():
        heads.module.weight.copy_(torch.arange(12.0).view(4, 3))
    narrower = SimpleNamespace(head=nn.Linear(2, 2))
    change = ModelChange({"head.weight": ("head.weight", (None, torch.tensor([0, 2]))), "head.bias": ("head.bias", ())})
    moved = follow_bottleneck(heads, SimpleNamespace(model=narrower, cfg=cfg), change)
    assert moved.module.weight.tolist() == [[0.0, 2.0], [3.0, 5.0], [6.0, 8.0], [9.0, 11.0]]
    assert torch.equal(moved.module.bias, heads.module.bias)
    same = follow_bottleneck(moved, SimpleNamespace(model=narrower, cfg=cfg), ModelChange.identity(narrower.head))
    assert same is moved
