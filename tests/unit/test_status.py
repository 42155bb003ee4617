"""The status models (api/status.py): a status as the reconciler writes it survives them
whole, reading is lenient, and the merge patch they send clears every field that vanished
whatever status the server held before (RFC 7386, over statuses generated from the
committed CRD's schema rather than from the models)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolbudget.api.status import (
    ActivityStatus,
    Allocation,
    AllocationState,
    Condition,
    ConditionStatus,
    DatabaseStatus,
    LiveConnections,
    PlanVerdict,
    PoolBudgetStatus,
    UnbudgetedClient,
    Visibility,
)
from poolbudget.domain.conditions import ConditionType, Observation
from poolbudget.domain.rollout import TargetPhase
from poolbudget.domain.sizing import Verdict
from tests.unit.test_crd import CRD_FILE

# A status as reconcile.py writes it today (every field it can write at least once), with
# the watch on: database facts, activity, live connections, a restarted and a conflicting
# target, all five conditions.
WRITTEN: dict[str, Any] = {
    "observedGeneration": 3,
    "conditions": [
        {
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": "",
            "observedGeneration": 3,
            "lastTransitionTime": "2026-12-01T10:00:00Z",
        }
        for kind, reason in (
            ("Ready", "BudgetApplied"),
            ("DatabaseObserved", "LimitsRead"),
            ("BudgetFeasible", "Feasible"),
            ("RolloutComplete", "RolloutComplete"),
            ("DatabaseHealthy", "WithinThresholds"),
        )
    ],
    "database": {
        "maxConnections": 200,
        "superuserReservedConnections": 3,
        "reservedConnections": 0,
        "usableConnections": 187,
        "connectionsInUse": 57,
        "serverVersion": "16.4",
        "observedTime": "2026-12-01T10:00:05Z",
    },
    "activity": {
        "connectionsInUse": 57,
        "unbudgetedConnections": 2,
        "unbudgetedClients": [{"applicationName": "psql", "connections": 2}],
        "operatorConnections": 1,
        "lockWaits": 0,
        "staleTransactions": 0,
        "visibility": "Full",
        "observedTime": "2026-12-01T10:00:05Z",
    },
    "allocations": [
        {
            "deploymentName": "api",
            "podsWorstCase": 5,
            "workers": 20,
            "poolSize": 4,
            "maxOverflow": 5,
            "peakConnections": 180,
            "configMapName": "api-db-pool",
            "configHash": "0" * 64,
            "state": "Applied",
            "message": "settings applied",
            "restartedTime": "2026-12-01T09:58:00Z",
            "liveConnections": {
                "applicationName": "api",
                "active": 3,
                "idle": 40,
                "idleInTransaction": 1,
                "unknown": 0,
                "total": 44,
            },
        },
        {
            "deploymentName": "web",
            "state": "Conflict",
            "message": "PoolBudget other manages it",
            "configMapName": "web-db-pool",
        },
    ],
    "peakConnections": 180,
    "usableConnections": 187,
    "headroom": 7,
    "verdict": "Feasible",
}


def test_a_status_as_the_reconciler_writes_it_round_trips() -> None:
    status = PoolBudgetStatus.model_validate(WRITTEN)
    assert status.to_body() == WRITTEN
    assert status.database is not None
    assert status.database.server_version == "16.4"
    api = status.allocation("api")
    assert api is not None
    assert api.state is AllocationState.APPLIED
    assert api.live_connections is not None
    assert api.live_connections.total == 44
    ready = status.condition("Ready")
    assert ready is not None
    assert ready.status is ConditionStatus.TRUE
    assert status.condition("Nope") is None
    assert status.allocation("nope") is None
    assert status.verdict is PlanVerdict.FEASIBLE


def test_built_in_python_it_is_the_same_status() -> None:
    """How a reconciler builds it, typed: the same JSON as the dict above."""
    conditions = tuple(
        Condition(
            type=c["type"],
            status=ConditionStatus(c["status"]),
            reason=c["reason"],
            message=c["message"],
            observed_generation=3,
            last_transition_time=c["lastTransitionTime"],
        )
        for c in WRITTEN["conditions"]
    )
    status = PoolBudgetStatus(
        observed_generation=3,
        conditions=conditions,
        database=DatabaseStatus(
            max_connections=200,
            superuser_reserved_connections=3,
            reserved_connections=0,
            usable_connections=187,
            connections_in_use=57,
            server_version="16.4",
            observed_time="2026-12-01T10:00:05Z",
        ),
        activity=ActivityStatus(
            connections_in_use=57,
            unbudgeted_connections=2,
            unbudgeted_clients=(UnbudgetedClient(application_name="psql", connections=2),),
            operator_connections=1,
            lock_waits=0,
            stale_transactions=0,
            visibility=Visibility.FULL,
            observed_time="2026-12-01T10:00:05Z",
        ),
        allocations=(
            Allocation(
                deployment_name="api",
                pods_worst_case=5,
                workers=20,
                pool_size=4,
                max_overflow=5,
                peak_connections=180,
                config_map_name="api-db-pool",
                config_hash="0" * 64,
                state=AllocationState.APPLIED,
                message="settings applied",
                restarted_time="2026-12-01T09:58:00Z",
                live_connections=LiveConnections(
                    application_name="api",
                    active=3,
                    idle=40,
                    idle_in_transaction=1,
                    unknown=0,
                    total=44,
                ),
            ),
            Allocation(
                deployment_name="web",
                state=AllocationState.CONFLICT,
                message="PoolBudget other manages it",
                config_map_name="web-db-pool",
            ),
        ),
        peak_connections=180,
        usable_connections=187,
        headroom=7,
        verdict=PlanVerdict.FEASIBLE,
    )
    assert status.to_body() == WRITTEN


def test_the_enums_say_what_the_domain_says() -> None:
    assert {s.value for s in AllocationState} == {p.value for p in TargetPhase} | {"Conflict"}
    assert [v.value for v in PlanVerdict] == [v.value for v in Verdict]
    statuses = {Observation(type=ConditionType.READY, status=s, reason="R", message="").condition_status
                for s in (True, False, None)}  # fmt: skip
    assert statuses == set(ConditionStatus)
    for kind in ConditionType:  # every condition type the operator writes is valid
        Condition(type=kind.value, status=ConditionStatus.TRUE, reason="R", message="",
                  last_transition_time="2026-12-01T10:00:00Z")  # fmt: skip


# --------------------------------------------------------------------------- lenient read


def test_unknown_fields_are_ignored_at_every_level() -> None:
    newer = {
        **WRITTEN,
        "someday": {"a": 1},
        "database": {**WRITTEN["database"], "walLevel": "logical"},
        "allocations": [{**WRITTEN["allocations"][0], "cpu": "2"}, WRITTEN["allocations"][1]],
        "conditions": [{**c, "severity": "Info"} for c in WRITTEN["conditions"]],
    }
    assert PoolBudgetStatus.model_validate(newer).to_body() == WRITTEN


def test_a_bad_entry_is_dropped_and_the_rest_kept() -> None:
    api, web = WRITTEN["allocations"]
    ready, *others = WRITTEN["conditions"]
    status = PoolBudgetStatus.model_validate(
        {
            **WRITTEN,
            "allocations": [
                {**api, "state": "Retired"},  # a state an older version wrote
                web,
                {"state": "Applied"},  # no key
                "not an object",
            ],
            "conditions": [{**ready, "status": "Maybe"}, *others],
        }
    )
    assert [a.deployment_name for a in status.allocations or ()] == ["web"]
    assert [c.type for c in status.conditions or ()] == [c["type"] for c in others]
    assert status.headroom == 7  # the rest is intact


def test_a_top_level_field_that_does_not_validate_is_read_as_absent() -> None:
    status = PoolBudgetStatus.model_validate(
        {**WRITTEN, "verdict": "Fits", "database": {"maxConnections": "many"}, "headroom": []}
    )
    assert (status.verdict, status.database, status.headroom) == (None, None, None)
    assert status.peak_connections == 180


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)
STATUS_KEYS = st.sampled_from([*sorted(WRITTEN), "unknownField"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(STATUS_KEYS, JSON | st.sampled_from(list(WRITTEN.values()))))
def test_reading_a_mapping_never_raises(body: dict[str, Any]) -> None:
    PoolBudgetStatus.model_validate(body).to_body()


def test_what_is_not_a_mapping_is_still_an_error() -> None:
    with pytest.raises(ValueError, match="PoolBudgetStatus"):
        PoolBudgetStatus.model_validate(["not", "a", "status"])


# --------------------------------------------------------------------------- the merge patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, section 2, as written there."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = apply_merge_patch(result.get(name), value)
    return result


def test_vanished_fields_are_cleared_by_the_patch_and_were_not_before() -> None:
    after = {
        **{k: v for k, v in WRITTEN.items() if k != "activity"},
        "database": {
            k: v
            for k, v in WRITTEN["database"].items()
            if k not in ("serverVersion", "connectionsInUse")
        },
        "allocations": [
            {k: v for k, v in WRITTEN["allocations"][0].items() if k != "liveConnections"}
        ],
    }
    status = PoolBudgetStatus.model_validate(after)
    assert apply_merge_patch(WRITTEN, status.merge_patch()) == after
    # What the operator sent until issue 13: the same status, vanished fields left out.
    stale = apply_merge_patch(WRITTEN, status.to_body())
    assert stale["database"]["serverVersion"] == "16.4"
    assert "activity" in stale


def _schema_values(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """JSON values the structural schema allows (the subset the status schema uses)."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema["type"]
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: _schema_values(v) for k, v in properties.items() if k in required},
            optional={k: _schema_values(v) for k, v in properties.items() if k not in required},
        )
    if kind == "array":
        items = _schema_values(schema["items"])
        return st.lists(items, max_size=min(schema.get("maxItems", 3), 3))
    if kind == "integer":
        return st.integers(min_value=schema.get("minimum", -(10**6)), max_value=10**6)
    assert kind == "string", schema
    if schema.get("format") == "date-time":
        moments = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2040, 1, 1))
        return moments.map(lambda m: m.replace(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    low, high = schema.get("minLength", 0), min(schema.get("maxLength", 30), 30)
    if "pattern" in schema:
        matching = st.from_regex(schema["pattern"], fullmatch=True)
        return matching.filter(lambda s: low <= len(s) <= high)
    return st.text(min_size=low, max_size=high)


STATUS_SCHEMA = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"][
    "openAPIV3Schema"
]["properties"]["status"]
STATUSES = _schema_values(STATUS_SCHEMA)
PROPERTIES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTIES
@given(STATUSES)
def test_every_status_the_crd_allows_reads_back_whole(body: dict[str, Any]) -> None:
    assert PoolBudgetStatus.model_validate(body).to_body() == body


@PROPERTIES
@given(before=STATUSES, after=STATUSES)
def test_the_patch_turns_any_status_into_the_new_one(
    before: dict[str, Any], after: dict[str, Any]
) -> None:
    patch = PoolBudgetStatus.model_validate(after).merge_patch()
    assert apply_merge_patch(before, patch) == after
