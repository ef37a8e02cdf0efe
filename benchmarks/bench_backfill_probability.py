"""Match probabilities during an upgrade: calibrated on pseudo-queries, checked on real ones.

SMVS DVD covers (500 images, ``manifest.csv``): ``galleria index`` with the old
model, ``upgrade start --new-model`` (online, random order, seed 0), then
``upgrade run --limit`` to each fraction. At each fraction the job checks the
rules on its ~500 pseudo-queries (views of the gallery's own images) and fits
one match-probability calibration per rule (galleria.upgrade.probability); a
check is forced at the fraction itself (the job's own ``recheck``) so the
calibration describes the gallery measured. Then the 400 real phone-photo
queries (self excluded) are searched with each calibrated rule exactly as
``galleria search`` would, and the probabilities of their top-10 results are
compared with the real labels (same DVD cover): ECE, Brier, precision / recall
at 0.5, the reliability bins. Beside them: the same figures on the pseudo-queries
the calibration was fitted on (in-sample: their truth is the view's source item
only). No label is used by the job.

Run:  .venv/bin/python benchmarks/bench_backfill_probability.py [--old M] [--new M]
        [--fractions 0.25 0.5 0.75] [--workdir DIR]
Writes benchmarks/results/backfill-probability.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, set_threads
from galleria import calibration as calibrate
from galleria.decision import open_searcher
from galleria.eval.datasets import load_task
from galleria.eval.paths import dataset_dir
from galleria.images.decode import load_image
from galleria.store.gallery import Gallery
from galleria.tune.record import searcher_probabilities
from galleria.upgrade.job import run_upgrade
from galleria.upgrade.online import (
    OnlineConfig,
    check_rules,
    job_pseudo_queries,
    query_models,
    recheck,
)
from galleria.upgrade.probability import DEPTH
from galleria.upgrade.search import BackfillSearcher
from galleria.upgrade.state import decision_psi_path, require_upgrade

OUT = Path(__file__).resolve().parent / "results"


def load_avg() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def cli(*args: str) -> None:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    print(f"$ {' '.join(args)}  [{time.perf_counter() - t:.1f} s, rc {p.returncode}]",
          flush=True)
    if p.returncode != 0:
        raise SystemExit(f"failed: {args}\n{p.stdout}\n{p.stderr}")


def embed(model: Any, files: list[Path], batch: int = 16) -> np.ndarray:
    out = []
    for i in range(0, len(files), batch):
        out.append(model.embed_images([load_image(f) for f in files[i: i + batch]]))
    return np.concatenate(out).astype(np.float32)


def quality(p: np.ndarray, truth: np.ndarray, total_pos: int | None = None) -> dict[str, Any]:
    rel = calibrate.reliability(p, truth)
    thr = calibrate.threshold_report(p, truth, 0.5, total_pos=total_pos)
    top1 = calibrate.threshold_report(p[:, :1], truth[:, :1], 0.5)
    return {"ece": round(rel["ece"], 4), "brier": round(rel["brier"], 4), "n": rel["n"],
            "precision_05": round(100 * thr["precision"], 1) if thr["kept"] else None,
            "recall_05": round(100 * thr["recall"], 1), "kept_05": thr["kept"],
            "top1_precision_05": round(100 * top1["precision"], 1) if top1["kept"] else None,
            "mean_p": round(float(np.mean(p)), 4), "base_rate": round(float(truth.mean()), 4),
            "bins": rel["bins"]}


def real_answers(s: Any, q: dict[str, np.ndarray], self_ids: list[str], k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (Q, k), probabilities (Q, k))`` of the real queries, self excluded."""
    res = s.search_vectors(old_queries=q["old"], new_queries=q["new"], k=k + 1)
    p = searcher_probabilities(s, res)
    if p is None:
        raise SystemExit(f"rule {s.rule}: no probabilities (not calibrated at this check)")
    ids = np.full((len(self_ids), k), None, object)
    pp = np.zeros((len(self_ids), k), np.float32)
    for r, me in enumerate(self_ids):
        keep = [j for j in range(res.k) if res.ids[r, j] is not None and res.ids[r, j] != me]
        keep = keep[:k]
        ids[r, : len(keep)] = res.ids[r, keep]
        pp[r, : len(keep)] = p[r, keep]
    return ids, pp


def measure(g: Path, cfg: OnlineConfig, models: tuple[Any, Any], q: dict[str, np.ndarray],
            task: Any, label_of: dict[str, Any]) -> dict[str, Any]:
    with Gallery.open(g) as gal:
        d = recheck(gal, cfg, old_model=models[0], new_model=models[1])
        st = require_upgrade(gal)
        rec = d["probability"]
        pseudo = job_pseudo_queries(gal, st, cfg, models[0], models[1])
        psi = None
        if decision_psi_path(gal, st) is not None:
            from galleria.upgrade.psi import load_cross_map  # only when a psi was published

            psi = load_cross_map(decision_psi_path(gal, st), old_fingerprint=st.old_space,
                                 new_fingerprint=st.new_space)
        answers: dict[str, Any] = {}
        check_rules(gal, pseudo, psi, depth=cfg.depth, answers=answers)
        self_ids = [task.gallery_paths[i] for i in task.query_gallery_index]
        qlab = np.asarray(task.query_labels)
        n_rel = int(sum(sum(1 for gi, lab in label_of.items() if lab == qlab[r] and gi != me)
                        for r, me in enumerate(self_ids)))
        auto = open_searcher(gal, with_models=False)
        rows: dict[str, Any] = {}
        for rule, entry in rec["rules"].items():
            s = BackfillSearcher.open(gal, rule=rule, with_models=False)
            ids, p = real_answers(s, q, self_ids, DEPTH)
            truth = np.array([[i is not None and label_of[i] == qlab[r] for i in row]
                              for r, row in enumerate(ids)])
            res = answers[rule][0].head(DEPTH)
            pt = res.ids == np.asarray(pseudo.ids, object)[:, None]
            pp = calibrate.apply(entry["calibration"], res.scores)
            rows[rule] = {"served": rule == auto.rule, "normalization": entry["normalization"],
                          "n_pos": entry["calibration"]["n_pos"],
                          "real": quality(p, truth, n_rel), "pseudo": quality(pp, pt)}
        return {"moved": rec["moved"], "items": rec["items"], "fraction": rec["fraction"],
                "served": auto.rule, "decision_rule": d["rule"], "rules": rows}


def markdown(rep: dict[str, Any]) -> str:
    md = ["# Match probabilities during an upgrade (real data)", "",
          f"SMVS DVD covers, 500 images, `{rep['old']}` -> `{rep['new']}`, online, random "
          "order, seed 0. Calibrations fitted by the job at its check on "
          f"{rep['pseudo_queries']} pseudo-queries (views of the gallery's own images; "
          "positive: the view's source item); real: the 400 phone photos (self excluded), "
          "top-10 results against the real labels (same cover). `pseudo` figures are "
          "in-sample (the answers the calibration was fitted on). Served: the rule "
          "`auto` answers with at that fraction. Command: "
          f"`{rep['command']}`.", "",
          "| backfilled | rule | served | real ECE | real Brier | real precision @0.5 | "
          "real recall @0.5 | real top-1 precision @0.5 | real base rate | pseudo ECE | "
          "pseudo base rate |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for fr in rep["fractions"]:
        for rule, r in fr["rules"].items():
            re, ps = r["real"], r["pseudo"]
            md.append(f"| {100 * fr['fraction']:.0f} % | {rule} | {'yes' if r['served'] else ''}"
                      f" | {re['ece']:.3f} | {re['brier']:.3f} | {re['precision_05']} | "
                      f"{re['recall_05']} | {re['top1_precision_05']} | {re['base_rate']:.3f} | "
                      f"{ps['ece']:.3f} | {ps['base_rate']:.3f} |")
    md += ["", "## Reliability of the served rule (real queries)", "",
           "Bins of predicted probability: mean predicted / observed fraction of true "
           "matches (n).", "", "| backfilled | rule | bins |", "|---|---|---|"]
    for fr in rep["fractions"]:
        r = fr["rules"].get(fr["served"])
        if r is None:
            continue
        bins = "; ".join(f"[{b['lo']:.1f},{b['hi']:.1f}) {b['mean_p']:.2f}/{b['frac_pos']:.2f}"
                         f" ({b['n']})" for b in r["real"]["bins"])
        md.append(f"| {100 * fr['fraction']:.0f} % | {fr['served']} | {bins} |")
    md += ["", "## Machine", "", f"- load: {rep['load_start']} (start), {rep['load_end']} (end)",
           f"- seconds: {rep['seconds']}", *[f"- {k}: {v}" for k, v in rep["machine"].items()]]
    return "\n".join(md) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="effnet-lite0")
    ap.add_argument("--new", default="effnet-lite2")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    set_threads(1)
    t0 = time.perf_counter()
    load_start = load_avg()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="backfill-prob-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = dataset_dir("smvs_dvd_covers")
    g = work / "gallery"
    cli("galleria.cli.main", "index", str(folder / "manifest.csv"), "--out", str(g),
        "--model", args.old, "--threads", "1", "-q")
    cli("galleria.cli.upgrade", "upgrade", "start", str(g), "--new-model", args.new,
        "--seed", "0", "--order", "random")
    task = load_task("smvs")
    label_of = dict(zip(task.gallery_paths, task.gallery_labels, strict=True))
    with Gallery.open(g) as gal:
        st = require_upgrade(gal)
        cfg = OnlineConfig.from_dict(st.online.get("config"))
        models = query_models(gal, st, threads=1)
        files = [folder / p for p in task.query_paths]
        q = {"old": embed(models[0], files), "new": embed(models[1], files)}
        n = len(gal)
    fracs = []
    for f in args.fractions:
        with Gallery.open(g) as gal:
            done = gal.count(require_upgrade(gal).new_space)
        run_upgrade(g, limit=max(0, round(f * n) - done), threads=1)
        fracs.append(measure(g, cfg, models, q, task, label_of))
        print(json.dumps({k: v for k, v in fracs[-1].items() if k != "rules"}), flush=True)
    rep = {"old": args.old, "new": args.new, "pseudo_queries": cfg.pseudo_queries,
           "command": "python benchmarks/bench_backfill_probability.py "
                      f"--old {args.old} --new {args.new} --fractions "
                      + " ".join(str(f) for f in args.fractions),
           "fractions": fracs, "load_start": load_start, "load_end": load_avg(),
           "seconds": round(time.perf_counter() - t0, 1), "machine": machine_info(threads=1)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "backfill-probability.json").write_text(json.dumps(rep, indent=1))
    (OUT / "backfill-probability.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
