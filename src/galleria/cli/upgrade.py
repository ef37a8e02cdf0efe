"""``galleria upgrade``: move a live gallery to a new model (online backfilling).

Subcommands (the text of ``DESCRIPTION`` is what ``galleria upgrade --help`` prints).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from galleria.cli.common import (
    add_ray_args,
    add_run_args,
    print_json,
    progress_bar,
    ray_embedding,
    set_threads,
    setup_logging,
)
from galleria.errors import GalleriaError, InputError

DESCRIPTION = """Move a live gallery to a new model while search keeps serving (online
backfilling):

    galleria upgrade start GALLERY --new-model M      create the job (new space registered)
    galleria upgrade start GALLERY --fusion F         ... to a fused model (galleria fusion train)
    galleria upgrade start GALLERY --transform T      ... apply a fitted transform (no re-embedding)
    galleria upgrade start GALLERY --add-local sift   ... add local features to a global gallery
    galleria upgrade run GALLERY [--limit N] [--ray A] re-embed in batches (Ctrl-C, kill -9 safe)
    galleria upgrade status GALLERY                   fraction done, rate, ETA, failures
    galleria upgrade search GALLERY IMAGE... --rule R search during the backfill
    galleria upgrade train-transform GALLERY ...      train psi (new -> old) for the psi rules
    galleria upgrade finish GALLERY                   at 100 %: drop the old space

See docs/upgrade.md."""


def add_upgrade_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``upgrade`` with its subcommands to the main parser's ``subparsers``."""
    up = subparsers.add_parser(
        "upgrade", help="upgrade a gallery to a new model while it keeps serving",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = up.add_subparsers(dest="upgrade_command", required=True)

    s = sub.add_parser("start", help="create the upgrade job (a new model or any feature change)")
    s.add_argument("gallery")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--new-model", "-m", help="extractor (see `galleria models`)")
    what.add_argument("--fusion", default=None, metavar="F",
                      help="switch to a fused model (a `galleria fusion train` folder)")
    what.add_argument("--transform", default=None, metavar="T",
                      help="apply a fitted transform (a `galleria fit-transform` folder); "
                           "computed from the stored vectors")
    what.add_argument("--add-local", default=None, metavar="EXTRACTOR",
                      help="add local features (sift, xfeat) beside the global space")
    s.add_argument("--pooling", default=None)
    s.add_argument("--scales", type=float, nargs="+", default=[1.0])
    s.add_argument("--checkpoint", default=None)
    s.add_argument("--size", type=int, default=None)
    s.add_argument("--resize", default=None)
    s.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"])
    s.add_argument("--mode", default="online", choices=["online", "shadow"],
                   help="online: items move, merged search (default); shadow: old-only "
                        "search until finish (2x storage)")
    s.add_argument("--order", default="queries", choices=["queries", "random", "id", "priority"],
                   help="backfill order (queries: items the service's recent answers "
                        "returned, and their neighbours, first, then random; random: seeded; "
                        "priority: item meta 'priority')")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--calib-size", type=int, default=1000,
                   help="(old, new) pairs kept as the calibration cohort (0: none)")
    s.add_argument("--no-online-psi", action="store_true",
                   help="no online psi and no pseudo-query check (search uses rank-merge; "
                        "--add-local: the merged answers, unchecked)")
    s.add_argument("--pseudo-queries", type=int, default=None,
                   help="gallery items whose phone-like views check the rules (old answers, "
                        "merges, psi) on the gallery as it is (default 500; --add-local: "
                        "200, the global against the merged answers)")
    s.add_argument("--pseudo-scene", action="store_true",
                   help="--add-local: half of the guard's pseudo-queries placed in a "
                        "cluttered frame, as the tuner's (default: crops only)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--verbose", "-v", action="store_true")
    s.set_defaults(func=cmd_start)

    s = sub.add_parser("run", help="re-embed items with the new model (resumable)")
    s.add_argument("gallery")
    s.add_argument("--limit", type=int, default=None, help="process at most N items")
    s.add_argument("--order", default=None, choices=["queries", "random", "id", "priority"],
                   help="override the job's order")
    s.add_argument("--commit-every", type=int, default=256,
                   help="items per transaction (the most a crash loses)")
    s.add_argument("--retry-failed", action="store_true", help="retry images that failed")
    add_ray_args(s)
    s.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"])
    s.add_argument("--json", action="store_true")
    add_run_args(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="how far the backfill is")
    s.add_argument("gallery")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("finish", help="at 100 %%: drop the old vectors, switch to the new model")
    s.add_argument("gallery")
    s.add_argument("--force", action="store_true",
                   help="remove items that could not be re-embedded instead of refusing")
    s.add_argument("--json", action="store_true")
    s.add_argument("--verbose", "-v", action="store_true")
    s.set_defaults(func=cmd_finish)

    s = sub.add_parser("search", help="search during the backfill")
    s.add_argument("gallery")
    s.add_argument("images", nargs="+")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--rule", default="auto",
                   choices=["auto", "naive", "rank-merge", "psi", "fused",
                            "metric-compatible", "old-only", "both", "ensemble", "rescore",
                            "hybrid"],
                   help="how the old and new spaces' results are merged (auto: the best "
                        "the job supports; hybrid: --add-local only; docs/upgrade.md)")
    s.add_argument("--psi", default=None, help="a trained map folder (default: the job's)")
    s.add_argument("--calibration", default=None,
                   choices=["znorm-top", "znorm", "quantile", "affine", "identity"],
                   help="score normalisation of the two parts (default: znorm-top for "
                        "rank-merge/psi, identity otherwise)")
    s.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"])
    s.add_argument("--json", action="store_true")
    s.add_argument("--cost", action="store_true", help="print the query cost")
    add_run_args(s)
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("train-transform",
                       help="train psi: new -> old (regression, metric-compatible) or a BCT head")
    s.add_argument("gallery")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder or CSV manifest embedded with both models")
    src.add_argument("--from-job", action="store_true",
                     help="use the (old, new) pairs the backfill collected (regression)")
    s.add_argument("--kind", default="regression",
                   choices=["regression", "metric-compatible", "bct"],
                   help="regression: psi fitted to map new vectors to old ones (default); "
                        "metric-compatible: trained with class labels; bct: a backward-"
                        "compatible head on the new model")
    s.add_argument("--label-column", default=None, help="manifest column with class labels")
    s.add_argument("--split-column", default=None, help="manifest column to filter on")
    s.add_argument("--split", default=None, help="value of --split-column to keep (e.g. train)")
    s.add_argument("--out", default=None, help="folder (default: inside the gallery's job)")
    s.add_argument("--epochs", type=int, default=None,
                   help="training passes (default: the kind's own)")
    s.add_argument("--hidden", type=int, default=None, help="hidden width (0: linear)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"])
    s.add_argument("--json", action="store_true")
    add_run_args(s)
    s.set_defaults(func=cmd_train_transform)
    return up


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    n = round(s)
    h, rem = divmod(n, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def cmd_start(args: argparse.Namespace) -> int:
    from galleria.upgrade import change  # lazy: PIL
    from galleria.upgrade.job import start_upgrade  # lazy: PIL
    from galleria.upgrade.online import OnlineConfig  # lazy: PIL

    setup_logging(args.verbose)
    if args.pseudo_scene and not args.add_local:
        raise InputError("--pseudo-scene applies to --add-local only (the local change's "
                         "guard); a model, fusion or transform change uses crops")
    common = {"order": args.order, "seed": args.seed, "calib_size": args.calib_size}
    online = OnlineConfig(enabled=not args.no_online_psi, seed=args.seed,
                          pseudo_queries=500 if args.pseudo_queries is None
                          else args.pseudo_queries)
    if args.transform:
        state = change.start_transform(args.gallery, args.transform, **common)
    elif args.add_local:
        from galleria.upgrade.local_guard import LocalGuardConfig  # lazy: PIL

        guard = LocalGuardConfig(enabled=not args.no_online_psi, seed=args.seed,
                                 scene=args.pseudo_scene,
                                 **({"pseudo_queries": args.pseudo_queries}
                                    if args.pseudo_queries is not None else {}))
        state = change.start_local(args.gallery, args.add_local, runtime=args.runtime,
                                   guard=guard, **common)
    elif args.fusion:
        state = change.start_fusion(args.gallery, args.fusion, runtime=args.runtime,
                                    mode=args.mode, online=online, **common)
    else:
        state = start_upgrade(
            args.gallery, args.new_model, pooling=args.pooling, scales=args.scales,
            checkpoint=args.checkpoint, size=args.size, resize=args.resize,
            runtime=args.runtime, mode=args.mode, online=online, **common,
        )
    if args.json:
        print_json(state.to_dict())
    else:
        print(f"upgrade ({state.change}) started on {args.gallery}: {state.old_space} -> "
              f"{state.new_space} ({state.mode}, order {state.order}, seed {state.seed})")
        print("next: galleria upgrade run " + args.gallery)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from galleria.upgrade.job import run_upgrade, upgrade_status  # lazy: PIL

    setup_logging(args.verbose)
    threads = set_threads(args.threads)
    st = upgrade_status(args.gallery)
    total = st.total if args.limit is None else min(st.total, st.done + args.limit)
    remote = ray_embedding(args)
    try:
        with progress_bar(total, "upgrade", enabled=not args.quiet) as bar:
            bar.update(st.done)
            report = run_upgrade(
                args.gallery, limit=args.limit, order=args.order, runtime=args.runtime,
                threads=threads, batch_size=args.batch_size, workers=args.workers,
                commit_every=args.commit_every, retry_failed=args.retry_failed, progress=bar,
                embedder=None if remote is None else remote[1],
            )
    finally:
        if remote is not None:
            remote[1].close()
            remote[0].close()
    if args.json:
        print_json(report.to_dict())
    else:
        what = "interrupted" if report.interrupted else "done"
        print(f"{report.gallery}: {what}: moved {report.moved} items in "
              f"{report.seconds:.1f} s ({report.items_per_s:.1f} items/s), "
              f"{len(report.failed)} failed, {report.remaining} remaining")
        for f in report.failed[:20]:
            print(f"  cannot re-embed {f.id}: {f.reason}")
    return 130 if report.interrupted else 0


def cmd_status(args: argparse.Namespace) -> int:
    from galleria.upgrade.job import upgrade_status  # lazy: PIL

    st = upgrade_status(args.gallery)
    d = st.to_dict()
    if args.json:
        print_json(d)
        return 0
    print(f"{d['gallery']}: upgrade ({d['change']}) {d['old_space']} -> {d['new_space']} "
          f"({d['mode']}, order {d['order']})")
    print(f"  done      {d['done']} / {d['total']}  ({100 * d['fraction']:.1f} %)")
    print(f"  remaining {d['remaining']}  (failed: {d['failed']})")
    rate = d["items_per_s"]
    print(f"  rate      {'?' if rate is None else f'{rate:.1f} items/s'} "
          f"({'running' if d['running'] else 'last run'})   ETA {_fmt_s(d['eta_s'])}")
    print(f"  consistent: {d['consistent']} (in both spaces: {d['in_both_spaces']}, "
          f"in neither: {d['in_neither_space']})")
    if d["transforms"]:
        print(f"  transforms: {', '.join(d['transforms'])}")
    o = d.get("online_psi")
    if o and d["change"] == "local":
        _print_local_guard(o)
    elif o:
        mrr = ", ".join(f"{r} {v['mrr']:.1f}" for r, v in (o.get("scores") or {}).items())
        print(f"  online psi: search uses {o['rule']} ({o['source']}, {o['pairs']} pairs, "
              f"{o['fits']} fits, {o['total_s']:.1f} s" + (f"; pseudo-query MRR {mrr}" if mrr
                                                          else "; not checked") + ")")
        v = o.get("verdict") or {}
        if v.get("merged_vs_old") == "worse":
            print(f"  note: on this gallery's pseudo-queries the merged answers ({v['merge_rule']}"
                  f") are worse than the old model's (MRR {v['gain']:+.1f} points at "
                  f"{o.get('moved')} items moved): search serves the old answers; the new "
                  "model may be worse than the old one here -- check before `finish`")
    for f in d["failures"][:10]:
        print(f"  failed {f['id']}: {f['reason']}")
    if d["fraction"] >= 1.0 and not d["failed"]:
        print("  at 100 %: run `galleria upgrade finish " + args.gallery + "`")
    return 0


def _print_local_guard(o: dict) -> None:
    """The old-answers guard of a local-feature change (upgrade/local_guard.py)."""
    sc = o.get("scores") or {}
    names = {"rank-merge": "merged", "hybrid": "hybrid", "old-only": "global"}
    mrr = ", ".join(f"{names.get(r, r)} {v['mrr']:.1f}" for r, v in sc.items())
    serves = f"the {names.get(str(o.get('rule')), 'global')} answers"
    print(f"  guard: search serves {serves} ({o.get('checks')} checks, the last at "
          f"{o.get('moved')} items, "
          f"{o.get('total_s') or 0:.1f} s in all" + (f"; pseudo-query MRR {mrr}" if mrr else "")
          + ")")
    if (o.get("verdict") or {}).get("merged_vs_old") == "worse":
        print("  note: on this gallery's pseudo-queries the merged answers are worse than the "
              "global ones: the local features may not help here -- check before `finish` "
              "(after it the default search is the hybrid pipeline)")


def cmd_finish(args: argparse.Namespace) -> int:
    from galleria.upgrade.job import finish_upgrade  # lazy: PIL

    setup_logging(args.verbose)
    rep = finish_upgrade(args.gallery, force=args.force)
    if args.json:
        print_json(rep.to_dict())
    else:
        print(f"{rep.gallery}: upgrade finished: {rep.items} items now in {rep.new_space}; "
              f"old space {rep.old_space} dropped"
              + (f"; removed {len(rep.dropped_failed)} unreadable items"
                 if rep.dropped_failed else ""))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from galleria.upgrade.search import BackfillSearcher  # lazy: PIL

    setup_logging(args.verbose)
    threads = set_threads(args.threads)
    searcher = BackfillSearcher.open(args.gallery, rule=args.rule, psi=args.psi,
                                     calibration=args.calibration, runtime=args.runtime,
                                     threads=threads)
    queries, res, fails = searcher.search_paths(args.images, args.k)
    for f in fails:
        print(f"galleria upgrade search: cannot read query {f.path}: {f.reason}",
              file=sys.stderr)
    out: list[dict[str, Any]] = []
    if res is not None:
        for q, path in enumerate(queries):
            out.append({"query": path, "rule": searcher.rule,
                        "results": [{"id": i, "score": round(s, 6)} for i, s in res.row(q)]})
    cost = searcher.cost.per_query()
    if args.json:
        print_json({"rule": searcher.rule, "calibration": searcher.calibration.info,
                    "results": out, "cost": cost} if args.cost else out)
    else:
        print(f"rule: {searcher.rule} (calibration: "
              f"{searcher.calibration.info.get('kind', 'identity')})")
        for row in out:
            print(row["query"])
            for n, r in enumerate(row["results"], 1):
                print(f"  {n:>3}. {r['score']:.4f}  {r['id']}")
        if args.cost:
            print(f"cost per query: {cost['forward_passes_per_query']:.1f} forward passes, "
                  f"{cost['total_ms_per_query']:.1f} ms {cost['ms_per_query']}")
    return 1 if fails and not out else 0


def cmd_train_transform(args: argparse.Namespace) -> int:
    from galleria.upgrade.train import train_transform  # lazy: PIL

    setup_logging(args.verbose)
    threads = set_threads(args.threads)
    params = {k: v for k, v in (("epochs", args.epochs), ("hidden", args.hidden),
                                ("seed", args.seed)) if v is not None}
    with progress_bar(None, "embed pairs", enabled=not args.quiet) as bar:
        folder, the_map = train_transform(
            args.gallery, kind=args.kind, images=args.images, from_job=args.from_job,
            label_column=args.label_column, split_column=args.split_column, split=args.split,
            out=args.out, params=params, runtime=args.runtime, threads=threads,
            batch_size=args.batch_size, workers=args.workers, progress=bar,
        )
    info = {"folder": str(folder), "kind": args.kind, "map": the_map.fingerprint,
            "old_fingerprint": the_map.old_fingerprint_,
            "new_fingerprint": the_map.new_fingerprint_, "info": the_map.info_}
    if args.json:
        print_json(info)
    else:
        print(f"trained {args.kind} map -> {folder}")
        print(f"  {the_map.new_fingerprint_} -> {the_map.old_fingerprint_}")
        v = the_map.info_.get("val_cosine_to_old")
        if v is not None:
            print(f"  held-out cos(psi(new), old) = {v:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m galleria.cli.upgrade upgrade ...``), as ``galleria``."""

    parser = argparse.ArgumentParser(prog="galleria")
    sub = parser.add_subparsers(dest="command", required=True)
    add_upgrade_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GalleriaError as exc:
        print(f"galleria upgrade {args.upgrade_command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"galleria upgrade {args.upgrade_command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
