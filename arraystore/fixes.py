"""The interface of an in-place repair (``arraystore fix NAME STORE ...``).

A fix recomputes some fields of a store's committed samples and sets their flags, through
:class:`arraystore.update.StoreUpdater` (whole files rewritten, data durable before flags), so a
killed fix resumes where it stopped. Fixes register under the ``arraystore.fixes`` group.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from arraystore.plugins import PluginOption


class Fix(ABC):
    """Base class of fixes."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]
    options: ClassVar[tuple[PluginOption, ...]] = ()

    @abstractmethod
    def run(self, store: str | os.PathLike[str], *, progress: bool = False,
            **options: Any) -> dict[str, Any]:
        """Apply the fix; return a summary with ``ok`` and a one-line ``message``."""
