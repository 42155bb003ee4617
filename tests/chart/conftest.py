"""What the chart tests share: helm against the session cluster, with its own homes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.images import Builder as ImageBuilder
from devtools.images import Image
from devtools.localcluster import LocalCluster

Helm = Callable[..., subprocess.CompletedProcess[str]]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def built_helm() -> Path:
    """The helm binary `make binaries` builds (no cluster needed); skips when not built."""
    where = subprocess.run(
        ["bash", str(REPO / "hack" / "build-binaries.sh"), "--print-dir"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    binary = Path(where[-1]) / "helm" if where else Path("/nonexistent")
    if not binary.exists():
        pytest.skip(f"helm is not built ({binary}): run `make binaries`")
    return binary


@pytest.fixture
def helm(local_cluster: LocalCluster, tmp_path: Path) -> Helm:
    env = {
        **os.environ,
        "KUBECONFIG": str(local_cluster.kubeconfig),
        "HELM_CACHE_HOME": str(tmp_path / "helm-cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "helm-config"),
        "HELM_DATA_HOME": str(tmp_path / "helm-data"),
    }

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(local_cluster.binaries.helm), *args],
            env=env, text=True, capture_output=True, check=check, timeout=120,
        )  # fmt: skip

    return run


@pytest.fixture(scope="module")
def operator_image(crd_installed: LocalCluster) -> Image:
    """The image `make image` builds from ./Dockerfile, on the session cluster's node."""
    image = ImageBuilder().operator()
    crd_installed.import_image(image)
    return image
