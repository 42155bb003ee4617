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
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, Generic, TypeVar

import httpx2
from lightkube import ALL_NS, ApiError, AsyncClient
from lightkube.generic_resource import create_namespaced_resource
from lightkube.types import on_error_raise

from poolbudget import metrics
from poolbudget.domain.cluster_view import Key

logger = logging.getLogger("poolbudget.informer")

View = TypeVar("View")
OnChange = Callable[[Key, View | None, View | None], None]

# Raw dict bodies (lightkube's Generic resources), not typed models: parsing 5,000 full
# Deployment models only to keep six fields of each would cost more than the watch.
DeploymentResource = create_namespaced_resource("apps", "v1", "Deployment", "deployments")
HpaResource = create_namespaced_resource(
    "autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"
)

WatchClient = AsyncClient


def watch_client() -> WatchClient:
    """A client for the informers of one scope, apart from the one that writes: each watch
    holds one of its pool's 100 connections for good, so sharing the writers' pool would
    starve it once 30-odd namespaces are watched."""
    return AsyncClient()


LIST_CHUNK = 500
# Re-open the watch this often, from the last resourceVersion seen: a stream that died
# silently (a dropped connection with no FIN) then heals itself.
WATCH_SECONDS = 300.0
# Relisting at most every 2 s while the API server is down costs little, and bounds how
# long after its return the operator still works from an old cache (it was 30 s: after a
# minute's outage a change took 11-16 s to be applied).
MAX_BACKOFF_SECONDS = 2.0


class Informer(Generic[View]):
    """A list+watch store of `parse(body)` views for one resource in one scope."""

    def __init__(
        self,
        client: AsyncClient,
        resource: Any,
        *,
        kind: str,
        namespace: str | None,
        parse: Callable[[Mapping[str, Any]], View],
        on_change: OnChange[View],
        watch_seconds: float = WATCH_SECONDS,
    ) -> None:
        self.items: dict[Key, View] = {}
        self.synced = asyncio.Event()
        # Why the last list or watch failed, until a list succeeds again (readiness).
        self.failing: str | None = None
        self._client = client
        self._resource = resource
        self.kind = kind
        self._namespace = namespace or ALL_NS
        self._parse = parse
        self._on_change = on_change
        self._watch_seconds = watch_seconds

    @property
    def scope(self) -> str:
        return "all namespaces" if self._namespace == ALL_NS else self._namespace

    async def run(self) -> None:
        """List, then watch, forever; failures back off and start over with a list."""
        backoff = 1.0
        while True:
            try:
                version = await self._relist()
                self.synced.set()
                self.failing = None
                backoff = 1.0
                await self._watch(version)
            except (ApiError, httpx2.HTTPError) as exc:
                if isinstance(exc, ApiError) and exc.status.code == 410:
                    logger.info(
                        "%s watch (%s): resourceVersion expired, relisting", self.kind, self.scope
                    )
                    continue
                self.failing = _describe(exc)
                # Changes made while the stream was broken are not in the cache: nobody
                # decides on it until a relist (the budget loops wait for `synced`).
                self.synced.clear()
                logger.warning(
                    "%s watch (%s) failed: %s; relisting in %.0f s",
                    self.kind,
                    self.scope,
                    _describe(exc),
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

    async def _relist(self) -> str:
        metrics.WATCH_RELISTS.labels(resource=self.kind).inc()
        listing = self._client.list(
            self._resource, namespace=self._namespace, chunk_size=LIST_CHUNK
        )
        fresh: dict[Key, View] = {}
        async for body in listing:
            view = self._view(body)
            if view is not None:
                fresh[_key(body)] = view
        for key in [k for k in self.items if k not in fresh]:
            self._set(key, None)
        for key, view in fresh.items():
            self._set(key, view)
        return listing.resourceVersion

    async def _watch(self, version: str) -> None:
        """Follow changes from `version`; returns never, raises on any stream error."""
        while True:
            stream: AsyncGenerator[tuple[str, Any], None] = self._client.watch(  # type: ignore[assignment]
                self._resource,
                namespace=self._namespace,
                resource_version=version,
                on_error=on_error_raise,  # `run` decides: relist, after a backoff if need be
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._watch_seconds), contextlib.aclosing(stream):
                    async for event_type, body in stream:
                        version = body["metadata"].get("resourceVersion") or version
                        if event_type not in ("ADDED", "MODIFIED", "DELETED"):
                            continue  # BOOKMARK: only the resourceVersion matters
                        if event_type == "DELETED":
                            self._set(_key(body), None)
                        else:
                            self._set(_key(body), self._view(body))

    def _view(self, body: Mapping[str, Any]) -> View | None:
        try:
            return self._parse(body)
        except (TypeError, ValueError) as exc:  # a body no schema should have let through
            logger.warning("%s %s/%s ignored: %s", self.kind, *_key(body), exc)
            return None

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


def _key(body: Mapping[str, Any]) -> Key:
    # The raw metadata: lightkube's `.metadata` parses an ObjectMeta on every access.
    metadata = body["metadata"]
    return (str(metadata["namespace"]), str(metadata["name"]))


def _describe(exc: Exception) -> str:
    if isinstance(exc, ApiError):
        return f"API error {exc.status.code} {exc.status.reason}"
    return type(exc).__name__
