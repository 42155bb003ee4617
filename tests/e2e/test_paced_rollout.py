"""Restart pacing on real pods that take a while to become available (issue 13, item 9).

Three Deployments of one budget with `maxConcurrent: 1`, 4 replicas each, every one
allowing unavailable pods (`maxUnavailable` 2, 25% and 1), and new pods available only
`minReadySeconds` after the kubelet reports them Ready. A change to the budget's defaults
changes every ConfigMap, so every Deployment restarts, one at a time. A watch on the
Deployments judges, after every change the API server records, which of them are
mid-rollout by the Deployment controller's own definition (its DeploymentComplete: latest
generation observed, updated = replicas = available = spec.replicas): never two at once.

With maxUnavailable >= 1 the last old pods go before the last new pods are available: the
operator used to call a rollout finished there (status.replicas == updatedReplicas) and
restart the next Deployment while the previous one still had new pods unavailable.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import watch
from kubernetes.client import ApiClient, AppsV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config

from devtools.localcluster import LocalCluster
from devtools.operator_process import wait_for
from tests.e2e.support import Cluster, budget, deployment

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

REPLICAS = 4
MIN_READY_SECONDS = 3
# (maxSurge, maxUnavailable): the first turns over two pods at a time with no surge, so its
# last two new pods start only once its last old pods are gone; the others overlap.
STRATEGIES: dict[str, tuple[int | str, int | str]] = {
    "alpha": (0, 2),
    "bravo": ("25%", "25%"),
    "charlie": (1, 1),
}


def complete(body: dict[str, Any]) -> bool:
    """The Deployment controller's DeploymentComplete, on a body from the API server."""
    status = body.get("status") or {}
    replicas = body["spec"].get("replicas", 1)
    return bool(
        status.get("observedGeneration", 0) >= body["metadata"]["generation"]
        and status.get("updatedReplicas", 0) == replicas
        and status.get("replicas", 0) == replicas
        and status.get("availableReplicas", 0) == replicas
    )


def old_pods_gone_new_unavailable(body: dict[str, Any]) -> bool:
    """What the old test (status.replicas == updatedReplicas) called finished, though it
    was not: the latest generation observed, no old pod left, a new pod not available."""
    status = body.get("status") or {}
    return bool(
        status.get("observedGeneration", 0) >= body["metadata"]["generation"]
        and status.get("replicas", 0) == status.get("updatedReplicas", 0)
        and status.get("availableReplicas", 0) < status.get("updatedReplicas", 0)
    )


class RolloutWatch(threading.Thread):
    """Lists, then watches, the namespace's Deployments; after every event it records which
    of `names` are mid-rollout at that moment (each sample is the state of all of them at
    one resourceVersion, so no change the API server stored is missed)."""

    def __init__(self, kubeconfig: Path, namespace: str, names: tuple[str, ...]) -> None:
        super().__init__(daemon=True)
        # kubernetes.config and kubernetes.watch are not annotated: the casts say what they are.
        load = cast(Callable[..., ApiClient], new_client_from_config)
        self.client = load(config_file=str(kubeconfig), persist_config=False)
        self.api = AppsV1Api(self.client)
        self.namespace = namespace
        self.names = names
        self.started = time.monotonic()
        self.latest: dict[str, dict[str, Any]] = {}
        self.samples: list[tuple[float, frozenset[str]]] = []
        self.first_generation: dict[str, int] = {}
        # name -> generations at which it was seen mid-rollout, the controller caught up
        self.rolled: dict[str, set[int]] = defaultdict(set)
        self.window_samples: dict[str, int] = defaultdict(int)
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def _record(self) -> None:
        mid = frozenset(n for n, d in self.latest.items() if not complete(d))
        self.samples.append((time.monotonic() - self.started, mid))
        for name, body in self.latest.items():
            generation = body["metadata"]["generation"]
            self.first_generation.setdefault(name, generation)
            observed = (body.get("status") or {}).get("observedGeneration", 0)
            if name in mid and observed >= generation:
                self.rolled[name].add(generation)
            if old_pods_gone_new_unavailable(body):
                self.window_samples[name] += 1

    def _keep(self, body: dict[str, Any]) -> None:
        if body["metadata"]["name"] in self.names:
            self.latest[body["metadata"]["name"]] = body

    def _list(self) -> str:
        response: Any = self.api.list_namespaced_deployment(self.namespace, _preload_content=False)
        listed = json.loads(response.data)
        self.latest.clear()
        for item in listed["items"]:
            self._keep(item)
        self._record()
        return str(listed["metadata"]["resourceVersion"])

    def run(self) -> None:
        version = self._list()
        while not self._stop_event.is_set():
            stream = cast(Callable[[], Any], watch.Watch)().stream(
                self.api.list_namespaced_deployment, self.namespace,
                resource_version=version, timeout_seconds=1,
            )  # fmt: skip
            try:
                for event in stream:
                    body = event["raw_object"]
                    if event["type"] == "ERROR":
                        raise ApiException(status=body.get("code"), reason=body.get("message"))
                    version = body["metadata"]["resourceVersion"]
                    if event["type"] == "DELETED":
                        self.latest.pop(body["metadata"]["name"], None)
                    else:
                        self._keep(body)
                    self._record()
            except ApiException as exc:
                if exc.status != 410:
                    self.errors.append(f"{exc.status} {exc.reason}")
                version = self._list()  # expired or failed: start again from a list

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)
        cast(Callable[[], None], self.client.close)()


def test_max_concurrent_1_never_has_two_deployments_mid_rollout(
    ns: Cluster, local_cluster: LocalCluster
) -> None:
    names = tuple(STRATEGIES)
    for name, (surge, unavailable) in STRATEGIES.items():
        ns.apply(deployment(name, REPLICAS, surge=surge, unavailable=unavailable))
    doc = budget(
        "shop",
        [{"deploymentName": name, "processesPerPod": 2} for name in names],
        rollout={"maxConcurrent": 1, "minIntervalSeconds": 0},
    )
    ns.apply(doc)
    wait_for(lambda: ns.settled("shop"), timeout=120, what="PoolBudget shop Ready, rolled out")
    # The readiness delay only now, to keep the first (hash-stamping) round short: a
    # generation bump, no new ReplicaSet.
    patch = json.dumps({"spec": {"minReadySeconds": MIN_READY_SECONDS}})
    for name in names:
        ns.kubectl("patch", "deployment", name, "--type=merge", "-p", patch)
    wait_for(
        lambda: all(ns.rolled_out(name) for name in names), timeout=30,
        what="minReadySeconds observed",
    )  # fmt: skip
    hashes = {name: ns.template_hash(name) for name in names}

    sampler = RolloutWatch(local_cluster.kubeconfig, ns.namespace, names)
    sampler.start()
    try:
        # Every ConfigMap changes (DB_POOL_TIMEOUT), no pool grows: every Deployment
        # restarts, in name order, one at a time.
        ns.kubectl("patch", "poolbudget", "shop", "--type=merge",
                   "-p", '{"spec": {"defaults": {"poolTimeoutSeconds": 11}}}')  # fmt: skip
        wait_for(
            lambda: all(ns.template_hash(n) not in (None, hashes[n]) for n in names)
            and ns.settled("shop"),
            timeout=120, what="every Deployment restarted and rolled out",
        )  # fmt: skip
        wait_for(
            lambda: sampler.samples and not sampler.samples[-1][1], timeout=10,
            what="the watch to see every rollout complete",
        )  # fmt: skip
    finally:
        sampler.stop()

    assert not sampler.is_alive()
    assert not sampler.errors, sampler.errors
    assert sampler.samples[-1][1] == frozenset(), sampler.samples[-1]
    peak = max(len(mid) for _, mid in sampler.samples)
    overlaps = [(round(at, 1), sorted(mid)) for at, mid in sampler.samples if len(mid) > 1]
    span = sampler.samples[-1][0] - sampler.samples[0][0]
    print(
        f"\n{len(sampler.samples)} samples over {span:.1f}s; at most {peak} of {len(names)} "
        f"Deployments mid-rollout at once; samples with old pods gone and new ones not yet "
        f"available: {dict(sampler.window_samples)}"
    )
    # Not vacuous: each Deployment moved to a new generation and was seen mid-rollout at
    # it, the controller caught up (its pods really turned over while sampled).
    for name in names:
        first = sampler.first_generation[name]
        assert any(g > first for g in sampler.rolled[name]), (name, first, sampler.rolled)
    assert peak == 1, (
        f"{len(overlaps)} of {len(sampler.samples)} samples had {peak} mid-rollout at once "
        f"(s since start, names): {overlaps[:10]}"
    )
