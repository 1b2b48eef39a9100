"""Fixtures: a real engine, the seed's images, and pools that must leave nothing behind."""

import contextlib
import faulthandler
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
HELPERS = os.path.join(TESTS, "helpers.py")
APP1 = "app1_v0.1"
APP2 = "app2_v0.1"
# Long enough for a loaded 2-core machine, short enough that a deadlock fails the run.
DEADLOCK = 60


def wait_until(predicate, timeout=DEADLOCK, what="condition"):
    """Poll `predicate` against a deadline (for states only the engine can tell)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def holds(predicate, seconds, what="condition"):
    """Assert that `predicate` stays true for `seconds`, looking every 50 ms: for a
    state that must not change (no event to wait for), never one look after a sleep."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"{what} stopped holding"
        time.sleep(0.05)


def start_script(code, env_path=(ROOT, TESTS), cwd=None):
    """Start `code` as a user's script: its functions live in __main__, its stdout is a pipe."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(env_path)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
    )


@pytest.fixture(scope="session")
def engine():
    """A Docker client; the container tests skip without an engine, except in CI."""
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no Docker engine answers: {exc}")
        pytest.skip(f"no Docker engine: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def images(engine):
    """The seed's images, built (offline if need be) when missing."""
    spec = importlib.util.spec_from_file_location("build_images", os.path.join(ROOT, "images", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.ensure_images(engine, log=lambda line: print(line, file=sys.stderr))
    return APP1, APP2


def containers_labelled(engine, label):
    """Ids of the containers carrying the test's label, in any state."""
    return [c["Id"] for c in engine.api.containers(all=True, filters={"label": f"minipool.label={label}"})]


def left_by_a_dead_caller(engine, label):
    """A Created container whose owner process is gone, as a caller killed between
    create and start leaves it; its id."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process
    labels = {
        "minipool": "test",
        "minipool.host": socket.gethostname(),
        "minipool.pid": str(gone.pid),
        "minipool.label": label,
    }
    return engine.api.create_container(APP1, ["python3"], labels=labels)["Id"]


def minipool_threads(label):
    return [t for t in threading.enumerate() if t.name.startswith(f"minipool-{label}-")]


@pytest.fixture
def label(request, engine):
    """A label unique to the test. Teardown proves that none of its containers or
    threads are left; what is left is removed, then the test fails."""
    name = re.sub(r"[^a-zA-Z0-9_.-]+", "-", request.node.name)[:60] + f"-{os.getpid()}"
    yield name
    assert_none_left(engine, name)
    wait_until(lambda: not minipool_threads(name), timeout=15, what="minipool threads to end")


def assert_none_left(engine, label, timeout=15):
    """Fail if the label's containers do not go from `engine`; remove those left
    first, so that they do not outlive the test that leaked them."""
    import docker.errors

    with contextlib.suppress(AssertionError):
        wait_until(lambda: not containers_labelled(engine, label), timeout=timeout, what="containers to go")
    left = containers_labelled(engine, label)
    for container_id in left:
        with contextlib.suppress(docker.errors.NotFound):  # auto_remove may get there first
            engine.api.remove_container(container_id, force=True)
    assert not left, f"containers left behind: {left}"


@pytest.fixture
def make_pool(images, label):
    """Make ContainerPoolExecutors labelled for the test; shut them down quickly at teardown."""
    from minipool import ContainerPoolExecutor

    pools = []

    def make(image=APP1, blocks=1, **options):
        options.setdefault("ship", [HELPERS])
        pool = ContainerPoolExecutor(image, blocks, label=label, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        started = time.monotonic()
        pool.shutdown(wait=True, cancel_futures=True)
        assert time.monotonic() - started < 15, "shutdown was not quick"


class SecondEngine:
    """A dockerd of the test's own (socket, data root, exec root, pid file): it can
    be stopped and started again, and stands in for a second host."""

    program = "dockerd"

    def __init__(self, root):
        self.root = root
        self.url = f"unix://{root}/docker.sock"
        self.container_options = {}
        self.process = None

    def command(self):
        return [
            "dockerd", "--host", self.url, "--data-root", f"{self.root}/data",
            "--exec-root", f"{self.root}/exec", "--pidfile", f"{self.root}/docker.pid",
            "--bridge=none", "--iptables=false", "--ip-masq=false",
        ]

    def environment(self):
        return os.environ

    def start(self):
        with open(os.path.join(self.root, f"{self.program}.log"), "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.environment(),
            )
        wait_until(self.answers, what=f"{self.program} to answer")

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(DEADLOCK)

    def answers(self):
        import docker

        try:
            client = docker.DockerClient(base_url=self.url)
        except docker.errors.DockerException:
            return False
        try:
            return client.ping()
        except docker.errors.DockerException:
            return False
        finally:
            client.close()

    def client(self):
        import docker

        return docker.DockerClient(base_url=self.url)


class PodmanEngine(SecondEngine):
    """`podman system service` serving the Docker API, with its state under `root`
    (storage, run root, tmp dir, locks, network configs, events). Root Podman always
    shares /run/containers/networks (unused with network none) and its blob cache in
    /var/lib/containers/cache."""

    program = "podman"

    def __init__(self, root):
        super().__init__(root)
        self.url = f"unix://{root}/podman.sock"
        # Podman gives root's containers nofile and nproc limits of 2**20, which these
        # VMs refuse to root ("error setting rlimit type 7: operation not permitted").
        self.container_options = {
            "ulimits": [{"name": "nofile", "soft": 1024, "hard": 1024}, {"name": "nproc", "soft": 4096, "hard": 4096}]
        }

    def command(self):
        return [
            "podman", "--root", f"{self.root}/storage", "--runroot", f"{self.root}/run",
            "--tmpdir", f"{self.root}/tmp", "--network-config-dir", f"{self.root}/networks",
            # overlay, as vfs copies the whole image for each container; without
            # skip_mount_home it bind-mounts its storage onto itself, outliving it.
            "--storage-driver", "overlay", "--storage-opt", "overlay.skip_mount_home=true",
            # No systemd units, no journal: cgroups and events stay its own.
            "--cgroup-manager", "cgroupfs", "--events-backend", "file",
            "system", "service", "--time=0", self.url,
        ]

    def environment(self):
        # Only this file configures it (no machine-wide containers.conf), and its
        # locks go to its tmp dir instead of the /dev/shm table every root Podman shares.
        conf = os.path.join(self.root, "containers.conf")
        with open(conf, "w") as file:
            file.write('[engine]\nlock_type = "file"\n')
        return {**os.environ, "CONTAINERS_CONF": conf}


@contextlib.contextmanager
def started(kind, engine, images):
    """A `kind` engine of the test's own holding `images`; its containers are removed,
    it is stopped and its state deleted at the end."""
    if shutil.which(kind.program) is None or os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {kind.program} cannot be started here (needs root)")
        pytest.skip(f"a second engine needs root and {kind.program}")
    own = kind(tempfile.mkdtemp(prefix=f"minipool-{kind.program}-", dir="/var/tmp"))
    try:
        own.start()
        client = own.client()
        for image in images:
            list(client.api.load_image(engine.api.get_image(image)))  # the stream carries load errors
        client.close()
        yield own
        if own.answers():
            # Whatever a failed test left would outlive a Podman service (conmon runs apart).
            client = own.client()
            for container in client.api.containers(all=True):
                client.api.remove_container(container["Id"], force=True)
            client.close()
    finally:
        if own.process is not None and own.process.poll() is None:
            own.stop()
        shutil.rmtree(own.root, ignore_errors=True)


@pytest.fixture
def second_engine(engine, images):
    """A second dockerd holding app1_v0.1, for one test."""
    with started(SecondEngine, engine, [APP1]) as second:
        yield second


@pytest.fixture(scope="session")
def podman(engine, images):
    """A Podman service holding the seed's images, for the whole session."""
    with started(PodmanEngine, engine, images) as podman:
        yield podman


@pytest.fixture(params=["docker", "podman"])
def any_engine(request, engine):
    """(client, URL, container options) of the Docker engine, then of a Podman service."""
    if request.param == "docker":
        yield engine, None, {}
        return
    podman = request.getfixturevalue("podman")
    client = podman.client()
    yield client, podman.url, podman.container_options
    client.close()


@pytest.fixture(autouse=True)
def dump_stacks_on_deadlock():
    """A test that hangs past the deadlock timeout prints every thread's stack."""
    faulthandler.dump_traceback_later(DEADLOCK * 3, exit=False)
    yield
    faulthandler.cancel_dump_traceback_later()
