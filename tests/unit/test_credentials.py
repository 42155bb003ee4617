"""Where the credentials come from: the pod's service account (env vars + mounted files)
or a kubeconfig, and Kopf's login built from the very same Configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from kopf import ConnectionInfo

from poolbudget import handlers
from poolbudget.adapters import credentials


async def login() -> ConnectionInfo:
    """What the @kopf.on.login handler returns."""
    return await handlers.connection_info(await credentials.load_configuration())


@pytest.fixture
def service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("first-token")
    (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (account / "namespace").write_text("poolbudget-system\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    monkeypatch.setattr(credentials, "SERVICE_ACCOUNT", account)
    return account


async def test_in_a_pod_the_service_env_vars_and_token(service_account: Path) -> None:
    configuration = await credentials.load_configuration(service_account=service_account)
    assert configuration.host == "https://[fd00::1]:6443"  # no DNS name, IPv6 bracketed
    assert configuration.ssl_ca_cert == str(service_account / "ca.crt")
    assert await credentials.bearer_token(configuration) == "first-token"
    # A copy with its own pool keeps the hook that re-reads the rotating token.
    pooled = credentials.with_pool(configuration, 7)
    assert pooled.connection_pool_maxsize == 7
    assert getattr(pooled, "refresh_api_key_hook", None) is not None  # typed as None
    assert await credentials.bearer_token(pooled) == "first-token"


async def test_kopf_logs_in_with_the_same_configuration(service_account: Path) -> None:
    info = await login()
    assert info.server == "https://[fd00::1]:6443"
    assert info.ca_path == str(service_account / "ca.crt")
    assert info.token == "first-token"
    assert info.default_namespace == "poolbudget-system"
    # A re-login (after a 401) reads the token again: it rotates.
    (service_account / "token").write_text("second-token")
    assert (await login()).token == "second-token"


async def test_elsewhere_the_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, service_account: Path
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    for name in ("ca.crt", "admin.crt", "admin.key"):
        (tmp_path / name).write_text("-----BEGIN-----\n")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"""
apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:6443", certificate-authority: {tmp_path}/ca.crt}}}}]
users: [{{name: u, user: {{client-certificate: {tmp_path}/admin.crt, client-key: {tmp_path}/admin.key}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
"""
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    info = await login()
    assert info.server == "https://127.0.0.1:6443"
    assert (info.ca_path, info.certificate_path, info.private_key_path) == (
        f"{tmp_path}/ca.crt",
        f"{tmp_path}/admin.crt",
        f"{tmp_path}/admin.key",
    )
    assert info.token is None
    assert info.default_namespace is None


@pytest.mark.parametrize(
    ("no_proxy", "expected"),
    [("", "http://proxy.internal:3128"), ("fd00::1,10.0.0.0/8", None)],
)
async def test_the_proxy_is_resolved_once_and_aiohttp_stops_looking(
    service_account: Path, monkeypatch: pytest.MonkeyPatch, no_proxy: str, expected: str | None
) -> None:
    """kubernetes.aio opens its sessions with trust_env=True: aiohttp then reads the proxy
    variables and ~/.netrc on every request (a fifth of a cold start's CPU). The proxy is
    resolved here once instead, NO_PROXY honoured, and the sessions no longer look."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    configuration = await credentials.load_configuration(service_account=service_account)
    assert configuration.proxy == expected
    pooled = credentials.with_pool(configuration, 3)
    assert pooled.client_session_kwargs == {"trust_env": False}
    assert pooled.proxy == expected
