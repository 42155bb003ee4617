"""The CI recipe (hack/preflight.sh) and the pre-commit hook on the sample chart
examples/shop, with the real helm binary: a values file that fits, one that overcommits,
and one that is malformed. Needs only helm (`make binaries`), no cluster."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hack" / "preflight.sh"
CHART = REPO / "examples" / "shop"
POOLBUDGET = Path(sys.executable).parent / "poolbudget"


@pytest.fixture(scope="module")
def preflight(
    built_helm: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., subprocess.CompletedProcess[str]]:
    home = tmp_path_factory.mktemp("helm")
    env = {
        **os.environ,
        "HELM": str(built_helm),
        "POOLBUDGET": str(POOLBUDGET),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        # `sh`, not bash: the recipe promises POSIX sh (dash on Debian).
        return subprocess.run(
            ["sh", str(SCRIPT), *args], env=env, text=True, capture_output=True, timeout=120
        )

    return run


def test_a_chart_that_fits_passes(
    preflight: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    result = preflight(
        "shop", str(CHART), "--namespace", "shop", "--", "--max-connections", "200", "-o", "json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (budget,) = report["budgets"]
    assert (budget["namespace"], budget["name"], budget["feasible"]) == ("shop", "shop-db", True)
    api, worker = budget["plan"]["allocations"]
    # api: max(3 replicas, HPA max 6) + maxSurge 1 = 7 pods x 2 processes; worker: 2 x 1.
    assert (api["name"], api["pods"], api["workers"]) == ("shop-api", 7, 14)
    assert (worker["name"], worker["pods"], worker["workers"]) == ("shop-worker", 2, 2)
    # usable 200 - 3 - 10 = 187 over 16 workers: floor(187 / 16) - 5 = 6.
    assert (api["poolSize"], api["maxOverflow"]) == (6, 5)
    assert budget["plan"]["peakConnections"] <= budget["plan"]["usableConnections"] == 187
    assert result.stderr == ""


def test_a_chart_that_overcommits_fails_the_build(
    preflight: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    overcommit = CHART / "values-overcommit.yaml"
    result = preflight(
        "shop",
        str(CHART),
        "--namespace",
        "shop",
        "-f",
        str(overcommit),
        "--",
        "--max-connections",
        "200",
    )
    assert result.returncode == 1
    # HPA max 100 + surge 1 = 101 pods x 2 = 202 workers, + 2: 204 at one connection each.
    assert result.stdout.strip().splitlines()[-1] == (
        "INFEASIBLE shop/shop-db: short by 17 connection(s): shop-api needs 202, "
        "shop-worker needs 2 (minimum pools, no overflow), 187 usable"
    )
    assert result.stderr == "preflight: poolbudget plan exited 1\n"


def test_bad_input_and_a_broken_chart_exit_2(
    preflight: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    result = preflight(
        "shop", str(CHART), "--set", "api.replicas=two", "--", "--max-connections", "200"
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        'poolbudget plan: error: <stdin>: document 1 (Deployment shop-api): spec.replicas: must be an integer >= 0, got "two"',
        "preflight: poolbudget plan exited 2",
    ]
    result = preflight("shop", str(CHART / "missing"), "--", "--max-connections", "200")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("preflight: helm template failed")


def test_the_pre_commit_hook_runs_plan_on_a_directory(built_helm: Path, tmp_path: Path) -> None:
    """The hook's entry and args, as pre-commit would run them (pass_filenames: false), on
    the chart rendered into a directory of files; the user's args replace the default."""
    (hook,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert (hook["id"], hook["language"], hook["pass_filenames"]) == (
        "poolbudget-plan",
        "python",
        False,
    )
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(tmp_path / "h"),
        "HELM_CONFIG_HOME": str(tmp_path / "h"),
        "HELM_DATA_HOME": str(tmp_path / "h"),
    }
    for values, expected in [([], 0), (["-f", str(CHART / "values-overcommit.yaml")], 1)]:
        out = tmp_path / f"deploy-{expected}"
        subprocess.run(
            [str(built_helm), "template", "shop", str(CHART), "--namespace", "shop", "--output-dir", str(out), *values],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        entry = shlex.split(hook["entry"])
        entry[0] = str(Path(sys.executable).parent / entry[0])
        args = ["-f", str(out), "--max-connections", "200"]
        result = subprocess.run([*entry, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == expected, result.stdout + result.stderr
        assert (
            f"PoolBudget shop/shop-db ({out}/shop/templates/poolbudget.yaml: document 1)"
            in result.stdout
        )
