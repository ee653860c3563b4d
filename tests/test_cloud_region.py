"""Reading from a simulated cloud region (``arraystore.testing.cloud_region``: an S3-compatible
file server behind a proxy with a round-trip delay and a bandwidth cap): items equal the local
ones on every uncompressed layout, a batch's chunks come in one concurrent round (neighbouring
inner chunks of a shard in one GET), and the proxy really delays and paces."""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import time

import fsspec
import numpy as np
import pytest
import torch
from conftest import LAYOUTS, REGION_RTT_MS, UNCOMPRESSED, _layout_store, assert_same_values

from arraystore.chunk_format import CRC_BYTES
from arraystore.loaders import StoreItems, ZarrDistillDataset, collate_distill
from arraystore.readers.ranged import COALESCE_BYTES, coalesced
from arraystore.testing import cloud_region


@pytest.mark.parametrize("layout", UNCOMPRESSED)
def test_batches_from_the_region_equal_local_batches(region, layout, tmp_path_factory,
                                                      shard) -> None:
    local = ZarrDistillDataset(_layout_store(layout, tmp_path_factory, shard))
    remote = ZarrDistillDataset(f"s3://stores/{layout}.zarr",
                                storage_options=region.storage_options())
    indices = list(range(len(local)))[::-1]
    before = region.requests()["gets"]
    got = collate_distill(remote.__getitems__(indices))
    gets = region.requests()["gets"] - before
    assert_same_values(got, collate_distill(local.__getitems__(indices)), layout)
    read = [remote.reader.schema[name] for name in remote.reader.fields]
    per_sample = [f for f in read if f.chunking == "sample"]
    blocks = (len(read) - len(per_sample)) * -(-len(indices) // LAYOUTS[layout].block_size)
    if layout.startswith("raw"):  # a GET per (field, sample) chunk file, all in one round
        assert gets <= len(per_sample) * len(indices) + blocks
    else:  # a shard's neighbouring inner chunks joined into GETs of up to COALESCE_BYTES
        size = LAYOUTS[layout].shard_size
        shards = -(-len(indices) // size)
        joined = [max(1, COALESCE_BYTES // (f.nbytes + CRC_BYTES)) for f in per_sample]
        indexes = len(per_sample) * shards
        assert gets <= shards * sum(-(-size // n) for n in joined) + indexes + blocks
    items = StoreItems(f"s3://stores/{layout}.zarr", storage_options=region.storage_options())
    assert_same_values(items[1], StoreItems(_layout_store(layout, tmp_path_factory, shard))[1])


def test_the_proxy_delays_and_paces(region) -> None:
    (region.root / "stores" / "blob").write_bytes(np.random.default_rng(0).bytes(20_000_000))
    fs = fsspec.filesystem("s3", **region.storage_options(), skip_instance_cache=True)
    start = time.perf_counter()
    fs.info("stores/blob")
    assert time.perf_counter() - start >= REGION_RTT_MS / 1000  # at least a round trip
    start = time.perf_counter()
    data = fs.cat_file("stores/blob")
    assert len(data) == 20_000_000
    assert time.perf_counter() - start >= 20_000_000 / 100e6  # at most 100 MB/s a connection
    assert fs.cat_file("stores/blob", start=5, end=9) == data[5:9]
    assert region.cpu_seconds()["server"] > 0


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets, non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    for end in (near, far):
        end.setblocking(False)
    return near, far


@pytest.mark.parametrize("splices", sorted({False, cloud_region._SPLICES}))
def test_a_proxied_connection_delays_paces_and_closes_when_a_side_ends(monkeypatch,
                                                                       splices) -> None:
    """The proxy's connection, in this process, with the answers' bytes in a kernel pipe
    (Linux) and in the buffer used where the kernel cannot splice: a request arrives one
    round trip late, an answer paced to the cap and whole, and once the server's side ends
    (after all it sent is out) the whole connection closes."""
    monkeypatch.setattr(cloud_region, "_SPLICES", splices)
    rtt, rate, answer = 0.05, 20e6, os.urandom(3_000_000)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client, client_side = _tcp_pair()
        server_side, server = _tcp_pair()
        cloud_region._Connection(client_side, server_side, rtt, rate)
        start = loop.time()
        await loop.sock_sendall(client, b"GET /blob")
        assert await loop.sock_recv(server, 100) == b"GET /blob"
        assert loop.time() - start >= rtt
        start = loop.time()
        await loop.sock_sendall(server, answer)
        server.shutdown(socket.SHUT_WR)
        received = bytearray()
        while block := await loop.sock_recv(client, 1 << 20):
            received += block
        assert received == answer  # all of it, then the end
        assert loop.time() - start >= len(answer) / rate
        assert await loop.sock_recv(server, 100) == b""  # the proxy's side closed too
        assert client_side.fileno() == server_side.fileno() == -1
        client.close()
        server.close()

    asyncio.run(scenario())


def test_coalesced_joins_touching_ranges_of_one_object() -> None:
    requests = [("s/0", 100, 200), ("s/0", 0, 100), ("s/1", 0, 50), ("s/0", -40, 0),
                ("s/0", 300, 400), ("s/0", 200, 300)]
    gets = coalesced(requests)
    assert [get for get, _ in gets] == [("s/0", -40, 0), ("s/0", 0, 400), ("s/1", 0, 50)]
    assert gets[1][1] == [1, 0, 5, 4]
    assert [get for get, _ in coalesced(requests, largest=200)][1:3] == [("s/0", 0, 200),
                                                                         ("s/0", 200, 400)]


def test_a_dataloader_over_the_region(region) -> None:
    remote = ZarrDistillDataset("s3://stores/sharded+crc32c.zarr",
                                storage_options=region.storage_options())
    loader = torch.utils.data.DataLoader(remote, batch_size=3, num_workers=2,
                                         collate_fn=collate_distill)
    assert sum(len(batch["image_id"]) for batch in loader) == len(remote)


@pytest.mark.parametrize("path", ["/stores/%2E%2E/%2E%2E/secret", "/%2E%2E/secret",
                                  "/stores/a/%2E%2E/%2E%2E/secret", "/stores/../../secret"])
def test_the_server_serves_nothing_outside_its_buckets(region, path) -> None:
    (region.root.parent / "secret").write_bytes(b"outside the region")
    host = region.direct.removeprefix("http://")
    connection = http.client.HTTPConnection(host)
    connection.request("GET", path)
    answer = connection.getresponse()
    assert answer.status in (400, 404) and b"outside the region" not in answer.read()
    connection.close()
