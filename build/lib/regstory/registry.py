"""A tiny name -> builder registry, used for models and datasets.

The Hydra config group is the user-facing registry (``conf/arch/resnet32.yaml`` names its builder with
``_target_``); this Python-side registry lets notebooks and scripts build the same objects by name and gives
one clear error listing the choices when a name is unknown.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T", bound=Callable)


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def decorator(fn: T) -> T:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._entries[key] = fn
            return fn

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
