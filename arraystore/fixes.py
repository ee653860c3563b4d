"""The interface of an in-place repair (``arraystore fix NAME STORE ...``).

A fix recomputes some fields of a store's committed samples and sets their flags, through
:class:`arraystore.update.StoreUpdater` (whole files rewritten, data durable before flags), so a
killed fix resumes where it stopped. Fixes register under the ``arraystore.fixes`` group.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from arraystore.errors import OptionError
from arraystore.plugins import PluginOption


class Fix(ABC):
    """Base class of fixes."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]
    options: ClassVar[tuple[PluginOption, ...]] = ()

    def run(self, store: str | os.PathLike[str], *, progress: bool = False,
            **options: Any) -> dict[str, Any]:
        """Check ``options`` against the declared ones (a typed :class:`OptionError` naming
        the option before the store is touched), then :meth:`apply` the fix; return a summary
        with ``ok`` and a one-line ``message``."""
        declared = {option.name: option for option in self.options}
        for name, value in options.items():
            if name not in declared:
                raise OptionError(f"fix {self.name!r} has no option {name!r}; it has "
                                  f"{sorted(declared)}")
            declared[name].check(value)
        return self.apply(store, progress=progress, **options)

    @abstractmethod
    def apply(self, store: str | os.PathLike[str], *, progress: bool = False,
              **options: Any) -> dict[str, Any]:
        """Apply the fix to ``store`` with checked ``options``."""
