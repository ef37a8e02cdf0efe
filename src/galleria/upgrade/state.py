"""The upgrade job's state, recorded in the gallery, and the lock of its runs.

State lives in the gallery: the setting ``"upgrade"`` (old/new space, the new
model, mode, order seed, attached transforms, job version), ``"upgrade:progress"``
(rate bookkeeping), ``"upgrade:finishing"`` (set by the one transaction that
switches search to the new model; cleared when ``finish`` has cleaned up) and
the folder ``<gallery>/upgrade/`` (calibration pairs, trained transforms).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from galleria.errors import GalleriaError
from galleria.store.gallery import Gallery
from galleria.upgrade.psi import load_cross_map

STATE_KEY = "upgrade"
PROGRESS_KEY = "upgrade:progress"
FINISHING_KEY = "upgrade:finishing"
FOLDER = "upgrade"
ORDERS = ("queries", "random", "id", "priority")
CHANGES = ("model", "transform", "local")
MODES = ("online", "shadow")
JOB_VERSION = 1


class UpgradeError(GalleriaError):
    """The upgrade cannot proceed as asked (no job, already the model, not at 100 %...)."""


@dataclass(frozen=True)
class UpgradeState:
    """The job recorded in the gallery by :func:`~galleria.upgrade.job.start_upgrade`."""

    old_space: str
    new_space: str
    new_model: str
    mode: str = "online"
    order: str = "random"
    seed: int = 0
    calib_size: int = 1000
    started: float = 0.0
    transforms: dict[str, str] = field(default_factory=dict)
    version: int = JOB_VERSION
    online: dict[str, Any] = field(default_factory=dict)
    """``{"config": OnlineConfig dict, "decision": the published online psi}``."""
    change: str = "model"
    """What the job changes: ``model`` (re-embed, items move), ``transform`` (the new
    space is a transform of a stored space), ``local`` (local features are added)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """What a feature change needs (the base space of a transform, the spaces kept)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UpgradeState:
        if not isinstance(d, dict) or "old_space" not in d or "new_space" not in d:
            raise UpgradeError(f"the gallery's upgrade record is malformed: {d!r}")
        if d.get("version", JOB_VERSION) != JOB_VERSION:
            raise UpgradeError(
                f"the upgrade in progress was started by a galleria with job version "
                f"{d.get('version')}; this one reads version {JOB_VERSION}: finish it with "
                "that version")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def active_upgrade(gallery: Gallery) -> UpgradeState | None:
    """The upgrade in progress on ``gallery``, or ``None``."""
    d = gallery.get_setting(STATE_KEY)
    return UpgradeState.from_dict(d) if d else None


def require_upgrade(gallery: Gallery) -> UpgradeState:
    state = active_upgrade(gallery)
    if state is None:
        if gallery.get_setting(FINISHING_KEY):
            raise UpgradeError(
                f"the upgrade of {gallery.path} switched to the new model but its clean-up was "
                "interrupted; run `galleria upgrade finish` again to complete it")
        raise UpgradeError(
            f"no upgrade in progress on {gallery.path}; start one with "
            "`galleria upgrade start INDEX --new-model M`")
    return state


def job_folder(gallery: Gallery | str | os.PathLike[str]) -> Path:
    base = gallery.path if isinstance(gallery, Gallery) else Path(gallery)
    return Path(base) / FOLDER


def save_state(gallery: Gallery, state: UpgradeState) -> None:
    gallery.set_setting(STATE_KEY, state.to_dict())


def attach_transform(gallery: Gallery, name: str, path: str | os.PathLike[str]) -> UpgradeState:
    """Record a trained map (psi / BCT head) under ``name`` in the job (checks its models)."""

    state = require_upgrade(gallery)
    load_cross_map(path, old_fingerprint=state.old_space, new_fingerprint=state.new_space)
    p = Path(path).resolve()
    try:
        stored = p.relative_to(Path(gallery.path).resolve()).as_posix()
    except ValueError:
        stored = str(p)
    new = UpgradeState.from_dict({**state.to_dict(),
                                  "transforms": {**state.transforms, name: stored}})
    save_state(gallery, new)
    return new


def transform_path(gallery: Gallery, state: UpgradeState, name: str) -> Path | None:
    rel = state.transforms.get(name)
    if rel is None:
        return None
    p = Path(rel)
    return p if p.is_absolute() else Path(gallery.path) / p


LOCK_PATIENCE_S = 0.5
"""How long a writer retries the run lock before it is refused (a status probe holds it
for microseconds; a writer holds it for its whole work)."""


@contextlib.contextmanager
def run_lock(gallery: Gallery, holder: str = "galleria upgrade run") -> Iterator[None]:
    """Held by one writer of the job at a time (``upgrade run``, ``upgrade
    train-transform``); released by the kernel if it dies. ``holder`` is named to the
    writer refused meanwhile."""
    folder = job_folder(gallery)
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / "run.lock", "a+")  # noqa: SIM115 - held for the whole run
    try:
        # a status probe (:func:`lock_held`) holds it for an instant: retry briefly before
        # naming another writer
        deadline = time.monotonic() + LOCK_PATIENCE_S
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.005)
                    continue
                fh.seek(0)
                who = fh.read(200).strip() or "galleria upgrade run"
                raise UpgradeError(f"another `{who}` is working on {gallery.path}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(holder)
        fh.flush()
        yield
    finally:
        fh.close()


def decision_psi_path(gallery: Gallery, state: UpgradeState) -> Path | None:
    """The folder of the published online psi, when it exists."""
    d = state.online.get("decision") or {}
    rel = d.get("psi")
    if not rel:
        return None
    p = Path(gallery.path) / rel
    return p if (p / "header.json").is_file() else None


def decision_phi_path(gallery: Gallery, state: UpgradeState) -> Path | None:
    """The folder of the published forward map phi (rule ``ensemble``), when it exists."""
    rel = (state.online.get("decision") or {}).get("phi")
    if not rel:
        return None
    p = Path(gallery.path) / rel
    return p if (p / "header.json").is_file() else None


def pending_space(upgrade_record: Mapping[str, Any] | None) -> str | None:
    """The space an active job is filling that no pipeline may search by default.

    ``upgrade_record``: the gallery's ``"upgrade"`` setting (or None). A local
    space being added is incomplete until ``finish``: the default decision
    should keep answering through the job's searcher (which merges it with the
    global answers) and ignore it when choosing a local pipeline.
    """
    if not upgrade_record or upgrade_record.get("change") != "local":
        return None
    space = upgrade_record.get("new_space")
    return str(space) if space else None


def nothing_left(gallery: Gallery, state: UpgradeState) -> bool:
    """Whether every item the job can move has moved: the items without a new-space
    entry (none, or only ones whose re-embedding failed and stays failed until a run
    with ``--retry-failed``). The run's last guard check is due then."""
    left = len(gallery) - gallery.count(state.new_space)
    if left <= 0:
        return True
    failed = {f.id for f in gallery.failures(state.new_space)}
    if left > len(failed):
        return False
    done = set(gallery.ids(state.new_space))
    return all(i in failed for i in gallery.ids(state.old_space) if i not in done)


def lock_held(gallery: Gallery) -> bool:
    p = job_folder(gallery) / "run.lock"
    if not p.exists():
        return False
    with open(p, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False
