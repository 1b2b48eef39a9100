"""A four-node Slurm cluster of our own on this one machine, for the tests and the benchmark.

    python tests/slurm_cluster.py COMMAND [ARGS...]   # runs COMMAND with SLURM_CONF set

munged, slurmctld and one slurmd per node (n1..n4, `slurmd -N nK`) run as children
of this process, each in the foreground (so the pids are theirs), with their key,
config, state and logs in a new directory under /var/tmp that stop() removes. Each
node is its own loopback address (127.0.0.K+1) with a port of its own, and claims
256 CPUs (SlurmdParameters=config_overrides), so srun -N4 runs a task on each. The
ports are free ones, and munged has a socket and key of its own: a machine's own
Slurm or munged, or a second cluster of this kind, is left alone. Needs root (munged runs as user
munge; slurmd starts jobs as their user) and Debian's slurmctld, slurmd,
slurm-client and munge. Up in about 2 s.
"""

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PROGRAMS = ("munged", "slurmctld", "slurmd", "srun", "squeue", "scancel", "sinfo")
PACKAGES = "slurmctld slurmd slurm-client munge"
# Long enough for a loaded machine, short enough that a cluster that cannot come up fails the run.
UP_DEADLINE = 60

CONFIG = """\
ClusterName=minipool
SlurmctldHost={host}
SlurmctldPort={controller_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
# %n: each node's own (slurmd -N nK), as several slurmd share this machine.
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# A job past its time limit (or cancelled) gets SIGKILL 2 s after SIGTERM, not 30.
KillWait=2
# Each node claims 256 CPUs whatever the machine has (config_overrides: slurmd believes the
# config, not the hardware), so that a stub of up to 256 workers (workers_per_block, a core
# each) can run, and 256 one-core jobs at once. Nodes are not oversubscribed: a job that
# asks for whole nodes (--exclusive, Slurm(exclusive=True)) gets them.
SlurmdParameters=config_overrides
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
# One line a node: the same machine, each node its own loopback address and port.
NODE = "NodeName={name} NodeHostname={host} NodeAddr={address} Port={port} CPUs=256 State=UNKNOWN"
NODES = [f"n{k}" for k in range(1, 5)]


def missing():
    """Why a cluster cannot be started here; "" if it can."""
    absent = [program for program in PROGRAMS if shutil.which(program) is None]
    if absent:
        return f"no {', '.join(absent)} here (as root on Debian: apt-get install {PACKAGES})"
    if os.geteuid() != 0:
        return "a Slurm cluster of our own needs root"
    return ""


def _free_port():
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    """A four-node cluster: start(), environment() for its clients, stop()."""

    def __init__(self):
        self.root = None
        self.conf = None
        self.processes = []

    def environment(self):
        return {"SLURM_CONF": self.conf}

    def start(self):
        self.root = tempfile.mkdtemp(prefix="minipool-slurm-", dir="/var/tmp")
        os.chmod(self.root, 0o755)  # munged wants every directory above its socket searchable
        try:
            self._start_munged()
            self._write_config()
            self._run_daemon("slurmctld", "-D", "-f", self.conf)
            for node in NODES:
                self._run_daemon("slurmd", "-D", "-f", self.conf, "-N", node, log=f"slurmd-{node}")
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munged(self):
        """munged as user munge, with a key and socket of its own in root/munge (0711, as it wants)."""
        munge = pwd.getpwnam("munge")
        directory = os.path.join(self.root, "munge")
        os.mkdir(directory, 0o711)
        key = os.path.join(directory, "munge.key")
        with open(key, "wb") as file:
            file.write(secrets.token_bytes(128))
        os.chmod(key, 0o600)
        for path in (directory, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self._run_daemon(
            "munged", "--foreground", f"--socket={directory}/munge.socket", f"--key-file={key}",
            f"--log-file={directory}/munged.log", f"--pid-file={directory}/munged.pid",
            f"--seed-file={directory}/munged.seed", user=munge.pw_uid, group=munge.pw_gid,
        )
        self._wait_for(lambda: os.path.exists(f"{directory}/munge.socket"), "munged's socket")

    def _write_config(self):
        self.conf = os.path.join(self.root, "slurm.conf")
        os.mkdir(os.path.join(self.root, "state"))
        for node in NODES:
            os.mkdir(os.path.join(self.root, f"spool-{node}"))
        host = socket.gethostname()
        nodes = [
            NODE.format(name=node, host=host, address=f"127.0.0.{k + 1}", port=_free_port())
            for k, node in enumerate(NODES, start=1)
        ]
        with open(self.conf, "w") as file:
            file.write(CONFIG.format(
                host=host, root=self.root, controller_port=_free_port(), nodes="\n".join(nodes),
                names=",".join(NODES),
            ))

    def _run_daemon(self, program, *argv, log=None, **options):
        """`program` in the foreground, in a session of its own (a Ctrl-C in the terminal is not its)."""
        with open(os.path.join(self.root, f"{log or program}.out"), "ab") as out:
            self.processes.append(subprocess.Popen(
                [program, *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, **options,
            ))

    def _wait_until_up(self):
        """Until srun runs a job on every node (all idle and registered); its logs if it never does."""
        def all_idle():
            states = self.run("sinfo", "--noheader", "--Node", "--format=%N %t").stdout.split("\n")
            return sorted(line for line in states if line.endswith(" idle")) == [f"{node} idle" for node in NODES]

        def runs_a_job_on_each():
            done = self.run("srun", f"--nodes={len(NODES)}", f"--ntasks={len(NODES)}", "printenv", "SLURMD_NODENAME")
            return done.returncode == 0 and sorted(done.stdout.split()) == NODES

        self._wait_for(all_idle, "every node to be idle")
        self._wait_for(runs_a_job_on_each, "srun to run a job on every node")

    def _wait_for(self, predicate, what):
        deadline = time.monotonic() + UP_DEADLINE
        while not predicate():
            dead = [process.args[0] for process in self.processes if process.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"the Slurm cluster did not come up waiting for {what} "
                                   f"({', '.join(dead) or 'none'} exited); its logs:\n{self.logs()}")
            time.sleep(0.05)

    def run(self, *argv):
        """A Slurm client command against this cluster."""
        env = {**os.environ, **self.environment()}
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=UP_DEADLINE)

    def jobs(self):
        """(job id, name, state) of every job in the queue."""
        listed = self.run("squeue", "--noheader", "--format=%i %j %T").stdout
        return [tuple(line.split(" ", 2)) for line in listed.splitlines()]

    def logs(self):
        texts = []
        for name in sorted(os.listdir(self.root)):
            if name.endswith((".log", ".out")):
                with open(os.path.join(self.root, name), errors="replace") as file:
                    texts.append(f"--- {name}\n" + "".join(file.readlines()[-20:]))
        return "\n".join(texts)

    def stop(self):
        """Stop the daemons (SIGTERM, then SIGKILL after 10 s), newest first, by pid; remove root."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_cluster():
    """A started cluster, stopped and removed at the end."""
    cluster = SlurmCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


def main(argv):
    if not argv:
        sys.exit(__doc__.split("\n\n")[1])
    why = missing()
    if why:
        sys.exit(f"slurm_cluster: {why}")
    with running_cluster() as cluster:
        print(f"slurm_cluster: up, SLURM_CONF={cluster.conf}", file=sys.stderr)
        # Stopped with SIGTERM, or a Ctrl-C: the command is killed, then the cluster stopped.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        status = subprocess.call(argv, env={**os.environ, **cluster.environment()})
    sys.exit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
