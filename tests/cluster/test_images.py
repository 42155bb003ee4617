"""The images built here without Docker run on the node as they would anywhere: the
operator image from the repository's own Dockerfile, as a non-root user with a read-only
root filesystem (what the chart asks of it)."""

from __future__ import annotations

import json
import re
import tarfile
import tomllib
from pathlib import Path

import pytest

from devtools.images import Builder as ImageBuilder
from devtools.images import package_version
from devtools.localcluster import LocalCluster, wait_for

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]


def test_operator_image_runs_poolbudget_as_non_root(
    local_cluster: LocalCluster, kube_namespace: str
) -> None:
    image = ImageBuilder().operator()
    assert image.ref.endswith(f"/operator:{package_version()}")
    local_cluster.import_image(image)
    # The classic worked example: 200 max, 10 reserved, 4 workers, overflow 5 -> pool 42.
    plan = ["plan", "--max-connections", "200", "--reserved", "10", "--workers", "4",
            "--max-overflow", "5", "--superuser-reserved", "0", "--output", "json"]  # fmt: skip
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "plan"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "dnsPolicy": "Default",
                    "containers": [{
                        "name": "poolbudget", "image": image.ref, "imagePullPolicy": "Never",
                        "args": plan,  # the image's entrypoint is `poolbudget`
                        "securityContext": {
                            "runAsNonRoot": True, "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                        },
                    }],
                }
            },
        },
    }  # fmt: skip
    local_cluster.kubectl("-n", kube_namespace, "apply", "-f", "-", input=json.dumps(job))

    def finished() -> str | None:
        status = json.loads(
            local_cluster.kubectl("-n", kube_namespace, "get", "job", "plan", "-o", "json").stdout
        )["status"]
        return "ok" if status.get("succeeded") else "failed" if status.get("failed") else None

    assert wait_for(finished, timeout=120, what="the plan Job to finish") == "ok"
    # `kubectl logs` goes API server -> kubelet with the API server's client certificate.
    output = local_cluster.kubectl("-n", kube_namespace, "logs", "job/plan").stdout
    allocation = json.loads(output)["allocations"][0]
    assert allocation["poolSize"] == 42


def _dockerfile_final_stage(path: Path) -> dict[str, str]:
    """The last value of each instruction in the Dockerfile's final stage, as written."""
    stages = path.read_text().split("\nFROM ")
    found: dict[str, str] = {}
    for line in stages[-1].replace("\\\n", " ").splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword.isupper():
            found[keyword] = rest.strip()
    return found


def test_make_image_builds_what_the_dockerfile_says() -> None:
    """`make image` (buildah, a debootstrap base) and `docker build .` (python:3.11-slim)
    start from different bases; what a user relies on must not differ: the user, the
    entrypoint and command, the ports, the environment, Python's version, the package."""
    image = ImageBuilder().operator()
    dockerfile = _dockerfile_final_stage(REPO / "Dockerfile")
    with tarfile.open(image.archive) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(archive.extractfile(manifest[0]["Config"]))["config"]  # type: ignore[arg-type]
        names: list[str] = []
        for layer in manifest[0]["Layers"]:
            with tarfile.open(fileobj=archive.extractfile(layer)) as files:
                names += files.getnames()
    assert config["User"] == dockerfile["USER"] == "10001:10001"
    assert config["Entrypoint"] == json.loads(dockerfile["ENTRYPOINT"])
    assert config["Cmd"] == json.loads(dockerfile["CMD"])
    assert sorted(config["ExposedPorts"]) == [f"{p}/tcp" for p in dockerfile["EXPOSE"].split()]
    env = dict(item.split("=", 1) for item in config["Env"])
    for assignment in dockerfile["ENV"].split():
        key, value = assignment.split("=", 1)
        assert env[key] == value
    # The Dockerfile's default base names Python's minor version; the venv carries it, and
    # the package installed into it is this version of this repository.
    minor = re.search(r"python:(\d+\.\d+)", (REPO / "Dockerfile").read_text())
    assert minor is not None
    site = f"opt/poolbudget/lib/python{minor.group(1)}/site-packages"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]
    wheel_name = re.sub(r"[-_.]+", "_", project)  # how a wheel's dist-info spells it
    dist_info = f"{site}/{wheel_name}-{package_version()}.dist-info"
    assert any(name.lstrip("./").startswith(dist_info) for name in names), (
        f"no {dist_info} in the image"
    )
    assert any(name.lstrip("./") == f"{site}/poolbudget/handlers.py" for name in names)
