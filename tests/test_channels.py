"""channel=: a unix socket per container, where the engine runs on this machine,
and the attach stream where that cannot work (issue 12). The behaviour, fault and
pool suites run on both channels through RUNTIMES (docker, docker-attach, ...)."""

import base64
import concurrent.futures
import glob
import http.server
import json
import logging
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time

import docker
import pytest

import helpers
import minipool
from conftest import APP1
from conftest import DEADLOCK
from conftest import ROOT
from conftest import SecondEngine
from conftest import containers_labelled
from conftest import on_host
from conftest import read_lines
from conftest import start_script
from conftest import started
from conftest import wait_until
from minipool import StartupError

DIRECT = "talk to it over unix sockets"


def channel_dirs(pid):
    return glob.glob(os.path.join(tempfile.gettempdir(), f"minipool-channel-{socket.gethostname()}-{pid}-*"))


@pytest.mark.parametrize(("channel", "direct"), [("auto", True), ("attach", False)])
def test_auto_talks_over_a_socket_and_attach_over_the_attach_stream(any_engine, make_pool, caplog, channel, direct):
    _, url, options = any_engine
    with caplog.at_level(logging.INFO, logger="minipool"):
        pool = make_pool(blocks=2, engine=url, container_options=options, channel=channel)
        assert [pool.submit(helpers.talks_over_a_socket).result() for _ in range(4)] == [direct] * 4
        assert pool.submit(helpers.add, 2, b=3).result() == 5
    told = DIRECT if direct else "over the attach stream: channel='attach'"
    assert caplog.text.count(told) == 1, caplog.text
    assert bool(channel_dirs(os.getpid())) == direct
    pool.shutdown()
    assert not channel_dirs(os.getpid())


def test_the_socket_serves_a_read_only_container_of_another_user(make_pool):
    pool = make_pool(channel="socket", container_options={"read_only": True, "tmpfs": {"/tmp": ""}, "user": "65534"})
    assert pool.submit(helpers.talks_over_a_socket).result() is True
    assert pool.submit(os.getuid).result() == 65534


def offer_elsewhere(monkeypatch, source=None):
    """Mount the channel directory (or `source`) where the stub does not look for its socket."""

    def mount(channels):
        return docker.types.Mount("/elsewhere", source or channels.directory, type="bind", read_only=True)

    monkeypatch.setattr(minipool._DirectChannels, "mount", mount)


def test_a_stub_that_cannot_connect_falls_back_to_the_attach_stream(make_pool, monkeypatch, caplog):
    offer_elsewhere(monkeypatch)
    with caplog.at_level(logging.INFO, logger="minipool"):
        pool = make_pool(blocks=2)
        assert [pool.submit(helpers.talks_over_a_socket).result() for _ in range(4)] == [False] * 4
    told = "over the attach stream: cannot connect to /minipool-channel/"
    assert caplog.text.count(told) == 1, caplog.text


def test_an_engine_that_refuses_the_mount_gets_the_attach_stream(make_pool, monkeypatch, caplog):
    offer_elsewhere(monkeypatch, source="/nonexistent/minipool-channel")
    with caplog.at_level(logging.INFO, logger="minipool"):
        pool = make_pool(blocks=2)
        assert [pool.submit(helpers.talks_over_a_socket).result() for _ in range(4)] == [False] * 4
    assert caplog.text.count("over the attach stream: the engine refused to mount") == 1, caplog.text


def test_a_temporary_directory_too_long_for_a_socket_gets_the_attach_stream(make_pool, monkeypatch, tmp_path, caplog):
    deep = tmp_path / ("x" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with caplog.at_level(logging.INFO, logger="minipool"):
        pool = make_pool()
        assert pool.submit(helpers.talks_over_a_socket).result() is False
    assert "over the attach stream: cannot listen on a unix socket in" in caplog.text
    assert "AF_UNIX path too long" in caplog.text


class Policy(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A Docker authorization plugin (the AuthZ protocol), as a site's policy is one:
    it refuses the `refuse`-th create of a container with the pool's channel mount,
    and allows every other request."""

    daemon_threads = True
    refuse = 0
    refused = 0

    def __init__(self, path):
        self.creates = 0
        self.lock = threading.Lock()
        super().__init__(path, PolicyAnswers)

    def decide(self, asked):
        body = base64.b64decode(asked.get("RequestBody") or "")
        if "/containers/create" in asked["RequestUri"] and b"/minipool-channel" in body:
            with self.lock:
                self.creates += 1
                if self.creates == self.refuse:
                    self.refused += 1
                    return {"Allow": False, "Msg": "site policy: no new container just now, try again later"}
        return {"Allow": True}


class PolicyAnswers(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or "null")
        if self.path == "/Plugin.Activate":
            answer = {"Implements": ["authz"]}
        elif self.path == "/AuthZPlugin.AuthZReq":
            answer = self.server.decide(asked)
        else:  # AuthZRes: the engine's answer to a request allowed may go back
            answer = {"Allow": True}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.docker.plugins.v1.2+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass  # a unix socket's peer has no address to log


class EngineWithAPolicy(SecondEngine):
    """A dockerd of the test's own that asks the plugin `plugin` about every request."""

    plugin = f"minipool-test-policy-{os.getpid()}"

    def command(self):
        return [*super().command(), f"--authorization-plugin={self.plugin}"]


@pytest.fixture
def policed_engine(engine, images):
    """(EngineWithAPolicy, its Policy), the plugin's socket where dockerd finds plugins."""
    if os.geteuid() != 0:
        pytest.skip("an engine of the test's own, with a plugin in /run/docker/plugins, needs root")
    os.makedirs("/run/docker/plugins", exist_ok=True)
    path = f"/run/docker/plugins/{EngineWithAPolicy.plugin}.sock"
    with Policy(path) as policy:
        threading.Thread(target=policy.serve_forever, daemon=True).start()
        try:
            with started(EngineWithAPolicy, engine, [APP1]) as policed:
                yield policed, policy
        finally:
            policy.shutdown()
            os.unlink(path)


def test_a_create_refused_for_another_reason_leaves_the_pool_on_its_sockets(policed_engine, make_pool, caplog):
    """Only a refused mount of the channel directory means the sockets cannot work
    with this engine. A create refused for a reason of the engine's own (here a
    site's authorization plugin, once) is tried again, as a hiccup is, and every
    container, the refused one's replacement too, still talks over a unix socket."""
    engine, policy = policed_engine
    policy.refuse = 2  # the second container's create, once
    with caplog.at_level(logging.INFO, logger="minipool"):
        pool = make_pool(engine=engine.url, max_tasks_per_block=1)  # a new container for each task
        assert [pool.submit(helpers.talks_over_a_socket).result(DEADLOCK) for _ in range(3)] == [True] * 3
    assert policy.refused == 1
    assert "a container failed to start, trying again" in caplog.text and "site policy" in caplog.text
    assert "over the attach stream" not in caplog.text


@pytest.mark.parametrize("source", [None, "/nonexistent/minipool-channel"], ids=["no connection", "no mount"])
def test_channel_socket_is_a_startup_error_where_the_socket_cannot_work(make_pool, monkeypatch, source):
    offer_elsewhere(monkeypatch, source)
    pool = make_pool(channel="socket")
    with pytest.raises(StartupError, match=r"cannot connect to /minipool-channel/|/nonexistent/minipool-channel"):
        pool.submit(helpers.add, 1).result(timeout=60)


def test_an_engine_elsewhere_gets_the_attach_stream():
    channels = minipool._DirectChannels("auto", "tcp://elsewhere:2375", "test", local=False)
    assert channels.offer() is None
    with pytest.raises(StartupError, match="channel='socket' cannot work: the engine at tcp://elsewhere:2375 is not"):
        minipool._DirectChannels("socket", "tcp://elsewhere:2375", "test", local=False)


def test_channel_is_checked():
    with pytest.raises(ValueError, match="channel must be one of auto, socket, attach, not 'fast'"):
        minipool.ContainerPoolExecutor("app1_v0.1", channel="fast")
    # A command runtime's pipes are its only channel: asking for either of the engine's is a mistake.
    for channel in ("socket", "attach"):
        with pytest.raises(ValueError, match=f"channel='{channel}' is for runtime='docker'"):
            minipool.ContainerPoolExecutor("/images/app1", runtime="charliecloud", channel=channel)


def test_only_a_connection_that_says_the_secret_is_taken(caplog):
    """Anyone on this machine may connect to a socket: one that does not begin
    with the container's secret (wrong, or silent for a second) is closed and logged."""
    channels = minipool._DirectChannels("auto", "here", "test", local=True)
    direct = channels.offer()
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for client in clients:
            client.connect(direct.path)
        clients[0].sendall(bytes(len(direct.secret)))  # wrong
        clients[2].sendall(direct.secret)  # clients[1] says nothing
        with caplog.at_level(logging.WARNING, logger="minipool"):
            accepted = direct.accept(time.monotonic() + 10)
        with accepted:
            clients[2].sendall(b"ours")
            assert accepted.recv(4) == b"ours"
        assert clients[0].recv(1) == b"" and clients[1].recv(1) == b""  # closed
        assert caplog.text.count("did not begin with its container's secret") == 2
    finally:
        for client in clients:
            client.close()
        direct.close()
        channels.close()
    assert not os.path.exists(channels.directory)


def test_blocks_that_start_at_once_share_one_channel_directory(monkeypatch):
    """The other blocks start without the first once it is late (a loaded engine):
    their first sockets are offered at once, and the directory close removes must
    be the one they all use. (A CI run left one behind.)"""
    where = tempfile.mkdtemp(prefix="mp-")  # short: pytest's tmp_path is too long for a socket's path
    monkeypatch.setattr(tempfile, "tempdir", where)
    channels = minipool._DirectChannels("auto", "here", "test", local=True)
    start = threading.Barrier(8)

    def offer():
        start.wait()
        return channels.offer()

    with concurrent.futures.ThreadPoolExecutor(8) as threads:
        offers = list(threads.map(lambda _: offer(), range(8)))
    assert {os.path.dirname(direct.path) for direct in offers} == {channels.directory}
    for direct in offers:
        direct.close()
    channels.close()
    assert os.listdir(where) == []
    os.rmdir(where)


@pytest.fixture
def own_tmpdir(monkeypatch):
    """A temporary directory of the test's own, this process's and its callers' (TMPDIR):
    a dead caller's channel directory there is this test's alone to sweep, not the first
    pool's of another run on this host. Short: a socket's path has 108 bytes at most."""
    where = tempfile.mkdtemp(prefix="mp-")
    monkeypatch.setattr(tempfile, "tempdir", where)
    yield where
    shutil.rmtree(where)


def test_the_channel_directory_of_a_killed_caller_goes_with_the_next_pool(own_tmpdir, engine, label, make_pool):
    caller = start_script(
        f"""
        import helpers
        from minipool import ContainerPoolExecutor
        pool = ContainerPoolExecutor("app1_v0.1", ship=[helpers.__file__], label={label!r})
        print(pool.submit(helpers.talks_over_a_socket).result(), flush=True)
        input()
        """,
        environment={"TMPDIR": own_tmpdir},
    )
    try:
        assert read_lines(caller, 1) == ["True\n"]
        left = channel_dirs(caller.pid)
        assert len(left) == 1
    finally:
        caller.kill()
        caller.wait()
        caller.stdout.close()
        caller.stderr.close()
    wait_until(lambda: not containers_labelled(engine, label), what="the killed caller's container to go")
    assert os.path.exists(left[0])
    make_pool()
    assert not os.path.exists(left[0])


def test_cleanup_removes_the_directories_of_callers_that_are_gone(own_tmpdir, own_host):
    """(Run on a host of its own, cleanup leaves other runs' containers on this engine.)"""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is nobody's now (or soon another's; then cleanup leaves it, and so do we)
    path = tempfile.mkdtemp(prefix=f"minipool-channel-{own_host}-{gone.pid}-")
    cli = subprocess.run(
        on_host(own_host, [sys.executable, "-m", "minipool", "cleanup"]),
        capture_output=True, text=True, cwd=ROOT, timeout=60, env={**os.environ, "TMPDIR": own_tmpdir},
    )
    assert f"removed {path} (owner gone)" in cli.stdout, cli
    assert not os.path.exists(path)
