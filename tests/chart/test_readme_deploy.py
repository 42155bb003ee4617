"""The README's "Install: deploy to a cluster" block, run as written, command by command,
against the session cluster with the image `make image` builds: if a command there stops
working, this fails."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from devtools.images import Image
from devtools.localcluster import LocalCluster, find_kubectl

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
MARKER = "<!-- tested: tests/chart/test_readme_deploy.py runs the next block -->"


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    assert MARKER in text, "the README lost its tested deploy block"
    block = re.search(r"```console\n(.*?)```", text[text.index(MARKER) :], re.DOTALL)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_deploy_block_is_what_a_user_runs() -> None:
    commands = readme_commands()
    assert commands[0].startswith("kubectl apply --server-side")
    assert any(c.startswith("helm install poolbudget charts/poolbudget-operator") for c in commands)
    assert commands[-1] == "kubectl delete namespace poolbudget-system"


def test_the_readme_deploy_commands_run_as_written(
    local_cluster: LocalCluster, operator_image: Image, tmp_path: Path
) -> None:
    del operator_image  # on the node, as `make cluster-up` leaves it
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "helm").symlink_to(local_cluster.binaries.helm)
    (bin_dir / "kubectl").symlink_to(find_kubectl())
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "KUBECONFIG": str(local_cluster.kubeconfig),
        **{f"HELM_{d}_HOME": str(tmp_path / d.lower()) for d in ("CACHE", "CONFIG", "DATA")},
    }

    def run(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command], cwd=REPO, env=env,
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip

    # What an earlier, interrupted run may have left.
    run("helm uninstall poolbudget -n poolbudget-system --wait || true")
    run("kubectl delete namespace poolbudget-system --ignore-not-found --timeout=60s")
    outputs: dict[str, str] = {}
    try:
        for command in readme_commands():
            result = run(command)
            assert result.returncode == 0, f"$ {command}\n{result.stdout}{result.stderr}"
            outputs[command] = outputs.get(command, "") + result.stdout
    finally:
        run("helm uninstall poolbudget -n poolbudget-system --wait || true")
    rollout = "kubectl -n poolbudget-system rollout status deployment/poolbudget-operator"
    assert outputs[rollout].count("successfully rolled out") == 2
    pods = outputs[
        "kubectl -n poolbudget-system get pods -l app.kubernetes.io/name=poolbudget-operator"
    ]
    assert "1/1     Running" in pods
