"""The ids of a reader's committed samples, packed for millions of samples and many workers."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np


class SampleIds(Sequence[str]):
    """Sample ids (``str``) stored as one fixed-width UTF-8 ``bytes`` array.

    A Python list of ``str`` costs ~60 bytes an id (660 MB for SA-1B's 11M samples) in every
    DataLoader worker, and in forked workers its pages are copied one by one as reference counts
    are touched -- the well-known creeping growth of worker memory. One NumPy bytes array costs
    the longest id's length per sample, has no per-id objects for reference counting to touch,
    and pickles into spawned workers as a single buffer. Ids are TAR member keys and file stems:
    they never end in NUL bytes, which a bytes array would drop.
    """

    def __init__(self, ids: np.ndarray | Sequence[str]) -> None:
        strings = np.asarray(ids).astype(np.dtypes.StringDType())
        self._encoded = np.strings.encode(strings, "utf-8")

    def __len__(self) -> int:
        return len(self._encoded)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [value.decode("utf-8") for value in self._encoded[index]]
        return self._encoded[index].decode("utf-8")

    def index_of(self, ids: Sequence[str]) -> list[int]:
        """Positions of ``ids`` (the first occurrence of each), found without building a dict
        of every id; raises :class:`KeyError` naming the ids that are not there."""
        wanted = np.strings.encode(np.asarray(list(ids), dtype=np.dtypes.StringDType()), "utf-8")
        positions, missing = [], []
        for sample_id, encoded in zip(ids, wanted, strict=True):
            hits = np.flatnonzero(self._encoded == encoded)
            if len(hits):
                positions.append(int(hits[0]))
            else:
                missing.append(sample_id)
        if missing:
            raise KeyError(missing)
        return positions

    def prefix_digest(self, count: int) -> str:
        """A short hash of the first ``count`` ids (the same whatever ids follow them): a
        saved position checks with it that the samples it counted are still there."""
        prefix = self._encoded[:count]
        width = max(1, int(np.strings.str_len(prefix).max(initial=0)))
        return hashlib.blake2b(prefix.astype(f"S{width}").tobytes(), digest_size=8,
                               person=str(width).encode()).hexdigest()

    def __iter__(self) -> Iterator[str]:
        return (value.decode("utf-8") for value in self._encoded)

    def __repr__(self) -> str:
        shown = ", ".join(repr(s) for s in self[:3])
        return f"SampleIds([{shown}{', ...' if len(self) > 3 else ''}], {len(self)} ids)"
