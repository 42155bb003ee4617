"""Helpers shared by the gateway (kube.py) and the informers over `kubernetes.aio`.

Both read responses as raw JSON (`*_without_preload_content` calls, or `call_api`) rather
than as the generated pydantic models: the operator keeps a few fields of each object,
and building models costs more than the request (see informer.py for the measurement).
Such calls return the bare aiohttp response whatever its status; `read_json` turns an
error status into kubernetes' own ApiException, so callers see one exception type.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
from kubernetes.aio.client import ApiClient, Configuration
from kubernetes.aio.client.exceptions import ApiException

from poolbudget.adapters.credentials import with_pool

# What a request can raise besides an API error status: the connection failed, or the
# client-side timeout (`_request_timeout`, aiohttp's total timeout) ran out.
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


@dataclass(frozen=True)
class Resource:
    """A listable resource: its API group ("" for core), version and plural."""

    group: str
    version: str
    plural: str

    def path(self, namespace: str | None) -> str:
        """The collection's URL path, in one namespace or (None) in all."""
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        scope = f"/namespaces/{namespace}" if namespace is not None else ""
        return f"{root}{scope}/{self.plural}"


async def request(
    client: ApiClient,
    method: str,
    path: str,
    *,
    timeout: float,  # noqa: ASYNC109 (passed to the client: aiohttp's total timeout)
    query: list[tuple[str, Any]] | None = None,
    body: Any = None,
    content_type: str | None = None,
) -> aiohttp.ClientResponse:
    """One raw call: `method` on `path` (an API path such as /api/v1/namespaces/x/...),
    bounded by `timeout` in all; the bare response, whatever its status (see read_json).

    The generated API classes (CoreV1Api and the rest) are not used: importing them loads
    hundreds of model classes, about 35 MiB of the operator's resident memory, to build
    requests this builds in a line."""
    headers = {"Accept": "application/json"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    method, url, headers, body, _ = await client.param_serialize(
        method,
        path,
        query_params=query or [],
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    response = await client.call_api(
        method, url, header_params=headers, body=body, _request_timeout=float(timeout)
    )
    # RESTResponse is untyped; its `response` is the aiohttp response it wraps.
    return cast(aiohttp.ClientResponse, response.response)


def api_client(configuration: Configuration, connections: int) -> ApiClient:
    """An ApiClient with its own aiohttp session of at most `connections` connections."""
    return ApiClient(with_pool(configuration, connections))


# aiohttp closes a TLS connection's transport a moment after its session: shutting
# down without waiting left "unclosed transport" ResourceWarnings (aiohttp's docs ask for
# this pause on graceful shutdown).
TLS_CLOSE_SECONDS = 0.25


async def close_client(client: ApiClient) -> None:
    """Close the client's aiohttp session (ApiClient.close is not annotated), and give
    its TLS connections the moment they need to close."""
    close = cast(Callable[[], Awaitable[None]], client.close)
    await close()
    await asyncio.sleep(TLS_CLOSE_SECONDS)


def status_error(status: int, reason: str | None, body: bytes) -> ApiException:
    """kubernetes' ApiException for an error response, its message from the Status body."""
    message = body.decode(errors="replace")
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and decoded.get("message"):
        message = str(decoded["message"])
    return ApiException(status=status, reason=reason, body=message)


async def read_json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The body of a successful response as a dict; ApiException for an error status.
    The response is released either way (its connection goes back to the pool)."""
    async with response:
        body = await response.read()
        if response.status >= 400:
            raise status_error(response.status, response.reason, body)
    decoded = json.loads(body) if body else {}
    if not isinstance(decoded, dict):
        raise ApiException(status=response.status, reason="not a JSON object", body="")
    return decoded


def describe(exc: BaseException) -> str:
    """A short, credential-free account of a failed call."""
    if isinstance(exc, ApiException):
        return f"API error {exc.status} {exc.reason}"
    return type(exc).__name__
