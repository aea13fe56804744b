"""The architecture holds: imports run downhill through the layers of docs/architecture.md, typer stays in the CLI,
curation and file reading stay light, and the tree is clean under ruff."""
from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# The one layer table. Bottom to top; within a layer, units from low to high. A module may import modules of its own
# unit, of lower units of its layer and of lower layers: never sideways-up or up. docs/architecture.md mirrors this
# table (checked below).
LAYERS: list[tuple[str, list[str]]] = [
    ("utils", ["guie._version", "guie.errors", "guie.utils", "guie.runtime", "guie.typed_yaml", "guie.distributed"]),
    ("foundation", ["guie.imaging", "guie.metrics"]),
    ("library", ["guie.models", "guie.losses", "guie.data.benchmarks", "guie.data", "guie.pipeline"]),
    ("engine", ["guie.embedding"]),
    ("apps", ["guie.evaluate", "guie.train", "guie.export", "guie.search", "guie.client", "guie.demo"]),
    ("cli", ["guie.cli"]),
    ("public face", ["guie"]),
]
RANK = {unit: (layer, pos) for layer, (_, units) in enumerate(LAYERS) for pos, unit in enumerate(units)}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "guie").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _unit(module: str) -> str:
    """The unit of a guie module: the longest unit name that is the module or a package above it."""
    best = max((u for u in RANK if module == u or module.startswith(u + ".")), key=len, default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, guie module) for every import in the file, at module level or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "guie"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "guie":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else target))
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted: the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles_between_files():
    """No two files import each other, directly or through others, at module level or inside functions (a lazy
    import still ties the two files together). A package's `__init__` counts as its own file: a backend that
    imports its package's `__init__`, which imports the backend, is a cycle (search.backends had one)."""
    graph = {module: {t for _, t in _imports(module, path) if t in MODULES and t != module}
             for module, path in MODULES.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles between files:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_cycle():
    """The check finds a cycle through a package `__init__`, and the import walk sees `from . import module`."""
    graph = {"p": {"p.a"}, "p.a": {"p.base"}, "p.base": set(), "q": {"q.a"}, "q.a": {"q"}}
    assert _cycles(graph) == [["q", "q.a"]]
    imports = {t for _, t in _imports("guie.search.backends", MODULES["guie.search.backends"])}
    assert {"guie.search.backends.base", "guie.search.backends.faiss_backend"} <= imports


def test_every_import_runs_downhill():
    uphill = []
    for module, path in MODULES.items():
        mine = _unit(module)
        for line, target in _imports(module, path):
            theirs = _unit(target)
            if theirs != mine and RANK[theirs] > RANK[mine]:
                uphill.append(f"{path.relative_to(ROOT)}:{line}: {module} ({LAYERS[RANK[mine][0]][0]}) imports "
                              f"{target} ({LAYERS[RANK[theirs][0]][0]})")
    assert not uphill, "imports that run uphill (see docs/architecture.md):\n" + "\n".join(uphill)


def test_the_checker_sees_function_level_and_relative_imports():
    """The walk must not miss the imports that used to run uphill: inside functions and relative ones."""
    imports = dict((t, line) for line, t in _imports("guie.cli.train", MODULES["guie.cli.train"]))
    assert "guie.train.engine" in imports and "guie.distributed" in imports   # both inside the command function
    assert _unit("guie.train.engine") == "guie.train" and _unit("guie") == "guie"
    assert RANK["guie.train"] > RANK["guie.embedding"] > RANK["guie.data"]


def test_typer_only_in_the_cli():
    offenders = []
    for module, path in MODULES.items():
        if module == "guie.cli" or module.startswith("guie.cli."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{module}:{node.lineno}" for n in names if n.split(".")[0] == "typer"]
    assert not offenders, f"typer imported outside guie.cli: {offenders}"


def test_ray_only_in_ray_embed():
    """Ray is an optional extra: only `guie.embedding.ray_embed` imports it (inside its functions)."""
    offenders = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n.split(".")[0] == "ray" for n in names) and module != "guie.embedding.ray_embed":
                offenders.append(f"{module}:{node.lineno}")
    assert not offenders, f"ray imported outside guie.embedding.ray_embed: {offenders}"


def test_curation_and_embeddings_files_stay_light(tmp_path):
    """`import guie.data` does not load the trainer; reading an embeddings file needs no torch (search uses it)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = np.arange(6, dtype=np.float32).reshape(3, 2)
    table = pa.Table.from_pandas(pd.DataFrame({"path": ["a", "b", "c"]}), preserve_index=False)
    table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 2))
    pq.write_table(table, tmp_path / "e.parquet")
    code = ("import sys, guie.data, guie.data.manifest, guie.data.builder, guie.embedding.files as f\n"
            f"df, emb = f.read_embeddings({str(tmp_path / 'e.parquet')!r})\n"
            "assert emb.shape == (3, 2) and list(df['path']) == ['a', 'b', 'c']\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('guie.train', 'torch')))\n"
            "assert not loaded, loaded\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_docs_mirror_the_layer_table():
    page = (ROOT / "docs" / "architecture.md").read_text()
    for i, (name, units) in enumerate(LAYERS):
        row = re.search(rf"^\| {i} {re.escape(name)} \|([^|]*)\|", page, flags=re.M)
        assert row, f"docs/architecture.md has no table row '| {i} {name} | ...'"
        assert re.findall(r"`([\w.]+)`", row.group(1)) == units, f"layer {i} {name}: docs and LAYERS differ"
    assert (ROOT / "docs" / "architecture.svg").is_file() and "architecture.svg" in page


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e .[dev])")
def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_public_face_resolves_every_name():
    import guie

    for name in guie.__all__:
        assert getattr(guie, name) is not None, name
    assert guie.mean_precision_at_k([[0.0], [1.0]], [0, 1], [[0.1], [0.9]], [0, 1], k=1) == 1.0
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        guie.nothing  # noqa: B018
