"""The kill matrix: every command that writes a gallery, killed with SIGKILL at seeded
points, then run again (tests/test_faults_matrix.py; benchmarks/bench_faults.py
prints the full table).

For each scenario (a command and the state it starts from):

1. the command runs once without a kill, under the driver in count mode
   (tests/_faults.py): the gallery it leaves is the *reference* and the count
   is the number of kill points;
2. for a kill point ``p``: a fresh copy of the start state, the command killed at
   ``p``; then ``check`` must not call the gallery sound unless it is (no item
   without data, nothing stored that differs from the reference, no item in two
   spaces of an upgrade);
3. the same command again, without a kill: ``check`` sound and every item of the
   reference present exactly once with the reference's data (the reference is the
   same command's clean run, so equal means equal to a fresh extraction).

Models are the tiny test extractors (tests/_tiny.py); ``tiny-b`` is a second one
for upgrades. ``index`` with a fusion model uses an untrained two-member fusion
model of effnet-lite0 (slow: run by the benchmark only). ``tune`` is listed and
skipped until the command exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import _faults
import _tiny

_faults.register_test_models()


def synthetic_images(root: Path, n: int, seed: int = 19) -> Path:
    """``n`` seeded random PNGs (synthetic data)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(16, 40, 2)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(
            root / f"s{i:03d}.png")
    return root


@dataclass
class Scenario:
    """One command of the matrix: how to build its start state and its arguments."""

    name: str
    prepare: Callable[[Path, Path], None]    # (work folder, images) -> start state in work
    args: Callable[[Path], list[str]]        # work folder -> galleria arguments
    http: bool = False                        # driven through a server (add/delete)
    available: Callable[[], str | None] = lambda: None  # None, or why it is skipped
    slow: bool = False


@dataclass
class PointResult:
    scenario: str
    point: int
    killed: bool
    after_kill: _faults.Audit
    final: _faults.Audit
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # each makes the point fail
    notes: list[str] = field(default_factory=list)

    @property
    def honest(self) -> bool:
        """``check`` did not call the killed gallery sound while it was not."""
        k = self.after_kill
        return not (k.sound and (k.silent or k.wrong or k.duplicated))

    @property
    def ok(self) -> bool:
        k = self.after_kill
        return (self.honest and k.wrong == 0 and k.duplicated == 0 and self.final.clean
                and not self.failures)


# ---------------------------------------------------------------- start states
def _gallery(work: Path, images: Path, **kw: Any) -> Path:
    from galleria.extract.job import index_images

    g = work / "g"
    index_images(images, g, extractor=_tiny.tiny(1), flush_every=kw.get("flush", 7))
    return g


def _nothing(work: Path, images: Path) -> None:
    (work / "src").symlink_to(images.resolve(), target_is_directory=True)


def _indexed(work: Path, images: Path) -> None:
    _gallery(work, images)


def _damaged(work: Path, images: Path) -> None:
    from galleria.store.gallery import Gallery

    g = _gallery(work, images)
    with Gallery.open(g, readonly=True) as gal:
        (seg,) = gal.db.one("SELECT file FROM segments ORDER BY segment DESC LIMIT 1")
    with open(g / seg, "r+b") as fh:
        fh.truncate((g / seg).stat().st_size - 40)


def _upgrading(work: Path, images: Path) -> None:
    from galleria.upgrade.job import start_upgrade

    g = _gallery(work, images)
    start_upgrade(g, "tiny-b", seed=3)


def _upgraded(work: Path, images: Path) -> None:
    from galleria.upgrade.job import run_upgrade, start_upgrade

    g = _gallery(work, images)
    start_upgrade(g, "tiny-b", seed=3)
    run_upgrade(g, commit_every=5)


def _fusion_model(work: Path) -> Path:
    import torch

    from galleria.extractors.registry import create_extractor
    from galleria.fusion.members import input_spec
    from galleria.fusion.mixer import build_mixer
    from galleria.fusion.model import FusionModel
    from galleria.fusion.query_model import build, query_weights_id

    members = [create_extractor("effnet-lite0", size=96, runtime="torch"),
               create_extractor("effnet-lite0", size=64, pooling="mean", runtime="torch")]
    specs = [input_spec(m) for m in members]
    torch.manual_seed(0)
    mixer = build_mixer("transformer", specs, d=16, layers=1, heads=2)
    trunk, tail = build("effnet-lite0", 0, 16)
    model = FusionModel(
        members=[{"config": m.config(), "fingerprint": m.fingerprint} for m in members],
        specs=specs, mixer=mixer,
        mixer_params={"kind": "transformer", "d": 16, "layers": 1, "heads": 2}, tail=tail,
        query_params={"model": "effnet-lite0", "train_blocks": 0, "d": 16, "size": 224,
                      "weights_id": query_weights_id("effnet-lite0"),
                      "pooling": {"kind": "gem", "p": 3.0, "eps": 1e-6}},
        recipe={"note": "kill matrix (untrained)"}, training={"epochs": 0})
    out = work / "F"
    model.save(out, trunk=trunk)
    return out


def _with_fusion(work: Path, images: Path) -> None:
    _nothing(work, images)
    _fusion_model(work)


def _lite0_gallery(work: Path, images: Path) -> None:
    from galleria.extract.job import index_images

    index_images(images, work / "g", model="effnet-lite0", runtime="torch", threads=1,
                 flush_every=7)


def _lite0_upgrading(work: Path, images: Path) -> None:
    from galleria.upgrade.job import start_upgrade

    _lite0_gallery(work, images)
    start_upgrade(work / "g", "effnet-lite2", runtime="torch", threads=1, seed=3)


def _has_tune() -> str | None:
    from galleria.cli.main import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    return None if "tune" in sub.choices else "`galleria tune` is not on this branch yet"


REMOVED = [f"s{i:03d}.png" for i in (1, 4, 5, 9, 12, 17, 20, 23)]
UPLOADS = 10

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("index global", _nothing, lambda w: [
        "index", str(w / "src"), "--out", str(w / "g"), "--model", "tiny-test",
        "--commit-every", "5", "--batch-size", "4", "-q"]),
    Scenario("index local", _nothing, lambda w: [
        "index", str(w / "src"), "--out", str(w / "g"), "--local", "tiny-local",
        "--commit-every", "5", "--batch-size", "4", "-q"]),
    Scenario("index fusion", _with_fusion, lambda w: [
        "index", str(w / "src"), "--out", str(w / "g"), "--fusion", str(w / "F"),
        "--commit-every", "5", "--batch-size", "4", "--runtime", "torch", "-q"], slow=True),
    Scenario("remove", _indexed, lambda w: ["remove", str(w / "g"), *REMOVED]),
    Scenario("repair", _damaged, lambda w: ["repair", str(w / "g"), "-q"]),
    Scenario("fit-transform --apply", _indexed, lambda w: [
        "fit-transform", str(w / "g"), "--kind", "pca", "--dim", "6", "--out", str(w / "T"),
        "--apply", "-q"]),
    Scenario("upgrade run", _upgrading, lambda w: [
        "upgrade", "run", str(w / "g"), "--commit-every", "4", "--batch-size", "4", "-q"]),
    Scenario("upgrade finish", _upgraded, lambda w: ["upgrade", "finish", str(w / "g")]),
    Scenario("HTTP add/delete", _indexed, lambda w: [
        "serve", str(w / "g"), "--workers", "1", "--log-level", "warning"], http=True),
    Scenario("tune", _indexed, lambda w: ["tune", str(w / "g")], available=_has_tune),
    # the same store paths with real models (slow: the benchmark runs them)
    Scenario("index global (effnet-lite0)", _nothing, lambda w: [
        "index", str(w / "src"), "--out", str(w / "g"), "--model", "effnet-lite0",
        "--runtime", "torch", "--threads", "1", "--commit-every", "5", "--batch-size", "4",
        "-q"], slow=True),
    Scenario("upgrade run (effnet-lite0 -> effnet-lite2)", _lite0_upgrading, lambda w: [
        "upgrade", "run", str(w / "g"), "--runtime", "torch", "--threads", "1",
        "--commit-every", "4", "--batch-size", "4", "-q"], slow=True),
]}
MODELS = {name: ("effnet-lite0 members (untrained mixer)" if "fusion" in name else
                 "effnet-lite0 -> effnet-lite2" if "lite2" in name else
                 "effnet-lite0" if "lite0" in name else
                 "tiny-local (test)" if "local" in name else
                 "tiny-test -> tiny-b (test)" if "upgrade" in name else "tiny-test (test)")
          for name in SCENARIOS}
"""The model(s) each scenario embeds with (the tiny ones are seeded random projections
of an 8x8 thumbnail, tests/_tiny.py)."""


# ---------------------------------------------------------------- HTTP client
def _upload_images(n: int, seed: int = 23) -> list[bytes]:
    import io

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray((rng.random((24, 20, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


DELETED = [f"s{i:03d}.png" for i in (2, 3, 11, 19)]


def _sequence(url: str) -> tuple[set[str], set[str], bool]:
    """Uploads ``up00..`` and deletes ``DELETED`` (items of the start state), one at a
    time; returns (acknowledged adds, acknowledged deletes, whether the server went
    away)."""
    import httpx

    added: set[str] = set()
    deleted: set[str] = set()
    with httpx.Client(base_url=url, timeout=60) as c:
        try:
            for n, data in enumerate(_upload_images(UPLOADS)):
                r = c.post("/v1/items", files={"image": (f"{n}.png", data, "image/png")},
                           data={"id": f"up{n:02d}", "replace": "true",
                                 "metadata": json.dumps({"n": n})})
                assert r.status_code in (200, 201), r.text
                added.add(f"up{n:02d}")
            for i in DELETED:
                r = c.delete(f"/v1/items/{i}")
                assert r.status_code in (200, 404), r.text
                deleted.add(i)
        except httpx.TransportError:
            return added, deleted, True
    return added, deleted, False


def _serve(work: Path, kill_at: int, count_file: Path, log: Path) -> tuple[subprocess.Popen[str],
                                                                          str]:
    from _service import free_port, wait_ready

    port = free_port()
    args = [*SCENARIOS["HTTP add/delete"].args(work), "--port", str(port)]
    fh = open(log, "a")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen(_faults.command(kill_at, count_file, args), env=_faults.env(),
                            stdout=fh, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 120, proc)
    except BaseException:
        _stop(proc, hard=True)
        raise
    return proc, url


def _stop(proc: subprocess.Popen[str], *, hard: bool = False) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _http_run(work: Path, kill_at: int, count_file: Path) -> tuple[bool, list[str]]:
    """One HTTP session (killed at ``kill_at`` or not); returns (killed, failures)."""
    proc, url = _serve(work, kill_at, count_file, work / "server.log")
    notes: list[str] = []
    try:
        added, deleted, gone = _sequence(url)
    finally:
        _stop(proc)  # SIGTERM (a kill point may still come in the shutdown)
    killed = proc.returncode == -signal.SIGKILL
    if gone and not killed:
        notes.append(f"server went away without the kill (rc {proc.returncode})")
    if killed:  # acknowledged writes survive the kill
        from galleria.store.gallery import Gallery

        with Gallery.open(work / "g", readonly=True) as g:
            have = set(g.ids())
        lost = sorted(added - have)
        back = sorted(deleted & have)
        if lost:
            notes.append(f"acknowledged uploads lost: {lost}")
        if back:
            notes.append(f"acknowledged deletes undone: {back}")
    return killed, notes


# ---------------------------------------------------------------- driving
def start_state(scenario: Scenario, work: Path, images: Path, cache: Path) -> None:
    """Copy the scenario's start state into ``work`` (built once into ``cache``)."""
    tpl = cache / scenario.name.replace(" ", "_").replace("/", "_")
    if not tpl.exists():
        tmp = tpl.with_name(tpl.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        scenario.prepare(tmp, images)
        tmp.rename(tpl)
    shutil.copytree(tpl, work, symlinks=True)


NOTHING_TO_DO = ("no upgrade", "nothing to finish", "already has a transformed space")
"""What a re-run says when the killed command had already finished (``upgrade finish``
after its last commit; ``fit-transform --apply`` once its space is primary: refused
before fitting again). The gallery must then already equal the reference."""


def _run(scenario: Scenario, work: Path, kill_at: int, count_file: Path
         ) -> tuple[bool, list[str]]:
    """Run the scenario's command; returns (killed, failures)."""
    if scenario.http:
        return _http_run(work, kill_at, count_file)
    out = _faults.run(kill_at, count_file, scenario.args(work))
    if out.returncode == -signal.SIGKILL:
        return True, []
    if out.returncode == 2 and any(s in out.stderr.lower() for s in NOTHING_TO_DO):
        return False, []
    if out.returncode != 0:
        return False, [f"exit {out.returncode}: {out.stderr[-800:]}"]
    return False, []


def _clean_in_process(scenario: Scenario, work: Path) -> tuple[int, list[str]]:
    """The command without a kill, in this process: (points, failures)."""
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc, points = _faults.count_in_process(scenario.args(work))
    text = err.getvalue().lower()
    if rc == 0 or (rc == 2 and any(s in text for s in NOTHING_TO_DO)):
        return points, []
    return points, [f"exit {rc}: {err.getvalue()[-800:]}"]


def _clean(scenario: Scenario, work: Path, count_file: Path, in_process: bool
           ) -> tuple[int, list[str]]:
    if in_process and not scenario.http:
        return _clean_in_process(scenario, work)
    _, failures = _run(scenario, work, 0, count_file)
    return _faults.count(count_file), failures


@dataclass
class Reference:
    """A scenario's start state and clean run: their contents and the run's points."""

    start: _faults.Contents
    ref: _faults.Contents
    points: int


def reference(scenario: Scenario, work: Path, images: Path, cache: Path, *,
              in_process: bool = False) -> Reference:
    """The start state's and the clean run's contents and the number of kill points
    (``in_process``: the command runs in this process; HTTP always in a server)."""
    start_state(scenario, work, images, cache)
    before = _faults.contents(work / "g") if (work / "g").exists() else {}
    total, failures = _clean(scenario, work, work / "count.txt", in_process)
    if failures:
        raise RuntimeError(f"{scenario.name}: the clean run failed: {failures}")
    return Reference(before, _faults.contents(work / "g"), total)


def run_point(scenario: Scenario, point: int, work: Path, images: Path, cache: Path,
              ref: Reference, *, in_process: bool = False) -> PointResult:
    """Kill ``scenario`` at ``point``, audit, run it again (``in_process``: in this
    process), audit (see the module docstring)."""
    t = time.perf_counter()
    start_state(scenario, work, images, cache)
    killed, failures = _run(scenario, work, point, work / "kill.txt")
    if (work / "g" / "gallery.json").exists():
        after = _faults.audit(work / "g", ref.ref, start=ref.start)
    else:  # killed before the gallery was complete (no header yet): nothing is sound
        after = _faults.Audit(sound=False)
    _, again = _clean(scenario, work, work / "again.txt", in_process)
    final = _faults.audit(work / "g", ref.ref)
    return PointResult(scenario.name, point, killed, after, final,
                       time.perf_counter() - t, failures + again)


def seeded_points(total: int, n: int, seed: int) -> list[int]:
    """``n`` kill points in ``1..total`` (all of them when ``n >= total``), seeded."""
    if n >= total:
        return list(range(1, total + 1))
    rng = np.random.default_rng(seed)
    return sorted(int(p) for p in rng.choice(np.arange(1, total + 1), n, replace=False))
