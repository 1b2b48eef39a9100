"""One behaviour suite, run against ThreadPoolExecutor as the reference and against ours."""

import collections
import concurrent.futures as cf
import threading
import weakref

import pytest

import helpers
from conftest import DEADLOCK
from conftest import RUNTIMES
from conftest import wait_until

# A host directory and its path as the executor's tasks see it: what they leave there
# (a file noting that a task ran, the order tasks finished in) and gates the test opens.
Shared = collections.namedtuple("Shared", "host task")


@pytest.fixture(params=["threads", *RUNTIMES])
def executor(request, tmp_path):
    if request.param == "threads":
        with cf.ThreadPoolExecutor(2) as pool:
            yield pool
    else:
        runtime = request.getfixturevalue("runtime_of")(request.param)
        yield runtime.pool(blocks=2, volumes={str(tmp_path): {"bind": "/shared", "mode": "rw"}})


@pytest.fixture
def shared(executor, tmp_path):
    """tmp_path, which a thread sees as it is and a container as /shared. Its file
    "gate" is created at the end, before the executor shuts down: a test that fails
    before it opens its gate leaves no task waiting there."""
    yield Shared(tmp_path, str(tmp_path) if isinstance(executor, cf.ThreadPoolExecutor) else "/shared")
    (tmp_path / "gate").touch()


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
def test_map_keeps_order(executor, shared, chunksize):
    # The first call finishes only after the last one, so the results come back out of
    # order (two workers; with one chunk of all 20 calls in a container they run in
    # order, and the first cannot wait for the last).
    gated = chunksize < 20
    after = [19 if gated else None] + [None] * 19
    results = executor.map(
        helpers.noted_after, [f"{shared.task}/done"] * 20, range(20), after, chunksize=chunksize, timeout=DEADLOCK
    )
    assert list(results) == list(range(20))
    finished = [int(line) for line in (shared.host / "done").read_text().split()]
    assert sorted(finished) == list(range(20))
    if gated:
        assert finished.index(19) < finished.index(0), "the calls finished in order: the test proves nothing"
    assert list(executor.map(helpers.double, [], chunksize=chunksize)) == []


def test_map_holds_no_result_it_has_yielded(executor):
    """CPython's test_free_reference (issue 14406): a large result is freed as soon
    as the caller lets go of it."""
    for result in executor.map(helpers.make_dummy, range(10), chunksize=3):
        taken = weakref.ref(result)
        del result
        wait_until(lambda taken=taken: taken() is None, timeout=5, what="the result to be freed")


def test_map_raises_the_first_failure_in_order(executor):
    results = executor.map(helpers.raise_value_error, ["first", "second"], timeout=DEADLOCK)
    with pytest.raises(ValueError, match="first"):
        list(results)


def test_map_timeout(executor, shared):
    results = executor.map(helpers.wait_for_file, [f"{shared.task}/gate"], timeout=0.1)  # opened at the end
    with pytest.raises(cf.TimeoutError):
        next(results)


def test_map_rejects_chunksize_zero(executor):
    if isinstance(executor, cf.ThreadPoolExecutor):
        pytest.skip("ThreadPoolExecutor ignores chunksize")
    with pytest.raises(ValueError):
        executor.map(helpers.double, [1], chunksize=0)


def test_as_completed_and_wait(executor, shared):
    futures = [executor.submit(helpers.sleep_then, 0.05 * (i % 3), i) for i in range(8)]
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=DEADLOCK)) == list(range(8))
    # `slow` holds one worker until the test opens its gate: `fast` finishes first,
    # however long the other worker takes to be ready.
    slow = executor.submit(helpers.wait_for_file, f"{shared.task}/gate", "slow")
    fast = executor.submit(helpers.identity, "fast")
    done, not_done = cf.wait([slow, fast], timeout=DEADLOCK, return_when=cf.FIRST_COMPLETED)
    assert (done, not_done) == ({fast}, {slow})
    (shared.host / "gate").touch()
    done, not_done = cf.wait([slow, fast], timeout=DEADLOCK)
    assert not not_done
    assert slow.result() == "slow"


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


def test_cancel_queued_work_only(executor, shared):
    # Both workers wait at a gate the test opens: the third task is still queued.
    release = [executor.submit(helpers.wait_for_file, f"{shared.task}/gate", i) for i in range(2)]
    queued = executor.submit(helpers.noted, f"{shared.task}/runs", "never")
    assert queued.cancel()
    assert queued.cancelled()
    (shared.host / "gate").touch()
    cf.wait(release, timeout=DEADLOCK)
    assert [f.result() for f in release] == [0, 1]
    assert not release[0].cancel()
    # Once shut down, whatever was ever handed to a worker has run.
    executor.shutdown(wait=True)
    assert not (shared.host / "runs").exists(), "the cancelled task ran"


def test_shutdown_cancel_futures(executor, shared):
    # The running tasks wait at a gate until the queued ones are cancelled.
    running = [executor.submit(helpers.wait_for_file, f"{shared.task}/gate", i) for i in range(2)]
    wait_until(lambda: all(f.running() for f in running), what="both tasks to start")
    queued = [executor.submit(helpers.identity, i) for i in range(5)]
    executor.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    (shared.host / "gate").touch()
    executor.shutdown(wait=True)
    assert [f.result() for f in running] == [0, 1]


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
