"""Container images built here, without a Docker engine or a registry.

    python -m devtools.images [pause|base|sampleapp|operator ...]   # build what is missing

Each image is a docker-archive tarball in ``$POOLBUDGET_CACHE/images/``, named after a
hash of everything that goes into it, so a warm cache returns at once and a changed input
builds a new one. The node imports them into containerd (``ctr images import``); a user
can ``docker load``, ``ctr import`` or ``skopeo copy`` them.

* pause      Kubernetes' ``build/pause/linux/pause.c`` from the pinned k8s.io/kubernetes
             module, compiled statically with gcc; the pod sandbox image.
* base       Debian bookworm (``debootstrap --variant=minbase``) with python3 and venv:
             what ``python:3.11-slim-bookworm`` is to Docker users (same Debian, same 3.11).
* sampleapp  images/sampleapp/Dockerfile on that base.
* operator   the repository's own Dockerfile on that base: the recipe users run is the one
             built and tested here.

Dockerfiles are built by ``buildah bud`` (Debian's buildah, chroot isolation, vfs storage
under the cache). Their RUN steps install from PyPI with this machine's pip configuration
and CA bundle mounted read-only (``/etc/pip.conf``, the system CA file), because a build
container sees none of the host's settings and this network re-signs TLS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
RECIPE_VERSION: Final = "1"  # bump to rebuild every image after a change in this file
DEBIAN_SUITE: Final = "bookworm"
DEBIAN_MIRROR: Final = "http://deb.debian.org/debian"
BASE_PACKAGES: Final = ("python3", "python3-venv", "ca-certificates")
KUBE_WRAPPER: Final = REPO_ROOT / "hack" / "localcluster" / "kube"
IMAGE_PREFIX: Final = "localhost/poolbudget"
HOST_PIP_FILES: Final = ("/etc/pip.conf", "/etc/ssl/certs/ca-certificates.crt")


class ImageBuildError(RuntimeError):
    """An image could not be built; the message says which step and why."""


@dataclass(frozen=True)
class Image:
    """A built image: its reference (what pod specs name) and its docker-archive."""

    name: str
    ref: str
    archive: Path


def cache_dir() -> Path:
    configured = os.environ.get("POOLBUDGET_CACHE")
    root = Path(configured) if configured else Path.home() / ".cache" / "poolbudget"
    return root / "images"


def package_version() -> str:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return str(project["version"])


def _log(message: str) -> None:
    print(f"images: {message}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], *, what: str, cwd: Path | None = None) -> str:
    """Run a build step, streaming its output to stderr (the long steps show progress)."""
    lines: list[str] = []
    with subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            print(f"  {line}", end="", file=sys.stderr, flush=True)
    if process.returncode != 0:
        tail = "".join(lines[-20:])
        raise ImageBuildError(f"{what} failed (exit {process.returncode}):\n{tail}")
    return "".join(lines)


def _hash_files(digest: hashlib._Hash, paths: Iterable[Path]) -> None:
    for path in sorted(paths):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")


def _tree(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts]


class Builder:
    """Builds the images into the cache; one instance per build run."""

    def __init__(self, cache: Path | None = None) -> None:
        self.cache = cache if cache is not None else cache_dir()
        self.storage = self.cache / "buildah"

    # -- public ---------------------------------------------------------------------

    def pause(self) -> Image:
        source = self._pause_source()
        key = self._key("pause", [source.read_text()], [REPO_ROOT / "images/pause/Dockerfile"])
        ref = f"{IMAGE_PREFIX}/pause:{key}"
        archive = self.cache / f"pause-{key}.tar"
        if archive.exists():
            return Image("pause", ref, archive)
        with tempfile.TemporaryDirectory(prefix="pause-") as context:
            binary = Path(context) / "pause"
            _log(f"compiling {source} statically")
            _run(
                ["gcc", "-Os", "-static", "-Wall", "-DVERSION=poolbudget-" + key,
                 "-o", str(binary), str(source)],
                what="gcc pause.c",
            )  # fmt: skip
            _run(["strip", str(binary)], what="strip pause")
            self._bud("pause", REPO_ROOT / "images/pause/Dockerfile", Path(context), ref, archive)
        return Image("pause", ref, archive)

    def base(self) -> Image:
        key = self._key("base", [DEBIAN_SUITE, DEBIAN_MIRROR, *BASE_PACKAGES], [])
        ref = f"{IMAGE_PREFIX}/base:{DEBIAN_SUITE}-{key}"
        archive = self.cache / f"base-{key}.tar"
        if archive.exists():
            self._ensure_in_storage(ref, archive)
            return Image("base", ref, archive)
        if shutil.which("debootstrap") is None:
            raise ImageBuildError("debootstrap is missing: run `make node-deps`")
        with tempfile.TemporaryDirectory(prefix="base-", dir=self.cache) as work:
            rootfs = Path(work) / "rootfs"
            _log(f"debootstrap {DEBIAN_SUITE} minbase + {', '.join(BASE_PACKAGES)} (about 2 min)")
            _run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                 DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR],
                what="debootstrap",
            )  # fmt: skip
            # Package caches and lists are half the size and nothing in the image uses them.
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for item in (rootfs / leftover).glob("*"):
                    if item.is_file():
                        item.unlink()
            container = self._buildah("from", "scratch").strip().splitlines()[-1]
            try:
                mount = self._buildah("mount", container).strip().splitlines()[-1]
                _run(["cp", "-a", f"{rootfs}/.", mount], what="copy the rootfs")
                self._buildah("umount", container)
                path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                self._buildah(
                    "config", "--env", path, "--env", "LANG=C.UTF-8", "--cmd", "python3", container
                )
                self._buildah("commit", "--rm", container, ref)
            except ImageBuildError:
                self._buildah("rm", container, check=False)
                raise
        self._export(ref, archive)
        return Image("base", ref, archive)

    def sampleapp(self) -> Image:
        return self._on_base(
            "sampleapp",
            REPO_ROOT / "images/sampleapp/Dockerfile",
            inputs=[REPO_ROOT / "pyproject.toml", REPO_ROOT / "README.md",
                    *_tree(REPO_ROOT / "operator"), *_tree(REPO_ROOT / "images/sampleapp")],
        )  # fmt: skip

    def operator(self) -> Image:
        return self._on_base(
            "operator",
            REPO_ROOT / "Dockerfile",
            inputs=[REPO_ROOT / "pyproject.toml", REPO_ROOT / "README.md",
                    *_tree(REPO_ROOT / "operator")],
            tag=package_version(),
        )  # fmt: skip

    # -- plumbing -------------------------------------------------------------------

    def _on_base(
        self, name: str, dockerfile: Path, *, inputs: list[Path], tag: str | None = None
    ) -> Image:
        base = self.base()
        key = self._key(name, [base.ref], [dockerfile, *inputs])
        ref = f"{IMAGE_PREFIX}/{name}:{tag or key}"
        archive = self.cache / f"{name}-{key}.tar"
        if archive.exists():
            return Image(name, ref, archive)
        self._bud(name, dockerfile, REPO_ROOT, ref, archive, build_args={"BASE_IMAGE": base.ref})
        return Image(name, ref, archive)

    def _key(self, name: str, words: list[str], files: list[Path]) -> str:
        digest = hashlib.sha256(f"recipe={RECIPE_VERSION} name={name}\n".encode())
        for word in words:
            digest.update(word.encode() + b"\0")
        _hash_files(digest, files)
        return digest.hexdigest()[:12]

    def _pause_source(self) -> Path:
        """pause.c from the k8s.io/kubernetes version the wrapper module pins (downloaded
        into the Go module cache if it is not there yet; checked against go.sum)."""
        env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly", "GOWORK": "off"}
        env.update(GOSUMDB="off", PATH=env.get("PATH", "") + ":/usr/local/go/bin")
        result = subprocess.run(
            ["go", "mod", "download", "-json", "k8s.io/kubernetes"],
            cwd=KUBE_WRAPPER, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        directory = json.loads(result.stdout).get("Dir", "") if result.returncode == 0 else ""
        source = Path(directory) / "build" / "pause" / "linux" / "pause.c"
        if not directory or not source.exists():
            raise ImageBuildError(f"no pause.c in the k8s.io/kubernetes module: {result.stderr}")
        return source

    def _storage_flags(self) -> list[str]:
        root, run = self.storage / "root", self.storage / "run"
        return ["--root", str(root), "--runroot", str(run), "--storage-driver", "vfs"]

    def _buildah(self, *args: str, check: bool = True) -> str:
        argv = ["buildah", *self._storage_flags(), *args]
        if not check:
            subprocess.run(argv, capture_output=True, check=False)
            return ""
        return _run(argv, what=f"buildah {args[0]}")

    def _ensure_in_storage(self, ref: str, archive: Path) -> None:
        """The base must be in buildah's storage to be a FROM; reload it from its archive
        if the storage was cleared."""
        probe = subprocess.run(
            ["buildah", *self._storage_flags(), "inspect", "--type", "image", ref],
            capture_output=True, check=False,
        )  # fmt: skip
        if probe.returncode != 0:
            self._buildah("pull", "--quiet", f"docker-archive:{archive}")

    def _bud(
        self,
        name: str,
        dockerfile: Path,
        context: Path,
        ref: str,
        archive: Path,
        *,
        build_args: dict[str, str] | None = None,
    ) -> None:
        if shutil.which("buildah") is None:
            raise ImageBuildError("buildah is missing: run `make node-deps`")
        _log(f"building {ref} from {dockerfile.relative_to(REPO_ROOT)}")
        argv = ["bud", "--isolation", "chroot", "--pull=never", "--layers=false"]
        argv += ["-f", str(dockerfile), "-t", ref]
        for key, value in (build_args or {}).items():
            argv += ["--build-arg", f"{key}={value}"]
        for host_file in HOST_PIP_FILES:
            if Path(host_file).exists():
                argv += ["--volume", f"{host_file}:{host_file}:ro"]
        self._buildah(*argv, str(context))
        self._export(ref, archive)
        self._buildah("rmi", ref, check=False)  # the archive is the cache; keep storage small

    def _export(self, ref: str, archive: Path) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        self._buildah("push", "--quiet", ref, f"docker-archive:{tmp}:{ref}")
        tmp.replace(archive)
        _log(f"wrote {archive} ({archive.stat().st_size / 2**20:.0f} MiB)")
        stem = archive.name.rsplit("-", 1)[0]
        for older in self.cache.glob(f"{stem}-*.tar"):
            if older != archive and older.name.rsplit("-", 1)[0] == stem:
                older.unlink()


BUILDERS: Final = ("pause", "base", "sampleapp", "operator")


def build(names: Sequence[str] = BUILDERS, builder: Builder | None = None) -> dict[str, Image]:
    builder = builder or Builder()
    built: dict[str, Image] = {}
    for name in names:
        built[name] = getattr(builder, name)()
    return built


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.images", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(BUILDERS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BUILDERS))
    if unknown:
        parser.error(f"unknown image {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
    try:
        images = build(args.names or BUILDERS)
    except ImageBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for image in images.values():
        print(f"{image.ref}\t{image.archive}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
