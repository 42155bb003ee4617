"""Leader election over a coordination.k8s.io Lease, so replicas never both act.

Before Kopf starts, a replica waits until it holds the Lease (blocking, synchronous);
once Kopf runs, a task on its event loop renews it with the async client, so lightkube is
never used from two threads at once (its decoding is not thread-safe: seen here as a
segfault inside msgspec). If renewing fails for longer than the lease lasts (API
unreachable, or another replica took over), the process exits at once: a follower that
still acted would break the "one writer" promise; the pod restarts as a standby. A standby
waits out an unreachable API server, so after an outage it takes over as soon as the
API server is back (the lease it finds has expired). On a clean
shutdown the Lease is released, so a standby takes over within one retry period.

Kopf's own peering was the alternative; it needs extra CRDs and freezes every replica when
two share a priority, which a Deployment's identical pods always do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import UTC, datetime

from lightkube import ApiError, AsyncClient, Client
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease

logger = logging.getLogger(__name__)


class LeaderElector:
    def __init__(
        self,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_seconds: int = 15,
        retry_seconds: float = 2.0,
        client: Client | None = None,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.retry_seconds = retry_seconds
        self._client = client or Client(field_manager="poolbudget-operator")

    def _now(self) -> datetime:
        return datetime.now(UTC)

    def _fresh(self) -> Lease:
        now = self._now()
        return Lease(
            metadata=ObjectMeta(name=self.name, namespace=self.namespace),
            spec=LeaseSpec(
                holderIdentity=self.identity,
                leaseDurationSeconds=self.lease_seconds,
                acquireTime=now,
                renewTime=now,
                leaseTransitions=0,
            ),
        )

    def _claimed(self, lease: Lease) -> Lease | None:
        """The Lease taken or renewed by us, or None if another holder's is still valid."""
        now = self._now()
        spec = lease.spec or LeaseSpec()
        holder = spec.holderIdentity
        renewed = spec.renewTime
        duration = spec.leaseDurationSeconds or self.lease_seconds
        expired = renewed is None or (now - renewed).total_seconds() > duration
        if holder not in (None, "", self.identity) and not expired:
            return None
        if holder != self.identity:
            spec.leaseTransitions = (spec.leaseTransitions or 0) + 1
            spec.acquireTime = now
        spec.holderIdentity = self.identity
        spec.leaseDurationSeconds = self.lease_seconds
        spec.renewTime = now
        lease.spec = spec
        return lease

    def _try_acquire(self) -> bool:
        """One attempt: take the Lease if it is free, expired or already ours."""
        try:
            lease = self._client.get(Lease, self.name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            try:
                self._client.create(self._fresh())
            except ApiError as create_error:
                if create_error.status.code == 409:  # someone else created it first
                    return False
                raise
            return True
        claimed = self._claimed(lease)
        if claimed is None:
            return False
        try:
            # replace() sends metadata.resourceVersion: a concurrent writer gets a 409.
            self._client.replace(claimed)
        except ApiError as exc:
            if exc.status.code == 409:
                return False
            raise
        return True

    async def _try_renew(self, client: AsyncClient) -> bool:
        try:
            lease = await client.get(Lease, self.name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            await client.create(self._fresh())
            return True
        claimed = self._claimed(lease)
        if claimed is None:
            return False
        try:
            await client.replace(claimed)
        except ApiError as exc:
            if exc.status.code == 409:
                return False
            raise
        return True

    def acquire(self) -> None:
        """Block until this process leads, then keep renewing in the background."""
        logger.info("waiting to lead (Lease %s/%s) as %s", self.namespace, self.name, self.identity)
        failing_since: float | None = None
        while True:
            try:
                if self._try_acquire():
                    break
                failing_since = None
            except Exception as exc:  # an unreachable API server is waited out
                # A standby that exited here left no operator at all after an API outage
                # (the leader gives up too): wait, and say so now and then.
                now = time.monotonic()
                if failing_since is None or now - failing_since > 30:
                    logger.warning("cannot reach the Lease (%s); still waiting", type(exc).__name__)
                    failing_since = now
            time.sleep(self.retry_seconds)
        logger.info("leading as %s", self.identity)

    async def hold(self) -> None:
        """Renew the Lease forever on the running event loop; exit the process on loss."""
        client = AsyncClient(field_manager="poolbudget-operator")
        last_renewal = time.monotonic()
        try:
            while True:
                await asyncio.sleep(self.lease_seconds / 3)
                try:
                    if await self._try_renew(client):
                        last_renewal = time.monotonic()
                        continue
                    logger.error("another replica holds the Lease now; exiting to stop acting")
                except Exception:  # an API hiccup: keep trying until the lease would expire
                    logger.exception("renewing the Lease failed")
                    if time.monotonic() - last_renewal < self.lease_seconds:
                        continue
                    logger.error("could not renew the Lease for %ss; exiting", self.lease_seconds)
                os._exit(1)  # no cleanup: a non-leader must stop acting immediately
        finally:
            await client.close()

    def release(self) -> None:
        """Give the Lease up (clean shutdown, after Kopf's loop ended) for a quick takeover."""
        try:
            lease = self._client.get(Lease, self.name, namespace=self.namespace)
            if lease.spec is not None and lease.spec.holderIdentity == self.identity:
                lease.spec.holderIdentity = None
                lease.spec.renewTime = None
                self._client.replace(lease)
        except ApiError:
            logger.warning("could not release the Lease; it expires in %ss", self.lease_seconds)
        finally:
            self._client.close()
