"""The interface of an exporter: a store back into another format (``arraystore export NAME``)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar


class Exporter(ABC):
    """Base class of exporters; subclasses register under the ``arraystore.exporters`` group."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]  # dataset kinds this exporter understands

    @abstractmethod
    def export(
        self, store: str | os.PathLike[str], out: str | os.PathLike[str], *,
        overwrite: bool = False, progress: bool = False,
    ) -> dict[str, Any]:
        """Write the committed samples of ``store`` to ``out``; return a summary.

        Nothing is left half-written: output appears only once complete.
        """
