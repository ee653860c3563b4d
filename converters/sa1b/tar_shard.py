"""Stream an SA-1B TAR shard and group its members into samples, without extracting anything.

Members are grouped WebDataset style: the key is the member name up to the first ``.`` of its
base name, and a sample's members are adjacent in the archive. A features NPZ is keyed
``<key>_features`` or ``<key>_sam2_features``. Only regular files are read, into memory; names
that are absolute or climb out with ``..`` are refused, and links and devices are never followed.
"""

from __future__ import annotations

import lzma
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from arraystore.errors import SampleError, SourceError
from arraystore.sources import HashingReader, SourceUnit

IMAGE_SUFFIXES = ("jpg", "jpeg")
FEATURE_KEY_SUFFIXES = ("_sam2_features", "_features")
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE


@dataclass
class MemberGroup:
    """The members of one sample as read from the archive: role -> (member name, bytes)."""

    key: str
    members: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def sample_id(self) -> str:
        return posixpath.basename(self.key)


def split_name(name: str) -> tuple[str, str]:
    """``dir/sa_1.jpg`` -> (``dir/sa_1``, ``jpg``); ``sa_1_features.npz`` -> (``sa_1``, ``npz``)."""
    directory, base = posixpath.split(name)
    stem, _, suffix = base.partition(".")
    suffix = suffix.lower()
    for tail in FEATURE_KEY_SUFFIXES:
        if suffix == "npz" and stem.endswith(tail):
            stem = stem[: -len(tail)]
            break
    return posixpath.join(directory, stem) if directory else stem, suffix


def member_role(suffix: str) -> str | None:
    """What a member with this suffix is to a sample (``jpg``, ``json``, ``npz``), or None."""
    if suffix in IMAGE_SUFFIXES:
        return "jpg"
    return suffix if suffix in ("json", "npz") else None


def _unsafe(name: str) -> str | None:
    if name.startswith("/") or posixpath.isabs(name):
        return "absolute member name"
    if ".." in name.split("/"):
        return "member name climbs out of the archive with '..'"
    return None


def read_groups(unit: SourceUnit) -> Iterator[MemberGroup | SampleError]:
    """Yield each sample's member group in archive order; broken members yield SampleErrors.

    Raises :class:`SourceError` for an archive that cannot be read on (truncated, not a TAR).
    """
    label = str(unit.path)
    last: MemberGroup | SampleError | None = None  # held back until the archive proves whole
    with open(unit.path, "rb") as raw:
        reader = HashingReader(raw, unit)
        try:
            archive = tarfile.open(fileobj=reader, mode="r|*")  # noqa: SIM115 (closed with raw)
            for group in _groups(archive, label):
                if last is not None:
                    yield last
                last = group
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
            raise SourceError(label, f"unreadable TAR after {reader.bytes_read} bytes: "
                                     f"{type(exc).__name__}: {exc}") from exc
        while reader.read(1 << 20):  # checksum the whole file, padding included
            pass
    uncompressed = getattr(archive.fileobj, "comptype", "tar") == "tar"
    if uncompressed and reader.bytes_read < archive.offset + END_OF_ARCHIVE:
        raise SourceError(label, f"truncated: the archive ends after {reader.bytes_read} bytes "
                                 f"without its end-of-archive marker (expected at byte "
                                 f"{archive.offset})")
    if last is not None:
        yield last


def _groups(archive: tarfile.TarFile, label: str) -> Iterator[MemberGroup | SampleError]:
    seen: set[str] = set()
    current: MemberGroup | None = None
    count = 0
    for member in archive:
        count += 1
        name = member.name.removeprefix("./")
        if member.isdir():
            continue
        key, suffix = split_name(name)
        problem = _unsafe(name) or (
            None if member.isfile() else "not a regular file (links and devices are never "
                                         "followed)")
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = MemberGroup(key)
            if not current.sample_id:
                current.problems.append(
                    f"{name}: no sample key: SA-1B members are named <key>.<ext> and this "
                    f"name has nothing before the first '.'")
            if key in seen:
                current.problems.append(
                    f"{name}: duplicate key {key!r}: it appeared earlier in the shard, apart from "
                    f"this member (a sample's members must be adjacent)")
            seen.add(key)
        role = member_role(suffix)
        if problem:
            current.problems.append(f"{name}: {problem}")
            continue
        if role is None:
            continue  # members of other kinds (.txt, ...) are not part of the sa1b contract
        if role in current.members:
            current.problems.append(f"{name}: duplicate {role} member for key {key!r} (first: "
                                    f"{current.members[role][0]})")
            continue
        extracted = archive.extractfile(member)
        data = extracted.read() if extracted is not None else b""
        if len(data) != member.size:
            raise SourceError(label, f"member {name}: truncated ({len(data)} of {member.size} "
                                     f"bytes)")
        current.members[role] = (name, data)
    if current is not None:
        yield current
    if count == 0:
        raise SourceError(label, "empty shard: the archive holds no members")


def count_sample_keys(path: os.PathLike[str] | str) -> int:
    """How many sample keys the member headers of the TAR at ``path`` name: an upper bound of
    its samples, found by seeking from header to header (an uncompressed shard's data is never
    read). A truncated archive counts the keys before the damage (its samples stop there too).
    """
    keys: set[str] = set()
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                key, suffix = split_name(member.name)
                if member.isfile() and member_role(suffix) is not None:
                    keys.add(key)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError):
        pass
    return len(keys)
