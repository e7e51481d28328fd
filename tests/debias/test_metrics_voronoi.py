"""Group metrics on crafted predictions, the bias probe, and the Voronoi distance / e* / weights (thesis sec. 3.6)."""

import pytest
import torch

from regstory.debias.base import group_accuracies, group_metrics, linear_probe_accuracy
from regstory.debias.voronoi import (alignment_weights, bisector_distance, class_centroids, pseudo_bias,
                                     relative_distance, select_epoch)


def test_group_metrics_on_crafted_predictions():
    # 2 targets x 2 bias; groups (t,b): (0,0) 2 samples both right, (0,1) 2 samples 1 right,
    # (1,0) 1 sample wrong, (1,1) 3 samples all right
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    b = torch.tensor([0, 0, 1, 1, 0, 1, 1, 1])
    pred = torch.tensor([0, 0, 0, 1, 0, 1, 1, 1])
    acc = group_accuracies(pred, y, b, 2, 2)
    assert torch.allclose(acc, torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    m = group_metrics(pred, y, b, 2, 2)
    assert m["acc"] == pytest.approx(6 / 8)
    assert m["unbiased_acc"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert m["conflicting_acc"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["aligned_acc"] == pytest.approx(1.0)
    assert m["worst_group_acc"] == pytest.approx(0.0)


def test_group_metrics_ignore_empty_groups():
    y, b = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])
    m = group_metrics(torch.tensor([0, 1, 0]), y, b, 3, 3)  # only groups (0,0), (1,1), (1,0) present
    assert m["unbiased_acc"] == pytest.approx(2 / 3)
    assert m["worst_group_acc"] == 0.0


def test_bias_probe_reads_a_linear_bias_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    b = torch.randint(0, 3, (300,), generator=gen)
    readable = torch.randn(300, 5, generator=gen) + 3 * torch.nn.functional.one_hot(b, 5).float()
    noise = torch.randn(300, 5, generator=gen)
    assert linear_probe_accuracy(readable[:200], b[:200], readable[200:], b[200:], 3) > 0.95
    assert linear_probe_accuracy(noise[:200], b[:200], noise[200:], b[200:], 3) < 0.55


def test_voronoi_centroids_use_correct_samples_only():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [4.0, 4.0]])
    y = torch.tensor([0, 0, 0, 1])
    pred = torch.tensor([0, 0, 1, 1])  # the far sample of class 0 is misclassified: excluded
    c = class_centroids(z, y, pred, 3)
    assert torch.allclose(c[:2], torch.tensor([[1.0, 0.0], [4.0, 4.0]]))
    assert torch.isnan(c[2]).all()


def test_voronoi_bisector_distance_on_2d_features():
    # centroids (0,0) and (4,0): bisector x = 2. A class-0 sample at (5, 1) predicted as 1: distance 3
    c = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    z = torch.tensor([[5.0, 1.0], [2.5, -7.0]])
    d = bisector_distance(z, c, torch.tensor([0, 0]), torch.tensor([1, 1]))
    assert torch.allclose(d, torch.tensor([3.0, 0.5]))
    # relative: d * K / sum ||c_k|| = d * 2 / 4
    assert torch.allclose(relative_distance(d, c), torch.tensor([1.5, 0.25]))
    # the symmetric case: a class-1 sample predicted 0 at (-1, 0) is 3 away from x = 2
    assert bisector_distance(torch.tensor([[-1.0, 0.0]]), c, torch.tensor([1]), torch.tensor([0])).item() == 3.0


def test_voronoi_relative_distance_leaves_classes_without_centroid_out():
    """A class with no correctly classified sample has a NaN centroid; it used to turn every distance into NaN."""
    c = torch.tensor([[0.0, 0.0], [4.0, 0.0], [float("nan"), float("nan")]])
    d = torch.tensor([3.0, 0.5])
    assert torch.allclose(relative_distance(d, c), torch.tensor([1.5, 0.25]))  # mean norm of the two present: 2


def test_voronoi_measures_on_the_device_and_keeps_only_the_best_epochs_predictions():
    """Per step: predictions and the relative distances of the misclassified samples whose two centroids exist,
    summed in device tensors (by hand below); per epoch: one read, and only e*'s predictions are kept."""
    from types import SimpleNamespace

    from regstory.debias.voronoi import VoronoiMining
    from regstory.plugins import StepOutput

    plugin = VoronoiMining()
    plugin.train_y = torch.tensor([0, 0, 1, 2])
    plugin.centroids = torch.tensor([[0.0, 0.0], [4.0, 0.0], [float("nan"), float("nan")]])
    ctx = SimpleNamespace(epoch=3)
    epochs = {3: (torch.tensor([1, 0, 1, 1]), [[5.0, 1.0], [0.0, 0.0], [4.0, 0.0], [9.0, 9.0]]),
              4: (torch.tensor([1, 1, 1, 1]), [[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [9.0, 9.0]])}
    for epoch, (pred, feats) in epochs.items():
        zero = torch.zeros(())
        plugin._epoch = (torch.full((4,), -1), zero, zero.long())
        logits = torch.nn.functional.one_hot(pred, 3).float()
        batch = {"index": torch.arange(4), "y": plugin.train_y}
        plugin._measure(ctx, batch, StepOutput(logits=logits, per_sample_loss=torch.zeros(4),
                                               features=torch.tensor(feats)))
        plugin._close_epoch(epoch)
    # epoch 3: sample 0 (y 0 -> 1, at (5, 1)) is 3 from x = 2, relative 3 / mean norm 2 = 1.5; sample 3 (y 2) has
    # no centroid: not counted. Epoch 4: samples 0, 1 at (4, 0): 2 from x = 2, relative 1 each -> mean 1 < 1.5
    assert plugin.distance_sum == {3: pytest.approx(1.5), 4: pytest.approx(2.0)}
    assert plugin.distance_count == {3: 1, 4: 2}
    assert torch.equal(plugin.best_predictions, torch.tensor([1, 0, 1, 1]))  # epoch 3's, the peak
    assert not hasattr(plugin, "predictions")  # no store of every epoch's predictions


def test_voronoi_e_star_is_the_peak_of_the_mean_distance():
    assert select_epoch({1: 0.2, 2: 0.9, 3: 0.5, 4: 0.9}) == 2
    assert select_epoch({5: 0.1}) == 5


def test_voronoi_pseudo_bias_and_alignment_weights():
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    pred = torch.tensor([0, 0, 0, 1, 1, 0])
    b_hat = pseudo_bias(y, pred)
    assert torch.equal(b_hat, torch.tensor([0, 0, 0, 1, 1, 0]))
    # misaligned with b^=1: 1 (N_1 = 2) -> rho_1 = 1/2 ; with b^=0: 1 (N_0 = 4) -> rho_0 = 3/4
    w = alignment_weights(y, b_hat, 2)
    expected = torch.tensor([4 / 3, 4 / 3, 4 / 3, 1 / (1 - 0.5), 1 / 0.5, 1 / (1 - 0.75)])
    assert torch.allclose(w, expected)
