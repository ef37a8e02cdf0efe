"""galleria on a Ray cluster (``pip install galleria[ray]``).

- :mod:`~galleria.distributed.ray_embed`: ``galleria index --ray`` / ``upgrade run --ray``:
  decoding and embedding on the cluster, this process the one committer.
- :mod:`~galleria.distributed.ray_search`: sharded search (``open_sharded_searcher``).
- :mod:`~galleria.distributed.cluster`: connecting, with clear errors.

Nothing here imports Ray until it is used.
"""
