"""One behaviour suite, run against ThreadPoolExecutor as the reference and against ours."""

import concurrent.futures as cf
import threading

import pytest

import helpers
from conftest import DEADLOCK
from conftest import assert_none_left
from conftest import wait_until


@pytest.fixture(params=["threads", "containers", "podman"])
def executor(request):
    if request.param == "threads":
        with cf.ThreadPoolExecutor(2) as pool:
            yield pool
    elif request.param == "containers":
        yield request.getfixturevalue("make_pool")(blocks=2)
    else:
        podman = request.getfixturevalue("podman")
        make_pool = request.getfixturevalue("make_pool")
        pool = make_pool(blocks=2, engine=podman.url, container_options=podman.container_options)
        yield pool
        # The label fixture looks only at the Docker engine, and after this: shut the pool
        # down here (make_pool's shutdown is then a no-op) and look at Podman's side.
        pool.shutdown(wait=True, cancel_futures=True)
        client = podman.client()
        try:
            assert_none_left(client, request.getfixturevalue("label"))
        finally:
            client.close()


def test_submit_returns_the_result(executor):
    assert executor.submit(helpers.add, 2, b=3).result(DEADLOCK) == 5
    assert executor.submit(helpers.echo, 1, "a", key=[None]).result(DEADLOCK) == ((1, "a"), {"key": [None]})
    assert executor.submit(pow, 2, 10).result(DEADLOCK) == 1024


def test_exception_keeps_its_type_and_message(executor):
    future = executor.submit(helpers.raise_value_error, "boom")
    with pytest.raises(ValueError, match="boom"):
        future.result(DEADLOCK)
    assert isinstance(future.exception(), ValueError)


@pytest.mark.parametrize("chunksize", [1, 3, 1000])
def test_map_keeps_order(executor, chunksize):
    assert list(executor.map(helpers.add, range(20), range(20), chunksize=chunksize, timeout=DEADLOCK)) == [
        2 * i for i in range(20)
    ]
    assert list(executor.map(helpers.double, [], chunksize=chunksize)) == []


def test_map_raises_the_first_failure_in_order(executor):
    results = executor.map(helpers.raise_value_error, ["first", "second"], timeout=DEADLOCK)
    with pytest.raises(ValueError, match="first"):
        list(results)


def test_map_timeout(executor):
    results = executor.map(helpers.sleep_then, [1.5], timeout=0.1)
    with pytest.raises(cf.TimeoutError):
        next(results)


def test_map_rejects_chunksize_zero(executor):
    if isinstance(executor, cf.ThreadPoolExecutor):
        pytest.skip("ThreadPoolExecutor ignores chunksize")
    with pytest.raises(ValueError):
        executor.map(helpers.double, [1], chunksize=0)


def test_as_completed_and_wait(executor):
    futures = [executor.submit(helpers.sleep_then, 0.05 * (i % 3), i) for i in range(8)]
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=DEADLOCK)) == list(range(8))
    slow = executor.submit(helpers.sleep_then, 1.0, "slow")
    fast = executor.submit(helpers.identity, "fast")
    done, not_done = cf.wait([slow, fast], timeout=DEADLOCK, return_when=cf.FIRST_COMPLETED)
    assert fast in done
    done, not_done = cf.wait([slow, fast], timeout=DEADLOCK)
    assert not not_done


def test_callbacks_run_once_done(executor):
    called = threading.Event()
    seen = []

    def callback(future):
        seen.append(future.result())
        called.set()

    future = executor.submit(helpers.double, 4)
    future.add_done_callback(callback)
    assert called.wait(DEADLOCK)
    future.add_done_callback(lambda f: seen.append("late"))  # runs at once on a done future
    assert seen == [8, "late"]


def test_cancel_queued_work_only(executor):
    release = [executor.submit(helpers.sleep_then, 1.0) for _ in range(2)]
    queued = executor.submit(helpers.identity, "never")
    assert queued.cancel()
    assert queued.cancelled()
    cf.wait(release, timeout=DEADLOCK)
    assert all(f.result() is None for f in release)
    assert not release[0].cancel()


def test_shutdown_cancel_futures(executor):
    running = [executor.submit(helpers.sleep_then, 1.0, i) for i in range(2)]
    wait_until(lambda: all(f.running() for f in running), what="both tasks to start")
    queued = [executor.submit(helpers.identity, i) for i in range(5)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert [f.result() for f in running] == [0, 1]
    assert all(f.cancelled() for f in queued)


def test_shutdown_finishes_queued_work(executor):
    futures = [executor.submit(helpers.sleep_then, 0.01, i) for i in range(10)]
    executor.shutdown(wait=True)
    assert [f.result(0) for f in futures] == list(range(10))


def test_submit_after_shutdown_raises(executor):
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(helpers.double, 1)


def test_context_manager_returns_the_executor(executor):
    with executor as same:
        assert same is executor
        assert same.submit(helpers.double, 3).result(DEADLOCK) == 6


def test_many_threads_submit_at_once(executor):
    results = {}

    def submitter(offset):
        futures = [executor.submit(helpers.add, offset, i) for i in range(100)]
        results[offset] = [f.result(DEADLOCK) for f in futures]

    threads = [threading.Thread(target=submitter, args=(1000 * n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLOCK)
    assert results == {1000 * n: [1000 * n + i for i in range(100)] for n in range(8)}


def test_a_raising_callback_does_not_break_the_pool(executor):
    future = executor.submit(helpers.double, 1)
    future.add_done_callback(lambda f: 1 / 0)
    assert future.result(DEADLOCK) == 2
    assert executor.submit(helpers.double, 2).result(DEADLOCK) == 4
