"""A concurrent.futures executor whose workers live in long-running containers.

    with ContainerPoolExecutor("app1_v0.1", blocks=2) as ex:
        print(ex.submit(predict, [1, 2, 3]).result())

Each block is one container of the executor's image, started once and reused for
every task. `worker_stub.py` is sent into it over its stdin (worker_stub.BOOTSTRAP)
and speaks a small protocol over the container's stdin/stdout: the engine's attach
stream for Docker and Podman (or, on an engine on this machine, a unix socket the
stub connects to: _DirectChannels), plain pipes for runtimes run as a command
(Charliecloud, Apptainer, Shifter), run here or as Slurm jobs under srun
(provider=Slurm(...)). Three ideas are kept apart: a launcher starts, signals,
watches and removes a block's container (_Engine, _Command, _Srun), a channel
moves the bytes (_AttachChannel, _PipeChannel), and the pool queues, paces and
places tasks without asking which it has (_Pool, with _Starter to get containers
and _Reader to settle their answers). On Docker:

    caller ── submit(fn, *args) ──► pending queue ──► block thread i ── CALL frame ──► stdin ─┐
                                                                                          worker_stub
    future.set_result ◄── reader thread i ◄── Docker stream frames (1 = stdout: protocol,   runs fn
                                              2 = stderr: logged) ◄── RESULT frame ◄─ stdout ─┘

A block thread starts its container (create, attach, start, send the stub,
handshake), feeds it tasks from the shared queue (several at once, in one write,
while they are quick: pipelining), kills it when a task outlives task_timeout,
and replaces it when it dies, times out or has run max_tasks_per_block tasks.
submit() itself sends a small task to an idle container, sparing a hand-off.
Its reader thread settles futures by task id, sends what tasks print
(OUTPUT messages) and the container's stderr to the "minipool.worker" logger
and, when the stream ends, fails the task that was
running with WorkerLost and puts the ones queued behind it back in the queue.
The engine's event stream tells each dead container's exit code and whether the
kernel killed it for memory: with auto_remove it is gone before it could be
inspected.

Containers are created with stdin open and StdinOnce, log driver none, network
none and auto_remove: when the host process dies the engine closes the stub's
stdin, the stub exits and the engine removes the container.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import difflib
import functools
import getpass
import glob
import hashlib
import hmac
import importlib
import importlib.util
import itertools
import json
import logging
import marshal
import math
import mmap
import os
import pickle
import re
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
import weakref
from concurrent.futures import BrokenExecutor
from concurrent.futures import CancelledError
from concurrent.futures import Executor
from concurrent.futures import Future
from concurrent.futures import InvalidStateError
from concurrent.futures import TimeoutError as FuturesTimeoutError  # the builtin one from 3.11 on
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Iterator
from typing import Mapping
from typing import Sequence
from typing import Union

import docker
import docker.errors
import docker.models.containers
from docker.types import LogConfig

try:
    import cloudpickle
except ImportError:  # a vendored copy without it: everything importable still works
    cloudpickle = None

# The stub beside this file also defines the wire protocol for both sides: it is
# `worker_stub` when installed or vendored onto sys.path, `pkg.worker_stub` when
# vendored inside a package.
_stub: Any = importlib.import_module(f"{__package__}.worker_stub" if __package__ else "worker_stub")

__all__ = [
    "BrokenContainerPool",
    "CacheError",
    "Command",
    "ContainerPoolExecutor",
    "DependencyError",
    "MiniPoolError",
    "ProtocolError",
    "RemoteError",
    "Slurm",
    "StartupError",
    "WorkerLost",
    "output",
]
__version__ = "0.1.0"

_logger = logging.getLogger(__name__)
_worker_logger = logging.getLogger(__name__ + ".worker")

# Pipelining: a container is sent more tasks while it runs one, as long as what
# it holds would be done in this much time per worker (judged from the recent
# pace of each function), so short tasks stream without a round trip each while
# long ones still go one at a time to whichever block is free, and balance; a
# long task is never queued behind short ones, nor short ones behind it.
_PIPELINE_SECONDS = 0.002
_MAX_IN_FLIGHT = 64
# The pace assumed of a function not seen yet: slow, so it goes one at a time.
_FIRST_PACE = _PIPELINE_SECONDS * 10
# A task message up to this size is sent by the submitting thread itself when a
# container is idle (small enough that the send returns at once).
_DIRECT_SEND = 1 << 16
# A read of the attach stream at least this large skips the stream's buffer.
_DIRECT_READ = 1 << 12
# Default cap on one message (max_message_size): the host never allocates more
# than this whatever a header claims, as the payload buffer is allocated before
# its bytes arrive.
_MAX_MESSAGE = 1 << 32
# Lines of a container's stderr kept to explain its death.
_STDERR_TAIL = 20
# A stderr line longer than this is logged in pieces instead of buffered whole.
_MAX_LOG_LINE = 1 << 16
# Bytes of its own stderr (the stub's messages) a container may log. A task's
# output is bounded by the stub (worker_stub.OUTPUT_LIMIT).
_LOG_BUDGET = 1 << 20
# A fork bomb in a task stops here; tasks that need more processes raise it.
_PIDS_LIMIT = 4096
# How long a lost container's exit code may take to arrive on the event stream.
_EXIT_EVENT_WAIT = 5.0
# How long a stub may take to exit after STOP before its container is removed by force.
_EXIT_GRACE = 10.0
# How long the other blocks wait for the first one to be ready before starting.
_FIRST_BLOCK_HEAD_START = 1.0
# A replacement container that fails to start is tried this many times, a second
# apart, before the pool is declared broken: the engine may have hiccuped.
_REPLACEMENT_TRIES = 3
# After a block could not start a container while others serve (the engine refuses
# one more, or is full), no block is added for this long: the pool goes on with
# the blocks it has instead of failing to start one on every submit.
_SCALE_UP_PAUSE = 30.0
# A stub whose host has been silent this long exits: on an engine that ignores
# StdinOnce (Podman) that is how a killed caller's containers end. The host sends
# a KEEPALIVE to each container six times as often.
_HOST_SILENCE = 30.0
# The most worker processes one container may run (workers_per_block).
_MAX_WORKERS = 256
# Docker's attach stream: each frame is stream type (1 stdout, 2 stderr) and length.
_FRAME_HEADER = struct.Struct(">BxxxL")
_STDOUT = 1


# --------------------------------------------------------------------------- errors


class MiniPoolError(Exception):
    """Root of minipool's own errors."""


class BrokenContainerPool(MiniPoolError, BrokenExecutor):
    """The pool cannot go on: its pending and future work fails with this."""


class StartupError(BrokenContainerPool):
    """A container could not be started: engine unreachable, image missing, no Python
    in the image, or the stub failed before its handshake."""


class WorkerLost(MiniPoolError):
    """The container running the task died. The pool replaces it and goes on.

    With retries, `attempts` holds the WorkerLost of every earlier attempt.
    """

    def __init__(
        self,
        message: str,
        container_id: str,
        exit_code: int | None,
        oom_killed: bool,
        stderr_tail: Sequence[str],
        attempts: Sequence[WorkerLost] = (),
    ) -> None:
        super().__init__(message)
        self.container_id = container_id
        self.exit_code = exit_code
        self.oom_killed = oom_killed
        self.stderr_tail = list(stderr_tail)
        self.attempts = list(attempts)

    def after(self, attempts: Sequence[WorkerLost]) -> WorkerLost:
        """This loss as the last of several attempts, each of which is listed."""
        if not attempts:
            return self
        history = "\n".join(f"  attempt {n}: {lost.args[0].splitlines()[0]}" for n, lost in enumerate(attempts, 1))
        message = f"{self.args[0]}\nThe task was lost {len(attempts) + 1} times; earlier attempts:\n{history}"
        return WorkerLost(message, self.container_id, self.exit_code, self.oom_killed, self.stderr_tail, attempts)


class RemoteError(MiniPoolError):
    """A task raised an exception that could not be rebuilt on the host."""

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback


class ProtocolError(MiniPoolError):
    """The channel to a container carried something that is not minipool's protocol."""


class DependencyError(MiniPoolError):
    """An app's input (a Future passed as an argument) failed or was cancelled; the
    input's exception is the __cause__."""


class CacheError(MiniPoolError):
    """A results cache file that is not minipool's, is corrupt, or cannot be written."""


class _RemoteTraceback(Exception):
    """The __cause__ of a task's exception: the traceback as the container printed it."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


# --------------------------------------------------------------------------- records


class _WorkItem:
    __slots__ = (
        "attempts", "deadline", "expected", "future", "kind", "lines", "output", "pace_key", "parts", "running",
        "sent_at", "size", "suspect",
    )

    def __init__(self, future: Future, kind: int, fn: Callable[..., Any], parts: list, size: int) -> None:
        self.future = future
        self.kind = kind
        # Tasks of one function (and kind: a chunk holds several calls) share a pace.
        self.pace_key = (kind, getattr(fn, "__module__", None), getattr(fn, "__qualname__", type(fn).__qualname__))
        self.expected = 0.0  # seconds it should take, from its function's pace when sent
        self.parts = parts  # the pickled call, as the buffers the pickler wrote
        self.size = size
        self.running = False  # its future is RUNNING: it was taken by a container once
        self.sent_at = 0.0
        self.deadline: float | None = None  # when task_timeout runs out, once sent
        self.attempts: list[WorkerLost] = []  # earlier containers lost while running it
        # It was in flight with others when their container died, and may have ended
        # it: from then on it runs alone, so that a death names its task (_Pool.stream_ended).
        self.suspect = False
        self.output: bytearray | None = None  # what it wrote, every attempt
        self.lines: _Lines | None = None  # its output as logged, in its current container

    def note_output(self, container: _Container, data: bytes) -> None:
        """Log and keep what the task wrote (by its container's reader thread)."""
        if self.output is None:
            self.output = bytearray()
        # Read once: the block thread may end the attempt (keep_output) meanwhile.
        lines = self.lines = self.lines or _Lines(container, "the task's output", _stub.OUTPUT_LIMIT)
        self.output += data[: _stub.OUTPUT_LIMIT - len(self.output)]
        lines.feed(data)

    def keep_output(self) -> None:
        """The attempt is over: make what the task wrote available to output()."""
        if self.lines is not None:
            self.lines.end()
            self.lines = None
        if self.output is not None and self.kind == _stub.CALL:  # map's chunks are out of reach
            _outputs[self.future] = bytes(self.output)

    def overdue(self, now: float) -> bool:
        return self.deadline is not None and self.deadline <= now


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What every block of a pool needs to start and run its containers."""

    image: str
    python: str  # the interpreter's name or path in the image
    label: str
    pool_id: str
    create_options: dict
    archive: bytes
    startup_timeout: float
    task_timeout: float | None
    retries: int
    max_tasks_per_block: int | None
    max_message_size: int
    min_blocks: int  # these two count containers: a block's nodes each run one (block_size)
    max_blocks: int
    block_size: int  # containers a block adds: its nodes on Slurm, else 1
    idle_timeout: float | None
    workers_per_block: int


def _chunks(iterables: Sequence[Iterable], size: int) -> Iterator[list]:
    arguments = zip(*iterables)
    while chunk := list(itertools.islice(arguments, size)):
        yield chunk


def _cancel_queued(item: _WorkItem) -> None:
    """Cancel queued work so that wait() and as_completed() see it done (a bare
    Future.cancel() leaves it invisible to them, as CPython's pools do)."""
    if item.future.cancel():
        item.future.set_running_or_notify_cancel()


# signal.signal and signal.getsignal are Python wrappers that turn numbers and handlers
# into Enums and back, 3-5 us a call: _CtrlCWaits made three of them, 13 us each time
# submit() sent a task itself (issue 21: a third to all of 20,000 tasks when 1,024
# workers ran 100 ms tasks, the caller spending 80-90 us a task in all). signal's own
# _signal module has the same functions without them: 3.3 us.
_c_signal: Any = getattr(signal, "_signal", signal)


class _CtrlCWaits:
    """While the pool takes a task in the caller's main thread, a Ctrl-C waits: its
    handler runs once the pool has the task whole, or not at all (issue 20: cut
    halfway, the pool held a task whose future had failed, or one no block would
    answer). Python runs a signal's handler in the main thread alone, between two
    bytecodes; meanwhile this notes the signal, and gives it to that handler after.
    Nested, the inner one hands the signal to the outer."""

    __slots__ = ("came", "handler")

    def __enter__(self) -> _CtrlCWaits:
        self.came = False
        self.handler: Callable[[int, Any], Any] | None = None
        handler = _c_signal.getsignal(signal.SIGINT)
        if callable(handler) and threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError):  # a subinterpreter's main thread runs no handler
                _c_signal.signal(signal.SIGINT, self._note)
                self.handler = handler
        return self

    def _note(self, signum: int, frame: types.FrameType | None) -> None:
        self.came = True

    def __exit__(self, *exc_info: Any) -> None:
        handler, self.handler = self.handler, None
        if handler is not None:
            _c_signal.signal(signal.SIGINT, handler)
            if self.came:
                handler(signal.SIGINT, sys._getframe(1))  # default_int_handler raises KeyboardInterrupt


# --------------------------------------------------------------------------- wire protocol


class _ImportablePickler(pickle.Pickler):
    """Without cloudpickle, refuses what only it could send: code from the caller's __main__."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)) and obj.__module__ == "__main__":
            raise pickle.PicklingError(
                f"{obj.__qualname__} is defined in __main__ and must travel by value: "
                "pip install cloudpickle, or move it to a module the image can import"
            )
        return NotImplemented


_Pickler: type = cloudpickle.Pickler if cloudpickle is not None else _ImportablePickler


def _pickle_call(call: tuple, max_size: int) -> tuple[list, int]:
    """The call pickled into parts (a large argument is not copied), and their size."""
    name = getattr(call[0], "__qualname__", type(call[0]).__qualname__)
    try:
        parts = _stub.pickle_parts(_Pickler, call)
    except Exception as exc:
        raise TypeError(f"cannot send the call to {name} to a container: {exc}") from exc
    size = sum(memoryview(part).nbytes for part in parts)
    if size > max_size:
        raise ValueError(f"the call to {name} pickles to {size} bytes, over max_message_size={max_size}")
    return parts, size


def _remote_exception(payload: bytearray | mmap.mmap, where: str) -> BaseException:
    """Rebuild a task's exception, with the traceback as the container (`where`)
    printed it as its cause."""
    type_name, message, text, pickled = pickle.loads(payload)
    error: BaseException | None = None
    if pickled is not None:
        # Whatever unpickling raises (a __reduce__ may call sys.exit) leaves a RemoteError.
        with contextlib.suppress(BaseException):
            error = pickle.loads(pickled)
    if not isinstance(error, BaseException):
        error = RemoteError(type_name, message, text)
    error.__cause__ = _RemoteTraceback(f"In {where}:\n{text}")
    return error


# What each task wrote, by its future, for output().
_outputs: weakref.WeakKeyDictionary[Future, bytes] = weakref.WeakKeyDictionary()


def output(future: Future) -> str:
    """What the task behind `future` wrote to stdout and stderr (its first MiB,
    every attempt's), once the future is done; '' if it wrote nothing, or if the
    future is not from a ContainerPoolExecutor (or its app)."""
    return _outputs.get(future, b"").decode("utf-8", "replace")


@dataclasses.dataclass
class _Raised:
    """A task's outcome that is an exception (a result may be an exception too)."""

    exception: BaseException


def _outcome(kind: int, payload: Any, where: str) -> Any:
    """What a RESULT or RAISED message from `where` (the container) settles its future with.

    Unpickling runs the result's own code, which may raise anything, SystemExit
    included: that fails the future, never the reader thread. Only the channel's
    own failure, in the middle of a streamed payload, is raised.
    """
    try:
        if kind == _stub.RAISED:
            return _Raised(_remote_exception(payload, where))
        return _stub.unpickle(payload)
    except BaseException as exc:
        if isinstance(payload, _stub.Stream) and payload.broken is not None:
            raise
        error = MiniPoolError(f"the task's result cannot be unpickled on the host: {exc!r}")
        error.__cause__ = exc
        return _Raised(error)
    finally:
        _stub.release(payload)


# --------------------------------------------------------------------------- engine and containers


def _bare(exc: BaseException) -> BaseException:
    """`exc` without its traceback and its own causes, to be the __cause__ of one of
    our errors: reachable for whoever looks, while what is printed stays a few lines
    (docker-py's chains of requests and urllib3 errors run to a hundred)."""
    exc.__cause__ = None
    exc.__suppress_context__ = True
    return exc.with_traceback(None)


def _reason(exc: BaseException) -> str:
    """The operating system's word for what failed (say "Connection refused"), found
    under docker-py's and urllib3's wrappers; else the error's own text."""
    found: collections.deque[BaseException] = collections.deque([exc])
    for _ in range(50):  # breadth first, through causes and arguments
        if not found:
            break
        error = found.popleft()
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        found += [arg for arg in error.args if isinstance(arg, BaseException)]
        found += [cause for cause in (error.__cause__, error.__context__) if cause is not None]
    return str(exc)


def _connect(engine: Any, pool_size: int) -> tuple[docker.DockerClient, bool, str]:
    """The engine's client, whether we made it (and so must close it), and its name for messages."""
    if isinstance(engine, str) and engine.startswith("ssh://"):
        raise StartupError(_NO_SSH)
    name = engine if isinstance(engine, str) else _default_engine()
    try:
        if engine is None:
            client, owned = docker.from_env(max_pool_size=pool_size), True
        elif isinstance(engine, str):
            client, owned = docker.DockerClient(base_url=engine, max_pool_size=pool_size), True
        elif isinstance(engine, docker.DockerClient):
            client, owned, name = engine, False, engine.api.base_url
        else:
            raise TypeError(f"an engine is a docker.DockerClient, a URL or None, not {engine!r}")
    except (docker.errors.DockerException, OSError) as exc:
        reason = _reason(exc)
        fix = (
            "This user may not use it: add it to the docker group, or use a rootless engine"
            if "ermission denied" in reason
            else "Start dockerd (or Podman's service), or point DOCKER_HOST or engine= at the engine's socket"
        )
        raise StartupError(f"cannot reach a Docker engine at {name}: {reason}. {fix}") from _bare(exc)
    # The attach socket of an ssh engine has neither recv_into nor sendmsg.
    if client.api.base_url == "http+docker://ssh":
        if owned:
            client.close()
        raise StartupError(_NO_SSH)
    return client, owned, name


def _default_engine() -> str:
    """The engine docker.from_env() talks to, named for messages."""
    if os.environ.get("DOCKER_HOST"):
        return f"{os.environ['DOCKER_HOST']} (DOCKER_HOST)"
    return "unix:///var/run/docker.sock"


_NO_SSH = (
    "ssh:// engines are not supported yet: forward the engine's socket "
    "(ssh -NL /tmp/engine.sock:/var/run/docker.sock HOST) and pass engine='unix:///tmp/engine.sock'"
)


def _weighted(engine: Any) -> list[tuple[Any, float]]:
    """engine= as (engine, weight) pairs: one engine, or a list of engines and pairs."""
    entries = engine if isinstance(engine, list) else [engine]
    if not entries:
        raise ValueError("engine must name at least one engine")
    pairs = []
    for entry in entries:
        spec, weight = entry if isinstance(entry, tuple) else (entry, 1)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 < weight < math.inf:
            raise ValueError(f"an engine's weight must be a positive number, not {weight!r}")
        pairs.append((spec, weight))
    return pairs


# --------------------------------------------------------------------------- launchers
#
# A launcher starts a block's container (or process), signals it, tells how it
# ended and removes it: an engine, through its API (_Engine), or a runtime run as
# a command (_Command). The pool holds a list of them and never asks which kind.
# Verbs: start(settings) -> _Container (not yet handshaken), kill(container, how),
# remove(container), release(container), exit(container), answers(), close().


class _Placement:
    """A launcher's share of the pool's blocks (owned by the starter's lock)."""

    def __init__(self, name: str, weight: float, description: str) -> None:
        self.name = name
        self.description = description  # for errors: where, and how
        self.weight = weight
        self.blocks = 0  # blocks placed here
        self.lost = False  # it stopped answering: no block goes there again

    def load(self) -> float:
        """Its share of blocks with one more: the next block goes where this is least."""
        return (self.blocks + 1) / self.weight

    def running(self, container: _Container, closing: Callable[[float], bool]) -> bool:
        """Wait until the started container runs; False if the pool closes first. Only
        a scheduler's launcher (_Srun) has anything to wait for: a job in its queue."""
        return True

    def keep_alive(self) -> None:
        """Tell what holds the launcher's blocks, besides their stubs, that the caller
        is there: only a scheduler's launcher (_Srun) has such a thing, its jobs."""


# channel=: how the tasks reach a container made through an engine.
_CHANNELS = ("auto", "socket", "attach")
# Where a container finds its engine's channel directory, mounted read-only: a
# unix socket can be connected to on a read-only mount.
_CHANNEL_MOUNT = "/minipool-channel"
# An engine's channel directory (minipool-channel-HOST-PID-RANDOM), in the temporary directory.
_CHANNEL_DIR = "minipool-channel-"
# How long a connection to a container's socket may take to say the secret: the
# stub's is in the socket before its READY, so one that waits is someone else's.
_SECRET_WAIT = 0.05


class _DirectChannels:
    """How an engine's containers reach the pool: through a unix socket each, in a
    directory of the pool's own mounted into them, for speed (the engine's attach
    relay costs several times a socket's latency and bandwidth); or through the
    attach stream, where the sockets cannot work (`refused` says why). Tells the
    log which, once."""

    def __init__(self, mode: str, engine: str, label: str, local: bool) -> None:
        self.mode = mode  # channel=: "auto", "socket" or "attach"
        self.engine = engine
        self.label = label
        self.directory: str | None = None  # made with the first socket
        # Blocks may start at once (the first one late): one directory for them all.
        self._making = threading.Lock()
        self.refused = ""
        if mode == "attach":
            self.refused = "channel='attach'"
        elif not local:
            self.refused = f"the engine at {engine} is not on this machine, where the pool's sockets are"
        if mode == "socket" and self.refused:
            raise StartupError(f"channel='socket' cannot work: {self.refused}")
        self._told = False

    def offer(self) -> _Direct | None:
        """A socket for the next container to connect to, or None: use the attach stream."""
        if not self.refused:
            try:
                return _Direct(self, self._made())
            except OSError as exc:  # say, a TMPDIR too long for a socket's path (108 bytes)
                self.refuse(f"cannot listen on a unix socket in {tempfile.gettempdir()}: {exc}")
        self._tell(f"over the attach stream: {self.refused}")
        return None

    def _made(self) -> str:
        """The pool's channel directory, made with the first socket."""
        with self._making:
            if self.directory is None:
                directory = tempfile.mkdtemp(prefix=f"{_CHANNEL_DIR}{socket.gethostname()}-{os.getpid()}-")
                os.chmod(directory, 0o711)  # the container's user, whoever it is, must reach the sockets
                self.directory = directory
            return self.directory

    def mount(self) -> docker.types.Mount:
        return docker.types.Mount(_CHANNEL_MOUNT, self.directory, type="bind", read_only=True)

    def refuse(self, why: str) -> None:
        """The sockets do not work with this engine's containers: the attach stream
        from now on, or StartupError with channel='socket'."""
        if self.mode == "socket":
            raise StartupError(f"channel='socket' cannot work: {why}")
        self.refused = why
        self._tell(f"over the attach stream: {why}")

    def connected(self) -> None:
        self._tell("over unix sockets")

    def _tell(self, how: str) -> None:
        if not self._told:
            self._told = True
            _logger.info("pool %s: the containers on %s talk to it %s", self.label, self.engine, how)

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


class _Direct:
    """A unix socket for one starting container's stub to connect to, and the secret
    it must say first: the channel directory is open to the container's user,
    whoever that is, so also to other users of this machine."""

    def __init__(self, channels: _DirectChannels, directory: str) -> None:
        self.channels = channels
        name = f"{uuid.uuid4().hex[:16]}.sock"  # short: a socket's path has 108 bytes at most
        self.path = os.path.join(directory, name)
        self.secret = os.urandom(32)
        self.offer = {"socket": f"{_CHANNEL_MOUNT}/{name}", "secret": self.secret.hex()}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(self.path)
            os.chmod(self.path, 0o666)
            self.listener.listen(8)
        except BaseException:
            self.close()
            raise

    def accept(self, deadline: float) -> socket.socket:
        """The stub's connection: the first to have said the secret (it did, before
        its READY, so it waits in the socket already). Others are closed and logged;
        TimeoutError past the deadline."""
        while True:
            self.listener.settimeout(max(deadline - time.monotonic(), 0.001))
            connection, _ = self.listener.accept()
            said = bytearray(len(self.secret))
            with contextlib.suppress(OSError, EOFError):
                connection.settimeout(_SECRET_WAIT)
                _stub.fill(connection.recv_into, said)
            if hmac.compare_digest(said, self.secret):
                return connection
            _logger.warning("closed a connection to %s that did not begin with its container's secret", self.path)
            connection.close()

    def close(self) -> None:
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class _Engine(_Placement):
    """An engine a pool runs blocks on, through its API: its client, its containers' exits."""

    def __init__(
        self,
        client: docker.DockerClient,
        owned: bool,
        name: str,
        weight: float,
        exits: _ExitWatch,
        pool_id: str,
        channels: _DirectChannels,
    ) -> None:
        super().__init__(name, weight, name)
        self.client = client
        self.api = client.api
        self.owned = owned
        self.exits = exits
        self.pool_id = pool_id
        self.channels = channels

    def answers(self) -> bool:
        try:
            return bool(self.api.ping())
        except (docker.errors.DockerException, OSError):
            return False

    def start(self, settings: _Settings, closing: Callable[[float], bool]) -> _Container:
        """Create, attach, start; StartupError if the engine refuses.

        Attach comes before start and the stub says nothing before HELLO: bytes that
        arrive with the attach's HTTP answer can be lost in docker-py's reader.
        """
        direct = self.channels.offer()
        try:
            container_id, mounted = self._create(settings, direct)
        except BaseException as exc:
            if direct is not None:
                direct.close()
            if isinstance(exc, (docker.errors.DockerException, OSError)):
                raise _engine_refused(exc, self, settings) from _bare(exc)
            raise
        if direct is not None and not mounted:
            direct.close()
            direct = None
        _logger.debug("pool %s: created container %s on %s", settings.label, container_id[:12], self.name)
        self.exits.expect(container_id)
        sock = None
        try:
            attach = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
            sock = _raw_socket(self.api.attach_socket(container_id, params=attach))
            channel = _AttachChannel(sock, f"minipool-{settings.label}-{container_id[:12]}")
            container = _Container(container_id, channel, self, direct)
            self.api.start(container_id)
        except BaseException as exc:
            if direct is not None:
                direct.close()
            if sock is not None:
                sock.close()
            with contextlib.suppress(docker.errors.DockerException, OSError):
                _remove_container(self.api, container_id)
            self.exits.forget(container_id)
            if isinstance(exc, (docker.errors.DockerException, OSError)):
                raise _engine_refused(exc, self, settings) from _bare(exc)
            raise
        return container

    def _create(self, settings: _Settings, direct: _Direct | None) -> tuple[str, bool]:
        """Create the container, with the channel directory mounted when it is offered
        a direct channel; its id, and whether it has the mount. An engine that refuses
        the mount gets none from then on."""
        options = settings.create_options
        if direct is None:
            return str(self.client.containers.create(**options).id), False
        mounts = [*options.get("mounts", []), self.channels.mount()]
        try:
            return str(self.client.containers.create(**{**options, "mounts": mounts}).id), True
        except docker.errors.APIError as exc:
            if self.channels.mode == "socket" or mounts[-1]["Source"] not in str(exc.explanation):
                raise
            container_id = str(self.client.containers.create(**options).id)
            self.channels.refuse(f"the engine refused to mount {self.channels.directory}: {exc.explanation}")
            return container_id, False

    def kill(self, container: _Container, how: signal.Signals) -> None:
        with contextlib.suppress(docker.errors.DockerException, OSError):
            self.api.kill(container.id, signal=how.name)

    def remove(self, container: _Container) -> None:
        """Remove the container, running or not, and wait until it is gone."""
        try:
            _remove_container(self.api, container.id)
        except (docker.errors.DockerException, OSError) as exc:
            _logger.warning("could not remove %s from %s: %s", container.name, self.name, exc)

    def release(self, container: _Container) -> None:
        """The container is gone and its reader done: let go of what was kept for it."""
        if container.direct is not None:
            container.direct.close()
        container.channel.close()
        self.exits.forget(container.id)

    def exit(self, container: _Container) -> tuple[int | None, bool]:
        return self.exits.exit_of(container.id)

    def close(self) -> None:
        """The pool is done: remove any container of it still there (say, one the
        engine created after a create call had timed out), close the client."""
        try:
            mine = {"label": f"minipool.executor={self.pool_id}"}
            for container in self.api.containers(all=True, filters=mine):
                _logger.warning("removing leftover container %s from %s", container["Id"][:12], self.name)
                _remove_container(self.api, container["Id"])
        except (docker.errors.DockerException, OSError) as exc:
            _logger.warning("could not check %s for leftover containers: %s", self.name, exc)
        self.exits.close()
        self.channels.close()
        if self.owned:
            self.client.close()


def _engine_refused(exc: Exception, engine: _Engine, settings: _Settings) -> StartupError:
    """The engine would not create or start a container: what it said, and the likely fix."""
    what = f"cannot start a container of image {settings.image!r} on {engine.name}"
    if not isinstance(exc, docker.errors.APIError):
        return StartupError(f"{what}: {_reason(exc)}")
    said = str(exc.explanation)
    hint = ""
    if "container-init" in said:
        hint = ". The engine has no init binary for init=True (Podman: install catatonit)"
    elif "executable file not found" in said or "no such file" in said:
        hint = f". Is {settings.python!r} in the image? Pass python= the path of its Python 3 interpreter"
    return StartupError(f"{what}: the engine said: {said}{hint}")


class Command:
    """A container runtime run as a command, for runtime=: `argv` runs a program in
    an image with its stdin and stdout tied to ours, "{image}" standing for the
    image; minipool appends the interpreter and its arguments. For example

        Command(["podman", "run", "-i", "--rm", "--network=none", "{image}"])
    """

    def __init__(self, argv: Sequence[str]) -> None:
        if isinstance(argv, str) or not argv or not all(isinstance(word, str) for word in argv):
            raise TypeError(f"a Command takes a list of strings, not {argv!r}")
        self.argv = list(argv)

    def __repr__(self) -> str:
        return f"Command({self.argv!r})"


class Slurm:
    """Where blocks run, for provider=: each block is a Slurm job of nodes_per_block
    nodes, with one stub on each node (a container, in the pool's terms) run by srun
    as a step of the job, its stdin and stdout forwarded to the caller; each stub
    runs workers_per_block workers and asks for that many cores. A block takes its
    nodes whole unless exclusive=False. `options` are salloc's own, passed unchanged
    to the command that asks for each job. For example

        Slurm(partition="debug", time="01:00:00", nodes_per_block=2, options=["--mem=4G"])

    Inside an allocation (a batch script, salloc: SLURM_JOB_ID set) no job is
    asked for: each stub is a step of that allocation, on the node where the pool
    has fewest, sharing its nodes; `options` then go to srun.
    """

    def __init__(
        self,
        partition: str | None = None,
        time: str | None = None,
        account: str | None = None,
        nodes_per_block: int = 1,
        exclusive: bool = True,
        options: Sequence[str] = (),
    ) -> None:
        for name, value in (("partition", partition), ("time", time), ("account", account)):
            if value is not None:
                _check_name(name, value)
        _check_count("nodes_per_block", nodes_per_block, 1)
        if not isinstance(exclusive, bool):
            raise TypeError(f"exclusive must be True or False, not {exclusive!r}")
        if isinstance(options, str) or not all(isinstance(option, str) for option in options):
            raise TypeError(f"options must be a list of salloc's options, each a string, not {options!r}")
        for option in options:
            if option.split("=")[0] in _SLURM_OURS:
                raise ValueError(f"Slurm options: minipool sets {option.split('=')[0]} itself (the block's "
                                 f"stdin and stdout are its channel, its nodes are nodes_per_block, and its "
                                 f"name and comment find it again)")
        self.partition = partition
        self.time = time
        self.account = account
        self.nodes_per_block = nodes_per_block
        self.exclusive = exclusive
        self.options = list(options)

    def __repr__(self) -> str:
        return f"Slurm(partition={self.partition!r}, time={self.time!r}, account={self.account!r}, " \
               f"nodes_per_block={self.nodes_per_block!r}, exclusive={self.exclusive!r}, options={self.options!r})"


# salloc and srun options a Slurm provider sets itself: the channel, the nodes, the name and comment.
_SLURM_OURS = frozenset(
    ["-i", "--input", "-o", "--output", "-e", "--error", "--pty", "-u", "--unbuffered", "-J", "--job-name",
     "--comment", "-N", "--nodes", "--jobid", "-r", "--relative"]
)


# The runtimes that runtime= names, each run as a command; "docker" is the engine API.
_RUNTIMES = ("docker", "charliecloud", "apptainer", "singularity", "shifter")


def _runtime_argv(
    runtime: str | Command, image: str, workdir: str | None, environment: Any, volumes: Any
) -> list[str]:
    """The command line that runs a program in the image, up to the program: the
    runtime's own flags for the working directory, the environment and bind mounts."""
    variables = [f"{name}={value}" for name, value in _pairs(environment)]
    binds = _binds(volumes)
    if isinstance(runtime, Command):
        if workdir is not None or binds:
            raise ValueError("with runtime=Command(...), give the working directory and bind mounts in its argv")
        return [word.replace("{image}", image) for word in runtime.argv]
    if runtime == "charliecloud":
        read_only = [host for host, _, mode in binds if mode == "ro"]
        if read_only:
            raise ValueError(f"Charliecloud mounts volumes read-write; {read_only} asked for read-only")
        return [
            "ch-run", f"--cd={workdir or _charliecloud_workdir(image)}",
            *[f"--set-env={variable}" for variable in variables],
            *[f"--bind={host}:{guest}" for host, guest, _ in binds],
            image, "--",
        ]
    if runtime in ("apptainer", "singularity"):
        return [
            runtime, "exec", *([f"--pwd={workdir}"] if workdir else []),
            *[f"--env={variable}" for variable in variables],
            *[f"--bind={host}:{guest}:{mode}" for host, guest, mode in binds],
            image,
        ]
    # Shifter: its --env takes no value (it keeps the caller's environment, where
    # _open_command puts environment=).
    return [
        "shifter", f"--image={image}", *([f"--workdir={workdir}"] if workdir else []),
        *[f"--volume={host}:{guest}" + (":ro" if mode == "ro" else "") for host, guest, mode in binds],
        "--",
    ]


def _pairs(environment: Any) -> list[tuple[str, str]]:
    """environment= (a mapping, or "NAME=value" strings) as (name, value) pairs."""
    if environment is None:
        return []
    if isinstance(environment, Mapping):
        return [(str(name), str(value)) for name, value in environment.items()]
    return [tuple(entry.split("=", 1)) if "=" in entry else (entry, os.environ.get(entry, "")) for entry in environment]


def _binds(volumes: Any) -> list[tuple[str, str, str]]:
    """volumes= (docker's mapping, or "host:guest[:mode]" strings) as (host, guest, mode)."""
    if volumes is None:
        return []
    if isinstance(volumes, Mapping):
        return [(host, spec["bind"], spec.get("mode", "rw")) for host, spec in volumes.items()]
    binds = []
    for entry in volumes:
        host, guest, mode = [*entry.split(":"), "rw"][:3] if ":" in entry else (entry, entry, "rw")
        binds.append((host, guest, mode))
    return binds


def _charliecloud_workdir(image: str) -> str:
    """The image directory's working directory, as ch-convert records it; else /."""
    with contextlib.suppress(OSError, ValueError), open(os.path.join(image, "ch", "metadata.json")) as file:
        return str(json.load(file).get("cwd") or "/")
    return "/"


class _Command(_Placement):
    """A container runtime run as a command: each block is a child process of the
    caller, in a session of its own (a Ctrl-C in the caller's terminal is the
    caller's alone), whose stdin and stdout carry the protocol and whose stderr is
    logged. A killed caller closes the pipes: the stub sees its stdin end and exits."""

    def __init__(self, name: str, argv: list[str], environment: Mapping[str, str]) -> None:
        super().__init__(name, 1, f"{name} (the command line: {shlex.join(argv[:-2])} ...)")
        self.argv = argv  # interpreter and bootstrap included
        self.environment = environment  # for the process itself, besides the runtime's flags

    def answers(self) -> bool:
        return True  # no engine to lose: a start that fails is the command's

    def start(self, settings: _Settings, closing: Callable[[float], bool]) -> _Container | None:
        return self._run(settings, self.argv)

    def _run(self, settings: _Settings, argv: list[str]) -> _Container:
        """The block's process, running `argv`."""
        # The bootstrap unpacks the stub under TMPDIR. Apptainer and Charliecloud share
        # the host's /tmp, so each process gets a directory of its own, removed with it.
        tmpdir = tempfile.mkdtemp(prefix=f"{_BLOCK_DIR}{socket.gethostname()}-{os.getpid()}-")
        # These runtimes pass the caller's environment into the image; the caller's
        # PYTHONPATH or PYTHONHOME would point the image's Python at the host's modules.
        inherited = {name: value for name, value in os.environ.items() if not name.startswith("PYTHON")}
        environment = {**inherited, **self.environment, "TMPDIR": tmpdir}
        environment.setdefault("USER", getpass.getuser())  # ch-run will not start without it
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                env=environment, start_new_session=True,
            )
        except OSError as exc:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise StartupError(
                f"cannot run {self.description}: {exc.strerror}: {argv[0]!r}. Is it installed and on PATH?"
            ) from _bare(exc)
        _logger.debug("pool %s: started process %d: %s ...", settings.label, process.pid, shlex.join(argv[:-2]))
        channel = self._open_channel(process, f"minipool-{settings.label}-process-{process.pid}", tmpdir)
        return _Container(str(process.pid), channel, self)

    def _open_channel(self, process: subprocess.Popen, name: str, tmpdir: str) -> _PipeChannel:
        return _PipeChannel(process, name, tmpdir)

    def kill(self, container: _Container, how: signal.Signals) -> None:
        _kill_group(self._process(container), how)

    def remove(self, container: _Container) -> None:
        """Kill the process and whatever it started, and reap it."""
        self.kill(container, signal.SIGKILL)
        try:
            self._process(container).wait(_EXIT_GRACE)
        except subprocess.TimeoutExpired:  # stuck in the kernel (a hung file system, say)
            _logger.warning("%s of %s did not end after SIGKILL", container.name, self.name)

    def release(self, container: _Container) -> None:
        assert isinstance(container.channel, _PipeChannel)
        # Its stderr thread reads until the end of the pipe: closed under it, the pipe's
        # descriptor could be reused by another file and read from.
        container.channel.drain_stderr(1.0)
        container.channel.close()
        shutil.rmtree(container.channel.tmpdir, ignore_errors=True)

    def exit(self, container: _Container) -> tuple[int | None, bool]:
        process = self._process(container)
        unreaped = process.returncode is None
        try:
            code = process.wait(_EXIT_EVENT_WAIT)
        except subprocess.TimeoutExpired:
            return None, False
        if unreaped:
            # A stub that died by itself leaves what its tasks started in its session, and
            # reaped, it is no longer signalled by remove() (issue 20): end them now. Its
            # number still names their group (a group keeps it while a member lives), and
            # none can have taken it in the moments since the reap: Linux hands pids out in turn.
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
        assert isinstance(container.channel, _PipeChannel)
        container.channel.drain_stderr(_EXIT_EVENT_WAIT)
        return (128 - code if code < 0 else code), False  # as an engine reports a signal

    def close(self) -> None:
        pass  # every process was removed with its block

    @staticmethod
    def _process(container: _Container) -> subprocess.Popen:
        assert isinstance(container.channel, _PipeChannel)
        return container.channel.process


_Launcher = Union[_Engine, _Command]


def _kill_group(process: subprocess.Popen, how: signal.Signals) -> None:
    """Signal the process's group (its session), unless it was reaped: its pid may be another's now."""
    if process.returncode is None:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, how)


# A command runtime's block directory: TMPDIR of its process, named after the caller
# (minipool-block-HOST-PID-RANDOM; mkdtemp's random part has no "-").
_BLOCK_DIR = "minipool-block-"


def _sweep_dirs(prefix: str) -> list[str]:
    """Remove the block or channel directories (`prefix`) that dead callers on this
    host left in the temporary directory (which other hosts may share): a caller
    killed with SIGKILL cannot remove its own. The paths removed."""
    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{prefix}*-*-*")):
        host, pid, _ = os.path.basename(path)[len(prefix) :].rsplit("-", 2)
        if _owner({"minipool.host": host, "minipool.pid": pid}) == "gone":
            _logger.info("removing %s, whose owner is gone", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _worker_command(python: str) -> list[str]:
    """What runs in every container: the bootstrap, which gets the stub over stdin."""
    return [python, "-c", _stub.BOOTSTRAP, str(_HOST_SILENCE)]


def _open_command(
    runtime: str | Command, image: str, python: str, workdir: str | None, environment: Any, volumes: Any
) -> _Command:
    """The launcher of a runtime run as a command."""
    argv = _runtime_argv(runtime, image, workdir, environment, volumes) + _worker_command(python)
    if runtime == "charliecloud" and not os.path.isdir(image):
        raise StartupError(
            f"Charliecloud's image is a directory, and {image!r} is none: make one with "
            f"ch-convert IMAGE {image}, or untar a docker export of the image there"
        )
    _sweep_dirs(_BLOCK_DIR)
    # A Command has no flags of ours, nor has Shifter for it: the process gets the environment itself.
    variables = dict(_pairs(environment)) if isinstance(runtime, Command) or runtime == "shifter" else {}
    return _Command(runtime if isinstance(runtime, str) else argv[0], argv, variables)


# --------------------------------------------------------------------------- Slurm
#
# provider=Slurm(...): each block is a Slurm job of nodes_per_block nodes, which salloc
# asks for and then holds, on this host, for as long as its command (the keeper) reads
# a pipe of ours: closed when the block's last stub is gone, or by the caller's death
# (SIGKILL included), it lets the job go. On each node of the job a step, run by
# `srun --jobid`, is one of the pool's containers: the runtime's command, srun's stdin
# and stdout its channel, as with any command runtime. A job may wait in the queue
# (startup_timeout counts from when it runs); an elastic pool cancels a queued job that
# no work waits for. Every job is named minipool-LABEL, and its comment holds the labels
# a container would carry, so that squeue finds what a dead caller left.
#
# What ends a step (its stub exits, task_timeout) ends that node's container alone: a
# new step takes its place in the same job. What ends the job (scancel, its time limit,
# a node's failure, which by Slurm's default ends the whole job) ends every step of it:
# the block's containers are lost together, and a new job replaces them.
#
# A caller that runs inside an allocation (SLURM_JOB_ID set: sbatch, salloc) asks for
# no job: each stub is a step of that allocation, on the node where the pool has fewest,
# sharing it with the other steps (--exact). The pool never ends the allocation.

# Run by srun on the node in front of the runtime's command: it tells the caller,
# on srun's stderr, that the step runs, and where, so that the block is named by its
# job, step and node. The line is the wrapper's, never a task's output: _SrunChannel
# keeps it out of the block's stderr.
_SRUN_WRAPPER = 'echo "minipool: Slurm job $SLURM_JOB_ID step $SLURM_STEP_ID runs on $SLURMD_NODENAME" >&2 && exec "$@"'
_STEP_RUNS = re.compile(rb"minipool: Slurm job (\d+) step (\d+) runs on (\S+)")
# salloc's command, on this host: it holds the job while the caller's pipe to it is
# open and not silent (the pool's keepalive thread writes a byte every _HOST_SILENCE / 6),
# so that a killed caller's job ends at once, and a frozen one's once its stubs have.
_KEEPER = "import os, select, sys\nwhile select.select([0], [], [], float(sys.argv[1]))[0] and os.read(0, 99): pass"
# What salloc says of its job on its stderr.
_SALLOC_JOB = re.compile(r"salloc: (Pending|Granted) job allocation (\d+)")
_SALLOC_QUEUED = "queued and waiting for resources"
_SALLOC_REVOKED = "has been revoked"
# How often a block whose job is queued looks whether its pool still wants it.
_QUEUE_LOOK = 0.1
# squeue and scancel answer in tens of milliseconds; a controller that takes longer is down.
_SLURM_COMMAND_TIMEOUT = 30.0


def _comment(pool_id: str) -> str:
    """A job's comment: the labels that tell whose it is (_owner) and which pool's."""
    return f"minipool.host={socket.gethostname()},minipool.pid={os.getpid()},minipool.executor={pool_id}"


def _salloc_argv(slurm: Slurm, label: str, pool_id: str, workers: int) -> list[str]:
    """salloc's command line for a block's job: nodes_per_block nodes with a task of
    `workers` cores on each, whole nodes if exclusive, named and commented so that
    squeue finds it; its command the keeper."""
    chosen = [("--partition", slurm.partition), ("--time", slurm.time), ("--account", slurm.account)]
    return [
        "salloc", f"--nodes={slurm.nodes_per_block}", "--ntasks-per-node=1", f"--cpus-per-task={workers}",
        *(["--exclusive"] if slurm.exclusive else []), f"--job-name=minipool-{label}", f"--comment={_comment(pool_id)}",
        *[f"{flag}={value}" for flag, value in chosen if value is not None], *slurm.options,
        sys.executable, "-I", "-c", _KEEPER, str(_HOST_SILENCE),
    ]


def _srun_argv(label: str, workers: int, options: Sequence[str]) -> list[str]:
    """srun's command line for a stub, up to the runtime's command but for the job and
    node (_Srun.start adds them): one task of `workers` cores on one node, taking only
    its own cores (--exact; by default a step takes every CPU of its node, and the
    other steps wait), stdin and stdout unbuffered, then the wrapper."""
    return [
        "srun", "--unbuffered", "--nodes=1", "--ntasks=1", f"--cpus-per-task={workers}", "--exact",
        f"--job-name=minipool-{label}", *options, "sh", "-c", _SRUN_WRAPPER, "minipool-block",
    ]


def _allocation() -> str | None:
    """The job id of the allocation the caller runs in (sbatch, salloc), or None."""
    return os.environ.get("SLURM_JOB_ID") or None


class _Allocation:
    """Nodes the pool's steps run on, and how many of its stubs each has: here the
    caller's allocation, which is granted, the pool's to share and never to end."""

    def __init__(self, job_id: str, nodes: int) -> None:
        self.id = job_id
        self.steps = [0] * nodes  # the pool's stubs on each node, by the node's index in the job
        self.granted = threading.Event()
        self.granted.set()
        self.ended = threading.Event()

    def free_node(self) -> int | None:
        """The node for another stub: the one with fewest; None if none may have one."""
        return self.steps.index(min(self.steps))

    def wait_granted(self, closing: Callable[[float], bool], description: str) -> bool:
        return True

    def keep_alive(self) -> None:
        pass  # the caller's

    def let_go(self) -> None:
        pass  # the caller's


class _SlurmJob(_Allocation):
    """A block's job, which salloc asks for, waits for while it is queued, and holds
    while its keeper reads our pipe; one stub a node. salloc's stderr tells how it goes."""

    def __init__(self, argv: list[str], nodes: int, label: str) -> None:
        super().__init__("", nodes)
        self.granted.clear()
        self.said: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)  # to explain a refusal
        self._label = label
        self._pipe_lock = threading.Lock()  # a keepalive never writes to the pipe's closed descriptor, reused
        # SIGPIPE stays ignored, as in Python (restore_signals=False): salloc writes to
        # its stderr as it lets the job go, and a caller killed by then must not kill it first.
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True, restore_signals=False,
            )
        except OSError as exc:
            raise StartupError(f"cannot run {shlex.join(argv[:-3])} ...: {exc.strerror}") from _bare(exc)
        threading.Thread(target=self._follow, name=f"minipool-{label}-salloc-{self.process.pid}", daemon=True).start()

    def free_node(self) -> int | None:
        return self.steps.index(0) if 0 in self.steps else None

    def _follow(self) -> None:
        assert self.process.stderr is not None
        revoked = False
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            job = _SALLOC_JOB.search(line)
            if job:
                self.id = job.group(2)
                if job.group(1) == "Granted":
                    self.granted.set()
            elif _SALLOC_QUEUED in line:
                _logger.info("pool %s: Slurm job %s is queued; startup_timeout counts from when it runs",
                             self._label, self.id)
            elif _SALLOC_REVOKED in line:
                revoked = True
                self.ended.set()
            else:
                self.said.append(line)
        self.ended.set()
        if revoked:  # salloc's why (a node's failure) may come after the line that says so
            _logger.info("pool %s: Slurm job %s has ended: %s", self._label, self.id,
                         "; ".join(self.said) or "cancelled")

    def wait_granted(self, closing: Callable[[float], bool], description: str) -> bool:
        """Wait while the job is queued; False if the pool gives up first, StartupError if Slurm refuses it."""
        while not self.granted.wait(_QUEUE_LOOK):
            if self.ended.is_set():
                code = self.process.wait(_EXIT_EVENT_WAIT)
                said = "\n".join(self.said) or "(nothing)"
                raise StartupError(f"cannot start a block on {description}: salloc ended (exit code {code}) "
                                   f"before its job ran; it said:\n{said}")
            if closing(0):
                return False
        return True

    def keep_alive(self) -> None:
        """Tell the keeper that the caller is there."""
        assert self.process.stdin is not None
        with self._pipe_lock, contextlib.suppress(OSError, ValueError):  # ended, or closed
            os.write(self.process.stdin.fileno(), b"\0")

    def let_go(self) -> None:
        """End the job: a running one salloc lets go once the keeper's pipe is closed,
        a queued one it cancels when terminated."""
        self.ended.set()
        assert self.process.stdin is not None
        with self._pipe_lock:
            self.process.stdin.close()
        if not self.granted.is_set():
            self.process.terminate()
        try:
            self.process.wait(_EXIT_GRACE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            _scancel([self.id] if self.id else [])


class _Srun(_Command):
    """A runtime's command run on Slurm: each container is a step, run by srun (the
    block's process, a child of the caller as for any command runtime), on a node of
    one of the pool's jobs, asked for when none has a node free (_SlurmJob); inside
    the caller's allocation, on one of its nodes."""

    def __init__(
        self, name: str, argv: list[str], environment: Mapping[str, str], job_argv: list[str], nodes: int,
        allocation: _Allocation | None,
    ) -> None:
        super().__init__(name, argv, environment)
        # Up to the keeper's code and the stub's bootstrap.
        lines = f"{shlex.join(job_argv[:-3])} ... and {shlex.join(argv[:-2])} ..."
        self.description = f"{name} (the command lines: {lines})"
        self._job_argv = job_argv
        self._nodes = nodes
        self.allocation = allocation
        self._lock = threading.Lock()  # the jobs and their steps
        self._jobs: list[_Allocation] = [allocation] if allocation is not None else []

    def start(self, settings: _Settings, closing: Callable[[float], bool]) -> _Container | None:
        """A step on a free node of a job, once the job runs; None if the pool gives up first."""
        job, node = self._place(settings.label)
        try:
            if not job.wait_granted(closing, self.description):
                self._leave(job, node)
                return None
            container = self._run(settings, [self.argv[0], f"--jobid={job.id}", f"--relative={node}", *self.argv[1:]])
        except BaseException:
            self._leave(job, node)
            raise
        self._srun_channel(container).placed = (job, node)
        return container

    def _place(self, label: str) -> tuple[_Allocation, int]:
        """A free node of a job of the pool's, or the first node of a new one."""
        with self._lock:
            for job in self._jobs:
                node = None if job.ended.is_set() else job.free_node()
                if node is not None:
                    break
            else:
                job = _SlurmJob(self._job_argv, self._nodes, label)
                self._jobs.append(job)
                node = 0
            job.steps[node] += 1
        return job, node

    def _leave(self, job: _Allocation, node: int) -> None:
        """A stub of the job is gone; a job of ours with none left is let go."""
        with self._lock:
            job.steps[node] -= 1
            done = job is not self.allocation and not any(job.steps)
            if done:
                self._jobs.remove(job)
        if done:
            job.let_go()

    def _open_channel(self, process: subprocess.Popen, name: str, tmpdir: str) -> _PipeChannel:
        return _SrunChannel(process, name, tmpdir)

    def keep_alive(self) -> None:
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.keep_alive()

    def running(self, container: _Container, closing: Callable[[float], bool]) -> bool:
        """Wait until the step runs (in an allocation, it may wait for cores); False if
        the pool closes first, StartupError if srun ends before."""
        channel = self._srun_channel(container)
        while not channel.runs.wait(_QUEUE_LOOK):
            if channel.process.poll() is not None:
                raise self._refused(container)
            if closing(0):
                return False
        container.rename(f"Slurm job {channel.job}, step {channel.step}, node {channel.node}",
                         f"{channel.job}.{channel.step}")  # as Slurm names a step: scancel, sacct take it
        return True

    def remove(self, container: _Container) -> None:
        """Cancel the stub's step, then kill srun: the step of a srun killed first runs
        on for seconds in a job that lives on, holding its node (0.02 s this way, 2.7 s
        that way, here). A step whose srun has ended has ended."""
        channel = self._srun_channel(container)
        if channel.runs.is_set() and channel.process.poll() is None:
            _scancel_step(f"{channel.job}.{channel.step}")
        super().remove(container)

    def release(self, container: _Container) -> None:
        super().release(container)
        placed = self._srun_channel(container).placed
        assert placed is not None
        self._leave(*placed)

    def _refused(self, container: _Container) -> StartupError:
        """srun ended before its step ran (an option Slurm refuses, a job that ended): what it said."""
        channel = self._srun_channel(container)
        channel.drain_stderr(_EXIT_EVENT_WAIT)
        container.end_log()
        return StartupError(
            f"cannot start a block on {self.description}: srun ended (exit code {channel.process.returncode}) "
            f"before its step ran; it said:\n{container.last_words()}"
        )

    def close(self) -> None:
        """Let go the jobs still held: none, once every block was removed."""
        with self._lock:
            jobs = [job for job in self._jobs if job is not self.allocation]
            self._jobs = [job for job in self._jobs if job is self.allocation]
        for job in jobs:
            job.let_go()

    @staticmethod
    def _srun_channel(container: _Container) -> _SrunChannel:
        assert isinstance(container.channel, _SrunChannel)
        return container.channel


@dataclasses.dataclass
class _Job:
    """A Slurm job of ours, as squeue shows it."""

    id: str
    state: str
    submitted: float  # seconds since the epoch
    name: str
    labels: dict[str, str]  # from its comment: minipool.host, minipool.pid, minipool.executor


def _slurm(*argv: str) -> str:
    """Run a Slurm client command, return its stdout; StartupError if it cannot run or fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_SLURM_COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StartupError(f"cannot run {shlex.join(argv)}: {_reason(exc)}. Is Slurm's client installed?") from None
    if done.returncode != 0:
        raise StartupError(f"{shlex.join(argv)} failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _slurm_jobs() -> list[_Job]:
    """This user's Slurm jobs that minipool submitted; none (and a warning) if squeue fails."""
    try:
        return _parse_jobs(_squeue())
    except StartupError as exc:
        _logger.warning("could not look for minipool's Slurm jobs: %s", exc)
        return []


def _squeue() -> str:
    """This user's jobs, a line each: id, state, submit time, comment, name."""
    return _slurm("squeue", "--noheader", f"--user={getpass.getuser()}", "--format=%i %T %V %k %j")


def _slurm_steps() -> dict[str, list[tuple[str, str]]]:
    """This user's running steps by their job's id, each (JOB.STEP, node); none (and a
    warning) if squeue fails."""
    try:
        listed = _slurm("squeue", "--steps", "--noheader", f"--user={getpass.getuser()}", "--format=%i %N")
    except StartupError as exc:
        _logger.warning("could not list Slurm's steps: %s", exc)
        return {}
    steps: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for line in listed.splitlines():
        step, node = line.split()
        steps[step.partition(".")[0]].append((step, node))
    return steps


def _parse_jobs(listed: str) -> list[_Job]:
    """The jobs of squeue's lines (_squeue) that minipool submitted: those whose comment
    has our labels, but the allocation the caller runs in (say, the job of another
    pool's block, one of whose tasks this is), which neither a sweep nor cleanup may cancel."""
    jobs = []
    allocation = _allocation()
    for line in listed.splitlines():
        job_id, state, submitted, comment, name = line.split(" ", 4)
        labels = dict(pair.split("=", 1) for pair in comment.split(",") if "=" in pair)
        if "minipool.executor" in labels and job_id != allocation:
            started = time.mktime(time.strptime(submitted, "%Y-%m-%dT%H:%M:%S"))
            jobs.append(_Job(job_id, state, started, name, labels))
    return jobs


def _scancel(job_ids: list[str]) -> None:
    if job_ids:
        try:
            _slurm("scancel", *job_ids)
        except StartupError as exc:
            _logger.warning("could not cancel Slurm job(s) %s: %s", ", ".join(job_ids), exc)


def _scancel_step(step: str) -> None:
    """Cancel a job step (JOB.STEP), quietly if it has ended: scancel's --quiet still
    fails on a step that is gone."""
    try:
        _slurm("scancel", step)
    except StartupError as exc:
        if not any(gone in str(exc) for gone in ("Invalid job id specified", "already completing or completed")):
            _logger.warning("could not cancel Slurm step %s: %s", step, exc)


def _open_slurm(slurm: Slurm, command: _Command, label: str, pool_id: str, workers: int) -> _Srun:
    """The launcher of the runtime's command on Slurm, checked to have srun and the
    partition; the jobs dead callers on this host left queued are cancelled."""
    job_id = _allocation()
    allocation = None if job_id is None else _Allocation(job_id, int(os.environ.get("SLURM_JOB_NUM_NODES", "1")))
    argv = _srun_argv(label, workers, slurm.options if allocation is not None else []) + command.argv
    where = "Slurm" if allocation is None else f"Slurm job {job_id}'s steps"
    job_argv = _salloc_argv(slurm, label, pool_id, workers)
    launcher = _Srun(f"{command.name} on {where}", argv, command.environment, job_argv, slurm.nodes_per_block,
                     allocation)
    missing = [program for program in ("salloc", "srun") if shutil.which(program) is None]
    if missing:
        raise StartupError(f"cannot run {launcher.description}: no {' or '.join(missing)} on PATH. "
                           f"Is Slurm's client installed?")
    partitions = _slurm("sinfo", "--noheader", "--format=%R").split()
    if slurm.partition is not None and slurm.partition not in partitions:
        raise StartupError(f"Slurm has no partition {slurm.partition!r}; it has {', '.join(partitions) or 'none'}")
    _scancel([job.id for job in _slurm_jobs() if _owner(job.labels) == "gone"])
    return launcher


def _connect_all(engine: Any, pool_size: int, image: str, pool_id: str, label: str, channel: str) -> list[_Engine]:
    """Every engine of engine=, ready for the pool; StartupError naming one that cannot serve."""
    engines: list[_Engine] = []
    _sweep_dirs(_CHANNEL_DIR)
    try:
        for spec, weight in _weighted(engine):
            engines.append(_open_engine(spec, weight, pool_size, image, pool_id, label, channel))
    except BaseException:
        for made in engines:
            made.close()
        raise
    return engines


def _open_engine(
    spec: Any, weight: float, pool_size: int, image: str, pool_id: str, label: str, channel: str
) -> _Engine:
    """One engine, checked to have the image, its exits watched, its orphans swept."""
    client, owned, name = _connect(spec, pool_size)
    try:
        _check_image(client, name, image)
        # docker-py's name for an engine reached through a unix socket, which is on this machine.
        channels = _DirectChannels(channel, name, label, local=client.api.base_url == "http+docker://localhost")
        engine = _Engine(client, owned, name, weight, _ExitWatch(client.api, pool_id, label), pool_id, channels)
    except BaseException as exc:
        if owned:
            client.close()
        if isinstance(exc, (docker.errors.DockerException, OSError)):
            raise StartupError(f"cannot start a pool on the engine at {name}: {_reason(exc)}") from _bare(exc)
        raise
    _sweep_orphans(engine)
    return engine


def _check_image(client: docker.DockerClient, name: str, image: str) -> None:
    try:
        client.api.inspect_image(image)
    except docker.errors.ImageNotFound as exc:
        raise StartupError(
            f"image {image!r} is not on the engine at {name}: build it or pull it first "
            f"(the seed's app1_v0.1 and app2_v0.1: python images/build.py)"
        ) from _bare(exc)
    except (docker.errors.DockerException, OSError) as exc:
        raise StartupError(f"cannot reach the Docker engine at {name}: {_reason(exc)}") from _bare(exc)


def _owner(labels: Mapping[str, str]) -> str:
    """Whether the process that made a container is "alive", "gone", or "unknown"
    (it ran on another host, which this one cannot ask)."""
    pid = labels.get("minipool.pid", "")
    if labels.get("minipool.host") != socket.gethostname() or not pid.isdigit():
        return "unknown"
    return "alive" if _alive(int(pid)) else "gone"


def _alive(pid: int) -> bool:
    """Whether a process of this host is alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def _sweep_orphans(engine: _Engine) -> None:
    """Remove containers that dead executors on this host left behind.

    A caller killed between creating a container and starting it leaves it in
    Created: StdinOnce and auto_remove only act on a started container. On Podman,
    which ignores StdinOnce, a killed caller's containers run on until their stubs
    find the host silent (worker_stub.HOST_SILENCE).
    """
    mine = {"label": [f"minipool.host={socket.gethostname()}"]}
    try:
        containers = engine.api.containers(all=True, filters=mine)
    except (docker.errors.DockerException, OSError) as exc:
        _logger.warning("could not look for orphaned containers on %s: %s", engine.name, exc)
        return
    for container in containers:
        if _owner(container["Labels"]) == "gone":
            _logger.info("removing container %s, whose owner is gone", container["Id"][:12])
            with contextlib.suppress(docker.errors.DockerException, OSError):
                _remove_container(engine.api, container["Id"])


def _stub_archive(ship: Sequence[str]) -> bytes:
    """BOOT's payload, sent to every container: the stub, cloudpickle and the shipped
    code, each file as worker_stub.BOOT_FILE with the host's bytecode beside it."""
    files = [(_stub.__file__, "worker_stub.py")]
    trees = [(path, f"ship/{os.path.basename(os.path.normpath(path))}") for path in ship]
    if cloudpickle is not None:
        trees.insert(0, (os.path.dirname(cloudpickle.__file__), "lib/cloudpickle"))
    for path, name in trees:
        if not os.path.isdir(path):
            files.append((path, name))
            continue
        for folder, folders, names in os.walk(path):
            folders[:] = sorted(each for each in folders if each != "__pycache__")
            where = os.path.relpath(folder, path)
            files += [
                (os.path.join(folder, each), os.path.normpath(os.path.join(name, where, each)))
                for each in sorted(names) if not each.endswith(".pyc")
            ]
    archive = bytearray()
    for path, name in files:
        with open(path, "rb") as file:
            data = file.read()
        archive += _boot_file(name, data)
        bytecode = _bytecode(path, data) if name.endswith(".py") and sys.implementation.cache_tag else None
        if bytecode is not None:
            stem = os.path.splitext(os.path.basename(name))[0]
            cached = f"__pycache__/{stem}.{sys.implementation.cache_tag}.pyc"  # not PYTHONPYCACHEPREFIX's
            archive += _boot_file(os.path.join(os.path.dirname(name), cached), bytecode)
    return bytes(archive)


def _boot_file(name: str, data: bytes) -> bytes:
    encoded = name.encode()
    return _stub.BOOT_FILE.pack(len(encoded), len(data)) + encoded + data


@functools.lru_cache(maxsize=1024)  # by content: the next pool's start compiles nothing
def _bytecode(path: str, source: bytes) -> bytes | None:
    """An unchecked-hash .pyc of a source file (PEP 552); None for one this Python
    cannot compile (shipped code may be for the image's newer Python)."""
    try:
        code = compile(source, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None
    flags = struct.pack("<I", 0b01)  # hash-based, source not checked
    return importlib.util.MAGIC_NUMBER + flags + importlib.util.source_hash(source) + marshal.dumps(code)


def _raw_socket(attached: Any) -> socket.socket:
    """The socket under docker-py's attach result.

    For a unix or plain tcp engine that is a SocketIO wrapping it. Closing the
    SocketIO drops its reference on the socket: otherwise socket.close() (ours, or
    the one in a forked child) leaves the descriptor open until a garbage collection
    breaks docker-py's reference cycles. The socket keeps the client's 60 s timeout,
    which would break a quiet 60 s task, so it is cleared.
    """
    sock = getattr(attached, "_sock", attached)
    if sock is not attached:
        attached.close()
    sock.settimeout(None)
    return sock


def _writev(sock: socket.socket) -> Callable[[list], int]:
    """A vectored write for the socket: sendmsg, except on TLS, which has none."""
    if isinstance(sock, ssl.SSLSocket):
        return lambda views: sock.send(views[0])
    return sock.sendmsg


def _remove_container(api: Any, container_id: str) -> None:
    """Remove a container, whatever its state; quietly if it is already gone."""
    try:
        api.remove_container(container_id, force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code not in (409, 500):
            raise
        # 409 (Podman: 500): auto_remove is removing it already; return once it is gone.
        with contextlib.suppress(docker.errors.NotFound):
            api.wait(container_id, timeout=_EXIT_GRACE, condition="removed")


def _describe_exit(exit_code: int | None, oom_killed: bool) -> str:
    if oom_killed:
        return f"exit code {exit_code}: killed for using more memory than its limit (mem_limit); raise the limit"
    if exit_code is None:
        return "exit code unknown: its engine or runtime did not report it in time"
    if exit_code > 128:
        with contextlib.suppress(ValueError):
            return f"exit code {exit_code}: killed by {signal.Signals(exit_code - 128).name}"
    return f"exit code {exit_code}"


class _ExitWatch:
    """The engine's die and oom events for one pool's containers.

    With auto_remove a dead container is removed before anyone could inspect it, so
    its exit code and the kernel's OOM verdict are read off the event stream, which
    is subscribed before the first container is created.
    """

    def __init__(self, api: Any, pool_id: str, label: str) -> None:
        self._events = api.events(
            decode=True,
            # Podman filters by "died", and sends no oom event (4.3).
            filters={"type": "container", "event": ["die", "died", "oom"], "label": f"minipool.executor={pool_id}"},
        )
        self._exits: dict[str, tuple[int | None, bool]] = {}
        self._ended = False  # the engine went away, or close()
        self._changed = threading.Condition()
        threading.Thread(target=self._follow, name=f"minipool-{label}-events", daemon=True).start()

    def expect(self, container_id: str) -> None:
        """Keep what the engine tells of this container until forget()."""
        with self._changed:
            self._exits[container_id] = (None, False)

    def _follow(self) -> None:
        with contextlib.suppress(Exception):  # the stream ends with an error when closed
            for event in self._events:
                container_id = event["Actor"]["ID"]
                with self._changed:
                    if container_id not in self._exits:  # forgotten already
                        continue
                    exit_code, oom_killed = self._exits[container_id]
                    if event["Action"] == "oom":
                        oom_killed = True
                    else:
                        exit_code = int(event["Actor"]["Attributes"].get("exitCode", -1))
                    self._exits[container_id] = (exit_code, oom_killed)
                    self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def exit_of(self, container_id: str) -> tuple[int | None, bool]:
        """(exit code, OOM-killed) of a dead container; exit code None if not told in time."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._ended or self._exits.get(container_id, (None,))[0] is not None, _EXIT_EVENT_WAIT
            )
            return self._exits.get(container_id, (None, False))

    def forget(self, container_id: str) -> None:
        with self._changed:
            self._exits.pop(container_id, None)

    def close(self) -> None:
        with contextlib.suppress(docker.errors.DockerException, OSError):
            self._events.close()


class _Buffered:
    """A socket's bytes: small reads (frame and message headers, small results) are
    served from one buffer filled by a single recv; larger ones go straight into
    the caller's memory."""

    def __init__(self, sock: socket.socket) -> None:
        self._recv_into = sock.recv_into
        self._buffer = memoryview(bytearray(1 << 16))
        self._start = self._end = 0  # the unread part of _buffer

    def readinto(self, view: memoryview) -> int:
        """Socket bytes into `view`; 0 at the end of the stream."""
        if self._start == self._end:
            if len(view) >= _DIRECT_READ:
                return self._recv_into(view)
            self._start, self._end = 0, self._recv_into(self._buffer)
        count = min(len(view), self._end - self._start)
        view[:count] = self._buffer[self._start : self._start + count]
        self._start += count
        return count


class _AttachStream:
    """Docker's multiplexed attach stream read as the stub's stdout alone; frames of
    stderr found on the way go to `on_stderr`."""

    def __init__(self, sock: socket.socket, on_stderr: Callable[[bytearray], None]) -> None:
        self._read = _Buffered(sock).readinto
        self._on_stderr = on_stderr
        self._header = bytearray(_FRAME_HEADER.size)
        self._stdout_left = 0

    def readinto(self, view: memoryview) -> int:
        while not self._stdout_left:
            self._next_frame()
        count = self._read(view[: self._stdout_left])
        self._stdout_left -= count
        return count

    def _next_frame(self) -> None:
        _stub.fill(self._read, self._header)
        stream, length = _FRAME_HEADER.unpack(self._header)
        if stream == _STDOUT:
            self._stdout_left = length
            return
        while length:
            piece = bytearray(min(length, 1 << 16))
            _stub.fill(self._read, piece)
            self._on_stderr(piece)
            length -= len(piece)


class _AttachChannel:
    """The protocol's bytes over an engine's attach socket: the stub's stdin one
    way, its stdout and stderr multiplexed (_AttachStream) the other. Or, once the
    stub connected to a unix socket of ours (go_direct), over that: the attach
    stream then carries only the container's stderr, read by a thread of its own,
    and keeps its stdin open, which the engine closes should we die (StdinOnce)."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.sockets = [sock]  # those the protocol's bytes use, the attach socket first
        self.writev = _writev(sock)
        self.readinto: Callable[[memoryview], int] = sock.recv_into  # until listen()

    def listen(self, on_stderr: Callable[[bytearray], None]) -> None:
        self.readinto = _AttachStream(self.sock, on_stderr).readinto

    def go_direct(self, direct: socket.socket) -> None:
        attach = self.readinto

        def forward_stderr() -> None:  # the attach stream's stdout has nothing more
            view = memoryview(bytearray(1 << 12))
            with contextlib.suppress(OSError, EOFError, ValueError):
                while attach(view):
                    pass

        self.sockets.append(direct)
        self.readinto = _Buffered(direct).readinto
        self.writev = _writev(direct)
        self.sock.settimeout(None)  # deadlines are the protocol's, on the direct socket
        threading.Thread(target=forward_stderr, name=f"{self.name}-stderr", daemon=True).start()

    def set_deadline(self, deadline: float | None) -> None:
        """Reads and writes fail with a timeout after `deadline` (None: never)."""
        self.sockets[-1].settimeout(None if deadline is None else max(deadline - time.monotonic(), 0.001))

    def hang_up(self) -> None:
        """End the stream now, whatever it was in the middle of: the reader settles what was in flight."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class _PipeChannel:
    """The protocol's bytes over a child process's stdin and stdout; its stderr
    is read by a thread of its own. stdout carries the protocol alone."""

    def __init__(self, process: subprocess.Popen, name: str, tmpdir: str) -> None:
        self.process = process
        self.name = name
        self.tmpdir = tmpdir  # the process's TMPDIR
        assert process.stdin is not None and process.stdout is not None
        self._stdin = process.stdin.fileno()
        self._stdout = process.stdout.fileno()
        self._deadline: float | None = None
        self._stderr: threading.Thread | None = None

    def readinto(self, view: memoryview) -> int:
        self._wait(self._stdout, writing=False)
        return os.readv(self._stdout, [view])

    def writev(self, views: list) -> int:
        if self._deadline is None:
            return os.writev(self._stdin, views)
        # Before the handshake, a command that reads nothing must not hold us past the
        # deadline: write no more than a pipe takes once select() says it has room.
        self._wait(self._stdin, writing=True)
        return os.write(self._stdin, memoryview(views[0])[: select.PIPE_BUF])

    def _wait(self, fd: int, writing: bool) -> None:
        """With a deadline, wait until `fd` can be read (or written); TimeoutError past it."""
        if self._deadline is None:
            return
        left = max(self._deadline - time.monotonic(), 0)
        # poll, not select: select refuses descriptors of 1024 and more, which a caller
        # with many files open hands out (issue 20).
        waiting = select.poll()
        waiting.register(fd, select.POLLOUT if writing else select.POLLIN)
        if not waiting.poll(left * 1000):
            raise TimeoutError("no answer in time")

    def listen(self, on_stderr: Callable[[bytearray], None]) -> None:
        def forward() -> None:
            stderr = self.process.stderr
            assert stderr is not None
            with contextlib.suppress(OSError, ValueError):  # ValueError: closed by close()
                while data := stderr.read(1 << 16):
                    on_stderr(bytearray(data))

        self._stderr = threading.Thread(target=forward, name=f"{self.name}-stderr", daemon=True)
        self._stderr.start()

    def drain_stderr(self, timeout: float) -> None:
        """Wait for the dead process's last words."""
        if self._stderr is not None:
            self._stderr.join(timeout)

    def set_deadline(self, deadline: float | None) -> None:
        self._deadline = deadline

    def hang_up(self) -> None:
        _kill_group(self.process, signal.SIGKILL)

    def close(self) -> None:
        # A late keepalive or read then fails (EBADF) instead of reaching whatever file
        # is given the closed descriptors' numbers next.
        self._stdin = self._stdout = -1
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            with contextlib.suppress(OSError):
                assert pipe is not None
                pipe.close()


class _SrunChannel(_PipeChannel):
    """The pipes to a stub's srun, whose stderr first tells that its step runs
    (_SRUN_WRAPPER), and its job, step and node (set before `runs`)."""

    def __init__(self, process: subprocess.Popen, name: str, tmpdir: str) -> None:
        super().__init__(process, name, tmpdir)
        self.runs = threading.Event()
        self.job = self.step = self.node = ""
        self.placed: tuple[_Allocation, int] | None = None  # its job, and its node's index there
        self._partial = bytearray()

    def listen(self, on_stderr: Callable[[bytearray], None]) -> None:
        def watch(data: bytearray) -> None:
            if self.runs.is_set():
                on_stderr(data)
            else:
                self._follow_job(data, on_stderr)

        super().listen(watch)

    def _follow_job(self, data: bytearray, on_stderr: Callable[[bytearray], None]) -> None:
        """srun's lines until the wrapper's, which is not passed on; after it, the block's own."""
        rest = self._partial + data
        while not self.runs.is_set():
            line, newline, after = rest.partition(b"\n")
            if not newline:
                break
            rest = after
            if not self._noted(line):
                on_stderr(line + newline)
        self._partial = bytearray() if self.runs.is_set() else rest
        if self.runs.is_set() and rest:
            on_stderr(rest)

    def _noted(self, line: bytearray) -> bool:
        """Note where the step runs (True: the wrapper's line)."""
        runs = _STEP_RUNS.match(line)
        if runs:
            self.job, self.step, self.node = (part.decode() for part in runs.groups())
            self.runs.set()
        return runs is not None


_Channel = Union[_AttachChannel, _PipeChannel]


class _Lines:
    """Bytes from a container logged one record per line, whose last lines the
    container keeps to explain its death; past `budget` bytes, one warning."""

    def __init__(self, container: _Container, what: str, budget: int) -> None:
        self._container = container
        self._what = what
        self._left = budget
        self._partial = b""

    def feed(self, data: bytes | bytearray) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > _MAX_LOG_LINE:
            lines.append(self._partial)
            self._partial = b""
        for raw in lines:
            self._left -= len(raw) + 1
            if self._left >= 0:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                self._container.stderr_tail.append(line)
                self._container.log(logging.INFO, "%s", line)
            elif self._left + len(raw) + 1 >= 0:
                self._container.log(logging.WARNING, "%s truncated: the rest is not logged", self._what)

    def end(self) -> None:
        if self._partial:
            self.feed(b"\n")


class _Container:
    """One block's running container (or process) with the stub in it, and the
    channel to it."""

    def __init__(
        self, container_id: str, channel: _Channel, launcher: _Launcher, direct: _Direct | None = None
    ) -> None:
        self.id = container_id
        self.launcher = launcher
        self.direct = direct  # a socket offered to the stub, until the handshake
        self.short_id = container_id[:12]
        self.name = f"container {self.short_id}"  # for messages; a launcher may rename it (rename)
        self.tag = self.short_id  # of its lines in minipool.worker
        self.channel = channel
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)
        self.stderr = _Lines(self, "its stderr", _LOG_BUDGET)
        self.between_tasks = _Lines(self, "output between tasks", _stub.OUTPUT_LIMIT)
        channel.listen(self.stderr.feed)
        _channels.add(channel)
        self.writev = channel.writev
        self._send_lock = threading.Lock()  # the block thread and submit() both send
        self._sends = itertools.count()
        # Task id -> its place in the stub's stdin; the stub runs tasks in that order.
        self.sent_order: dict[int, int] = {}
        self.last_done = time.monotonic()  # or when it became ready
        # Owned by the pool's lock:
        self.in_flight: dict[int, _WorkItem] = {}
        self.backlog = 0.0  # seconds the tasks in flight should take, all told
        self.suspect_running = False  # a suspect task is in flight: none joins it
        self.sent = 0  # tasks sent, for max_tasks_per_block
        self.expired: dict[int, _WorkItem] = {}  # tasks that ran past task_timeout
        self.lost = False
        self.retired = False  # idle past idle_timeout: its block ends with it
        self.reader: threading.Thread | None = None

    def exit(self) -> tuple[int | None, bool]:
        """(exit code, OOM-killed) of the dead container, as its launcher tells them."""
        return self.launcher.exit(self)

    def rename(self, name: str, container_id: str) -> None:
        """Name it in messages and its log, and give it the id WorkerLost reports, by
        what its launcher knows once it runs (a Slurm job, step and node; the step):
        a process id of srun, on the caller's machine, tells a user nothing on a cluster."""
        _logger.debug("%s is %s", self.name, name)
        self.name = self.tag = name
        self.id = self.short_id = container_id

    def log(self, level: int, message: str, *args: Any) -> None:
        """Log to minipool.worker, tagged with the container."""
        _worker_logger.log(level, "%s: " + message, self.tag, *args, extra={"container": self.tag})

    def last_words(self) -> str:
        """The last lines of its stderr, to explain its end."""
        return "\n".join(self.stderr_tail) or "(nothing)"

    def end_log(self) -> None:
        """Log the last lines the container left without their newline."""
        self.stderr.end()
        self.between_tasks.end()

    def send(self, kind: int, task_id: int, payload: bytes) -> None:
        with self._send_lock:
            _stub.write_message(self.writev, kind, task_id, [payload])

    def _send_all(self, messages: list[tuple[int, bytes]], failed: list[OSError]) -> None:
        """Send the messages; a failure goes to `failed` (an ended stream: the receiver tells why)."""
        try:
            for kind, payload in messages:
                self.send(kind, 0, payload)
        except OSError as exc:
            failed.append(exc)

    @property
    def sending(self) -> bool:
        """Whether a send is under way (mostly its block thread's)."""
        return self._send_lock.locked()

    def keep_alive(self) -> None:
        """Send a KEEPALIVE, unless a send is under way (which says as much)."""
        if self._send_lock.acquire(blocking=False):
            try:
                _stub.write_message(self.writev, _stub.KEEPALIVE, 0, [])
            except OSError:
                pass  # the container is gone: its reader deals with that
            finally:
                self._send_lock.release()

    def send_tasks(self, tasks: list[tuple[int, _WorkItem]]) -> None:
        """Write the tasks in one go, noting the order in which the stub gets them."""
        parts = []
        for task_id, item in tasks:
            parts += [_stub.pack_header(item.kind, task_id, item.size), *item.parts]
        with self._send_lock:
            for task_id, _ in tasks:
                self.sent_order[task_id] = next(self._sends)
            _stub.send_parts(self.writev, parts)

    def task_seconds(self, item: _WorkItem) -> float:
        """How long the task that just ended ran: from when it was sent or the previous one ended."""
        now = time.monotonic()
        seconds = now - max(item.sent_at, self.last_done)
        self.last_done = now
        return seconds

    def receive(self, max_size: int, streams: tuple[int, ...] = ()) -> tuple[int, int, Any]:
        """The next message; a large one of the kinds `streams` as a worker_stub.Stream."""
        return _stub.read_message(self.channel.readinto, max_size, streams)

    def expire(self, now: float) -> bool:
        """Take the tasks past their deadline out of flight; True if there were any."""
        for task_id in [task_id for task_id, item in self.in_flight.items() if item.overdue(now)]:
            self.expired[task_id] = self.in_flight.pop(task_id)
        return bool(self.expired)

    def handshake(self, archive: bytes, hello: dict, deadline: float) -> dict:
        """Send the stub (BOOT) and HELLO, return the stub's READY; it says nothing before.

        The stub goes from a thread of its own while this one listens: a command that
        is no stub (a wrong entrypoint) may never read it, and what it says or its end
        must fail the start at once, not once a send blocked until the deadline."""
        self.channel.set_deadline(deadline)
        offer = self.direct.offer if self.direct is not None else {}
        boot = [(_stub.BOOT, archive), (_stub.HELLO, pickle.dumps({**hello, **offer}, _stub.PLAIN_PROTOCOL))]
        failed: list[OSError] = []
        sender = threading.Thread(
            target=self._send_all, args=(boot, failed), name=f"{self.channel.name}-boot", daemon=True
        )
        sender.start()
        try:
            kind, _, payload = self.receive(1 << 20)
        except BaseException:
            self.channel.hang_up()  # the sender may wait in a send the command never reads
            raise
        finally:
            sender.join()
        if failed:
            raise failed[0]
        if kind != _stub.READY:
            raise ValueError(f"expected READY, got message kind {kind}")
        ready = pickle.loads(payload)
        if self.direct is not None:
            self._go_direct(ready.get("socket", "its stub did not take the socket"), deadline)
        self.channel.set_deadline(None)
        return ready

    def _go_direct(self, why_not: str, deadline: float) -> None:
        """Move the protocol to the socket the stub connected to, unless it said why it could not."""
        direct, self.direct = self.direct, None
        assert direct is not None and isinstance(self.channel, _AttachChannel)
        try:
            if why_not:
                direct.channels.refuse(why_not)
                return
            self.channel.go_direct(direct.accept(deadline))
        finally:
            direct.close()
        self.writev = self.channel.writev
        direct.channels.connected()


def _hello(max_message_size: int, workers: int, silence: float) -> dict:
    """What the host tells a new stub (HELLO)."""
    return {
        "python": list(sys.version_info[:2]),
        "cloudpickle": cloudpickle is not None,
        "max_message_size": max_message_size,
        "workers": workers,
        "silence": silence,
    }


# The channel of every live container, closed in a forked child: a child that
# kept them open would keep the engine (or the runtime's process) from seeing
# stdin close, and the container would outlive its owner.
_channels: weakref.WeakSet[_Channel] = weakref.WeakSet()


def _close_channels_in_child() -> None:
    for channel in list(_channels):
        with contextlib.suppress(OSError):
            channel.close()
    for pool in _live_pools:
        pool.forget_in_child()
    _live_pools.clear()


# --------------------------------------------------------------------------- the pool


class _Starter:
    """Where the blocks' containers come from: each goes to the launcher with the
    most room for it, is started, gets the stub and must answer its handshake. A
    launcher that stops answering (an engine gone) loses its blocks to the others.
    """

    def __init__(self, launchers: Sequence[_Launcher], settings: _Settings) -> None:
        self.launchers = launchers
        self._settings = settings
        self._label = settings.label
        self._hello = _hello(settings.max_message_size, settings.workers_per_block, _HOST_SILENCE)
        self._lock = threading.Lock()  # the launchers' blocks and lost flags, and what follows
        self._ever_ready = False  # a container of the pool has been ready once

    def start(self, closing: Callable[[float], bool], unwanted: Callable[[], bool]) -> _Container | None:
        """A ready container on the launcher with the most room for it; None if the
        pool closes first (`closing(seconds)` waits that long for it to, and says
        whether it did), or no work wants it any more while it waits in a queue.

        An engine that stops answering loses its blocks to the others, and the pool
        breaks only when none is left. A start that fails on an engine that answers
        breaks the pool if no container of it was ever ready (the image or options
        are wrong); otherwise it is tried again, as the engine may only have hiccuped.
        """
        failures = 0
        failed: set[_Launcher] = set()
        while not closing(0):
            launcher = self._place(failed)
            try:
                return self._start_container(launcher, closing, unwanted)
            except StartupError as exc:
                with self._lock:
                    launcher.blocks -= 1
                    ever_ready = self._ever_ready
                if not launcher.answers():
                    self._lose_engine(launcher, exc)
                    continue
                failed.add(launcher)
                failures += 1
                if not ever_ready or failures == _REPLACEMENT_TRIES:
                    raise
                _logger.warning("pool %s: a container failed to start, trying again: %s", self._label, exc)
            if closing(1.0):
                break
        return None

    def stopped(self, container: _Container) -> None:
        """The container's block has let it go: its launcher has room again."""
        with self._lock:
            container.launcher.blocks -= 1

    def _place(self, failed: set[_Launcher]) -> _Launcher:
        """The launcher for a new container: the least loaded for its weight, among
        those where this block's start has not failed if any."""
        with self._lock:
            left = [launcher for launcher in self.launchers if not launcher.lost]
            if not left:
                raise StartupError(f"no engine is left: {', '.join(each.name for each in self.launchers)} are lost")
            launcher = min([each for each in left if each not in failed] or left, key=_Placement.load)
            launcher.blocks += 1
            return launcher

    def _lose_engine(self, engine: _Launcher, exc: StartupError) -> None:
        with self._lock:
            engine.lost = True
            left = sum(not other.lost for other in self.launchers)
        _logger.warning(
            "pool %s: the engine at %s does not answer; %d engine(s) left take its blocks (%s)",
            self._label, engine.name, left, exc,
        )

    def _start_container(
        self, launcher: _Launcher, closing: Callable[[float], bool], unwanted: Callable[[], bool]
    ) -> _Container | None:
        """Start a container with the launcher, send the stub once it runs, handshake;
        StartupError otherwise. None if the pool closes, or no work wants it, while the
        container waits to run (a Slurm job in the queue): startup_timeout counts from
        when it runs."""
        container = launcher.start(self._settings, lambda seconds: closing(seconds) or unwanted())
        if container is None:
            with self._lock:
                launcher.blocks -= 1
            return None
        try:
            runs = launcher.running(container, closing)
            if runs:
                deadline = time.monotonic() + self._settings.startup_timeout
                self._check_ready(container.handshake(self._settings.archive, self._hello, deadline))
        except BaseException as exc:
            try:
                if not isinstance(exc, Exception) or isinstance(exc, StartupError):
                    raise
                raise self._handshake_error(exc, container) from _bare(exc)
            finally:
                launcher.remove(container)
                launcher.release(container)
        if not runs:
            launcher.remove(container)
            launcher.release(container)
            self.stopped(container)
            return None
        with self._lock:
            self._ever_ready = True
        return container

    def _handshake_error(self, exc: Exception, container: _Container) -> StartupError:
        """Why the stub in a started container did not get to READY, with its stderr."""
        what = f"cannot start a container of image {self._settings.image!r} on {container.launcher.description}"
        python = self._settings.python
        # socket.timeout is TimeoutError only from Python 3.10 on.
        if isinstance(exc, (TimeoutError, socket.timeout)):
            container.end_log()
            return StartupError(
                f"{what}: the worker did not answer within startup_timeout={self._settings.startup_timeout} s; "
                f"its stderr:\n{container.last_words()}"
            )
        # Its stream ended, or a write to it failed: the worker is gone.
        if isinstance(exc, (EOFError, BrokenPipeError, ConnectionResetError)):
            exit_code, oom_killed = container.exit()
            container.end_log()
            # 126 and 127: the init (or the runtime) could not run the command at all.
            hint = (
                f"Is {python!r} in the image? Pass python= the path of its Python 3 interpreter"
                if exit_code in (126, 127)
                else f"Is {python!r} a Python >= 3.8 interpreter?"
            )
            return StartupError(
                f"{what}: the worker exited before its handshake ({_describe_exit(exit_code, oom_killed)}). "
                f"{hint} Its stderr:\n{container.last_words()}"
            )
        container.end_log()
        if isinstance(exc, (docker.errors.DockerException, OSError)):
            return StartupError(f"{what}: {exc}")
        return StartupError(f"{what}: the worker's handshake failed: {exc}; its stderr:\n{container.last_words()}")

    def _check_ready(self, ready: dict) -> None:
        python = ".".join(map(str, ready["python"]))
        if ready["pickle_protocol"] < _stub.PICKLE_PROTOCOL:
            raise StartupError(f"the image's Python {python} is too old: minipool needs Python >= 3.8")
        if ready["python"][:2] != list(sys.version_info[:2]):
            _logger.warning(
                "pool %s: the image has Python %s, this host %d.%d: importable functions work, but functions "
                "and classes from __main__ (sent by value) need the same minor version",
                self._label, python, *sys.version_info[:2],
            )


class _Reader:
    """A container's reader thread: settles each future as its answer arrives, logs
    and keeps what tasks write and, when the stream ends, has the pool put back
    what had not started and fails (or retries) what had."""

    def __init__(self, pool: _Pool, container: _Container, settings: _Settings) -> None:
        self._pool = pool
        self._container = container
        self._settings = settings
        self._label = settings.label

    def run(self) -> None:
        """Settle futures as results arrive; when the stream ends, fail what was in flight."""
        error: MiniPoolError | None = None
        try:
            self._settle_results()
        except (EOFError, OSError):
            self._container.end_log()
        except Exception as exc:
            error = ProtocolError(f"{self._container.name}: {exc}")
            _logger.error("pool %s: %s", self._label, error)
        finally:
            # Whatever ended the stream, the block thread must learn it and no future may hang.
            # (After a ProtocolError the stub may run the tasks still: they fail with it.)
            started, suspects = self._pool.stream_ended(self._container, requeue=error is None)
            _logger.debug("pool %s: stream of %s ended", self._label, self._container.name)
            if started:
                self._orphaned(started, error or self._container_lost())
            elif suspects:
                self._suspects_lost(suspects)

    def _settle_results(self) -> None:
        """Settle each future as its result arrives, until the stream ends."""
        container = self._container
        where = f"{container.name} of image {self._settings.image!r}"
        while True:
            kind, task_id, payload = container.receive(self._settings.max_message_size, streams=(_stub.RESULT,))
            if kind in (_stub.OUTPUT, _stub.DROPPED):
                self._task_output(kind, task_id, payload)
                continue
            if kind not in (_stub.RESULT, _stub.RAISED, _stub.LOST):
                raise ValueError(f"unexpected message kind {kind} for task {task_id}")
            # A large result is read as it is unpickled: its task is in flight until its
            # last byte is in, and died with its container if the stream breaks first.
            streamed = isinstance(payload, _stub.Stream)
            outcome = _outcome(kind, payload, where) if streamed else None
            item, timed_out = self._pool.answered(container, task_id, kind)
            if timed_out:
                continue  # the answer of a task that had just run out of time
            if item is None:
                raise ValueError(f"a result for task {task_id}, which is not running there")
            container.sent_order.pop(task_id, None)
            if kind == _stub.LOST:
                self._orphaned([item], self._process_lost(payload))
                continue
            item.keep_output()
            if not streamed:  # its own code may take its time: not against task_timeout
                outcome = _outcome(kind, payload, where)
            if isinstance(outcome, _Raised):
                item.future.set_exception(outcome.exception)
            else:
                item.future.set_result(outcome)
            del payload, outcome

    def _task_output(self, kind: int, task_id: int, payload: bytearray | mmap.mmap) -> None:
        """OUTPUT or DROPPED: what a task wrote, logged and kept for output()."""
        container = self._container
        data = bytes(payload)
        _stub.release(payload)
        item = self._pool.running(container, task_id)
        if kind == _stub.DROPPED:
            dropped = pickle.loads(data)["bytes"]
            container.log(logging.WARNING, "output truncated: %d more bytes were not logged", dropped)
        elif item is None:
            container.between_tasks.feed(data)
        else:
            item.note_output(container, data)

    def _orphaned(self, items: list[_WorkItem], error: MiniPoolError) -> None:
        """Tasks whose container died: run them again (retries) or fail them.

        This runs before the reader thread ends, and the block thread joins the
        reader before it decides whether the pool still has work: a requeued task
        always finds a block.
        """
        for item in items:
            item.keep_output()
            if isinstance(error, WorkerLost) and self._pool.retry(item, error):
                continue
            broken = self._pool.broken_by()
            if broken is not None:
                item.future.set_exception(broken)
            else:
                item.future.set_exception(error.after(item.attempts) if isinstance(error, WorkerLost) else error)

    def _suspects_lost(self, count: int) -> None:
        """Say why the tasks the container died with run again, uncharged."""
        container = self._container
        _logger.warning(
            "pool %s: %s died (%s) with %d quick tasks sent; each runs again alone, to learn which one "
            "ended it. Its last lines of output:\n%s",
            self._label, container.name, _describe_exit(*container.exit()), count, container.last_words(),
        )

    def _container_lost(self) -> WorkerLost:
        container = self._container
        exit_code, oom_killed = container.exit()
        what = f"{container.name} of image {self._settings.image!r} died while running the task"
        return self._lost(what, exit_code, oom_killed)

    def _process_lost(self, payload: bytearray | mmap.mmap) -> WorkerLost:
        """A LOST message: a worker process of the container died, another took its place."""
        exit_code = pickle.loads(payload)["exit_code"]
        what = f"a worker process in {self._container.name} died while running the task"
        return self._lost(what, exit_code, False)

    def _lost(self, what: str, exit_code: int | None, oom_killed: bool) -> WorkerLost:
        container = self._container
        message = (
            f"{what} ({_describe_exit(exit_code, oom_killed)}). Its last lines of output:\n{container.last_words()}"
        )
        _logger.warning("pool %s: %s", self._label, message)
        return WorkerLost(message, container.id, exit_code, oom_killed, container.stderr_tail)


class _Pool:
    """What the executor's threads share: the queue, the blocks, the state flags.

    The executor holds it; its threads hold it but never the executor, so a
    forgotten executor is collected and its finalizer shuts the pool down.
    """

    def __init__(self, launchers: Sequence[_Launcher], settings: _Settings, blocks: int) -> None:
        self._starter = _Starter(launchers, settings)
        self._settings = settings
        self._label = settings.label
        # _lock guards everything below; _changed wakes every thread waiting on it. The
        # lock is taken with a C lock's own `with`, which no signal can part from its
        # release: a Condition's __enter__ is Python code, and a KeyboardInterrupt that
        # lands as it returns leaves the lock held for good (a Ctrl-C in submit()).
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._pending: collections.deque[_WorkItem] = collections.deque()
        # Futures of app calls that wait for their inputs: the pool stays open for them.
        self._promised: set[Future] = set()
        self._shutdown = False
        self._broken: BaseException | None = None
        self._task_ids = itertools.count(1)
        self._paces: dict[tuple, float] = {}  # a function's seconds a task, a moving average
        self._block_numbers = itertools.count(1)
        self._blocks = 0  # blocks that run or start a container, and are not retiring
        self._alive = 0  # block threads not yet finished, retiring ones included
        self._finished = False  # every block stopped, every engine closed
        # Set with _finished, for the keepalive thread: a waiter on _changed would be
        # woken by every task's notify_all.
        self._finished_event = threading.Event()
        self._scale_up_after = 0.0  # no block is added before then (_SCALE_UP_PAUSE)
        self._containers: set[_Container] = set()  # ready, and taking tasks
        # Each of them has a condition of its own (with _lock), which its block thread
        # waits on for room (_next_tasks): an answer frees room in its own container alone,
        # and a task queued while every container is full is for none of them. With every
        # block thread waiting on _changed, each answer and each submit woke them all
        # (issue 21: with 4 blocks of 256 workers, block threads that found nothing to do
        # cost the caller 18-24 us a task).
        self._rooms: dict[_Container, threading.Condition] = {}
        self._threads: list[threading.Thread] = []
        # Reader threads run the futures' callbacks: see join().
        self._readers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        _live_pools.add(self)
        with self._lock:
            for _ in range(blocks):
                self._add_block()
        threading.Thread(target=self._keep_alive, name=f"minipool-{self._label}-keepalive", daemon=True).start()

    # -- called by reader threads

    def answered(self, container: _Container, task_id: int, kind: int) -> tuple[_WorkItem | None, bool]:
        """A task's answer came: take it out of flight, learn its function's pace.
        Returns its work item, and whether it had run out of time."""
        with self._lock:
            item = container.in_flight.pop(task_id, None)
            timed_out = task_id in container.expired
            if item is not None:
                container.backlog -= item.expected
                if kind != _stub.LOST:
                    pace = self._pace(item)
                    self._paces[item.pace_key] = pace + (container.task_seconds(item) - pace) / 5
            # Block threads wait for room while work waits, and for an idle container
            # to retire, replace or let go; for nothing else an answer changes. Waking
            # them for every answer cost a one-at-a-time task a fifth of its round trip.
            # The room is this container's: only its block thread may take the work.
            if not container.in_flight and self._idle_matters(container):
                self._notify_all()
            elif self._pending and container in self._rooms:
                self._rooms[container].notify()
        return item, timed_out

    def _notify_all(self) -> None:
        """Wake every thread waiting for the pool to change, block threads included (under the lock)."""
        self._changed.notify_all()
        for room in self._rooms.values():
            room.notify_all()

    def _offer(self) -> None:
        """Wake the block threads whose containers have room for the first task waiting (under the lock)."""
        for container, room in self._rooms.items():
            if self._has_room(container, self._pending[0]):
                room.notify()

    def _idle_matters(self, container: _Container) -> bool:
        """Whether its block thread acts when the container goes idle (under the lock)."""
        return self._settings.idle_timeout is not None or self._worn_out(container) or self._closing()

    def running(self, container: _Container, task_id: int) -> _WorkItem | None:
        with self._lock:
            return container.in_flight.get(task_id)

    def broken_by(self) -> BaseException | None:
        with self._lock:
            return self._broken

    def stream_ended(self, container: _Container, requeue: bool) -> tuple[list[_WorkItem], int]:
        """The container's stream ended: it takes no more tasks. With `requeue` (it
        died), what it had not started goes back to the front of the queue; the
        tasks it had started are returned, to fail or retry, with the number of
        suspects (below) that went back.

        The stub starts tasks in the order it got them, so only the first it got
        (one per worker) had started; the others are unharmed. But one worker may
        have finished the first few and held their results (worker_stub.Outbox):
        when it had more than one task, any of them may have ended it. Then none is
        charged: all go back, and those sent run alone from now on (suspects)."""
        suspects = 0
        with self._lock:
            container.lost = True
            in_flight = sorted(container.in_flight, key=lambda task_id: container.sent_order.get(task_id, math.inf))
            items = [container.in_flight[task_id] for task_id in in_flight]
            container.in_flight.clear()
            if requeue and self._broken is None:
                sent = sum(task_id in container.sent_order for task_id in in_flight)
                started = min(sent, self._settings.workers_per_block)
                if self._settings.workers_per_block == 1 and sent > 1:
                    suspects = sent
                    for item in items[:sent]:
                        item.suspect = True
                        item.keep_output()  # its next attempt logs as its new container's
                    started = 0
                self._pending.extendleft(reversed(items[started:]))
                items = items[:started]
            self._notify_all()
        return items, suspects

    def retry(self, item: _WorkItem, lost: WorkerLost) -> bool:
        """Queue a lost task to run first on the next free block, if it has retries left."""
        with self._lock:
            if len(item.attempts) >= self._settings.retries or self._broken is not None:
                return False
            item.attempts.append(lost)
            item.deadline = None
            self._pending.appendleft(item)
            self._notify_all()
        _logger.info("pool %s: running a lost task again (attempt %d)", self._label, len(item.attempts) + 1)
        return True

    # -- called by the executor

    def submit(self, item: _WorkItem, promised: Future | None = None) -> None:
        """Queue the task; when a container is idle and the message small, the
        caller's thread sends it at once, sparing a hand-off to the block thread.
        The task of an app call still promised (see promise()) is taken after
        shutdown too.

        A Ctrl-C may cut this anywhere (issue 20): the pool must then hold the task
        whole or not at all. Queueing it changes the pool by one append, which no
        signal splits (and withdraw() takes it back); sending it at once and adding
        a block take several steps, and hold a Ctrl-C back until they are done."""
        if self._pending or item.size > _DIRECT_SEND or not self._send_at_once(item, promised):
            with self._lock:
                self.check_open(promised)
                self._pending.append(item)
                self._scale_up()
                self._changed.notify_all()
                self._offer()

    def _send_at_once(self, item: _WorkItem, promised: Future | None) -> bool:
        """Send the task to an idle container from the caller's thread; False if none is idle."""
        with _CtrlCWaits():
            with self._lock:
                self.check_open(promised)
                # Not one that is being sent to: a large send would hold us (and a Ctrl-C)
                # until it is done.
                idle = (
                    c for c in self._containers
                    if not c.sending and self._has_free_worker(c) and self._has_room(c, item)
                )
                container = None if self._pending else next(idle, None)
                if container is None:
                    return False
                task_id = self._assign(container, item)
                assert task_id is not None  # the caller has not seen its future: none could cancel it
                if item.deadline is not None:
                    self._notify_all()  # for its block thread to watch
            self._send(container, [(task_id, item)])
        return True

    def withdraw(self, item: _WorkItem) -> None:
        """submit() raised, maybe after taking the task (a Ctrl-C): cancel it if it
        waits still, as the caller never got its future. A task a container has runs on."""
        with self._lock:
            queued = item in self._pending
            if queued:
                self._pending.remove(item)
        if queued:
            _cancel_queued(item)

    def check_open(self, promised: Future | None = None) -> None:
        """Raise what submit must raise when the pool takes no more work."""
        with self._lock:
            if self._broken is not None:
                # A pool that never started says so again (StartupError) to each submit.
                kind = type(self._broken) if isinstance(self._broken, BrokenContainerPool) else BrokenContainerPool
                raise kind(f"the pool cannot take work: {self._broken}") from self._broken
            if self._shutdown and promised not in self._promised:
                raise RuntimeError("cannot schedule new futures after shutdown")

    def promise(self, future: Future) -> None:
        """Keep the pool open, after shutdown too, until the app call whose future
        this is has submitted its task (kept()) or is done."""
        with self._lock:
            self.check_open()
            self._promised.add(future)
        future.add_done_callback(self.kept)

    def kept(self, future: Future) -> None:
        with self._lock:
            self._promised.discard(future)
            self._notify_all()
        self._finish_if_done()

    def shutdown(self, cancel_futures: bool = False) -> None:
        """Take no more work; with cancel_futures, cancel what waits and has never run
        (a task back in the queue after its container died is running: it stays)."""
        with self._lock:
            self._shutdown = True
            cancelled = [item for item in self._pending if not item.running] if cancel_futures else []
            promised = list(self._promised) if cancel_futures else []
            if cancel_futures:
                self._pending = collections.deque(item for item in self._pending if item.running)
            self._notify_all()
        for item in cancelled:
            _cancel_queued(item)
        for future in promised:
            future.cancel()  # its inputs are not done: it has not been submitted
        self._finish_if_done()

    def stop_containers(self, how: signal.Signals, caller: str) -> None:
        """terminate_workers() and kill_workers(): cancel queued work, signal every
        container now; the tasks they ran fail with BrokenContainerPool."""
        error = BrokenContainerPool(f"the pool's containers were stopped with {how.name} by {caller}")
        with self._lock:
            self._broken = self._broken or error
            self._shutdown = True
            containers = list(self._containers)
            queued = list(self._pending)
            self._pending.clear()
            self._notify_all()
        for item in queued:
            if item.running:
                item.future.set_exception(error)
            else:
                _cancel_queued(item)
        for container in containers:
            container.launcher.kill(container, how)
        self._finish_if_done()

    def join(self) -> None:
        """Wait until every block has stopped and its container is removed.

        From a done callback (run by one of our own threads) it returns at once:
        that thread cannot wait for itself; the pool still stops in the background.
        """
        me = threading.current_thread()
        if me in self._threads or me in self._readers:
            return
        with self._lock:
            self._changed.wait_for(lambda: self._finished)
        for thread in list(self._threads):
            thread.join()

    def forget_in_child(self) -> None:
        """In a forked child: the parent's threads are not here, so take no work.
        The lock may have been held by one of them at the fork: replace it."""
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._rooms = {}  # their conditions are of the lock replaced
        self._broken = BrokenContainerPool("this pool belongs to the process this one was forked from")
        self._finished = True  # nothing here to wait for

    # -- state

    def _closing(self) -> bool:
        return self._broken is not None or (self._shutdown and not self._pending and not self._promised)

    def _break(self, error: BaseException) -> None:
        """The pool cannot go on: fail what waits, let running tasks finish."""
        with self._lock:
            if self._broken is None:
                self._broken = error
            waiting = list(self._pending)
            self._pending.clear()
            self._notify_all()
        for item in waiting:
            if item.running or item.future.set_running_or_notify_cancel():
                item.future.set_exception(error)

    def _finish_if_done(self) -> None:
        """Once the pool closes and its last block has stopped: remove what is left,
        close the engines, wake join()."""
        with self._lock:
            if self._finished or self._alive or not self._closing():
                return
            self._finished = True  # claimed: this thread finishes the pool
            self._finished_event.set()
        for launcher in self._starter.launchers:
            launcher.close()
        _live_pools.discard(self)
        _logger.debug("pool %s: every block has stopped", self._label)
        with self._lock:
            self._notify_all()

    def _keep_alive(self) -> None:
        """Until the pool is finished, tell its containers (worker_stub.Channel) and
        its Slurm jobs' keepers now and then that the host is there."""
        while not self._finished_event.wait(_HOST_SILENCE / 6):
            with self._lock:
                containers = list(self._containers)
            for container in containers:
                container.keep_alive()
            for launcher in self._starter.launchers:
                launcher.keep_alive()

    # -- scaling

    def _add_block(self) -> None:
        """Start a block thread (under the lock). It waits for another block to be ready
        first (_FIRST_BLOCK_HEAD_START) only if the pool has a whole block already: a
        pool scaling up from no block starts at once, whatever the block's number (issue
        20), and so do all the nodes of its first block of several (Slurm): its job is
        granted whole, and its other nodes' steps have nothing to wait for (issue 21:
        with its last three steps started once the first was ready, a block of 4 nodes
        was ready 2.9-3.5 times as late as a bare `srun -N4 true`, and 2.5-3.1 times with
        all four started at once, on a 2-core machine where the four stubs' starts contend)."""
        # Counted and started, or neither: a Ctrl-C in submit() waits (see submit).
        with _CtrlCWaits():
            number = next(self._block_numbers)
            head_start = self._blocks >= self._settings.block_size
            self._blocks += 1
            self._alive += 1
            thread = threading.Thread(
                target=self._run_block, args=(number, head_start), name=f"minipool-{self._label}-block-{number}"
            )
            self._threads.append(thread)
            thread.start()
        self._notify_all()

    def _scale_up(self) -> None:
        """Add a block while work waits that no idle or starting block will take (under
        the lock); after a refused start (_SCALE_UP_PAUSE), only to a pool with none."""
        starting = self._blocks - len(self._containers)
        idle = any(self._has_free_worker(container) for container in self._containers)
        wanted = self._blocks < self._settings.max_blocks and len(self._pending) > starting and not idle
        paused = self._blocks and time.monotonic() < self._scale_up_after
        if wanted and not paused:
            # A block of several nodes comes whole (its job), each node a container.
            for _ in range(min(self._settings.block_size, self._settings.max_blocks - self._blocks)):
                self._add_block()

    def _retire_at(self, container: _Container) -> float | None:
        """When the idle container's block is to be removed (idle_timeout); None if never (under the lock).

        Never while work waits: a task put back after a crash may wait for this very
        block. A lost container's block replaces it instead of retiring.
        """
        idle_timeout = self._settings.idle_timeout
        if (
            idle_timeout is None
            or container.in_flight
            or container.lost
            or self._pending
            or self._blocks <= self._settings.min_blocks
        ):
            return None
        return container.last_done + idle_timeout

    # -- block threads

    def _run_block(self, number: int, head_start: bool) -> None:
        """Keep one container running and fed until the pool closes or the block
        retires; replace it when lost, timed out or worn out (max_tasks_per_block)."""
        container: _Container | None = None
        try:
            with self._lock:
                # The first block starts alone, so that the first result does not wait
                # for every container of the pool to be ready on a busy engine.
                if head_start:
                    self._changed.wait_for(lambda: self._containers or self._closing(), _FIRST_BLOCK_HEAD_START)
            started = time.monotonic()
            container = self._start_block()
            while container is not None:
                _logger.info(
                    "pool %s: block %d ready in %s on %s (%.2f s; %d of at most %d containers)",
                    self._label, number, container.name, container.launcher.name, time.monotonic() - started,
                    self._blocks, self._settings.max_blocks,
                )
                try:
                    self._feed(container)
                finally:
                    self._stop_container(container)
                if container.retired:
                    _logger.info("pool %s: block %d retired after idle_timeout", self._label, number)
                    break
                started = time.monotonic()
                container = self._start_block()
        except StartupError as exc:
            self._start_refused(number, exc)
        except Exception as exc:
            _logger.exception("pool %s: block %d failed", self._label, number)
            error = BrokenContainerPool(f"a block of pool {self._label} failed: {exc!r}")
            error.__cause__ = exc
            self._break(error)
        finally:
            with self._lock:
                self._alive -= 1
                if container is None or not container.retired:
                    self._blocks -= 1
                if not self._closing():
                    self._scale_up()  # work that waits always has a block to go to
            self._finish_if_done()

    def _start_refused(self, number: int, exc: StartupError) -> None:
        """The block could not start a container: only a pool that no other block
        serves is broken; else it goes on with those, and adds none for a while."""
        with self._lock:
            serving = len(self._containers)
            if serving:
                self._scale_up_after = time.monotonic() + _SCALE_UP_PAUSE
        if not serving:
            self._break(exc)
            return
        _logger.warning(
            "pool %s: block %d could not start a container; the pool goes on with %d block(s) and adds none "
            "for %.0f s: %s", self._label, number, serving, _SCALE_UP_PAUSE, exc,
        )

    def _start_block(self) -> _Container | None:
        """A ready container for the block, its reader started, taking tasks; None if
        the pool closes first."""
        container = self._starter.start(self._wait_closing, self._unwanted)
        if container is None:
            return None
        container.reader = threading.Thread(
            target=_Reader(self, container, self._settings).run,
            name=f"minipool-{self._label}-reader-{container.short_id}", daemon=True,
        )
        self._readers.add(container.reader)
        with self._lock:
            self._containers.add(container)
            self._rooms[container] = threading.Condition(self._lock)
            self._notify_all()
        container.reader.start()
        return container

    def _unwanted(self) -> bool:
        """Whether a block still waiting for its container (a Slurm job in the queue)
        may give up: an elastic pool with no work waiting and blocks to spare."""
        with self._lock:
            return (
                self._settings.idle_timeout is not None
                and not self._pending
                and self._blocks > self._settings.min_blocks
            )

    def _wait_closing(self, seconds: float) -> bool:
        """Wait up to `seconds` for the pool to close; whether it does."""
        with self._lock:
            return self._changed.wait_for(self._closing, seconds)

    def _feed(self, container: _Container) -> None:
        """Send tasks to the container until it is lost, timed out, worn out or the pool closes."""
        while tasks := self._next_tasks(container):
            self._send(container, tasks)
        if container.expired:
            self._time_out(container)

    def _send(self, container: _Container, tasks: list[tuple[int, _WorkItem]]) -> None:
        watch = self._watch_deadline(container, tasks)
        try:
            container.send_tasks(tasks)
        except OSError as exc:
            # Mostly the container is gone. Whatever the cause, the stream may have
            # stopped mid-message: end it, and the reader settles or requeues the tasks.
            _logger.debug("pool %s: send to %s failed: %s", self._label, container.name, exc)
            container.channel.hang_up()
        finally:
            if watch is not None:
                watch.cancel()

    def _watch_deadline(self, container: _Container, tasks: list[tuple[int, _WorkItem]]) -> threading.Timer | None:
        """A large task's send may outlast its task_timeout: the stub unpickles it as it
        reads, and its code may stall (issue 20). The block thread, stuck in the send,
        cannot see the deadline then: a timer times the task out and ends the stream,
        which ends the send. None for a send that returns at once."""
        deadlines = [item.deadline for _, item in tasks if item.deadline is not None]
        if not deadlines or sum(item.size for _, item in tasks) <= _DIRECT_SEND:
            return None
        timer = threading.Timer(min(deadlines) - time.monotonic(), self._expire_now, (container,))
        timer.name = f"minipool-{self._label}-deadline-{container.short_id}"
        timer.daemon = True
        timer.start()
        return timer

    def _expire_now(self, container: _Container) -> None:
        """Take the container's overdue tasks out of flight and hang up: its block thread
        then times them out (_feed)."""
        with self._lock:
            # Fired as the send ended, it may find the block thread timing the tasks out already.
            expired = container in self._containers and container.expire(time.monotonic())
        if expired:
            container.channel.hang_up()

    def _time_out(self, container: _Container) -> None:
        """Kill the container whose task ran out of time, then fail that task."""
        _logger.warning("pool %s: killing %s: its task ran out of time", self._label, container.name)
        container.launcher.remove(container)
        for item in container.expired.values():
            item.keep_output()
            item.future.set_exception(
                FuturesTimeoutError(
                    f"the task ran longer than task_timeout={self._settings.task_timeout} s; "
                    f"its {container.name} was killed"
                )
            )

    def _next_tasks(self, container: _Container) -> list[tuple[int, _WorkItem]]:
        """Wait for tasks the container has room for (as many as fit); [] when it should stop."""
        with self._lock:
            while True:
                tasks = []
                while self._pending and self._has_room(container, self._pending[0]):
                    task_id = self._assign(container, self._pending.popleft())
                    if task_id is not None:
                        tasks.append((task_id, container.in_flight[task_id]))
                if tasks:
                    return tasks
                now = time.monotonic()
                retire_at = self._retire_at(container)
                if retire_at is not None and retire_at <= now:
                    container.retired = True
                    self._blocks -= 1
                if container.lost or container.retired or container.expire(now) or (
                    (self._worn_out(container) or self._closing()) and not container.in_flight
                ):
                    # No more tasks for it, from its block or from submit().
                    self._containers.discard(container)
                    self._rooms.pop(container, None)
                    return []
                wake_at = [item.deadline for item in container.in_flight.values() if item.deadline is not None]
                wake_at += [retire_at] if retire_at is not None else []
                self._rooms[container].wait(min(wake_at) - now if wake_at else None)

    def _worn_out(self, container: _Container) -> bool:
        limit = self._settings.max_tasks_per_block
        return limit is not None and container.sent >= limit

    def _has_room(self, container: _Container, item: _WorkItem) -> bool:
        """Whether the container may take the task now (under the lock)."""
        return (
            self._broken is None
            and not container.lost
            and not container.expired
            and not self._worn_out(container)
            and self._pipelines(container, item)
        )

    def _pipelines(self, container: _Container, item: _WorkItem) -> bool:
        """Whether the task may join those in flight: a worker is free, or all of
        them together are quick (_PIPELINE_SECONDS) (under the lock)."""
        if self._has_free_worker(container):
            return True
        # task_timeout kills the whole container: tasks queued behind the late one
        # would be lost with it, so with a timeout there is one task in flight per worker.
        if self._settings.task_timeout is not None or len(container.in_flight) >= _MAX_IN_FLIGHT:
            return False
        if item.suspect or container.suspect_running:
            return False
        return container.backlog + self._pace(item) <= _PIPELINE_SECONDS * self._settings.workers_per_block

    def _has_free_worker(self, container: _Container) -> bool:
        return len(container.in_flight) < self._settings.workers_per_block

    def _pace(self, item: _WorkItem) -> float:
        return self._paces.get(item.pace_key, _FIRST_PACE)

    def _assign(self, container: _Container, item: _WorkItem) -> int | None:
        """Put the task in the container's flight (under the lock); its task id, or
        None if it was cancelled meanwhile."""
        if not item.running and not item.future.set_running_or_notify_cancel():
            return None
        item.running = True
        item.sent_at = time.monotonic()
        if self._settings.task_timeout is not None:
            item.deadline = item.sent_at + self._settings.task_timeout
        task_id = next(self._task_ids)
        if not container.in_flight:
            container.suspect_running = item.suspect
        container.in_flight[task_id] = item
        # What the task adds to the backlog; after a timeout or with the container
        # lost, the backlog no longer matters: it takes no more tasks.
        item.expected = self._pace(item)
        container.backlog += item.expected
        container.sent += 1
        return task_id

    def _stop_container(self, container: _Container) -> None:
        """Tell the stub to exit, and wait until the container is removed.

        A STOP message rather than closing our side of the socket: half-closing a
        TLS socket drops its TLS state while the reader still reads.
        """
        reader = container.reader
        assert reader is not None
        with self._lock:
            self._containers.discard(container)  # already, unless its block failed
            self._rooms.pop(container, None)
        self._starter.stopped(container)
        with contextlib.suppress(OSError):
            container.send(_stub.STOP, 0, b"")
        reader.join(_EXIT_GRACE)
        if not reader.is_alive():
            # Its stream has ended: the stub is exiting. Removed by force in its last
            # moments, it would be killed (137) for nothing (seen once in CI).
            container.exit()
        container.launcher.remove(container)
        reader.join(_EXIT_GRACE)
        if container.lost:
            # Its reader is past reading, settling or requeueing what was in flight:
            # wait for it, so the pool's pending work is complete before this block
            # decides whether the pool still has work.
            reader.join()
        container.launcher.release(container)
        _logger.debug("pool %s: %s stopped", self._label, container.name)

# Pools whose threads still run, shut down and joined at interpreter exit.
_live_pools: set[_Pool] = set()
_exit_hooks_installed = False


def _python_exit() -> None:
    """At interpreter exit: finish queued work, stop every container. After an
    uncaught exception (Ctrl-C, say) queued work is cancelled and only running
    tasks are waited for; a Ctrl-C meanwhile kills the containers."""
    # sys.last_value is set once an exception reaches the top; in an interactive
    # session that happens without the program ending.
    failed = getattr(sys, "last_value", None) is not None and not hasattr(sys, "ps1")
    with contextlib.suppress(KeyboardInterrupt):
        _close(list(_live_pools), cancel_futures=failed)


def _close(pools: list[_Pool], cancel_futures: bool) -> None:
    """Shut the pools down and wait for them. A Ctrl-C while waiting kills their
    containers (their tasks fail with BrokenContainerPool), waits for their
    removal, and is raised."""
    for pool in pools:
        pool.shutdown(cancel_futures)
    try:
        for pool in pools:
            pool.join()
    except KeyboardInterrupt:
        for pool in pools:
            pool.stop_containers(signal.SIGKILL, "a Ctrl-C while the pool was shutting down")
        for pool in pools:
            pool.join()
        raise


def _install_exit_hooks() -> None:
    """Once, when the first executor starts: nothing happens at import time."""
    global _exit_hooks_installed
    if _exit_hooks_installed:
        return
    _exit_hooks_installed = True
    # Like concurrent.futures: this runs before the interpreter joins non-daemon
    # threads, so block threads learn that they should stop.
    threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
    os.register_at_fork(after_in_child=_close_channels_in_child)


# --------------------------------------------------------------------------- the executor


def _check_count(name: str, value: Any, least: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a whole number{' or None' if optional else ''}, not {value!r}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, not {value!r}")


def _check_seconds(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds{' or None' if optional else ''}, not {value!r}")
    if not 0 < value <= threading.TIMEOUT_MAX:
        raise ValueError(f"{name} must be > 0 and <= {threading.TIMEOUT_MAX:.0f} seconds, not {value!r}")


# What docker's containers.create takes besides image and command.
_CREATE_OPTIONS = frozenset(
    [
        *docker.models.containers.RUN_CREATE_KWARGS,
        *docker.models.containers.RUN_HOST_CONFIG_KWARGS,
        *["network", "networking_config", "ports", "volumes"],  # what create() takes apart itself
    ]
)


def _check_container_options(options: Mapping[str, Any]) -> None:
    """A misspelt option is named now, not as a failed start of every container."""
    for key in options:
        if key not in _CREATE_OPTIONS:
            close = difflib.get_close_matches(str(key), _CREATE_OPTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"container_options: docker's containers.create takes no option {key!r}{hint}")


def _check_runtime(runtime: Any, engine: Any, container_options: Any) -> None:
    if isinstance(runtime, Command):
        pass
    elif not isinstance(runtime, str):
        raise TypeError(f"runtime must be one of {', '.join(_RUNTIMES)} or a minipool.Command, not {runtime!r}")
    elif runtime not in _RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(_RUNTIMES)} or a minipool.Command, not {runtime!r}")
    if runtime != "docker" and (engine is not None or container_options):
        raise ValueError(f"engine= and container_options are for runtime='docker', not {runtime!r}")


def _check_provider(provider: Any, runtime: Any) -> None:
    if provider is not None and not isinstance(provider, Slurm):
        raise TypeError(f"provider must be a minipool.Slurm or None (this machine), not {provider!r}")
    if provider is not None and runtime == "docker":
        raise ValueError(
            "provider=Slurm(...) runs each block's command as a Slurm job: give a runtime run as a command "
            "(charliecloud, apptainer, singularity, shifter or Command(...)), not runtime='docker'"
        )


def _check_name(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {value!r}")
    if not value.strip():
        raise ValueError(f"{name} must not be empty")


# --------------------------------------------------------------------------- workflows


def _inputs(args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Future]:
    """The distinct Futures among a call's top-level arguments."""
    return list({id(value): value for value in (*args, *kwargs.values()) if isinstance(value, Future)}.values())


def _when_all_done(futures: list[Future], then: Callable[[], None]) -> None:
    """Call `then` once, in the thread that completes the last of `futures`."""
    left = len(futures)
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        nonlocal left
        with lock:
            left -= 1
            last = left == 0
        if last:
            then()

    for future in futures:
        future.add_done_callback(one_done)


def _input_error(fn: Callable[..., Any], inputs: list[Future]) -> DependencyError | None:
    """A DependencyError if an input failed or was cancelled, else None."""
    for future in inputs:
        cause = CancelledError() if future.cancelled() else future.exception()
        if cause is not None:
            error = DependencyError(f"an input of {getattr(fn, '__qualname__', fn)!s} failed: {cause!r}")
            error.__cause__ = cause
            return error
    return None


def _notify_cancel(future: Future) -> None:
    """Make a cancelled future visible to wait() and as_completed(), as executors do."""
    if future.cancelled():
        future.set_running_or_notify_cancel()


def _cancel_with(task: Future, future: Future) -> None:
    """The app call's future was cancelled: so is its task, unless it runs (a cached
    call's task is a follower of its own: the task it shares goes on)."""
    if future.cancelled():
        task.cancel()


def _follower(task: Future) -> Future:
    """A future of the caller's own that ends as `task` does; cancelling it leaves
    `task` alone, as identical cached calls share it."""
    future: Future = Future()
    future.add_done_callback(_notify_cancel)
    task.add_done_callback(lambda done: _copy_outcome(done, future))
    return future


def _copy_outcome(source: Future, target: Future) -> None:
    """Settle `target` as `source` was settled, unless `target` was cancelled meanwhile."""
    if source in _outputs:
        _outputs[target] = _outputs[source]
    with contextlib.suppress(InvalidStateError):
        if source.cancelled():
            target.cancel()
        elif source.exception() is not None:
            target.set_exception(source.exception())
        else:
            target.set_result(source.result())


class _ResultsFile:
    """Pickled results in a sqlite3 file, each with the digest of its pickle, which
    is checked on reading: a damaged entry is an error, never a wrong result."""

    FORMAT = "minipool results 1"
    TABLES = frozenset({"about", "results"})

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "minipool-results.sqlite3")
        self._lock = threading.Lock()  # one connection, used by the threads that settle futures
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            with self._lock, self._transaction():
                self._check_format()
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"{self.path} is not a minipool results cache, or is damaged: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")  # another process may be creating the file
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _check_format(self) -> None:
        """Make the tables of a new file; refuse a file that holds anything else."""
        tables = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            self._db.execute("CREATE TABLE about (format TEXT NOT NULL)")
            self._db.execute("CREATE TABLE results (key BLOB PRIMARY KEY, digest BLOB NOT NULL, result BLOB NOT NULL)")
            self._db.execute("INSERT INTO about VALUES (?)", (self.FORMAT,))
            return
        formats = list(self._db.execute("SELECT format FROM about")) if "about" in tables else []
        if tables != self.TABLES or formats != [(self.FORMAT,)]:
            raise CacheError(f"{self.path} is not a minipool results cache (tables {sorted(tables)}, format {formats})")

    def get(self, key: bytes) -> tuple[bool, Any]:
        """(True, the result) of the call, or (False, None) if none is kept."""
        with self._lock:
            try:
                row = self._db.execute("SELECT digest, result FROM results WHERE key = ?", (key,)).fetchone()
            except sqlite3.DatabaseError as exc:
                raise CacheError(f"cannot read the results cache {self.path}: {exc}") from exc
        if row is None:
            return False, None
        digest, result = row
        # sqlite keeps whatever type was written: a damaged row may hold a number or text.
        if not isinstance(result, bytes) or hashlib.sha256(result).digest() != digest:
            raise CacheError(f"a damaged entry in the results cache {self.path}: remove the file to start afresh")
        try:
            return True, pickle.loads(result)
        except Exception as exc:
            raise CacheError(f"a result in {self.path} cannot be unpickled here: {exc!r}") from exc

    def put(self, key: bytes, value: Any) -> None:
        """Keep a result; one that cannot be pickled or written is only logged."""
        try:
            result = b"".join(_stub.pickle_parts(_Pickler, value))
            with self._lock:
                self._db.execute(
                    "INSERT OR REPLACE INTO results VALUES (?, ?, ?)", (key, hashlib.sha256(result).digest(), result)
                )
        except Exception as exc:  # a full disk, a read-only file, an unpicklable result
            _logger.warning("cannot keep a result in the results cache %s: %r", self.path, exc)


class _Results:
    """An app's results cache: calls that pickle to the same bytes (for the same
    image) share one result. In memory, the future of each call, so an identical
    call in flight shares the first one's; on disk (cache="dir"), the result of
    each call that succeeded, so a re-run after a crash skips finished work. A
    call that failed or was cancelled is not kept."""

    def __init__(self, image: str, directory: str | None) -> None:
        self._image = image.encode()
        self._futures: dict[bytes, Future] = {}
        self._lock = threading.Lock()
        self._file = _ResultsFile(directory) if directory is not None else None

    def key(self, parts: list) -> bytes:
        digest = hashlib.sha256(self._image + b"\0")
        for part in parts:
            digest.update(part)
        return digest.digest()

    def claim(self, key: bytes, future: Future) -> Future | None:
        """The future of an identical call, or None: then `future` is the call's."""
        with self._lock:
            known = self._futures.get(key)
            if known is None and self._file is not None:
                found, result = self._file.get(key)
                if found:
                    known = self._futures[key] = Future()
                    known.set_result(result)
            if known is not None:
                return known
            self._futures[key] = future
        future.add_done_callback(lambda done: self._settled(key, done))
        return None

    def _settled(self, key: bytes, future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            with self._lock:
                if self._futures.get(key) is future:  # not a later call's
                    del self._futures[key]
        elif self._file is not None:
            self._file.put(key, future.result())


_EngineSpec = Union[docker.DockerClient, str, None]


class ContainerPoolExecutor(Executor):
    """An Executor that runs calls in a pool of long-lived containers of one image.

    image: the image to run; it needs a Python 3 interpreter (>= 3.8).
    blocks: how many containers to start with (0: none until work comes); each
        runs one task at a time per worker (quick ones pipelined). 1 by default.
    max_workers: another name for blocks, as concurrent.futures code passes it, so
        that functools.partial(ContainerPoolExecutor, image) can stand in for
        ProcessPoolExecutor; give one or the other.
    engine: a docker.DockerClient, an engine URL ("unix://...", "tcp://..."), or
        None for docker.from_env(); or a list of them, each optionally as an
        (engine, weight) pair: blocks go to the engine with the fewest for its
        weight (1 by default). An engine that stops answering loses its blocks
        to the others; their running tasks are retried per `retries`.
    runtime: "docker" (the default): containers made through engine=, Docker's or
        Podman's API. Or a runtime run as a command, each block a child process
        whose stdin and stdout carry the tasks: "charliecloud" (ch-run; image is
        an image directory), "apptainer" or "singularity" (exec; image is a .sif
        or a URI), "shifter" (image as shifter --image takes it), or
        Command(argv), any command that runs a program in an image with its
        stdin and stdout tied to ours. engine= and container_options are the
        engine's alone.
    channel: how tasks and results reach containers made through an engine.
        "auto" (the default): where the engine runs on this machine, a unix socket
        per container, in a directory of the pool's mounted into it (several
        times quicker than the engine's attach stream); else, or where the
        container cannot use it, the attach stream (logged once at INFO, with the
        reason). "socket": the unix socket or StartupError. "attach": the attach
        stream alone.
    provider: where the blocks run: None, this machine; or Slurm(...), each block
        a Slurm job of nodes_per_block nodes, each node running the runtime's
        command (runtime= must be one run as a command) as a step under srun,
        with workers_per_block workers and as many cores. A step that ends is
        replaced in its job; a job Slurm ends loses all its nodes (WorkerLost,
        retries) and a new job replaces it. A job waiting in the queue is
        logged, and startup_timeout counts from when it runs.
    python: the interpreter's name or path inside the image.
    workdir: the stub's working directory (default: the image's WorkingDir); it is
        on the stub's sys.path, so modules there are importable.
    environment, volumes: as docker's containers.create takes them (a mapping or
        "NAME=value"; {host: {"bind": path, "mode": "ro"}} or "host:path:mode").
    ship: paths of local modules or packages copied into every container and put
        first on its sys.path.
    container_options: passed unchanged to docker's containers.create (mem_limit,
        nano_cpus, ulimits, user, device_requests, runtime, network_mode, ...);
        ours (network none, no capabilities, no-new-privileges, a pids limit, log
        driver none, auto_remove, init) are defaults under it.
    startup_timeout: seconds a started container's worker may take to answer.
    task_timeout: seconds a task may run; then its container is killed and
        replaced, and its future raises TimeoutError. With it, tasks are not
        pipelined (a kill would take the tasks queued behind).
    retries: how many times a task whose container died is run again (first in
        line for the next free block) before it fails with WorkerLost. A quick
        task that was in flight with others when they died is not charged: it
        runs again alone, which names the one that ends its container.
    max_tasks_per_block: replace a container after it ran this many tasks.
    max_message_size: bytes; a larger argument or result fails its future.
    min_blocks, max_blocks, idle_timeout: elastic blocks. While work waits and
        no block is idle, blocks are added, up to max_blocks (default: blocks);
        a block idle for idle_timeout seconds is removed, down to min_blocks.
    workers_per_block: worker processes in each container, sharing its channel,
        so that one container uses several cores. One that dies is replaced in
        its container; its task fails with WorkerLost (or is retried).
    label: a name for the pool in logs, thread names and container labels.
    """

    def __init__(
        self,
        image: str,
        blocks: int | None = None,
        *,
        max_workers: int | None = None,
        engine: _EngineSpec | list[_EngineSpec | tuple[_EngineSpec, float]] = None,
        runtime: str | Command = "docker",
        channel: str = "auto",
        provider: Slurm | None = None,
        python: str = "python3",
        workdir: str | None = None,
        environment: Mapping[str, str] | Sequence[str] | None = None,
        volumes: Mapping[str, Any] | Sequence[str] | None = None,
        ship: Iterable[str | os.PathLike] = (),
        container_options: Mapping[str, Any] | None = None,
        startup_timeout: float = 60.0,
        task_timeout: float | None = None,
        retries: int = 0,
        max_tasks_per_block: int | None = None,
        max_message_size: int = _MAX_MESSAGE,
        min_blocks: int = 0,
        max_blocks: int | None = None,
        idle_timeout: float | None = None,
        workers_per_block: int = 1,
        label: str | None = None,
    ) -> None:
        _check_name("image", image)
        _check_name("python", python)
        if blocks is not None and max_workers is not None:
            raise TypeError("give blocks= or max_workers= (another name for it), not both")
        blocks = next((count for count in (blocks, max_workers) if count is not None), 1)
        _check_count("blocks" if max_workers is None else "max_workers", blocks, 0)
        _check_count("min_blocks", min_blocks, 0)
        _check_count("max_blocks", max_blocks, 1, optional=True)
        max_blocks = max(blocks, 1) if max_blocks is None else max_blocks
        if not min_blocks <= blocks <= max_blocks:
            raise ValueError(f"need min_blocks <= blocks <= max_blocks, not {min_blocks}, {blocks}, {max_blocks}")
        _check_seconds("idle_timeout", idle_timeout, optional=True)
        _check_count("workers_per_block", workers_per_block, 1)
        if workers_per_block > _MAX_WORKERS:
            raise ValueError(f"workers_per_block must be <= {_MAX_WORKERS}, not {workers_per_block}")
        _check_seconds("startup_timeout", startup_timeout)
        _check_seconds("task_timeout", task_timeout, optional=True)
        _check_count("retries", retries, 0)
        _check_count("max_tasks_per_block", max_tasks_per_block, 1, optional=True)
        _check_count("max_message_size", max_message_size, 1 << 16)
        if isinstance(ship, (str, os.PathLike)):
            raise TypeError(f"ship must be a list of paths, not the single path {ship!r}")
        shipped = [os.fspath(path) for path in ship]
        for path in shipped:
            if not os.path.exists(path):
                raise ValueError(f"ship: {path!r} does not exist")
        _check_runtime(runtime, engine, container_options)
        if channel not in _CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(_CHANNELS)}, not {channel!r}")
        if channel != "auto" and runtime != "docker":
            raise ValueError(f"channel={channel!r} is for runtime='docker': {runtime!r} talks over its process's pipes")
        _check_provider(provider, runtime)
        _check_container_options(container_options or {})
        # A path (an image directory, a .sif) makes a long label: its last part is enough.
        self._label = label or (image if runtime == "docker" else os.path.basename(os.path.normpath(image)))
        self._image = image
        self._max_message_size = max_message_size
        pool_id = uuid.uuid4().hex[:12]
        nodes = 1 if provider is None else provider.nodes_per_block  # a container each
        launchers: list[_Launcher] = []
        if runtime == "docker":
            launchers += _connect_all(engine, max_blocks + 4, image, pool_id, self._label, channel)
        else:
            command = _open_command(runtime, image, python, workdir, environment, volumes)
            if provider is not None:
                command = _open_slurm(provider, command, self._label, pool_id, workers_per_block)
            launchers.append(command)
        try:
            settings = _Settings(
                image=image,
                python=python,
                label=self._label,
                pool_id=pool_id,
                create_options=self._create_options(
                    image, python, workdir, environment, volumes, container_options, pool_id
                ),
                archive=_stub_archive(shipped),
                startup_timeout=startup_timeout,
                task_timeout=task_timeout,
                retries=retries,
                max_tasks_per_block=max_tasks_per_block,
                max_message_size=max_message_size,
                min_blocks=min_blocks * nodes,
                max_blocks=max_blocks * nodes,
                block_size=nodes,
                idle_timeout=idle_timeout,
                workers_per_block=workers_per_block,
            )
            _install_exit_hooks()
            self._pool = _Pool(launchers, settings, blocks * nodes)
        except BaseException:
            for made in launchers:
                made.close()
            raise
        # A forgotten executor shuts its pool down when collected; exit is _python_exit's.
        weakref.finalize(self, self._pool.shutdown).atexit = False
        _logger.debug("pool %s: starting %d block(s) of %s", self._label, blocks, image)

    def _create_options(
        self,
        image: str,
        python: str,
        workdir: str | None,
        environment: Any,
        volumes: Any,
        container_options: Mapping[str, Any] | None,
        pool_id: str,
    ) -> dict:
        """containers.create's arguments: our defaults, the user's options over them,
        then what the pool cannot work without."""
        options: dict[str, Any] = {
            # Safe defaults: a task reaches no network, holds no capability, cannot
            # gain privileges through setuid binaries and cannot fork without end.
            "network_mode": "none",
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "pids_limit": _PIDS_LIMIT,
            # Through the default json-file driver every result byte would also be
            # written to disk, and streaming is ten times slower.
            "log_config": LogConfig(type=LogConfig.types.NONE),
            "auto_remove": True,
            # tini as PID 1: the stub then has ordinary signal handling (PID 1 ignores
            # signals it has no handler for) and a task's orphaned children are reaped.
            "init": True,
        }
        options.update(container_options or {})
        if workdir is not None:
            options["working_dir"] = workdir
        if environment is not None:
            options["environment"] = environment
        if volumes is not None:
            options["volumes"] = volumes
        options["labels"] = {
            **options.get("labels", {}),
            "minipool": __version__,
            "minipool.host": socket.gethostname(),
            "minipool.pid": str(os.getpid()),
            "minipool.executor": pool_id,
            "minipool.label": self._label,
        }
        # stdin_open without detach makes docker-py set StdinOnce: the engine closes
        # the stub's stdin when our attach connection drops, even if we are killed.
        options.update(
            image=image,
            command=_worker_command(python),
            stdin_open=True,
            tty=False,
            detach=False,
        )
        return options

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._submit(_stub.CALL, (fn, args, kwargs))

    submit.__doc__ = Executor.submit.__doc__

    def _submit_chunk(self, fn: Callable[..., Any], chunk: list) -> Future:
        return self._submit(_stub.CHUNK, (fn, chunk))

    def _submit(
        self, kind: int, call: tuple, promised: Future | None = None, results: _Results | None = None
    ) -> Future:
        future: Future = Future()
        try:
            parts, size = _pickle_call(call, self._max_message_size)
        except (TypeError, ValueError) as exc:
            # Like ProcessPoolExecutor: the future fails, the pool goes on.
            self._pool.check_open(promised)
            future.set_exception(exc)
            return future
        if results is None:
            self._take(_WorkItem(future, kind, call[0], parts, size), promised)
            return future
        # A buffer the caller still holds could change before it is sent: the key
        # must be of the bytes that go.
        parts = [part if isinstance(part, bytes) else bytes(part) for part in parts]
        item = _WorkItem(future, kind, call[0], parts, size)
        # Claimed, the future must settle, or identical calls wait for ever: a Ctrl-C
        # waits until the pool has its task and the caller's future follows it (a
        # Future's own lock is a Python Condition's, which a signal can leave held).
        try:
            with _CtrlCWaits():
                shared = results.claim(results.key(parts), future)
                if shared is not None:
                    return _follower(shared)
                self._take(item, promised)
                # Each cached call has a future of its own: cancelling one cancels no other.
                return _follower(future)
        except BaseException:
            self._pool.withdraw(item)  # the Ctrl-C raised after all: the caller has no future
            raise

    def _take(self, item: _WorkItem, promised: Future | None) -> None:
        """Give the task to the pool. If that raises (a Ctrl-C, a pool shut down),
        the task is the pool's, or withdrawn, or its future has the error: an
        identical call may share it, and the cache then forgets it."""
        try:
            self._pool.submit(item, promised)
        except BaseException as exc:
            self._pool.withdraw(item)
            if not item.running and not item.future.done():  # it never was the pool's
                item.future.set_exception(exc)
            raise

    def app(
        self, fn: Callable[..., Any] | None = None, /, *, cache: bool | str | os.PathLike = False
    ) -> Any:
        """Decorator, bare (@pool.app) or with options (@pool.app(cache=True)):
        calling the function runs it in this pool and returns a Future;
        `fn.__wrapped__` is the plain function.

        Arguments that are Futures (top-level positional or keyword, from any
        executor) stand for their results: the call is submitted once they are
        done, without blocking the caller, and fails with DependencyError if one
        of them failed. The pool's shutdown(wait=True) waits for such calls too.

        cache=True: a call that pickles to the same bytes as an earlier one (same
        function, same arguments) returns the earlier one's future; cache="dir"
        also keeps each result in dir/minipool-results.sqlite3, for later runs.
        """
        if fn is None:
            return functools.partial(self.app, cache=cache)
        results = None if cache is False else _Results(self._image, None if cache is True else os.fspath(cache))

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Future:
            return self._call_app(fn, results, args, kwargs)

        return call

    def _call_app(self, fn: Callable[..., Any], results: _Results | None, args: tuple, kwargs: dict) -> Future:
        inputs = _inputs(args, kwargs)
        if not inputs:
            return self._submit(_stub.CALL, (fn, args, kwargs), results=results)
        future: Future = Future()
        future.add_done_callback(_notify_cancel)
        try:
            with _CtrlCWaits():
                # A promise the pool holds keeps it open: it must be kept, or the future cancelled.
                self._pool.promise(future)
                _when_all_done(inputs, lambda: self._dispatch(future, fn, results, args, kwargs, inputs))
        except BaseException:
            future.cancel()  # the Ctrl-C raised: the caller has no future
            raise
        return future

    def _dispatch(
        self, future: Future, fn: Callable[..., Any], results: _Results | None, args: tuple, kwargs: dict,
        inputs: list[Future],
    ) -> None:
        """The app call's inputs are done: submit it with their results in their place."""
        try:
            if future.done():
                return  # cancelled meanwhile
            error = _input_error(fn, inputs)
            if error is not None:
                future.set_exception(error)
                return
            args = tuple(value.result() if isinstance(value, Future) else value for value in args)
            kwargs = {name: value.result() if isinstance(value, Future) else value for name, value in kwargs.items()}
            task = self._submit(_stub.CALL, (fn, args, kwargs), promised=future, results=results)
        except Exception as exc:  # the pool is broken
            with contextlib.suppress(InvalidStateError):
                future.set_exception(exc)
            return
        finally:
            self._pool.kept(future)
        future.add_done_callback(functools.partial(_cancel_with, task))
        task.add_done_callback(lambda done: _copy_outcome(done, future))

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """Like Executor.map (CPython 3.14's, with buffersize); each chunk of
        `chunksize` calls travels as one message.

        buffersize: at most this many chunks are submitted ahead of the one whose
        results are being yielded, so that a huge or endless input is read as the
        results are consumed; None submits them all at once.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0.")
        end = None if timeout is None else time.monotonic() + timeout
        chunks = _chunks(iterables, chunksize)
        submitted = collections.deque(self._submit_chunk(fn, chunk) for chunk in itertools.islice(chunks, buffersize))
        return self._results(fn, chunks, submitted, buffersize, end)

    def _results(
        self, fn: Callable[..., Any], chunks: Iterator[list], submitted: collections.deque[Future],
        buffersize: int | None, end: float | None,
    ) -> Iterator[Any]:
        """The chunks' results in order, submitting one more chunk (buffersize) as
        each is taken; closed early, it cancels what it has not yielded."""
        try:
            while submitted:
                if buffersize is not None:
                    chunk = next(chunks, None)
                    if chunk is not None:
                        submitted.append(self._submit_chunk(fn, chunk))
                future = submitted.popleft()
                try:
                    results = future.result(None if end is None else end - time.monotonic())
                finally:
                    future.cancel()
                # Hold no result the caller has taken: it may be large (CPython issue 14406).
                del future
                results.reverse()
                while results:
                    yield results.pop()
        finally:
            for future in submitted:
                future.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(cancel_futures)
        if wait:
            self._pool.join()

    shutdown.__doc__ = Executor.shutdown.__doc__

    def __exit__(self, exc_type: type[BaseException] | None, exc_val: Any, exc_tb: Any) -> None:
        """Shut down and wait. Left through an exception (Ctrl-C, say), queued work
        is cancelled and only running tasks are waited for; a Ctrl-C while waiting
        kills the containers."""
        _close([self._pool], cancel_futures=exc_type is not None)

    def terminate_workers(self) -> None:
        """Stop every container now with SIGTERM, as ProcessPoolExecutor's (3.14) does
        its processes: queued work is cancelled, running tasks fail with
        BrokenContainerPool, and the pool is shut down."""
        self._pool.stop_containers(signal.SIGTERM, "terminate_workers()")

    def kill_workers(self) -> None:
        """As terminate_workers(), with SIGKILL."""
        self._pool.stop_containers(signal.SIGKILL, "kill_workers()")


# --------------------------------------------------------------------------- command line


def _age(created: float) -> str:
    seconds = max(0, int(time.time() - created))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _main(argv: Sequence[str] | None = None) -> int:
    """python -m minipool [--slurm] ps | cleanup [--all]: list or remove minipool's containers
    or Slurm jobs (cleanup also removes the block and channel directories of callers that are gone)."""
    parser = argparse.ArgumentParser(
        prog="python -m minipool",
        description="List or remove the containers minipool made, on one or more engines, or its Slurm jobs.",
    )
    parser.add_argument(
        "--engine", action="append", metavar="URL", help="an engine (repeatable; default: DOCKER_HOST or its socket)"
    )
    parser.add_argument(
        "--slurm", action="store_true", help="this user's Slurm jobs (squeue, scancel) instead of an engine's "
        "containers; with --engine, both"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("ps", help="list them, with their owner process and whether it is alive")
    cleanup = commands.add_parser("cleanup", help="remove those whose owner process is gone")
    cleanup.add_argument("--all", action="store_true", help="remove every one, owners alive or not")
    args = parser.parse_args(argv)
    if args.command == "ps":
        print(f"{'ENGINE':24} {'CONTAINER':12} {'STATE':10} {'AGE':>5} {'OWNER':28} {'EXECUTOR':12} LABEL")
    remove_all = getattr(args, "all", False)
    engines = args.engine or ([] if args.slurm else [None])
    failures = [_on_engine(url, args.command, remove_all) for url in engines]
    if args.slurm:
        failures.append(_on_slurm(args.command, remove_all))
    if args.command == "cleanup":
        for path in _sweep_dirs(_CHANNEL_DIR) + _sweep_dirs(_BLOCK_DIR):
            print(f"removed {path} (owner gone)")
    return 1 if any(failures) else 0


def _owner_text(labels: Mapping[str, str]) -> str:
    """HOST:PID alive|gone|unknown, for ps and cleanup."""
    return f"{labels.get('minipool.host', '?')}:{labels.get('minipool.pid', '?')} {_owner(labels)}"


def _on_engine(url: str | None, command: str, remove_all: bool) -> bool:
    """List (ps) or remove (cleanup) our containers on one engine; True if anything failed."""
    where = url or _default_engine()
    try:
        client = docker.from_env() if url is None else docker.DockerClient(base_url=url)
    except (docker.errors.DockerException, OSError) as exc:
        print(f"minipool: cannot reach the engine at {where}: {exc}", file=sys.stderr)
        return True
    failed = False
    with contextlib.closing(client):
        for container in client.api.containers(all=True, filters={"label": "minipool"}):
            labels = container["Labels"]
            owner = _owner_text(labels)
            short_id = container["Id"][:12]
            if command == "ps":
                _ps_row(where, short_id, container["State"], _age(container["Created"]), owner, labels,
                        labels.get("minipool.label", ""))
            elif remove_all or _owner(labels) == "gone":
                try:
                    _remove_container(client.api, container["Id"])
                except (docker.errors.DockerException, OSError) as exc:
                    print(f"minipool: could not remove {short_id}: {exc}", file=sys.stderr)
                    failed = True
                else:
                    print(f"removed {short_id} ({container['State']}, owner {owner}) from {where}")
    return failed


def _ps_row(where: str, what: str, state: str, age: str, owner: str, labels: Mapping[str, str], label: str) -> None:
    """One line of `python -m minipool ps`: a container, or a Slurm job."""
    print(
        f"{where[:24]:24} {what:12} {state:10} {age:>5} {owner[:28]:28} "
        f"{labels.get('minipool.executor', '?'):12} {label}"
    )


def _on_slurm(command: str, remove_all: bool) -> bool:
    """List (ps) or cancel (cleanup) this user's Slurm jobs that minipool submitted; True if anything failed."""
    try:
        jobs = _squeue()
    except StartupError as exc:
        print(f"minipool: {exc}", file=sys.stderr)
        return True
    failed = False
    steps = _slurm_steps() if command == "ps" else {}
    for job in _parse_jobs(jobs):
        labels = job.labels
        owner = _owner_text(labels)
        label = job.name.removeprefix("minipool-")
        if command == "ps":
            _ps_row("slurm", job.id, job.state, _age(job.submitted), owner, labels, label)
            for step, node in steps.get(job.id, []):  # a stub each
                _ps_row(f"slurm, node {node}", step, "RUNNING", _age(job.submitted), owner, labels, label)
        elif remove_all or _owner(labels) == "gone":
            try:
                _slurm("scancel", job.id)
            except StartupError as exc:
                print(f"minipool: could not cancel Slurm job {job.id}: {exc}", file=sys.stderr)
                failed = True
            else:
                print(f"cancelled Slurm job {job.id} ({job.state}, owner {owner})")
    return failed


if __name__ == "__main__":
    sys.exit(_main())
