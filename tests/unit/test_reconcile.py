"""The reconcile flow against in-memory fakes of its adapters (Kube, DatabaseProber).

The real API server and PostgreSQL are exercised in tests/e2e; these pin down the safety
rules precisely and quickly: what is (not) written on each kind of failure, event
de-duplication, prober reuse, and that a DSN never leaks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY

from poolbudget.adapters.kube import NotFoundError
from poolbudget.adapters.postgres import DatabaseAuthError
from poolbudget.api.status import (
    ActivityStatus,
    Allocation,
    AllocationState,
    Condition,
    ConditionStatus,
    DatabaseStatus,
    PoolBudgetStatus,
    Visibility,
)
from poolbudget.domain.activity import ActivityRow, DatabaseActivity, SessionState
from poolbudget.domain.cluster_view import Observed
from poolbudget.domain.facts import DatabaseFacts
from poolbudget.domain.observe import DeploymentState
from poolbudget.handlers import kept_body, kept_status
from poolbudget.reconcile import (
    STATUS_HOLD_MAX_SECONDS,
    STATUS_SETTLE_SECONDS,
    BudgetMemory,
    BudgetObject,
    Reconciler,
    status_changes,
)

DSN = "postgresql://monitor:hunter2-secret@db:5432/shop"
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@dataclass
class FakeConfigMap:
    data: dict[str, str]
    labels: dict[str, str]


@dataclass
class FakeKube:
    secrets: dict[str, str] = field(default_factory=lambda: {"shop-db": DSN})
    configmaps: dict[str, FakeConfigMap] = field(default_factory=dict)
    writes: list[tuple[str, str]] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    budgets: set[str] = field(default_factory=lambda: {"shop"})

    async def read_secret_value(self, namespace: str, name: str, key: str) -> str:
        if name not in self.secrets:
            raise NotFoundError(f"Secret {namespace}/{name} not found")
        return self.secrets[name]

    async def read_configmap(self, namespace: str, name: str) -> FakeConfigMap | None:
        return self.configmaps.get(name)

    async def budget_exists(self, namespace: str, name: str) -> bool:
        return name in self.budgets

    async def apply_configmap(
        self, namespace: str, name: str, data: dict[str, str], labels: dict[str, str],
        annotations: dict[str, str],
    ) -> None:  # fmt: skip
        self.writes.append(("configmap", name))
        # Server-side apply: our keys are set, keys another manager owns stay.
        kept = self.configmaps[name].data if name in self.configmaps else {}
        self.configmaps[name] = FakeConfigMap({**kept, **data}, dict(labels))

    async def annotate_pod_template(
        self, namespace: str, deployment: str, annotations: dict[str, str]
    ) -> None:
        self.writes.append(("restart", deployment))

    async def patch_budget_status(
        self, namespace: str, name: str, status: PoolBudgetStatus
    ) -> None:
        self.writes.append(("status", name))
        self.statuses.append(status.to_body())

    async def post_event(self, budget: Any, type_: str, reason: str, message: str) -> None:
        self.writes.append(("event", reason))
        self.events.append((type_, reason, message))


def activity(*rows: tuple[str, SessionState, int], stale: int = 0) -> DatabaseActivity:
    """A pg_stat_activity reading: (application_name, state, connections) per row; `stale`
    of the first idle-in-transaction row's sessions are older than the threshold."""
    built = []
    for name, state, connections in rows:
        stale_here = stale if state is SessionState.IDLE_IN_TRANSACTION else 0
        stale = 0 if stale_here else stale
        built.append(
            ActivityRow(
                application_name=name,
                state=state,
                connections=connections,
                stale_in_transaction=stale_here,
            )
        )
    return DatabaseActivity(rows=tuple(built), stale_after_seconds=5)


@dataclass
class FakeProber:
    dsn: str
    result: DatabaseFacts | Exception = field(
        default_factory=lambda: DatabaseFacts(max_connections=200, server_version="16.2")
    )
    probes: int = 0
    closed: bool = False
    # What pg_stat_activity shows (the watch); nothing but the operator by default.
    activity_result: DatabaseActivity | Exception = field(
        default_factory=lambda: activity(("poolbudget-operator", SessionState.ACTIVE, 1))
    )
    activity_reads: list[float] = field(default_factory=list)  # stale_after_seconds of each

    async def probe(self) -> DatabaseFacts:
        self.probes += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    async def activity(self, stale_after_seconds: float) -> DatabaseActivity:
        self.activity_reads.append(stale_after_seconds)
        if isinstance(self.activity_result, Exception):
            raise self.activity_result
        return self.activity_result

    async def close(self) -> None:
        self.closed = True


@dataclass
class World:
    kube: FakeKube = field(default_factory=FakeKube)
    probers: list[FakeProber] = field(default_factory=list)
    time: float = 1000.0
    status: PoolBudgetStatus = field(default_factory=PoolBudgetStatus)
    server_status: dict[str, Any] = field(default_factory=dict)  # as the API server has it
    # False: no status hold after restarts (every round's status is written at once).
    status_hold: bool = True
    memory: BudgetMemory = field(default_factory=BudgetMemory)
    spec: dict[str, Any] = field(default_factory=lambda: {
        "database": {"connectionSecretRef": {"name": "shop-db", "key": "dsn"}, "refreshSeconds": 60},
        "targets": [{"deploymentName": "api", "processesPerPod": 4}],
        "rollout": {"minIntervalSeconds": 0},
    })  # fmt: skip
    deployments: dict[tuple[str, str], DeploymentState] = field(default_factory=lambda: {
        ("shop", "api"): DeploymentState(name="api", replicas=2, max_surge=None, recreate=False,
                                         template_hash=None, rolling=False, unobserved=False, stalled=False),
    })  # fmt: skip

    def prober(self, dsn: str) -> FakeProber:
        prober = FakeProber(dsn)
        if self.probers and isinstance(self.probers[-1].result, Exception):
            prober.result = self.probers[-1].result
        if self.probers:  # a prober a test prepared: what it would have shown
            prober.activity_result = self.probers[-1].activity_result
        self.probers.append(prober)
        return prober

    async def reconcile(self) -> None:
        reconciler = Reconciler(
            kube=self.kube,
            prober_factory=self.prober,
            clock=lambda: NOW,
            monotonic=lambda: self.time,
            status_settle_seconds=STATUS_SETTLE_SECONDS if self.status_hold else 0.0,
            status_hold_max_seconds=STATUS_HOLD_MAX_SECONDS if self.status_hold else 0.0,
        )
        budget = BudgetObject(namespace="shop", name="shop", uid="u1", generation=1, created="2026-01-01T00:00:00Z",
                              spec=self.spec, status=self.server_status)  # fmt: skip
        observed = Observed(deployments=self.deployments, hpa_max_replicas={}, claims={})
        outcome = await reconciler.reconcile(budget, lambda: observed, self.memory)
        self.status = outcome.status  # what this round decided (written or held)
        if self.kube.statuses:  # what the API server has: the last status written
            self.server_status = self.kube.statuses[-1]
        # What the cluster would now show: the template carries the hash we patched.
        for kind, name in self.kube.writes:
            if kind == "restart":
                state = self.deployments[("shop", name)]
                entry = self.allocation(name)
                self.deployments[("shop", name)] = replace(state, template_hash=entry.config_hash)

    def condition(self, kind: str) -> Condition:
        found = self.status.condition(kind)
        assert found is not None, f"no {kind} condition"
        return found

    def allocation(self, name: str = "api") -> Allocation:
        found = self.status.allocation(name)
        assert found is not None, f"no allocation for {name}"
        return found


async def test_first_reconcile_writes_restarts_and_then_nothing() -> None:
    world = World()
    await world.reconcile()
    assert ("configmap", "api-db-pool") in world.kube.writes
    assert ("restart", "api") in world.kube.writes
    await world.reconcile()  # sees the restarted template: status Rolling -> Applied
    world.kube.writes.clear()
    await world.reconcile()
    await world.reconcile()
    assert world.kube.writes == []  # a no-op reconcile writes nothing at all
    assert world.condition("Ready").status is ConditionStatus.TRUE


async def test_once_it_remembers_its_status_the_budget_copy_needs_none() -> None:
    # handlers.kept_body drops the PoolBudget's status once the memory knows both the status
    # to build on and the one on the server: the rounds after that must not need it.
    world = World(status_hold=False)
    assert not BudgetMemory().knows_status  # nothing written yet: the copy keeps the status
    await world.reconcile()
    await world.reconcile()
    assert world.memory.knows_status
    world.kube.writes.clear()
    world.server_status = {}  # what the loop now gets from its copy of the PoolBudget
    await world.reconcile()
    assert world.kube.writes == []
    assert world.status == world.memory.written_status
    kept = kept_body({"metadata": {"name": "shop", "managedFields": [{}]},
                      "spec": world.spec, "status": world.status.to_body()}, with_status=False)  # fmt: skip
    assert kept_status(kept) == {}
    # Two budgets' specs, parsed apart, share their key strings once kept.
    first, second = (kept_body({"metadata": {}, "spec": json.loads(json.dumps(world.spec))})
                     for _ in range(2))  # fmt: skip
    assert [
        k is j
        for k, j in zip(first["spec"]["targets"][0], second["spec"]["targets"][0], strict=True)
    ] == [True] * len(world.spec["targets"][0])
    with_status = kept_body({"metadata": {"name": "shop"}, "spec": world.spec,
                             "status": world.status.to_body()})  # fmt: skip
    assert kept_status(with_status) == world.status.to_body()
    assert kept["spec"] == world.spec
    assert kept["spec"] is not world.spec
    assert "managedFields" not in kept["metadata"]


async def test_a_restart_that_finds_its_status_on_the_server_remembers_it_as_written() -> None:
    # After an operator restart nothing changed: no status write, yet the memory knows the
    # server's status, so the loop's copy of the PoolBudget can drop its own (10 KiB each).
    def restarted(world: World) -> World:
        return World(kube=world.kube, status_hold=False, server_status=world.server_status,
                     deployments=world.deployments, spec=world.spec)  # fmt: skip

    world = World(status_hold=False)
    for _ in range(3):  # written, restarted, rolled out: settled
        await world.reconcile()
    # A fresh memory judges a little differently (the rollout it did not see): the first
    # restart may write; the second finds exactly what it would write.
    first = restarted(world)
    await first.reconcile()
    world.kube.writes.clear()
    second = restarted(first)
    knew_before = second.memory.knows_status
    await second.reconcile()
    assert second.kube.writes == []
    assert (knew_before, second.memory.knows_status) == (False, True)
    written = second.memory.written_status
    assert written is not None
    assert status_changes(first.server_status, written) == []


@dataclass
class GatedKube(FakeKube):
    """Every ConfigMap write waits for `gate`; counts the rounds writing at once."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    writing: int = 0
    most_writing: int = 0

    async def read_configmap(self, namespace: str, name: str) -> FakeConfigMap | None:
        return self.configmaps.get(f"{namespace}/{name}")

    async def apply_configmap(
        self, namespace: str, name: str, data: dict[str, str], labels: dict[str, str],
        annotations: dict[str, str],
    ) -> None:  # fmt: skip
        self.writing += 1
        self.most_writing = max(self.most_writing, self.writing)
        await self.gate.wait()
        self.writing -= 1
        await super().apply_configmap(namespace, f"{namespace}/{name}", data, labels, annotations)


@dataclass
class GatedProber(FakeProber):
    """Every probe waits for `gate`; counts the probes waiting at once."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: list[str] = field(default_factory=list)

    async def probe(self) -> DatabaseFacts:
        self.waiting.append(self.dsn)
        await self.gate.wait()
        return await super().probe()


async def test_rounds_in_flight_are_bounded_but_database_reads_are_not() -> None:
    # A cold start of many budgets must not decide every round before the first write is
    # sent (their inputs and decisions all alive at once); a slow database, though, must
    # not hold up other budgets' rounds: it is read before a round takes its slot.
    kube, probes = GatedKube(), GatedProber(DSN)
    reconciler = Reconciler(kube=kube, prober_factory=lambda dsn: probes, clock=lambda: NOW,
                            monotonic=lambda: 1000.0, rounds_in_flight=2)  # fmt: skip
    world = World()
    observed: list[int] = []  # the rounds that took their view of the cluster

    def observe(i: int) -> Callable[[], Observed]:
        def view() -> Observed:
            observed.append(i)
            return Observed(deployments={(f"ns{i}", "api"): world.deployments[("shop", "api")]},
                            hpa_max_replicas={}, claims={})  # fmt: skip

        return view

    rounds = [
        asyncio.create_task(reconciler.reconcile(
            BudgetObject(namespace=f"ns{i}", name="shop", uid=f"u{i}", generation=1,
                         created="2026-01-01T00:00:00Z", spec=world.spec, status={}),
            observe(i),
            BudgetMemory(),
        ))
        for i in range(5)
    ]  # fmt: skip
    await asyncio.sleep(0.05)
    assert len(probes.waiting) == 5  # every database read at once
    assert kube.writing == 0
    probes.gate.set()
    await asyncio.sleep(0.05)
    assert kube.writing == 2  # two rounds writing, three waiting for a slot
    assert len(observed) == 2  # ...and those decide on the cluster as it is once they get one
    kube.gate.set()
    results = await asyncio.gather(*rounds)
    assert kube.most_writing == 2
    assert [r.status.condition("Ready") is not None for r in results] == [True] * 5
    assert sum(kind == "configmap" for kind, _ in kube.writes) == 5


def three_targets() -> World:
    world = World()
    world.spec["targets"] = [
        {"deploymentName": name, "processesPerPod": 2} for name in ("api", "worker", "cron")
    ]
    world.deployments = {
        ("shop", name): DeploymentState(name=name, replicas=2, max_surge=None, recreate=False,
                                        template_hash=None, rolling=False, unobserved=False, stalled=False)
        for name in ("api", "worker", "cron")
    }  # fmt: skip
    return world


async def test_a_target_removed_from_the_spec_loses_its_series() -> None:
    world = three_targets()
    await world.reconcile()
    cron = {"namespace": "shop", "poolbudget": "shop", "deployment": "cron"}
    assert REGISTRY.get_sample_value("poolbudget_pool_size", cron) is not None
    world.spec["targets"] = [t for t in world.spec["targets"] if t["deploymentName"] != "cron"]
    await world.reconcile()
    assert REGISTRY.get_sample_value("poolbudget_pool_size", cron) is None
    assert REGISTRY.get_sample_value("poolbudget_restarts_total", cron) is None
    api = {**cron, "deployment": "api"}
    assert REGISTRY.get_sample_value("poolbudget_pool_size", api) is not None


async def test_one_event_per_reason_names_every_target_and_comes_before_the_status() -> None:
    world = three_targets()
    world.spec["rollout"] = {"minIntervalSeconds": 0, "maxConcurrent": 3}
    await world.reconcile()
    reasons = [e[1] for e in world.kube.events]
    assert reasons == ["ConfigMapUpdated", "RolloutRestarted"]
    updated, restarted = (e[2] for e in world.kube.events)
    assert updated.startswith("ConfigMaps updated (3): api-db-pool created with pool_size ")
    assert "; worker-db-pool created" in updated
    assert "; cron-db-pool created" in updated
    assert restarted.startswith("Deployments restarted to pick up their pool settings (3): api (")
    kinds = [kind for kind, _ in world.kube.writes]
    assert kinds == ["configmap"] * 3 + ["restart"] * 3 + ["event", "event"]
    world.time += STATUS_SETTLE_SECONDS  # the status waits for the restarts to settle
    await world.reconcile()
    assert [kind for kind, _ in world.kube.writes][len(kinds) :] == ["status"]

    # One target: the event reads as a single change always did.
    single = World()
    await single.reconcile()
    assert [e[1:] for e in single.kube.events] == [
        (
            "ConfigMapUpdated",
            "ConfigMap api-db-pool created: pool_size 10, max_overflow 5 (peak 180)",
        ),
        ("RolloutRestarted", "Deployment api restarted to pick up pool_size 10, max_overflow 5"),
    ]


async def test_events_for_writes_made_before_a_failure_are_still_posted() -> None:
    world = three_targets()
    world.spec["rollout"] = {"minIntervalSeconds": 0, "maxConcurrent": 3}
    failing = world.kube

    async def broken(namespace: str, deployment: str, annotations: dict[str, str]) -> None:
        raise RuntimeError("the API server went away")

    failing.annotate_pod_template = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await world.reconcile()
    assert [(e[1], e[2].split(":")[0]) for e in world.kube.events] == [
        ("ConfigMapUpdated", "ConfigMaps updated (3)")
    ]


async def test_one_prober_per_dsn_reused_until_the_dsn_changes() -> None:
    world = World()
    await world.reconcile()
    world.time += 61  # past refreshSeconds: re-read the limits
    await world.reconcile()
    assert len(world.probers) == 1
    assert world.probers[0].probes == 2
    world.kube.secrets["shop-db"] = DSN.replace("db:5432", "db2:5432")
    await world.reconcile()
    assert len(world.probers) == 2
    assert world.probers[0].closed


async def test_limits_are_cached_for_refresh_seconds() -> None:
    world = World()
    await world.reconcile()
    await world.reconcile()
    assert world.probers[0].probes == 1


async def test_database_failure_keeps_configmaps_and_warns_once() -> None:
    world = World()
    await world.reconcile()
    good = dict(world.kube.configmaps["api-db-pool"].data)
    world.kube.writes.clear()
    world.memory.prober = None
    world.memory.database = None
    world.probers.append(
        FakeProber(DSN, result=DatabaseAuthError("authentication failed for monitor@db:5432/shop"))
    )
    for _ in range(3):
        await world.reconcile()
    assert [w for w in world.kube.writes if w[0] in ("configmap", "restart")] == []
    assert world.kube.configmaps["api-db-pool"].data == good
    assert world.condition("DatabaseObserved").reason == "AuthenticationFailed"
    assert world.condition("Ready").status is ConditionStatus.FALSE
    assert [e[1] for e in world.kube.events if e[0] == "Warning"] == ["AuthenticationFailed"]


async def test_a_dsn_in_an_unexpected_error_never_leaks() -> None:
    world = World()
    world.probers.append(FakeProber(DSN, result=RuntimeError(f"boom while using {DSN}")))
    await world.reconcile()
    assert world.condition("DatabaseObserved").reason == "DatabaseError"
    assert "hunter2" not in repr(world.status)
    assert "hunter2" not in repr(world.kube.events)


async def test_missing_secret_is_reported() -> None:
    world = World()
    world.kube.secrets.clear()
    await world.reconcile()
    assert world.condition("DatabaseObserved").reason == "SecretNotFound"
    assert world.kube.configmaps == {}


async def test_infeasible_budget_writes_only_status_and_one_event() -> None:
    world = World()
    await world.reconcile()
    good = dict(world.kube.configmaps["api-db-pool"].data)
    world.kube.writes.clear()
    world.deployments[("shop", "api")] = replace(world.deployments[("shop", "api")], replicas=100)
    await world.reconcile()
    await world.reconcile()
    assert world.kube.configmaps["api-db-pool"].data == good
    assert [w[0] for w in world.kube.writes] == ["event", "status"]
    assert world.condition("BudgetFeasible").reason == "BudgetInfeasible"
    assert "short by" in world.condition("BudgetFeasible").message


async def test_a_foreign_key_in_a_managed_configmap_is_left_alone_and_writes_nothing() -> None:
    """Someone adds a key of their own (kubectl edit, GitOps): it is theirs. It used to make
    every round see a difference and re-apply the ConfigMap, once a second, forever."""
    world = World()
    for _ in range(2):
        await world.reconcile()
    world.kube.configmaps["api-db-pool"].data["TEAM_NOTE"] = "ours"
    world.kube.writes.clear()
    for _ in range(3):
        await world.reconcile()
    assert world.kube.writes == []
    assert world.kube.configmaps["api-db-pool"].data["TEAM_NOTE"] == "ours"


async def test_an_edited_key_of_ours_is_restored_once_without_a_restart() -> None:
    world = World()
    for _ in range(2):
        await world.reconcile()
    pool_size = world.kube.configmaps["api-db-pool"].data["DB_POOL_SIZE"]
    world.kube.configmaps["api-db-pool"].data["DB_POOL_SIZE"] = "999"
    world.kube.writes.clear()
    for _ in range(3):
        await world.reconcile()
    assert world.kube.writes.count(("configmap", "api-db-pool")) == 1
    assert ("restart", "api") not in world.kube.writes  # the pods never ran with 999
    assert world.kube.configmaps["api-db-pool"].data["DB_POOL_SIZE"] == pool_size


async def test_a_hash_another_writer_removed_is_restored_with_a_warning_once() -> None:
    """A GitOps tool replacing the template (or `kubectl rollout undo`) drops our hash while
    the settings stay the same: restoring it restarts the pods, so say why, once per
    restore. A restart for new settings is no such case."""
    world = World()
    for _ in range(2):
        await world.reconcile()
    assert not [e for e in world.kube.events if e[1] == "ConfigHashOverwritten"]
    state = world.deployments[("shop", "api")]
    world.deployments[("shop", "api")] = replace(state, template_hash=None)
    world.kube.writes.clear()
    for _ in range(3):
        await world.reconcile()
    assert world.kube.writes.count(("restart", "api")) == 1
    warnings = [e for e in world.kube.events if e[1] == "ConfigHashOverwritten"]
    assert len(warnings) == 1
    assert warnings[0][0] == "Warning"
    assert "Deployment api: another writer" in warnings[0][2]

    world.deployments[("shop", "api")] = replace(
        world.deployments[("shop", "api")], replicas=5
    )  # new settings: an ordinary restart
    world.kube.writes.clear()
    await world.reconcile()
    assert ("restart", "api") in world.kube.writes
    assert len([e for e in world.kube.events if e[1] == "ConfigHashOverwritten"]) == 1


async def test_a_failed_reconcile_turns_ready_false_once_and_says_only_the_error_type() -> None:
    world = World()
    for _ in range(2):
        await world.reconcile()
    assert world.condition("Ready").status is ConditionStatus.TRUE
    reconciler = Reconciler(kube=world.kube, prober_factory=world.prober, clock=lambda: NOW)
    budget = BudgetObject(namespace="shop", name="shop", uid="u1", generation=2,
                          created="2026-01-01T00:00:00Z", spec=world.spec, status=world.status.to_body())  # fmt: skip
    world.kube.events.clear()
    for _ in range(3):  # the loop retries every 10 s; one event, not one per round
        await reconciler.report_failure(budget, world.memory, ValueError(DSN))
    ready = next(c for c in world.kube.statuses[-1]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == (
        "False", "ReconcileFailed", 2)  # fmt: skip
    assert "ValueError" in ready["message"]
    assert [e[:2] for e in world.kube.events] == [("Warning", "ReconcileFailed")]
    assert DSN not in str(world.kube.statuses) + str(world.kube.events)


LEFT_BEHIND = {
    "app.kubernetes.io/managed-by": "poolbudget-operator",
    "poolbudget.dev/budget": "old",
}


async def test_a_configmap_left_by_a_deleted_budget_is_adopted_with_one_event() -> None:
    world = World()
    world.kube.configmaps["api-db-pool"] = FakeConfigMap({"DB_POOL_SIZE": "3"}, dict(LEFT_BEHIND))
    for _ in range(3):
        await world.reconcile()
    assert world.kube.configmaps["api-db-pool"].labels["poolbudget.dev/budget"] == "shop"
    assert ("restart", "api") in world.kube.writes
    adopted = [e for e in world.kube.events if e[1] == "ConfigMapAdopted"]
    assert len(adopted) == 1
    assert "PoolBudget old, which no longer exists" in adopted[0][2]
    assert world.condition("Ready").status is ConditionStatus.TRUE


async def test_a_configmap_of_a_budget_that_still_exists_stays_a_conflict() -> None:
    world = World()
    world.kube.budgets.add("old")
    world.kube.configmaps["api-db-pool"] = FakeConfigMap({"DB_POOL_SIZE": "3"}, dict(LEFT_BEHIND))
    await world.reconcile()
    assert world.kube.configmaps["api-db-pool"].labels["poolbudget.dev/budget"] == "old"
    assert world.condition("Ready").reason == "TargetConflict"


async def test_a_configmap_someone_else_owns_is_never_overwritten() -> None:
    world = World()
    world.kube.configmaps["api-db-pool"] = FakeConfigMap({"mine": "yes"}, {"team": "payments"})
    await world.reconcile()
    assert world.kube.configmaps["api-db-pool"].data == {"mine": "yes"}
    assert ("restart", "api") not in world.kube.writes
    assert world.condition("Ready").reason == "TargetConflict"
    assert world.allocation().state is AllocationState.CONFLICT


@pytest.mark.parametrize("strategy", ["None"])
async def test_rollout_strategy_none_writes_configmaps_only(strategy: str) -> None:
    world = World()
    world.spec["rollout"] = {"strategy": strategy}
    await world.reconcile()
    await world.reconcile()
    assert ("configmap", "api-db-pool") in world.kube.writes
    assert not [w for w in world.kube.writes if w[0] == "restart"]
    assert world.condition("RolloutComplete").reason == "RestartsDisabled"


def test_status_changes_name_the_fields_and_ignore_volatile_ones() -> None:
    database = DatabaseStatus(max_connections=100, connections_in_use=7, observed_time="t1")
    allocations = (
        Allocation(deployment_name="api", pool_size=5, state=AllocationState.ROLLING),
        Allocation(deployment_name="web", pool_size=2, state=AllocationState.APPLIED),
    )
    not_ready = Condition(type="Ready", status=ConditionStatus.FALSE, reason="RolloutInProgress",
                          message="", last_transition_time="2026-11-24T12:00:00Z")  # fmt: skip
    before = PoolBudgetStatus(
        observed_generation=1,
        database=database,
        activity=ActivityStatus(connections_in_use=9, observed_time="t1"),
        allocations=allocations,
        conditions=(not_ready,),
    )
    # Only what changes without anything happening: nothing to write.
    quiet = before.model_copy(
        update={
            "database": database.model_copy(
                update={"connections_in_use": 9, "observed_time": "t2"}
            ),
            "activity": ActivityStatus(connections_in_use=9, observed_time="t2"),
        }
    )
    assert status_changes(before, quiet) == []
    assert status_changes(before.to_body(), quiet) == []  # the body as read, unparsed
    after = before.model_copy(
        update={
            "allocations": (
                allocations[0].model_copy(update={"state": AllocationState.APPLIED}),
                allocations[1],
            ),
            "conditions": (
                not_ready.model_copy(
                    update={"status": ConditionStatus.TRUE, "reason": "BudgetApplied"}
                ),
            ),
            "headroom": 3,
        }
    )
    assert status_changes(before, after) == [
        "allocations[api].state",
        "conditions[Ready].reason/status",
        "headroom",
    ]
    reordered = before.model_copy(update={"allocations": tuple(reversed(allocations))})
    assert status_changes(before, reordered) == ["allocations"]
    # What this version cannot represent, on the server: a change, so it is replaced.
    stale = {**before.to_body(), "allocations": [*before.to_body()["allocations"],
                                                 {"deploymentName": "old", "state": "Bogus"}]}  # fmt: skip
    assert status_changes(stale, before) == ["allocations[old].deploymentName/state"]


# --- the database watch (spec.database.watch) ---------------------------------------------

OPERATOR_ROW = ("poolbudget-operator", SessionState.ACTIVE, 1)


def watched_world() -> World:
    """api's allocation is 180 (12 workers x (10 + 5)) of 190 usable; a capacity ratio of 1
    keeps NearCapacity out of the tests that are about one other signal."""
    world = World()
    world.spec["database"]["watch"] = {"capacityWarningRatio": 1.0}
    return world


def healthy(world: World) -> Condition:
    return world.condition("DatabaseHealthy")


def warnings_and_notices(world: World) -> list[tuple[str, str]]:
    watch_reasons = ("OverAllocation", "NearCapacity", "LockWaits", "StaleTransactions")
    return [(e[0], e[1]) for e in world.kube.events if e[1].startswith(watch_reasons)]


async def refresh(world: World, reading: DatabaseActivity | Exception) -> None:
    """One more refresh of the database (limits and pg_stat_activity) with this reading."""
    world.probers[-1].activity_result = reading
    world.time += 61
    await world.reconcile()


async def test_the_watch_fills_status_and_metrics_on_each_refresh() -> None:
    world = watched_world()
    world.probers.append(FakeProber(DSN))
    world.probers[-1].activity_result = activity(
        ("api", SessionState.ACTIVE, 3),
        ("api", SessionState.IDLE, 40),
        ("api", SessionState.IDLE_IN_TRANSACTION, 1),
        ("psql", SessionState.ACTIVE, 2),
        ("cron", SessionState.IDLE, 5),
        ("", SessionState.IDLE, 1),
        OPERATOR_ROW,
    )
    await world.reconcile()
    assert world.probers[-1].activity_reads == [5.0]  # idleInTransactionWarningSeconds
    api = world.allocation()
    assert api.peak_connections == 180
    assert api.live_connections is not None
    assert api.live_connections.to_body() == {
        "applicationName": "api", "active": 3, "idle": 40, "idleInTransaction": 1,
        "unknown": 0, "total": 44,
    }  # fmt: skip
    assert world.status.activity is not None
    status = world.status.activity.to_body()
    assert {k: v for k, v in status.items() if k != "observedTime"} == {
        "connectionsInUse": 53,
        "unbudgetedConnections": 8,
        "unbudgetedClients": [
            {"applicationName": "cron", "connections": 5},
            {"applicationName": "psql", "connections": 2},
            {"applicationName": "", "connections": 1},
        ],
        "operatorConnections": 1,
        "lockWaits": 0,
        "staleTransactions": 0,
        "visibility": "Full",
    }
    assert healthy(world).status is ConditionStatus.TRUE
    assert healthy(world).reason == "WithinThresholds"
    summary = healthy(world).message
    assert "53 of 190 usable connections in use, 8 of them by clients of no target" in summary
    budget = {"namespace": "shop", "poolbudget": "shop"}
    sample = REGISTRY.get_sample_value
    assert sample("poolbudget_target_live_connections", {**budget, "deployment": "api",
                                                         "state": "idle"}) == 40  # fmt: skip
    assert sample("poolbudget_unbudgeted_connections", budget) == 8
    assert sample("poolbudget_signals_raised", {**budget, "signal": "OverAllocation"}) == 0
    assert warnings_and_notices(world) == []


async def test_a_plain_role_sees_a_partial_view_and_status_says_which_grant() -> None:
    world = watched_world()
    world.probers.append(FakeProber(DSN))
    world.probers[-1].activity_result = activity(("api", SessionState.UNKNOWN, 12), OPERATOR_ROW)
    await world.reconcile()
    assert world.status.activity is not None
    assert world.status.activity.visibility is Visibility.PARTIAL
    live = world.allocation().live_connections
    assert live is not None
    assert live.unknown == 12
    message = healthy(world).message
    assert "grant pg_monitor for states, lock waits and stale transactions" in message


async def test_a_raised_signal_warns_once_and_clears_with_one_normal_event() -> None:
    world = watched_world()
    await world.reconcile()
    await world.reconcile()  # rolled out: Ready
    assert world.condition("Ready").status is ConditionStatus.TRUE
    leaking = activity(("api", SessionState.IDLE, 185), OPERATOR_ROW)

    await refresh(world, leaking)
    assert warnings_and_notices(world) == [("Warning", "OverAllocation")]
    message = world.kube.events[-1][2]
    assert "Deployment api holds 185 connections" in message
    assert "5 over its allocation of 180" in message
    assert healthy(world).status is ConditionStatus.FALSE
    assert healthy(world).reason == "OverAllocation"
    assert "Deployment api holds 185 connections" in healthy(world).message
    assert (
        world.condition("Ready").status is ConditionStatus.TRUE
    )  # the plan is applied all the same

    await world.reconcile()  # woken between refreshes: the reading is not judged again
    await refresh(world, leaking)  # the same signal at the next refresh: no new event
    assert warnings_and_notices(world) == [("Warning", "OverAllocation")]

    clean = activity(("api", SessionState.IDLE, 20), OPERATOR_ROW)
    for _ in range(2):  # raised signals clear after three clean refreshes, not one
        await refresh(world, clean)
        await world.reconcile()
        assert healthy(world).status is ConditionStatus.FALSE
    assert warnings_and_notices(world) == [("Warning", "OverAllocation")]
    await refresh(world, clean)
    assert warnings_and_notices(world) == [
        ("Warning", "OverAllocation"),
        ("Normal", "OverAllocationCleared"),
    ]
    assert "OverAllocation (api) cleared after 3 clean refreshes" in world.kube.events[-1][2]
    assert healthy(world).status is ConditionStatus.TRUE
    assert world.condition("Ready").status is ConditionStatus.TRUE


async def test_a_failed_activity_read_keeps_configmaps_and_the_signals_and_is_reported() -> None:
    from poolbudget.adapters.postgres import DatabaseTimeoutError

    world = watched_world()
    await world.reconcile()
    await world.reconcile()
    await refresh(world, activity(("api", SessionState.IDLE, 185), OPERATOR_ROW))
    assert healthy(world).reason == "OverAllocation"
    good = dict(world.kube.configmaps["api-db-pool"].data)
    world.kube.writes.clear()

    failure = DatabaseTimeoutError("monitor@db:5432/shop did not answer within 5s")
    for _ in range(4):  # more failed reads than clean ones would clear it: none count
        await refresh(world, failure)
    assert [w for w in world.kube.writes if w[0] in ("configmap", "restart")] == []
    assert world.kube.configmaps["api-db-pool"].data == good
    assert world.condition("Ready").status is ConditionStatus.TRUE
    assert world.condition("DatabaseObserved").status is ConditionStatus.TRUE
    assert (
        healthy(world).status is ConditionStatus.FALSE
    )  # still raised: a failed read is no clean one
    assert healthy(world).reason == "OverAllocation"
    message = healthy(world).message
    assert "the last read of pg_stat_activity failed (monitor@db:5432/shop did not" in message
    assert warnings_and_notices(world) == [("Warning", "OverAllocation")]
    assert "hunter2" not in repr(world.kube.statuses) + repr(world.kube.events)

    clean = activity(("api", SessionState.IDLE, 20), OPERATOR_ROW)
    for _ in range(3):
        await refresh(world, clean)
    assert healthy(world).status is ConditionStatus.TRUE
    assert "failed" not in healthy(world).message


async def test_a_first_activity_read_that_fails_leaves_the_condition_unknown() -> None:
    world = watched_world()
    world.probers.append(FakeProber(DSN, activity_result=RuntimeError(f"boom {DSN}")))
    await world.reconcile()
    assert world.kube.configmaps["api-db-pool"].data["DB_POOL_SIZE"] == "10"
    assert (healthy(world).status, healthy(world).reason) == (
        ConditionStatus.UNKNOWN, "ActivityUnreadable")  # fmt: skip
    assert "RuntimeError" in healthy(world).message
    assert "hunter2" not in repr(world.status)
    assert world.status.activity is None


async def test_near_capacity_and_stale_transactions_name_what_to_look_at() -> None:
    world = World()  # the default ratio, 0.85: 161.5 of 190
    world.probers.append(FakeProber(DSN))
    world.probers[-1].activity_result = activity(
        ("api", SessionState.IDLE, 100),
        ("reports", SessionState.IDLE_IN_TRANSACTION, 2),
        ("psql", SessionState.IDLE, 60),
        OPERATOR_ROW,
        stale=2,
    )
    await world.reconcile()
    assert sorted(warnings_and_notices(world)) == [
        ("Warning", "NearCapacity"),
        ("Warning", "StaleTransactions"),
    ]
    assert healthy(world).reason == "NearCapacity"  # the first kind raised, in kind order
    message = healthy(world).message
    assert "NearCapacity: 163 of 190 usable connections in use" in message
    assert "StaleTransactions: 2 sessions of reports have been idle in transaction" in message


async def test_a_watch_turned_off_reads_nothing_and_shows_nothing() -> None:
    world = watched_world()
    await world.reconcile()
    assert world.status.condition("DatabaseHealthy") is not None
    world.spec["database"]["watch"] = {"enabled": False}
    await refresh(world, activity(OPERATOR_ROW))
    assert world.probers[0].activity_reads == [5.0]  # only the first refresh read it
    assert world.status.condition("DatabaseHealthy") is None
    assert world.status.activity is None
    assert world.allocation().live_connections is None


async def test_a_budget_without_a_database_connection_has_no_watch() -> None:
    world = World()
    world.spec["database"] = {"maxConnectionsOverride": 200}
    await world.reconcile()
    assert [c.type for c in world.status.conditions or ()] == [
        "Ready", "DatabaseObserved", "BudgetFeasible", "RolloutComplete"
    ]  # fmt: skip


async def test_after_a_restart_the_status_is_written_once_the_rollout_had_a_moment() -> None:
    """Each Deployment-controller answer to a restart changes the status (observed,
    updated, complete); written every round, one change cost 2-4 status writes. The
    rounds within STATUS_SETTLE_SECONDS of a restart keep their status in memory and ask
    to look again when the hold ends; the round after it writes once, what is true then."""
    world = World()
    await world.reconcile()  # ConfigMap, restart: the status is held
    kinds = [kind for kind, _ in world.kube.writes]
    assert kinds == ["configmap", "restart", "event", "event"]
    held = world.memory.last_status
    assert held is not None
    assert held.allocations is not None
    assert held.allocations[0].state is AllocationState.ROLLING
    # The controller answers at once: the rollout is done; that round still holds.
    world.time += 0.2
    await world.reconcile()
    assert "status" not in [kind for kind, _ in world.kube.writes]
    world.time += STATUS_SETTLE_SECONDS
    await world.reconcile()
    statuses = [kind for kind, _ in world.kube.writes if kind == "status"]
    assert statuses == ["status"]
    written = world.memory.written_status
    assert written is not None
    assert written.allocations is not None
    assert written.allocations[0].state is not AllocationState.ROLLING
    assert written.allocations[0].restarted_time == held.allocations[0].restarted_time
    # Nothing new: nothing written.
    world.time += 5
    await world.reconcile()
    assert [kind for kind, _ in world.kube.writes if kind == "status"] == ["status"]


async def test_a_slow_rollout_holds_the_status_until_done_or_the_cap() -> None:
    """Past the settle time the status stays held while the restarted Deployment is still
    rolling out (the controller was slow: 10 s for a cold start's 5,000 rollouts), and is
    written at the cap if the rollout is still going then, so it never goes stale for
    long; the rollout's end is written as usual."""
    world = World()
    await world.reconcile()  # ConfigMap + restart at t=1000
    api = ("shop", "api")
    world.deployments[api] = replace(world.deployments[api], rolling=True)
    world.time += STATUS_SETTLE_SECONDS + 2  # settled, but api is still rolling out
    await world.reconcile()
    assert [kind for kind, _ in world.kube.writes if kind == "status"] == []
    world.time = 1000.0 + STATUS_HOLD_MAX_SECONDS  # the cap: written, rolling as it is
    await world.reconcile()
    assert [kind for kind, _ in world.kube.writes if kind == "status"] == ["status"]
    assert world.allocation().state is AllocationState.ROLLING
    world.deployments[api] = replace(world.deployments[api], rolling=False)
    world.time += 1
    await world.reconcile()  # done: written at once, no hold left
    assert [kind for kind, _ in world.kube.writes if kind == "status"] == ["status", "status"]
    assert world.allocation().state is not AllocationState.ROLLING
