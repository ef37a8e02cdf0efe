"""The bounded worker pool and the upload size limit.

Every request's CPU work (image decoding, inference, search, commits) runs in a
fixed pool of threads, never on the event loop. At most ``workers + queue``
tasks are admitted at a time; the next one is refused at once with 503 and
``Retry-After`` (instead of an unbounded queue growing in memory).

:class:`BodyLimit` is an ASGI middleware refusing request bodies over the
limit: by ``Content-Length`` before anything is read, and by counting the bytes
of a body sent without one (chunked), so an upload never takes more memory
than the limit.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from galleria.service.errors import ServiceError, overloaded

T = TypeVar("T")


class WorkerPool:
    """``workers`` threads behind a queue of at most ``queue`` waiting tasks."""

    def __init__(self, workers: int, queue: int, *, name: str = "galleria-worker") -> None:
        if workers < 1 or queue < 0:
            raise ValueError("workers must be >= 1 and queue >= 0")
        self.workers = int(workers)
        self.capacity = int(workers) + int(queue)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._admitted = 0
        self._running = 0
        self.rejected = 0
        self.completed = 0
        self.busy_s = 0.0

    @property
    def queued(self) -> int:
        """Tasks admitted and waiting for a thread."""
        return max(0, self._admitted - self._running)

    @property
    def running(self) -> int:
        return self._running

    def _admit(self) -> None:
        with self._lock:
            if self._admitted >= self.capacity:
                self.rejected += 1
                raise overloaded(
                    f"the server is busy ({self._running} requests running, "
                    f"{self._admitted - self._running} waiting, the queue holds "
                    f"{self.capacity - self.workers}); retry shortly")
            self._admitted += 1

    def _wrap(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        with self._lock:
            self._running += 1
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            with self._lock:
                self._running -= 1
                self._admitted -= 1
                self.completed += 1
                self.busy_s += time.perf_counter() - t

    async def run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run ``fn(*args, **kw)`` in the pool (503 ServiceError when the queue is full)."""
        self._admit()
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, self._wrap, fn, *args, **kw)
        return await loop.run_in_executor(self._pool, call)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def mib(n: int) -> str:
    """A byte count as the user gave it (``--max-upload-mb 20`` -> ``20 MiB``)."""
    v = n / 2**20
    return f"{v:g} MiB" if v >= 1 and float(v).is_integer() else \
        f"{v:.2f} MiB" if v >= 0.01 else f"{n} bytes"


class BodyTooLarge(ServiceError):
    def __init__(self, upload_limit: int) -> None:
        super().__init__(413, "too_large",
                         f"the request is larger than the upload limit of {mib(upload_limit)}; "
                         "send a smaller image (galleria serve --max-upload-mb)")


class BodyLimit:
    """ASGI middleware: 413 JSON for bodies over ``upload_limit`` bytes plus ``slack``
    (room for a multipart request's headers around an image of the limit's size); the
    message quotes the upload limit the server was given."""

    def __init__(self, app: Any, upload_limit: int, slack: int = 2**20) -> None:
        self.app = app
        self.upload_limit = int(upload_limit)
        self.limit = int(upload_limit) + int(slack)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    n = int(value)
                except ValueError:
                    n = -1
                if n > self.limit:
                    await _send_error(send, BodyTooLarge(self.upload_limit))
                    return
        seen = 0
        limit, shown = self.limit, self.upload_limit

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(shown)
            return msg  # type: ignore[no-any-return]

        await self.app(scope, counting_receive, send)


async def _send_error(send: Any, err: ServiceError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
