"""Task functions for the tests: top-level, so they pickle by reference.

Importable on the host (pytest puts tests/ on sys.path) and shipped into every
test container with `ship=`, so the stub imports them by the same name.
"""

import ctypes
import importlib
import importlib.util
import os
import signal
import socket
import struct
import sys
import threading
import time


def double(x):
    return 2 * x


def add(a, b=0):
    return a + b


def echo(*args, **kwargs):
    return args, kwargs


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def raise_value_error(message):
    raise ValueError(message)


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


def raise_unprintable():
    raise UnprintableError()


def predict_with_the_images_app(items):
    """predict() of the seed app the image holds (app1 doubles, app2 squares): one
    function, called alike in either image, that answers as the image does."""
    name = "app1" if importlib.util.find_spec("app1") else "app2"
    return importlib.import_module(name).predict(items)


def instance_from_module(name):
    """Return an instance of a class from a module that exists only in the container."""
    return importlib.import_module(name).Private()


def raise_from_module(name):
    """Raise the exception of a module that exists only in the container."""
    importlib.import_module(name).fail()


def exit_now(code):
    os._exit(code)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def segfault():
    ctypes.string_at(0)


def allocate(megabytes):
    """Touch every page, so a memory limit is really hit."""
    return len(b"x" * (megabytes << 20))


def unpicklable_result():
    return threading.Lock()


def noisy(value):
    """Write to fd 1 every way a task could: neither may reach the protocol channel."""
    print("noise from print")
    sys.stdout.flush()
    os.write(1, b"noise from fd 1\n")
    sys.stderr.write("noise on stderr\n")
    return value


def pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


def where():
    return os.getcwd(), sys.path


def environ(name):
    return os.environ.get(name)


def read_text(path):
    with open(path) as file:
        return file.read()


def identity(value):
    return value


def hostname_after(seconds):
    """The container's hostname (its short id), after a while."""
    time.sleep(seconds)
    return socket.gethostname()


def block():
    """Which block the task runs in: its container's hostname (the short id Docker and
    Podman give it); under Slurm, its job's id; under ch-run, which keeps the host's
    hostname and pids, the pid of the block's process, the session leader of every
    process in the block."""
    if "SLURM_JOB_ID" in os.environ:
        return os.environ["SLURM_JOB_ID"]
    return str(os.getsid(0)) if "CH_RUNNING" in os.environ else socket.gethostname()


def block_after(seconds):
    """Which block ran the task (see block), after a while."""
    time.sleep(seconds)
    return block()


def corrupt_channel():
    """Write garbage on the stub's private protocol descriptor."""
    os.write(channel_out(), b"this is no frame header, just garbage")
    time.sleep(60)


def die_once(marker):
    """Kill the container the first time (leaving a marker file), succeed after."""
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        kill_self()
    return "second time lucky"


def flood(megabytes):
    """Write `megabytes` MB to stdout and as much to stderr, in 1 KB lines."""
    line = "x" * 1023 + "\n"
    for _ in range(megabytes * 1024):
        sys.stdout.write(line)
        sys.stderr.write(line)
    sys.stdout.flush()
    return "intact"


def claim_absurd_length():
    """Send a well-formed header that claims an exabyte on the stub's private channel."""
    os.write(channel_out(), struct.pack(">HBBQQ", 0x4D50, 1, 5, 1, 1 << 60))
    time.sleep(60)


def nbytes(size):
    return b"x" * size


def square_or_die(i):
    if i % 100 == 99:
        kill_self()
    return i * i


def count_and_raise(path):
    """Note one run in `path`, then raise."""
    with open(path, "a") as file:
        file.write("ran\n")
    raise ValueError("counted")


def write_text(path, text):
    with open(path, "w") as file:
        file.write(text)


def wait_for_blocks(pool, count, timeout=60):
    """Once `count` tasks at once run in `count` containers (every block is ready, host
    side), the blocks they ran in (as block() names them); TimeoutError if they never
    do within `timeout` (a block whose Slurm job waits in the queue for ever, say)."""
    deadline = time.monotonic() + timeout
    while True:
        blocks = {f.result(timeout) for f in [pool.submit(block_after, 0.5) for _ in range(count)]}
        if len(blocks) == count:
            return blocks
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} tasks at once never ran in {count} blocks within {timeout} s: {blocks}")


def noted(path, value):
    """Note one run in `path`, then return `value`."""
    with open(path, "a") as file:
        file.write("ran\n")
    return value


def say(word, times):
    """Print `word` `times` times, a line at a time, slowly enough to interleave with others."""
    for _ in range(times):
        print(word)
        time.sleep(0.01)
    return word


def close_output():
    """Close fds 1 and 2 for good, as a careless task might."""
    os.close(1)
    os.close(2)
    return "closed"


def close_stdout():
    """Close sys.stdout, as a careless task might, and return normally."""
    sys.stdout.close()
    return "closed"


def raise_huge(size):
    raise ValueError("x" * size)


def fork_a_child_that_exits():
    """Fork a child that leaves through sys.exit(0) (it unwinds into the stub's code), wait for it."""
    pid = os.fork()
    if pid == 0:
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    return os.getpid(), os.waitstatus_to_exitcode(status)


class ExitsWhenUnpickled:
    """Pickles fine; unpickling it calls sys.exit, which raises SystemExit (a BaseException)."""

    def __reduce__(self):
        return sys.exit, ("unpickled",)


def exits_when_unpickled():
    return ExitsWhenUnpickled()


def exit_after(seconds, code=None):
    """Sleep, then end the process with `code`; with None, return normally."""
    time.sleep(seconds)
    if code is not None:
        os._exit(code)
    return seconds


def wait_for_file(path, value=None, timeout=60):
    """Return `value` once `path` exists: a gate the test opens by creating the file.
    Polls: the task may be in a container, where nothing else reaches it."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)
    return value


def noted_after(path, value, after=None, timeout=60):
    """Once `after` is noted in `path` (if given), note `value` there, a line each; return `value`.
    The lines of `path` are then the order in which such tasks finished."""
    deadline = time.monotonic() + timeout
    while after is not None and not (os.path.exists(path) and f"{after}" in read_text(path).split()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{after} was not noted in {path} within {timeout} s")
        time.sleep(0.01)
    with open(path, "a") as file:
        file.write(f"{value}\n")
    return value


def write_unterminated(text):
    """Write `text` to stdout, whose last line has no newline."""
    sys.stdout.write(text)
    return len(text)


def announce_then(fn, *args):
    """Print "started" (what the host sees first of the task), then return fn(*args)."""
    print("started", flush=True)
    return fn(*args)


class Dummy:
    """An object that can be weakly referenced, to see who holds it."""


def make_dummy(_):
    return Dummy()


def meet(directory, count, timeout=60):
    """Where the task runs under Slurm, (job, step, node), once `count` tasks have come
    to `directory` together: each leaves a file there, then waits for the others'. So
    the tasks all ran at once, or one raises TimeoutError."""
    where = (os.environ["SLURM_JOB_ID"], os.environ["SLURM_STEP_ID"], os.environ["SLURMD_NODENAME"])
    open(os.path.join(directory, ".".join(where)), "w").close()
    deadline = time.monotonic() + timeout
    while len(os.listdir(directory)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sorted(os.listdir(directory))} of {count} tasks met in {timeout} s")
        time.sleep(0.01)
    return where


def block_at_gate(path):
    """Which block ran the task (see block), once the test opens the gate `path`."""
    wait_for_file(path)
    return block()


def step_at_gate(path):
    """Where the task ran under Slurm, (job, step, node), once the test opens the gate `path`."""
    wait_for_file(path)
    return os.environ["SLURM_JOB_ID"], os.environ["SLURM_STEP_ID"], os.environ["SLURMD_NODENAME"]


def hostname_at_gate(path):
    """The container's hostname (its short id), once the test opens the gate `path`."""
    wait_for_file(path)
    return socket.gethostname()


# The stress test's tasks (test_stress.py): each says where it ran, or ends its own way.


def answer(value):
    """Return `value` and the container's hostname (its short id) at once."""
    return value, socket.gethostname()


def answer_after(seconds, value):
    """Return `value` and the container's hostname (its short id) after a while."""
    time.sleep(seconds)
    return value, socket.gethostname()


def raise_after(seconds, message):
    time.sleep(seconds)
    raise ValueError(message)


def socket_fd():
    """The socket this process holds, the direct channel's, or None: the attach
    stream reaches a container as pipes."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                return int(fd)
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return None


def talks_over_a_socket():
    return socket_fd() is not None


def channel_out():
    """The stub's private protocol descriptor: the direct channel's socket, or fd 4,
    to which the stub dups fd 1 before anything else opens a file."""
    fd = socket_fd()
    return 4 if fd is None else fd


class RaisesWhenUnpickled:
    """Pickles fine; unpickling it raises ValueError("unpickled")."""

    def __reduce__(self):
        return raise_value_error, ("unpickled",)


def failing_when_unpickled(size, first):
    """`size` bytes and an object whose unpickling raises, that one first or last:
    a large payload is unpickled as it is read, and must be read to its end anyway."""
    parts = (RaisesWhenUnpickled(), b"x" * size)
    return parts if first else parts[::-1]


def large_result_then_killed(size, delay):
    """Return `size` bytes; `delay` s after they are made, the process is killed
    (while the result is on its way, when it takes longer than that to send)."""
    data = bytes(size)
    threading.Thread(target=lambda: (time.sleep(delay), os.kill(os.getpid(), signal.SIGKILL)), daemon=True).start()
    return data


class SlowToUnpickle:
    """Unpickles to `value` after `seconds`, as an argument whose module is slow to import would."""

    def __init__(self, seconds, value):
        self.seconds, self.value = seconds, value

    def __reduce__(self):
        return sleep_then, (self.seconds, self.value)


def slow_to_unpickle(seconds, value):
    return SlowToUnpickle(seconds, value)


def spin(seconds):
    """Keep the GIL busy for `seconds` (no sleep, no I/O), then return them."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return seconds


def say_and_return(size):
    """Write `size` bytes of output, and return as many."""
    print("x" * (size - 1), flush=True)
    return b"x" * size


def say_where_then(seconds, value):
    """Print which container runs the task (its hostname), then sleep_then."""
    print(f"where: {socket.gethostname()}", flush=True)
    return sleep_then(seconds, value)


def leave_a_child(then=None):
    """Start a process that outlives the task (a server it forgot, say) and return its
    pid; with then="exit", end the stub itself instead; with a number, sleep that long."""
    import subprocess

    child = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    if then == "exit":
        os._exit(3)
    if then is not None:
        time.sleep(then)
    return child.pid


def exit_once_returned(gate):
    """Return this process's pid, leaving a thread that ends the process (os._exit)
    once the test opens the gate `gate`: a worker that dies idle, its task answered."""

    def exit_at_gate():
        wait_for_file(gate)
        os._exit(3)

    threading.Thread(target=exit_at_gate, daemon=True).start()
    return os.getpid()


def killed_at_gate(gate):
    """Say "started", then kill this process once the test opens the gate `gate`."""
    announce_then(wait_for_file, gate)
    kill_self()


def leave_an_orphan(gate):
    """Fork a child that forks a grandchild and exits at once: the grandchild, an
    orphan, goes to the nearest reaper (the container's PID 1) and exits once the
    gate `gate` exists. Its pid."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            grandchild = os.fork()
            if grandchild == 0:
                wait_for_file(gate)
            else:
                os.write(write_end, struct.pack("i", grandchild))
        finally:
            os._exit(0)  # neither returns into the stub
    os.waitpid(child, 0)  # its pid is in the pipe (the orphan holds the write end: no EOF)
    try:
        return struct.unpack("i", os.read(read_end, 4))[0]
    finally:
        os.close(read_end)
        os.close(write_end)


def release_orphan(gate, pid, value, timeout=60):
    """Open the gate an orphan waits at (leave_an_orphan), then return `value` once the
    orphan `pid` is reaped (as a zombie it keeps its /proc entry)."""
    write_text(gate, "")
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"orphan {pid} was not reaped within {timeout} s")
        time.sleep(0.01)
    return value
