"""Faults, limits and hardening: each fault ends in a specific outcome, never a hang,
a lost result or a leaked container."""

import concurrent.futures as cf
import gc
import logging
import re
import threading
import time

import pytest

import helpers
from conftest import APP1
from conftest import DEADLOCK
from conftest import HELPERS
from conftest import containers_labelled
from conftest import start_script
from conftest import wait_until
from minipool import BrokenContainerPool
from minipool import ContainerPoolExecutor
from minipool import ProtocolError
from minipool import StartupError
from minipool import WorkerLost


def inspect_only_container(engine, label):
    (container_id,) = containers_labelled(engine, label)
    return engine.api.inspect_container(container_id)


# --------------------------------------------------------------------------- options


def test_task_timeout_kills_and_replaces_only_that_container(any_runtime):
    pool = any_runtime.pool(blocks=2, task_timeout=1.5)
    helpers.wait_for_blocks(pool, 2)
    both = set(any_runtime.blocks())
    slow = pool.submit(helpers.sleep_then, 60)
    wait_until(slow.running, what="the slow task to start")
    quick = [pool.submit(helpers.sleep_then, 0.2, i) for i in range(4)]
    with pytest.raises(cf.TimeoutError, match=r"task_timeout=1\.5"):
        slow.result(DEADLOCK)
    # The container is removed before the future fails: it is gone already (a Slurm
    # block's job a moment after), not left to end its 60 s sleep (which would hold
    # its block _EXIT_GRACE seconds).
    wait_until(lambda: len(both - set(any_runtime.blocks())) == 1, timeout=any_runtime.lingers,
               what="the timed-out task's container to be gone")
    gone = both - set(any_runtime.blocks())
    (survivor,) = both - gone
    assert [f.result(DEADLOCK) for f in quick] == [0, 1, 2, 3]
    wait_until(lambda: len(any_runtime.blocks()) == 2, what="the killed container's replacement")
    (replacement,) = set(any_runtime.blocks()) - both
    # Once the replacement is ready (listed as soon as created): the two blocks serving.
    assert helpers.wait_for_blocks(pool, 2) == {any_runtime.seen_as(survivor), any_runtime.seen_as(replacement)}


class StallsWhenUnpickled:
    """An argument whose unpickling stalls (a slow import, a __setstate__ that waits)."""

    def __reduce__(self):
        return time.sleep, (600,)


def test_task_timeout_holds_while_a_large_task_is_still_being_sent(any_runtime):
    """The stub unpickles a large task as it reads it: while that stalls, the rest of
    the task cannot be sent, and its deadline must still hold."""
    pool = any_runtime.pool(task_timeout=2)
    stalled = pool.submit(helpers.identity, [StallsWhenUnpickled(), b"x" * (16 << 20)])
    with pytest.raises(cf.TimeoutError, match="task_timeout=2"):
        stalled.result(DEADLOCK)
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4


def test_task_timeout_counts_from_when_the_task_starts_not_while_it_waits_behind_another(make_pool):
    """With task_timeout a quick function's tasks go one at a time, as slow ones do:
    a task that waited in the container behind another would be killed for the time
    it waited. Each of these takes 0.6 of the timeout; both together, 1.2."""
    pool = make_pool(task_timeout=5)
    assert [pool.submit(helpers.sleep_then, 0).result(DEADLOCK) for _ in range(30)] == [None] * 30  # pace: quick
    first = pool.submit(helpers.sleep_then, 3, "first")
    second = pool.submit(helpers.sleep_then, 3, "second")
    assert first.result(DEADLOCK) == "first"
    assert second.result(DEADLOCK) == "second"


def test_retries_run_a_lost_task_again(any_runtime, tmp_path):
    pool = any_runtime.pool(retries=1, volumes={str(tmp_path): {"bind": "/shared", "mode": "rw"}})
    assert pool.submit(helpers.die_once, "/shared/marker").result(DEADLOCK) == "second time lucky"


def test_a_lost_task_runs_again_before_the_tasks_queued_behind_it(make_pool, tmp_path):
    """A retried task is first in line (README): it does not wait behind the queue
    that formed while it ran, nor stall a map() whose first result it is."""
    pool = make_pool(retries=1, volumes={str(tmp_path): {"bind": "/shared", "mode": "rw"}})
    finished = []  # in the order the futures end
    gate = pool.submit(helpers.wait_for_file, "/shared/gate")  # holds the block while the queue forms
    lost = pool.submit(helpers.die_once, "/shared/marker")
    queued = [pool.submit(helpers.double, i) for i in range(20)]
    for name, future in [("lost", lost), *enumerate(queued)]:
        future.add_done_callback(lambda _, name=name: finished.append(name))
    (tmp_path / "gate").touch()
    assert lost.result(DEADLOCK) == "second time lucky"
    assert [f.result(DEADLOCK) for f in queued] == [2 * i for i in range(20)]
    gate.result(DEADLOCK)
    assert finished == ["lost", *range(20)]


def test_retries_exhausted_lists_every_attempt(any_runtime):
    pool = any_runtime.pool(blocks=2, retries=2)
    with pytest.raises(WorkerLost) as info:
        pool.submit(helpers.kill_self).result(DEADLOCK)
    assert len(info.value.attempts) == 2
    assert "lost 3 times" in str(info.value)
    assert len({lost.container_id for lost in [*info.value.attempts, info.value]}) == 3
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4


def test_a_task_that_raises_is_not_retried(any_runtime, tmp_path):
    pool = any_runtime.pool(retries=3, volumes={str(tmp_path): {"bind": "/shared", "mode": "rw"}})
    with pytest.raises(ValueError, match="counted"):
        pool.submit(helpers.count_and_raise, "/shared/runs").result(DEADLOCK)
    assert (tmp_path / "runs").read_text() == "ran\n"


def test_max_tasks_per_block_recycles_containers(any_runtime):
    pool = any_runtime.pool(max_tasks_per_block=3)
    hosts = [pool.submit(helpers.block_after, 0).result(DEADLOCK) for _ in range(9)]
    assert [hosts.count(host) for host in dict.fromkeys(hosts)] == [3, 3, 3]


def stop_workers(runtime, how, **options):
    """terminate_workers() or kill_workers() (`how`) while two tasks run and three wait."""
    pool = runtime.pool(blocks=2, **options)
    running = [pool.submit(helpers.sleep_then, 60) for _ in range(2)]
    queued = [pool.submit(helpers.double, i) for i in range(3)]
    wait_until(lambda: all(f.running() for f in running), what="both tasks to start")
    getattr(pool, how)()
    for future in running:
        with pytest.raises(BrokenContainerPool, match=how):
            future.result(DEADLOCK)
    assert all(f.cancelled() for f in queued)
    with pytest.raises((RuntimeError, BrokenContainerPool)):
        pool.submit(helpers.double, 1)
    wait_until(lambda: not runtime.blocks(), timeout=15, what="containers to go")


@pytest.mark.parametrize("how", ["terminate_workers", "kill_workers"])
def test_terminate_and_kill_workers(any_runtime, how):
    stop_workers(any_runtime, how)


def test_terminate_workers_without_an_init_in_the_container(runtime_of):
    """The stub is the container's pid 1, which the kernel spares a SIGTERM it has no handler for."""
    stop_workers(runtime_of("docker"), "terminate_workers", container_options={"init": False})


# --------------------------------------------------------------------------- safe defaults


def test_safe_defaults_are_applied(make_pool, engine, label):
    pool = make_pool()
    assert pool.submit(helpers.double, 1).result(DEADLOCK) == 2
    host = inspect_only_container(engine, label)["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["PidsLimit"] == 4096
    assert host["Init"] is True


def test_safe_defaults_can_be_overridden(make_pool, engine, label):
    pool = make_pool(container_options={"pids_limit": 64, "cap_drop": None, "security_opt": None})
    assert pool.submit(helpers.double, 1).result(DEADLOCK) == 2
    host = inspect_only_container(engine, label)["HostConfig"]
    assert host["PidsLimit"] == 64
    assert not host["CapDrop"] and not host["SecurityOpt"]


def test_read_only_root_filesystem_needs_only_a_writable_temp_dir(make_pool):
    pool = make_pool(container_options={"read_only": True, "tmpfs": {"/tmp": ""}, "user": "65534"})
    assert pool.submit(helpers.double, 21).result(DEADLOCK) == 42
    with pytest.raises(OSError, match="Read-only file system"):
        pool.submit(helpers.write_text, "/home/new.txt", "no").result(DEADLOCK)
    pool.submit(helpers.write_text, "/tmp/new.txt", "yes").result(DEADLOCK)
    assert pool.submit(helpers.read_text, "/tmp/new.txt").result(DEADLOCK) == "yes"


def test_read_only_root_filesystem_without_a_temp_dir_says_so(make_pool):
    pool = make_pool(container_options={"read_only": True})
    with pytest.raises(StartupError, match="temporary directory"):
        pool.submit(helpers.double, 1).result(DEADLOCK)


# --------------------------------------------------------------------------- the faults


def test_container_killed_from_outside_twenty_times(make_pool, engine, label):
    pool = make_pool()
    for _ in range(20):
        future = pool.submit(helpers.sleep_then, 60)
        wait_until(future.running, what="the task to start")
        wait_until(lambda: len(containers_labelled(engine, label)) == 1, what="one container")
        engine.api.kill(containers_labelled(engine, label)[0])
        with pytest.raises(WorkerLost, match="SIGKILL"):
            future.result(DEADLOCK)
        assert pool.submit(helpers.double, 3).result(DEADLOCK) == 6


def test_engine_stopping_mid_work_fails_futures_and_a_new_pool_works_after(second_engine, label):
    pool = ContainerPoolExecutor(APP1, blocks=2, engine=second_engine.url, label=label, ship=[HELPERS])
    running = [pool.submit(helpers.sleep_then, 60) for _ in range(2)]
    queued = [pool.submit(helpers.double, i) for i in range(5)]
    wait_until(lambda: all(f.running() for f in running), what="both tasks to start")
    second_engine.stop()
    _, not_done = cf.wait(running + queued, timeout=DEADLOCK)
    assert not not_done, "futures hang after the engine stopped"
    for future in running + queued:
        assert isinstance(future.exception(), (BrokenContainerPool, WorkerLost)), future.exception()
    started = time.monotonic()
    pool.shutdown()
    assert time.monotonic() - started < DEADLOCK

    second_engine.start()
    with ContainerPoolExecutor(APP1, engine=second_engine.url, label=label, ship=[HELPERS]) as again:
        assert again.submit(helpers.double, 5).result(DEADLOCK) == 10
    client = second_engine.client()
    try:
        wait_until(lambda: not containers_labelled(client, label), timeout=15, what="containers to go")
    finally:
        client.close()


def test_exit_while_blocks_are_still_starting_leaves_nothing(images, engine, label):
    process = start_script(
        f"""
        from minipool import ContainerPoolExecutor
        pool = ContainerPoolExecutor("app1_v0.1", blocks=4, label="{label}")
        """
    )
    _, err = process.communicate(timeout=DEADLOCK)
    assert process.returncode == 0, err
    assert not containers_labelled(engine, label)


def test_a_flood_of_output_keeps_the_channel_intact_and_memory_bounded(images, label):
    process = start_script(
        f"""
        import logging, resource
        from minipool import ContainerPoolExecutor
        import helpers

        class Count(logging.Handler):
            records = notes = 0
            def emit(self, record):
                Count.records += 1
                Count.notes += "truncated" in record.getMessage()

        logging.getLogger("minipool.worker").addHandler(Count())
        logging.getLogger("minipool.worker").setLevel(logging.INFO)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with ContainerPoolExecutor("app1_v0.1", label="{label}", ship=["{HELPERS}"]) as pool:
            assert pool.submit(helpers.flood, 100).result() == "intact"
            assert pool.submit(helpers.double, 2).result() == 4
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
        print(grown, Count.records, Count.notes)
        """
    )
    out, err = process.communicate(timeout=DEADLOCK * 3)
    assert process.returncode == 0, err
    grown_mb, records, notes = map(int, out.split())
    assert grown_mb < 100, f"the host grew by {grown_mb} MB for 200 MB of output"
    assert notes >= 1
    assert records < 5000, "the output was logged without limit"


@pytest.mark.parametrize(
    "corrupt, words", [(helpers.corrupt_channel, "bad frame magic"), (helpers.claim_absurd_length, "exceeds the limit")]
)
def test_a_corrupt_channel_is_a_protocol_error_and_the_block_is_replaced(any_runtime, corrupt, words):
    pool = any_runtime.pool()
    with pytest.raises(ProtocolError, match=words) as info:
        pool.submit(corrupt).result(DEADLOCK)
    assert re.match(f"{any_runtime.named()}: ", str(info.value))  # the message names the block
    assert pool.submit(helpers.double, 1).result(DEADLOCK) == 2


def test_max_message_size_fails_only_the_oversized_call_or_result(any_runtime):
    pool = any_runtime.pool(max_message_size=1 << 20)
    with pytest.raises(ValueError, match="max_message_size"):
        pool.submit(helpers.identity, b"x" * (2 << 20)).result(DEADLOCK)
    with pytest.raises(ValueError, match="max_message_size"):
        pool.submit(helpers.nbytes, 2 << 20).result(DEADLOCK)
    assert len(pool.submit(helpers.nbytes, 1 << 19).result(DEADLOCK)) == 1 << 19


def test_max_message_size_is_exact_for_a_call_and_a_result(any_runtime):
    limit = 1 << 20
    pool = any_runtime.pool(max_message_size=limit)

    def fits(error):
        # The error names the size the 2 MiB of bytes pickled to: what that adds to
        # them is the pickle's overhead, so `fits` bytes make exactly `limit`.
        return limit - (int(re.search(r"pickles to (\d+) bytes", str(error)).group(1)) - 2 * limit)

    with pytest.raises(ValueError, match="max_message_size") as info:
        pool.submit(len, bytes(2 * limit)).result(DEADLOCK)
    size = fits(info.value)
    assert pool.submit(len, bytes(size)).result(DEADLOCK) == size
    with pytest.raises(ValueError, match=f"pickles to {limit + 1} bytes, over max_message_size={limit}"):
        pool.submit(len, bytes(size + 1)).result(DEADLOCK)

    with pytest.raises(ValueError, match="max_message_size") as info:
        pool.submit(helpers.nbytes, 2 * limit).result(DEADLOCK)
    size = fits(info.value)
    assert len(pool.submit(helpers.nbytes, size).result(DEADLOCK)) == size
    with pytest.raises(ValueError, match=f"pickles to {limit + 1} bytes, over max_message_size={limit}"):
        pool.submit(helpers.nbytes, size + 1).result(DEADLOCK)


@pytest.mark.parametrize("shipped", ["the stub", "8 MB more"])
def test_an_image_that_speaks_garbage_fails_to_start(make_pool, tmp_path, shipped):
    """A command that is no stub reads none of what is sent: what it says must fail
    the start at once, however much waits to be sent (the stub and what is shipped)."""
    ballast = tmp_path / "ballast"
    ballast.write_bytes(b"x" * (8 << 20))
    ship = [HELPERS] + ([str(ballast)] if shipped == "8 MB more" else [])
    entrypoint = ["sh", "-c", "echo garbage garbage garbage; sleep 30"]
    pool = make_pool(ship=ship, container_options={"entrypoint": entrypoint})
    with pytest.raises(StartupError, match="bad frame magic"):
        pool.submit(helpers.double, 1).result(DEADLOCK)


def test_submitting_from_eight_threads_while_another_shuts_down(make_pool):
    pool = make_pool(blocks=2)
    helpers.wait_for_blocks(pool, 2)  # tasks run while others are submitted and cancelled
    accepted = {n: [] for n in range(8)}  # each thread's futures, in the order submitted
    refused = {}  # thread -> the number it could not submit

    def submitter(n):
        for i in range(1000):
            try:
                future = pool.submit(helpers.add, 1000 * n, i)
            except RuntimeError:
                refused[n] = i
                return
            accepted[n].append(future)

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: sum(map(len, accepted.values())) >= 2000, what="submissions under way")
    stopper = threading.Thread(target=pool.shutdown, kwargs={"cancel_futures": True})
    stopper.start()
    for thread in [*threads, stopper]:
        thread.join(DEADLOCK)
        assert not thread.is_alive(), "deadlock"
    everything = [f for futures in accepted.values() for f in futures]
    _, not_done = cf.wait(everything, timeout=DEADLOCK)
    assert not not_done
    for n, futures in accepted.items():
        # A thread stops at its first refusal; what it got in runs or is cancelled, in
        # queue order: nothing cancelled comes before a task that ran.
        assert refused.get(n, 1000) == len(futures)
        ran = [f for f in futures if not f.cancelled()]
        assert futures[: len(ran)] == ran, f"thread {n}: a task ran after one queued before it was cancelled"
        assert [f.result() for f in ran] == [1000 * n + i for i in range(len(ran))]


@pytest.mark.slow
def test_soak_50000_tasks_with_one_percent_killing_their_container(make_pool):
    """Five rounds of 10,000: every future ends, results match, memory stays flat."""

    def rss_mb():
        gc.collect()
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) // 1024

    pool = make_pool(blocks=4)
    rss = [rss_mb()]
    logging.getLogger("minipool").setLevel(logging.ERROR)  # 100 WorkerLost warnings a round are expected
    try:
        for round_start in range(0, 50_000, 10_000):
            numbers = range(round_start, round_start + 10_000)
            futures = [pool.submit(helpers.square_or_die, i) for i in numbers]
            _, not_done = cf.wait(futures, timeout=DEADLOCK * 5)
            assert not not_done
            lost = [i for i, f in zip(numbers, futures) if isinstance(f.exception(), WorkerLost)]
            assert lost == [i for i in numbers if i % 100 == 99]
            assert all(f.result() == i * i for i, f in zip(numbers, futures) if i % 100 != 99)
            del futures
            rss.append(rss_mb())
    finally:
        logging.getLogger("minipool").setLevel(logging.NOTSET)
    print(f"soak: host RSS (MB) at start and after each round of 10,000 tasks: {rss}")
    # The first rounds warm the allocator up; after them the host must not grow.
    assert max(rss[3:]) - rss[2] < 15, f"host memory grows round after round: {rss}"


def test_a_one_block_soak_loses_only_the_tasks_that_kill_their_container(make_pool):
    """The soak's fast twin. A function whose pace is quick is pipelined: when one of its
    tasks kills the container, others sent after it are in the stub's stdin; they never
    started and must run again, unharmed (the slow soak finds it otherwise)."""
    pool = make_pool()
    futures = [pool.submit(helpers.square_or_die, i) for i in range(450)]
    _, not_done = cf.wait(futures, timeout=DEADLOCK)
    assert not not_done
    lost = [i for i, f in enumerate(futures) if isinstance(f.exception(), WorkerLost)]
    assert lost == [99, 199, 299, 399]
    assert all(f.result() == i * i for i, f in enumerate(futures) if i % 100 != 99)


def test_results_held_when_a_task_kills_the_container_are_not_lost(make_pool, caplog):
    """One worker holds a finished task's result while the quick task sent after it
    runs. When that one kills the container, the held result is lost with it: neither
    task is charged, each runs again alone, and only the one that kills its
    container alone fails. What the held one writes is logged as the container's that
    ran it, each time."""
    caplog.set_level(logging.INFO, logger="minipool")
    pool = make_pool()
    # Until the crash takes a held result with it: the result may leave first (1 ms).
    for _ in range(5):
        # Both functions quick (again): the crash is pipelined behind the slow call.
        assert [pool.submit(helpers.say_where_then, 0, i).result() for i in range(30)] == list(range(30))
        assert [pool.submit(helpers.square_or_die, i).result() for i in range(30)] == [i * i for i in range(30)]
        held = pool.submit(helpers.say_where_then, 0.2, "held")
        crash = pool.submit(helpers.square_or_die, 99)
        with pytest.raises(WorkerLost):
            crash.result(DEADLOCK)
        assert held.result(DEADLOCK) == "held"
        if "died (exit code 137: killed by SIGKILL) with 2 quick tasks sent; each runs again" in caplog.text:
            break
    else:
        pytest.fail("the crash never took a held result with it")
    said = [record for record in caplog.records if hasattr(record, "container") and "where: " in record.getMessage()]
    assert said and all(record.getMessage() == f"{record.container}: where: {record.container}" for record in said)


def test_a_suspect_runs_alone_so_its_next_death_names_it(make_pool, caplog):
    """After a container dies with two quick tasks sent, each runs again alone: a task
    submitted meanwhile waits instead of joining the suspect in flight, so when the
    suspect kills its next container it alone is charged, and only one container dies
    with several tasks sent."""
    caplog.set_level(logging.INFO, logger="minipool")
    pool = make_pool()
    assert [pool.submit(helpers.exit_after, 0).result(DEADLOCK) for _ in range(30)] == [0] * 30  # pace: quick
    # Each kills its container after a second; the second is sent behind the first.
    first, second = pool.submit(helpers.exit_after, 1, 3), pool.submit(helpers.exit_after, 1, 3)
    with pytest.raises(WorkerLost, match="exit code 3"):
        first.result(DEADLOCK)  # run again alone, it died alone
    later = pool.submit(helpers.exit_after, 0)  # while `second`, the other suspect, waits or runs alone
    with pytest.raises(WorkerLost, match="exit code 3"):
        second.result(DEADLOCK)
    assert later.result(DEADLOCK) == 0
    assert caplog.text.count("quick tasks sent; each runs again alone") == 1, caplog.text


def test_tasks_queued_behind_a_crash_in_the_pipeline_run_unharmed(any_runtime):
    """Quick tasks are pipelined; when one kills its container, only it fails."""
    pool = any_runtime.pool()
    assert list(pool.map(helpers.double, range(300))) == [2 * i for i in range(300)]  # pace: fast
    futures = [pool.submit(helpers.double, i) for i in range(20)]
    killer = pool.submit(helpers.kill_self)
    futures += [pool.submit(helpers.double, i) for i in range(20, 40)]
    with pytest.raises(WorkerLost):
        killer.result(DEADLOCK)
    assert [f.result(DEADLOCK) for f in futures] == [2 * i for i in range(40)]
