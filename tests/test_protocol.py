"""The wire protocol and the stub over plain subprocess pipes: no engine needed."""

import fcntl
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

import helpers
import worker_stub as stub
from conftest import DEADLOCK
from conftest import wait_until

STUB = stub.__file__
TESTS = os.path.dirname(os.path.abspath(__file__))
HELLO = {"cloudpickle": True, "max_message_size": 1 << 30, "workers": 1, "silence": 30}


class Stub:
    """worker_stub.py in a subprocess, spoken to as the host would."""

    def __init__(self, hello=None, hold_seconds=None):
        env = {**os.environ, "PYTHONPATH": TESTS}
        command = [sys.executable, STUB]
        if hold_seconds is not None:  # the stub's HOLD_SECONDS, for a test that must not race it
            command[1:] = ["-c", f"import worker_stub; worker_stub.HOLD_SECONDS = {hold_seconds}; worker_stub.start()"]
            env["PYTHONPATH"] += os.pathsep + os.path.dirname(STUB)
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.writev = lambda views: self.process.stdin.write(b"".join(views))
        hello = hello or {**HELLO, "python": list(sys.version_info[:2])}
        self.send(stub.HELLO, 0, pickle.dumps(hello, stub.PLAIN_PROTOCOL))
        kind, _, payload = self.receive()
        assert kind == stub.READY
        self.ready = pickle.loads(payload)

    def send(self, kind, task_id, payload):
        stub.write_message(self.writev, kind, task_id, [payload])
        self.process.stdin.flush()

    def receive(self):
        return stub.read_message(self.process.stdout.readinto, 1 << 30)

    def call(self, task_id, fn, *args, **kwargs):
        self.send(stub.CALL, task_id, pickle.dumps((fn, args, kwargs), protocol=stub.PICKLE_PROTOCOL))

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=10)
        self.process.stdout.close()
        stderr = self.process.stderr.read().decode()
        self.process.stderr.close()
        return stderr


@pytest.fixture
def worker():
    process = Stub()
    yield process
    if process.process.poll() is None:
        process.process.kill()
        process.close()


def test_header_round_trip():
    header = stub.pack_header(stub.CALL, 7, 1234)
    assert stub.unpack_header(header) == (stub.CALL, 7, 1234)


@pytest.mark.parametrize(
    "header, complaint",
    [
        (b"XX" + stub.pack_header(stub.CALL, 1, 1)[2:], "magic"),
        (stub.HEADER.pack(stub.MAGIC, stub.VERSION + 1, stub.CALL, 1, 1), "version"),
    ],
    ids=["magic", "version"],
)
def test_foreign_header_is_refused(header, complaint):
    with pytest.raises(ValueError, match=complaint):
        stub.unpack_header(header)


def test_claimed_length_over_the_limit_is_not_allocated():
    data = stub.pack_header(stub.RESULT, 1, 1 << 60)
    with pytest.raises(ValueError, match="exceeds the limit"):
        stub.read_message(_reader(data), 1 << 20)


def test_truncated_message_is_eof():
    data = stub.pack_header(stub.RESULT, 1, 10) + b"abc"
    with pytest.raises(EOFError):
        stub.read_message(_reader(data), 1 << 20)


def test_large_buffers_are_pickled_by_reference_not_copied():
    data = b"x" * (1 << 20)
    parts = stub.pickle_parts(pickle.Pickler, (len, (data,), {}))
    assert any(part is data for part in parts)
    assert pickle.loads(b"".join(parts)) == (len, (data,), {})


def test_pickle_buffers_travel_as_flat_bytes():
    """A large PickleBuffer (what a NumPy array pickles as) reaches the writer whole:
    it is sent as plain bytes."""
    value = pickle.PickleBuffer(bytearray(b"x" * (1 << 20)))
    parts = stub.pickle_parts(pickle.Pickler, value)
    assert not any(isinstance(part, pickle.PickleBuffer) for part in parts)
    written = bytearray()

    def writev(views):
        written.extend(b"".join(views))
        return sum(view.nbytes for view in views)

    stub.send_parts(writev, parts)
    assert pickle.loads(written) == bytearray(b"x" * (1 << 20))


def test_send_parts_survives_partial_writes():
    written = bytearray()

    def writev(views):  # accepts at most 3 bytes a call, like a full pipe
        data = b"".join(bytes(view) for view in views)[:3]
        written.extend(data)
        return len(data)

    stub.send_parts(writev, [b"abcd", b"", b"efghij", b"k"])
    assert written == b"abcdefghijk"


def _reader(data):
    view = memoryview(data)

    def readinto(buffer):
        nonlocal view
        count = min(len(buffer), len(view))
        buffer[:count] = view[:count]
        view = view[count:]
        return count

    return readinto


def test_bootstrap_unpacks_the_worker_into_a_temporary_directory(tmp_path):
    """`python -c BOOTSTRAP`, as in a container: the stub arrives over stdin."""
    import minipool

    # Its temporary directory goes under tmp_path, not the host's /tmp (issue 13).
    process = subprocess.Popen(
        [sys.executable, "-c", stub.BOOTSTRAP], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    writev = lambda views: process.stdin.write(b"".join(views))  # noqa: E731
    stub.write_message(writev, stub.BOOT, 0, [minipool._stub_archive([os.path.join(TESTS, "helpers.py")])])
    hello = {**HELLO, "python": [3, 0]}
    stub.write_message(writev, stub.HELLO, 0, [pickle.dumps(hello, stub.PLAIN_PROTOCOL)])
    stub.write_message(writev, stub.CALL, 1, [pickle.dumps((helpers.where, (), {}))])
    process.stdin.flush()
    assert stub.read_message(process.stdout.readinto, 1 << 20)[0] == stub.READY
    kind, _, payload = stub.read_message(process.stdout.readinto, 1 << 20)
    cwd, path = pickle.loads(payload)
    assert kind == stub.RESULT and cwd == os.getcwd()
    assert path[0].endswith("/ship") and path[1].endswith("/lib") and path[0].startswith(f"{tmp_path}/minipool-")
    process.stdin.close()
    assert process.wait(10) == 0
    process.stdout.close()
    process.stderr.close()


def _boot_files(archive):
    """BOOT's payload as {path: bytes}, in order."""
    files, at = {}, 0
    while at < len(archive):
        name_size, size = stub.BOOT_FILE.unpack_from(archive, at)
        at += stub.BOOT_FILE.size
        name = archive[at : at + name_size].decode()
        files[name] = archive[at + name_size : at + name_size + size]
        at += name_size + size
    return files


@pytest.mark.parametrize("python", ["the host's", "another"])
def test_bootstrap_imports_the_stub_from_the_hosts_bytecode(tmp_path, python):
    """With the host's Python the stub is not compiled (its source may be anything);
    with another, the bytecode is ignored and the source compiled. Either way a
    traceback names the file where it ran."""
    import importlib.util

    import minipool

    files = _boot_files(minipool._stub_archive([os.path.join(TESTS, "helpers.py")]))
    cached = importlib.util.cache_from_source("worker_stub.py")
    if python == "the host's":
        files["worker_stub.py"] = b"raise SystemExit('the source was compiled')\n"
    else:
        files[cached] = b"\0\0\0\0" + files[cached][4:]  # another version's magic number
    process = subprocess.Popen(
        [sys.executable, "-c", stub.BOOTSTRAP], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    writev = lambda views: process.stdin.write(b"".join(views))  # noqa: E731
    stub.write_message(writev, stub.BOOT, 0, [b"".join(minipool._boot_file(*file) for file in files.items())])
    hello = {**HELLO, "python": list(sys.version_info[:2])}
    stub.write_message(writev, stub.HELLO, 0, [pickle.dumps(hello, stub.PLAIN_PROTOCOL)])
    stub.write_message(writev, stub.CALL, 1, [pickle.dumps((helpers.raise_value_error, ("boom",), {}))])
    process.stdin.flush()
    try:
        assert stub.read_message(process.stdout.readinto, 1 << 20)[0] == stub.READY
        kind, _, payload = stub.read_message(process.stdout.readinto, 1 << 20)
        assert kind == stub.RAISED
        assert f'File "{tmp_path}/minipool-' in pickle.loads(payload)[2]
        process.stdin.close()
        assert process.wait(10) == 0
    finally:
        process.stdout.close()
        process.stderr.close()


def _boots(archive, tmp_path):
    """Whether `python -c BOOTSTRAP` answers HELLO with READY when sent `archive`."""
    process = subprocess.Popen(
        [sys.executable, "-c", stub.BOOTSTRAP], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    writev = lambda views: process.stdin.write(b"".join(views))  # noqa: E731
    stub.write_message(writev, stub.BOOT, 0, [archive])
    hello = {**HELLO, "python": list(sys.version_info[:2])}
    stub.write_message(writev, stub.HELLO, 0, [pickle.dumps(hello, stub.PLAIN_PROTOCOL)])
    process.stdin.close()
    try:
        return stub.read_message(process.stdout.readinto, 1 << 20)[0] == stub.READY
    except EOFError:
        return False
    finally:
        process.wait(10)
        process.stdout.close()
        process.stderr.close()


def test_shipped_code_this_python_cannot_compile_goes_as_source(tmp_path):
    """Shipped code may be for the image's newer Python: no bytecode for it."""
    import minipool

    package = tmp_path / "newer"
    package.mkdir()
    (package / "syntax.py").write_text("type Alias = int  # Python 3.12\n")
    archive = minipool._stub_archive([str(package)])
    assert set(_boot_files(archive)) >= {"ship/newer/syntax.py"}
    assert not any(name.startswith("ship/newer/__pycache__/") for name in _boot_files(archive))
    assert _boots(archive, tmp_path)


def test_a_pycache_prefix_on_the_host_changes_nothing_in_the_archive(tmp_path, monkeypatch):
    import minipool

    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "pycache"))
    archive = minipool._stub_archive([])
    assert f"__pycache__/worker_stub.{sys.implementation.cache_tag}.pyc" in _boot_files(archive)
    assert _boots(archive, tmp_path)


def test_a_full_backlog_makes_the_stub_give_up_the_socket_not_hang(tmp_path, monkeypatch):
    """Anyone on the host can fill a socket's backlog: the stub says why it cannot
    connect (in READY), and the host keeps the attach stream."""
    monkeypatch.setattr(stub, "CONNECT_TIMEOUT", 0.5)
    path = str(tmp_path / "full.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    squatters = []
    try:
        while True:  # until the backlog is full: connect would block
            squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            squatter.setblocking(False)
            squatters.append(squatter)
            try:
                squatter.connect(path)
            except BlockingIOError:
                break
        started = time.monotonic()
        direct, why = stub.connect(path, b"secret")
        assert direct is None and why.startswith(f"cannot connect to {path}")  # EAGAIN, or timed out
        assert time.monotonic() - started < 5
    finally:
        for squatter in squatters:
            squatter.close()
        listener.close()


def test_bootstrap_refuses_anything_but_the_archive():
    process = subprocess.run(
        [sys.executable, "-c", stub.BOOTSTRAP], input=stub.pack_header(stub.HELLO, 0, 0), capture_output=True
    )
    assert process.returncode == 1
    assert b"expected the worker archive" in process.stderr


def test_handshake_reports_python_and_pickle(worker):
    assert worker.ready["python"][:2] == list(sys.version_info[:2])
    assert worker.ready["pickle_protocol"] >= stub.PICKLE_PROTOCOL
    assert worker.ready["pid"] == worker.process.pid


def test_call_and_chunk(worker):
    worker.call(1, helpers.add, 2, b=3)
    assert _reply(worker) == (stub.RESULT, 1, 5)
    worker.send(stub.CHUNK, 2, pickle.dumps((helpers.add, [(1, 2), (3, 4)])))
    assert _reply(worker) == (stub.RESULT, 2, [3, 7])


def test_exception_travels_with_its_traceback(worker):
    worker.call(3, helpers.raise_value_error, "boom")
    kind, task_id, payload = worker.receive()
    name, message, text, pickled = pickle.loads(payload)
    assert (kind, task_id, name, message) == (stub.RAISED, 3, "builtins.ValueError", "boom")
    assert "raise_value_error" in text
    assert isinstance(pickle.loads(pickled), ValueError)


def test_unpicklable_result_fails_only_its_task(worker):
    worker.call(4, helpers.unpicklable_result)
    kind, _, payload = worker.receive()
    assert kind == stub.RAISED
    assert "cannot pickle the result of type lock" in pickle.loads(payload)[1]
    worker.call(5, helpers.double, 21)
    assert _reply(worker) == (stub.RESULT, 5, 42)


def _output_then_reply(worker):
    """The OUTPUT and DROPPED messages before the next reply, and the reply."""
    messages = []
    while (message := worker.receive())[0] in (stub.OUTPUT, stub.DROPPED):
        messages.append(message)
    kind, task_id, payload = message
    return messages, (kind, task_id, pickle.loads(payload))


def test_task_output_travels_as_output_messages_before_the_result(worker):
    worker.call(6, helpers.noisy, "clean")
    messages, reply = _output_then_reply(worker)
    assert reply == (stub.RESULT, 6, "clean")
    assert {(kind, task_id) for kind, task_id, _ in messages} == {(stub.OUTPUT, 6)}
    assert b"".join(payload for *_, payload in messages) == b"noise from print\nnoise from fd 1\nnoise on stderr\n"
    assert "noise" not in worker.close()


def test_a_task_that_closes_its_output_leaves_the_stub_working(worker):
    worker.call(8, helpers.close_output)
    assert _output_then_reply(worker)[1] == (stub.RESULT, 8, "closed")
    worker.call(9, helpers.double, 4)
    assert _output_then_reply(worker)[1] == (stub.RESULT, 9, 8)


def test_a_task_that_closes_sys_stdout_leaves_the_stub_working(worker):
    worker.call(8, helpers.close_stdout)
    assert _output_then_reply(worker)[1] == (stub.RESULT, 8, "closed")
    worker.call(9, helpers.noisy, "heard")
    messages, reply = _output_then_reply(worker)
    assert reply == (stub.RESULT, 9, "heard")
    assert b"".join(payload for *_, payload in messages) == b"noise from print\nnoise from fd 1\nnoise on stderr\n"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_forked_child_of_a_task_never_speaks_the_protocol(workers):
    worker = Stub({**HELLO, "python": list(sys.version_info[:2]), "workers": workers})
    worker.call(1, helpers.fork_a_child_that_exits)
    kind, task_id, (_, child_exit) = _reply(worker)
    assert (kind, task_id, child_exit) == (stub.RESULT, 1, 0)
    worker.send(stub.STOP, 0, b"")
    assert worker.process.wait(timeout=10) == 0
    assert worker.process.stdout.read() == b"", "more than the one answer"
    worker.close()


def test_an_exception_over_max_message_size_keeps_its_type_and_the_channel():
    worker = Stub({**HELLO, "python": list(sys.version_info[:2]), "max_message_size": 1 << 16})
    try:
        worker.call(1, helpers.raise_huge, 1 << 20)
        kind, task_id, payload = worker.receive()
        assert (kind, task_id) == (stub.RAISED, 1) and len(payload) <= 1 << 16
        name, message, text, pickled = pickle.loads(payload)
        assert name == "builtins.ValueError" and "truncated" in message and "raise_huge" in text
        assert isinstance(pickle.loads(pickled), ValueError)
        worker.call(2, helpers.double, 2)
        assert _reply(worker) == (stub.RESULT, 2, 4)
    finally:
        worker.process.kill()
        worker.close()


def test_output_past_the_limit_is_counted_not_sent(worker):
    worker.call(7, helpers.flood, 2)  # 4 MiB
    messages, reply = _output_then_reply(worker)
    assert reply == (stub.RESULT, 7, "intact")
    sent = sum(len(payload) for kind, _, payload in messages if kind == stub.OUTPUT)
    assert sent == stub.OUTPUT_LIMIT
    assert messages[-1][:2] == (stub.DROPPED, 7)
    assert pickle.loads(messages[-1][2]) == {"bytes": (4 << 20) - stub.OUTPUT_LIMIT}


def test_closed_stdin_ends_the_stub_while_a_task_runs(worker):
    worker.call(7, helpers.announce_then, time.sleep, 60)
    assert worker.receive()[:2] == (stub.OUTPUT, 7)  # the task has started
    started = time.monotonic()
    worker.close()
    assert worker.process.returncode == 0
    assert time.monotonic() - started < 5


def test_garbage_ends_the_stub_with_a_message(worker):
    worker.process.stdin.write(b"garbage that is no header!")
    worker.process.stdin.flush()
    worker.process.wait(timeout=10)
    assert "bad frame magic" in worker.close()


def test_version_mismatch_is_named_when_unpickling_fails():
    other = [sys.version_info[0], sys.version_info[1] + 1]
    worker = Stub({**HELLO, "python": other, "cloudpickle": False})
    try:
        worker.send(stub.CALL, 1, b"not a pickle")
        _, message, _, _ = pickle.loads(worker.receive()[2])
        assert "same Python minor version" in message
    finally:
        worker.process.send_signal(signal.SIGKILL)
        worker.close()


def test_keepalives_are_skipped_between_and_during_tasks(worker):
    worker.call(1, helpers.sleep_then, 0.5, "slow")
    for _ in range(3):
        worker.send(stub.KEEPALIVE, 0, b"")
        time.sleep(0.05)
    worker.call(2, helpers.double, 2)
    assert [_reply(worker), _reply(worker)] == [(stub.RESULT, 1, "slow"), (stub.RESULT, 2, 4)]


def _unread(pipe):
    """Bytes waiting in the pipe."""
    return struct.unpack("i", fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def _calls(*calls):
    """CALL messages for (task id, fn, *args), as the bytes of one write."""
    messages = []
    for task_id, fn, *args in calls:
        payload = pickle.dumps((fn, tuple(args), {}), protocol=stub.PICKLE_PROTOCOL)
        messages += [stub.pack_header(stub.CALL, task_id, len(payload)), payload]
    return b"".join(messages)


def _come_back_in_one_write(worker, task_ids):
    """Send quick tasks together; assert that their results come back in one write."""
    os.write(worker.process.stdin.fileno(), _calls(*[(task_id, helpers.double, task_id) for task_id in task_ids]))
    written = _reader(os.read(worker.process.stdout.fileno(), 1 << 16))  # the stub's first write, whole
    try:
        replies = [stub.read_message(written, 1 << 16) for _ in task_ids]
    except EOFError:
        raise AssertionError(f"the results of tasks {task_ids} came back in more than one write") from None
    assert [(kind, task_id, pickle.loads(payload)) for kind, task_id, payload in replies] == [
        (stub.RESULT, task_id, 2 * task_id) for task_id in task_ids
    ]


def test_the_results_of_tasks_sent_together_come_back_in_one_write():
    """Held until the stub would wait for the host (a minute's HOLD_SECONDS: no race with it)."""
    worker = Stub(hold_seconds=60)
    try:
        _come_back_in_one_write(worker, [1, 2, 3])
    finally:
        worker.close()


def test_results_are_still_held_together_after_many_have_left():
    """Only what is held counts against HOLD_BYTES, not what left before: after twice
    HOLD_BYTES of results, quick tasks' results still leave in one write."""
    worker = Stub(hold_seconds=60)
    try:
        many = range(1, 2 * stub.HOLD_BYTES // 1000)  # results of 1000 bytes
        os.write(worker.process.stdin.fileno(), _calls(*[(task_id, helpers.nbytes, 1000) for task_id in many]))
        # Each read whole: none of their bytes is left in stdout's buffer, beside the raw read.
        assert [_reply(worker)[:2] for _ in many] == [(stub.RESULT, task_id) for task_id in many]
        _come_back_in_one_write(worker, [many[-1] + 1, many[-1] + 2, many[-1] + 3])
    finally:
        worker.close()


def test_a_host_that_reads_slowly_but_keeps_talking_keeps_its_stub():
    """Its reader stalls (a slow done callback, say) longer than `silence` while a
    held result waits for a full pipe; its keepalives still count."""
    worker = Stub({**HELLO, "python": list(sys.version_info[:2]), "silence": 1})
    try:
        os.write(worker.process.stdin.fileno(), _calls((1, helpers.nbytes, 50_000)))
        wait_until(lambda: _unread(worker.process.stdout) > 50_000, what="the first result in the pipe")
        calls = _calls((2, helpers.nbytes, 30_000), (3, helpers.sleep_then, 1.5, 3))  # 2's result is held
        os.write(worker.process.stdin.fileno(), calls)
        for _ in range(12):  # 2.4 s of keepalives, the stub's stdout unread
            worker.send(stub.KEEPALIVE, 0, b"")
            time.sleep(0.2)
        assert [_reply(worker)[2] for _ in range(3)] == [b"x" * 50_000, b"x" * 30_000, 3]
    finally:
        worker.process.kill()


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_stub_that_polls_for_quick_tasks_sleeps_once_they_stop(worker):
    """One-at-a-time tasks make it poll for the next (SPIN_SECONDS); idle, it must
    not burn a core."""
    for task_id in range(1, 51):
        worker.call(task_id, helpers.double, task_id)
        assert _reply(worker) == (stub.RESULT, task_id, 2 * task_id)
    used = _cpu_seconds(worker.process.pid)
    time.sleep(1)  # the time whose CPU is counted, not a wait for a state
    assert _cpu_seconds(worker.process.pid) - used < 0.1


def test_a_frozen_host_ends_the_stub_whose_held_result_cannot_leave():
    """The host neither reads nor sends: the held result's write blocks on a full pipe
    (the task's 40 kB of output, then its 40 kB result), yet the stub finds the host
    silent and exits."""
    worker = Stub({**HELLO, "python": list(sys.version_info[:2]), "silence": 1})
    try:
        calls = _calls((1, helpers.say_and_return, 40_000), (2, helpers.spin, 60))
        os.write(worker.process.stdin.fileno(), calls)
        assert worker.process.wait(timeout=10) == 0
        assert "the host has been silent for 1 s" in worker.process.stderr.read().decode()
    finally:
        worker.process.kill()


def test_a_large_result_is_not_held():
    """Over HOLD_BYTES a result leaves at once, even with the next task there (and a
    minute's HOLD_SECONDS): one write carries it whatever it holds."""
    worker = Stub(hold_seconds=60)
    try:
        os.write(worker.process.stdin.fileno(), _calls((1, helpers.nbytes, stub.HOLD_BYTES), (2, helpers.spin, 60)))
        assert select.select([worker.process.stdout], [], [], 10)[0], "the large result was held"
        assert _reply(worker) == (stub.RESULT, 1, b"x" * stub.HOLD_BYTES)
    finally:
        worker.process.kill()
        worker.close()


def test_a_held_result_leaves_while_the_task_after_it_runs(worker):
    """The next task keeps the GIL for a minute: the result held for it leaves anyway."""
    os.write(worker.process.stdin.fileno(), _calls((1, helpers.double, 1), (2, helpers.spin, 60)))
    assert select.select([worker.process.stdout], [], [], 10)[0], "the held result did not leave"
    assert _reply(worker) == (stub.RESULT, 1, 2)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("task", [0, 60], ids=["idle", "running a task"])
def test_a_silent_host_ends_the_stub(workers, task):
    worker = Stub({**HELLO, "python": list(sys.version_info[:2]), "silence": 1, "workers": workers})
    if task:
        worker.call(1, helpers.sleep_then, task)
    assert worker.process.wait(timeout=10) == 0
    assert "the host has been silent for 1 s" in worker.close()


@pytest.fixture
def workers():
    process = Stub({**HELLO, "python": list(sys.version_info[:2]), "workers": 3})
    yield process
    if process.process.poll() is None:
        process.process.kill()
    process.close()


def test_workers_share_the_channel_and_answer_as_they_finish(workers):
    for task_id, seconds in enumerate([0.6, 0.3, 0], 1):
        workers.call(task_id, helpers.pid_after, seconds)
    replies = [_reply(workers) for _ in range(3)]
    assert [task_id for _, task_id, _ in replies] == [3, 2, 1]
    assert len({pid for _, _, pid in replies}) == 3


def test_a_dead_worker_is_reported_and_replaced(workers):
    workers.call(1, helpers.pid_after, 0)
    workers.call(2, helpers.kill_self)
    replies = sorted([workers.receive(), workers.receive()], key=lambda reply: reply[1])
    assert replies[0][0] == stub.RESULT
    assert replies[1][:2] == (stub.LOST, 2) and pickle.loads(replies[1][2])["exit_code"] == 128 + signal.SIGKILL
    pids = set()
    for task_id in range(3, 9):
        workers.call(task_id, helpers.pid_after, 0.2)
    for _ in range(6):
        kind, _, pid = _reply(workers)
        pids.add(pid)
    assert kind == stub.RESULT and len(pids) == 3


def _answers(worker, count, timeout=DEADLOCK):
    """(kind, task id) of the stub's next `count` answers (RESULT, RAISED, LOST), in the
    order they come. The test fails if the stub ends first (it is killed if it still
    owes one after `timeout` s)."""
    answers = []
    timer = threading.Timer(timeout, worker.process.kill)
    timer.start()
    try:
        while len(answers) < count:
            kind, task_id, _ = worker.receive()
            if kind not in (stub.OUTPUT, stub.DROPPED):
                answers.append((kind, task_id))
    except EOFError:
        raise AssertionError(f"the stub ended after {answers}, owing {count - len(answers)} answers") from None
    finally:
        timer.cancel()
    return answers


def test_a_worker_that_dies_idle_takes_no_task_with_it(tmp_path):
    """A worker dies between tasks (a thread its task left calls os._exit): it is
    replaced, and counted idle once. Were it twice, two tasks would go down one
    worker's pipe; when that worker died, LOST would name the second (which never
    ran), and the first would never be answered."""
    worker = Stub({**HELLO, "python": list(sys.version_info[:2]), "workers": 2})
    try:
        worker.call(1, helpers.exit_once_returned, str(tmp_path / "exit"))
        kind, task_id, pid = _reply(worker)
        assert (kind, task_id) == (stub.RESULT, 1)
        (tmp_path / "exit").touch()
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what="the idle worker to die and be reaped")
        gate = str(tmp_path / "gate")
        calls = _calls((2, helpers.killed_at_gate, gate), (3, helpers.killed_at_gate, gate), (4, helpers.double, 4))
        os.write(worker.process.stdin.fileno(), calls)
        started = set()
        while len(started) < 2:  # both workers are busy; task 4 waits for one
            kind, task_id, _ = worker.receive()
            assert kind == stub.OUTPUT, (kind, task_id)
            started.add(task_id)
        (tmp_path / "gate").touch()
        assert sorted(_answers(worker, 3)) == [(stub.RESULT, 4), (stub.LOST, 2), (stub.LOST, 3)]
    finally:
        worker.process.kill()
        worker.close()


def test_workers_finish_what_came_before_stop(workers):
    for task_id in range(1, 5):
        workers.call(task_id, helpers.sleep_then, 0.2, task_id)
    workers.send(stub.STOP, 0, b"")
    assert sorted(_reply(workers)[2] for _ in range(4)) == [1, 2, 3, 4]
    assert workers.process.wait(timeout=10) == 0


def _reply(worker):
    kind, task_id, payload = worker.receive()
    return kind, task_id, pickle.loads(payload)
