"""Which searcher answers: one pure decision (:func:`choose`) and its builder.

::

    from galleria.decision import SearchRequest, choose, open_searcher
    spec = choose(gallery.state(), SearchRequest.of("local"))   # pure, hashable
    searcher = open_searcher(gallery)                            # choose + build
"""

from galleria.decision.choose import SearchRequest, SearchSpec, choose
from galleria.decision.open import build, open_searcher

__all__ = ["SearchRequest", "SearchSpec", "build", "choose", "open_searcher"]
