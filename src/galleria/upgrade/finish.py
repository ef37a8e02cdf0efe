"""Status and finish of an upgrade.

``finish_upgrade`` switches search to the new model in ONE transaction (primary
space = new, job record replaced by a ``finishing`` marker), then cleans up
(drops the old space, compacts, saves the new index, deletes the job folder).
Killed at any point, search still answers: before the switch through the
backfill searcher (the job's answers: at 100 % the ones its last check chose,
e.g. the old model's, from the old vectors the job kept), after it with the new
model alone; the next ``finish`` completes an interrupted clean-up. The switch is
the moment the new model's answers take over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from galleria.errors import GalleriaError
from galleria.io.atomic import write_json
from galleria.store.gallery import Failure, Gallery
from galleria.upgrade.pairs import PairStore
from galleria.upgrade.state import (
    FINISHING_KEY,
    PROGRESS_KEY,
    STATE_KEY,
    UpgradeError,
    UpgradeState,
    job_folder,
    lock_held,
    require_upgrade,
    run_lock,
)

log = logging.getLogger(__name__)




@dataclass
class UpgradeStatus:
    """Where the backfill stands; see :func:`upgrade_status`."""

    gallery: str
    state: UpgradeState
    total: int
    done: int
    remaining: int
    failed: list[Failure]
    in_both: int
    in_neither: int
    rate: float | None
    eta_s: float | None
    running: bool
    pairs: int

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def consistent(self) -> bool:
        """Every item in exactly one space (a model upgrade in online mode) / at least the
        old one (shadow mode, and feature changes, which add a space beside it)."""
        if self.state.mode == "online" and self.state.change == "model":
            return self.in_both == 0 and self.in_neither == 0
        return self.in_neither == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "gallery": self.gallery,
            "old_space": self.state.old_space,
            "new_space": self.state.new_space,
            "new_model": self.state.new_model,
            "mode": self.state.mode,
            "order": self.state.order,
            "seed": self.state.seed,
            "total": self.total,
            "done": self.done,
            "remaining": self.remaining,
            "fraction": round(self.fraction, 6),
            "failed": len(self.failed),
            "failures": [f.to_dict() for f in self.failed[:50]],
            "items_per_s": None if self.rate is None else round(self.rate, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "running": self.running,
            "in_both_spaces": self.in_both,
            "in_neither_space": self.in_neither,
            "consistent": self.consistent,
            "calibration_pairs": self.pairs,
            "transforms": dict(self.state.transforms),
            "change": self.state.change,
            "online_psi": _decision_summary(self.state),
        }


def _decision_summary(state: UpgradeState) -> dict[str, Any] | None:
    """What the online psi decided last (rule, pairs, pseudo-query MRR per rule, cost)."""
    d = state.online.get("decision")
    if not d:
        return None
    out = {k: d.get(k) for k in ("rule", "checked", "source", "pairs", "map", "phi_map",
                                 "phi_pairs", "scores", "fits", "checks", "moved", "verdict",
                                 "total_s")}
    prob = d.get("probability") or {}
    # the rules whose answers carry match probabilities (upgrade/probability.py)
    out["calibrated"] = sorted(prob.get("rules") or {})
    return out


def upgrade_status(gallery_path: str | os.PathLike[str]) -> UpgradeStatus:
    """Fraction done, throughput of the latest run, ETA, failures, and a consistency check."""
    with Gallery.open(gallery_path, readonly=True) as gallery:
        state = require_upgrade(gallery)
        all_ids = gallery.ids()
        old_ids = set(gallery.ids(state.old_space))
        new_ids = set(gallery.ids(state.new_space))
        remaining = [i for i in all_ids if i in old_ids and i not in new_ids]
        rem_set = set(remaining)
        failed = [f for f in gallery.failures(state.new_space) if f.id in rem_set]
        in_both = len(old_ids & new_ids)
        in_neither = sum(1 for i in all_ids if i not in old_ids and i not in new_ids)
        runs = (gallery.get_setting(PROGRESS_KEY) or {}).get("runs", [])
        rate = None
        running = False
        if runs:
            last = runs[-1]
            span = float(last["last"]) - float(last["started"])
            if last["moved"] > 0 and span > 0:
                rate = float(last["moved"]) / span
            running = not last.get("finished") and time.time() - float(last["last"]) < 600
            running = running and lock_held(gallery)
        todo = len(remaining) - len(failed)
        eta = todo / rate if rate and todo else (0.0 if not todo else None)
        return UpgradeStatus(
            gallery=str(gallery.path), state=state, total=len(all_ids),
            done=len(all_ids) - len(remaining), remaining=len(remaining), failed=failed,
            in_both=in_both, in_neither=in_neither, rate=rate, eta_s=eta, running=running,
            pairs=PairStore(job_folder(gallery) / "pairs").count(),
        )


# --------------------------------------------------------------------------- #
# finish
# --------------------------------------------------------------------------- #


@dataclass
class FinishReport:
    gallery: str
    old_space: str
    new_space: str
    items: int
    dropped_failed: list[str]
    seconds: float
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finish_upgrade(gallery_path: str | os.PathLike[str], *, force: bool = False) -> FinishReport:
    """At 100 %: switch search to the new model, then drop the old space entirely.

    Afterwards the gallery holds the same items and vectors as a fresh
    ``galleria index`` of the new model, and no trace of the job. Safe to kill at
    any point (see the module docstring); run it again to complete.

    Raises:
        UpgradeError: items are still pending (run first), or some items could
            not be re-embedded and ``force`` is not set (``force`` removes them).
    """
    t0 = time.perf_counter()
    with Gallery.open(gallery_path) as gallery, contextlib.ExitStack() as held:
        marker = gallery.get_setting(FINISHING_KEY)
        if marker and gallery.get_setting(STATE_KEY) is None:
            state = UpgradeState.from_dict(marker["job"])
            _clean_up(gallery, state)
            return FinishReport(str(gallery.path), state.old_space, state.new_space,
                                len(gallery), list(marker.get("dropped", [])),
                                time.perf_counter() - t0, resumed=True)
        state = require_upgrade(gallery)
        try:  # held to the end: a run starting meanwhile never writes the job record back
            held.enter_context(run_lock(gallery, "galleria upgrade finish"))
        except UpgradeError as exc:
            raise UpgradeError(f"{exc}; wait for it or stop it before `finish`") from None
        state = require_upgrade(gallery)  # as it is now that no writer can change it
        old, new = state.old_space, state.new_space
        new_ids = set(gallery.ids(new))
        remaining = [i for i in gallery.ids(old) if i not in new_ids] \
            if gallery.has_space(old) else []
        failures = {f.id: f for f in gallery.failures(new)}
        failed = [i for i in remaining if i in failures]
        pending = len(remaining) - len(failed)
        total = len(gallery)
        if pending:
            raise UpgradeError(
                f"the backfill is at {100.0 * (total - len(remaining)) / max(total, 1):.1f} %: "
                f"{pending} of {total} items are still in the old space; run "
                "`galleria upgrade run` until it reaches 100 % before finishing")
        if failed and not force:
            shown = "; ".join(f"{i}: {failures[i].reason}" for i in failed[:5])
            raise UpgradeError(
                f"{len(failed)} items could not be re-embedded with the new model ({shown}); "
                "fix them and run `galleria upgrade run --retry-failed`, or finish with "
                "--force to remove them from the gallery")
        if failed:
            log.warning("removing %d items that could not be re-embedded", len(failed))
            gallery.remove(failed)
        # a local-feature change keeps the global space primary (the local one is searched
        # by the local pipelines, as in a fresh `galleria index --local` gallery)
        primary = old if state.change == "local" else new
        # the switch: one transaction
        gallery.update_settings(
            {"primary_space": primary,
             FINISHING_KEY: {"job": state.to_dict(), "dropped": failed, "at": time.time()}},
            delete=(STATE_KEY, PROGRESS_KEY))
        _clean_up(gallery, state)
        report = FinishReport(str(gallery.path), old, new, len(gallery), failed,
                              time.perf_counter() - t0)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        write_json(Path(gallery.path) / "reports" / f"upgrade-finish-{stamp}.json",
                   {**report.to_dict(), "job": state.to_dict()})
        return report


def _copied_transform(info: dict[str, Any]) -> str | None:
    """The transform folder copied into the gallery that a space applies (if any)."""
    cfg = info.get("config")
    if isinstance(cfg, dict) and cfg.get("type") == "transformed":
        rel = str(cfg.get("transform") or "")
        return rel if rel.startswith("transforms/") else None
    return None


def _clean_up(gallery: Gallery, state: UpgradeState) -> None:
    """After the switch: drop the old space, tidy the new one, forget the job."""
    old, new = state.old_space, state.new_space
    if gallery.has_space(old) and state.extra.get("drop_old", True):
        folder = _copied_transform(gallery.space_info(old).info)
        gallery.drop_space(old, force=True)
        if folder and not any(_copied_transform(s.info) == folder for s in gallery.spaces()):
            shutil.rmtree(Path(gallery.path) / folder, ignore_errors=True)
    gallery.compact(new)
    gallery.build_index(new, save=True)
    if _is_fusion(gallery, new):
        _adapt_fused(gallery)
    shutil.rmtree(job_folder(gallery), ignore_errors=True)
    with contextlib.suppress(GalleriaError, OSError):
        gallery.backup()
    gallery.delete_setting(FINISHING_KEY)  # the last step: until here, finish resumes


def _is_fusion(gallery: Gallery, space: str) -> bool:
    """Whether ``space`` holds a fused model's vectors (a ``galleria fusion train`` model)."""
    if not gallery.has_space(space):
        return False
    cfg = gallery.space_info(space).info.get("config")
    return isinstance(cfg, dict) and cfg.get("type") == "fusion-gallery"


def _adapt_fused(gallery: Gallery) -> None:
    """What ``galleria index --fusion`` does after indexing (docs/fusion.md): the light
    space, the label-free query adaptation and the primary space that answers, so the
    finished gallery is the one a fresh ``index --fusion`` builds. Resumable (a killed
    finish runs it again; the adaptation skips the work already committed)."""
    from galleria.fusion.adapt_job import adapt_gallery  # lazy: torch

    rep = adapt_gallery(gallery)
    log.info("fused gallery adapted as `index --fusion` does: %s answers (%s)",
             rep.get("answer"), rep.get("fit"))
