"""The package layers hold: import-linter's contracts in pyproject.toml ([tool.importlinter]) and no import
cycle anywhere in the project (grimp's graph: every import statement, also those inside functions).

Both are shown to fail: a copy of the tree with one upward import breaks a contract, and the cycle
finder finds a planted cycle.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("families", "recipes", "convert", "benchmarks", "review_app")
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)} if pythonpath else dict(os.environ)
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def _modules_without_package_inits(graph):
    """The same graph without the ``pkg -> pkg.module`` edges of package __init__ files that only
    re-export (a package importing its own submodule is not a layering cycle)."""
    g = grimp.ImportGraph()
    for m in graph.modules:
        g.add_module(m)
        for d in graph.find_modules_directly_imported_by(m):
            if not d.startswith(m + "."):
                g.add_import(importer=m, imported=d)
    return g


def test_the_import_contracts_are_kept():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "broken" in r.stdout and " 0 broken" in r.stdout


def test_an_upward_import_breaks_a_contract(tmp_path):
    for p in PACKAGES:
        shutil.copytree(ROOT / p, tmp_path / p, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    spec = tmp_path / "families" / "spec.py"
    spec.write_text(spec.read_text(encoding="utf-8") + "\n\ndef _bad():\n    import recipes.demo  # noqa\n")
    r = _lint(tmp_path, pythonpath=tmp_path)
    assert r.returncode != 0
    assert "families.spec -> recipes.demo" in r.stdout and "BROKEN" in r.stdout


def test_no_import_cycles_including_imports_inside_functions():
    graph = _modules_without_package_inits(grimp.build_graph(*PACKAGES, include_external_packages=False))
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    g = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        g.add_import(importer=a, imported=b)
    assert cycles(g) == [["p.a", "p.b", "p.c"]]


@pytest.mark.parametrize("module", ["recipes.nemo_backend", "recipes.nemo_recipe", "recipes.hf_backend"])
def test_converters_do_not_reach_a_training_backend_even_indirectly(module):
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    for conv in sorted(m for m in graph.modules if m.startswith("convert")):
        assert not graph.chain_exists(importer=conv, imported=module), (conv, module)
