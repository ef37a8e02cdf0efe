"""Adapt a fused gallery to its own images, with no labels: the step after ``index --fusion``.

:func:`adapt_gallery` (what ``galleria index --fusion`` runs after indexing, and
``galleria fusion adapt G``):

1. **Light vectors.** Every item of the fused space gets the light model's own
   vector (trunk, head, GeM; :class:`~galleria.fusion.extractor.FusionLightExtractor`)
   in the gallery's *light space* ``<fusion fp>|light@...`` (one cheap pass over
   the stored image paths; committed in batches, items already there skipped).
2. **Views.** A seeded sample of items (``view_items``) gets ``views`` phone-like
   views each (:func:`galleria.images.pseudo.make_views`), embedded by the light
   model and cached in ``<gallery>/fusion/adapt-work/`` (parts written atomically,
   keyed by item id: a rerun and a grown gallery reuse them).
3. **Fit** (:func:`galleria.fusion.adapt.fit_adaptation`): the query map, chosen on
   pseudo-queries of held-out items, and which space answers
   (:func:`galleria.fusion.adapt.select`): fused (in domain), the fused space whitened on
   the gallery (homogeneous gallery) or the light model's own vectors.
4. **Commit.** The map is saved as ``<gallery>/fusion/adapt/<digest>/``
   (:class:`~galleria.fusion.adaptation.QueryAdaptation`); the fused space's
   ``query_config`` names it (path + digest, checked on load); the gallery setting
   ``fusion`` records the decision (:data:`FUSION_KEY`, :func:`fusion_state`); the
   primary space becomes the space that answers: the light space, the fused
   space, or the gallery-whitened space ``<fused fp>|whitened@<digest>`` (its transform
   and its query map saved as two more such artifacts, its vectors computed from the
   stored fused vectors and brought up to date by every later run).

Refit: a later run refits when the fused space holds ``refit_growth`` times the
items the fit saw (automatic after every ``index --fusion``), or when asked
(``refit=True``); otherwise it only brings the light space up to date. With fewer
than ``min_items`` items nothing is fitted: the trained query answers.

Resumable and kill -9 safe: light vectors are committed in batches, view parts
and the map are written atomically, the setting last; every step is a function
of the stored data and the seed, so a rerun after a kill ends with the same fit
(``tests/test_fusion_adapt.py``). One adaptation per gallery at a time (a file
lock: a second one waits, then finds the work done). A searcher opened before a
commit keeps its query model and space (the trained query still lands in the
fused space); one opened after it uses the new ones.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import CompatibilityError, GalleriaError, InputError
from galleria.extract.derived import fill_missing
from galleria.extract.embed import embed_stream
from galleria.extract.spaces import space_info
from galleria.extractors.registry import extractor_from_config, resolve_path
from galleria.fingerprint import digest
from galleria.fusion.adapt import AdaptConfig, Fit, FitData, fit_adaptation, normalize, sample_rows
from galleria.fusion.adaptation import QueryAdaptation
from galleria.fusion.extractor import FusionLightExtractor, light_fingerprint, whitened_fingerprint
from galleria.fusion.model import FusionModel
from galleria.images.decode import load_image
from galleria.images.sources import SourceItem
from galleria.io.atomic import NPY_HEADER_LOCK, atomic_open
from galleria.store.gallery import Gallery
from galleria.types import MISSING_KEY

log = logging.getLogger(__name__)

FUSION_KEY = "fusion"
"""The gallery setting holding the adaptation's decision (see :func:`fusion_state`)."""
WORK_DIR = "fusion/adapt-work"
ADAPT_DIR = "fusion/adapt"
COMMIT_EVERY = 64  # items per light-vector commit and per cached view part


@dataclass(frozen=True)
class FusedSpaces:
    """The spaces of a fused gallery: the fused one, its model folder, the light one."""

    fused: str
    model_path: str  # as recorded (relative to the gallery folder)
    light: str


def fused_spaces(gallery: Any) -> FusedSpaces | None:
    """The fused space of ``gallery`` (the one whose config is a ``fusion-gallery``, not
    its gallery-whitened copy), or None. More than one is refused (adapt each by name: not
    supported yet)."""
    found = [s for s in gallery.spaces()
             if (s.info.get("config") or {}).get("type") == "fusion-gallery"
             and "whitening" not in s.info["config"]]  # not a gallery-whitened copy
    if not found:
        return None
    if len(found) > 1:
        raise InputError(f"gallery {gallery.path} has {len(found)} fused spaces; adaptation "
                         "handles one")
    s = found[0]
    return FusedSpaces(s.space, str(s.info["config"]["model"]), light_fingerprint(s.space))


def fusion_state(gallery: Any) -> dict[str, Any] | None:
    """The recorded decision (``None`` on a gallery never adapted)::

        {"fused_space", "light_space", "answer": "fused" | "light" | "whitened", "space":
         the one that answers, "reason", "adaptation": {"digest", "path"} | None,
         "whitening": {"space", "path", "digest", "query"} | None (the gallery-whitened
         fused space), "domain": {"fused_mean", "light_mean", "ratio"}, "n_items": items the
         fit saw, "refit_at": fused-space size that triggers the next fit,
         "scores": {"chosen", "trained", "light", "candidates"}, "cosine", "config",
         "fitted_at", "seconds"}

    ``answer``/``space``/``reason`` say which space answers a search and why; the primary
    space is set to match.
    """
    rec = gallery.get_setting(FUSION_KEY)
    return rec if isinstance(rec, dict) else None


# --------------------------------------------------------------------------- helpers
def _items(gallery: Any, ids: Sequence[str]) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """SourceItems of ``ids`` from their stored paths (and crop boxes); the unusable ones."""
    items, bad = [], []
    for i, m in zip(ids, gallery.meta(list(ids)), strict=True):
        path = (m or {}).get("path")
        if not path:
            bad.append((i, "no stored image path"))
            continue
        bbox = m.get("bbox")
        items.append(SourceItem(id=i, path=Path(path),
                                bbox=tuple(bbox) if bbox else None))  # type: ignore[arg-type]
    return items, bad


def _embed(ext: Any, items: Sequence[SourceItem], batch_size: int, workers: int,
           progress: Any) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    ids, vecs, fails = [], [], []
    for b in embed_stream(items, ext, batch_size=batch_size, workers=workers, progress=progress):
        ids.extend(it.id for it in b.items)
        if len(b.items):
            vecs.append(b.vectors)
        fails.extend((it.id, why) for it, why in b.failures)
    out = np.concatenate(vecs) if vecs else np.zeros((0, ext.dim), np.float32)
    return ids, out, fails


def sync_light(gallery: Any, spaces: FusedSpaces, light: FusionLightExtractor, *,
               updated: Sequence[str] = (), batch_size: int = 32, workers: int = 2,
               flush_every: int = COMMIT_EVERY, progress: Any = None) -> dict[str, Any]:
    """Give every item of the fused space its light vector (``updated``: re-embed these)."""
    gallery.register_space(spaces.light, light.dim, space_info(light))
    ids = gallery.ids(spaces.fused)
    have = gallery.has(ids, spaces.light)
    redo = set(updated)
    todo = [i for i, h in zip(ids, have, strict=True) if not h or i in redo]
    items, bad = _items(gallery, todo)
    if progress is not None:
        progress.update(len(ids) - len(todo))
    done = 0
    for s in range(0, len(items), flush_every):
        chunk = items[s:s + flush_every]
        before = gallery.contents([it.id for it in chunk])
        got, vecs, fails = _embed(light, chunk, batch_size, workers, progress)
        bad.extend(fails)
        if got:
            done += _write_light(gallery, spaces, got, vecs, before, redo)
    for i, why in bad[:5]:
        log.warning("no light vector for %s: %s", i, why)
    return {"light_embedded": done, "light_missing": len(bad),
            "light_missing_ids": [i for i, _ in bad[:20]]}


def _write_light(gallery: Any, spaces: FusedSpaces, ids: list[str], vecs: np.ndarray,
                 before: dict[str, Any], redo: set[str]) -> int:
    """Commit light vectors embedded from the images ``before`` recorded, never over a
    replacement made meanwhile: an item whose image changed since is left to the add that
    changed it (it embeds its own light vector); one that got a light vector meanwhile is
    skipped unless asked to be re-embedded (``redo``); how many written."""
    now = gallery.contents(ids)
    same = [n for n, i in enumerate(ids) if now.get(i) == before.get(i)]
    n_out = 0
    for replace in (True, False):  # the re-embedded items, then the ones lacking a vector
        part = [n for n in same if (ids[n] in redo) == replace]
        for _ in range(3):
            if not replace:
                have = gallery.has([ids[n] for n in part], spaces.light)
                part = [n for n, h in zip(part, have, strict=True) if not h]
            if not part:
                break
            try:
                got = gallery.add([ids[n] for n in part], vecs[part], space=spaces.light,
                                  replace=replace, only_if_in=spaces.fused)
            except InputError:  # an add gave one of them its light vector meanwhile
                continue
            n_out += int((np.asarray(got) != MISSING_KEY).sum())
            break
    return n_out


class ViewCache:
    """Light vectors of phone-like views, by item id, under ``folder`` (one ``.npz`` part
    per batch of items, written atomically; parts only ever added)."""

    def __init__(self, folder: Path, key: str, n_views: int) -> None:
        self.root = folder / f"views-{key}"
        self.n_views = n_views

    def load(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if not self.root.is_dir():
            return out
        for f in sorted(self.root.glob("part-*.npz")):
            with NPY_HEADER_LOCK, np.load(f, allow_pickle=False) as z:  # see the lock
                for i, v in zip(z["ids"].tolist(), z["views"], strict=True):
                    out[str(i)] = v
        return out

    def add(self, ids: Sequence[str], views: np.ndarray) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        f = self.root / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.npz"
        with atomic_open(f, "wb") as fh:
            np.savez(fh, ids=np.asarray(list(ids), dtype=str),
                     views=np.asarray(views, np.float32))


def view_features(light: Any, items: Sequence[SourceItem], cfg: AdaptConfig, folder: Path, *,
                  part: int = COMMIT_EVERY, progress: Any = None
                  ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """``({id: (views, D)}, unreadable)``: light vectors of ``cfg.views`` phone-like views
    of each item (:func:`galleria.images.pseudo.make_views`), cached under ``folder`` by
    item id, light model, seed and augmentation."""
    from galleria.images.pseudo import PSEUDO_AUGMENT, make_views  # lazy: PIL

    key = digest("fusion-adapt-views", light.fingerprint, cfg.seed, cfg.views,
                 PSEUDO_AUGMENT.to_dict())
    cache = ViewCache(folder, key, cfg.views)
    have = cache.load()
    todo = [it for it in items if it.id not in have]
    if progress is not None:
        progress.update(len(items) - len(todo))
    bad: list[tuple[str, str]] = []
    for s in range(0, len(todo), part):
        chunk = todo[s:s + part]
        pairs = []
        for it in chunk:
            try:
                pairs.append((it.id, load_image(it.path, bbox=it.bbox)))
            except (GalleriaError, OSError) as exc:
                bad.append((it.id, str(exc)))
        if pairs:
            pq = make_views(pairs, seed=cfg.seed, views=cfg.views, augment=PSEUDO_AUGMENT)
            x = light.embed_images(pq.images)  # view-major: view v of item j at v * n + j
            v = x.reshape(cfg.views, len(pairs), -1).transpose(1, 0, 2)
            cache.add([i for i, _ in pairs], v)
            have.update({i: v[j] for j, (i, _) in enumerate(pairs)})
        if progress is not None:
            progress.update(len(chunk))
    if bad:
        log.warning("%d sampled items have no readable image for views (first: %s)",
                    len(bad), bad[0])
    return {it.id: have[it.id] for it in items if it.id in have}, bad


def trained_map(model: FusionModel) -> tuple[np.ndarray, np.ndarray] | None:
    """The trained query's whitening layer as ``(W0 (D, d), b0 (d,))`` on L2-normalised
    light vectors, or None when its input is not normalised (``query_norm`` off)."""
    if not model.tail.normalize:
        return None
    w = model.tail.whiten.weight.detach().double().numpy().T
    return w, model.tail.whiten.bias.detach().double().numpy()


# --------------------------------------------------------------------------- the step
def adapt_gallery(gallery: Any, *, config: AdaptConfig | None = None, refit: bool = False,
                  updated: Sequence[str] = (), runtime: str = "auto",
                  threads: int | None = None, batch_size: int = 32, workers: int = 2,
                  commit_every: int = COMMIT_EVERY,
                  progress: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Bring a fused gallery's light space up to date and (re)fit its query adaptation
    when it is due (see the module docstring). ``gallery``: a writable
    :class:`~galleria.store.gallery.Gallery` or its path.

    Args:
        config: the adaptation's parameters (default :class:`AdaptConfig`; a gallery
            adapted before keeps the recorded ones unless given).
        refit: fit now even when the growth threshold is not reached.
        updated: ids whose image changed (their light vectors are recomputed).
        commit_every: items per light-vector commit and per cached view part (what a kill
            loses at most).
        progress: tqdm-like factory ``progress(total=, desc=, unit=)``.

    Returns:
        a JSON-able report (what was done, the decision, seconds per step).
    """

    own = not hasattr(gallery, "spaces")
    g = Gallery.open(gallery) if own else gallery
    try:
        with _adapt_lock(Path(g.path)):
            return _adapt(g, config, refit, updated, runtime, threads, batch_size, workers,
                          commit_every, progress)
    finally:
        if own:
            g.close()


@contextlib.contextmanager
def _adapt_lock(root: Path) -> Iterator[None]:
    """One adaptation of a gallery at a time: a second one waits for the first (and then
    finds its work done); the lock dies with its process."""
    import fcntl  # lazy: posix

    folder = root / WORK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield


def _bar(progress: Callable[..., Any] | None, total: int, desc: str) -> Any:
    return progress(total=total, desc=desc, unit="img") if progress else None


def _adapt(g: Any, config: AdaptConfig | None, refit: bool, updated: Sequence[str],
           runtime: str, threads: int | None, batch_size: int, workers: int,
           commit_every: int, progress: Callable[..., Any] | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    spaces = fused_spaces(g)
    if spaces is None:
        raise InputError(f"gallery {g.path} has no fused space (index it with --fusion)")
    rec = fusion_state(g) or {}
    cfg = config or (AdaptConfig.from_dict(rec["config"]) if rec.get("config")
                     else AdaptConfig())
    model = FusionModel.load(resolve_path(spaces.model_path, str(g.path)),
                             fingerprint=spaces.fused)
    light = extractor_from_config({"type": "fusion-query", "model": spaces.model_path,
                                   "output": "light"}, root=str(g.path), runtime=runtime,
                                  threads=threads, fingerprint=spaces.light)
    report: dict[str, Any] = {"gallery": str(g.path), "fused_space": spaces.fused,
                              "light_space": spaces.light}
    bar = _bar(progress, g.count(spaces.fused), "light vectors")
    try:
        report.update(sync_light(g, spaces, light, updated=updated, batch_size=batch_size,
                                 workers=workers, flush_every=commit_every, progress=bar))
    finally:
        if bar is not None:
            bar.close()
    report["light_seconds"] = round(time.perf_counter() - t0, 2)
    n = g.count(spaces.fused)
    due, why = _due(g, rec, n, cfg, refit)
    report["fit"] = why
    report["whitened_added"] = sync_whitened(g, spaces, rec)
    if not due:
        if not rec.get("adaptation"):
            _commit_unfitted(g, spaces, n, cfg, why)
        elif rec.get("config") != cfg.to_dict():  # a config given: later runs use it
            g.set_setting(FUSION_KEY, {**rec, "config": cfg.to_dict(), "refit_at": int(
                np.ceil(rec["n_items"] * cfg.refit_growth))})
        report.update({"answer": (fusion_state(g) or {}).get("answer", "fused"),
                       "seconds": round(time.perf_counter() - t0, 2)})
        return report
    t1 = time.perf_counter()
    ids = g.ids(spaces.fused)
    ids = [i for i, h in zip(ids, g.has(ids, spaces.light), strict=True) if h]
    keys = g.keys_of(ids)
    x = np.asarray(g.get_vectors(keys, space=spaces.light), np.float64)
    gv = np.asarray(g.get_vectors(keys, space=spaces.fused), np.float64)
    sample = sample_rows(ids, cfg.view_items, cfg.seed)
    bar = _bar(progress, len(sample), "query views")
    try:
        items, _ = _items(g, [ids[r] for r in sample])
        vf, _ = view_features(light, items, cfg, Path(g.path) / WORK_DIR, part=commit_every,
                              progress=bar)
    finally:
        if bar is not None:
            bar.close()
    report["views_seconds"] = round(time.perf_counter() - t1, 2)
    fit = fit_rows(model, ids, gv, x, vf, cfg)
    t2 = time.perf_counter()
    report["fit_seconds"] = round(t2 - t1 - report["views_seconds"], 2)
    _commit(g, spaces, model, fit, n, cfg, time.perf_counter() - t0)
    report.update({"answer": fit.answer, "space": (fusion_state(g) or {}).get("space"),
                   "reason": fit.reason, "fit_info": fit.info(),
                   "seconds": round(time.perf_counter() - t0, 2)})
    return report


def fit_rows(model: FusionModel, ids: Sequence[str], g: np.ndarray, x: np.ndarray,
             views: dict[str, np.ndarray], cfg: AdaptConfig) -> Fit:
    """The fit from arrays: ``g (N, d)`` fused and ``x (N, D)`` light vectors of ``ids``,
    ``views`` ``{id: (V, D)}`` of a sample of them (pseudo-queries: a seeded sample of
    the viewed ids)."""
    pos = {i: r for r, i in enumerate(ids)}
    viewed = sorted(pos[i] for i in views)
    if len(viewed) < 2:
        raise InputError(f"only {len(viewed)} items have views: nothing to hold out")
    xv = np.concatenate([views[ids[r]] for r in viewed])
    vi = np.repeat(np.asarray(viewed, np.int64), [len(views[ids[r]]) for r in viewed])
    pseudo = np.asarray(viewed)[sample_rows([ids[r] for r in viewed], cfg.pseudo_items,
                                            cfg.seed + 1)]
    prior = trained_map(model)
    if prior is None:
        log.info("the trained query's input is not normalised (query_norm off): its map is "
                 "not a candidate; shrinking towards 0")
        cfg = AdaptConfig.from_dict({**cfg.to_dict(), "priors": ["zero"]})
        prior = (np.zeros((x.shape[1], g.shape[1])), np.zeros(g.shape[1]))
    return fit_adaptation(FitData(g, x, xv, vi, pseudo), prior, cfg,
                          trained_candidate=trained_map(model) is not None)


def sync_whitened(g: Any, spaces: FusedSpaces, rec: dict[str, Any]) -> int:
    """Give items of the fused space missing from the recorded gallery-whitened space their
    whitened vectors (``normalize(g P + c)``, the recorded transform); how many."""
    wh = rec.get("whitening")
    if rec.get("answer") != "whitened" or not wh:
        return 0
    if g.space_info(wh["space"]).info.get("derived_from") != spaces.fused:  # adapted before
        g.update_space_info(wh["space"], derived_from=spaces.fused)  # derived spaces existed
    t = QueryAdaptation.load(Path(g.path) / wh["path"], digest=wh["digest"],
                             model_fingerprint=spaces.fused)
    ids = g.ids(spaces.fused)
    todo = [i for i, h in zip(ids, g.has(ids, wh["space"]), strict=True) if not h]
    # skip-if-present, re-derived if the fused vector changed meanwhile: an upload replacing
    # an item during this sync is never overwritten with its previous image's vector
    fill_missing(g, spaces.fused, wh["space"], todo, lambda gv: normalize(
        t.apply(np.asarray(gv, np.float64))).astype(np.float32))
    return len(todo)


def _commit_whitened(g: Any, spaces: FusedSpaces, fit: Fit, n: int, cfg: AdaptConfig
                     ) -> dict[str, Any]:
    """The gallery-whitened fused space of ``fit`` (transform artifact, light map artifact,
    the space and its vectors); ``{"space", "path", "digest", "query"}``."""
    assert fit.whitening is not None and fit.whitened_map is not None
    p, c = fit.whitening
    t = QueryAdaptation(model_fingerprint=spaces.fused, light_fingerprint="gallery-whitening",
                        w=p, b=c, params={**cfg.to_dict(), "n_items": n},
                        info={"what": "fused vectors whitened on the gallery: normalize(g w + b)"})
    t_rel = f"{ADAPT_DIR}/{t.digest}"
    t.save(Path(g.path) / t_rel)
    space = whitened_fingerprint(spaces.fused, t.digest)
    wq, bq = fit.whitened_map
    q = QueryAdaptation(model_fingerprint=space, light_fingerprint=spaces.light, w=wq, b=bq,
                        params={**cfg.to_dict(), "n_items": n}, info=fit.info())
    q_rel = f"{ADAPT_DIR}/{q.digest}"
    q.save(Path(g.path) / q_rel)
    wh = {"space": space, "path": t_rel, "digest": t.digest}
    cfg_space = {"type": "fusion-gallery", "model": spaces.model_path,
                 "whitening": {"path": t_rel, "digest": t.digest}}
    qc = {"type": "fusion-query", "model": spaces.model_path, "output": "whitened",
          "space": space, "adaptation": {"path": q_rel, "digest": q.digest}}
    g.register_space(space, int(p.shape[1]), {
        "name": "fusion-whitened", "dim": int(p.shape[1]), "kind": "global",
        "source": f"the fused space {spaces.fused} whitened on this gallery",
        "fingerprint": space, "config": cfg_space, "query_config": qc,
        "derived_from": spaces.fused})  # filled from the fused vectors at every commit
    if g.space_info(space).info.get("retired"):  # the same fit again (after a reset)
        g.update_space_info(space, retired=False, derived_from=spaces.fused)
    sync_whitened(g, spaces, {"answer": "whitened", "whitening": wh})
    return {**wh, "query": qc["adaptation"]}


def _due(g: Any, rec: dict[str, Any], n: int, cfg: AdaptConfig, refit: bool
         ) -> tuple[bool, str]:
    if n < cfg.min_items:
        return False, (f"{n} items < {cfg.min_items}: too few to adapt; the trained query "
                       "answers")
    if refit:
        return True, "refit asked"
    ad = rec.get("adaptation")
    if not rec.get("n_items") or ad is None:
        return True, "first fit"
    try:
        QueryAdaptation.load(Path(g.path) / ad["path"], digest=ad["digest"])
    except (GalleriaError, OSError) as exc:
        return True, f"the recorded fit cannot be read ({exc}): refit"
    if n >= rec["n_items"] * cfg.refit_growth:
        return True, (f"the fused space grew from {rec['n_items']} to {n} items "
                      f"(>= x{cfg.refit_growth}): refit")
    return False, (f"fit on {rec['n_items']} items is current ({n} now; refit at "
                   f"{rec.get('refit_at')})")


def _commit_unfitted(g: Any, spaces: FusedSpaces, n: int, cfg: AdaptConfig, why: str) -> None:
    g.set_setting(FUSION_KEY, {
        "fused_space": spaces.fused, "light_space": spaces.light, "answer": "fused",
        "space": spaces.fused, "reason": why, "adaptation": None, "n_items": 0,
        "refit_at": cfg.min_items, "scores": None, "config": cfg.to_dict()})


def _commit(g: Any, spaces: FusedSpaces, model: FusionModel, fit: Fit, n: int,
            cfg: AdaptConfig, seconds: float) -> None:
    """Artifact first, then the space's query config, the primary space and the setting
    (a kill between two of them: the rerun refits the same map and writes them again)."""
    a = QueryAdaptation(model_fingerprint=model.fingerprint, light_fingerprint=spaces.light,
                        w=fit.w, b=fit.b, params={**cfg.to_dict(), "n_items": n},
                        info=fit.info())
    rel = f"{ADAPT_DIR}/{a.digest}"
    a.save(Path(g.path) / rel)
    info = g.space_info(spaces.fused).info
    qc = {"type": "fusion-query", "model": spaces.model_path,
          "adaptation": {"path": rel, "digest": a.digest}}
    if info.get("query_config") != qc:
        g.update_space_info(spaces.fused, query_config=qc)
    whitened = _commit_whitened(g, spaces, fit, n, cfg) if fit.answer == "whitened" else None
    answer_space = {"light": spaces.light, "fused": spaces.fused,
                    "whitened": (whitened or {}).get("space")}[fit.answer]
    if g.primary_space != answer_space:
        g.set_primary_space(answer_space)
    _retire_whitened(g, keep=(whitened or {}).get("space"))
    g.set_setting(FUSION_KEY, {
        "fused_space": spaces.fused, "light_space": spaces.light, "answer": fit.answer,
        "space": answer_space, "reason": fit.reason,
        "adaptation": {"path": rel, "digest": a.digest}, "whitening": whitened, "n_items": n,
        "refit_at": int(np.ceil(n * cfg.refit_growth)),
        "scores": {k: fit.info()[k] for k in ("chosen", "trained", "light", "candidates")},
        "cosine": fit.cosine, "domain": fit.domain, "config": cfg.to_dict(),
        "fitted_at": time.time(),
        "seconds": round(seconds, 2)})
    log.info("gallery %s adapted: %s answers (%s)", g.path, answer_space, fit.reason)


def _retire_whitened(g: Any, keep: str | None) -> None:
    """Stop filling gallery-whitened spaces other than ``keep`` (a refit replaced them; they
    stay for searchers opened before, :mod:`galleria.extract.derived`)."""
    for s in g.spaces():
        if s.space != keep and s.info.get("derived_from") and not s.info.get("retired") and (
                (s.info.get("config") or {}).get("whitening")):
            g.update_space_info(s.space, retired=True)


def reset(gallery: Any) -> None:
    """Undo the adaptation: the trained query and the fused space answer again (the light
    space and the fitted maps stay on disk)."""
    spaces = fused_spaces(gallery)
    if spaces is None:
        raise InputError(f"gallery {gallery.path} has no fused space")
    gallery.update_space_info(spaces.fused, query_config={"type": "fusion-query",
                                                          "model": spaces.model_path})
    gallery.set_primary_space(spaces.fused)
    _retire_whitened(gallery, keep=None)
    gallery.delete_setting(FUSION_KEY)


def check_space(gallery: Any) -> None:
    """Refuse a fused space whose recorded adaptation is missing or mismatched."""
    spaces = fused_spaces(gallery)
    if spaces is None:
        return
    qc = gallery.space_info(spaces.fused).info.get("query_config") or {}
    a = qc.get("adaptation")
    if a is not None:
        try:
            QueryAdaptation.load(Path(gallery.path) / a["path"], digest=a["digest"],
                                 model_fingerprint=spaces.fused)
        except (OSError, KeyError) as exc:
            raise CompatibilityError(f"the fused space's adaptation {a} cannot be read: "
                                     f"{exc}") from exc


__all__ = ["FUSION_KEY", "AdaptConfig", "adapt_gallery", "fused_spaces", "fusion_state",
           "reset"]
