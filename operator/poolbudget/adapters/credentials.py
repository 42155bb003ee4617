"""Where the operator's Kubernetes credentials come from: one place, for every client.

In a pod: the API server at KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT (an IPv6
address in brackets), the mounted CA and service-account token, as client-go finds them.
Not `kubernetes.default.svc`, as Kopf's built-in service-account login does: a cluster
without DNS cannot answer that name, and it would split the operator between two
endpoints. The token is a bound token the kubelet rotates: it is re-read (at most once a
minute, kubernetes' in-cluster refresh hook) before requests, and on every Kopf re-login.

Elsewhere: the kubeconfig named by KUBECONFIG (or ~/.kube/config), its current context.

`load_configuration()` returns a `kubernetes.aio.client.Configuration`; the gateway and
the informers build their ApiClients from copies of it (each copy sets its own
connection pool size), and `@kopf.on.login` (handlers.py) turns the same Configuration
into Kopf's `ConnectionInfo`, so Kopf and our clients never disagree about the server or
the identity.
"""

from __future__ import annotations

import copy
import os
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

from kubernetes.aio.client import Configuration
from kubernetes.aio.config.incluster_config import InClusterConfigLoader
from kubernetes.aio.config.kube_config import load_kube_config

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def in_cluster(service_account: Path | None = None) -> bool:
    """Running in a pod with a mounted service-account token."""
    service_account = service_account or SERVICE_ACCOUNT
    return bool(
        os.environ.get("KUBERNETES_SERVICE_HOST")
        and os.environ.get("KUBERNETES_SERVICE_PORT")
        and (service_account / "token").exists()
    )


async def load_configuration(
    *, kubeconfig: str | None = None, service_account: Path | None = None
) -> Configuration:
    """The service account in a pod, else `kubeconfig` (default: $KUBECONFIG, then
    ~/.kube/config). Raises kubernetes' ConfigException when neither is usable."""
    configuration = Configuration()
    service_account = service_account or SERVICE_ACCOUNT
    if kubeconfig is None and in_cluster(service_account):
        # Reads the env vars (brackets an IPv6 host), CA and token; installs a
        # refresh_api_key_hook that re-reads the token file every minute.
        # (kubernetes.aio.config is not annotated: the casts state what it takes.)
        loader = cast(Callable[..., InClusterConfigLoader], InClusterConfigLoader)(
            token_filename=str(service_account / "token"),
            cert_filename=str(service_account / "ca.crt"),
            try_refresh_token=True,
        )
        cast(Callable[[Configuration], None], loader.load_and_set)(configuration)
    else:
        path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube/config")
        # persist_config=False: never write back to the user's kubeconfig.
        await cast(Callable[..., Awaitable[None]], load_kube_config)(
            config_file=path, client_configuration=configuration, persist_config=False
        )
    return without_environment_lookups(configuration)


def without_environment_lookups(configuration: Configuration) -> Configuration:
    """Resolve the HTTPS proxy for the API server once, here, and stop aiohttp looking it
    up (and reading ~/.netrc) again on every request: kubernetes.aio opens its sessions
    with `trust_env=True`, which cost a cold start of 1,000 budgets about a fifth of its
    CPU (py-spy: proxies_from_env, netrc, stat calls, and the thread pool they run in).
    HTTPS_PROXY / NO_PROXY are honoured as before, as client-go honours them."""
    host = urllib.parse.urlsplit(configuration.host).hostname or ""
    proxies = urllib.request.getproxies()
    proxy = proxies.get("https")
    if proxy and not urllib.request.proxy_bypass(host) and configuration.proxy is None:
        configuration.proxy = proxy
    configuration.client_session_kwargs = {
        **(configuration.client_session_kwargs or {}),
        "trust_env": False,
    }
    return configuration


def pod_namespace(service_account: Path | None = None) -> str | None:
    """The pod's own namespace, in a pod; None elsewhere."""
    service_account = service_account or SERVICE_ACCOUNT
    namespace_file = service_account / "namespace"
    if not (in_cluster(service_account) and namespace_file.exists()):
        return None
    return namespace_file.read_text().strip()


def with_pool(configuration: Configuration, connections: int) -> Configuration:
    """A copy with its own connection-pool size (aiohttp's TCPConnector `limit`: requests
    beyond it wait for a free connection, and that wait counts against their timeout)."""
    copied = copy.deepcopy(configuration)
    copied.connection_pool_maxsize = connections
    return copied


async def bearer_token(configuration: Configuration) -> str | None:
    """The current token without its scheme, after the refresh hook has run."""
    value = await configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token if scheme.lower() == "bearer" and token else value
