"""Imports run one way: factory.schemas <- synthetic <- models <- core <- build <- {train, publish} <- lab <- cli.

A newcomer knows their room from the folder, and the product never depends on the lab: a benchmark
can change without touching what makes rows (see also the code-version test in test_pipeline)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# room -> rank; a module may import its own room and rooms of lower rank, nothing else of ours
RANKS = {
    "factory.schemas": 0,
    "factory.synthetic": 1,
    "factory.models": 2,
    "factory.core": 3,
    "factory.build": 4,
    "factory.train": 5,
    "factory.publish": 5,
    "factory.lab": 6,
    "factory.cli": 7,
}
# core, models and the generator work on tensors and records: no cluster, no files of a build
NO_RAY = ("factory.schemas", "factory.synthetic", "factory.models", "factory.core")


def room(module: str) -> str | None:
    if module == "factory":
        return "factory"
    return next((r for r in sorted(RANKS, key=len, reverse=True) if module == r or module.startswith(r + ".")), None)


def imports(path: Path) -> list[str]:
    """Absolute names of everything the file imports; a relative import is resolved against its package."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
            module = ".".join(part for part in (base, node.module or "") if part)
            found += [module] + [f"{module}.{a.name}" for a in node.names]
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def crossings() -> list[str]:
    bad = []
    for path in sorted((ROOT / "factory").rglob("*.py")):
        here = room(module_name(path))
        if here in (None, "factory"):
            assert module_name(path) == "factory", f"{path} is in no room; add it to one or to RANKS"
            continue
        for name in imports(path):
            there = room(name)
            if name.split(".")[0] == "ray" and here in NO_RAY:
                bad.append(f"{module_name(path)} imports {name}")
            if there in (None, "factory", here):
                continue
            if RANKS[there] >= RANKS[here]:
                bad.append(f"{module_name(path)} ({here}) imports {name} ({there})")
    return bad


def test_imports_run_one_way():
    assert crossings() == []


def test_a_wrong_way_import_is_caught():
    """The check itself can fail: a core module that imports the build, absolutely or relatively, is reported."""
    fake = ROOT / "factory" / "core" / "_wrong_way_probe.py"
    fake.write_text("from factory.build.spec import BuildSpec\nfrom ..lab import report\nimport ray\n")
    try:
        found = crossings()
    finally:
        fake.unlink()
    assert "factory.core._wrong_way_probe (factory.core) imports factory.build.spec (factory.build)" in found
    assert "factory.core._wrong_way_probe imports ray" in found
    assert "factory.core._wrong_way_probe (factory.core) imports factory.lab.report (factory.lab)" in found
