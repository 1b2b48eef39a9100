"""Beyond one engine and a fixed size: blocks over several engines, elastic blocks."""

import pytest

import helpers
import minipool
from conftest import APP1
from conftest import APP2
from conftest import DEADLOCK
from conftest import HELPERS
from conftest import containers_labelled
from conftest import holds
from conftest import wait_until
from minipool import ContainerPoolExecutor
from minipool import StartupError
from minipool import WorkerLost


@pytest.fixture
def second_client(second_engine):
    client = second_engine.client()
    yield client
    client.close()


def spread(engine, second_client, label):
    return len(containers_labelled(engine, label)), len(containers_labelled(second_client, label))


# --------------------------------------------------------------------------- several engines


def test_blocks_are_spread_over_the_engines(second_engine, second_client, engine, label):
    with ContainerPoolExecutor(APP1, 4, engine=[None, second_engine.url], label=label, ship=[HELPERS]) as pool:
        assert list(pool.map(helpers.double, range(100))) == [2 * i for i in range(100)]
        wait_until(lambda: spread(engine, second_client, label) == (2, 2), what="two blocks on each engine")
    wait_until(lambda: spread(engine, second_client, label) == (0, 0), timeout=15, what="containers to go")


def test_one_pool_spans_docker_and_podman(podman, engine, label):
    client = podman.client()
    try:
        options = {"engine": [None, podman.url], "container_options": podman.container_options}
        with ContainerPoolExecutor(APP1, 2, label=label, ship=[HELPERS], **options) as pool:
            helpers.wait_for_blocks(pool, 2)
            assert spread(engine, client, label) == (1, 1)
        wait_until(lambda: spread(engine, client, label) == (0, 0), timeout=15, what="containers to go")
    finally:
        client.close()


def test_weights_share_the_blocks_out(second_engine, second_client, engine, label):
    engines = [(engine, 3), (second_engine.url, 1)]
    with ContainerPoolExecutor(APP1, 4, engine=engines, label=label, ship=[HELPERS]) as pool:
        assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4
        wait_until(lambda: spread(engine, second_client, label) == (3, 1), what="three blocks here, one there")


def test_an_engine_without_the_image_is_named(second_engine, label):
    # The second engine holds app1 only.
    with pytest.raises(StartupError, match=f"{APP2}.*{second_engine.url}"):
        ContainerPoolExecutor(APP2, 2, engine=[None, second_engine.url], label=label)


def test_an_engine_that_cannot_start_containers_any_more_gives_its_blocks_away(
    second_engine, second_client, engine, label
):
    pool = ContainerPoolExecutor(APP1, 2, engine=[None, second_engine.url], label=label, ship=[HELPERS])
    with pool:
        helpers.wait_for_blocks(pool, 2)
        assert spread(engine, second_client, label) == (1, 1)
        second_client.images.remove(APP1, force=True)  # it answers, but can create nothing more
        (doomed,) = containers_labelled(second_client, label)
        second_client.api.kill(doomed)
        wait_until(lambda: spread(engine, second_client, label) == (2, 0), what="its block to start here")
        assert list(pool.map(helpers.double, range(10))) == [2 * i for i in range(10)]


def test_an_engine_that_stops_loses_no_result(second_engine, second_client, engine, label):
    pool = ContainerPoolExecutor(APP1, 4, engine=[None, second_engine.url], retries=2, label=label, ship=[HELPERS])
    with pool:
        futures = [pool.submit(helpers.sleep_then, 0.05, i) for i in range(200)]
        wait_until(lambda: spread(engine, second_client, label) == (2, 2), what="two blocks on each engine")
        wait_until(lambda: sum(f.done() for f in futures) >= 20, what="some results")
        second_engine.stop()
        assert [f.result(DEADLOCK) for f in futures] == list(range(200))
        # The lost engine's blocks now run here.
        wait_until(lambda: len(containers_labelled(engine, label)) == 4, what="its blocks re-placed")
        assert list(pool.map(helpers.double, range(50))) == [2 * i for i in range(50)]


# --------------------------------------------------------------------------- elastic blocks


def test_blocks_are_added_while_work_waits(any_runtime):
    pool = any_runtime.pool(blocks=1, max_blocks=4)
    futures = [pool.submit(helpers.sleep_then, 1, i) for i in range(12)]
    wait_until(lambda: len(any_runtime.blocks()) == 4, what="four blocks")
    assert [f.result(DEADLOCK) for f in futures] == list(range(12))
    assert len(any_runtime.blocks()) == 4, "more blocks than max_blocks"


def test_a_block_with_free_worker_processes_takes_work_before_a_new_block(any_runtime):
    pool = any_runtime.pool(blocks=1, max_blocks=4, workers_per_block=3)
    helpers.wait_for_blocks(pool, 1)
    futures = [pool.submit(helpers.sleep_then, 1, i) for i in range(3)]
    assert [f.result(DEADLOCK) for f in futures] == list(range(3))
    assert len(any_runtime.blocks()) == 1


def test_idle_blocks_are_removed_down_to_min_blocks(any_runtime):
    pool = any_runtime.pool(blocks=3, min_blocks=1, idle_timeout=1)
    assert list(pool.map(helpers.sleep_then, [0.5] * 6, range(6))) == list(range(6))
    wait_until(lambda: len(any_runtime.blocks()) <= 1, what="idle blocks to go")
    kept = any_runtime.blocks()
    assert len(kept) == 1, "fewer blocks than min_blocks"
    # Nothing announces that a block stays: the same container, looked at all through
    # twice idle_timeout (a block retired and started again would change it).
    holds(lambda: any_runtime.blocks() == kept, 2, what="the min_blocks container")
    assert pool.submit(helpers.block).result(DEADLOCK) == any_runtime.seen_as(kept[0])


def test_a_pool_scales_from_zero_and_back(any_runtime):
    pool = any_runtime.pool(blocks=0, max_blocks=2, idle_timeout=0.5)
    assert not any_runtime.blocks()
    for round in range(2):
        futures = [pool.submit(helpers.sleep_then, 0.5, i) for i in range(4)]
        assert [f.result(DEADLOCK) for f in futures] == list(range(4)), f"round {round}"
        wait_until(lambda: not any_runtime.blocks(), what="every idle block to go")


@pytest.mark.parametrize("any_runtime", ["docker", "charliecloud"], indirect=True)
def test_a_pool_scaling_up_from_zero_again_starts_its_block_at_once(any_runtime, monkeypatch):
    """The head start other blocks give the first one is for a pool that has one
    starting: after every block retired, the next starts at once, whatever its number.
    (The head start made enormous: waiting for it is a hang.)"""
    monkeypatch.setattr(minipool, "_FIRST_BLOCK_HEAD_START", 600)
    pool = any_runtime.pool(blocks=1, min_blocks=0, idle_timeout=0.5)
    for round in range(2):
        assert pool.submit(helpers.double, round).result(DEADLOCK) == 2 * round
        wait_until(lambda: not any_runtime.blocks(), what="the idle block to go")


def test_a_block_never_retires_while_its_lost_task_waits_for_its_retry(make_pool):
    # The task outlives idle_timeout, so the block's last finished task is old when its container dies.
    pool = make_pool(blocks=1, min_blocks=0, max_blocks=1, idle_timeout=0.5, retries=1)
    with pytest.raises(WorkerLost, match="lost 2 times"):
        pool.submit(helpers.exit_after, 1.5, 3).result(DEADLOCK)
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4


def test_a_block_never_retires_while_tasks_put_back_behind_a_crash_wait(make_pool):
    pool = make_pool(blocks=1, min_blocks=0, max_blocks=1, idle_timeout=0.5)
    # Both functions quick: the doubles are pipelined behind the crash, and put back when it dies.
    assert list(pool.map(helpers.exit_after, [0] * 300)) == [0] * 300
    assert list(pool.map(helpers.double, range(300))) == [2 * i for i in range(300)]
    crash = pool.submit(helpers.exit_after, 1.5, 3)
    behind = [pool.submit(helpers.double, i) for i in range(10)]
    with pytest.raises(WorkerLost, match="exit code 3"):
        crash.result(DEADLOCK)
    assert [f.result(DEADLOCK) for f in behind] == [2 * i for i in range(10)]


def test_a_refused_scale_up_leaves_the_working_blocks_serving(make_pool, label, caplog):
    # A fixed container name: the engine refuses every container but the first.
    pool = make_pool(blocks=1, max_blocks=2, container_options={"name": f"{label}-the-only-one"})
    helpers.wait_for_blocks(pool, 1)
    futures = [pool.submit(helpers.sleep_then, 0.5, i) for i in range(12)]  # work waits: a block is added
    assert [f.result(DEADLOCK) for f in futures] == list(range(12))
    assert any("could not start" in record.getMessage() for record in caplog.records)
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4


def test_a_pool_whose_blocks_all_retired_after_a_refused_scale_up_starts_one_for_new_work(
    make_pool, engine, label, tmp_path, caplog, monkeypatch
):
    """A refused start pauses adding blocks only while others serve: once every block
    has retired (idle_timeout), a task submitted in the pause still gets one. The
    pause is made endless, so only a pool that waits for it misses the deadline."""
    monkeypatch.setattr(minipool, "_SCALE_UP_PAUSE", 3600.0)
    pool = make_pool(
        blocks=1, min_blocks=0, max_blocks=2, idle_timeout=0.5,
        # A fixed container name: the engine refuses a second container while the first lives.
        container_options={"name": f"{label}-the-only-one"}, volumes={str(tmp_path): {"bind": "/shared"}},
    )
    # The second task waits for the busy block: a block is added, and refused.
    held = [pool.submit(helpers.wait_for_file, "/shared/gate", i) for i in range(2)]
    wait_until(lambda: "could not start a container; the pool goes on" in caplog.text, what="the refused start")
    (tmp_path / "gate").touch()
    assert [f.result(DEADLOCK) for f in held] == [0, 1]
    wait_until(lambda: not containers_labelled(engine, label), what="every idle block to retire")
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4
