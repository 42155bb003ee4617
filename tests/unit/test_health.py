"""/healthz fails when an informer has stopped: a blind operator must be restarted."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from poolbudget import handlers
from poolbudget.adapters.informer import DeploymentResource, Informer


def runtime_with(task: asyncio.Task[Any]) -> handlers.Runtime:
    # The probe reads only the informers and their tasks; nothing here talks to an API.
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


async def test_a_running_informer_reports_its_count_once_listed() -> None:
    task = asyncio.create_task(asyncio.Event().wait())
    runtime = runtime_with(task)
    try:
        assert handlers.informer_health(runtime) == {"Deployment (shop)": "listing"}
        runtime.informers[0].synced.set()
        assert handlers.informer_health(runtime) == {"Deployment (shop)": 1}
    finally:
        task.cancel()


async def test_a_stopped_informer_fails_the_probe() -> None:
    async def crash() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(crash())
    await asyncio.gather(task, return_exceptions=True)
    with pytest.raises(kopf.PermanentError, match="Deployment informer \\(shop\\) stopped"):
        handlers.informer_health(runtime_with(task))
