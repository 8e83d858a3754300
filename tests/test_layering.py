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
