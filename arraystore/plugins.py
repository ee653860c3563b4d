"""The one plug-in registry: sources, exporters, fixes and views found by name through entry
points (the pattern of xarray's backends).

The store's core never imports a converter: converters register their classes under the groups
below in ``pyproject.toml``, and any installed distribution may add its own. A class is accepted
wherever a name is, so code that was never installed as a package can still plug in. Two
distributions registering one name in one group is an error naming both, never a silent pick.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

from arraystore.errors import DuplicatePluginError, OptionError, UnknownPluginError

SOURCES_GROUP = "arraystore.sources"
EXPORTERS_GROUP = "arraystore.exporters"
FIXES_GROUP = "arraystore.fixes"
VIEWS_GROUP = "arraystore.views"
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
    return sorted({ep.name for ep in entry_points(group=group)})


def find_plugin(group: str, name: str) -> type | None:
    """The class registered as ``name`` in ``group``, or None; a :class:`DuplicatePluginError`
    naming both distributions when two register it (differently)."""
    matches = {(_distribution(ep), ep.value): ep
               for ep in entry_points(group=group) if ep.name == name}
    if len(matches) > 1:
        listed = " and ".join(f"{dist} ({value})" for dist, value in sorted(matches))
        raise DuplicatePluginError(
            f"{listed} both register {name!r} under {group!r}; uninstall one of them")
    return next(iter(matches.values())).load() if matches else None


def load_plugin(group: str, name_or_class: str | type[T]) -> type[T]:
    """The class registered as ``name_or_class`` (or the class itself when one is given)."""
    if isinstance(name_or_class, type):
        return name_or_class
    found = find_plugin(group, name_or_class)
    if found is None:
        raise UnknownPluginError(
            f"no {group.split('.')[-1][:-1]} named {name_or_class!r}; installed: "
            f"{plugin_names(group) or 'none (is the arraystore package installed?)'}"
        )
    return found


def _distribution(entry: EntryPoint) -> str:
    return entry.dist.name if entry.dist is not None else "an unnamed distribution"
