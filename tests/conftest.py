"""Shared fixtures: seeded SA-1B-style data with known geometry, and the layout/backend matrix."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from crc32c import crc32c

from arraystore import Layout, SampleReader, ingest
from arraystore.cli import cli
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.kinds.sa1b_bin import CONFIG_FILE, KEYS_FILE, bin_files
from arraystore.testing.cloud_region import Region, cloud_region
from arraystore.testing.sa1b_shards import ShardSample, write_shard

LAYOUTS = {
    "raw": Layout("raw", checksum=False),
    "raw+zstd": Layout("raw", compression="zstd", checksum=False),
    "raw+crc32c": Layout("raw", checksum=True),
    "raw+zstd+crc32c": Layout("raw", compression="zstd", checksum=True),
    "sharded": Layout("sharded", shard_size=4, checksum=False),
    "sharded+zstd": Layout("sharded", shard_size=4, compression="zstd", checksum=False),
    "sharded+crc32c": Layout("sharded", shard_size=4, checksum=True),
    "sharded+zstd+crc32c": Layout("sharded", shard_size=4, compression="zstd", checksum=True),
}
BACKENDS = ("auto", "direct", "tensorstore", "zarr")


def rectangle(shape: tuple[int, int], x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def disk(shape: tuple[int, int], cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random RGB picture (JPEG-friendly) of the given size."""
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
    import cv2

    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(
        np.uint8)


def known_samples(seed: int = 0) -> list[ShardSample]:
    """Samples whose masks, edges and areas are known; sizes chosen to exercise both resizes.

    ``big`` (1280x1536) is >= 1024 on both sides and a whole multiple of 256; ``small`` is under
    1024; ``tall`` is >= 1024 on one side only; ``empty`` has no annotations; ``ties`` has two
    annotations of equal area; ``big`` carries a features NPZ.
    """
    rng = np.random.default_rng(seed)
    big = (1280, 1536)
    samples = [
        ShardSample("big", photo(rng, *big), [
            rectangle(big, 100, 200, 700, 900),            # area 600*700
            disk(big, 800, 640, 300),                      # overlaps the rectangle
            rectangle(big, 1200, 50, 1500, 300),
        ], features=(rng.normal(size=(256, 64, 64)).astype(np.float32),
                     rng.normal(size=(256, 32, 32)).astype(np.float32))),
        ShardSample("small", photo(rng, 480, 640), [disk((480, 640), 320, 240, 100),
                                                     rectangle((480, 640), 10, 10, 60, 90)]),
        ShardSample("tall", photo(rng, 1100, 700), [rectangle((1100, 700), 0, 0, 700, 550)]),
        ShardSample("empty", photo(rng, 512, 512), []),
        ShardSample("ties", photo(rng, 768, 1024), [
            rectangle((768, 1024), 0, 0, 100, 100),         # area 10000, first
            rectangle((768, 1024), 500, 500, 600, 600),     # area 10000, second
            rectangle((768, 1024), 300, 100, 350, 150),     # area 2500
        ]),
    ]
    return samples


@pytest.fixture(scope="session")
def samples() -> list[ShardSample]:
    return known_samples()


@pytest.fixture(scope="session")
def shard(tmp_path_factory: pytest.TempPathFactory, samples: list[ShardSample]) -> Path:
    return write_shard(tmp_path_factory.mktemp("shard") / "shard_00000.tar", samples)


_LAYOUT_STORES: dict[str, Path] = {}


def _layout_store(layout: str, tmp_path_factory: pytest.TempPathFactory, shard: Path) -> Path:
    """The known shard ingested once per layout and session (read-only after)."""
    if layout not in _LAYOUT_STORES:
        out = tmp_path_factory.mktemp(layout) / "sa1b.zarr"
        ingest(Sa1bTarSource(max_boxes=2), [shard], out, layout=LAYOUTS[layout], workers=1)
        _LAYOUT_STORES[layout] = out
    return _LAYOUT_STORES[layout]


UNCOMPRESSED = [name for name, layout in LAYOUTS.items() if layout.compression == "none"]
REGION_RTT_MS = 20.0


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory, shard: Path) -> Iterator[Region]:
    """A simulated cloud region (``arraystore.testing.cloud_region``) holding the known shard
    ingested in each uncompressed layout, as ``s3://stores/<layout>.zarr``."""
    root = tmp_path_factory.mktemp("region")
    (root / "stores").mkdir()
    for layout in UNCOMPRESSED:
        shutil.copytree(_layout_store(layout, tmp_path_factory, shard),
                        root / "stores" / f"{layout}.zarr")
    with cloud_region(root, rtt_ms=REGION_RTT_MS, mb_per_s=100) as running:
        yield running


def url(name: str) -> str:
    """The :func:`region` store named ``name``."""
    return f"s3://stores/{name}.zarr"


def served(region: Region, read: Callable[[], object]) -> dict[str, int]:
    """What the region's server answered while ``read()`` ran: GETs, HEADs, bytes sent."""
    before = region.requests()
    read()
    after = region.requests()
    return {"gets": after["gets"] - before["gets"],
            "heads": after["requests"] - after["gets"] - before["requests"] + before["gets"],
            "bytes": after["bytes"] - before["bytes"]}


def copy_store(region: Region, layout: str, name: str,
               tmp_path_factory: pytest.TempPathFactory, shard: Path) -> None:
    """A private copy of a layout's store in the region (a test that rewrites it)."""
    target = region.root / "stores" / f"{name}.zarr"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(_layout_store(layout, tmp_path_factory, shard), target)


def shard_file(store: Path, array: str, sample: int, layout: Layout) -> Path:
    """The file holding ``sample``'s chunk of ``array``: its shard, or its own chunk."""
    rank = len(json.loads((store / array / "zarr.json").read_text())["shape"])
    index = sample // layout.shard_size if layout.sharded else sample
    return store / array / "c" / str(index) / Path(*["0"] * (rank - 1))


def edit_shard(path: Path, shard_size: int,
               change: Callable[[np.ndarray, bytearray], None]) -> None:
    """Change a shard's index (rows of offset, nbytes) and, where ``change`` does, its data,
    and store it with the index's crc32c made valid, as a new file put in its place."""
    data = bytearray(path.read_bytes())
    start = len(data) - 4 - shard_size * 16
    index = np.frombuffer(bytes(data[start:-4]), "<u8").reshape(shard_size, 2).copy()
    change(index, data)
    data[start:-4] = index.tobytes()
    data[-4:] = crc32c(bytes(data[start:-4])).to_bytes(4, "little")
    replacement = path.with_name(f".{path.name}.new")
    replacement.write_bytes(bytes(data))
    os.replace(replacement, path)


@pytest.fixture(scope="session", params=list(LAYOUTS))
def layout_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 shard: Path) -> tuple[str, Path]:
    """The known shard ingested once per layout: (layout name, path)."""
    return request.param, _layout_store(request.param, tmp_path_factory, shard)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Torch's intra-op threads for the test (a DataLoader worker has one): with more, cached
    spike windows are divided by torch and items in memory copied on its threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def write_bin_dataset(root: Path, num_samples: int, seed: int = 0, max_boxes: int = 1,
                      config: dict | None = None) -> Path:
    """A random ``.bin`` dataset folder (docs/formats.md), with valid metadata values."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = bin_files(max_boxes)
    with_boxes = rng.integers(0, max_boxes + 1, num_samples)
    for spec in files:
        with open(root / spec.name, "wb") as handle:
            for i in range(num_samples):
                for part in spec.parts:
                    if part.field == "metadata":
                        n = int(with_boxes[i])
                        value = np.array([n, int(n > 0), 600 + i, 800 + i, 3], "<i4")
                    elif np.dtype(part.dtype).kind == "f":
                        value = rng.normal(size=part.shape).astype(part.dtype)
                    else:
                        value = rng.integers(0, 256, part.shape).astype(part.dtype)
                    handle.write(value.tobytes())
    (root / CONFIG_FILE).write_text(json.dumps(
        config or {"model_type": "sam2.1_hiera_b+", "total_samples": num_samples}, indent=2))
    (root / KEYS_FILE).write_text("".join(f"sa_{100 + i}\n" for i in range(num_samples)))
    return root


def s3_environment(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point a client at ``endpoint`` on loopback."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "arraystore-test",
            "AWS_SECRET_ACCESS_KEY": "arraystore-test-secret", "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1"}


MOTO_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # serve until the session closes this pipe
"""


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible server (moto's) on loopback for the session, with credentials and a
    region in the standard AWS variables, as a user would configure access. It runs in a
    process of its own: in the test's process its threads would take the GIL from the
    client they answer."""
    server = subprocess.Popen([sys.executable, "-c", MOTO_SERVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    port = server.stdout.readline().strip()
    if not port.isdigit():
        server.kill()
        raise RuntimeError(f"moto's server did not start (printed {port!r})")
    env = s3_environment(f"http://127.0.0.1:{port}")
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@functools.cache
def _s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)  # ~0.6 s to make one


def new_bucket() -> str:
    """Create a new, empty bucket on the session's S3 server: ``s3://<name>``."""
    name = f"arraystore-{uuid.uuid4().hex[:12]}"
    _s3_client(os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A new, empty bucket: ``s3://<name>``."""
    return new_bucket()


def s3_copy(local: Path, url: str) -> str:
    """Upload the local store ``local`` to ``url`` (byte for byte, as ingest would write it)."""
    import fsspec

    fs, root = fsspec.url_to_fs(url)
    fs.put(str(local), root, recursive=True)
    return url


@pytest.fixture(scope="session")
def folder_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    """An S3-compatible server over a folder (the loopback region's server, read unshaped at
    ``.direct``): a store copied into ``root/<bucket>/`` is in the object store at once, no
    upload. For tests that only read what they put there."""
    with cloud_region(tmp_path_factory.mktemp("folder-s3"), rtt_ms=0, mb_per_s=0) as region:
        yield region


@pytest.fixture
def folder_s3_bucket(folder_s3: Region, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A new bucket of :func:`folder_s3` (its folder; ``s3://<folder name>``), with the AWS
    variables pointing at that server for the test, and fsspec's defaults for s3 too (its
    clients are cached by their options, which the variables are not part of)."""
    import fsspec.config

    for key, value in s3_environment(folder_s3.direct).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": folder_s3.direct})
    folder = folder_s3.root / f"arraystore-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder)


@pytest.fixture(scope="session")
def layouts_bucket(s3_endpoint: str) -> dict[str, str]:
    """A bucket holding copies of the layout stores: layout name -> URL (filled on first use)."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="arraystore-layouts")
    return {}


S3_LAYOUTS = ("raw", "raw+zstd", "sharded+crc32c")  # a request costs ~5 ms on loopback


@pytest.fixture(params=[*((name, "local") for name in LAYOUTS),
                        *((name, "s3") for name in S3_LAYOUTS)],
                ids=lambda p: f"{p[0]}@{p[1]}")
def located_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  shard: Path) -> tuple[str, str | Path]:
    """Every layout store on the local disk, and three of them (uncompressed, compressed,
    sharded with checksums: every read path) in the S3 bucket: (label, path or URL)."""
    layout, where = request.param
    path = _layout_store(layout, tmp_path_factory, shard)
    if where == "local":
        return layout, path
    copies = request.getfixturevalue("layouts_bucket")
    if layout not in copies:
        copies[layout] = s3_copy(path, f"s3://arraystore-layouts/{layout}.zarr")
    return f"{layout}@s3", copies[layout]


class Lengths(torch.utils.data.Dataset):
    """A dataset that is only its lengths (items name themselves): for sampler arithmetic."""

    def __init__(self, lengths) -> None:
        self.modality_lengths = np.asarray(lengths)

    def __len__(self) -> int:
        return len(self.modality_lengths)

    def __getitem__(self, index: int) -> dict:
        return {"index": index}


def per_sample_fields(reader: SampleReader) -> list[str]:
    """The fields read by ranged GETs of per-sample chunks (what the node-local cache keeps
    of an object store; block fields such as strings are read otherwise)."""
    return [f.name for f in reader.schema.fields if f.chunking == "sample"]


def assert_same_values(got, expected, where: str = "") -> None:
    """Equal values in the same structure: dict keys in the same order, tensors and arrays of
    one dtype, lists and tuples of one type, nested in any of them."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype, where
        assert torch.equal(got, expected), where
    elif isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == expected.dtype, where
        np.testing.assert_array_equal(got, expected, err_msg=where)
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and list(got) == list(expected), where
        for key in expected:
            assert_same_values(got[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, list | tuple):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for number, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same_values(a, b, f"{where}[{number}]")
    else:
        assert type(got) is type(expected) and got == expected, where


def run_cli(*args: object, check: bool = False) -> Result:
    """The command line run in this process on ``args`` (each as ``str``), exceptions it does
    not handle raised as they are; ``check``: exit code 0 asserted, the output as the message."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if check:
        assert result.exit_code == 0, result.output
    return result
