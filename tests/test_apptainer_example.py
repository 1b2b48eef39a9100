"""examples/apptainer.py: the seed's app_1 on a runtime run as a command (runtime=).

Apptainer, Singularity and Shifter cannot be installed here, so the example runs for
real with --runtime charliecloud on an image directory made from app1_v0.1; for the
others only the command line minipool would give them is checked, and the example's
apptainer path is run once through a stand-in `apptainer` that records its command
line and runs the rest with ch-run. Without ch-run these tests skip, unless CI=true,
where they fail.
"""

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

import minipool
from conftest import DEADLOCK
from conftest import ROOT
from conftest import processes_using
from conftest import require_ch_run
from conftest import wait_until

EXAMPLE = os.path.join(ROOT, "examples", "apptainer.py")
# The seed's result, as the example prints it.
SEED = "[2, 4, 6]\n"


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load("apptainer_example", EXAMPLE)
build = load("build", os.path.join(ROOT, "images", "build.py"))


@pytest.fixture(scope="module")
def charliecloud_image(engine, images):
    """The Charliecloud image directory of app1_v0.1 (images/charliecloud/, made if missing)."""
    require_ch_run()
    return str(build.ensure_charliecloud_images(client=engine, log=lambda line: None)["app1_v0.1"])


def run_example(tmp_path, *arguments, path=None):
    """The example as a user runs it, with its TMPDIR in tmp_path; once it has exited,
    no process of it and no block directory may be left."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PATH": path or os.environ["PATH"]}
    done = subprocess.run(
        [sys.executable, EXAMPLE, *arguments], capture_output=True, text=True, timeout=DEADLOCK, env=env
    )
    wait_until(lambda: not processes_using(str(scratch)), timeout=15, what="the example's blocks to exit")
    assert not os.listdir(scratch), "the blocks' temporary directories were left"
    assert "Traceback" not in done.stderr, done.stderr
    return done


# --------------------------------------------------------------------------- run here, for real


def test_the_example_prints_the_seed_result_on_charliecloud(charliecloud_image, tmp_path):
    done = run_example(tmp_path, "--runtime", "charliecloud", "--image", charliecloud_image)
    assert done.returncode == 0, done.stderr
    assert done.stdout == SEED
    assert f"ran on 2 block(s) of {charliecloud_image} with charliecloud" in done.stderr


def test_its_default_image_for_charliecloud_is_the_one_build_py_makes(charliecloud_image):
    assert example.DEFAULT_IMAGES["charliecloud"] == charliecloud_image


@pytest.mark.parametrize("runtime", ["apptainer", "singularity", "shifter"])
def test_a_runtime_that_is_not_installed_is_one_line_naming_it(runtime, tmp_path):
    done = run_example(tmp_path, "--runtime", runtime, path="/nonexistent")
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert f"cannot run {runtime}" in line and "Is it installed and on PATH?" in line
    given = shlex.join(minipool._runtime_argv(runtime, example.DEFAULT_IMAGES[runtime], "/home", None, None))
    assert f"command line: {given} python3 -c ..." in line  # what the user would run by hand


# --------------------------------------------------------------------------- command lines only


# What minipool runs for each runtime with the example's options, up to the bootstrap.
# Apptainer's and Singularity's flags are from `apptainer exec --help`'s documentation
# (--pwd, --env, --bind SRC:DEST:ro), Shifter's from its shifter.c (--image, --workdir,
# --volume); none of these three has run here.
EXPECTED = {
    "apptainer": ["apptainer", "exec", "--pwd=/home", "app1.sif", "python3"],
    "singularity": ["singularity", "exec", "--pwd=/home", "app1.sif", "python3"],
    "shifter": ["shifter", "--image=docker:app1_v0.1:latest", "--workdir=/home", "--", "python3"],
    "charliecloud": ["ch-run", "--cd=/home", example.DEFAULT_IMAGES["charliecloud"], "--", "python3"],
}


@pytest.mark.parametrize("runtime", sorted(EXPECTED))
def test_the_command_line_each_runtime_gets(runtime):
    image = example.DEFAULT_IMAGES[runtime]
    argv = minipool._runtime_argv(runtime, image, example.WORKDIR, None, None) + minipool._worker_command("python3")
    assert argv[: len(EXPECTED[runtime])] == EXPECTED[runtime]
    assert argv[len(EXPECTED[runtime]) :] == ["-c", minipool._stub.BOOTSTRAP, "30.0"]


def test_apptainers_flags_for_environment_and_volumes():
    argv = minipool._runtime_argv(
        "apptainer", "app1.sif", "/home", {"OMP_NUM_THREADS": "1"}, {"/data": {"bind": "/in", "mode": "ro"}}
    )
    assert argv == ["apptainer", "exec", "--pwd=/home", "--env=OMP_NUM_THREADS=1", "--bind=/data:/in:ro", "app1.sif"]


# A stand-in for `apptainer exec [--pwd=DIR] IMAGE COMMAND...`: it records its command
# line, then runs COMMAND in the Charliecloud image directory instead. Not Apptainer:
# it shows what the example gives the runtime, and that a process started that way
# serves the pool.
STAND_IN = """#!/bin/sh
printf '%s\\0' "$@" >"{record}"
[ "$1" = exec ] || exit 64
shift
cd=/
case $1 in --pwd=*) cd=${{1#--pwd=}}; shift ;; esac
shift  # the image: {image} stands for it
exec ch-run --cd="$cd" {image} -- "$@"
"""


def test_the_example_through_a_stand_in_apptainer(charliecloud_image, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    stand_in = bin_dir / "apptainer"
    stand_in.write_text(STAND_IN.format(record=record, image=shlex.quote(charliecloud_image)))
    stand_in.chmod(0o755)
    done = run_example(tmp_path, path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == SEED
    given = record.read_text().split("\0")[:-1]
    assert given == [*EXPECTED["apptainer"][1:], "-c", minipool._stub.BOOTSTRAP, "30.0"]
