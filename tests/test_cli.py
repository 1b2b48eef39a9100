"""python -m minipool ps | cleanup, run as a user would."""

import os
import subprocess
import sys

from conftest import DEADLOCK
from conftest import ROOT
from conftest import containers_labelled
from conftest import left_by_a_dead_caller
from minipool import ContainerPoolExecutor


def minipool(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "minipool", *args], capture_output=True, text=True, timeout=DEADLOCK, env=env
    )


def test_help_and_usage_errors():
    shown = minipool("--help")
    assert shown.returncode == 0
    assert "ps" in shown.stdout and "cleanup" in shown.stdout
    assert minipool().returncode == 2
    assert minipool("frobnicate").returncode == 2


def test_an_unreachable_engine_exits_1_and_says_why():
    result = minipool("--engine", "unix:///nonexistent/docker.sock", "ps")
    assert result.returncode == 1
    assert "cannot reach the engine at unix:///nonexistent/docker.sock" in result.stderr


def test_ps_lists_live_and_orphaned_containers(images, engine, label):
    # (Created after the pool, whose start would sweep it away.)
    with ContainerPoolExecutor("app1_v0.1", label=label) as pool:
        orphan = left_by_a_dead_caller(engine, label)
        try:
            assert pool.submit(abs, -2).result(DEADLOCK) == 2
            listed = minipool("ps")
        finally:
            engine.api.remove_container(orphan, force=True)
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if line.endswith(label)]
    assert len(rows) == 2
    assert any(orphan[:12] in row and "gone" in row and "created" in row for row in rows)
    assert any(f"{os.getpid()} alive" in row and "running" in row for row in rows)


def test_cleanup_removes_what_dead_owners_left_and_nothing_else(images, engine, label):
    with ContainerPoolExecutor("app1_v0.1", label=label) as pool:
        orphan = left_by_a_dead_caller(engine, label)
        assert pool.submit(abs, -3).result(DEADLOCK) == 3
        cleaned = minipool("cleanup")
        assert cleaned.returncode == 0, cleaned.stderr
        assert f"removed {orphan[:12]}" in cleaned.stdout
        assert len(containers_labelled(engine, label)) == 1  # the live pool's container stays
        assert pool.submit(abs, -4).result(DEADLOCK) == 4
