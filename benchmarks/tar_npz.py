"""The old read path, for comparison: random access into TAR+NPZ shards.

Members are located once through the TAR headers; an item then reads the JPEG, JSON and NPZ bytes,
decodes the JPEG, loads the NPZ and derives the maps the ``.bin`` format stored precomputed --
exactly the work ``ingest sa1b`` does once, here done per read.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.converters.sa1b.tar_shard import member_role, split_name
from arraystore.loaders.distill_item import distill_item
from arraystore.sources import Record


class TarNpzDataset:
    """Items of one SA-1B TAR shard, decoded and derived on every read."""

    def __init__(self, shard: Path) -> None:
        self.shard = str(shard)
        self.source = Sa1bTarSource()
        members: dict[str, dict[str, tuple[int, int]]] = {}
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, suffix = split_name(member.name)
                role = member_role(suffix)
                if role is not None:
                    members.setdefault(key, {})[role] = (member.offset_data, member.size)
        self.keys = list(members)
        self.members = members
        self._fd: int | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.shard, os.O_RDONLY), os.getpid()
        key = self.keys[index]
        payload: dict[str, Any] = {role: os.pread(self._fd, size, offset)
                                   for role, (offset, size) in self.members[key].items()}
        payload["where"] = {role: f"{self.shard}:{key}.{role}" for role in payload}
        return distill_item(self.source.derive(Record(key, self.shard, payload)), key)
