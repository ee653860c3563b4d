"""Every Python block of the README and of docs/, and every script in scripts/, runs as a user
would run it: each block saved as a file and run by the project's Python in a folder holding the
stores and files the documents name (built here from the bundled sample and generated data;
``s3://bucket/sa1b.zarr`` on the loopback S3 server). A ``toml`` block is the ``mix.toml`` the
Python next to it reads. So an example in the documents cannot rot unnoticed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arraystore import ingest
from arraystore.converters.gopro.source import GoproSpikeSource
from arraystore.converters.npz.source import NpzDirectorySource
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.converters.sa1b_bin.exporter import BinExporter
from arraystore.testing.gopro_trees import write_gopro_tree
from arraystore.testing.npz_examples import write_referring, write_sav_pairs
from tests.conftest import s3_copy

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "samples" / "sa1b_sample.tar"
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(python|toml)\n(.*?)^```", re.S | re.M)


def code_blocks(kind: str) -> list[tuple[str, int, str]]:
    """(document, line, code) of every ``kind`` block of the documents."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in BLOCK.finditer(text):
            if match.group(1) == kind:
                line = text.count("\n", 0, match.start()) + 1
                found.append((document.name, line, match.group(2)))
    return found


PYTHON_BLOCKS = code_blocks("python")


def write_vis_cache(folder: Path, pairs: list[tuple[int, int]], width: int = 768) -> Path:
    """An old ``inst2feat.tsv`` + ``.npy`` embedding cache of ``pairs`` (seeded, L2-normed)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["image_id\tsegment_id\tfeat_file"]
    for image_id, segment_id in pairs:
        vector = rng.standard_normal(width)
        name = f"{image_id:012d}_{segment_id}.npy"
        np.save(folder / name, (vector / np.linalg.norm(vector)).astype(np.float16))
        lines.append(f"{image_id:012d}\t{segment_id}\t{name}")
    (folder / "inst2feat.tsv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Path:
    """A folder with every store and file the documents' examples name."""
    root = tmp_path_factory.mktemp("docs")
    shutil.copy(SAMPLE, root / "shard_00000.tar")
    ingest(Sa1bTarSource(), [SAMPLE], root / "sa1b.zarr", workers=1)
    BinExporter().export(root / "sa1b.zarr", root / "sa1b_binary")
    write_gopro_tree(root / "gopro", {"train": {"GOPR0001": 6}})
    ingest(GoproSpikeSource(), [root / "gopro"], root / "gopro.zarr", workers=1)
    cache = write_vis_cache(root / "cache" / "vis_embed",
                            [(397133, 15466), (397133, 3289650), (139, 5931152)])
    from arraystore.converters.coco_panoptic.vis_cache import VisCacheSource

    ingest(VisCacheSource(), [cache], root / "coco_vis.zarr", workers=1)
    ingest(NpzDirectorySource(), [write_sav_pairs(root / "sav_npz", 12)], root / "sav.zarr",
           workers=1)
    ingest(NpzDirectorySource(), [write_referring(root / "refcoco_npz", 10, seed=1)],
           root / "refcoco.zarr", workers=1)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bucket")
    s3_copy(root / "sa1b.zarr", "s3://bucket/sa1b.zarr")
    for _, _, toml in code_blocks("toml"):
        (root / "mix.toml").write_text(toml)
    return root


def run_python(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_documents_have_blocks() -> None:
    assert len(PYTHON_BLOCKS) >= 8
    assert len(code_blocks("toml")) == 1  # the mix.toml the mixture example reads


@pytest.mark.parametrize(("document", "line", "code"), PYTHON_BLOCKS,
                         ids=[f"{d}:{n}" for d, n, _ in PYTHON_BLOCKS])
def test_python_block_runs(workdir: Path, tmp_path: Path, document: str, line: int,
                           code: str) -> None:
    script = tmp_path / f"{Path(document).stem}_{line}.py"
    script.write_text(code)
    done = run_python([str(script)], workdir)
    assert done.returncode == 0, f"{document} line {line}:\n{code}\n{done.stdout}\n{done.stderr}"


def test_every_script_runs(workdir: Path, tmp_path: Path) -> None:
    runs = {
        "make_sample_shard.py": [str(tmp_path / "shard.tar")],
        "read_batch.py": [str(workdir / "sa1b.zarr")],
        "mix_demo.py": [str(tmp_path / "mix")],
    }
    assert sorted(runs) == sorted(p.name for p in (REPO / "scripts").glob("*.py"))
    output = {}
    for name, args in runs.items():
        done = run_python([str(REPO / "scripts" / name), *args], tmp_path)
        assert done.returncode == 0, f"scripts/{name}:\n{done.stdout}\n{done.stderr}"
        output[name] = done.stdout
    assert (tmp_path / "shard.tar").stat().st_size > 0
    assert "batch 0:" in output["mix_demo.py"] and "lengths [" in output["mix_demo.py"]
