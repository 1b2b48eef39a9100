"""Runtimes run as a command (issue 10): Charliecloud for real, the command lines of
Apptainer, Singularity and Shifter (not installable here) as the library builds them.

What every runtime shares (tasks, faults, limits, elastic blocks) runs on Charliecloud
through conftest's any_runtime; this file holds what only a command runtime has.
"""

import os
import signal
import tempfile
import time

import pytest

import helpers
import minipool
import worker_stub
from conftest import DEADLOCK
from conftest import processes
from conftest import read_lines
from conftest import start_script
from conftest import wait_until
from minipool import Command
from minipool import ContainerPoolExecutor
from minipool import StartupError

# --------------------------------------------------------------------------- command lines

# The same settings in both of the forms environment= and volumes= take (docker's).
MAPPING = {
    "environment": {"GREETING": "hi there", "LEVEL": "3"},
    "volumes": {"/data": {"bind": "/data", "mode": "ro"}, "/scratch": {"bind": "/work"}},
}
STRINGS = {"environment": ["GREETING=hi there", "LEVEL=3"], "volumes": ["/data:/data:ro", "/scratch:/work"]}

# Checked against each runtime's documentation:
# - apptainer/singularity exec [options] IMAGE COMMAND: --pwd=DIR (initial working
#   directory), --env=NAME=VALUE, --bind=SRC:DEST:OPTS with OPTS ro or rw;
# - shifter --image=TYPE:TAG --workdir=DIR --volume=SRC:DEST[:ro] -- COMMAND (--workdir takes
#   its value only after "="); environment= goes to its process, which Shifter passes on
#   (its --env=NAME=VALUE came after release 18.03.0, whose --env takes no value);
# - ch-run --cd=DIR --set-env=NAME=VALUE --bind=SRC:DST IMAGE_DIR -- COMMAND.
COMMAND_LINES = {
    "apptainer": [
        "apptainer", "exec", "--pwd=/home", "--env=GREETING=hi there", "--env=LEVEL=3",
        "--bind=/data:/data:ro", "--bind=/scratch:/work:rw", "IMAGE",
    ],
    "singularity": [
        "singularity", "exec", "--pwd=/home", "--env=GREETING=hi there", "--env=LEVEL=3",
        "--bind=/data:/data:ro", "--bind=/scratch:/work:rw", "IMAGE",
    ],
    "shifter": [
        "shifter", "--image=IMAGE", "--workdir=/home", "--volume=/data:/data:ro", "--volume=/scratch:/work", "--",
    ],
}
BARE = {
    "apptainer": ["apptainer", "exec", "IMAGE"],
    "singularity": ["singularity", "exec", "IMAGE"],
    "shifter": ["shifter", "--image=IMAGE", "--"],
}


@pytest.mark.parametrize("form", [MAPPING, STRINGS], ids=["mappings", "strings"])
@pytest.mark.parametrize("runtime", COMMAND_LINES)
def test_the_command_line_of_each_runtime(runtime, form):
    image = "docker:app1:0.1" if runtime == "shifter" else "/images/app1.sif"
    expected = [word.replace("IMAGE", image) for word in COMMAND_LINES[runtime]]
    assert minipool._runtime_argv(runtime, image, "/home", form["environment"], form["volumes"]) == expected


@pytest.mark.parametrize("runtime", BARE)
def test_a_command_line_without_options_has_none(runtime):
    assert minipool._runtime_argv(runtime, "IMAGE", None, None, None) == BARE[runtime]


def test_charliecloud_command_line(tmp_path):
    volumes = {"/scratch": {"bind": "/work", "mode": "rw"}}
    assert minipool._runtime_argv("charliecloud", str(tmp_path), "/home", MAPPING["environment"], volumes) == [
        "ch-run", "--cd=/home", "--set-env=GREETING=hi there", "--set-env=LEVEL=3", "--bind=/scratch:/work",
        str(tmp_path), "--",
    ]
    # Without workdir=: the image's own, as ch-convert records it in ch/metadata.json, else /.
    assert minipool._runtime_argv("charliecloud", str(tmp_path), None, None, ["/scratch:/work"]) == [
        "ch-run", "--cd=/", "--bind=/scratch:/work", str(tmp_path), "--",
    ]
    (tmp_path / "ch").mkdir()
    (tmp_path / "ch" / "metadata.json").write_text('{"cwd": "/home", "env": {}}')
    assert minipool._runtime_argv("charliecloud", str(tmp_path), None, None, None) == [
        "ch-run", "--cd=/home", str(tmp_path), "--",
    ]


def test_a_name_alone_takes_its_value_from_here_and_a_path_alone_binds_at_itself(monkeypatch):
    monkeypatch.setenv("FROM_HERE", "host value")
    assert minipool._runtime_argv("apptainer", "IMAGE", None, ["FROM_HERE", "SET=1"], ["/data"]) == [
        "apptainer", "exec", "--env=FROM_HERE=host value", "--env=SET=1", "--bind=/data:/data:rw", "IMAGE",
    ]


@pytest.mark.parametrize("runtime", ["apptainer", "singularity", "shifter", "charliecloud", "command"])
def test_the_command_runs_the_bootstrap_with_the_silence_last(runtime, tmp_path):
    image = str(tmp_path)  # Charliecloud's must be a directory
    runtime = Command(["podman", "run", "-i", "--rm", "{image}"]) if runtime == "command" else runtime
    environment = {"GREETING": "hi"}
    launcher = minipool._open_command(runtime, image, "/usr/bin/python3.11", None, environment, None)
    assert launcher.argv[-4:] == ["/usr/bin/python3.11", "-c", worker_stub.BOOTSTRAP, str(minipool._HOST_SILENCE)]
    assert launcher.argv[:-4] == minipool._runtime_argv(runtime, image, None, environment, None)
    # A Command, and Shifter, have no flags for the environment: their process gets it instead.
    assert launcher.environment == (environment if isinstance(runtime, Command) or runtime == "shifter" else {})


def test_a_command_is_its_argv_with_the_image_in_place():
    runtime = Command(["podman", "run", "-i", "--rm", "{image}", "--name={image}-x"])
    assert minipool._runtime_argv(runtime, "app1", None, {"A": "1"}, None) == [
        "podman", "run", "-i", "--rm", "app1", "--name=app1-x",
    ]


@pytest.mark.parametrize("argument", [{"workdir": "/home"}, {"volumes": ["/data:/data"]}], ids=str)
def test_a_command_takes_no_workdir_or_volumes(argument):
    with pytest.raises(ValueError, match="in its argv"):
        ContainerPoolExecutor("app1", runtime=Command(["ch-run", "{image}", "--"]), **argument)


@pytest.mark.parametrize("argv", ["ch-run {image}", [], ["ch-run", 3]], ids=repr)
def test_a_command_is_a_list_of_strings(argv):
    with pytest.raises(TypeError, match="list of strings"):
        Command(argv)


@pytest.mark.parametrize("runtime", ["charliecloud", "apptainer", "shifter", Command(["ch-run", "{image}", "--"])])
@pytest.mark.parametrize("option", [{"engine": "unix:///var/run/docker.sock"}, {"container_options": {"init": True}}])
def test_engine_options_are_refused_with_a_command_runtime(runtime, option):
    with pytest.raises(ValueError, match="are for runtime='docker'"):
        ContainerPoolExecutor("app1", runtime=runtime, **option)


@pytest.mark.parametrize("runtime, error", [("charlie", ValueError), ("", ValueError), (["ch-run"], TypeError)])
def test_a_runtime_that_is_none_of_ours_is_refused(runtime, error):
    with pytest.raises(error, match="runtime must be one of docker, charliecloud, apptainer, singularity, shifter"):
        ContainerPoolExecutor("app1", runtime=runtime)


def test_charliecloud_refuses_a_read_only_volume():
    with pytest.raises(ValueError, match=r"Charliecloud mounts volumes read-write; \['/data'\] asked for read-only"):
        ContainerPoolExecutor("/images/app1", runtime="charliecloud", volumes={"/data": {"bind": "/x", "mode": "ro"}})


# --------------------------------------------------------------------------- Charliecloud, for real


@pytest.fixture
def charliecloud(runtime_of):
    """The Charliecloud runtime; its teardown proves that no block's process or directory is left."""
    return runtime_of("charliecloud")


# (pool arguments, PATH without ch-run, the runtime it names, words in the error, the command line it names)
STARTUP_FAILURES = {
    "no ch-run on PATH": (
        {}, True, "charliecloud", "No such file or directory: 'ch-run'. Is it installed and on PATH?",
        "ch-run --cd=/home {image} -- python3 -c",
    ),
    "no such command": (
        {"runtime": Command(["no-such-runtime", "{image}"])}, False, "no-such-runtime",
        "No such file or directory: 'no-such-runtime'", "no-such-runtime {image} python3 -c",
    ),
    "no python in the image": (
        {"python": "/nonexistent"}, False, "charliecloud", "(?s)can't execve.*/nonexistent",
        "ch-run --cd=/home {image} -- /nonexistent -c",
    ),
    # It reads its stdin (the stub) and answers garbage.
    "garbage on stdout": (
        {"runtime": Command(["sh", "-c", "echo garbage garbage garbage; exec cat >/dev/null", "{image}"])}, False,
        "sh", "bad frame magic", "sh -c 'echo garbage garbage garbage; exec cat >/dev/null' {image} python3 -c",
    ),
    # It reads nothing and says nothing: the stub's BOOT, larger than a pipe holds, waits.
    "silent": (
        {"runtime": Command(["sh", "-c", "sleep 5", "{image}"]), "startup_timeout": 1}, False,
        "sh", "did not answer within startup_timeout=1", "sh -c 'sleep 5' {image} python3 -c",
    ),
}


@pytest.mark.parametrize("case", STARTUP_FAILURES)
def test_a_runtime_that_cannot_start_a_block_is_a_startup_error_naming_its_command_line(
    charliecloud, monkeypatch, tmp_path, case
):
    options, no_ch_run, runtime, words, command_line = STARTUP_FAILURES[case]
    if no_ch_run:
        monkeypatch.setenv("PATH", str(tmp_path))  # the block's process is looked up on the caller's PATH
    started = time.monotonic()
    pool = charliecloud.pool(blocks=2, **options)
    with pytest.raises(StartupError, match=words) as info:
        pool.submit(helpers.double, 1).result(DEADLOCK)
    assert time.monotonic() - started < 4, "the error took longer than the start"
    assert f"{runtime} (the command line: {command_line.format(image=charliecloud.image())} ...)" in str(info.value)


def test_a_missing_image_directory_is_named_at_once(tmp_path):
    with pytest.raises(StartupError, match=f"Charliecloud's image is a directory, and '{tmp_path}/nope' is none"):
        ContainerPoolExecutor(str(tmp_path / "nope"), runtime="charliecloud")


def test_environment_workdir_and_volumes_reach_the_task(charliecloud, tmp_path, monkeypatch):
    (tmp_path / "data.txt").write_text("bound")
    monkeypatch.setenv("FROM_HERE", "the caller's")
    for environment, volumes in [
        ({"GREETING": "hi there", "FROM_HERE": "set"}, {str(tmp_path): {"bind": "/shared", "mode": "rw"}}),
        (["GREETING=hi there", "FROM_HERE"], [f"{tmp_path}:/shared"]),
    ]:
        pool = charliecloud.pool(workdir="/shared", environment=environment, volumes=volumes)
        cwd, path = pool.submit(helpers.where).result(DEADLOCK)
        assert cwd == "/shared" and "/shared" in path
        assert pool.submit(helpers.environ, "GREETING").result(DEADLOCK) == "hi there"
        assert pool.submit(helpers.environ, "FROM_HERE").result(DEADLOCK) == (
            "set" if isinstance(environment, dict) else "the caller's"
        )
        assert pool.submit(helpers.read_text, "/shared/data.txt").result(DEADLOCK) == "bound"
        pool.submit(helpers.write_text, "/shared/back.txt", str(environment)).result(DEADLOCK)
        assert (tmp_path / "back.txt").read_text() == str(environment)
        pool.shutdown()


def test_a_command_runs_tasks_end_to_end(charliecloud):
    """Command(["ch-run", "{image}", "--"]): no flags of ours; the environment goes to its process."""
    pool = charliecloud.pool(blocks=2, runtime=Command(["ch-run", "{image}", "--"]), environment={"GREETING": "hi"})
    assert pool.submit(helpers.environ, "GREETING").result(DEADLOCK) == "hi"
    assert pool.submit(helpers.where).result(DEADLOCK)[0] == "/"  # ch-run's own start, without --cd
    assert pool.submit(helpers.read_text, "/home/app1.py").result(DEADLOCK).count("def predict") == 1
    assert list(pool.map(helpers.double, range(100), chunksize=7)) == [2 * i for i in range(100)]
    helpers.wait_for_blocks(pool, 2)
    assert len(charliecloud.blocks()) == 2


def blocks_of(pid):
    """The blocks a caller started: its children that lead a session of their own."""
    return {child for child, parent, session in processes() if parent == pid and session == child}


def in_sessions(sessions):
    return {pid for pid, _, session in processes() if session in sessions}


@pytest.mark.parametrize("end", ["shutdown", "the stub exits", "task_timeout"])
def test_what_a_task_started_ends_with_its_block(charliecloud, end):
    """A block's session holds what its tasks started; however the block ends (a
    shutdown, its stub dying by itself, a task killed past task_timeout), nothing of
    it may live on."""
    pool = charliecloud.pool(task_timeout=1 if end == "task_timeout" else None)
    block = int(pool.submit(helpers.block).result(DEADLOCK))
    if end == "shutdown":
        child = pool.submit(helpers.leave_a_child).result(DEADLOCK)
        assert child in in_sessions({block})
        pool.shutdown()
    elif end == "the stub exits":
        with pytest.raises(minipool.WorkerLost):
            pool.submit(helpers.leave_a_child, "exit").result(DEADLOCK)
    else:
        with pytest.raises(TimeoutError):
            pool.submit(helpers.leave_a_child, 600).result(DEADLOCK)
    wait_until(lambda: not in_sessions({block}), timeout=10, what="the block's processes to end")


def test_a_caller_with_over_a_thousand_files_open_starts_blocks(charliecloud):
    """select() refuses a descriptor of 1024 or more, which a caller with many files
    open gets for a block's pipes."""
    files = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        pool = charliecloud.pool()
        assert pool.submit(helpers.double, 21).result(DEADLOCK) == 42
    finally:
        for fd in files:
            os.close(fd)


KILLED_CALLER = """
import time
import helpers
from minipool import ContainerPoolExecutor
pool = ContainerPoolExecutor({image!r}, blocks=2, runtime="charliecloud", ship=[helpers.__file__])
running = [pool.submit(helpers.sleep_then, 60) for _ in range(2)]
while not all(f.running() for f in running):
    time.sleep(0.01)
print("running", flush=True)
time.sleep(600)
"""


def test_a_caller_killed_while_tasks_run_leaves_no_process(charliecloud, tmp_path, monkeypatch):
    # The blocks' TMPDIRs, which the killed caller cannot remove, go to tmp_path instead of /tmp.
    (tmp_path / "tmp").mkdir()
    code = KILLED_CALLER.format(image=charliecloud.image())
    process = start_script(code, environment={"TMPDIR": str(tmp_path / "tmp")})
    sessions = set()
    try:
        assert read_lines(process, 1) == ["running\n"]
        sessions = blocks_of(process.pid)
        assert len(sessions) == 2
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=DEADLOCK)
        wait_until(lambda: not in_sessions(sessions), timeout=5, what="the killed caller's blocks to go")
        assert len(list((tmp_path / "tmp").iterdir())) == 2
        # The next pool on this host removes the block directories the dead caller left.
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        with ContainerPoolExecutor(charliecloud.image(), runtime="charliecloud", blocks=0):
            assert not list((tmp_path / "tmp").iterdir())
    finally:
        process.kill()
        process.communicate()
        for pid in in_sessions(sessions):  # not left to the tests after this one
            os.kill(pid, signal.SIGKILL)


CTRL_C = """
import time
import helpers
from minipool import ContainerPoolExecutor

def tell(future):
    print("cancelled" if future.cancelled() else f"ended {{future.exception()!r}} {{future.result()}}", flush=True)

with ContainerPoolExecutor({image!r}, runtime="charliecloud", ship=[helpers.__file__]) as pool:
    running = pool.submit(helpers.sleep_then, 2, "ran")
    queued = pool.submit(helpers.double, 1)
    for future in (running, queued):
        future.add_done_callback(tell)
    while not running.running():
        time.sleep(0.01)
    print("running", flush=True)
    time.sleep(600)
"""


def test_a_ctrl_c_in_the_callers_terminal_does_not_reach_the_blocks(charliecloud):
    """A terminal's Ctrl-C signals its foreground process group: here the caller's own
    (its session's), which the blocks, each in a session of its own, are not in."""
    process = start_script(CTRL_C.format(image=charliecloud.image()), new_session=True)
    try:
        assert read_lines(process, 1) == ["running\n"]
        (block,) = blocks_of(process.pid)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=DEADLOCK)
    finally:
        process.kill()
        process.communicate()
    # Queued work cancelled; the running task, which a SIGINT would have ended, ran to its end.
    assert out.splitlines() == ["cancelled", "ended None ran"], err
    assert process.returncode == -signal.SIGINT and "KeyboardInterrupt" in err
    assert block not in {pid for pid, _, _ in processes()}
