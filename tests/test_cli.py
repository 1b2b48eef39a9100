"""python -m minipool ps | cleanup, run as a user would."""

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap

from conftest import APP1
from conftest import DEADLOCK
from conftest import ROOT
from conftest import containers_labelled
from conftest import left_by_a_dead_caller
from conftest import on_host
from minipool import ContainerPoolExecutor


def minipool(*args, host=None):
    """python -m minipool ARGS; with `host`, run on that host (own_host): it sweeps and
    lists as local only that host's, not the containers of other runs on this engine."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    argv = [sys.executable, "-m", "minipool", *args]
    return subprocess.run(
        argv if host is None else on_host(host, argv), capture_output=True, text=True, timeout=DEADLOCK, env=env
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


def test_ps_lists_live_and_orphaned_containers(images, engine, label, own_host):
    # (Created after the pool, whose start would sweep it away.)
    with ContainerPoolExecutor("app1_v0.1", label=label) as pool:
        orphan = left_by_a_dead_caller(engine, label, own_host)
        try:
            assert pool.submit(abs, -2).result(DEADLOCK) == 2
            listed = minipool("ps", host=own_host)
        finally:
            engine.api.remove_container(orphan, force=True)
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if line.endswith(label)]
    assert len(rows) == 2
    assert any(orphan[:12] in row and "gone" in row and "created" in row for row in rows)
    assert any(f"{os.getpid()} alive" in row and "running" in row for row in rows)


def test_cleanup_removes_what_dead_owners_left_and_nothing_else(images, engine, label, own_host):
    with ContainerPoolExecutor("app1_v0.1", label=label) as pool:
        orphan = left_by_a_dead_caller(engine, label, own_host)
        assert pool.submit(abs, -3).result(DEADLOCK) == 3
        cleaned = minipool("cleanup", host=own_host)
        assert cleaned.returncode == 0, cleaned.stderr
        assert f"removed {orphan[:12]}" in cleaned.stdout
        assert len(containers_labelled(engine, label)) == 1  # the live pool's container stays
        assert pool.submit(abs, -4).result(DEADLOCK) == 4


def test_cleanup_by_another_user_leaves_the_containers_of_live_callers(second_engine):
    """On an engine users share, another user's cleanup may not signal our process
    (kill(pid, 0) is refused, not "no such process"): to it we are alive, and our
    container stays. A dead caller's goes. (The second engine, opened to nobody, is
    the test's own: no one else's container is at stake.)"""
    client = second_engine.client()
    try:
        ours = {"minipool": "test", "minipool.host": socket.gethostname(), "minipool.pid": str(os.getpid())}
        live = client.api.create_container(APP1, ["python3"], labels=ours)["Id"]
        dead = left_by_a_dead_caller(client, "a-dead-caller", socket.gethostname())
        os.chmod(second_engine.root, 0o711)
        os.chmod(second_engine.url.removeprefix("unix://"), 0o666)
        nobody = pwd.getpwnam("nobody")
        scratch = tempfile.mkdtemp(prefix="minipool-nobody-")  # nobody's TMPDIR: its sweep reaches no one's
        os.chmod(scratch, 0o777)
        try:
            code = f"""
                import os, sys
                import minipool
                os.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})
                sys.exit(minipool._main(["--engine", {second_engine.url!r}, "cleanup"]))
                """
            env = {**os.environ, "PYTHONPATH": ROOT, "TMPDIR": scratch}
            cleaned = subprocess.run(
                [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=DEADLOCK, env=env
            )
        finally:
            shutil.rmtree(scratch)
        assert cleaned.returncode == 0, cleaned.stderr
        assert f"removed {dead[:12]}" in cleaned.stdout
        assert [c["Id"] for c in client.api.containers(all=True)] == [live], cleaned.stdout
    finally:
        client.close()
