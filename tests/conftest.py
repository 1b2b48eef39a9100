"""Fixtures: a real engine, the seed's images, and pools that must leave nothing behind."""

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
    wait_until(lambda: not containers_labelled(engine, name), timeout=15, what="containers to go")
    left = containers_labelled(engine, name)
    for container_id in left:
        engine.api.remove_container(container_id, force=True)
    assert not left, f"containers left behind: {left}"
    wait_until(lambda: not minipool_threads(name), timeout=15, what="minipool threads to end")


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

    def __init__(self, root):
        self.root = root
        self.url = f"unix://{root}/docker.sock"
        self.process = None

    def start(self):
        with open(os.path.join(self.root, "dockerd.log"), "ab") as log:
            self.process = subprocess.Popen(
                [
                    "dockerd", "--host", self.url, "--data-root", f"{self.root}/data",
                    "--exec-root", f"{self.root}/exec", "--pidfile", f"{self.root}/docker.pid",
                    "--bridge=none", "--iptables=false", "--ip-masq=false",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        wait_until(self.answers, what="the second engine to answer")

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


@pytest.fixture
def second_engine(engine, images):
    """A second engine holding app1_v0.1, stopped and removed at teardown."""
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but dockerd cannot be started here (needs root and docker.io)")
        pytest.skip("a second engine needs root and dockerd")
    second = SecondEngine(tempfile.mkdtemp(prefix="minipool-engine-", dir="/var/tmp"))
    try:
        second.start()
        client = second.client()
        client.api.load_image(engine.api.get_image(APP1))
        client.close()
        yield second
    finally:
        if second.process is not None and second.process.poll() is None:
            second.stop()
        shutil.rmtree(second.root, ignore_errors=True)


@pytest.fixture(autouse=True)
def dump_stacks_on_deadlock():
    """A test that hangs past the deadlock timeout prints every thread's stack."""
    faulthandler.dump_traceback_later(DEADLOCK * 3, exit=False)
    yield
    faulthandler.cancel_dump_traceback_later()
