"""The operator's informer against the real API server: list, then follow the watch,
resume after the watch is re-opened, and reconcile its store by a relist after a gap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from kubernetes.aio.client import ApiClient

from devtools.localcluster import LocalCluster
from poolbudget.adapters.apiclient import close_client
from poolbudget.adapters.credentials import load_configuration
from poolbudget.adapters.informer import DeploymentResource, Informer, watch_client
from poolbudget.adapters.kube import KubeGateway
from poolbudget.domain.cluster_view import ClusterView, Key
from poolbudget.domain.observe import DeploymentState, deployment_state
from poolbudget.domain.rendering import ANNOTATION_CONFIG_HASH
from poolbudget.handlers import WatchedDeployments
from tests.e2e.support import deployment

pytestmark = pytest.mark.cluster

Change = tuple[Key, int | None, int | None]  # (key, replicas before, replicas after)


@pytest.fixture
async def client(local_cluster: LocalCluster) -> AsyncIterator[ApiClient]:
    api = watch_client(await load_configuration(kubeconfig=str(local_cluster.kubeconfig)))
    yield api
    await close_client(api)


class Recorder:
    """The informer's on_change: records (key, replicas before, after) and signals."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.changed = asyncio.Event()

    def __call__(
        self, key: Key, before: DeploymentState | None, after: DeploymentState | None
    ) -> None:
        self.changes.append((key, _replicas(before), _replicas(after)))
        self.changed.set()

    async def until(self, check: Callable[[], bool], what: str) -> None:
        """Wait, without blocking the informer's loop, until a change makes `check` true."""
        try:
            async with asyncio.timeout(30):
                while not check():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pytest.fail(f"timed out after 30 s waiting for {what}")


def _replicas(view: DeploymentState | None) -> int | None:
    return None if view is None else view.replicas


def informer(
    client: ApiClient, namespace: str, recorder: Recorder, *, watch_seconds: float = 300.0
) -> Informer[DeploymentState]:
    return Informer(
        client,
        DeploymentResource,
        kind="Deployment",
        namespace=namespace,
        parse=deployment_state,
        on_change=recorder,
        watch_seconds=watch_seconds,
    )


async def test_lists_then_follows_changes_across_watch_reopens(
    local_cluster: LocalCluster, kube_namespace: str, client: ApiClient
) -> None:
    ns = kube_namespace
    apply = ["apply", "--namespace", ns, "--filename", "-"]
    local_cluster.kubectl(*apply, input=deployment("listed", 2))
    other = ns[:54] + "-x"  # a neighbour, which a namespaced informer must not see
    local_cluster.kubectl("create", "namespace", other)
    try:
        local_cluster.kubectl(
            "apply",
            "--namespace",
            other,
            "--filename",
            "-",
            input=deployment("elsewhere", 1),
        )
        recorder = Recorder()
        watched = informer(client, ns, recorder, watch_seconds=1.0)
        task = asyncio.create_task(watched.run())
        try:
            await asyncio.wait_for(watched.synced.wait(), timeout=30)
            assert recorder.changes == [((ns, "listed"), None, 2)]
            assert set(watched.items) == {(ns, "listed")}, "only its own namespace"

            # The watch is re-opened every second: changes made across re-opens all arrive.
            local_cluster.kubectl(
                "scale", "deployment", "listed", "--namespace", ns, "--replicas=5"
            )
            await recorder.until(lambda: ((ns, "listed"), 2, 5) in recorder.changes, "the scale-up")
            await asyncio.sleep(1.5)  # let at least one re-open happen; not a synchronisation
            local_cluster.kubectl(*apply, input=deployment("added", 1))
            await recorder.until(
                lambda: ((ns, "added"), None, 1) in recorder.changes, "the new one"
            )
            local_cluster.kubectl("delete", "deployment", "listed", "--namespace", ns)
            await recorder.until(
                lambda: ((ns, "listed"), 5, None) in recorder.changes, "the deletion"
            )
            assert (ns, "listed") not in watched.items

            # A label edit leaves the slim view equal: it is not reported. The scale after
            # it is, and nothing between the two.
            added = (ns, "added")
            await recorder.until(
                lambda: not watched.items[added].unobserved, "the controller to settle"
            )
            mark = len(recorder.changes)
            local_cluster.kubectl("label", "deployment", "added", "--namespace", ns, "team=a")
            local_cluster.kubectl("scale", "deployment", "added", "--namespace", ns, "--replicas=2")
            await recorder.until(
                lambda: (added, 1, 2) in recorder.changes, "the scale after the label"
            )
            assert recorder.changes[mark] == (added, 1, 2)
        finally:
            task.cancel()
    finally:
        local_cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


async def test_a_relist_reports_exactly_what_changed_while_it_was_not_watching(
    local_cluster: LocalCluster, kube_namespace: str, client: ApiClient
) -> None:
    ns = kube_namespace
    apply = ["apply", "--namespace", ns, "--filename", "-"]
    for name, replicas in (("kept", 1), ("scaled", 1), ("deleted", 1)):
        local_cluster.kubectl(*apply, input=deployment(name, replicas))
    recorder = Recorder()
    watched = informer(client, ns, recorder)
    task = asyncio.create_task(watched.run())
    await asyncio.wait_for(watched.synced.wait(), timeout=30)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    # A gap: what a broken stream or an expired resourceVersion would hide.
    local_cluster.kubectl("scale", "deployment", "scaled", "--namespace", ns, "--replicas=3")
    local_cluster.kubectl("delete", "deployment", "deleted", "--namespace", ns)
    local_cluster.kubectl(*apply, input=deployment("created", 2))
    recorder.changes.clear()
    watched.synced.clear()

    task = asyncio.create_task(watched.run())  # starts over with a list
    try:
        await asyncio.wait_for(watched.synced.wait(), timeout=30)
        assert sorted(recorder.changes, key=lambda c: c[0]) == [
            ((ns, "created"), None, 2),
            ((ns, "deleted"), 1, None),
            ((ns, "scaled"), 1, 3),
        ]
        assert set(watched.items) == {(ns, "kept"), (ns, "scaled"), (ns, "created")}
    finally:
        task.cancel()


async def test_a_restart_is_seen_at_once_and_the_watch_event_still_corrects_it(
    local_cluster: LocalCluster, kube_namespace: str, client: ApiClient
) -> None:
    # handlers.WatchedDeployments: the gateway's pod-template patch updates the cache from
    # the API server's answer, so a round before the watch event does not find the old
    # template and restart again. Watch stopped during the patch: only that can show it.
    ns = kube_namespace
    local_cluster.kubectl("apply", "--namespace", ns, "--filename", "-", input=deployment("api", 0))
    recorder = Recorder()
    watched = informer(client, ns, recorder)
    deployments = WatchedDeployments(ClusterView())
    deployments.by_scope[ns] = watched
    task = asyncio.create_task(watched.run())
    await recorder.until(lambda: (ns, "api") in watched.items, "the Deployment listed")
    deployments.view.deployment_changed((ns, "api"), None, watched.items[(ns, "api")])
    task.cancel()
    configuration = await load_configuration(kubeconfig=str(local_cluster.kubeconfig))
    gateway = KubeGateway(configuration, deployments=deployments)
    try:
        await gateway.annotate_pod_template(ns, "api", {ANNOTATION_CONFIG_HASH: "abc"})
    finally:
        await gateway.close()
    seen = watched.items[(ns, "api")]
    assert seen.template_hash == "abc"
    assert seen.unobserved  # the controller has yet to see the new generation
    assert deployments.view.deployments[(ns, "api")] is seen
    assert recorder.changes == [((ns, "api"), None, 0)]  # nobody told: the change is ours

    # The watch, resumed, shows what the controller made of it: rolled out (0 replicas).
    task = asyncio.create_task(watched.run())
    try:
        await recorder.until(
            lambda: not watched.items[(ns, "api")].unobserved, "the controller's answer"
        )
    finally:
        task.cancel()
    assert watched.items[(ns, "api")].template_hash == "abc"
    # A patch the watch has shown already is not replaced by the (older) answer.
    shown = watched.items[(ns, "api")]
    deployments.restarted(ns, "api", seen)
    assert watched.items[(ns, "api")] is shown
