"""Name -> function registries (verl ``core_algos`` style): a config string picks the function, and
config validation reads the registry, so registering is all a new estimator / loss needs."""
from __future__ import annotations

from typing import Callable


def registrar(table: dict[str, Callable], kind: str) -> Callable[[str], Callable]:
    """A decorator factory that adds functions to ``table`` under a name (each name once)."""

    def register(name: str):
        def wrap(fn):
            if name in table:
                raise ValueError(f"{kind} {name!r} registered twice")
            table[name] = fn
            return fn

        return wrap

    return register


def lookup(table: dict[str, Callable], kind: str, name: str) -> Callable:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(table)}") from None
