"""Manifests into facts (domain/manifests.py): what is read, what is an error and how it
is named, and the invariants a CI gate relies on (property-based)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from poolbudget.domain.facts import DeploymentFacts
from poolbudget.domain.manifests import ManifestError, Manifests, parse_manifests

BUDGET: dict[str, Any] = {
    "apiVersion": "poolbudget.dev/v1alpha1",
    "kind": "PoolBudget",
    "metadata": {"name": "shop-db", "namespace": "shop"},
    "spec": {
        "database": {"maxConnectionsOverride": 200},
        "targets": [{"deploymentName": "api", "processesPerPod": 2}],
    },
}


def deployment(name: str, namespace: str | None = "shop", **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": spec}


def hpa(name: str, target: str, max_replicas: Any, *, version: str = "v2") -> dict[str, Any]:
    return {
        "apiVersion": f"autoscaling/{version}",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "maxReplicas": max_replicas,
        },
    }


def stream(*documents: Any) -> str:
    return yaml.safe_dump_all(documents)


def parse(*documents: Any, source: str = "in.yaml") -> Manifests:
    return parse_manifests([(source, stream(*documents))])


def test_reads_budgets_deployments_and_hpas_of_both_versions() -> None:
    manifests = parse(
        BUDGET,
        deployment("api", replicas=3, strategy={"rollingUpdate": {"maxSurge": 2}}),
        deployment("worker", strategy={"type": "Recreate"}),
        deployment("web", namespace=None, replicas=0),
        hpa("api", "api", 6),
        hpa("api-old", "api", 4, version="v1"),
        hpa("other", "worker", 9) | {"spec": {"scaleTargetRef": {"kind": "StatefulSet", "name": "worker"}, "maxReplicas": 9}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"}},
        {"just": "a values file"},
    )  # fmt: skip
    assert [b.key for b in manifests.budgets] == [("shop", "shop-db")]
    assert manifests.deployment(("shop", "api")) == DeploymentFacts(
        name="api", replicas=3, max_surge=2, hpa_max_replicas=6
    )
    assert manifests.deployment(("shop", "worker")) == DeploymentFacts(
        name="worker", replicas=1, recreate=True
    )
    # No namespace: the default one; replicas 0 is kept (not replaced by the default 1).
    assert manifests.deployment(("default", "web")) == DeploymentFacts(name="web", replicas=0)
    assert manifests.hpa_max_replicas == {("shop", "api"): 6}  # the larger of two HPAs


def test_a_list_and_a_kubectl_dump_open_into_their_items() -> None:
    listed = {"apiVersion": "v1", "kind": "List", "items": [BUDGET, deployment("api")]}
    dumped = {"apiVersion": "v1", "kind": "ConfigMapList", "items": [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "api-db-pool", "namespace": "shop"}, "data": {"DB_POOL_SIZE": "4"}},
    ]}  # fmt: skip
    manifests = parse(listed, dumped)
    assert manifests.deployment(("shop", "api")) == DeploymentFacts(name="api", replicas=1)
    assert manifests.configmaps == {("shop", "api-db-pool"): {"DB_POOL_SIZE": "4"}}


def test_json_reads_as_yaml() -> None:
    manifests = parse_manifests([("d.json", '{"apiVersion": "apps/v1", "kind": "Deployment", '
                                  '"metadata": {"name": "api"}, "spec": {"replicas": 4}}')])  # fmt: skip
    assert manifests.deployment(("default", "api")) == DeploymentFacts(name="api", replicas=4)


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        ([BUDGET, deployment("api", replicas="two")], 'in.yaml: document 2 (Deployment api): spec.replicas: must be an integer >= 0, got "two"'),
        ([deployment("api", replicas=-1)], "document 1 (Deployment api): spec.replicas: must be an integer >= 0, got -1"),
        ([deployment("api", replicas=True)], "spec.replicas: must be an integer >= 0, got true"),
        ([deployment("api", strategy={"type": "BlueGreen"})], 'spec.strategy.type: must be RollingUpdate or Recreate, got "BlueGreen"'),
        ([deployment("api", strategy={"rollingUpdate": {"maxSurge": "lots"}})], 'spec.strategy.rollingUpdate.maxSurge: must be an integer >= 0 or a percentage like "25%", got "lots"'),
        ([deployment("api", strategy={"rollingUpdate": {"maxUnavailable": -1}})], "spec.strategy.rollingUpdate.maxUnavailable: must be an integer >= 0"),
        ([deployment("api", strategy={"type": "Recreate", "rollingUpdate": {"maxSurge": 1}})], "spec.strategy.rollingUpdate: may not be set when type is Recreate"),
        ([deployment("api", strategy="fast")], 'spec.strategy: must be a mapping, got "fast"'),
        ([{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {}}], "document 1 (Deployment): metadata.name: must be a non-empty string"),
        ([hpa("api", "api", 0)], "document 1 (HorizontalPodAutoscaler api): spec.maxReplicas: must be an integer >= 1, got 0"),
        ([hpa("api", "api", None)], "spec.maxReplicas: must be an integer >= 1, got null"),
        ([BUDGET | {"spec": {**BUDGET["spec"], "wieght": 1}}], "document 1 (PoolBudget shop-db): spec.wieght: unknown field"),
        ([BUDGET, deployment("api"), deployment("api")], "document 3 (Deployment api): Deployment shop/api is also defined at in.yaml: document 2 (Deployment api)"),
        ([{"apiVersion": "v1", "kind": "List", "items": [deployment("api", replicas=-3)]}], "in.yaml: document 1, item 1 (Deployment api): spec.replicas"),
        ([{"apiVersion": "v1", "kind": "List", "items": "nope"}], 'document 1 (List): items: must be a list, got "nope"'),
        ([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"DB_POOL_SIZE": 4}}], "document 1 (ConfigMap c): data.DB_POOL_SIZE: must be a string, got 4"),
    ],
)  # fmt: skip
def test_errors_name_source_document_object_and_field(documents: list[Any], message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse(*documents)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_invalid_yaml_names_the_document_and_line() -> None:
    text = stream(BUDGET) + "---\napiVersion: apps/v1\nkind: [Deployment\n"
    with pytest.raises(
        ManifestError, match=r"^in\.yaml: document 2: not valid YAML \(.* at line \d+\)$"
    ):
        parse_manifests([("in.yaml", text)])


# --------------------------------------------------------------------------- properties

names = st.sampled_from(["api", "worker", "web", "cron", "mail"])
surges = st.one_of(st.none(), st.integers(0, 3), st.sampled_from(["0%", "25%", "50%", "100%"]))


@st.composite
def manifest_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A budget over some Deployments, HPAs for some of them, and unrelated objects."""
    chosen = draw(st.lists(names, min_size=1, max_size=5, unique=True))
    documents: list[dict[str, Any]] = [
        BUDGET | {"spec": {**BUDGET["spec"], "targets": [{"deploymentName": n} for n in chosen]}}
    ]
    for name in chosen:
        surge = draw(surges)
        spec: dict[str, Any] = {"replicas": draw(st.integers(0, 20))}
        if draw(st.booleans()):
            spec["strategy"] = {"type": "Recreate"}
        elif surge is not None:
            spec["strategy"] = {"rollingUpdate": {"maxSurge": surge}}
        documents.append(deployment(name, **spec))
        for number in range(draw(st.integers(0, 2))):
            documents.append(hpa(f"{name}-{number}", name, draw(st.integers(1, 30))))
    documents.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"}})
    return documents


@settings(max_examples=200)
@given(manifest_sets(), st.randoms(use_true_random=False))
def test_the_order_of_documents_does_not_matter(documents: list[dict[str, Any]], rng: Any) -> None:
    shuffled = list(documents)
    rng.shuffle(shuffled)
    assert parse(*shuffled) == parse(*documents)


@settings(max_examples=200)
@given(manifest_sets(), st.data())
def test_a_list_reads_as_its_documents_and_files_as_one_stream(
    documents: list[dict[str, Any]], data: st.DataObject
) -> None:
    expected = parse(*documents)
    split = data.draw(st.integers(0, len(documents)))
    as_list = {"apiVersion": "v1", "kind": "List", "items": documents[split:]}
    assert parse(*documents[:split], as_list) == expected
    files = [("a.yaml", stream(*documents[:split])), ("b.yaml", stream(*documents[split:]))]
    assert parse_manifests(files) == expected


@settings(max_examples=200)
@given(manifest_sets())
def test_what_is_read_is_what_was_written(documents: list[dict[str, Any]]) -> None:
    manifests = parse(*documents)
    for document in documents:
        if document["kind"] != "Deployment":
            continue
        facts = manifests.deployment(("shop", document["metadata"]["name"]))
        assert facts is not None
        spec = document["spec"]
        strategy = spec.get("strategy", {})
        assert facts.replicas == spec["replicas"]
        assert facts.recreate == (strategy.get("type") == "Recreate")
        assert facts.max_surge == strategy.get("rollingUpdate", {}).get("maxSurge")
        maxima = [
            d["spec"]["maxReplicas"]
            for d in documents
            if d["kind"] == "HorizontalPodAutoscaler"
            and d["spec"]["scaleTargetRef"]["name"] == facts.name
        ]
        assert facts.hpa_max_replicas == (max(maxima) if maxima else None)


def test_a_budget_file_may_leave_out_its_name() -> None:
    """As `plan -f budget.yaml` always allowed; a Deployment may not."""
    nameless = {key: value for key, value in BUDGET.items() if key != "metadata"}
    (budget,) = parse(nameless).budgets
    assert budget.key == ("default", "poolbudget")
    with pytest.raises(ManifestError, match=r"metadata\.name: must be a non-empty string"):
        parse({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {}})
