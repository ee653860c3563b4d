"""Find sources and exporters by name through entry points (the pattern of xarray's backends).

``arraystore`` never imports ``converters``: converters register their classes under the groups
``arraystore.sources`` and ``arraystore.exporters`` in ``pyproject.toml``. A class is accepted
wherever a name is, so code that was never installed as a package can still plug in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar

from arraystore.errors import OptionError, UnknownPluginError

SOURCES_GROUP = "arraystore.sources"
EXPORTERS_GROUP = "arraystore.exporters"
FIXES_GROUP = "arraystore.fixes"
T = TypeVar("T")


@dataclass(frozen=True)
class PluginOption:
    """A plug-in's own command-line option (``--max-boxes``, ``--weights``), declared by it."""

    name: str
    type: type
    default: Any
    help: str
    required: bool = False
    multiple: bool = False
    minimum: int | None = None  # an int option's smallest value (batch sizes: 1)
    # why a value cannot be used (e.g. "is not a torch device"), None when it can
    validate: Callable[[Any], str | None] | None = None

    @property
    def flag(self) -> str:
        """The option as the command line spells it: ``--max-boxes``."""
        return f"--{self.name.replace('_', '-')}"

    def check(self, value: Any) -> None:
        """Refuse a value below ``minimum`` or one ``validate`` objects to, naming the option
        as the command line spells it."""
        if value is None or self.multiple:
            return
        if self.minimum is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < self.minimum):
            raise OptionError(f"{self.flag} must be an integer >= {self.minimum}, got {value!r}")
        problem = self.validate(value) if self.validate is not None else None
        if problem:
            raise OptionError(f"{self.flag} {value!r} {problem}")


def plugin_names(group: str) -> list[str]:
    """Names registered under an entry-point group, sorted."""
    return sorted(ep.name for ep in entry_points(group=group))


def load_plugin(group: str, name_or_class: str | type[T]) -> type[T]:
    """The class registered as ``name_or_class`` (or the class itself when one is given)."""
    if isinstance(name_or_class, type):
        return name_or_class
    matches = [ep for ep in entry_points(group=group) if ep.name == name_or_class]
    if not matches:
        raise UnknownPluginError(
            f"no {group.split('.')[-1][:-1]} named {name_or_class!r}; installed: "
            f"{plugin_names(group) or 'none (is the arraystore package installed?)'}"
        )
    return matches[0].load()
