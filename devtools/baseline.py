"""An older commit of this project, installed in its own virtualenv, for before/after runs.

`prepare(ref)` resolves `ref` to a full sha and makes sure that
`${POOLBUDGET_CACHE:-~/.cache/poolbudget}/baseline/<sha>/` holds

    src/     the commit's files (`git archive <sha> | tar -x`: no worktree is registered)
    venv/    `python3.11 -m venv`, with `pip install 'src[operator]'` (not editable)
    ready    written last: the installed packages (`pip freeze`); its presence means done

A directory without `ready` (an interrupted preparation) is rebuilt from scratch; one with
it is reused as it is. A lock file next to it keeps two preparations of one sha apart.

    python -m devtools.baseline REF     prepare (or find) it and print where it is
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from devtools.localcluster import cache_dir

REPO = Path(__file__).resolve().parents[1]
PYTHON = "python3.11"
# The packages whose versions the bench reports next to the baseline's figures.
REPORTED_PACKAGES = ("kopf", "lightkube", "httpx2", "kubernetes", "kubernetes-asyncio", "aiohttp")


@dataclass(frozen=True)
class Baseline:
    ref: str
    sha: str
    root: Path
    seconds: float  # to prepare it in this call (a reused one takes well under a second)
    reused: bool
    packages: dict[str, str]  # name -> version, from `pip freeze`

    @property
    def python(self) -> str:
        return str(self.root / "venv" / "bin" / "python")

    @property
    def short(self) -> str:
        return self.sha[:7]


def resolve(ref: str) -> str:
    """The full sha of the commit `ref` names in this repository."""
    done = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"--baseline {ref}: not a commit in {REPO}")
    return done.stdout.strip()


def prepare(ref: str, cache: Path | None = None) -> Baseline:
    sha = resolve(ref)
    root = (cache or cache_dir()) / "baseline" / sha
    root.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (root.parent / f"{sha}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ready = root / "ready"
        reused = ready.exists()
        if not reused:
            _build(sha, root)
        freeze = ready.read_text()
    packages = dict(line.split("==", 1) for line in freeze.splitlines() if "==" in line)
    return Baseline(ref, sha, root, time.monotonic() - started, reused, packages)


def _build(sha: str, root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    source, venv = root / "src", root / "venv"
    source.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", sha], cwd=REPO, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(source)], stdin=archive.stdout, check=True)
    assert archive.stdout is not None
    archive.stdout.close()
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {sha} failed")
    subprocess.run([PYTHON, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", f"{source}[operator]"], env=env, check=True
    )
    # The operator must come from the venv's site-packages, as it will at run time (-I).
    where = subprocess.run(
        [python, "-I", "-c", "import poolbudget.cli; print(poolbudget.cli.__file__)"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout.strip()  # fmt: skip
    if not where.startswith(str(venv)):
        raise RuntimeError(f"the baseline's python imports poolbudget from {where}, not {venv}")
    freeze = subprocess.run(
        [python, "-m", "pip", "freeze"], capture_output=True, text=True, env=env, check=True
    ).stdout
    (root / "ready").write_text(freeze)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    baseline = prepare(args[0])
    how = "reused" if baseline.reused else "prepared"
    print(f"{baseline.ref} = {baseline.sha}: {how} in {baseline.seconds:.1f} s at {baseline.root}")
    print(f"python: {baseline.python}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
