"""ReBias (Bahng et al. 2020; clovaai/rebias): f minimises CE + HSIC(f, g) against biased networks g of small
receptive field, which minimise CE - HSIC(g, f); RBF kernels, the unbiased HSIC estimator."""
import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf

from regstory.config import ConfigError
from regstory.debias.rebias import (ReBias, hsic_biased, hsic_unbiased, median_radius, rbf_hsic, rbf_kernel,
                                    squared_distances)
from regstory.plugins import StepOutput
from regstory.train import run
from tests.conftest import interrupt_then_resume, make_cfg, read_jsonl
from tests.debias.test_end_to_end import TINY, run_preset_cli


def random_kernels(m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 3, generator=gen, dtype=torch.float64)
    y = x[:, :2] + 0.5 * torch.randn(m, 2, generator=gen, dtype=torch.float64)  # dependent on x
    return rbf_kernel(x, 1.3), rbf_kernel(y, 0.7)


def hsic_u_statistic(k, l) -> float:
    """Song et al. (2012)'s unbiased HSIC as the U-statistic it is, by explicit sums over distinct indices:
    1/(m)_2 sum_{i!=j} k_ij l_ij + 1/(m)_4 sum_{i,j,q,r distinct} k_ij l_qr - 2/(m)_3 sum_{i,j,q distinct} k_ij l_iq."""
    m = k.shape[0]
    k, l = k.tolist(), l.tolist()
    fall = lambda n: math.prod(range(m - n + 1, m + 1))  # noqa: E731 (falling factorial (m)_n)
    first = sum(k[i][j] * l[i][j] for i, j in itertools.permutations(range(m), 2)) / fall(2)
    second = sum(k[i][j] * l[q][r] for i, j, q, r in itertools.permutations(range(m), 4)) / fall(4)
    third = sum(k[i][j] * l[i][q] for i, j, q in itertools.permutations(range(m), 3)) / fall(3)
    return first + second - 2 * third


def test_unbiased_hsic_is_the_u_statistic_by_direct_sums():
    k, l = random_kernels(7)
    assert hsic_unbiased(k, l).item() == pytest.approx(hsic_u_statistic(k, l), rel=1e-10)


def test_biased_hsic_is_the_centred_trace_by_direct_sums():
    k, l = random_kernels(6, seed=1)
    m = 6
    h = [[(1.0 if i == j else 0.0) - 1 / m for j in range(m)] for i in range(m)]
    kl = k.tolist(), l.tolist()
    # tr(K H L H) = sum_{a,b,c,d} K_ab H_bc L_cd H_da
    want = sum(kl[0][a][b] * h[b][c] * kl[1][c][d] * h[d][a]
               for a, b, c, d in itertools.product(range(m), repeat=4)) / (m - 1) ** 2
    assert hsic_biased(k, l).item() == pytest.approx(want, rel=1e-10)


def test_unbiased_estimator_refuses_fewer_than_four_samples():
    k = torch.eye(3)
    with pytest.raises(ValueError, match="at least 4"):
        hsic_unbiased(k, k)


def test_rbf_kernel_by_hand():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])  # distance 5
    k = rbf_kernel(x, sigma=2.0)
    assert k[0, 0].item() == 1.0 and k[0, 1].item() == pytest.approx(math.exp(-25 / 8))
    assert squared_distances(x)[1, 0].item() == pytest.approx(25.0)


def test_hsic_is_larger_for_dependent_features_than_for_independent_ones():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    dependent = rbf_hsic(x, x[:, :2] * 2 + 0.1 * torch.randn(64, 2, generator=gen), 1.0, 1.0)
    independent = rbf_hsic(x, torch.randn(64, 2, generator=gen), 1.0, 1.0)
    assert dependent.item() > 10 * abs(independent.item())


def test_median_radius_leaves_out_self_distances():
    # one batch of three points on a line at 0, 1, 3: squared distances 1, 9, 4 (each twice) -> median 4 -> radius 2
    assert median_radius([torch.tensor([[0.0], [1.0], [3.0]])]) == pytest.approx(2.0)


class TwoLayer(torch.nn.Module):
    """A tiny g with the model interface: (logits, features) on return_features."""

    def __init__(self):
        super().__init__()
        self.feat = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x, return_features=False):
        h = torch.tanh(self.feat(x))
        return (self.head(h), h) if return_features else self.head(h)


def plugin_with_biased(inner_weight=1.0, update_biased_cls=False, lr=0.05):
    plugin = ReBias(inner_weight=inner_weight, update_biased_cls=update_biased_cls, sigma=1.0)
    torch.manual_seed(0)
    plugin.biased = torch.nn.ModuleList([TwoLayer()])
    plugin.optimizer = torch.optim.SGD(plugin.biased.parameters(), lr=lr)
    return plugin


class NoScaler:
    scaler = None


def test_g_step_increases_its_dependence_on_f_and_f_term_trains_f_only():
    """The inner update is a descent step on -lambda_g HSIC(g, f): HSIC(g(x), f) grows; the returned f term is
    lambda_f HSIC(f, g(x)) with g fixed (no gradient reaches g from it)."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=gen), torch.randint(0, 2, (16,), generator=gen)
    f_feats = torch.randn(16, 5, generator=gen, requires_grad=True)
    plugin = plugin_with_biased()
    before = rbf_hsic(plugin.biased[0](x, return_features=True)[1], f_feats.detach(), 1.0, 1.0).item()
    out = StepOutput(logits=torch.zeros(16, 2), per_sample_loss=torch.zeros(16), features=f_feats)
    terms = plugin.extra_loss(NoScaler(), {"x": x, "y": y}, out)
    g_feats = plugin.biased[0](x, return_features=True)[1]
    after = rbf_hsic(g_feats, f_feats.detach(), 1.0, 1.0).item()
    assert after > before
    want = rbf_hsic(f_feats, g_feats.detach(), 1.0, 1.0)
    assert terms["rebias_hsic"].item() == pytest.approx(want.item(), rel=1e-6)
    plugin.optimizer.zero_grad()
    terms["rebias_hsic"].backward()
    assert f_feats.grad is not None and f_feats.grad.abs().sum() > 0
    assert all(p.grad is None for p in plugin.biased.parameters())


def test_a_batch_of_fewer_than_four_samples_adds_no_term():
    plugin = plugin_with_biased()
    out = StepOutput(logits=torch.zeros(3, 2), per_sample_loss=torch.zeros(3), features=torch.randn(3, 5))
    assert plugin.extra_loss(NoScaler(), {"x": torch.randn(3, 3), "y": torch.tensor([0, 1, 0])}, out) == {}


def test_end_to_end_bias_agnostic_with_a_1x1_kernel_biased_network(tmp_path):
    summary = run(make_cfg(*TINY, "debias=rebias"), run_dir=tmp_path)
    assert summary["bias_agnostic"] is True
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(r["loss/rebias_hsic"] > 0 for r in records) and 0 <= summary["last_rebias_biased_test_acc"] <= 1
    # the unweighted HSIC(f, g) of each epoch (mean over steps; the loss term is a per-sample mean, lambda_f = 1)
    assert all(r["rebias_hsic_fg"] == pytest.approx(r["loss/rebias_hsic"], rel=0.2) for r in records)
    assert summary["last_rebias_hsic_fg"] == records[-1]["rebias_hsic_fg"]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    g = state["plugins"]["debias"]["biased"]
    convs = [v for k, v in g.items() if k.endswith("weight") and v.dim() == 4]
    assert convs and all(w.shape[-2:] == (1, 1) for w in convs)  # small receptive field: 1x1 kernels


def test_median_radii_are_measured_when_sigma_is_null(tmp_path):
    run(make_cfg(*TINY, "debias=rebias", "debias.sigma=null", "trainer.epochs=1"), run_dir=tmp_path)
    record = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert record["rebias_sigma_f"] != 1.0 and record["rebias_sigma_g"] != 1.0 and record["rebias_sigma_g"] > 0


def test_a_biased_arch_option_the_run_arch_lacks_is_one_clear_error(tmp_path):
    cfg = make_cfg(*TINY, "debias=rebias", "+debias.biased_arch={depth: 3}", "trainer.epochs=1")
    with pytest.raises(ConfigError, match="does not fit arch"):
        run(cfg, run_dir=tmp_path)


def test_a_whole_biased_arch_with_its_target(tmp_path):
    cfg = make_cfg(*TINY, "debias=rebias", "trainer.epochs=1",
                   "+debias.biased_arch={_target_: regstory.models.simple_convnet.simple_convnet, channels: [4, 8], "
                   "kernel_size: 1}")
    run(cfg, run_dir=tmp_path)
    g = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["plugins"]["debias"]["biased"]
    assert [v.shape[0] for k, v in g.items() if k.endswith("weight") and v.dim() == 4] == [4, 8]


def test_resume_continues_the_biased_networks(tmp_path, monkeypatch):
    overrides = [*TINY, "debias=rebias", "trainer.epochs=3", "debias.sigma=null"]
    straight = run(make_cfg(*overrides), run_dir=tmp_path / "straight")
    resumed = interrupt_then_resume(monkeypatch, ReBias, "start_epoch", (0, 2), overrides, tmp_path / "resumed")
    for key in ("last_test_unbiased_acc", "last_rebias_biased_test_acc", "last_bias_probe_acc"):
        assert resumed[key] == straight[key], key


def test_cli_rebias_preset(tmp_path):
    run_dir, summary = run_preset_cli(tmp_path, "debias_digits_rebias")
    assert summary["bias_agnostic"] is True and summary["selection"] == "val_unbiased_acc"
    assert OmegaConf.load(run_dir / "config.yaml").debias._target_ == "regstory.debias.rebias.ReBias"


def test_table3_1_rebias_row_trains_on_celeba_files(fake_celeba, tmp_path):
    """The Table 3.1 row end to end on CelebA in torchvision's on-disk format (tiny fake images)."""
    cfg = make_cfg("experiment=table3_1", "debias=rebias", f"data.root={fake_celeba}", "data.download=false",
                   "dataset.image_size=16", "trainer.epochs=1", "trainer.batch_size=16", "debias.probe_steps=5")
    summary = run(cfg, run_dir=tmp_path / "run")
    assert summary["bias_agnostic"] is True and 0 <= summary["last_test_acc"] <= 1
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["rebias_sigma_g"] > 0
