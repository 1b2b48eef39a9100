"""Workflows on top of the executor: apps, futures as inputs, cached results, map's buffersize."""

import concurrent.futures as cf
import itertools
import logging
import sqlite3
import subprocess
import sys
import threading

import pytest

import helpers
from conftest import APP1
from conftest import APP2
from conftest import DEADLOCK
from conftest import ROOT
from conftest import wait_until
from minipool import CacheError
from minipool import DependencyError
from minipool import output


@pytest.fixture
def shared(tmp_path):
    """A host directory the containers see as /shared, and the container_options for it."""
    return tmp_path, {"volumes": {str(tmp_path): {"bind": "/shared", "mode": "rw"}}}


def runs(directory):
    """How many noted() calls ran."""
    path = directory / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


# --------------------------------------------------------------------------- apps


def test_an_app_returns_a_future_of_its_pool(make_pool):
    pool = make_pool()

    @pool.app
    def double(x):
        return 2 * x

    @pool.app()
    def add(a, b=0):
        return a + b

    future = double(21)
    assert isinstance(future, cf.Future)
    assert future.result(DEADLOCK) == 42
    assert add(1, b=2).result(DEADLOCK) == 3
    assert double.__wrapped__(4) == 8  # the plain function, run here
    assert double.__name__ == "double"


def test_futures_as_inputs_across_two_pools(make_pool):
    pool_app1 = make_pool(blocks=2)
    pool_app2 = make_pool(APP2)
    x = pool_app1.app(helpers.double)
    y = pool_app2.app(helpers.add)
    z = pool_app1.app(helpers.echo)
    doubled = x(5)
    fanned = [y(doubled, b=i) for i in range(4)]
    joined = z(*fanned, last=fanned[-1])
    assert joined.result(DEADLOCK) == ((10, 11, 12, 13), {"last": 13})


def test_an_input_from_another_executor_does_not_block_the_caller(make_pool):
    pool = make_pool()
    go = threading.Event()
    with cf.ThreadPoolExecutor(1) as threads:
        later = threads.submit(lambda: go.wait(DEADLOCK) and 20)
        doubled = pool.app(helpers.double)(later)  # returns at once
        assert not doubled.done()
        go.set()
        assert doubled.result(DEADLOCK) == 40


def test_a_failed_input_fails_the_call_with_dependency_error(make_pool):
    pool = make_pool()
    failing = pool.app(helpers.raise_value_error)("boom")
    downstream = pool.app(helpers.double)(failing)
    with pytest.raises(DependencyError, match="boom") as info:
        downstream.result(DEADLOCK)
    assert isinstance(info.value.__cause__, ValueError)
    further = pool.app(helpers.double)(downstream)
    with pytest.raises(DependencyError):
        further.result(DEADLOCK)


def test_a_cancelled_input_fails_the_call_with_dependency_error(make_pool):
    pool = make_pool()
    never = cf.Future()
    downstream = pool.app(helpers.double)(never)
    never.cancel()
    with pytest.raises(DependencyError) as info:
        downstream.result(DEADLOCK)
    assert isinstance(info.value.__cause__, cf.CancelledError)


def test_leaving_with_waits_for_calls_whose_inputs_were_not_done(images, label):
    from minipool import ContainerPoolExecutor

    with ContainerPoolExecutor("app1_v0.1", label=label, ship=[helpers.__file__]) as pool:
        slow = pool.app(helpers.sleep_then)(1.0, 3)
        after = pool.app(helpers.double)(slow)
    assert after.done() and after.result() == 6


def test_shutdown_cancel_futures_cancels_calls_waiting_for_inputs(make_pool):
    pool = make_pool()
    never = cf.Future()
    waiting = pool.app(helpers.double)(never)
    pool.shutdown(wait=True, cancel_futures=True)
    assert waiting.cancelled()
    assert waiting in cf.wait([waiting], timeout=DEADLOCK).done
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.app(helpers.double)(1)


def test_cancelling_a_waiting_call_never_runs_it(make_pool, shared):
    directory, options = shared
    pool = make_pool(**options)
    gate = cf.Future()
    waiting = pool.app(helpers.noted)("/shared/runs", gate)
    assert waiting.cancel()
    assert waiting in cf.wait([waiting], timeout=DEADLOCK).done
    gate.set_result(1)
    assert pool.submit(helpers.double, 1).result(DEADLOCK) == 2
    assert runs(directory) == 0


# --------------------------------------------------------------------------- cached results


def test_cache_runs_an_identical_call_once(make_pool, shared):
    directory, options = shared
    pool = make_pool(**options)
    noted = pool.app(cache=True)(helpers.noted)
    first = noted("/shared/runs", [1, 2])
    second = noted("/shared/runs", [1, 2])  # while the first is in flight
    assert second is not first  # each call has a future of its own
    assert first.result(DEADLOCK) == [1, 2] and second.result(DEADLOCK) == [1, 2]
    assert noted("/shared/runs", [1, 2]).result(DEADLOCK) == [1, 2]
    assert noted("/shared/runs", [1, 3]).result(DEADLOCK) == [1, 3]
    assert runs(directory) == 2


@pytest.mark.parametrize("where", ["memory", "directory"])
def test_the_cache_tells_calls_apart_by_their_keyword_arguments(make_pool, tmp_path, where):
    pool = make_pool()
    add = pool.app(cache=True if where == "memory" else tmp_path)(helpers.add)
    echo = pool.app(cache=True if where == "memory" else tmp_path)(helpers.echo)
    assert add(1, b=2).result(DEADLOCK) == 3
    assert add(1, b=3).result(DEADLOCK) == 4
    assert add(1).result(DEADLOCK) == 1
    assert echo(1, key="a").result(DEADLOCK) == ((1,), {"key": "a"})
    assert echo(1, key="b").result(DEADLOCK) == ((1,), {"key": "b"})
    assert echo(1, other="a").result(DEADLOCK) == ((1,), {"other": "a"})


def test_cancelling_a_call_leaves_the_identical_call_it_shares_a_task_with(make_pool, shared):
    directory, options = shared
    pool = make_pool(**options)
    busy = pool.submit(helpers.sleep_then, 1, "busy")
    noted = pool.app(cache=True)(helpers.noted)
    first = noted("/shared/runs", 1)  # queued behind `busy`
    gate = cf.Future()
    second = noted("/shared/runs", gate)
    gate.set_result(1)  # the same call: it shares the first one's task
    assert second.cancel()
    assert first.result(DEADLOCK) == 1 and busy.result(DEADLOCK) == "busy"
    assert runs(directory) == 1


@pytest.mark.parametrize("cancelled", ["first", "second"])
def test_cancelling_a_cached_call_leaves_the_identical_call(make_pool, shared, cancelled):
    directory, options = shared
    pool = make_pool(**options)
    busy = pool.submit(helpers.sleep_then, 1, "busy")
    noted = pool.app(cache=True)(helpers.noted)
    calls = {"first": noted("/shared/runs", 1), "second": noted("/shared/runs", 1)}  # queued behind `busy`
    assert calls.pop(cancelled).cancel()
    (other,) = calls.values()
    assert other.result(DEADLOCK) == 1 and busy.result(DEADLOCK) == "busy"
    assert runs(directory) == 1


def test_a_failed_call_is_not_cached(make_pool, shared):
    directory, options = shared
    pool = make_pool(**options)
    count_and_raise = pool.app(cache=True)(helpers.count_and_raise)
    for _ in range(2):
        with pytest.raises(ValueError):
            count_and_raise("/shared/runs").result(DEADLOCK)
    assert runs(directory) == 2


def test_a_cache_directory_serves_a_later_pool(make_pool, shared, tmp_path_factory):
    directory, options = shared
    cache = tmp_path_factory.mktemp("cache")
    for _ in range(2):  # as a workflow run again after a crash
        noted = make_pool(**options).app(cache=cache)(helpers.noted)
        assert noted("/shared/runs", {"big": bytes(3 << 20)}).result(DEADLOCK) == {"big": bytes(3 << 20)}
    assert runs(directory) == 1


def test_pools_of_two_images_sharing_a_cache_directory_keep_their_own_results(make_pool, tmp_path):
    """The same call in the seed's two images answers differently (app1 doubles,
    app2 squares): a cache directory shared by both pools serves each its own."""
    for image, answer in [(APP1, [2, 4, 6]), (APP2, [1, 4, 9]), (APP1, [2, 4, 6])]:
        predict = make_pool(image).app(cache=tmp_path)(helpers.predict_with_the_images_app)
        assert predict([1, 2, 3]).result(DEADLOCK) == answer, image


def test_a_foreign_or_corrupt_cache_file_is_an_error(make_pool, tmp_path):
    pool = make_pool()
    (tmp_path / "minipool-results.sqlite3").write_bytes(b"not a database at all" * 100)
    with pytest.raises(CacheError, match="not a minipool results cache"):
        pool.app(cache=tmp_path)(helpers.double)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with sqlite3.connect(foreign / "minipool-results.sqlite3") as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(CacheError, match="invoices"):
        pool.app(cache=foreign)(helpers.double)


@pytest.mark.parametrize(
    "damage",
    [lambda result: result.replace(b"*", b"+"), lambda result: 42, lambda result: "text"],  # 42 pickles to b"*"
    ids=["a changed byte", "an integer", "text"],
)
def test_a_damaged_entry_is_an_error_never_a_wrong_result(make_pool, tmp_path, damage):
    pool = make_pool()
    double = pool.app(cache=tmp_path)(helpers.double)
    assert double(21).result(DEADLOCK) == 42
    with sqlite3.connect(tmp_path / "minipool-results.sqlite3") as db:
        (result,) = db.execute("SELECT result FROM results").fetchone()
        db.execute("UPDATE results SET result = ?", (damage(result),))
    with pytest.raises(CacheError, match="damaged"):
        make_pool().app(cache=tmp_path)(helpers.double)(21)


# --------------------------------------------------------------------------- captured output


def test_a_tasks_output_is_kept_for_its_future(make_pool, shared, caplog):
    directory, options = shared
    pool = make_pool(**options)
    future = pool.submit(helpers.noisy, "clean")
    assert future.result(DEADLOCK) == "clean"
    assert output(future) == "noise from print\nnoise from fd 1\nnoise on stderr\n"
    quiet = pool.submit(helpers.double, 1)
    assert quiet.result(DEADLOCK) == 2
    assert output(quiet) == ""  # done, and wrote nothing
    assert output(cf.Future()) == ""
    # Not done yet: nothing, even once what it wrote has reached the host (and the log).
    try:
        # The level first: the task's line may be logged before submit returns.
        with caplog.at_level(logging.INFO, logger="minipool.worker"):
            waiting = pool.submit(helpers.announce_then, helpers.wait_for_file, "/shared/gate", "opened")
            wait_until(lambda: any(r.getMessage().endswith(": started") for r in caplog.records), what="its output")
        assert not waiting.done()
        assert output(waiting) == ""
    finally:
        (directory / "gate").touch()  # a failure must not leave the task waiting for the pool's shutdown
    assert waiting.result(DEADLOCK) == "opened"
    assert output(waiting) == "started\n"


def test_each_worker_process_output_goes_to_its_own_task(make_pool):
    pool = make_pool(workers_per_block=3)
    futures = {word: pool.submit(helpers.say, word, 30) for word in ("alpha", "beta", "gamma")}
    for word, future in futures.items():
        assert future.result(DEADLOCK) == word
        assert output(future) == f"{word}\n" * 30


def test_output_is_bounded_and_says_so(make_pool, caplog):
    pool = make_pool()
    with caplog.at_level(logging.WARNING, logger="minipool.worker"):
        future = pool.submit(helpers.flood, 3)
        assert future.result(DEADLOCK) == "intact"
    assert len(output(future)) == 1 << 20
    assert any("truncated" in record.getMessage() for record in caplog.records)


def test_an_apps_future_carries_its_tasks_output(make_pool):
    pool = make_pool()
    say = pool.app(helpers.say)
    gate = cf.Future()
    later = say(gate, 2)
    gate.set_result("later")
    assert later.result(DEADLOCK) == "later"
    assert output(later) == "later\nlater\n"


# --------------------------------------------------------------------------- map's buffersize


def test_map_with_buffersize_reads_an_endless_input_as_it_goes(make_pool):
    pool = make_pool()
    taken = []

    def endless():
        for i in itertools.count():
            taken.append(i)
            yield i

    results = pool.map(helpers.double, endless(), buffersize=4)
    assert list(itertools.islice(results, 10)) == [2 * i for i in range(10)]
    assert len(taken) <= 10 + 4
    results.close()


def test_map_rejects_a_bad_buffersize(make_pool):
    with pytest.raises(ValueError, match="buffersize"):
        make_pool().map(helpers.double, [1], buffersize=0)


# --------------------------------------------------------------------------- the example


def test_the_workflow_example_prints_its_result(images, tmp_path):
    command = [sys.executable, f"{ROOT}/examples/workflow.py", "--fan-out", "3", "--cache", str(tmp_path)]
    for _ in range(2):  # the second run is served by the cache
        out = subprocess.run(command, capture_output=True, text=True, timeout=DEADLOCK * 2, check=True).stdout
        assert out.splitlines() == [
            "X: [2, 4, 6]", "Y0: [4, 16, 36]", "Y1: [9, 25, 49]", "Y2: [16, 36, 64]", "Z: [112, 166, 232]",
        ]


def test_the_progress_example_prints_its_results(images):
    pytest.importorskip("tqdm")
    command = [sys.executable, f"{ROOT}/examples/progress.py", "--tasks", "20"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=DEADLOCK * 2, check=True).stdout
    assert out.splitlines() == [
        "sum of the doubled numbers 0..19: 380", "the first 20 results of an endless map end with [38]",
    ]
