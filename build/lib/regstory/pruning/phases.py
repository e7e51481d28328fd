"""The four phases of sparse double descent (thesis sec. 2.4.1), identified on a finished sweep.

Given one accuracy per round (increasing sparsity; round 0 dense) and a tolerance ``tol``:

- **light**: the rounds from the start up to (excluding) the first one whose accuracy is below ``dense - tol``;
- **sweet** needs a recovery: the pair of rounds d < s after the light phase with the largest rise
  acc[s] - acc[d] (ties: earliest d, then earliest s). If that rise is at least ``tol``, d is the *dip* and s
  the *sweet peak*; otherwise there is no double descent and every round after the light phase is **collapsed**;
- **critical**: from the end of the light phase through the dip d;
- **sweet**: after the dip through the last round after the peak whose accuracy is still >= acc[s] - tol;
- **collapsed**: every later round.
"""
from __future__ import annotations

from typing import Any, Sequence

PHASES = ("light", "critical", "sweet", "collapsed")


def largest_rise(acc: Sequence[float], start: int) -> tuple[int, int, float]:
    """(d, s, acc[s] - acc[d]) maximising the rise over start <= d < s; (start, start, 0) if none."""
    best = (start, start, 0.0)
    if start >= len(acc):
        return best
    low = start
    for s in range(start + 1, len(acc)):
        if acc[s] - acc[low] > best[2]:
            best = (low, s, acc[s] - acc[low])
        if acc[s] < acc[low]:
            low = s
    return best


def phase_labels(acc: Sequence[float], tol: float = 0.01) -> list[str]:
    """One phase name per round (see the module docstring for the rule)."""
    n = len(acc)
    if n == 0:
        return []
    dense = acc[0]
    light_end = next((i for i in range(n) if acc[i] < dense - tol), n)
    labels = ["light"] * light_end
    if light_end == n:
        return labels
    dip, peak, rise = largest_rise(acc, light_end)
    if rise < tol:
        return labels + ["collapsed"] * (n - light_end)
    sweet_end = max(j for j in range(peak, n) if acc[j] >= acc[peak] - tol)
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
