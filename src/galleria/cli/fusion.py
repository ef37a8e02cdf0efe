"""``galleria fusion``: train an asymmetric feature-fusion model (rich fused gallery,
light query model). ``DESCRIPTION`` is what ``galleria fusion --help`` prints."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any

from tqdm import tqdm

from galleria.cli.common import add_run_args, print_json, set_threads, setup_logging
from galleria.fusion.adapt import AdaptConfig
from galleria.store.gallery import Gallery

DESCRIPTION = """Train an asymmetric feature-fusion model: a fused gallery (several member
models and a mixer) searched with a light query model.

    galleria fusion train --gallery-models M1,M2[,sift] --query-model effnet-lite0 \\
        --images MANIFEST [--label-column C] --out F     (resumable: rerun the same command)
    galleria fusion info F                               members, recipe, fingerprint
    galleria fusion adapt G [--refit | --reset]          fit the light query to gallery G
    galleria fusion status G                             which space answers G, and why

F is then used by `galleria index SRC --fusion F` (the fused gallery); searches embed
queries with its light model. `index --fusion` then adapts the light query to the
gallery with no labels (as `fusion adapt G` does on demand). See docs/fusion.md."""


def add_fusion_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``fusion`` with its subcommands to the main parser's ``subparsers``."""
    from galleria.fusion.anchor import ANCHOR_KINDS  # lazy: CLI start-up
    from galleria.fusion.recipe import DEFAULT_MEMBERS, QUERY_INITS, FusionRecipe  # lazy: CLI

    d = FusionRecipe()
    fu = subparsers.add_parser(
        "fusion", help="train a fused gallery + light query model (asymmetric feature fusion)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = fu.add_subparsers(dest="fusion_command", required=True)
    s = sub.add_parser("train", help="train a fusion model from a folder or manifest (resumable)")
    s.add_argument("--gallery-models", default=",".join(DEFAULT_MEMBERS),
                   help="comma-separated member extractors (registry names, effnet-lite2-ms, "
                        "local: sift/xfeat)")
    s.add_argument("--query-model", default=d.query_model, choices=["effnet-lite0"],
                   help="the light model that embeds queries (default %(default)s)")
    s.add_argument("--images", required=True, help="folder or CSV manifest of training images")
    s.add_argument("--label-column", default=None,
                   help="manifest column with class/instance labels (default: instance "
                        "discrimination with phone-like views)")
    s.add_argument("--out", "-o", required=True, help="fusion model folder to write")
    s.add_argument("--work", default=None, help="cache folder (default: OUT.work)")
    g = s.add_argument_group("recipe")
    g.add_argument("--dim", type=int, default=d.d, help="fused vector dimension d")
    g.add_argument("--mixer", default=d.mixer, choices=["transformer", "mlp"],
                   help="the network fusing the members' features (default %(default)s)")
    g.add_argument("--layers", type=int, default=d.layers, help="transformer layers C")
    g.add_argument("--heads", type=int, default=d.heads,
                   help="attention heads of the transformer mixer (default %(default)s)")
    g.add_argument("--momentum", type=float, default=d.momentum,
                   help="momentum of the ArcFace class centres (default %(default)s)")
    g.add_argument("--margin", type=float, default=d.margin,
                   help="ArcFace angular margin (default %(default)s)")
    g.add_argument("--scale", type=float, default=d.scale,
                   help="ArcFace logit scale (default %(default)s)")
    g.add_argument("--schedule", default=d.schedule, choices=["joint", "two-stage"],
                   help="train mixer and query model together (joint) or the mixer first "
                        "(default %(default)s)")
    g.add_argument("--train-blocks", type=int, default=d.train_blocks,
                   help="trained MBConv blocks at the end of the query trunk (-1: whitening "
                        "only)")
    g.add_argument("--views", type=int, default=d.n_views, help="query views per image")
    g.add_argument("--epochs", type=int, default=d.epochs,
                   help="passes over the training images (default %(default)s)")
    g.add_argument("--min-steps", type=int, default=d.min_steps,
                   help="small sets train more epochs, up to this many steps")
    g.add_argument("--warmup", type=float, default=d.warmup, help="warm-up share of the steps")
    g.add_argument("--batch", type=int, default=d.batch_size, help="images per step")
    g.add_argument("--lr", type=float, default=d.lr,
                   help="learning rate of the mixer (default %(default)s)")
    g.add_argument("--query-lr", type=float, default=d.query_lr,
                   help="learning rate of the query model (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay (default %(default)s)")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="epochs without a held-out gain before stopping (default "
                        "%(default)s)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the classes held out for early stopping (default "
                        "%(default)s)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=d.anchor,
                   help="start the mixer from a closed-form linear fusion of the member "
                        "features (a fixed anchor plus the gated mixer)")
    g.add_argument("--anchor-kind", default=d.anchor_kind, choices=list(ANCHOR_KINDS),
                   help="the anchor: learned whitening (shrinkage chosen on held-out "
                        "classes) or PCA of the concatenation")
    g.add_argument("--select-inputs", action=argparse.BooleanOptionalAction,
                   default=d.select_inputs,
                   help="drop member inputs whose removal raises the held-out score")
    g.add_argument("--query-norm", action=argparse.BooleanOptionalAction, default=d.query_norm,
                   help="L2-normalise the query's pooled features before its whitening")
    g.add_argument("--distill", type=float, default=d.distill,
                   help="weight of the query-to-gallery cosine term (0: ArcFace terms only)")
    g.add_argument("--query-init", default=d.query_init, choices=list(QUERY_INITS),
                   help="query whitening start: PCA of its features, regressed on the "
                        "untrained mixer's output, or the anchor of the predicted "
                        "concatenation (predict)")
    g.add_argument("--top-n", type=int, default=64, help="descriptors kept per local member")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    add_run_args(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("info", help="describe a fusion model folder")
    s.add_argument("model", help="a fusion model folder (written by galleria fusion train)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    a = AdaptConfig()
    s = sub.add_parser(
        "adapt", help="fit the light query to a fused gallery (no labels; resumable)",
        description="Bring the gallery's light space up to date and fit the light query's "
                    "map to this gallery, chosen on pseudo-queries (phone-like views of its "
                    "own images); the light model's own vectors answer when they score "
                    "better. Without --refit, fits only when due (first time, or the fused "
                    "space grew past the refit threshold).")
    s.add_argument("gallery")
    s.add_argument("--refit", action="store_true", help="fit now even if not due")
    s.add_argument("--reset", action="store_true",
                   help="undo: the trained query and the fused space answer again")
    s.add_argument("--views", type=int, default=None, help=f"views per item ({a.views})")
    s.add_argument("--view-items", type=int, default=None,
                   help=f"items whose views are made ({a.view_items})")
    s.add_argument("--pseudo-items", type=int, default=None,
                   help=f"held-out items scored ({a.pseudo_items})")
    s.add_argument("--margin", type=float, default=None,
                   help="out of domain: decide on pseudo-queries (instead of answering from the "
                        "light model), the fused space winning when its MRR is higher by this "
                        f"many points ({a.margin:g})")
    s.add_argument("--in-domain", type=float, default=None, dest="in_domain",
                   help="|mean fused| / |mean light| below this: the gallery is of the fused "
                        f"model's domain and the fused space answers ({a.in_domain:g})")
    s.add_argument("--homogeneous", type=float, default=None,
                   help="|mean light| at or above this (out of domain): the fused space "
                        f"whitened on the gallery answers ({a.homogeneous:g})")
    s.add_argument("--min-items", type=int, default=None,
                   help=f"fewer items: no fit ({a.min_items})")
    s.add_argument("--refit-growth", type=float, default=None,
                   help=f"refit when the gallery reaches this many times the fitted items "
                        f"({a.refit_growth:g})")
    s.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"])
    s.add_argument("--json", action="store_true")
    add_run_args(s)
    s.set_defaults(func=cmd_adapt)

    s = sub.add_parser("status", help="which space of a fused gallery answers, and why")
    s.add_argument("gallery")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    return fu


def _progress(enabled: bool) -> Any:


    show = enabled and (os.environ.get("GALLERIA_PROGRESS") == "1" or sys.stderr.isatty())
    return functools.partial(tqdm, disable=not show, dynamic_ncols=True)


def cmd_train(args: argparse.Namespace) -> int:
    from galleria.fusion.pipeline import train_from_manifest  # lazy: PIL
    from galleria.fusion.train import FusionRecipe  # lazy: torch

    setup_logging(args.verbose)
    threads = set_threads(args.threads)
    recipe = FusionRecipe(
        d=args.dim, mixer=args.mixer, layers=args.layers, heads=args.heads,
        momentum=args.momentum, margin=args.margin, scale=args.scale, schedule=args.schedule,
        query_model=args.query_model, train_blocks=args.train_blocks, n_views=args.views,
        epochs=args.epochs, min_steps=args.min_steps, warmup=args.warmup,
        batch_size=args.batch, lr=args.lr, query_lr=args.query_lr,
        weight_decay=args.weight_decay, patience=args.patience,
        val_fraction=args.val_fraction, seed=args.seed, anchor=args.anchor,
        anchor_kind=args.anchor_kind, select_inputs=args.select_inputs,
        distill=args.distill, query_init=args.query_init, query_norm=args.query_norm,
    )
    from galleria.fusion.members import split_members  # lazy: torch

    members = split_members(args.gallery_models)
    report = train_from_manifest(
        args.images, args.out, gallery_models=members, label_column=args.label_column,
        recipe=recipe, work=args.work, top_n=args.top_n, threads=threads,
        batch_size=args.batch_size, workers=args.workers, progress=_progress(not args.quiet),
    )
    if args.json:
        print_json(report)
    else:
        print(f"{report['out']}: fusion model {report['fingerprint']}")
        print(f"  {report['images']} images ({len(report['skipped'])} skipped), "
              f"{report['classes']} training classes, {report['n_val']} held out")
        print(f"  features {report['features_seconds']} s, views {report['views_seconds']} s, "
              f"training {report['train_seconds']} s (best epoch {report['best_epoch']})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from galleria.fusion.model import FusionModel  # lazy: torch

    m = FusionModel.load(args.model)
    h = m.header()
    if args.json:
        print_json(h)
        return 0
    print(f"{args.model}: {m.fingerprint} (d = {m.dim})")
    for mem, spec in zip(m.members, m.specs, strict=True):
        print(f"  member {spec.name:<16} {spec.kind:<6} {spec.stored_dim:>6}-d  "
              f"{mem['fingerprint']}")
    qp = m.query_params
    print(f"  query  {qp['model']} (trained blocks: {qp['train_blocks']}) -> {m.dim}-d, ONNX")
    print(f"  mixer  {m.mixer_params}")
    return 0


def run_adaptation(gallery: str, *, threads: int | None, runtime: str = "auto",
                   quiet: bool = False, updated: Any = (), refit: bool = False,
                   config: Any = None, batch_size: int = 32, workers: int = 2
                   ) -> dict[str, Any]:
    """:func:`galleria.fusion.adapt_job.adapt_gallery` with the CLI's progress bars (what
    ``galleria index --fusion`` runs after indexing)."""
    from galleria.fusion.adapt_job import adapt_gallery  # lazy: torch

    return adapt_gallery(gallery, config=config, refit=refit, updated=list(updated),
                         runtime=runtime, threads=threads, batch_size=batch_size,
                         workers=workers, progress=_progress(not quiet))


def describe(rep: dict[str, Any]) -> str:
    """One line: which space answers and why (an adaptation report or a recorded state)."""
    space = rep.get("space") or (rep["light_space"] if rep.get("answer") == "light"
                                 else (rep.get("whitening") or {}).get("space")
                                 or rep.get("fused_space"))
    what = {"light": "the light model's own vectors",
            "whitened": "light query -> the fused gallery whitened on itself"}.get(
        str(rep.get("answer")), "light query -> fused gallery")
    return f"answers: {what} [{space}]: {rep.get('reason') or rep.get('fit', '')}"


def cmd_adapt(args: argparse.Namespace) -> int:
    from galleria.fusion.adapt_job import fusion_state, reset  # lazy: torch

    setup_logging(args.verbose)
    threads = set_threads(args.threads)
    if args.reset:
        with Gallery.open(args.gallery) as g:
            reset(g)
        print(f"{args.gallery}: adaptation undone; the trained query and the fused space answer")
        return 0
    over = {k: v for k, v in {"views": args.views, "view_items": args.view_items,
                              "pseudo_items": args.pseudo_items, "margin": args.margin,
                              "in_domain": args.in_domain, "homogeneous": args.homogeneous,
                              "min_items": args.min_items,
                              "refit_growth": args.refit_growth}.items() if v is not None}
    if args.margin is not None:
        over["out_of_domain"] = "pseudo-queries"
    config = None
    if over:
        with Gallery.open(args.gallery, readonly=True) as g:
            rec = fusion_state(g) or {}
        base = rec.get("config") or AdaptConfig().to_dict()
        config = AdaptConfig.from_dict({**base, **over})
    rep = run_adaptation(args.gallery, threads=threads, runtime=args.runtime,
                         quiet=args.quiet, refit=args.refit or bool(over), config=config,
                         batch_size=args.batch_size, workers=args.workers)
    if args.json:
        print_json(rep)
    else:
        print(f"{args.gallery}: {rep['light_embedded']} light vectors added "
              f"({rep['light_missing']} images unreadable); fit: {rep['fit']}")
        with Gallery.open(args.gallery, readonly=True) as g:
            st = fusion_state(g) or {}
        print("  " + describe(st))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from galleria.fusion.adapt_job import fused_spaces, fusion_state  # lazy: torch

    with Gallery.open(args.gallery, readonly=True) as g:
        spaces = fused_spaces(g)
        st = fusion_state(g)
        primary = g.primary_space
    if args.json:
        print_json({"primary_space": primary, "fusion": st})
        return 0
    if spaces is None:
        print(f"{args.gallery}: no fused space")
        return 1
    if st is None:
        print(f"{args.gallery}: fused space {spaces.fused}, never adapted (the trained query "
              "answers; run galleria fusion adapt)")
        return 0
    print(f"{args.gallery}: {describe(st)}")
    sc = st.get("scores") or {}
    if sc:
        ch = sc["chosen"]
        print(f"  query map: {ch['name']}" + (f" (ridge {ch['ridge']} towards {ch['prior']})"
                                               if ch["name"] == "ridge" else "")
              + f"; pseudo-query MRR: chosen {ch['mrr']:.1f}, trained "
              f"{(sc.get('trained') or {}).get('mrr', float('nan')):.1f}, light alone "
              f"{sc['light']['mrr']:.1f}")
        cos = st.get("cosine") or {}
        print(f"  median cosine light -> fused of the same image: trained "
              f"{cos.get('trained')}, adapted {cos.get('adapted')}")
    print(f"  fitted on {st.get('n_items')} items; refit at {st.get('refit_at')}")
    return 0
