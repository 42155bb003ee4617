"""Read-only: the data of named ConfigMaps, for `poolbudget plan --diff-cluster`.

One GET per ConfigMap through the operator's own credential source (kubeconfig, or the
service account in a pod) and raw-JSON client; nothing is listed, watched or written, so
`get` on configmaps in the budgets' namespaces is the only permission it needs.
"""

from __future__ import annotations

from collections.abc import Iterable

from kubernetes.aio.client.exceptions import ApiException
from kubernetes.aio.config.config_exception import ConfigException

from poolbudget.adapters.apiclient import (
    TRANSPORT_ERRORS,
    api_client,
    close_client,
    describe,
    read_json,
    request,
)
from poolbudget.adapters.credentials import load_configuration

REQUEST_TIMEOUT_SECONDS = 10.0


class ClusterReadError(Exception):
    """The cluster could not be asked; the message names no credential."""


async def read_configmaps(
    keys: Iterable[tuple[str, str]], *, kubeconfig: str | None = None
) -> dict[tuple[str, str], dict[str, str] | None]:
    """The data of each (namespace, name) ConfigMap; None for one that does not exist."""
    try:
        configuration = await load_configuration(kubeconfig=kubeconfig)
    except (ConfigException, OSError) as exc:
        raise ClusterReadError(f"no usable kubeconfig: {exc}") from None
    client = api_client(configuration, 4)
    found: dict[tuple[str, str], dict[str, str] | None] = {}
    try:
        for namespace, name in keys:
            path = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
            try:
                response = await request(client, "GET", path, timeout=REQUEST_TIMEOUT_SECONDS)
                body = await read_json(response)
            except ApiException as exc:
                if exc.status == 404:
                    found[(namespace, name)] = None
                    continue
                raise ClusterReadError(
                    f"GET ConfigMap {namespace}/{name}: {describe(exc)}"
                ) from None
            except TRANSPORT_ERRORS as exc:
                raise ClusterReadError(
                    f"GET ConfigMap {namespace}/{name}: {describe(exc)} "
                    f"(API server {configuration.host})"
                ) from None
            data = body.get("data") or {}
            found[(namespace, name)] = {str(k): str(v) for k, v in data.items()}
    finally:
        await close_client(client)
    return found
