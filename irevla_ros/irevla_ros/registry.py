"""The one shape of every "pick an implementation by name" table (arm backends, camera backends, policies).

A `Registry` maps a name to the "module:attribute" of its factory; the module is imported only when that name is
asked for, so a machine without franky, pyrealsense2 or the VLA's libraries can still use the others. An unknown
name raises the registry's error (a ValueError) naming every known one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(
        self, what: str, entries: Mapping[str, str], error: type[ValueError] = ValueError, plural: str = ""
    ) -> None:
        self.what = what  # e.g. "arm kind": what a name names, for the error message
        self.plural = plural or f"{what}s"
        self.entries = dict(entries)
        self.error = error

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def factory(self, name: str) -> Callable[..., T]:
        if name not in self.entries:
            raise self.error(f"unknown {self.what} {name!r}; known {self.plural}: {', '.join(self.entries)}")
        module_name, _, attribute = self.entries[name].partition(":")
        return getattr(importlib.import_module(module_name), attribute)  # type: ignore[no-any-return]

    def make(self, name: str, *args: Any, **kwargs: Any) -> T:
        """The factory of `name` called with the arguments (its contract is the registry's, see each one)."""
        return self.factory(name)(*args, **kwargs)
