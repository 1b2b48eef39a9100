"""minipool's worker: the program that runs inside every container of a pool.

The container's command is `python3 -c BOOTSTRAP`: the host sends this file,
cloudpickle and the user's shipped code as a tar over stdin (BOOT), the bootstrap
unpacks it into a new temporary directory and runs this file from there. It then
speaks minipool's wire protocol on its own stdin/stdout, which the engine's
attach connection ties to the host:

    host ── BOOT ──►   bootstrap       (a tar: this file, lib/cloudpickle, ship/...)
    host ── HELLO ──►  stub            (the host speaks first)
    host ◄── READY ──  stub            (Python version, pickle protocol, pid)
    host ── CALL/CHUNK(task id) ──►    stub runs fn(*args, **kwargs) in its main thread
    host ◄── RESULT/RAISED(task id) ─  stub

Every message is a fixed header (magic, version, kind, task id, payload length)
followed by the payload: JSON for the handshake, pickles for everything else.
The protocol's file descriptors are kept private: fd 1 points at stderr and fd 0
at /dev/null, so neither `print`, a C extension nor a subprocess can corrupt the
channel. A second thread watches stdin for a hangup while a task runs, so the
container ends at once when the host goes away (the engine closes stdin).

Standard library only; runs on any CPython >= 3.8. The host also imports this
module for the protocol's definitions, so the two sides cannot drift apart.
"""

import faulthandler
import functools
import json
import mmap
import os
import pickle
import select
import signal
import struct
import sys
import threading
import traceback

MAGIC = 0x4D50  # b"MP": a stray byte on the channel fails loudly instead of being parsed
VERSION = 1
# magic, version, message kind, task id, payload length
HEADER = struct.Struct(">HBBQQ")
# Protocol 5 (out-of-band buffers) is what every CPython >= 3.8 reads.
PICKLE_PROTOCOL = 5
# A payload this large is received into an mmap rather than a bytearray.
LARGE = 1 << 20

# Message kinds. Host to stub:
BOOT = 8  # tar of worker_stub.py, lib/ (cloudpickle) and ship/ (the user's modules)
HELLO = 1  # JSON: {"python": [major, minor], "cloudpickle": bool, "max_message_size": n}
CALL = 2  # pickle of (fn, args, kwargs)
CHUNK = 3  # pickle of (fn, [args, ...]): one message for a chunk of map()
STOP = 7  # empty: exit once the tasks sent before it are done
# Stub to host:
READY = 4  # JSON: {"python": [major, minor, micro], "pickle_protocol": n, "pid": n}
RESULT = 5  # pickle of the return value (a list for CHUNK)
RAISED = 6  # pickle of (type name, message, traceback text, pickled exception or None)


# The container's command: `python3 -c BOOTSTRAP`. The stub arrives over stdin
# rather than by the engine's put_archive, which a read-only root filesystem
# refuses; the bootstrap writes only to a new temporary directory.
BOOTSTRAP = """
import io, os, struct, sys, tarfile, tempfile
def read(size):
    data = bytearray(size)
    view = memoryview(data)
    while view:
        count = os.readv(0, [view])
        if not count:
            sys.exit("minipool bootstrap: stdin closed before the worker arrived")
        view = view[count:]
    return data
magic, version, kind, _, size = struct.unpack(%r, read(%d))
if (magic, version, kind) != (%d, %d, %d):
    sys.exit("minipool bootstrap: expected the worker archive, got %%r" %% ((magic, version, kind),))
home = tempfile.mkdtemp(prefix="minipool-")
safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
tarfile.open(fileobj=io.BytesIO(read(size))).extractall(home, **safe)
import runpy
runpy.run_path(os.path.join(home, "worker_stub.py"), run_name="__main__")
""" % (HEADER.format, HEADER.size, MAGIC, VERSION, BOOT)


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


def read_message(readinto, max_size):
    """Read one message: (kind, task id, payload). The payload is a bytearray, or an
    anonymous mmap when large: a bytearray is zeroed by a pass of its own before the
    read fills it (35 ms for 64 MB here); free it with release()."""
    header = bytearray(HEADER.size)
    fill(readinto, header)
    kind, task_id, length = unpack_header(header)
    # Never allocate what a header merely claims beyond the agreed limit.
    if length > max_size:
        raise ValueError("message of %d bytes exceeds the limit of %d bytes" % (length, max_size))
    payload = mmap.mmap(-1, length) if length >= LARGE else bytearray(length)
    fill(readinto, payload)
    return kind, task_id, payload


def send_parts(writev, parts):
    """Write every byte of `parts` with a vectored `writev`, without joining them."""
    views = [memoryview(part).cast("B") for part in parts if memoryview(part).nbytes]
    while views:
        sent = writev(views)
        while sent and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


def release(payload):
    """Unmap a large payload now: what was unpickled from it holds no reference."""
    if isinstance(payload, mmap.mmap):
        payload.close()


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
    """Keep the protocol's descriptors private; return them as (read fd, write fd)."""
    channel_in = os.dup(0)
    channel_out = os.dup(1)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # fd 1 is stderr now; flush each line so the host logs prints as they happen.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return channel_in, channel_out


def serializer(use_cloudpickle):
    """A function pickling into parts: with cloudpickle when the host shipped it, so
    results and exceptions whose classes came by value from the caller's __main__ go
    back as the caller's own classes."""
    if not use_cloudpickle:
        return functools.partial(pickle_parts, pickle.Pickler)
    import cloudpickle

    return functools.partial(pickle_parts, cloudpickle.Pickler)


def describe_exception(exc, dumps):
    """RAISED payload: readable fields always, the exception itself when it pickles."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickled = b"".join(dumps(exc))
    except BaseException:
        pickled = None
    name = "%s.%s" % (type(exc).__module__, type(exc).__qualname__)
    try:
        message = str(exc)
    except BaseException:
        message = "<str() of the exception failed>"
    return [pickle.dumps((name, message, text, pickled), protocol=PICKLE_PROTOCOL)]


def run_task(kind, payload, dumps, hint, max_size):
    """Run one CALL or CHUNK; return (RESULT or RAISED, payload parts)."""
    try:
        call = pickle.loads(payload)
        release(payload)
    except BaseException as exc:
        if hint:
            exc = RuntimeError("cannot unpickle the task: %s: %s. %s" % (type(exc).__name__, exc, hint))
        return RAISED, describe_exception(exc, dumps)
    try:
        if kind == CHUNK:
            fn, chunk = call
            result = [fn(*args) for args in chunk]
        else:
            fn, args, kwargs = call
            result = fn(*args, **kwargs)
    except BaseException as exc:
        return RAISED, describe_exception(exc, dumps)
    del call
    try:
        parts = dumps(result)
    except BaseException as exc:
        error = TypeError("cannot pickle the result of type %s: %s" % (type(result).__qualname__, exc))
        return RAISED, describe_exception(error, dumps)
    size = sum(memoryview(part).nbytes for part in parts)
    if size > max_size:
        too_big = ValueError("the result pickles to %d bytes, over max_message_size=%d" % (size, max_size))
        return RAISED, describe_exception(too_big, dumps)
    return RESULT, parts


def watch_for_hangup(fd):
    """End the container as soon as the host goes away (the engine closes our stdin),
    even while a task runs. poll() reports the hangup without reading anything, so
    the main thread alone reads the tasks: no thread hand-off per task."""
    poller = select.poll()
    poller.register(fd, select.POLLHUP | getattr(select, "POLLRDHUP", 0))
    while not poller.poll():
        pass
    sys.stderr.flush()
    os._exit(0)


def handshake(readinto, writev):
    """Answer the host's HELLO; return it as a dict."""
    kind, _, payload = read_message(readinto, 1 << 20)
    if kind != HELLO:
        raise ValueError("expected HELLO, got message kind %d" % kind)
    hello = json.loads(payload.decode())
    ready = {"python": list(sys.version_info[:3]), "pickle_protocol": pickle.HIGHEST_PROTOCOL, "pid": os.getpid()}
    write_message(writev, READY, 0, [json.dumps(ready).encode()])
    return hello


def version_hint(host_python):
    """What to add to an unpickling error when the two Pythons differ, or ''."""
    here = tuple(sys.version_info[:2])
    if tuple(host_python) == here:
        return ""
    return (
        "Functions and classes defined in the caller's __main__ travel by value, which needs the "
        "same Python minor version on both sides: host %d.%d, container %d.%d." % (tuple(host_python) + here)
    )


def main():
    channel_in, channel_out = private_channel()
    faulthandler.enable()
    # As PID 1 (a container without an init) Python would ignore SIGTERM.
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))
    readinto = os.fdopen(channel_in, "rb", buffering=0).readinto
    writev = functools.partial(os.writev, channel_out)
    hello = handshake(readinto, writev)
    # The shipped code and cloudpickle first, then the working directory, where the
    # seed's `import app1` finds /home/app1.py. They take the place of sys.path[0].
    home = os.path.dirname(os.path.abspath(__file__))
    sys.path[0:1] = [os.path.join(home, "ship"), os.path.join(home, "lib"), os.getcwd()]
    dumps = serializer(hello["cloudpickle"])
    hint = version_hint(hello["python"])
    max_size = hello["max_message_size"]
    threading.Thread(target=watch_for_hangup, args=(channel_in,), name="minipool-hangup", daemon=True).start()
    while True:
        try:
            kind, task_id, payload = read_message(readinto, sys.maxsize)
        except EOFError:
            break
        if kind == STOP:
            break
        reply, parts = run_task(kind, payload, dumps, hint, max_size)
        del payload
        write_message(writev, reply, task_id, parts)
        del parts
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
