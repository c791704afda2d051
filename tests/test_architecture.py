"""The house's rules (docs/architecture.md), read from the source: each stage of dmqn_core imports only
the stages before it; dmqn_core imports neither dmqn_inspect nor dmqn_cli; no folder grows past a dozen
modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "dmqn_core"

# Stage of each part of dmqn_core, in the order they may import each other. The base modules are
# imported by every stage; quickstart strings every stage together. runs/ comes before training/
# because training writes runs (the store, checkpoints, the inspection sample).
STAGES = {
    "errors": 0,
    "config": 0,
    "declaration": 0,
    "workspace": 0,
    "progress": 0,
    "uris": 0,
    "devices": 0,
    "data": 1,
    "nn": 2,
    "models": 3,
    "runs": 4,
    "training": 5,
    "serving": 6,
    "quickstart": 7,
    "__init__": 8,
}


def stage_of(module: str) -> int | None:
    """Stage of a dotted module under dmqn_core (``dmqn_core.models.dmqn.mcqm`` -> models)."""
    parts = module.split(".")
    if parts[0] != "dmqn_core":
        return None
    if len(parts) == 1:
        return STAGES["__init__"]
    return STAGES[parts[1]]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from dmqn_core.training import distributed` imports a module of that package.
            names.update(
                f"{node.module}.{alias.name}"
                for alias in node.names
                if (CORE.parent / node.module.replace(".", "/") / f"{alias.name}.py").exists()
            )
    return names


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1 and parts[:-1] != ["dmqn_core"]:
        parts = parts[:-1]
    return ".".join(parts)


CORE_FILES = sorted(CORE.rglob("*.py"))


def test_every_part_of_dmqn_core_has_a_stage():
    for path in CORE_FILES:
        assert stage_of(module_name(path)) is not None, path


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_stage_imports_only_the_stages_before_it(path):
    own = stage_of(module_name(path))
    for name in imported_modules(path):
        assert not name.startswith(("dmqn_cli", "dmqn_inspect")), f"{path.name} imports {name}"
        other = stage_of(name)
        if other is not None and name != "dmqn_core":  # dmqn_core alone: its __version__
            assert other <= own, f"{module_name(path)} (stage {own}) imports {name} (stage {other})"


def test_dmqn_inspect_never_imports_the_cli():
    for path in sorted((ROOT / "dmqn_inspect").rglob("*.py")):
        assert not any(name.startswith("dmqn_cli") for name in imported_modules(path)), path


def test_no_folder_of_dmqn_core_holds_more_than_a_dozen_modules():
    for folder in [CORE, *(p for p in CORE.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 12, f"{folder} holds {len(modules)} modules"


# The size rules (docs/architecture.md, "Size"): a module a reader takes in at once, a function that fits a
# screen or two. A function's lines run from its `def` to its last line, decorators excluded.
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# "path" (a module) or "path:function" -> why it may be longer; each is named in docs/architecture.md
# under "Exceptions to the size rules".
SIZE_EXCEPTIONS: dict[str, str] = {}


def _over_the_size_rules() -> list[str]:
    found = []
    for path in CORE_FILES:
        relative = str(path.relative_to(ROOT))
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            found.append(relative)
        for node in ast.walk(ast.parse(text, filename=relative)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    found.append(f"{relative}:{node.name}")
    return found


def test_no_module_over_400_lines_and_no_function_over_80_but_the_documented_exceptions():
    over = _over_the_size_rules()
    assert [name for name in over if name not in SIZE_EXCEPTIONS] == []
    # An exception that no longer needs to be one leaves the list (and the docs).
    assert sorted(set(SIZE_EXCEPTIONS) - set(over)) == []
    documented = (ROOT / "docs" / "architecture.md").read_text()
    assert [name for name in SIZE_EXCEPTIONS if f"`{name}`" not in documented] == []
