"""Parsing of request bodies into queries and options; every refusal a 4xx ServiceError."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from galleria.service.engine import QuerySpec, ServiceConfig
from galleria.service.errors import ServiceError, bad_request
from galleria.service.limits import mib
from galleria.service.validation import check_item_id, loads

QUERY_KEYS = ("image_base64", "embedding", "embeddings", "id")


def parse_int(value: Any, name: str, lo: int, hi: int, default: int) -> int:
    """An integer option in ``[lo, hi]`` (from JSON or a form field)."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise bad_request(f"{name} must be an integer between {lo} and {hi}; got {value!r}",
                          "bad_option")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise bad_request(f"{name} must be an integer between {lo} and {hi}; got "
                              f"{value[:40]!r}", "bad_option") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise bad_request(f"{name} must be an integer; got {value!r}", "bad_option")
        value = int(value)
    if not isinstance(value, int):
        raise bad_request(f"{name} must be an integer; got {type(value).__name__}",
                          "bad_option")
    if not lo <= value <= hi:
        raise bad_request(f"{name} must be between {lo} and {hi}; got {value}", "out_of_range")
    return value


def parse_bool(value: Any, name: str) -> bool:
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                    "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise bad_request(f"{name} must be true or false; got {value!r}", "bad_option")


def parse_pipeline(value: Any) -> str | None:
    """A pipeline name; ``None`` (absent, empty or ``auto``): the gallery's default, as
    the CLI and the Python API choose it."""
    if value is None or value == "" or value == "auto":
        return None
    if not isinstance(value, str) or len(value) > 40:
        raise bad_request("pipeline must be a name such as 'global'", "bad_option")
    return value


def decode_base64(text: Any, limit: int) -> bytes:
    """The bytes of a base64 image (a ``data:`` URL prefix is allowed)."""
    if not isinstance(text, str) or not text:
        raise bad_request("image_base64 must be a non-empty base64 string", "bad_base64")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > limit * 4 // 3 + 8:
        raise ServiceError(413, "too_large", f"the image is larger than the upload limit of "
                           f"{mib(limit)} (galleria serve --max-upload-mb)")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"image_base64 is not valid base64 ({exc})", "bad_base64") from exc
    if not data:
        raise bad_request("image_base64 decodes to no bytes", "bad_base64")
    return data


def parse_json_body(body: bytes) -> dict[str, Any]:
    """A request's JSON object (bounded depth, no NaN: :func:`validation.loads`)."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object", "bad_json")
    obj = loads(body)
    if not isinstance(obj, dict):
        raise bad_request(f"the body must be a JSON object, not {type(obj).__name__}",
                          "bad_json")
    return obj


def query_from_json(obj: dict[str, Any], cfg: ServiceConfig) -> QuerySpec:
    """One query object: ``image_base64`` | ``embedding`` + ``model`` | ``embeddings``
    (``{model: vector}``) | ``id``."""
    if not isinstance(obj, dict):
        raise bad_request("each query must be a JSON object", "bad_query")
    given = [k for k in QUERY_KEYS if obj.get(k) is not None]
    if len(given) != 1:
        raise bad_request(
            f"give exactly one of {list(QUERY_KEYS)} (or upload a multipart 'image'); got "
            f"{given or 'none'}", "bad_query")
    key = given[0]
    if key == "image_base64":
        return QuerySpec(image=decode_base64(obj[key], cfg.max_upload_bytes), name="image")
    if key == "id":
        return QuerySpec(item_id=check_item_id(obj[key]))
    if key == "embedding":
        model = obj.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("an 'embedding' needs the 'model' fingerprint that made it "
                              "(GET /v1/info lists the gallery's)", "bad_query")
        return QuerySpec(embeddings={model: obj[key]})
    emb = obj[key]
    if not isinstance(emb, dict) or not emb or not all(isinstance(m, str) for m in emb):
        raise bad_request("'embeddings' must be an object {model fingerprint: vector}",
                          "bad_query")
    return QuerySpec(embeddings=dict(emb))


def search_options(src: dict[str, Any], cfg: ServiceConfig) -> dict[str, Any]:
    return {
        "k": parse_int(src.get("k"), "k", 1, cfg.max_k, 10),
        "offset": parse_int(src.get("offset"), "offset", 0, cfg.max_offset, 0),
        "pipeline": parse_pipeline(src.get("pipeline")),
        "return_query": parse_bool(src.get("return_query"), "return_query"),
    }
