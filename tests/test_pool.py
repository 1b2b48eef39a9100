"""What only a container pool does: images, shipping code, crashes, startup, cleanup."""

import concurrent.futures as cf
import functools
import io
import logging
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import traceback

import docker.errors
import pytest

import helpers
from conftest import DEADLOCK
from conftest import HELPERS
from conftest import RUNTIMES
from conftest import containers_labelled
from conftest import holds
from conftest import runtime_cases
from conftest import start_script
from conftest import wait_until
from minipool import BrokenContainerPool
from minipool import ContainerPoolExecutor
from minipool import MiniPoolError
from minipool import RemoteError
from minipool import StartupError
from minipool import WorkerLost
from minipool import output


def run_script(code):
    """Run `code` as a user's script (its functions live in __main__)."""
    process = start_script(code)
    out, err = process.communicate(timeout=DEADLOCK)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_the_images_working_dir_is_importable(any_runtime):
    pool = any_runtime.pool()
    cwd, path = pool.submit(helpers.where).result(DEADLOCK)
    assert cwd == "/home"
    assert "/home" in path
    assert pool.submit(helpers.read_text, "/home/app1.py").result(DEADLOCK).count("def predict") == 1


def test_seed_scenario_in_a_script(images, label):
    """The seed: app_1 is defined in the user's script and imports app1 in the container."""
    result = run_script(
        f"""
        from minipool import ContainerPoolExecutor

        def app_1(data):
            import app1
            return app1.predict(data)

        def app_2(data):
            import app2
            return app2.predict(data)

        with ContainerPoolExecutor("app1_v0.1", label="{label}") as pool1, \\
                ContainerPoolExecutor("app2_v0.1", label="{label}") as pool2:
            print(pool1.submit(app_1, [1, 2, 3]).result(), pool2.submit(app_2, [1, 2, 3]).result())
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[2, 4, 6] [1, 4, 9]"


def test_main_code_travels_by_value(images, label):
    """Lambdas, closures and classes from __main__ go in and come back as the caller's own."""
    result = run_script(
        f"""
        from minipool import ContainerPoolExecutor

        class Point:
            def __init__(self, x):
                self.x = x

        class Refused(Exception):
            pass

        def make(x):
            return Point(x)

        def refuse():
            raise Refused("no")

        offset = 10
        with ContainerPoolExecutor("app1_v0.1", label="{label}") as pool:
            assert pool.submit(lambda x: x + offset, 1).result() == 11
            point = pool.submit(make, 3).result()
            assert type(point) is Point and point.x == 3, point
            try:
                pool.submit(refuse).result()
            except Refused as exc:
                assert "refuse" in str(exc.__cause__)
            assert list(pool.map(lambda p: p.x, [Point(1), Point(2)])) == [1, 2]
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_remote_traceback_is_the_cause_and_names_the_container(any_runtime):
    pool = any_runtime.pool()
    container = pool.submit(helpers.block).result(DEADLOCK)  # its short id (under Slurm, its job)
    future = pool.submit(helpers.raise_value_error, "deep")
    with pytest.raises(ValueError) as info:
        future.result(DEADLOCK)
    assert "in raise_value_error" in str(info.value.__cause__)
    assert 'raise ValueError(message)' in str(info.value.__cause__)
    named = f"In {any_runtime.named(container)} of image {re.escape(repr(any_runtime.image()))}:"
    assert re.search(named, str(info.value.__cause__))


def test_exception_class_the_host_cannot_load_is_a_remote_error(make_pool, tmp_path):
    module = tmp_path / "only_in_container.py"
    module.write_text("class Private(Exception):\n    pass\n\ndef fail():\n    raise Private('from inside')\n")
    pool = make_pool(ship=[HELPERS, str(module)])
    with pytest.raises(RemoteError) as info:
        pool.submit(helpers.raise_from_module, "only_in_container").result(DEADLOCK)
    assert info.value.type_name == "only_in_container.Private"
    assert info.value.message == "from inside"
    assert "def fail" in info.value.traceback or "fail()" in info.value.traceback


def test_result_the_host_cannot_unpickle_fails_only_that_future(make_pool, tmp_path):
    module = tmp_path / "only_in_container.py"
    module.write_text("class Private:\n    pass\n")
    pool = make_pool(ship=[HELPERS, str(module)])
    with pytest.raises(MiniPoolError, match="cannot be unpickled on the host"):
        pool.submit(helpers.instance_from_module, "only_in_container").result(DEADLOCK)
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4


def test_an_exception_that_cannot_print_itself_still_travels(make_pool):
    with pytest.raises(helpers.UnprintableError):
        make_pool().submit(helpers.raise_unprintable).result(DEADLOCK)


def test_large_buffers_go_both_ways(any_runtime):
    pool = any_runtime.pool()
    assert pool.submit(len, bytearray(3 << 20)).result(DEADLOCK) == 3 << 20
    assert pool.submit(helpers.identity, bytearray(b"y" * (3 << 20))).result(DEADLOCK) == bytearray(b"y" * (3 << 20))
    assert len(pool.submit(helpers.nbytes, 5 << 20).result(DEADLOCK)) == 5 << 20


def test_a_message_of_more_buffers_than_one_writev_takes(make_pool):
    # Each bytes over the pickle's 64 KiB frame travels as a buffer of its own.
    many = [bytes([i % 256]) * 66000 for i in range(1500)]
    assert make_pool().submit(helpers.identity, many).result(DEADLOCK) == many


def test_a_send_that_fails_ends_the_container_and_fails_its_task(make_pool, monkeypatch):
    """Not only a gone container fails a send: here sendmsg refuses too many buffers."""
    import worker_stub

    pool = make_pool()
    monkeypatch.setattr(worker_stub, "IOV_MAX", 1 << 20)
    with pytest.raises(WorkerLost):
        pool.submit(helpers.identity, [bytes([i % 256]) * 66000 for i in range(1500)]).result(DEADLOCK)
    monkeypatch.undo()
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4


def test_unpicklable_argument_fails_only_that_future(any_runtime):
    pool = any_runtime.pool()
    future = pool.submit(helpers.identity, threading.Lock())
    with pytest.raises(TypeError, match="lock"):
        future.result(DEADLOCK)
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4


def test_unpicklable_result_fails_only_that_future(any_runtime):
    pool = any_runtime.pool()
    with pytest.raises(TypeError, match="cannot pickle the result of type lock"):
        pool.submit(helpers.unpicklable_result).result(DEADLOCK)
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4


def test_task_output_is_logged_per_line_and_never_corrupts_results(any_runtime, caplog):
    pool = any_runtime.pool()
    with caplog.at_level(logging.INFO, logger="minipool.worker"):
        assert pool.submit(helpers.noisy, "clean").result(DEADLOCK) == "clean"
        wait_until(lambda: len([r for r in caplog.records if r.name == "minipool.worker"]) >= 3, what="logs")
    lines = [r for r in caplog.records if r.name == "minipool.worker"]
    messages = {r.getMessage().split(": ", 1)[1] for r in lines}
    assert messages >= {"noise from print", "noise from fd 1", "noise on stderr"}
    assert all(r.container == lines[0].container for r in lines)


def test_a_last_line_without_a_newline_is_logged_when_the_task_ends(any_runtime, caplog):
    pool = any_runtime.pool()
    with caplog.at_level(logging.INFO, logger="minipool.worker"):
        # The reader logs what the task wrote before it settles the future.
        assert pool.submit(helpers.write_unterminated, "first\nno newline at the end").result(DEADLOCK) == 27
        lines = [r.getMessage().split(": ", 1)[1] for r in caplog.records if r.name == "minipool.worker"]
    assert lines == ["first", "no newline at the end"]


# --------------------------------------------------------------------------- crashes

CRASHES = [
    # (task, args, container options, exit code, OOM-killed, words in the message)
    (helpers.exit_now, (3,), {}, 3, False, "exit code 3"),
    (helpers.kill_self, (), {}, 137, False, "SIGKILL"),
    (helpers.segfault, (), {}, 139, False, "SIGSEGV"),
    (helpers.allocate, (400,), {"mem_limit": "64m", "memswap_limit": "64m"}, 137, True, "more memory"),
]


@pytest.mark.parametrize(
    "any_runtime, task, args, options, exit_code, oom, words",
    # A memory limit is an engine's container option, and Podman 4.3 sends no oom event.
    runtime_cases(CRASHES, runtimes=lambda crash: ["docker"] if crash[4] else RUNTIMES, name=lambda c: c[0].__name__),
    indirect=["any_runtime"],
)
def test_crash_fails_its_task_with_worker_lost_and_pool_heals(any_runtime, task, args, options, exit_code, oom, words):
    pool = any_runtime.pool(blocks=2, container_options=options)
    helpers.wait_for_blocks(pool, 2)
    blocks = set(any_runtime.blocks())  # the crash is one of them, named by its whole id
    bystanders = [pool.submit(helpers.sleep_then, 0.2, i) for i in range(4)]
    with pytest.raises(WorkerLost) as info:
        pool.submit(task, *args).result(DEADLOCK)
    lost = info.value
    assert (lost.exit_code, lost.oom_killed) == (exit_code, oom)
    assert words in str(lost)
    assert any_runtime.block_of(lost.container_id) in blocks
    if task is helpers.segfault:
        assert any("Segmentation fault" in line for line in lost.stderr_tail)
    assert [f.result(DEADLOCK) for f in bystanders] == [0, 1, 2, 3]
    assert sorted(pool.map(helpers.double, range(6))) == [0, 2, 4, 6, 8, 10]


def test_container_killed_from_outside(any_runtime):
    pool = any_runtime.pool()
    before = pool.submit(helpers.block).result(DEADLOCK)
    future = pool.submit(helpers.sleep_then, 60)
    wait_until(future.running, what="the task to start")
    (container_id,) = any_runtime.blocks()
    any_runtime.kill(container_id)
    with pytest.raises(WorkerLost, match=any_runtime.killed_by):
        future.result(DEADLOCK)
    assert pool.submit(helpers.block).result(DEADLOCK) != before
    assert pool.submit(helpers.double, 5).result(DEADLOCK) == 10


# --------------------------------------------------------------------------- startup


@pytest.fixture(scope="session")
def image_without_python(engine):
    """An image with nothing in it but an empty /tmp."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("tmp")
        info.type, info.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(info)
    engine.api.import_image_from_data(buffer.getvalue(), repository="minipool-test-nopython", tag="1")
    yield "minipool-test-nopython:1"
    engine.images.remove("minipool-test-nopython:1", force=True)


def printed_lines(error):
    """How many lines Python prints for the uncaught error, causes included."""
    return len("".join(traceback.format_exception(error)).splitlines())


@pytest.mark.parametrize(
    "url, reason",
    [("unix:///nonexistent/docker.sock", "No such file or directory"), ("tcp://127.0.0.1:1", "Connection refused")],
)
def test_unreachable_engine_is_named_in_a_short_error_with_the_fix(label, url, reason):
    with pytest.raises(StartupError) as info:
        ContainerPoolExecutor("app1_v0.1", engine=url, label=label)
    assert str(info.value) == (
        f"cannot reach a Docker engine at {url}: {reason}. "
        "Start dockerd (or Podman's service), or point DOCKER_HOST or engine= at the engine's socket"
    )
    assert isinstance(info.value.__cause__, docker.errors.DockerException)  # docker-py's own, for who looks
    assert printed_lines(info.value) < 25, "".join(traceback.format_exception(info.value))


def test_a_wrong_docker_host_is_named(label, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(StartupError, match=r"at unix:///nonexistent/docker.sock \(DOCKER_HOST\): No such file"):
        ContainerPoolExecutor("app1_v0.1", label=label)


def test_missing_image_is_named_in_a_short_error_with_the_fix(engine, label):
    with pytest.raises(StartupError) as info:
        ContainerPoolExecutor("minipool-no-such-image:0", label=label)
    assert str(info.value).startswith(
        "image 'minipool-no-such-image:0' is not on the engine at unix:///var/run/docker.sock: build it or pull it"
    )
    assert printed_lines(info.value) < 25, "".join(traceback.format_exception(info.value))


def test_max_workers_is_another_name_for_blocks(images, engine, label):
    """So that a partial of the executor stands in for ProcessPoolExecutor(max_workers=...)."""
    make = functools.partial(ContainerPoolExecutor, "app1_v0.1", label=label, ship=[HELPERS])
    with make(max_workers=2) as pool:
        helpers.wait_for_blocks(pool, 2)
        assert len(containers_labelled(engine, label)) == 2


@pytest.mark.parametrize(
    "case",
    [
        "no python in the image", "not a python", "entrypoint exits at once", "last words without a newline",
        "option the engine rejects", "silent",
    ],
)
def test_startup_failures_raise_startup_error_and_leave_nothing(make_pool, image_without_python, case):
    image, options, words = {
        "no python in the image": (image_without_python, {}, "Is 'python3' in the image"),
        "not a python": ("app1_v0.1", {"python": "sh"}, "exited before its handshake"),
        "entrypoint exits at once": ("app1_v0.1", {"container_options": {"entrypoint": ["true"]}}, "exit code 0"),
        # The container's stderr as the stream ends, flushed into the message.
        "last words without a newline": (
            "app1_v0.1", {"container_options": {"entrypoint": ["sh", "-c", "printf 'last words' >&2; exit 3"]}},
            "(?s)exit code 3.*stderr:\nlast words$",
        ),
        "option the engine rejects": ("app1_v0.1", {"container_options": {"runtime": "nope"}}, "nope"),
        "silent": (
            "app1_v0.1",
            {"startup_timeout": 1, "container_options": {"entrypoint": ["sh", "-c", "sleep 30"]}},
            "did not answer",
        ),
    }[case]
    started = time.monotonic()
    pool = make_pool(image, blocks=2, **options)
    # The pool may break before the first submit (the engine refuses at once): then
    # submit raises what the future would have.
    with pytest.raises(StartupError, match=words) as info:
        pool.submit(helpers.double, 1).result(DEADLOCK)
    assert time.monotonic() - started < DEADLOCK
    assert isinstance(info.value, cf.BrokenExecutor)
    with pytest.raises(BrokenContainerPool):
        pool.submit(helpers.double, 1)


@pytest.mark.parametrize(
    "bad, error",
    [
        ({"blocks": -1}, ValueError),
        ({"blocks": 1.5}, TypeError),
        ({"blocks": 3, "max_blocks": 2}, ValueError),
        ({"blocks": 1, "min_blocks": 2}, ValueError),
        ({"max_blocks": 0}, ValueError),
        ({"idle_timeout": 0}, ValueError),
        ({"engine": []}, ValueError),
        ({"engine": [("unix:///x.sock", 0)]}, ValueError),
        ({"engine": 42}, TypeError),
        ({"image": ""}, ValueError),
        ({"image": None}, TypeError),
        ({"python": ""}, ValueError),
        ({"startup_timeout": -1}, ValueError),
        ({"task_timeout": 0}, ValueError),
        ({"task_timeout": "1"}, TypeError),
        ({"retries": -1}, ValueError),
        ({"max_tasks_per_block": 0}, ValueError),
        ({"max_message_size": 10}, ValueError),
        ({"task_timeout": float("inf")}, ValueError),
        ({"container_options": {"mem_limt": "1g"}}, TypeError),
        ({"blocks": 2, "max_workers": 2}, TypeError),
        ({"max_workers": -1}, ValueError),
    ],
    ids=str,
)
def test_bad_arguments_fail_at_once_naming_the_argument(bad, error):
    arguments = {"image": "app1_v0.1", **bad}
    with pytest.raises(error, match=next(iter(bad))):
        ContainerPoolExecutor(**arguments)


# --------------------------------------------------------------------------- containers as created


def test_containers_are_created_as_designed(make_pool, engine, label):
    pool = make_pool(
        environment={"GREETING": "hi"},
        container_options={"labels": {"team": "models"}, "mem_limit": "256m"},
    )
    assert pool.submit(helpers.environ, "GREETING").result(DEADLOCK) == "hi"
    (container_id,) = containers_labelled(engine, label)
    attrs = engine.api.inspect_container(container_id)
    config, host = attrs["Config"], attrs["HostConfig"]
    assert config["StdinOnce"] and config["OpenStdin"] and not config["Tty"]
    assert host["NetworkMode"] == "none"
    assert host["LogConfig"]["Type"] == "none"
    assert host["AutoRemove"]
    assert host["Memory"] == 256 << 20
    assert config["Labels"]["team"] == "models"
    assert config["Labels"]["minipool.pid"] == str(os.getpid())
    assert config["Labels"]["minipool.label"] == label


def test_workdir_and_volumes(make_pool, tmp_path):
    (tmp_path / "data.txt").write_text("mounted")
    pool = make_pool(workdir="/tmp", volumes={str(tmp_path): {"bind": "/data", "mode": "ro"}})
    cwd, path = pool.submit(helpers.where).result(DEADLOCK)
    assert cwd == "/tmp" and "/tmp" in path
    assert pool.submit(helpers.read_text, "/data/data.txt").result(DEADLOCK) == "mounted"


def test_ship_a_package(make_pool, tmp_path):
    package = tmp_path / "shipped_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .core import VALUE\n")
    (package / "core.py").write_text("VALUE = 'shipped'\n")
    script = tmp_path / "use_it.py"
    script.write_text("def value():\n    import shipped_pkg\n    return shipped_pkg.VALUE\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import use_it

        pool = make_pool(ship=[HELPERS, str(package), str(script)])
        assert pool.submit(use_it.value).result(DEADLOCK) == "shipped"
    finally:
        sys.path.remove(str(tmp_path))


def test_every_block_serves(make_pool, tmp_path):
    # Each task holds its container until the gate opens: the third can only go to the third block.
    pool = make_pool(blocks=3, volumes={str(tmp_path): {"bind": "/shared", "mode": "rw"}})
    futures = [pool.submit(helpers.hostname_at_gate, "/shared/gate") for _ in range(3)]
    wait_until(lambda: all(f.running() for f in futures), what="three tasks running at once")
    (tmp_path / "gate").touch()
    assert len({f.result(DEADLOCK) for f in futures}) == 3


def test_long_tasks_are_not_pipelined_after_quick_ones(make_pool, tmp_path):
    """Quick tasks stream many at a time into a container; a function not seen before
    goes one at a time to whichever block is free, so long tasks spread over the blocks."""
    pool = make_pool(blocks=2, volumes={str(tmp_path): {"bind": "/shared", "mode": "rw"}})
    helpers.wait_for_blocks(pool, 2)
    list(pool.map(helpers.identity, range(2000)))  # quick: both containers pipeline them
    # Held at a gate: one on each block, and the others wait in the queue, not pipelined
    # behind them (a task is running once a container has taken it).
    futures = [pool.submit(helpers.hostname_at_gate, "/shared/gate") for _ in range(4)]
    wait_until(lambda: sum(f.running() for f in futures) == 2, what="one task on each block")
    holds(lambda: sum(f.running() for f in futures) == 2, 0.5, what="two tasks waiting in the queue")
    (tmp_path / "gate").touch()
    hosts = [f.result(DEADLOCK) for f in futures]
    assert hosts[0] != hosts[1]


# --------------------------------------------------------------------------- what a task may do to its stub


@pytest.mark.parametrize("careless", [helpers.close_stdout, helpers.close_output])
def test_a_task_that_closes_its_output_returns_and_the_next_task_is_heard(make_pool, careless):
    pool = make_pool(retries=1)
    host = pool.submit(helpers.hostname_after, 0).result(DEADLOCK)
    assert pool.submit(careless).result(DEADLOCK) == "closed"
    heard = pool.submit(helpers.noisy, "heard")
    assert heard.result(DEADLOCK) == "heard"
    assert output(heard) == "noise from print\nnoise from fd 1\nnoise on stderr\n"
    assert pool.submit(helpers.hostname_after, 0).result(DEADLOCK) == host, "the container was replaced"


def test_a_forked_child_that_exits_never_answers_for_its_parent(make_pool):
    pool = make_pool()
    stub_pid = pool.submit(os.getpid).result(DEADLOCK)
    assert pool.submit(helpers.fork_a_child_that_exits).result(DEADLOCK) == (stub_pid, 0)
    assert [pool.submit(os.getpid).result(DEADLOCK) for _ in range(5)] == [stub_pid] * 5


def test_an_exception_over_max_message_size_fails_only_its_task(make_pool):
    pool = make_pool(max_message_size=1 << 20)
    assert list(pool.map(helpers.double, range(300))) == [2 * i for i in range(300)]  # pace: quick, pipelined
    before = [pool.submit(helpers.double, i) for i in range(20)]
    huge = pool.submit(helpers.raise_huge, 2 << 20)
    after = [pool.submit(helpers.double, i) for i in range(20, 40)]
    with pytest.raises(ValueError, match=r"^x+ .*truncated") as info:
        huge.result(DEADLOCK)
    assert len(str(info.value)) < 1 << 20
    assert "raise_huge" in str(info.value.__cause__)
    assert [f.result(DEADLOCK) for f in before + after] == [2 * i for i in range(40)]


def test_a_result_whose_unpickling_raises_a_base_exception_fails_only_its_future(make_pool):
    pool = make_pool()
    with pytest.raises(MiniPoolError, match="cannot be unpickled on the host") as info:
        pool.submit(helpers.exits_when_unpickled).result(DEADLOCK)
    assert isinstance(info.value.__cause__, SystemExit)
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4


@pytest.mark.parametrize("first", [True, False], ids=["failing first", "failing last"])
def test_a_large_payload_that_fails_to_unpickle_fails_only_its_future(any_runtime, first):
    """Large payloads are unpickled as they are read, on both sides: one that fails
    half-way is still read to its end, and the next message is whole."""
    pool = any_runtime.pool()
    assert pool.submit(helpers.double, 1).result(DEADLOCK) == 2
    block = any_runtime.blocks()
    large = helpers.failing_when_unpickled(2 << 20, first)
    with pytest.raises(ValueError, match="unpickled"):
        pool.submit(helpers.identity, large).result(DEADLOCK)
    with pytest.raises(MiniPoolError, match="cannot be unpickled on the host"):
        pool.submit(helpers.failing_when_unpickled, 2 << 20, first).result(DEADLOCK)
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4
    assert any_runtime.blocks() == block  # the same container served all three


def test_a_container_killed_while_its_large_result_arrives_loses_the_task(any_runtime):
    """The result is unpickled as it arrives: a stream that breaks half-way is a
    lost task (retried), not a result that failed to unpickle."""
    pool = any_runtime.pool(retries=1)
    with pytest.raises(WorkerLost) as info:
        pool.submit(helpers.large_result_then_killed, 1 << 30, 0.1).result(DEADLOCK * 2)
    assert len(info.value.attempts) == 1
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4


def test_a_misspelt_container_option_is_named_by_the_constructor():
    with pytest.raises(TypeError, match="no option 'mem_limt'; did you mean 'mem_limit'"):
        ContainerPoolExecutor("app1_v0.1", container_options={"mem_limt": "1g"})
