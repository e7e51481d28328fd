"""Stop criteria (sec. 2.4.2) and SDD phase identification (sec. 2.4.1) on synthetic curves."""
import pytest

from regstory.pruning.phases import describe_phases, phase_labels
from regstory.pruning.stop import StopCriterion

# A synthetic sparse double descent: light, critical (dip), sweet (rise above dense), collapsed.
SDD_ACC = [0.37, 0.375, 0.37, 0.35, 0.33, 0.30, 0.33, 0.38, 0.40, 0.395, 0.30, 0.15]
SPARSITY = [1 - 0.8 ** i for i in range(len(SDD_ACC))]


def run_stop(criterion, entropies, accs):
    for i, (e, a) in enumerate(zip(entropies, accs)):
        if criterion.update(e, a):
            return i
    return None


def test_accuracy_criterion_stops_at_the_first_drop_in_the_critical_phase():
    flat = [1.0] * len(SDD_ACC)
    assert run_stop(StopCriterion("accuracy", acc_drop=0.01), flat, SDD_ACC) == 3


def test_entropy_criterion_waits_for_k_declines_then_stops_after_the_sweet_peak():
    entropies = [0.97, 0.98, 0.98, 0.98, 0.97, 0.98, 0.90, 0.80, 0.70, 0.60, 0.50, 0.40]
    crit = StopCriterion("entropy", patience=2, tolerance=0.02, acc_drop=0.01, reference="onset")
    assert run_stop(crit, entropies, SDD_ACC) == 10  # onset at round 7 (declines at 6, 7); 0.30 < 0.40 - 0.01
    assert crit.onset == 7


def test_entropy_tolerance_ignores_small_fluctuations():
    crit = StopCriterion("entropy", patience=2, tolerance=0.02)
    assert run_stop(crit, [1.0, 0.99, 0.98, 0.97, 0.96], [0.5, 0.4, 0.3, 0.2, 0.1]) is None
    assert crit.onset is None


def test_entropy_reference_best_uses_the_whole_sweep():
    entropies = [1.0, 0.9, 0.8, 0.7]
    accs = [0.50, 0.45, 0.46, 0.47]
    assert run_stop(StopCriterion("entropy", patience=2, reference="best"), entropies, accs) == 2
    assert run_stop(StopCriterion("entropy", patience=2, reference="onset"), entropies, accs) is None


def test_none_never_stops_and_bad_mode_fails():
    assert run_stop(StopCriterion("none"), [1, 0.5, 0.1], [0.9, 0.1, 0.0]) is None
    with pytest.raises(ValueError, match="stop"):
        StopCriterion("sometimes")


def test_phases_of_a_sparse_double_descent_curve():
    labels = phase_labels(SDD_ACC, tol=0.01)
    assert labels == ["light"] * 3 + ["critical"] * 3 + ["sweet"] * 4 + ["collapsed"] * 2
    d = describe_phases(SPARSITY, SDD_ACC, tol=0.01)
    assert d["double_descent"] and d["dip"]["round"] == 5 and d["sweet_peak"]["round"] == 8
    assert d["phases"]["sweet"]["sparsity"] == [SPARSITY[6], SPARSITY[9]]


def test_phases_without_a_second_descent_are_light_then_collapsed():
    assert phase_labels([0.9, 0.9, 0.85, 0.8, 0.7], tol=0.01) == ["light", "light", "collapsed", "collapsed",
                                                                    "collapsed"]


def test_rise_smaller_than_tolerance_is_not_a_sweet_phase():
    assert "sweet" not in phase_labels([0.9, 0.8, 0.805, 0.7], tol=0.01)


def test_all_light_when_accuracy_never_drops():
    assert phase_labels([0.5, 0.51, 0.5]) == ["light"] * 3


def test_a_rebound_among_collapsed_rounds_is_not_the_sweet_phase():
    """Sec. 2.4.1 orders the phases light, critical, sweet, collapsed. The largest rise anywhere (.15 -> .30) was
    read as the sweet phase: L L C C C C C C S X."""
    acc = [0.80, 0.80, 0.74, 0.72, 0.78, 0.76, 0.40, 0.15, 0.30, 0.10]
    assert phase_labels(acc, tol=0.02) == ["light"] * 2 + ["critical"] * 2 + ["sweet"] * 2 + ["collapsed"] * 4
    d = describe_phases(list(range(10)), acc, tol=0.02)
    assert d["dip"]["round"] == 3 and d["sweet_peak"]["round"] == 4


def test_the_sweet_phase_ends_at_the_first_fall_below_the_peak():
    """A round that fell below peak - tol ends the sweet phase, even if a later one comes back near the peak (it
    was sweet through round 6, the .70 included)."""
    acc = [0.80, 0.70, 0.60, 0.75, 0.74, 0.70, 0.74, 0.30]
    assert phase_labels(acc, tol=0.02) == ["light", "critical", "critical", "sweet", "sweet"] + ["collapsed"] * 3


def test_phases_are_contiguous_and_ordered_on_random_curves():
    import random

    rng = random.Random(0)
    order = {p: i for i, p in enumerate(("light", "critical", "sweet", "collapsed"))}
    for _ in range(500):
        acc = [rng.random() for _ in range(rng.randint(1, 12))]
        labels = phase_labels(acc, tol=rng.choice([0.0, 0.01, 0.1]))
        ranks = [order[lab] for lab in labels]
        assert ranks == sorted(ranks) and labels[0] == "light"
        assert ("sweet" in labels) == ("critical" in labels)


def test_phases_read_the_validation_curve_when_the_run_has_one():
    from types import SimpleNamespace

    from regstory.pruning.measures import SDDPhases

    rounds = [{"sparsity": s, "test_acc": t, "val_acc": v}
              for s, t, v in zip(SPARSITY, SDD_ACC, [0.5] * len(SDD_ACC))]
    with_val, without_val = SimpleNamespace(loaders={"train": 0, "val": 0, "test": 0}), SimpleNamespace(loaders={})
    for ctx, metric in ((with_val, "val_acc"), (without_val, "test_acc")):
        phases = SDDPhases("auto", 0.01)
        phases.setup(None, ctx)
        assert phases.summary(None, ctx, rounds)["sdd"]["metric"] == metric
    chosen = SDDPhases("test_acc", 0.01)
    chosen.setup(None, with_val)
    assert chosen.summary(None, with_val, rounds)["sdd"]["phase_per_round"] == phase_labels(SDD_ACC, 0.01)


def test_phase_metric_defaults_to_auto():
    import inspect

    from regstory.pruning.magnitude import IMP

    assert inspect.signature(IMP).parameters["phase_metric"].default == "auto"
