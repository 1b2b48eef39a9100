"""Blocks as Slurm jobs (issues 11, 21): provider=minipool.Slurm(...), on a real four-node
cluster of the session's own (conftest's slurm_cluster) with Charliecloud inside it.

After every test no job of it may be left in the queue (the slurm fixture), nor a
srun process of ours, nor a block directory (SlurmRuntime.close).
"""

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import helpers
import minipool
from conftest import DEADLOCK
from conftest import ROOT
from conftest import TESTS
from conftest import holds
from conftest import processes_using
from conftest import read_lines
from conftest import start_script
from conftest import wait_until
from minipool import BrokenContainerPool
from minipool import Command
from minipool import ContainerPoolExecutor
from minipool import Slurm
from minipool import StartupError
from minipool import WorkerLost

# --------------------------------------------------------------------------- arguments, no cluster needed


def test_a_block_is_a_job_salloc_holds_of_its_nodes_a_task_of_its_workers_cores_on_each():
    slurm = Slurm(partition="debug", time="01:00:00", account="proj", nodes_per_block=3, options=["--mem=4G"])
    assert minipool._salloc_argv(slurm, "app1", "abc123", 4) == [
        "salloc", "--nodes=3", "--ntasks-per-node=1", "--cpus-per-task=4", "--exclusive", "--job-name=minipool-app1",
        f"--comment=minipool.host={os.uname().nodename},minipool.pid={os.getpid()},minipool.executor=abc123",
        "--partition=debug", "--time=01:00:00", "--account=proj", "--mem=4G",
        sys.executable, "-I", "-c", minipool._KEEPER, str(minipool._HOST_SILENCE),
    ]
    assert "--exclusive" not in minipool._salloc_argv(Slurm(exclusive=False), "app1", "abc123", 4)


def test_each_stub_is_a_step_of_one_task_that_takes_only_its_own_cores():
    assert minipool._srun_argv("app1", 2, ["--mem=1G"]) == [
        "srun", "--unbuffered", "--nodes=1", "--ntasks=1", "--cpus-per-task=2", "--exact", "--job-name=minipool-app1",
        "--mem=1G", "sh", "-c", minipool._SRUN_WRAPPER, "minipool-block",
    ]


@pytest.mark.parametrize(
    "option", ["--output=x.log", "-e", "--job-name=mine", "--comment=x", "-u", "--pty", "--nodes=2", "--jobid=4"]
)
def test_options_that_would_take_the_channel_or_the_jobs_name_are_refused(option):
    with pytest.raises(ValueError, match=f"minipool sets {option.split('=')[0]} itself"):
        Slurm(options=[option])


@pytest.mark.parametrize(
    "arguments, error, words",
    [
        ({"options": "--mem=4G"}, TypeError, "options must be a list"),
        ({"partition": 3}, TypeError, "partition must be a string"),
        ({"time": ""}, ValueError, "time must not be empty"),
        ({"nodes_per_block": 0}, ValueError, "nodes_per_block must be >= 1"),
        ({"exclusive": "yes"}, TypeError, "exclusive must be True or False"),
    ],
    ids=["options as a string", "partition not a string", "empty time", "no nodes", "exclusive not a bool"],
)
def test_bad_slurm_arguments(arguments, error, words):
    with pytest.raises(error, match=words):
        Slurm(**arguments)


def test_a_provider_needs_a_runtime_run_as_a_command():
    with pytest.raises(ValueError, match=r"provider=Slurm.* not runtime='docker'"):
        ContainerPoolExecutor("app1_v0.1", provider=Slurm())
    with pytest.raises(TypeError, match=r"provider must be a minipool\.Slurm or None"):
        ContainerPoolExecutor("/images/app1", runtime="charliecloud", provider="slurm")


# --------------------------------------------------------------------------- on the cluster


@pytest.fixture
def on_slurm(runtime_of):
    """Charliecloud under the session's Slurm cluster; at teardown no job may be left."""
    return runtime_of("slurm")


# A gate the test opens from outside: ch-run shares no directory of the host's but
# those bound, so tmp_path is bound at the image's /shared.
GATE = "/shared/gate"


def sharing(tmp_path):
    return {"volumes": [f"{tmp_path}:/shared"]}


def job_of(cluster, job_id, field):
    """A field of `scontrol show job` (NumCPUs, Comment, ...)."""
    shown = cluster.run("scontrol", "--oneliner", "show", "job", job_id).stdout
    return dict(word.split("=", 1) for word in shown.split() if "=" in word)[field]


@pytest.mark.parametrize("exclusive, cpus", [(True, "256"), (False, "2")], ids=["whole nodes", "shared"])
def test_blocks_are_jobs_of_whole_nodes_or_of_their_workers_cores(on_slurm, tmp_path, exclusive, cpus):
    pool = on_slurm.pool(blocks=2, workers_per_block=2, provider=Slurm(exclusive=exclusive), **sharing(tmp_path))
    assert pool.submit(helpers.double, 21).result(DEADLOCK) == 42
    running = [pool.submit(helpers.block_at_gate, GATE) for _ in range(4)]  # one a worker
    wait_until(lambda: all(future.running() for future in running), what="a task on every worker")
    (tmp_path / "gate").touch()
    jobs = on_slurm.blocks()
    assert {future.result(DEADLOCK) for future in running} == set(jobs) and len(jobs) == 2
    for job_id in jobs:
        assert job_of(on_slurm.cluster, job_id, "NumCPUs") == cpus  # a node claims 256 (slurm_cluster)
        comment = job_of(on_slurm.cluster, job_id, "Comment")
        assert f"minipool.host={os.uname().nodename},minipool.pid={os.getpid()}" in comment
    assert list(pool.map(helpers.double, range(300), chunksize=7)) == [2 * i for i in range(300)]
    pool.shutdown()
    wait_until(lambda: not on_slurm.blocks(), timeout=10, what="the jobs to end with the pool")


def test_elastic_blocks_are_jobs_submitted_then_cancelled(on_slurm, tmp_path):
    pool = on_slurm.pool(blocks=0, max_blocks=3, idle_timeout=1, **sharing(tmp_path))
    holds(lambda: not on_slurm.blocks(), 0.5, "no job before work comes")
    running = [pool.submit(helpers.block_at_gate, GATE) for _ in range(6)]
    wait_until(lambda: len(on_slurm.blocks()) == 3, what="three jobs for the work")
    (tmp_path / "gate").touch()
    assert {future.result(DEADLOCK) for future in running} <= set(on_slurm.blocks())
    wait_until(lambda: not on_slurm.blocks(), what="the idle jobs to be cancelled")
    assert pool.submit(helpers.double, 2).result(DEADLOCK) == 4  # a job again when work comes


@pytest.mark.parametrize("retries", [0, 1])
def test_a_job_cancelled_mid_task_is_a_lost_worker_then_a_new_job(on_slurm, tmp_path, retries):
    pool = on_slurm.pool(retries=retries, **sharing(tmp_path))
    running = pool.submit(helpers.block_at_gate, GATE)
    wait_until(lambda: running.running() and on_slurm.blocks(), what="the task to run in a job")
    (cancelled,) = on_slurm.blocks()
    on_slurm.kill(cancelled)  # scancel
    wait_until(lambda: on_slurm.blocks() not in ([], [cancelled]), what="a new job for the block")
    (tmp_path / "gate").touch()
    if retries:
        assert running.result(DEADLOCK) == on_slurm.blocks()[0] != cancelled
    else:
        named = rf"Slurm job {cancelled}, step 0, node n\d of image .* died while running the task"
        with pytest.raises(WorkerLost, match=f"(?s){named}.*STEP {cancelled}.0 ON .* CANCELLED"):
            running.result(DEADLOCK)
    assert pool.submit(helpers.block).result(DEADLOCK) != cancelled


def test_a_block_is_named_by_its_job_step_and_node_and_the_wrappers_line_is_no_output(on_slurm, caplog):
    caplog.set_level(logging.INFO, logger="minipool")
    pool = on_slurm.pool()
    future = pool.submit(helpers.say, "hello", 1)
    assert future.result(DEADLOCK) == "hello"
    (job_id,) = on_slurm.blocks()
    assert re.search(rf"block \d+ ready in Slurm job {job_id}, step 0, node n\d on ", caplog.text)
    assert minipool.output(future) == "hello\n"
    worker_lines = [record.getMessage() for record in caplog.records if record.name == "minipool.worker"]
    assert worker_lines and not [line for line in worker_lines if "minipool: Slurm job" in line]
    assert all(re.match(rf"Slurm job {job_id}, step 0, node n\d: ", line) for line in worker_lines)


# --------------------------------------------------------------------------- blocks of several nodes


def steps(cluster, job_id):
    """The job's running steps, as JOB.STEP ids (the keeper's job has no other)."""
    listed = cluster.run("squeue", "--steps", "--noheader", "--format=%i", "--jobs", job_id).stdout
    return sorted(listed.split())


def meeting(pool, tmp_path, count):
    """(job, step, node) of `count` tasks that ran at once, each on a stub of its own."""
    directory = tmp_path / f"met-{time.monotonic_ns()}"
    directory.mkdir()
    return list(pool.map(helpers.meet, [f"/shared/{directory.name}"] * count, [count] * count))


@pytest.mark.parametrize("exclusive, spread", [(True, 4), (False, 2)], ids=["whole nodes", "shared"])
def test_a_block_of_two_nodes_is_one_job_with_a_stub_on_each(on_slurm, tmp_path, exclusive, spread):
    """blocks=2, nodes_per_block=2 on four idle nodes: two jobs of two nodes each, a
    stub on every node. Taking whole nodes (the default) they use all four; sharing
    them, Slurm packs both jobs on two."""
    pool = on_slurm.pool(blocks=2, provider=Slurm(nodes_per_block=2, exclusive=exclusive), **sharing(tmp_path))
    met = meeting(pool, tmp_path, 4)
    jobs = {job for job, _, _ in met}
    assert len(jobs) == 2 and set(on_slurm.blocks()) == jobs
    for job in jobs:
        assert job_of(on_slurm.cluster, job, "NumNodes") == "2"
        assert len({node for of, _, node in met if of == job}) == 2  # a stub a node
    assert len({node for _, _, node in met}) == spread


def test_a_step_that_ends_is_replaced_in_its_job_and_the_other_node_keeps_its_task(on_slurm, tmp_path):
    pool = on_slurm.pool(provider=Slurm(nodes_per_block=2), retries=1, **sharing(tmp_path))
    (job,) = {job for job, _, _ in meeting(pool, tmp_path, 2)}
    running = [pool.submit(helpers.step_at_gate, GATE) for _ in range(2)]
    wait_until(lambda: all(future.running() for future in running), what="a task on each node")
    ended, kept = steps(on_slurm.cluster, job)
    assert on_slurm.cluster.run("scancel", ended).returncode == 0
    wait_until(lambda: len(steps(on_slurm.cluster, job)) == 2 and ended not in steps(on_slurm.cluster, job),
               what="a new step in the job in place of the ended one")
    (tmp_path / "gate").touch()
    results = [future.result(DEADLOCK) for future in running]
    assert {of for of, _, _ in results} == {job} == set(on_slurm.blocks())  # no new job
    ran_in = [f"{of}.{step}" for of, step, _ in results]
    assert ended not in ran_in and kept in ran_in  # the lost task ran again, the other one where it was
    assert kept in steps(on_slurm.cluster, job)  # the other node's stub was never touched


def test_a_task_past_task_timeout_ends_its_step_alone(on_slurm, tmp_path):
    pool = on_slurm.pool(provider=Slurm(nodes_per_block=2), task_timeout=2, **sharing(tmp_path))
    (job,) = {job for job, _, _ in meeting(pool, tmp_path, 2)}
    before = steps(on_slurm.cluster, job)
    with pytest.raises(TimeoutError):
        pool.submit(time.sleep, 300).result(DEADLOCK)
    def replaced():
        now = steps(on_slurm.cluster, job)
        return len(now) == 2 and len(set(now) - set(before)) == 1

    # Within seconds: a killed srun's step not cancelled lives on for half a minute.
    wait_until(replaced, timeout=15, what="the late task's step to end and a new one to take its place")
    after = steps(on_slurm.cluster, job)
    assert len(set(before) & set(after)) == 1  # the other node's step lives on
    assert sorted(f"{of}.{step}" for of, step, _ in meeting(pool, tmp_path, 2)) == after


def test_a_node_set_down_ends_its_blocks_job_and_its_tasks_run_again(on_slurm, tmp_path, caplog):
    """Slurm ends a job whose node fails (its default): the block's two stubs are lost
    together, their tasks run again (retries=1) and a new job replaces the block."""
    caplog.set_level(logging.INFO, logger="minipool")
    cluster = on_slurm.cluster
    pool = on_slurm.pool(blocks=2, provider=Slurm(nodes_per_block=2), retries=1, **sharing(tmp_path))
    meeting(pool, tmp_path, 4)
    running = [pool.submit(helpers.step_at_gate, GATE) for _ in range(4)]
    wait_until(lambda: all(future.running() for future in running), what="a task on every node")
    failed = job_of_node(cluster, "n3")
    try:
        set_nodes(cluster, "n3", "down")
        wait_until(lambda: failed not in on_slurm.blocks() and len(on_slurm.blocks()) == 2,
                   what="a new job in place of the failed one")
        (tmp_path / "gate").touch()
        results = [future.result(DEADLOCK) for future in running]
    finally:
        set_nodes(cluster, "n3", "resume")
    assert not [result for result in results if result[0] == failed]  # its two tasks ran again elsewhere
    assert f"Slurm job {failed} has ended: salloc: error: Node failure on n3" in caplog.text
    assert "failed to start" not in caplog.text  # no step was tried in the ended job


def job_of_node(cluster, node):
    """The id of the job that runs on the node."""
    listed = cluster.run("squeue", "--noheader", "--format=%i", f"--nodelist={node}").stdout
    (job_id,) = listed.split()
    return job_id


def test_an_elastic_pool_cancels_a_queued_job_no_work_waits_for(on_slurm, tmp_path, caplog):
    """Three nodes drained, so that a second whole-node job waits in the queue: once
    the first block has done the work, nothing waits for the second, which is cancelled."""
    caplog.set_level(logging.INFO, logger="minipool")
    cluster = on_slurm.cluster
    pool = on_slurm.pool(blocks=1, min_blocks=1, max_blocks=2, idle_timeout=1, **sharing(tmp_path))
    (first,) = {pool.submit(helpers.block).result(DEADLOCK)}
    free = ",".join(node for node in ("n1", "n2", "n3", "n4") if node != job_of(cluster, first, "NodeList"))
    try:
        set_nodes(cluster, free, "drain")
        running = [pool.submit(helpers.block_at_gate, GATE) for _ in range(2)]
        wait_until(lambda: len(on_slurm.blocks()) == 2, what="a second job, queued")
        (queued,) = set(on_slurm.blocks()) - {first}
        wait_until(lambda: f"Slurm job {queued} is queued" in caplog.text, what="the log to say it is queued")
        (tmp_path / "gate").touch()
        assert [future.result(DEADLOCK) for future in running] == [first, first]
        wait_until(lambda: on_slurm.blocks() == [first], what="the queued job to be cancelled")
    finally:
        set_nodes(cluster, free, "resume")


def set_nodes(cluster, nodes, state):
    """scontrol update of the nodes' state (down, drain: with a reason; resume, which
    a node that came back by itself (ReturnToService) refuses)."""
    reason = [] if state == "resume" else ["reason=minipool-test"]
    done = cluster.run("scontrol", "update", f"nodename={nodes}", f"state={state}", *reason)
    assert done.returncode == 0 or "Invalid node state specified" in done.stderr, done.stderr


IN_AN_ALLOCATION = """
import json, logging, os, subprocess, sys, time
import helpers
from minipool import ContainerPoolExecutor, Slurm
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
subprocess.run([sys.executable, "-m", "minipool", "--slurm", "cleanup"], check=True)  # not of the allocation
with ContainerPoolExecutor({image!r}, blocks=4, runtime="charliecloud", provider=Slurm(), label={label!r},
                           ship=[helpers.__file__], volumes=[{shared!r} + ":/shared"]) as pool:
    print(json.dumps(list(pool.map(helpers.meet, ["/shared/met"] * 4, [4] * 4))), flush=True)

def our_steps():
    listed = subprocess.run(["squeue", "--steps", "--noheader", "--format=%i %j", "--jobs", os.environ["SLURM_JOB_ID"]],
                            capture_output=True, text=True, check=True).stdout
    return [line for line in listed.splitlines() if "minipool-" in line]

def steps_end(step=""):
    deadline = time.monotonic() + 15
    while [line for line in our_steps() if line.startswith(step)] and time.monotonic() < deadline:
        time.sleep(0.05)
    return [line for line in our_steps() if line.startswith(step)]

# A task past task_timeout: its block is replaced, and its step must end with it, not
# with the task (the step of a killed srun runs on while a process of it lives).
with ContainerPoolExecutor({image!r}, runtime="charliecloud", provider=Slurm(), label={label!r}, task_timeout=1,
                           ship=[helpers.__file__]) as pool:
    step = os.environ["SLURM_JOB_ID"] + "." + pool.submit(helpers.environ, "SLURM_STEP_ID").result(60) + " "
    late = pool.submit(time.sleep, 300)
    try:
        late.result(60)
    except TimeoutError:
        pass
    late_steps = steps_end(step)
print(json.dumps({{"allocation": os.environ["SLURM_JOB_ID"], "steps_left": steps_end(), "late": late_steps}}),
      flush=True)
"""


def test_inside_an_allocation_blocks_are_its_steps_and_all_run_at_once(on_slurm, tmp_path):
    """salloc -N2 of two whole nodes: blocks=4 runs four steps at once (each task waits
    for the other three), two on each node, submits no job, and leaves no step."""
    (tmp_path / "met").mkdir()
    code = IN_AN_ALLOCATION.format(image=on_slurm.image(), label=on_slurm.label, shared=str(tmp_path))
    # The allocation carries the labels of a dead caller's block, as the job of a block
    # whose task starts a pool of its own does once that caller is gone: neither cleanup
    # nor the new pool's sweep of dead callers' jobs may cancel the allocation it runs in.
    gone = subprocess.Popen(["true"])
    gone.wait()
    comment = f"minipool.host={os.uname().nodename},minipool.pid={gone.pid},minipool.executor=deadbeef"
    done = subprocess.run(
        ["salloc", "--nodes=2", "--exclusive", f"--comment={comment}", sys.executable, "-c", code],
        capture_output=True, text=True,
        timeout=DEADLOCK * 2, env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS])},
    )
    assert done.returncode == 0, done.stderr
    met, end = [json.loads(line) for line in done.stdout.splitlines()]
    allocation = end["allocation"]
    assert {job for job, _, _ in met} == {allocation}  # no job of its own: steps of the allocation
    assert len({step for _, step, _ in met}) == 4
    nodes = [node for _, _, node in met]
    assert len(set(nodes)) == 2 and nodes.count(nodes[0]) == 2  # spread: two steps on each of its nodes
    assert end["steps_left"] == end["late"] == [], end
    for blocked in ("step creation temporarily disabled", "can't run 1 processes"):
        assert blocked not in done.stderr
    for _, step, node in met:
        assert f"ready in Slurm job {allocation}, step {step}, node {node} on " in done.stderr
    assert "minipool: Slurm job" not in done.stderr


@pytest.mark.parametrize("stop", ["kill_workers", "terminate_workers"])
def test_stopping_the_workers_ends_their_jobs(on_slurm, stop):
    pool = on_slurm.pool(blocks=2)
    running = [pool.submit(helpers.sleep_then, 60) for _ in range(2)]
    wait_until(lambda: all(future.running() for future in running), what="a task in each job")
    getattr(pool, stop)()
    for future in running:
        with pytest.raises(BrokenContainerPool, match=f"stopped with SIG.* by {stop}"):
            future.result(DEADLOCK)
    wait_until(lambda: not on_slurm.blocks(), timeout=10, what="the jobs to end")


@pytest.mark.slow
def test_a_job_past_its_time_limit_is_a_lost_worker_then_a_new_job(on_slurm):
    """Slurm's limits are whole minutes, checked about once a minute: 1 to 2 minutes."""
    pool = on_slurm.pool(provider=Slurm(time="1"))
    running = pool.submit(time.sleep, 300)
    wait_until(lambda: running.running() and on_slurm.blocks(), what="the task to run in a job")
    (job_id,) = on_slurm.blocks()
    assert job_of(on_slurm.cluster, job_id, "TimeLimit") == "00:01:00"
    with pytest.raises(WorkerLost, match=f"(?s)STEP {job_id}.0 ON .* CANCELLED .* DUE TO TIME LIMIT"):
        running.result(180)
    assert pool.submit(helpers.block).result(DEADLOCK) != job_id


def test_a_queued_job_is_logged_and_startup_timeout_counts_from_when_it_runs(on_slurm, caplog):
    caplog.set_level(logging.INFO, logger="minipool")
    # --hold: the job waits in the queue until released, longer than startup_timeout.
    pool = on_slurm.pool(provider=Slurm(options=["--hold"]), startup_timeout=1)
    future = pool.submit(helpers.block)
    wait_until(lambda: on_slurm.blocks(), what="the job to be queued")
    (job_id,) = on_slurm.blocks()
    wait_until(lambda: f"Slurm job {job_id} is queued" in caplog.text, what="the log to say the job is queued")
    holds(lambda: not future.done(), 2, "the task waiting for its queued job")
    assert on_slurm.cluster.run("scontrol", "release", job_id).returncode == 0
    assert future.result(DEADLOCK) == job_id


def test_shutdown_cancels_a_job_still_queued(on_slurm):
    pool = on_slurm.pool(provider=Slurm(options=["--hold"]))
    wait_until(lambda: on_slurm.blocks(), what="the job to be queued")
    started = time.monotonic()
    pool.shutdown(wait=True)
    assert time.monotonic() - started < 2
    assert not on_slurm.blocks()


def test_python3_on_the_node_without_a_container(on_slurm):
    """runtime=Command([...]) with no container: the node's own python3, under srun."""
    pool = on_slurm.pool(image="python3-on-the-node", runtime=Command(["env"]))
    assert [pool.submit(helpers.block).result(DEADLOCK)] == on_slurm.blocks()
    assert pool.submit(helpers.environ, "CH_RUNNING").result(DEADLOCK) is None  # in no container
    assert pool.submit(helpers.where).result(DEADLOCK)[0] == os.getcwd()  # srun keeps the caller's directory


KILLED_CALLER = """
import time
import helpers
from minipool import ContainerPoolExecutor, Slurm
pool = ContainerPoolExecutor({image!r}, blocks=2, runtime="charliecloud", provider=Slurm(nodes_per_block={nodes}),
                             label={label!r}, ship=[helpers.__file__])
running = [pool.submit(helpers.sleep_then, 60) for _ in range(2)]
while not all(f.running() for f in running):
    time.sleep(0.01)
print("running", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def a_caller_running_two_tasks(on_slurm, tmp_path, nodes=1):
    """KILLED_CALLER, once its tasks run in two jobs of `nodes` nodes; killed at the end.
    The blocks' directories, which a killed caller cannot remove (the next pool on the
    host does: test_runtimes), go to tmp_path instead of /tmp."""
    (tmp_path / "tmp").mkdir()
    code = KILLED_CALLER.format(image=on_slurm.image(), label=on_slurm.label, nodes=nodes)
    process = start_script(code, environment={"TMPDIR": str(tmp_path / "tmp")})
    try:
        assert read_lines(process, 1) == ["running\n"]
        assert len(on_slurm.blocks()) == 2
        yield process
    finally:
        process.kill()
        process.communicate()


@pytest.mark.parametrize("nodes", [1, 2], ids=["one node", "two nodes"])
def test_a_caller_killed_with_sigkill_leaves_no_job_nor_stub(on_slurm, tmp_path, nodes):
    """Its stubs see their stdin end, its salloc keepers theirs: every job ends."""
    with a_caller_running_two_tasks(on_slurm, tmp_path, nodes) as process:
        assert len(processes_using(str(tmp_path / "tmp"))) >= 2 * nodes  # a stub a node, on every node
        process.send_signal(signal.SIGKILL)
        process.wait(DEADLOCK)
        wait_until(lambda: not on_slurm.blocks(), timeout=10, what="the killed caller's jobs to end")
        wait_until(lambda: not processes_using(str(tmp_path / "tmp")), timeout=10, what="its stubs to end")


def test_an_idle_pool_keeps_its_job_past_the_keepers_silence(on_slurm, monkeypatch):
    """The keepalive thread tells each job's keeper, as each stub, that the caller is there."""
    monkeypatch.setattr(minipool, "_HOST_SILENCE", 2.0)  # the keeper's, the stubs' and the keepalive's
    pool = on_slurm.pool()
    job = pool.submit(helpers.block).result(DEADLOCK)
    holds(lambda: on_slurm.blocks() == [job], 5, "the job held while the pool is idle")
    assert pool.submit(helpers.block).result(DEADLOCK) == job


@pytest.mark.slow
def test_a_frozen_callers_jobs_end_once_their_stubs_find_it_silent(on_slurm, tmp_path):
    """SIGSTOP: srun's stdin stays open, but the stubs hear nothing for 30 s (minipool._HOST_SILENCE)."""
    with a_caller_running_two_tasks(on_slurm, tmp_path) as process:
        process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        wait_until(lambda: not on_slurm.blocks(), timeout=minipool._HOST_SILENCE + 30, what="the jobs to end")
        assert time.monotonic() - started > minipool._HOST_SILENCE / 2  # the silence, not something sooner


def test_a_partition_that_does_not_exist_is_named_at_once(on_slurm):
    with pytest.raises(StartupError, match="Slurm has no partition 'nope'; it has debug"):
        on_slurm.pool(provider=Slurm(partition="nope"))


def test_a_job_slurm_refuses_is_a_startup_error_with_what_salloc_said(on_slurm):
    pool = on_slurm.pool(provider=Slurm(options=["--constraint=nope"]))
    with pytest.raises(StartupError, match=r"(?s)cannot start a block on charliecloud on Slurm \(the command lines: "
                                           r"salloc .* --constraint=nope .* -I ... and srun .*\): salloc ended \(exit "
                                           r"code 1\) before its job ran; it said:\n.*Invalid feature specification"):
        pool.submit(helpers.double, 1).result(DEADLOCK)


def test_no_slurm_client_is_a_startup_error_naming_the_command_lines(on_slurm, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StartupError, match=r"cannot run charliecloud on Slurm \(the command lines: salloc --nodes=1 "
                                           r".* and srun --unbuffered .* ch-run .*\): no salloc or srun on PATH"):
        on_slurm.pool()


def queue_a_job_of_a_dead_caller(cluster):
    """A held job whose comment names a caller that is gone, as a SIGKILLed caller's queued job is left."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    comment = f"minipool.host={os.uname().nodename},minipool.pid={gone.pid},minipool.executor=deadbeef"
    subprocess.Popen(
        ["srun", "--hold", "--job-name=minipool-orphan", f"--comment={comment}", "true"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **cluster.environment()},
    )
    wait_until(lambda: [job for job in cluster.jobs() if job[1] == "minipool-orphan"], what="the orphan to queue")
    return next(job_id for job_id, name, _ in cluster.jobs() if name == "minipool-orphan")


def test_ps_lists_and_cleanup_cancels_a_dead_callers_jobs(slurm):
    job_id = queue_a_job_of_a_dead_caller(slurm)
    command = [sys.executable, "-m", "minipool", "--slurm"]
    listed = subprocess.run([*command, "ps"], capture_output=True, text=True, cwd=ROOT, timeout=DEADLOCK)
    assert listed.returncode == 0, listed.stderr
    (line,) = [line for line in listed.stdout.splitlines() if line.split()[1:2] == [job_id]]
    assert line.split()[0] == "slurm" and "gone" in line and "deadbeef" in line and "orphan" in line
    cleaned = subprocess.run([*command, "cleanup"], capture_output=True, text=True, cwd=ROOT, timeout=DEADLOCK)
    assert cleaned.returncode == 0, cleaned.stderr
    assert f"cancelled Slurm job {job_id}" in cleaned.stdout
    wait_until(lambda: not slurm.jobs(), what="the orphan to be cancelled")


def test_ps_lists_a_blocks_job_and_its_step_on_each_node(on_slurm, tmp_path):
    pool = on_slurm.pool(provider=Slurm(nodes_per_block=2), **sharing(tmp_path))
    met = meeting(pool, tmp_path, 2)
    listed = subprocess.run([sys.executable, "-m", "minipool", "--slurm", "ps"], capture_output=True, text=True,
                            cwd=ROOT, timeout=DEADLOCK)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    (job,) = {job for job, _, _ in met}
    (job_row,) = [row for row in rows if row[:2] == ["slurm", job]]
    assert job_row[2] == "RUNNING" and "alive" in job_row and on_slurm.label in job_row
    step_rows = sorted(row[:4] for row in rows if row[3].startswith(f"{job}."))
    assert step_rows == sorted(["slurm,", "node", node, f"{job}.{step}"] for _, step, node in met)


def test_a_new_pool_cancels_the_jobs_dead_callers_left(on_slurm):
    job_id = queue_a_job_of_a_dead_caller(on_slurm.cluster)
    pool = on_slurm.pool(blocks=0)
    wait_until(lambda: job_id not in [job[0] for job in on_slurm.cluster.jobs()], what="the orphan to be cancelled")
    pool.shutdown()


def test_the_example_prints_the_seeds_workflow(slurm, charliecloud_images):
    from test_readme import WORKFLOW_STDOUT

    images = [charliecloud_images["app1_v0.1"], charliecloud_images["app2_v0.1"]]
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "slurm.py"), "--images", *images],
        capture_output=True, text=True, timeout=DEADLOCK * 2,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == WORKFLOW_STDOUT
    assert "on Slurm" in done.stderr
