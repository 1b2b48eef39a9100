"""The README's code blocks run as written (issue 13).

Every fenced block is either run here, against the real engine and the seed's images
(and Charliecloud's ch-run on image directories made from them), or skipped by name
below with the reason. Python blocks run as scripts in a subprocess
(their functions live in its __main__, as in a user's script); the containers they
start carry its pid (`minipool.pid`), which is how their leftovers are found. Each
shell command is run or skipped by name; every shell block must at least parse. Each
runs with a TMPDIR of its own: once it is done, no process of it (a block run as a
command keeps that TMPDIR) and no file may be left there.
"""

import ast
import contextlib
import importlib.util
import inspect
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import DEADLOCK
from conftest import ROOT
from conftest import processes_using
from conftest import require_ch_run
from conftest import wait_until
from minipool import ContainerPoolExecutor

README = os.path.join(ROOT, "README.md")
SEED_DEMO_STDOUT = "[2, 4, 6]\n[1, 4, 9]\n"
# examples/workflow.py's results, the same on every runtime.
WORKFLOW_STDOUT = """X: [2, 4, 6]
Y0: [4, 16, 36]
Y1: [9, 25, 49]
Y2: [16, 36, 64]
Y3: [25, 49, 81]
Z: [112, 166, 232, 310]
"""

# Python blocks not run here, by a line of theirs, with the reason.
PYTHON_SKIPPED = {
    "ContainerPoolExecutor(image, blocks=": "the signature, not a program: "
    "test_the_signature_is_the_executors checks it",
    'gpu_box = docker.DockerClient(base_url="tcp://10.0.0.5:2376"': "needs an engine at an example address",
    'engine="unix:///run/podman/podman.sock"': "needs the Podman service of the block above, which is not started "
    "here; the behaviour suite runs on a Podman service of its own (conftest's podman fixture)",
    'ContainerPoolExecutor("app1.sif", runtime="apptainer"': "no Apptainer here (no package): "
    "tests/test_apptainer_example.py checks its command line and runs it through a stand-in apptainer",
}

# Shell commands not run here, by their start, with the reason.
SHELL_SKIPPED = {
    "examples/run.sh test": "runs this very suite (.ci/run runs it)",
    "apt-get install": "installs packages (.ci/run does, as root on a fresh machine)",
    "setsid dockerd": "would start a second dockerd on the socket of the running one (.ci/run starts it)",
    "mkdir -p /run/podman": "prepares the machine's own Podman service, not started here",
    "podman system service": "starts the machine's own Podman service; the tests start one of their own",
    "docker save app1_v0.1 app2_v0.1 | podman load": "fills the machine-wide Podman store (checked by hand: both "
    "images load, 9 s)",
    "python -m minipool cleanup": "removes other runs' containers: tests on this engine make orphans on purpose",
    "python -m minipool --engine unix:///run/user/1000/docker.sock": "example engine addresses",
    "apptainer build": "no Apptainer here (no package)",
    "python examples/apptainer.py --runtime apptainer": "no Apptainer here (no package): "
    "tests/test_apptainer_example.py runs it through a stand-in apptainer",
    "python examples/apptainer.py --runtime singularity": "no Singularity here (no package)",
    "shifterimg pull": "no Shifter here (no package)",
    "python examples/apptainer.py --runtime shifter": "no Shifter here (no package)",
    "python -m minipool --slurm cleanup": "cancels other runs' jobs: tests/test_slurm.py runs it on a dead caller's",
    "python tests/slurm_cluster.py python examples/slurm.py": "starts a cluster of its own beside the session's: "
    "tests/test_slurm.py runs examples/slurm.py on the session's cluster, and .ci/run the benchmark this way",
    "python tests/slurm_cluster.py sbatch": "starts a cluster of its own beside the session's: the sbatch command "
    "below it runs on the session's",
    'exec python examples/slurm.py "$@"': "the batch script's own line (examples/slurm_batch.sh, whose lines "
    "test_the_batch_script_is_the_examples checks): sbatch runs it",
}


def fenced_blocks():
    """(language, line number, code) of every fenced block, dedented (some sit in lists)."""
    with open(README) as readme:
        lines = readme.read().splitlines()
    found = []
    opening = None
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^(\s*)```(\w*)\s*$", line)
        if fence and opening is None:
            opening = (fence.group(2), number, len(fence.group(1)))
        elif fence and opening is not None:
            language, start, indent = opening
            body = "\n".join(text[indent:] for text in lines[start:number - 1])
            found.append((language, start, textwrap.dedent(body)))
            opening = None
    assert opening is None, f"README.md: the block at line {opening[1]} is never closed"
    return found


def blocks_in(language):
    return [(start, code) for lang, start, code in fenced_blocks() if lang == language]


def commands(code):
    """The commands of a shell block, without comments (none of ours spans lines)."""
    return [line.split("  #")[0].strip() for line in code.splitlines() if line.strip() and not line.startswith("#")]


def skipped(text, table):
    return next((reason for start, reason in table.items() if start in text), None)


def needs_charliecloud(code):
    return "charliecloud" in code or "ch-run" in code


def with_slurm(code, env, request):
    """`env` for a block that needs a Slurm cluster (the session's, conftest's slurm_cluster), else as it is."""
    if "Slurm(" not in code and "--slurm" not in code and "sbatch" not in code:
        return env
    return {**env, **request.getfixturevalue("slurm").environment()}


@pytest.fixture
def charliecloud(request):
    """ch-run and the image directories of app1_v0.1 and app2_v0.1 (images/charliecloud/,
    made if missing); skip without ch-run, except in CI."""
    require_ch_run()
    engine = request.getfixturevalue("engine")
    request.getfixturevalue("images")
    spec = importlib.util.spec_from_file_location("build", os.path.join(ROOT, "images", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.ensure_charliecloud_images(client=engine, log=lambda line: None)


def assert_no_block_left(env):
    """No process that a command started with this TMPDIR, and nothing in it, is left."""
    scratch = env["TMPDIR"]
    wait_until(lambda: not processes_using(scratch), timeout=15, what=f"the processes using {scratch} to exit")
    assert not os.listdir(scratch), f"left in TMPDIR: {os.listdir(scratch)}"


def expected_prints(code):
    """What the block's `print(...)  # VALUE` lines say they print, in order."""
    return [match.group(1) for match in re.finditer(r"^\s*print\(.*\)\s+#\s*(.+?)\s*$", code, re.MULTILINE)]


@pytest.fixture
def shell_env(tmp_path):
    """Environment and cwd for README commands: `python` is this interpreter, minipool is
    this checkout's, and a scratch directory holds the checkout's examples/ and images/,
    so that files the commands write (results/) land there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    for name in ("examples", "images"):
        (work / name).symlink_to(os.path.join(ROOT, name))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": ROOT,
        "MINIPOOL_PYTHON": sys.executable,  # examples/run.sh: no .venv of its own
        "MINIPOOL_NO_INSTALL": "1",  # examples/run.sh: never install nor start an engine
        "TMPDIR": str(scratch),  # where blocks run as commands keep their files: checked after each
    }
    return env, str(work)


def run_command(command, env, cwd):
    """Run one README command as the user would, in bash; (its pid, the finished process).
    `exec` keeps the pid: the containers a python command starts carry it."""
    script = command if re.match(r"(until|while|for|if)\b", command) else f"exec {command}"
    process = subprocess.Popen(
        ["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = process.communicate(timeout=DEADLOCK * 2)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"{command!r} hung; its stderr:\n{err}") from None
    return process.pid, subprocess.CompletedProcess(command, process.returncode, out, err)


def owned_by(engine, pid):
    filters = {"label": [f"minipool.pid={pid}", f"minipool.host={socket.gethostname()}"]}
    return [c["Id"] for c in engine.api.containers(all=True, filters=filters)]


def assert_left_nothing(engine, pid, container_ids=()):
    """No container of process `pid` (or among `container_ids`) is left: those left are
    removed, then the test fails."""
    import docker.errors

    def left():
        mine = owned_by(engine, pid)
        for short in container_ids:
            mine += [c["Id"] for c in engine.api.containers(all=True, filters={"id": short})]
        return mine

    try:
        wait_until(lambda: not left(), timeout=15, what=f"the containers of pid {pid} to go")
    except AssertionError:
        leftovers = left()
        for container_id in leftovers:
            with contextlib.suppress(docker.errors.NotFound):  # auto_remove may get there first
                engine.api.remove_container(container_id, force=True)
        raise AssertionError(f"containers left behind: {leftovers}") from None


def containers_created(engine, pid, since):
    """How many containers process `pid` created from `since` until now, by the engine's events."""
    filters = {
        "type": "container", "event": "create",
        "label": [f"minipool.pid={pid}", f"minipool.host={socket.gethostname()}"],
    }
    return len(list(engine.events(since=f"{since:.3f}", until=f"{time.time():.3f}", filters=filters, decode=True)))


# --------------------------------------------------------------------------- structure


def test_the_first_block_is_the_two_commands():
    language, _, code = fenced_blocks()[1]  # the first is the library at a glance
    assert language == "sh"
    assert commands(code) == ["examples/run.sh demo", "examples/run.sh test"]


def test_ci_runs_the_readmes_test_command():
    test_command = commands(fenced_blocks()[1][2])[1]
    with open(os.path.join(ROOT, ".ci", "run")) as ci:
        assert test_command in [line.strip() for line in ci], f".ci/run does not run {test_command!r} verbatim"


def test_every_command_is_run_or_skipped_by_name():
    unknown = [
        command
        for _, code in blocks_in("sh")
        for command in commands(code)
        if command not in SHELL_CHECKS and skipped(command, SHELL_SKIPPED) is None
    ]
    assert not unknown, f"README commands neither run nor skipped by name: {unknown}"


@pytest.mark.parametrize("start, code", blocks_in("sh"), ids=[f"line{start}" for start, _ in blocks_in("sh")])
def test_every_shell_block_parses(start, code):
    parsed = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
    assert parsed.returncode == 0, f"README.md line {start}: {parsed.stderr}"


@pytest.mark.parametrize("start, code", blocks_in("python"), ids=[f"line{start}" for start, _ in blocks_in("python")])
def test_every_python_block_parses(start, code):
    if code.startswith("ContainerPoolExecutor(image"):
        code = f"def {code}: pass"
    ast.parse(code, f"README.md line {start}")


def test_the_signature_is_the_executors():
    (code,) = [code for _, code in blocks_in("python") if code.startswith("ContainerPoolExecutor(image")]
    shown = ast.parse(f"def {code}: pass").body[0].args
    defaults = [None] * (len(shown.args) - len(shown.defaults)) + shown.defaults
    readme = [(arg.arg, "POSITIONAL_OR_KEYWORD", default) for arg, default in zip(shown.args, defaults)]
    readme += [(arg.arg, "KEYWORD_ONLY", default) for arg, default in zip(shown.kwonlyargs, shown.kw_defaults)]
    actual = list(inspect.signature(ContainerPoolExecutor).parameters.values())
    assert [(name, kind) for name, kind, _ in readme] == [(p.name, p.kind.name) for p in actual]
    for (name, _, default), parameter in zip(readme, actual):
        value = inspect.Parameter.empty if default is None else eval(compile(ast.Expression(default), "", "eval"), {})
        assert value == parameter.default, f"README says {name}={value!r}, the executor has {parameter.default!r}"


# --------------------------------------------------------------------------- Python blocks


PYTHON_BLOCKS = blocks_in("python")


@pytest.mark.parametrize("start, code", PYTHON_BLOCKS, ids=[f"line{start}" for start, _ in PYTHON_BLOCKS])
def test_python_block_runs_as_a_script(start, code, images, engine, shell_env, tmp_path, request):
    reason = skipped(code, PYTHON_SKIPPED)
    if reason:
        pytest.skip(f"README.md line {start}: {reason}")
    if needs_charliecloud(code):
        request.getfixturevalue("charliecloud")
    env, work = shell_env
    env = with_slurm(code, env, request)
    script = tmp_path / "block.py"
    script.write_text(code)
    # In the scratch checkout: the blocks name images/charliecloud/... as the README's reader would.
    pid, done = run_command(f"{sys.executable} {script}", env, work)
    assert_left_nothing(engine, pid)
    assert_no_block_left(env)
    assert done.returncode == 0, f"README.md line {start} failed:\n{done.stderr}"
    printed = done.stdout.splitlines()
    assert printed[: len(expected_prints(code))] == expected_prints(code), done.stdout


# --------------------------------------------------------------------------- shell commands


def demo_prints_the_seeds_results(done, engine, since, pid):
    assert done.stdout == SEED_DEMO_STDOUT
    assert "engine: found at" in done.stderr and "images: app1_v0.1 and app2_v0.1 present" in done.stderr
    # The demo runs in a child of the script: its containers, by the ids it logs.
    assert_left_nothing(engine, pid, re.findall(r"in container ([0-9a-f]{12})", done.stderr))


def workflow_runs(done, engine, since, pid):
    assert done.stdout == WORKFLOW_STDOUT
    if "6 came from the cache" in done.stderr:  # the second run
        assert "no container was started" in done.stderr
        assert containers_created(engine, pid, since) == 0
    else:
        assert "6 ran in a container" in done.stderr
        assert containers_created(engine, pid, since) >= 1  # so the events do see them
    assert_left_nothing(engine, pid)


def ps_lists(done, engine, since, pid):
    assert done.stdout.split()[:2] == ["ENGINE", "CONTAINER"] or done.stdout.startswith("no minipool")


def slurm_ps_lists(done, engine, since, pid):
    assert done.stdout.split()[:2] == ["ENGINE", "CONTAINER"] and "slurm" not in done.stdout  # no job is left


def charliecloud_images_made(done, engine, since, pid):
    made = re.findall(r"Charliecloud image director(?:y|ies) .*", done.stdout)
    assert made, done.stdout
    for name in ("app1_v0.1", "app2_v0.1"):
        with open(os.path.join(ROOT, "images", "charliecloud", name, "ch", "metadata.json")) as metadata:
            assert '"cwd": "/home"' in metadata.read()


def seed_demo_on_charliecloud(done, engine, since, pid):
    assert done.stdout == SEED_DEMO_STDOUT  # as on Docker
    assert "demo: two pools (charliecloud)" in done.stderr
    assert containers_created(engine, pid, since) == 0  # no engine involved


def workflow_on_charliecloud(done, engine, since, pid):
    assert done.stdout == WORKFLOW_STDOUT  # as on Docker
    assert "6 ran in a container" in done.stderr and "ran in ch-run process" in done.stderr
    assert containers_created(engine, pid, since) == 0


def apptainer_example_on_charliecloud(done, engine, since, pid):
    assert done.stdout == "[2, 4, 6]\n"
    assert "with charliecloud" in done.stderr


def engine_answers(done, engine, since, pid):
    pass  # the loop ended, with status 0: `docker info` answered


def workflow_printed(done, engine, since, pid):
    assert done.stdout == WORKFLOW_STDOUT  # the batch job's, in its --output file


# Shell commands run here, with what they must do.
SHELL_CHECKS = {
    "sbatch --wait examples/slurm_batch.sh": engine_answers,  # its status is the job's; cat shows what it printed
    "cat workflow.out": workflow_printed,
    "examples/run.sh demo": demo_prints_the_seeds_results,
    "python examples/workflow.py --cache results/": workflow_runs,
    "python -m minipool ps": ps_lists,
    "python -m minipool --slurm ps": slurm_ps_lists,
    "python images/build.py --charliecloud": charliecloud_images_made,
    "python examples/seed_demo.py --runtime charliecloud": seed_demo_on_charliecloud,
    "python examples/workflow.py --runtime charliecloud": workflow_on_charliecloud,
    "python examples/apptainer.py --runtime charliecloud": apptainer_example_on_charliecloud,
    "until docker info >/dev/null 2>&1; do sleep 0.5; done": engine_answers,
}

SHELL_BLOCKS = [(start, code) for start, code in blocks_in("sh") if any(c in SHELL_CHECKS for c in commands(code))]


@pytest.mark.parametrize("start, code", SHELL_BLOCKS, ids=[f"line{start}" for start, _ in SHELL_BLOCKS])
def test_shell_block_runs(start, code, images, engine, shell_env, request):
    """The block's commands that can run here, in order, in one scratch directory."""
    env, cwd = shell_env
    if needs_charliecloud(code):
        request.getfixturevalue("charliecloud")
    env = with_slurm(code, env, request)
    for command in commands(code):
        if command not in SHELL_CHECKS:
            continue
        since = time.time()
        pid, done = run_command(command, env, cwd)
        assert done.returncode == 0, f"README.md line {start}: {command!r} failed:\n{done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
        SHELL_CHECKS[command](done, engine, since, pid)
        assert_no_block_left(env)


def test_the_batch_script_is_the_examples():
    """The README's batch script is examples/slurm_batch.sh but for its leading comments."""
    (block,) = [code for _, code in blocks_in("sh") if code.startswith("#!/bin/sh\n#SBATCH")]
    with open(os.path.join(ROOT, "examples", "slurm_batch.sh")) as file:
        lines = file.read().splitlines()
    assert block.splitlines() == lines[:1] + [line for line in lines[1:] if line.startswith(("#SBATCH", "exec"))]


def test_no_engine_is_one_message_naming_the_socket(shell_env):
    """examples/run.sh where no engine answers and it may not start one: the commands to
    run, exit 1, no traceback."""
    env, cwd = shell_env
    env = {**env, "DOCKER_HOST": "unix:///nonexistent.sock"}
    _, done = run_command("examples/run.sh demo", env, cwd)
    assert done.returncode == 1
    assert "no Docker engine answers at DOCKER_HOST=unix:///nonexistent.sock" in done.stderr
    assert "apt-get install -y docker.io" in done.stderr and "Traceback" not in done.stderr
    for example in ("seed_demo.py", "workflow.py"):
        _, done = run_command(f"python examples/{example}", env, cwd)
        assert done.returncode == 1
        assert "unix:///nonexistent.sock" in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr
