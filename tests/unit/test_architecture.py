"""The import-linter contracts (pyproject.toml) can fail: every library they forbid is one
the package really imports somewhere, and an import planted where a contract forbids it
makes `lint-imports` fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "operator" / "poolbudget"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def contracts() -> list[dict[str, Any]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found: list[dict[str, Any]] = config["tool"]["importlinter"]["contracts"]
    return found


def test_every_forbidden_library_is_one_the_package_imports() -> None:
    graph = grimp.build_graph("poolbudget", include_external_packages=True)
    forbidden = {
        module
        for contract in contracts()
        if contract["type"] == "forbidden"
        for module in contract["forbidden_modules"]
        if not module.startswith("poolbudget")
    }
    assert {"kopf", "kubernetes", "aiohttp", "asyncpg"} <= forbidden
    # Absent from the graph, a forbidden module can never be found imported: the contract
    # would pass whatever the domain imports.
    assert sorted(m for m in forbidden if m not in graph.modules) == []


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(tree / "pyproject.toml")],
        cwd=tree, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree / "operator")},
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("domain/facts.py", "import kubernetes.aio", "The pure domain does no I/O"),
        ("domain/sizing.py", "import prometheus_client", "The pure domain does no I/O"),
        ("api/v1alpha1.py", "import poolbudget.adapters.kube", "The pure domain does no I/O"),
        ("reconcile.py", "import aiohttp", "The reconciler reaches Kubernetes only"),
        ("adapters/postgres.py", "import poolbudget.adapters.kube", "Adapters are independent"),
        ("client.py", "import poolbudget.domain.sizing", "The application-side helpers"),
        ("pool_monitor.py", "import kopf", "The application-side helpers"),
        ("domain/sizing.py", "import poolbudget.reconcile", "Layers"),
    ],
)
def test_a_planted_import_breaks_its_contract(
    tmp_path: Path, module: str, planted: str, contract: str
) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(PACKAGE, tmp_path / "operator" / "poolbudget",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    assert lint(tmp_path).returncode == 0, "the copy passes before anything is planted"
    target = tmp_path / "operator" / "poolbudget" / module
    target.write_text(f"{planted}  # planted\n" + target.read_text())
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken
    importer = "poolbudget." + module.removesuffix(".py").replace("/", ".")
    imported = planted.split()[-1]
    if not imported.startswith("poolbudget."):
        imported = imported.split(".")[0]  # an external package is one node in the graph
    assert f"{importer} -> {imported} (l.1)" in broken
