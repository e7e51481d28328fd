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
