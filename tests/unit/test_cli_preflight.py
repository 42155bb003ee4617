"""`poolbudget plan -f` on Kubernetes manifests: files, directories, stdin, exit statuses,
JSON, --diff-against, and the help texts."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from poolbudget.cli import EXIT_INFEASIBLE, EXIT_OK, EXIT_RESTART, EXIT_USAGE, build_parser
from tests.unit.test_cli import run

BUDGET = {
    "apiVersion": "poolbudget.dev/v1alpha1",
    "kind": "PoolBudget",
    "metadata": {"name": "shop-db"},
    "spec": {
        "database": {"connectionSecretRef": {"name": "shop-db-monitor"}},
        "reservedConnections": 10,
        "defaults": {"maxOverflow": 5},
        "targets": [
            {"deploymentName": "api", "processesPerPod": 2},
            {"deploymentName": "worker"},
        ],
    },
}


def deployment(name: str, replicas: Any, **strategy: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"replicas": replicas}
    if strategy:
        spec["strategy"] = strategy
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}, "spec": spec}


HPA = {
    "apiVersion": "autoscaling/v2",
    "kind": "HorizontalPodAutoscaler",
    "metadata": {"name": "api"},
    "spec": {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"},
        "minReplicas": 3,
        "maxReplicas": 6,
    },
}


def chart_dir(root: Path, api_replicas: Any = 3) -> Path:
    """The README's shop as a rendered chart would lay it out: several files, a List."""
    (root / "templates").mkdir(parents=True)
    (root / "values.yaml").write_text("replicas: 3\n")  # no kind: not an object, skipped
    (root / "templates" / "budget.yaml").write_text(yaml.safe_dump(BUDGET))
    (root / "templates" / "api.yml").write_text(
        yaml.safe_dump_all([deployment("api", api_replicas, rollingUpdate={"maxSurge": 1}), HPA])
    )
    (root / "templates" / "worker.json").write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [deployment("worker", 2, rollingUpdate={"maxSurge": 0})],
            }
        )
    )
    (root / "README.md").write_text("kind: Deployment\n")  # not a manifest suffix
    return root


def test_plan_help_shows_a_single_percent_sign(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "--help")
    assert code == EXIT_OK
    assert "%%" not in out
    assert "--max-surge DEPLOYMENT=N|P%" in out
    assert "(default 25%, as Kubernetes)" in " ".join(out.split())


def test_run_help_shows_the_defaults_of_ports_and_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "run", "--help")
    assert code == EXIT_OK
    text = " ".join(out.split())
    for flag, default in [
        ("--metrics-port PORT", "8080"),
        ("--health-port PORT", "8081"),
        ("--bind-address ADDRESS", "0.0.0.0"),  # noqa: S104 - the default shown
    ]:
        after = text.split(flag, 2)[-1]  # the option's help, past the usage line
        assert f"default: {default}" in after.split(" --", 1)[0], flag
    assert "%(" not in out
    assert "%%" not in out


def test_every_help_text_formats(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert "%%" not in parser.format_help()
    for command in ("plan", "run"):
        code, out, _ = run(capsys, command, "--help")
        assert code == EXIT_OK
        assert "%%" not in out


def test_a_directory_of_manifests(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = chart_dir(tmp_path / "chart")
    code, out, err = run(
        capsys, "plan", "-f", str(root), "--max-connections", "200", "--superuser-reserved", "0",
        "-n", "shop", "-o", "json",
    )  # fmt: skip
    assert code == EXIT_OK, err
    report = json.loads(out)
    assert report["feasible"] is True
    (entry,) = report["budgets"]
    assert (entry["namespace"], entry["name"]) == ("shop", "shop-db")
    assert entry["source"] == f"{root}/templates/budget.yaml: document 1"
    assert entry["replicas"] == {"api": 3, "worker": 2}
    api, worker = entry["plan"]["allocations"]
    assert (api["pods"], api["workers"], api["poolSize"]) == (7, 14, 6)  # max(3, 6) + 1
    assert (worker["pods"], worker["workers"], worker["poolSize"]) == (2, 2, 7)


def test_stdin_and_the_text_report(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    documents = [BUDGET, deployment("api", 3), HPA, deployment("worker", 2)]
    monkeypatch.setattr("sys.stdin", io.StringIO(yaml.safe_dump_all(documents)))
    code, out, _ = run(capsys, "plan", "-f", "-", "--max-connections", "200")
    assert code == EXIT_OK
    assert out.startswith("PoolBudget default/shop-db (<stdin>: document 1)\n")
    assert "1 PoolBudget(s) planned: all feasible" in out


def test_infeasible_names_the_budget_and_the_shortfall(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = chart_dir(tmp_path / "chart", api_replicas=40)
    code, out, _ = run(capsys, "plan", "-f", str(root), "--max-connections", "60")
    assert code == EXIT_INFEASIBLE
    verdict = out.strip().splitlines()[-1]
    # 41 api pods x 2 + 2 worker pods = 84 workers at minPoolSize 1; 60 - 3 - 10 = 47 usable.
    assert verdict == (
        "INFEASIBLE default/shop-db: short by 37 connection(s): api needs 82, worker needs 2 "
        "(minimum pools, no overflow), 47 usable"
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda root: (root / "templates" / "api.yml").write_text(yaml.safe_dump_all([HPA, deployment("api", "two")])),
         'templates/api.yml: document 2 (Deployment api): spec.replicas: must be an integer >= 0, got "two"'),
        (lambda root: (root / "templates" / "worker.json").unlink(),
         "templates/budget.yaml: document 1 (PoolBudget shop-db): spec.targets[1].deploymentName: Deployment default/worker is not in the input"),
        (lambda root: (root / "templates" / "budget.yaml").unlink(),
         "not a PoolBudget, nor has it one"),
    ],
)  # fmt: skip
def test_bad_manifests_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mutate: Any, message: str
) -> None:
    root = chart_dir(tmp_path / "chart")
    mutate(root)
    code, out, err = run(capsys, "plan", "-f", str(root), "--max-connections", "200")
    assert code == EXIT_USAGE
    assert out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_replicas_flag_stands_in_for_a_missing_deployment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = chart_dir(tmp_path / "chart")
    (root / "templates" / "worker.json").unlink()
    code, out, _ = run(
        capsys, "plan", "-f", str(root), "--max-connections", "200", "--replicas", "worker=5",
        "--replicas", "default/api=4", "-o", "json",
    )  # fmt: skip
    assert code == EXIT_OK
    assert json.loads(out)["budgets"][0]["replicas"] == {"api": 4, "worker": 5}
    code, _, err = run(
        capsys, "plan", "-f", str(root), "--max-connections", "200", "--replicas", "shop/worker=5"
    )
    assert code == EXIT_USAGE
    assert "--replicas shop/worker: not a target of any PoolBudget in the input" in err


def test_diff_against_a_previous_render(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    before = chart_dir(tmp_path / "before")
    after = chart_dir(tmp_path / "after", api_replicas=8)
    argv = ["plan", "-f", str(after), "--max-connections", "200", "--diff-against", str(before)]
    code, out, _ = run(capsys, *argv)
    assert code == EXIT_OK  # a diff is a report; --fail-on-restart makes it a gate
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "-db-pool" in line}
    # api 3 -> 8 replicas, above its HPA's 6: 9 pods, 18 + 2 workers share 187 usable,
    # floor(187 / 20) - 5 = 4 (was floor(187 / 16) - 5 = 6); worker gets the leftover step.
    assert rows["api"] == ["api", "api-db-pool", "6", "->", "4", "5", "Restart"]
    assert rows["worker"] == ["worker", "worker-db-pool", "7", "->", "5", "5", "Restart"]
    assert out.strip().endswith("would restart: default/api, default/worker")

    code, out, _ = run(capsys, *argv, "--fail-on-restart", "-o", "json")
    assert code == EXIT_RESTART
    report = json.loads(out)
    assert report["restarts"] == ["default/api", "default/worker"]
    api = report["budgets"][0]["changes"][0]
    assert (api["oldPoolSize"], api["poolSize"], api["change"]) == (6, 4, "Restart")
    assert api["oldHash"] != api["newHash"]

    code, out, _ = run(
        capsys, "plan", "-f", str(before), "--max-connections", "200",
        "--diff-against", str(before), "--fail-on-restart",
    )  # fmt: skip
    assert code == EXIT_OK
    assert "no Deployment would restart" in out


def test_diff_against_a_bare_budget_file_keeps_the_plan_shape(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump(BUDGET))
    code, out, _ = run(
        capsys, "plan", "-f", str(path), "--max-connections", "200", "--replicas", "api=9",
        "--diff-against", str(path), "-o", "json",
    )  # fmt: skip
    assert code == EXIT_OK
    plan = json.loads(out)
    assert plan["allocations"][0]["pods"] == 9 + 3
    assert [c["change"] for c in plan["changes"]] == ["Unchanged", "Unchanged"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dsn", "postgresql://monitor:hunter2@/shop", "--max-connections", "9"], "--dsn reads max_connections"),
        (["--dsn", "postgresql://monitor:hunter2@/shop"], "--dsn: the DSN names no host (monitor@?/shop)"),
        (["--dsn-env", "POOLBUDGET_TEST_UNSET"], "--dsn-env POOLBUDGET_TEST_UNSET: the variable is not set"),
        (["--dsn", "postgresql://a:b@h/d", "--dsn-env", "X"], "--dsn and --dsn-env: give one"),
    ],
)  # fmt: skip
def test_dsn_errors_never_show_the_password(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    root = chart_dir(tmp_path / "chart")
    code, out, err = run(capsys, "plan", "-f", str(root), *argv)
    assert code == EXIT_USAGE
    assert message in err
    assert "hunter2" not in out + err


def test_plan_on_manifests_needs_no_operator_extra(tmp_path: Path) -> None:
    """The base install (pydantic, pyyaml) is enough for CI: asyncpg and kubernetes are
    imported only for --dsn and --diff-cluster."""
    root = chart_dir(tmp_path / "chart")
    blocked = "; ".join(
        f"sys.modules[{m!r}] = None" for m in ("asyncpg", "kubernetes", "aiohttp", "kopf")
    )
    code = (
        f"import sys; {blocked}; from poolbudget.cli import main; "
        f"sys.exit(main(['plan', '-f', {str(root)!r}, '--max-connections', '200']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == EXIT_OK, result.stderr
    assert "all feasible" in result.stdout


def test_a_mistyped_dsn_flag_does_not_echo_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(capsys, "plan", "--dns", "postgresql://monitor:hunter2@db:5432/shop")
    assert code == EXIT_USAGE
    assert "unrecognized arguments: --dns postgresql://monitor:***@db:5432/shop" in err
    assert "hunter2" not in err
