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
