"""Several worker processes in one container, and a host that falls silent."""

import signal
import time

import pytest

import helpers
import minipool
from conftest import DEADLOCK
from conftest import containers_labelled
from conftest import start_script
from conftest import wait_until
from minipool import WorkerLost


def test_one_container_runs_tasks_in_several_processes(any_runtime):
    pool = any_runtime.pool(workers_per_block=3)
    pids = set(pool.map(helpers.pid_after, [0.3] * 9))
    assert len(pids) == 3
    assert len(any_runtime.blocks()) == 1


def test_a_dying_worker_process_loses_its_task_only_and_the_container_stays(any_runtime):
    pool = any_runtime.pool(workers_per_block=2)
    slow = pool.submit(helpers.sleep_then, 1, "slow")
    doomed = pool.submit(helpers.kill_self)
    with pytest.raises(WorkerLost, match=f"a worker process in {any_runtime.named()} died") as info:
        doomed.result(DEADLOCK)
    assert info.value.exit_code == 128 + signal.SIGKILL
    assert slow.result(DEADLOCK) == "slow"
    assert list(pool.map(helpers.double, range(10))) == [2 * i for i in range(10)]
    assert any_runtime.blocks() == [any_runtime.block_of(info.value.container_id)]


def test_a_stub_whose_worker_died_still_exits_on_stop(make_pool, engine, label):
    """A dead worker's task is no longer running: on STOP the stub exits by itself
    (exit code 0), not removed by force after _EXIT_GRACE (137)."""
    from test_lifecycle import exit_codes

    pool = make_pool(workers_per_block=2)
    with pytest.raises(WorkerLost):
        pool.submit(helpers.kill_self).result(DEADLOCK)
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4
    since = time.time()
    pool.shutdown()
    assert exit_codes(engine, label, since) == [0], "not exited on STOP: removed by force after _EXIT_GRACE"


def test_a_stub_without_init_reaps_the_orphans_of_tasks(make_pool):
    """With init=False the stub is the container's PID 1, and a task's orphan its
    child: reaping it is PID 1's job, and no worker's death. The task running
    then, and those after it, run in the same container."""
    pool = make_pool(workers_per_block=2, container_options={"init": False})
    here = pool.submit(helpers.hostname_after, 0).result(DEADLOCK)
    gate = "/tmp/minipool-orphan-gate"
    orphan = pool.submit(helpers.leave_an_orphan, gate).result(DEADLOCK)
    assert pool.submit(helpers.release_orphan, gate, orphan, "reaped").result(DEADLOCK) == "reaped"
    assert list(pool.map(helpers.double, range(10))) == [2 * i for i in range(10)]
    assert pool.submit(helpers.hostname_after, 0).result(DEADLOCK) == here


def test_a_lost_process_task_is_retried(any_runtime, tmp_path):
    pool = any_runtime.pool(workers_per_block=2, retries=1, volumes={str(tmp_path): {"bind": "/shared", "mode": "rw"}})
    assert pool.submit(helpers.die_once, "/shared/marker").result(DEADLOCK) == "second time lucky"


@pytest.mark.parametrize("workers", [1, 2])
def test_keepalives_keep_a_quiet_task_past_the_silence_limit(monkeypatch, make_pool, workers):
    """A task that writes nothing gets no message while it runs: only the host's
    KEEPALIVEs keep the stub from deciding that the host is gone. With the real
    limit (30 s), any task longer than that would die with WorkerLost without them."""
    # Read when the pool starts (the stub's HELLO and command) and by the keepalive thread.
    monkeypatch.setattr(minipool, "_HOST_SILENCE", 2)
    pool = make_pool(workers_per_block=workers)
    here = pool.submit(helpers.hostname_after, 0).result(DEADLOCK)
    # The stub looks once a second: without keepalives it would exit 2 to 3 s in.
    assert pool.submit(helpers.hostname_after, 5).result(DEADLOCK) == here


@pytest.mark.parametrize("size", [0, 2 << 20], ids=["small", "streamed"])
def test_a_task_slow_to_unpickle_outlasts_the_silence_limit(monkeypatch, make_pool, size):
    """While the stub unpickles a task (a streamed one: reading it as it goes) it
    reads no KEEPALIVE: that time does not count as the host's silence."""
    monkeypatch.setattr(minipool, "_HOST_SILENCE", 2)
    pool = make_pool()
    argument = (helpers.SlowToUnpickle(5, "unpickled"), b"x" * size)
    assert pool.submit(helpers.identity, argument).result(DEADLOCK)[0] == "unpickled"


def test_a_result_slow_to_unpickle_on_the_host_is_not_a_timeout(make_pool):
    """task_timeout counts until the result is in; unpickling it runs the host's own time."""
    pool = make_pool(task_timeout=2)
    assert pool.submit(helpers.slow_to_unpickle, 4, "done").result(DEADLOCK) == "done"


@pytest.mark.parametrize("how", [signal.SIGSTOP, signal.SIGKILL])
def test_a_host_that_stops_answering_loses_its_containers(any_engine, images, label, how):
    """With the caller frozen, or killed on Podman (which ignores StdinOnce): the
    stub exits when the host has been silent for _HOST_SILENCE seconds."""
    client, url, options = any_engine
    process = start_script(
        f"""
        import os, signal
        import minipool, helpers
        minipool._HOST_SILENCE = 2
        pool = minipool.ContainerPoolExecutor(
            "app1_v0.1", 2, engine={url!r}, container_options={options!r}, label="{label}",
            ship=["{helpers.__file__}"],
        )
        helpers.wait_for_blocks(pool, 2)
        print("ready", flush=True)
        os.kill(os.getpid(), {how.value})
        """
    )
    try:
        assert process.stdout.readline() == "ready\n", process.stderr.read()
        assert len(containers_labelled(client, label)) == 2
        wait_until(lambda: not containers_labelled(client, label), timeout=DEADLOCK / 2, what="containers to exit")
    finally:
        process.kill()
        process.communicate()
