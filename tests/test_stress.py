"""Randomized stress where the features meet: retries, elastic blocks, pipelining,
workers_per_block, task_timeout, cancels and containers killed from outside.

One seed is one scenario: pool settings drawn at random, and bursts of tasks that
return (at once, so they are pipelined, or after a while, so blocks are added),
raise, exit their worker, or run past task_timeout, submitted with pauses long enough
for idle blocks to retire and come back, while some futures are cancelled and a
thread kills a container of the pool now and then. Every future must end exactly
once, within a bound, with the outcome its task called for or an alternative the
README allows, and shutdown must return with nothing left behind (the label fixture
checks the containers and threads).

The default run replays the seeds that caught bugs (CAUGHT) and tries a few new ones;
every seed names its test (test_stress[seed=123456]); replay one or several with

    MINIPOOL_STRESS_SEED=123456,654321 python -m pytest tests/test_stress.py -s

The timing of a replay differs (the engine, the load), its settings and tasks do not.
`-m slow` runs many more seeds.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import faulthandler
import os
import random
import re
import sys
import threading
import time

import docker.errors
import pytest

import helpers
from conftest import DEADLOCK
from conftest import wait_until
from minipool import WorkerLost

# The default run replays the seeds that caught bugs, then tries new ones.
SHORT_RUN_SEEDS = 2
LONG_RUN_SEEDS = 30
# Seeds that caught a bug, replayed on every run. Both hung on the code before issue 14
# was fixed, every time: a block retired by idle_timeout while work waited in the queue
# (fresh tasks, and a lost task to be retried), so the futures and shutdown waited forever.
# A seed means what draw_scenario draws from it: a change there makes these other scenarios.
CAUGHT = [878579, 21790]
# How long the futures of a scenario may take to end after its last submit, and
# shutdown to return: sized for deadlocks only (a scenario's work takes seconds),
# as a task that exits with retries=2 costs three container starts on a loaded engine.
FUTURES_BOUND = DEADLOCK
SHUTDOWN_BOUND = DEADLOCK / 2
# What an exiting task exits with: not a signal's 128 + n, so it is told from a kill.
EXIT_CODE = 3
# The container named in task_timeout's message: it was killed, and took with it
# whatever else it was running.
TIMED_OUT_CONTAINER = re.compile(r"its container (\w+) was killed")

# What a task does; each calls for its own outcome (see problem_with()).
RETURNS = "returns"  # at once: pipelined with others of its kind
RETURNS_LATER = "returns later"  # after a sleep: one at a time, and work waits for blocks
RAISES = "raises"
EXITS = "exits"  # os._exit: the container with one worker, else the worker process
TIMES_OUT = "times out"  # sleeps past task_timeout
KINDS = (RETURNS, RETURNS_LATER, RAISES, EXITS, TIMES_OUT)
# Cancelled right after submit, or once its burst is submitted.
AT_ONCE = "at once"
AFTER_BURST = "after its burst"


def replayed_seeds():
    """The seeds of MINIPOOL_STRESS_SEED (a comma-separated list), or []."""
    return [int(seed) for seed in os.environ.get("MINIPOOL_STRESS_SEED", "").split(",") if seed.strip()]


def new_seeds(count):
    draw = random.SystemRandom()
    return [draw.randrange(1_000_000) for _ in range(count)]


# --------------------------------------------------------------------------- scenarios


@dataclasses.dataclass
class Task:
    number: int
    kind: str
    seconds: float  # how long it runs before it returns, raises or exits
    cancel: str | None  # None, AT_ONCE or AFTER_BURST

    def call(self):
        """(function, *arguments) of the task, as it is submitted."""
        if self.kind == RETURNS:
            return helpers.answer, self.number
        if self.kind == RETURNS_LATER:
            return helpers.answer_after, self.seconds, self.number
        if self.kind == RAISES:
            return helpers.raise_after, self.seconds, f"task {self.number}"
        if self.kind == EXITS:
            return helpers.exit_after, self.seconds, EXIT_CODE
        return helpers.sleep_then, self.seconds  # TIMES_OUT

    def __str__(self):
        cancel = f", cancelled {self.cancel}" if self.cancel else ""
        return f"#{self.number} {self.kind} ({self.seconds:.2f} s{cancel})"


@dataclasses.dataclass
class Burst:
    tasks: list[Task]
    gap: float  # between two submits
    pause: float  # after the burst: idle blocks retire meanwhile when it is longer than idle_timeout


@dataclasses.dataclass
class Scenario:
    seed: int
    settings: dict  # ContainerPoolExecutor's options
    bursts: list[Burst]
    kill_every: float | None  # mean seconds between two kills from outside; None: no kills
    end: str  # "wait" for every future, then shut down; or "shutdown" at once
    cancel_futures: bool  # shutdown's, when end == "shutdown"

    @property
    def tasks(self):
        return [task for burst in self.bursts for task in burst.tasks]

    def __str__(self):
        options = ", ".join(f"{name}={value}" for name, value in self.settings.items())
        kinds = {kind: sum(task.kind == kind for task in self.tasks) for kind in KINDS}
        kills = f"a kill every {self.kill_every:.1f} s" if self.kill_every else "no kills"
        end = "wait, then shutdown" if self.end == "wait" else f"shutdown(cancel_futures={self.cancel_futures})"
        return (
            f"seed {self.seed}: ContainerPoolExecutor({options}); {len(self.bursts)} bursts of "
            f"{', '.join(f'{count} {kind}' for kind, count in kinds.items() if count)}; "
            f"{sum(task.cancel is not None for task in self.tasks)} cancelled; {kills}; {end}"
        )


def draw_scenario(seed):
    """The scenario of `seed`: the same settings and tasks every time."""
    rng = random.Random(seed)
    max_blocks = rng.randint(1, 3)
    blocks = rng.randint(0, max_blocks)
    task_timeout = rng.choice([None, round(rng.uniform(1.5, 2.5), 2)])
    settings = {
        "blocks": blocks,
        "min_blocks": rng.randint(0, min(blocks, 1)),
        "max_blocks": max_blocks,
        # Short, so that blocks retire between bursts and while a long task waits to be retried.
        "idle_timeout": rng.choice([None, round(rng.uniform(0.3, 1.0), 2), round(rng.uniform(0.3, 1.0), 2)]),
        "retries": rng.randint(0, 2),
        "workers_per_block": rng.randint(1, 2),
        "task_timeout": task_timeout,
    }
    kinds = [RETURNS, RETURNS_LATER, RAISES, EXITS] + ([TIMES_OUT] if task_timeout else [])
    weights = [35, 30, 12, 10] + ([6] if task_timeout else [])
    numbers = iter(range(1, 1000))
    bursts = []
    for _ in range(rng.randint(2, 4)):
        tasks = []
        for _ in range(rng.randint(4, 16)):
            kind = rng.choices(kinds, weights)[0]
            # Sleeps well under task_timeout (1.5 s at least), often past idle_timeout.
            seconds = 0.0 if kind == RETURNS else round(rng.uniform(0.0, 0.8), 2)
            if kind == TIMES_OUT:
                seconds = 3600.0  # task_timeout ends it
            cancel = rng.choices([None, AT_ONCE, AFTER_BURST], [80, 10, 10])[0]
            tasks.append(Task(next(numbers), kind, seconds, cancel))
        bursts.append(Burst(tasks, gap=rng.choice([0.0, rng.uniform(0.0, 0.05)]), pause=rng.uniform(0.0, 2.0)))
    return Scenario(
        seed=seed,
        settings=settings,
        bursts=bursts,
        kill_every=rng.choice([None, rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0)]),
        end=rng.choices(["wait", "shutdown"], [70, 30])[0],
        cancel_futures=rng.random() < 0.5,
    )


# --------------------------------------------------------------------------- running one


@dataclasses.dataclass
class Submitted:
    task: Task
    future: cf.Future
    cancel_returned: bool | None = None  # what cancel() said, if it was called
    # One entry per done callback: a future ends exactly once.
    endings: list = dataclasses.field(default_factory=list)

    def cancel(self):
        self.cancel_returned = self.future.cancel()

    def state(self):
        said = "" if self.cancel_returned is None else f", cancel() returned {self.cancel_returned}"
        if not self.future.done():
            return f"{self.task}: {'running' if self.future.running() else 'pending'}{said}"
        if self.future.cancelled():
            return f"{self.task}: cancelled{said}"
        error = self.future.exception()
        outcome = f"returned {self.future.result()!r}" if error is None else f"raised {type(error).__name__}: {error}"
        return f"{self.task}: {outcome}{said}"


class OutsideKiller:
    """Kills a container of the pool now and then, as `docker kill` from outside would.

    Only containers that have returned a result: one killed before its handshake is a
    failed start, which the pool answers otherwise (a pool whose first start fails is
    broken, by design), and which is not what this test is about.
    """

    def __init__(self, engine, label, seed, every):
        self.killed = set()  # short ids
        self._ready = set()  # short ids of the containers that returned a result
        self._lock = threading.Lock()
        self._engine = engine
        self._label = label
        self._rng = random.Random(seed + 1)
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stress-killer-{label}", daemon=True)

    def saw(self, short_id):
        with self._lock:
            self._ready.add(short_id)

    def start(self):
        if self._every is not None:
            self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(DEADLOCK)

    def _run(self):
        while not self._stop.wait(self._rng.uniform(0.5, 1.5) * self._every):
            running = self._engine.api.containers(filters={"label": f"minipool.label={self._label}"})
            with self._lock:
                victims = sorted(container["Id"][:12] for container in running if container["Id"][:12] in self._ready)
            if victims:
                victim = self._rng.choice(victims)
                # Noted before the kill: the task it runs may end before kill() returns.
                self.killed.add(victim)
                with contextlib.suppress(docker.errors.APIError):  # it died or went meanwhile
                    self._engine.api.kill(victim)


@contextlib.contextmanager
def thread_errors(label):
    """What escaped the pool's threads (InvalidStateError from a second set_result, say)."""
    errors = []
    previous = threading.excepthook

    def hook(args):
        if args.thread is not None and args.thread.name.startswith(f"minipool-{label}-"):
            errors.append(f"{args.thread.name}: {args.exc_type.__name__}: {args.exc_value}")
        previous(args)

    threading.excepthook = hook
    try:
        yield errors
    finally:
        threading.excepthook = previous


def submit(pool, task, killer):
    function, *args = task.call()
    submitted = Submitted(task, pool.submit(function, *args))

    def ended(future):
        submitted.endings.append(threading.current_thread().name)
        if task.kind in (RETURNS, RETURNS_LATER) and not future.cancelled() and future.exception() is None:
            killer.saw(future.result()[1])

    submitted.future.add_done_callback(ended)
    if task.cancel == AT_ONCE:
        submitted.cancel()
    return submitted


def submit_bursts(pool, scenario, killer):
    everything = []
    for burst in scenario.bursts:
        submitted = []
        for task in burst.tasks:
            submitted.append(submit(pool, task, killer))
            time.sleep(burst.gap)  # the submit rate is part of the workload
        for one in submitted:
            if one.task.cancel == AFTER_BURST:
                one.cancel()
        everything += submitted
        time.sleep(burst.pause)  # idle time is part of the workload: blocks retire in it
    return everything


def in_thread(action, name):
    """Start `action` in a thread of its own, so that a hang in it is seen, not suffered."""
    thread = threading.Thread(target=action, name=name, daemon=True)
    thread.start()
    return thread


def hung(scenario, submitted, pool, what):
    """Report a hang: the scenario, the futures not done, every thread's stack; then
    free the test (kill_workers fails whatever waits) and fail."""
    waiting = [one.state() for one in submitted if not one.future.done()]
    print(f"\nstress {scenario}\n{what}; futures not done:\n  " + "\n  ".join(waiting), file=sys.stderr)
    faulthandler.dump_traceback(sys.stderr, all_threads=True)
    pool.kill_workers()
    pytest.fail(
        f"{what} (replay: MINIPOOL_STRESS_SEED={scenario.seed})\n{scenario}\n"
        f"{len(waiting)} futures not done, e.g.:\n  " + "\n  ".join(waiting[:10]),
        pytrace=False,
    )


def end(scenario, pool, submitted):
    """Wait for every future, then shut down; or shut down at once. Each within its bound."""
    if scenario.end == "wait":
        _, not_done = cf.wait([one.future for one in submitted], timeout=FUTURES_BOUND)
        if not_done:
            hung(scenario, submitted, pool, f"{len(not_done)} futures did not end within {FUTURES_BOUND} s")
    cancel_futures = scenario.end == "shutdown" and scenario.cancel_futures
    shutdown = in_thread(lambda: pool.shutdown(wait=True, cancel_futures=cancel_futures), "stress-shutdown")
    shutdown.join(SHUTDOWN_BOUND if scenario.end == "wait" else FUTURES_BOUND)
    if shutdown.is_alive():
        hung(scenario, submitted, pool, "shutdown(wait=True) did not return")
    not_done = [one for one in submitted if not one.future.done()]
    if not_done:
        hung(scenario, submitted, pool, "shutdown(wait=True) returned before every future ended")


# --------------------------------------------------------------------------- the oracle


def losses(lost):
    """Every attempt of a WorkerLost, the last one included."""
    return [*lost.attempts, lost]


def excused(loss, excused_containers):
    """Whether the attempt died in a container that was killed from outside or for another
    task's task_timeout: those take the tasks they were running with them."""
    return loss.container_id[:12] in excused_containers


def exited(loss, workers_per_block):
    """Whether the attempt ended by the task's own exit: its container's, or with several
    workers its process's."""
    whose = "container" if workers_per_block == 1 else "a worker process in container"
    return loss.args[0].startswith(whose) and loss.exit_code in (EXIT_CODE, None)  # None: the engine was late


def problem_with(one, scenario, excused_containers):
    """What is wrong with how the future ended; None if nothing."""
    task, future, settings = one.task, one.future, scenario.settings
    if len(one.endings) != 1:
        return f"{task}: ended {len(one.endings)} times ({one.endings})"
    if future.cancelled():
        # shutdown(cancel_futures=True) cancels what has never run.
        if one.cancel_returned or (scenario.end == "shutdown" and scenario.cancel_futures):
            return None
        said = "returned False" if one.cancel_returned is False else "was not called"
        return f"{task}: cancelled, though cancel() {said}"
    if one.cancel_returned:
        return f"{task}: cancel() returned True, then it {one.state()}"
    error = future.exception()
    if isinstance(error, WorkerLost):
        if len(error.attempts) != settings["retries"]:
            return f"{task}: WorkerLost after {len(error.attempts) + 1} attempts, with retries={settings['retries']}"
        if all(excused(loss, excused_containers) for loss in losses(error)):
            return None
        if task.kind == EXITS and all(
            exited(loss, settings["workers_per_block"]) or excused(loss, excused_containers) for loss in losses(error)
        ):
            return None
        return f"{task}: WorkerLost, though an attempt died neither by its own exit nor in a container killed: {error}"
    if task.kind in (RETURNS, RETURNS_LATER):
        expected = error is None and future.result()[0] == task.number
    elif task.kind == RAISES:
        expected = type(error) is ValueError and str(error) == f"task {task.number}"
    elif task.kind == TIMES_OUT:
        expected = isinstance(error, cf.TimeoutError) and "task_timeout=" in str(error)
    else:
        expected = False  # EXITS ends in WorkerLost
    return None if expected else one.state()


def judge(scenario, submitted, killer, errors):
    # Callbacks run after the waiters are woken: give the last ones a moment.
    with contextlib.suppress(AssertionError):
        wait_until(lambda: all(one.endings for one in submitted), timeout=5, what="every done callback")
    timed_out = {
        match.group(1)
        for one in submitted
        if one.future.done() and not one.future.cancelled()
        for match in [TIMED_OUT_CONTAINER.search(str(one.future.exception() or ""))]
        if match
    }
    excused_containers = killer.killed | timed_out
    problems = [problem for one in submitted if (problem := problem_with(one, scenario, excused_containers))]
    problems += [f"a pool thread raised: {error}" for error in errors]
    assert not problems, (
        f"replay: MINIPOOL_STRESS_SEED={scenario.seed}\n{scenario}\n"
        f"containers killed from outside: {sorted(killer.killed)}; for task_timeout: {sorted(timed_out)}\n"
        + "\n".join(problems[:20])
    )


def run(scenario, make_pool, engine, label):
    print(f"\nstress {scenario}", flush=True)
    started = time.monotonic()
    killer = OutsideKiller(engine, label, scenario.seed, scenario.kill_every)
    with thread_errors(label) as errors:
        pool = make_pool(**scenario.settings)
        killer.start()
        try:
            submitted = submit_bursts(pool, scenario, killer)
            end(scenario, pool, submitted)
        finally:
            killer.stop()
    judge(scenario, submitted, killer, errors)
    print(f"stress seed {scenario.seed}: {len(submitted)} futures ended as called for in "
          f"{time.monotonic() - started:.1f} s, {len(killer.killed)} containers killed from outside", flush=True)


@pytest.mark.parametrize("seed", replayed_seeds() or CAUGHT + new_seeds(SHORT_RUN_SEEDS), ids="seed={}".format)
def test_stress(seed, make_pool, engine, label):
    run(draw_scenario(seed), make_pool, engine, label)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [] if replayed_seeds() else new_seeds(LONG_RUN_SEEDS), ids="seed={}".format)
def test_stress_long(seed, make_pool, engine, label):
    run(draw_scenario(seed), make_pool, engine, label)
