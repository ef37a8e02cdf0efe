"""HTTP errors of the service: every refusal is a JSON body with a message.

``{"error": "<code>", "message": "<what is wrong and what to do>", "status": <n>}``
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from galleria.errors import (
    BusyError,
    CompatibilityError,
    FormatError,
    GalleriaError,
    InputError,
    MissingDependencyError,
    StorageError,
)
from galleria.images.decode import ImageDecodeError


class ServiceError(Exception):
    """A request the service refuses (4xx) or cannot serve now (503)."""

    def __init__(self, status: int, code: str, message: str, *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        return {"error": self.code, "message": self.message, "status": self.status}


def bad_request(message: str, code: str = "bad_request") -> ServiceError:
    return ServiceError(400, code, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(404, "not_found", message)


def unprocessable(message: str, code: str = "unprocessable") -> ServiceError:
    return ServiceError(422, code, message)


def overloaded(message: str, retry_after_s: int = 1) -> ServiceError:
    return ServiceError(503, "overloaded", message,
                        headers={"Retry-After": str(max(1, int(retry_after_s)))})


def from_galleria(exc: GalleriaError) -> ServiceError:
    """Map a library error to its HTTP status (the library's message is kept)."""

    msg = str(exc)
    if isinstance(exc, ImageDecodeError):
        if exc.reason.startswith("too many pixels"):
            return ServiceError(413, "image_too_large", f"image refused: {exc.reason}")
        return ServiceError(422, "bad_image", f"image refused: {exc.reason}")
    if isinstance(exc, CompatibilityError):
        return ServiceError(422, "incompatible", msg)
    if isinstance(exc, InputError):
        return ServiceError(422, "invalid", msg)
    if isinstance(exc, BusyError):
        return ServiceError(503, "busy", msg, headers={"Retry-After": "5"})
    if isinstance(exc, StorageError):
        return ServiceError(507, "storage", msg)
    if isinstance(exc, (FormatError, MissingDependencyError)):
        return ServiceError(500, "gallery", msg)
    from galleria.upgrade.state import UpgradeError  # lazy: PIL

    if isinstance(exc, UpgradeError):
        return ServiceError(409, "upgrade", msg)
    return ServiceError(500, "galleria", msg)


def error_response(err: ServiceError) -> JSONResponse:
    """The JSON response of a refusal (its status and headers)."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
