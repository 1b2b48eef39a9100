"""Shutdown and the caller's end: whatever way it goes, no container is left."""

import gc
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

import helpers
import minipool
from conftest import DEADLOCK
from conftest import ROOT
from conftest import assert_none_left
from conftest import containers_labelled
from conftest import left_by_a_dead_caller
from conftest import read_lines
from conftest import start_script
from conftest import wait_until
from minipool import ContainerPoolExecutor


def exit_codes(engine, label, since):
    """The exit codes of the label's containers that died since `since` (a time.time()), sorted."""
    events = engine.api.events(
        since=f"{since:.6f}", until=f"{time.time():.6f}", decode=True,
        filters={"type": "container", "event": "die", "label": f"minipool.label={label}"},
    )
    return sorted(int(event["Actor"]["Attributes"]["exitCode"]) for event in events)


def finish(process):
    try:
        out, err = process.communicate(timeout=DEADLOCK)
    except subprocess.TimeoutExpired:
        process.kill()  # not left running after the test
        process.communicate()
        raise
    return process.returncode, out, err


def test_idle_pool_shuts_down_quickly(make_pool, engine, label):
    pool = make_pool(blocks=4)
    # The first block starts alone; the others as soon as it is ready.
    hosts = set(pool.map(helpers.hostname_after, [0.5] * 8))
    wait_until(lambda: len(containers_labelled(engine, label)) == 4, what="4 containers")
    hosts |= set(pool.map(helpers.hostname_after, [0.5] * 4))
    assert len(hosts) == 4
    since = time.time()
    started = time.monotonic()
    pool.shutdown()
    elapsed = time.monotonic() - started
    assert not containers_labelled(engine, label), "shutdown(wait=True) returned before the containers were gone"
    # Quick because every stub exits by itself on STOP (code 0), none is killed (137)
    # after waiting out the grace: the exit codes say so, whatever the machine's load.
    assert exit_codes(engine, label, since) == [0] * 4
    assert elapsed < minipool._EXIT_GRACE, f"an idle 4-block pool took {elapsed:.2f} s to shut down"


def test_shutdown_without_wait_returns_at_once_and_cleans_up(make_pool, engine, label, tmp_path):
    pool = make_pool(volumes={str(tmp_path): {"bind": "/shared", "mode": "rw"}})
    future = pool.submit(helpers.wait_for_file, "/shared/gate", "done")
    try:
        wait_until(future.running, what="the task to start")
        pool.shutdown(wait=False)
        # The task waits for the gate: a shutdown that waited for it would not be back.
        assert not future.done()
    finally:
        (tmp_path / "gate").touch()
    assert future.result(DEADLOCK) == "done"
    wait_until(lambda: not containers_labelled(engine, label), timeout=15, what="containers to go")


def test_shutdown_from_a_done_callback_does_not_wait_for_itself(make_pool, engine, label):
    pool = make_pool()
    returned = threading.Event()

    def stop(future):
        pool.shutdown(wait=True)
        returned.set()

    pool.submit(helpers.double, 1).add_done_callback(stop)
    # Waiting for its own thread, it would never return.
    assert returned.wait(DEADLOCK), "shutdown(wait=True) in a callback waited for its own thread"
    wait_until(lambda: not containers_labelled(engine, label), timeout=15, what="containers to go")


def test_a_forgotten_executor_shuts_itself_down(images, engine, label):
    pool = ContainerPoolExecutor("app1_v0.1", label=label)
    assert pool.submit(abs, -3).result(DEADLOCK) == 3
    del pool
    gc.collect()
    wait_until(lambda: not containers_labelled(engine, label), timeout=15, what="containers to go")


def test_interpreter_exit_finishes_work_and_cleans_up(images, engine, label):
    process = start_script(
        f"""
        import time
        from minipool import ContainerPoolExecutor
        pool = ContainerPoolExecutor("app1_v0.1", blocks=2, label="{label}")
        future = pool.submit(time.sleep, 0.5)
        future.add_done_callback(lambda f: print("finished", f.exception(), flush=True))
        """
    )
    code, out, err = finish(process)
    assert code == 0, err
    assert out == "finished None\n"
    assert not containers_labelled(engine, label)


def test_raising_out_of_a_with_block_cleans_up(images, engine, label):
    process = start_script(
        f"""
        from minipool import ContainerPoolExecutor
        with ContainerPoolExecutor("app1_v0.1", blocks=2, label="{label}") as pool:
            pool.submit(abs, 1).result()
            raise SystemExit(3)
        """
    )
    code, _, err = finish(process)
    assert code == 3, err
    assert not containers_labelled(engine, label)


def test_caller_killed_while_tasks_run_leaves_no_container(images, engine, label):
    process = start_script(
        f"""
        import time
        from minipool import ContainerPoolExecutor
        pool = ContainerPoolExecutor("app1_v0.1", blocks=4, label="{label}")
        futures = [pool.submit(time.sleep, 60) for _ in range(4)]
        while not all(f.running() for f in futures):
            time.sleep(0.05)
        print("running", flush=True)
        time.sleep(60)
        """
    )
    assert process.stdout.readline() == "running\n", process.stderr.read()
    assert len(containers_labelled(engine, label)) == 4
    process.send_signal(signal.SIGKILL)
    finish(process)
    wait_until(lambda: not containers_labelled(engine, label), timeout=10, what="containers of a killed caller to go")


def test_a_leak_fails_the_test_and_is_removed(engine, images, label, own_host):
    """The label fixture's check: a container left behind fails the test, and is
    removed first, not left for the tests after it."""
    left_by_a_dead_caller(engine, label, own_host)
    with pytest.raises(AssertionError, match="containers left behind"):
        assert_none_left(engine, label, timeout=0.2)
    assert not containers_labelled(engine, label)


def test_a_container_left_in_created_by_a_dead_caller_is_swept_by_the_next_pool(any_engine, images, label, own_host):
    """A caller killed between create and start leaves a Created container behind:
    the next pool on the engine from this host removes it (on Podman too, where
    keepalives cannot help: a Created container runs nothing)."""
    client, url, options = any_engine
    left_by_a_dead_caller(client, label, own_host)
    assert len(containers_labelled(client, label)) == 1
    with ContainerPoolExecutor("app1_v0.1", engine=url, container_options=options, label=label + "-next") as pool:
        assert pool.submit(abs, -1).result(DEADLOCK) == 1
    assert not containers_labelled(client, label)


def test_a_forked_child_does_not_keep_containers_alive(images, engine, label):
    process = start_script(
        f"""
        import gc, multiprocessing, os, signal, time
        from minipool import ContainerPoolExecutor
        gc.disable()  # no collection may close docker-py's reference cycles for us
        pool = ContainerPoolExecutor("app1_v0.1", label="{label}")
        pool.submit(abs, 1).result()
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        print(child.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    child = int(process.stdout.readline())
    try:
        process.wait(DEADLOCK)  # not communicate(): the child holds the pipes open
        wait_until(lambda: not containers_labelled(engine, label), timeout=10, what="containers to go")
    finally:
        os.kill(child, signal.SIGKILL)
        process.stdout.close()
        process.stderr.close()


def test_vendored_copies_work(images, engine, label, tmp_path):
    """Copy the two files onto sys.path, or into a package, and use them from there."""
    for folder in (tmp_path / "flat", tmp_path / "app" / "vendor"):
        folder.mkdir(parents=True)
        for name in ("minipool.py", "worker_stub.py"):
            shutil.copy(os.path.join(ROOT, name), folder / name)
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "app" / "vendor" / "__init__.py").write_text("")
    for importer, path in [("import minipool", tmp_path / "flat"), ("from app.vendor import minipool", tmp_path)]:
        process = start_script(
            f"""
            {importer}
            assert minipool.__file__.startswith({str(tmp_path)!r}), minipool.__file__
            with minipool.ContainerPoolExecutor("app1_v0.1", label="{label}") as pool:
                print(pool.submit(lambda x: x * 3, 7).result())
            """,
            env_path=(str(path),),
            cwd=tmp_path,
        )
        code, out, err = finish(process)
        assert (code, out) == (0, "21\n"), err


def test_without_cloudpickle_importables_work_and_main_code_says_why_not(images, engine, label):
    process = start_script(
        f"""
        import sys
        sys.modules["cloudpickle"] = None  # as if it were not installed
        from minipool import ContainerPoolExecutor

        def from_main():
            return 1

        with ContainerPoolExecutor("app1_v0.1", label="{label}") as pool:
            print(pool.submit(pow, 2, 5).result())
            print(pool.submit(from_main).exception())
        """
    )
    code, out, err = finish(process)
    assert code == 0, err
    first, second = out.splitlines()
    assert first == "32"
    assert "pip install cloudpickle" in second and "from_main" in second


# A caller that a Ctrl-C ends, either inside `with` or with the pool left to interpreter exit.
INTERRUPTED = """
import time
import helpers
from minipool import ContainerPoolExecutor

def tell(future):
    print("cancelled" if future.cancelled() else f"ended {{future.exception()!r}}", flush=True)

pool = ContainerPoolExecutor("app1_v0.1", label="{label}", ship=["{helpers}"])
running = pool.submit(helpers.sleep_then, {seconds}, "ran")
queued = [pool.submit(helpers.double, i) for i in range(3)]
for future in [running, *queued]:
    future.add_done_callback(tell)
while not running.running():
    time.sleep(0.01)
print("running", flush=True)
{rest}
"""
ENDS = {"with": "with pool:\n    time.sleep(600)", "exit": "time.sleep(600)"}


@pytest.mark.parametrize("ends", ENDS)
def test_a_ctrl_c_cancels_queued_work_and_waits_for_running_tasks(images, engine, label, ends):
    process = start_script(INTERRUPTED.format(label=label, helpers=helpers.__file__, seconds=2, rest=ENDS[ends]))
    assert read_lines(process, 1) == ["running\n"]
    process.send_signal(signal.SIGINT)
    code, out, err = finish(process)
    assert out.splitlines() == ["cancelled"] * 3 + ["ended None"], err
    assert code == -signal.SIGINT and "KeyboardInterrupt" in err
    assert not containers_labelled(engine, label)


@pytest.mark.parametrize("ends", ENDS)
def test_a_second_ctrl_c_kills_the_containers(images, engine, label, ends):
    process = start_script(INTERRUPTED.format(label=label, helpers=helpers.__file__, seconds=600, rest=ENDS[ends]))
    assert read_lines(process, 1) == ["running\n"]
    process.send_signal(signal.SIGINT)
    assert read_lines(process, 3) == ["cancelled\n"] * 3, "queued work was not cancelled"
    process.send_signal(signal.SIGINT)  # while it waits for the running task
    _, out, err = finish(process)  # the task would run for ten minutes
    killed = "ended BrokenContainerPool(\"the pool's containers were stopped with SIGKILL by a Ctrl-C"
    assert out.startswith(killed), err
    assert not containers_labelled(engine, label)



# Every line of what submit() runs gets a real SIGINT in turn (raised as the line
# starts; its handler runs a bytecode or so later). After each, the pool must be whole:
# the next task runs; a task whose submit was cut never reached the pool, was
# cancelled, or runs to its end; nothing is logged; and the pool shuts down at once.
CTRL_C_IN_SUBMIT = """
import dis, logging, signal, sys, threading
import helpers, minipool
from minipool import ContainerPoolExecutor

logging.basicConfig(level=logging.ERROR)  # a reader's ProtocolError, a block that failed
OPTIONS = dict(ship=[helpers.__file__], label={label!r}, channel={channel!r})
executor, pool = ContainerPoolExecutor, minipool._Pool

# Each line of each function, and the return of a Condition's __enter__, its lock just
# taken (a `with` whose __enter__ is Python code may take the lock, then raise).
def lines(*functions):
    ours = [(f, line) for f in functions for line in sorted({{n for _, n in dis.findlinestarts(f.__code__) if n}})]
    return ours + [(threading.Condition.__enter__, "return")]

# submit() with a real SIGINT raised as that line of the function starts (or for "return",
# as it returns): 1 if it raised KeyboardInterrupt, 0 if no SIGINT was raised.
def ctrl_c_at(function, line, submit):
    fired = []
    def reached(frame, event):
        return event == "return" if line == "return" else event == "line" and frame.f_lineno == line
    def trace_lines(frame, event, arg):
        if reached(frame, event) and not fired:
            fired.append(line)
            signal.raise_signal(signal.SIGINT)
        return trace_lines
    sys.settrace(lambda frame, event, arg: trace_lines if frame.f_code is function.__code__ else None)
    try:
        submit()
    except KeyboardInterrupt:
        return 1
    finally:
        sys.settrace(None)
    assert not fired, f"a Ctrl-C at line {{line}} of {{function.__qualname__}} was lost"
    return 0

def check(executor, n):
    assert executor.submit(helpers.double, n).result(30) == 2 * n, n

ours = [getattr(owner, name) for owner, name in [
    (executor, "_submit"), (executor, "_take"), (executor, "_call_app"), (pool, "submit"), (pool, "_send_at_once"),
    (pool, "withdraw"), (pool, "check_open"), (pool, "_scale_up"), (pool, "_assign"), (pool, "_send"),
    (minipool._Container, "send_tasks"), (minipool._Results, "claim"),
    (getattr(minipool, "_CtrlCWaits", None), "__enter__"), (getattr(minipool, "_CtrlCWaits", None), "__exit__"),
] if hasattr(owner, name)]
fired, kept = 0, []
with ContainerPoolExecutor("app1_v0.1", blocks=1, workers_per_block=2, **OPTIONS) as idle:
    # A task runs on the other worker meanwhile: none may fail for what a Ctrl-C cut.
    other = idle.submit(helpers.sleep_then, 10, "other")
    for n, (function, line) in enumerate(lines(*ours), 1):  # an idle worker: submit sends the task itself
        fired += ctrl_c_at(function, line, lambda: kept.append(idle.submit(helpers.double, n)))
        check(idle, n)
    for n, (function, line) in enumerate(lines(*ours), 1):  # the task waits in the queue
        kept.append(idle.submit(helpers.sleep_then, 0.05, n))
        fired += ctrl_c_at(function, line, lambda: kept.append(idle.submit(helpers.double, n)))
        check(idle, n)
        # Too large to be sent by submit itself: queued, even for an idle worker.
        fired += ctrl_c_at(function, line, lambda: kept.append(idle.submit(helpers.identity, bytes(1 << 17))))
        check(idle, n)
    app = idle.app(cache=True)(helpers.double)
    for n, (function, line) in enumerate(lines(*ours), 1):
        fired += ctrl_c_at(function, line, lambda: kept.append(app(n)))
        assert app(n).result(30) == 2 * n, (function, line)  # an identical call: it shares that one's future
        fired += ctrl_c_at(function, line, lambda: kept.append(app(idle.submit(helpers.double, -n))))
    for future in kept:
        assert future.cancelled() or future.exception(30) is None, future
    assert other.result(30) == "other"
for n, (function, line) in enumerate(lines(pool._add_block, *ours[-2:]), 1):  # a block is added
    with ContainerPoolExecutor("app1_v0.1", blocks=0, **OPTIONS) as scaling:
        kept = []
        fired += ctrl_c_at(function, line, lambda: kept.append(scaling.submit(helpers.double, n)))
        check(scaling, n)
        assert not kept or kept[0].cancelled() or kept[0].result(30) == 2 * n
print("fired", fired, flush=True)
"""


@pytest.mark.parametrize("channel", ["auto", "attach"])
def test_a_ctrl_c_anywhere_in_submit_leaves_the_pool_whole(images, label, channel):
    code, out, err = finish(start_script(CTRL_C_IN_SUBMIT.format(label=label, channel=channel)))
    assert code == 0 and out.startswith("fired"), err
    assert int(out.split()[1]) > 100, out  # the SIGINTs were raised
    assert not err  # nothing logged
