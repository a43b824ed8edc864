"""The package's layering, as the package docstring states it: the training stack and the
integrations use the public loss API only, and no import inside kdfast goes back up a layer."""

import ast
import types
from pathlib import Path

import pytest

import kdfast
from kdfast.backends import DIVERGENCE_CODES
from kdfast.backends.build import check_codes

PACKAGE = Path(kdfast.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every kdfast module that ``path`` imports, at the top or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "kdfast" or m.startswith("kdfast.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_training_stack_and_integrations_use_the_public_loss_api_only():
    offending = []
    for name, imported in _graph().items():
        if name.startswith(("kdfast.train", "kdfast.integrations")):
            offending += [f"{name} imports {m}" for m in imported
                          if m in ("kdfast.ops", "kdfast.backends") or m.startswith("kdfast.backends.")]
    assert not offending, offending


def test_no_import_cycle_inside_the_package():
    graph = _graph()
    done, on_path = set(), []

    def visit(name):
        if name in on_path:
            raise AssertionError("import cycle: " + " -> ".join(on_path[on_path.index(name):] + [name]))
        if name in done:
            return
        on_path.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        on_path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_compiled_divergence_codes_match_python():
    if not kdfast.available_backends()["cpu"].available:
        pytest.skip("the C++ extension cannot be built here")
    from kdfast.backends import cpu_ext

    assert cpu_ext._extension().DIVERGENCE_CODES == DIVERGENCE_CODES
    swapped = types.ModuleType("fake_extension")
    swapped.DIVERGENCE_CODES = {"forward_kl": 1, "reverse_kl": 0, "jsd": 2}
    with pytest.raises(RuntimeError, match="fake_extension.DIVERGENCE_CODES .* differs from kdfast's"):
        check_codes(swapped, "DIVERGENCE_CODES", DIVERGENCE_CODES)
