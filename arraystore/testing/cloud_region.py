"""A cloud region on loopback, for tests and benchmarks: an S3-compatible object server that
serves a folder, behind a shaping proxy that adds a round-trip delay and caps each connection's
bandwidth.

A simulation of a remote object store, not one: the server answers the requests this project's
readers make (GET with ``Range`` and ``If-Match``, HEAD, ListObjectsV2; PUT and DELETE for
completeness) from files, with no authentication, and sends object bodies with ``sendfile`` so
that it costs little CPU (moto's Python server was the bottleneck of read benchmarks: its own
CPU is what :meth:`Region.cpu_seconds` lets a benchmark report). The proxy holds what a client
sends for the whole round trip and paces what the server sends back to the bandwidth cap, per
connection: an answer's first byte comes one round trip after its request, however many
requests are in flight, as over a link with half the delay each way. On Linux the answers'
bytes go through a kernel pipe (``splice``), never through Python: copied through Python, they
made the proxy the costliest process of the simulation. Each runs in a process of its own, so
neither competes with the caller for the GIL. Buckets are the folders under ``root``; objects
are the files beneath them.

``python -m arraystore.testing.cloud_region serve ROOT`` and ``... proxy HOST:PORT`` run them
by hand; each prints the port it listens on. ``GET /_region/stats`` on the server counts the
requests it answered, its GETs and the object bytes it sent.

Faults, for tests of what a reader does when the service misbehaves: ``POST /_region/faults``
with ``{"mode": M, "count": N, "match": TEXT}`` makes the next ``N`` object GETs whose key
contains ``TEXT`` fail (:meth:`Region.inject`). Modes: ``slowdown`` (503 SlowDown, S3's
throttling answer), ``error`` (500 InternalError), ``cut`` (the connection closes halfway
through the body it announced) and ``short`` (a well-formed answer one byte shorter than the
range asked for, as a service answers for an object shorter than the reader believes). The
stats list when each faulted request came (``faulted``, seconds on the server's clock).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import resource
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any
from xml.sax.saxutils import escape

DEFAULT_RTT_MS = 20.0
DEFAULT_MB_PER_S = 100.0
PUMP_BYTES = 256 * 1024  # the server's file reads and writes
MOVE_BYTES = 256 * 1024  # the most a proxied direction moves at once
LINE_BYTES = 1 << 20  # bytes a proxied direction holds before it stops reading its sender
STATS_PATH = "_region/stats"  # GET: the requests served so far, as JSON
FAULTS_PATH = "_region/faults"  # POST: the next matching GETs fail (see the module's text)
FAULT_MODES = ("slowdown", "error", "cut", "short")


def _xml(body: str) -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n' + body).encode()


def _error(code: str, status: int, message: str) -> Any:
    from aiohttp import web

    return web.Response(status=status, content_type="application/xml",
                        body=_xml(f"<Error><Code>{code}</Code><Message>{escape(message)}"
                                  f"</Message></Error>"))


def _etag(path: Path, stat: os.stat_result | None = None) -> str:
    """The object's ETag (from its ``stat`` where given): the one aiohttp's ``FileResponse``
    sends for the file (it sets its own on every GET and HEAD), so that ``If-Match`` compares
    what clients were given."""
    stat = path.stat() if stat is None else stat
    return f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'


def _asked(asked: slice, size: int) -> tuple[int, int]:
    """The bytes ``[start, stop)`` a GET of a ``size``-byte object asks for with its ``Range``
    (parsed by aiohttp: ``slice(start, stop)``, a negative start for a suffix, both None for
    the whole)."""
    start, stop = asked.start, asked.stop
    if start is None:
        return 0, size
    if start < 0:
        return max(0, size + start), size
    return start, max(start, min(size, size if stop is None else stop))


async def _faulty(request: Any, target: Path, mode: str) -> Any:
    """The answer of a GET of ``target`` that fails in ``mode`` (:data:`FAULT_MODES`)."""
    from aiohttp import web

    if mode == "slowdown":
        return _error("SlowDown", 503, "Please reduce your request rate.")
    if mode == "error":
        return _error("InternalError", 500, "We encountered an internal error. Please try "
                                            "again.")
    size = target.stat().st_size
    start, stop = _asked(request.http_range, size)
    with target.open("rb") as file:
        file.seek(start)
        body = file.read(stop - start)
    if mode == "short":
        body = body[:-1]
    ranged = request.headers.get("Range") is not None
    response = web.StreamResponse(status=206 if ranged else 200, headers={
        "ETag": _etag(target), "Content-Length": str(stop - start if mode == "cut"
                                                     else len(body))})
    if ranged:
        response.headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{size}"
    await response.prepare(request)
    if mode == "cut":
        await response.write(body[:len(body) // 2])
        request.transport.close()
        return response
    await response.write(body)
    await response.write_eof()
    return response


def _listing(bucket: Path, prefix: str, delimiter: str, max_keys: int,
             after: str) -> bytes:
    keys = sorted(str(p.relative_to(bucket)) for p in bucket.rglob("*") if p.is_file())
    contents, prefixes = [], []
    for key in keys:
        if not key.startswith(prefix) or key <= after:
            continue
        rest = key[len(prefix):]
        if delimiter and delimiter in rest:
            common = prefix + rest.split(delimiter, 1)[0] + delimiter
            if common not in prefixes:
                prefixes.append(common)
            continue
        contents.append(key)
    listed = (contents + prefixes)[:max_keys]
    truncated = len(contents) + len(prefixes) > max_keys
    parts = [f"<ListBucketResult><Name>{escape(bucket.name)}</Name>"
             f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(listed)}</KeyCount>"
             f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{str(truncated).lower()}</IsTruncated>"]
    if truncated:
        parts.append(f"<NextContinuationToken>{escape(listed[-1])}</NextContinuationToken>")
    for key in (k for k in listed if k in contents):
        path = bucket / key
        modified = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(path.stat().st_mtime))
        parts.append(f"<Contents><Key>{escape(key)}</Key><LastModified>{modified}"
                     f"</LastModified><ETag>{escape(_etag(path))}</ETag>"
                     f"<Size>{path.stat().st_size}</Size><StorageClass>STANDARD</StorageClass>"
                     f"</Contents>")
    parts += [f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>"
              for p in listed if p in prefixes]
    return _xml("".join(parts) + "</ListBucketResult>")


def object_app(root: Path) -> Any:
    """The aiohttp application of the object server over ``root``."""
    from aiohttp import web

    root = root.resolve()

    def located(request: web.Request) -> tuple[Path, str]:
        """The file (or bucket folder) a request names, and its key. Checked by its words,
        not by resolving the path (a system call per folder of it, a third of the server's
        CPU per GET): no bucket or key part may be ``.`` or ``..``."""
        bucket, _, key = request.match_info["path"].partition("/")
        if bucket in ("", ".", ".."):
            raise web.HTTPBadRequest(text="bad bucket name")
        if key and {".", ".."} & set(key.split("/")):
            raise web.HTTPBadRequest(text="key out of its bucket")
        return (root / bucket / key if key else root / bucket), key

    served: dict[str, Any] = {"requests": 0, "gets": 0, "bytes": 0,  # bytes: of bodies sent
                              "faulted": []}
    faults = {"mode": "", "count": 0, "match": ""}

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.match_info["path"] == STATS_PATH:
            return web.json_response(served)
        if request.match_info["path"] == FAULTS_PATH:
            asked = await request.json()
            if asked.get("mode") not in FAULT_MODES:
                raise web.HTTPBadRequest(text=f"mode must be one of {FAULT_MODES}")
            faults.update(mode=asked["mode"], count=int(asked.get("count", 1)),
                          match=str(asked.get("match", "")))
            return web.json_response(faults)
        served["requests"] += 1
        served["gets"] += request.method == "GET"
        target, key = located(request)
        bucket = target if not key else root / request.match_info["path"].split("/", 1)[0]
        if not bucket.is_dir() and request.method != "PUT":
            return _error("NoSuchBucket", 404, f"no bucket {bucket.name}")
        if request.method in ("GET", "HEAD") and not key:
            if request.method == "HEAD":
                return web.Response()
            query = request.query
            return web.Response(content_type="application/xml", body=_listing(
                bucket, query.get("prefix", ""), query.get("delimiter", ""),
                int(query.get("max-keys", 1000)),
                query.get("continuation-token", query.get("start-after", ""))))
        if request.method in ("GET", "HEAD"):
            try:
                stat = target.stat()
            except OSError:
                stat = None
            if stat is None or not S_ISREG(stat.st_mode):
                return _error("NoSuchKey", 404, f"no object {key}")
            asked_tag = request.headers.get("If-Match")
            if asked_tag not in (None, "*", _etag(target, stat)):
                return _error("PreconditionFailed", 412, f"{key}: the object's ETag is not "
                                                         f"{asked_tag}")
            if request.method == "GET" and faults["count"] > 0 and faults["match"] in key:
                faults["count"] -= 1
                served["faulted"].append(time.monotonic())
                return await _faulty(request, target, faults["mode"])
            response = web.FileResponse(target, chunk_size=PUMP_BYTES)
            response.headers["ETag"] = _etag(target, stat)
            if request.method == "GET":
                with contextlib.suppress(ValueError):  # a bad Range: answered 416, no body
                    start, stop = _asked(request.http_range, stat.st_size)
                    served["bytes"] += stop - start
            return response
        if request.method == "PUT":
            if not key:
                target.mkdir(exist_ok=True)
                return web.Response()
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            with partial.open("wb") as out:
                async for block in request.content.iter_chunked(PUMP_BYTES):
                    out.write(block)
            partial.replace(target)
            return web.Response(headers={"ETag": _etag(target)})
        if request.method == "DELETE":
            if key and target.is_file():
                target.unlink()
            return web.Response(status=204)
        return _error("NotImplemented", 501, f"{request.method} is not served here")

    app = web.Application(client_max_size=1 << 34)
    app.router.add_route("*", "/{path:.*}", handle)
    return app


_SPLICES = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if _SPLICES else 0


class _Buffer:
    """A delay line's bytes held in this process (``recv`` in, ``send`` out): what the
    requests' direction uses (their headers, and the bodies of uploads: few bytes beside the
    answers), and both directions where the kernel cannot splice (not Linux)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.capacity = LINE_BYTES

    def take(self, source: socket.socket, most: int) -> int:
        block = source.recv(most)
        self.data += block
        return len(block)

    def give(self, target: socket.socket, count: int) -> int:
        with memoryview(self.data) as view, view[:count] as head:
            sent = target.send(head)
        del self.data[:sent]
        return sent

    def close(self) -> None:
        self.data.clear()


class _Pipe:
    """A delay line's bytes held in a kernel pipe, moved in and out with ``splice``: they never
    enter this process. The answers' direction carries nearly every byte a benchmark reads, and
    copying each through Python twice made the proxy the costliest process of the simulation
    (0.4-0.6 CPU seconds a GB, against 0.1 for the server)."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # past the system's pipe-max-size: keep the default
            fcntl.fcntl(self.write_end, fcntl.F_SETPIPE_SZ, LINE_BYTES)
        self.capacity = fcntl.fcntl(self.write_end, fcntl.F_GETPIPE_SZ)

    def take(self, source: socket.socket, most: int) -> int:
        return os.splice(source.fileno(), self.write_end, most, flags=_SPLICE_FLAGS)

    def give(self, target: socket.socket, count: int) -> int:
        return os.splice(self.read_end, target.fileno(), count, flags=_SPLICE_FLAGS)

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)


class _Direction:
    """One direction of a proxied connection: each block ``source`` sends leaves through
    ``target`` ``delay`` seconds after it came, paced to ``rate`` bytes a second (None:
    unpaced) from the first byte of a burst. The blocks wait in ``line``; when it is full the
    source is not read, as a full TCP window stops a sender. Readiness callbacks and timers
    of the event loop, no coroutine per block: the proxy's own CPU is part of what a
    benchmark on one machine pays for the simulation."""

    def __init__(self, connection: _Connection, source: socket.socket, target: socket.socket,
                 delay: float, rate: float | None, line: _Buffer | _Pipe) -> None:
        self.loop = asyncio.get_running_loop()
        self.connection, self.source, self.target = connection, source, target
        self.delay, self.rate, self.line = delay, rate, line
        self.waiting: deque[list[Any]] = deque()  # [due, bytes left]; bytes None: the end
        self.held = 0  # bytes in the line
        self.free_at = 0.0  # when the pacing lets the last block out
        self.reading = self.writing = self.ended = False
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if not self.reading and not self.ended:
            self.reading = True
            self.loop.add_reader(self.source, self._readable)

    def _pause(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.source)

    def _readable(self) -> None:
        room = self.line.capacity - self.held
        if room <= 0:
            self._pause()
            return
        try:
            count = self.line.take(self.source, min(room, MOVE_BYTES))
        except BlockingIOError:  # nothing moved: a spurious wake-up, or a pipe whose slots
            if self.held:  # are all taken by fewer bytes than its size (on at the next send)
                self._pause()
            return
        except OSError:  # the connection broke
            self.connection.close()
            return
        due = self.loop.time() + self.delay
        if self.rate:
            if count:  # leaves once its last byte would have crossed the link
                self.free_at = max(due, self.free_at) + count / self.rate
            due = max(due, self.free_at)
        if count:
            self.held += count
        else:  # the end: the connection closes once what came before is out
            self.ended = True
            self._pause()
        self.waiting.append([due, count or None])
        self._schedule()

    def _schedule(self) -> None:
        if self.timer is None and self.waiting and not self.writing:
            self.timer = self.loop.call_at(self.waiting[0][0], self._deliver)

    def _deliver(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.waiting and self.waiting[0][0] <= now:
            block = self.waiting[0]
            if block[1] is None:
                self.connection.close()  # an end: closed, as the side that ended closed
                return
            try:
                sent = self.line.give(self.target, block[1])
            except BlockingIOError:
                sent = 0
            except OSError:
                self.connection.close()
                return
            self.held -= sent
            block[1] -= sent
            if block[1]:  # the target's send buffer is full: on when it drains
                self.writing = True
                self.loop.add_writer(self.target, self._writable)
                break
            self.waiting.popleft()
        if self.held < self.line.capacity:
            self.start()
        self._schedule()

    def _writable(self) -> None:
        self.writing = False
        self.loop.remove_writer(self.target)
        self._deliver()

    def stop(self) -> None:
        self._pause()
        if self.writing:
            self.loop.remove_writer(self.target)
        if self.timer is not None:
            self.timer.cancel()
        self.line.close()


class _Connection:
    """A client's connection and the proxy's own to the server. The whole round trip is added
    to what the client sends (the requests); what the server sends back is paced but not
    delayed: an answer's first byte comes one round trip after its request, as over a link
    with half the delay each way, and the answers' bytes wait in a pipe, not in Python. Each
    direction holds at most :data:`LINE_BYTES`, so an upload moves at most that much a round
    trip (as through a TCP window of that size)."""

    def __init__(self, client: socket.socket, server: socket.socket, rtt: float,
                 bytes_per_second: float | None) -> None:
        self.sockets = (client, server)
        self.closed = False
        self.asking = _Direction(self, client, server, rtt, None, _Buffer())
        self.answering = _Direction(self, server, client, 0.0, bytes_per_second,
                                    _Pipe() if _SPLICES else _Buffer())
        self.asking.start()
        self.answering.start()


    def close(self) -> None:
        """Both directions stopped, both sockets and the pipe closed (once: a descriptor
        number closed twice may already be another connection's). When one side ends, what
        it sent is passed on and then the whole connection closes, as when that side closes
        its socket (HTTP clients and servers close; they do not half-close)."""
        if self.closed:
            return
        self.closed = True
        for direction in (self.asking, self.answering):
            direction.stop()
        for end in self.sockets:
            end.close()


async def _proxy(listen_port: int, upstream: tuple[str, int], rtt: float,
                 bytes_per_second: float) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ValueError, OSError):  # 6 descriptors a connection
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.create_server(("127.0.0.1", listen_port), backlog=512)
    listener.setblocking(False)
    print(listener.getsockname()[1], flush=True)
    connecting: set[asyncio.Task] = set()  # referenced until done

    async def connect(client: socket.socket) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setblocking(False)
        try:
            await loop.sock_connect(server, upstream)
        except OSError:  # the server is gone: so is the client's connection
            client.close()
            server.close()
            return
        for end in (client, server):
            end.setblocking(False)
            end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _Connection(client, server, rtt, bytes_per_second or None)

    while True:
        try:
            client, _ = await loop.sock_accept(listener)
        except OSError:  # out of descriptors, say: the client retries, so does this loop
            await asyncio.sleep(0.01)
            continue
        task = asyncio.ensure_future(connect(client))
        connecting.add(task)
        task.add_done_callback(connecting.discard)


async def _serve(root: Path, port: int) -> None:
    from aiohttp import web

    runner = web.AppRunner(object_app(root), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Region:
    """A running region: ``endpoint`` is the proxy's (what clients use), ``direct`` the
    server's own, unshaped."""

    root: Path
    endpoint: str
    direct: str
    server_pid: int
    proxy_pid: int
    rtt_ms: float
    mb_per_s: float

    def storage_options(self, direct: bool = False) -> dict[str, Any]:
        """s3fs options for a store in this region (``direct``: bypassing the proxy)."""
        return {"endpoint_url": self.direct if direct else self.endpoint, "key": "region",
                "secret": "region-secret", "client_kwargs": {"region_name": "us-east-1"}}

    def requests(self) -> dict[str, Any]:
        """Requests the server has answered so far (all, and GETs), the object bytes it sent
        and when each faulted GET came (:meth:`inject`)."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.direct}/{STATS_PATH}") as answer:
            return json.loads(answer.read())

    def inject(self, mode: str, count: int = 1, match: str = "") -> None:
        """Make the next ``count`` object GETs whose key contains ``match`` fail in ``mode``
        (:data:`FAULT_MODES`; the module's text says how each fails); replaces any faults
        not yet used up."""
        import json
        import urllib.request

        asked = urllib.request.Request(f"{self.direct}/{FAULTS_PATH}", method="POST",
                                       data=json.dumps({"mode": mode, "count": count,
                                                        "match": match}).encode())
        with urllib.request.urlopen(asked) as answer:
            answer.read()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU the server and the proxy have used so far."""
        return {"server": cpu_seconds(self.server_pid), "proxy": cpu_seconds(self.proxy_pid)}

    def describe(self) -> str:
        return (f"a simulated object store on loopback: an S3-compatible file server "
                f"(arraystore.testing.cloud_region, sendfile) behind a proxy adding "
                f"{self.rtt_ms:g} ms of round trip and capping each connection at "
                f"{self.mb_per_s:g} MB/s")


def _started(command: list[str]) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.strip().isdigit():
        process.kill()
        raise RuntimeError(f"{' '.join(command)} did not start (printed {line!r})")
    return process, int(line)


@contextmanager
def cloud_region(root: str | os.PathLike[str], rtt_ms: float = DEFAULT_RTT_MS,
                 mb_per_s: float = DEFAULT_MB_PER_S) -> Iterator[Region]:
    """Start the server over ``root`` (buckets are its folders) and the proxy in front of it;
    stop both on exit."""
    module = [sys.executable, "-m", "arraystore.testing.cloud_region"]
    server, port = _started([*module, "serve", os.fspath(root)])
    try:
        proxy, proxy_port = _started([*module, "proxy", f"127.0.0.1:{port}", "--rtt-ms",
                                      str(rtt_ms), "--mb-per-s", str(mb_per_s)])
        try:
            yield Region(Path(root), f"http://127.0.0.1:{proxy_port}",
                         f"http://127.0.0.1:{port}", server.pid, proxy.pid, rtt_ms, mb_per_s)
        finally:
            proxy.terminate()
            proxy.wait()
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="the object server over a folder")
    serve.add_argument("root", type=Path)
    serve.add_argument("--port", type=int, default=0)
    proxy = commands.add_parser("proxy", help="the shaping proxy in front of a server")
    proxy.add_argument("upstream", help="HOST:PORT")
    proxy.add_argument("--port", type=int, default=0)
    proxy.add_argument("--rtt-ms", type=float, default=DEFAULT_RTT_MS)
    proxy.add_argument("--mb-per-s", type=float, default=DEFAULT_MB_PER_S)
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(_serve(args.root, args.port))
    else:
        host, _, port = args.upstream.rpartition(":")
        asyncio.run(_proxy(args.port, (host, int(port)), args.rtt_ms / 1000,
                           args.mb_per_s * 1e6))


if __name__ == "__main__":
    main()
