"""The one searcher contract every search path implements.

Plain search of one space (:class:`~galleria.search.searcher.PlainSearcher`, also
a fused gallery searched with its light query model), the backfill searcher of
an upgrade (:class:`~galleria.upgrade.search.BackfillSearcher`), the local
pipelines (:class:`~galleria.search.gallery_pipeline.PipelineSearcher`) and the
sharded Ray searcher (:class:`~galleria.distributed.ray_search.ShardedSearcher`)
are all a :class:`Searcher`::

    q, good, failures = searcher.embed_paths(paths)      # Queries: {space: data}
    result = searcher.search(q, k=10)                     # SearchResult, string ids
    result = searcher.search(q, k=10, options=SearchOptions(qe=2))   # or qe=2
    searcher.spaces        # the query spaces search() needs, in order
    searcher.models        # {space: query model}: what embed_* runs (shareable)
    searcher.describe()    # what answers, for reports and the service's JSON

An option a searcher does not support is an :class:`~galleria.errors.InputError`
naming the searcher and the options it does support: never silently dropped.
Which searcher answers is decided in one place, :func:`galleria.decision.choose`;
:func:`galleria.decision.open_searcher` builds it.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from galleria.errors import CompatibilityError, InputError
from galleria.extract.queries import Queries, QueryFailure, embed_with
from galleria.extractors.base import Extractor
from galleria.index.base import check_k
from galleria.types import SearchResult


@dataclass(frozen=True)
class SearchOptions:
    """Per-search options (each honoured by the searchers that list it in ``supports``).

    Attributes:
        qe: alpha query expansion over the top ``qe`` results (0: off).
        qe_alpha: the expansion's exponent.
        dim: adaptive-size search at this prefix size (a ``prefix`` index).
        funnel: ``(shortlist_dim, shortlist)``: small-prefix shortlist, full re-score.
        where: a payload filter (any form :func:`galleria.filters.as_filter` takes):
            only items satisfying it (exact; see galleria.store.filtered).
        min_score: drop results scoring below this (every searcher honours it).
    """

    qe: int = 0
    qe_alpha: float = 3.0
    dim: int | None = None
    funnel: tuple[int, int] | None = None
    where: Any = None
    min_score: float | None = None

    def given(self) -> list[str]:
        """The options set to something other than their default."""
        return [f.name for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]

    @classmethod
    def of(cls, options: SearchOptions | None = None, **kw: Any) -> SearchOptions:
        """``options`` with keyword overrides; an unknown keyword is an InputError."""
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(kw) - known)
        if bad:
            raise InputError(f"unknown search options {bad}; known: {sorted(known)}")
        base = options or cls()
        return dataclasses.replace(base, **kw) if kw else base


EVERY_SEARCHER = frozenset({"min_score"})
"""Options :meth:`Searcher.search` applies itself, for every kind of searcher."""


def at_least(result: SearchResult, min_score: float | None) -> SearchResult:
    """``result`` without the entries scoring below ``min_score`` (padded as missing)."""
    if min_score is None:
        return result
    low = result.scores < float(min_score)
    if not low.any():
        return result
    order = np.argsort(low, axis=1, kind="stable")  # kept entries first, in rank order
    low = np.take_along_axis(low, order, 1)
    scores = np.where(low, -np.inf, np.take_along_axis(result.scores, order, 1))
    ids = np.take_along_axis(result.ids, order, 1)
    ids = np.where(low, None if ids.dtype == object else -1, ids)
    return SearchResult(scores.astype(np.float32), ids, result.generation)


class Searcher(ABC):
    """The searcher contract (see the module docstring).

    Subclasses set :attr:`gallery`, :attr:`spaces` and :attr:`models`, list the
    options they honour in :attr:`supports` and implement :meth:`_search`
    (``queries`` already checked to hold every space of :attr:`spaces`, ``k`` a
    positive int, ``options`` only supported ones).
    """

    kind: ClassVar[str] = "searcher"
    """``plain`` | ``backfill`` | ``pipeline`` | ``sharded``."""
    supports: ClassVar[frozenset[str]] = frozenset()
    """Names of the :class:`SearchOptions` fields this searcher honours."""

    gallery: Any
    spaces: list[str]
    models: dict[str, Extractor]
    spec: Any = None
    """The :class:`~galleria.decision.SearchSpec` it was opened for (when opened by one)."""

    # ------------------------------------------------------------- search
    def search(self, queries: Any, k: int = 10, options: SearchOptions | None = None,
               **kw: Any) -> SearchResult:
        """Top-``k`` string ids (``None`` padding) for ``queries``.

        Args:
            queries: a :class:`Queries` / ``{space: data}`` mapping holding every
                space of :attr:`spaces`, or one ``(Q, D)`` array when there is one.
            k: results per query (clamped to the gallery's size).
            options: :class:`SearchOptions`; keywords (``qe=2``) override its fields.
        """
        opts = self.check_options(options, **kw)
        k = check_k(k)
        q = Queries.of(queries, self.spaces[0] if len(self.spaces) == 1 else None)
        missing = [s for s in self.spaces if s not in q]
        if missing:
            raise CompatibilityError(f"this search needs query data of {missing}; got "
                                     f"{list(q.data)}")
        return at_least(self._search(q, k, opts), opts.min_score)

    def check_options(self, options: SearchOptions | None = None, **kw: Any) -> SearchOptions:
        """``options`` (with keyword overrides) if this searcher honours them all, else an
        InputError naming the unsupported ones and the supported ones."""
        opts = SearchOptions.of(options, **kw)
        unsupported = [o for o in opts.given() if o not in self.supports | EVERY_SEARCHER]
        if unsupported:
            ok = ", ".join(sorted(self.supports)) or "none"
            d = self.describe()
            raise InputError(f"the {d['searcher']} searcher ({d['pipeline']}) does not support "
                             f"the options {unsupported} (it supports: {ok}); they need plain "
                             "search of one space (not a local pipeline, not during an upgrade)")
        return opts

    @abstractmethod
    def _search(self, queries: Queries, k: int, options: SearchOptions) -> SearchResult:
        """The search itself (arguments checked by :meth:`search`)."""

    # -------------------------------------------------------------- embed
    def embed_images(self, images: Sequence[Image.Image]) -> Queries:
        """Query data of :attr:`spaces` for decoded images (one entry per image)."""
        return Queries({s: self.model(s).embed_images(list(images)) for s in self.spaces})

    def embed_paths(self, paths: Sequence[str | os.PathLike[str]], *, batch_size: int = 16,
                    workers: int = 2) -> tuple[Queries, list[int], list[QueryFailure]]:
        """Embed query files -> ``(queries, positions of the usable files, failures)``."""
        return embed_with({s: self.model(s) for s in self.spaces}, paths,
                          batch_size=batch_size, workers=workers)

    def search_paths(self, paths: Sequence[str | os.PathLike[str]], k: int = 10,
                     options: SearchOptions | None = None, **kw: Any
                     ) -> tuple[list[str], SearchResult | None, list[QueryFailure]]:
        """Search with image files -> (paths of usable queries, result rows, failures)."""
        options = self.check_options(options, **kw)  # before the (slow) embedding
        q, good, fails = self.embed_paths(paths)
        if not good:
            return [], None, fails
        return [str(paths[n]) for n in good], self.search(q, k, options), fails

    def model(self, space: str) -> Extractor:
        """The query model of ``space`` (an InputError when opened without models)."""
        ext = self.models.get(space)
        if ext is None:
            raise InputError(f"this searcher has no query model for {space!r} (opened "
                             "without models): search with query vectors")
        return ext

    def close(self) -> None:
        """Release what the searcher holds beyond memory (shards); a no-op for most."""
        return None

    def use_models(self, adopt: Callable[[Extractor], Extractor]) -> None:
        """Replace each query model by ``adopt(model)`` (a server shares one instance per
        fingerprint this way)."""
        self.models = {s: adopt(m) for s, m in self.models.items()}

    # ------------------------------------------------------------ reports
    def read_spaces(self) -> list[str]:
        """The gallery spaces a search reads (whose views a server keeps fresh)."""
        return list(self.spaces)

    def describe(self) -> dict[str, Any]:
        """What answers: ``{searcher, pipeline, model, spaces, reason...}``."""
        spec = self.spec
        return {"searcher": self.kind,
                "pipeline": getattr(spec, "pipeline", None),
                "model": self.spaces[0] if self.spaces else None,
                "spaces": list(self.spaces),
                "reason": getattr(spec, "reason", None)}
