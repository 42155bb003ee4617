"""The operator's probes against the real API server: an informer that RBAC forbids to
list makes the operator not-ready at once and not-live once the stall bound passes; an
informer whose connection stops carrying anything (a TCP proxy of the test's that stops
forwarding) makes it not-live after the bound, and live again once traffic resumes.

The shared API server is never stopped or paused here: the stall is the proxy's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from devtools.localcluster import LocalCluster
from poolbudget import handlers
from poolbudget.adapters.apiclient import close_client
from poolbudget.adapters.credentials import load_configuration
from poolbudget.adapters.health import ProbeResult

pytestmark = pytest.mark.cluster

STALL_SECONDS = 4.0  # the liveness bound under test (the operator's default is 600 s)
WATCH_SECONDS = 1.0  # re-open often, so healthy informers progress well inside the bound


class PausableProxy:
    """A TCP proxy to the API server that can stop forwarding (bytes are held, not
    dropped) and resume: to the client, the server has gone silent."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        for task in (
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
            await self.flowing.wait()  # an end of stream is held like the data before it
        except ConnectionError:
            pass
        finally:
            writer.close()


async def _until(
    probe: Callable[[], ProbeResult], ok: bool, what: str, seconds: float
) -> ProbeResult:
    """Poll a probe, as the kubelet does, until it answers `ok`, within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                result = probe()
                if result.ok == ok:
                    return result
                await asyncio.sleep(0.2)
    except TimeoutError:
        pytest.fail(f"timed out after {seconds} s waiting for {what}: {probe().report}")


@contextlib.asynccontextmanager
async def informers_running(
    namespace: str, *, kubeconfig: str, host: str | None = None
) -> AsyncIterator[handlers.Runtime]:
    """The operator's informers for one namespace, as handlers.startup starts them, with
    the probes' bound and the watch period shortened for the test."""
    configuration = await load_configuration(kubeconfig=kubeconfig)
    if host is not None:  # through the proxy, still verifying the server's certificate
        configuration.tls_server_name = urlsplit(configuration.host).hostname
        configuration.host = host
    runtime = handlers.Runtime(
        kube=None,  # type: ignore[arg-type]  # the probes read only the informers
        reconciler=None,  # type: ignore[arg-type]
        configuration=configuration,
        informer_stall_seconds=STALL_SECONDS,
        watch_seconds=WATCH_SECONDS,
    )
    runtime.start_informers([namespace])
    try:
        yield runtime
    finally:
        for task in runtime.informer_tasks:
            task.cancel()
        await asyncio.gather(*runtime.informer_tasks, return_exceptions=True)
        for client in runtime.watch_clients:
            await close_client(client)


async def test_an_informer_forbidden_to_list_is_not_ready_then_not_live(
    crd_installed: LocalCluster, kube_namespace: str
) -> None:
    cluster, ns = crd_installed, kube_namespace
    kubeconfig = cluster.serviceaccount_kubeconfig(ns, "operator")
    # Everything the informers need except Deployments.
    cluster.kubectl(
        "create",
        "role",
        "informers",
        "--namespace",
        ns,
        "--verb=list,watch",
        "--resource=horizontalpodautoscalers.autoscaling,poolbudgets.poolbudget.dev,configmaps",
    )
    cluster.kubectl(
        "create",
        "rolebinding",
        "informers",
        "--namespace",
        ns,
        "--role=informers",
        f"--serviceaccount={ns}:operator",
    )
    async with informers_running(ns, kubeconfig=str(kubeconfig)) as runtime:

        def forbidden_seen() -> ProbeResult:
            ready = handlers.readiness(runtime)
            state = ready.report["informers"][f"Deployment ({ns})"]
            return ProbeResult(ok=isinstance(state, str) and "403" in state, report=ready.report)

        await _until(forbidden_seen, True, "the Deployment informer's 403", seconds=30)
        # RBAC is eventually consistent: the others list once their Role is in effect.
        await _until(
            lambda: ProbeResult(
                ok=all(
                    isinstance(v, int)
                    for k, v in handlers.readiness(runtime).report["informers"].items()
                    if not k.startswith("Deployment")
                ),
                report=handlers.readiness(runtime).report,
            ),
            True,
            "the permitted informers to list",
            seconds=30,
        )
        ready = handlers.readiness(runtime)
        assert not ready.ok
        assert ready.report["informers"][f"Deployment ({ns})"] == (
            "failing: API error 403 Forbidden"
        )

        dead = await _until(
            lambda: handlers.liveness(runtime), False, "liveness to fail", seconds=30
        )
        states: dict[str, Any] = dead.report["informers"]
        deployments = states.pop(f"Deployment ({ns})")
        assert deployments.startswith("stalled: no list or watch progress for ")
        assert deployments.endswith("; failing: API error 403 Forbidden")
        assert all(isinstance(count, int) for count in states.values()), states


async def test_a_silent_connection_fails_liveness_until_traffic_resumes(
    crd_installed: LocalCluster, kube_namespace: str
) -> None:
    cluster, ns = crd_installed, kube_namespace
    server = urlsplit(cluster.server_url)
    assert server.hostname is not None
    assert server.port is not None
    proxy = PausableProxy(server.hostname, server.port)
    port = await proxy.start()
    try:
        async with informers_running(
            ns, kubeconfig=str(cluster.kubeconfig), host=f"https://127.0.0.1:{port}"
        ) as runtime:
            await _until(lambda: handlers.readiness(runtime), True, "the lists", seconds=30)
            # Several watch periods pass: re-opened watches keep it alive.
            await asyncio.sleep(STALL_SECONDS + 2 * WATCH_SECONDS)
            assert handlers.liveness(runtime).ok, handlers.liveness(runtime).report

            proxy.flowing.clear()
            dead = await _until(
                lambda: handlers.liveness(runtime), False, "liveness to fail", seconds=30
            )
            assert all(
                str(state).startswith("stalled: ") for state in dead.report["informers"].values()
            ), dead.report

            proxy.flowing.set()
            await _until(lambda: handlers.liveness(runtime), True, "liveness again", seconds=30)
            assert handlers.readiness(runtime).ok
    finally:
        await proxy.stop()
