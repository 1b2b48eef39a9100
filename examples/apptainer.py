"""minipool's worker stub in a process started by Apptainer, Singularity or Shifter.

    python examples/apptainer.py [--command 'apptainer exec --pwd /home app1.sif python3'] [--processes 2]

These runtimes have no engine API, so there is no ContainerPoolExecutor for them; but
all the stub needs is a Python in the image whose stdin and stdout reach the host. The
command is run with `-c worker_stub.BOOTSTRAP SILENCE` appended, exactly as the Docker
pool runs it; the stub arrives over stdin (BOOT) and speaks minipool's protocol there.
Here stdin and stdout are plain pipes: unlike Docker's attach stream, stdout carries the
protocol alone, so it is read as it is, and the process's stderr goes to ours.

Without --command, this host's Python, started in images/app1, stands in for the image
(app1_v0.1 keeps app1.py in /home, its working directory).
"""

import argparse
import contextlib
import functools
import itertools
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Executor
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

import minipool  # noqa: E402
import worker_stub as stub  # noqa: E402

MAX_MESSAGE = 1 << 32  # as ContainerPoolExecutor's default max_message_size


class StubProcess:
    """One worker stub in a process started by `command`; call() runs one task at a time."""

    def __init__(self, command=(sys.executable,), ship=(), *, cwd=None, silence=30.0, startup_timeout=60.0):
        self.command = list(command)
        # The bootstrap unpacks the stub into a new directory under TMPDIR and never removes
        # it; Apptainer shares the host's /tmp, so give it a directory that close() removes.
        self.tmpdir = tempfile.mkdtemp(prefix="minipool-host-")
        try:
            self.process = subprocess.Popen(
                [*self.command, "-c", stub.BOOTSTRAP, str(silence)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, cwd=cwd,
                env={**os.environ, "TMPDIR": self.tmpdir},
            )
        except OSError:  # no such command
            shutil.rmtree(self.tmpdir)
            raise
        self.pid = self.process.pid
        self._writev = functools.partial(os.writev, self.process.stdin.fileno())
        self._sending = threading.Lock()  # whole messages, from call(), the keepalives and close()
        self._calling = threading.Lock()  # one task at a time
        self._closed = False  # under _sending: the pipe to the process is closed
        self._closing = threading.Event()
        self._task_ids = itertools.count(1)
        hello = minipool._hello(MAX_MESSAGE, 1, silence)
        started = time.monotonic()
        deadline = threading.Timer(startup_timeout, self.process.kill)  # a hung start ends as EOF
        deadline.start()
        try:
            self._send(stub.BOOT, 0, [minipool._stub_archive(ship)])
            self._send(stub.HELLO, 0, [json.dumps(hello).encode()])
            kind, _, payload = stub.read_message(self.process.stdout.readinto, 1 << 20)
            if kind != stub.READY:
                raise ValueError(f"expected READY, got message kind {kind}")
            self.ready = json.loads(bytes(payload))
        except (OSError, EOFError, ValueError) as exc:
            self.close()
            why = "no answer within startup_timeout" if time.monotonic() - started >= startup_timeout else exc
            raise minipool.StartupError(
                f"cannot start a worker with {shlex.join(self.command)}: {why} ({self._exit()}); its stderr is above"
            ) from exc
        finally:
            deadline.cancel()
        # The stub exits once it has heard nothing for `silence` seconds, during a task too.
        threading.Thread(target=self._keep_alive, args=(silence / 6,), daemon=True).start()

    def call(self, fn, /, *args, **kwargs):
        """fn(*args, **kwargs) run in the process: its result, or its exception raised here."""
        parts, _ = minipool._pickle_call((fn, args, kwargs), MAX_MESSAGE)
        with self._calling:
            task_id = next(self._task_ids)
            try:
                self._send(stub.CALL, task_id, parts)
                kind, answer_id, payload = stub.read_message(self.process.stdout.readinto, MAX_MESSAGE)
            except (OSError, EOFError) as exc:
                self.close()
                message = f"worker process {self.pid} ({shlex.join(self.command)}) is gone ({self._exit()})"
                raise minipool.WorkerLost(message, str(self.pid), self.exit_code, False, []) from exc
            except ValueError as exc:
                self.close()
                raise minipool.ProtocolError(f"worker process {self.pid}: {exc}") from exc
        if kind not in (stub.RESULT, stub.RAISED) or answer_id != task_id:
            raise minipool.ProtocolError(f"worker process {self.pid}: message kind {kind} for task {answer_id}")
        future = Future()
        # The task's exception comes with its remote traceback.
        minipool._settle(future, kind, payload, f"process {self.pid} of {self.command[0]!r}")
        stub.release(payload)
        return future.result()

    def close(self, timeout=10.0):
        """Send STOP (a running task finishes first) and wait for the process; kill it after `timeout` s."""
        self._closing.set()
        with contextlib.suppress(OSError):  # already gone, or closed
            self._send(stub.STOP, 0, [])
        try:
            self.process.wait(timeout)  # stdin stays open meanwhile: the stub exits at once on a hangup
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with self._sending:
            self._closed = True
            self.process.stdin.close()
        self.process.stdout.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _send(self, kind, task_id, parts, wait=True):
        if not self._sending.acquire(blocking=wait):
            return  # a keepalive while a message is under way, which says as much
        try:
            if self._closed:
                raise BrokenPipeError(f"worker process {self.pid} is closed ({self._exit()})")
            stub.write_message(self._writev, kind, task_id, parts)
        finally:
            self._sending.release()

    def _keep_alive(self, every):
        while not self._closing.wait(every):
            try:
                self._send(stub.KEEPALIVE, 0, [], wait=False)
            except OSError:
                return

    @property
    def exit_code(self):
        """The process's exit code, 128 + the signal if one killed it (as Docker's), or None."""
        code = self.process.poll()
        return 128 - code if code is not None and code < 0 else code

    def _exit(self):
        return "still running" if self.exit_code is None else minipool._describe_exit(self.exit_code, False)


class StubPool(Executor):
    """`processes` StubProcesses behind threads, so callers get futures (and map, and `with`).
    A process that died is replaced on its next task; the task it was running is not retried."""

    def __init__(self, processes=2, command=(sys.executable,), ship=(), **options):
        self._start = lambda: StubProcess(command, ship, **options)
        self._idle = queue.SimpleQueue()
        self._threads = ThreadPoolExecutor(processes, thread_name_prefix="stub")
        try:
            for _ in range(processes):
                self._idle.put(self._start())
        except BaseException:
            self.shutdown()
            raise

    def submit(self, fn, /, *args, **kwargs):
        return self._threads.submit(self._run, fn, args, kwargs)

    def _run(self, fn, args, kwargs):
        worker = self._idle.get()  # as many processes as threads: one is free
        try:
            if worker.process.poll() is not None:
                worker = self._start()
            return worker.call(fn, *args, **kwargs)
        finally:
            self._idle.put(worker)

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Finish (or cancel) the queued tasks, then stop every process; waits either way."""
        self._threads.shutdown(wait=True, cancel_futures=cancel_futures)
        while not self._idle.empty():
            self._idle.get().close()


# As in the seed: the function is the user's, the module it imports is the image's.
def app_1(data):
    import app1

    return app1.predict(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", help="how to start the image's Python (default: this host's, in images/app1)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default: 2)")
    args = parser.parse_args()
    if args.command:
        command, cwd = shlex.split(args.command), None
    else:
        command, cwd = [sys.executable], os.path.join(ROOT, "images", "app1")
    # A runtime that is not installed, or an image without Python: one line, no traceback.
    try:
        with StubPool(args.processes, command, cwd=cwd) as pool:
            x = pool.submit(app_1, [1, 2, 3])
            print(x.result())  # [2, 4, 6]
    except FileNotFoundError as exc:
        sys.exit(f"apptainer example: cannot run {command[0]!r}: {exc.strerror}; is it installed, and on PATH?")
    except minipool.StartupError as exc:
        sys.exit(f"apptainer example: {exc}")
    print(f"apptainer example: ran in {args.processes} process(es) of {shlex.join(command)}", file=sys.stderr)


if __name__ == "__main__":
    main()
