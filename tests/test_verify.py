"""``arraystore verify``: clean stores pass; each injected fault is named by field, sample, file."""

from __future__ import annotations

import json

import pytest
from conftest import BACKENDS
from crc32c import crc32c

from arraystore import Layout, SampleReader, Store, ingest
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.errors import ChecksumMismatchError
from arraystore.verify import verify
from tests.conftest import run_cli


def test_clean_stores_pass(layout_store) -> None:
    _, path = layout_store
    assert verify(path).ok and verify(path, deep=True).ok


def make(tmp_path, shard, layout: Layout):
    out = tmp_path / "s.zarr"
    ingest(Sa1bTarSource(), [shard], out, layout=layout, workers=1)
    return out


def flip(path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


PLAIN = Layout("raw", checksum=False)
FAULTS = {
    "missing chunk": (PLAIN, lambda s: (s / "masks/c/2/0/0/0").unlink(),
                      "masks", "tall", "chunk file missing"),
    "truncated chunk": (PLAIN, lambda s: (s / "image/c/1/0/0/0").write_bytes(b"\0" * 10),
                        "image", "small", "expected 3145728"),
    "flipped byte": (Layout("raw", checksum=True), lambda s: flip(s / "P4_S16/c/3/0/0/0"),
                     "P4_S16", "empty", "crc32c mismatch"),
    "flipped byte in shard": (Layout("sharded", shard_size=4, checksum=True),
                              lambda s: flip(s / "edge_64x64/c/1/0/0"), "edge_64x64", "ties",
                              "crc32c mismatch"),
    "emptied shard slot": (Layout("sharded", shard_size=4, checksum=False),
                           lambda s: _empty_slot(s / "image/c/0/0/0/0", 4, 1), "image", "small",
                           "inner chunk is missing"),
    "flipped byte, default layout": (Layout(), lambda s: flip(s / "image/c/0/0/0/0", 5000),
                                     "image", "big", "crc32c mismatch"),
    "dimension names": (PLAIN, lambda s: _edit_meta(s / "fg_map_64/zarr.json",
                                                    dimension_names=["sample", "y", "x"]),
                        "fg_map_64", "*", "dimension_names"),
    "undecodable zstd": (Layout("raw", compression="zstd", checksum=False),
                         lambda s: (s / "edge_256x256/c/0/0/0").write_bytes(b"garbage"),
                         "edge_256x256", "big", "does not decode"),
}


def _empty_slot(shard_file, shard_size: int, slot: int) -> None:
    """Mark one inner chunk absent in a shard's index, with a valid index crc32c."""
    data = bytearray(shard_file.read_bytes())
    index_start = len(data) - 4 - shard_size * 16
    data[index_start + slot * 16: index_start + slot * 16 + 16] = b"\xff" * 16
    data[-4:] = crc32c(bytes(data[index_start:-4])).to_bytes(4, "little")
    shard_file.write_bytes(bytes(data))


def _edit_meta(path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("fault", list(FAULTS))
def test_faults_are_reported(tmp_path, shard, fault: str) -> None:
    layout, inject, field, sample, message = FAULTS[fault]
    out = make(tmp_path, shard, layout)
    inject(out)
    report = verify(out, deep=True)
    assert not report.ok
    problem = next(p for p in report.problems if p.field == field)
    assert sample in problem.sample
    assert message in problem.message or message in str(report.problems)
    assert str(out) in problem.file
    result = run_cli("verify", str(out), "--deep")
    assert result.exit_code == 1 and field in result.output


def test_cli_exit_status(tmp_path, shard) -> None:
    out = make(tmp_path, shard, Layout("raw"))
    result = run_cli("verify", str(out))
    assert result.exit_code == 0 and "ok" in result.output
    result = run_cli("verify", str(tmp_path / "nothing"))
    assert result.exit_code == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flipped_byte_in_a_default_store_is_caught_on_read(tmp_path, shard, backend) -> None:
    """New stores carry a crc32c per chunk: a flipped byte of an image is a
    ChecksumMismatchError on the first read, whichever backend reads it."""
    out = make(tmp_path, shard, Layout())
    assert Layout().checksum and Store.open(out).layout.checksum
    flip(out / "image" / "c" / "0" / "0" / "0" / "0", 5000)
    with pytest.raises(ChecksumMismatchError):
        SampleReader(out, backend=backend).read(0)


def test_a_lost_committed_block_between_stored_ones_is_reported(tmp_path, shard) -> None:
    """``committed`` blocks of 2 samples; the middle one lost: its samples read as never
    committed, so verify names them; the file put back, all is well again."""
    layout = Layout("raw", block_size=2, checksum=False)
    out = make(tmp_path, shard, layout)
    everything = Store.open(out).num_committed()
    block = out / "committed" / "c" / "1"
    kept = block.read_bytes()
    block.unlink()
    assert Store.open(out).num_committed() == everything - 2
    report = verify(out)
    assert not report.ok
    assert "committed nowhere" in str(report.problems[0]), report.problems
    assert report.problems[0].file.endswith("committed/c/1")
    block.write_bytes(kept)
    assert Store.open(out).num_committed() == everything
    assert verify(out).ok
