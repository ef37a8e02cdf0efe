"""Parsing of request bodies into queries and options; every refusal a 4xx ServiceError."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from galleria.errors import InputError
from galleria.filters import Bool, parse_filter, parse_where
from galleria.service.engine import QuerySpec, ServiceConfig
from galleria.service.errors import ServiceError, bad_request
from galleria.service.limits import mib
from galleria.service.validation import check_item_id, loads

QUERY_KEYS = ("image_base64", "embedding", "embeddings", "id")
OPTION_KEYS = ("k", "offset", "pipeline", "return_query", "filter", "where", "min_score",
               "min_probability")
SEARCH_KEYS = frozenset((*QUERY_KEYS, "model", "image", *OPTION_KEYS))
"""Fields of a ``POST /v1/search`` body (JSON, multipart or query string)."""
BATCH_KEYS = frozenset(("queries", "images", "image", *OPTION_KEYS))
QUERY_OBJECT_KEYS = frozenset((*QUERY_KEYS, "model"))
ITEM_KEYS = frozenset(("id", "image", "image_base64", "filename", "metadata", "replace"))
UPGRADE_KEYS = frozenset(("action", "new_model", "model_options", "mode", "order", "seed",
                          "calib_size", "limit", "batch_size", "commit_every", "retry_failed",
                          "force"))
SCROLL_KEYS = frozenset(("filter", "where", "limit", "cursor", "count", "space"))
DEDUP_KEYS = frozenset(("k", "candidate", "threshold", "sure", "min_inliers", "verify",
                        "linkage", "min_probability"))


def check_fields(given: Any, allowed: frozenset[str], what: str) -> None:
    """400 for a field the endpoint does not know (a typo must not be silently ignored)."""
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise bad_request(f"{what}: unknown field(s) {unknown}; known: {sorted(allowed)}",
                          "unknown_field")


def parse_filter_fields(src: dict[str, Any]) -> Any:
    """The payload filter of a request: ``filter`` (the JSON form: an object, or its text in
    a form field) and/or ``where`` (compact expressions: a string or a list); ``None``
    when neither is given. 400 with the parser's message when it is malformed."""

    parts = []
    try:
        f = src.get("filter")
        if f not in (None, "", {}):
            parts.append(parse_filter(f))
        w = src.get("where")
        if w not in (None, "", []):
            if isinstance(w, str):
                w = [w]
            if not isinstance(w, list) or not all(isinstance(x, str) for x in w):
                raise InputError("'where' must be a string or a list of strings "
                                 "(compact filter expressions)")
            parts.append(parse_where(w))
    except InputError as exc:
        raise bad_request(str(exc), "bad_filter") from exc
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else Bool(must=tuple(parts))


def parse_score(value: Any, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise bad_request(f"{name} must be a number; got {value!r}", "bad_option") from None
    if isinstance(value, bool) or not -1.0 <= x <= 1.0:
        raise bad_request(f"{name} must be a cosine similarity between -1 and 1; got {value!r}",
                          "out_of_range")
    return x


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
        "where": parse_filter_fields(src),
        "min_score": parse_score(src.get("min_score"), "min_score"),
        "min_probability": parse_score(src.get("min_probability"), "min_probability"),
    }
