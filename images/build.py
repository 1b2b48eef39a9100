"""Build the sample worker images app1_v0.1 and app2_v0.1 that minipool runs,
and Charliecloud image directories of them.

Each app image is a Python base image plus one module (images/appN/appN.py)
whose ``predict`` function the workers call. The builds need no network: the
Dockerfiles have no RUN steps and are built with network_mode="none".

The base image is, in order of preference: the one given with ``--base``;
python:3.11-slim if it is present; minipool-python:3.11 if it is present;
python:3.11-slim if it can be pulled (unless ``--offline``); otherwise
minipool-python:3.11, a minimal Debian bookworm with python3 that this module
builds with debootstrap from the host's own Debian mirror (needs root and the
debootstrap package), for machines that reach no image registry.

Charliecloud's ch-run runs an image directory, not an engine's image: with
``--charliecloud [DIR]`` each app image's filesystem is also untarred from
``docker export`` into DIR/app1_v0.1 and DIR/app2_v0.1 (default DIR:
images/charliecloud in this checkout, ignored by git), with ch/metadata.json
naming the image's WorkingDir as "cwd" (ch-run starts in / otherwise, and
minipool reads "cwd" when no workdir= is given, so that ``import app1`` works).
A directory is made again only when its Docker image has changed.

Usage, as a module or from the command line::

    from images.build import ensure_images, ensure_charliecloud_images
    ensure_images()                     # -> ["app1_v0.1", "app2_v0.1"]
    ensure_charliecloud_images()        # -> {"app1_v0.1": Path(".../images/charliecloud/app1_v0.1"), ...}

    python images/build.py [--base IMAGE] [--offline] [--rebuild] [--charliecloud [DIR]]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import docker
from docker.errors import APIError
from docker.errors import DockerException
from docker.errors import ImageNotFound

IMAGES_DIR = Path(__file__).resolve().parent
# Image name -> build context holding its Dockerfile and module.
APPS = {"app1_v0.1": IMAGES_DIR / "app1", "app2_v0.1": IMAGES_DIR / "app2"}
LABELS = {"minipool.image": "1"}

DEFAULT_SOCKET = "unix:///var/run/docker.sock"  # docker.from_env's, without DOCKER_HOST
DEFAULT_BASE = "python:3.11-slim"
OFFLINE_BASE = "minipool-python:3.11"
OFFLINE_REPOSITORY, OFFLINE_TAG = OFFLINE_BASE.split(":")
# bookworm is the Debian release whose python3 is 3.11, as the tag promises.
SUITE = "bookworm"
PACKAGES = "python3-minimal,libpython3.11-stdlib"
OFFLINE_CHANGES = ['CMD ["python3"]']
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
LEGACY_SOURCES = Path("/etc/apt/sources.list")
# /var/tmp rather than /tmp: it is on disk, while /tmp may be a small tmpfs.
ROOTFS_PARENT = "/var/tmp"

# Charliecloud image directories, kept between runs: in the checkout (ignored by git),
# not in /var/tmp or /tmp, where CI takes anything named minipool-* for a leftover.
CHARLIECLOUD_DIR = IMAGES_DIR / "charliecloud"
# In each image directory: the id of the Docker image it was made from, written last,
# so that a directory is remade when its image changes and a half-made one never counts.
SOURCE_FILE = Path("ch") / "minipool-source.json"

PROGRESS_EVERY = 5.0  # seconds between two progress lines of one long step

Log = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """An image could not be built, or a base image could not be had."""


def ensure_images(
    client: docker.DockerClient | None = None,
    base: str | None = None,
    offline: bool = False,
    rebuild: bool = False,
    log: Log = print,
) -> list[str]:
    """Build app1_v0.1 and app2_v0.1 if missing (all of them if rebuild); return their names.

    base: the image to build on; by default python:3.11-slim, falling back to
    minipool-python:3.11. offline: never pull. log: gets each progress line.
    """
    client = client or connect()
    to_build = [name for name in APPS if rebuild or _image_id(client, name) is None]
    if not to_build:
        log(f"images: {', '.join(APPS)} already present")
        return list(APPS)
    replaced = {name: _image_id(client, name) for name in (*to_build, OFFLINE_BASE)}
    base_image = choose_base(client, base, offline, rebuild, log)
    for name in to_build:
        _build_app(client, name, base_image, log)
    # Apps first: an old base cannot go while old app images still use it.
    for name, old_id in replaced.items():
        _drop_replaced(client, name, old_id, log)
    return list(APPS)


def connect() -> docker.DockerClient:
    """A client of the engine at $DOCKER_HOST (else the default socket) that answered a ping.

    Raises ImageBuildError naming the socket and the fix, instead of docker-py's
    chain of connection errors that names neither.
    """
    where = os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
    try:
        client = docker.from_env()
        client.ping()
    except (DockerException, OSError) as error:
        raise ImageBuildError(
            f"no Docker engine answers at {where} ({_reason(error)}): start one, or point DOCKER_HOST at one"
            " (README: Getting an engine; as root on Debian, examples/run.sh demo starts one)"
        ) from error
    return client


def _reason(error: BaseException) -> str:
    """The root cause of a connection error, in a few words."""
    said = str(error)
    for known in ("No such file or directory", "Permission denied", "Connection refused"):
        if known in said:
            return known.lower()
    return said


def choose_base(client: docker.DockerClient, base: str | None, offline: bool, rebuild: bool, log: Log) -> str:
    """Return the base image to build on, pulling or building it if need be."""
    if base is not None:
        return _require_base(client, base, offline, log)
    if _image_id(client, DEFAULT_BASE) is not None:
        return DEFAULT_BASE
    # An offline base built earlier means this machine reaches no registry: no pull.
    if not rebuild and _image_id(client, OFFLINE_BASE) is not None:
        return OFFLINE_BASE
    if not offline:
        try:
            _pull(client, DEFAULT_BASE, log)
        except ImageBuildError as error:
            log(f"images: {error}; falling back to {OFFLINE_BASE}")
        else:
            return DEFAULT_BASE
    return ensure_offline_base(client, rebuild=rebuild, log=log)


def _require_base(client: docker.DockerClient, base: str, offline: bool, log: Log) -> str:
    """Return base if it is present locally or can be pulled, else raise why not."""
    if _image_id(client, base) is not None:
        return base
    if offline:
        raise ImageBuildError(f"base image {base} is not present locally and --offline forbids pulling it")
    try:
        _pull(client, base, log)
    except ImageBuildError as error:
        raise ImageBuildError(f"base image {base} is not present locally, and {error}") from error
    return base


def _image_id(client: docker.DockerClient, name: str) -> str | None:
    """The id of the local image called name, or None when there is none."""
    try:
        return str(client.images.get(name).id)
    except ImageNotFound:
        return None


def _pull(client: docker.DockerClient, name: str, log: Log) -> None:
    """Pull name, raising ImageBuildError with the daemon's reason if that fails."""
    log(f"images: pulling {name} (use --offline to skip this on machines without a registry)...")
    progress = _Progress(log, f"pull {name}")
    try:
        for event in client.api.pull(name, stream=True, decode=True):
            # Failures after the pull has started come as events, not as HTTP errors.
            if "error" in event:
                raise ImageBuildError(f"cannot pull {name}: {event['error']}")
            progress.tick(f"{event.get('status', '')} {event.get('id', '')}".strip())
    # requests' exceptions (connection refused, timeouts) are OSErrors.
    except (DockerException, OSError) as error:
        raise ImageBuildError(f"cannot pull {name}: {error}") from error
    log(f"images: pulled {name} ({progress.elapsed():.1f} s)")


def _build_app(client: docker.DockerClient, name: str, base: str, log: Log) -> None:
    """Build the app image called name on top of base, without network."""
    start = time.monotonic()
    client.images.build(
        path=str(APPS[name]),
        tag=name,
        buildargs={"BASE": base},
        network_mode="none",
        rm=True,
        labels=LABELS,
    )
    log(f"images: built {name} on {base} ({time.monotonic() - start:.1f} s)")


def _drop_replaced(client: docker.DockerClient, name: str, old_id: str | None, log: Log) -> None:
    """Remove the image a rebuild replaced, so repeated rebuilds leave no untagged copies."""
    if old_id is None or old_id == _image_id(client, name):
        return
    try:
        client.images.remove(old_id)
    except ImageNotFound:
        # Removing an app image also removed its parent if that was the
        # replaced (untagged) base, so the base may be gone already.
        return
    except APIError as error:
        # The daemon refuses while a container still uses the old image.
        log(f"images: kept the replaced {name} image {old_id}: {error.explanation}")
        return
    log(f"images: removed the replaced {name} image {old_id}")


def ensure_offline_base(client: docker.DockerClient, rebuild: bool = False, log: Log = print) -> str:
    """Return minipool-python:3.11, first building it with debootstrap if missing or if rebuild."""
    if not rebuild and _image_id(client, OFFLINE_BASE) is not None:
        log(f"images: using the offline base {OFFLINE_BASE}")
        return OFFLINE_BASE
    _check_offline_tools()
    mirror = debian_mirror()
    log(f"images: building offline base {OFFLINE_BASE} with debootstrap (about 40 s)...")
    start = time.monotonic()
    # Resolved: the mounts to undo before removing it are listed by their real path.
    rootfs = Path(tempfile.mkdtemp(prefix="minipool-rootfs-", dir=ROOTFS_PARENT)).resolve()
    try:
        _debootstrap(rootfs, mirror, log)
        _trim_rootfs(rootfs)
        _import_rootfs(client, rootfs, log)
    finally:
        _remove_rootfs(rootfs, log)
    log(f"images: built offline base {OFFLINE_BASE} ({time.monotonic() - start:.0f} s)")
    return OFFLINE_BASE


def _check_offline_tools() -> None:
    """Raise ImageBuildError naming what the debootstrap build lacks on this machine."""
    if os.geteuid() != 0:
        raise ImageBuildError(
            f"building {OFFLINE_BASE} needs root (debootstrap makes device nodes and chroots);"
            " run as root, or give an existing image with --base"
        )
    missing = [tool for tool in ("debootstrap", "tar") if shutil.which(tool) is None]
    if missing:
        raise ImageBuildError(
            f"building {OFFLINE_BASE} needs {', '.join(missing)}: apt-get install {' '.join(missing)}"
        )


def debian_mirror() -> str:
    """The host's Debian mirror URL, read from apt's sources so that no host name lives in the repo."""
    if DEBIAN_SOURCES.exists():
        for line in DEBIAN_SOURCES.read_text().splitlines():
            if line.startswith("URIs:"):
                return _first_url(line.split())
    if LEGACY_SOURCES.exists():
        for line in LEGACY_SOURCES.read_text().splitlines():
            if line.split()[:1] == ["deb"]:
                return _first_url(line.split())
    raise ImageBuildError(f"no Debian mirror found in {DEBIAN_SOURCES} or {LEGACY_SOURCES}")


def _first_url(fields: list[str]) -> str:
    """The first URL among a sources line's fields, skipping keys and [options]."""
    for field in fields:
        if "://" in field:
            return field
    raise ImageBuildError(f"no mirror URL in apt sources line: {' '.join(fields)}")


def _debootstrap(rootfs: Path, mirror: str, log: Log) -> None:
    """Install a minimal bookworm with python3 into rootfs, logging how far it got."""
    command = ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(rootfs), mirror]
    progress = _Progress(log, "debootstrap")
    # Kept to explain a failure, which debootstrap reports in its last lines.
    tail: deque[str] = deque(maxlen=15)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as process:
        assert process.stdout is not None
        latest = "starting"
        try:
            for line in _lines_with_heartbeat(process.stdout, PROGRESS_EVERY):
                if line:
                    tail.append(line)
                    latest = line
                progress.tick(latest)
        except BaseException:
            # Interrupted: stop debootstrap before its root filesystem is removed.
            process.kill()
            process.wait()
            raise
    if process.returncode != 0:
        raise ImageBuildError(f"debootstrap failed with status {process.returncode}:\n" + "\n".join(tail))
    log(f"images: debootstrap done ({progress.elapsed():.0f} s)")


def _lines_with_heartbeat(stream: IO[str], every: float) -> Iterator[str]:
    """Yield the stream's lines, and "" whenever it stays silent for `every` seconds.

    The heartbeats let the caller report progress while a step prints nothing.
    """
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line.rstrip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=every)
        except queue.Empty:
            yield ""
            continue
        if line is None:
            return
        yield line


def _trim_rootfs(rootfs: Path) -> None:
    """Delete what debootstrap leaves that the image should not carry.

    That is the build host's resolv.conf and hostname, which Docker supplies
    in each container anyway, and apt's downloaded .debs and package lists
    (~90 MB), which the image never uses.
    """
    for host_file in ("etc/resolv.conf", "etc/hostname"):
        (rootfs / host_file).unlink(missing_ok=True)
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    for entry in (rootfs / "var/lib/apt/lists").iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _import_rootfs(client: docker.DockerClient, rootfs: Path, log: Log) -> None:
    """Import rootfs as OFFLINE_BASE, streaming a tar of it from tar(1) to the daemon.

    Streaming keeps memory flat however big the rootfs is. The image is
    tagged only once tar has exited cleanly, so a truncated tar never
    becomes the base image.
    """
    progress = _Progress(log, "import")
    command = ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."]
    with subprocess.Popen(command, stdout=subprocess.PIPE) as tar:
        assert tar.stdout is not None
        stream = _CountingReader(tar.stdout, lambda sent: progress.tick(f"{sent / 1e6:.0f} MB sent"))
        result = client.api.import_image_from_stream(stream, changes=OFFLINE_CHANGES)
    image_id = _imported_id(result)
    if tar.returncode != 0:
        client.images.remove(image_id)
        raise ImageBuildError(f"tar of {rootfs} failed with status {tar.returncode}")
    client.api.tag(image_id, OFFLINE_REPOSITORY, OFFLINE_TAG)
    log(f"images: imported {OFFLINE_BASE} ({stream.sent / 1e6:.0f} MB in {progress.elapsed():.1f} s)")


def _imported_id(result: str) -> str:
    """The image id in the daemon's answer to an import: JSON lines, the last one {"status": id}."""
    last = json.loads(result.strip().splitlines()[-1])
    if "error" in last:
        raise ImageBuildError(f"docker import failed: {last['error']}")
    return str(last["status"])


def _remove_rootfs(rootfs: Path, log: Log) -> None:
    """Delete the temporary rootfs, first detaching anything still mounted inside it."""
    # Inside a container debootstrap bind-mounts the host's /dev/shm and /dev/pts
    # into the rootfs. If it died before unmounting them, rmtree would empty the
    # host's copies; deepest mounts are detached first.
    for mountpoint in sorted(_mounts_under(rootfs), reverse=True):
        subprocess.run(["umount", "--lazy", mountpoint], check=False)
    if _mounts_under(rootfs):
        log(f"images: left {rootfs} in place: something is still mounted inside it")
        return
    try:
        shutil.rmtree(rootfs)
    except OSError as error:  # never hide the error that brought us here
        log(f"images: could not remove {rootfs}: {error}")


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, from the kernel's mount table."""
    with Path("/proc/self/mounts").open() as mounts:
        points = [line.split()[1] for line in mounts]
    return [point for point in points if point == str(path) or point.startswith(f"{path}/")]


def ensure_charliecloud_images(
    directory: str | os.PathLike[str] | None = None,
    client: docker.DockerClient | None = None,
    offline: bool = False,
    rebuild: bool = False,
    log: Log = print,
) -> dict[str, Path]:
    """Make a Charliecloud image directory of each app image, directory/NAME, where
    missing or made from another build of the image; return {name: its directory}.

    The Docker images are built first if missing (see ensure_images). directory:
    default images/charliecloud in this checkout. rebuild: make them all again.
    """
    parent = Path(directory or CHARLIECLOUD_DIR).absolute()
    client = client or connect()
    ensure_images(client, offline=offline, log=log)
    made = {name: parent / name for name in APPS}
    ready = []
    for name, path in made.items():
        image_id = _image_id(client, name)
        assert image_id is not None  # ensure_images built it
        if rebuild or _made_from(path) != image_id:
            _export_image(client, name, image_id, path, log)
        else:
            ready.append(name)
    if ready:
        log(f"images: Charliecloud image directories of {', '.join(ready)} ready in {parent}")
    return made


def _made_from(path: Path) -> str | None:
    """The id of the Docker image that the image directory was made from, or None."""
    try:
        return str(json.loads((path / SOURCE_FILE).read_text())["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _export_image(client: docker.DockerClient, name: str, image_id: str, path: Path, log: Log) -> None:
    """Untar the image's filesystem from `docker export` of a container created (never
    started) from it into path, beside which it is made, then renamed into place."""
    start = time.monotonic()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=path.parent))
    partial.chmod(0o755)  # the image's /, which ch-run as any user must reach (mkdtemp's is 0700)
    old = path.parent / f".{name}.old-{os.getpid()}"
    size = 0
    try:
        # The command is never run: create only needs one for an image without CMD.
        container = client.api.create_container(image_id, ["true"], labels=LABELS, network_disabled=True)
        try:
            # Not /dev's device nodes, which only root could make: ch-run binds the host's /dev.
            extract = ["tar", "-x", "-C", str(partial), "--exclude=dev/*"]
            with subprocess.Popen(extract, stdin=subprocess.PIPE) as tar:
                assert tar.stdin is not None
                try:
                    for chunk in client.api.export(container):
                        tar.stdin.write(chunk)
                        size += len(chunk)
                finally:
                    tar.stdin.close()
        finally:
            client.api.remove_container(container, force=True)
        if tar.returncode != 0:
            raise ImageBuildError(f"tar -x of docker export {name} into {partial} failed with status {tar.returncode}")
        config = client.api.inspect_image(image_id)["Config"] or {}
        (partial / "ch").mkdir(exist_ok=True)
        (partial / "ch" / "metadata.json").write_text(json.dumps({"cwd": config.get("WorkingDir") or "/"}) + "\n")
        (partial / SOURCE_FILE).write_text(json.dumps({"image": name, "id": image_id}) + "\n")
        if path.exists():
            path.rename(old)
        try:
            partial.rename(path)
        except OSError:
            if _made_from(path) != image_id:  # else another run made the same one meanwhile
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    log(
        f"images: made Charliecloud image directory {path} from {name} "
        f"(docker export | tar -x, {size / 1e6:.0f} MB, {time.monotonic() - start:.1f} s)"
    )


class _Progress:
    """Logs one long step's progress, at most once every PROGRESS_EVERY seconds."""

    def __init__(self, log: Log, step: str) -> None:
        self._log = log
        self._step = step
        self._start = self._last = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def tick(self, detail: str) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY:
            self._last = now
            self._log(f"images:   {self._step} {self.elapsed():.0f} s: {detail}")


class _CountingReader(io.RawIOBase):
    """A read-only stream that passes raw through, reporting the bytes sent so far.

    Being an io.RawIOBase with no length makes requests send it chunked, a
    block at a time, instead of reading it whole.
    """

    def __init__(self, raw: IO[bytes], on_read: Callable[[int], None]) -> None:
        super().__init__()
        self._raw = raw
        self._on_read = on_read
        self.sent = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        block = self._raw.read(size)
        self.sent += len(block)
        self._on_read(self.sent)
        return block


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: build the app images, printing progress."""
    parser = argparse.ArgumentParser(description="Build minipool's sample images app1_v0.1 and app2_v0.1 "
                                     "(and Charliecloud image directories of them).")
    parser.add_argument("--base", metavar="IMAGE", help=f"base image (default: {DEFAULT_BASE}, else {OFFLINE_BASE})")
    parser.add_argument("--offline", action="store_true", help=f"never pull; fall back to building {OFFLINE_BASE}")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the images even if they exist")
    parser.add_argument(
        "--charliecloud", nargs="?", const=str(CHARLIECLOUD_DIR), metavar="DIR",
        help=f"also make Charliecloud image directories DIR/NAME (default DIR: {CHARLIECLOUD_DIR})",
    )
    args = parser.parse_args(argv)
    try:
        ensure_images(base=args.base, offline=args.offline, rebuild=args.rebuild)
        if args.charliecloud:
            ensure_charliecloud_images(args.charliecloud, offline=args.offline, rebuild=args.rebuild)
    except (ImageBuildError, DockerException, OSError) as error:
        print(f"images: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
