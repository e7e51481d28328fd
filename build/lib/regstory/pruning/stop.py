"""When to stop a pruning sweep (thesis sec. 2.4.2).

``accuracy`` (the traditional criterion): stop once the clean validation accuracy falls more than ``acc_drop``
below the best seen so far. Under sparse double descent this stops in the critical phase and misses the sweet one.

``entropy``: the thesis' proposal, whose rule the text leaves open. Here: the *onset* of the classical regime is the
round where the chosen mean activation entropy (``average``: ``all`` neurons or ``nonconstant`` ones) has declined,
by more than ``tolerance`` bit each time, for ``patience`` consecutive rounds. From the onset on the accuracy
criterion applies, its reference being the best validation accuracy since the onset (``reference=onset``) or over
the whole sweep (``reference=best``). Before the onset nothing stops the sweep. Accuracy is always judged on the
held-out validation split, never on the test set.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

MODES = ("none", "accuracy", "entropy")


@dataclass
class StopCriterion:
    mode: str = "none"
    patience: int = 2
    tolerance: float = 0.0
    acc_drop: float = 0.01
    reference: str = "onset"  # onset | best
    entropies: list[float] = field(default_factory=list)
    accs: list[float] = field(default_factory=list)
    onset: int | None = None  # index (in updates) of the round the entropy onset was detected

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"method.stop='{self.mode}' is unknown: use one of {', '.join(MODES)}")
        if self.reference not in ("onset", "best"):
            raise ValueError(f"method.stop_reference='{self.reference}' is unknown: use onset or best")

    def declining_rounds(self) -> int:
        """How many consecutive rounds, ending now, the entropy fell by more than ``tolerance``."""
        run = 0
        for prev, cur in zip(self.entropies[-2::-1], self.entropies[::-1]):
            if prev - cur > self.tolerance:
                run += 1
            else:
                break
        return run

    def update(self, entropy: float, val_acc: float | None) -> bool:
        """Record one finished round; True when the sweep should stop after it."""
        self.entropies.append(float(entropy))
        self.accs.append(float("nan") if val_acc is None else float(val_acc))
        if self.mode == "none":
            return False
        if self.mode == "entropy":
            if self.onset is None and self.declining_rounds() >= self.patience:
                self.onset = len(self.accs) - 1
            if self.onset is None:
                return False
            start = self.onset if self.reference == "onset" else 0
        else:
            start = 0
        reference = max(self.accs[start:])
        return self.accs[-1] < reference - self.acc_drop

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
