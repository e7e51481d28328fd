"""Each debiasing loss against values computed by hand on a tiny batch (thesis sec. 3.4-3.6)."""
import math

import pytest
import torch
import torch.nn.functional as F

from regstory.debias.end import disentangling_term, entangling_term, gram_matrix
from regstory.debias.groupdro import group_dro_step
from regstory.debias.irene import mutual_information_proxy, probs_without_head_gradient
from regstory.debias.lff import LossEMA, generalized_cross_entropy, relative_difficulty

# four 2-d bottleneck vectors; after normalisation: e1, e2, -e1, (e1+e2)/sqrt2
Z = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
S = 1 / math.sqrt(2)


def test_end_gram_matrix_is_cosine_similarity_eq_sec3_4():
    g = gram_matrix(Z)
    expected = torch.tensor([[1, 0, -1, S], [0, 1, 0, S], [-1, 0, 1, -S], [S, S, -S, 1]])
    assert torch.allclose(g, expected, atol=1e-6)


def test_end_disentangling_term_abs_of_per_bias_sums_sec3_4():
    # bias classes: {0, 2} -> pair (2,0): g=-1 ; {1, 3} -> pair (3,1): g=S.  R = (|-1| + |S|) / 2
    bias = torch.tensor([0, 1, 0, 1])
    assert disentangling_term(gram_matrix(Z), bias, 2).item() == pytest.approx((1 + S) / 2, abs=1e-6)
    # one bias class, signs cancel inside the class sum: pairs g10=0, g20=-1, g21=0, g30=S, g31=S, g32=-S
    one = torch.zeros(4, dtype=torch.long)
    assert disentangling_term(gram_matrix(Z), one, 1).item() == pytest.approx(abs(-1 + S) / 6, abs=1e-6)
    # no pair shares a bias class -> 0
    assert disentangling_term(gram_matrix(Z), torch.arange(4), 4).item() == 0.0


def test_end_entangling_term_same_target_different_bias_sec3_4():
    # targets {0,1,0,1}, bias {0,0,1,1}: eligible pairs (2,0) g=-1 and (3,1) g=S -> mean (1-g)/2
    y, bias = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
    expected = ((1 - (-1)) / 2 + (1 - S) / 2) / 2
    assert entangling_term(gram_matrix(Z), y, bias).item() == pytest.approx(expected, abs=1e-6)
    assert entangling_term(gram_matrix(Z), y, y).item() == 0.0  # no same-target different-bias pair


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_end_terms_are_fp32_under_autocast_and_match_the_fp32_values(dtype):
    """CUDA's autocast runs sum() in fp32, so a half Gram matrix met an fp32 row sum in index_add and EnD crashed
    on the GPU (found on an H200); the Gram matrix and both terms now run in fp32 whatever the autocast."""
    feats = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    bias, target = torch.tensor([0, 1, 2] * 4), torch.tensor([0, 0, 1, 1] * 3)
    ref_gram = gram_matrix(feats)
    ref = disentangling_term(ref_gram, bias, 3), entangling_term(ref_gram, target, bias)
    with torch.autocast("cpu", dtype=dtype):
        gram = gram_matrix(feats.to(dtype))
        terms = disentangling_term(gram.to(dtype), bias, 3), entangling_term(gram.to(dtype), target, bias)
    assert gram.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms)
    for got, want in zip(terms, ref):
        assert got.item() == pytest.approx(want.item(), abs=2e-2)


def test_masked_mi_proxy_equals_the_proxy_of_the_masked_samples_and_is_zero_without_any():
    gen = torch.Generator().manual_seed(1)
    bias = torch.randint(3, (10,), generator=gen)
    logits = torch.randn(10, 3, generator=gen, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False, True, False, True, True, False])
    probs = logits.softmax(1)
    masked = mutual_information_proxy(bias, probs, 3, mask=mask)
    assert masked.item() == pytest.approx(mutual_information_proxy(bias[mask], probs[mask], 3).item(), rel=1e-6)
    none = mutual_information_proxy(bias, probs, 3, mask=torch.zeros(10, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_irene_mutual_information_proxy_hand_values():
    bias = torch.tensor([0, 0, 1, 1])
    # head perfectly reads the bias: P = diag(1/2, 1/2) -> I = ln2 / ln2 = 1
    perfect = F.one_hot(bias, 2).float()
    assert mutual_information_proxy(bias, perfect, 2).item() == pytest.approx(1.0, abs=1e-6)
    # constant prediction: independent -> 0
    flat = torch.full((4, 2), 0.5)
    assert mutual_information_proxy(bias, flat, 2).item() == pytest.approx(0.0, abs=1e-6)
    # a 3:1 split by hand: P = [[3/8,1/8],[1/8,3/8]], p = q = 1/2
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.25, 0.75]])
    expected = (2 * 3 / 8 * math.log(3 / 8 / 0.25) + 2 * 1 / 8 * math.log(1 / 8 / 0.25)) / math.log(2)
    assert mutual_information_proxy(bias, probs, 2).item() == pytest.approx(expected, abs=1e-6)


def test_irene_mi_gradient_reaches_encoder_not_head_sec3_5_1():
    head = torch.nn.Linear(2, 2)
    z = Z.clone().requires_grad_(True)
    mutual_information_proxy(torch.tensor([0, 0, 1, 1]), probs_without_head_gradient(head, z), 2).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert head.weight.grad is None and head.bias.grad is None


def test_lff_gce_value_and_relative_difficulty_eq1_eq2():
    logits = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    y = torch.tensor([1, 0])
    gce = generalized_cross_entropy(logits, y, q=0.7)
    assert torch.allclose(gce, torch.tensor([(1 - 0.75 ** 0.7) / 0.7, (1 - 0.5 ** 0.7) / 0.7]), atol=1e-6)
    w = relative_difficulty(torch.tensor([3.0, 0.0]), torch.tensor([1.0, 2.0]))
    assert torch.allclose(w, torch.tensor([0.75, 0.0]), atol=1e-6)


def test_lff_loss_ema_first_visit_then_decay_and_class_normalisation():
    labels = torch.tensor([0, 0, 1])
    ema = LossEMA(labels, 2, alpha=0.7)
    ema.update(torch.tensor([0, 2]), torch.tensor([2.0, 4.0]))
    ema.update(torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(ema.value, torch.tensor([0.7 * 2 + 0.3 * 1, 1.0, 4.0]))
    # class 0 max = 1.7 -> [1, 1/1.7]; class 1 max = 4 -> 1
    assert torch.allclose(ema.class_normalised(torch.tensor([0, 1, 2])), torch.tensor([1.0, 1 / 1.7, 1.0]))


def test_groupdro_step_updates_present_groups_only():
    loss = torch.tensor([1.0, 3.0, 2.0])
    group = torch.tensor([0, 0, 2])  # group 1 absent: l0 = 2, l2 = 2
    q = torch.tensor([0.5, 0.25, 0.25])
    robust, q_new = group_dro_step(loss, group, q, eta=0.5)
    raw = torch.tensor([0.5 * math.exp(1.0), 0.25, 0.25 * math.exp(1.0)])
    expected_q = raw / raw.sum()
    assert torch.allclose(q_new, expected_q, atol=1e-6)
    assert robust.item() == pytest.approx(expected_q[0].item() * 2 + expected_q[2].item() * 2, abs=1e-6)
    assert torch.equal(q, torch.tensor([0.5, 0.25, 0.25]))  # input not modified


def test_lff_steps_its_biased_network_through_the_runs_grad_scaler():
    """fp16: f_B's GCE loss is scaled by the run's GradScaler and its step is skipped when f_B's gradients
    overflow; without a scaler an overflowing step would write inf/NaN into f_B."""
    from types import SimpleNamespace

    from regstory.debias.lff import LfF

    torch.manual_seed(0)
    plugin = LfF()
    plugin.biased = torch.nn.Linear(3, 2)
    plugin.optimizer = torch.optim.SGD(plugin.biased.parameters(), lr=0.1)
    ctx = SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=8.0))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])

    before = plugin.biased.weight.detach().clone()
    plugin._biased_loss = plugin.biased(x).sum() * float("inf")
    plugin.after_backward(ctx)
    ctx.scaler.update()
    assert torch.equal(plugin.biased.weight, before) and ctx.scaler.get_scale() == 4.0

    reference = torch.nn.Linear(3, 2)
    reference.load_state_dict(plugin.biased.state_dict())
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    plugin._biased_loss = torch.nn.functional.cross_entropy(plugin.biased(x), y)
    plugin.after_backward(ctx)
    with torch.no_grad():
        want = reference.weight - 0.1 * reference.weight.grad  # the unscaled gradient
    assert torch.allclose(plugin.biased.weight, want, atol=1e-6)
