"""What a gallery space records about the extractor that fills it, and back.

A space's ``info`` holds the extractor's :meth:`~galleria.extractors.base.Extractor.config`
(and, for an asymmetric space such as a fused gallery, the ``query_config`` of
the light model that embeds queries into it), so every searcher, worker or
repair rebuilds the same extractor from the gallery alone; the recorded
fingerprint is checked on rebuild.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from galleria.errors import FormatError
from galleria.extractors.base import Extractor
from galleria.extractors.registry import extractor_from_config

log = logging.getLogger(__name__)


def space_info(extractor: Extractor, *, query_extractor: Extractor | None = None
               ) -> dict[str, Any]:
    """The ``info`` a space records for data made by ``extractor``.

    ``query_extractor`` (default: the extractor's own ``query_extractor`` attribute,
    e.g. a fused gallery's light model) embeds the queries of an asymmetric space.
    """
    if query_extractor is None:
        query_extractor = getattr(extractor, "query_extractor", None)
    info: dict[str, Any] = {**extractor.info().to_dict(), "kind": extractor.kind}
    try:
        info["config"] = extractor.config()
    except NotImplementedError:  # a user's own extractor class: queries must come as vectors
        log.warning("%s records no config: searching this space needs query vectors",
                    extractor.fingerprint)
    if extractor.kind == "local":
        info["descriptor_dim"] = int(extractor.dim)
        info["descriptor_dtype"] = str(getattr(extractor, "descriptor_dtype", "float32"))
    base = getattr(extractor, "base_space", None)
    if base:
        info["base_space"] = base
    if query_extractor is not None:
        info["query_config"] = query_extractor.config()
    return info


def extractor_from_space(
    info: dict[str, Any],
    *,
    root: str | os.PathLike[str] | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    query: bool = False,
) -> Extractor:
    """Rebuild the extractor a space records (``query=True``: the one for queries).

    Raises:
        FormatError: the space records no config (vectors added by hand: pass query
            vectors instead).
        CompatibilityError: the installed model makes another fingerprint.
    """

    cfg = info.get("query_config") if query and info.get("query_config") else info.get("config")
    if not isinstance(cfg, dict):
        raise FormatError("this space records no extractor config (its vectors were added "
                          "directly); search it with query vectors of the same model")
    return extractor_from_config(cfg, root=root, runtime=runtime, threads=threads,
                                 fingerprint=info.get("fingerprint"))
