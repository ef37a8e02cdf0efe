"""Request and response schemas of the HTTP API (for the OpenAPI document at ``/docs``).

Bodies are parsed by hand (service/requests.py: every refusal a JSON 4xx), so these
models document the API rather than validate it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Hit(BaseModel):
    id: str
    score: float = Field(description="the pipeline's raw score, on its own scale (cosine "
                                     "similarity for global); larger is better")
    probability: float | None = Field(
        None, description="calibrated probability (0..1) that the result shows the same object "
                          "or scene as the query, the same meaning for every pipeline; null "
                          "when the gallery was not tuned for the answering searcher")
    metadata: dict[str, Any] | None = None


class SearchResponse(BaseModel):
    results: list[Hit]
    model: str = Field(description="fingerprint of the model whose space answered (the new "
                                   "model during an upgrade)")
    generation: int | dict[str, int] = Field(
        description="the committed store generation the answer was computed at (per space "
                    "during an upgrade)")
    k: int
    offset: int
    searcher: str = Field(description="plain | backfill | pipeline | sharded")
    pipeline: str = Field(description="the pipeline that answered (global, local, ...)")
    reason: str = Field(description="why it answered: asked, tuned, gallery spaces, upgrade "
                                    "in progress, ...")
    merge: dict[str, Any] | None = Field(None, description="during an upgrade: the merge rule "
                                               "and calibration that combined both spaces")
    filter: dict[str, Any] | None = Field(None, description="the filter applied (JSON form)")
    calibrated: bool = Field(False, description="results carry match probabilities")


FILTER_DOC = ("payload filter, JSON form: {\"must\": [{\"key\": \"label\", \"match\": \"cat\"}, "
              "{\"key\": \"year\", \"range\": {\"gte\": 2010}}], \"should\": [...], "
              "\"must_not\": [...]}; conditions: match, any (a list), range (gt/gte/lt/lte: "
              "numbers or ISO dates), exists; or the shorthand {\"label\": \"cat\"}")
WHERE_DOC = ("compact filter expressions (all must hold): label=cat, label=cat,dog, "
             "label!=cat, year>=2010, year=2000..2010, taken<2021-05-01")


class ItemOut(BaseModel):
    id: str
    metadata: dict[str, Any]
    spaces: list[str]
    added: float
    content: str | None = None


class ItemPage(BaseModel):
    items: list[ItemOut]
    next_cursor: str | None = Field(description="pass as cursor for the next page; null at "
                                                "the end")
    count: int | None = Field(None, description="items matching (when asked: count=true)")


SCROLL_BODY = {"requestBody": {"content": {"application/json": {"schema": {
    "type": "object", "additionalProperties": False, "properties": {
        "filter": {"type": "object", "description": FILTER_DOC},
        "where": {"type": "array", "items": {"type": "string"}, "description": WHERE_DOC},
        "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
        "cursor": {"type": "string"}, "count": {"type": "boolean"},
        "space": {"type": "string"}}}}}}}
DEDUP_BODY = {"requestBody": {"content": {"application/json": {"schema": {
    "type": "object", "additionalProperties": False, "properties": {
        "k": {"type": "integer", "description": "neighbours examined per image"},
        "candidate": {"type": "number", "description": "cosine from which a pair is checked "
                                                        "with local features"},
        "threshold": {"type": "number", "description": "cosine from which a pair is a "
                                                        "near-duplicate without local features"},
        "sure": {"type": "number", "description": "cosine accepted without a check"},
        "min_inliers": {"type": "integer", "description": "homography inliers that confirm"},
        "verify": {"enum": ["auto", "always", "never"]},
        "linkage": {"enum": ["complete", "single"], "description": "complete: every pair "
                    "in a group is a near-duplicate; single: connected components"},
        "min_probability": {"type": "number", "minimum": 0, "maximum": 1,
                            "description": "threshold from the gallery's calibrated match "
                                           "probability (galleria tune)"}}}}}}}


class SearchJSON(BaseModel):
    image_base64: str | None = Field(None, description="an encoded image (JPEG, PNG...)")
    embedding: list[float] | None = Field(None, description="a query vector of `model`")
    model: str | None = Field(None, description="fingerprint of the model of `embedding`")
    embeddings: dict[str, list[float]] | None = Field(
        None, description="query vectors per model fingerprint (an upgrade merges two)")
    id: str | None = Field(None, description="search with an item of the gallery")
    k: int = Field(10, ge=1)
    offset: int = Field(0, ge=0)
    pipeline: str | None = Field(None, description="global, global+sv, local, local+mds; "
                                                   "default: the gallery's (as the CLI)")
    return_query: bool = False
    filter: dict[str, Any] | None = Field(None, description=FILTER_DOC)
    where: list[str] | str | None = Field(None, description=WHERE_DOC)
    min_score: float | None = Field(None, description="leave out results scoring below this "
                                                      "(the pipeline's raw score)")
    min_probability: float | None = Field(
        None, ge=0, le=1, description="leave out results whose calibrated match probability "
                                      "is below this (needs a tuned gallery)")

    model_config = {"extra": "forbid"}


class ErrorBody(BaseModel):
    error: str
    message: str
    status: int


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409, 413, 415, 422, 503)}


def _multipart_doc(fields: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    return {"multipart/form-data": {"schema": {"type": "object", "properties": fields,
                                               "required": required}}}


SEARCH_BODY = {"requestBody": {"content": {
    **_multipart_doc({"image": {"type": "string", "format": "binary"},
                      "id": {"type": "string"}, "k": {"type": "integer"},
                      "offset": {"type": "integer"}, "pipeline": {"type": "string"},
                      "where": {"type": "string", "description": WHERE_DOC},
                      "filter": {"type": "string", "description": "the JSON filter, as text"},
                      "min_score": {"type": "number"},
                      "min_probability": {"type": "number"}}, []),
    "application/json": {"schema": SearchJSON.model_json_schema()}}}}
BATCH_BODY = {"requestBody": {"content": {
    **_multipart_doc({"images": {"type": "array", "items": {"type": "string",
                                                             "format": "binary"}},
                      "k": {"type": "integer"}}, ["images"]),
    "application/json": {"schema": {"type": "object", "properties": {
        "queries": {"type": "array", "items": SearchJSON.model_json_schema()},
        "k": {"type": "integer"}, "offset": {"type": "integer"}}}}}}}
ITEM_BODY = {"requestBody": {"content": {
    **_multipart_doc({"image": {"type": "string", "format": "binary"},
                      "id": {"type": "string"}, "metadata": {"type": "string",
                                                             "description": "a JSON object"},
                      "replace": {"type": "boolean"}}, ["image", "id"]),
    "application/json": {"schema": {"type": "object", "properties": {
        "id": {"type": "string"}, "image_base64": {"type": "string"},
        "metadata": {"type": "object"}, "replace": {"type": "boolean"}},
        "required": ["id", "image_base64"]}}}}}
UPGRADE_BODY = {"requestBody": {"content": {"application/json": {"schema": {
    "type": "object", "required": ["action"], "properties": {
        "action": {"enum": ["start", "run", "cancel", "finish"]},
        "new_model": {"type": "string"}, "mode": {"enum": ["online", "shadow"]},
        "model_options": {"type": "object", "description": "e.g. {\"size\": 260}"},
        "order": {"enum": ["random", "id", "priority"]}, "seed": {"type": "integer"},
        "limit": {"type": "integer"}, "batch_size": {"type": "integer"},
        "commit_every": {"type": "integer"}, "force": {"type": "boolean"}}}}}}}


