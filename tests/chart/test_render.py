"""The chart as `helm template` renders it, and the plain manifests made from it: names,
the users' ClusterRoles, the PodDisruptionBudget and topology spread, the CPU limit, the
install notes, the CRD-upgrade sources. Needs only the helm binary (`make binaries`), no
cluster."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from poolbudget.admission import ENV_ADMISSION_PARAMS
from poolbudget.api.v1alpha1 import PoolBudget
from poolbudget.domain.admission import PARAMS_CONFIGMAP

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "poolbudget-operator"
MANIFESTS = REPO / "manifests"
Helm = Callable[..., subprocess.CompletedProcess[str]]
Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory, built_helm: Path) -> Helm:
    """helm as `make binaries` builds it, with its cache and config in a temporary directory."""
    binary = built_helm
    home = tmp_path_factory.mktemp("helm")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binary), *args], env=env, text=True, capture_output=True, check=check, timeout=60
        )

    return run


@pytest.fixture(scope="module")
def render(helm: Helm) -> Render:
    def run(*args: str, release: str = "poolbudget") -> list[dict[str, Any]]:
        out = helm("template", release, str(CHART), "--namespace", "pbs", *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    return run


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    [found] = [
        d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]  # fmt: skip
    return found


@pytest.mark.parametrize(
    ("release", "flags", "fullname"),
    [
        ("poolbudget", [], "poolbudget-operator"),
        ("operator", [], "poolbudget-operator"),
        ("poolbudget-operator", [], "poolbudget-operator"),
        ("prod-poolbudget-operator", [], "prod-poolbudget-operator"),
        ("shop", [], "shop-poolbudget-operator"),
        ("pool", [], "pool-poolbudget-operator"),  # not a whole word of the chart's name
        ("pb1234", [], "pb1234-poolbudget-operator"),  # the chart tests' release names
        ("poolbudget", ["--set", "fullnameOverride=pbo"], "pbo"),
        ("poolbudget", ["--set", "nameOverride=budgets"], "poolbudget-budgets"),
        ("budgets", ["--set", "nameOverride=budgets"], "budgets"),
    ],
)
def test_release_names_do_not_stutter(
    render: Render, release: str, flags: list[str], fullname: str
) -> None:
    docs = render(*flags, release=release)
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["name"] == fullname
    assert one(docs, "ServiceAccount")["metadata"]["name"] == fullname
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == fullname
    assert one(docs, "Service")["metadata"]["name"] == f"{fullname}-metrics"
    binding = one(docs, "ClusterRoleBinding", fullname)
    assert binding["roleRef"]["name"] == fullname
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": fullname, "namespace": "pbs"}]
    assert all(d["metadata"]["name"].startswith(fullname) for d in docs)


def test_users_get_poolbudgets_through_the_built_in_roles(render: Render) -> None:
    docs = render()
    view = one(docs, "ClusterRole", "poolbudget-operator-view")
    edit = one(docs, "ClusterRole", "poolbudget-operator-edit")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert view["rules"] == [
        {
            "apiGroups": ["poolbudget.dev"],
            "resources": ["poolbudgets", "poolbudgets/status"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    labels = edit["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in labels
    verbs = {r["resources"][0]: set(r["verbs"]) for r in edit["rules"]}
    assert verbs == {
        "poolbudgets": {
            "get",
            "list",
            "watch",
            "create",
            "update",
            "patch",
            "delete",
            "deletecollection",
        },
        "poolbudgets/status": {"get", "list", "watch"},  # status is the operator's to write
    }
    # Namespaced installs too: aggregation is how `edit` in a namespace reaches PoolBudgets.
    assert len([d for d in render("--set", "watchNamespaces={shop}") if "aggregate" in str(d)]) == 2

    for flag in ("rbac.aggregateToDefaultRoles=false", "rbac.create=false"):
        names = [d["metadata"]["name"] for d in render("--set", flag)]
        assert "poolbudget-operator-view" not in names
        assert "poolbudget-operator-edit" not in names


def test_pod_disruption_budget_is_optional_and_selects_the_operator(render: Render) -> None:
    assert [d for d in render() if d["kind"] == "PodDisruptionBudget"] == []

    docs = render("--set", "podDisruptionBudget.enabled=true", "--set", "replicaCount=2")
    pdb = one(docs, "PodDisruptionBudget")
    selector = one(docs, "Deployment")["spec"]["selector"]
    assert pdb["spec"] == {"minAvailable": 1, "selector": selector}

    pdb = one(render("--set", "podDisruptionBudget.enabled=true",
                     "--set", "podDisruptionBudget.maxUnavailable=50%"), "PodDisruptionBudget")  # fmt: skip
    assert pdb["spec"] == {"maxUnavailable": "50%", "selector": selector}
    pdb = one(render("--set", "podDisruptionBudget.enabled=true",
                     "--set", "podDisruptionBudget.maxUnavailable=0"), "PodDisruptionBudget")  # fmt: skip
    assert pdb["spec"] == {"maxUnavailable": 0, "selector": selector}


def test_topology_spread_fills_in_the_operator_selector(render: Render) -> None:
    assert (
        "topologySpreadConstraints" not in one(render(), "Deployment")["spec"]["template"]["spec"]
    )
    docs = render(
        "--set-json",
        'topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",'
        ' "whenUnsatisfiable": "ScheduleAnyway"}, {"maxSkew": 1, "topologyKey": "zone",'
        ' "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"a": "b"}}}]',
    )
    deployment = one(docs, "Deployment")
    own, given = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert own == {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]},
    }
    assert given["labelSelector"] == {"matchLabels": {"a": "b"}}


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--set", "podDisruptionBudget.minAvailable=150%"], "/podDisruptionBudget/minAvailable"),
        (["--set", "podDisruptionBudget.maxUnavailable=-1"], "/podDisruptionBudget/maxUnavailable"),
        (["--set", "podDisruptionBudget.min=1"], "additional properties 'min' not allowed"),
        (["--set", "rbac.aggregateToDefaultRoles=yes"], "/rbac/aggregateToDefaultRoles"),
        (["--set", "plainManifests=1"], "/plainManifests"),
        (["--set-json", 'topologySpreadConstraints=[{"maxSkew": 1, "topologykey": "zone", "whenUnsatisfiable": "DoNotSchedule"}]'],
         "topologySpreadConstraints/0"),
        (["--set-json", 'topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "Never"}]'],
         "topologySpreadConstraints/0/whenUnsatisfiable"),
    ],
)  # fmt: skip
def test_schema_rejects_bad_new_values(helm: Helm, flags: list[str], error: str) -> None:
    result = helm("template", "x", str(CHART), *flags, check=False)
    assert result.returncode != 0
    assert error in result.stderr


def test_no_cpu_limit_by_default(render: Render) -> None:
    resources = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0][
        "resources"
    ]
    assert resources == {
        "requests": {"cpu": "50m", "memory": "128Mi"},
        "limits": {"memory": "512Mi"},
    }


def _notes(helm: Helm, tmp_path: Path, *flags: str) -> str:
    """NOTES.txt as `helm install` prints it. `helm template` leaves the notes out, so a copy
    of the chart renders them through `tpl` into a document of their own."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes-source.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        'text: {{ tpl (.Files.Get "notes-source.txt") . | toJson }}\n'
    )
    out = helm("template", "poolbudget", str(chart), "--namespace", "pbs", *flags,
               "--show-only", "templates/zz-notes.yaml").stdout  # fmt: skip
    text: str = yaml.safe_load(out)["text"]
    return text


def _example(notes: str) -> dict[str, Any]:
    block = notes.split("  apiVersion: poolbudget.dev/v1alpha1", 1)[1].split("\n\n", 1)[0]
    doc: dict[str, Any] = yaml.safe_load(
        textwrap.dedent("  apiVersion: poolbudget.dev/v1alpha1" + block)
    )
    return doc


def test_notes_say_what_is_watched_how_to_check_and_what_to_create(
    helm: Helm, tmp_path: Path
) -> None:
    notes = _notes(helm, tmp_path)
    assert "in every namespace (cluster-wide)" in notes
    assert "kubectl -n pbs rollout status deployment/poolbudget-operator" in notes
    assert "kubectl get pbud -A" in notes
    assert (
        "helm show crds <the new chart> | kubectl apply --server-side --force-conflicts -f -"
        in notes
    )
    assert "WARNING" not in notes
    example = _example(notes)
    assert example["metadata"]["namespace"] == "shop"
    budget = PoolBudget.model_validate(example)  # the operator's own model of the CRD
    assert budget.spec.targets[0].deployment_name == "api"
    assert budget.spec.database.connection_secret_ref is not None
    assert "kubectl -n shop create secret generic shop-db-monitor" in notes

    namespaced = _notes(helm, tmp_path / "ns", "--set", "watchNamespaces={team-a,team-b}",
                        "--set", "podDisruptionBudget.enabled=true")  # fmt: skip
    assert "in these namespaces only: team-a, team-b." in namespaced
    assert _example(namespaced)["metadata"]["namespace"] == "team-a"
    assert "WARNING: a PodDisruptionBudget with minAvailable 1 and replicaCount 1" in namespaced


def test_helm_show_crds_gives_the_repository_crds(helm: Helm, tmp_path: Path) -> None:
    """The CRD-upgrade commands of the chart README read the same CRD: crds/ of a checkout,
    `helm show crds` of the chart directory or of its package, and the unpacked package."""
    crds = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "crds").glob("*.yaml"))]
    shown = helm("show", "crds", str(CHART)).stdout
    assert [d for d in yaml.safe_load_all(shown) if d] == crds

    helm("package", str(CHART), "--destination", str(tmp_path))
    [package] = tmp_path.glob("poolbudget-operator-*.tgz")
    assert [d for d in yaml.safe_load_all(helm("show", "crds", str(package)).stdout) if d] == crds
    with tarfile.open(package) as archive:
        archive.extractall(tmp_path / "pb", filter="data")
    unpacked = sorted((tmp_path / "pb" / "poolbudget-operator" / "crds").glob("*.yaml"))
    assert [yaml.safe_load(p.read_text()) for p in unpacked] == crds


def _docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.mark.parametrize("name", ["install.yaml", "install-namespaced.yaml"])
def test_plain_manifests_are_not_labelled_as_helm(name: str) -> None:
    text = (MANIFESTS / name).read_text()
    assert "helm.sh/chart" not in text
    assert "managed-by: Helm" not in text
    docs = _docs(text)
    assert {d["metadata"]["labels"]["app.kubernetes.io/managed-by"] for d in docs} == {"kubectl"}
    assert docs[0]["kind"] == "Namespace"
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["namespace"] == "poolbudget-system"
    assert deployment["metadata"]["name"] == "poolbudget-operator"


def test_the_namespaced_manifest_watches_default_only() -> None:
    docs = _docs((MANIFESTS / "install-namespaced.yaml").read_text())
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=default"]
    roles = [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    assert {(d["kind"], d["metadata"]["namespace"]) for d in roles} == {
        ("Role", "default"),
        ("RoleBinding", "default"),
    }
    cluster_roles = {d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"}
    assert cluster_roles == {
        "poolbudget-operator-discovery",
        "poolbudget-operator-view",
        "poolbudget-operator-edit",
    }


def test_the_documented_sed_gives_the_render_for_another_namespace(helm: Helm) -> None:
    """The header of install-namespaced.yaml shows a sed for one other namespace: it must
    give what rendering for that namespace gives."""
    path = MANIFESTS / "install-namespaced.yaml"
    header = "".join(
        line for line in path.read_text().splitlines(keepends=True) if line.startswith("#")
    )
    expressions = re.findall(r"-e '([^']+)'", header)
    assert len(expressions) == 2, header
    edited = subprocess.run(
        ["sed", *(arg for e in expressions for arg in ("-e", e)), str(path)],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    rendered = subprocess.run(
        ["bash", str(REPO / "hack" / "render-install-manifest.sh"), "shop"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    assert _docs(edited) == _docs(rendered)
    assert "--namespace=shop" in edited


@pytest.mark.parametrize("values", sorted((CHART / "ci").glob("*.yaml")), ids=lambda p: p.stem)
def test_lint_every_ci_values_file(helm: Helm, values: Path) -> None:
    result = helm("lint", str(CHART), "-f", str(values), "--strict")
    assert "0 chart(s) failed" in result.stdout


def test_schema_rejects_unknown_values(helm: Helm) -> None:
    result = helm("template", "x", str(CHART), "--set", "replicas=2", check=False)
    assert result.returncode != 0
    assert "additional properties 'replicas' not allowed" in result.stderr


def test_defaults_are_restricted_and_probed(helm: Helm) -> None:
    docs = [d for d in yaml.safe_load_all(helm("template", "x", str(CHART)).stdout) if d]
    [operator] = [d for d in docs if d["kind"] == "Deployment"]
    pod = operator["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["limits"]["memory"] == "512Mi"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # One replica, no leader election: never two operators at once, not even in an upgrade.
    assert operator["spec"]["strategy"] == {"type": "Recreate"}
    [leader] = [
        d for d in yaml.safe_load_all(
            helm("template", "x", str(CHART), "--set", "replicaCount=2").stdout
        ) if d and d["kind"] == "Deployment"
    ]  # fmt: skip
    assert leader["spec"]["strategy"] == {"type": "RollingUpdate"}


GUARD_POLICIES = ("poolbudget-operator-replicas", "poolbudget-operator-hpa-max-replicas")


def operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container.get("env") or []}


def test_the_admission_guard_is_off_by_default(render: Render) -> None:
    docs = render()
    assert not [d for d in docs if "ValidatingAdmissionPolicy" in d["kind"]]
    assert ENV_ADMISSION_PARAMS not in operator_env(docs)


def test_the_admission_guard_warns_by_default_and_fails_open(render: Render) -> None:
    docs = render("--set", "admissionGuard.enabled=true")
    replicas, hpa = (one(docs, "ValidatingAdmissionPolicy", name) for name in GUARD_POLICIES)
    for policy in (replicas, hpa):
        assert policy["spec"]["paramKind"] == {"apiVersion": "v1", "kind": "ConfigMap"}
        assert policy["spec"]["failurePolicy"] == "Ignore"  # an evaluation error allows
    [deployments] = replicas["spec"]["matchConstraints"]["resourceRules"]
    assert deployments["resources"] == ["deployments", "deployments/scale"]  # kubectl scale
    assert deployments["operations"] == ["UPDATE"]
    [hpas] = hpa["spec"]["matchConstraints"]["resourceRules"]
    assert (hpas["resources"], hpas["operations"]) == (["horizontalpodautoscalers"],
                                                       ["CREATE", "UPDATE"])  # fmt: skip
    for name in GUARD_POLICIES:
        binding = one(docs, "ValidatingAdmissionPolicyBinding", name)["spec"]
        assert binding["policyName"] == name
        assert binding["validationActions"] == ["Warn"]
        # The object's own namespace's ConfigMap, the one the operator writes; none: allow.
        assert binding["paramRef"] == {"name": PARAMS_CONFIGMAP, "parameterNotFoundAction": "Allow"}
        assert "matchResources" not in binding
    assert operator_env(docs)[ENV_ADMISSION_PARAMS] == "true"


def test_the_admission_guard_denies_on_request_and_only_where_the_operator_watches(
    render: Render,
) -> None:
    docs = render("--set", "admissionGuard.enabled=true", "--set", "admissionGuard.action=Deny",
                  "--set", "watchNamespaces={shop,pay}")  # fmt: skip
    for name in GUARD_POLICIES:
        binding = one(docs, "ValidatingAdmissionPolicyBinding", name)["spec"]
        assert binding["validationActions"] == ["Deny"]
        assert binding["matchResources"]["namespaceSelector"]["matchExpressions"] == [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop", "pay"]}
        ]


def test_the_admission_guard_takes_warn_or_deny_only(helm: Helm) -> None:
    result = helm("template", "x", str(CHART), "--set", "admissionGuard.action=Audit", check=False)
    assert result.returncode != 0
    assert "admissionGuard/action" in result.stderr
