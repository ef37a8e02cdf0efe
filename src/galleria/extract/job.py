"""``galleria index``: embed a folder or manifest into a gallery, resumably.

Each flush commits one segment of vectors (or local features) with its item
rows in one transaction, so after ``kill -9`` the same call skips what is
stored and embeds the rest: every image ends up exactly once. Unusable images
are recorded as failures (with the reason) and retried on the next run.

Item identity: an item records the SHA-256 of the image its data came from.
Re-running on a changed file re-embeds it (reported as *updated*); a second
source whose ids collide with different images already in the gallery is
refused with the first conflicts and the options that resolve them
(``id_prefix``, ``update``), never reported as "already there".
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.extract.derived import Derivers, derive_into, derive_missing, live_derived
from galleria.extract.embed import Embedder, Progress, embed_stream, file_content
from galleria.extract.recipe import Recipe, check_explicit, recipe_extractor, recipe_spaces
from galleria.extract.spaces import space_info
from galleria.extractors.base import Extractor
from galleria.extractors.registry import create_extractor
from galleria.extractors.spec import ModelSpec
from galleria.extractors.transformed import TransformedExtractor
from galleria.images.sources import SourceItem, list_source
from galleria.io.atomic import write_json
from galleria.store.gallery import Failure, Gallery
from galleria.store.payloads import ColumnTypes, infer_columns
from galleria.transforms.attach import copy_into_gallery
from galleria.transforms.registry import load_transform

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    """What one run of :func:`index_images` did (summed over its spaces)."""

    gallery: str
    space: str
    total: int
    already_done: int
    embedded: int
    """Images embedded by this run (into one space or several: each image counts once)."""
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    updated: list[str] = field(default_factory=list)
    spaces: list[str] = field(default_factory=list)
    #: ids whose local features have no keypoints (a blank image): stored, but local
    #: search never finds them
    no_keypoints: list[str] = field(default_factory=list)
    #: images embedded per space (a gallery with global and local features has two)
    embedded_per_space: dict[str, int] = field(default_factory=dict)
    #: where the spaces came from: the models asked for (new gallery) or the gallery's
    #: own recipe (an existing gallery)
    recipe: str = ""
    _embedded_ids: set[str] = field(default_factory=set, repr=False)

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "gallery": self.gallery, "space": self.space, "spaces": self.spaces,
            "total": self.total, "already_done": self.already_done,
            "embedded": self.embedded, "updated": len(self.updated),
            "updated_ids": self.updated[:100], "failed": len(self.failures),
            "failures": [f.to_dict() for f in self.failures],
            "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 2),
            "no_keypoints": len(self.no_keypoints), "no_keypoints_ids": self.no_keypoints[:100],
            "embedded_per_space": dict(self.embedded_per_space), "recipe": self.recipe,
        }


def _meta(item: SourceItem, columns: ColumnTypes | None = None) -> dict[str, Any]:
    """What an item records: its image path (absolute), crop box and manifest columns
    (typed: numbers, booleans and lists as JSON values, see :mod:`galleria.store.payloads`)."""
    cols = columns.apply(item.meta) if columns is not None else dict(item.meta)
    meta: dict[str, Any] = {"path": _real(item.path), **cols}
    if item.bbox is not None:
        meta["bbox"] = list(item.bbox)
    return meta


# ------------------------------------------------------------------ identity
@dataclass
class Identity:
    """How the source's items relate to what the gallery already holds."""

    new: list[SourceItem] = field(default_factory=list)
    unchanged: list[SourceItem] = field(default_factory=list)
    updated: list[SourceItem] = field(default_factory=list)
    conflicts: list[tuple[SourceItem, str]] = field(default_factory=list)


def resolve_identity(gallery: Gallery, items: Sequence[SourceItem], *, explicit_ids: bool,
                     update: bool) -> Identity:
    """Sort ``items`` into new / unchanged / updated / conflicting (same id, other image).

    A changed file at the recorded path is *updated*. Another file under a known
    id is *updated* when the ids were given explicitly (a manifest's ``id``
    column) or ``update`` is set, else a *conflict*. Unchanged files are
    recognised by size + mtime, else by their SHA-256.
    """
    out = Identity()
    recs = gallery.contents([it.id for it in items])
    metas = dict(zip(recs, gallery.meta(list(recs)), strict=True)) if recs else {}
    for it in items:
        rec = recs.get(it.id)
        if rec is None:
            out.new.append(it)
            continue
        stored = (metas.get(it.id) or {}).get("path")
        here = _real(it.path)
        try:
            st = os.stat(it.path)
        except OSError:
            out.unchanged.append(it)  # cannot compare; the item keeps its data
            continue
        h, size, mtime = rec
        if stored == here and (h is None or (size == st.st_size and mtime == st.st_mtime_ns)):
            out.unchanged.append(it)
            continue
        try:
            now = file_content(it.path)[0]
        except OSError:
            out.unchanged.append(it)
            continue
        if h is None or now == h:
            out.unchanged.append(it)
        elif stored == here or explicit_ids or update:
            out.updated.append(it)
        else:
            out.conflicts.append((it, str(stored)))
    return out


def _conflict_error(gallery: Gallery, conflicts: list[tuple[SourceItem, str]]) -> InputError:
    shown = "; ".join(f"{it.id!r}: {it.path} vs stored {stored}" for it, stored in conflicts[:5])
    return InputError(
        f"{len(conflicts)} ids of this source already name different images in "
        f"{gallery.path} ({shown}{' ...' if len(conflicts) > 5 else ''}). Index the source "
        "under its own ids with --id-prefix PREFIX/ (e.g. the folder name), or replace the "
        "stored images with --update")


# ------------------------------------------------------------------ options
_MODEL_OPTIONS = ("pooling", "scales", "checkpoint", "size", "resize")


@dataclass(frozen=True)
class IndexOptions:
    """How one ``index`` run embeds and commits (every field has a working default).

    Attributes:
        index: index spec of the global space (``exact``, ``exact-bf16``, FAISS...).
        index_params: its parameters (``nprobe``, ``ef_search``, ``rescore``).
        batch_size: images per forward pass.
        workers: image decoding threads.
        flush_every: items buffered before a commit (the most work a crash loses).
        limit: stop after this many new images (trial runs, tests).
        id_prefix: prepended to every id (index two folders with the same file names).
        update: replace stored images whose id now names another file.
        explicit_ids: the ids were chosen by the user (manifest ``id`` column): a
            different file under a known id is an update, not a conflict (``None``:
            true for a ``.csv`` manifest).
        add_space: on an existing gallery, add the space of the model given even though
            the gallery does not have it (otherwise a CompatibilityError naming both).
        runtime: ``auto`` / ``torch`` / ``onnx``... (how models run, not which).
        threads: intra-op threads of the models (``None``: the runtime's default).
    """

    index: str | None = None
    index_params: dict[str, Any] | None = None
    batch_size: int = 32
    workers: int = 2
    flush_every: int = 512
    limit: int | None = None
    id_prefix: str | None = None
    update: bool = False
    explicit_ids: bool | None = None
    add_space: bool = False
    runtime: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("flush_every", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                what = "commit size" if name == "flush_every" else "batch size"
                raise InputError(f"{what} must be a positive integer; got {v!r}")

    @classmethod
    def of(cls, options: IndexOptions | None = None, **fields: Any) -> IndexOptions:
        """``options`` with ``fields`` replaced (unknown names: a TypeError naming them)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"index_images() got unexpected options {unknown}; known: "
                            f"{sorted(known | set(_MODEL_OPTIONS))}")
        return replace(options or cls(), **fields)


# ------------------------------------------------------------------ steps
def source_items(src: str | os.PathLike[str] | Sequence[SourceItem], options: IndexOptions
                 ) -> tuple[list[SourceItem], bool]:
    """``(items, ids chosen by the user)``: the items of a folder, manifest or list,
    with ``options.id_prefix`` applied."""
    from_manifest = isinstance(src, (str, os.PathLike)) and Path(src).suffix.lower() == ".csv"
    items = list(src) if not isinstance(src, (str, os.PathLike)) else list_source(src)
    if options.id_prefix:
        items = [SourceItem(id=f"{options.id_prefix}{it.id}", path=it.path, meta=it.meta,
                            bbox=it.bbox) for it in items]
    explicit = from_manifest if options.explicit_ids is None else bool(options.explicit_ids)
    return items, explicit


def given_extractors(model: str | ModelSpec | Extractor | None,
                     local: str | Extractor | None, options: IndexOptions) -> list[Extractor]:
    """The extractors the caller named, built once here (none: the gallery's recipe)."""
    out: list[Extractor] = []
    if isinstance(model, Extractor):
        out.append(model)
    elif model is not None:
        out.append(ModelSpec.of(model).build(runtime=options.runtime, threads=options.threads))
    if isinstance(local, Extractor):
        out.append(local)
    elif local is not None:
        out.append(create_extractor(local, runtime=options.runtime, threads=options.threads))
    return out


# ------------------------------------------------------------------ entry
def index_images(
    src: str | os.PathLike[str] | Sequence[SourceItem],
    out: str | os.PathLike[str],
    *,
    model: str | ModelSpec | Extractor | None = None,
    local: str | Extractor | None = None,
    transform: str | os.PathLike[str] | None = None,
    options: IndexOptions | None = None,
    progress: Progress | None = None,
    embedder: Embedder | None = None,
    **fields: Any,
) -> IndexReport:
    """Embed every image of ``src`` (a folder, a ``.csv`` manifest or items) into ``out``.

    The steps (each a function of this module): :func:`source_items` (items and ids),
    :func:`given_extractors` (the models named, built once), the plan (a new gallery:
    the models given, ``effnet-lite0`` when none; an existing gallery: its own recipe,
    :mod:`galleria.extract.recipe`), then one embed-and-commit pass per space.

    Args:
        src: folder (ids = relative paths), manifest, or a list of SourceItem.
        out: gallery folder (created if needed; resumed if it exists).
        model: the global model: a registry name, a :class:`ModelSpec` or an extractor.
            On an existing gallery a model is only needed to add a space
            (``add_space``).
        local: a local-feature extractor (``sift``, ``xfeat``) or its name; global and
            local data can live in one gallery.
        transform: a saved transform (``galleria fit-transform``) applied to every
            global embedding; copied into the gallery and applied to queries too.
        options: an :class:`IndexOptions` (how the run embeds and commits).
        progress: a progress bar (tqdm-like); its total is set once the plan is known.
        embedder: where embeddings are computed (default :func:`embed_stream`, in this
            process); :class:`galleria.distributed.ray_embed.RayEmbedder` computes them
            on a Ray cluster. Identity, commits and failures are the same either way.
        **fields: :class:`IndexOptions` fields, and the model options of a model given
            by name (``pooling``, ``scales``, ``checkpoint``, ``size``, ``resize``);
            ``extractor=`` / ``local_extractor=`` are accepted for ``model`` / ``local``.

    Returns:
        IndexReport with counts, updates, failures (id, path, reason) and throughput.
    """
    t0 = time.perf_counter()
    model = fields.pop("extractor", None) or model
    local = fields.pop("local_extractor", None) or local
    mopts = {k: fields.pop(k) for k in _MODEL_OPTIONS if k in fields}
    if isinstance(model, str):
        model = ModelSpec.of(model, **mopts)
    opts = IndexOptions.of(options, **fields)
    items, explicit_ids = source_items(src, opts)
    explicit = given_extractors(model, local, opts)
    if transform is not None and not any(e.kind == "global" for e in explicit):
        raise InputError("--transform applies to a global model: give --model too")
    gallery = Gallery.open_or_create(out)
    try:
        ident = resolve_identity(gallery, items, explicit_ids=explicit_ids, update=opts.update)
        if ident.conflicts:
            raise _conflict_error(gallery, ident.conflicts)
        report = IndexReport(gallery=str(gallery.path), space="", total=len(items),
                             already_done=0, embedded=0, updated=[it.id for it in ident.updated])
        # during an online upgrade, an image already in the old space is left to the
        # upgrade run -- unless a model was named (re-indexing with the new model on
        # purpose: the run then adopts those items)
        plan, recipe = _plan(gallery, list(explicit), transform, add_space=opts.add_space,
                             runtime=opts.runtime, threads=opts.threads)
        report.recipe = recipe.reason if recipe is not None else "the models given"
        _set_total(progress, len(items) * len(plan))
        columns = infer_columns([it.meta for it in items])
        derivers = Derivers(gallery.path, runtime=opts.runtime, threads=opts.threads)
        repaired = derive_missing(gallery, derivers)  # a run killed between its two commits
        if repaired:
            log.info("filled %d missing derived vectors", repaired)
        for ext, keep_info in plan:
            done_if_in = recipe.done_if_in if recipe is not None and not explicit else ()
            _index_space(gallery, items, ident, ext, report, opts, progress=progress,
                         embedder=embedder or embed_stream, keep_info=keep_info,
                         done_if_in=done_if_in, columns=columns, derivers=derivers)
        report.space = report.spaces[0]
        report.embedded = len(report._embedded_ids)
        report.seconds = time.perf_counter() - t0
        try:
            gallery.backup()
        except OSError as exc:
            log.warning("could not back up the database: %s", exc)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        write_json(Path(gallery.path) / "reports" / f"index-{stamp}-{os.getpid()}.json",
                   report.to_dict())
        return report
    finally:
        gallery.close()


def _plan(gallery: Gallery, explicit: list[Extractor], transform: str | os.PathLike[str] | None,
          *, add_space: bool, runtime: str, threads: int | None
          ) -> tuple[list[tuple[Extractor, bool]], Recipe | None]:
    """``([(extractor, keep the space's recorded info)], recipe)``: what this run embeds
    with. A new gallery: the extractors given (``effnet-lite0`` when none). An existing
    one: its recipe, plus the spaces given with ``add_space``."""
    if transform is not None:  # the transformed space's fingerprint, nothing copied yet
        n = next(i for i, e in enumerate(explicit) if e.kind == "global")
        explicit[n] = _probe_transform(explicit[n], transform)
    state = gallery.state()
    recipe = recipe_spaces(state)
    if recipe is None:
        if not explicit:
            explicit = [create_extractor("effnet-lite0", runtime=runtime, threads=threads)]
        return [(_attach(gallery, e, transform), False) for e in explicit], None
    new = check_explicit(state, recipe, [e.fingerprint for e in explicit], add_space=add_space)
    given = {e.fingerprint: e for e in explicit}
    plan: list[tuple[Extractor, bool]] = []
    for sp in recipe.spaces:
        e = given.get(sp.space)
        if e is None or getattr(e, "probe_of", None) is not None:
            e = recipe_extractor(sp, root=gallery.path, runtime=runtime, threads=threads)
        plan.append((e, True))
    plan += [(_attach(gallery, given[fp], transform), False) for fp in new]
    return plan, recipe


def _probe_transform(ext: Extractor, transform: str | os.PathLike[str]) -> Extractor:
    out = TransformedExtractor(ext, load_transform(transform, fingerprint=ext.fingerprint))
    out.probe_of = ext  # type: ignore[attr-defined]
    return out


def _attach(gallery: Gallery, ext: Extractor, transform: str | os.PathLike[str] | None
            ) -> Extractor:
    """A transform probe made real: the transform copied into the gallery."""
    base = getattr(ext, "probe_of", None)
    if base is None or transform is None:
        return ext
    return _with_transform(gallery, base, transform)


def _set_total(progress: Progress | None, total: int) -> None:
    """Tell a progress bar (tqdm) its total once the passes are known."""
    if progress is not None and hasattr(progress, "total"):
        progress.total = total  # type: ignore[attr-defined]
        refresh = getattr(progress, "refresh", None)
        if callable(refresh):
            refresh()


def _with_transform(gallery: Gallery, ext: Extractor, transform: str | os.PathLike[str]
                    ) -> Extractor:
    tr = load_transform(transform, fingerprint=ext.fingerprint)
    probe = TransformedExtractor(ext, tr)
    rel = copy_into_gallery(gallery, transform, probe.fingerprint)
    out = TransformedExtractor(ext, tr, transform_path=rel)
    out.base_space = ext.fingerprint  # type: ignore[attr-defined]
    return out


def _index_space(
    gallery: Gallery,
    items: list[SourceItem],
    ident: Identity,
    extractor: Extractor,
    report: IndexReport,
    opts: IndexOptions,
    *,
    progress: Progress | None,
    embedder: Embedder = embed_stream,
    keep_info: bool = False,
    done_if_in: Sequence[str] = (),
    columns: ColumnTypes | None = None,
    derivers: Derivers | None = None,
) -> None:
    """Embed the items ``space`` lacks (``keep_info``: an existing space of the gallery's
    recipe, whose recorded info is kept as it is; ``done_if_in``: spaces whose items
    count as done, e.g. the old space of an online upgrade, which they leave when
    they are re-embedded; ``derivers``: fill the spaces derived from ``space`` at each
    commit, :mod:`galleria.extract.derived`)."""
    space = extractor.fingerprint
    gallery.register_space(space, extractor.dim, None if keep_info else space_info(extractor),
                           kind=extractor.kind)
    report.spaces.append(space)
    index = opts.index if extractor.kind == "global" else None
    if index is not None and (index != gallery.index_spec(space) or opts.index_params):
        gallery.set_index_spec(index, space, **(opts.index_params or {}))
    updated = {it.id for it in ident.updated}
    ids_all = [it.id for it in items]
    done = gallery.has(ids_all, space)
    drop = [d for d in done_if_in if d != space]
    for other in drop:
        done |= gallery.has(ids_all, other)
    todo = [it for it, d in zip(items, done, strict=True) if not d or it.id in updated]
    if opts.limit is not None:
        todo = todo[: max(0, int(opts.limit))]
    n_done = len(items) - len([it for it, d in zip(items, done, strict=True) if not d])
    n_done -= len([it for it, d in zip(items, done, strict=True) if d and it.id in updated])
    report.already_done += n_done
    if progress is not None and n_done:
        progress.update(n_done)
    buf: list[tuple[SourceItem, Any, tuple[str, int, int]]] = []
    fails: list[Failure] = []
    local = extractor.kind == "local"

    def flush() -> None:
        if buf:
            ids = [b[0].id for b in buf]
            metas = [_meta(b[0], columns) for b in buf]
            contents = [b[2] for b in buf]
            if local:
                gallery.add_local(ids, [b[1] for b in buf], space=space, meta=metas,
                                  contents=contents, replace=True, drop_spaces=drop)
                blank = [b[0].id for b in buf if len(b[1]) == 0]
                if blank:
                    log.warning("%d images without keypoints (local search never finds "
                                "them): %s", len(blank), blank[:5])
                    report.no_keypoints.extend(blank)
            else:
                vecs = np.stack([b[1] for b in buf])
                # the items' derived rows go in this commit: missing until derive_into (or
                # derive_missing after a kill), never the previous image's
                stale = live_derived(gallery, space) if derivers is not None else []
                gallery.add(ids, vecs, space=space, meta=metas, contents=contents,
                            replace=True, drop_spaces=[*drop, *stale])
                if derivers is not None:  # e.g. the gallery-whitened fused space: a product
                    derive_into(gallery, space, ids, vecs, derivers)
            report._embedded_ids.update(ids)
            report.embedded_per_space[space] = report.embedded_per_space.get(space, 0) + len(buf)
            buf.clear()
        if fails:
            gallery.record_failures(space, fails)
            seen = {f.id for f in report.failures}
            report.failures.extend(f for f in fails if f.id not in seen)  # once per image
            fails.clear()

    for batch in embedder(todo, extractor, batch_size=opts.batch_size, workers=opts.workers,
                          progress=progress):
        data = getattr(batch, "features", None) if local else None
        rows = data if data is not None else batch.vectors
        for n, it in enumerate(batch.items):
            buf.append((it, rows[n], _content(it, batch.hashes[n])))
        for it, why in batch.failures:
            log.warning("skipped %s: %s", it.path, why)
            fails.append(Failure(it.id, str(it.path), why))
        if len(buf) >= opts.flush_every:
            flush()
    flush()
    _forget_stale_failures(gallery, space, items)
    gallery.compact(space)
    if gallery.count(space):  # local spaces too: their codebook is trained once, here
        try:
            gallery.save_index(space)
        except OSError as exc:  # the index is a cache: the next reader rebuilds it
            log.warning("could not save the index of %s: %s", space, exc)


def _content(item: SourceItem, digest: str) -> tuple[str, int | None, int | None]:
    try:
        st = os.stat(item.path)
    except OSError:
        return digest, None, None
    return digest, int(st.st_size), int(st.st_mtime_ns)


def _real(path: Path) -> str:
    """The absolute path with symbolic links resolved; never raises (a link loop is left
    as it is, where ``Path.resolve`` raises RuntimeError)."""
    return os.path.realpath(path)


def _forget_stale_failures(gallery: Gallery, space: str, items: list[SourceItem]) -> None:
    """Failures of files that are no longer in the source folder are dropped."""
    here = {it.id for it in items}
    roots = tuple({os.path.join(_real(it.path.parent), "") for it in items} |
                  {os.path.join(os.path.abspath(it.path.parent), "") for it in items})
    stale = [f.id for f in gallery.failures(space) if f.id not in here
             and not os.path.lexists(f.path) and os.path.abspath(f.path).startswith(roots)]
    if stale:
        gallery.clear_failures(space, stale)
