"""Named registries: one per kind of piece, one call signature per registry.

    CREDIT = Registry("credit estimator")
    @CREDIT.register("grpo")
    def group_baseline(inputs, *, normalize_std=True): ...
    CREDIT.get("grpo")  # -> the function; a bad name lists the valid ones

A piece may declare what it needs where it is registered (`register(name, needs=("values",))`); `info(name)`
returns those declarations, so the code that checks a composition reads them instead of keeping lists of names.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, F] = {}
        self._info: dict[str, dict] = {}

    def register(self, name: str, **info) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered (by {self._items[name].__module__})")
            self._items[name] = fn
            self._info[name] = info
            return fn
        return add

    def info(self, name: str) -> dict:
        """What the piece declared at registration (e.g. needs=("values",)); {} when nothing."""
        self.get(name)
        return self._info[name]

    def get(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def import_all(package: str, skip: tuple[str, ...] = ()) -> None:
    """Import every module of `package` (by its dotted name): a piece registers itself by being a file there, so
    adding an objective, an estimator, a reward or a task is adding one file (docs/architecture.md)."""
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")
