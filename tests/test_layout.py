"""The package's layers (docs/architecture.md) hold: no module imports from a higher
layer or from a sibling layer, and no module outgrows what a reader takes in."""

import ast
from pathlib import Path

import pytest
from conftest import mergekit_independent

import nearswap_mergekit

pytestmark = mergekit_independent

PACKAGE = Path(nearswap_mergekit.__file__).parent
#: Each subpackage's layer: a module may import from its own layer's package and
#: from lower layers. ladder and tools share a layer and do not import each other.
LAYERS = {"method": 0, "plan": 1, "ladder": 2, "tools": 2, "cli": 3}
#: Modules outside the subpackages: tiny.py builds stand-in checkpoints and imports
#: nothing of the package; __init__.py names the public API lazily.
TOP_LEVEL = {"tiny": 0, "__init__": 0}
MAX_LINES = 450


def modules():
    return sorted(path for path in PACKAGE.rglob("*.py"))


def unit_of(path: Path) -> str:
    """The subpackage of a module (its layer's name), or the top-level module's name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def rank(unit: str) -> int:
    return LAYERS[unit] if unit in LAYERS else TOP_LEVEL[unit]


def imported_units(path: Path):
    """(line, unit) for every import of this package in the module, wherever it is
    (imports inside functions count too)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "nearswap_mergekit":
                continue
            if len(parts) > 1:
                yield node.lineno, parts[1]
            else:  # from nearswap_mergekit import plan, __version__, nearswap_chain ...
                for alias in node.names:
                    name = alias.name
                    if name in LAYERS or name in TOP_LEVEL:
                        yield node.lineno, name
                    else:  # the public names: defined in method/ (the lazy table), or the version
                        yield node.lineno, "method" if name != "__version__" else "__init__"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "nearswap_mergekit" and len(parts) > 1:
                    yield node.lineno, parts[1]


def layer_violations(path: Path, source=None):
    source = source or unit_of(path)
    name = path.relative_to(PACKAGE) if path.is_relative_to(PACKAGE) else path.name
    problems = []
    for line, target in imported_units(path):
        if target == source:
            continue
        if target not in LAYERS and target not in TOP_LEVEL:
            problems.append(f"{name}:{line}: imports nearswap_mergekit.{target}, "
                            "a module in no layer")
        elif rank(target) > rank(source) or (rank(target) == rank(source) and source in LAYERS):
            problems.append(f"{name}:{line}: {source} (layer {rank(source)}) "
                            f"imports {target} (layer {rank(target)})")
    return problems


def test_every_module_is_in_a_layer():
    units = {unit_of(path) for path in modules()}
    assert units <= set(LAYERS) | set(TOP_LEVEL), units - set(LAYERS) - set(TOP_LEVEL)
    assert set(LAYERS) <= units


def test_imports_go_down_the_layers():
    problems = [problem for path in modules() for problem in layer_violations(path)]
    assert not problems, "\n".join(problems)


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule is not vacuous: a plan module importing the CLI, or the ladder
    importing a tool, is caught."""
    for where, text in (("plan", "from nearswap_mergekit.cli import common\n"),
                        ("ladder", "def f():\n    from nearswap_mergekit.tools import pin\n"),
                        ("method", "from nearswap_mergekit import plan\n")):
        fake = tmp_path / f"{where}_probe.py"
        fake.write_text(text)
        assert layer_violations(fake, where), where
    fake.write_text("from nearswap_mergekit.method import spec\n")
    assert not layer_violations(fake, "cli")


@pytest.mark.parametrize("path", modules(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_module_is_over_the_size_limit(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it along a seam"
