"""Bearer-token access control.

With a token configured (``galleria serve --token-file F``), every write
(adding or removing items, upgrade actions) needs ``Authorization: Bearer
<token>``: 401 without one, 403 with a wrong one. Reads stay open unless
``--token-reads``. Tokens are compared in constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from galleria.errors import InputError
from galleria.service.errors import ServiceError

MIN_TOKEN_CHARS = 16


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (surrounding whitespace removed); InputError if unusable."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the token file {p}: {exc}") from exc
    if len(text) < MIN_TOKEN_CHARS or any(c.isspace() for c in text):
        raise InputError(f"the token in {p} must be one word of at least {MIN_TOKEN_CHARS} "
                         "characters (e.g. `python -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))' > F`)")
    return text


def read_token_map(path: str | os.PathLike[str], names: list[str]) -> dict[str, str]:
    """Tokens per gallery from ``path``: one token for every gallery (the single-gallery
    format), or lines ``NAME TOKEN`` (each gallery its own token; ``#`` comments; a
    gallery without a line gets no token: its writes are open, with a warning by the
    caller). InputError for an unknown name or a short token."""
    p = Path(path)
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the token file {p}: {exc}") from exc
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(lines) == 1 and len(lines[0].split()) == 1:
        tok = read_token_file(p)
        return {n: tok for n in names}
    out: dict[str, str] = {}
    for n, ln in enumerate(lines, 1):
        parts = ln.split()
        if len(parts) != 2:
            raise InputError(f"{p} line {n}: expected NAME TOKEN (one gallery per line), or "
                             "a file holding one token for every gallery")
        name, tok = parts
        if name not in names:
            raise InputError(f"{p} line {n}: no gallery {name!r} is served (galleries: "
                             f"{names})")
        if len(tok) < MIN_TOKEN_CHARS:
            raise InputError(f"{p} line {n}: the token must have at least {MIN_TOKEN_CHARS} "
                             "characters")
        out[name] = tok
    return out


class Auth:
    """Checks the ``Authorization`` header of a request against the configured token."""

    def __init__(self, token: str | None, *, protect_reads: bool = False) -> None:
        if protect_reads and not token:
            raise InputError("--token-reads needs a token (--token-file)")
        self._token = token.encode() if token else None
        self.protect_reads = bool(protect_reads)

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, header: str | None, *, write: bool) -> None:
        """Raise 401/403 ServiceError unless the request may go on."""
        if self._token is None or (not write and not self.protect_reads):
            return
        what = "writes" if write else "requests"
        if not header:
            raise ServiceError(401, "unauthorized",
                               f"{what} to this server need a bearer token: send "
                               "`Authorization: Bearer <token>`",
                               headers={"WWW-Authenticate": "Bearer"})
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ServiceError(401, "unauthorized",
                               "the Authorization header must be `Bearer <token>`",
                               headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self._token):
            raise ServiceError(403, "forbidden", "the bearer token is not valid for this server")
