"""The zarr-python store of a local store folder: every read and write stays below the root.

zarr-python's ``LocalStore`` opens ``root / key`` and so follows a symbolic link at any depth
(``image/c`` pointing at a folder outside the store): a read returns another file's bytes, a
write lands outside. This subclass reads each key with :func:`~arraystore.beneath.open_beneath`
(one ``openat2`` that refuses a link anywhere on the way) and refuses a write whose folder is
reached through a link, so everything this project opens through zarr-python -- the zarr
backend, the xarray view, the writers -- is contained, with no walk of the store at open.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from arraystore.beneath import open_beneath


def _read(root: str, key: str, byte_range: ByteRequest | None) -> bytes | None:
    fd = open_beneath(root, key)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if byte_range is None:
            start, stop = 0, size
        elif isinstance(byte_range, RangeByteRequest):
            start, stop = byte_range.start, byte_range.end
        elif isinstance(byte_range, OffsetByteRequest):
            start, stop = byte_range.offset, size
        elif isinstance(byte_range, SuffixByteRequest):
            start, stop = max(0, size - byte_range.suffix), size
        else:
            raise TypeError(f"unexpected byte range {byte_range!r}")
        return os.pread(fd, max(0, min(stop, size) - start), start)
    except IsADirectoryError:
        return None
    finally:
        os.close(fd)


class ContainedLocalStore(LocalStore):
    """``zarr.storage.LocalStore`` that never goes through a link below its root."""

    def _contained_read(self, key: str, prototype: BufferPrototype | None,
                        byte_range: ByteRequest | None) -> Buffer | None:
        data = _read(os.fspath(self.root), key, byte_range)
        if data is None:
            return None
        return (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    def _check_folder(self, key: str) -> None:
        """Refuse a write whose folder exists behind a link (one not there yet is made by the
        write, below the checked part)."""
        folder = key.rsplit("/", 1)[0] if "/" in key else "."
        fd = open_beneath(os.fspath(self.root), folder)
        if fd is not None:
            os.close(fd)

    def get_sync(self, key: str, *, prototype: BufferPrototype | None = None,
                 byte_range: ByteRequest | None = None) -> Buffer | None:
        self._ensure_open_sync()
        return self._contained_read(key, prototype, byte_range)

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if not self._is_open:
            await self._open()
        return await asyncio.to_thread(self._contained_read, key, prototype, byte_range)

    async def get_partial_values(
        self, prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(
            asyncio.to_thread(self._contained_read, key, prototype, byte_range)
            for key, byte_range in key_ranges)))

    def set_sync(self, key: str, value: Buffer) -> None:
        self._check_folder(key)
        super().set_sync(key, value)

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        await asyncio.to_thread(self._check_folder, key)
        await super()._set(key, value, exclusive=exclusive)
