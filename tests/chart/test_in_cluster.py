"""The operator as platform teams run it: its image, installed with the chart, as a pod.

Everything here runs on the session cluster's node: `helm install` with the image built
from ./Dockerfile, in namespaces that enforce the `restricted` Pod Security Standard; the
operator reaches kube-apiserver in-cluster (the `kubernetes` Service, its ServiceAccount
token) and PostgreSQL at the node's address, like any pod.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.images import Image
from devtools.localcluster import LocalCluster
from devtools.node import POD_NETWORK
from devtools.operator_process import wait_for
from devtools.pgserver import PostgresServer
from tests.chart.conftest import Helm
from tests.e2e.support import Cluster, budget, deployment

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "poolbudget-operator"
FULLNAME = "poolbudget-operator"  # release "poolbudget": no stutter
MONITOR_PASSWORD = "monitor-secret-4471"  # a throwaway test server's role


@pytest.fixture
def restricted_namespace(local_cluster: LocalCluster) -> Iterator[Callable[[str], Cluster]]:
    """Namespaces that enforce the restricted Pod Security Standard; deleted afterwards."""
    made: list[str] = []

    def make(prefix: str) -> Cluster:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        local_cluster.kubectl("create", "namespace", name)
        local_cluster.kubectl(
            "label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted"
        )
        made.append(name)
        return Cluster(local_cluster, name)

    yield make
    for name in made:
        local_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def system(helm: Helm, restricted_namespace: Callable[[str], Cluster]) -> Iterator[Cluster]:
    """The operator's namespace; its release (named "poolbudget", whose ClusterRoles
    every test's release would share) is uninstalled afterwards."""
    namespace = restricted_namespace("pb-system")
    yield namespace
    helm("uninstall", "poolbudget", "--namespace", namespace.namespace, "--wait", check=False)


def install(
    helm: Helm, image: Image, system: Cluster, *values: str, action: str = "install"
) -> subprocess.CompletedProcess[str]:
    """helm install (or upgrade) the chart with `image`, waiting for the operator Ready; a
    failure shows what the operator's pods and their events said."""
    repository, tag = image.ref.rsplit(":", 1)
    result = helm(
        action, "poolbudget", str(CHART), "--namespace", system.namespace, "--skip-crds",
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never", *values, "--wait", "--timeout=100s", check=False,
    )  # fmt: skip
    if result.returncode != 0:
        pods = system.kubectl("get", "pods", "-o", "wide", check=False).stdout
        events = system.kubectl("get", "events", "--sort-by=.lastTimestamp", check=False).stdout
        logs = system.kubectl("logs", "-l", "app.kubernetes.io/name=poolbudget-operator",
                              "--tail=40", check=False)  # fmt: skip
        raise AssertionError(
            f"helm {action}: {result.stderr}\n{pods}\n{events}\n{logs.stdout}{logs.stderr}"
        )
    return result


def operator_pods(system: Cluster) -> list[dict[str, Any]]:
    found = system.kubectl(
        "get", "pods", "-l", "app.kubernetes.io/name=poolbudget-operator", "-o", "json"
    )
    pods = json.loads(found.stdout)["items"]
    return [p for p in pods if p["metadata"].get("deletionTimestamp") is None]


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def restarts(pod: dict[str, Any]) -> int:
    return sum(int(c.get("restartCount", 0)) for c in pod["status"].get("containerStatuses", []))


def host_pid(pod: dict[str, Any]) -> int:
    """The operator's process on this machine (the node): found by the pod's cgroup."""
    uid = pod["metadata"]["uid"]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cgroups = (proc / "cgroup").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            f"pod{uid}" in cgroups
            and b"run" in cmdline
            and any(b"poolbudget" in a for a in cmdline)
        ):
            return int(proc.name)
    raise AssertionError(f"no operator process in the cgroup of pod {uid}")


def lease_holder(system: Cluster) -> str:
    lease = system.get("lease", "poolbudget-operator")
    return str(lease["spec"].get("holderIdentity") or "") if lease else ""


def restricted(manifest: str) -> dict[str, Any]:
    """The e2e Deployment made admissible under the restricted Pod Security Standard."""
    doc: dict[str, Any] = yaml.safe_load(manifest)
    pod_spec = doc["spec"]["template"]["spec"]
    pod_spec["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for container in pod_spec["containers"]:
        container["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
    return doc


def shop_settled(app: Cluster, replicas: int) -> None:
    """Deployment `api` (restricted pods) under budget `shop`, Ready and rolled out."""
    app.apply(restricted(deployment("api", replicas)))
    app.apply(budget("shop", [{"deploymentName": "api"}]))
    wait_for(lambda: app.settled("shop"), timeout=120, what="shop Ready, api rolled out")


# --------------------------------------------------------------------------- installs


def test_cluster_wide_install_runs_the_image_and_reconciles_with_the_database(
    helm: Helm,
    system: Cluster,
    operator_image: Image,
    local_cluster: LocalCluster,
    restricted_namespace: Callable[[str], Cluster],
) -> None:
    app = restricted_namespace("shop")
    assert local_cluster.node_ip is not None
    with PostgresServer(
        major=16,
        settings={"max_connections": "80"},
        pod_access=(local_cluster.node_ip, POD_NETWORK),
    ) as server:
        notes = install(helm, operator_image, system).stdout
        assert "kubectl get pbud -A" in notes
        system.kubectl("rollout", "status", f"deployment/{FULLNAME}", "--timeout=60s")
        (pod,) = operator_pods(system)
        assert pod_ready(pod)
        assert pod["spec"]["containers"][0]["image"] == operator_image.ref

        # A team member with the built-in `edit` role in their namespace manages budgets;
        # one with `view` reads them (the chart's roles aggregate into both).
        for role, user in (("edit", "editor"), ("view", "viewer")):
            app.kubectl("create", "rolebinding", user, f"--clusterrole={role}", f"--user={user}")

        def can(user: str, verb: str) -> bool:
            answer = app.kubectl("auth", "can-i", verb, "poolbudgets.poolbudget.dev",
                                 f"--as={user}", check=False)  # fmt: skip
            return answer.stdout.strip() == "yes"

        wait_for(lambda: can("editor", "create"), timeout=30, what="edit to aggregate PoolBudgets")
        assert can("viewer", "list")
        assert not can("viewer", "delete")

        server.create_role("monitor", MONITOR_PASSWORD, database="shop")
        app.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"},
                   "stringData": {"dsn": server.pod_dsn("monitor", MONITOR_PASSWORD, "shop")}})  # fmt: skip
        app.apply(restricted(deployment("api", 2)))
        doc = budget("shop", [{"deploymentName": "api", "processesPerPod": 2}])
        doc["spec"]["database"] = {"connectionSecretRef": {"name": "db"}, "refreshSeconds": 5}
        app.apply(doc)
        wait_for(lambda: app.settled("shop"), timeout=120, what="shop Ready, api rolled out")
        status = app.status("shop")
        assert status["database"]["maxConnections"] == 80
        assert app.configmap("api-db-pool") is not None
        assert app.template_hash("api") == (app.allocation("shop", "api") or {}).get("configHash")
        (pod,) = operator_pods(system)
        assert restarts(pod) == 0
        log = system.kubectl("logs", pod["metadata"]["name"]).stdout
        assert MONITOR_PASSWORD not in log + json.dumps(status)


def test_namespaced_install_reconciles_only_its_namespaces(
    helm: Helm,
    system: Cluster,
    operator_image: Image,
    restricted_namespace: Callable[[str], Cluster],
) -> None:
    app, other = restricted_namespace("team"), restricted_namespace("other")
    install(helm, operator_image, system,
            "--set", f"watchNamespaces={{{app.namespace}}}")  # fmt: skip
    for ns in (app, other):
        ns.apply(restricted(deployment("api", 1)))
        ns.apply(budget("shop", [{"deploymentName": "api"}]))
    wait_for(lambda: app.settled("shop"), timeout=120, what="the watched budget Ready")
    assert other.status("shop") == {}
    assert other.configmap("api-db-pool") is None
    assert system.get("clusterrolebinding", FULLNAME) is None  # no cluster-wide access


# --------------------------------------------------------------------------- probes


def test_readiness_waits_for_informers_that_cannot_list(
    helm: Helm,
    system: Cluster,
    operator_image: Image,
    local_cluster: LocalCluster,
    restricted_namespace: Callable[[str], Cluster],
) -> None:
    """Without its RBAC the operator runs, stays alive and is not Ready; given its RBAC
    back (helm upgrade), it becomes Ready without a restart."""
    install(helm, operator_image, system)
    local_cluster.kubectl("delete", "clusterrolebinding", FULLNAME)
    system.kubectl("delete", "pods", "-l", "app.kubernetes.io/name=poolbudget-operator")

    def unready_pod() -> dict[str, Any] | None:
        pods = operator_pods(system)
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return running[0] if running and not pod_ready(running[0]) else None

    pod = wait_for(unready_pod, timeout=60, what="a new operator pod, Running, not Ready")
    time.sleep(15)  # several readiness periods (5 s) and a liveness period (20 s)
    (pod,) = operator_pods(system)
    assert not pod_ready(pod)
    assert restarts(pod) == 0, "an operator that cannot list is not restarted"
    events = system.kubectl("get", "events", "--field-selector",
                            f"involvedObject.name={pod['metadata']['name']}", "-o", "json")  # fmt: skip
    messages = [e.get("message", "") for e in json.loads(events.stdout)["items"]]
    assert any("Readiness probe failed" in m and "503" in m for m in messages), messages

    install(helm, operator_image, system, action="upgrade")  # puts the binding back
    wait_for(lambda: all(pod_ready(p) for p in operator_pods(system)), timeout=90,
             what="the operator Ready once it can list")  # fmt: skip
    (pod,) = operator_pods(system)
    assert restarts(pod) == 0


def test_liveness_restarts_a_wedged_operator(
    helm: Helm,
    system: Cluster,
    operator_image: Image,
    restricted_namespace: Callable[[str], Cluster],
) -> None:
    """SIGSTOP freezes the process: /healthz stops answering and the kubelet restarts it."""
    install(helm, operator_image, system,
            "--set", "probes.liveness.periodSeconds=3", "--set", "probes.liveness.timeoutSeconds=1",
            "--set", "probes.liveness.failureThreshold=2")  # fmt: skip
    (pod,) = operator_pods(system)
    pid = host_pid(pod)
    os.kill(pid, signal.SIGSTOP)
    try:
        # Restarting a frozen process takes the pod's grace period (30 s) for SIGKILL.
        wait_for(lambda: restarts(operator_pods(system)[0]) >= 1, timeout=90,
                 what="the kubelet to restart the wedged container")  # fmt: skip
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed by the kubelet, as it should be
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: pod_ready(operator_pods(system)[0]), timeout=60, what="Ready after restart")


# --------------------------------------------------------------------------- replicas


@pytest.mark.parametrize("fault", ["leader pod deleted", "leader process SIGKILLed"])
def test_two_replicas_one_leads_and_another_takes_over(
    helm: Helm,
    system: Cluster,
    operator_image: Image,
    restricted_namespace: Callable[[str], Cluster],
    fault: str,
) -> None:
    """A deleted pod shuts down and releases the Lease: the standby leads at once, or the
    pod the Deployment creates in its place if it asks first (both retry every 2 s; one CI
    run saw the replacement win). A killed process releases nothing: the kubelet restarts
    its container, and whichever process takes the Lease first leads: the restarted one
    has a new identity, so it waits for the 15 s lease to expire as the standby does.
    Either way: one leader, no write for nothing."""
    app = restricted_namespace("shop")
    install(helm, operator_image, system, "--set", "replicaCount=2")
    pods = operator_pods(system)
    assert len(pods) == 2
    assert all(pod_ready(p) for p in pods), "the standby is Ready too"
    shop_settled(app, 2)

    leader = lease_holder(system)
    (leading,) = [p for p in pods if leader.startswith(p["metadata"]["name"])]
    (standby,) = [p for p in pods if p is not leading]
    assert "leading as" not in system.kubectl("logs", standby["metadata"]["name"]).stdout
    generation = app.get("deployment", "api")["metadata"]["generation"]
    sets = app.replicasets("api")
    configmap_version = app.get("configmap", "api-db-pool")["metadata"]["resourceVersion"]

    def new_leader() -> str | None:
        """The pod whose current process leads: the standby, the deleted leader's
        replacement, or the killed leader's restarted container (its log starts afresh)."""
        for pod in operator_pods(system):
            name = pod["metadata"]["name"]
            fresh = name != leading["metadata"]["name"] or restarts(pod) >= 1
            if fresh and "leading as" in system.kubectl("logs", name, check=False).stdout:
                return str(name)
        return None

    faulted = time.monotonic()
    if fault == "leader pod deleted":
        system.kubectl("delete", "pod", leading["metadata"]["name"], "--wait=false")
    else:
        os.kill(host_pid(leading), signal.SIGKILL)
    wait_for(new_leader, timeout=60, what="a process to lead again")
    took = time.monotonic() - faulted
    print(f"\n{fault}: {new_leader()} leads {took:.1f} s later")
    assert took < 15 + 10, f"{took:.1f} s to lead again (lease 15 s)"
    # The new leader reconciles what is there and changes nothing.
    time.sleep(5)
    assert app.get("deployment", "api")["metadata"]["generation"] == generation
    assert app.replicasets("api") == sets
    assert app.get("configmap", "api-db-pool")["metadata"]["resourceVersion"] == configmap_version
    # And it acts on the next change.
    app.kubectl("scale", "deployment", "api", "--replicas=3")
    wait_for(lambda: (app.allocation("shop", "api") or {}).get("podsWorstCase") == 4,
             timeout=60, what="the new leader to re-budget")  # fmt: skip


# --------------------------------------------------------------------------- lifecycle


def test_upgrade_to_a_new_tag_then_uninstall_leaves_the_users_objects(
    helm: Helm,
    system: Cluster,
    operator_image: Image,
    local_cluster: LocalCluster,
    restricted_namespace: Callable[[str], Cluster],
) -> None:
    app = restricted_namespace("shop")
    install(helm, operator_image, system)
    shop_settled(app, 1)
    generation = app.get("deployment", "api")["metadata"]["generation"]

    # A new release of the image: the same bits under a second tag, as a registry serves it.
    repository = operator_image.ref.rsplit(":", 1)[0]
    second = Image(operator_image.name, f"{repository}:0.1.1-test", operator_image.archive)
    local_cluster.tag_image(operator_image.ref, second.ref)
    # The CRD step the chart README gives before an upgrade (Helm never upgrades crds/).
    local_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    install(helm, second, system, action="upgrade")
    system.kubectl("rollout", "status", f"deployment/{FULLNAME}", "--timeout=60s")
    (pod,) = operator_pods(system)
    assert pod["spec"]["containers"][0]["image"] == second.ref
    app.kubectl("scale", "deployment", "api", "--replicas=2")
    wait_for(lambda: (app.allocation("shop", "api") or {}).get("podsWorstCase") == 3,
             timeout=60, what="the upgraded operator to re-budget")  # fmt: skip
    assert app.get("deployment", "api")["metadata"]["generation"] > generation

    helm("uninstall", "poolbudget", "--namespace", system.namespace, "--wait")
    gone = system.kubectl("get", "deployment,serviceaccount,role,rolebinding,service,configmap",
                          "-l", "app.kubernetes.io/instance=poolbudget", "-o", "name")  # fmt: skip
    assert gone.stdout.strip() == ""
    assert local_cluster.kubectl("get", "clusterrole", FULLNAME, check=False).returncode != 0
    # What belongs to the users stays: the CRD, their budgets, the ConfigMaps it wrote.
    assert local_cluster.kubectl("get", "crd", "poolbudgets.poolbudget.dev").returncode == 0
    assert app.get("poolbudget", "shop") is not None
    assert app.configmap("api-db-pool") is not None
    # With no operator left, deleting a budget and its namespace does not wait for one.
    assert app.get("poolbudget", "shop")["metadata"].get("finalizers") is None
    app.kubectl("delete", "poolbudget", "shop", "--timeout=20s")
    local_cluster.kubectl("delete", "namespace", app.namespace, "--timeout=60s")
