"""The one decision: which searcher answers a request on a gallery in a given state.

:func:`choose` is pure: it reads a :class:`~galleria.store.state.GalleryState`
(one read of the store) and a :class:`SearchRequest` and returns a
:class:`SearchSpec`. The CLI, the Python API (:func:`galleria.open_searcher`),
the service and the Ray path all call it, so the same gallery and the same photo
get the same answer from every entry, during an upgrade too. A spec is hashable:
the service caches one searcher per spec, and a changed gallery state (an
upgrade started or finished, a new tuned default) gives a new spec.

The rules, in order:

1. ``space`` named: plain search of that space (``asked``).
2. ``pipeline`` named: that pipeline (``asked``); none named: the gallery's tuned
   default when it still fits the gallery's spaces (``tuned``), else
   :func:`default_pipeline` of the gallery's spaces (``gallery spaces``):
   ``hybrid`` (global and local candidates, spatially verified ones first) when the
   gallery holds a global and a local space, ``global`` or ``local`` when it holds
   only one kind. The default does not depend on pseudo-queries: near-copies of
   gallery images cannot tell a category or landmark gallery (where the global
   model wins) from an object gallery (where verified local matches win); the
   verified hybrid is measured within a few points of the best pipeline on both
   (benchmarks/results/local-hybrid.md).
3. ``global`` while an upgrade is in progress: the backfill searcher, which
   merges the old and the new space (``upgrade in progress``).
4. ``global`` on a gallery with local features only: ``local`` when the pipeline
   was not named, an error when it was.
5. ``global`` with shards available (a Ray pool) and no upgrade: sharded search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from galleria.errors import InputError
from galleria.search.pipelines import PIPELINES
from galleria.store.state import GalleryState
from galleria.upgrade.state import FINISHING_KEY, STATE_KEY, pending_space

TUNED_KEY = "tuned"
"""The gallery setting holding the tuned default (written by ``galleria tune``)."""
FUSION_KEY = "fusion"
"""The gallery setting holding a fused gallery's adaptation decision (written by
``galleria.fusion.adapt_job``: ``{answer, space, reason, ...}``)."""
TUNE_MODES = ("default", "select")
"""``rule.mode`` of a tuned record the decision follows: ``default`` (the spaces' default,
calibrated, maybe budgeted) or ``select`` (a vote among pipelines the user named). A
record without a mode was made by the former automatic pseudo-query vote, which chose
``local`` on landmark and category galleries: it no longer sets the pipeline."""
KINDS = ("plain", "backfill", "pipeline", "sharded")
NEEDS_GLOBAL = ("global", "global+sv", "hybrid")
"""Pipelines that search the gallery's global space (``hybrid``: global and local)."""


@dataclass(frozen=True)
class SearchRequest:
    """What a caller asks for; every field may be left to the gallery.

    Attributes:
        pipeline: ``global``, ``global+sv``, ``local``, ``local+mds``... (``None``:
            the gallery's default).
        space: plain search of this space, no decision (an expert option).
        rule: the backfill merge rule during an upgrade (``auto``: the job's best).
        sharded: the caller can search on shards (a Ray pool).
        params: pipeline parameters as sorted ``(name, value)`` pairs.
    """

    pipeline: str | None = None
    space: str | None = None
    rule: str = "auto"
    sharded: bool = False
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, pipeline: str | None = None, *, space: str | None = None, rule: str = "auto",
           sharded: bool = False, **params: Any) -> SearchRequest:
        if pipeline is not None and pipeline not in PIPELINES:
            raise InputError(f"unknown pipeline {pipeline!r}; known: {', '.join(PIPELINES)}")
        return cls(pipeline, space, rule, bool(sharded), tuple(sorted(params.items())))


@dataclass(frozen=True)
class SearchSpec:
    """What answers (the result of :func:`choose`; hashable, a cache key).

    Attributes:
        kind: ``plain`` | ``backfill`` | ``pipeline`` | ``sharded``.
        pipeline: the pipeline answering (``global`` for plain, backfill, sharded).
        space: the space searched (plain, sharded).
        rule: the backfill merge rule asked for (backfill).
        params: pipeline parameters (sorted pairs).
        reason: why: ``asked``, ``tuned``, ``gallery spaces``, ``upgrade in progress``,
            ``local features only``, ``shards``; on an adapted fused gallery searched
            in its recorded space, ``"<why>; fusion: <answer>: <the adaptation's reason>"``.
        state_key: the parts of the gallery state the decision read.
    """

    kind: str
    pipeline: str
    space: str | None = None
    rule: str = "auto"
    params: tuple[tuple[str, Any], ...] = ()
    reason: str = ""
    state_key: tuple[Any, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"searcher": self.kind, "pipeline": self.pipeline, "space": self.space,
                "rule": self.rule if self.kind == "backfill" else None,
                "params": dict(self.params), "reason": self.reason}


def _key(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def tuned_default(state: GalleryState) -> tuple[str, tuple[tuple[str, Any], ...]] | None:
    """``(pipeline, params)`` the gallery was tuned to, when it still fits its spaces."""
    rec = state.setting(TUNED_KEY)
    if not isinstance(rec, dict) or rec.get("pipeline") not in PIPELINES:
        return None
    rule = rec.get("rule")
    if not isinstance(rule, dict) or rule.get("mode") not in TUNE_MODES:
        return None  # a record of the old pseudo-query vote (no mode): the spaces decide
    name = str(rec["pipeline"])
    glob, loc = global_local(state)
    if (name in NEEDS_GLOBAL and glob is None) or (name != "global" and loc is None):
        return None
    params = rec.get("params") or {}
    if not isinstance(params, dict):
        return None
    return name, tuple(sorted(params.items()))


def default_pipeline(has_global: bool, has_local: bool) -> str:
    """The pipeline answering when none is named and no tuned record fits (rule 2)."""
    if has_global and has_local:
        return "hybrid"
    return "global" if has_global or not has_local else "local"


def global_local(state: GalleryState) -> tuple[str | None, str | None]:
    """``(primary global space with items, local space with the most items)``."""
    pending = pending_space(state.setting(STATE_KEY))  # a local space an upgrade fills
    local = [s for s in state.of_kind("local") if s.space != pending]
    loc = max(local, key=lambda s: s.count).space if local else None
    prim = state.space(state.primary)
    glob = prim.space if prim is not None and prim.kind == "global" and prim.count else None
    return glob, loc


def fusion_reason(state: GalleryState, space: str | None) -> str:
    """``"; fusion: fused|light: why"`` when ``space`` is the one a fused gallery's
    adaptation chose (the light model's own vectors or light query -> fused), else ``""``."""
    rec = state.setting(FUSION_KEY)
    if not isinstance(rec, dict) or space is None or rec.get("space") != space:
        return ""
    return f"; fusion: {rec.get('answer')}: {rec.get('reason')}"


def choose(state: GalleryState, request: SearchRequest) -> SearchSpec:
    """The searcher for ``request`` on a gallery in ``state`` (see the module docstring).

    Raises:
        InputError: the gallery is empty, the named space does not exist or holds
            local features, or the named pipeline needs spaces the gallery lacks.
    """
    upgrade = state.setting(STATE_KEY)
    glob, loc = global_local(state)
    key = (state.primary, _key(upgrade), _key(state.setting(FINISHING_KEY)),
           _key(state.setting(TUNED_KEY)), glob, loc, _key(state.setting(FUSION_KEY)))
    if request.space is not None:
        sp = state.space(request.space)
        if sp is None:
            raise InputError(f"gallery {state.path} has no space {request.space!r}; it has "
                             f"{[s.space for s in state.spaces]}")
        if sp.kind != "global":
            raise InputError(f"space {request.space!r} holds local features: search it with "
                             "pipeline local or local+mds")
        return SearchSpec("plain", "global", sp.space, reason="asked", state_key=key)
    if glob is None and loc is None and upgrade is None:
        raise InputError(f"gallery {state.path} has no items yet: index images first "
                         "(`galleria index`)")
    pipeline, params, reason = request.pipeline, request.params, "asked"
    if pipeline is None:
        tuned = tuned_default(state)
        if tuned is not None:
            pipeline, params = tuned
            params = tuple(sorted({**dict(params), **dict(request.params)}.items()))
            reason = "tuned"
        else:
            pipeline = default_pipeline(glob is not None, loc is not None)
            reason = "gallery spaces"
    if pipeline == "global" and glob is None and upgrade is None:
        if request.pipeline is not None:
            raise InputError(f"gallery {state.path} holds local features only: search it with "
                             "pipeline local or local+mds")
        pipeline, reason = "local", "local features only"
    if pipeline != "global":
        needs_global = pipeline in NEEDS_GLOBAL or dict(params).get("blend")
        if needs_global and glob is None:
            raise InputError(f"the {pipeline} pipeline needs a global model in the gallery; "
                             f"{state.path} has only local features (index it with --model "
                             "too, or use pipeline local)")
        if loc is None:
            raise InputError(f"the {pipeline} pipeline needs local features; {state.path} has "
                             "none (index it with --local sift)")
        return SearchSpec("pipeline", pipeline, None, params=params, reason=reason,
                          state_key=key)
    if upgrade is not None:
        return SearchSpec("backfill", "global", None, rule=request.rule,
                          reason="upgrade in progress", state_key=key)
    if request.sharded:
        return SearchSpec("sharded", "global", glob, reason="shards" + fusion_reason(state, glob),
                          state_key=key)
    return SearchSpec("plain", "global", glob, reason=reason + fusion_reason(state, glob),
                      state_key=key)
