"""Leader election on the real API server, with real operator processes (two replicas).

Short timings keep it quick: lease 6 s, renew deadline 4 s (the fence), retry 1 s.
A poller records when each process's `poolbudget_api_writes_total` rises; a process that
has exited reports its final counts in its last log line. Together they show when each
process wrote: never two at once, and nothing from an old leader once it resumes. The
last test drives the write hook itself (KubeGateway with the fence) in this process."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from devtools.localcluster import LocalCluster, find_binaries
from devtools.operator_process import OperatorProcess, wait_for
from poolbudget.adapters.credentials import load_configuration
from poolbudget.adapters.kube import KubeGateway, NotLeaderError
from poolbudget.domain.leadership import Fence
from tests.e2e.support import Cluster, budget, deployment

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
LEASE, RENEW_DEADLINE, RETRY = 6, 4, 1
FINAL = re.compile(r"(\d+) API writes sent, (\d+) refused by the fence")


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A control plane of its own, no node: the budgets write ConfigMaps only."""
    state = tmp_path_factory.mktemp("leader-cluster")
    with LocalCluster(state, binaries=find_binaries(), node=False) as cluster:
        cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        cluster.wait_established("poolbudgets.poolbudget.dev")
        yield cluster


class WriteWatch:
    """Polls each replica's write counter every 50 ms, a thread per replica (a stopped
    process holds its poll for up to 5 s; it cannot write meanwhile); keeps (time, count)
    whenever the count rose."""

    def __init__(self, replicas: dict[str, OperatorProcess]) -> None:
        self.rises: dict[str, list[tuple[float, float]]] = {name: [] for name in replicas}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._poll, args=(name, replica), daemon=True)
            for name, replica in replicas.items()
        ]

    def __enter__(self) -> WriteWatch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _poll(self, name: str, replica: OperatorProcess) -> None:
        seen = self.rises[name]
        while not self._stop.wait(0.05):
            try:
                count = replica.api_writes() if replica.running else None
            except Exception:  # gone, or a scrape cut short: poll again (never end the thread)
                count = None
            if count is not None and count > (seen[-1][1] if seen else 0):
                seen.append((time.monotonic(), count))

    def count(self, name: str) -> float:
        return self.rises[name][-1][1] if self.rises[name] else 0.0

    def window(self, name: str) -> tuple[float, float] | None:
        seen = self.rises[name]
        return (seen[0][0], seen[-1][0]) if seen else None


def replica(cluster: LocalCluster, namespace: str, path: Path) -> OperatorProcess:
    return OperatorProcess(
        kubeconfig=cluster.kubeconfig,
        log_path=path,
        extra_args=[
            "--namespace", namespace,
            "--leader-election-namespace", namespace,
            "--leader-lease-seconds", str(LEASE),
            "--leader-renew-deadline-seconds", str(RENEW_DEADLINE),
            "--leader-retry-seconds", str(RETRY),
        ],
    )  # fmt: skip


def identity(operator: OperatorProcess) -> str | None:
    found = re.search(r"leading as (\S+)", operator.log())
    return found.group(1) if found else None


def final_counts(operator: OperatorProcess) -> tuple[int, int]:
    """(writes sent, writes refused) from the exited process's last words."""
    found = FINAL.findall(operator.log())
    assert found, f"no final write counts in the log:\n{operator.log()[-3000:]}"
    sent, refused = found[-1]
    return int(sent), int(refused)


def holder(ns: Cluster) -> str:
    lease = ns.get("lease", "poolbudget-operator") or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


@pytest.fixture
def shop(control_plane: LocalCluster, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    name = "le-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[5:40].strip("-")
    control_plane.kubectl("create", "namespace", name)
    ns = Cluster(control_plane, name)
    ns.apply(deployment("api", 1))
    ns.apply(budget("shop", [{"deploymentName": "api"}], rollout={"strategy": "None"}))
    yield ns
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def start_pair(
    cluster: LocalCluster, ns: Cluster, tmp_path: Path
) -> tuple[OperatorProcess, OperatorProcess]:
    """The first replica leads and budgets `api`; then the second one stands by."""
    first = replica(cluster, ns.namespace, tmp_path / "first.log")
    second = replica(cluster, ns.namespace, tmp_path / "second.log")
    first.start()
    wait_for(lambda: ns.configmap("api-db-pool") and ns.ready("shop"), timeout=60,
             what="the first replica to lead and budget api")  # fmt: skip
    second.start()  # healthy while standing by
    assert holder(ns) == identity(first)
    assert identity(second) is None
    return first, second


def budgeted(ns: Cluster, pods: int) -> bool:
    return (ns.allocation("shop", "api") or {}).get("podsWorstCase") == pods


def test_a_clean_stop_hands_over_within_a_retry_period(
    control_plane: LocalCluster, shop: Cluster, tmp_path: Path
) -> None:
    first, second = start_pair(control_plane, shop, tmp_path)
    try:
        with WriteWatch({"first": first, "second": second}) as writes:
            time.sleep(0.3)  # a few polls of the settled state
            stopping = time.monotonic()
            first.stop()  # SIGTERM: Kopf stops, then the Lease is released
            exited = time.monotonic()
            wait_for(lambda: identity(second), timeout=2 * LEASE, interval=0.05,
                     what="the standby to lead")  # fmt: skip
            led = time.monotonic()
            shop.kubectl("scale", "deployment", "api", "--replicas=3")
            wait_for(lambda: budgeted(shop, 4), timeout=30, what="the new leader to re-budget")
            time.sleep(0.3)
        print(f"\nclean handover: SIGTERM -> exit {exited - stopping:.2f} s, "
              f"exit -> standby leads {led - exited:.2f} s (retry {RETRY} s)")  # fmt: skip
        assert "released the Lease" in first.log()
        assert led - exited < RETRY + 1.0, "the released Lease was not taken at once"
        assert holder(shop) == identity(second)
        sent, refused = final_counts(first)
        assert (sent, refused) == (writes.count("first"), 0)
        first_window, second_window = writes.window("first"), writes.window("second")
        assert first_window is not None
        assert second_window is not None
        assert first_window[1] < exited <= second_window[0]
    finally:
        first.stop()
        second.stop()


def test_a_resumed_leader_writes_nothing_and_exits(
    control_plane: LocalCluster, shop: Cluster, tmp_path: Path
) -> None:
    """SIGSTOP the leader (its API access gone, as far as the others can tell); a change
    needs writes meanwhile; the standby takes over once the lease expires and writes.
    SIGCONT: the old leader's fence has lapsed (CLOCK_MONOTONIC counted on), so its
    informers and loops may wake and try, but nothing is sent; it exits with status 1."""
    first, second = start_pair(control_plane, shop, tmp_path)
    try:
        with WriteWatch({"first": first, "second": second}) as writes:
            time.sleep(0.3)
            before = writes.count("first")
            first.pause()
            paused = time.monotonic()
            shop.kubectl("scale", "deployment", "api", "--replicas=3")
            wait_for(lambda: identity(second), timeout=3 * LEASE, interval=0.05,
                     what="the standby to take over the expired Lease")  # fmt: skip
            led = time.monotonic()
            wait_for(lambda: budgeted(shop, 4), timeout=30, what="the new leader to re-budget")
            # The status shows the new budget; the poller (every 50 ms) sees the writes soon.
            wait_for(lambda: writes.count("second") > 0, timeout=5, interval=0.05,
                     what="the new leader's writes in its metrics")  # fmt: skip
            first.resume()
            resumed = time.monotonic()
            wait_for(lambda: not first.running, timeout=2 * RENEW_DEADLINE, interval=0.05,
                     what="the resumed leader to exit")  # fmt: skip
            gone = time.monotonic()
            time.sleep(0.3)
        sent, refused = final_counts(first)
        print(f"\nSIGSTOP: the standby led {led - paused:.1f} s later (lease {LEASE} s); "
              f"SIGCONT: exited {gone - resumed:.2f} s later; writes after resuming "
              f"{sent - before:.0f}, refused {refused}")  # fmt: skip
        assert sent == before, f"{sent - before} writes sent after SIGCONT"
        assert "lost the Lease" in first.log()
        assert LEASE - 1 <= led - paused < LEASE + 2 * RETRY + 1
        assert gone - resumed < 2.0
        assert second.running
        assert holder(shop) == identity(second)
        first_window, second_window = writes.window("first"), writes.window("second")
        assert first_window is not None
        assert second_window is not None
        assert first_window[1] < paused < led <= second_window[0]
    finally:
        first.resume()
        first.stop()
        second.stop()


def refused_writes() -> float:
    labels = {"kind": "configmap", "reason": "NotLeader"}
    return REGISTRY.get_sample_value("poolbudget_api_writes_refused_total", labels) or 0.0


async def test_the_fence_stops_the_gateways_writes_before_they_are_sent(
    control_plane: LocalCluster, shop: Cluster
) -> None:
    """The hook itself, in this process against the real API server: while the fence
    holds a ConfigMap is written; once it has lapsed the write is refused (and counted),
    and the API server never sees it."""
    clock = [0.0]
    fence = Fence(RENEW_DEADLINE, lambda: clock[0])
    configuration = await load_configuration(kubeconfig=str(control_plane.kubeconfig))
    kube = KubeGateway(configuration, may_write=fence.holds)
    refused_before = refused_writes()
    try:
        fence.renewed(sent=0.0)
        await kube.apply_configmap(shop.namespace, "fenced", {"n": "1"}, {}, {})
        clock[0] = RENEW_DEADLINE  # the deadline passed since the last renewal was sent
        with pytest.raises(NotLeaderError):
            await kube.apply_configmap(shop.namespace, "fenced", {"n": "2"}, {}, {})
    finally:
        await kube.close()
    assert shop.configmap("fenced") == {"n": "1"}
    assert refused_writes() == refused_before + 1
