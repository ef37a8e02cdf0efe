"""``galleria tune G``: choose the gallery's default pipeline from pseudo-queries; the
tuned part of ``galleria info``; the tuning step at the end of ``galleria index``."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from galleria.cli.common import print_json, progress_bar, set_threads, setup_logging
from galleria.errors import GalleriaError, InputError
from galleria.store.gallery import Gallery
from galleria.types import MISSING_KEY

log = logging.getLogger(__name__)


def add_tune_parser(sub: Any) -> None:
    s = sub.add_parser("tune", help="calibrate the gallery's default pipeline on pseudo-queries "
                                    "(phone-like views of its own images); --pipelines: choose "
                                    "among those instead")
    s.add_argument("gallery")
    s.add_argument("--n", type=int, default=100, help="gallery items sampled (default 100)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sample and the views")
    s.add_argument("--pipelines", default=None,
                   help="choose the default among these pipelines by pseudo-query MRR, "
                        "comma-separated (default: the gallery's spaces decide: hybrid with a "
                        "global and a local space)")
    s.add_argument("--budget-ms", type=float, default=None,
                   help="query-cost budget (ms per query, search only, this machine): the "
                        "hybrid's verification is reduced until it fits (default: none)")
    s.add_argument("--json", action="store_true", help="print the stored record as JSON")
    s.add_argument("--threads", type=int, default=None, help="compute threads (default: all)")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    s.set_defaults(func=cmd_tune)


def add_index_tune_args(p: argparse.ArgumentParser) -> None:
    """The tuning options of ``galleria index``."""
    p.add_argument("--no-tune", action="store_true",
                   help="do not choose the default pipeline at the end (run `galleria tune` "
                        "later); tuning runs only when the gallery has local features")
    p.add_argument("--tune-n", type=int, default=100,
                   help="gallery items sampled for the tuning step's pseudo-queries (default "
                        "100, seeded; `galleria tune G --n 200` for a finer choice)")


def run_tune(gallery_path: str, *, n: int = 100, seed: int = 0,
             pipelines: tuple[str, ...] | None = None, quiet: bool = False,
             budget_ms: float | None = None) -> dict[str, Any]:
    """Tune the gallery at ``gallery_path`` with a progress bar; returns the stored record."""
    from galleria.tune.tuner import TuneConfig, progress_total, tune_and_store  # lazy: PIL

    cfg = TuneConfig(n=n, seed=seed, pipelines=pipelines, budget_ms=budget_ms)
    with Gallery.open(gallery_path) as g, \
            progress_bar(progress_total(g, cfg), "tune", enabled=not quiet) as bar:
        return tune_and_store(g, cfg, progress=bar)


def cmd_tune(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    set_threads(args.threads)
    pipes = tuple(p.strip() for p in args.pipelines.split(",")) if args.pipelines else None
    rec = run_tune(args.gallery, n=args.n, seed=args.seed, pipelines=pipes, quiet=args.quiet,
                   budget_ms=args.budget_ms)
    if args.json:
        print_json(rec)
    else:
        print("\n".join(describe_lines(rec)))
    return 0


def tune_after_index(args: argparse.Namespace, gallery_path: str) -> None:
    """The last step of ``galleria index``: tune when the gallery has more than one
    candidate (local features), unless ``--no-tune``. A failure is reported, not fatal
    (the gallery is indexed; the default then follows its spaces)."""
    if getattr(args, "no_tune", False):
        return

    with Gallery.open(gallery_path, readonly=True) as g:
        if not g.state().of_kind("local"):
            return  # one candidate only (global): nothing to choose
    try:
        rec = run_tune(gallery_path, n=args.tune_n, quiet=args.quiet)
    except GalleriaError as exc:
        print(f"galleria index: tuning skipped: {exc} (run `galleria tune {gallery_path}`)")
        return
    if not getattr(args, "json", False):
        print(f"default pipeline: {rec['key']} ({rec['reason']}; {rec['seconds']:.0f} s)")


def result_probabilities(searcher: Any, res: Any, min_probability: float | None = None
                         ) -> tuple[Any, Any]:
    """``(result, probabilities or None)`` of a search, with ``min_probability`` applied
    (an InputError when it is asked on a searcher the gallery was not tuned for)."""
    from galleria.tune.record import at_least_probability, searcher_probabilities  # lazy: PIL

    if res is None:
        return None, None
    if min_probability is not None and not 0.0 <= min_probability <= 1.0:
        raise InputError(f"--min-probability must be in [0, 1]; got {min_probability}")
    prob = searcher_probabilities(searcher, res)
    if min_probability is not None:
        if prob is None:
            raise InputError("--min-probability needs match probabilities: this gallery was "
                             "not tuned for this pipeline (run `galleria tune G`), or the "
                             "upgrade job has not calibrated its rule yet; use --min-score (raw "
                             "score) instead")
        res, prob = at_least_probability(res, prob, min_probability)
    return res, prob


def result_rows(res: Any, prob: Any, q: int) -> list[dict[str, Any]]:
    """Query ``q``'s results as ``[{"id", "score", "probability"}]`` (missing left out;
    ``probability`` None without a calibration)."""
    from galleria.tune.record import PROB_DECIMALS  # lazy: PIL

    out = []
    for j, (i, s) in enumerate(zip(res.ids[q], res.scores[q], strict=True)):
        if i is None or (not isinstance(i, str) and int(i) == MISSING_KEY):
            continue
        p = None if prob is None else round(float(prob[q, j]), PROB_DECIMALS)
        out.append({"id": i.item() if hasattr(i, "item") else i, "score": round(float(s), 6),
                    "probability": p})
    return out


def info_data(g: Any) -> dict[str, Any] | None:
    """The tuned part of ``galleria info --json`` (``None``: never tuned)."""
    from galleria.tune.record import TUNED_KEY, tuned_summary  # lazy: PIL

    return tuned_summary(g.get_setting(TUNED_KEY), g.state())


def describe_lines(rec: dict[str, Any], stale: list[str] | None = None) -> list[str]:
    """Human-readable lines of a tuned record (``galleria tune`` and ``galleria info``)."""
    lines = [f"  default pipeline: {rec.get('key', rec.get('pipeline'))}  "
             f"({rec.get('reason')}; {rec.get('queries')} pseudo-queries, seed {rec.get('seed')}"
             f", {rec.get('created')})"]
    if stale:
        lines.append(f"  tuned record is stale: {'; '.join(stale)} (run `galleria tune`)")
    for c in rec.get("candidates", []):
        if not c.get("supported"):
            lines.append(f"    {c.get('key'):<28} unsupported: {str(c.get('error'))[:70]}")
            continue
        mark = "*" if c.get("key") == rec.get("key") else " "
        lines.append(f"  {mark} {c['key']:<28} R@1 {c['r1']:5.1f}  R@10 {c['r10']:5.1f}  "
                     f"MRR {c['mrr']:5.1f}  {c['ms_per_query']:8.1f} ms/query")
    return lines
