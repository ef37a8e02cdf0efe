"""Retrieval quality of every built-in extractor on the shared real data sets.

Rows: model x pooling (GeM p=3, mean), plus the settings of the independent
reference script (whole image squashed to the input size) where galleria's
default preprocessing differs. Columns: SMVS all-vs-all mAP and R@1, SMVS
phone->reference R@1, UKBench56 N-S, rparis250 Medium/Hard mAP (bbx-cropped
queries, official protocol), Caltech-101 mAP@R and R@1 (test queries vs train
gallery). Second table: ROxford5k from the LOPQ descriptors with the classical
post-processing (cosine, PCA-whitening, alpha-QE, DBA).

Run:  .venv/bin/python benchmarks/bench_quality.py [--quick]
Writes benchmarks/results/quality.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, markdown_table, write_results
from galleria.cli.common import set_threads
from galleria.eval.run import evaluate_model

# (label, model, options)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("effnet-lite0 GeM", "effnet-lite0", {}),
    ("effnet-lite0 mean", "effnet-lite0", {"pooling": "mean"}),
    ("effnet-lite2 GeM", "effnet-lite2", {}),
    ("effnet-lite2 mean", "effnet-lite2", {"pooling": "mean"}),
    ("opennsfw-r50 GeM (crop, default)", "opennsfw-r50", {}),
    ("opennsfw-r50 GeM (squash, ref. setting)", "opennsfw-r50", {"resize": "squash"}),
    ("opennsfw-r50 mean (crop)", "opennsfw-r50", {"pooling": "mean"}),
]
MS_CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("effnet-lite2 GeM multi-scale (1, 0.707, 1.414)", "effnet-lite2",
     {"scales": (1.0, 0.7071, 1.4142)}),
]
# (task, metric) columns
COLUMNS = [
    ("smvs", "mAP"), ("smvs", "R@1"), ("smvs-ref", "R@1"), ("ukbench56", "N-S"),
    ("rparis250", "M_mAP"), ("rparis250", "H_mAP"), ("caltech101", "mAP@R"),
    ("caltech101", "R@1"),
]
# the independent plain script of the issue: squash resize, GeM p=3, L2, cosine
REFERENCE = {
    ("effnet-lite0", "smvs", "mAP"): 22.2, ("effnet-lite0", "caltech101", "mAP@R"): 63.4,
    ("effnet-lite0", "rparis250", "M_mAP"): 90.4, ("effnet-lite0", "rparis250", "H_mAP"): 68.1,
    ("effnet-lite2", "smvs", "mAP"): 22.6, ("effnet-lite2", "caltech101", "mAP@R"): 66.7,
    ("effnet-lite2", "rparis250", "M_mAP"): 87.6, ("effnet-lite2", "rparis250", "H_mAP"): 59.4,
    ("opennsfw-r50", "smvs", "mAP"): 25.1, ("opennsfw-r50", "caltech101", "mAP@R"): 49.3,
    ("opennsfw-r50", "rparis250", "M_mAP"): 78.4, ("opennsfw-r50", "rparis250", "H_mAP"): 48.6,
}


def quality_rows(configs: list[tuple[str, str, dict[str, Any]]], tasks: list[str],
                 threads: int) -> list[dict[str, Any]]:
    rows = []
    for label, model, opts in configs:
        row: dict[str, Any] = {"config": label, "model": model, "options": opts, "results": {}}
        for task in tasks:
            t0 = time.perf_counter()
            out = evaluate_model(task, model=model, threads=threads, **opts)
            row["fingerprint"] = out["fingerprint"]
            row["results"][task] = out["metrics"]
            print(f"{label:<48} {task:<11} {out['metrics']}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        rows.append(row)
    return rows


def lopq_rows() -> list[dict[str, Any]]:
    import numpy as np

    from galleria.eval.datasets import load_task
    from galleria.eval.protocols import evaluate_embeddings
    from galleria.transforms.whiten import apply_pca_whitening, learn_pca_whitening

    task = load_task("roxford5k-lopq")
    g, q = task.vectors()
    mean, p = learn_pca_whitening(g)
    mean_r, p_r = learn_pca_whitening(g, shrinkage="mean")
    gw, qw = apply_pca_whitening(g, mean, p), apply_pca_whitening(q, mean, p)
    gr, qr = apply_pca_whitening(g, mean_r, p_r), apply_pca_whitening(q, mean_r, p_r)
    settings = [
        ("cosine", q, g, {}),
        ("+ PCA-whitening (full, learned on the 4993 gallery descriptors)", qw, gw, {}),
        ("+ PCA-whitening (regularised)", qr, gr, {}),
        ("+ PCA-whitening + alpha-QE (alpha 3, k 2)", qw, gw, {"qe_alpha": 3.0, "qe_k": 2}),
        ("+ PCA-whitening + DBA (k 5) + alpha-QE (k 2)", qw, gw,
         {"dba_k": 5, "qe_alpha": 3.0, "qe_k": 2}),
        ("cosine + alpha-QE (k 5)", q, g, {"qe_alpha": 3.0, "qe_k": 5}),
        ("cosine + DBA (k 2)", q, g, {"dba_k": 2}),
    ]
    rows = []
    for label, qq, gg, kw in settings:
        m = evaluate_embeddings(task, np.asarray(qq), np.asarray(gg), **kw)
        rows.append({"setting": label, **{k: round(m[k], 2) for k in ("E_mAP", "M_mAP",
                                                                        "H_mAP")}})
        print(label, rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sets only (no Caltech)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-multiscale", action="store_true")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    tasks = sorted({t for t, _ in COLUMNS} - ({"caltech101"} if args.quick else set()),
                   key=[t for t, _ in COLUMNS].index)
    rows = quality_rows(CONFIGS, tasks, threads)
    if not args.no_multiscale:
        rows += quality_rows(MS_CONFIGS, [t for t in tasks if t != "caltech101"], threads)
    lopq = lopq_rows()

    header = ["extractor", *[f"{t} {m}" for t, m in COLUMNS]]
    body = []
    for r in rows:
        cells = [r["config"]]
        for t, m in COLUMNS:
            v = r["results"].get(t, {}).get(m)
            cells.append("" if v is None else (f"{v:.2f}" if m == "N-S" else f"{v:.1f}"))
        body.append(cells)
    ref_rows = []
    for model in ("effnet-lite0", "effnet-lite2", "opennsfw-r50"):
        cells = [f"reference script: {model}"]
        for t, m in COLUMNS:
            v = REFERENCE.get((model, t, m))
            cells.append("" if v is None else f"{v:.1f}")
        ref_rows.append(cells)
    md = ["# Retrieval quality of the built-in extractors (real data)", "",
          "Percent (N-S: out of 4). `smvs`: 400 phone photos vs all 500 images; `smvs-ref`: "
          "phone photo -> 100 clean references; `rparis250`: 12 official queries cropped by "
          "their bbx vs 238 images, official gnd restricted to them; `caltech101`: 2893 test "
          "queries vs 5784 train images (BACKGROUND_Google excluded).", "",
          markdown_table(header, body + ref_rows), "",
          "## ROxford5k, LOPQ descriptors (5063 x 128, official protocol, full-image queries)",
          "", markdown_table(["setting", "E", "M", "H"],
                             [[r["setting"], f"{r['E_mAP']:.2f}", f"{r['M_mAP']:.2f}",
                               f"{r['H_mAP']:.2f}"] for r in lopq]),
          "", "Post-processing parameters were picked on these 70 queries (indicative).", ""]
    write_results("quality", {"machine": machine_info(), "rows": rows, "reference": {
        f"{k[0]}|{k[1]}|{k[2]}": v for k, v in REFERENCE.items()}, "roxford5k_lopq": lopq},
        "\n".join(md))


if __name__ == "__main__":
    main()
