"""Kubernetes reads and writes the reconciler needs, over lightkube's async client.

Only I/O lives here: every method does one API call (or one retried call) and translates
API errors into the small set of exceptions the reconciler understands. Each write is
counted in the `poolbudget_api_writes_total` metric, which is how tests prove that a
no-op reconcile writes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Event, Secret
from lightkube.types import PatchType

from poolbudget import metrics
from poolbudget.api.v1alpha1 import API_VERSION, GROUP, KIND, PLURAL, VERSION

FIELD_MANAGER = "poolbudget-operator"
CONFLICT_RETRIES = 5
# Requests in flight at once. Hundreds of budgets reconciling together (a restart) would
# otherwise fire thousands of requests at httpx's pool of 100 connections, and those that
# wait more than its 10 s pool timeout fail (seen at 500 budgets: 1,327 failed reconciles).
# Queued here, they only wait; below the pool size, the pool never times out.
MAX_IN_FLIGHT = 32

PoolBudgetResource = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)


class KubeError(Exception):
    """An API call failed in a way waiting may fix (timeouts, 5xx, conflicts exhausted)."""


class NotFoundError(KubeError):
    """The object does not exist."""


class SecretKeyMissingError(KubeError):
    """The Secret exists but has no such key (or it is not valid base64 / UTF-8)."""


@dataclass(frozen=True)
class ConfigMapView:
    data: dict[str, str]
    labels: dict[str, str]
    annotations: dict[str, str]


@dataclass(frozen=True)
class BudgetRef:
    """What an Event needs to point at the PoolBudget."""

    namespace: str
    name: str
    uid: str


def _translate(exc: ApiError, what: str) -> KubeError:
    code = exc.status.code
    if code == 404:
        return NotFoundError(f"{what} not found")
    return KubeError(f"{what}: API error {code} {exc.status.reason}: {exc.status.message}")


class KubeGateway:
    """The operator's Kubernetes access. Construct once per process (see handlers.py)."""

    def __init__(self, client: AsyncClient | None = None) -> None:
        self._client = client or AsyncClient(field_manager=FIELD_MANAGER)
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def close(self) -> None:
        await self._client.close()

    async def read_secret_value(self, namespace: str, name: str, key: str) -> str:
        what = f"Secret {namespace}/{name}"
        try:
            async with self._in_flight:
                secret = await self._client.get(Secret, name, namespace=namespace)
        except ApiError as exc:
            raise _translate(exc, what) from None
        except httpx2.HTTPError as exc:
            raise KubeError(f"{what}: {type(exc).__name__}") from None
        raw = (secret.data or {}).get(key)
        if raw is None:
            plain = (secret.stringData or {}).get(key)  # only set on freshly applied objects
            if plain is not None:
                return str(plain)
            raise SecretKeyMissingError(f"{what} has no key {key!r}")
        try:
            return base64.b64decode(raw, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            # Never include the value: it is a credential.
            raise SecretKeyMissingError(f"{what} key {key!r} is not valid base64 UTF-8") from None

    async def secret_version(self, namespace: str, name: str) -> str | None:
        """The Secret's resourceVersion (it changes with any write), None if it does not
        exist. Needs only `get` on Secrets; the value is read but never kept."""
        secret = await self._get_or_none(Secret, namespace, name)
        if secret is None:
            return None
        return str((secret.metadata or ObjectMeta()).resourceVersion or "")

    async def _get_or_none(self, resource: Any, namespace: str, name: str) -> Any | None:
        """One object by name; None if it does not exist, KubeError on any other failure."""
        what = f"{resource.__name__} {namespace}/{name}"
        try:
            async with self._in_flight:
                return await self._client.get(resource, name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise _translate(exc, what) from None
        except httpx2.HTTPError as exc:
            raise KubeError(f"{what}: {type(exc).__name__}") from None

    async def read_configmap(self, namespace: str, name: str) -> ConfigMapView | None:
        configmap = await self._get_or_none(ConfigMap, namespace, name)
        if configmap is None:
            return None
        metadata = configmap.metadata or ObjectMeta()
        return ConfigMapView(
            data=dict(configmap.data or {}),
            labels=dict(metadata.labels or {}),
            annotations=dict(metadata.annotations or {}),
        )

    async def budget_exists(self, namespace: str, name: str) -> bool:
        """Whether a PoolBudget of that name exists (to adopt ConfigMaps it left behind)."""
        return await self._get_or_none(PoolBudgetResource, namespace, name) is not None

    async def apply_configmap(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        labels: dict[str, str],
        annotations: dict[str, str],
    ) -> None:
        """Server-side apply; no ownerReference, so deleting the budget leaves it in place."""
        configmap = ConfigMap(
            metadata=ObjectMeta(
                name=name, namespace=namespace, labels=labels, annotations=annotations
            ),
            data=data,
        )
        await self._write(
            "configmap",
            namespace,
            f"ConfigMap {namespace}/{name}",
            lambda: self._client.apply(configmap, field_manager=FIELD_MANAGER, force=True),
        )

    async def annotate_pod_template(
        self, namespace: str, deployment: str, annotations: dict[str, str]
    ) -> None:
        """Patch pod-template annotations: the Deployment controller then rolls the pods."""
        patch = {"spec": {"template": {"metadata": {"annotations": annotations}}}}
        await self._write(
            "deployment",
            namespace,
            f"Deployment {namespace}/{deployment}",
            lambda: self._client.patch(
                Deployment,
                deployment,
                patch,
                namespace=namespace,
                patch_type=PatchType.MERGE,
                field_manager=FIELD_MANAGER,
            ),
        )

    async def patch_budget_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """A merge patch of the status subresource (lists in it are replaced whole)."""
        await self._write(
            "status",
            namespace,
            f"PoolBudget {namespace}/{name} status",
            lambda: self._client.patch(
                PoolBudgetResource.Status,
                name,
                {"status": status},
                namespace=namespace,
                patch_type=PatchType.MERGE,
                field_manager=FIELD_MANAGER,
            ),
        )

    async def post_event(self, budget: BudgetRef, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the PoolBudget, as `kubectl describe pbud` shows them."""
        now = datetime.now(UTC)
        event = Event(
            metadata=ObjectMeta(generateName=f"{budget.name}.", namespace=budget.namespace),
            involvedObject=ObjectReference(
                apiVersion=API_VERSION,
                kind=KIND,
                name=budget.name,
                namespace=budget.namespace,
                uid=budget.uid,
            ),
            type=type_,
            reason=reason,
            message=message[:1024],
            source=EventSource(component=FIELD_MANAGER),
            reportingComponent=FIELD_MANAGER,
            reportingInstance=FIELD_MANAGER,
            firstTimestamp=now,
            lastTimestamp=now,
            count=1,
        )
        await self._write(
            "event",
            budget.namespace,
            f"Event on PoolBudget {budget.namespace}/{budget.name}",
            lambda: self._client.create(event),
        )

    async def _write(self, kind: str, namespace: str, what: str, call: Any) -> None:
        """Run one write; retry conflicts (409) with a short backoff, nothing else blindly."""
        for attempt in range(CONFLICT_RETRIES):
            metrics.API_WRITES.labels(kind=kind, namespace=namespace).inc()
            try:
                async with self._in_flight:
                    await call()
                return
            except ApiError as exc:
                if exc.status.code == 409 and attempt + 1 < CONFLICT_RETRIES:
                    await asyncio.sleep(0.05 * 2**attempt)
                    continue
                raise _translate(exc, what) from None
            except httpx2.HTTPError as exc:
                raise KubeError(f"{what}: {type(exc).__name__}") from None
