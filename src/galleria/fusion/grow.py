"""A fused gallery that grows after its adaptation: added items at once, a refit when due.

Items added to an adapted fused gallery (``galleria index`` with or without ``--fusion``, the
Python API, a service upload) get, in the commit that adds them or right after it:

* their fused vector (every member + the mixer: the space's own extractor);
* their **gallery-whitened** vector when that space answers: one matrix product of the fused
  vector with the stored whitening (the space records ``derived_from``,
  :mod:`galleria.extract.derived`; no member runs twice);
* their **light** vector (the light model's pass: the light space is in the gallery's
  recipe); the *adapted query* needs nothing per item (it is a map of the query).

The fit itself (:func:`galleria.fusion.adapt_job.adapt_gallery`) is redone once the fused
space holds ``refit_growth`` (default 1.25: 25 % more) times the items it was fitted on:
``galleria index`` runs it at the end of the run, the service in a background thread
(:func:`schedule_refit`, one at a time per gallery). It is the same resumable job: the map,
the new whitened space and its vectors are written first, the primary space and the
decision last, so a searcher sees the old fit or the new one, never a mixture; a kill
during it loses nothing (the rerun ends with the same fit).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from galleria.store.gallery import Gallery

log = logging.getLogger(__name__)
FUSION_KEY = "fusion"  # galleria.fusion.adapt_job.FUSION_KEY (not imported: torch)


def growth(gallery: Any) -> dict[str, Any] | None:
    """``{"fitted_on", "items", "refit_at", "growth", "due"}`` of a gallery (path or open)
    with one fused space (``items``: the fused space now; ``fitted_on`` 0: never fitted;
    ``growth``: items / fitted_on), or None (no fused space). Cheap: no model is loaded."""
    if isinstance(gallery, (str, os.PathLike)):
        with Gallery.open(gallery, readonly=True) as g:
            return growth(g)
    fused = [s for s in gallery.spaces()
             if (s.info.get("config") or {}).get("type") == "fusion-gallery"
             and "whitening" not in s.info["config"]]
    if len(fused) != 1:
        return None
    rec = gallery.get_setting(FUSION_KEY)
    rec = rec if isinstance(rec, dict) else {}
    fitted, at, n = int(rec.get("n_items") or 0), rec.get("refit_at"), fused[0].count
    return {"fitted_on": fitted, "items": n, "refit_at": at,
            "growth": round(n / fitted, 3) if fitted else None,
            "due": bool(at) and n >= int(at)}


def refit_if_due(gallery: Any, **kw: Any) -> dict[str, Any] | None:
    """Run the adaptation step when the gallery has grown past ``refit_at`` (also brings the
    light and whitened spaces up to date); its report, or None when nothing was due."""
    from galleria.fusion.adapt_job import adapt_gallery  # lazy: torch

    g = growth(gallery)
    if g is None or not g["due"]:
        return None
    return adapt_gallery(gallery, **kw)


_running: dict[str, threading.Thread] = {}
_failed: dict[str, tuple[float, int]] = {}  # gallery -> (monotonic time, items) of a failure
_lock = threading.Lock()
#: a failed background refit is retried after this long, or once the fused space has grown by
#: RETRY_GROWTH more since the failure (not on every upload)
RETRY_AFTER_S = 600.0
RETRY_GROWTH = 1.1


class RefitCancelled(Exception):
    """The background refit was asked to stop (the service stops); the job is resumable."""


def _cancellable(stop: threading.Event) -> Any:
    """A progress factory whose bars raise :class:`RefitCancelled` once ``stop`` is set: the
    adaptation stops at its next embedded item (what it committed stays; a rerun resumes)."""
    class Bar:
        def __init__(self, **_: Any) -> None:
            pass

        def update(self, n: int = 1) -> None:
            if stop.is_set():
                raise RefitCancelled

        def close(self) -> None:
            pass

    return Bar


def _backing_off(key: str, retry_after_s: float) -> bool:
    """True while a failed refit of ``key`` is not to be retried yet (caller holds _lock)."""
    f = _failed.get(key)
    if f is None:
        return False
    if time.monotonic() - f[0] >= retry_after_s:
        return False
    g = growth(key) or {}
    return int(g.get("items") or 0) < f[1] * RETRY_GROWTH


def schedule_refit(path: str | os.PathLike[str], *, threads: int | None = None,
                   runtime: str = "auto", stop: threading.Event | None = None,
                   retry_after_s: float = RETRY_AFTER_S) -> threading.Thread | None:
    """Refit ``path``'s adaptation in a background thread if due (one per gallery at a time in
    this process; across processes the adaptation's file lock serialises them). The thread
    opens its own handle; ``stop`` set makes it stop at its next embedded item (join it: see
    :meth:`galleria.service.engine.Engine.stop`). After a failure no new refit starts for
    ``retry_after_s`` seconds unless the fused space grows by ``RETRY_GROWTH`` more. The
    running thread, or None when one runs already or the back-off holds."""
    key = str(Path(path).resolve())
    stop = stop if stop is not None else threading.Event()
    with _lock:
        t = _running.get(key)
        if (t is not None and t.is_alive()) or _backing_off(key, retry_after_s):
            return None

        def run() -> None:
            items = int((growth(key) or {}).get("items") or 0)
            try:
                with Gallery.open(key) as g:
                    rep = refit_if_due(g, threads=threads, runtime=runtime, workers=1,
                                       progress=_cancellable(stop))
                with _lock:
                    _failed.pop(key, None)
                if rep is not None:
                    log.info("gallery %s refitted: %s", key, rep.get("fit"))
            except RefitCancelled:
                log.info("background refit of %s stopped (the next one resumes it)", key)
            except Exception:  # a background job must not die silently
                with _lock:
                    _failed[key] = (time.monotonic(), items)
                log.exception("background refit of %s failed (retried after %.0f s or once "
                              "the gallery grows by x%.2f)", key, retry_after_s, RETRY_GROWTH)

        t = threading.Thread(target=run, name=f"galleria-refit-{Path(key).name}", daemon=True)
        _running[key] = t
        t.start()
        return t


__all__ = ["RefitCancelled", "growth", "refit_if_due", "schedule_refit"]
