"""Imports run one way, ``studio → jobs → adapters → adapters.core``, checked on the source with ``ast``.

Lazy imports inside functions count too: a loop hidden by an import inside a function is
still a loop (the next person moves the import to the top and the package stops importing).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("app", "studio", "jobs", "adapters", "bench", "tests", "conftest")

# Which of the project's packages each layer may import (its own and those below it).
ALLOWED = {
    "adapters.core": {"adapters.core"},
    "adapters": {"adapters"},
    "jobs": {"jobs", "adapters"},
    "studio": {"studio", "jobs", "adapters"},
}


def layer_of(module: str) -> str:
    return "adapters.core" if module == "adapters.core" or module.startswith("adapters.core.") else module.split(".")[0]


def imported(path: Path, module: str) -> list[tuple[int, str]]:
    """Every module ``path`` imports, anywhere in it, as absolute dotted names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # ``from adapters import core`` imports adapters.core, not just adapters
            found += [(node.lineno, f"{name}.{a.name}") for a in node.names if a.name != "*"]
    return found


def sources(package: str):
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        yield path, ".".join(parts)


def violations(package: str) -> list[str]:
    bad = []
    for path, module in sources(package):
        allowed = ALLOWED[layer_of(module)]
        for line, name in imported(path, module):
            top = name.split(".")[0]
            if top not in PROJECT:
                continue  # a library
            target = layer_of(name) if top == "adapters" else top
            if target == "adapters.core" and layer_of(module) != "adapters.core":
                continue  # everyone may import the bottom
            if target not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("package", ["adapters.core", "adapters", "jobs", "studio"])
def test_no_module_imports_upward(package):
    assert violations(package) == []


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The check itself must catch an import inside a function and a relative one."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from jobs.spec import JobSpec\n    from ..core import errors\n    import studio.cli\n")
    names = [n for _, n in imported(src, "adapters.quant.m")]
    assert "jobs.spec" in names and "studio.cli" in names and "adapters.core.errors" in names


def test_the_web_side_imports_the_bottom_without_torch():
    """``adapters.core`` is where the web process gets its errors from: it must not need torch."""
    import subprocess
    import sys

    code = ("import sys, adapters, adapters.core.errors, adapters.core.memory\n"
            "assert 'torch' not in sys.modules, 'importing adapters.core imported torch'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
