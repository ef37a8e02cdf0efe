"""The upgrade job, driven from the service: start, run in a server thread, cancel, finish.

``run`` calls :func:`galleria.upgrade.job.run_upgrade` in a background thread
of the server with the process's shared instance of the new model; ``cancel``
makes its progress callback raise :class:`Cancelled` (a ``KeyboardInterrupt``,
the job's own interruption path: everything committed is kept, the run reports
``interrupted``); ``finish`` switches search to the new model in one
transaction and the engine's next search uses it -- no restart. A run started
by another process (``galleria upgrade run``) is reported the same way by
:func:`~galleria.upgrade.finish.upgrade_status`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from galleria.errors import GalleriaError
from galleria.extractors.registry import create_extractor
from galleria.service.engine import Engine
from galleria.service.errors import ServiceError, from_galleria
from galleria.upgrade.finish import upgrade_status
from galleria.upgrade.job import finish_upgrade, run_upgrade, start_upgrade
from galleria.upgrade.state import UpgradeError, require_upgrade

log = logging.getLogger(__name__)

STATUS_CACHE_S = 1.0


class Cancelled(KeyboardInterrupt):
    """Raised by the progress callback of a run the service was asked to cancel."""


class _Progress:
    def __init__(self, runner: UpgradeRunner) -> None:
        self.runner = runner

    def update(self, n: int = 1) -> None:
        self.runner.processed += int(n)
        if self.runner._cancel.is_set():
            raise Cancelled()


class UpgradeRunner:
    """At most one upgrade run per server, in its own thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self.processed = 0
        self.last_report: dict[str, Any] | None = None
        self.last_error: str | None = None
        self.started_at: float | None = None
        self._status: tuple[float, dict[str, Any] | None] = (0.0, None)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ actions
    def start(self, new_model: str, *, model_options: dict[str, Any] | None = None,
              **options: Any) -> dict[str, Any]:
        """Create the job (``model_options``: the new model's options, as ``galleria index``
        takes them: ``size``, ``pooling``, ``scales``...)."""

        try:
            ext = create_extractor(new_model, runtime=self.engine.config.runtime,
                                   threads=self.engine.config.threads, **(model_options or {}))
            state = start_upgrade(self.engine.path, new_model, extractor=ext, **options)
        except TypeError as exc:
            raise ServiceError(400, "bad_option", f"bad model options: {exc}") from exc
        except GalleriaError as exc:
            raise from_galleria(exc) from exc
        self._status = (0.0, None)
        return {"action": "start", "started": state.to_dict()}

    def run(self, *, limit: int | None = None, batch_size: int = 16, commit_every: int = 64,
            retry_failed: bool = False, workers: int = 1) -> dict[str, Any]:
        with self._lock:
            if self.running:
                raise ServiceError(409, "running", "an upgrade run of this server is already "
                                   "running; cancel it or wait for it")
            try:
                state = require_upgrade(self.engine.gallery)
                info = self.engine.gallery.space_info(state.new_space).info
                ext = self.engine.models.for_space(info, query=False)
            except GalleriaError as exc:
                raise from_galleria(exc) from exc
            self._cancel.clear()
            self.processed = 0
            self.last_error = None
            self.started_at = time.time()
            kw = {"limit": limit, "batch_size": batch_size, "commit_every": commit_every,
                  "retry_failed": retry_failed, "workers": workers, "extractor": ext}
            self._thread = threading.Thread(target=self._run, args=(kw,),
                                            name="galleria-upgrade-run", daemon=True)
            self._thread.start()
        return {"action": "run", "running": True, "limit": limit}

    def _run(self, kw: dict[str, Any]) -> None:
        try:
            rep = run_upgrade(self.engine.path, progress=_Progress(self), **kw)
            self.last_report = rep.to_dict()
            log.info("upgrade run: moved %d, %d remaining%s", rep.moved, rep.remaining,
                     " (cancelled)" if rep.interrupted else "")
        except Exception as exc:
            log.exception("upgrade run failed")
            self.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._status = (0.0, None)

    def cancel(self, *, wait_s: float = 30.0) -> dict[str, Any]:
        if not self.running:
            raise ServiceError(409, "not_running", "no upgrade run of this server is running")
        self._cancel.set()
        t = self._thread
        if t is not None:
            t.join(timeout=wait_s)
        return {"action": "cancel", "running": self.running, "report": self.last_report}

    def finish(self, *, force: bool = False) -> dict[str, Any]:
        if self.running:
            raise ServiceError(409, "running", "an upgrade run of this server is still "
                               "running; wait for it (or cancel it) before finishing")
        try:
            rep = finish_upgrade(self.engine.path, force=force)
        except GalleriaError as exc:
            raise from_galleria(exc) from exc
        self._status = (0.0, None)
        self.engine.refresh_once()  # search switches now, not at the next tick
        return {"action": "finish", "report": rep.to_dict()}

    # ------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        """The job's state (fraction, rate, ETA) plus this server's run, cached 1 s."""

        at, cached = self._status
        if cached is None or time.monotonic() - at > STATUS_CACHE_S:
            try:
                cached = {"active": True, **upgrade_status(self.engine.path).to_dict()}
            except UpgradeError as exc:
                cached = {"active": False, "message": str(exc)}
            except GalleriaError as exc:
                raise from_galleria(exc) from exc
            cached.pop("gallery", None)
            self._status = (time.monotonic(), cached)
        out = dict(cached)
        out["server_run"] = {
            "running": self.running, "processed": self.processed,
            "started_at": self.started_at, "cancelling": self._cancel.is_set() and self.running,
            "last_report": self.last_report, "last_error": self.last_error,
        }
        return out

    def stop(self) -> None:
        if self.running:
            self._cancel.set()
            if self._thread is not None:
                self._thread.join(timeout=60)
