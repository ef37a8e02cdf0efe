"""The service's models: one extractor instance per fingerprint, shared by requests."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from galleria.extract.spaces import extractor_from_space
from galleria.extractors.base import Extractor

log = logging.getLogger(__name__)


class ModelCache:
    """One extractor instance per fingerprint, warmed up before it is shared."""

    def __init__(self, root: Path, *, runtime: str, threads: int | None, warm_up: bool) -> None:
        self.root = root
        self.runtime = runtime
        self.threads = threads
        self.warm_up = warm_up
        self._models: dict[str, Extractor] = {}
        self._lock = threading.Lock()

    def adopt(self, ext: Extractor) -> Extractor:
        """The shared instance of ``ext``'s fingerprint (``ext`` itself the first time)."""
        fp = ext.fingerprint
        with self._lock:
            cur = self._models.get(fp)
            if cur is not None:
                return cur
            if self.warm_up and ext.kind == "global":
                t = time.perf_counter()
                ext.embed_images([Image.new("RGB", (64, 64), (127, 127, 127))])
                log.info("warmed up %s in %.2f s", fp, time.perf_counter() - t)
            self._models[fp] = ext
            return ext

    def for_space(self, info: dict[str, Any], *, query: bool) -> Extractor:
        """The extractor a space records (gallery side, or its query model)."""
        cfg = info.get("query_config") if query and info.get("query_config") else \
            info.get("config")
        fp = info.get("fingerprint") if cfg is info.get("config") else None
        if fp is not None:
            with self._lock:
                cur = self._models.get(fp)
            if cur is not None:
                return cur
        ext = extractor_from_space(info, root=self.root, runtime=self.runtime,
                                   threads=self.threads, query=query)
        return self.adopt(ext)

    def fingerprints(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def retain(self, keep: set[str]) -> list[str]:
        """Forget models not in ``keep`` (e.g. the old model after an upgrade finished);
        returns their fingerprints. Requests still using one keep their reference."""
        with self._lock:
            gone = [fp for fp in self._models if fp not in keep]
            for fp in gone:
                del self._models[fp]
        return gone
