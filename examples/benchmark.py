"""minipool against its baselines, every row measured in the same run.

    python examples/benchmark.py [--quick] [--image app1_v0.1] [--charliecloud-image DIR]

The Docker pool's rows come twice: on the channel channel="auto" chose (a unix
socket per container, where the engine is on this machine; the reason is printed
under the table) and on channel="attach". Baselines: ProcessPoolExecutor with as
many workers as blocks; one `docker run --rm` per task; one `docker exec` per
task; and the attach stream's own limit, raw bytes through an attached container
(what `docker run -i` does) with log driver none, each way. Each figure is the
median of several repetitions (one with --quick, which CI runs as a smoke test
without judging the numbers).

Where ch-run is installed, the same pool on Charliecloud (runtime="charliecloud",
on an image directory made from the image by images/build.py if missing) gets
rows of its own: cold start against a bare `ch-run IMG -- python3 -c pass`, round
trip and throughput against ProcessPoolExecutor, 64 MB each way against raw bytes
through a ch-run process's pipes, and each against the Docker pool's own figure.

Where a Slurm cluster answers (SLURM_CONF set, srun on PATH), the Charliecloud pool
with provider=minipool.Slurm() (each block a job) gets rows too: first result and 8
blocks ready (these with exclusive=False: 8 blocks of a whole node each would not fit
on 4 nodes) against as many bare `srun ch-run IMG -- python3 -c pass`, round trip and
throughput against the local Charliecloud pool of the same run. On a cluster of four
nodes or more (issue 21), also:
- a block of 4 nodes (Slurm(nodes_per_block=4)), constructor to its 4 stubs ready,
  against a bare `srun -N4 true` (target 2x) and `srun -N4 ch-run IMG -- python3 -c pass`;
- the same part of this script (`--part first-result`: a pool of one block, its
  constructor to first result and its no-op round trip) run in a process of its own
  outside any allocation (each block a job) and inside `salloc -N2` (each stub a step
  of that allocation), the one against the other;
- 1,024 workers: 2 blocks of 2 nodes, 256 workers a node, run 20,000 tasks of 100 ms
  (--quick: 16 workers a node, 640 tasks) in a process of its own (`--part
  many-workers`): the makespan against the ideal (total work / workers, target 1.3x),
  the caller's CPU a task against one core's budget at the ideal pace, the caller's
  threads and peak RSS; a note under the table says how much memory the machine had
  in use and how busy its CPUs were meanwhile.
On one machine, as root, with a four-node cluster of its own (tests/slurm_cluster.py:
n1..n4, each claiming 256 CPUs of the machine's own):

    python tests/slurm_cluster.py python examples/benchmark.py --quick
"""

import argparse
import ast
import concurrent.futures as cf
import contextlib
import functools
import getpass
import importlib.util
import inspect
import json
import logging
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

import docker  # noqa: E402

try:
    import numpy
except ImportError:
    numpy = None

import minipool  # noqa: E402
from minipool import ContainerPoolExecutor  # noqa: E402

MB = 1 << 20
# Said after an engine or image error, instead of a traceback.
SETUP_HINT = "(python images/build.py builds the seed's images; examples/run.sh demo also starts an engine)"
QUIET = {"network_mode": "none", "log_config": {"type": "none"}}
# How long a row waits for its blocks to be ready: for a loaded machine, not for a
# Slurm job queued behind others (that row is wrong, and says so).
READY_DEADLINE = 120


class Sizes:
    """How much work each row does: full, or --quick for CI."""

    def __init__(self, quick):
        self.repeats = 1 if quick else 5
        self.round_trips = 200 if quick else 1000
        self.outstanding = 2_000 if quick else 10_000
        self.map_items = 20_000 if quick else 200_000
        self.payload = (8 if quick else 64) * MB
        self.big_result = (32 if quick else 256) * MB
        self.block_counts = (1, 4) if quick else (1, 4, 16)
        self.charliecloud_blocks = (1, 4) if quick else (1, 16)
        self.per_task_runs = 3 if quick else 10
        # The many-workers run on Slurm: blocks x nodes a block x workers a node, and
        # tasks of 100 ms (issue 21: 2 x 2 x 256 = 1,024 workers, 20,000 tasks).
        self.many_workers = (2, 2, 16, 640) if quick else (2, 2, 256, 20_000)


def median_of(repeats, measure):
    return statistics.median(measure() for _ in range(repeats))


def timed(action):
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


# --------------------------------------------------------------------------- pool rows


def round_trip_us(pool, count):
    pool.submit(abs, 0).result()
    return timed(lambda: [pool.submit(abs, i).result() for i in range(count)]) / count * 1e6


def throughput(pool, count):
    def run():
        for future in [pool.submit(abs, i) for i in range(count)]:
            future.result()

    pool.submit(abs, 0).result()
    return count / timed(run)


def map_rate(pool, count):
    return count / timed(lambda: sum(pool.map(abs, range(count), chunksize=1000)))


def argument_rate(pool, data):
    """MB/s of a `bytes` (or NumPy) argument, whose length the task returns."""
    size = memoryview(data).nbytes
    pool.submit(len, data).result()  # warm
    return size / MB / timed(lambda: pool.submit(len, data).result())


def made_once(size):
    """`size` zero bytes, made on the first call only: the row times the transfer,
    not the making (as the raw pipe's source has its bytes ready too)."""
    import sys

    if len(getattr(sys, "minipool_benchmark_blob", b"")) != size:
        sys.minipool_benchmark_blob = bytes(size)
    return sys.minipool_benchmark_blob


def has_numpy():
    import importlib.util

    return importlib.util.find_spec("numpy") is not None


def numpy_made_once(size):
    import sys

    import numpy

    if getattr(sys, "minipool_benchmark_array", numpy.zeros(0)).nbytes != size:
        sys.minipool_benchmark_array = numpy.zeros(size // 8)
    return sys.minipool_benchmark_array


def numpy_result_rate(pool, size):
    pool.submit(numpy_made_once, size).result()  # warm
    return size / MB / timed(lambda: pool.submit(numpy_made_once, size).result())


def result_rate(pool, size):
    assert len(pool.submit(made_once, size).result()) == size  # warm
    return size / MB / timed(lambda: pool.submit(made_once, size).result())


def makespan_ratio(pool, blocks):
    """40 tasks of 0-50 ms on the pool: the time taken over the ideal (their sum / blocks)."""
    durations = [random.Random(seed).uniform(0, 0.05) for seed in range(40)]
    list(pool.map(time.sleep, [0.3] * blocks))  # every block up and warm
    took = timed(lambda: list(pool.map(time.sleep, durations)))
    return took / max(sum(durations) / blocks, max(durations))


def pool_rows(sizes):
    """(row, measure, size) of the rows each executor gets, against ProcessPoolExecutor."""
    return [
        ("no-op round trip", round_trip_us, sizes.round_trips),
        (f"no-op throughput, {sizes.outstanding:,} outstanding", throughput, sizes.outstanding),
        (f"map of {sizes.map_items:,} items, chunksize 1000", map_rate, sizes.map_items),
    ]


def channel_rows(table, sizes, ours, channel, baselines, raw):
    """The rows of a Docker pool on one channel ("socket" or "attach"), each against
    the process pool's figure in `baselines`, the 64 MB rows also against the raw
    attach pipe's in `raw`; the pool's figures, by row."""
    direct = channel == "socket"
    figures = {}
    targets = {"no-op round trip": 0.6 if direct else 0.8, "map": 0.5}
    for what, measure, size in pool_rows(sizes):
        unit = "us" if what == "no-op round trip" else "tasks/s" if "throughput" in what else "items/s"
        target = targets.get(what, targets.get(what.split(" ")[0], 2))
        figures[what] = median_of(sizes.repeats, functools.partial(measure, ours, size))
        table.add(f"{channel}: {what}", figures[what], "ProcessPoolExecutor", baselines[what], target,
                  unit != "us", unit)
    megabytes = sizes.payload // MB
    payload = b"x" * sizes.payload
    for way, what, rate in [
        ("in", f"{megabytes} MB bytes argument", lambda: argument_rate(ours, payload)),
        ("out", f"{megabytes} MB bytes result", lambda: result_rate(ours, sizes.payload)),
    ]:
        figures[what] = median_of(sizes.repeats, rate)
        table.add(f"{channel}: {what}", figures[what], f"raw attach pipe {way}", raw[way], 3 if direct else 0.8,
                  True, "MB/s")
        table.add(f"{channel}: {what}", figures[what], "ProcessPoolExecutor",
                  baselines["argument" if way == "in" else "result"], 2 if direct else None, True, "MB/s")
    if numpy is not None and ours.submit(has_numpy).result():
        array = numpy.zeros(sizes.payload // 8)
        table.add(f"{channel}: {megabytes} MB NumPy argument",
                  median_of(sizes.repeats, lambda: argument_rate(ours, array)), "raw attach pipe in", raw["in"],
                  0.8, True, "MB/s")
        table.add(f"{channel}: {megabytes} MB NumPy result",
                  median_of(sizes.repeats, lambda: numpy_result_rate(ours, sizes.payload)), "raw attach pipe out",
                  raw["out"], 0.8, True, "MB/s")
    elif channel == "socket":
        print("benchmark: no NumPy rows: NumPy is not both here and in the image", file=sys.stderr)
    return figures


# --------------------------------------------------------------------------- engine baselines


def docker_run_s(client, image):
    """One `docker run --rm IMAGE python3 -c pass`."""
    return timed(lambda: client.containers.run(image, ["python3", "-c", "pass"], remove=True, **QUIET))


def concurrent_docker_runs_s(image, count):
    """`count` x `docker run --rm IMAGE python3 -c pass` at once, what the engine itself
    takes: seconds to the first done, and to all done."""
    client = docker.from_env(max_pool_size=count + 2)
    with cf.ThreadPoolExecutor(count) as threads:
        started = time.perf_counter()
        runs = [threads.submit(docker_run_s, client, image) for _ in range(count)]
        next(cf.as_completed(runs))
        first = time.perf_counter() - started
        cf.wait(runs)
        every = time.perf_counter() - started
    client.close()
    return first, every


def docker_exec_s(client, image, runs):
    container = client.containers.run(image, ["sleep", "600"], detach=True, auto_remove=True, **QUIET)
    try:
        container.exec_run(["python3", "-c", "pass"])
        return timed(lambda: [container.exec_run(["python3", "-c", "pass"]) for _ in range(runs)]) / runs
    finally:
        container.kill()


# Both ends of the raw pipe say "ready" (one byte) before the clock starts, so the
# container's own start is not counted.
SINK = """import os, sys
os.write(1, b"r")
left = {size}
while left:
    left -= len(os.read(0, min(left, 1 << 20)))
os.write(1, b"d")
"""
SOURCE = """import os
view = memoryview(bytes({size}))
os.write(1, b"r")
os.read(0, 1)
while view:
    view = view[os.write(1, view):]
"""


def _attached(client, image, code):
    """A started container running `code`, and the raw socket of its attached stdio."""
    api = client.api
    container = api.create_container(
        image, ["python3", "-c", code], stdin_open=True, host_config=api.create_host_config(auto_remove=True, **QUIET)
    )
    attached = api.attach_socket(container, params={"stdin": 1, "stdout": 1, "stream": 1})
    sock = attached._sock
    attached.close()
    sock.settimeout(None)
    api.start(container)
    return sock


def _receive(sock, size):
    """`size` bytes of the container's stdout (Docker's 8-byte frame headers skipped)."""
    buffer = bytearray(1 << 20)
    left = size
    while left:
        header = sock.recv(8, socket.MSG_WAITALL)
        length = int.from_bytes(header[4:], "big")
        left -= length
        while length:
            length -= sock.recv_into(buffer, min(length, len(buffer)))


def _push(client, image, size):
    """MB/s of raw bytes host -> container over an attach socket."""
    sock = _attached(client, image, SINK.format(size=size))
    _receive(sock, 1)
    started = time.perf_counter()
    sock.sendall(bytes(size))
    _receive(sock, 1)
    took = time.perf_counter() - started
    sock.close()
    return size / MB / took


def _pull(client, image, size):
    """MB/s of raw bytes container -> host over an attach socket."""
    sock = _attached(client, image, SOURCE.format(size=size))
    _receive(sock, 1)
    started = time.perf_counter()
    sock.sendall(b"g")
    _receive(sock, size)
    took = time.perf_counter() - started
    sock.close()
    return size / MB / took


# --------------------------------------------------------------------------- startup and memory


class ReadyCounter(logging.Handler):
    """Notes when each block says it is ready."""

    def __init__(self):
        super().__init__()
        self.times = []
        self.done = threading.Condition()

    def emit(self, record):
        if " ready in " in record.getMessage():  # a container, process or Slurm step
            with self.done:
                self.times.append(time.perf_counter())
                self.done.notify_all()

    def wait(self, count):
        """The times the first `count` blocks (containers, Slurm steps) were ready;
        RuntimeError if they were not all ready within READY_DEADLINE: a row that
        waited for blocks that never came measured nothing."""
        with self.done:
            if not self.done.wait_for(lambda: len(self.times) >= count, READY_DEADLINE):
                raise RuntimeError(f"only {len(self.times)} of {count} blocks were ready after {READY_DEADLINE} s")
            return self.times[:count]


@contextlib.contextmanager
def listening(handler):
    """`handler` on minipool's logger, at INFO, for the block."""
    logger = logging.getLogger("minipool")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def block_readiness():
    return listening(ReadyCounter())


@contextlib.contextmanager
def told_channel():
    """What the pool logs about the channel it chose for its containers, and why."""
    told = []
    handler = logging.Handler()
    handler.emit = lambda record: told.extend(  # type: ignore[method-assign]
        record.getMessage().split("talk to it ", 1)[1:]
    )
    with listening(handler):
        yield told


def cold_start(image, blocks, engine=None, runtime="docker", provider=None):
    """Seconds from the constructor to the first result, and to every block ready
    (on Slurm, each of a block's nodes: its stubs)."""
    stubs = blocks * (provider.nodes_per_block if provider is not None else 1)
    with block_readiness() as counter:
        started = time.perf_counter()
        pool = ContainerPoolExecutor(image, blocks=blocks, engine=engine, runtime=runtime, provider=provider)
        pool.submit(abs, 0).result()
        first = time.perf_counter() - started
        every = max(counter.wait(stubs)) - started
        pool.shutdown()
    return first, every


def scale_up(image, most):
    """An elastic pool of one block gets a burst of work: seconds from the burst to
    the first added block ready, and to all `most` blocks ready."""
    with block_readiness() as counter, ContainerPoolExecutor(image, blocks=1, max_blocks=most) as pool:
        pool.submit(abs, 0).result()
        counter.wait(1)
        burst = time.perf_counter()
        futures = [pool.submit(time.sleep, 0.5) for _ in range(4 * most)]
        ready = counter.wait(most)
        cf.wait(futures)
    return ready[1] - burst, max(ready) - burst


def four_blocks(image, sizes, engines):
    """No-op throughput of four blocks on `engines`, and ms from their constructor to every block ready."""
    with ContainerPoolExecutor(image, blocks=4, engine=engines) as pool:
        rate = median_of(sizes.repeats, lambda: throughput(pool, sizes.outstanding))
    return rate, cold_start(image, 4, engine=engines)[1] * 1e3


@contextlib.contextmanager
def second_engine(client, image):
    """A second dockerd of our own (its socket, data root, exec root, pid file)
    holding the image, standing in for a second host; its URL. Needs root."""
    root = tempfile.mkdtemp(prefix="minipool-bench-engine-", dir="/var/tmp")
    url = f"unix://{root}/docker.sock"
    with open(f"{root}/dockerd.log", "wb") as log:
        process = subprocess.Popen(
            ["dockerd", "--host", url, "--data-root", f"{root}/data", "--exec-root", f"{root}/exec",
             "--pidfile", f"{root}/docker.pid", "--bridge=none", "--iptables=false", "--ip-masq=false"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        other = None
        for _ in range(120):
            with contextlib.suppress(docker.errors.DockerException):
                other = docker.DockerClient(base_url=url)
                break
            time.sleep(0.5)
        if other is None:
            raise RuntimeError(f"the second engine did not answer; see {root}/dockerd.log")
        with contextlib.closing(other):
            other.api.load_image(client.api.get_image(image))
        yield url
    finally:
        process.terminate()
        process.wait(60)
        shutil.rmtree(root, ignore_errors=True)


def idle_shutdown_s(image):
    pool = ContainerPoolExecutor(image, blocks=4)
    list(pool.map(time.sleep, [0.2] * 4))
    return timed(pool.shutdown)


def peak_rss_mb(image, size):
    """Peak RSS growth of a fresh process that receives a `size`-byte result. (Its
    VmHWM: ru_maxrss starts from this process's RSS at the fork, which hid the growth.)"""
    code = f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from minipool import ContainerPoolExecutor

        def peak_mb():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

        with ContainerPoolExecutor({image!r}) as pool:
            pool.submit(abs, 0).result()
            before = peak_mb()
            result = pool.submit(bytes, {size}).result()
            print(peak_mb() - before)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)
    return float(out.stdout)


# --------------------------------------------------------------------------- Charliecloud


def charliecloud_image(image):
    """The Charliecloud image directory made from `image` by images/build.py (made if missing)."""
    spec = importlib.util.spec_from_file_location("build", os.path.join(ROOT, "images", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    if image not in build.APPS:
        sys.exit(f"benchmark: images/build.py makes Charliecloud images of {', '.join(build.APPS)} only; "
                 f"give --charliecloud-image DIR for {image}")
    return str(build.ensure_charliecloud_images(log=lambda line: print(line, file=sys.stderr))[image])


def ch_run(image_dir, code, **options):
    """`ch-run IMAGE_DIR -- python3 -c code`, as the pool starts its blocks (USER set, which ch-run needs)."""
    env = {**os.environ, "USER": os.environ.get("USER") or getpass.getuser()}
    return subprocess.Popen(["ch-run", image_dir, "--", "python3", "-c", code], env=env, **options)


def ch_run_s(image_dir, code="pass"):
    """One bare `ch-run IMAGE_DIR -- python3 -c pass` (or other code)."""
    def run():
        assert ch_run(image_dir, code).wait() == 0

    return timed(run)


def stub_imports():
    """`import ...` of every standard module the bootstrap and the worker stub import at their top:
    a block's start can be no quicker than a Python that imports them."""
    import worker_stub

    names = set()
    for source in (worker_stub.BOOTSTRAP, inspect.getsource(worker_stub)):
        for node in ast.parse(source).body:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
    return "import " + ", ".join(sorted(names - {"worker_stub"}))  # the bootstrap's own import of it


def concurrent_ch_runs_s(image_dir, count):
    """`count` x `ch-run IMAGE_DIR -- python3 -c pass` at once: seconds to all done."""
    with cf.ThreadPoolExecutor(count) as threads:
        return timed(lambda: list(threads.map(lambda _: ch_run_s(image_dir), range(count))))


def _ch_push(image_dir, size):
    """MB/s of raw bytes host -> a ch-run process, through its stdin pipe."""
    with ch_run(image_dir, SINK.format(size=size), stdin=subprocess.PIPE, stdout=subprocess.PIPE) as process:
        process.stdout.read(1)
        started = time.perf_counter()
        process.stdin.write(bytes(size))
        process.stdin.flush()
        process.stdout.read(1)
        took = time.perf_counter() - started
        process.stdin.close()
    return size / MB / took


def _ch_pull(image_dir, size):
    """MB/s of raw bytes a ch-run process -> host, through its stdout pipe."""
    with ch_run(image_dir, SOURCE.format(size=size), stdin=subprocess.PIPE, stdout=subprocess.PIPE) as process:
        buffer = bytearray(1 << 20)
        process.stdout.read(1)
        started = time.perf_counter()
        process.stdin.write(b"g")
        process.stdin.flush()
        left = size
        while left:
            left -= process.stdout.readinto(memoryview(buffer)[: min(left, len(buffer))])
        took = time.perf_counter() - started
        process.stdin.close()
    return size / MB / took


def charliecloud_rows(table, sizes, blocks, image_dir, docker, figures):
    """The Charliecloud pool's rows, each against its baseline and against Docker's figure in `docker`;
    its round trip and throughput go into `figures`."""
    ch = "Charliecloud: "
    bare = median_of(sizes.per_task_runs, lambda: ch_run_s(image_dir)) * 1e3
    imports = stub_imports()
    importing = median_of(sizes.per_task_runs, lambda: ch_run_s(image_dir, imports)) * 1e3
    for count in sizes.charliecloud_blocks:
        start = functools.partial(cold_start, image_dir, count, runtime="charliecloud")
        every = median_of(sizes.repeats, lambda: start()[1]) * 1e3  # noqa: B023 (used at once)
        what = f"{ch}{count} block(s): constructor to every block ready"
        table.add(what, every, "bare ch-run IMG -- python3 -c pass", bare, 2 if count == 1 else None, False, "ms")
        if count == 1:
            table.add(what, every, "ch-run IMG -- python3 importing the stub's modules", importing, None, False, "ms")
        if count > 1:
            table.add(what, every, f"{count} x bare ch-run at once", concurrent_ch_runs_s(image_dir, count) * 1e3,
                      None, False, "ms")
        table.add(what, every, f"Docker: {count} block(s), same run", docker[f"ready {count}"], None, False, "ms")

    with ContainerPoolExecutor(image_dir, blocks=blocks, runtime="charliecloud") as ours, \
            cf.ProcessPoolExecutor(blocks) as processes:
        for what, measure, size, unit, target, higher in [
            ("no-op round trip", round_trip_us, sizes.round_trips, "us", 1, False),
            (f"no-op throughput, {sizes.outstanding:,} outstanding", throughput, sizes.outstanding, "tasks/s", None,
             True),
        ]:
            mine = figures[what] = median_of(sizes.repeats, functools.partial(measure, ours, size))
            theirs = median_of(sizes.repeats, functools.partial(measure, processes, size))
            table.add(ch + what, mine, "ProcessPoolExecutor", theirs, target, higher, unit)
            table.add(ch + what, mine, "Docker: the same, same run", docker[what], None, higher, unit)

        megabytes = sizes.payload // MB
        payload = b"x" * sizes.payload
        into = median_of(sizes.repeats, lambda: argument_rate(ours, payload))
        out = median_of(sizes.repeats, lambda: result_rate(ours, sizes.payload))
    raw_in = median_of(sizes.repeats, lambda: _ch_push(image_dir, sizes.payload))
    raw_out = median_of(sizes.repeats, lambda: _ch_pull(image_dir, sizes.payload))
    for what, mine, raw_name, raw in [
        (f"{megabytes} MB bytes argument", into, "raw ch-run pipe in", raw_in),
        (f"{megabytes} MB bytes result", out, "raw ch-run pipe out", raw_out),
    ]:
        table.add(ch + what, mine, raw_name, raw, 0.8, True, "MB/s")
        table.add(ch + what, mine, "Docker: the same, same run", docker[what], None, True, "MB/s")


# --------------------------------------------------------------------------- Slurm

# How long a Slurm row waits for the nodes it needs to be idle: a job that just ended
# leaves its nodes completing for a moment (here 1.5-2.8 s, now and then), and a job
# that wants them whole would be queued meanwhile, which no row is about.
SETTLE_DEADLINE = 30
# The 100 ms tasks of the many-workers run.
TASK_SECONDS = 0.1


def srun_ch_run_s(image_dir):
    """One bare `srun --unbuffered --ntasks=1 ch-run IMAGE_DIR -- python3 -c pass`, as a block's job starts."""
    env = {**os.environ, "USER": os.environ.get("USER") or getpass.getuser()}
    return timed(lambda: subprocess.run(
        ["srun", "--unbuffered", "--ntasks=1", "ch-run", image_dir, "--", "python3", "-c", "pass"], env=env, check=True,
    ))


def concurrent_sruns_s(image_dir, count):
    """`count` bare sruns at once: seconds to all done."""
    with cf.ThreadPoolExecutor(count) as threads:
        return timed(lambda: list(threads.map(lambda _: srun_ch_run_s(image_dir), range(count))))


def idle_nodes():
    """The cluster's nodes that are idle: neither allocated nor completing a job."""
    listed = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], capture_output=True, text=True,
                            check=True).stdout
    return {name for name, state in (line.split() for line in listed.splitlines()) if state == "idle"}


def cluster_nodes():
    listed = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N"], capture_output=True, text=True,
                            check=True).stdout
    return set(listed.split())


def settle(nodes):
    """Wait until `nodes` nodes are idle (SETTLE_DEADLINE at most: then the row counts the wait)."""
    deadline = time.monotonic() + SETTLE_DEADLINE
    while len(idle_nodes()) < nodes and time.monotonic() < deadline:
        time.sleep(0.05)


def bare_srun_nodes_s(nodes, image_dir=None):
    """One bare `srun -N<nodes> true` (a job of `nodes` nodes, a task on each), on idle
    nodes; with an image, `srun -N<nodes> ch-run IMAGE_DIR -- python3 -c pass`."""
    command = ["true"] if image_dir is None else ["ch-run", image_dir, "--", "python3", "-c", "pass"]
    env = {**os.environ, "USER": os.environ.get("USER") or getpass.getuser()}
    settle(nodes)
    return timed(lambda: subprocess.run(["srun", f"-N{nodes}", *command], env=env, check=True))


def block_of_nodes_s(image_dir, nodes):
    """Seconds from the constructor to each stub of one block of `nodes` nodes ready, on idle nodes."""
    settle(nodes)
    return cold_start(image_dir, 1, runtime="charliecloud", provider=minipool.Slurm(nodes_per_block=nodes))[1]


def run_part(name, image_dir, args, allocation=None):
    """A part of the benchmark (PARTS) run by this script in a process of its own: in
    a new allocation (`salloc ALLOCATION... python benchmark.py --part NAME`) if one is
    given, else outside any (SLURM_JOB_ID and its kin removed); what it printed, as JSON."""
    env = {key: value for key, value in os.environ.items() if key == "SLURM_CONF" or not key.startswith("SLURM_")}
    argv = [sys.executable, os.path.abspath(__file__), "--part", name, "--charliecloud-image", image_dir,
            "--part-args", json.dumps(args)]
    if allocation is not None:
        argv = ["salloc", *allocation, *argv]
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def first_result_and_round_trip(image_dir, repeats, round_trips):
    """Part "first-result": a Slurm pool of one block where this process runs (inside an
    allocation, its stub a step of it; else in a job of its own): the median of
    `repeats` constructors to first result, in ms, and of as many no-op round trips, in us."""
    firsts, trips = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        with ContainerPoolExecutor(image_dir, runtime="charliecloud", provider=minipool.Slurm()) as pool:
            pool.submit(abs, 0).result()
            firsts.append(time.perf_counter() - started)
            trips.append(round_trip_us(pool, round_trips))
    return {"first_ms": statistics.median(firsts) * 1e3, "round_trip_us": statistics.median(trips),
            "allocation": os.environ.get("SLURM_JOB_ID")}


def proc_status(field):
    """A field of /proc/self/status in MB (VmRSS, VmHWM), or as it is (Threads)."""
    with open("/proc/self/status") as status:
        value = next(line.split()[1] for line in status if line.startswith(field + ":"))
    return int(value) / 1024 if field.startswith("Vm") else int(value)


def memory_in_use_mb():
    """This machine's memory in use (MemTotal - MemAvailable)."""
    with open("/proc/meminfo") as meminfo:
        sizes = {line.split(":")[0]: int(line.split()[1]) for line in meminfo}
    return (sizes["MemTotal"] - sizes["MemAvailable"]) / 1024


def cpu_times():
    """(busy, all) seconds of this machine's CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    hertz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks[:8]) - idle) / hertz, sum(ticks[:8]) / hertz


def many_workers(image_dir, blocks, nodes, workers, tasks, repeats):
    """Part "many-workers", in a process of its own so that its peak RSS is this run's:
    `tasks` tasks of TASK_SECONDS on `blocks` Slurm blocks of `nodes` nodes, each node a
    stub of `workers` workers. The makespan (median of `repeats`; every worker warm
    first) and the ideal (total work / workers); the caller's CPU a task, its threads
    and its peak RSS; this machine's memory in use and how busy its CPUs were."""
    rss_before, memory = proc_status("VmRSS"), [memory_in_use_mb()]
    watching = threading.Event()

    def watch_memory():
        while not watching.wait(0.1):
            memory.append(memory_in_use_mb())

    watcher = threading.Thread(target=watch_memory, name="benchmark-memory")
    watcher.start()
    spans, cpu, busy = [], [], []
    try:
        with block_readiness() as counter, ContainerPoolExecutor(
            image_dir, blocks=blocks, runtime="charliecloud", workers_per_block=workers,
            provider=minipool.Slurm(nodes_per_block=nodes),
        ) as pool:
            counter.wait(blocks * nodes)
            count = blocks * nodes * workers
            list(pool.map(time.sleep, [3 * TASK_SECONDS] * count))  # every worker up and warm
            for _ in range(repeats):
                used, machine = resource.getrusage(resource.RUSAGE_SELF), cpu_times()
                spans.append(timed(lambda: list(pool.map(time.sleep, [TASK_SECONDS] * tasks))))
                after, machine_after = resource.getrusage(resource.RUSAGE_SELF), cpu_times()
                cpu.append((after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime) / tasks)
                busy.append((machine_after[0] - machine[0]) / (machine_after[1] - machine[1]))
            threads = proc_status("Threads")
    finally:
        watching.set()
        watcher.join()
    return {
        "workers": count, "makespan_s": statistics.median(spans), "ideal_s": tasks * TASK_SECONDS / count,
        "caller_cpu_us": statistics.median(cpu) * 1e6, "threads": threads, "peak_rss_mb": proc_status("VmHWM"),
        "rss_before_mb": rss_before, "memory_before_mb": memory[0], "memory_peak_mb": max(memory),
        "cpus_busy": statistics.median(busy), "cpus": os.cpu_count(),
    }


# What --part runs (in a process of its own, as run_part starts it), by name.
PARTS = {"first-result": first_result_and_round_trip, "many-workers": many_workers}


def slurm_rows(table, sizes, blocks, image_dir, charliecloud):
    """The Charliecloud pool with each block a Slurm job: start against bare sruns, round
    trip and throughput against the local Charliecloud pool's figures in `charliecloud`;
    on a cluster of four nodes or more, a block of four nodes against a bare `srun -N4`,
    the pool inside an allocation against the same from outside, and many workers."""
    on_slurm = "Slurm (Charliecloud): "
    bare = median_of(sizes.per_task_runs, lambda: srun_ch_run_s(image_dir)) * 1e3
    start = functools.partial(cold_start, image_dir, 1, runtime="charliecloud", provider=minipool.Slurm())
    first = median_of(sizes.repeats, lambda: start()[0]) * 1e3
    table.add(on_slurm + "constructor to first result", first, "bare srun ch-run IMG -- python3 -c pass", bare,
              None, False, "ms")
    # exclusive=False: eight blocks that each took a node whole (Slurm()'s default) would
    # need eight nodes, and on the test cluster's four the last four would wait in the
    # queue until the first four ended, which no block of a live pool does.
    start = functools.partial(cold_start, image_dir, 8, runtime="charliecloud",
                              provider=minipool.Slurm(exclusive=False))
    every = median_of(sizes.repeats, lambda: start()[1]) * 1e3
    table.add(on_slurm + "8 blocks: constructor to every block ready", every, "8 x bare srun ch-run at once",
              concurrent_sruns_s(image_dir, 8) * 1e3, None, False, "ms")
    with ContainerPoolExecutor(image_dir, blocks=blocks, runtime="charliecloud", provider=minipool.Slurm()) as ours:
        for what, measure, size, unit, higher in [
            ("no-op round trip", round_trip_us, sizes.round_trips, "us", False),
            (f"no-op throughput, {sizes.outstanding:,} outstanding", throughput, sizes.outstanding, "tasks/s", True),
        ]:
            mine = median_of(sizes.repeats, functools.partial(measure, ours, size))
            table.add(on_slurm + what, mine, "Charliecloud here, same run", charliecloud[what], None, higher, unit)

    if len(cluster_nodes()) < 4:
        print("benchmark: no rows of several nodes: the cluster has fewer than 4 nodes "
              "(python tests/slurm_cluster.py starts one of 4)", file=sys.stderr)
        return
    bare = median_of(sizes.per_task_runs, lambda: bare_srun_nodes_s(4)) * 1e3
    pythons = median_of(sizes.per_task_runs, lambda: bare_srun_nodes_s(4, image_dir)) * 1e3
    ours = median_of(sizes.repeats, lambda: block_of_nodes_s(image_dir, 4)) * 1e3
    what = on_slurm + "a block of 4 nodes: constructor to its 4 stubs ready"
    table.add(what, ours, "bare srun -N4 true", bare, 2, False, "ms")
    table.add(what, ours, "bare srun -N4 ch-run IMG -- python3 -c pass", pythons, None, False, "ms")

    # The same part of the benchmark, run by itself outside any allocation and inside one.
    args = [sizes.repeats, sizes.round_trips]
    outside = run_part("first-result", image_dir, args)
    inside = run_part("first-result", image_dir, args, allocation=["--nodes=2"])
    table.add(on_slurm + "inside salloc -N2: constructor to first result", inside["first_ms"],
              "outside: a job per block", outside["first_ms"], None, False, "ms")
    table.add(on_slurm + "inside salloc -N2: no-op round trip", inside["round_trip_us"], "outside: a job per block",
              outside["round_trip_us"], None, False, "us")

    blocks_of, nodes, workers, tasks = sizes.many_workers
    many = run_part("many-workers", image_dir, [*sizes.many_workers, min(sizes.repeats, 3)])
    count = many["workers"]
    what = f"{on_slurm}{count:,} workers"
    table.add(f"{what} ({blocks_of} blocks x {nodes} nodes x {workers}): makespan of {tasks:,} x 100 ms",
              many["makespan_s"], "ideal: total work / workers", many["ideal_s"], 1.3, False, "s")
    table.add(f"{what}: the caller's CPU a task", many["caller_cpu_us"], "a core's budget at the ideal pace",
              TASK_SECONDS / count * 1e6, None, False, "us")
    table.add(f"{what}: the caller's threads", many["threads"], "the pool's stubs (one a node)", blocks_of * nodes,
              None, False, "")
    table.add(f"{what}: the caller's peak RSS", many["peak_rss_mb"], "its RSS before the pool", many["rss_before_mb"],
              None, False, "MB")
    grown = many["memory_peak_mb"] - many["memory_before_mb"]
    table.notes.append(
        f"{count:,} workers: this machine's memory in use went from {many['memory_before_mb'] / 1024:.1f} to "
        f"{many['memory_peak_mb'] / 1024:.1f} GB ({grown / count:.1f} MB a worker, with its stub, srun and "
        f"slurmstepd); its {many['cpus']} CPUs, every node's, were {many['cpus_busy']:.0%} busy during the "
        f"makespan (every process: the workers and stubs, srun, the caller, and whatever else ran)."
    )


# --------------------------------------------------------------------------- the table


def _number(value):
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


class Table:
    def __init__(self):
        self.rows = []
        self.notes = []  # printed under the table

    def add(self, what, ours, baseline_name, baseline, target, higher_is_better, unit):
        ratio = ours / baseline if baseline else float("nan")
        if target is None:
            verdict = ""
        elif higher_is_better:
            verdict = "met" if ratio >= target else "MISSED"
        else:
            verdict = "met" if ratio <= target else "MISSED"
        goal = "" if target is None else f"{'>=' if higher_is_better else '<='} {target:g}x"
        self.rows.append((what, f"{_number(ours)} {unit}", baseline_name, f"{_number(baseline)} {unit}",
                          f"{ratio:.2f}x", goal, verdict))
        print(f"  measured: {what}", file=sys.stderr, flush=True)

    def print(self):
        headers = ("row", "minipool", "baseline", "baseline value", "ratio", "target", "")
        widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *self.rows)]
        line = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
        print(line.format(*headers))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in self.rows:
            print(line.format(*row))
        for note in self.notes:
            print(f"\n{note}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI's smoke test)")
    parser.add_argument("--image", default="app1_v0.1", help="an image with python3 (default: app1_v0.1)")
    parser.add_argument(
        "--charliecloud-image", metavar="DIR",
        help="the Charliecloud image directory of --image (default: made by images/build.py --charliecloud)",
    )
    # A part the Slurm rows run in a process of their own (run_part), its arguments as JSON.
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--part-args", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps(PARTS[args.part](args.charliecloud_image, *json.loads(args.part_args))))
        return
    # No engine, no image, a wrong DOCKER_HOST: one line that names it and the fix.
    try:
        run(args.quick, args.image, args.charliecloud_image)
    except (minipool.StartupError, docker.errors.DockerException) as exc:
        sys.exit(f"benchmark: {exc} {SETUP_HINT}")


def run(quick, image, image_dir):
    sizes, blocks = Sizes(quick), 2
    docker_figures = {}  # the Docker pool's own, for the Charliecloud rows
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        sys.exit(f"benchmark: no Docker engine answers at {where}: {exc} {SETUP_HINT}")
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        sys.exit(f"benchmark: image {image} is not on the engine at {where} {SETUP_HINT}")
    table = Table()
    print(f"benchmark: {image}, {blocks} blocks against {blocks} processes, {sizes.repeats} repetition(s)",
          file=sys.stderr)

    to_container = median_of(sizes.repeats, lambda: _push(client, image, sizes.payload))
    from_container = median_of(sizes.repeats, lambda: _pull(client, image, sizes.payload))
    raw = {"in": to_container, "out": from_container}
    with cf.ProcessPoolExecutor(blocks) as processes:
        baselines = {what: median_of(sizes.repeats, functools.partial(measure, processes, size))
                     for what, measure, size in pool_rows(sizes)}
        payload = b"x" * sizes.payload
        baselines["argument"] = median_of(sizes.repeats, lambda: argument_rate(processes, payload))
        baselines["result"] = median_of(sizes.repeats, lambda: result_rate(processes, sizes.payload))
    # The direct channel (what channel="auto" chose here), then the attach stream.
    for channel in ("auto", "attach"):
        with told_channel() as told, block_readiness() as ready, \
                ContainerPoolExecutor(image, blocks=blocks, channel=channel) as ours:
            ready.wait(blocks)  # the second block's start is no part of these rows
            name = "socket" if "unix sockets" in told[0] else "attach"
            table.notes.append(f'channel="{channel}": the containers {told[0]}')
            figures = channel_rows(table, sizes, ours, name, baselines, raw)
            if channel == "auto":
                docker_figures.update(figures)

    per_task_run = median_of(sizes.per_task_runs, lambda: docker_run_s(client, image)) * 1e3
    per_task_exec = docker_exec_s(client, image, sizes.per_task_runs) * 1e3
    with ContainerPoolExecutor(image, blocks=1) as ours:
        per_task_ours = round_trip_us(ours, 200) / 1e3
    table.add("no-op task on one block", per_task_ours, "docker run --rm per task", per_task_run, None, False, "ms")
    table.add("no-op task on one block", per_task_ours, "docker exec per task", per_task_exec, None, False, "ms")

    for count in sizes.block_counts:
        first, every = (seconds * 1e3 for seconds in cold_start(image, count))
        docker_figures[f"ready {count}"] = every
        if count == 4:
            table.add("4 blocks: constructor to first result", first, "docker run --rm", per_task_run, 1.5, False, "ms")
        table.add(f"{count} block(s): constructor to every block ready", every, "docker run --rm", per_task_run,
                  4 if count == 16 else None, False, "ms")
        if count > 1:
            table.add(f"{count} block(s): constructor to every block ready", every,
                      f"{count} x docker run at once", concurrent_docker_runs_s(image, count)[1] * 1e3, None, False,
                      "ms")

    # The burst adds the 7 blocks at once: they start together, as 7 docker runs would.
    first_added, every = (seconds * 1e3 for seconds in scale_up(image, 8))
    first_run, every_run = (seconds * 1e3 for seconds in concurrent_docker_runs_s(image, 7))
    table.add("elastic 1 -> 8 blocks: burst to first added block ready", first_added,
              "7 x docker run at once: first done", first_run, 1.5, False, "ms")
    table.add("elastic 1 -> 8 blocks: burst to all 8 ready", every, "7 x docker run at once: all done",
              every_run, 1.5, False, "ms")
    if os.geteuid() == 0 and shutil.which("dockerd"):
        with second_engine(client, image) as url:
            one, two = (four_blocks(image, sizes, engines) for engines in (None, [None, url]))
        table.add("4 blocks over two engines: no-op throughput", two[0], "4 blocks on one engine", one[0], None,
                  True, "tasks/s")
        table.add("4 blocks over two engines: constructor to every block ready", two[1], "4 blocks on one engine",
                  one[1], None, False, "ms")
    else:
        print("benchmark: no two-engine rows: starting a second dockerd needs root", file=sys.stderr)

    if shutil.which("ch-run") is None:
        print("benchmark: no Charliecloud nor Slurm rows: no ch-run here (apt-get install charliecloud-runtime)",
              file=sys.stderr)
    else:
        image_dir = image_dir or charliecloud_image(image)
        charliecloud_figures = {}  # the local Charliecloud pool's, for the Slurm rows
        charliecloud_rows(table, sizes, blocks, image_dir, docker_figures, charliecloud_figures)
        if os.environ.get("SLURM_CONF") and shutil.which("srun"):
            slurm_rows(table, sizes, blocks, image_dir, charliecloud_figures)
        else:
            print("benchmark: no Slurm rows: no SLURM_CONF or no srun (python tests/slurm_cluster.py python "
                  "examples/benchmark.py starts a four-node cluster for the run)", file=sys.stderr)

    table.add("shutdown of an idle 4-block pool", median_of(sizes.repeats, lambda: idle_shutdown_s(image)) * 1e3,
              "target", 500, 1, False, "ms")
    result_mb = sizes.big_result // MB
    table.add(f"host peak RSS growth, {result_mb} MB result", peak_rss_mb(image, sizes.big_result),
              "the result's size", result_mb, 2.5, False, "MB")
    with ContainerPoolExecutor(image, blocks=4) as ours:
        table.add("40 tasks of 0-50 ms on 4 blocks: makespan", makespan_ratio(ours, 4), "ideal makespan", 1.0, 1.2,
                  False, "x")
    client.close()

    print(f"\nminipool benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {'quick' if quick else 'full'} run, peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB\n")
    table.print()


if __name__ == "__main__":
    main()
