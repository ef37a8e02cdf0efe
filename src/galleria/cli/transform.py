"""``galleria fit-transform``: fit PCA / whitening / AE-SVC / (SS)2D on a gallery."""

from __future__ import annotations

import argparse
from typing import Any

from galleria.cli.common import (
    key_value,
    print_json,
    progress_factory,
    set_threads,
    setup_logging,
)
from galleria.store.gallery import Gallery
from galleria.transforms.analysis import cosine_similarity_stats, plot_similarity_histograms


def add_transform_parser(sub: Any) -> None:
    s = sub.add_parser(
        "fit-transform",
        help="fit a transform (pca, pca-whiten, aesvc, ss2d, ...) on a gallery's vectors",
        description="Fit a transform on the vectors of a gallery space (no labels) and save it. "
        "With --apply, add the transformed space to the gallery and make it the one searched "
        "(queries then go through the same transform automatically).",
    )
    s.add_argument("gallery")
    s.add_argument("--kind", required=True,
                   help="center, pca, pca-whiten, pca-whiten-reg, aesvc, ss2d, ssd, matryoshka")
    s.add_argument("--dim", type=int, default=None, help="output dimension (max for nested)")
    s.add_argument("--out", "-o", required=True, help="folder to save the fitted transform")
    s.add_argument("--space", default=None,
                   help="space to fit on (default: the model's own space under the primary)")
    s.add_argument("--stack", action="store_true",
                   help="allow fitting on a space that is itself a transform output "
                   "(saved only: a stacked transform cannot be applied)")
    s.add_argument("--replace", action="store_true",
                   help="with --apply: replace the gallery's existing transformed space of "
                   "the same base (it is dropped once the new space is complete)")
    s.add_argument("--sample", type=int, default=None, help="fit on a random sample of N")
    s.add_argument("--param", type=key_value, action="append", default=[],
                   help="extra transform parameter KEY=VALUE (JSON value), repeatable")
    s.add_argument("--apply", action="store_true",
                   help="add the transformed space to the gallery and search it by default")
    s.add_argument("--index", default=None, help="index of the new space (exact, HNSW32, ...)")
    s.add_argument("--histogram", default=None,
                   help="write a PNG of the cosine-similarity distribution before/after")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", "-q", action="store_true")
    s.add_argument("--verbose", "-v", action="store_true")
    s.set_defaults(func=cmd_fit_transform)


def cmd_fit_transform(args: argparse.Namespace) -> int:
    from galleria.transforms.attach import (  # lazy: CLI start-up
        add_transformed_space,
        check_can_apply,
        fit_on_gallery,
        fit_space,
    )

    setup_logging(args.verbose)
    set_threads(args.threads)
    progress = progress_factory(enabled=not args.quiet)
    with Gallery.open(args.gallery) as g:
        primary = g.primary_space
        space = fit_space(g, args.space, stack=args.stack)
        info = g.space_info(space)
        if args.apply:  # refuse before a possibly long fit: stacking, or a second transform
            # (a transformed space that is not primary is an apply killed before it
            # finished: the check after the fit lets the same transform complete it)
            check_can_apply(g, space, replace=args.replace or primary == space)
        tr, stats = fit_on_gallery(g, args.kind, dim=args.dim, space=space, stack=args.stack,
                                   sample=args.sample, progress=progress, **dict(args.param))
        tr.save(args.out)
        _, x = g.load_vectors(info.space)
        before = cosine_similarity_stats(x)
        after = cosine_similarity_stats(tr.transform(x, fingerprint=info.space))
        stats.update({"kind": args.kind, "output_dim": int(tr.output_dim_), "saved": args.out,
                      "cosine_variance_before": before["variance"],
                      "cosine_variance_after": after["variance"]})
        if args.histogram:
            plot_similarity_histograms(
                {"raw": x, f"{args.kind} {tr.output_dim_}-d": tr.transform(
                    x, fingerprint=info.space)}, args.histogram)
        if args.apply:
            stats["replaced"] = check_can_apply(g, space, replace=args.replace,
                                                output_fingerprint=tr.output_fingerprint)
            stats["new_space"] = add_transformed_space(g, tr, args.out, space=info.space,
                                                       index=args.index, replace=args.replace)
    if args.json:
        print_json(stats)
    else:
        if args.space is None and stats["input_fingerprint"] != primary:
            print(f"the primary space is a transform output: fitted on the model's space "
                  f"{stats['input_fingerprint']}")
        print(f"fitted {args.kind} ({stats['output_dim']}-d) on {stats['fitted_on']} vectors in "
              f"{stats['fit_seconds']} s -> {args.out}")
        print(f"cosine-similarity variance {stats['cosine_variance_before']:.5f} -> "
              f"{stats['cosine_variance_after']:.5f}")
        if args.apply:
            print(f"gallery now searches {stats['new_space']}")
            for old in stats["replaced"]:
                print(f"replaced (dropped) {old}")
    return 0
