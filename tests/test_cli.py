"""The command line end to end: ingest, info, export; errors as one message, exit status 1."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from conftest import photo, write_bin_dataset

from arraystore.testing.sa1b_shards import ShardSample, sample_members, write_members
from tests.conftest import run_cli


def test_ingest_info_export(tmp_path, shard) -> None:
    out = tmp_path / "s.zarr"
    result = run_cli("ingest", "sa1b", str(shard), "--out", str(out), "--layout", "sharded",
                 "--shard-size", "2", "--checksum", "--max-boxes", "2", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "5 samples ingested" in result.output
    result = run_cli("info", str(out))
    assert result.exit_code == 0
    assert "sa1b" in result.output and "sharded+crc32c" in result.output
    assert "5 committed of 5" in result.output and "image" in result.output
    summary = json.loads(run_cli("info", str(out), "--json").output)
    assert summary["committed"] == 5 and summary["layout"]["shard_size"] == 2
    image = next(a for a in summary["arrays"] if a["name"] == "image")
    assert image["files"] == 1 + 3  # zarr.json + ceil(5 / 2) shards
    result = run_cli("export", "bin", str(out), str(tmp_path / "bin"))
    assert result.exit_code == 0 and (tmp_path / "bin" / "images.bin").stat().st_size == 5 * 3145728
    assert run_cli("export", "bin", str(out), str(tmp_path / "bin")).exit_code == 1  # exists


def test_ingest_bin_and_npz_commands(tmp_path) -> None:
    original = write_bin_dataset(tmp_path / "bin", 3)
    result = run_cli("ingest", "bin", str(original), "--out", str(tmp_path / "b.zarr"))
    assert result.exit_code == 0, result.output
    assert "3 samples ingested" in result.output


def test_errors_are_one_line_without_traceback(tmp_path, shard) -> None:
    result = run_cli("ingest", "sa1b", str(tmp_path / "missing.tar"), "--out", str(tmp_path / "s"))
    assert result.exit_code == 1 and "no such file" in result.output
    assert "Traceback" not in result.output
    result = run_cli("info", str(tmp_path))
    assert result.exit_code == 1 and "not an arraystore store" in result.output
    result = run_cli("ingest", "bin", str(tmp_path), "--out", str(tmp_path / "b.zarr"))
    assert result.exit_code == 1 and "Config not found at" in result.output
    result = run_cli("ingest", "nosuch", "x", "--out", "y")
    assert result.exit_code == 2 and "No such command" in result.output


def test_broken_sample_through_the_cli(tmp_path) -> None:
    good = sample_members(ShardSample("ok", photo(np.random.default_rng(1), 64, 96)), 1)
    bad = [("bad.jpg", b"\xff\xd8 broken"), ("bad.json", good[1][1])]
    shard = write_members(tmp_path / "broken.tar", good + bad)
    out = tmp_path / "s.zarr"
    result = run_cli("ingest", "sa1b", str(shard), "--out", str(out), "--workers", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "broken.tar:bad.jpg" in result.output and "JPEG" in result.output
    result = run_cli("ingest", "sa1b", str(shard), "--out", str(tmp_path / "k.zarr"), "--workers",
                 "1", "--on-error", "skip")
    assert result.exit_code == 0 and "1 skipped" in result.output
    report = next((tmp_path / "k.zarr.reports").glob("ingest-*.json"))
    assert json.loads(report.read_text())["skipped"][0]["sample_id"] == "bad"


def test_a_summary_line_stays_one_line_however_long_its_path(tmp_path, shard) -> None:
    """Captured output (a log) is not wrapped at the console width: a store deep in a long
    path still gets its summary on one greppable line."""
    out = tmp_path / ("deep_" * 30) / "s.zarr"
    first = subprocess.run([sys.executable, "-m", "arraystore", "ingest", "sa1b", str(shard),
                            "--out", str(out), "--workers", "1"], capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([sys.executable, "-m", "arraystore", "ingest", "sa1b", str(shard),
                            "--out", str(out), "--workers", "1"], capture_output=True, text=True,
                           timeout=300)
    line = [text for text in again.stdout.splitlines() if str(out) in text]
    assert line and "1 inputs already ingested" in line[0], again.stdout
