"""Keeps the admission guard's parameters current: the `poolbudget-admission` ConfigMap
in each namespace with budgets (`poolbudget run` with POOLBUDGET_ADMISSION_PARAMS=true;
the chart sets it with `admissionGuard.enabled`).

Each budget's reconcile hands its limits here once it has a plan (domain/admission.py
computes them); they are merged into the namespace's ConfigMap with the other budgets'
entries and written only when a number changed. The budgets of one namespace share the
ConfigMap, so its read-merge-write runs under one lock per namespace (one operator process
writes: the leader, and every write goes through the gateway's write fence). A failed
write is logged and retried at the budget's next reconcile; it never fails the budget.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Protocol

from poolbudget.adapters.kube import KubeError
from poolbudget.domain.admission import (
    LABEL_COMPONENT,
    PARAMS_COMPONENT,
    PARAMS_CONFIGMAP,
    AdmissionLimit,
    merge_params,
    params_entries,
    same_limits,
    without_budget,
)
from poolbudget.domain.rendering import LABEL_MANAGED_BY, MANAGED_BY

logger = logging.getLogger("poolbudget.admission")

# Set to true (or 1, yes) to have `poolbudget run` write the guard's parameters.
ENV_ADMISSION_PARAMS = "POOLBUDGET_ADMISSION_PARAMS"


def enabled_by(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


class ConfigMapData(Protocol):
    @property
    def data(self) -> Mapping[str, str]: ...


class ParamsStore(Protocol):
    """What the publisher needs of the gateway (adapters/kube.py's KubeGateway)."""

    async def read_configmap(self, namespace: str, name: str) -> ConfigMapData | None: ...
    async def apply_configmap(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        labels: dict[str, str],
        annotations: dict[str, str],
    ) -> None: ...


PARAMS_LABELS = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: PARAMS_COMPONENT}


class AdmissionParams:
    """Writes each namespace's params ConfigMap from its budgets' limits."""

    def __init__(self, store: ParamsStore, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}

    async def publish(
        self, namespace: str, budget: str, generation: int, limits: Sequence[AdmissionLimit]
    ) -> None:
        """Merge one budget's limits into its namespace's ConfigMap (no write if the
        numbers are the same)."""
        entries = params_entries(limits, generation=generation, computed_at=self._clock())
        await self._update(namespace, budget, lambda data: merge_params(data, budget, entries))

    async def forget(self, namespace: str, budget: str) -> None:
        """A deleted budget's entries go (a target another budget takes over is written
        by that budget's reconcile)."""
        await self._update(namespace, budget, lambda data: without_budget(data, budget))

    async def _update(
        self,
        namespace: str,
        budget: str,
        change: Callable[[Mapping[str, str]], dict[str, str]],
    ) -> None:
        lock = self._locks.setdefault(namespace, asyncio.Lock())
        async with lock:
            try:
                existing = await self._store.read_configmap(namespace, PARAMS_CONFIGMAP)
                current = {} if existing is None else dict(existing.data)
                wanted = change(current)
                if same_limits(current, wanted) and (existing is not None or not wanted):
                    return
                await self._store.apply_configmap(
                    namespace, PARAMS_CONFIGMAP, wanted, dict(PARAMS_LABELS), {}
                )
            except KubeError as exc:  # the guard's parameters must never fail a budget
                logger.warning(
                    "%s/%s: admission parameters not written (%s: %s); retried at the "
                    "next reconcile",
                    namespace,
                    budget,
                    type(exc).__name__,
                    exc,
                )
