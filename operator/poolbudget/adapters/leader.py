"""Leader election over a coordination.k8s.io Lease, so replicas never both act.

Before Kopf starts, a replica waits until it holds the Lease; a thread then renews it.
If renewing fails for longer than the lease lasts (API unreachable, or another replica
took over), the process exits at once: a follower that still acted would break the "one
writer" promise, and the Deployment controller restarts it as a standby. On a clean
shutdown the Lease is released, so a standby takes over within one retry period.

Kopf's own peering was the alternative; it needs extra CRDs and freezes every replica when
two share a priority, which a Deployment's identical pods always do.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime

from lightkube import ApiError, Client
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
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _now(self) -> datetime:
        return datetime.now(UTC)

    def _try_acquire(self) -> bool:
        """One attempt: take the Lease if it is free, expired or already ours."""
        now = self._now()
        try:
            lease = self._client.get(Lease, self.name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            fresh = Lease(
                metadata=ObjectMeta(name=self.name, namespace=self.namespace),
                spec=LeaseSpec(
                    holderIdentity=self.identity,
                    leaseDurationSeconds=self.lease_seconds,
                    acquireTime=now,
                    renewTime=now,
                    leaseTransitions=0,
                ),
            )
            try:
                self._client.create(fresh)
            except ApiError as create_error:
                if create_error.status.code == 409:  # someone else created it first
                    return False
                raise
            return True
        spec = lease.spec or LeaseSpec()
        holder = spec.holderIdentity
        renewed = spec.renewTime
        duration = spec.leaseDurationSeconds or self.lease_seconds
        expired = renewed is None or (now - renewed).total_seconds() > duration
        if holder not in (None, "", self.identity) and not expired:
            return False
        if holder != self.identity:
            spec.leaseTransitions = (spec.leaseTransitions or 0) + 1
            spec.acquireTime = now
        spec.holderIdentity = self.identity
        spec.leaseDurationSeconds = self.lease_seconds
        spec.renewTime = now
        lease.spec = spec
        try:
            # replace() sends metadata.resourceVersion: a concurrent writer gets a 409.
            self._client.replace(lease)
        except ApiError as exc:
            if exc.status.code == 409:
                return False
            raise
        return True

    def acquire(self) -> None:
        """Block until this process leads, then keep renewing in the background."""
        logger.info("waiting to lead (Lease %s/%s) as %s", self.namespace, self.name, self.identity)
        while not self._try_acquire():
            time.sleep(self.retry_seconds)
        logger.info("leading as %s", self.identity)
        self._renewer = threading.Thread(target=self._renew_forever, daemon=True)
        self._renewer.start()

    def _renew_forever(self) -> None:
        last_renewal = time.monotonic()
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                if self._try_acquire():
                    last_renewal = time.monotonic()
                    continue
                logger.error("another replica holds the Lease now; exiting to stop acting")
            except Exception:  # an API hiccup: keep trying until the lease would expire
                logger.exception("renewing the Lease failed")
                if time.monotonic() - last_renewal < self.lease_seconds:
                    continue
                logger.error("could not renew the Lease for %ss; exiting", self.lease_seconds)
            os._exit(1)  # no cleanup: a non-leader must stop acting immediately

    def release(self) -> None:
        """Give the Lease up (clean shutdown) so a standby takes over quickly."""
        self._stop.set()
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
