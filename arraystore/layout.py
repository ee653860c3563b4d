"""Layout presets: how a field's samples are cut into chunks and encoded on disk.

``raw`` stores one uncompressed file per chunk: a per-sample chunk is byte for byte the sample's
array, like a record of a ``.bin`` file. ``sharded`` packs ``shard_size`` per-sample chunks into
one file with the Zarr v3 sharding codec (file count divided by the shard size). Either may add
zstd compression (disk size); a crc32c per chunk (integrity) is on unless ``checksum=False``
(``--no-checksum``): a flipped byte is then caught by every reader and by ``verify``, at a cost
measured in ``benchmarks/results/checksums.md``. Per-sample scalars and short vectors are always
chunked in blocks of ``block_size`` samples and never sharded.

New stores are ``sharded`` unless asked otherwise: it read 5-9% faster than ``raw`` in every
row of ``benchmarks/results/batches.md`` (a shard's descriptor and index are opened once, not a
file per field per sample) and makes ``shard_size`` times fewer files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from arraystore.errors import SchemaError
from arraystore.schema import Field

LayoutName = Literal["raw", "sharded"]
Compression = Literal["none", "zstd"]
LAYOUT_NAMES: tuple[str, ...] = ("raw", "sharded")
COMPRESSIONS: tuple[str, ...] = ("none", "zstd")
# limits: a shard's index is 16 bytes a sample and read whole, a block is read whole
MAX_SHARD_SIZE = 4096
MAX_BLOCK_SIZE = 65536
ZSTD_LEVELS = range(-131072, 23)  # zstd's fast (negative) levels to its highest, 22


@dataclass(frozen=True)
class Layout:
    """A resolved layout preset; every default is visible in :meth:`to_json`."""

    name: LayoutName = "sharded"
    shard_size: int = 16
    compression: Compression = "none"
    zstd_level: int = 3
    checksum: bool = True
    block_size: int = 1024

    def __post_init__(self) -> None:
        if self.name not in LAYOUT_NAMES:
            raise SchemaError(f"unknown layout {self.name!r}; choose one of {LAYOUT_NAMES}")
        if self.compression not in COMPRESSIONS:
            raise SchemaError(
                f"unknown compression {self.compression!r}; choose one of {COMPRESSIONS}"
            )
        for name, value, limits in (("shard_size", self.shard_size, range(1, MAX_SHARD_SIZE + 1)),
                                    ("block_size", self.block_size, range(1, MAX_BLOCK_SIZE + 1)),
                                    ("zstd_level", self.zstd_level, ZSTD_LEVELS)):
            if isinstance(value, bool) or not isinstance(value, int) or value not in limits:
                raise SchemaError(f"{name} must be an integer from {limits.start} to "
                                  f"{limits.stop - 1}, got {value!r}")
        if not isinstance(self.checksum, bool):
            raise SchemaError(f"checksum must be true or false, got {self.checksum!r}")

    @property
    def sharded(self) -> bool:
        return self.name == "sharded"

    @property
    def label(self) -> str:
        """A short name such as ``sharded+zstd+crc32c`` for tables and reports."""
        parts = [self.name]
        if self.compression != "none":
            parts.append(self.compression)
        if self.checksum:
            parts.append("crc32c")
        return "+".join(parts)

    def samples_per_chunk(self, field: Field) -> int:
        return 1 if field.chunking == "sample" else self.block_size

    def samples_per_file(self, field: Field) -> int:
        """How many samples of ``field`` share one file: the unit a writer rewrites at once."""
        if field.chunking == "sample" and self.sharded:
            return self.shard_size
        return self.samples_per_chunk(field)

    def array_kwargs(self, field: Field) -> dict[str, Any]:
        """Keyword arguments for ``zarr.Group.create_array`` storing ``field`` in this layout."""
        compressors: list[Any] = []
        if self.compression == "zstd":
            compressors.append(ZstdCodec(level=self.zstd_level))
        if self.checksum:
            compressors.append(Crc32cCodec())
        chunks = (self.samples_per_chunk(field), *field.shape)
        kwargs: dict[str, Any] = {
            "chunks": chunks,
            "compressors": compressors or None,
            "serializer": "auto" if field.is_string else BytesCodec(endian="little"),
        }
        if field.chunking == "sample" and self.sharded:
            kwargs["shards"] = (self.shard_size, *field.shape)
        return kwargs

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layout:
        return cls(**data)
