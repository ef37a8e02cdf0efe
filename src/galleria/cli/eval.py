"""``galleria eval``: parse the command's arguments, run :func:`evaluate_model`, print.

The evaluation itself (:mod:`galleria.eval.run`) takes plain values and returns
a dict of numbers; this module is the only place that reads ``argparse``
arguments and prints them.
"""

from __future__ import annotations

import argparse
from typing import Any

from galleria.cli.common import model_spec, print_json, progress_bar, progress_factory
from galleria.eval.datasets import TASKS, load_task, manifest_task
from galleria.eval.embed import task_image_count
from galleria.eval.local import evaluate_pipeline
from galleria.eval.run import EvalConfig, evaluate_model


def run_eval_command(args: argparse.Namespace, *, threads: int) -> int:
    """Run ``galleria eval`` with parsed ``args``; returns the exit code."""

    if args.list:
        for name, desc in TASKS.items():
            print(f"{name:<16} {desc}")
        return 0
    task = manifest_task(args.manifest) if args.manifest else load_task(args.dataset)
    n = task.num_gallery + task.num_queries
    if getattr(args, "local", None) or getattr(args, "pipeline", None):
        return _run_pipeline_eval(args, task, n)
    images = task_image_count(task)  # queries that are gallery images are embedded once
    with progress_bar(images, f"embed {task.name}", enabled=not args.quiet and images > 0) \
            as bar:
        config = EvalConfig(
            model=model_spec(args), qe=args.qe, qe_alpha=args.qe_alpha, dba=args.dba,
            transform=args.transform, dim=args.dim, transform_params=dict(args.param) or None,
            use_cache=not args.no_cache, batch_size=args.batch_size, workers=args.workers,
            runtime=args.runtime, threads=threads)
        out = evaluate_model(task, config, progress=bar,
                             fit_progress=progress_factory(enabled=not args.quiet))
    if args.json:
        print_json(out)
        return 0
    print(f"{out['dataset']} ({out['protocol']}, {out['queries']} queries, "
          f"{out['gallery']} gallery)  model={out['fingerprint']}  dim={out['dim']}")
    for k, v in out["metrics"].items():
        print(f"  {k:<10} {v:8.2f}")
    return 0


def _run_pipeline_eval(args: argparse.Namespace, task: Any, n: int) -> int:
    """``galleria eval --local ... --pipeline ...`` (galleria.eval.local)."""

    pipeline = args.pipeline or "local"
    with progress_bar(n, f"local features {task.name}", enabled=not args.quiet) as bar, \
            progress_bar(task.num_queries, f"search ({pipeline})", enabled=not args.quiet,
                         unit="query") as sbar:
        out = evaluate_pipeline(
            task, local=args.local or "sift", pipeline=pipeline, index=args.local_index,
            index_params=dict(args.index_param) or None, global_model=args.model,
            pipeline_params=dict(args.pipeline_param) or None, use_cache=not args.no_cache,
            workers=args.workers, progress=bar, search_progress=sbar)
    if args.json:
        print_json(out)
        return 0
    print(f"{out['dataset']} ({out['protocol']}, {out['queries']} queries, {out['gallery']} "
          f"gallery)  pipeline={out['pipeline']}  model={out['fingerprint']}")
    for k, v in out["metrics"].items():
        print(f"  {k:<10} {v:8.2f}")
    print(f"  search     {out['search_ms_per_query']:8.1f} ms/query")
    return 0
