"""``galleria serve --ray ADDRESS``: the service's global searches on Ray shards.

One Ray session for the service's life. The service asks for shards in every
request (:class:`~galleria.decision.SearchRequest` ``sharded=True``) and
:func:`galleria.decision.choose` decides: plain global search is answered by a
:class:`~galleria.distributed.ray_search.ShardedSearcher` (S shard actors, queries
embedded in the service process, top-k merged); everything else keeps the
single-process searchers (an upgrade in progress: backfill search reads two
spaces, sharded search serves one; the local-feature pipelines).

A searcher replaced when the decision changes (an upgrade starts or finishes) is
closed before its successor opens: its shards hold the cluster's CPUs the new ones
need. A request still searching it gets a ClusterError, and the engine answers it
again with the new searcher (the decision changed).
"""

from __future__ import annotations

import logging
from typing import Any

from galleria.distributed.cluster import connect
from galleria.errors import InputError

log = logging.getLogger(__name__)


class ShardPool:
    """The Ray connection and the sharded searchers of one service process.

    Args:
        address: Ray cluster address (``host:port``, ``auto`` or ``local``).
        shards: number of shard actors per searcher (>= 1).
        connect_timeout_s: how long to wait for the cluster.

    Raises:
        MissingDependencyError: Ray is not installed.
        ClusterError: the address does not answer.
    """

    def __init__(self, address: str, shards: int, *, connect_timeout_s: float = 30.0,
                 cpus_per_shard: float = 1.0) -> None:
        if isinstance(shards, bool) or int(shards) < 1:
            raise InputError(f"--shards must be a positive integer, got {shards!r}")
        self.address, self.shards = address, int(shards)
        self.cpus_per_shard = float(cpus_per_shard)
        self._session = connect(address, timeout_s=connect_timeout_s)

    def open(self, gallery: Any, *, runtime: str, threads: int | None) -> Any:
        """A sharded searcher of the gallery's primary space."""
        from galleria.distributed.ray_search import ShardedSearcher  # lazy: PIL

        s = ShardedSearcher(gallery, self.shards, runtime=runtime, threads=threads,
                            cpus_per_shard=self.cpus_per_shard)
        log.info("sharded search: %d shards (%s) on %s", self.shards, s.strategy,
                 self.address)
        return s

    def close(self) -> None:
        """Close the Ray session (the engine releases its searchers first)."""
        self._session.close()

