"""The last line of the API: every answer a JSON body, no connection dropped, no server
path or traceback in an error.

:class:`Guard` is an ASGI middleware inside the metrics middleware:

- **An unexpected exception is a JSON 500 on a kept connection.** Starlette answers
  an unhandled exception from its outermost middleware and then re-raises it, which
  makes uvicorn close the keep-alive connection: the client's next request on it
  fails (ECONNRESET). The guard answers ``{"error": "internal", ...}`` itself, logs
  the traceback, and returns normally.
- **A request path holding a control character is a 400** (``bad_id``): item ids
  never hold one (:mod:`galleria.ids`), and a route would otherwise match less than
  the path (``/v1/items/a%0A`` named item ``a``).
- **Server paths are taken out of error bodies** (status >= 400, and the inline
  errors of a 200 batch answer): the gallery folder (as given, absolute, resolved)
  becomes ``<gallery>``, the server's working directory ``<server>``, any other
  absolute path of the server's file system ``<server path>``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def server_paths(*galleries: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(text, replacement)`` pairs: each gallery folder's spellings and the working
    directory, longest first."""
    pairs = {os.getcwd(): "<server>"}
    for gallery in galleries:
        g = str(gallery)
        pairs.update({os.path.abspath(g): "<gallery>", str(Path(g).resolve()): "<gallery>"})
        if not os.path.isabs(g) and g not in (".", "") and len(g) > 2:
            pairs.setdefault(g.rstrip("/"), "<gallery>")
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


_ABSOLUTE = re.compile(r"(?<![\w.:/<>-])/[^\s'\"(),;:/]+(?:/[^\s'\"(),;:/]*)+")


def redact(text: str, paths: list[tuple[str, str]]) -> str:
    """``text`` with every server path of ``paths`` replaced (whole path components
    only), then every other absolute path of this machine's file system (one whose
    first folder exists here, e.g. an indexed image's ``/data/photos/x.jpg``) as
    ``<server path>``; URL paths such as ``/v1/items/x`` are left as they are."""
    for p, rep in paths:
        if len(p) <= 1:
            continue
        text = re.sub(rf"(?<![\w.-]){re.escape(p)}(?![\w.-])", rep, text)

    def other(m: re.Match[str]) -> str:
        top = m.group().split("/")[1]
        return "<server path>" if top and os.path.isdir("/" + top) else m.group()

    return _ABSOLUTE.sub(other, text)


def _body(status: int, code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message, "status": status}).encode()


class Guard:
    """ASGI middleware (see the module docstring)."""

    def __init__(self, app: Any, galleries: list[str | os.PathLike[str]]) -> None:
        self.app = app
        self.paths = server_paths(*galleries)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _CONTROL.search(scope.get("path", "")):
            await _send(send, 400, _body(400, "bad_id", "the request path holds a control "
                                         "character; item ids never do (see /docs)"))
            return
        started = False
        held: dict[str, Any] | None = None

        async def send_wrapper(msg: dict[str, Any]) -> None:
            nonlocal started, held
            if msg["type"] == "http.response.start":
                started = True
                if _json(msg):
                    held = msg  # sent with the body, whose length may change
                    return
            elif msg["type"] == "http.response.body" and held is not None:
                body = msg.get("body", b"")
                if not msg.get("more_body", False):
                    body = self._clean(int(held["status"]), body)
                    headers = [(k, v) for k, v in held.get("headers", [])
                               if k.lower() != b"content-length"]
                    headers.append((b"content-length", str(len(body)).encode()))
                    await send({**held, "headers": headers})
                    held = None
                    await send({**msg, "body": body})
                    return
                await send(held)  # streamed JSON: passed on as it is
                held = None
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            log.exception("unexpected error answering %s %s", scope.get("method"),
                          scope.get("path"))
            if started:
                raise  # part of the answer is out: nothing sound can follow
            msg = (f"internal error ({type(exc).__name__}); the server keeps serving; see "
                   "its log")
            await _send(send, 500, _body(500, "internal", msg))

    def _clean(self, status: int, body: bytes) -> bytes:
        if status < 400 and b'"error"' not in body:
            return body
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return body
        cleaned = redact(text, self.paths)
        return body if cleaned == text else cleaned.encode("utf-8")


def _json(msg: dict[str, Any]) -> bool:
    for k, v in msg.get("headers", []):
        if k.lower() == b"content-type":
            return v.split(b";")[0].strip().lower() == b"application/json"
    return False


async def _send(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
