"""The package's layers, read from its import graph: data flows one way, and no module imports itself back.

Every import in every module counts, the ones inside functions too (a lazy import is still a dependency).
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "analytic_diffusion"
KERNELS = Path(__file__).resolve().parents[1] / "kernels"  # installed as analytic_diffusion.kernels

# Lowest first. A module may import from its own layer's package and from any lower layer, never from a layer
# at its own rank or above (two packages of one rank are siblings that stay independent).
LAYERS = [
    ("kernels", "_cpu", "_cuda", "env", "files"),  # Triton kernels, compiled C++ / CUDA; environment; output folders
    ("ops",),  # the retrieval primitive and its backends
    ("grids", "viz"),  # σ grids; pictures (no knowledge of denoisers)
    ("data",),  # datasets, loaders
    ("denoisers", "metrics"),  # analytic denoisers; measures on samples and the training set
    ("sampling", "networks"),  # samplers and runs; trained networks and their adapters
    ("analysis", "benchmark", "integrations"),  # experiments over samplers and networks; benchmarks; other
    #                                            ecosystems' models (diffusers, EDM, smalldiffusion) over denoisers
    ("cli",),  # the command line
    ("__init__", "__main__"),  # the public API, the -m entry point
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules():
    """(module name, path) for the package and the kernels folder."""
    for root, prefix in ((PKG, "analytic_diffusion"), (KERNELS, "analytic_diffusion.kernels")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__" and len(parts) > 1:
                parts = parts[:-1]
            yield ".".join([prefix] + parts if parts != ["__init__"] else [prefix + "." + "__init__"]), path


def _imports(module: str, path: Path):
    """Absolute names of the analytic_diffusion modules that ``module`` imports, with line numbers."""
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    if module.endswith(".__init__"):
        base = module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = base[: len(base) - node.level + 1] + ([node.module] if node.module else [])
                target = ".".join(target)
            else:
                target = node.module or ""
            if target.startswith("analytic_diffusion"):
                for alias in node.names:  # "from . import x" may name a submodule
                    yield f"{target}.{alias.name}", node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("analytic_diffusion"):
                    yield alias.name, node.lineno


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _existing(name: str, known) -> str:
    """The longest prefix of an imported dotted name that is a module (drops imported function names)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts)


GRAPH = {}
for _mod, _path in _modules():
    GRAPH[_mod] = _path
KNOWN = set(GRAPH) | {"analytic_diffusion", "analytic_diffusion._cpu", "analytic_diffusion._cuda"}


def test_every_module_has_a_layer():
    missing = sorted({_layer(m) for m in GRAPH} - set(RANK))
    assert not missing, f"add these top-level modules to LAYERS in {__file__}: {missing}"


def test_imports_only_go_down():
    bad = []
    for mod, path in GRAPH.items():
        own = _layer(mod)
        for name, line in _imports(mod, path):
            target = _existing(name, KNOWN)
            if target in ("analytic_diffusion", "analytic_diffusion.__init__"):
                if own not in ("__init__", "__main__") and not name.endswith(".__version__"):
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} imports the package root ({name})")
                continue
            dep = _layer(target)
            if dep != own and RANK[dep] >= RANK[own]:
                bad.append(
                    f"{path.relative_to(PKG.parent)}:{line}: {own} (layer {RANK[own]}) imports {target} "
                    f"({dep}, layer {RANK[dep]})"
                )
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = {m: sorted({_existing(n, KNOWN) for n, _ in _imports(m, p)} & set(GRAPH) - {m}) for m, p in GRAPH.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in edges[m]:
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("bad_import", ["from ..sampling import sample", "from ..cli import main"])
def test_the_check_catches_an_upward_import(tmp_path, bad_import):
    """The checker itself: a denoiser module that imports sampling or the CLI is reported."""
    path = tmp_path / "bad.py"
    path.write_text(bad_import + "\n")
    names = [n for n, _ in _imports("analytic_diffusion.denoisers.bad", path)]
    target = _existing(names[0], KNOWN | {"analytic_diffusion.sampling", "analytic_diffusion.cli"})
    assert RANK[_layer(target)] >= RANK["denoisers"]


# ---------------------------------------------------------------------------------------------- the public API
# analytic_diffusion/__init__.py exports its names lazily (_EXPORTS: name -> defining module, imported on first
# use). __all__ and the TYPE_CHECKING block say the same thing to tools that never run the module (IDEs, mypy,
# pyright, the docs): the checks below keep the three in step.
INIT = PKG / "__init__.py"


def _init_tree() -> ast.Module:
    return ast.parse(INIT.read_text(encoding="utf-8"))


def _literal_all(tree: ast.Module) -> list:
    """__all__ as written: it must be one literal list of strings (a tool reads it without importing)."""
    found = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
    ]
    assert len(found) == 1, f"{INIT}: expected one assignment to __all__, found {len(found)}"
    assert isinstance(found[0], ast.List), f"{INIT}: __all__ must be a literal list"
    names = []
    for elt in found[0].elts:
        assert isinstance(elt, ast.Constant) and isinstance(elt.value, str), f"{INIT}: __all__ holds a non-string"
        names.append(elt.value)
    return names


def _type_checking_imports(tree: ast.Module) -> dict:
    """{name: module} of the ``if TYPE_CHECKING:`` block, which must hold only ``from .<module> import <name> as
    <name>`` statements (the explicit re-export form that mypy and pyright honour)."""
    blocks = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
    ]
    assert len(blocks) == 1, f"{INIT}: expected one top-level `if TYPE_CHECKING:` block, found {len(blocks)}"
    block = blocks[0]
    assert not block.orelse, f"{INIT}: the TYPE_CHECKING block has an else branch"
    out = {}
    for stmt in block.body:
        assert isinstance(stmt, ast.ImportFrom) and stmt.level == 1 and stmt.module, (
            f"{INIT}:{stmt.lineno}: the TYPE_CHECKING block may only hold `from .<module> import ...`"
        )
        for alias in stmt.names:
            assert alias.asname == alias.name, (
                f"{INIT}:{stmt.lineno}: write `{alias.name} as {alias.name}` (an explicit re-export), "
                f"not {alias.name}{' as ' + alias.asname if alias.asname else ''}"
            )
            assert alias.name not in out, f"{INIT}:{stmt.lineno}: {alias.name} imported twice"
            out[alias.name] = stmt.module
    return out


def test_all_is_the_exports_plus_version():
    import analytic_diffusion as ad

    written = _literal_all(_init_tree())
    assert written == ad.__all__
    assert len(set(written)) == len(written), "duplicate names in __all__"
    assert set(written) == set(ad._EXPORTS) | {"__version__"}, (
        f"in __all__ only: {sorted(set(written) - set(ad._EXPORTS) - {'__version__'})}; "
        f"in _EXPORTS only: {sorted(set(ad._EXPORTS) - set(written))}"
    )


def test_type_checking_block_imports_each_export_from_its_module():
    import analytic_diffusion as ad

    imports = _type_checking_imports(_init_tree())
    assert imports == ad._EXPORTS, "\n".join(
        f"{name}: TYPE_CHECKING imports it from {imports.get(name)!r}, _EXPORTS says {ad._EXPORTS.get(name)!r}"
        for name in sorted(set(imports) | set(ad._EXPORTS))
        if imports.get(name) != ad._EXPORTS.get(name)
    )


def test_no_export_shares_its_name_with_a_submodule():
    """``from .metrics import memorization`` gives a type checker the submodule metrics.memorization, not the
    function of that name (mypy: a module where the run time has a function): such names are exported from their
    defining module instead."""
    import analytic_diffusion as ad

    clashes = []
    for name, module in ad._EXPORTS.items():
        folder = PKG.joinpath(*module.split("."))
        if (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file():
            clashes.append(f"{name} (from .{module}; also the module .{module}.{name})")
    assert not clashes, "exports named like a submodule of where they come from:\n" + "\n".join(clashes)


def test_every_export_resolves_at_run_time():
    """The lazy __getattr__ returns, for every exported name, the object its module defines under that name."""
    import importlib

    import analytic_diffusion as ad

    missing = []
    for name, module in ad._EXPORTS.items():
        obj = getattr(ad, name)
        if obj is not getattr(importlib.import_module(f"analytic_diffusion.{module}"), name):
            missing.append(f"{name}: ad.{name} is not analytic_diffusion.{module}.{name}")
    assert not missing, "\n".join(missing)
    assert isinstance(ad.__version__, str) and ad.__version__
    assert set(ad._EXPORTS) <= set(dir(ad))
    with pytest.raises(AttributeError, match="no attribute"):
        ad.__getattr__("not_an_export")


def test_py_typed_marker_is_shipped():
    """PEP 561: the empty py.typed marker tells type checkers to read the package's own annotations; setup.py must
    list it as package data so that wheels carry it."""
    assert (PKG / "py.typed").is_file()
    setup = ast.parse((PKG.parent / "setup.py").read_text(encoding="utf-8"))
    declared = [
        kw.value
        for node in ast.walk(setup)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
        for kw in node.keywords
        if kw.arg == "package_data"
    ]
    assert declared, "setup.py: setup() has no package_data"
    data = ast.literal_eval(declared[0])
    assert "py.typed" in data.get("analytic_diffusion", []), f"setup.py: package_data {data} lacks py.typed"
