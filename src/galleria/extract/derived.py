"""Derived spaces: vectors that are a fixed function of another space's stored vectors.

A space whose info records ``"derived_from": <base space>`` holds, for every item of the
base space, ``extractor.derive(base vectors)`` where ``extractor`` is rebuilt from the
space's ``config`` (for example a fused space whitened on its own gallery,
:mod:`galleria.fusion.adapt_job`: one matrix product per batch). Indexing
(:func:`galleria.extract.job.index_images`) and uploads (the service) never run a model for
it: they fill it from the base vectors they have just committed (:func:`derive_into`), so an
added item is searchable in the derived space as soon as it is in the base space.

A commit of base vectors drops the items' rows in the live derived spaces in the same
transaction (:func:`live_derived`): a kill before the derived fill leaves them missing there,
never stale; :func:`derive_missing` (run at the start of every index run and service start)
fills what is missing.

A space whose info records ``"retired": true`` (a derived space replaced by a refit) is kept
for searchers opened before the replacement and no longer filled.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from galleria.errors import GalleriaError, InputError
from galleria.extract.spaces import extractor_from_space
from galleria.types import MISSING_KEY
from galleria.validate import l2_normalize

log = logging.getLogger(__name__)
CHUNK = 4096


def is_derived(info: dict[str, Any]) -> bool:
    """True for a space filled from another one (or retired): no model embeds into it."""
    return bool(info.get("derived_from")) or bool(info.get("retired"))


class Derivers:
    """The derive functions of a gallery's live derived spaces, rebuilt once per run
    (``build(info)``: how to rebuild a space's extractor; default
    :func:`~galleria.extract.spaces.extractor_from_space`, e.g. the service's model cache)."""

    def __init__(self, root: str | os.PathLike[str], *, runtime: str = "auto",
                 threads: int | None = None, build: Callable[[dict[str, Any]], Any] | None = None
                 ) -> None:
        self.root, self.runtime, self.threads = str(root), runtime, threads
        self._build = build
        self._built: dict[str, Any] = {}
        self._lock = threading.Lock()  # two uploads at once build a space's deriver once

    def of(self, gallery: Any, base: str) -> list[tuple[str, Any]]:
        """``[(derived space, extractor with .derive)]`` of ``base`` (not retired)."""
        out = []
        for s in gallery.spaces():
            if s.info.get("derived_from") != base or s.info.get("retired"):
                continue
            with self._lock:
                if s.space not in self._built:
                    self._built[s.space] = (self._build(s.info) if self._build is not None else
                                            extractor_from_space(s.info, root=self.root,
                                                                 runtime=self.runtime,
                                                                 threads=self.threads))
                out.append((s.space, self._built[s.space]))
        return out


def live_derived(gallery: Any, base: str) -> list[str]:
    """The live (not retired) derived spaces of ``base``: a commit that writes an item's new
    ``base`` vector drops the item's rows there in the same transaction (``drop_spaces``), so a
    kill before :func:`derive_into` leaves the item missing there (repaired by
    :func:`derive_missing`), never answered with the vector of its previous image."""
    return [s.space for s in gallery.spaces()
            if s.info.get("derived_from") == base and not s.info.get("retired")]


def derive_into(gallery: Any, base: str, ids: Sequence[str], vectors: np.ndarray,
                derivers: Derivers) -> int:
    """Give ``ids`` (just committed to ``base`` with ``(N, d)`` ``vectors``) their vectors in
    every live derived space of ``base``; how many (item, space) rows were written."""
    if not len(ids):
        return 0
    n = 0
    x = l2_normalize(np.asarray(vectors, np.float32))
    for space, ext in derivers.of(gallery, base):
        gallery.add(list(ids), ext.derive(x), space=space, replace=True, only_if_in=base)
        n += len(ids)
    return n


def derive_missing(gallery: Any, derivers: Derivers) -> int:
    """Give every item of each live derived space's base the derived vector it lacks (from the
    base's stored vectors, :func:`fill_missing`); how many rows were written."""
    n = 0
    for s in gallery.spaces():
        base = s.info.get("derived_from")
        if not base or s.info.get("retired") or not gallery.has_space(base):
            continue
        ids = gallery.ids(base)
        todo = [i for i, h in zip(ids, gallery.has(ids, s.space), strict=True) if not h]
        for space, ext in (derivers.of(gallery, base) if todo else []):
            if space == s.space:
                n += fill_missing(gallery, base, space, todo, lambda x, e=ext: e.derive(
                    l2_normalize(np.asarray(x, np.float32))))
    return n


def fill_missing(gallery: Any, base: str, space: str, ids: Sequence[str],
                 derive: Callable[[np.ndarray], np.ndarray], *, rounds: int = 4) -> int:
    """Write ``derive((N, d) base vectors)`` into ``space`` for those of ``ids`` lacking a row
    there, safe against a concurrent add that replaces an item (its base vector, then its
    derived one): a row present at commit time is never overwritten (skip-if-present: the
    add filled it from its own vector), and an item whose base vector changed between this
    read and this write is derived again from the new one (``rounds`` bounds the retries
    against a stream of replacements); how many rows were written."""
    n, done = 0, True
    for _ in range(rounds):
        done = True
        for at in range(0, len(ids), CHUNK):
            chunk = list(ids[at:at + CHUNK])
            chunk = [i for i, h, b in zip(chunk, gallery.has(chunk, space),
                                          gallery.has(chunk, base), strict=True) if b and not h]
            if not chunk:
                continue
            try:
                x = np.asarray(gallery.get_vectors(gallery.keys_of(chunk), space=base))
                got = gallery.add(chunk, derive(x), space=space, only_if_in=base)
            except (InputError, GalleriaError) as exc:  # filled or removed meanwhile: again
                log.debug("derived fill of %s retried: %s", space, exc)
                done = False
                continue
            n += int((np.asarray(got) != MISSING_KEY).sum())
            n += _rederive_changed(gallery, base, space, chunk, x, derive, rounds)
        if done:
            break
    if not done:
        log.warning("derived space %s: some items still lack a vector after %d rounds (added, "
                    "replaced or removed meanwhile); the next index run or start fills them",
                    space, rounds)
    return n


def _rederive_changed(gallery: Any, base: str, space: str, ids: list[str], x: np.ndarray,
                      derive: Callable[[np.ndarray], np.ndarray], rounds: int) -> int:
    """Derive again the items of ``ids`` whose base vector is no longer ``x`` (replaced
    between the read and the derived write); how many rows were rewritten."""
    n = 0
    for _ in range(rounds):
        alive = [j for j, b in enumerate(gallery.has(ids, base)) if b]
        if not alive:
            return n
        try:
            now = np.asarray(gallery.get_vectors(gallery.keys_of([ids[j] for j in alive]),
                                                 space=base))
        except GalleriaError:  # removed meanwhile: read again
            continue
        changed = [j for k, j in enumerate(alive) if not np.array_equal(now[k], x[j])]
        if not changed:
            return n
        new = now[[alive.index(j) for j in changed]]
        gallery.add([ids[j] for j in changed], derive(new), space=space, replace=True,
                    only_if_in=base)
        x = x.copy()
        x[changed] = new
        n += len(changed)
    return n
