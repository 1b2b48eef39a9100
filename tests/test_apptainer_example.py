"""examples/apptainer.py: the stub over a plain process's pipes, with this host's Python as
the command (no Apptainer here, and no engine needed)."""

import glob
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import minipool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "apptainer.py")

spec = importlib.util.spec_from_file_location("apptainer_example", EXAMPLE)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


def gone(pid):
    """True once no process has this pid (it exited and was reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_result_comes_back():
    with example.StubProcess() as worker:
        assert worker.ready["pid"] == worker.pid  # the bootstrap runs the stub in the process we started
        assert worker.call(divmod, 7, 2) == (3, 1)
        assert worker.call(int, "ff", base=16) == 255
        assert worker.call(os.getpid) == worker.pid


def test_a_task_that_raises_raises_and_the_worker_goes_on():
    with example.StubProcess() as worker:
        with pytest.raises(ZeroDivisionError) as info:
            worker.call(divmod, 1, 0)
        assert "ZeroDivisionError" in str(info.value.__cause__)  # the worker's traceback
        assert worker.call(abs, -2) == 2


def test_close_leaves_no_process_and_no_files():
    worker = example.StubProcess()
    assert glob.glob(os.path.join(worker.tmpdir, "minipool-*"))  # the bootstrap unpacked the stub there
    worker.close()
    assert worker.exit_code == 0
    assert gone(worker.pid)
    assert not os.path.exists(worker.tmpdir)


def test_close_lets_the_running_task_finish():
    worker = example.StubProcess()
    results = []
    caller = threading.Thread(target=lambda: results.append(worker.call(time.sleep, 0.5)))
    caller.start()
    time.sleep(0.1)
    worker.close()
    caller.join()
    assert results == [None]
    assert worker.exit_code == 0
    assert gone(worker.pid)


def test_a_process_killed_mid_task_is_a_clear_error():
    with example.StubProcess() as worker:
        threading.Timer(0.3, os.kill, (worker.pid, signal.SIGKILL)).start()
        started = time.monotonic()
        with pytest.raises(minipool.WorkerLost, match="killed by SIGKILL") as info:
            worker.call(time.sleep, 30)
        assert time.monotonic() - started < 5
        assert info.value.exit_code == 128 + signal.SIGKILL
        assert gone(worker.pid)
        with pytest.raises(minipool.WorkerLost, match="is gone"):
            worker.call(abs, -1)


def test_keepalives_carry_a_task_longer_than_the_silence(monkeypatch):
    # The stub's watcher looks about once a second, so `silence` must exceed a second plus
    # the keepalive interval (silence / 6); minipool uses 30 s.
    with example.StubProcess(silence=1.6) as kept:
        with monkeypatch.context() as patch:
            patch.setattr(example.StubProcess, "_keep_alive", lambda self, every: None)
            unkept = example.StubProcess(silence=1.6)
        with unkept, ThreadPoolExecutor(2) as threads:
            lasting = threads.submit(kept.call, time.sleep, 3.0)
            dropped = threads.submit(unkept.call, time.sleep, 3.0)
            assert lasting.result(timeout=10) is None
            # Without keepalives the stub gives up on the host: the test can fail.
            with pytest.raises(minipool.WorkerLost):
                dropped.result(timeout=10)
        assert kept.call(abs, -1) == 1


def test_a_command_that_is_not_python_is_a_startup_error():
    with pytest.raises(minipool.StartupError, match="exit code 1"):
        example.StubProcess(command=["false"])
    with pytest.raises(FileNotFoundError):
        example.StubProcess(command=["no-such-runtime", "exec", "app1.sif", "python3"])


def test_the_pool_gives_futures_and_replaces_a_dead_process():
    with example.StubPool(2) as pool:
        assert [f.result() for f in [pool.submit(pow, n, 2) for n in range(10)]] == [n * n for n in range(10)]
        assert list(pool.map(abs, [-1, -2, -3])) == [1, 2, 3]
        pids = {pool.submit(os.getpid).result() for _ in range(20)}
        with pytest.raises(minipool.WorkerLost, match="exit code 3"):
            pool.submit(os._exit, 3).result(timeout=10)
        assert [pool.submit(abs, -n).result(timeout=10) for n in range(4)] == [0, 1, 2, 3]
        pids |= {pool.submit(os.getpid).result() for _ in range(20)}
    assert all(gone(pid) for pid in pids)


@pytest.mark.parametrize(
    "command",
    [
        [],  # this host's Python, started in images/app1
        # As Shifter is used: its Python, with the image's directory on sys.path.
        ["--command", f"env PYTHONPATH={os.path.join(ROOT, 'images', 'app1')} {sys.executable}"],
    ],
)
def test_the_example_prints_the_seed_result(command, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, EXAMPLE, *command], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[2, 4, 6]\n"
    assert not os.listdir(tmp_path)  # the stubs' files are removed
