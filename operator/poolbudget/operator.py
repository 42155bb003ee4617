"""`poolbudget run`: start Kopf with the handlers, metrics and health endpoints."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import kopf
from prometheus_client import start_http_server

from poolbudget import handlers
from poolbudget.adapters.health import StandbyHealth
from poolbudget.adapters.leader import run_elected
from poolbudget.admission import ENV_ADMISSION_PARAMS, enabled_by
from poolbudget.domain.leadership import Fence, LeaderTimings


def run_operator(
    *,
    namespaces: list[str],
    leader_election_namespace: str | None,
    metrics_port: int,
    health_port: int,
    bind_address: str,
    peering: str | None,
    priority: int,
    verbose: bool,
    database_connection_lifetime: float = 300.0,
    secret_check_seconds: float = 10.0,
    informer_stall_seconds: float = 600.0,
    leader_timings: LeaderTimings | None = None,
    admission_params: bool | None = None,
) -> int:
    """`admission_params`: keep the admission guard's parameters (poolbudget/admission.py);
    None reads POOLBUDGET_ADMISSION_PARAMS (the chart sets it)."""
    if admission_params is None:
        admission_params = enabled_by(os.environ.get(ENV_ADMISSION_PARAMS))
    assert handlers.budget_changed is not None  # importing the module registered the handlers
    kopf.configure(verbose=verbose, log_prefix=True)
    # One line per HTTP request and per handled watch event is noise at INFO; our own
    # reconcile summary lines (logger "poolbudget.reconcile") say what happened.
    quiet = logging.DEBUG if verbose else logging.WARNING
    for noisy in ("kubernetes.aio", "kopf.objects", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(quiet)
    if metrics_port:
        start_http_server(metrics_port, addr=bind_address)
    health = (bind_address, health_port) if health_port else None

    def options(**memo: Any) -> dict[str, Any]:
        """kopf.run's and kopf.operator's arguments."""
        return {
            "clusterwide": not namespaces,
            "namespaces": namespaces,
            "standalone": peering is None,
            "peering_name": peering,
            "priority": priority,
            "memo": kopf.Memo(
                namespaces=namespaces,
                health=health,
                database_connection_lifetime=database_connection_lifetime,
                secret_check_seconds=secret_check_seconds,
                informer_stall_seconds=informer_stall_seconds,
                admission_params=admission_params,
                **memo,
            ),
        }

    if not leader_election_namespace:
        kopf.run(**options())
        return 0
    # Several replicas: only the Lease holder runs Kopf (see adapters/leader.py). A standby
    # still answers its probes, so the kubelet neither restarts it in a loop nor holds up
    # a rollout of the operator's Deployment on it.
    timings = leader_timings or LeaderTimings()

    async def lead(fence: Fence) -> None:
        await kopf.operator(**options(fence=fence, leader_timings=timings))

    def standby() -> Callable[[], None]:
        return StandbyHealth(bind_address, health_port).stop if health_port else lambda: None

    election = run_elected(
        namespace=leader_election_namespace, timings=timings, lead=lead, standby=standby
    )
    return asyncio.run(election)
