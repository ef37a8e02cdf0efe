"""Data for bench_fusion.py: fixed seeded splits, cached member features and query views.

Every image of the four data sets is embedded once by every member model into
one feature store (``<work>/features.gallery``, one space per member, filled
resumably by :func:`galleria.fusion.data.fill_features`); the frozen query trunk's
outputs are cached by :func:`galleria.fusion.data.compute_views` (clean view for
evaluation images, ``n_views`` phone-like views for training images).

Splits (seed 0, recorded in the results): Caltech-101 classes (BACKGROUND_Google
left out) are permuted and the first 50 are the *training classes* (their
``train`` images are the training set); the other 51 are evaluated, ``test``
images as queries against ``train`` images. SMVS covers are permuted, the first
50 are trained on (their 250 images), the other 50 evaluated: all-vs-all (200
phone photos vs the 250 images, self excluded) and phone -> reference (200 vs 50).
rparis250 and UKBench56 are transfer sets (never trained on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from galleria.eval.datasets import CLASS_METRICS, RetrievalTask, load_task
from galleria.images.sources import SourceItem

SEED = 0
MEMBERS = ("effnet-lite2", "opennsfw-r50", "effnet-lite0", "effnet-lite2-ms")


@dataclass
class EvalSet:
    """A retrieval task and the feature-row ids of its queries and gallery items."""

    name: str
    task: RetrievalTask
    query_ids: list[str]
    gallery_ids: list[str]
    main: tuple[str, ...]


@dataclass
class TrainSet:
    name: str
    items: list[SourceItem]
    labels: np.ndarray  # class / instance labels (strings encoded later)
    info: dict[str, Any] = field(default_factory=dict)


def _item(ds: str, root: Path, path: str, bbox: Any = None, prefix: str = "") -> SourceItem:
    return SourceItem(id=f"{ds}/{prefix}{path}", path=root / path, bbox=bbox)


def caltech() -> tuple[TrainSet, EvalSet]:
    t = load_task("caltech101")
    classes = np.unique(np.concatenate([t.gallery_labels, t.query_labels]))
    perm = np.random.default_rng(SEED).permutation(classes)
    train_cls = set(perm[:50].tolist())
    g_eval = [i for i, c in enumerate(t.gallery_labels) if c not in train_cls]
    q_eval = [i for i, c in enumerate(t.query_labels) if c not in train_cls]
    g_train = [i for i, c in enumerate(t.gallery_labels) if c in train_cls]
    task = RetrievalTask(
        name="caltech101-disjoint", root=t.root,
        gallery_paths=[t.gallery_paths[i] for i in g_eval],
        query_paths=[t.query_paths[i] for i in q_eval],
        query_gallery_index=np.full(len(q_eval), -1, np.int64), protocol="class",
        query_labels=t.query_labels[q_eval], gallery_labels=t.gallery_labels[g_eval],
        metrics=CLASS_METRICS,
        description="Caltech-101, 51 classes never trained on: test -> train",
    )
    ev = EvalSet("caltech101-disjoint", task,
                 [f"caltech101/{p}" for p in task.query_paths],
                 [f"caltech101/{p}" for p in task.gallery_paths], ("mAP@R", "R@1"))
    tr = TrainSet("caltech101-train50",
                  [_item("caltech101", t.root, t.gallery_paths[i]) for i in g_train],
                  t.gallery_labels[g_train],
                  {"train_classes": sorted(train_cls), "eval_classes":
                   sorted(set(classes.tolist()) - train_cls), "seed": SEED})
    return tr, ev


def smvs() -> tuple[TrainSet, list[EvalSet]]:
    t = load_task("smvs")
    covers = np.unique(t.gallery_labels)
    perm = np.random.default_rng(SEED).permutation(covers)
    train_cov = set(perm[:50].tolist())
    g_eval = [i for i, c in enumerate(t.gallery_labels) if c not in train_cov]
    q_eval = [i for i, c in enumerate(t.query_labels) if c not in train_cov]
    g_train = [i for i, c in enumerate(t.gallery_labels) if c in train_cov]
    pos = {g: j for j, g in enumerate(g_eval)}
    all_task = RetrievalTask(
        name="smvs-disjoint", root=t.root, gallery_paths=[t.gallery_paths[i] for i in g_eval],
        query_paths=[t.query_paths[i] for i in q_eval],
        query_gallery_index=np.array([pos[int(t.query_gallery_index[i])] for i in q_eval]),
        protocol="instance", query_labels=t.query_labels[q_eval],
        gallery_labels=t.gallery_labels[g_eval], metrics=("mAP", "R@1"),
        description="SMVS, 50 covers never trained on: 200 phone photos vs their 250 images",
    )
    refs = [i for i in g_eval if "/Reference/" in t.gallery_paths[i]]
    ref_task = RetrievalTask(
        name="smvs-ref-disjoint", root=t.root, gallery_paths=[t.gallery_paths[i] for i in refs],
        query_paths=all_task.query_paths, query_gallery_index=np.full(len(q_eval), -1),
        protocol="instance", query_labels=all_task.query_labels,
        gallery_labels=t.gallery_labels[refs], metrics=("R@1", "mAP"),
        description="SMVS, 50 covers never trained on: phone photo -> 50 clean references",
    )
    ids = [f"smvs_dvd_covers/{p}" for p in t.gallery_paths]
    evs = [EvalSet("smvs-disjoint", all_task, [ids[int(t.query_gallery_index[i])]
                                               for i in q_eval],
                   [ids[i] for i in g_eval], ("mAP", "R@1")),
           EvalSet("smvs-ref-disjoint", ref_task, [ids[int(t.query_gallery_index[i])]
                                                   for i in q_eval],
                   [ids[i] for i in refs], ("R@1", "mAP"))]
    tr = TrainSet("smvs-train50", [_item("smvs_dvd_covers", t.root, t.gallery_paths[i])
                                   for i in g_train],
                  t.gallery_labels[g_train].astype(str),
                  {"train_covers": sorted(int(c) for c in train_cov),
                   "eval_covers": sorted(int(c) for c in set(covers.tolist()) - train_cov),
                   "seed": SEED})
    return tr, evs


def rparis() -> EvalSet:
    t = load_task("rparis250")
    return EvalSet("rparis250", t, [f"rparis250/q/{p}" for p in t.query_paths],
                   [f"rparis250/{p}" for p in t.gallery_paths], ("M_mAP", "H_mAP"))


def ukbench() -> EvalSet:
    t = load_task("ukbench56")
    ids = [f"ukbench56/{p}" for p in t.gallery_paths]
    return EvalSet("ukbench56", t, list(ids), ids, ("N-S", "mAP"))


def _whole(name: str, prefix: str, main: tuple[str, ...], task_name: str | None = None
           ) -> EvalSet:
    """A shared task as it is (nothing of it trained on by a model of another set)."""
    t = load_task(name)
    if task_name is not None:
        from dataclasses import replace

        t = replace(t, name=task_name)
    q_ids = [f"{prefix}/{p}" for p in t.query_paths]
    if t.protocol == "revisitop":
        q_ids = [f"{prefix}/q/{p}" for p in t.query_paths]
    return EvalSet(t.name, t, q_ids, [f"{prefix}/{p}" for p in t.gallery_paths], main)


def transfer_sets() -> list[EvalSet]:
    """Every shared set as a whole (for a model trained on another set): SMVS phone ->
    reference (all 100 covers) and all-vs-all, UKBench56, COIL-20, ORL faces, rparis250,
    Caltech-101 test -> train (all 101 classes)."""
    smvs_all = _whole("smvs", "smvs_dvd_covers", ("mAP", "R@1"))
    smvs_ref = _whole("smvs-ref", "smvs_dvd_covers", ("R@1", "mAP"))
    return [smvs_ref, smvs_all,
            _whole("ukbench56", "ukbench56", ("N-S", "mAP")),
            _whole("coil20", "coil20", ("mAP@R", "R@1")),
            _whole("orl_faces", "orl_faces", ("mAP@R", "R@1")),
            rparis(),
            _whole("caltech101", "caltech101", ("mAP@R", "R@1"))]


def eval_items(ev: EvalSet) -> list[SourceItem]:
    """Unique items (queries first, then gallery) with their files and crop boxes."""
    t = ev.task
    out: dict[str, SourceItem] = {}
    for j, qid in enumerate(ev.query_ids):
        bbox = t.query_bbx[j] if t.query_bbx is not None else None
        out.setdefault(qid, SourceItem(id=qid, path=t.root / t.query_paths[j], bbox=bbox))
    for gid, p in zip(ev.gallery_ids, t.gallery_paths, strict=True):
        out.setdefault(gid, SourceItem(id=gid, path=t.root / p))
    return list(out.values())


# --------------------------------------------------------------------------- caches
def all_items(with_transfer: bool = False
              ) -> tuple[TrainSet, TrainSet, list[EvalSet], list[SourceItem]]:
    """The two training sets, every evaluation set, and the union of their images
    (``with_transfer``: the images of :func:`transfer_sets` too)."""
    c_tr, c_ev = caltech()
    s_tr, s_evs = smvs()
    evs = [c_ev, *s_evs, rparis(), ukbench()]
    seen: dict[str, SourceItem] = {}
    for it in c_tr.items + s_tr.items:
        seen.setdefault(it.id, it)
    for ev in evs + (transfer_sets() if with_transfer else []):
        for it in eval_items(ev):
            seen.setdefault(it.id, it)
    return c_tr, s_tr, evs, list(seen.values())


def member_extractors(names: tuple[str, ...], threads: int | None) -> list[Any]:
    from galleria.fusion.members import build_member

    return [build_member(n, threads=threads) for n in names]


def fill(work: Path, items: list[SourceItem], extractors: list[Any], *, workers: int = 2,
         progress: Any = None) -> None:
    from galleria.fusion.data import fill_features
    from galleria.store.gallery import Gallery

    g = Gallery.open_or_create(work / "features.gallery")
    try:
        failures = fill_features(g, items, extractors, workers=workers, progress=progress)
    finally:
        g.close()
    bad = {k: v for k, v in failures.items() if v}
    if bad:
        raise RuntimeError(f"images failed: {bad}")


def features(work: Path, ids: list[str], spaces: list[str]) -> list[np.ndarray]:
    from galleria.fusion.data import load_features
    from galleria.store.gallery import Gallery

    g = Gallery.open(work / "features.gallery", readonly=True)
    try:
        return load_features(g, ids, spaces)
    finally:
        g.close()


_TRUNKS: dict[int, Any] = {}


def views(work: Path, items: list[SourceItem], *, n_views: int, train_blocks: int,
          threads: int | None, seed: int = SEED, progress: Any = None) -> np.ndarray:
    """``(N, n_views, ...)`` float16 trunk outputs (cached under ``work``)."""
    from galleria.fingerprint import digest
    from galleria.fusion.data import compute_views
    from galleria.fusion.extractor import _lite_preprocessing
    from galleria.fusion.query_model import build, query_weights_id, trunk_runner

    tid = digest("effnet-lite0", query_weights_id("effnet-lite0"), train_blocks)
    if train_blocks not in _TRUNKS:
        trunk, _ = build("effnet-lite0", train_blocks, 64)
        _TRUNKS[train_blocks] = trunk_runner(trunk, work / f"trunk-{tid}.onnx", threads=threads)
    return compute_views(items, _TRUNKS[train_blocks], _lite_preprocessing(), work,
                         trunk_id=tid, n_views=n_views, seed=seed, progress=progress)
