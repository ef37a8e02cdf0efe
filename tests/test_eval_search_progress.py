"""``galleria eval --local``'s search progress: the queries searched in chunks (one
progress update per chunk) give exactly the one-batch answer."""

from __future__ import annotations

import numpy as np

from galleria.eval import local as ev
from galleria.local.asmk import AsmkIndex
from galleria.search.pipelines import LocalMDSPipeline, LocalPipeline, QueryBatch
from galleria.types import LocalFeatures

D = 16


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class _Count:
    def __init__(self):
        self.n, self.calls = 0, 0

    def update(self, n=1):
        self.n += n
        self.calls += 1


def test_chunked_search_equals_one_batch(rng, monkeypatch):
    objs = [(rng.uniform(0, 400, (60, 2)), _unit(rng.standard_normal((60, D)))) for _ in range(6)]

    def feats(o):
        pts, desc = objs[o]
        kp = np.c_[pts + rng.normal(0, 1, pts.shape), np.ones((60, 2))].astype(np.float32)
        return LocalFeatures(kp, _unit(desc + 0.2 * rng.standard_normal(desc.shape)), (400, 400))

    gallery = [feats(i % 6) for i in range(18)]
    queries = [feats(i % 6) for i in range(11)]
    idx = AsmkIndex(D, codebook_size=8, multiple_assignment=1)
    idx.add(np.arange(18), gallery)
    exclude = np.array([i if i % 3 == 0 else -1 for i in range(11)], np.int64)
    batch = QueryBatch(local=queries, exclude=exclude)
    monkeypatch.setattr(ev, "SEARCH_CHUNK", 4)
    for pipe in (LocalPipeline(idx), LocalMDSPipeline(idx, k=6, candidates=10, dim=4)):
        want = pipe.search(batch, 18).pad(18)
        bar = _Count()
        got = ev._search(pipe, batch, 18, bar)
        assert bar.n == 11 and bar.calls == 3
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.scores, want.scores)
        assert ev._search(pipe, batch, 18, None).ids.tolist() == want.ids.tolist()
