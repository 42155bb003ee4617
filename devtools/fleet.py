"""The fleet proof: the operator's pool settings hold under a real burst; naive ones do not.

Against a real PostgreSQL (max_connections 100 by default), a PoolBudget with three targets
is planned exactly as the operator's reconcile does it: the limits are read with
`probe_once`, the plan comes from `plan_for`, the ConfigMap data from
`render_configmap_data`. Then one OS process per worker of the worst case (pods x
processesPerPod) starts with its target's ConfigMap keys in its environment (as `envFrom`
puts them there) and builds its engine with `create_async_engine(url, **engine_kwargs())`,
as an application does. At one common start time every process bursts to
3 x (pool_size + max_overflow) concurrent `SELECT pg_sleep(0.3)`, while the parent samples
`pg_stat_activity` every 50 ms. The same burst is then run with the classic copy-paste
configuration (pool_size=50, max_overflow=20 per worker, other keys unchanged).

    python -m devtools.fleet [--scale small|full] [--json out.json]

Exit status 0 when the budgeted run had no 53300 error and stayed within the usable
connections while the naive run hit 53300; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from poolbudget.client import engine_kwargs

if TYPE_CHECKING:
    from devtools.apps import ConnectionTimeline
    from poolbudget.api.v1alpha1 import PoolBudgetSpec
    from poolbudget.domain.sizing import BudgetPlan

REPO_ROOT = Path(__file__).resolve().parent.parent
TOO_MANY_CONNECTIONS = "53300"
NAIVE_POOL_SIZE = 50
NAIVE_MAX_OVERFLOW = 20
BURST_FACTOR = 3
SAMPLE_INTERVAL = 0.05
ADMIN_CONNECTIONS = 1  # the sampler's own connection, as the superuser
APP_ROLE, APP_PASSWORD, APP_DATABASE = "app", "app-fleet-pw", "shop"
MONITOR_ROLE, MONITOR_PASSWORD = "monitor", "monitor-fleet-pw"
READY_TIMEOUT = 90.0  # every worker imported and ready; generous for 2 cores
START_DELAY = 0.5  # seconds from "all ready" to the common start time
MAX_SAMPLES = 4000  # 200 s at 50 ms: the sampler's hard bound


@dataclass(frozen=True)
class Scale:
    """A fleet: the database size, the PoolBudget and each Deployment's facts."""

    max_connections: int
    reserved_connections: int
    targets: tuple[dict[str, Any], ...]  # PoolBudget spec.targets entries (camelCase)
    deployments: dict[str, dict[str, Any]]  # DeploymentFacts fields per deployment
    hold_seconds: float = 0.3


SCALES: dict[str, Scale] = {
    # 15 + 6 + 2 = 23 worker processes.
    "full": Scale(
        max_connections=100,
        reserved_connections=5,
        targets=(
            {"deploymentName": "api", "processesPerPod": 3, "weight": 2},
            {"deploymentName": "worker", "processesPerPod": 2},
            {"deploymentName": "cron", "processesPerPod": 2, "maxPoolSize": 2},
        ),
        deployments={
            "api": {"replicas": 3, "hpa_max_replicas": 4},  # 4 + 25% surge = 5 pods
            "worker": {"replicas": 2},  # 2 + 1 surge = 3 pods
            "cron": {"replicas": 1, "recreate": True},  # 1 pod
        },
    ),
    # 4 + 1 = 5 worker processes: the size `make test` runs.
    "small": Scale(
        max_connections=40,
        reserved_connections=5,
        targets=(
            {"deploymentName": "api", "processesPerPod": 2, "weight": 2},
            {"deploymentName": "worker", "processesPerPod": 1},
        ),
        deployments={
            "api": {"replicas": 1},  # 1 + 1 surge = 2 pods
            "worker": {"replicas": 1, "max_surge": 0},  # 1 pod
        },
        hold_seconds=0.3,
    ),
}


# --------------------------------------------------------------------------------------
# The worker: one OS process, configured like an application through its environment.
# --------------------------------------------------------------------------------------


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE anywhere in the chain (SQLAlchemy wraps the asyncpg error)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return None


async def _burst(url: str, concurrency: int, hold: float, start_at: float) -> dict[str, Any]:
    kwargs = engine_kwargs()  # the DB_* keys from this process's environment
    engine = create_async_engine(url, **kwargs)
    errors: Counter[str] = Counter()
    ok = 0
    pool_timeouts = 0
    # Bounded: waiting for the pool is bounded by pool_timeout, each query by command_timeout.
    deadline = float(kwargs["pool_timeout"]) + hold * concurrency + 30.0

    async def one() -> None:
        nonlocal ok, pool_timeouts
        try:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT pg_sleep(:s)"), {"s": hold})
            ok += 1
        except sa_exc.TimeoutError:  # QueuePool limit reached, pool_timeout elapsed
            pool_timeouts += 1
        except Exception as error:
            errors[_sqlstate(error) or type(error).__name__] += 1

    await asyncio.sleep(max(0.0, start_at - time.time()))
    started = time.time()
    try:
        async with asyncio.timeout(deadline):
            await asyncio.gather(*(one() for _ in range(concurrency)))
    except TimeoutError:
        errors["burst-deadline"] += 1
    finished = time.time()
    await engine.dispose()
    return {
        "pool_size": kwargs["pool_size"],
        "max_overflow": kwargs["max_overflow"],
        "queries": concurrency,
        "ok": ok,
        "pool_timeouts": pool_timeouts,
        "errors": dict(errors),
        "start_skew": started - start_at,
        "seconds": finished - started,
    }


def worker_main() -> int:
    """Runs in the child: say ready, wait for the start time on stdin, burst, print JSON."""
    url = os.environ["DATABASE_URL"]
    hold = float(os.environ["FLEET_HOLD_SECONDS"])
    per_worker = int(os.environ["DB_POOL_SIZE"]) + int(os.environ["DB_MAX_OVERFLOW"])
    import asyncpg  # noqa: F401  # imported before "ready": the start is not import-bound

    print("ready", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        return 2
    result = asyncio.run(_burst(url, BURST_FACTOR * per_worker, hold, float(line)))
    print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------
# The parent: plan as the operator does, start the fleet, sample the server.
# --------------------------------------------------------------------------------------


def build_spec(scale: Scale) -> PoolBudgetSpec:
    from poolbudget.api.v1alpha1 import PoolBudgetSpec

    return PoolBudgetSpec.model_validate(
        {
            "database": {"connectionSecretRef": {"name": "shop-db-monitor", "key": "dsn"}},
            "reservedConnections": scale.reserved_connections,
            "targets": list(scale.targets),
        }
    )


async def plan_configmaps(
    scale: Scale, monitor_dsn: str
) -> tuple[BudgetPlan, dict[str, dict[str, str]]]:
    """The operator's path: probe the real limits, plan, render each target's ConfigMap."""
    from poolbudget.adapters.postgres import probe_once
    from poolbudget.domain.facts import DeploymentFacts
    from poolbudget.domain.planning import plan_for
    from poolbudget.domain.rendering import render_configmap_data

    spec = build_spec(scale)
    database = await probe_once(monitor_dsn)
    deployments = {
        name: DeploymentFacts.model_validate({"name": name, **facts})
        for name, facts in scale.deployments.items()
    }
    plan = plan_for(spec, database, deployments)
    if not plan.feasible:
        raise RuntimeError(f"the fleet's budget is infeasible: {plan.reason}")
    data = {
        t.deployment_name: render_configmap_data(spec, t, plan.allocation(t.deployment_name))
        for t in spec.targets
    }
    return plan, data


@dataclass
class RunResult:
    label: str
    processes: int
    per_worker: dict[str, str]  # target -> "pool+overflow"
    queries: int = 0
    ok: int = 0
    pool_timeouts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    peak_server_connections: int = 0  # client backends, the sampler's own included
    peak_by_application: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    usable: int = 0
    max_start_skew: float = 0.0
    burst_seconds: float = 0.0
    worker_failures: list[str] = field(default_factory=list)

    def add_worker(self, output: dict[str, Any]) -> None:
        """One worker's burst report (the same shape from a process and from a pod of the
        sample app) into the totals."""
        self.queries += int(output["queries"])
        self.ok += int(output["ok"])
        self.pool_timeouts += int(output["pool_timeouts"])
        for key, count in output["errors"].items():
            self.errors[str(key)] = self.errors.get(str(key), 0) + int(count)
        self.max_start_skew = max(self.max_start_skew, float(output["start_skew"]))
        self.burst_seconds = max(self.burst_seconds, float(output["seconds"]))

    @property
    def too_many_clients(self) -> int:
        return self.errors.get(TOO_MANY_CONNECTIONS, 0)

    @property
    def peak_app_connections(self) -> int:
        return self.peak_server_connections - ADMIN_CONNECTIONS

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "too_many_clients_53300": self.too_many_clients,
            "peak_app_connections": self.peak_app_connections,
            "peak_over_usable": round(self.peak_app_connections / self.usable, 3),
        }


_SAMPLE_QUERY = """
SELECT coalesce(application_name, ''), count(*) FROM pg_catalog.pg_stat_activity
WHERE backend_type = 'client backend' GROUP BY 1
"""


async def sample_connections(
    admin_dsn: str,
    result: RunResult,
    stop: asyncio.Event,
    timeline: ConnectionTimeline | None = None,
) -> None:
    """Every SAMPLE_INTERVAL until `stop`: the peak of client connections, in all and per
    application (and each sample into `timeline`, for the picture)."""
    import asyncpg

    connection = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        for _ in range(MAX_SAMPLES):
            rows = await connection.fetch(_SAMPLE_QUERY, timeout=5)
            total = sum(int(r[1]) for r in rows)
            result.samples += 1
            result.peak_server_connections = max(result.peak_server_connections, total)
            if timeline is not None:
                timeline.record({str(name): int(count) for name, count in rows})
            for name, count in rows:
                peak = result.peak_by_application.get(name, 0)
                result.peak_by_application[name] = max(peak, int(count))
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL)
    finally:
        await connection.close(timeout=5)


def _child_env(app_dsn: str, data: dict[str, str], hold: float) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DB_", "FLEET_")) and k != "POOLBUDGET_CONFIG_FILE"
    }
    # envFrom: the ConfigMap's keys that are environment variable names (not sqlalchemy.json).
    env.update({k: v for k, v in data.items() if k.isidentifier()})
    env["DATABASE_URL"] = app_dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    env["FLEET_HOLD_SECONDS"] = str(hold)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), str(REPO_ROOT / "operator"), env.get("PYTHONPATH")) if p
    )
    return env


def _readline(process: subprocess.Popen[str], deadline: float) -> str:
    """One line of a child's stdout, bounded by a deadline (blocking read in a thread)."""
    assert process.stdout is not None
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(process.stdout.readline)
        try:
            return future.result(timeout=max(0.1, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            process.kill()
            raise


def run_fleet(
    label: str,
    configmaps: dict[str, dict[str, str]],
    workers: dict[str, int],
    app_dsn: str,
    admin_dsn: str,
    usable: int,
    hold: float,
) -> RunResult:
    """Start one process per worker, burst at one start time, sample; bounded throughout."""
    result = RunResult(
        label=label,
        processes=sum(workers.values()),
        per_worker={
            name: f"{data['DB_POOL_SIZE']}+{data['DB_MAX_OVERFLOW']}"
            for name, data in configmaps.items()
        },
        usable=usable,
    )
    processes: list[subprocess.Popen[str]] = []
    try:
        for name, count in workers.items():
            env = _child_env(app_dsn, configmaps[name], hold)
            for _ in range(count):
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "devtools.fleet", "--worker"],
                        cwd=REPO_ROOT,
                        env=env,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
        ready_deadline = time.monotonic() + READY_TIMEOUT
        for process in processes:
            line = _readline(process, ready_deadline)
            if line.strip() != "ready":
                _, err = process.communicate(timeout=10)
                raise RuntimeError(f"a worker failed to start: {line!r} {err[-2000:]}")
        start_at = time.time() + START_DELAY
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(f"{start_at!r}\n")
            process.stdin.flush()  # communicate() closes it
        asyncio.run(_sample_while(admin_dsn, result, processes))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
    return result


async def _sample_while(
    admin_dsn: str, result: RunResult, processes: list[subprocess.Popen[str]]
) -> None:
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_connections(admin_dsn, result, stop))
    loop = asyncio.get_running_loop()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(processes)) as pool:
            outputs = await asyncio.gather(
                *(loop.run_in_executor(pool, _collect, p) for p in processes),
                return_exceptions=True,
            )
    finally:
        stop.set()
        await sampler
    for output in outputs:
        if isinstance(output, BaseException):
            failed = f"worker-failed:{type(output).__name__}"
            result.errors[failed] = result.errors.get(failed, 0) + 1
            result.worker_failures.append(str(output)[-500:])
            continue
        result.add_worker(output)
    result.errors = dict(sorted(result.errors.items()))


def _collect(process: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"worker exited {process.returncode}: {err[-2000:]}")
    parsed: dict[str, Any] = json.loads(lines[-1])
    return parsed


def naive_configmaps(configmaps: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The classic copy-paste settings; everything else as the operator wrote it."""
    return {
        name: {
            **{k: v for k, v in data.items() if k.isidentifier()},
            "DB_POOL_SIZE": str(NAIVE_POOL_SIZE),
            "DB_MAX_OVERFLOW": str(NAIVE_MAX_OVERFLOW),
        }
        for name, data in configmaps.items()
    }


@dataclass
class Proof:
    scale: str
    max_connections: int
    usable: int
    planned_peak: int
    workers: dict[str, int]
    budgeted: RunResult
    naive: RunResult

    @property
    def holds(self) -> bool:
        return (
            self.budgeted.too_many_clients == 0
            and self.budgeted.peak_server_connections <= self.usable + ADMIN_CONNECTIONS
            and self.naive.too_many_clients > 0
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "max_connections": self.max_connections,
            "usable": self.usable,
            "planned_peak": self.planned_peak,
            "admin_connections": ADMIN_CONNECTIONS,
            "workers": self.workers,
            "budgeted": self.budgeted.as_json(),
            "naive": self.naive.as_json(),
            "holds": self.holds,
        }


def run_proof(scale_name: str = "small", progress: bool = False, major: int = 16) -> Proof:
    from devtools.pgserver import PostgresServer

    scale = SCALES[scale_name]

    def say(message: str) -> None:
        if progress:
            print(message, flush=True)

    settings = {"max_connections": str(scale.max_connections)}
    with PostgresServer(major=major, settings=settings) as server:
        monitor_dsn = server.create_role(MONITOR_ROLE, MONITOR_PASSWORD)
        app_dsn = server.create_role(APP_ROLE, APP_PASSWORD, database=APP_DATABASE)
        plan, configmaps = asyncio.run(plan_configmaps(scale, monitor_dsn))
        workers = {a.name: a.workers for a in plan.allocations}
        say(
            f"PostgreSQL {major} on 127.0.0.1:{server.port}: "
            f"max_connections {plan.max_connections}, "
            f"withheld by server {plan.withheld_by_server}, reserved {plan.reserved_connections}"
            f" -> usable {plan.usable_connections}; plan {plan.verdict.value}, "
            f"peak {plan.peak_connections}"
        )
        for a in plan.allocations:
            say(
                f"  {a.name}: {a.pods} pods, {a.workers} workers, pool {a.pool_size} "
                f"+ overflow {a.max_overflow}"
            )
        admin_dsn, usable, hold = server.admin_dsn(), plan.usable_connections, scale.hold_seconds
        say(f"budgeted burst: {sum(workers.values())} processes ...")
        budgeted = run_fleet("budgeted", configmaps, workers, app_dsn, admin_dsn, usable, hold)
        say(f"naive burst ({NAIVE_POOL_SIZE}+{NAIVE_MAX_OVERFLOW} per worker) ...")
        naive = run_fleet(
            "naive", naive_configmaps(configmaps), workers, app_dsn, admin_dsn, usable, hold
        )
    return Proof(
        scale=scale_name,
        max_connections=plan.max_connections,
        usable=plan.usable_connections,
        planned_peak=plan.peak_connections,
        workers=workers,
        budgeted=budgeted,
        naive=naive,
    )


def render_table(proof: Proof) -> str:
    b, n = proof.budgeted, proof.naive

    def errors(run: RunResult) -> str:
        others = {k: v for k, v in run.errors.items() if k != TOO_MANY_CONNECTIONS}
        return ", ".join(f"{k}: {v}" for k, v in others.items()) or "0"

    def per_worker(run: RunResult) -> str:
        return " ".join(f"{k} {v}" for k, v in run.per_worker.items())

    rows = [
        ("worker processes", str(b.processes), str(n.processes)),
        ("pool+overflow per worker", per_worker(b), per_worker(n)),
        ("concurrent queries (3x per worker)", str(b.queries), str(n.queries)),
        ("successful queries", str(b.ok), str(n.ok)),
        ("53300 too many clients", str(b.too_many_clients), str(n.too_many_clients)),
        ("other errors by SQLSTATE/type", errors(b), errors(n)),
        ("pool timeouts", str(b.pool_timeouts), str(n.pool_timeouts)),
        (
            "peak server connections (+1 sampler)",
            str(b.peak_server_connections),
            str(n.peak_server_connections),
        ),
        (
            "peak app connections / usable",
            f"{b.peak_app_connections} / {b.usable}",
            f"{n.peak_app_connections} / {n.usable}",
        ),
        (
            "peak / usable",
            f"{b.peak_app_connections / b.usable:.0%}",
            f"{n.peak_app_connections / n.usable:.0%}",
        ),
        (
            "burst duration, start skew",
            f"{b.burst_seconds:.1f}s, {b.max_start_skew * 1000:.0f}ms",
            f"{n.burst_seconds:.1f}s, {n.max_start_skew * 1000:.0f}ms",
        ),
        ("pg_stat_activity samples", str(b.samples), str(n.samples)),
    ]
    header = ("", "budgeted (operator)", f"naive ({NAIVE_POOL_SIZE}+{NAIVE_MAX_OVERFLOW})")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    head = "  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True))
    verdict = (
        "HOLDS: the budget fits under the burst, the naive fleet gets 53300"
        if proof.holds
        else "DOES NOT HOLD"
    )
    return "\n".join([head.rstrip(), *(line.rstrip() for line in lines), "", verdict])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.fleet", description=__doc__)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures as JSON")
    parser.add_argument(
        "--major", type=int, choices=[15, 16], default=16, help="PostgreSQL major version"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main()
    return report(run_proof(args.scale, progress=True, major=args.major), args.json)


def report(proof: Proof, json_path: Path | None) -> int:
    """Print the table (and write the JSON); the exit status says whether the proof holds."""
    print()
    print(render_table(proof))
    if json_path:
        json_path.write_text(json.dumps(proof.as_json(), indent=2) + "\n")
        print(f"wrote {json_path}")
    return 0 if proof.holds else 1


if __name__ == "__main__":
    sys.exit(main())
