"""Imports run one way, ``studio → jobs → adapters → adapters.core``, checked on the source with ``ast``.

Inside ``jobs/`` they run one way too: from the subpackages down to the shared contracts at
its root (``JOBS_RANK``). Lazy imports inside functions count: a loop hidden by an import
inside a function is still a loop (the next person moves the import to the top and the
package stops importing).
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


# The subpackages of ``jobs/``, lowest first: a module may import from a lower rank only, never
# from its own rank's siblings or from above. ``root`` is the shared contracts (home, spec, run
# folder, confinement), which every subpackage uses and which import none of them.
# estimate and results both build on training but not on each other; engine (the model
# process's tasks) and bakeoff (a queue of runs) are the two tops, and neither needs the other.
JOBS_RANK = {
    "root": 0,
    "data": 1,
    "training": 2,
    "estimate": 3,
    "results": 3,
    "runner": 4,
    "engine": 5,
    "bakeoff": 5,
}
CONTRACTS = ("home", "spec", "runfolder", "confine")


def jobs_part(module: str) -> str | None:
    """Which part of ``jobs/`` a dotted name belongs to: a subpackage, ``root``, or None outside jobs."""
    parts = module.split(".")
    if parts[0] != "jobs":
        return None
    if len(parts) == 1 or parts[1] in CONTRACTS:
        return "root"
    return parts[1]


def jobs_violations() -> list[str]:
    bad = []
    for path, module in sources("jobs"):
        here = jobs_part(module)
        for line, name in imported(path, module):
            there = jobs_part(name)
            if there is None or there == here:
                continue
            if there not in JOBS_RANK or here not in JOBS_RANK:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name} is in no rank of JOBS_RANK; give "
                           f"the new subpackage its place there")
            elif JOBS_RANK[there] >= JOBS_RANK[here]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({here}) imports {name} ({there})")
    return bad


def test_jobs_subpackages_import_one_way():
    assert jobs_violations() == []


def test_every_jobs_subpackage_has_a_rank():
    found = {p.name for p in (ROOT / "jobs").iterdir() if (p / "__init__.py").is_file()}
    assert found == set(JOBS_RANK) - {"root"}
    assert {p.stem for p in (ROOT / "jobs").glob("*.py")} == set(CONTRACTS) | {"__init__"}


def test_the_jobs_check_sees_a_wrong_way_import(tmp_path, monkeypatch):
    """A contract reaching into a subpackage, a sibling import and a lazy upward one are each caught."""
    fake = {
        "jobs/spec.py": "def f():\n    from jobs.training import recipe\n",
        "jobs/results/m.py": "from jobs.estimate.estimator import estimate\n",
        "jobs/data/n.py": "def g():\n    from ..runner import store\n",
        "jobs/engine/ok.py": "from jobs.results import export\nfrom jobs import spec\n",
    }
    for rel, text in fake.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    found = "\n".join(jobs_violations())
    assert "jobs/spec.py:2 (root) imports jobs.training" in found
    assert "jobs/results/m.py:1 (results) imports jobs.estimate.estimator" in found
    assert "jobs/data/n.py:2 (data) imports jobs.runner" in found
    assert "jobs/engine/ok.py" not in found


# The library modules the web process must never load.
HEAVY = ("torch", "transformers", "peft", "bitsandbytes")


def web_side_jobs_modules() -> list[str]:
    """The ``jobs`` modules some studio module imports at its top: the web process loads these."""
    names = set()
    for path, module in sources("studio"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "jobs":
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names
                             if (ROOT / node.module.replace(".", "/") / f"{a.name}.py").is_file())
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.split(".")[0] == "jobs")
    return sorted(names)


def test_studio_never_imports_a_heavy_library():
    """Not even inside a function: the studio hands all model work to a process."""
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path, module in sources("studio")
           for line, name in imported(path, module) if name.split(".")[0] in HEAVY]
    assert bad == []


def test_what_the_web_process_imports_from_jobs_loads_no_torch():
    """Each contract, each subpackage and each jobs module the studio imports at its top, in a fresh
    interpreter: the torch-free status is the structure's, not an accident of import order."""
    import subprocess
    import sys

    # Lowest rank first, so the message names the module that brought torch in, not one above it.
    modules = sorted({"jobs", *(f"jobs.{c}" for c in CONTRACTS), *(f"jobs.{p}" for p in JOBS_RANK if p != "root"),
                      *web_side_jobs_modules()}, key=lambda m: (JOBS_RANK[jobs_part(m)], m))
    assert "jobs.runner.store" in modules and "jobs.bakeoff.driver" in modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            f"    heavy = [h for h in {HEAVY!r} if h in sys.modules]\n"
            "    assert not heavy, f'importing {name} imported {heavy}'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# Other libraries' private names the studio uses; only adapters.core.compat may touch them.
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")
PRIVATE_ATTRIBUTES = {"_version", "_forward_hooks", "_forward_pre_hooks", "_attn_implementation",
                      "_attn_implementation_internal", "_tied_weights_keys", "_can_set_attn_implementation"}


def private_touches(path: Path) -> list[str]:
    """Imports of a library's private module, attribute chains from a library into a private name,
    and the known private attributes, anywhere in ``path``."""
    def private(part: str) -> bool:
        return part.startswith("_") and not part.startswith("__")

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name):
                names = [".".join([inner.id, *reversed(chain)])]
            if node.attr in PRIVATE_ATTRIBUTES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
        for name in names:
            parts = name.split(".")
            if parts[0] in LIBRARIES and any(private(p) for p in parts[1:]):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return found


def test_only_compat_touches_other_libraries_private_internals():
    """Each private touch has one function in adapters.core.compat and a test in test_compat.py
    pinning it; a second place would be unpinned."""
    compat = ROOT / "adapters" / "core" / "compat.py"
    bad = [hit for package in ("adapters", "jobs", "studio") for path, _ in sources(package)
           if path != compat for hit in private_touches(path)]
    assert bad == []
    assert private_touches(compat)  # the checker sees what compat does


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


def test_test_files_share_through_helpers_not_through_each_other():
    """Plain helpers come from tests/helpers.py and fixtures through pytest; a test file imported by
    another runs its module-level code (and marks) twice and ties the two together."""
    bad = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for line, name in imported(path, path.stem):
            if name.split(".")[0] == "conftest" or name.split(".")[0].startswith("test_"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert bad == []
