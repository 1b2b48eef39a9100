"""Fixtures: a real engine, the seed's images, and pools that must leave nothing behind."""

import contextlib
import faulthandler
import glob
import importlib.util
import itertools
import json
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
import uuid

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


def start_script(code, env_path=(ROOT, TESTS), cwd=None, environment=(), new_session=False):
    """Start `code` as a user's script: its functions live in __main__, its stdout is a pipe.
    `environment`: variables set for it; new_session: it leads a session and process group
    of its own, as a shell's job does (a Ctrl-C there is its own)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(env_path), **dict(environment)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=new_session,
        # As a user's script from a terminal: a runner started in the background of a
        # shell (`.ci/run &`) ignores SIGINT, and so would the script, deaf to Ctrl-C.
        restore_signals=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def read_lines(process, count, timeout=DEADLOCK):
    """The child's next `count` lines of stdout; if they do not come in time, the
    child is killed and the test fails (a bare readline would wait for ever)."""
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(itertools.islice(process.stdout, count)), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive() or len(lines) < count:
        process.kill()
        raise AssertionError(f"waited {timeout} s for {count} lines of output, got {lines}")
    return lines


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


def left_by_a_dead_caller(engine, label, host):
    """A Created container whose owner process is gone, as a caller killed between
    create and start leaves it; its id. Its labels name `host`: give it one of the
    test's own (own_host), or every run's sweep on a shared engine may take it first."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process
    labels = {
        "minipool": "test",
        "minipool.host": host,
        "minipool.pid": str(gone.pid),
        "minipool.label": label,
    }
    return engine.api.create_container(APP1, ["python3"], labels=labels)["Id"]


@pytest.fixture
def own_host(monkeypatch):
    """A host name of the test's own, which this process reports from now on
    (socket.gethostname): the containers and channel directories its pools make, and
    a dead caller's labelled with it, are this test's alone to sweep. Other runs on
    the same engine and /tmp take them for another host's, and leave them."""
    name = f"mp-{uuid.uuid4().hex[:8]}"  # short: `python -m minipool ps` shows 28 characters of HOST:PID STATE
    monkeypatch.setattr(socket, "gethostname", lambda: name)
    return name


def on_host(name, argv):
    """`argv` run on the host `name`: in a UTS namespace of its own (needs root and unshare)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but a command cannot run under a host name of its own (needs root and unshare)")
        pytest.skip("a host name of the test's own needs root and unshare")
    return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]


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
            # runc, not Podman's default crun: crun refuses a machine with cgroups in hybrid
            # mode (v1 controllers beside a v2 tree), which some of ours have; Docker uses runc.
            runtime = 'runtime = "runc"\n' if shutil.which("runc") else ""
            file.write(f'[engine]\nlock_type = "file"\n{runtime}')
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


# --------------------------------------------------------------------------- runtimes

# Where the runtime-neutral tests run: the engine API (Docker, Podman), each on both
# of its channels (a unix socket per container by default; "-attach": the attach
# stream), and a runtime run as a command (Charliecloud's ch-run, each block a child
# process of ours), and Charliecloud under Slurm (each block a job of the tests' cluster).
RUNTIMES = ["docker", "docker-attach", "podman", "podman-attach", "charliecloud", "slurm"]


@pytest.fixture(scope="session")
def charliecloud_images(engine, images):
    """{image name: Charliecloud image directory} for the seed's images, made as
    ch-convert makes them (the image's files from a docker export; ch/metadata.json
    with its WorkingDir) plus an empty /shared, where tests bind a host directory
    (ch-run binds only onto a path the image has). Removed at the end of the session.
    Without ch-run the tests skip, except in CI."""
    require_ch_run()
    root = tempfile.mkdtemp(prefix="minipool-charliecloud-", dir="/var/tmp")
    try:
        yield {image: _image_directory(engine, image, os.path.join(root, image)) for image in images}
    finally:
        shutil.rmtree(root)


def _image_directory(engine, image, directory):
    """docker export of a created container of `image`, untarred into `directory`."""
    os.mkdir(directory)
    container_id = engine.api.create_container(image)["Id"]
    try:
        untar = subprocess.Popen(["tar", "-x", "-C", directory], stdin=subprocess.PIPE)
        with untar.stdin:
            for chunk in engine.api.export(container_id):
                untar.stdin.write(chunk)
        assert untar.wait(DEADLOCK) == 0, f"tar could not unpack the export of {image}"
    finally:
        engine.api.remove_container(container_id, force=True)
    os.makedirs(os.path.join(directory, "shared"), exist_ok=True)
    os.makedirs(os.path.join(directory, "ch"), exist_ok=True)
    with open(os.path.join(directory, "ch", "metadata.json"), "w") as file:
        json.dump({"cwd": engine.api.inspect_image(image)["Config"]["WorkingDir"] or "/"}, file)
    return directory


def require_ch_run():
    """Skip the test without Charliecloud's ch-run, or fail it in CI."""
    if shutil.which("ch-run") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but ch-run is not installed (apt-get install charliecloud-runtime)")
        pytest.skip("no ch-run here (as root on Debian: apt-get install charliecloud-runtime)")


def processes_using(directory):
    """Pids of the processes whose environment names `directory` (a TMPDIR, say)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if os.fsencode(directory) in environ.read():
                    found.append(int(pid))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def processes(orphaned_zombies=True):
    """(pid, parent pid, session id) of every process, as /proc has them now. Without
    orphaned_zombies, not those that have ended and wait for init to reap them (as
    srun's helper process does once srun is gone): they are no process left running,
    and this machine's init reaps them in its own time, up to seconds later."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
        except OSError:
            continue  # it ended meanwhile
        # The command's name, in parentheses, may hold spaces: the fields start after it.
        state, ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
        if orphaned_zombies or state != "Z" or int(ppid) == os.getpid():
            found.append((int(entry), int(ppid), int(session)))
    return found


def block_directories():
    """The block TMPDIRs this process's command runtime pools make under the temporary
    directory (not other runs': their new ones are not ours to find left, nor remove)."""
    own = f"minipool-block-{socket.gethostname()}-{os.getpid()}-*"
    return set(glob.glob(os.path.join(tempfile.gettempdir(), own)))


class Runtime:
    """A runtime as the tests see it. pool(...) is make_pool with the runtime's image
    and arguments filled in; blocks() lists the ids of the test's blocks there now
    (in any state); seen_as(id) is what helpers.block_after returns in that block;
    kill(id) kills it from outside, and a block so killed dies of `killed_by`; a
    block leaves blocks() at most `lingers` seconds after its container is removed;
    named(seen) is how the pool's messages name the block that helpers.block calls
    `seen`; block_of(container_id) is the block a WorkerLost's container_id is in.
    close() shuts the pools down and proves that nothing of them is left."""

    killed_by = "SIGKILL"
    lingers = 0

    def __init__(self, name, make_pool, label):
        self.name = name
        self._make_pool = make_pool
        self.label = label
        self.pools = []

    def image(self, name=APP1):
        return name

    def options(self):
        return {}

    def named(self, seen=r"\w+"):
        """A regular expression: the block as the pool's messages name it."""
        return f"container {seen}"

    def block_of(self, container_id):
        return container_id

    def pool(self, image=APP1, **options):
        options = {**self.options(), **options}
        pool = self._make_pool(self.image(image), **options)
        self.pools.append(pool)
        return pool

    def close(self):
        for pool in self.pools:
            started = time.monotonic()
            pool.shutdown(wait=True, cancel_futures=True)
            assert time.monotonic() - started < 15, "shutdown was not quick"


class EngineRuntime(Runtime):
    """Docker's engine, or a Podman service, through the engine API: a block is a container."""

    def __init__(self, name, make_pool, label, client, url, container_options, channel):
        super().__init__(name, make_pool, label)
        self.client = client
        self.url = url
        self.container_options = container_options
        self.channel = channel or "auto"

    def options(self):
        return {"engine": self.url, "channel": self.channel}

    def pool(self, image=APP1, **options):
        # Podman's own options (its ulimits) under the test's.
        options["container_options"] = {**self.container_options, **options.get("container_options", {})}
        return super().pool(image, **options)

    def blocks(self):
        return containers_labelled(self.client, self.label)

    def seen_as(self, block):
        return block[:12]  # the container's hostname

    def kill(self, block):
        self.client.api.kill(block)

    def close(self):
        super().close()
        if self.url is not None:  # Docker's own: the label fixture looks there
            try:
                assert_none_left(self.client, self.label)
            finally:
                self.client.close()


class CommandRuntime(Runtime):
    """A runtime run as a command (ch-run): a block is a child process of the test's,
    in a session of its own, whose pid is the block's id."""

    def __init__(self, name, make_pool, label, images):
        super().__init__(name, make_pool, label)
        self.images = images
        # Children of ours from before (a Podman service, dockerd) are no blocks.
        self.before = {pid for pid, ppid, _ in processes() if ppid == os.getpid()}
        self.directories = block_directories()
        self.sessions = set()  # of every block seen: no process may be left in one

    def image(self, name=APP1):
        return self.images[name]

    def options(self):
        return {"runtime": self.name}

    def blocks(self):
        found = [
            pid for pid, ppid, session in processes()
            if ppid == os.getpid() and session == pid and pid not in self.before
        ]
        self.sessions.update(found)
        return [str(pid) for pid in found]

    def seen_as(self, block):
        return block  # the pid of the block's process: the task's session id

    def kill(self, block):
        os.kill(int(block), signal.SIGKILL)

    def left(self):
        """Processes of ours or of a block's session, block TMPDIRs: what must not outlive the pools."""
        processes_left = {
            pid for pid, ppid, session in processes(orphaned_zombies=False)
            if (ppid == os.getpid() and pid not in self.before) or session in self.sessions
        }
        return processes_left, block_directories() - self.directories

    def close(self):
        self.blocks()  # their sessions, before they go
        super().close()
        with contextlib.suppress(AssertionError):
            wait_until(lambda: self.left() == (set(), set()), timeout=15, what="the blocks' processes to go")
        pids, directories = self.left()
        for pid in pids:  # not left for the tests after this one
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)
        assert not pids, f"processes left behind: {sorted(pids)}"
        assert not directories, f"block directories left behind: {sorted(directories)}"


@pytest.fixture
def runtime_of(request, make_pool, label):
    """runtime_of(name): a Runtime for one of RUNTIMES. At teardown its pools are shut
    down and what they leave fails the test (the label fixture checks Docker after)."""
    made = []

    def get(name):
        engine, _, channel = name.partition("-")
        if engine == "docker":
            runtime = EngineRuntime(name, make_pool, label, request.getfixturevalue("engine"), None, {}, channel)
        elif engine == "podman":
            podman = request.getfixturevalue("podman")
            runtime = EngineRuntime(
                name, make_pool, label, podman.client(), podman.url, podman.container_options, channel
            )
        elif name == "slurm":
            images, cluster = request.getfixturevalue("charliecloud_images"), request.getfixturevalue("slurm_cluster")
            runtime = SlurmRuntime(name, make_pool, label, images, cluster)
        else:
            runtime = CommandRuntime(name, make_pool, label, request.getfixturevalue("charliecloud_images"))
        made.append(runtime)
        return runtime

    yield get
    for runtime in made:
        runtime.close()


@pytest.fixture(params=RUNTIMES)
def any_runtime(request, runtime_of):
    """Each of RUNTIMES in turn; a test that needs a case on some only parametrizes
    it indirectly (see runtime_cases)."""
    return runtime_of(request.param)


def runtime_cases(cases, runtimes=lambda case: RUNTIMES, name=str):
    """pytest.params of (runtime, *case) for each case on each of runtimes(case), for
    parametrizing any_runtime indirectly along with the case's own arguments."""
    return [pytest.param(runtime, *case, id=f"{runtime}-{name(case)}") for case in cases for runtime in runtimes(case)]


@pytest.fixture(autouse=True)
def dump_stacks_on_deadlock():
    """A test that hangs past the deadlock timeout prints every thread's stack."""
    faulthandler.dump_traceback_later(DEADLOCK * 3, exit=False)
    yield
    faulthandler.cancel_dump_traceback_later()


# --------------------------------------------------------------------------- Slurm


@pytest.fixture(scope="session")
def slurm_cluster():
    """A four-node Slurm cluster of the session's own (tests/slurm_cluster.py: munged,
    slurmctld, slurmd), SLURM_CONF pointing at it while the session runs; its daemons
    stopped by pid and its directory removed at the end. Skips without Slurm or root,
    except in CI."""
    import slurm_cluster

    why = slurm_cluster.missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no Slurm cluster can be started: {why}")
        pytest.skip(why)
    before = os.environ.get("SLURM_CONF")
    with slurm_cluster.running_cluster() as cluster:
        os.environ["SLURM_CONF"] = cluster.conf
        try:
            yield cluster
        finally:
            if before is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = before


@pytest.fixture
def slurm(slurm_cluster):
    """The session's cluster, for one test that must leave no job in its queue: what
    is left after 15 s is cancelled, then the test fails."""
    yield slurm_cluster
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not slurm_cluster.jobs(), timeout=15, what="the test's jobs to leave the queue")
    left = slurm_cluster.jobs()
    if left:
        slurm_cluster.run("scancel", *[job_id for job_id, _, _ in left])
    assert not left, f"jobs left in the queue: {left}"


class SlurmRuntime(CommandRuntime):
    """Charliecloud under Slurm (provider=minipool.Slurm()): a block is a job, whose
    id is the block's id; srun is a child of the test's, in a session of its own.
    Of one node (Slurm()'s nodes_per_block=1), a job has one container, its step,
    which the pool names by job, step and node, and whose container_id is JOB.STEP.
    kill() is scancel: Slurm signals the job's steps with SIGTERM (SIGKILL follows
    after the cluster's KillWait), and the stub dies of the first."""

    killed_by = "SIGTERM"
    # A block's job is let go once its block thread has released the step it removed.
    lingers = 5

    def __init__(self, name, make_pool, label, images, cluster):
        super().__init__(name, make_pool, label, images)
        self.cluster = cluster

    def image(self, name=APP1):
        return self.images.get(name, name)  # a Command's image is whatever its argv makes of it

    def options(self):
        import minipool

        # Slurm()'s defaults, whole nodes (exclusive=True): no test of the suites holds more
        # blocks at once than the cluster's four nodes (max_blocks=4 at most), so none waits
        # in the queue for a node.
        return {"runtime": "charliecloud", "provider": minipool.Slurm()}

    def blocks(self):
        """The test's jobs but those Slurm is ending (COMPLETING: their srun is gone, their processes killed)."""
        super().blocks()  # srun's sessions, for close() to check
        return [
            job_id for job_id, name, state in self.cluster.jobs()
            if name == f"minipool-{self.label}" and state != "COMPLETING"
        ]

    def seen_as(self, block):
        return block  # helpers.block_after's SLURM_JOB_ID

    def named(self, seen=r"\d+"):
        return rf"Slurm job {seen}, step \d+, node n\d+"

    def block_of(self, container_id):
        job, step = container_id.split(".")
        assert step.isdigit(), f"{container_id} is no job step"
        return job

    def kill(self, block):
        self.cluster.run("scancel", block)

    def left(self):
        """As a command runtime's, and the processes of the test's jobs on the nodes,
        which slurmstepd (a child of init, not of srun) runs outside srun's session."""
        processes_left, directories = super().left()
        ours = os.fsencode(f"\0SLURM_JOB_NAME=minipool-{self.label}\0")
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as environ:
                    if ours in b"\0" + environ.read():
                        processes_left.add(int(pid))
            except OSError:  # gone meanwhile
                continue
        return processes_left, directories

    def close(self):
        """As a command runtime's, and no job may be left in the queue (the session's cluster is the tests' own)."""
        super().close()
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not self.cluster.jobs(), timeout=15, what="the pools' jobs to leave the queue")
        left = self.cluster.jobs()
        if left:
            self.cluster.run("scancel", *[job_id for job_id, _, _ in left])
        assert not left, f"jobs left in the queue: {left}"
