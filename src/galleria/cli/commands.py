"""Implementations of the CLI commands (argument parsing lives in main.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from galleria.cli.common import (
    model_args,
    print_json,
    progress_bar,
    set_threads,
    setup_logging,
)


def cmd_models(args: argparse.Namespace) -> int:
    from galleria.extractors.registry import PREFIXES, list_models

    specs = list_models()
    if args.json:
        print_json(
            {
                "models": [
                    {"name": s.name, "dim": s.dim, "input_size": s.input_size,
                     "source": s.source, "description": s.description}
                    for s in specs
                ],
                "families": PREFIXES,
            }
        )
        return 0
    w = max(len(s.name) for s in specs)
    print(f"{'name':<{w}}  {'dim':>5}  {'input':<8}  source")
    for s in specs:
        print(f"{s.name:<{w}}  {s.dim or '?':>5}  {s.input_size:<8}  {s.source}")
    print("\nfamilies loading your own weights (--checkpoint PATH):")
    for k, v in PREFIXES.items():
        print(f"  {k + ':':<8} {v}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from galleria.extract.job import index_images
    from galleria.images.sources import list_source

    setup_logging(args.verbose)
    threads = set_threads(args.threads)
    items = list_source(args.src)
    params = {
        k: v
        for k, v in {"nprobe": args.nprobe, "ef_search": args.ef_search,
                     "rescore": args.rescore}.items()
        if v is not None
    }
    with progress_bar(len(items), "index", enabled=not args.quiet) as bar:
        report = index_images(
            items,
            args.out,
            **model_args(args),
            threads=threads,
            index=args.index,
            index_params=params or None,
            transform=args.transform,
            batch_size=args.batch_size,
            workers=args.workers,
            limit=args.limit,
            flush_every=args.commit_every,
            progress=bar,
        )
    if args.json:
        print_json(report.to_dict())
    else:
        print(
            f"{report.gallery}: {report.embedded} embedded, {report.already_done} already "
            f"there, {len(report.failures)} skipped, in {report.seconds:.1f} s "
            f"({report.images_per_s:.1f} img/s) [{report.space}]"
        )
        for f in report.failures:
            print(f"  skipped {f.id}: {f.reason}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from galleria.errors import InputError

    setup_logging(args.verbose)
    threads = set_threads(args.threads)
    searcher = _open_searcher(args, threads)
    funnel = None
    if args.funnel:
        try:
            sd, n = (int(v) for v in args.funnel.split(":"))
        except ValueError as exc:
            raise InputError(f"--funnel takes DIM:N (e.g. 32:200), got {args.funnel!r}") from exc
        funnel = (sd, n)
    queries, res, fails = searcher.search_paths(args.images, args.k, qe=args.qe,
                                                qe_alpha=args.qe_alpha, dim=args.dim,
                                                funnel=funnel)
    for f in fails:
        print(f"galleria search: cannot read query {f.path}: {f.reason}", file=sys.stderr)
    out: list[dict[str, Any]] = []
    if res is not None:
        for q, path in enumerate(queries):
            out.append(
                {"query": path,
                 "results": [{"id": i, "score": round(s, 6)} for i, s in res.row(q)]}
            )
    if args.html and res is not None:
        from galleria.search.html import write_results_html

        paths = []
        for q in range(len(queries)):
            ids = [i for i, _ in res.row(q)]
            metas = searcher.gallery.meta(ids)
            paths.append([(m or {}).get("path") for m in metas])
        write_results_html(args.html, queries, res, paths,
                           title=f"galleria: {Path(args.gallery).name}")
    if args.json:
        print_json(out)
    else:
        for row in out:
            print(row["query"])
            for n, r in enumerate(row["results"], 1):
                print(f"  {n:>3}. {r['score']:.4f}  {r['id']}")
        if args.html:
            print(f"wrote {args.html}")
    return 1 if fails and not out else 0


def _open_searcher(args: argparse.Namespace, threads: int) -> Any:
    """A plain Searcher, or the backfill searcher while an upgrade is in progress
    (so `galleria search` keeps seeing every item during a model upgrade)."""
    from galleria.search.searcher import Searcher
    from galleria.store.gallery import Gallery
    from galleria.upgrade.job import active_upgrade

    if args.space is None:
        with Gallery.open(args.gallery, readonly=True) as g:
            upgrading = active_upgrade(g) is not None
        if upgrading:
            if args.dim or args.funnel or args.qe:
                from galleria.errors import InputError

                raise InputError("--dim/--funnel/--qe are not available while an upgrade runs")
            from galleria.upgrade.search import BackfillSearcher

            return _BackfillAdapter(BackfillSearcher.open(args.gallery, rule="auto",
                                                          runtime=args.runtime, threads=threads))
    return Searcher.open(args.gallery, space=args.space, runtime=args.runtime, threads=threads)


class _BackfillAdapter:
    """Gives a BackfillSearcher the Searcher call used by cmd_search."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gallery = inner.gallery

    def search_paths(self, paths: Any, k: int, **_: Any) -> Any:
        return self.inner.search_paths(paths, k)


def cmd_info(args: argparse.Namespace) -> int:
    from galleria.store.gallery import Gallery

    with Gallery.open(args.gallery, readonly=True) as g:
        data = {
            "path": str(g.path),
            "items": len(g),
            "primary_space": g.primary_space,
            "spaces": [
                {"space": s.space, "dim": s.dim, "count": s.count,
                 "index": g.index_spec(s.space), "model": s.info.get("name"),
                 "failures": len(g.failures(s.space))}
                for s in g.spaces()
            ],
        }
    if args.json:
        print_json(data)
    else:
        print(f"{data['path']}: {data['items']} items")
        for s in data["spaces"]:
            mark = "*" if s["space"] == data["primary_space"] else " "
            print(f" {mark} {s['space']}  dim={s['dim']} vectors={s['count']} "
                  f"index={s['index']} failures={s['failures']}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from galleria.store.gallery import Gallery

    with Gallery.open(args.gallery) as g:
        n = g.remove(args.ids)
        for sp in g.spaces():
            g.index(sp.space)
            g.save_index(sp.space)
    print(f"removed {n} vectors")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from galleria.errors import InputError
    from galleria.extractors.registry import create_extractor
    from galleria.extractors.torch_model import TorchExtractor

    extra = {k: v for k, v in (("size", args.size), ("resize", args.resize)) if v is not None}
    ext = create_extractor(args.model, pooling=args.pooling, scales=args.scales,
                           checkpoint=args.checkpoint, runtime="torch", **extra)
    if not isinstance(ext, TorchExtractor):
        raise InputError(f"{args.model} is not a torch model (it already runs as ONNX)")
    path = ext.export_onnx(args.out)
    print(f"wrote {path} and {path}.json  [{ext.fingerprint}]")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from galleria.cli.eval import run_eval_command

    setup_logging(args.verbose)
    threads = set_threads(args.threads)
    return run_eval_command(args, threads=threads)
