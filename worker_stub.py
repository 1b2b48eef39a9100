"""minipool's worker: the program that runs inside every container of a pool.

The container's command is `python3 -c BOOTSTRAP`: the host sends this file,
cloudpickle and the user's shipped code over stdin (BOOT, a file after another), the bootstrap
unpacks it into a new temporary directory and imports this file from there. It then
speaks minipool's wire protocol on its own stdin/stdout, which the engine's
attach connection ties to the host:

    host ── BOOT ──►   bootstrap       (files: this one, lib/cloudpickle, ship/...)
    host ── HELLO ──►  stub            (the host speaks first; maybe a socket to use)
    host ◄── READY ──  stub            (Python version, pickle protocol, pid)
    host ── CALL/CHUNK(task id) ──►    stub runs fn(*args, **kwargs) in its main thread
    host ◄── OUTPUT(task id) ...  ───  what the task writes to stdout and stderr, as it comes
    host ◄── RESULT/RAISED(task id) ─  stub (a run of quick tasks' in one write: Outbox)

When HELLO names a unix socket (the host's, in a directory mounted into the
container) and a secret, the stub connects to it and says the secret before its
READY, which goes out on stdout still and says whether it could; from then on
everything travels over the socket, and stdin is only watched for the hangup
that tells the host is gone.

Every message is a fixed header (magic, version, kind, task id, payload length)
followed by the payload: BOOT's files; for HELLO, READY, LOST and DROPPED a dict
of plain values, pickled at PLAIN_PROTOCOL; pickles of tasks and results for the rest.
The protocol's file descriptors are kept private: fds 1 and 2 point at a pipe
whose contents go to the host as OUTPUT, tagged with the running task, and fd 0
at /dev/null, so neither `print`, a C extension nor a subprocess can corrupt the
channel; the stub's own messages go to the container's stderr. A second thread
watches stdin for a hangup while a task runs, so the container ends at once when
the host goes away (the engine closes stdin).

Standard library only; runs on any CPython >= 3.8. The host also imports this
module for the protocol's definitions, so the two sides cannot drift apart.
"""

import collections
import contextlib
import faulthandler
import fcntl
import functools
import math
import mmap
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time

MAGIC = 0x4D50  # b"MP": a stray byte on the channel fails loudly instead of being parsed
VERSION = 1
# magic, version, message kind, task id, payload length
HEADER = struct.Struct(">HBBQQ")
# Protocol 5 (out-of-band buffers) is what every CPython >= 3.8 reads.
PICKLE_PROTOCOL = 5
# For the dicts of plain values in HELLO, READY, LOST and DROPPED: every Python 3
# reads it, and the stub needs no json (whose import was a fifth of a block's start).
PLAIN_PROTOCOL = 2
# A payload this large is received into an mmap rather than a bytearray (or read
# as it is unpickled: Stream).
LARGE = 1 << 20
# Seconds the stub tries to connect to the host's socket (the direct channel).
CONNECT_TIMEOUT = 5.0
# Buffers one writev may take (Linux and macOS); a pickle of many large objects has more.
IOV_MAX = 1024
# Results held back (Outbox) at most this long, and this many bytes of them.
HOLD_SECONDS = 0.001
HOLD_BYTES = 1 << 16
# How long a one-worker stub polls its channel for the next task before it sleeps,
# while tasks come that soon: waking a sleeping process (on another, idle, CPU of a
# VM) costs more than a quick task. It halves a one-at-a-time task's round trip.
SPIN_SECONDS = 0.0003

# Message kinds. Host to stub:
BOOT = 8  # worker_stub.py, lib/ (cloudpickle) and ship/ (the user's modules), each file as BOOT_FILE
HELLO = 1  # {"python": [major, minor], "cloudpickle": bool, "max_message_size": n, "workers": n,
#             "silence": seconds, and maybe "socket": path, "secret": hex}
CALL = 2  # pickle of (fn, args, kwargs)
CHUNK = 3  # pickle of (fn, [args, ...]): one message for a chunk of map()
STOP = 7  # empty: exit once the tasks sent before it are done
KEEPALIVE = 9  # empty: the host is there (it sends one every few seconds)
# Stub to host:
READY = 4  # {"python": [major, minor, micro], "pickle_protocol": n, "pid": n, and with a
#             socket offered "socket": "" once connected, else why not}
RESULT = 5  # pickle of the return value (a list for CHUNK)
RAISED = 6  # pickle of (type name, message, traceback text, pickled exception or None)
LOST = 10  # {"exit_code": n}: the worker process running the task died; another took its place
OUTPUT = 11  # bytes the task wrote to fd 1 or 2, in order, before its RESULT (task id 0: between tasks)
DROPPED = 12  # {"bytes": n}: the task wrote n bytes past OUTPUT_LIMIT, which were not sent

# How often a stub of several workers looks for dead ones, should no SIGCHLD tell it.
REAP_SECONDS = 0.1
# What a task may write (fds 1 and 2) that reaches the host; the rest is counted.
OUTPUT_LIMIT = 1 << 20
# The container's stderr, for the stub's own messages: fds 1 and 2 carry the tasks' output.
DIAGNOSTICS = 2


# A file in BOOT's payload: the length of its path, its size, then the path (UTF-8,
# relative) and its bytes. Simpler than a tar, whose module (with shutil and
# tempfile) took most of a block's start.
BOOT_FILE = struct.Struct(">HI")
# Each .py file comes with the host's bytecode for it, as an unchecked-hash .pyc
# (PEP 552) in __pycache__: an image whose Python is the host's version imports it
# without compiling, any other compiles the source as usual.

# The container's command: `python3 -c BOOTSTRAP SILENCE`. The stub arrives over
# stdin rather than by the engine's put_archive, which a read-only root filesystem
# refuses; the bootstrap writes only to a new temporary directory. It gives up if
# the host sends nothing for SILENCE seconds (a host killed or frozen as it
# started the container, on an engine that ignores StdinOnce).
BOOTSTRAP = """
import os, select, struct, sys
silence = float(sys.argv[1]) if len(sys.argv) > 1 else None
def read(size):
    data = bytearray(size)
    view = memoryview(data)
    while view:
        if not select.select([0], [], [], silence)[0]:
            sys.exit("minipool bootstrap: the host sent nothing for %%s s" %% silence)
        count = os.readv(0, [view])
        if not count:
            sys.exit("minipool bootstrap: stdin closed before the worker arrived")
        view = view[count:]
    return data
magic, version, kind, _, size = struct.unpack(%r, read(%d))
if (magic, version, kind) != (%d, %d, %d):
    sys.exit("minipool bootstrap: expected the worker archive, got %%r" %% ((magic, version, kind),))
archive = read(size)
home = None
for base in (os.environ.get("TMPDIR"), "/tmp", "/var/tmp", "/usr/tmp", os.getcwd()):
    try:
        home = os.path.join(base, "minipool-" + os.urandom(6).hex())
        os.mkdir(home, 0o700)
        break
    except (OSError, TypeError):
        home = None
if home is None:
    sys.exit("minipool bootstrap: no writable temporary directory (TMPDIR, /tmp, /var/tmp or here)")
at = 0
while at < len(archive):
    name_size, file_size = struct.unpack_from(%r, archive, at)
    at += %d
    name = archive[at:at + name_size].decode()
    at += name_size
    if name.startswith("/") or ".." in name.split("/"):
        sys.exit("minipool bootstrap: a path outside its directory in the archive: %%r" %% name)
    path = os.path.join(home, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(archive[at:at + file_size])
    at += file_size
del archive
sys.path.insert(0, home)
import worker_stub
del sys.path[0]
worker_stub.start()
""" % (HEADER.format, HEADER.size, MAGIC, VERSION, BOOT, BOOT_FILE.format, BOOT_FILE.size)


# --------------------------------------------------------------------------- wire protocol


def pack_header(kind, task_id, length):
    return HEADER.pack(MAGIC, VERSION, kind, task_id, length)


def unpack_header(header):
    """Return (kind, task id, payload length); ValueError if it is not our header."""
    magic, version, kind, task_id, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ValueError("bad frame magic %r: the channel carries something else" % bytes(header[:2]))
    if version != VERSION:
        raise ValueError("protocol version %d, expected %d: mixed minipool versions" % (version, VERSION))
    return kind, task_id, length


def fill(readinto, view):
    """Fill the writable buffer `view` from `readinto`; EOFError if the stream ends first."""
    view = memoryview(view).cast("B")
    while view:
        count = readinto(view)
        if not count:
            raise EOFError("stream closed")
        view = view[count:]


def read_message(readinto, max_size, streams=()):
    """Read one message: (kind, task id, payload). The payload is a bytearray, or an
    anonymous mmap when large (a bytearray is zeroed by a pass of its own before the
    read fills it), or when large and of one of the kinds `streams` a Stream, still
    to be read; free or finish it with release() before the next message."""
    header = bytearray(HEADER.size)
    fill(readinto, header)
    kind, task_id, length = unpack_header(header)
    # Never allocate what a header merely claims beyond the agreed limit.
    if length > max_size:
        raise ValueError("message of %d bytes exceeds the limit of %d bytes" % (length, max_size))
    payload: "bytearray | mmap.mmap"
    if length < LARGE:
        payload = bytearray(length)
    elif kind in streams:
        return kind, task_id, Stream(readinto, length)
    else:
        # Private: shared anonymous memory (mmap's default) is shmem, 1.6 times slower to fill here.
        payload = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE)
    fill(readinto, payload)
    return kind, task_id, payload


class Stream:
    """A large payload read from the channel as it is unpickled: the unpickler reads
    a large bytes or bytearray straight into the object it makes, with no buffer
    between (on a VM a buffer's fresh pages cost more than the copy). `broken` is
    the channel's own error, should it fail before the payload's end."""

    def __init__(self, readinto, length):
        self._readinto = readinto
        self.left = length
        self.broken = None

    def readinto(self, buffer):
        """Fill `buffer` (the unpickler takes less as truncated data), up to the payload's end."""
        view = memoryview(buffer).cast("B")[: self.left]
        try:
            fill(self._readinto, view)
        except (OSError, EOFError) as exc:
            self.broken = exc
            raise
        self.left -= len(view)
        return len(view)

    def read(self, size=-1):
        data = bytearray(self.left if size is None or size < 0 else min(size, self.left))
        self.readinto(data)
        return bytes(data)

    def readline(self):  # the unpickler wants one; only protocol 0 uses it
        line = bytearray()
        while self.left and not line.endswith(b"\n"):
            line += self.read(1)
        return bytes(line)

    def finish(self):
        """Read what is left of the payload."""
        scratch = bytearray(min(self.left, 1 << 16))
        while self.left:
            self.readinto(scratch)


def unpickle(payload):
    """Unpickle a payload: a buffer, or a Stream, which is then read to its end. The
    channel's own error, when a Stream's channel failed on the way, comes first."""
    if not isinstance(payload, Stream):
        return pickle.loads(payload)
    try:
        return pickle.load(payload)
    except BaseException:
        if payload.broken is not None:
            raise payload.broken from None
        raise
    finally:
        if payload.broken is None:
            payload.finish()


def send_parts(writev, parts):
    """Write every byte of `parts` with a vectored `writev`, without joining them."""
    views = [memoryview(part).cast("B") for part in parts if memoryview(part).nbytes]
    while views:
        sent = writev(views[:IOV_MAX])
        while sent and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


def release(payload):
    """Unmap a large payload now (what was unpickled from it holds no reference), or
    read what is left of a Stream."""
    if isinstance(payload, mmap.mmap):
        payload.close()
    elif isinstance(payload, Stream) and payload.broken is None:
        payload.finish()


def write_message(writev, kind, task_id, parts):
    """Write one message whose payload is the buffers in `parts`, joined by the kernel."""
    size = sum(memoryview(part).nbytes for part in parts)
    send_parts(writev, [pack_header(kind, task_id, size), *parts])


class Parts(list):
    """What a pickler wrote, write by write. A pickler hands a large bytes-like object
    to write() whole (bytes, a bytearray, or a PickleBuffer over a NumPy array), so
    it travels as it is instead of being copied into the pickle."""

    def write(self, data):
        self.append(data.raw() if isinstance(data, pickle.PickleBuffer) else data)


def pickle_parts(pickler, obj):
    """Pickle `obj` with the pickler class into a list of buffers."""
    parts = Parts()
    pickler(parts, protocol=PICKLE_PROTOCOL).dump(obj)
    return parts


# --------------------------------------------------------------------------- the worker


def private_channel():
    """Keep the protocol's descriptors private; return them as (read fd, write fd).
    fd 1 points at stderr until Output takes both."""
    global DIAGNOSTICS
    channel_in = os.dup(0)
    channel_out = os.dup(1)
    DIAGNOSTICS = os.dup(2)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # Flush each line, so the host sees prints as they happen.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return channel_in, channel_out


def diagnose(message):
    """Write one of the stub's own messages to the container's stderr. Never fails:
    with the host gone, stderr may be a pipe nobody reads any more."""
    with contextlib.suppress(OSError):
        os.write(DIAGNOSTICS, ("minipool worker: %s\n" % message).encode())


def reopened(stream, fd):
    """`stream` if it is open, else a new line-buffered text stream like it on `fd`."""
    if not stream.closed:
        return stream
    return open(fd, "w", buffering=1, encoding=stream.encoding, errors=stream.errors, closefd=False)


class Output:
    """What tasks write to fds 1 and 2: a pipe takes their place, and a thread sends
    what comes through it to the host (OUTPUT), tagged with the running task, at
    most OUTPUT_LIMIT bytes a task. Whatever the task wrote is sent before its
    result: end() drains the pipe. (Both ends poll first: a read that finds
    nothing costs an exception, and most tasks print nothing.)"""

    def __init__(self, send):
        self.send = send  # send(kind, task_id, parts): one whole message on the channel
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        # write_end stays open: a task that closes fds 1 and 2 leaves the pipe without
        # writers, where a read would find end-of-file at once, for ever.
        os.set_blocking(read_end, False)
        self.read_end = read_end
        self.write_end = write_end
        self.stdout, self.stderr = sys.stdout, sys.stderr
        self.readable = select.poll()  # the task's thread's own
        self.readable.register(read_end, select.POLLIN)
        self.lock = threading.Lock()  # held while output is sent: task boundaries stay exact
        self.task_id = 0
        self.left = OUTPUT_LIMIT
        self.dropped = 0
        threading.Thread(target=self.forward, name="minipool-output", daemon=True).start()

    def forward(self):
        poller = select.poll()
        poller.register(self.read_end, select.POLLIN)
        while True:
            poller.poll()
            with self.lock:
                self.drain()

    def drain(self):
        """Send what the pipe holds now (under the lock)."""
        while True:
            try:
                data = os.read(self.read_end, 1 << 16)
            except BlockingIOError:
                return
            kept = data[: max(self.left, 0)]
            self.left -= len(data)
            self.dropped += len(data) - len(kept)
            if kept:
                self.send(OUTPUT, self.task_id, [kept])

    def restore(self):
        """Undo what a task did to its stdio, so that neither the stub nor the next
        task is hurt: fds 1 and 2 back on the pipe, sys.stdout and sys.stderr back
        to the stub's own (reopened if the task closed them)."""
        os.dup2(self.write_end, 1)
        os.dup2(self.write_end, 2)
        self.stdout = sys.stdout = reopened(self.stdout, 1)
        self.stderr = sys.stderr = reopened(self.stderr, 2)

    def start(self, task_id):
        """Tag what is written from now on with the task."""
        with self.lock:
            if self.readable.poll(0):
                self.drain()  # written between tasks
            self.task_id, self.left, self.dropped = task_id, OUTPUT_LIMIT, 0

    def end(self):
        """The task is over: send what it wrote (before its result), and give the
        next task its stdio back."""
        for stream in (sys.stdout, sys.stderr):
            # The task may have closed or replaced them: what it wrote is what reached the pipe.
            with contextlib.suppress(Exception):
                stream.flush()
        self.restore()
        with self.lock:
            if self.readable.poll(0):
                self.drain()
            if self.dropped:
                self.send(DROPPED, self.task_id, [pickle.dumps({"bytes": self.dropped}, PLAIN_PROTOCOL)])
            self.task_id, self.left, self.dropped = 0, OUTPUT_LIMIT, 0


def serializer(use_cloudpickle):
    """A function pickling into parts: with cloudpickle when the host shipped it, so
    results and exceptions whose classes came by value from the caller's __main__ go
    back as the caller's own classes."""
    if not use_cloudpickle:
        return functools.partial(pickle_parts, pickle.Pickler)
    import cloudpickle

    return functools.partial(pickle_parts, cloudpickle.Pickler)


def describe_exception(exc, dumps, max_size):
    """RAISED payload: readable fields always, the exception itself when it pickles.

    One larger than max_size would break the channel for every task in flight:
    its message and traceback are cut short, and the exception rebuilt from the
    short message where its class allows, so that it keeps its type.
    """
    import traceback  # here, as below: with re and tokenize it was a fifth of a block's start

    name = "%s.%s" % (type(exc).__module__, type(exc).__qualname__)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        message = str(exc)
    except BaseException:
        message = "<str() of the exception failed>"
    payload = raised(name, message, text, pickled(exc, dumps))
    if len(payload) > max_size:
        # Characters kept of each part: UTF-8 takes at most 4 bytes a character. What
        # is short stays whole: the size may be the pickle's alone (an attribute's data).
        keep = max_size // 32
        if len(message) > keep:
            message = "%s ... [truncated: the exception pickles to %d bytes, over max_message_size=%d]" % (
                message[:keep], len(payload), max_size,
            )
        if len(text) > 2 * keep:
            text = "%s\n... [truncated] ...\n%s" % (text[:keep], text[-keep:])
        try:
            short = pickled(type(exc)(message), dumps)
        except BaseException:
            short = None
        payload = raised(name, message, text, short)
        if len(payload) > max_size:
            payload = raised(name, message, text, None)
    return [payload]


def pickled(exc, dumps):
    """The exception pickled, or None if it will not pickle."""
    try:
        return b"".join(dumps(exc))
    except BaseException:
        return None


def raised(name, message, text, exception):
    return pickle.dumps((name, message, text, exception), protocol=PICKLE_PROTOCOL)


def leave_if_forked(pid, exc=None):
    """End a process that the task forked and that returned or raised into the
    stub: only the task's own process (`pid`) may answer for it. It exits as the
    interpreter would have."""
    if os.getpid() == pid:
        return
    code = 0
    if isinstance(exc, SystemExit) and (exc.code is None or isinstance(exc.code, int)):
        code = exc.code or 0
    elif exc is not None:
        import traceback

        code = 1
        with contextlib.suppress(Exception):
            traceback.print_exception(type(exc), exc, exc.__traceback__)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def run_task(kind, payload, dumps, hint, max_size, loaded=lambda: None):
    """Run one CALL or CHUNK; return (RESULT or RAISED, payload parts). `loaded()`
    is called once the payload is read (a Stream, as it is unpickled)."""
    pid = os.getpid()
    try:
        call = unpickle(payload)
        release(payload)
    except BaseException as exc:
        if isinstance(payload, Stream) and payload.broken is not None:
            host_gone("the host hung up in the middle of a task")
        if hint:
            exc = RuntimeError("cannot unpickle the task: %s: %s. %s" % (type(exc).__name__, exc, hint))
        return RAISED, describe_exception(exc, dumps, max_size)
    finally:
        loaded()
    try:
        if kind == CHUNK:
            fn, chunk = call
            result = [fn(*args) for args in chunk]
        else:
            fn, args, kwargs = call
            result = fn(*args, **kwargs)
    except BaseException as exc:
        leave_if_forked(pid, exc)
        return RAISED, describe_exception(exc, dumps, max_size)
    leave_if_forked(pid)
    del call
    try:
        parts = dumps(result)
    except BaseException as exc:
        error = TypeError("cannot pickle the result of type %s: %s" % (type(result).__qualname__, exc))
        return RAISED, describe_exception(error, dumps, max_size)
    size = sum(memoryview(part).nbytes for part in parts)
    if size > max_size:
        too_big = ValueError("the result pickles to %d bytes, over max_message_size=%d" % (size, max_size))
        return RAISED, describe_exception(too_big, dumps, max_size)
    return RESULT, parts


def handshake(readinto, writev):
    """Answer the host's HELLO; return it as a dict, and the unix socket it offered
    as the channel once connected to (or None). READY says which it is."""
    kind, _, payload = read_message(readinto, 1 << 20)
    if kind != HELLO:
        raise ValueError("expected HELLO, got message kind %d" % kind)
    hello = pickle.loads(payload)
    ready = {"python": list(sys.version_info[:3]), "pickle_protocol": pickle.HIGHEST_PROTOCOL, "pid": os.getpid()}
    direct = None
    if "socket" in hello:
        direct, ready["socket"] = connect(hello["socket"], bytes.fromhex(hello["secret"]))
    write_message(writev, READY, 0, [pickle.dumps(ready, PLAIN_PROTOCOL)])
    return hello, direct


def connect(path, secret):
    """Connect to the host's unix socket and say the secret that proves who we are;
    the socket and '', or None and why it cannot be used (the host then keeps the
    stdin/stdout channel)."""
    import socket  # only the direct channel needs it

    direct = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Anyone on the host can fill the socket's backlog: then not wait for ever, but say so.
    direct.settimeout(CONNECT_TIMEOUT)
    try:
        direct.connect(path)
        direct.sendall(secret)
        direct.settimeout(None)  # blocking again, as the descriptor is used from now on
    except OSError as exc:
        direct.close()
        return None, "cannot connect to %s in the container: %s" % (path, exc)
    return direct, ""


def version_hint(host_python):
    """What to add to an unpickling error when the two Pythons differ, or ''."""
    here = tuple(sys.version_info[:2])
    if tuple(host_python) == here:
        return ""
    return (
        "Functions and classes defined in the caller's __main__ travel by value, which needs the "
        "same Python minor version on both sides: host %d.%d, container %d.%d." % (tuple(host_python) + here)
    )


HANGUP = select.POLLHUP | getattr(select, "POLLRDHUP", 0)


def host_gone(why):
    diagnose("%s; exiting" % why)
    os._exit(0)


class Channel:
    """The host's messages, read by the main thread; while it runs a task, by the
    watcher thread, which keeps them for it in order.

    The watcher ends the container as soon as the host goes away: on a hangup of
    stdin (the engine closes it when the attach connection drops, unless the
    engine ignores StdinOnce, as Podman does), or when the host has been silent
    for `silence` seconds (it sends KEEPALIVE every few). poll() reports a hangup
    without reading anything, so between tasks the main thread alone reads: no
    thread hand-off per task.
    """

    def __init__(self, fd, lifeline):
        self.fd = fd
        self.lifeline = lifeline  # stdin: the engine closes it when the host's attach drops
        self.silence = float("inf")  # seconds, from the host's HELLO
        self.read_some = os.fdopen(fd, "rb", buffering=0).readinto
        self.waiting = select.poll()  # whether the host said something not read yet
        self.waiting.register(fd, select.POLLIN)
        self.lock = threading.Lock()  # held by whichever thread reads
        self.early: collections.deque = collections.deque()  # messages the watcher read
        self.spin = False  # the last message came within SPIN_SECONDS: poll for the next
        self.busy = False  # the main thread runs a task
        self.loading = False  # the main thread unpickles a task (reading it, if a Stream)
        self.heard = time.monotonic()

    def read(self):
        """The next message that is not a KEEPALIVE, for the main thread: a large
        task as a Stream, which it reads, not busy yet, as it unpickles it."""
        with self.lock:
            while True:
                kind, task_id, payload = self.early.popleft() if self.early else self.wait((CALL, CHUNK))
                if kind != KEEPALIVE:
                    return kind, task_id, payload

    def wait(self, streams):
        """The next message off the channel, for the main thread: polled for while
        messages come soon (spin), else waited for asleep in the read."""
        started = time.monotonic()
        if self.spin:
            deadline = started + SPIN_SECONDS
            while not self.waiting.poll(0) and time.monotonic() < deadline:
                pass
        message = self.receive(streams)
        self.spin = time.monotonic() - started < SPIN_SECONDS
        return message

    def news(self):
        """Whether the host said something the main thread has not read yet."""
        return bool(self.early or self.waiting.poll(0))

    def receive(self, streams=()):
        """The next message, KEEPALIVE included (by the thread that reads)."""
        return read_message(self.readinto, sys.maxsize, streams)

    def loaded(self):
        """The task's payload is read: the watcher may read the channel while it runs."""
        self.heard = time.monotonic()
        self.loading = False
        self.busy = True

    def readinto(self, view):
        # Each read counts as hearing from the host: a large message may take longer
        # than `silence` to arrive.
        count = self.read_some(view)
        self.heard = time.monotonic()
        return count

    def watch(self):
        # Never writes: a write blocks while the host reads nothing, and the
        # watcher must still find it gone.
        poller = select.poll()
        poller.register(self.lifeline, HANGUP)
        while True:
            poller.register(self.fd, HANGUP | (select.POLLIN if self.busy else 0))
            events = poller.poll(1000)
            if any(event & HANGUP for _, event in events):
                host_gone("the host hung up")
            if events and self.busy and self.lock.acquire(blocking=False):
                try:
                    # Again under the lock: the main thread may have taken a new task as a
                    # Stream meanwhile, whose bytes are its own to read.
                    if self.busy:
                        self.early.append(self.receive())
                except EOFError:
                    host_gone("the host hung up")
                finally:
                    self.lock.release()
            why = self.unheard()
            if why:
                host_gone(why)

    def unheard(self):
        """Why the host counts as gone when it has been silent too long, else ''.
        Not while a task is unpickled: an import or a __setstate__ may take longer,
        and the host's keepalives are not read meanwhile."""
        if not self.loading and time.monotonic() - self.heard > self.silence:
            return "the host has been silent for %d s" % self.silence
        return ""


class Outbox:
    """The messages of a one-worker stub's threads to the host, each whole, in
    order. A result may wait (hold) while the worker runs the tasks already sent
    after it, so that the results of a run of quick tasks leave in one write: an
    engine's attach relay costs more per write than per byte. They leave when the
    worker would wait for the host, with any other message, once HOLD_BYTES are
    held, or after HOLD_SECONDS (the outbox's own thread: a slow task does not
    delay them)."""

    def __init__(self, writev):
        self.writev = writev
        self.lock = threading.Lock()
        self.held = []  # headers and payloads
        self.held_bytes = 0
        self.since = None  # when the oldest held message was held
        self.wake_read, self.wake_write = os.pipe()  # a hold wakes the thread, which times it
        threading.Thread(target=self.keep_time, name="minipool-outbox", daemon=True).start()

    def send(self, kind, task_id, parts):
        """Write the message now, after those held."""
        with self.lock:
            self._add(kind, task_id, parts)
            self._write()

    def hold(self, kind, task_id, parts):
        """Write the message later (now if those held are many bytes)."""
        with self.lock:
            self._add(kind, task_id, parts)
            if self.held_bytes >= HOLD_BYTES:
                self._write()
            elif self.since is None:
                self.since = time.monotonic()
                os.write(self.wake_write, b"!")

    def write(self):
        """Write the messages held."""
        with self.lock:
            self._write()

    def keep_time(self):
        """The outbox's thread: write what was held HOLD_SECONDS ago. It may block
        in a write to a host that reads nothing, as the main thread may; the
        watcher, which never writes, still finds such a host gone."""
        poller = select.poll()
        poller.register(self.wake_read, select.POLLIN)
        timeout = None  # milliseconds until the held messages are due
        while True:
            if poller.poll(timeout):
                os.read(self.wake_read, 1 << 12)
            with self.lock:
                if self.since is not None and time.monotonic() - self.since >= HOLD_SECONDS:
                    self._write()
                if self.since is None:
                    timeout = None
                else:
                    timeout = max(1, math.ceil((self.since + HOLD_SECONDS - time.monotonic()) * 1000))

    def _add(self, kind, task_id, parts):
        size = sum(memoryview(part).nbytes for part in parts)
        self.held += [pack_header(kind, task_id, size), *parts]
        self.held_bytes += size

    def _write(self):
        parts, self.held, self.held_bytes, self.since = self.held, [], 0, None
        send_parts(self.writev, parts)


def serve(channel, writev, run):
    """Run the host's tasks one at a time in this thread until STOP."""
    threading.Thread(target=channel.watch, name="minipool-watch", daemon=True).start()
    outbox = Outbox(writev)
    output = Output(outbox.send)
    while True:
        try:
            kind, task_id, payload = channel.read()
        except EOFError:
            return
        if kind == STOP:
            outbox.write()
            return
        output.start(task_id)
        channel.loading = True
        reply, parts = run(kind, payload, loaded=channel.loaded)  # catches what the task raises
        output.end()
        del payload
        if channel.news():  # the next task is here: its result may go with this one
            outbox.hold(reply, task_id, parts)
        else:
            outbox.send(reply, task_id, parts)
        # Not busy once written: while a write blocks, the watcher reads the host's keepalives.
        channel.busy = False
        del parts


def exit_code(status):
    """A wait status as the engine reports a container's: 128 + signal when killed."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class Workers:
    """Several worker processes sharing the channel, so one container uses several
    cores. This process reads the host's messages and hands each task to an idle
    worker over a pipe; the workers write their results to the channel themselves,
    one at a time (a lock), so they go back in the order they finish. A worker that
    dies is replaced, and the host is told which task it lost (LOST)."""

    IDLE, WRITING, ANSWERED = 0, 1, 2

    def __init__(self, count, channel_out, run):
        import tempfile  # here: it takes a third of the stub's start, and one worker needs none

        self.writev = functools.partial(os.writev, channel_out)
        self.run = run
        # Kept open for life; fcntl locks are per process, so it excludes workers from each other.
        self.lock = tempfile.TemporaryFile()  # noqa: SIM115
        self.states = mmap.mmap(-1, count)  # shared: what each worker is doing, by slot
        self.done_read, self.done_write = os.pipe()  # a worker writes its slot there once its result is out
        os.set_blocking(self.done_read, False)  # reap() reads it whether or not a worker wrote
        # SIGCHLD writes a byte here (signal.set_wakeup_fd, watch_exits()): a worker has died.
        self.exits_read, self.exits_write = os.pipe()
        for fd in (self.exits_read, self.exits_write):
            os.set_blocking(fd, False)
        self.pids = {}  # pid -> slot
        self.pipes = {}  # slot -> write end of its task pipe, for each live worker
        self.running = {}  # slot -> task id
        for slot in range(count):
            self.start(slot)

    def start(self, slot):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(write_end)
            # The task's children are its own business, not the supervisor's wake-up.
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(self.exits_read)
            os.close(self.exits_write)
            self.work(slot, read_end)
        os.close(read_end)
        self.pids[pid] = slot
        self.pipes[slot] = write_end

    def work(self, slot, read_end):
        """A worker process: run the tasks that come down its pipe, forever."""
        readinto = os.fdopen(read_end, "rb", buffering=0).readinto
        lock = threading.Lock()  # the fcntl lock excludes other processes, this one threads

        def send(kind, task_id, parts, done=False):
            with lock, self.writing(slot):
                write_message(self.writev, kind, task_id, parts)
                if done:
                    # Whole, the result answers its task: a worker that dies from here on
                    # (a thread its task left may end it) lost nothing, whether or not it
                    # got to say so on the done pipe (reap).
                    self.states[slot] = self.ANSWERED
                    os.write(self.done_write, bytes([slot]))

        output = Output(send)
        while True:
            try:
                kind, task_id, payload = read_message(readinto, sys.maxsize)
            except EOFError:
                os._exit(0)
            output.start(task_id)
            reply, parts = self.run(kind, payload)
            output.end()
            del payload
            send(reply, task_id, parts, done=True)
            del parts

    @contextlib.contextmanager
    def writing(self, slot):
        """Hold the channel for one message, noting who writes: a worker that dies
        while it writes leaves half a message behind."""
        fcntl.lockf(self.lock, fcntl.LOCK_EX)
        self.states[slot] = self.WRITING
        try:
            yield
        finally:
            self.states[slot] = self.IDLE
            fcntl.lockf(self.lock, fcntl.LOCK_UN)

    def watch_exits(self):
        """From now on, a worker's death (SIGCHLD) is a byte on exits_read (main thread only)."""
        signal.set_wakeup_fd(self.exits_write, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def exited(self):
        """Whether SIGCHLD came since last asked."""
        try:
            return bool(os.read(self.exits_read, 4096))
        except BlockingIOError:
            return False

    def hand(self, backlog):
        """Give the backlog's first tasks to the idle workers: the live ones that run
        no task. Worked out each time, not kept in a list of its own, where a worker
        that died idle was listed twice (once done, once replaced) and got two tasks."""
        # While every worker is busy (a slot that runs a task is a live worker's, in
        # self.pipes) it returns at once: walking 256 workers to find none idle cost
        # 14 us for each message read, when tasks wait for workers (issue 21).
        if not backlog or len(self.running) >= len(self.pipes):
            return
        for slot in [slot for slot in self.pipes if slot not in self.running][: len(backlog)]:
            kind, task_id, payload = backlog.popleft()
            self.running[slot] = task_id
            with contextlib.suppress(OSError):  # the worker died: reap() reports its task lost
                write_message(functools.partial(os.writev, self.pipes[slot]), kind, task_id, [payload])

    def finished(self):
        """Note the tasks whose workers said on the done pipe that their result is out."""
        with contextlib.suppress(BlockingIOError):
            for slot in os.read(self.done_read, 4096):
                self.running.pop(slot, None)

    def reap(self):
        """Replace the workers that died; tell the host which tasks they took with them.
        As the container's PID 1 (init=False) this process is also the parent of the
        tasks' orphans: those it reaps, and that is all."""
        while self.pids:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                return
            slot = self.pids.pop(pid, None)
            if slot is None:
                continue
            state, self.states[slot] = self.states[slot], self.IDLE  # its replacement's
            if state == self.WRITING:
                diagnose("a worker died while writing its result; the channel is broken")
                os._exit(70)
            self.finished()  # the tasks whose results went out
            os.close(self.pipes.pop(slot))
            task_id = self.running.pop(slot, None)
            if task_id is not None and state != self.ANSWERED:
                lost = pickle.dumps({"exit_code": exit_code(status), "pid": pid}, PLAIN_PROTOCOL)
                with self.writing(slot):
                    write_message(self.writev, LOST, task_id, [lost])
            self.start(slot)

    def kill(self):
        for pid in self.pids:
            os.kill(pid, signal.SIGKILL)


def supervise(channel, workers):
    """The loop of the process that owns the channel when there are several workers:
    read the host's messages, hand out tasks, replace dead workers. Returns why the
    host is gone, or '' after STOP."""
    backlog: collections.deque = collections.deque()
    stopping = False
    poller = select.poll()
    poller.register(channel.lifeline, HANGUP)
    poller.register(channel.fd, select.POLLIN | HANGUP)
    poller.register(workers.done_read, select.POLLIN)
    poller.register(workers.exits_read, select.POLLIN)
    # A worker's death wakes the loop (SIGCHLD) to reap it and start another. Reaping at
    # every wake instead, twice a task, was a fifth of this process's time with 256
    # workers (issue 21): waitpid looks at every child in the kernel. Should SIGCHLD be
    # blocked here, dead workers are found by polling, REAP_SECONDS at most after.
    workers.watch_exits()
    reaped = time.monotonic()
    while not (stopping and not backlog and not workers.running):
        exited = False
        for fd, event in poller.poll(REAP_SECONDS * 1000):
            if fd == workers.done_read:
                workers.finished()
            elif fd == workers.exits_read:
                exited = workers.exited()
            elif event & HANGUP:
                return "the host hung up"
            elif not stopping:
                try:
                    kind, task_id, payload = channel.receive()
                except EOFError:
                    return "the host hung up"
                if kind == STOP:
                    stopping = True
                    poller.modify(channel.fd, HANGUP)  # what comes after STOP is not read
                elif kind != KEEPALIVE:
                    backlog.append((kind, task_id, payload))
        workers.hand(backlog)
        if exited or time.monotonic() - reaped >= REAP_SECONDS:
            workers.reap()
            reaped = time.monotonic()
        why = channel.unheard()
        if why:
            return why
    return ""


def main():
    channel_in, channel_out = private_channel()
    # A crash's traceback goes where the host reads it even when the task's output is
    # lost; the crashing thread's only, so that it fits in the lines WorkerLost quotes.
    faulthandler.enable(os.fdopen(DIAGNOSTICS, "w"), all_threads=False)
    # As PID 1 (a container without an init) Python would ignore SIGTERM.
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))
    hello, direct = handshake(lambda view: os.readv(channel_in, [view]), functools.partial(os.writev, channel_out))
    if direct is not None:  # the protocol moves there; stdin stays open as the lifeline
        os.close(channel_out)
        channel_out = direct.detach()
    channel = Channel(channel_in if direct is None else channel_out, lifeline=channel_in)
    channel.silence = hello["silence"]
    writev = functools.partial(os.writev, channel_out)
    # The shipped code and cloudpickle first, then the working directory, where the
    # seed's `import app1` finds /home/app1.py. They take the place of sys.path[0].
    home = os.path.dirname(os.path.abspath(__file__))
    sys.path[0:1] = [os.path.join(home, "ship"), os.path.join(home, "lib"), os.getcwd()]
    run = functools.partial(
        run_task,
        dumps=serializer(hello["cloudpickle"]),
        hint=version_hint(hello["python"]),
        max_size=hello["max_message_size"],
    )
    if hello["workers"] == 1:
        serve(channel, writev, run)
    else:
        workers = Workers(hello["workers"], channel_out, run)
        gone = supervise(channel, workers)
        workers.kill()  # idle after STOP; else their results have nowhere to go
        if gone:
            host_gone(gone)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def start():
    """The bootstrap's entry point: main(), and the stub's own failure (say, garbage
    on the channel) told on the container's stderr: fd 2 carries tasks' output."""
    try:
        main()
    except Exception:
        import traceback

        diagnose(traceback.format_exc().rstrip())
        os._exit(1)


if __name__ == "__main__":  # run by hand, or by the protocol tests
    start()
