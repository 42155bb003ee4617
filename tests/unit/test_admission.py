"""The admission guard's parameters (domain/admission.py) and their publisher
(poolbudget/admission.py): the limits hold against the sizing engine itself over generated
budgets, and the shared ConfigMap is merged, kept and written only on change."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolbudget.adapters.kube import KubeError
from poolbudget.admission import PARAMS_LABELS, AdmissionParams, enabled_by
from poolbudget.api.v1alpha1 import PoolBudgetSpec, ReplicaBasis
from poolbudget.domain.admission import (
    NOTHING_FITS,
    PARAMS_CONFIGMAP,
    AdmissionLimit,
    admission_limits,
    merge_params,
    params_entries,
    same_limits,
    without_budget,
)
from poolbudget.domain.cluster_view import Observed
from poolbudget.domain.facts import DatabaseFacts, DeploymentFacts, IntOrPercent
from poolbudget.domain.observe import DeploymentState
from poolbudget.domain.planning import plan_for
from poolbudget.reconcile import BudgetMemory, BudgetObject, Reconciler
from tests.unit.test_reconcile import FakeKube, FakeProber

BUDGETS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
DATABASE = DatabaseFacts(max_connections=200, superuser_reserved_connections=3)

int_or_percent = st.one_of(
    st.none(),
    st.integers(0, 4),
    st.integers(0, 100).map(lambda p: f"{p}%"),
    st.integers(0, 4).map(str),
)


@st.composite
def budgets(draw: st.DrawFn) -> tuple[PoolBudgetSpec, DatabaseFacts, dict[str, DeploymentFacts]]:
    count = draw(st.integers(1, 4))
    targets = []
    deployments = {}
    for i in range(count):
        name = f"d{i}"
        targets.append(
            {
                "deploymentName": name,
                "processesPerPod": draw(st.integers(1, 8)),
                "minPoolSize": draw(st.integers(1, 4)),
                "weight": draw(st.integers(1, 3)),
            }
        )
        surge, unavailable = draw(int_or_percent), draw(int_or_percent)
        deployments[name] = DeploymentFacts(
            name=name,
            replicas=draw(st.integers(0, 12)),
            max_surge=surge,
            max_unavailable=unavailable,
            recreate=draw(st.booleans()),
            hpa_max_replicas=draw(st.one_of(st.none(), st.integers(1, 20))),
        )
    spec = PoolBudgetSpec.model_validate(
        {
            "database": {"maxConnectionsOverride": draw(st.integers(20, 600))},
            "reservedConnections": draw(st.integers(0, 20)),
            "replicaBasis": draw(st.sampled_from(["WorstCase", "Current"])),
            "terminatingPods": draw(st.sampled_from(["Counted", "Uncounted"])),
            "shareBy": draw(st.sampled_from(["Worker", "Target"])),
            "defaults": {"maxOverflow": draw(st.integers(0, 6))},
            "targets": targets,
        }
    )
    database = DatabaseFacts(
        max_connections=spec.database.max_connections_override or 1,
        superuser_reserved_connections=draw(st.integers(0, 5)),
    )
    return spec, database, deployments


def feasible_with(
    spec: PoolBudgetSpec,
    database: DatabaseFacts,
    deployments: dict[str, DeploymentFacts],
    name: str,
    **change: Any,
) -> bool:
    changed = {**deployments, name: deployments[name].model_copy(update=change)}
    return plan_for(spec, database, changed).feasible


@BUDGETS
@given(budgets())
def test_at_the_limit_the_plan_is_feasible_and_one_more_replica_is_not(
    budget: tuple[PoolBudgetSpec, DatabaseFacts, dict[str, DeploymentFacts]],
) -> None:
    spec, database, deployments = budget
    for limit in admission_limits(spec, database, "shop", spec.targets, deployments):
        name = limit.deployment
        if limit.max_replicas == NOTHING_FITS:
            # Not even one pod of it fits with the others as they are.
            assert not feasible_with(spec, database, deployments, name, replicas=0,
                                     hpa_max_replicas=None)  # fmt: skip
            continue
        # A replica change (the HPA's maximum taken out of the way: at or below the limit
        # it changes nothing, above it is the HPA check's business).
        assert feasible_with(spec, database, deployments, name,
                             replicas=limit.max_replicas, hpa_max_replicas=None)  # fmt: skip
        assert not feasible_with(spec, database, deployments, name,
                                 replicas=limit.max_replicas + 1, hpa_max_replicas=None)  # fmt: skip
        # Every smaller count fits too (the guard passes whatever is below the limit).
        for smaller in range(max(0, limit.max_replicas - 3), limit.max_replicas):
            assert feasible_with(spec, database, deployments, name, replicas=smaller,
                                 hpa_max_replicas=None)  # fmt: skip
        # An HPA maxReplicas change, the replicas kept below it: under WorstCase the
        # engine counts it, so the same limit holds.
        if spec.replica_basis is ReplicaBasis.WORST_CASE:
            if limit.max_replicas >= 1:  # an HPA's maxReplicas is at least 1
                assert feasible_with(spec, database, deployments, name, replicas=0,
                                     hpa_max_replicas=limit.max_replicas)  # fmt: skip
            assert not feasible_with(spec, database, deployments, name, replicas=0,
                                     hpa_max_replicas=limit.max_replicas + 1)  # fmt: skip


@BUDGETS
@given(budgets(), st.integers(0, 60))
def test_the_message_numbers_are_the_engines_minimum_pools(
    budget: tuple[PoolBudgetSpec, DatabaseFacts, dict[str, DeploymentFacts]], desired: int
) -> None:
    """What the policy's CEL computes for its message (pods_at, minimum_connections_at)
    is what the engine budgets: the two-integer surge form loses nothing."""
    spec, database, deployments = budget
    for limit in admission_limits(spec, database, "shop", spec.targets, deployments):
        facts = deployments[limit.deployment].model_copy(
            update={"replicas": desired, "hpa_max_replicas": None}
        )
        assert limit.pods_at(desired) == facts.pods_worst_case(
            ReplicaBasis.CURRENT, spec.terminating_pods
        )
        changed = {**deployments, limit.deployment: facts}
        plan = plan_for(spec, database, changed)
        minimum = sum(
            a.workers * t.min_pool_size for a, t in zip(plan.allocations, spec.targets, strict=True)
        )
        assert limit.minimum_connections_at(desired) == minimum
        assert limit.usable == plan.usable_connections


def test_the_worked_example_of_the_readme() -> None:
    """api: 4 processes x minPoolSize 2 = 8 connections per pod, default 25% surge;
    worker: 2 replicas, no surge, 2 x 2 = 4 per pod. 200 - 3 withheld - 10 reserved = 187
    usable."""
    spec = PoolBudgetSpec.model_validate(
        {
            "database": {"maxConnectionsOverride": 200},
            "reservedConnections": 10,
            "targets": [
                {"deploymentName": "api", "processesPerPod": 4, "minPoolSize": 2},
                {"deploymentName": "worker", "processesPerPod": 2, "minPoolSize": 2},
            ],
        }
    )
    deployments = {
        "api": DeploymentFacts(name="api", replicas=3),
        "worker": DeploymentFacts(name="worker", replicas=2, max_surge=0),
    }
    api, worker = admission_limits(spec, DATABASE, "shop-db", spec.targets, deployments)
    assert api.usable == 187
    assert api.connections_per_pod == 8
    assert api.others_minimum == 2 * 4
    # 17 replicas + ceil(25% of 17) = 5 surge: 22 pods x 8 = 176, + 8 = 184 <= 187;
    # 18 + 5 = 23 pods x 8 = 184, + 8 = 192 > 187.
    assert api.max_replicas == 17
    assert api.minimum_connections_at(17) == 184
    assert api.minimum_connections_at(18) == 192
    # worker, no surge: api's 3 + 1 surge = 4 pods x 8 = 32; (187 - 32) // 4 = 38 pods.
    assert worker.max_replicas == 38
    assert worker.minimum_connections_at(39) == 32 + 39 * 4 > 187


def test_nothing_fits_when_even_one_pod_is_too_many() -> None:
    """17 usable (20 - 3 withheld); big: 8 processes x 2 = 16 per pod, 2 replicas, no
    surge; small: 1 replica + 25% surge = 2 pods x 1."""
    spec = PoolBudgetSpec.model_validate(
        {
            "database": {"maxConnectionsOverride": 20},
            "reservedConnections": 0,
            "targets": [
                {"deploymentName": "big", "processesPerPod": 8, "minPoolSize": 2},
                {"deploymentName": "small", "processesPerPod": 1, "minPoolSize": 1},
            ],
        }
    )
    deployments = {
        "big": DeploymentFacts(name="big", replicas=2, max_surge=0, max_unavailable=1),
        "small": DeploymentFacts(name="small", replicas=1),
    }
    big, small = admission_limits(spec, DATABASE, "b", spec.targets, deployments)
    # big's 2 pods need 32: small cannot have even the one pod it is budgeted at 0.
    assert small.max_replicas == NOTHING_FITS
    assert small.minimum_connections_at(0) == 33
    # big at 0 replicas is still budgeted one pod, 16, + small's 2 = 18 > 17.
    assert big.max_replicas == NOTHING_FITS
    assert big.minimum_connections_at(0) == 18


@pytest.mark.parametrize(
    ("value", "absolute", "percent"),
    [(None, 0, 25), (2, 2, 0), ("3", 3, 0), ("40%", 0, 40), (" 10% ", 0, 10)],
)
def test_int_or_percent_is_split_into_two_integers(
    value: int | str | None, absolute: int, percent: int
) -> None:
    parsed = IntOrPercent.parse(value, "25%")
    assert (parsed.absolute, parsed.percent) == (absolute, percent)


def limit(deployment: str, budget: str, max_replicas: int = 5) -> AdmissionLimit:
    return AdmissionLimit(
        deployment=deployment,
        budget=budget,
        max_replicas=max_replicas,
        replicas=2,
        hpa_max_replicas=0,
        recreate=False,
        max_surge=IntOrPercent(absolute=0, percent=25),
        max_unavailable=IntOrPercent(absolute=0, percent=25),
        terminating_counted=False,
        connections_per_pod=4,
        others_minimum=8,
        usable=100,
    )


def test_params_entries_are_flat_strings_keyed_by_deployment() -> None:
    data = params_entries([limit("api", "shop")], generation=3, computed_at=NOW)
    assert data["api.budget"] == "shop"
    assert data["api.maxReplicas"] == "5"
    assert data["api.maxSurgePercent"] == "25"
    assert data["api.strategy"] == "RollingUpdate"
    assert data["api.generation"] == "3"
    assert data["api.computedAt"] == "2026-12-06T12:00:00Z"
    assert all(isinstance(v, str) for v in data.values())


def test_budgets_of_one_namespace_merge_and_replace_only_their_own_entries() -> None:
    shop = params_entries([limit("api", "shop"), limit("web", "shop")], generation=1,
                          computed_at=NOW)  # fmt: skip
    pay = params_entries([limit("ledger", "pay")], generation=1, computed_at=NOW)
    data = merge_params(merge_params({}, "shop", shop), "pay", pay)
    assert {k.split(".")[0] for k in data} == {"api", "web", "ledger"}
    # shop drops web and changes api: pay's entries stay.
    shop_again = params_entries([limit("api", "shop", 9)], generation=2, computed_at=NOW)
    data = merge_params(data, "shop", shop_again)
    assert {k.split(".")[0] for k in data} == {"api", "ledger"}
    assert data["api.maxReplicas"] == "9"
    assert data["ledger.budget"] == "pay"
    # A deleted budget's entries go, the others' stay.
    assert {k.split(".")[0] for k in without_budget(data, "shop")} == {"ledger"}


def test_a_budget_taking_over_a_deployment_replaces_the_old_owners_entries() -> None:
    old = params_entries([limit("api", "first")], generation=1, computed_at=NOW)
    new = params_entries([limit("api", "second", 7)], generation=1, computed_at=NOW)
    data = merge_params(merge_params({}, "first", old), "second", new)
    assert data["api.budget"] == "second"
    assert data["api.maxReplicas"] == "7"
    assert without_budget(data, "first") == data  # the old owner's deletion removes nothing


def test_only_a_time_stamp_differing_is_no_change() -> None:
    before = params_entries([limit("api", "shop")], generation=1, computed_at=NOW)
    later = params_entries([limit("api", "shop")], generation=1,
                           computed_at=datetime(2026, 12, 7, tzinfo=UTC))  # fmt: skip
    assert same_limits(before, later)
    assert not same_limits(before, params_entries([limit("api", "shop", 6)], generation=1,
                                                  computed_at=NOW))  # fmt: skip


@dataclass
class StoredConfigMap:
    data: dict[str, str]


@dataclass
class FakeStore:
    """Server-side apply by one field manager that owns every key it wrote: the data
    applied is the data stored."""

    configmaps: dict[str, StoredConfigMap] = field(default_factory=dict)
    writes: list[tuple[str, dict[str, str], dict[str, str]]] = field(default_factory=list)
    fail: bool = False

    async def read_configmap(self, namespace: str, name: str) -> StoredConfigMap | None:
        await asyncio.sleep(0)  # let concurrent publishers interleave here
        return self.configmaps.get(f"{namespace}/{name}")

    async def apply_configmap(
        self, namespace: str, name: str, data: dict[str, str], labels: dict[str, str],
        annotations: dict[str, str],
    ) -> None:  # fmt: skip
        await asyncio.sleep(0)
        if self.fail:
            raise KubeError("ConfigMap: API error 500")
        self.writes.append((f"{namespace}/{name}", dict(data), dict(labels)))
        self.configmaps[f"{namespace}/{name}"] = StoredConfigMap(dict(data))


async def test_the_publisher_writes_on_change_only_and_merges_concurrent_budgets() -> None:
    store = FakeStore()
    params = AdmissionParams(store, clock=lambda: NOW)
    await asyncio.gather(
        params.publish("shop", "a", 1, [limit("api", "a")]),
        params.publish("shop", "b", 1, [limit("web", "b")]),
    )
    stored = store.configmaps[f"shop/{PARAMS_CONFIGMAP}"].data
    assert stored["api.budget"] == "a"
    assert stored["web.budget"] == "b"
    assert store.writes[-1][2] == PARAMS_LABELS
    writes = len(store.writes)
    await params.publish("shop", "a", 1, [limit("api", "a")])  # same numbers
    assert len(store.writes) == writes
    await params.publish("shop", "a", 1, [limit("api", "a", 8)])
    assert store.configmaps[f"shop/{PARAMS_CONFIGMAP}"].data["api.maxReplicas"] == "8"
    await params.forget("shop", "a")
    assert "api.budget" not in store.configmaps[f"shop/{PARAMS_CONFIGMAP}"].data
    await params.forget("elsewhere", "x")  # nothing there: nothing written
    assert f"elsewhere/{PARAMS_CONFIGMAP}" not in store.configmaps


async def test_a_failed_write_is_logged_and_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore(fail=True)
    await AdmissionParams(store, clock=lambda: NOW).publish("shop", "a", 1, [limit("api", "a")])
    assert "admission parameters not written" in caplog.text


@pytest.mark.parametrize(("value", "on"), [(None, False), ("", False), ("0", False),
                                           ("true", True), ("1", True), ("Yes", True)])  # fmt: skip
def test_the_environment_switch(value: str | None, on: bool) -> None:
    assert enabled_by(value) is on


@dataclass
class RecordingAdmission:
    published: list[tuple[str, str, int, tuple[AdmissionLimit, ...]]] = field(default_factory=list)

    async def publish(
        self, namespace: str, budget: str, generation: int, limits: Sequence[AdmissionLimit]
    ) -> None:
        self.published.append((namespace, budget, generation, tuple(limits)))


async def test_each_reconcile_with_a_plan_hands_its_limits_over_feasible_or_not() -> None:
    """The reconciler's one call: the limits of the targets it planned, also when the plan
    is infeasible (the guard then flags every raise); nothing without a database reading."""
    kube = FakeKube()
    admission = RecordingAdmission()
    reconciler = Reconciler(kube=kube, prober_factory=FakeProber, clock=lambda: NOW,
                            monotonic=lambda: 1000.0, admission=admission)  # fmt: skip
    spec = {
        "database": {"maxConnectionsOverride": 100},
        "targets": [{"deploymentName": "api", "processesPerPod": 4, "minPoolSize": 2}],
    }

    def state(replicas: int) -> DeploymentState:
        return DeploymentState(name="api", replicas=replicas, max_surge=1, recreate=False,
                               template_hash=None, rolling=False, unobserved=False,
                               stalled=False)  # fmt: skip

    async def reconcile(replicas: int, generation: int = 4) -> None:
        budget = BudgetObject(namespace="shop", name="shop-db", uid="u", generation=generation,
                              created="2026-01-01T00:00:00Z", spec=spec, status={})  # fmt: skip
        observed = Observed(deployments={("shop", "api"): state(replicas)},
                            hpa_max_replicas={}, claims={})  # fmt: skip
        await reconciler.reconcile(budget, lambda: observed, BudgetMemory())

    await reconcile(2)
    [(namespace, budget, generation, (api,))] = admission.published
    assert (namespace, budget, generation) == ("shop", "shop-db", 4)
    # 100 - 3 withheld - 10 reserved = 87 usable, 8 per pod, 1 surge: 9 replicas + 1 = 80.
    assert (api.deployment, api.max_replicas, api.usable) == ("api", 9, 87)
    await reconcile(30)  # infeasible: still handed over
    assert len(admission.published) == 2
    assert kube.configmaps["api-db-pool"].data["DB_POOL_SIZE"]  # the good ConfigMap stays
    await reconcile(2, generation=0)
    spec["targets"] = [{"deploymentName": "api", "processesPerPod": 0}]  # invalid spec
    await reconcile(2)
    assert len(admission.published) == 3
