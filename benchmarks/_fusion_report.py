"""Tables and target verdicts of ``bench_fusion.py`` (from its result dict)."""

from __future__ import annotations

import json
from typing import Any

import fusion_data as fd
from _common import machine_md

BASE_MEMBERS = ("effnet-lite2", "opennsfw-r50", "effnet-lite0")


MAIN_COLS = [("caltech", "caltech101-disjoint", "mAP@R"), ("caltech", "caltech101-disjoint", "R@1"),
             ("smvs", "smvs-disjoint", "mAP"), ("smvs", "smvs-disjoint", "R@1"),
             ("smvs", "smvs-ref-disjoint", "R@1")]
TRANSFER_COLS = [("rparis250", "M_mAP"), ("rparis250", "H_mAP"), ("ukbench56", "N-S")]


def _f(v: Any) -> str:
    return "" if v is None else (f"{v:.2f}" if isinstance(v, float) and abs(v) < 5 else f"{v:.1f}")


def _cells(get: Any, cols: list[tuple[str, str, str]]) -> list[str]:
    out = []
    for tname, ev, metric in cols:
        try:
            out.append(_f(get(tname, ev)[metric]))
        except (KeyError, TypeError):
            out.append("")
    return out


def _what(spec: dict[str, Any], prev: dict[str, Any] | None) -> str:
    if not spec:
        return "default recipe"
    if prev and all(spec.get(k) == v for k, v in prev.items()):
        rest = {k: v for k, v in spec.items() if k not in prev}
        return "previous default (PCA anchor, regress)" + (f" + {json.dumps(rest)}" if rest
                                                            else "")
    return json.dumps(spec)


def report(res: dict[str, Any], run_specs: dict[str, dict[str, Any]],
           prev: dict[str, Any] | None = None) -> str:
    from _common import markdown_table

    base, rr = res["baselines"], res["runs"]

    def b(row: str) -> Any:
        return lambda t, e: base[t][e][row]

    def r(run: str, kind: str) -> Any:
        return lambda t, e: rr[t][run]["eval"][e][kind]

    head = ["row", "kind", "Caltech mAP@R", "Caltech R@1", "SMVS mAP", "SMVS R@1",
            "SMVS phone->ref R@1"]
    rows = [[m, "symmetric, single feature", *_cells(b(m), MAIN_COLS)] for m in fd.MEMBERS]
    rows += [["concatenation (3 members, 3584-d)", "symmetric", *_cells(b("concat"), MAIN_COLS)],
             ["concatenation + PCA to 512", "symmetric", *_cells(b("concat+pca"), MAIN_COLS)],
             ["concatenation + learned whitening to 512 (closed form, supervised)", "symmetric",
              *_cells(b("concat+lw"), MAIN_COLS)],
             ["MLP mixer (trained, default recipe)", "symmetric",
              *_cells(r("mlp", "sym"), MAIN_COLS)],
             ["best single member, projected (trained, default recipe)", "symmetric",
              *_cells(r("single-best", "sym"), MAIN_COLS)],
             ["fused: transformer mixer, paper recipe (no anchor, no distillation)",
              "symmetric", *_cells(r("paper", "sym"), MAIN_COLS)],
             ["fused: transformer mixer, PCA-anchored (previous default)", "symmetric",
              *_cells(r("pca-anchor", "sym"), MAIN_COLS)],
             ["**fused: transformer mixer, default recipe (learned-whitening anchor)**",
              "symmetric", *_cells(r("default", "sym"), MAIN_COLS)],
             ["light query -> fused, paper recipe", "asymmetric",
              *_cells(r("paper", "asym"), MAIN_COLS)],
             ["light query -> fused, PCA-anchored (previous default)", "asymmetric",
              *_cells(r("pca-anchor", "asym"), MAIN_COLS)],
             ["**light query -> fused gallery, default recipe**", "asymmetric",
              *_cells(r("default", "asym"), MAIN_COLS)],
             ["light query -> best single member (default recipe)", "asymmetric",
              *_cells(r("single-best", "asym"), MAIN_COLS)],
             ["light query -> MLP mixer (default recipe)", "asymmetric",
              *_cells(r("mlp", "asym"), MAIN_COLS)],
             ["effnet-lite0 -> effnet-lite0 (raw)", "light symmetric",
              *_cells(b("effnet-lite0"), MAIN_COLS)],
             ["effnet-lite0 + learned whitening -> itself (same training data)",
              "light symmetric", *_cells(b("effnet-lite0+lw"), MAIN_COLS)],
             ["trained light query -> itself", "light symmetric",
              *_cells(r("default", "light-sym"), MAIN_COLS)]]
    md = ["# Asymmetric feature fusion (real data, disjoint classes / covers)\n",
          res["setup"] + "\n", "## Main table\n", markdown_table(head, rows)]
    abl = ["run", "what changes", "Caltech sym", "Caltech asym", "SMVS sym", "SMVS asym",
           "SMVS ref asym", "train s (Caltech)", "best epoch (Caltech)"]
    arows = []
    for name, spec in run_specs.items():
        if name not in rr.get("caltech", {}) and name not in rr.get("smvs", {}):
            continue
        cells = []
        for t, e, m, k in (("caltech", "caltech101-disjoint", "mAP@R", "sym"),
                           ("caltech", "caltech101-disjoint", "mAP@R", "asym"),
                           ("smvs", "smvs-disjoint", "mAP", "sym"),
                           ("smvs", "smvs-disjoint", "mAP", "asym"),
                           ("smvs", "smvs-ref-disjoint", "R@1", "asym")):
            try:
                cells.append(_f(rr[t][name]["eval"][e][k][m]))
            except KeyError:
                cells.append("")
        c = rr.get("caltech", {}).get(name, {})
        arows.append([name, _what(spec, prev), *cells,
                      _f(c.get("train", {}).get("seconds")),
                      str(c.get("train", {}).get("best_epoch", ""))])
    md += ["## Ablations (Caltech mAP@R, SMVS mAP, SMVS phone->ref R@1)\n",
           markdown_table(abl, arows)]
    trows = [[m, "untrained", *_cells(lambda t, e, m=m: base["caltech"][e][m],
                                      [("caltech", e, k) for e, k in TRANSFER_COLS])]
             for m in fd.MEMBERS]
    trows.append(["concatenation", "untrained",
                  *_cells(lambda t, e: base["caltech"][e]["concat"],
                          [("caltech", e, k) for e, k in TRANSFER_COLS])])
    for t in ("caltech", "smvs"):
        cols = [(t, e, k) for e, k in TRANSFER_COLS]
        trows += [[f"concatenation + PCA (fit on {t})", "untrained", *_cells(b("concat+pca"),
                                                                             cols)],
                  [f"concatenation + learned whitening (fit on {t})", "supervised, closed form",
                   *_cells(b("concat+lw"), cols)],
                  [f"fused (trained on {t})", "symmetric", *_cells(r("default", "sym"), cols)],
                  [f"light query -> fused (trained on {t})", "asymmetric",
                   *_cells(r("default", "asym"), cols)],
                  [f"light query -> single (trained on {t})", "asymmetric",
                   *_cells(r("single-best", "asym"), cols)]]
    md += ["## Transfer (never trained on): rparis250 M/H mAP, UKBench56 N-S\n",
           markdown_table(["row", "kind", "rparis M", "rparis H", "UKBench N-S"], trows)]
    if "speed" in res:
        sp = res["speed"]
        names = list(sp["query_ms"]["1"])
        md += ["## Cost\n", "ms per query (decoded 640-px photo in, vector out, batch 1, best "
               "of 5 interleaved rounds):\n",
               markdown_table(["model", "1 thread", "2 threads", "CPU ms, 1 thread",
                               "CPU ms, 2 threads"],
                              [[n, _f(sp["query_ms"]["1"][n]), _f(sp["query_ms"]["2"][n]),
                                _f(sp.get("query_cpu_ms", {}).get("1", {}).get(n)),
                                _f(sp.get("query_cpu_ms", {}).get("2", {}).get(n))]
                               for n in names]),
               f"Load average while timing: {sp.get('load_during')} (other sessions on the "
               "2 cores: wall times are inflated and noisy; the CPU clock counts this "
               "process's threads only).\n",
               "Gallery side, ms per image (embed_stream, 2 decoding threads, batches of 32):\n",
               markdown_table(["gallery model", "ms / image"],
                              [[k, _f(v)] for k, v in sp["gallery_ms_per_image"].items()])]
    if "cli" in res:
        c = res["cli"]
        rep = c["report"]
        md += [f"Training time, default recipe on 2 cores: `{c['command']}`: **{c['wall_s']} s** "
               f"wall (member features {rep['features_seconds']} s, query views "
               f"{rep['views_seconds']} s, training {rep['train_seconds']} s); fingerprint "
               f"{rep['fingerprint']}.\n"]
    md += ["## Targets\n", "\n".join(f"- {v}" for v in res.get("verdicts", [])) + "\n",
           "## Machine\n", machine_md(res["machine"])]
    return "\n".join(md)


def _gate_of(train: dict[str, Any]) -> str:
    """The gate of the kept epoch (from the run's history), as text."""
    hist = train.get("history") or []
    best = (train.get("best_epoch") or {}).get("joint")
    for h in hist:
        if h.get("epoch") == best and h.get("gate") is not None:
            return f"{h['gate']:.3f}"
    return "n/a"


def verdicts(res: dict[str, Any]) -> list[str]:
    base, rr = res["baselines"], res["runs"]
    out = []
    for t, e, m in (("caltech", "caltech101-disjoint", "mAP@R"), ("smvs", "smvs-disjoint", "mAP")):
        if "default" not in rr.get(t, {}):
            continue
        fused = rr[t]["default"]["eval"][e]["sym"][m]
        singles = {k: base[t][e][k][m] for k in fd.MEMBERS}
        concat = max(base[t][e]["concat"][m], base[t][e]["concat+pca"][m])
        best = max(singles, key=singles.get)  # type: ignore[arg-type]
        out.append(f"{e}: fused {fused:.1f} vs best single {best} {singles[best]:.1f} and "
                   f"concatenation {concat:.1f} -> "
                   f"{'met' if fused > singles[best] and fused > concat else 'NOT met'}")
        start = base[t][e].get("concat+lw", {}).get(m)
        tr = rr[t]["default"].get("train", {})
        if start is not None:
            out.append(f"{e}: what training adds to the closed-form start: fused {fused:.1f} vs "
                       f"concatenation + learned whitening {start:.1f} (best epoch "
                       f"{tr.get('best_epoch')}, gate {_gate_of(tr)})")
        asym = rr[t]["default"]["eval"][e]["asym"][m]
        light = base[t][e]["effnet-lite0"][m]
        light_lw = base[t][e].get("effnet-lite0+lw", {}).get(m)
        single_asym = rr[t].get("single-best", {}).get("eval", {}).get(e, {}).get("asym", {})
        sa = single_asym.get(m)
        sa_txt = f"{sa:.1f}" if sa is not None else "(not run)"
        out.append(f"{e}: light query -> fused {asym:.1f} vs light symmetric {light:.1f} and "
                   f"light query -> single {sa_txt} -> "
                   f"{'met' if asym > light and (sa is None or asym > sa) else 'NOT met'}"
                   + (f" (and vs effnet-lite0 + learned whitening -> itself {light_lw:.1f}: "
                      f"{'above' if asym > light_lw else 'below'})" if light_lw is not None
                      else ""))
        if "noise" in rr[t]:
            n_s = rr[t]["noise"]["eval"][e]["sym"][m]
            n_a = rr[t]["noise"]["eval"][e]["asym"][m]
            out.append(f"{e}: + pure-noise input: fused {fused:.1f} -> {n_s:.1f}, asymmetric "
                       f"{asym:.1f} -> {n_a:.1f} (target: at most 1 point lost) -> "
                       f"{'met' if fused - n_s <= 1.0 and asym - n_a <= 1.0 else 'NOT met'}")
    if "cli" in res:
        w = res["cli"]["wall_s"]
        out.append(f"training time of the default recipe: {w / 60:.1f} min (target < 60) -> "
                   f"{'met' if w < 3600 else 'NOT met'}")
    return out
