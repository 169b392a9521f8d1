"""The project's images, built from its own Dockerfile with buildah, for the real test node.

No registry can be reached, so the Dockerfile's ``PYTHON_IMAGE`` is made here from Debian's
packages (debootstrap: python3, python3-venv, ca-certificates), with this machine's certificate
bundle and pip configuration, so pip inside the build reaches the package index as the host does.
Images are tagged by the content of their inputs and kept in buildah's overlay storage under
``~/.cache/difftrain/images``; ``--layers`` reuses the dependency layers when only the source
changed. ``export`` writes an uncompressed OCI archive that containerd imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.infra.environment import CACHE_ROOT, REPO

IMAGES = CACHE_ROOT / "images"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# what the Dockerfile copies (the rest of the tree is not in the image)
IMAGE_INPUTS = (
    "Dockerfile",
    "pyproject.toml",
    "README.md",
    "hack/requirements.py",
    "trainer",
    "operator",
)
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
HOST_PIP_CONF = Path("/etc/pip.conf")


def _storage() -> list[str]:
    return [
        "--root",
        str(IMAGES / "storage"),
        "--runroot",
        str(IMAGES / "run"),
        "--storage-driver",
        "overlay",
    ]


def _buildah(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["buildah", *_storage(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"buildah {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}"
        )
    return result


def has_image(ref: str) -> bool:
    result = subprocess.run(
        ["buildah", *_storage(), "inspect", "--type", "image", ref],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    sources = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
    for path in sources:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if line.startswith("URIs:") and "security" not in line:
                return words[1]
            if words[:1] == ["deb"] and "security" not in line:
                return next(w for w in words[1:] if "://" in w)
    raise RuntimeError("no Debian mirror in /etc/apt: the base image needs one for debootstrap")


def _digest(paths: list[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            h.update(str(f.relative_to(REPO) if f.is_relative_to(REPO) else f).encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def base_image() -> str:
    """A Python image made from Debian's packages; built once per machine."""
    host_files = [p for p in (HOST_CA_BUNDLE, HOST_PIP_CONF) if p.exists()]
    key = _digest(host_files, f"{SUITE} {' '.join(BASE_PACKAGES)}")
    ref = f"localhost/difftrain/python-base:{key}"
    if has_image(ref):
        return ref
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=IMAGES) as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(rootfs),
                debian_mirror(),
            ],
            check=True,
            capture_output=True,
            timeout=1800,
        )
        # the host's trust and pip settings (a proxy's CA, the index it uses)
        if HOST_CA_BUNDLE.exists():
            shutil.copy(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        if HOST_PIP_CONF.exists():
            shutil.copy(HOST_PIP_CONF, rootfs / "etc/pip.conf")
        for junk in (
            "var/cache/apt/archives",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
        ):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        subprocess.run(
            ["tar", "-C", str(rootfs), "-cf", str(Path(tmp) / "rootfs.tar"), "."],
            check=True,
            timeout=600,
        )
        (Path(tmp) / "Containerfile").write_text(
            'FROM scratch\nADD rootfs.tar /\nCMD ["python3"]\n'
        )
        _buildah("bud", "--isolation", "chroot", "-t", ref, "-f", f"{tmp}/Containerfile", tmp)
    return ref


def pause_image(ref: str) -> str:
    """The pod sandbox's pause process: a static C program that reaps children."""
    if has_image(ref):
        return ref
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=IMAGES) as tmp:
        src = Path(tmp) / "pause.c"
        src.write_text(
            "#include <signal.h>\n#include <unistd.h>\n#include <sys/wait.h>\n"
            "static void reap(int s) { (void)s; while (waitpid(-1, 0, WNOHANG) > 0) {} }\n"
            "static void quit(int s) { (void)s; _exit(0); }\n"
            "int main(void) {\n"
            "  signal(SIGINT, quit); signal(SIGTERM, quit); signal(SIGCHLD, reap);\n"
            "  for (;;) pause();\n}\n"
        )
        subprocess.run(
            ["gcc", "-Os", "-static", "-s", "-o", f"{tmp}/pause", str(src)], check=True, timeout=120
        )
        (Path(tmp) / "Containerfile").write_text(
            'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n'
        )
        _buildah("bud", "--isolation", "chroot", "-t", ref, "-f", f"{tmp}/Containerfile", tmp)
    return ref


# what the runtime stages (the base and the dependencies) are built from
RUNTIME_INPUTS = ("Dockerfile", "pyproject.toml", "hack/requirements.py")


def project_image(target: str) -> tuple[str, float]:
    """The Dockerfile's ``target`` (operator or trainer): its tag and build seconds (0: reused).

    Its ``<target>-runtime`` stage (the base with the dependencies' venv, gigabytes for the
    trainer) is built and tagged first, by the content of what it is built from, and kept: the
    target's build then finds that layer in storage and adds only our wheel, so a source change
    costs neither a copy of the venv here nor its layers again in containerd."""
    base = base_image()
    runtime_key = _digest([REPO / p for p in RUNTIME_INPUTS], f"{target}-runtime {base}")
    runtime = f"localhost/difftrain/{target}-runtime:{runtime_key}"
    key = _digest([REPO / p for p in IMAGE_INPUTS], f"{target} {base}")
    ref = f"localhost/difftrain/{target}:{key}"
    if has_image(ref) and has_image(runtime):
        return ref, 0.0
    start = time.monotonic()
    if not has_image(runtime):
        make_room(runtime.rsplit(":", 1)[0])
        _build(f"{target}-runtime", runtime, base, RUNTIME_INPUTS)
        _forget_older(runtime.rsplit(":", 1)[0], keep=runtime)
    make_room(f"localhost/difftrain/{target}")
    # from the tagged runtime: buildah's layer cache keys on file times, so in a fresh clone it
    # would run the dependency stages (pip, gigabytes) again rather than find them
    _build(target, ref, base, IMAGE_INPUTS, runtime=runtime)
    _forget_older(f"localhost/difftrain/{target}", keep=ref)
    return ref, time.monotonic() - start


def _build(
    target: str, ref: str, base: str, inputs: tuple[str, ...], *, runtime: str | None = None
) -> None:
    """``buildah bud --target target`` from a context of ``inputs`` copied from the work tree;
    ``runtime``: the image the target starts from (the Dockerfile's ``<TARGET>_RUNTIME``)."""
    # a build cut short leaves its working container, with the layer it was writing, behind
    subprocess.run(["buildah", *_storage(), "rm", "--all"], capture_output=True, check=False)
    with tempfile.TemporaryDirectory(dir=IMAGES) as tmp:
        context = Path(tmp)
        for name in inputs:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, context / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                (context / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, context / name)
        _buildah(
            "bud",
            "--isolation",
            "chroot",
            "--layers",
            "--build-arg",
            f"PYTHON_IMAGE={base}",
            *(["--build-arg", f"{target.upper()}_RUNTIME={runtime}"] if runtime else []),
            "--target",
            target,
            "-t",
            ref,
            "-f",
            str(context / "Dockerfile"),
            str(context),
        )
    # the intermediate images a build leaves (the dependency stage's venv: gigabytes) key on file
    # times, so no build from another clone finds them: drop them (pip's cache mount remains)
    subprocess.run(["buildah", *_storage(), "rmi", "--prune"], capture_output=True, check=False)


# what a build of the trainer's runtime takes at its peak: its venv layer and the blob buildah
# stages it through, then the archive exported from it and its import into containerd (content
# and snapshot), about 6.7 GB each
LOW_DISK_BYTES = 32 << 30


def make_room(repository: str) -> None:
    """Before a build, on a disk short of LOW_DISK_BYTES: drop the earlier builds of
    ``repository`` and the layer cache of every earlier build (the next build of unchanged
    stages then runs them again, from pip's cache); with room to spare, keep them all."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(IMAGES).free >= LOW_DISK_BYTES:
        return
    _forget_older(repository, keep=None)
    for args in (("rm", "--all"), ("rmi", "--prune")):
        subprocess.run(["buildah", *_storage(), *args], capture_output=True, check=False)


def _forget_older(repository: str, keep: str | None) -> None:
    """Remove the earlier builds of ``repository`` (each holds its own layers on this disk)."""
    listed = json.loads(_buildah("images", "--json").stdout or "[]")
    older = [
        name
        for image in listed
        for name in image.get("names") or []
        if name.startswith(repository + ":") and name != keep
    ]
    if older:
        subprocess.run(["buildah", *_storage(), "rmi", *older], capture_output=True, check=False)


def image_size(ref: str) -> str:
    """The image's size as buildah shows it (e.g. ``6.47 GB``)."""
    shown = json.loads(_buildah("images", "--json", ref).stdout)
    return str(shown[0]["size"]) if shown else "?"


def export(ref: str) -> Path:
    """An uncompressed OCI archive of ``ref`` for containerd (removed by the caller)."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=IMAGES, suffix=".tar")
    os.close(fd)
    os.unlink(name)
    _buildah("push", "--disable-compression", ref, f"oci-archive:{name}:{ref}")
    return Path(name)
