"""The old-answers guard of a local-feature change: served meanwhile, never below the
global answers (label-free).

While a job adds local features (change ``local``) the global space keeps every
item, so the gallery can always answer exactly as before (rule ``old-only``: the
global model over every item). Two candidates
(:class:`~galleria.upgrade.local_search.LocalChangeSearcher`): ``hybrid``, the
finished gallery's default pipeline over the global space and the local index
published so far, and ``rank-merge``, the global part for items without local
features merged with the local index for the others. The best candidate (``hybrid``
unless the merge beats it) is served only once the job's check finds it better than
the global answers, as a model upgrade's guard
(:func:`galleria.upgrade.guard.decide_with_old`, mode ``until-better``) does:

1. **Pseudo-queries** (once per job, :func:`job_local_pseudo`): phone-like views of
   a seeded sample of the gallery's own images (:mod:`galleria.images.pseudo`),
   embedded with the global query model *and* given local features by the change's
   local extractor; kept in ``<job>/online/local-pseudo/`` (arrays first, the JSON
   header naming them last, atomic writes: a run killed meanwhile makes them again).
2. **The check** (:func:`check_local`): the pseudo-queries are searched with both
   candidates (on the local index the job published *now*) and with the global
   answers; the reciprocal rank of each view's source item, paired one-sided 95 %
   test; the match-probability calibration of every rule is fitted on the same
   answers (:mod:`galleria.upgrade.probability`).
3. **Publish**: the decision, with its verdict and probabilities, in the job record
   (one settings write; ``state.online["decision"]``, what ``upgrade status``
   shows). A check killed before it publishes nothing: the next run checks again.

When (:class:`LocalGuardRun`, driven by ``run_upgrade``): at the job's first run
(before any item has local features), each time :attr:`LocalGuardConfig.recheck_every`
of the gallery has moved since the last check (the local index is published first,
so the check scores what searches will serve), and when the last item is done.

Cost: embedding the pseudo-queries once (global model + local extractor), then per
check one search of them per rule (hybrid, merge, global) (measured in
benchmarks/results/backfill-local-guard.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import GalleriaError, InputError
from galleria.extract.spaces import extractor_from_space
from galleria.extractors.base import Extractor
from galleria.images.pseudo import TUNE_SCENE, make_pseudo_queries
from galleria.io.atomic import load_array, read_json, write_json, write_npy
from galleria.store.gallery import Gallery
from galleria.types import LocalFeatures
from galleria.upgrade.guard import GUARD_MODES, decide_with_old, reciprocal_ranks
from galleria.upgrade.local_search import (
    GLOBAL,
    HYBRID,
    MERGED,
    LocalChangeSearcher,
    LocalPublisher,
    _Info,
)
from galleria.upgrade.probability import probability_record
from galleria.upgrade.state import (
    UpgradeState,
    job_folder,
    nothing_left,
    require_upgrade,
    save_state,
)

log = logging.getLogger(__name__)

GUARD_KEY = "local_guard"
"""Where the job records its :class:`LocalGuardConfig` (``state.online``)."""
PSEUDO_DIR = "local-pseudo"


@dataclass(frozen=True)
class LocalGuardConfig:
    """The guard of a local-feature change (recorded in the job at start).

    Attributes:
        enabled: check at all (``False``: the merged answers are served, unchecked).
        pseudo_queries: gallery items the check makes a view of. 200 by default: on
            the 500 SMVS covers a check costs a few seconds (SIFT, one thread;
            benchmarks/results/backfill-local-guard.md), and 200 paired reciprocal
            ranks resolve a gain of a few MRR points.
        seed: seeds the sample and its views.
        depth: result depth of the check (ranks beyond it count as not found).
        guard: ``until-better`` (default: the global answers until the merged ones
            beat them), ``unless-worse`` (merged unless the global answers win),
            ``off`` (merged, unchecked).
        recheck_every: check again each time this fraction of the gallery has moved.
        scene: place half of the views in a cluttered frame, as the tuner's views
            (:data:`~galleria.images.pseudo.TUNE_SCENE`): crops alone flatter global
            descriptors against local ones (off by default; measured in
            benchmarks/results/backfill-local-guard*-scene.md).
    """

    enabled: bool = True
    pseudo_queries: int = 200
    seed: int = 0
    depth: int = 100
    guard: str = "until-better"
    recheck_every: float = 0.05
    scene: bool = False

    def __post_init__(self) -> None:
        if self.pseudo_queries < 10:
            raise InputError("local guard: at least 10 pseudo-queries")
        if self.guard not in GUARD_MODES:
            raise InputError(f"local guard: guard must be one of {', '.join(GUARD_MODES)}")
        if not 0.0 < self.recheck_every <= 1.0:
            raise InputError("local guard: recheck_every must be in (0, 1]")
        if self.depth < 1:
            raise InputError("local guard: depth must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> LocalGuardConfig:
        d = dict(d or {})
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def active(self) -> bool:
        return self.enabled and self.guard != "off"


def guard_config(state: UpgradeState) -> LocalGuardConfig:
    """The job's guard config (a job recorded before the guard existed: the defaults)."""
    return LocalGuardConfig.from_dict(state.online.get(GUARD_KEY))


# --------------------------------------------------------------------------- #
# pseudo-queries with local features
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class LocalPseudoSet:
    """The job's pseudo-queries: ``ids (P,)`` source items, ``glob (P, D)`` global query
    vectors, ``local`` P :class:`LocalFeatures`."""

    ids: list[str]
    glob: np.ndarray
    local: list[LocalFeatures]
    fingerprint: str


def _save_local(folder: Path, feats: list[LocalFeatures]) -> None:
    """Concatenated keypoints / descriptors, per-image offsets and sizes (atomic writes)."""
    n = [len(f) for f in feats]
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    dim = feats[0].descriptors.shape[1] if feats else 0
    dtype = feats[0].descriptors.dtype if feats else np.float32
    kp = np.concatenate([f.keypoints for f in feats]) if feats else np.zeros((0, 4), np.float32)
    de = np.concatenate([f.descriptors.astype(dtype) for f in feats]) if feats else \
        np.zeros((0, dim), dtype)
    write_npy(folder / "keypoints.npy", kp.astype(np.float32))
    write_npy(folder / "descriptors.npy", de)
    write_npy(folder / "offsets.npy", offsets)
    write_npy(folder / "sizes.npy", np.array([f.image_size for f in feats], np.int64)
              .reshape(-1, 2))


def _load_local(folder: Path) -> list[LocalFeatures]:
    kp, de = load_array(folder / "keypoints.npy"), load_array(folder / "descriptors.npy")
    off, sizes = load_array(folder / "offsets.npy"), load_array(folder / "sizes.npy")
    return [LocalFeatures(kp[a:b], de[a:b], (int(w), int(h)))
            for a, b, (w, h) in zip(off[:-1], off[1:], sizes, strict=True)]


def job_local_pseudo(gallery: Gallery, state: UpgradeState, config: LocalGuardConfig,
                     global_model: Extractor, local_model: Extractor) -> LocalPseudoSet:
    """Make (once per job) and load the pseudo-queries with both query models.

    Kept in ``<job>/online/local-pseudo/``: the arrays first, ``pseudo.json`` (which
    names the models, the sample and the set's fingerprint) last, each an atomic
    write; a header that does not match (other models, count, seed) or is missing
    (a run killed while making them) makes them again.
    """
    folder = job_folder(gallery) / "online" / PSEUDO_DIR
    head = folder / "pseudo.json"
    want = {"global": global_model.fingerprint, "local": local_model.fingerprint,
            "n": config.pseudo_queries, "seed": config.seed, "scene": bool(config.scene)}
    if head.is_file():
        try:
            meta = read_json(head)
            if all(meta.get(k) == v for k, v in want.items()):
                return LocalPseudoSet(list(meta["ids"]), load_array(folder / "global.npy"),
                                      _load_local(folder), str(meta["fingerprint"]))
        except (OSError, ValueError, KeyError, InputError) as exc:
            log.warning("local pseudo-queries of the job unreadable (%s): making them again",
                        exc)
    t = time.perf_counter()
    head.unlink(missing_ok=True)  # the arrays below are rewritten: no header names them
    pq = make_pseudo_queries(gallery, n=config.pseudo_queries, seed=config.seed,
                             space=state.old_space,
                             scene=TUNE_SCENE if config.scene else None)
    glob = np.asarray(global_model.embed_images(pq.images), np.float32)
    local = list(local_model.embed_images(pq.images))
    folder.mkdir(parents=True, exist_ok=True)
    write_npy(folder / "global.npy", glob)
    _save_local(folder, local)
    write_json(head, {**want, "ids": pq.ids, "fingerprint": pq.fingerprint,
                      "skipped": len(pq.skipped), "seconds": round(time.perf_counter() - t, 2)})
    log.info("%d local pseudo-queries made in %.1f s", len(pq), time.perf_counter() - t)
    return LocalPseudoSet(pq.ids, glob, local, pq.fingerprint)


# --------------------------------------------------------------------------- #
# the check
# --------------------------------------------------------------------------- #


def check_local(gallery: Gallery, pseudo: LocalPseudoSet, config: LocalGuardConfig, *,
                source: str = "check", spent_s: float = 0.0) -> dict[str, Any]:
    """Score the merged and the global answers on the pseudo-queries; publish the decision.

    The merged answers are searched exactly as live search does (a
    :class:`LocalChangeSearcher` on the local index published now, its cohort and
    seed from the job). Returns the published decision.
    """
    state = require_upgrade(gallery)
    last = dict(state.online.get("decision") or {})
    t = time.perf_counter()
    answers: dict[str, Any] = {}
    rr: dict[str, np.ndarray] = {}
    for rule in (HYBRID, MERGED, GLOBAL):
        s = LocalChangeSearcher(gallery, cohort=state.calib_size or 1000, seed=state.seed,
                                rule=rule)
        try:
            res = s.search_queries(pseudo.glob, pseudo.local, k=config.depth)
            scale = s.score_normalization()  # the scale these answers' scores are on
        finally:
            s.close()
        rr[rule] = reciprocal_ranks(res, pseudo.ids)
        answers[rule] = (res, _Scored(_Info({**s.calibration.info, "kind": scale})))
    rule, scores, verdict = decide_with_old(rr, mode=config.guard, baseline=HYBRID)
    search_s = time.perf_counter() - t
    prob: dict[str, Any] | None
    try:  # an add-on: its failure never undoes the rule the check chose
        prob = probability_record(gallery, state, pseudo, answers, rule)
    except Exception as exc:  # any failure of the fit: no probabilities
        log.warning("local guard: fitting match probabilities failed (%s: %s)",
                    type(exc).__name__, exc)
        prob = None
    check_s = time.perf_counter() - t
    decision = {
        "kind": "local", "rule": rule, "checked": True, "source": source, "pairs": 0,
        "moved": gallery.count(state.new_space), "items": len(gallery),
        "verdict": verdict, "scores": scores, "queries": len(pseudo.ids),
        "map": None, "phi_map": None, "phi_pairs": 0, "fits": 0,
        "search_s": round(search_s, 3), "check_s": round(check_s, 3), "at": time.time(),
        "checks": int(last.get("checks", 0)) + 1,
        "total_s": round(float(last.get("total_s", 0.0)) + spent_s + check_s, 3),
        "probability": prob,
    }
    publish_decision(gallery, decision)
    if verdict.get("merged_vs_old") == "worse":
        log.warning("the pseudo-query check finds the merged answers worse than the global "
                    "answers (%s): search serves the global answers; the local features may "
                    "not help on this gallery", verdict)
    log.info("local guard check (%s) at %d items in %.2f s: search uses %s %s", source,
             decision["moved"], check_s, rule, {r: v["mrr"] for r, v in scores.items()})
    return decision


@dataclass(frozen=True)
class _Scored:
    """What the probability record reads of a check's searcher: the scale of its
    scores (:meth:`LocalChangeSearcher.score_normalization`) and no learned map."""

    calibration: Any
    map_fingerprint: str | None = None


def publish_decision(gallery: Gallery, decision: dict[str, Any]) -> UpgradeState:
    """Record ``decision`` in the job (one settings write)."""
    state = require_upgrade(gallery)
    new = UpgradeState.from_dict({**state.to_dict(),
                                  "online": {**state.online, "decision": decision}})
    save_state(gallery, new)
    return new


def check_due(gallery: Gallery, state: UpgradeState, config: LocalGuardConfig) -> bool:
    """No check yet, or :attr:`LocalGuardConfig.recheck_every` of the gallery moved since
    the last one, or every item that can move is done (failed ones stay global) and the
    last check was before that."""
    if not config.active:
        return False
    last = state.online.get("decision") or {}
    if not last.get("checked"):
        return True
    moved, total = gallery.count(state.new_space), max(len(gallery), 1)
    then = int(last.get("moved", -1))
    # the last check of a run: every item that can move has (failed ones never do)
    return moved - then >= config.recheck_every * total or (then != moved
                                                            and nothing_left(gallery, state))


class LocalGuardRun:
    """The guard's part of one ``run_upgrade`` of a local change: builds the two query
    models when a check is first due, keeps them for the run; a failure is logged,
    never fatal to the backfill.

    Args:
        extractor: the run's local extractor (reused as the local query model when its
            space records no separate one).
        publisher: the run's :class:`LocalPublisher` (a check publishes the local index
            first, so it scores what searches will serve).
    """

    def __init__(self, gallery: Gallery, state: UpgradeState, extractor: Extractor,
                 publisher: LocalPublisher, *, runtime: str = "auto",
                 threads: int | None = None) -> None:
        self.gallery, self.state, self.extractor = gallery, state, extractor
        self.publisher, self.runtime, self.threads = publisher, runtime, threads
        self.config = guard_config(state)
        self.models: tuple[Extractor, Extractor] | None = None
        self.checks = 0

    def _models(self) -> tuple[Extractor, Extractor]:
        if self.models is None:
            info = self.gallery.space_info(self.state.old_space).info
            glob = extractor_from_space(info, root=self.gallery.path, runtime=self.runtime,
                                        threads=self.threads, query=True)
            linfo = self.gallery.space_info(self.state.new_space).info
            loc = self.extractor if "query_config" not in linfo else extractor_from_space(
                linfo, root=self.gallery.path, runtime=self.runtime, threads=self.threads,
                query=True)
            self.models = (glob, loc)
        return self.models

    def maybe(self, *, source: str = "recheck", published: bool = False) -> dict[str, Any] | None:
        """Check and publish when due (``published``: the local index was just published)."""
        state = require_upgrade(self.gallery)
        if not check_due(self.gallery, state, self.config):
            return None
        try:
            t = time.perf_counter()
            pseudo = job_local_pseudo(self.gallery, state, self.config, *self._models())
            spent = time.perf_counter() - t
            if not published:
                self.publisher.maybe(self.gallery, force=True)
            self.checks += 1
            return check_local(self.gallery, pseudo, self.config, source=source,
                               spent_s=spent)
        except (GalleriaError, OSError, ValueError, ImportError) as exc:  # e.g. a query
            # model's optional runtime missing here: never fatal to the backfill
            log.warning("local guard: the check failed (the backfill goes on; search keeps "
                        "its last decision): %s", exc)
            return None
