"""Where a chunk lives on disk: the Zarr v3 default chunk-key encoding (``c/<i>/<j>/...``).

Shared by the writer (to fsync exactly the files it wrote) and the direct reader (to ``pread``
them); both rely on arrays chunked along ``sample`` only, which is how every store is laid out.
"""

from __future__ import annotations

import os
from pathlib import Path


def chunk_file(array_dir: Path, sample_chunk: int, rank: int) -> Path:
    """Path of the chunk (or shard) at index ``sample_chunk`` along ``sample`` of a rank-``rank``
    array whose other dimensions are one chunk each."""
    return array_dir.joinpath("c", str(sample_chunk), *("0" for _ in range(rank - 1)))


def fsync_path(path: Path) -> None:
    """Flush a file's (or directory's) data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
