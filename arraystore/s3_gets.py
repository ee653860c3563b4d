"""Ranged GETs of S3 objects through URLs signed once per object: how readers fetch chunks.

Why: through s3fs, each GET passes through botocore (the request built, signed and run through
its event hooks) and its body through aiohttp on one event-loop thread. Measured against the
loopback region (``arraystore.testing.cloud_region``): a batch-like set of 94 ranges (124 MB)
took 187 ms of CPU and 189 ms straight from the server (654 MB/s, the loop thread saturated),
against 48 ms of CPU and 80 ms (1547 MB/s) for plain HTTP GETs of pre-signed URLs on 32
threads, each reading its body straight into the buffer it returns (``readinto``: the
kernel's copy is the only one, and a thread waiting on its socket holds no lock). A DataLoader
worker streaming an SA-1B store makes about six GETs an item (`ZarrDistillDataset`'s fields;
twelve for all 19 numeric ones): botocore and the body reads were most of its CPU (py-spy: 51%
of a worker's samples). A DataLoader of 2 workers streaming all 19 fields cold went from 47 to
81-91 items/s after its first batch (``benchmarks.remote_peers``).

How: s3fs's own client (its credentials, endpoint, addressing style) signs a GET URL for each
object, used for :data:`REUSED_FOR` seconds of its :data:`SIGNED_FOR` (and signed again once
on a 403, in case the credentials rotated); each ranged GET is then an ``http.client`` request
of that URL with ``Range`` and ``If-Match`` headers, which a pre-signed URL leaves unsigned, on
a pool of threads of the process's own, each keeping its connections open. Failures are
retried as s3fs retries them (cut answers, throttling, server errors; ``retries`` of the
storage options, waits growing from 0.1 s) and then raised as s3fs raises them (``EBUSY`` for
throttling, ``EREMOTEIO`` for server errors), so callers handle both paths alike. Where the
URL cannot carry the request (options that add a header to every request, such as
``requester_pays`` or SSE-C keys in ``s3_additional_kwargs``), or where the environment names
an HTTP proxy (``http.client`` does not use one), stores keep s3fs's path
(:func:`presigned_gets_apply`).
"""

from __future__ import annotations

import errno
import http.client
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from arraystore.per_process import PerProcess

SIGNED_FOR = 3600  # seconds a signed URL is valid
REUSED_FOR = 3000  # seconds it is used before it is signed again
SIGNED_URLS = 1 << 14  # objects whose URL a process keeps (the least recent go)
# GETs in flight per process: a DataLoader of 2 workers streaming SA-1B items through the
# loopback region read 93-115 items/s with 32, 105-126 with 64, 86-102 with 128
THREADS = 64
TIMEOUT = 60  # seconds a connection may wait on the service
EREMOTEIO = getattr(errno, "EREMOTEIO", errno.EIO)
RETRIED = {429: errno.EBUSY, 503: errno.EBUSY, 500: EREMOTEIO, 502: EREMOTEIO, 504: EREMOTEIO}
HEADERS_EVERY_REQUEST = ("requester_pays", "s3_additional_kwargs", "sse_kms_key_id")
Request = tuple[str, int, "int | None", "str | None"]  # path, start, stop, If-Match tag


class PreconditionFailedError(OSError):
    """S3's 412: the object is no longer the version ``If-Match`` named."""


class CutAnswerError(OSError):
    """The connection ended before the body it announced (retried; then raised)."""


def presigned_gets_apply(storage_options: Mapping[str, Any]) -> bool:
    """Whether a store opened with ``storage_options`` can be read through pre-signed URLs:
    no option adds a header to every request, and no proxy is set in the environment."""
    return not any(storage_options.get(name) for name in HEADERS_EVERY_REQUEST) and \
        not {"http", "https"} & set(urllib.request.getproxies())


# the GET threads of this process, shared by every store it reads; each keeps its own
# connections (threads and sockets are not a forked child's: made anew in each process)
_POOL: PerProcess[ThreadPoolExecutor] = PerProcess(
    lambda: ThreadPoolExecutor(THREADS, thread_name_prefix="arraystore-get"))
_CONNECTIONS = threading.local()


class PresignedGets:
    """The signed URLs of one store's objects in one process (hold it per process)."""

    def __init__(self) -> None:
        self._urls: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, fs: Any, requests: Sequence[Request]) -> list[Any]:
        """Each request's (body, ETag), or the exception it ended with: (path "bucket/key",
        start, stop, tag) asks for bytes ``[start, stop)`` (a negative start: the last
        ``-start`` bytes; start 0 and stop None: the whole object), only from version
        ``tag`` where given (else a :class:`PreconditionFailedError`)."""
        self._sign(fs, {path for path, *_ in requests})
        retries = max(int(getattr(fs, "retries", 5)), 1)
        verify = (getattr(fs, "client_kwargs", None) or {}).get("verify", True)
        pool = _POOL.get()
        futures = [pool.submit(self._get, fs, request, retries, verify)
                   for request in requests]
        out: list[Any] = []
        for future in futures:
            try:
                out.append(future.result())
            except Exception as exc:  # returned, as asyncio.gather(return_exceptions=True)
                out.append(exc)
        return out

    def _sign(self, fs: Any, paths: set[str], again: bool = False) -> None:
        """Sign (with s3fs's client, on its loop) the URLs of ``paths`` not signed lately."""
        now = time.monotonic()
        with self._lock:
            missing = [p for p in paths if again or p not in self._urls
                       or now - self._urls[p][1] >= REUSED_FOR]
        if not missing:
            return
        from fsspec.asyn import sync

        async def signed() -> list[str]:
            client = await fs.set_session()
            return [await client.generate_presigned_url(
                "get_object", Params=dict(zip(("Bucket", "Key"), p.split("/", 1), strict=True)),
                ExpiresIn=SIGNED_FOR) for p in missing]

        urls = sync(fs.loop, signed)
        with self._lock:
            for path, url in zip(missing, urls, strict=True):
                self._urls[path] = (url, now)
                self._urls.move_to_end(path)
            while len(self._urls) > SIGNED_URLS:
                self._urls.popitem(last=False)

    def _url(self, fs: Any, path: str) -> str:
        """The object's signed URL (signed again where it was dropped meanwhile: more objects
        than :data:`SIGNED_URLS` read at once)."""
        while True:
            with self._lock:
                kept = self._urls.get(path)
            if kept is not None:
                return kept[0]
            self._sign(fs, {path})

    def _get(self, fs: Any, request: Request, retries: int,
             verify: Any) -> tuple[memoryview, str]:
        """One request, retried with backoff (on a GET thread)."""
        path, start, stop, tag = request
        headers = {"Connection": "keep-alive"}
        if start < 0:
            headers["Range"] = f"bytes={start}"
        elif start or stop is not None:
            headers["Range"] = f"bytes={start}-{'' if stop is None else stop - 1}"
        if tag:
            headers["If-Match"] = tag
        resigned = False
        failure: OSError = OSError(f"{path}: no attempt made")
        for attempt in range(retries):
            try:
                status, body, etag, said = self._send(self._url(fs, path), headers, verify)
            except (OSError, http.client.HTTPException) as exc:  # cut, reset, refused
                failure = exc if isinstance(exc, OSError) else CutAnswerError(
                    f"{path}: {type(exc).__name__}: {exc}")
            else:
                if status in (200, 206):
                    return body, etag
                if status == 403 and not resigned:  # expired, or the keys rotated
                    resigned = True
                    self._sign(fs, {path}, again=True)
                    continue
                failure = _failure(status, path, said)
                if status not in RETRIED:
                    raise failure
            time.sleep(min(1.7 ** attempt * 0.1, 15))
        raise failure

    def _send(self, url: str, headers: Mapping[str, str],
              verify: Any) -> tuple[int, memoryview, str, str]:
        """GET ``url`` on this thread's connection to its host: (status, body, ETag, the
        start of an error's body). The body is read straight into a NumPy buffer, returned as
        a (writable) memoryview that readers then hand out as the chunk's array."""
        parts = urllib.parse.urlsplit(url)
        connection = self._connection(parts, verify)
        try:
            connection.request("GET", f"{parts.path}?{parts.query}", headers=headers)
            answer = connection.getresponse()
            if answer.status not in (200, 206):
                return answer.status, memoryview(b""), "", answer.read()[:300].decode(
                    "utf-8", "replace")
            size = int(answer.headers.get("Content-Length", -1))
            if size < 0:
                body = np.frombuffer(bytearray(answer.read()), np.uint8)
            else:
                body = np.empty(size, np.uint8)  # not zeroed: every byte is read into it
                view, got = memoryview(body), 0
                while got < size:
                    n = answer.readinto(view[got:])
                    if not n:
                        raise CutAnswerError(f"{parts.path}: the answer ended after {got} of "
                                             f"its {size} bytes")
                    got += n
            return answer.status, memoryview(body), answer.headers.get("ETag", ""), ""
        except BaseException:
            self._drop(parts)
            raise

    def _connection(self, parts: urllib.parse.SplitResult,
                    verify: Any) -> http.client.HTTPConnection:
        """This thread's open connection to the URL's host (made on first use)."""
        kept: dict[str, http.client.HTTPConnection] = _CONNECTIONS.__dict__
        connection = kept.get(parts.netloc)
        if connection is None:
            if parts.scheme == "https":
                context = ssl.create_default_context(
                    cafile=verify if isinstance(verify, str) else None)
                if verify is False:
                    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                connection = http.client.HTTPSConnection(parts.hostname, parts.port,
                                                         timeout=TIMEOUT, context=context)
            else:
                connection = http.client.HTTPConnection(parts.hostname, parts.port,
                                                        timeout=TIMEOUT)
            kept[parts.netloc] = connection
        return connection

    def _drop(self, parts: urllib.parse.SplitResult) -> None:
        """Close this thread's connection to the URL's host (after a failure mid-answer)."""
        connection = _CONNECTIONS.__dict__.pop(parts.netloc, None)
        if connection is not None:
            connection.close()


def _failure(status: int, path: str, said: str) -> OSError:
    """The error of an answer with HTTP ``status`` (and body ``said``), as s3fs raises it."""
    what = f"{path}: HTTP {status} {said}"
    if status == 404:
        return FileNotFoundError(errno.ENOENT, what)
    if status == 412:
        return PreconditionFailedError(what)
    if status in (401, 403):
        return PermissionError(errno.EACCES, what)
    return OSError(RETRIED.get(status, errno.EIO), what)
