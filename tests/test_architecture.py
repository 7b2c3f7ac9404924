"""The shape of the code: no import cycle between project files, scorers as a leaf, eval above hsd, adapters switched
only in hsd/models, no file over 400 lines."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hsd", "eval")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports at run time (at the top or inside functions; not typing-only imports)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            else:
                visit(child)
                continue
            found.update(t for t in targets if t in modules and t != name)
    visit(ast.parse(path.read_text()))
    # importing a.b.c also runs the packages a.b and a above it, except those the importer already sits in
    ancestors = {name.rsplit(".", n)[0] for n in range(1, name.count(".") + 1)}
    return found | {t.rsplit(".", n)[0] for t in found for n in range(1, t.count(".") + 1)} - ancestors - {name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle_between_project_files():
    graph, index, low, stack, on, cycles = _graph(), {}, {}, [], set(), []

    def strong(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    assert len(graph) > 60 and not cycles, cycles


def test_layers():
    graph = _graph()
    assert not graph["hsd"] and not graph["hsd.models"] and not graph["hsd.diffusion"]  # inits that import nothing
    for name, deps in graph.items():
        deps = deps - {"hsd", "hsd.models", "hsd.diffusion"}
        if name.startswith("hsd.scorers"):  # a leaf: nothing of training, nothing of eval
            assert all(d.startswith("hsd.scorers") or d in ("hsd.io", "hsd.errors") for d in deps), (name, deps)
        if name.startswith("hsd") and name != "hsd.cli":  # eval sits on hsd; only the entry point registers it
            assert not any(d.startswith("eval") for d in deps), (name, deps)
        if name in ("hsd.errors", "hsd.io", "hsd.models.targets", "hsd.diffusion.grid", "hsd.names"):  # leaves
            assert deps <= {"hsd.errors"}, (name, deps)
        if name.startswith("hsd.config"):  # the schema and every world's rules load without torch or a world module
            assert all(d.startswith(("hsd.config", "hsd.errors", "hsd.io", "hsd.models.targets", "hsd.diffusion.grid",
                                        "hsd.names"))
                       for d in deps), \
                (name, deps)
    assert "hsd.scorers.scorers" in graph["eval.run"] and "hsd.scorers.scorers" in graph["hsd.worlds.sd"]


SWITCHES = re.compile(r"\.(set_adapters?|enable_adapters|disable_adapters|delete_adapter|enable_adapter_layers|"
                      r"disable_adapter_layers)\(|\bactive_adapters?\s*=")


def test_peft_adapters_are_switched_only_in_hsd_models():
    offenders = [f"{path.relative_to(ROOT)}:{i}" for pkg in PACKAGES for path in (ROOT / pkg).rglob("*.py")
                 if "hsd/models" not in path.as_posix()
                 for i, line in enumerate(path.read_text().splitlines(), 1) if SWITCHES.search(line)]
    assert not offenders, offenders


def test_no_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for d in (*PACKAGES, "tests", "benchmarks", "scripts")
            for p in (ROOT / d).rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_world_names_have_one_source():
    """hsd.names is the one list the registry, the config rules, the schema and the CLI read (issue 21)."""
    from hsd.config import load_config
    from hsd.config.worlds import RULES
    from hsd.errors import ConfigError
    from hsd.names import LAB_WORLDS, WORLDS
    from hsd.worlds import CLASSES
    assert set(WORLDS.values()) == set(CLASSES) == set(RULES)
    for bad, names in (("world=nope", WORLDS), ("lab.world=nope", LAB_WORLDS)):
        with pytest.raises(ConfigError) as e:
            load_config([], [bad])
        assert all(n in str(e.value) for n in names), str(e.value)
    r = subprocess.run([sys.executable, "-m", "hsd.cli", "lab-teacher", "--world", "nope"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and all(repr(n) in r.stderr for n in LAB_WORLDS), r.stderr
    literal = re.compile(r"""["']digits["'],\s*["']blocks["']""")  # a second copy of the lab world list
    assert not [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                if p.name != "names.py" and literal.search(p.read_text())]
