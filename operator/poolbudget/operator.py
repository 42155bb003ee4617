"""`poolbudget run`: start Kopf with the handlers, metrics and health endpoints."""

from __future__ import annotations

import logging

import kopf
from prometheus_client import start_http_server

from poolbudget import handlers


def run_operator(
    *,
    namespaces: list[str],
    metrics_port: int,
    health_port: int,
    bind_address: str,
    peering: str | None,
    priority: int,
    verbose: bool,
) -> int:
    assert handlers.budget_daemon is not None  # importing the module registered the handlers
    kopf.configure(verbose=verbose, log_prefix=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # request lines are noise at INFO
    if metrics_port:
        start_http_server(metrics_port, addr=bind_address)
    liveness = f"http://{bind_address}:{health_port}/healthz" if health_port else None
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=peering is None,
        peering_name=peering,
        priority=priority,
        liveness_endpoint=liveness,
    )
    return 0
