"""Kubernetes reads and writes the reconciler needs, over `kubernetes.aio` (the official
client's asyncio flavour, on aiohttp like Kopf).

Only I/O lives here: every method does one API call (or one retried call) and translates
API errors into the small set of exceptions the reconciler understands. Each write is
counted in the `poolbudget_api_writes_total` metric, which is how tests prove that a
no-op reconcile writes nothing.

Requests are built and read as raw JSON (apiclient.request), never through the
generated API classes and models: a patched Deployment comes back whole, and modelling it
to throw it away costs more than the request; importing those classes alone costs about
30 MiB of resident memory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

import aiohttp
from kubernetes.aio.client import ApiClient, Configuration
from kubernetes.aio.client.exceptions import ApiException

from poolbudget import metrics
from poolbudget.adapters.apiclient import (
    TRANSPORT_ERRORS,
    Resource,
    api_client,
    close_client,
    read_json,
    request,
)
from poolbudget.api.status import PoolBudgetStatus
from poolbudget.api.v1alpha1 import API_VERSION, GROUP, KIND, PLURAL, VERSION
from poolbudget.domain.decide import BudgetRef
from poolbudget.domain.observe import DeploymentState, deployment_state

FIELD_MANAGER = "poolbudget-operator"
# Requests in flight at once, and the size of the gateway's connection pool (aiohttp's
# TCPConnector `limit`). aiohttp queues a request beyond the limit until a connection is
# free, and that wait counts against the request's own timeout: hundreds of budgets
# reconciling together (a restart) would fire thousands of requests, and those queued
# longest would time out without ever being sent (seen with httpx's pool at 500 budgets:
# 1,327 failed reconciles). Queued on this semaphore instead, they only wait; with the
# pool exactly as large, a request that holds the semaphore always finds a connection, so
# its timeout measures the API call alone.
MAX_IN_FLIGHT = 32
# Client-side bound on one request, connecting included (aiohttp's `total`). For a write
# it also bounds how late a write can land: one stuck behind a dead connection must not
# reach the API server long after this replica stopped being allowed to write (leader
# election plugs in through `may_write`). Reads get the same bound.
REQUEST_TIMEOUT_SECONDS = 10.0

PoolBudgetResource = Resource(GROUP, VERSION, PLURAL)
MERGE_PATCH = "application/merge-patch+json"
APPLY = "application/apply-patch+yaml"  # a JSON body is valid YAML


class KubeError(Exception):
    """An API call failed. `status` is the API server's HTTP answer (None: no answer, a
    timeout or a broken connection); `api_reason` and `api_message` its Status object's
    reason and message (`Forbidden`, `exceeded quota: ...`), for conditions and Events."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        api_reason: str | None = None,
        api_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.api_reason = api_reason
        self.api_message = api_message


class NotFoundError(KubeError):
    """The object does not exist."""


class SecretKeyMissingError(KubeError):
    """The Secret exists but has no such key (or it is not valid base64 / UTF-8)."""


class NotLeaderError(KubeError):
    """A write refused before it was sent: this replica may not write (`may_write`)."""


class FrozenStrMap(Mapping[str, str]):
    """An immutable str -> str mapping kept as one tuple of interned values, against a key
    index shared by every map with the same keys (every managed ConfigMap has the same
    ten data keys and the same labels). A dict of ten entries is about 650 bytes, this
    about 180; 5,000 ConfigMap views held 4.9 MiB of dicts (tracemalloc after a restart)."""

    __slots__ = ("_index", "_values")
    _indexes: ClassVar[dict[tuple[str, ...], dict[str, int]]] = {}
    _MAX_INDEXES: ClassVar[int] = 1024  # distinct key sets shared; any further are private

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        items = items or {}
        keys = tuple(sorted(sys.intern(str(k)) for k in items))
        index = self._indexes.get(keys)
        if index is None:
            index = {key: position for position, key in enumerate(keys)}
            if len(self._indexes) < self._MAX_INDEXES:
                self._indexes[keys] = index
        self._index = index
        self._values = tuple(sys.intern(str(items[key])) for key in keys)

    def __getitem__(self, key: str) -> str:
        return self._values[self._index[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenStrMap):
            return self._values == other._values and list(self._index) == list(other._index)
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash((tuple(self._index), self._values))

    def __repr__(self) -> str:
        return f"FrozenStrMap({dict(self)!r})"


@dataclass(frozen=True, slots=True)
class ConfigMapView:
    data: FrozenStrMap
    labels: FrozenStrMap
    annotations: FrozenStrMap


def _budget_path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"


def configmap_view(body: dict[str, Any]) -> ConfigMapView:
    """The parts of a ConfigMap the reconciler compares, from its raw JSON.

    Keys and values are interned (FrozenStrMap): every managed ConfigMap has the same ten
    keys and mostly the same values, and the cache holds thousands."""
    metadata = body.get("metadata") or {}
    return ConfigMapView(
        data=FrozenStrMap(body.get("data")),
        labels=FrozenStrMap(metadata.get("labels")),
        annotations=FrozenStrMap(metadata.get("annotations")),
    )


class ConfigMapCache(Protocol):
    """The managed ConfigMaps as last listed or watched (handlers.py keeps one per scope).

    Only ConfigMaps carrying the managed-by label are in it: a miss may still be a
    ConfigMap someone else wrote under that name, so a miss is read from the API server."""

    def cached(self, namespace: str, name: str) -> ConfigMapView | None: ...

    def remember(self, namespace: str, name: str, view: ConfigMapView) -> None: ...


class DeploymentCache(Protocol):
    """The watched Deployments (handlers.py keeps one informer per scope)."""

    def restarted(self, namespace: str, name: str, view: DeploymentState) -> None:
        """Our pod-template patch, as the API server answered it."""


def _translate(exc: ApiException, what: str) -> KubeError:
    if exc.status == 404:
        return NotFoundError(f"{what} not found", status=404)
    # Every call here goes through apiclient.read_json, whose status_error has already put
    # the Status object's message in `body`.
    message = str(exc.body) if exc.body else None
    return KubeError(
        f"{what}: API error {exc.status} {exc.reason}: {message}",
        status=exc.status,
        api_reason=str(exc.reason) if exc.reason else None,
        api_message=message,
    )


Call = Callable[[], Awaitable[aiohttp.ClientResponse]]


class KubeGateway:
    """The operator's Kubernetes access. Construct once per process (see handlers.py).

    `may_write`, when given, is asked before every write (each retry included); when it
    says no, the write is not sent: NotLeaderError, counted in
    `poolbudget_api_writes_refused_total`. Leader election plugs in here.
    """

    def __init__(
        self,
        configuration: Configuration,
        *,
        may_write: Callable[[], bool] | None = None,
        configmaps: ConfigMapCache | None = None,
        deployments: DeploymentCache | None = None,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        self._client: ApiClient = api_client(configuration, MAX_IN_FLIGHT)
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._may_write = may_write
        self._configmaps = configmaps
        self._deployments = deployments
        self._timeout = float(timeout)

    async def close(self) -> None:
        await close_client(self._client)

    async def read_secret_value(self, namespace: str, name: str, key: str) -> str:
        what = f"Secret {namespace}/{name}"
        secret = await self._read_secret(namespace, name)
        if secret is None:
            raise NotFoundError(f"{what} not found")
        raw = (secret.get("data") or {}).get(key)
        if raw is None:
            plain = (secret.get("stringData") or {}).get(key)  # only on freshly applied objects
            if plain is not None:
                return str(plain)
            raise SecretKeyMissingError(f"{what} has no key {key!r}")
        try:
            return base64.b64decode(str(raw), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            # Never include the value: it is a credential.
            raise SecretKeyMissingError(f"{what} key {key!r} is not valid base64 UTF-8") from None

    async def secret_version(self, namespace: str, name: str) -> str | None:
        """The Secret's resourceVersion (it changes with any write), None if it does not
        exist. Needs only `get` on Secrets; the value is read but never kept."""
        secret = await self._read_secret(namespace, name)
        if secret is None:
            return None
        return str((secret.get("metadata") or {}).get("resourceVersion") or "")

    async def _read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(
            f"Secret {namespace}/{name}",
            lambda: self._call("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}"),
        )

    async def _get(self, what: str, call: Call) -> dict[str, Any] | None:
        """One object as raw JSON; None if it does not exist, KubeError on any other
        failure."""
        try:
            async with self._in_flight:
                return await read_json(await call())
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _translate(exc, what) from None
        except TRANSPORT_ERRORS as exc:
            raise KubeError(f"{what}: {type(exc).__name__}") from None

    async def read_configmap(self, namespace: str, name: str) -> ConfigMapView | None:
        """From the cache of managed ConfigMaps when it has it (a restart then reads
        nothing: 5,000 GETs were most of a 5,000-Deployment restart), else one GET."""
        if self._configmaps is not None:
            cached = self._configmaps.cached(namespace, name)
            if cached is not None:
                metrics.CONFIGMAP_READS.labels(source="cache").inc()
                return cached
        metrics.CONFIGMAP_READS.labels(source="api").inc()
        configmap = await self._get(
            f"ConfigMap {namespace}/{name}",
            lambda: self._call("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}"),
        )
        return None if configmap is None else configmap_view(configmap)

    async def budget_exists(self, namespace: str, name: str) -> bool:
        """Whether a PoolBudget of that name exists (to adopt ConfigMaps it left behind)."""
        budget = await self._get(
            f"PoolBudget {namespace}/{name}",
            lambda: self._call("GET", _budget_path(namespace, name)),
        )
        return budget is not None

    async def apply_configmap(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        labels: dict[str, str],
        annotations: dict[str, str],
    ) -> None:
        """Server-side apply; no ownerReference, so deleting the budget leaves it in place."""
        configmap = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels,
                "annotations": annotations,
            },
            "data": data,
        }
        written = await self._write(
            "configmap",
            namespace,
            f"ConfigMap {namespace}/{name}",
            lambda: self._call(
                "PATCH",
                f"/api/v1/namespaces/{namespace}/configmaps/{name}",
                query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
                body=configmap,
                content_type=APPLY,
            ),
        )
        if self._configmaps is not None:
            # The answer is the object as stored: the next reconcile must compare with it,
            # not with the cache's older copy that the watch has yet to replace.
            self._configmaps.remember(namespace, name, configmap_view(written))

    async def annotate_pod_template(
        self, namespace: str, deployment: str, annotations: dict[str, str]
    ) -> None:
        """Patch pod-template annotations: the Deployment controller then rolls the pods."""
        patch = {"spec": {"template": {"metadata": {"annotations": annotations}}}}
        written = await self._write(
            "deployment",
            namespace,
            f"Deployment {namespace}/{deployment}",
            lambda: self._call(
                "PATCH",
                f"/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}",
                query=[("fieldManager", FIELD_MANAGER)],
                body=patch,
                content_type=MERGE_PATCH,
            ),
        )
        if self._deployments is not None:
            self._deployments.restarted(namespace, deployment, deployment_state(written))

    async def patch_budget_status(
        self, namespace: str, name: str, status: PoolBudgetStatus
    ) -> None:
        """Replace the status subresource with `status`: fields it leaves out are removed.

        A JSON merge patch carrying an explicit null for every field the model knows and
        this status leaves out (`PoolBudgetStatus.merge_patch`); lists are replaced whole.
        Until issue 13 the patch left absent fields out, and a field that vanished
        (database.connectionsInUse, database.serverVersion, activity) stayed on the server
        for good. Why this and not the alternatives:

        - Server-side apply on /status would remove only fields owned by this manager's
          Apply entry. Every status written so far is owned by an Update entry of the
          same manager (a merge patch with fieldManager), and an apply does not remove
          fields an Update entry owns: upgraded budgets would keep their stale fields
          until their managedFields were migrated by hand.
        - Nulls computed against the status last written need that status: the operator
          does not re-read its own (BudgetMemory.written_status, handlers.kept_body), so
          after a restart or someone else's edit the diff base is a guess.
        - Nulls for every field of the model need neither: the API server prunes fields
          its schema does not know, so what it can hold is exactly what the model knows,
          and this patch turns any of it into `status` (tests/unit/test_status.py checks
          that property, tests/cluster/test_status_write.py the API server). It costs a
          few dozen bytes of nulls per write and no read.
        """
        await self._write(
            "status",
            namespace,
            f"PoolBudget {namespace}/{name} status",
            lambda: self._call(
                "PATCH",
                f"{_budget_path(namespace, name)}/status",
                query=[("fieldManager", FIELD_MANAGER)],
                body={"status": status.merge_patch()},
                content_type=MERGE_PATCH,
            ),
        )

    async def post_event(self, budget: BudgetRef, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the PoolBudget, as `kubectl describe pbud` shows them."""
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{budget.name}.", "namespace": budget.namespace},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": budget.name,
                "namespace": budget.namespace,
                "uid": budget.uid,
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        await self._write(
            "event",
            budget.namespace,
            f"Event on PoolBudget {budget.namespace}/{budget.name}",
            lambda: self._call("POST", f"/api/v1/namespaces/{budget.namespace}/events", body=event),
        )

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> Awaitable[aiohttp.ClientResponse]:
        return request(
            self._client,
            method,
            path,
            timeout=self._timeout,
            query=query,
            body=body,
            content_type=content_type,
        )

    async def _write(self, kind: str, namespace: str, what: str, call: Call) -> dict[str, Any]:
        """Run one write, asking `may_write` first, bounded by the request timeout. None of
        the writes can conflict (forced server-side apply, patches without a
        resourceVersion, Events by generateName), so none is retried here: a refusal goes
        back to the reconcile, which reports it. Returns the object written, as raw JSON."""
        try:
            async with self._in_flight:
                # Asked once a request slot is ours, right before sending: a write that
                # queued behind others must not go out on a stale answer.
                if self._may_write is not None and not self._may_write():
                    metrics.API_WRITES_REFUSED.labels(kind=kind, reason="NotLeader").inc()
                    raise NotLeaderError(f"{what}: not sent, this replica may not write")
                metrics.API_WRITES.labels(kind=kind, namespace=namespace).inc()
                return await read_json(await call())
        except ApiException as exc:
            raise _translate(exc, what) from None
        except TRANSPORT_ERRORS as exc:
            raise KubeError(f"{what}: {type(exc).__name__}") from None
