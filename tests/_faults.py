"""Kill -9 at a chosen point of a galleria command (fault injection).

Used by tests/test_faults_*.py and benchmarks/bench_faults.py. Run as a script::

    python tests/_faults.py KILL_AT COUNT_FILE galleria-args...

A *point* is one call that changes the gallery on disk: a write transaction
begins (``Database.write`` entered) or commits (left), or a file is replaced,
renamed, unlinked or a folder removed (``os.replace``, ``os.rename``,
``os.unlink``, ``shutil.rmtree``). The process counts them and, at the
``KILL_AT``-th, sends itself SIGKILL just *before* the call happens: a real
``kill -9`` of the real command at a reproducible point, not a simulated one.
``KILL_AT = 0`` counts only; the count so far is written to ``COUNT_FILE`` after
every point (a server never exits by itself).

The tiny test extractors (tests/_tiny.py) are registered first, so galleries
built with them can be indexed, repaired and upgraded from their records.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_state = {"n": 0, "kill_at": 0, "count_file": ""}


def _tick(what: str) -> None:
    _state["n"] += 1
    n = _state["n"]
    if _state["kill_at"] and n == _state["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if _state["count_file"]:
        try:
            with open(_state["count_file"], "w") as fh:  # not os.replace: no extra tick
                fh.write(f"{n}\n")
        except OSError:
            pass


def install(kill_at: int, count_file: str = "") -> Callable[[], None]:
    """Count (and kill at) the points of this process (see the module docstring);
    returns a function that removes the wrappers again."""
    import galleria.store.db as dbm

    _state.update(n=0, kill_at=int(kill_at), count_file=count_file)
    orig_write = dbm.Database.write
    undo: list[tuple[Any, str, Any]] = [(dbm.Database, "write", orig_write)]

    @contextlib.contextmanager
    def write(self: Any) -> Iterator[Any]:
        _tick("begin")
        with orig_write(self) as c:
            yield c
        _tick("commit")

    dbm.Database.write = write  # type: ignore[method-assign]

    def wrap(mod: Any, name: str) -> None:
        f = getattr(mod, name)
        undo.append((mod, name, f))

        def g(*a: Any, **k: Any) -> Any:
            _tick(name)
            return f(*a, **k)

        setattr(mod, name, g)

    for mod, name in ((os, "replace"), (os, "rename"), (os, "unlink"), (shutil, "rmtree")):
        wrap(mod, name)

    def uninstall() -> None:
        for obj, name, f in reversed(undo):
            setattr(obj, name, f)
        _state.update(n=0, kill_at=0, count_file="")

    return uninstall


def count_in_process(args: Sequence[str]) -> tuple[int, int]:
    """Run ``galleria args...`` in this process, counting its points (no kill);
    returns ``(exit code, points)``. Faster than a subprocess; the same points."""
    from galleria.cli.main import main as galleria_main

    register_test_models()
    uninstall = install(0)
    try:
        rc = galleria_main(list(args))
        return rc, int(_state["n"])
    finally:
        uninstall()


def env() -> dict[str, str]:
    """The environment of a driven command: the sources of the galleria this process
    imported (this checkout's), one thread."""
    import galleria

    src = Path(galleria.__file__).resolve().parents[1]
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(src), str(HERE), e.get("PYTHONPATH", "")])
    e.setdefault("GALLERIA_THREADS", "1")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def command(kill_at: int, count_file: str | os.PathLike[str], args: Sequence[str]) -> list[str]:
    """The argv running ``galleria args...`` under this driver."""
    return [sys.executable, str(HERE / "_faults.py"), str(int(kill_at)), str(count_file),
            *map(str, args)]


def run(kill_at: int, count_file: str | os.PathLike[str], args: Sequence[str], *,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``galleria args...`` under the driver; returns the finished process."""
    return subprocess.run(command(kill_at, count_file, args), env=env(), capture_output=True,
                          text=True, timeout=timeout)


def count(count_file: str | os.PathLike[str]) -> int:
    p = Path(count_file)
    try:
        return int(p.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


# ------------------------------------------------------------------ audit
@dataclass
class Audit:
    """How a gallery compares with the reference (the same command run without a kill).

    ``lost``: (item, space) entries of the reference missing; ``duplicated``: items
    held in more spaces than the reference holds them in (an upgrade's old and new
    space at once); ``wrong``: entries whose data differs from the reference, or
    ids the reference does not have; ``silent``: items with no data in any space
    that are not recorded as lost; ``sound``: what ``check`` said.
    """

    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    silent: int = 0
    sound: bool = True
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.sound and not (self.lost or self.duplicated or self.wrong or self.silent)


def contents(path: str | os.PathLike[str]) -> dict[str, dict[str, np.ndarray]]:
    """``space -> {id: data}`` of a gallery (global: the vector; local: keypoints and
    descriptors side by side), read through the public API; items whose data cannot be
    read (a damaged segment) are left out."""
    from galleria.errors import FormatError
    from galleria.store.gallery import Gallery

    out: dict[str, dict[str, np.ndarray]] = {}
    with Gallery.open(path, readonly=True) as g:
        for sp in g.spaces():
            with g.snapshot() as snap:
                keys = snap.space_keys(sp.space)
            ids = [str(i) for i in g.ids_of(keys)]
            try:
                data = _read(g, sp, keys)
            except FormatError:  # a damaged start state: what can still be read, key by key
                data = []
                for k in keys:
                    try:
                        data += _read(g, sp, np.array([k]))
                    except FormatError:
                        data.append(None)
            out[sp.space] = {i: x for i, x in zip(ids, data, strict=True) if x is not None}
    return out


def _read(g: Any, sp: Any, keys: np.ndarray) -> list[np.ndarray]:
    if not len(keys):
        return []
    if sp.kind == "global":
        return list(g.get_vectors(keys, space=sp.space))
    return [np.concatenate([f.keypoints.astype(np.float32).ravel(),
                            np.asarray(f.descriptors, np.float32).ravel()])
            for f in g.get_local(keys, space=sp.space)]


def silent_losses(path: str | os.PathLike[str]) -> int:
    """Items with no data in any space that are not recorded as lost."""
    import sqlite3

    con = sqlite3.connect(f"file:{Path(path) / 'gallery.sqlite'}?mode=ro", uri=True, timeout=60)
    try:
        return int(con.execute(
            "SELECT COUNT(*) FROM items i WHERE NOT EXISTS (SELECT 1 FROM vectors v WHERE "
            "v.key = i.key) AND NOT EXISTS (SELECT 1 FROM lost l WHERE l.key = i.key)"
        ).fetchone()[0])
    finally:
        con.close()


Contents = dict[str, dict[str, np.ndarray]]


def _spaces_of(c: Contents) -> dict[str, int]:
    out: dict[str, int] = {}
    for entries in c.values():
        for i in entries:
            out[i] = out.get(i, 0) + 1
    return out


def _same(a: np.ndarray | None, b: np.ndarray, atol: float) -> bool:
    return a is not None and a.shape == b.shape and bool(np.allclose(a, b, atol=atol))


def audit(path: str | os.PathLike[str], reference: Contents, *, start: Contents | None = None,
          atol: float = 1e-5) -> Audit:
    """Compare the gallery at ``path`` with ``reference`` (see :class:`Audit`).

    With ``start`` (the state before the command), the gallery may be anywhere
    between the two (a killed command): every stored entry must equal the start's or
    the reference's, no item may be in more spaces than in either, and an item both
    hold must still be somewhere. Without it, the gallery must equal ``reference``.
    """
    from galleria.store.gallery import Gallery

    a = Audit()
    with Gallery.open(path, readonly=True) as g:
        rep = g.check(deep=True)
    a.sound = rep.ok
    a.problems = [f"{p.what}: {p.problem}" for p in rep.problems]
    a.silent = silent_losses(path)
    got = contents(path)
    where_ref, where_got = _spaces_of(reference), _spaces_of(got)
    if start is None:
        for sp, entries in reference.items():
            mine = got.get(sp, {})
            for i, x in entries.items():
                if i not in mine:
                    a.lost += 1
                elif not _same(mine[i], x, atol):
                    a.wrong += 1
        for sp, entries in got.items():
            ref = reference.get(sp, {})
            a.wrong += sum(1 for i in entries if i not in ref and i not in where_ref)
        a.duplicated = sum(max(0, n - where_ref.get(i, 0)) for i, n in where_got.items()
                           if i in where_ref)
        return a
    where_start = _spaces_of(start)
    for sp, entries in got.items():
        for i, x in entries.items():
            if not (_same(reference.get(sp, {}).get(i), x, atol)
                    or _same(start.get(sp, {}).get(i), x, atol)):
                a.wrong += 1
    a.duplicated = sum(max(0, n - max(where_ref.get(i, 0), where_start.get(i, 0)))
                       for i, n in where_got.items())
    a.lost = sum(1 for i in where_ref if i in where_start and i not in where_got)
    return a


def register_test_models() -> None:
    """The tiny test extractors (tests/_tiny.py) and ``tiny-b``, a second seeded
    projection (the new model of the kill matrix's upgrades)."""
    import _tiny
    from galleria.extractors.registry import _REGISTRY, register_model

    if "tiny-b" not in _REGISTRY:
        register_model("tiny-b", dim=12, input_size="8x8", source="tests",
                       description="second test projection")(
            lambda **_: _tiny.Tiny(seed=2, dim=12))


def main(argv: Sequence[str]) -> int:
    kill_at, count_file, *args = argv
    register_test_models()
    install(int(kill_at), count_file)
    from galleria.cli.main import main as galleria_main

    return galleria_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
