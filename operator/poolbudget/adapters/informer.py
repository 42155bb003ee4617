"""List-then-watch caches of slim views, one per resource kind and namespace scope.

The operator keeps its own stores rather than using `@kopf.index`: Kopf holds every
handler until each listed object is indexed, with one readiness toggle per object and
every waiting worker re-checking all toggles on each change. A 5,000-Deployment restart
spent about 75% of its CPU there (py-spy). An informer lists once, then watches from the
list's resourceVersion, so its store is exactly the API server's state with no gap:
an object deleted between the list and the watch still arrives as a DELETED event.

Each change that alters a view calls `on_change(key, before, after)` (None = absent), so
callers only ever see differences. A relist (start-up, an expired resourceVersion, a
broken stream) diffs the new list against the store and reports only what changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import aiohttp
from kubernetes.aio.client import ApiClient, Configuration
from kubernetes.aio.client.exceptions import ApiException

from poolbudget import metrics
from poolbudget.adapters.apiclient import (
    TRANSPORT_ERRORS,
    Resource,
    api_client,
    describe,
    read_json,
    request,
    status_error,
)
from poolbudget.domain.cluster_view import Key

logger = logging.getLogger("poolbudget.informer")

View = TypeVar("View")
OnChange = Callable[[Key, View | None, View | None], None]

# Raw JSON bodies (json.loads of the response), never kubernetes' generated models. For a
# list of 5,000 realistic Deployments (20 MB, managedFields included), measured on saved
# JSON: json.loads plus our slim views took 413 ms (json.loads alone 275 ms) and peaked at
# 92 MB; ApiClient.deserialize into V1DeploymentList took 1,091 ms and peaked at 223 MB,
# before a single view was taken from the models. The same holds per watch event. Hence
# `call_api` on the collection's path, and the watch stream read line by line here, not
# kubernetes.aio.watch.Watch (which builds a model per event).
DeploymentResource = Resource("apps", "v1", "deployments")
HpaResource = Resource("autoscaling", "v2", "horizontalpodautoscalers")
ConfigMapResource = Resource("", "v1", "configmaps")

WatchClient = ApiClient
# Connections of one scope's watch pool: its four informers (Deployments, HPAs,
# PoolBudgets, managed ConfigMaps) each hold one for as long as their watch is open, and
# list or watch one request at a time; one spare, so a connection still closing never
# holds up a relist.
WATCH_CONNECTIONS = 5


def watch_client(configuration: Configuration) -> WatchClient:
    """A client for the informers of one scope, apart from the one that writes: each watch
    holds one of its pool's connections for good, so sharing the writers' pool would
    starve the writes once a few namespaces are watched."""
    return api_client(configuration, WATCH_CONNECTIONS)


LIST_CHUNK = 500
# Client-side bound on one list chunk (a request and its whole body).
LIST_TIMEOUT_SECONDS = 60.0
# Re-open the watch this often, from the last resourceVersion seen: the API server ends
# the stream after `timeoutSeconds`. The client gives up WATCH_GRACE_SECONDS later (the
# request's total timeout): a stream that died silently (a dropped connection with no
# FIN) then heals itself too. An idle informer still makes progress (see `progressed`)
# at least once per period; the liveness bound (--informer-stall-seconds) must exceed it.
WATCH_SECONDS = 300.0
WATCH_GRACE_SECONDS = 30.0
# Relisting at most every 2 s while the API server is down costs little, and bounds how
# long after its return the operator still works from an old cache (it was 30 s: after a
# minute's outage a change took 11-16 s to be applied).
MAX_BACKOFF_SECONDS = 2.0


class Informer(Generic[View]):
    """A list+watch store of `parse(body)` views for one resource in one scope."""

    def __init__(
        self,
        client: ApiClient,
        resource: Resource,
        *,
        kind: str,
        namespace: str | None,
        parse: Callable[[Mapping[str, Any]], View],
        on_change: OnChange[View],
        watch_seconds: float = WATCH_SECONDS,
        label_selector: str | None = None,
    ) -> None:
        self.items: dict[Key, View] = {}
        self.synced = asyncio.Event()
        # Why the last list or watch failed, until a list succeeds again (readiness).
        self.failing: str | None = None
        # time.monotonic() of the last progress: a completed list, a watch stream that
        # ended as the server closes it, or an event or bookmark received (liveness).
        self.progressed = time.monotonic()
        self._client = client
        self._resource = resource
        self.kind = kind
        self._namespace = namespace
        self._parse = parse
        self._on_change = on_change
        self._watch_seconds = watch_seconds
        self._selector: list[tuple[str, Any]] = (
            [("labelSelector", label_selector)] if label_selector else []
        )

    @property
    def scope(self) -> str:
        return "all namespaces" if self._namespace is None else self._namespace

    def stalled_for(self, now: float) -> float:
        """Seconds since the last progress."""
        return now - self.progressed

    async def run(self) -> None:
        """List, then watch, forever; failures back off and start over with a list."""
        backoff = 1.0
        self.progressed = time.monotonic()
        while True:
            try:
                version = await self._relist()
                self.synced.set()
                self.failing = None
                backoff = 1.0
                await self._watch(version)
            except (ApiException, *TRANSPORT_ERRORS) as exc:
                if isinstance(exc, ApiException) and exc.status == 410:
                    logger.info(
                        "%s watch (%s): resourceVersion expired, relisting", self.kind, self.scope
                    )
                    continue
                self.failing = describe(exc)
                # Changes made while the stream was broken are not in the cache: nobody
                # decides on it until a relist (the budget loops wait for `synced`).
                self.synced.clear()
                logger.warning(
                    "%s watch (%s) failed: %s; relisting in %.0f s",
                    self.kind,
                    self.scope,
                    describe(exc),
                    backoff,
                )
            except Exception as exc:  # a parser or callback bug must not end the watch for good
                self.failing = type(exc).__name__
                self.synced.clear()
                logger.exception(
                    "%s watch (%s) failed; relisting in %.0f s", self.kind, self.scope, backoff
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _request(
        self, query: list[tuple[str, Any]], seconds: float
    ) -> aiohttp.ClientResponse:
        """GET the collection with `query`, bounded by `seconds` in all (aiohttp's total
        timeout, which for a watch covers the whole stream); the bare response, whatever
        its status."""
        path = self._resource.path(self._namespace)
        return await request(self._client, "GET", path, timeout=seconds, query=query)

    async def _relist(self) -> str:
        """List in chunks (limit/continue: one consistent snapshot); return its version.
        An expired continue token is a 410, which `run` answers with a fresh list."""
        metrics.WATCH_RELISTS.labels(resource=self.kind).inc()
        fresh: dict[Key, View] = {}
        token: str | None = None
        while True:
            query: list[tuple[str, Any]] = [*self._selector, ("limit", LIST_CHUNK)]
            if token:
                query.append(("continue", token))
            page = await read_json(await self._request(query, LIST_TIMEOUT_SECONDS))
            for item in page.get("items") or ():
                view = self._view(item)
                if view is not None:
                    fresh[_key(item)] = view
            metadata = page.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                version = str(metadata.get("resourceVersion") or "")
                break
        for key in [k for k in self.items if k not in fresh]:
            self._set(key, None)
        for key, view in fresh.items():
            self._set(key, view)
        self.progressed = time.monotonic()
        return version

    async def _watch(self, version: str) -> None:
        """Follow changes from `version`; returns never, raises on any stream error."""
        query_seconds = max(1, math.ceil(self._watch_seconds))
        while True:
            query: list[tuple[str, Any]] = [
                *self._selector,
                ("watch", "true"),
                ("resourceVersion", version),
                ("allowWatchBookmarks", "true"),
                ("timeoutSeconds", query_seconds),
            ]
            try:
                response = await self._request(query, self._watch_seconds + WATCH_GRACE_SECONDS)
                async with response:
                    if response.status >= 400:
                        raise status_error(response.status, response.reason, await response.read())
                    async for line in response.content:  # one JSON event per line
                        if line.strip():
                            version = self._event(json.loads(line), version)
                # The server ended the stream at timeoutSeconds: re-open from `version`.
                self.progressed = time.monotonic()
            except TimeoutError:
                # No end from the server in time: the connection is presumed dead (it is
                # closed with the response). Not progress: re-open, and if nothing ever
                # arrives again, liveness says so.
                logger.info("%s watch (%s): no end in time, re-opening", self.kind, self.scope)

    def _event(self, event: Mapping[str, Any], version: str) -> str:
        """Apply one watch event; return the resourceVersion to resume from."""
        event_type, body = event.get("type"), event.get("object") or {}
        if event_type == "ERROR":  # e.g. 410 Gone: the version is too old to watch from
            raise ApiException(
                status=body.get("code"), reason=body.get("reason"), body=body.get("message")
            )
        self.progressed = time.monotonic()
        version = (body.get("metadata") or {}).get("resourceVersion") or version
        if event_type == "DELETED":
            self._set(_key(body), None)
        elif event_type in ("ADDED", "MODIFIED"):
            self._set(_key(body), self._view(body))
        # BOOKMARK: only the resourceVersion matters
        return str(version)

    def _view(self, body: Mapping[str, Any]) -> View | None:
        try:
            return self._parse(body)
        except (TypeError, ValueError) as exc:  # a body no schema should have let through
            logger.warning("%s %s/%s ignored: %s", self.kind, *_key(body), exc)
            return None

    def remember(self, key: Key, view: View) -> None:
        """Record what our own write left, before the watch reports it. Tells nobody (the
        change is ours); the watch event that follows then finds nothing new."""
        self.items[key] = view
        metrics.WATCHED_OBJECTS.labels(resource=self.kind, scope=self.scope).set(len(self.items))

    def _set(self, key: Key, view: View | None) -> None:
        before = self.items.get(key)
        if view is None:
            if key not in self.items:
                return
            del self.items[key]
        else:
            if key in self.items and before == view:
                return
            self.items[key] = view
        metrics.WATCHED_OBJECTS.labels(resource=self.kind, scope=self.scope).set(len(self.items))
        self._on_change(key, before, view)


def listed_informer(
    by_scope: Mapping[str | None, Informer[View]], namespace: str
) -> Informer[View] | None:
    """The informer covering `namespace` (its own, else the all-namespaces one), once it
    has listed; None before that."""
    informer = by_scope.get(namespace) or by_scope.get(None)
    return informer if informer is not None and informer.synced.is_set() else None


def _key(body: Mapping[str, Any]) -> Key:
    metadata = body["metadata"]
    # Interned: thousands of keys share a few namespaces, and each body parsed its own.
    return (sys.intern(str(metadata["namespace"])), str(metadata["name"]))
