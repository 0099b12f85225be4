"""Registries: plain dicts keyed by the names that appear in search-space files.

Every variant family (norms, models, datasets, attacks, regimes, optimizers, ...) is a
``Registry``. Looking up an unknown name raises ``UnknownNameError`` listing the names
that are known, so a typo in a YAML file or on the command line fails loudly and helpfully.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that is not in a registry; the message lists the known names."""

    def __init__(self, kind: str, name: object, known: list[str]) -> None:
        self.kind, self.name, self.known = kind, name, known
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(known)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class Registry(dict[str, T], Generic[T]):
    """A ``dict`` whose failed look-ups name the registry and list its keys."""

    def __init__(self, kind: str, entries: dict[str, T] | None = None) -> None:
        super().__init__(entries or {})
        self.kind = kind

    def __missing__(self, name: str) -> T:
        raise UnknownNameError(self.kind, name, self.names())

    def names(self) -> list[str]:
        """The known names, in registration order."""
        return list(self.keys())
