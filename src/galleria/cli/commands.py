"""Implementations of the CLI commands (argument parsing lives in main.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from galleria.cli.common import (
    json_default,
    model_spec,
    print_json,
    progress_bar,
    ray_embedding,
    set_threads,
    setup_logging,
)
from galleria.cli.eval import run_eval_command
from galleria.cli.fusion import describe, run_adaptation
from galleria.cli.tune import describe_lines, info_data, result_probabilities, result_rows
from galleria.errors import GalleriaError, InputError
from galleria.extract.repair import repair
from galleria.extractors.registry import PREFIXES, create_extractor, list_models
from galleria.extractors.torch_model import TorchExtractor
from galleria.filters import parse_where
from galleria.fusion.grow import growth as fusion_growth
from galleria.images.sources import list_source
from galleria.search.html import write_results_html
from galleria.store.gallery import Gallery
from galleria.store.integrity import restore_database
from galleria.store.listing import record_dict


def cmd_models(args: argparse.Namespace) -> int:
    specs = list_models()
    if args.json:
        print_json(
            {
                "models": [
                    {"name": s.name, "kind": s.kind, "dim": s.dim, "input_size": s.input_size,
                     "source": s.source, "description": s.description}
                    for s in specs
                ],
                "families": PREFIXES,
            }
        )
        return 0
    w = max(len(s.name) for s in specs)
    print(f"{'name':<{w}}  {'kind':<6}  {'dim':>5}  {'input':<8}  source")
    for s in specs:
        print(f"{s.name:<{w}}  {s.kind:<6}  {s.dim or '?':>5}  {s.input_size:<8}  {s.source}")
    print("\nfamilies loading your own weights (--checkpoint PATH):")
    for k, v in PREFIXES.items():
        print(f"  {k + ':':<8} {v}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from galleria.extract.job import IndexOptions, index_images  # lazy: CLI start-up

    setup_logging(args.verbose)
    threads = set_threads(args.threads)
    items = list_source(args.src)
    params = {
        k: v
        for k, v in {"nprobe": args.nprobe, "ef_search": args.ef_search,
                     "rescore": args.rescore}.items()
        if v is not None
    }
    runtime = args.runtime
    model = model_spec(args)
    if getattr(args, "fusion", None):
        if model is not None or args.transform:
            raise InputError("--fusion embeds with the fusion model's members and mixer; "
                             "drop --model / --transform")
        from galleria.fusion.extractor import gallery_extractor  # lazy: torch

        model = gallery_extractor(args.fusion, args.out, runtime=runtime, threads=threads)
    options = IndexOptions(
        index=args.index, index_params=params or None, batch_size=args.batch_size,
        workers=args.workers, flush_every=args.commit_every, limit=args.limit,
        id_prefix=args.id_prefix, update=args.update,
        explicit_ids=Path(args.src).suffix.lower() == ".csv", add_space=args.add_space,
        runtime=runtime, threads=threads)
    remote = ray_embedding(args)
    try:
        # the job sets the total once it knows the spaces (the gallery's recipe)
        with progress_bar(len(items), "index", enabled=not args.quiet) as bar:
            report = index_images(items, args.out, model=model, local=args.local,
                                  transform=args.transform, options=options, progress=bar,
                                  embedder=None if remote is None else remote[1])
    finally:
        if remote is not None:
            remote[1].close()
            remote[0].close()
    adapted = None
    # a fused gallery (given now, or indexed before and adapted: its fit record has a refit
    # point; none after `galleria fusion adapt --reset`, which this run must not undo): bring
    # its adaptation up to date, refit when it has grown enough since the fit (docs/fusion.md)
    if getattr(args, "fusion", None) or (fusion_growth(report.gallery) or {}).get("refit_at"):

        adapted = run_adaptation(args.out, threads=threads, runtime=runtime,
                                 quiet=args.quiet, updated=report.updated,
                                 batch_size=args.batch_size, workers=args.workers)
    if args.json:
        print_json({**report.to_dict(), **({"fusion": adapted} if adapted else {})})
    else:
        extra = f", {len(report.updated)} updated" if report.updated else ""
        print(
            f"{report.gallery}: {report.embedded} embedded{extra}, {report.already_done} already "
            f"there, {len(report.failures)} skipped, in {report.seconds:.1f} s "
            f"({report.images_per_s:.1f} img/s) [{', '.join(report.spaces)}]"
        )
        for f in report.failures:
            print(f"  skipped {f.id}: {f.reason}")
        for i in report.no_keypoints:
            print(f"  no keypoints in {i} (a blank image): stored, never found by local search")
        if adapted:
            print(f"  fusion: {describe(adapted)}")
    from galleria.cli.tune import tune_after_index  # lazy: CLI start-up

    tune_after_index(args, report.gallery)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from galleria.decision import open_searcher  # lazy: PIL

    setup_logging(args.verbose)
    threads = set_threads(args.threads)
    if args.k <= 0:
        raise InputError(f"-k must be a positive integer; got {args.k}")
    funnel = None
    if args.funnel:
        try:
            sd, n = (int(v) for v in args.funnel.split(":"))
        except ValueError as exc:
            raise InputError(f"--funnel takes DIM:N (e.g. 32:200), got {args.funnel!r}") from exc
        funnel = (sd, n)
    searcher = open_searcher(args.gallery, space=args.space, pipeline=args.pipeline,
                             runtime=args.runtime, threads=threads)
    opts: dict[str, Any] = {}
    if args.qe:
        opts.update(qe=args.qe, qe_alpha=args.qe_alpha)
    if args.dim is not None:
        opts["dim"] = args.dim
    if funnel is not None:
        opts["funnel"] = funnel
    if args.where:
        opts["where"] = parse_where(args.where)
    if args.min_score is not None:
        opts["min_score"] = args.min_score
    queries, res, fails = searcher.search_paths(args.images, args.k, **opts)
    for f in fails:
        print(f"galleria search: cannot read query {f.path}: {f.reason}", file=sys.stderr)

    res, prob = result_probabilities(searcher, res, getattr(args, "min_probability", None))
    out: list[dict[str, Any]] = []
    if res is not None:
        for q, path in enumerate(queries):
            out.append(
                {"query": path,
                 "results": result_rows(res, prob, q),
                 "searcher": searcher.describe()}  # which space answered, and why
            )
    if args.html and res is not None:
        paths = []
        for q in range(len(queries)):
            ids = [i for i, _ in res.row(q)]
            metas = searcher.gallery.meta(ids)
            paths.append([(m or {}).get("path") for m in metas])
        write_results_html(args.html, queries, res, paths,
                           title=f"galleria: {Path(args.gallery).name}", probabilities=prob)
    if args.json:  # JSON Lines: one object per query, one line each
        for row in out:
            print(json.dumps(row, default=json_default))
    else:
        for row in out:
            print(row["query"])
            for n, r in enumerate(row["results"], 1):
                pr = "" if r["probability"] is None else f"  p={r['probability']:.3f}"
                print(f"  {n:>3}. {r['score']:.4f}{pr}  {r['id']}")
        if args.html:
            print(f"wrote {args.html}")
    return 1 if fails and not out else 0


def cmd_info(args: argparse.Namespace) -> int:
    from galleria.decision.choose import FUSION_KEY, SearchRequest, choose  # lazy: PIL
    from galleria.tune.record import TUNED_KEY  # lazy: PIL
    from galleria.upgrade.state import FINISHING_KEY, STATE_KEY  # lazy: PIL

    with Gallery.open(args.gallery, readonly=True) as g:
        state = g.state()
        try:  # what answers a search with no options, and why (the one decision)
            searcher: dict[str, Any] | None = choose(state, SearchRequest()).to_dict()
        except InputError:
            searcher = None  # an empty gallery
        data = {
            "path": str(g.path),
            "items": len(g),
            "primary_space": g.primary_space,
            "spaces": [
                {"space": s.space, "kind": s.kind, "dim": s.dim, "count": s.count,
                 "index": g.index_spec(s.space), "model": s.info.get("name"),
                 "failures": len(g.failures(s.space))}
                for s in g.spaces()
            ],
            "payload_fields": g.payload_fields(),
            "upgrade": "in progress" if g.get_setting(STATE_KEY) else (
                "clean-up interrupted: run `galleria upgrade finish`"
                if g.get_setting(FINISHING_KEY) else None),
            "searcher": searcher,
            "fusion": state.setting(FUSION_KEY),
            "fusion_growth": fusion_growth(g),
            "tuned": info_data(g),
        }
        tuned = g.get_setting(TUNED_KEY)
    if args.json:
        print_json(data)
    else:
        print(f"{data['path']}: {data['items']} items (* = the space searched by default)")
        for s in data["spaces"]:
            mark = "*" if s["space"] == data["primary_space"] else " "
            print(f" {mark} {s['space']}  {s['kind']} dim={s['dim']} items={s['count']} "
                  f"index={s['index']} failures={s['failures']}")
        if data["upgrade"]:
            print(f"  upgrade: {data['upgrade']}")
        if searcher is not None:
            print(f"  search answers from {searcher['space'] or searcher['pipeline']} "
                  f"({searcher['searcher']}): {searcher['reason']}")
        fg = data["fusion_growth"]
        if fg and fg.get("fitted_on"):
            print(f"  fusion fit: fitted on {fg['fitted_on']} items, the fused space holds "
                  f"{fg['items']} (x{fg['growth']}); refit at {fg['refit_at']}"
                  + (" (due: the next index run refits)" if fg["due"] else ""))
        if data["payload_fields"]:
            shown = ", ".join(f"{f} ({'/'.join(sorted(t))})"
                              for f, t in sorted(data["payload_fields"].items()))
            print(f"  filterable fields (--where): {shown}")
        if isinstance(tuned, dict):
            print("\n".join(describe_lines(tuned, data["tuned"]["stale"])))
        else:
            print("  default pipeline: not tuned (run `galleria tune`)")
    return 0


def cmd_items(args: argparse.Namespace) -> int:
    where = parse_where(args.where) if args.where else None
    with Gallery.open(args.gallery, readonly=True) as g:
        if args.count:
            n = g.count_items(where, space=args.space)
            print(json.dumps({"count": n}) if args.json else n)
            return 0
        page = g.list_items(where, space=args.space, cursor=args.cursor, limit=args.limit)
    if args.json:
        for r in page.items:
            print(json.dumps(record_dict(r), default=json_default))
        print(json.dumps({"next_cursor": page.next_cursor}))
        return 0
    for r in page.items:
        meta = {k: v for k, v in r.meta.items() if k != "path"}
        print(f"{r.id}  {json.dumps(meta, default=json_default)}")
    if page.next_cursor:
        print(f"more: --cursor {page.next_cursor}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:

    with Gallery.open(args.gallery) as g:
        n = g.remove(args.ids)
        for sp in g.spaces():  # the index snapshot is a cache: a failure here loses nothing
            if not sp.count:
                continue
            try:
                g.save_index(sp.space)
            except (GalleriaError, OSError) as exc:
                logging.getLogger("galleria.cli").warning(
                    "removed, but could not save the index of %s (%s); the next search "
                    "rebuilds it", sp.space, exc)
    print(f"removed {n} vectors")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with Gallery.open(args.gallery, readonly=True) as g:
        rep = g.check(deep=not args.quick)
    if args.json:
        print_json(rep.to_dict())
    else:
        print(f"{rep.gallery}: {rep.items} items, {rep.segments} segments, "
              f"{rep.snapshots} index snapshots checked: "
              f"{'sound' if rep.ok else f'{len(rep.problems)} problems'}")
        for p in rep.problems:
            held = f"; holds {p.n_items} items: {', '.join(p.items[:5])}" if p.n_items else ""
            print(f"  {p.what}: {p.path}: {p.problem}{held}")
        if not rep.ok:
            print(f"run `galleria repair {rep.gallery}` to repair")
    return 0 if rep.ok else 1


def cmd_repair(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    threads = set_threads(args.threads)
    restored = restore_database(args.gallery)
    with Gallery.open(args.gallery) as g:
        with progress_bar(None, "repair", enabled=not args.quiet) as bar:
            rep = repair(g, reembed=not args.no_reembed, runtime=args.runtime,
                         threads=threads, progress=bar)
        rep.restored_database = restored
        after = g.check(deep=True)
    out = {**rep.to_dict(), "sound_after": after.ok,
           "remaining": [p.to_dict() for p in after.problems]}
    if args.json:
        print_json(out)
    else:
        if restored:
            print(restored)
        for f in rep.dropped_segments:
            print(f"  took damaged {f} out of the store")
        for sp, n in rep.reembedded.items():
            print(f"  re-embedded {n} items of {sp}")
        for sp, ids in rep.lost.items():
            print(f"  {len(ids)} items of {sp} are lost (their images are gone too): "
                  f"{', '.join(ids[:5])}; `galleria remove` them or restore the images")
        for f in rep.dropped_snapshots:
            print(f"  dropped damaged index file {f}")
        print(f"{rep.gallery}: rebuilt {len(rep.rebuilt_indexes)} indexes; "
              f"{'sound' if after.ok else f'{len(after.problems)} problems remain'}")
    return 0 if after.ok or all(p.what == "lost" for p in after.problems) else 1


def cmd_export_onnx(args: argparse.Namespace) -> int:
    extra = {k: v for k, v in (("size", args.size), ("resize", args.resize)) if v is not None}
    ext = create_extractor(args.model, pooling=args.pooling, scales=args.scales,
                           checkpoint=args.checkpoint, runtime="torch", **extra)
    if not isinstance(ext, TorchExtractor):
        raise InputError(f"{args.model} is not a torch model (it already runs as ONNX)")
    path = ext.export_onnx(args.out)
    print(f"wrote {path} and {path}.json  [{ext.fingerprint}]")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    threads = set_threads(args.threads)
    return run_eval_command(args, threads=threads)
