"""The four phases of sparse double descent (thesis sec. 2.4.1, Fig. 2.7), identified on a finished sweep.

The thesis orders them along increasing sparsity: **light** (accuracy stays near the dense model's), **critical**
(accuracy drops), **sweet** (performance increases again, often above dense) and **collapsed** (it falls for good).
Each phase is one contiguous run of rounds, in that order. Given one accuracy per round (increasing sparsity;
round 0 dense) and a tolerance ``tol``:

- **light**: the rounds from the start up to (excluding) the first one whose accuracy is below ``dense - tol``;
- the **sweet peak** s is the best round after the light phase (highest accuracy; ties: the earliest), and the
  **dip** d the worst round between the end of the light phase and s (ties: the latest, where the rise starts).
  If acc[s] - acc[d] < ``tol`` (or s is the first round after the light phase) there is no double descent and every
  round after the light phase is **collapsed**;
- **critical**: from the end of the light phase through the dip d;
- **sweet**: from d + 1 through s, then on while the accuracy stays >= acc[s] - tol (it ends at the first round
  below, even if a later round comes back up);
- **collapsed**: every later round.

Taking the peak as the best round after the light phase (not the largest rise anywhere) keeps a small rebound among
collapsed rounds (.15 -> .30 after the sweet phase ended) from being read as the sweet phase.
"""
from __future__ import annotations

from typing import Any, Sequence

PHASES = ("light", "critical", "sweet", "collapsed")


def light_phase_end(acc: Sequence[float], tol: float) -> int:
    """The first round whose accuracy is below ``acc[0] - tol`` (``len(acc)`` if none): the light phase ends there."""
    return next((i for i in range(len(acc)) if acc[i] < acc[0] - tol), len(acc))


def dip_and_peak(acc: Sequence[float], start: int) -> tuple[int, int]:
    """(d, s): s the best round from ``start`` on (earliest of ties), d the worst round in [start, s) (latest of
    ties); d == s == start when s is ``start`` itself (no rise after the light phase)."""
    peak = max(range(start, len(acc)), key=lambda i: (acc[i], -i))
    if peak == start:
        return start, start
    dip = min(range(start, peak), key=lambda i: (acc[i], -i))
    return dip, peak


def phase_labels(acc: Sequence[float], tol: float = 0.01) -> list[str]:
    """One phase name per round: contiguous phases in the order light, critical, sweet, collapsed (see the module
    docstring for the rule)."""
    n = len(acc)
    if n == 0:
        return []
    light_end = light_phase_end(acc, tol)
    labels = ["light"] * light_end
    if light_end == n:
        return labels
    dip, peak = dip_and_peak(acc, light_end)
    if peak == dip or acc[peak] - acc[dip] < tol:
        return labels + ["collapsed"] * (n - light_end)
    sweet_end = peak
    while sweet_end + 1 < n and acc[sweet_end + 1] >= acc[peak] - tol:
        sweet_end += 1
    labels += ["critical"] * (dip - light_end + 1)
    labels += ["sweet"] * (sweet_end - dip)
    labels += ["collapsed"] * (n - sweet_end - 1)
    return labels


def describe_phases(sparsity: Sequence[float], acc: Sequence[float], tol: float = 0.01) -> dict[str, Any]:
    """Phase per round, each phase's sparsity range, and the dense / dip / sweet-peak points (for summary.json)."""
    labels = phase_labels(acc, tol)
    ranges = {}
    for phase in PHASES:
        idx = [i for i, lab in enumerate(labels) if lab == phase]
        if idx:
            ranges[phase] = {"rounds": [idx[0], idx[-1]], "sparsity": [sparsity[idx[0]], sparsity[idx[-1]]]}
    out: dict[str, Any] = {"phase_per_round": labels, "phases": ranges, "double_descent": "sweet" in ranges}
    if "critical" in ranges:
        dip = ranges["critical"]["rounds"][1]
        out["dip"] = {"round": dip, "sparsity": sparsity[dip], "acc": acc[dip]}
    if "sweet" in ranges:
        sweet = [i for i, lab in enumerate(labels) if lab == "sweet"]
        peak = max(sweet, key=lambda i: (acc[i], -i))
        out["sweet_peak"] = {"round": peak, "sparsity": sparsity[peak], "acc": acc[peak]}
    return out
