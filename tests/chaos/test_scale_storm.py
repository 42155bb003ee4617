"""200 scale events in a few seconds on four budgeted Deployments whose pods really run:
the operator must converge to the plan for the final replica counts (the same numbers
`poolbudget plan` computes offline), and never have more than `maxConcurrent` of them
rolling at once, sampled from outside (a Deployment is rolling while more than one of its
ReplicaSets has pods)."""

from __future__ import annotations

import base64
import http.client
import json
import random
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from devtools.localcluster import LocalCluster
from devtools.operator_process import OperatorProcess, wait_for
from tests.e2e.support import Cluster, budget, deployment

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

NAMES = ("alpha", "bravo", "charlie", "delta")
EVENTS = 200  # scale events, each of one Deployment picked at random
MAX_CONCURRENT = 1


class RollingSampler(threading.Thread):
    """Counts, every few hundred ms, the Deployments with pods in more than one ReplicaSet."""

    def __init__(self, ns: Cluster) -> None:
        super().__init__(daemon=True)
        self.ns = ns
        self.samples: list[int] = []
        self.peak_names: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            sets = self.ns.get("replicasets")["items"]
            with_pods: dict[str, int] = {}
            for item in sets:
                if (item.get("status") or {}).get("replicas", 0) > 0:
                    owner = item["metadata"]["labels"]["app"]
                    with_pods[owner] = with_pods.get(owner, 0) + 1
            rolling = sorted(name for name, count in with_pods.items() if count > 1)
            self.samples.append(len(rolling))
            if len(rolling) > len(self.peak_names):
                self.peak_names = rolling
            self._stop_event.wait(0.2)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class ScaleClient:
    """PATCHes the scale subresource over one kept-alive TLS connection with the admin
    credentials of the kubeconfig (starting 50 kubectl processes alone takes seconds on
    two cores)."""

    def __init__(self, kubeconfig: Path, namespace: str, secrets_dir: Path) -> None:
        config = json.loads(kubeconfig.read_text())
        cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
        files = {}
        for key in ("certificate-authority-data", "client-certificate-data", "client-key-data"):
            source = cluster if key.startswith("certificate") else user
            files[key] = secrets_dir / key
            files[key].write_bytes(base64.b64decode(source[key]))
        context = ssl.create_default_context(cafile=str(files["certificate-authority-data"]))
        context.load_cert_chain(files["client-certificate-data"], files["client-key-data"])
        url = urlsplit(cluster["server"])
        self.connection = http.client.HTTPSConnection(url.hostname or "", url.port, context=context)
        self.namespace = namespace

    def scale(self, deployment_name: str, replicas: int) -> None:
        path = f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{deployment_name}/scale"
        body = json.dumps({"spec": {"replicas": replicas}})
        headers = {"Content-Type": "application/merge-patch+json"}
        self.connection.request("PATCH", path, body, headers)
        response = self.connection.getresponse()
        answer = response.read()
        assert response.status == 200, (
            f"scale {deployment_name}: {response.status} {answer[:300]!r}"
        )

    def scale_each(self, deployment_name: str, counts: list[int]) -> None:
        for replicas in counts:
            self.scale(deployment_name, replicas)

    def close(self) -> None:
        self.connection.close()


def offline_plan(doc: dict[str, Any], replicas: dict[str, int], tmp_path: Path) -> dict[str, Any]:
    """`poolbudget plan -f` for the final replica counts: the operator's target."""
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump(doc))
    argv = [str(Path(sys.executable).parent / "poolbudget"), "plan", "-f", str(path), "-o", "json"]
    argv += [f"--replicas={name}={count}" for name, count in replicas.items()]
    result = subprocess.run(argv, capture_output=True, text=True, check=True)
    return dict(json.loads(result.stdout))


def test_a_scale_storm_converges_within_max_concurrent(
    crd_installed: LocalCluster, kube_namespace: str, tmp_path: Path, chaos_report: dict[str, Any]
) -> None:
    ns = Cluster(crd_installed, kube_namespace)
    for name in NAMES:
        ns.apply(deployment(name, 2))
    doc = budget("shop", [{"deploymentName": name, "processesPerPod": 2} for name in NAMES],
                 rollout={"maxConcurrent": MAX_CONCURRENT, "minIntervalSeconds": 0})  # fmt: skip
    ns.apply(doc)
    operator = OperatorProcess(kubeconfig=crd_installed.kubeconfig, log_path=tmp_path / "op.log",
                               extra_args=["--namespace", kube_namespace])  # fmt: skip
    rng = random.Random(20261203)
    sampler = RollingSampler(ns)
    clients = {
        name: ScaleClient(crd_installed.kubeconfig, kube_namespace, tmp_path) for name in NAMES
    }
    try:
        operator.start()
        wait_for(lambda: ns.settled("shop"), timeout=120, what="shop Ready, rolled out")
        restarts_before = len(ns.events("RolloutRestarted"))
        sampler.start()

        started = time.monotonic()
        # One connection per Deployment, in parallel: each write waits for etcd's fsync.
        counts = {name: [rng.randint(1, 5) for _ in range(EVENTS // len(NAMES))] for name in NAMES}
        with ThreadPoolExecutor(max_workers=len(NAMES)) as pool:
            list(pool.map(lambda name: clients[name].scale_each(name, counts[name]), NAMES))
        final = {name: counts[name][-1] for name in NAMES}
        storm_seconds = time.monotonic() - started

        wait_for(lambda: ns.settled("shop"), timeout=240, what="shop settled after the storm")
        converged_seconds = time.monotonic() - started - storm_seconds
    finally:
        if sampler.is_alive():
            sampler.stop()
        operator.stop()
        for client in clients.values():
            client.close()

    expected = {a["name"]: a for a in offline_plan(doc, final, tmp_path)["allocations"]}
    for name in NAMES:
        settings = ns.configmap(f"{name}-db-pool") or {}
        assert settings.get("DB_POOL_SIZE") == str(expected[name]["poolSize"]), name
        assert settings.get("DB_MAX_OVERFLOW") == str(expected[name]["maxOverflow"]), name
        allocation = ns.allocation("shop", name) or {}
        assert ns.template_hash(name) == allocation.get("configHash"), name
    restarts = len(ns.events("RolloutRestarted")) - restarts_before
    peak = max(sampler.samples)
    chaos_report.update(
        scale_events=EVENTS,
        storm_seconds=round(storm_seconds, 1),
        converged_after_storm_seconds=round(converged_seconds, 1),
        operator_restarts=restarts,
        samples=len(sampler.samples),
        peak_rolling=peak,
        max_concurrent=MAX_CONCURRENT,
    )
    print(f"\n{EVENTS} scale events in {storm_seconds:.1f} s; settled "
          f"{converged_seconds:.1f} s later after {restarts} restarts; at most {peak} of "
          f"{len(NAMES)} rolling at once in {len(sampler.samples)} samples")  # fmt: skip
    assert len(sampler.samples) > 20, "the sampler hardly ran"
    assert peak <= MAX_CONCURRENT, f"{sampler.peak_names} rolling at once"
    assert restarts >= 1, "the storm changed pool sizes but nothing restarted"
    assert "Traceback" not in operator.log()
