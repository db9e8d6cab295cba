"""Name -> (config class, implementation) registries for pluggable parts (blocks, embedding layers).

A new method is one new module that calls :meth:`Registry.register`; the recipe schema builds its
discriminated unions from the registries, so the new name is accepted by recipes, overrides and sweeps.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T")
V = TypeVar("V")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    config: type[BaseModel]
    impl: T


class PackageRegistry(Generic[V]):
    """Named values that the modules of one package register when imported: every module of ``package`` is
    imported on first use, so a new method is one new file. ``what`` names an entry in messages."""

    def __init__(self, what: str, package: str) -> None:
        self.what = what
        self.package = package
        self._entries: dict[str, V] = {}
        self._loaded = False

    def _add(self, name: str, value: V) -> None:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = value

    def _load(self) -> None:
        # Importing every module of the package is what registers them: one file per method.
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> V:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r}; known: {', '.join(self.names())}") from None


class Registry(PackageRegistry[Entry[T]]):
    """Holds named implementations together with their pydantic config classes.

    ``discriminator`` is the config field whose ``Literal`` value names the entry (``block`` for blocks,
    ``kind`` for embedding layers).
    """

    def __init__(self, what: str, discriminator: str, package: str) -> None:
        super().__init__(what, package)
        self.discriminator = discriminator

    def register(self, name: str, config: type[BaseModel]):
        field = config.model_fields.get(self.discriminator)
        if field is None:
            raise TypeError(f"{config.__name__} needs a '{self.discriminator}' field")

        def decorator(impl: T) -> T:
            self._add(name, Entry(name, config, impl))
            return impl

        return decorator

    def configs(self) -> tuple[type[BaseModel], ...]:
        self._load()
        return tuple(self._entries[n].config for n in sorted(self._entries))

    def build(self, config: BaseModel, *args: Any, **kwargs: Any) -> Any:
        entry = self.get(getattr(config, self.discriminator))
        return entry.impl(config, *args, **kwargs)  # type: ignore[operator]
