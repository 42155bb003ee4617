"""Command line: `poolbudget plan` (offline sizing) and `poolbudget run` (the operator)."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import yaml
from pydantic import ValidationError

from poolbudget import __version__
from poolbudget.api.v1alpha1 import PoolBudget, ReplicaBasis, describe_validation_error
from poolbudget.domain.facts import DatabaseFacts, DeploymentFacts, SurgeError
from poolbudget.domain.leadership import LeaderTimings
from poolbudget.domain.planning import POSTGRES_DEFAULT_SUPERUSER_RESERVED, plan_for
from poolbudget.domain.report import plan_table
from poolbudget.domain.sizing import BudgetLimits, BudgetPlan, TargetDemand, plan_budget

EXIT_OK = 0
EXIT_INFEASIBLE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: scripts and humans both read the first line.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# A DNS label, as Kubernetes names namespaces. Kopf would also take glob patterns, but the
# operator's informers list and watch each namespace by name.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _namespace(text: str) -> str:
    if not _NAMESPACE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a namespace name (lowercase letters, digits and '-', at most "
            "63; patterns are not supported: repeat --namespace for each)"
        )
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="poolbudget",
        description="Keep PostgreSQL connection pools inside the database's connection limit.",
    )
    parser.add_argument("--version", action="version", version=f"poolbudget {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    plan = commands.add_parser(
        "plan",
        help="compute pool sizes offline (no cluster, no database)",
        description=(
            "Simple case: --max-connections, --reserved, --workers, --max-overflow. "
            "Full case: -f POOLBUDGET.yaml plus --replicas/--hpa-max/--max-surge per target."
        ),
    )
    limits = plan.add_argument_group("database limits")
    limits.add_argument("--max-connections", type=_positive, help="PostgreSQL max_connections")
    limits.add_argument(
        "--superuser-reserved",
        type=_non_negative,
        default=POSTGRES_DEFAULT_SUPERUSER_RESERVED,
        help="superuser_reserved_connections (default: PostgreSQL's default, 3)",
    )
    limits.add_argument(
        "--pg-reserved",
        type=_non_negative,
        default=0,
        help="reserved_connections, PostgreSQL 16+ (default 0)",
    )
    simple = plan.add_argument_group("simple case: one fleet of workers")
    simple.add_argument("--reserved", type=_non_negative, help="connections held back (default 10)")
    simple.add_argument("--workers", type=_positive, help="processes with a pool, in total")
    simple.add_argument("--max-overflow", type=_non_negative, help="max_overflow (default 5)")
    simple.add_argument("--min-pool-size", type=_positive, default=1, help="minimum pool size")
    full = plan.add_argument_group("full case: a PoolBudget file")
    full.add_argument("-f", "--file", type=Path, help="a PoolBudget YAML file")
    full.add_argument(
        "--replicas",
        type=_assignment,
        action="append",
        default=[],
        metavar="DEPLOYMENT=N",
        help="current replicas of a target (default 1); repeat per target",
    )
    full.add_argument(
        "--hpa-max",
        type=_assignment,
        action="append",
        default=[],
        metavar="DEPLOYMENT=N",
        help="maxReplicas of the HPA scaling a target",
    )
    full.add_argument(
        "--max-surge",
        type=_assignment,
        action="append",
        default=[],
        metavar="DEPLOYMENT=N|P%%",
        help="rollingUpdate.maxSurge of a target (default 25%%, as Kubernetes)",
    )
    plan.add_argument("-o", "--output", choices=["text", "json"], default="text")

    run = commands.add_parser(
        "run",
        help="run the operator (Kopf) against the current kubeconfig or in-cluster",
        description="Watches PoolBudgets, Deployments and HPAs; writes ConfigMaps; rolls pods.",
    )
    run.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        type=_namespace,
        help="watch only this namespace (repeat for more); default: all namespaces",
    )
    run.add_argument("--metrics-port", type=_non_negative, default=8080, help="0 disables")
    run.add_argument("--health-port", type=_non_negative, default=8081, help="0 disables")
    run.add_argument("--bind-address", default="0.0.0.0", help="address for metrics and health")  # noqa: S104 - in a pod
    run.add_argument(
        "--leader-election-namespace",
        default=None,
        metavar="NAMESPACE",
        help="run only while holding the Lease poolbudget-operator in this namespace "
        "(needed with more than one replica); default: no election",
    )
    run.add_argument(
        "--leader-lease-seconds",
        type=_positive,
        default=15,
        metavar="SECONDS",
        help="how long a Lease lasts without renewal: a standby takes over this long after "
        "it last saw the leader renew (a released Lease at once); default: %(default)s",
    )
    run.add_argument(
        "--leader-renew-deadline-seconds",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="the leader stops writing this long after sending its last successful renewal "
        "and exits (below the lease: the difference is the safety margin); "
        "default: %(default)s",
    )
    run.add_argument(
        "--leader-retry-seconds",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="how often the leader renews and a standby tries to take over (each Lease call "
        "times out after this long); default: %(default)s",
    )
    run.add_argument(
        "--peering",
        default=None,
        metavar="NAME",
        help="Kopf peering instead of a Lease (replicas need distinct --priority values)",
    )
    run.add_argument("--priority", type=_non_negative, default=0, help="Kopf peering priority")
    run.add_argument(
        "--database-connection-lifetime",
        type=_positive,
        default=300,
        metavar="SECONDS",
        help="log in to each database again after this long, so a password changed on the "
        "server is reported (an open connection stays authenticated); default: %(default)s",
    )
    run.add_argument(
        "--secret-check-seconds",
        type=_non_negative,
        default=10,
        metavar="SECONDS",
        help="look at each Secret a budget's DSN comes from this often and reconcile the "
        "budget when it changed (a GET per Secret: no list or watch on Secrets is needed); "
        "0: only at the budget's refreshSeconds; default: %(default)s",
    )
    run.add_argument(
        "--informer-stall-seconds",
        type=_positive,
        default=600,
        metavar="SECONDS",
        help="fail the liveness probe (/healthz) when an informer has completed no list and "
        "received no watch event, bookmark or stream end for this long; keep it above the "
        "300 s watch re-open period; default: %(default)s",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _plan_simple(args: argparse.Namespace) -> BudgetPlan:
    if args.max_connections is None or args.workers is None:
        raise UsageError("the simple case needs --max-connections and --workers (or use -f FILE)")
    limits = BudgetLimits(
        max_connections=args.max_connections,
        withheld_by_server=args.superuser_reserved + args.pg_reserved,
        reserved_connections=10 if args.reserved is None else args.reserved,
    )
    demand = TargetDemand(
        name="app",
        pods=1,
        processes_per_pod=args.workers,
        min_pool_size=args.min_pool_size,
        max_overflow=5 if args.max_overflow is None else args.max_overflow,
    )
    return plan_budget(limits, [demand])


def _per_target(pairs: list[tuple[str, str]], flag: str, known: set[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, value in pairs:
        if name not in known:
            raise UsageError(f"{flag} {name}: not a target of this PoolBudget")
        values[name] = value
    return values


def _int_value(flag: str, name: str, text: str) -> int:
    try:
        return _non_negative(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{flag} {name}: {exc}") from None


def _load_budget(path: Path) -> PoolBudget:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(document, dict) or document.get("kind") != "PoolBudget":
        raise UsageError(f"{path}: not a PoolBudget (expected kind: PoolBudget)")
    try:
        return PoolBudget.model_validate(document)
    except ValidationError as exc:
        raise UsageError(f"{path}: {describe_validation_error(exc)}") from None


def _plan_file(args: argparse.Namespace) -> tuple[BudgetPlan, dict[str, int]]:
    budget = _load_budget(args.file)
    spec = budget.spec
    known = {t.deployment_name for t in spec.targets}
    replicas_text = _per_target(args.replicas, "--replicas", known)
    hpa_text = _per_target(args.hpa_max, "--hpa-max", known)
    surge_text = _per_target(args.max_surge, "--max-surge", known)

    max_connections = args.max_connections or spec.database.max_connections_override
    if max_connections is None:
        raise UsageError(
            "--max-connections is required: the file sets no spec.database.maxConnectionsOverride"
        )
    database = DatabaseFacts(
        max_connections=max_connections,
        superuser_reserved_connections=args.superuser_reserved,
        reserved_connections=args.pg_reserved,
    )
    deployments: dict[str, DeploymentFacts] = {}
    replicas: dict[str, int] = {}
    for name in sorted(known):
        replicas[name] = _int_value("--replicas", name, replicas_text.get(name, "1"))
        hpa = hpa_text.get(name)
        deployment = DeploymentFacts(
            name=name,
            replicas=replicas[name],
            max_surge=surge_text.get(name),
            hpa_max_replicas=None if hpa is None else _int_value("--hpa-max", name, hpa),
        )
        try:
            deployment.pods_worst_case(ReplicaBasis.WORST_CASE)
        except SurgeError as exc:
            raise UsageError(f"--max-surge {name}: {exc}") from None
        deployments[name] = deployment
    return plan_for(spec, database, deployments), replicas


def run_plan(args: argparse.Namespace) -> int:
    simple_flags = [args.workers, args.reserved, args.max_overflow]
    if args.file is not None and any(v is not None for v in simple_flags):
        raise UsageError("--workers/--reserved/--max-overflow are for the simple case; drop -f")
    replicas: dict[str, int] | None = None
    if args.file is not None:
        plan, replicas = _plan_file(args)
    else:
        plan = _plan_simple(args)
    if args.output == "json":
        print(json.dumps(plan.model_dump(mode="json", by_alias=True), indent=2))
    else:
        print(plan_table(plan, replicas))
    return EXIT_OK if plan.feasible else EXIT_INFEASIBLE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            return run_plan(args)
        # Imported here: the operator's dependencies (kopf, kubernetes, asyncpg) are an
        # extra, and `poolbudget plan` must work without them.
        try:
            timings = LeaderTimings(
                args.leader_lease_seconds,
                args.leader_renew_deadline_seconds,
                args.leader_retry_seconds,
            )
        except ValueError as exc:
            raise UsageError(f"leader election: {exc}") from None
        from poolbudget.operator import run_operator

        return run_operator(
            namespaces=args.namespace,
            leader_election_namespace=args.leader_election_namespace,
            metrics_port=args.metrics_port,
            health_port=args.health_port,
            bind_address=args.bind_address,
            peering=args.peering,
            priority=args.priority,
            database_connection_lifetime=args.database_connection_lifetime,
            secret_check_seconds=args.secret_check_seconds,
            informer_stall_seconds=args.informer_stall_seconds,
            verbose=args.verbose,
            leader_timings=timings,
        )
    except UsageError as exc:
        print(f"poolbudget {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
