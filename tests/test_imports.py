"""No import cycles between galleria's parts, and every module imports on its own.

The graph is read from the source (``ast``): every ``import`` / ``from ... import``
of a galleria module, at module level or inside a function (a lazy import that
closes a cycle is still a cycle between two concepts, e.g. ``eval`` <-> ``cli``).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import galleria

SRC = Path(galleria.__file__).parent

# Cycles inside one package allowed on purpose, with the reason.
ALLOWED_CYCLES = {
    frozenset({
        "galleria.extractors.adapters", "galleria.extractors.base",
        "galleria.extractors.effnet", "galleria.extractors.local",
        "galleria.extractors.opennsfw", "galleria.extractors.registry",
        "galleria.extractors.torch_model",
    }): "the registry builds model families lazily; Extractor.__reduce__ rebuilds "
        "through the registry (pickle as config). All of it lazy, inside one package.",
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _graph() -> dict[str, dict[str, bool]]:
    """module -> {imported galleria module: imported at module level?}."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, dict[str, bool]] = {m: {} for m in mods}
    for m, f in mods.items():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        top = set()
        for node in tree.body:  # module level, also under if/try (not in functions)
            stack = [node]
            while stack:
                n = stack.pop()
                top.add(id(n))
                if isinstance(n, (ast.If, ast.Try)):
                    stack.extend(n.body + n.orelse + getattr(n, "finalbody", []))
                    for h in getattr(n, "handlers", []):
                        stack.extend(h.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            if isinstance(node, ast.ImportFrom) and _type_checking_only(tree, node):
                continue
            for name in names:
                r = resolve(name)
                if r and r != m:
                    edges[m][r] = edges[m].get(r, False) or id(node) in top
    return edges


def _type_checking_only(tree: ast.Module, node: ast.AST) -> bool:
    for n in tree.body:
        if (isinstance(n, ast.If) and isinstance(n.test, ast.Name)
                and n.test.id == "TYPE_CHECKING" and node in ast.walk(n)):
            return True
    return False


def _cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.add(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))
    return out


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_cycles_between_galleria_packages():
    g = _graph()
    pkg = {m: ".".join(m.split(".")[:2]) for m in g}
    edges: dict[str, set[str]] = {}
    for a, bs in g.items():
        for b in bs:
            if pkg[a] != pkg[b]:
                edges.setdefault(pkg[a], set()).add(pkg[b])
            edges.setdefault(pkg[b], set())
    cycles = _cycles(edges)
    detail = {
        tuple(sorted(c)): sorted(f"{a} -> {b}" for a in g for b in g[a]
                                 if pkg[a] in c and pkg[b] in c and pkg[a] != pkg[b])
        for c in cycles
    }
    assert not cycles, f"package import cycles: {detail}"


def test_no_module_cycles_but_the_allowed_ones():
    g = _graph()
    found = _cycles({a: set(bs) for a, bs in g.items()})
    unexpected = [sorted(c) for c in found if c not in ALLOWED_CYCLES]
    assert not unexpected, f"module import cycles: {unexpected}"
    assert not any({"galleria.upgrade.psi", "galleria.upgrade.bct"} <= c for c in found)
    # at import time (module-level imports only) there is no cycle at all
    at_import = _cycles({a: {b for b, top in bs.items() if top} for a, bs in g.items()})
    assert not at_import, f"module-level import cycles: {[sorted(c) for c in at_import]}"


def test_eval_holds_no_cli_code():
    g = _graph()
    for m in g:
        if m.startswith("galleria.eval"):
            assert not any(b.startswith("galleria.cli") for b in g[m]), m
            assert "argparse" not in _modules()[m].read_text(encoding="utf-8"), m


@pytest.mark.slow  # default suite budget: 20-70 s on 2 cores under load
def test_every_module_imports_alone_in_a_fresh_interpreter():
    """One fresh interpreter forks a child per module, so each import starts with no
    galleria module loaded (third-party packages are preloaded once, for speed)."""
    script = textwrap.dedent("""
        import importlib, os, sys, traceback
        for heavy in ("numpy", "PIL.Image", "torch", "faiss", "safetensors.numpy"):
            try:
                importlib.import_module(heavy)
            except ImportError:
                pass
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    sys.stderr.write(name + ":\\n" + traceback.format_exc())
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status:
                failed.append(name)
        print("FAILED", failed)
        sys.exit(1 if failed else 0)
    """)
    mods = sorted(_modules())
    r = subprocess.run([sys.executable, "-c", script, *mods], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ,
                                         "PYTHONPATH": str(SRC.parent)})
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]


def test_the_cli_parser_imports_no_heavy_dependency():
    """`galleria --help` and argument errors answer in well under a second: building the
    parser imports neither torch nor the other heavy dependencies (they load with a
    command that needs them)."""
    code = ("import sys; import galleria.cli.main as m; m.build_parser(); "
            "print(sorted(h for h in ('torch', 'faiss', 'cv2', 'ray', 'fastapi', "
            "'onnxruntime') if h in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(SRC.parent)}).stdout
    assert out.strip() == "[]"
