"""Pre-flight (domain/preflight.py): every budget of the manifests planned, missing
Deployments refused, flags over manifests, and the diff's restart rule."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from poolbudget.domain.facts import DatabaseFacts, DeploymentFacts
from poolbudget.domain.manifests import ManifestError, Manifests, parse_manifests
from poolbudget.domain.planning import plan_for
from poolbudget.domain.preflight import (
    Change,
    Overrides,
    configmaps_of_outcome,
    diff_budget,
    plan_manifests,
    previous_configmaps,
)
from poolbudget.domain.rendering import config_hash

DATABASE = DatabaseFacts(max_connections=200)


def budget(name: str = "shop-db", namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    spec.setdefault("database", {"connectionSecretRef": {"name": "dsn"}})
    spec.setdefault("reservedConnections", 10)
    spec.setdefault(
        "targets",
        [{"deploymentName": "api", "processesPerPod": 2}, {"deploymentName": "worker"}],
    )
    return {
        "apiVersion": "poolbudget.dev/v1alpha1",
        "kind": "PoolBudget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def deployment(name: str, replicas: int, namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas, **spec},
    }


def parse(*documents: Any) -> Manifests:
    return parse_manifests([("in.yaml", yaml.safe_dump_all(documents))])


def test_plans_each_budget_with_the_deployments_of_its_namespace() -> None:
    manifests = parse(
        budget(),
        budget("other-db", "other", targets=[{"deploymentName": "api"}]),
        deployment("api", 3, strategy={"rollingUpdate": {"maxSurge": 1}}),
        deployment("worker", 2, strategy={"type": "Recreate"}),
        deployment("api", 9, namespace="other"),
    )
    other, shop = plan_manifests(manifests, DATABASE)  # by namespace and name
    assert shop.manifest.key == ("shop", "shop-db")
    assert [(a.name, a.pods, a.workers) for a in shop.plan.allocations] == [
        ("api", 4, 8),
        ("worker", 2, 2),
    ]
    assert other.manifest.key == ("other", "other-db")
    assert other.plan.allocations[0].pods == 9 + 3  # 25% of 9, rounded up


def test_a_missing_deployment_is_an_error_naming_the_target() -> None:
    manifests = parse(budget(), deployment("api", 3))
    with pytest.raises(ManifestError) as caught:
        plan_manifests(manifests, DATABASE)
    assert str(caught.value) == (
        "in.yaml: document 1 (PoolBudget shop-db): spec.targets[1].deploymentName: "
        "Deployment shop/worker is not in the input (add its manifest, or --replicas worker=N)"
    )


def test_a_deployment_in_another_namespace_does_not_count() -> None:
    manifests = parse(budget(), deployment("api", 3), deployment("worker", 1, namespace="x"))
    with pytest.raises(ManifestError, match="Deployment shop/worker is not in the input"):
        plan_manifests(manifests, DATABASE)


def test_replicas_by_flag_stand_in_for_a_missing_deployment() -> None:
    manifests = parse(budget(), deployment("api", 3))
    (outcome,) = plan_manifests(manifests, DATABASE, Overrides(replicas={"shop/worker": 4}))
    assert outcome.deployments["worker"] == DeploymentFacts(name="worker", replicas=4)


def test_flags_override_the_manifests() -> None:
    manifests = parse(
        budget(),
        deployment("api", 3),
        deployment("worker", 2),
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "api"}, "maxReplicas": 6},
        },
    )
    overrides = Overrides(replicas={"api": 5}, hpa_max_replicas={"api": 8}, max_surge={"api": "0"})
    (outcome,) = plan_manifests(manifests, DATABASE, overrides)
    assert outcome.deployments["api"] == DeploymentFacts(
        name="api", replicas=5, hpa_max_replicas=8, max_surge="0"
    )
    assert outcome.plan.allocation("api").pods == 8


def test_a_bare_budget_file_keeps_its_default_of_one_replica() -> None:
    (outcome,) = plan_manifests(parse(budget()), DATABASE, Overrides(replicas={"api": 3}))
    assert outcome.deployments["worker"].replicas == 1
    assert outcome.deployments["api"].replicas == 3


def test_without_server_limits_the_override_is_required() -> None:
    manifests = parse(budget(), deployment("api", 1), deployment("worker", 1))
    with pytest.raises(ManifestError, match="--max-connections is required"):
        plan_manifests(manifests, None)
    manifests = parse(
        budget(database={"maxConnectionsOverride": 100}),
        deployment("api", 1),
        deployment("worker", 1),
    )
    (outcome,) = plan_manifests(manifests, None)
    assert (outcome.plan.max_connections, outcome.plan.withheld_by_server) == (100, 3)


@settings(max_examples=100)
@given(
    replicas=st.lists(st.integers(0, 12), min_size=2, max_size=2),
    hpa_max=st.one_of(st.none(), st.integers(1, 20)),
    max_connections=st.integers(20, 400),
)
def test_manifests_plan_as_the_facts_they_hold(
    replicas: list[int], hpa_max: int | None, max_connections: int
) -> None:
    """Reading the manifests changes nothing about the plan: it is plan_for of the facts."""
    documents = [budget(), deployment("api", replicas[0]), deployment("worker", replicas[1])]
    if hpa_max is not None:
        documents.append(
            {
                "apiVersion": "autoscaling/v1",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "h", "namespace": "shop"},
                "spec": {
                    "scaleTargetRef": {"kind": "Deployment", "name": "api"},
                    "maxReplicas": hpa_max,
                },
            }
        )
    database = DatabaseFacts(max_connections=max_connections, superuser_reserved_connections=3)
    (outcome,) = plan_manifests(parse(*documents), database)
    facts = {
        "api": DeploymentFacts(name="api", replicas=replicas[0], hpa_max_replicas=hpa_max),
        "worker": DeploymentFacts(name="worker", replicas=replicas[1]),
    }
    assert outcome.plan == plan_for(outcome.manifest.budget.spec, database, facts)


# --------------------------------------------------------------------------- diff


def outcome_for(replicas_api: int, **spec: Any) -> Any:
    manifests = parse(budget(**spec), deployment("api", replicas_api), deployment("worker", 1))
    (outcome,) = plan_manifests(manifests, DATABASE)
    return outcome


def test_same_settings_restart_nothing() -> None:
    outcome = outcome_for(3)
    now = configmaps_of_outcome(outcome)
    changes = diff_budget(outcome.manifest.budget.spec, outcome.plan, now)
    assert {c.change for c in changes} == {Change.UNCHANGED}
    assert all(c.old_hash == c.new_hash == config_hash(now[c.config_map_name]) for c in changes)


def test_a_scale_up_restarts_the_deployments_whose_pools_shrink() -> None:
    before, after = outcome_for(3), outcome_for(8)
    changes = diff_budget(after.manifest.budget.spec, after.plan, configmaps_of_outcome(before))
    api, worker = changes
    assert api.change is Change.RESTART
    assert (api.old_pool_size, api.pool_size) == (
        before.plan.allocation("api").pool_size,
        after.plan.allocation("api").pool_size,
    )
    assert api.pool_size is not None
    assert api.old_pool_size is not None
    assert api.pool_size < api.old_pool_size
    assert (api.old_max_overflow, api.max_overflow) == (5, 5)
    assert worker.config_map_name == "worker-db-pool"


def test_keys_added_by_someone_else_are_not_a_change() -> None:
    outcome = outcome_for(3)
    now = {k: {**v, "EXTRA": "x"} for k, v in configmaps_of_outcome(outcome).items()}
    changes = diff_budget(outcome.manifest.budget.spec, outcome.plan, now)
    assert {c.change for c in changes} == {Change.UNCHANGED}


def test_no_configmap_yet_means_a_restart_with_no_old_numbers() -> None:
    outcome = outcome_for(3)
    api, _ = diff_budget(outcome.manifest.budget.spec, outcome.plan, {})
    assert (api.change, api.old_pool_size, api.old_hash) == (Change.RESTART, None, None)


def test_rollout_strategy_none_writes_without_restarting() -> None:
    before = outcome_for(3)
    after = outcome_for(8, rollout={"strategy": "None"})
    api, _ = diff_budget(after.manifest.budget.spec, after.plan, configmaps_of_outcome(before))
    assert api.change is Change.CONFIGMAP_ONLY


def test_an_infeasible_budget_keeps_what_is_there() -> None:
    before = outcome_for(3)
    after = outcome_for(300)
    assert not after.plan.feasible
    changes = diff_budget(after.manifest.budget.spec, after.plan, configmaps_of_outcome(before))
    assert {c.change for c in changes} == {Change.KEPT}
    assert all(c.pool_size == c.old_pool_size and c.new_hash == c.old_hash for c in changes)


def test_previous_configmaps_prefer_a_dump_over_a_plan() -> None:
    previous = parse(
        budget(),
        deployment("api", 3),
        deployment("worker", 1),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "api-db-pool", "namespace": "shop"}, "data": {"DB_POOL_SIZE": "99"}},
    )  # fmt: skip
    outcomes = plan_manifests(previous, DATABASE)
    found = previous_configmaps(outcomes[0].manifest, previous, outcomes)
    assert found["api-db-pool"] == {"DB_POOL_SIZE": "99"}
    assert found["worker-db-pool"] == configmaps_of_outcome(outcomes[0])["worker-db-pool"]
    other = parse(budget("new-db"), deployment("api", 3), deployment("worker", 1))
    (new,) = plan_manifests(other, DATABASE)
    # A budget the previous input did not have: only the dumped ConfigMap is known.
    assert previous_configmaps(new.manifest, previous, outcomes) == {
        "api-db-pool": {"DB_POOL_SIZE": "99"},
        "worker-db-pool": None,
    }


def test_config_hash_is_the_serialization_the_readme_documents() -> None:
    """README: sha256 (hex) of one `key=value` line per key, keys sorted, UTF-8."""
    data = configmaps_of_outcome(outcome_for(3))["api-db-pool"] | {"é": "ü\nmulti-line"}
    lines = "".join(f"{key}={data[key]}\n" for key in sorted(data))
    assert config_hash(data) == hashlib.sha256(lines.encode("utf-8")).hexdigest()
    assert config_hash(dict(reversed(data.items()))) == config_hash(data)
