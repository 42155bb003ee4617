"""`poolbudget plan`: the sizing engine on the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from poolbudget.cli import EXIT_INFEASIBLE, EXIT_OK, EXIT_USAGE, build_parser, main

TESTDATA = Path(__file__).parent / "testdata"
SHOP = TESTDATA / "shop-budget.yaml"
CLASSIC = ["plan", "--max-connections", "200", "--reserved", "10", "--max-overflow", "5"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Exit status, stdout, stderr; argparse's own errors arrive as SystemExit."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("workers", "pool"), [("4", 42), ("8", 18)])
def test_classic_examples(capsys: pytest.CaptureFixture[str], workers: str, pool: int) -> None:
    code, out, _ = run(
        capsys, *CLASSIC, "--superuser-reserved", "0", "--workers", workers, "-o", "json"
    )
    assert code == EXIT_OK
    plan = json.loads(out)
    assert plan["allocations"][0]["poolSize"] == pool
    assert plan["usableConnections"] == 190
    assert plan["feasible"] is True


def test_superuser_reserve_defaults_to_postgres_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *CLASSIC, "--workers", "4", "-o", "json")
    assert code == EXIT_OK
    plan = json.loads(out)
    assert plan["withheldByServer"] == 3
    assert plan["allocations"][0]["poolSize"] == 187 // 4 - 5


def test_text_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *CLASSIC, "--superuser-reserved", "0", "--workers", "4")
    assert code == EXIT_OK
    header = next(line for line in out.splitlines() if line.startswith("TARGET"))
    row = next(line for line in out.splitlines() if line.startswith("app"))
    assert header.split() == [
        "TARGET",
        "REPLICAS",
        "PODS",
        "WORKERS",
        "WEIGHT",
        "POOL",
        "OVERFLOW",
        "PEAK",
    ]
    assert row.split() == ["app", "-", "1", "4", "1", "42", "5", "188"]
    assert "usable 190" in out
    assert "headroom 2: Feasible" in out


@pytest.mark.parametrize(
    ("share_by", "api_pool", "worker_pool"),
    [
        # Per worker: api's 32 workers at weight 2 get 3 + 5 = 8 connections each, and the
        # level (4 per unit) stays below what lifts worker's 4 above its minimum (1 + 5).
        ("Worker", 3, 1),
        # Per Deployment: worker's 4 workers are held at maxPoolSize 10.
        ("Target", 2, 10),
    ],
)
def test_budget_file_with_replicas(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    share_by: str,
    api_pool: int,
    worker_pool: int,
) -> None:
    budget = tmp_path / "budget.yaml"
    budget.write_text(SHOP.read_text().replace("spec:\n", f"spec:\n  shareBy: {share_by}\n"))
    code, out, _ = run(
        capsys, "plan", "-f", str(budget), "--max-connections", "300",
        "--replicas", "api=3", "--hpa-max", "api=6", "--replicas", "worker=2",
        "--max-surge", "worker=0", "-o", "json",
    )  # fmt: skip
    assert code == EXIT_OK
    plan = json.loads(out)
    assert plan["shareBy"] == share_by
    api, worker = plan["allocations"]
    assert api["name"] == "api"
    assert api["pods"] == 6 + 2  # max(3, HPA 6) + ceil(25% of 6)
    assert api["workers"] == 32
    assert worker["pods"] == 2
    assert (api["poolSize"], worker["poolSize"]) == (api_pool, worker_pool)
    assert worker["atMaxPoolSize"] == (share_by == "Target")
    assert plan["peakConnections"] <= plan["usableConnections"] == 300 - 3 - 10


def test_infeasible_exits_1_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "plan", "-f", str(SHOP), "--max-connections", "40", "--replicas", "api=10"
    )
    assert code == EXIT_INFEASIBLE
    assert "Infeasible" in out
    assert "short by" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "--max-connections", "-5", "--workers", "4"], "argument --max-connections: must be >= 1, got -5"),
        (["plan", "--max-connections", "200", "--workers", "0"], "argument --workers: must be >= 1, got 0"),
        (["plan", "--max-connections", "200", "--workers", "4", "--reserved", "-1"], "argument --reserved: must be >= 0, got -1"),
        (["plan", "--max-connections", "ten", "--workers", "4"], "expected a whole number, got 'ten'"),
        (["plan", "--workers", "4"], "needs --max-connections and --workers"),
        (["plan", "-f", str(SHOP)], "--max-connections is required"),
        (["plan", "-f", str(SHOP), "--max-connections", "100", "--replicas", "nope=2"], "--replicas nope: not a target"),
        (["plan", "-f", str(SHOP), "--max-connections", "100", "--replicas", "api=-2"], "--replicas api: must be >= 0, got -2"),
        (["plan", "-f", str(SHOP), "--max-connections", "100", "--max-surge", "api=lots"], "--max-surge api: maxSurge must be"),
        (["plan", "-f", str(SHOP), "--max-connections", "100", "--workers", "3"], "are for the simple case"),
        (["plan", "-f", "/nonexistent/budget.yaml", "--max-connections", "100"], "No such file or directory"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == EXIT_USAGE
    assert out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("kind: ConfigMap\napiVersion: v1\n", "not a PoolBudget"),
        ("- just\n- a list\n", "not a PoolBudget"),
        ("{unclosed", "not valid YAML"),
        (SHOP.read_text().replace("weight: 2", "wieght: 2"), "spec.targets[0].wieght: unknown field"),
        (SHOP.read_text().replace("processesPerPod: 4", "processesPerPod: -4"), "spec.targets[0].processesPerPod: Input should be greater than or equal to 1"),
        (SHOP.read_text().replace("maxPoolSize: 10", "maxPoolSize: 10\n      minPoolSize: 20"), "maxPoolSize (10) must be >= minPoolSize (20)"),
        (SHOP.read_text().replace("deploymentName: worker", "deploymentName: api"), "deploymentName 'api' appears more than once"),
        (SHOP.read_text().replace("v1alpha1", "v1"), "apiVersion: String should match pattern"),
        (SHOP.read_text().replace("maxOverflow: 5", "maxOverflow: 5\n    poolRecycleSeconds: 0"), "spec.defaults.poolRecycleSeconds: poolRecycleSeconds must be -1 (never) or at least 1"),
        (SHOP.read_text().replace("deploymentName: worker", "deploymentName: " + "w" * 246), "spec.targets[1]: deploymentName longer than 245 characters makes the default ConfigMap name"),
    ],
)  # fmt: skip
def test_bad_files_name_the_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, document: str, message: str
) -> None:
    path = tmp_path / "budget.yaml"
    path.write_text(document)
    code, _, err = run(capsys, "plan", "-f", str(path), "--max-connections", "100")
    assert code == EXIT_USAGE
    assert message in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_bad_target_is_one_error_not_two(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Pydantic also reports the target list as too short once the bad item is left out;
    that echo is not a second mistake and must not be counted as one."""
    path = tmp_path / "budget.yaml"
    path.write_text(SHOP.read_text().replace("processesPerPod: 4", "processesPerPod: -4"))
    _, _, err = run(capsys, "plan", "-f", str(path), "--max-connections", "100")
    assert "more)" not in err, err
    path.write_text(
        SHOP.read_text().replace("processesPerPod: 4", "processesPerPod: -4\n      wieght: 1")
    )
    _, _, err = run(capsys, "plan", "-f", str(path), "--max-connections", "100")
    assert "(and 1 more)" in err, err  # two real mistakes are still counted


def test_console_script_is_installed() -> None:
    """The `poolbudget` entry point works as a real process, as users run it."""
    script = Path(sys.executable).parent / "poolbudget"
    result = subprocess.run(
        [str(script), *CLASSIC, "--superuser-reserved", "0", "--workers", "8", "-o", "json"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    assert json.loads(result.stdout)["allocations"][0]["poolSize"] == 18


@pytest.mark.parametrize("namespace", ["team-*", "Shop", "-shop", "a" * 64, ""])
def test_run_refuses_what_is_not_a_namespace_name(
    capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    status, _, err = run(capsys, "run", f"--namespace={namespace}")
    assert status == 2
    assert "is not a namespace name" in err
    assert "Traceback" not in err


def test_admission_params_is_on_off_or_left_to_the_environment() -> None:
    parser = build_parser()
    assert parser.parse_args(["run"]).admission_params is None  # POOLBUDGET_ADMISSION_PARAMS
    assert parser.parse_args(["run", "--admission-params"]).admission_params is True
    assert parser.parse_args(["run", "--no-admission-params"]).admission_params is False
