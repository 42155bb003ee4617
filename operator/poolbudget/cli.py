"""Command line: `poolbudget plan` (offline sizing) and `poolbudget run` (the operator)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from poolbudget import __version__
from poolbudget.domain.facts import DatabaseFacts, SurgeError, resolve_max_surge
from poolbudget.domain.leadership import LeaderTimings
from poolbudget.domain.manifests import (
    DEFAULT_NAMESPACE,
    ManifestError,
    Manifests,
    parse_manifests,
)
from poolbudget.domain.planning import POSTGRES_DEFAULT_SUPERUSER_RESERVED
from poolbudget.domain.preflight import (
    BudgetOutcome,
    Change,
    Overrides,
    TargetChange,
    diff_budget,
    plan_manifests,
    previous_configmaps,
    target_keys,
)
from poolbudget.domain.report import plan_table, preflight_json, preflight_text
from poolbudget.domain.sizing import BudgetLimits, BudgetPlan, TargetDemand, plan_budget

EXIT_OK = 0
EXIT_INFEASIBLE = 1
EXIT_USAGE = 2  # bad input, or the database / cluster to compare with could not be read
EXIT_RESTART = 3  # only with --fail-on-restart: feasible, but a Deployment would restart


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


# user:password@ in a postgresql:// URI: the password part.
_DSN_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*):[^@\s]*@")


def _without_passwords(text: str) -> str:
    return _DSN_PASSWORD.sub(r"\1:***@", text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: scripts and humans both read the first line. argparse
        # echoes arguments it cannot place (a mistyped --dsn and its URI): no password.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_without_passwords(message)}\n")


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
        help="compute pool sizes offline, from flags or manifests (no cluster needed)",
        description=(
            "Simple case: --max-connections, --reserved, --workers, --max-overflow. "
            "Full case: -f with Kubernetes manifests (a file, a directory, or - for stdin, "
            "e.g. `helm template ... | poolbudget plan -f -`): every PoolBudget in them is "
            "planned against the Deployments and HPAs in them; --replicas/--hpa-max/"
            "--max-surge override them per Deployment. Exit status: 0 feasible, "
            "1 infeasible, 2 bad input, 3 (with --fail-on-restart) a Deployment would "
            "restart."
        ),
    )
    limits = plan.add_argument_group(
        "database limits", "from flags, or read live (read-only) with --dsn / --dsn-env"
    )
    limits.add_argument(
        "--max-connections", type=_positive, metavar="N", help="PostgreSQL max_connections"
    )
    limits.add_argument(
        "--superuser-reserved",
        type=_non_negative,
        default=None,
        metavar="N",
        help="superuser_reserved_connections (default: PostgreSQL's default, 3)",
    )
    limits.add_argument(
        "--reserved-connections",
        "--pg-reserved",
        dest="pg_reserved",
        type=_non_negative,
        default=None,
        metavar="N",
        help="PostgreSQL's reserved_connections, 16+ (default 0); not the budget's "
        "spec.reservedConnections",
    )
    limits.add_argument(
        "--dsn",
        metavar="URI",
        help="read the limits from this postgresql:// server (one read-only query); "
        "prefer --dsn-env, which keeps the password off the command line",
    )
    limits.add_argument(
        "--dsn-env",
        metavar="VARIABLE",
        help="read the limits from the server whose postgresql:// DSN is in this "
        "environment variable",
    )
    simple = plan.add_argument_group("simple case: one fleet of workers")
    simple.add_argument("--reserved", type=_non_negative, help="connections held back (default 10)")
    simple.add_argument("--workers", type=_positive, help="processes with a pool, in total")
    simple.add_argument("--max-overflow", type=_non_negative, help="max_overflow (default 5)")
    simple.add_argument("--min-pool-size", type=_positive, default=1, help="minimum pool size")
    full = plan.add_argument_group("full case: manifests")
    full.add_argument(
        "-f",
        "--file",
        metavar="FILE|DIR|-",
        help="Kubernetes manifests: multi-document YAML or JSON, List kinds, a directory "
        "(*.yaml, *.yml, *.json, recursively), or - for stdin",
    )
    full.add_argument(
        "-n",
        "--namespace",
        type=_namespace,
        default=DEFAULT_NAMESPACE,
        help="namespace of the objects that name none (default: %(default)s)",
    )
    full.add_argument(
        "--replicas",
        type=_assignment,
        action="append",
        default=[],
        metavar="DEPLOYMENT=N",
        help="replicas of a target's Deployment (NAME or NAMESPACE/NAME), over the "
        "manifest's; repeat per Deployment. Default: the manifest's; 1 for a bare budget file",
    )
    full.add_argument(
        "--hpa-max",
        type=_assignment,
        action="append",
        default=[],
        metavar="DEPLOYMENT=N",
        help="maxReplicas of the HPA scaling a target, over the manifests'",
    )
    full.add_argument(
        "--max-surge",
        type=_assignment,
        action="append",
        default=[],
        metavar="DEPLOYMENT=N|P%",
        help="rollingUpdate.maxSurge of a target, over the manifest's "
        "(default 25%%, as Kubernetes)",
    )
    diff = plan.add_argument_group(
        "diff: which Deployments the plan would restart, and with which numbers"
    )
    against = diff.add_mutually_exclusive_group()
    against.add_argument(
        "--diff-against",
        metavar="FILE|DIR",
        help="compare with a previous render (same format as -f; ConfigMaps in it, e.g. "
        "from `kubectl get configmap -o yaml`, count as they are)",
    )
    against.add_argument(
        "--diff-cluster",
        action="store_true",
        help="compare with the ConfigMaps in the cluster (kubeconfig; read-only GETs)",
    )
    diff.add_argument(
        "--kubeconfig", metavar="PATH", help="for --diff-cluster (default: $KUBECONFIG)"
    )
    diff.add_argument(
        "--fail-on-restart",
        action="store_true",
        help="exit 3 when a Deployment would restart (default: exit 0, the diff is a report)",
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
    run.add_argument(
        "--metrics-port",
        type=_non_negative,
        default=8080,
        metavar="PORT",
        help="Prometheus metrics; 0 disables; default: %(default)s",
    )
    run.add_argument(
        "--health-port",
        type=_non_negative,
        default=8081,
        metavar="PORT",
        help="liveness and readiness probes; 0 disables; default: %(default)s",
    )
    run.add_argument(
        "--bind-address",
        default="0.0.0.0",  # noqa: S104 - in a pod
        metavar="ADDRESS",
        help="address for metrics and health; default: %(default)s",
    )
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
    run.add_argument(
        "--priority",
        type=_non_negative,
        default=0,
        help="Kopf peering priority; default: %(default)s",
    )
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
    run.add_argument(
        "--admission-params",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the admission guard's parameters (ConfigMap poolbudget-admission per "
        "namespace; the chart's admissionGuard.enabled); default: the "
        "POOLBUDGET_ADMISSION_PARAMS environment variable, else off",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _superuser_reserved(args: argparse.Namespace) -> int:
    if args.superuser_reserved is None:
        return POSTGRES_DEFAULT_SUPERUSER_RESERVED
    return int(args.superuser_reserved)


def _plan_simple(args: argparse.Namespace) -> BudgetPlan:
    if args.max_connections is None or args.workers is None:
        raise UsageError("the simple case needs --max-connections and --workers (or use -f FILE)")
    limits = BudgetLimits(
        max_connections=args.max_connections,
        withheld_by_server=_superuser_reserved(args) + (args.pg_reserved or 0),
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


def _int_value(flag: str, name: str, text: str) -> int:
    try:
        return _non_negative(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{flag} {name}: {exc}") from None


MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def read_sources(where: str) -> list[tuple[str, str]]:
    """(name, text) of every manifest file `where` names: a file, a directory (searched
    recursively, in name order), or `-` for stdin."""
    if where == "-":
        return [("<stdin>", sys.stdin.read())]
    path = Path(where)
    try:
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.suffix in MANIFEST_SUFFIXES and p.is_file()
            )
            if not files:
                raise UsageError(f"{where}: no *.yaml, *.yml or *.json files in this directory")
            return [(str(p), p.read_text()) for p in files]
        return [(where, path.read_text())]
    except OSError as exc:
        raise UsageError(f"{exc.filename or where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not a text file (not UTF-8)") from None


def _load(where: str, namespace: str) -> Manifests:
    try:
        manifests = parse_manifests(read_sources(where), namespace)
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    if not manifests.budgets:
        raise UsageError(f"{where}: not a PoolBudget, nor has it one (expected kind: PoolBudget)")
    return manifests


def _overrides(args: argparse.Namespace, targets: set[tuple[str, str]]) -> Overrides:
    replicas = {name: _int_value("--replicas", name, text) for name, text in args.replicas}
    hpa = {name: _int_value("--hpa-max", name, text) for name, text in args.hpa_max}
    surge = dict(args.max_surge)
    for name, text in surge.items():
        try:
            resolve_max_surge(text, 1)
        except SurgeError as exc:
            raise UsageError(f"--max-surge {name}: {exc}") from None
    overrides = Overrides(replicas=replicas, hpa_max_replicas=hpa, max_surge=surge)
    for flag, name in overrides.unknown(targets):
        raise UsageError(f"{flag} {name}: not a target of any PoolBudget in the input")
    return overrides


def _database(args: argparse.Namespace) -> DatabaseFacts | None:
    """The server's limits from --dsn/--dsn-env (read live) or the flags; None when
    neither names max_connections."""
    dsn = args.dsn
    if args.dsn_env is not None:
        if dsn is not None:
            raise UsageError("--dsn and --dsn-env: give one")
        dsn = os.environ.get(args.dsn_env)
        if not dsn:
            raise UsageError(f"--dsn-env {args.dsn_env}: the variable is not set or empty")
    if dsn is None:
        if args.max_connections is None:
            return None
        return DatabaseFacts(
            max_connections=args.max_connections,
            superuser_reserved_connections=_superuser_reserved(args),
            reserved_connections=args.pg_reserved or 0,
        )
    given = [args.max_connections, args.superuser_reserved, args.pg_reserved]
    if any(value is not None for value in given):
        raise UsageError(
            "--dsn reads max_connections and the reserves from the server: drop "
            "--max-connections/--superuser-reserved/--reserved-connections"
        )
    # Imported here: asyncpg is the operator extra's; plan without --dsn must not need it.
    from poolbudget.adapters.postgres import DatabaseProbeError, probe_once

    try:
        return asyncio.run(probe_once(dsn))
    except DatabaseProbeError as exc:  # its messages never hold the password
        raise UsageError(f"--dsn: {exc}") from None


def _cluster_configmaps(
    args: argparse.Namespace, manifests: Manifests
) -> dict[tuple[str, str], dict[str, str] | None]:
    from poolbudget.adapters.configmaps import ClusterReadError, read_configmaps

    keys = sorted(
        {
            (budget.namespace, target.resolved_config_map_name)
            for budget in manifests.budgets
            for target in budget.budget.spec.targets
        }
    )
    try:
        return asyncio.run(read_configmaps(keys, kubeconfig=args.kubeconfig))
    except ClusterReadError as exc:
        raise UsageError(f"--diff-cluster: {exc}") from None


def _diffs(
    args: argparse.Namespace,
    manifests: Manifests,
    outcomes: list[BudgetOutcome],
    database: DatabaseFacts | None,
    overrides: Overrides,
) -> list[tuple[TargetChange, ...]] | None:
    """Per outcome, what applying it would change; None without --diff-*."""
    current: list[Mapping[str, Mapping[str, str] | None]]
    if args.diff_against is not None:
        previous = _load(args.diff_against, args.namespace)
        known = target_keys(previous)
        # The flags describe the change; they apply to the old render where they can.
        previous_overrides = Overrides(
            replicas={k: v for k, v in overrides.replicas.items() if _names(k, known)},
            hpa_max_replicas={
                k: v for k, v in overrides.hpa_max_replicas.items() if _names(k, known)
            },
            max_surge={k: v for k, v in overrides.max_surge.items() if _names(k, known)},
        )
        try:
            before = plan_manifests(previous, database, previous_overrides)
        except ManifestError as exc:
            raise UsageError(f"--diff-against: {exc}") from None
        current = [previous_configmaps(o.manifest, previous, before) for o in outcomes]
    elif args.diff_cluster:
        found = _cluster_configmaps(args, manifests)
        current = [
            {
                t.resolved_config_map_name: found.get(
                    (o.manifest.namespace, t.resolved_config_map_name)
                )
                for t in o.manifest.budget.spec.targets
            }
            for o in outcomes
        ]
    else:
        return None
    return [
        diff_budget(o.manifest.budget.spec, o.plan, now)
        for o, now in zip(outcomes, current, strict=True)
    ]


def _names(key: str, targets: set[tuple[str, str]]) -> bool:
    return any(key in (name, f"{ns}/{name}") for ns, name in targets)


def _exit_status(
    outcomes: list[BudgetOutcome], diffs: list[tuple[TargetChange, ...]] | None, strict: bool
) -> int:
    if not all(o.plan.feasible for o in outcomes):
        return EXIT_INFEASIBLE
    restarts = any(c.change is Change.RESTART for changes in diffs or [] for c in changes)
    return EXIT_RESTART if strict and restarts else EXIT_OK


def run_plan(args: argparse.Namespace) -> int:
    simple_flags = [args.workers, args.reserved, args.max_overflow]
    if args.file is None:
        if args.diff_against is not None or args.diff_cluster:
            raise UsageError("--diff-against/--diff-cluster need -f")
        if args.dsn is not None or args.dsn_env is not None:
            raise UsageError("--dsn/--dsn-env are for -f; the simple case takes --max-connections")
        plan = _plan_simple(args)
        print(
            json.dumps(plan.model_dump(mode="json", by_alias=True), indent=2)
            if args.output == "json"
            else plan_table(plan)
        )
        return EXIT_OK if plan.feasible else EXIT_INFEASIBLE
    if any(v is not None for v in simple_flags):
        raise UsageError("--workers/--reserved/--max-overflow are for the simple case; drop -f")

    manifests = _load(args.file, args.namespace)
    overrides = _overrides(args, target_keys(manifests))
    database = _database(args)
    withheld = DatabaseFacts(
        max_connections=1,
        superuser_reserved_connections=_superuser_reserved(args),
        reserved_connections=args.pg_reserved or 0,
    )
    try:
        outcomes = plan_manifests(
            manifests, database, overrides, withheld_without_database=withheld
        )
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    diffs = _diffs(args, manifests, outcomes, database, overrides)
    # A bare budget file (no workloads, one budget) prints as it always has: that one plan.
    bare = not manifests.has_workloads and len(outcomes) == 1
    if args.output == "json":
        print(json.dumps(preflight_json(outcomes, diffs, bare=bare), indent=2))
    else:
        print(preflight_text(outcomes, diffs, bare=bare))
    return _exit_status(outcomes, diffs, args.fail_on_restart)


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
            admission_params=args.admission_params,
            verbose=args.verbose,
            leader_timings=timings,
        )
    except UsageError as exc:
        print(f"poolbudget {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
