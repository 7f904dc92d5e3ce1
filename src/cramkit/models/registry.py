"""Name → object registries for the model's architecture axes (no ``if/elif`` on strings)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from ..errors import UnknownName
from ..plugins import unknown_hint

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of choices; unknown names raise UnknownName with a "did you mean" hint."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` adds the decorated object under ``name``."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return add

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name`` (non-decorator form)."""
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        """The object registered as ``name``; UnknownName if there is none."""
        try:
            return self._items[name]
        except KeyError:
            # A run trained with a plugin's architecture, init or norm names it, and reading the
            # run without the plugin must say where such a name comes from.
            hint = unknown_hint(str(name), self._items)
            raise UnknownName(
                f"unknown {self.kind} '{name}'{hint}; choose from {sorted(self._items)}"
            ) from None

    def __contains__(self, name: Any) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)


#: ``arch`` → model class (filled by ``bert.py`` / ``gpt.py``).
ARCHITECTURES: Registry[Any] = Registry("architecture")
#: ``init`` → ``fn(model) -> None`` (filled by ``init.py``).
INITS: Registry[Callable[..., None]] = Registry("init scheme")
