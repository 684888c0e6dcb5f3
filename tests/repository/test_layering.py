"""The package's layers: every import points down (or stays in its own package), no modules
import each other however indirectly, and the deploy side loads without torch.

Imports inside functions and under ``TYPE_CHECKING`` count: they are the same dependency, only
later. docs/design.md lists the same layers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import qkd_deploy

PACKAGE = Path(qkd_deploy.__file__).parent

# Bottom first. A unit is a subpackage or a top-level module of qkd_deploy ("" is the package's
# own __init__). A unit may import units of lower rows only; units in one row are siblings and
# import none of each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("", "bits", "fileio", "targets", "torch_files"),
    ("config", "rundir"),
    ("data", "models"),
    ("quant",),
    ("calib",),
    ("distill",),
    ("train",),
    ("export",),
    ("runtime",),
    ("bench",),
    ("deploy",),
    ("pipeline",),
    ("train_and_export", "api"),
    ("cli",),
]
RANK = {unit: rank for rank, row in enumerate(LAYERS) for unit in row}

# What loads with torch unimportable: the runtimes, the measurements, the linter, engine
# building and bundles, and the CLI with its torch-free commands.
TORCH_FREE_MODULES = [
    "qkd_deploy",
    "qkd_deploy.bits",
    "qkd_deploy.targets",
    "qkd_deploy.config",
    "qkd_deploy.rundir",
    "qkd_deploy.data.preprocess",
    "qkd_deploy.runtime.base",
    "qkd_deploy.runtime.onnxruntime",
    "qkd_deploy.runtime.tensorrt",
    "qkd_deploy.runtime.engine_info",
    "qkd_deploy.bench.accuracy",
    "qkd_deploy.bench.commands",
    "qkd_deploy.bench.compare",
    "qkd_deploy.bench.diff",
    "qkd_deploy.bench.latency",
    "qkd_deploy.bench.plots",
    "qkd_deploy.bench.report",
    "qkd_deploy.deploy.lint",
    "qkd_deploy.deploy.engine",
    "qkd_deploy.deploy.bundle",
    "qkd_deploy.pipeline.diff",
    "qkd_deploy.cli",
]
TORCH_FREE_COMMANDS = [
    "lint",
    "bench",
    "report",
    "compare",
    "bundle",
    "verify",
    "build-engine",
    "diff",
]


def module_name(path: Path) -> str:
    parts = ("qkd_deploy", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> list[tuple[str, int]]:
    """The qkd_deploy modules a file imports, anywhere in it, with the line of each import.
    ``from package import name`` counts as importing the submodule when ``name`` is one."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((sub if sub in MODULES else node.module, node.lineno))
    return sorted({(name, line) for name, line in found if name.split(".")[0] == "qkd_deploy"})


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, list[tuple[str, int]]]:
    return {module: imports_of(path) for module, path in MODULES.items()}


def test_every_unit_has_a_layer():
    assert {unit(m) for m in MODULES} - set(RANK) == set(), "add the new unit to LAYERS"
    assert set(RANK) - {unit(m) for m in MODULES} == set(), "LAYERS names a unit that is gone"


def test_every_import_points_down_or_stays_in_its_package():
    upward = []
    for module, imported in graph().items():
        for target, line in imported:
            assert target in MODULES, f"{module}:{line} imports {target}, which does not exist"
            here, there = unit(module), unit(target)
            if here != there and RANK[there] >= RANK[here]:
                upward.append(f"{MODULES[module].name}:{line} {module} imports {target}")
    assert upward == [], "imports that do not point down:\n" + "\n".join(upward)


def test_no_import_cycle():
    edges = {m: sorted({t for t, _ in imported if t != m}) for m, imported in graph().items()}
    cycles = []
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in edges[module]:
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in edges:
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from qkd_deploy.bench import latency\n")
    ((target, line),) = imports_of(probe)
    assert (target, line) == ("qkd_deploy.bench.latency", 2)
    assert RANK[unit(target)] > RANK["config"]  # so config importing it is refused


NO_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
import importlib
for name in sys.argv[1].split(","):
    importlib.import_module(name)
from qkd_deploy.cli import main
for command in sys.argv[2].split(","):
    try:
        code = main([command, "--help"])
    except SystemExit as stop:  # argparse ends --help with exit 0
        code = stop.code or 0
    assert code == 0, command
loaded = [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] == "torch"]
assert not loaded, loaded
assert "tensorrt" not in sys.modules
print("all loaded")
"""


def test_the_deploy_side_and_its_commands_load_without_torch():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_TORCH,
            ",".join(TORCH_FREE_MODULES),
            ",".join(TORCH_FREE_COMMANDS),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("all loaded\n")
    assert all(f"usage: qkd-deploy {c}" in done.stdout for c in TORCH_FREE_COMMANDS)
