"""Liveness and readiness as the kubelet sees them, from the informers' state.

Liveness fails only when an informer has stopped (a restart cures a blind operator);
readiness fails until every informer has listed and while one cannot list (a restart
would not cure a missing RBAC rule)."""

from __future__ import annotations

import asyncio
from typing import Any

from poolbudget import handlers
from poolbudget.adapters.informer import DeploymentResource, Informer


def runtime_with(task: asyncio.Task[Any]) -> handlers.Runtime:
    # The probes read only the informers and their tasks; nothing here talks to an API.
    runtime = handlers.Runtime(kube=None, reconciler=None)  # type: ignore[arg-type]
    informer: Informer[Any] = Informer(
        None,  # type: ignore[arg-type]
        DeploymentResource,
        kind="Deployment",
        namespace="shop",
        parse=dict,
        on_change=lambda *_: None,
    )
    informer.items[("shop", "api")] = {}
    runtime.informers, runtime.informer_tasks = [informer], [task]
    return runtime


async def test_listing_is_alive_but_not_ready_then_ready_with_its_count() -> None:
    task = asyncio.create_task(asyncio.Event().wait())
    runtime = runtime_with(task)
    try:
        live, ready = handlers.liveness(runtime), handlers.readiness(runtime)
        assert live.ok
        assert not ready.ok
        assert ready.report["informers"] == {"Deployment (shop)": "listing"}

        runtime.informers[0].synced.set()
        live, ready = handlers.liveness(runtime), handlers.readiness(runtime)
        assert live.ok
        assert ready.ok
        assert ready.report == {"budgets": 0, "informers": {"Deployment (shop)": 1}}
    finally:
        task.cancel()


async def test_an_informer_that_cannot_list_is_not_ready_but_alive() -> None:
    task = asyncio.create_task(asyncio.Event().wait())
    runtime = runtime_with(task)
    try:
        informer = runtime.informers[0]
        informer.synced.set()
        informer.failing = "403 Forbidden"
        assert handlers.liveness(runtime).ok
        ready = handlers.readiness(runtime)
        assert not ready.ok
        assert ready.report["informers"] == {"Deployment (shop)": "failing: 403 Forbidden"}
    finally:
        task.cancel()


async def test_a_stopped_informer_fails_liveness() -> None:
    async def crash() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(crash())
    await asyncio.gather(task, return_exceptions=True)
    runtime = runtime_with(task)
    runtime.informers[0].synced.set()
    live = handlers.liveness(runtime)
    assert not live.ok
    assert live.report["informers"] == {"Deployment (shop)": "stopped"}
    assert not handlers.readiness(runtime).ok
