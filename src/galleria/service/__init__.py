"""galleria's search service: an ASGI app (FastAPI) over one gallery, with a web UI.

``galleria serve GALLERY`` runs it (cli/serve.py). The parts:

- :mod:`~galleria.service.engine`: the gallery, the shared models and the
  searchers of one process; every request's work (decode, embed, search,
  commit) is a plain function run in the bounded worker pool.
- :mod:`~galleria.service.limits`: the worker pool with its bounded queue
  (503 + ``Retry-After`` when full) and the upload size limit.
- :mod:`~galleria.service.auth`, :mod:`~galleria.service.metrics`,
  :mod:`~galleria.service.upgrades` (the upgrade job run in a server thread),
  :mod:`~galleria.service.audit` (checks answers against brute force over the
  committed state of their generation), :mod:`~galleria.service.app` (routes).

Importing this package imports neither FastAPI nor a model.
"""
