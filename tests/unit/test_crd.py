"""The CRD in crds/ and the pydantic models in poolbudget.api.v1alpha1 say the same thing.

The CRD is generated from the models (`make crds`), so the first tests only check the
committed files are current. The rest do not trust the generator: they walk
`PoolBudgetSpec.model_fields` themselves and compare every field, type, default, bound,
pattern and enum with the committed YAML in both directions (the spec's models and the
status's, api/status.py), replay the API server's defaulting on the YAML and compare it with
pydantic's defaults, and check that what the reconciler writes into status reads back
into the status model unchanged (the API server would silently prune a field it does not
know, or reject the whole status patch).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import inspect
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from poolbudget.adapters.postgres import DatabaseAuthError
from poolbudget.api.crd import render
from poolbudget.api.status import PoolBudgetStatus
from poolbudget.api.v1alpha1 import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    PoolBudgetSpec,
    Target,
    describe_validation_error,
)
from poolbudget.domain.activity import SessionState
from poolbudget.domain.conditions import ConditionType
from poolbudget.domain.rendering import application_name, render_env
from poolbudget.domain.rollout import TargetPhase
from poolbudget.domain.sizing import Allocation, Verdict
from tests.unit.test_reconcile import DSN, FakeConfigMap, FakeProber, World, activity

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "poolbudget.dev_poolbudgets.yaml"
CHART_COPY = REPO / "charts" / "poolbudget-operator" / "crds" / CRD_FILE.name

Schema = dict[str, Any]


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    versions: list[dict[str, Any]] = crd["spec"]["versions"]
    assert len(versions) == 1
    return versions[0]


@pytest.fixture(scope="module")
def root(version: dict[str, Any]) -> Schema:
    schema: Schema = version["schema"]["openAPIV3Schema"]
    return schema


@pytest.fixture(scope="module")
def spec_schema(root: Schema) -> Schema:
    schema: Schema = root["properties"]["spec"]
    return schema


@pytest.fixture(scope="module")
def status_schema(root: Schema) -> Schema:
    schema: Schema = root["properties"]["status"]
    return schema


# --------------------------------------------------------------------------- generated files


def test_committed_crd_is_what_the_generator_makes() -> None:
    assert CRD_FILE.read_text() == render(), "run `make crds` and commit crds/"


def test_the_charts_copy_is_byte_identical() -> None:
    assert CHART_COPY.read_bytes() == CRD_FILE.read_bytes(), "run `make crds`"


# --------------------------------------------------------------------------- spec vs models

# Schema keywords that constrain a value; each must come from the model, and vice versa.
CONSTRAINT_KEYWORDS = {
    "type",
    "enum",
    "default",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "format",
}


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        assert len(members) == 1, f"unsupported union {annotation!r}"
        return members[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _expected(field: FieldInfo) -> tuple[Schema, Any]:
    """The constraint keywords the CRD must carry for this field, and the nested model or
    item annotation to recurse into (None for scalars)."""
    annotation = _unwrap_optional(field.annotation)
    if typing.get_origin(annotation) is typing.Annotated:  # validators only
        annotation = typing.get_args(annotation)[0]
    nested: Any = None
    expected: Schema = {}
    is_array = typing.get_origin(annotation) in (tuple, list)
    if is_array:
        expected["type"] = "array"
        nested = typing.get_args(annotation)[0]
    elif _is_model(annotation):
        expected["type"] = "object"
        nested = annotation
    elif inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        expected["type"] = "string"
        expected["enum"] = [member.value for member in annotation]
    else:
        expected["type"] = {bool: "boolean", int: "integer", float: "number", str: "string"}[
            annotation
        ]
    for meta in field.metadata:
        for attribute, keyword in (("ge", "minimum"), ("le", "maximum")):
            if getattr(meta, attribute, None) is not None:
                expected[keyword] = getattr(meta, attribute)
        if getattr(meta, "gt", None) is not None:
            expected["minimum"] = meta.gt
            expected["exclusiveMinimum"] = True
        if getattr(meta, "lt", None) is not None:
            expected["maximum"] = meta.lt
            expected["exclusiveMaximum"] = True
        if getattr(meta, "min_length", None) is not None:
            expected["minItems" if is_array else "minLength"] = meta.min_length
        if getattr(meta, "max_length", None) is not None:
            expected["maxItems" if is_array else "maxLength"] = meta.max_length
        if getattr(meta, "pattern", None) is not None:
            expected["pattern"] = meta.pattern
    if isinstance(field.json_schema_extra, dict):  # format: date-time, int64
        extra = field.json_schema_extra
        expected.update({k: v for k, v in extra.items() if k in CONSTRAINT_KEYWORDS})
    default = field.default
    if default is not PydanticUndefined and default is not None:
        if isinstance(default, BaseModel):
            expected["default"] = {}  # the API server fills in the nested defaults
        elif isinstance(default, enum.Enum):
            expected["default"] = default.value
        else:
            expected["default"] = default
    return expected, nested


def _compare(model: type[BaseModel], schema: Schema, path: str) -> Iterator[str]:
    """Every difference between a pydantic model and its CRD schema, as readable lines."""
    fields = {(field.alias or name): field for name, field in model.model_fields.items()}
    properties: dict[str, Schema] = schema.get("properties", {})
    for missing in sorted(fields.keys() - properties.keys()):
        yield f"{path}.{missing}: in the model, not in the CRD"
    for extra in sorted(properties.keys() - fields.keys()):
        yield f"{path}.{extra}: in the CRD, not in the model"
    required = sorted(alias for alias, field in fields.items() if field.is_required())
    if sorted(schema.get("required", [])) != required:
        yield f"{path}: required {schema.get('required')} in the CRD, {required} in the model"
    for alias in sorted(fields.keys() & properties.keys()):
        field, prop, where = fields[alias], properties[alias], f"{path}.{alias}"
        expected, nested = _expected(field)
        actual = {k: v for k, v in prop.items() if k in CONSTRAINT_KEYWORDS}
        if actual != expected:
            yield f"{where}: CRD {actual} != model {expected}"
        if field.description and not prop.get("description", "").startswith(field.description):
            yield f"{where}: description does not start with the model's"
        if nested is None:
            continue
        if expected["type"] == "array":
            items: Schema = prop.get("items", {})
            if _is_model(nested):
                yield from _compare(nested, items, f"{where}[]")
            continue
        yield from _compare(nested, prop, where)


def test_spec_schema_and_models_agree_field_by_field(spec_schema: Schema) -> None:
    assert list(_compare(PoolBudgetSpec, spec_schema, "spec")) == []


def test_the_comparison_notices_drift(spec_schema: Schema) -> None:
    """The walk above would fail on a renamed field, a changed bound or a lost default."""
    drifted = copy.deepcopy(spec_schema)
    target = drifted["properties"]["targets"]["items"]["properties"]
    target["workers"] = target.pop("processesPerPod")
    drifted["properties"]["reservedConnections"]["minimum"] = 1
    del drifted["properties"]["rollout"]["properties"]["maxConcurrent"]["default"]
    problems = "\n".join(_compare(PoolBudgetSpec, drifted, "spec"))
    assert "spec.targets[].processesPerPod: in the model, not in the CRD" in problems
    assert "spec.targets[].workers: in the CRD, not in the model" in problems
    assert "spec.reservedConnections: CRD" in problems
    assert "spec.rollout.maxConcurrent: CRD" in problems


def _apply_defaults(schema: Schema, value: Any) -> Any:
    """Structural defaulting as the API server does it: a missing property with a default
    gets a copy of it, then defaults apply inside that copy too."""
    if isinstance(value, dict) and "properties" in schema:
        result = dict(value)
        for name, prop in schema["properties"].items():
            if name not in result and "default" in prop:
                result[name] = copy.deepcopy(prop["default"])
            if name in result:
                result[name] = _apply_defaults(prop, result[name])
        return result
    if isinstance(value, list) and "items" in schema:
        return [_apply_defaults(schema["items"], item) for item in value]
    return value


@pytest.mark.parametrize(
    "spec",
    [
        {"database": {"maxConnectionsOverride": 100}, "targets": [{"deploymentName": "api"}]},
        {"database": {"connectionSecretRef": {"name": "db"}}, "targets": [{"deploymentName": "api", "maxPoolSize": 9}, {"deploymentName": "web", "processesPerPod": 4}]},
        {"database": {"maxConnectionsOverride": 50}, "defaults": {"maxOverflow": 0}, "rollout": {"strategy": "None"}, "targets": [{"deploymentName": "api"}]},
    ],
)  # fmt: skip
def test_api_server_defaulting_gives_what_pydantic_defaults_give(
    spec_schema: Schema, spec: dict[str, Any]
) -> None:
    by_pydantic = PoolBudgetSpec.model_validate(spec).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    assert _apply_defaults(spec_schema, spec) == by_pydantic


# --------------------------------------------------------------------------- invalid specs

# A valid spec, and changes to it that must be refused. tests/cluster/test_crd_api.py checks
# the API server refuses each with its messages; here, that the pydantic models (what
# `poolbudget plan` and the operator validate with) refuse the same specs with a one-line
# error that names the field.
VALID: dict[str, Any] = {
    "database": {"maxConnectionsOverride": 200},
    "targets": [{"deploymentName": "api", "processesPerPod": 4}],
}


def targets(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"targets": list(entries)}


def secret_key(key: str, name: str = "shop-db") -> dict[str, Any]:
    return {"database": {"connectionSecretRef": {"name": name, "key": key}}}


def watch(**fields: Any) -> dict[str, Any]:
    return {"database": {**VALID["database"], "watch": fields}}


LONG_NAME_RULE = "makes the default ConfigMap name <deploymentName>-db-pool longer than 253: set configMapName"  # fmt: skip

# (case, spec overrides on top of VALID, what the API server's message must contain,
#  what `poolbudget plan`'s one-line error must contain)
INVALID_SPECS = [
    ("min-above-max", targets({"deploymentName": "api", "minPoolSize": 5, "maxPoolSize": 2}),
     ["spec.targets[0].maxPoolSize: Invalid value", "maxPoolSize must be >= minPoolSize"],
     "targets[0]: maxPoolSize (2) must be >= minPoolSize (5)"),
    ("duplicate-deployment", targets({"deploymentName": "api"}, {"deploymentName": "api"}),
     ['spec.targets[1]: Duplicate value: {"deploymentName":"api"}'],
     "targets: deploymentName 'api' appears more than once"),
    ("duplicate-configmap", targets({"deploymentName": "api"}, {"deploymentName": "web", "configMapName": "api-db-pool"}),
     ["spec.targets: Invalid value", "each target needs its own configMapName"],
     "targets: configMapName 'api-db-pool' appears more than once"),
    ("duplicate-explicit-configmap", targets({"deploymentName": "a", "configMapName": "x"}, {"deploymentName": "b", "configMapName": "x"}),
     ["spec.targets: Invalid value", "each target needs its own configMapName"],
     "targets: configMapName 'x' appears more than once"),
    ("negative-reserved", {"reservedConnections": -1},
     ["spec.reservedConnections: Invalid value: -1", "should be greater than or equal to 0"],
     "reservedConnections: Input should be greater than or equal to 0"),
    ("unknown-pooling", {"pooling": "PgBouncerSession"},
     ['spec.pooling: Unsupported value: "PgBouncerSession": supported values: "Direct", "PgBouncerTransaction"'],
     "pooling: Input should be 'Direct' or 'PgBouncerTransaction'"),
    ("no-database-source", {"database": {"refreshSeconds": 30}},
     ["spec.database: Invalid value", "set connectionSecretRef or maxConnectionsOverride"],
     "database: set connectionSecretRef or maxConnectionsOverride"),
    ("unknown-field", targets({"deploymentName": "api", "wieght": 2}),
     ['strict decoding error: unknown field "spec.targets[0].wieght"'],
     "targets[0].wieght: unknown field"),
    ("bad-deployment-name", targets({"deploymentName": "API_v2"}),
     ["spec.targets[0].deploymentName: Invalid value: \"API_v2\"", "should match"],
     "targets[0].deploymentName: String should match pattern"),
    ("zero-pool-timeout", {"defaults": {"poolTimeoutSeconds": 0}},
     ["spec.defaults.poolTimeoutSeconds", "must be at least 0.001 (seconds, millisecond resolution)"],
     "defaults.poolTimeoutSeconds: Input should be greater than or equal to 0.001"),
    # Admitted once, rendered as "1e-09", refused by the client: every reconcile failed.
    ("tiny-command-timeout", {"defaults": {"commandTimeoutSeconds": 1e-9}},
     ["spec.defaults.commandTimeoutSeconds", "should be greater than or equal to 0.001"],
     "defaults.commandTimeoutSeconds: Input should be greater than or equal to 0.001"),
    ("no-targets", {"targets": []},
     ["spec.targets: Invalid value", "should have at least 1 items"],
     "targets: Tuple should have at least 1 item"),
    ("too-many-targets", targets(*({"deploymentName": f"d{i}"} for i in range(101))),
     ["spec.targets: Too many: 101: must have at most 100 items"],
     "targets: Tuple should have at most 100 items"),
    # 0 is SQLAlchemy's "recycle on every checkout": no pooling at all.
    ("zero-pool-recycle", {"defaults": {"poolRecycleSeconds": 0}},
     ["spec.defaults.poolRecycleSeconds: Invalid value", "poolRecycleSeconds must be -1 (never) or at least 1"],
     "defaults.poolRecycleSeconds: poolRecycleSeconds must be -1 (never) or at least 1"),
    ("pool-recycle-below-never", {"defaults": {"poolRecycleSeconds": -2}},
     ["spec.defaults.poolRecycleSeconds: Invalid value: -2", "should be greater than or equal to -1"],
     "defaults.poolRecycleSeconds: Input should be greater than or equal to -1"),
    ("default-configmap-name-too-long", targets({"deploymentName": "a" * 246}),
     ["spec.targets[0].deploymentName: Invalid value", LONG_NAME_RULE],
     "targets[0]: deploymentName longer than 245 characters " + LONG_NAME_RULE),
    ("bad-secret-key", secret_key("dsn/url"),
     ['spec.database.connectionSecretRef.key: Invalid value: "dsn/url"', "should match '^[-._a-zA-Z0-9]+$'"],
     "database.connectionSecretRef.key: String should match pattern '^[-._a-zA-Z0-9]+$'"),
    ("secret-key-too-long", secret_key("k" * 254),
     ["spec.database.connectionSecretRef.key: Too long: may not be more than 253"],
     "database.connectionSecretRef.key: String should have at most 253 characters"),
    ("bad-secret-name", secret_key("dsn", name="Shop_DB"),
     ['spec.database.connectionSecretRef.name: Invalid value: "Shop_DB"', "should match"],
     "database.connectionSecretRef.name: String should match pattern"),
    ("non-ascii-application-name", targets({"deploymentName": "api", "applicationName": "caf\u00e9"}),
     ["spec.targets[0].applicationName: Invalid value", "should match '^[ -~]*$'"],
     "targets[0].applicationName: String should match pattern '^[ -~]*$'"),
    ("application-name-too-long", targets({"deploymentName": "api", "applicationName": "a" * 64}),
     ["spec.targets[0].applicationName: Too long: may not be more than 63"],
     "targets[0].applicationName: String should have at most 63 characters"),
    # An integer 0 passes `minimum: 0.1` in the API server (compared truncated): CEL refuses it.
    ("zero-capacity-ratio", watch(capacityWarningRatio=0),
     ["spec.database.watch.capacityWarningRatio", "capacityWarningRatio must be between 0.1 and 1"],
     "database.watch.capacityWarningRatio: Input should be greater than or equal to 0.1"),
    ("capacity-ratio-above-one", watch(capacityWarningRatio=1.5),
     ["spec.database.watch.capacityWarningRatio", "should be less than or equal to 1"],
     "database.watch.capacityWarningRatio: Input should be less than or equal to 1"),
    ("zero-lock-waits", watch(lockWaitsWarning=0),
     ["spec.database.watch.lockWaitsWarning: Invalid value: 0", "should be greater than or equal to 1"],
     "database.watch.lockWaitsWarning: Input should be greater than or equal to 1"),
    ("zero-stale-seconds", watch(idleInTransactionWarningSeconds=0),
     ["spec.database.watch.idleInTransactionWarningSeconds: Invalid value: 0", "should be greater than or equal to 1"],
     "database.watch.idleInTransactionWarningSeconds: Input should be greater than or equal to 1"),
]  # fmt: skip

# Specs at the edge of each rule above that both the models and the API server accept.
EDGE_SPECS = [
    ("pool-recycle-never", {"defaults": {"poolRecycleSeconds": -1}}),
    ("pool-recycle-one-second", {"defaults": {"poolRecycleSeconds": 1}}),
    ("longest-deployment-name-with-default-configmap", targets({"deploymentName": "a" * 245})),
    ("longest-deployment-name-with-configmap-name", targets({"deploymentName": "a" * 253, "configMapName": "api-db-pool"})),
    ("secret-key-with-dots-dashes-underscores", secret_key("tls.DSN_primary-1")),
    ("capacity-ratio-one", watch(capacityWarningRatio=1)),
    ("capacity-ratio-lowest", watch(capacityWarningRatio=0.1)),
    ("watch-off", watch(enabled=False)),
    ("printable-ascii-application-name", targets({"deploymentName": "api", "applicationName": " shop api: v2 ~" + "x" * 48})),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), [pytest.param(c, m, id=case) for case, c, _, m in INVALID_SPECS])  # fmt: skip
def test_the_models_refuse_what_the_api_server_refuses(
    change: dict[str, Any], message: str
) -> None:
    PoolBudgetSpec.model_validate(VALID)
    with pytest.raises(ValidationError) as caught:
        PoolBudgetSpec.model_validate({**VALID, **change})
    described = describe_validation_error(caught.value)
    assert described.startswith(message), described
    assert "\n" not in described


@pytest.mark.parametrize("change", [pytest.param(c, id=case) for case, c in EDGE_SPECS])
def test_the_models_accept_the_edges_of_the_rules(change: dict[str, Any]) -> None:
    PoolBudgetSpec.model_validate({**VALID, **change})


# --------------------------------------------------------------------------- application_name


def test_default_application_name_is_the_deployment_name_cut_to_63() -> None:
    """PostgreSQL keeps 63 bytes of application_name: the ConfigMap says what it will show."""
    long = "a" * 60 + "-web-frontend"
    assert application_name(Target(deployment_name="api")) == "api"
    assert application_name(Target(deployment_name=long)) == long[:63]
    assert len(application_name(Target(deployment_name="d" * 245))) == 63
    explicit = Target(deployment_name=long, application_name="shop api")
    assert application_name(explicit) == "shop api"


def test_the_configmap_carries_the_cut_application_name() -> None:
    spec = PoolBudgetSpec.model_validate({**VALID, **targets({"deploymentName": "a" * 100})})
    allocation = Allocation(
        name="a" * 100, pods=1, workers=4, weight=1, pool_size=42, max_overflow=5,
        requested_max_overflow=5, at_max_pool_size=False,
    )  # fmt: skip
    env = render_env(spec, spec.targets[0], allocation)
    assert env["DB_APPLICATION_NAME"] == "a" * 63


# --------------------------------------------------------------------------- documentation


def _walk(schema: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    yield path, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_every_field_is_described(root: Schema) -> None:
    # metadata is the one exception: the API server forbids anything but its type there.
    undescribed = [path for path, s in _walk(root, "PoolBudget") if not s.get("description")]
    assert undescribed == ["PoolBudget.metadata"]


def test_descriptions_tell_the_default_and_the_bounds(spec_schema: Schema) -> None:
    """`kubectl explain` prints the description and the enum, not the default or bounds."""
    problems = []
    for path, s in _walk(spec_schema, "spec"):
        text = s.get("description", "")
        if "default" in s and s["default"] != {}:
            literal = str(s["default"]).lower() if isinstance(s["default"], bool) else s["default"]
            if f"Default: {literal}." not in text:
                problems.append(f"{path}: default not in description")
        if ("minimum" in s or "maximum" in s) and "Range: " not in text:
            problems.append(f"{path}: bounds not in description")
        if "maxLength" in s and " characters." not in text:
            problems.append(f"{path}: length not in description")
    assert problems == []


# --------------------------------------------------------------------------- CEL rules


def _rules(schema: Schema) -> list[str]:
    return [rule["rule"] for rule in schema.get("x-kubernetes-validations", [])]


def test_the_rules_a_schema_alone_cannot_state(root: Schema, spec_schema: Schema) -> None:
    props = spec_schema["properties"]
    assert _rules(props["database"]) == [
        "has(self.connectionSecretRef) || has(self.maxConnectionsOverride)"
    ]
    assert _rules(props["targets"]["items"]) == [
        "!has(self.maxPoolSize) || self.minPoolSize <= self.maxPoolSize",
        # 245 + len("-db-pool") = 253, the longest object name.
        "has(self.configMapName) || size(self.deploymentName) <= 245",
    ]
    # ge=-1 lets 0 through; SQLAlchemy reads it as "recycle on every checkout".
    assert _rules(props["defaults"]["properties"]["poolRecycleSeconds"]) == [
        "self == -1 || self >= 1"
    ]
    # deploymentName unique: the list is a map keyed by it, so the API server itself says
    # "Duplicate value" at the repeated index (and server-side apply merges per target).
    assert props["targets"]["x-kubernetes-list-type"] == "map"
    assert props["targets"]["x-kubernetes-list-map-keys"] == ["deploymentName"]
    assert props["targets"]["items"]["required"] == ["deploymentName"]
    # configMapName unique after the <deploymentName>-db-pool default is applied.
    (configmaps_unique,) = _rules(props["targets"])
    assert "exists_one" in configmaps_unique
    assert "'-db-pool'" in configmaps_unique
    assert _rules(root) == ["size(self.metadata.name) <= 63"]


def test_cel_cost_stays_bounded(spec_schema: Schema) -> None:
    """The API server estimates a rule's cost from the largest list and string it may see:
    every list and free string in spec is bounded, or the CRD would be refused."""
    unbounded = [
        path
        for path, s in _walk(spec_schema, "spec")
        if (s.get("type") == "array" and "maxItems" not in s)
        or (s.get("type") == "string" and "maxLength" not in s and "enum" not in s)
    ]
    assert unbounded == []


# --------------------------------------------------------------------------- status


def test_status_schema_and_models_agree_field_by_field(status_schema: Schema) -> None:
    assert list(_compare(PoolBudgetStatus, status_schema, "status")) == []


def test_status_enums_match_what_the_operator_writes(status_schema: Schema) -> None:
    props = status_schema["properties"]
    allocation = props["allocations"]["items"]["properties"]
    assert set(allocation["state"]["enum"]) == {p.value for p in TargetPhase} | {"Conflict"}
    assert props["verdict"]["enum"] == [v.value for v in Verdict]
    condition_types = props["conditions"]["items"]["properties"]["type"]["description"]
    for kind in ConditionType:
        assert kind.value in condition_types


def test_conditions_are_standard_metav1_conditions(status_schema: Schema) -> None:
    conditions = status_schema["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert sorted(item["required"]) == sorted(
        ["type", "status", "reason", "message", "lastTransitionTime"]
    )
    assert set(item["properties"]) == {
        "type", "status", "reason", "message", "observedGeneration", "lastTransitionTime"
    }  # fmt: skip
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    allocations = status_schema["properties"]["allocations"]
    assert allocations["x-kubernetes-list-map-keys"] == ["deploymentName"]
    assert "x-kubernetes-preserve-unknown-fields" not in status_schema


async def _feasible_and_rolled_out(world: World) -> None:
    await world.reconcile()
    await world.reconcile()


async def _watch_signals_raised(world: World) -> None:
    world.probers.append(FakeProber(DSN))
    world.probers[-1].activity_result = activity(
        ("api", SessionState.UNKNOWN, 150),
        ("api", SessionState.IDLE_IN_TRANSACTION, 40),
        *((f"client-{i}", SessionState.IDLE, 1 + i) for i in range(8)),
        ("", SessionState.ACTIVE, 1),
        stale=3,
    )
    await world.reconcile()
    await world.reconcile()
    # The one reading came while api was restarting onto its first settings, so api is not
    # judged over its allocation (test_reconcile.py has that once Applied): near capacity.
    assert world.condition("DatabaseHealthy").reason == "NearCapacity"


async def _database_auth_failure(world: World) -> None:
    world.probers.append(FakeProber(DSN, result=DatabaseAuthError("authentication failed")))
    await world.reconcile()


async def _missing_secret(world: World) -> None:
    world.kube.secrets.clear()
    await world.reconcile()


async def _infeasible(world: World) -> None:
    await world.reconcile()
    api = world.deployments[("shop", "api")]
    world.deployments[("shop", "api")] = dataclasses.replace(api, replicas=100)
    await world.reconcile()


async def _overflow_reduced_and_missing_deployment(world: World) -> None:
    world.spec["reservedConnections"] = 150
    world.spec["targets"] = [*world.spec["targets"], {"deploymentName": "gone"}]
    await world.reconcile()


async def _configmap_owned_by_someone_else(world: World) -> None:
    world.kube.configmaps["api-db-pool"] = FakeConfigMap({"mine": "yes"}, {"team": "payments"})
    await world.reconcile()


# scenario -> (what it does, the Ready reason it must end with, the allocation states)
SCENARIOS = {
    "feasible": (_feasible_and_rolled_out, "BudgetApplied", ["Applied"]),
    "watch-signals": (_watch_signals_raised, "BudgetApplied", ["Applied"]),
    "database-auth-failure": (_database_auth_failure, "AuthenticationFailed", ["Pending"]),
    "missing-secret": (_missing_secret, "SecretNotFound", ["Pending"]),
    "infeasible": (_infeasible, "BudgetInfeasible", ["Applied"]),
    "overflow-reduced": (
        _overflow_reduced_and_missing_deployment,
        "RolloutInProgress",
        ["Rolling", "Missing"],
    ),
    "conflict": (_configmap_owned_by_someone_else, "TargetConflict", ["Conflict"]),
}


@dataclasses.dataclass
class RecordingWorld(World):
    """Keeps every status the reconciler decided to write, as the model it built."""

    decided: list[PoolBudgetStatus] = dataclasses.field(default_factory=list)

    async def reconcile(self) -> None:
        before = len(self.kube.statuses)
        await super().reconcile()
        if len(self.kube.statuses) > before:
            self.decided.append(self.status)  # the model this round built


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_what_the_reconciler_writes_is_a_status_the_model_keeps_whole(
    scenario: str,
) -> None:
    """The status the API server gets is the model's (PoolBudgetStatus, whose schema is
    the CRD's, checked field by field above): each model the reconciler builds is what
    the server gets, and reading that JSON back (the lenient read of a restarted operator)
    gives the same model. A value the read cannot take back (an entry it would drop)
    would differ."""
    act, ready_reason, states = SCENARIOS[scenario]
    # No status hold: every round's status is written, so every state the reconciler can
    # write (Rolling included) is checked.
    world = RecordingWorld(status_hold=False)
    await act(world)
    assert world.condition("Ready").reason == ready_reason
    assert [a.state for a in world.status.allocations or ()] == states
    assert world.kube.statuses, "the scenario wrote no status"
    assert world.kube.statuses == [status.to_body() for status in world.decided]
    assert [PoolBudgetStatus.model_validate(body) for body in world.kube.statuses] == world.decided


def test_the_round_trip_notices_what_the_model_would_lose() -> None:
    written = {"headroom": 3, "allocations": [{"deploymentName": "api", "state": "Applied"}]}
    assert PoolBudgetStatus.model_validate(written).to_body() == written
    for lossy in (
        {**written, "headrom": 3},
        {**written, "allocations": [{"deploymentName": "api", "state": "Applid"}]},
        {**written, "verdict": "Fits"},
        {**written, "database": {"connectionsInUse": None}},
    ):
        assert PoolBudgetStatus.model_validate(lossy).to_body() != lossy


# --------------------------------------------------------------------------- names, columns


def test_names_scope_and_status_subresource(crd: dict[str, Any], version: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert crd["spec"]["group"] == GROUP
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"] == {
        "kind": KIND,
        "listKind": f"{KIND}List",
        "plural": PLURAL,
        "singular": "poolbudget",
        "shortNames": ["pbud"],
        "categories": ["poolbudget"],  # not `all`: `kubectl get all` stays about workloads
    }
    assert (version["name"], version["served"], version["storage"]) == (VERSION, True, True)
    assert version["subresources"] == {"status": {}}


def _schema_at(root: Schema, json_path: str) -> Schema:
    """The schema a printer column's simple JSONPath points at (filters ride on arrays)."""
    schema = root
    for part in re.sub(r"\[\?\(.*?\)\]", "[]", json_path).lstrip(".").split("."):
        name = part.split("[", 1)[0]
        schema = schema["properties"][name]
        if "[" in part:
            schema = schema["items"]
    return schema


def test_printer_columns(root: Schema, version: dict[str, Any]) -> None:
    columns = version["additionalPrinterColumns"]
    default = [(c["name"], c["jsonPath"]) for c in columns if not c.get("priority")]
    wide = [(c["name"], c["jsonPath"]) for c in columns if c.get("priority") == 1]
    assert default == [
        ("Max", ".status.database.maxConnections"),
        ("Usable", ".status.usableConnections"),
        ("Peak", ".status.peakConnections"),
        ("Headroom", ".status.headroom"),
        ("Live", ".status.activity.connectionsInUse"),
        ("Ready", '.status.conditions[?(@.type=="Ready")].status'),
        ("Age", ".metadata.creationTimestamp"),
    ]
    assert wide == [
        ("Feasible", '.status.conditions[?(@.type=="BudgetFeasible")].status'),
        ("Reason", '.status.conditions[?(@.type=="Ready")].reason'),
        ("Share", ".spec.shareBy"),
        ("DB Version", ".status.database.serverVersion"),
    ]
    for column in columns:
        if column["jsonPath"].startswith((".status", ".spec")):
            # The column points at a field that exists, with the column's type.
            assert _schema_at(root, column["jsonPath"])["type"] == column["type"], column
