"""Every command block of README.md and docs/*.md runs as written, and the figures the
docs quote next to them are reproduced within their noise.

The blocks are read from the files themselves; a block is cut into *sections* at its
comment lines. :data:`PLAN` says, for each section (keyed by its file and first
command), how it is run: ``fast`` (the default suite), ``slow`` (``make test-slow``:
real models on shared data, minutes) or ``skip: reason`` (a Ray cluster, a server on
port 8080, installing packages: what runs them instead is named). A section not in
the plan -- a new or changed docs block -- fails :func:`test_every_docs_block_is_planned`,
so the docs and this test cannot drift apart.

Each section runs with ``bash -e`` in a fresh folder holding the files the docs name
(``PHOTOS/``, ``MORE/``, ``query.jpg``, ``labels.csv`` ...: real photos), after the
section's setup (e.g. the gallery an earlier section would have made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"(galleria|curl|pip|make|python|ray|bash|nice|\.venv)\b")

LITE0 = "galleria index PHOTOS/ --model effnet-lite0 --out my.gallery -q"
LITE0_G = "galleria index PHOTOS/ --model effnet-lite0 --out G -q"
#: 12 photos (the 6 and their rotated mirror images) and manifests of them: psi training
#: refuses fewer than 8 images or pairs
GROW12 = ("for f in MORE/*.jpg; do cp \"$f\" \"PHOTOS/m_$(basename \"$f\")\"; done && "
          "python -c \"import pathlib; ns = sorted(p.name for p in "
          "pathlib.Path('PHOTOS').glob('*.jpg')); rows = ['path,label,split'] + "
          "['PHOTOS/%s,%s,%s' % (n, ('cat', 'dog', 'bird')[i % 3], "
          "'test' if i >= 10 else 'train') for i, n in enumerate(ns)]; "
          "[pathlib.Path(f).write_text(chr(10).join(rows) + chr(10)) "
          "for f in ('train.csv', 'manifest.csv')]\" && ")
PLAN: dict[tuple[str, str], tuple[str, str]] = {
    # README.md
    ("README.md", "make demo"): ("skip: builds .venv and runs the demo; `make demo` is "
                                 "what CI's environment comes from", ""),
    ("README.md", "galleria models"): ("slow", ""),
    ("README.md", "galleria fit-transform my.gallery --kind pca-whiten-reg --dim 128 --out "
                  "w128 --apply"): ("slow", LITE0),
    ("README.md", "galleria upgrade start my.gallery --new-model effnet-lite2"): ("slow", LITE0),
    ("README.md", "galleria index COVERS/ --model effnet-lite0 --local sift --out "
                  "covers.gallery"): ("slow", ""),
    ("README.md", "galleria index PHOTOS/ --model effnet-lite2 --out my.gallery --index "
                  "exact-int8"): ("slow", ""),
    ("README.md", "galleria fusion train --images train.csv --label-column label --out F"): (
        "skip: trains a fusion model (an hour on 2 cores); tests/test_fusion_cli.py runs "
        "fusion train + index --fusion + search on a small set", ""),
    ("README.md", "galleria serve my.gallery --token-file token.txt"): (
        "skip: a server on port 8080 of a shared machine; tests/test_service_api.py and "
        "tests/test_service_filters.py run `galleria serve` (a gallery, a folder of "
        "galleries) and these requests on a free port", ""),
    ("README.md", "galleria index PHOTOS/ --model effnet-lite2 --out /shared/my.gallery --ray "
                  "HEAD:6379"): ("skip: needs a Ray cluster; tests/test_ray.py runs index "
                                 "--ray and sharded search on a simulated one", ""),
    # docs
    ("docs/dedup.md", "galleria index PHOTOS/ --model effnet-lite0 --local sift --out "
                      "my.gallery"): ("slow", ""),
    ("docs/distributed.md", "ray start --head --port 6379"): (
        "skip: needs a Ray cluster; tests/test_ray.py", ""),
    ("docs/filters.md", "galleria index photos.csv --out my.gallery"): ("slow", ""),
    ("docs/fusion.md", "galleria fusion train --images train.csv --label-column label --out F"): (
        "skip: trains a fusion model; tests/test_fusion_cli.py", ""),
    ("docs/distributed.md", "galleria serve /shared/my.gallery --ray HEAD:6379 --shards 3"): (
        "skip: needs a Ray cluster; tests/test_ray.py runs sharded search", ""),
    ("docs/upgrade.md", "galleria upgrade train-transform G --images manifest.csv"): (
        "slow", GROW12 + LITE0_G + " && galleria upgrade start G --new-model effnet-lite2"),
    ("docs/upgrade.md", "galleria upgrade train-transform G --from-job"): (
        "slow", GROW12 + LITE0_G + " && galleria upgrade start G --new-model effnet-lite2 && "
                "galleria upgrade run G -q"),
    ("docs/local.md", "galleria index SRC --out L --local sift"): ("slow", ""),
    ("docs/tune.md", "galleria search my.gallery q.jpg --json"): (
        "slow", "galleria index PHOTOS/ --model effnet-lite0 --local sift --out my.gallery -q"),
    ("docs/fusion.md", "galleria search G q.jpg -k 10"): (
        "skip: continues the `galleria fusion train` lines above it (a trained model F); "
        "tests/test_fusion_cli.py runs train, index --fusion, search and status", ""),
    ("docs/local.md", "galleria eval --dataset smvs-ref --local sift --pipeline local --json"): (
        "slow", ""),
    ("docs/service.md", "pip install 'galleria[service]'"): (
        "skip: installs packages and starts servers on port 8080; the Makefile installs the "
        "service extra, tests/test_service_*.py run the servers and requests", ""),
    ("docs/service.md", "curl -F image=@query.jpg -F k=5 http://127.0.0.1:8080/v1/search"): (
        "skip: needs the server above; tests/test_service_api.py sends these requests", ""),
    ("docs/transforms.md", "galleria fit-transform G --kind aesvc --dim 128 --out G-aesvc128 "
                           "--apply --histogram cos.png"): ("slow", LITE0_G),
    ("docs/transforms.md", "galleria fit-transform G --kind pca-whiten-reg --dim 64 --out G-w64 "
                           "--apply --replace"): ("slow", LITE0_G),
    ("docs/transforms.md", "galleria index photos/ --model effnet-lite2 --transform G-aesvc128 "
                           "--out G2"): ("slow", LITE0_G.replace("lite0", "lite2")
                                                 + " && galleria fit-transform G --kind aesvc "
                                                 "--dim 4 --out G-aesvc128 -q"),
    ("docs/transforms.md", "galleria eval --dataset smvs --model effnet-lite2 --size 512 "
                           "--transform pca-whiten-reg --dim 128 --json"): ("slow", ""),
    ("docs/transforms.md", "galleria fit-transform G --kind ss2d --dim 512 --out G-ss2d --apply "
                           "--index prefix"): ("slow", LITE0_G.replace("lite0", "lite2")),
    ("docs/upgrade.md", "galleria index photos/ --out G --model effnet-lite0"): ("slow", ""),
    ("docs/upgrade.md", "galleria upgrade start G --add-local sift"): ("slow", LITE0_G),
    ("docs/upgrade.md", "galleria upgrade train-transform G --images train.csv"): (
        "slow", GROW12 + LITE0_G + " && galleria upgrade start G --new-model effnet-lite2 && "
                "galleria upgrade run G -q"),
}
#: figures quoted in the docs beside a command: (file, command) -> check(JSON output)
FIGURES = {
    ("README.md", "galleria eval --dataset roxford5k-lopq --json"):
        lambda out: _near(out["metrics"], {"E_mAP": 28.89, "M_mAP": 21.13, "H_mAP": 4.60}, 0.01),
    ("README.md", "galleria eval --dataset smvs --model effnet-lite0 --json"):
        lambda out: _near(out["metrics"], {"mAP": 22.2, "R@1": 38.2}, 0.3),
    ("README.md", "galleria eval --dataset smvs --model effnet-lite2 --size 512 --transform "
                  "aesvc --dim 128 --param n_layers=1"): None,  # text output: see below
}


def _near(got: dict, want: dict, tol: float) -> None:
    for k, v in want.items():
        assert abs(float(got[k]) - v) <= tol, (k, got[k], v)


def sections() -> list[tuple[str, list[str]]]:
    """``(file, commands)`` for every section of every shell block, in document order."""
    out: list[tuple[str, list[str]]] = []
    for f in DOCS:
        text = f.read_text(encoding="utf-8")
        for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S):
            if m.group(1) not in ("sh", "bash", "console", "shell", ""):
                continue
            cur: list[str] = []
            pending = ""
            for raw in m.group(2).splitlines():
                line = raw.strip()
                if pending:
                    line = pending + " " + line
                    pending = ""
                if line.endswith("\\"):
                    pending = line[:-1].strip()
                    continue
                if not line or line.startswith("#"):
                    if cur:
                        out.append((str(f.relative_to(ROOT)), cur))
                        cur = []
                    continue
                if m.group(1) == "" and not COMMAND.match(line) and not cur:
                    break  # a plain block that is not a shell session
                cur.append(strip_comment(line))
            if cur:
                out.append((str(f.relative_to(ROOT)), cur))
    return [(f, c) for f, c in out if c and COMMAND.match(c[0])]


def strip_comment(line: str) -> str:
    """The command without its trailing ``# comment`` (quotes respected)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and i > 0 and line[i - 1] == " ":
            return line[:i].rstrip()
    return line


def plan_key(f: str, first: str) -> tuple[str, str] | None:
    """The PLAN key of a section: its file and a prefix of its first command."""
    keys = [k for k in PLAN if k[0] == f and first.startswith(k[1])]
    return max(keys, key=lambda k: len(k[1])) if keys else None


def plan_of(f: str, cmds: list[str]) -> tuple[str, str]:
    key = plan_key(f, cmds[0])
    if key is not None:
        return PLAN[key]
    return ("fast" if all(_cheap(c) for c in cmds) else "slow", "")


def _cheap(cmd: str) -> bool:
    return cmd.startswith(("galleria models", "galleria eval --list", "galleria eval --dataset "
                           "roxford5k-lopq", "galleria items", "galleria info", "galleria check",
                           "galleria --help"))


def test_every_docs_block_is_planned():
    secs = sections()
    found = {plan_key(f, c[0]) for f, c in secs}
    for key, (mode, _) in PLAN.items():
        assert key in found, f"PLAN names a section the docs no longer have: {key}"
        assert mode in ("fast", "slow") or mode.startswith("skip: "), key
    skipped = [k for k, (m, _) in PLAN.items() if m.startswith("skip")]
    assert len(skipped) <= 10, skipped  # a skip names what runs it instead
    assert len(secs) >= 25
    for f, cmds in secs:  # every section is run by one of the tests below, or named
        assert plan_key(f, cmds[0]) is not None or plan_of(f, cmds)[0] in ("fast", "slow")


# ------------------------------------------------------------------ the world
def _world(root: Path, photos: Path) -> Path:
    w = root / "w"
    w.mkdir()
    names = sorted(p.name for p in photos.glob("*.jpg"))
    for d in ("PHOTOS", "photos", "COVERS", "SRC"):
        shutil.copytree(photos, w / d)
    (w / "MORE").mkdir()
    for n, name in enumerate(names):
        img = Image.open(photos / name).convert("RGB").transpose(
            Image.Transpose.FLIP_LEFT_RIGHT)
        img.rotate(90 * (n % 3 + 1), expand=True).save(w / "MORE" / name)
    for q in ("query.jpg", "q.jpg", "phone.jpg"):
        shutil.copy(photos / "chelsea.jpg", w / q)
    labels = ["cat", "dog", "cat", "bird", "dog", "cat"]
    rows = ["path,label,year,tags:list,taken"] + [
        f"PHOTOS/{n},{lab},{2005 + 2 * i},{'indoor|studio' if i % 2 else 'outdoor'},"
        f"2021-0{1 + i}-10" for i, (n, lab) in enumerate(zip(names, labels, strict=True))]
    (w / "photos.csv").write_text("\n".join(rows) + "\n")
    lab = ["path,label,split"] + [f"PHOTOS/{n},{labels[i]},{'train' if i < 4 else 'test'}"
                                  for i, n in enumerate(names)]
    for f in ("labels.csv", "train.csv", "manifest.csv"):
        (w / f).write_text("\n".join(lab) + "\n")
    return w


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("GALLERIA_THREADS", "2")
    return e


def run_section(f: str, cmds: list[str], setup: str, world: Path) -> list[str]:
    outs = []
    if setup:
        r = subprocess.run(["bash", "-ec", setup], cwd=world, env=_env(), capture_output=True,
                           text=True, timeout=3600)
        assert r.returncode == 0, f"setup of {f}: {setup}\n{r.stdout[-2000:]}{r.stderr[-3000:]}"
    for cmd in cmds:
        r = subprocess.run(["bash", "-ec", cmd], cwd=world, env=_env(), capture_output=True,
                           text=True, timeout=3600)
        assert r.returncode == 0, f"{f}: `{cmd}` exited {r.returncode}\n" \
                                  f"{r.stdout[-2000:]}{r.stderr[-3000:]}"
        check = FIGURES.get((f, cmd))
        if check is not None:
            check(json.loads(r.stdout))
        outs.append(r.stdout)
    return outs


def _cases(mode: str) -> list:
    out = []
    for f, cmds in sections():
        m, setup = plan_of(f, cmds)
        if m == mode:
            out.append(pytest.param(f, cmds, setup, id=f"{f}:{cmds[0][:50]}"))
    return out


def test_readme_roxford_figures_fast(tmp_path, photos, require_shared):
    """The README's official-protocol figures on the real LOPQ descriptors (seconds)."""
    require_shared("oxford5k_lopq128")
    cmd = "galleria eval --dataset roxford5k-lopq --json"
    assert any(cmd in c for f, cs in sections() if f == "README.md" for c in cs)
    run_section("README.md", [cmd], "", _world(tmp_path, photos))


@pytest.mark.parametrize("f, cmds, setup", _cases("fast"))
def test_fast_docs_sections_run(f, cmds, setup, photos, tmp_path, require_shared):
    require_shared("oxford5k_lopq128")
    run_section(f, cmds, setup, _world(tmp_path, photos))


@pytest.mark.slow
@pytest.mark.parametrize("f, cmds, setup", _cases("slow"))
def test_slow_docs_sections_run(f, cmds, setup, photos, tmp_path, require_shared):
    require_shared("smvs_dvd_covers")
    outs = run_section(f, cmds, setup, _world(tmp_path, photos))
    key = "galleria eval --dataset smvs --model effnet-lite2 --size 512 --transform aesvc " \
          "--dim 128 --param n_layers=1"
    if key in cmds:  # README: linear AE-SVC at d = 128 on SMVS, transductive: mAP 34.8
        text = outs[cmds.index(key)]
        got = float(re.search(r"\bmAP\s+([0-9.]+)", text).group(1))
        assert abs(got - 34.8) <= 1.0, text
