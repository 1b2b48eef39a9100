#!/usr/bin/env bash
# Set up what minipool needs, then run the seed demo or the test suite:
#
#     examples/run.sh demo                  # prints [2, 4, 6] and [1, 4, 9]
#     examples/run.sh test [PYTEST ARGS]    # e.g. examples/run.sh test -m "not slow"
#
# Works from any directory (pytest runs in the checkout, so give test paths relative
# to it) and does only what is missing, saying so on stderr, one line per step:
#   1. venv:   .venv in the checkout, with `pip install -e '.[test]'` (again when
#              pyproject.toml changes);
#   2. engine: a Docker engine that answers at $DOCKER_HOST or /var/run/docker.sock;
#              if none does, as root on Debian or Ubuntu, it installs docker.io and
#              starts dockerd (log in /var/log/minipool-dockerd.log), and stops it
#              again when it ends; anywhere else it prints the commands to run, exit 1;
#   3. images: app1_v0.1 and app2_v0.1, built by images/build.py if missing (from
#              python:3.11-slim, or offline from Debian packages: needs root).
#
# Environment:
#   MINIPOOL_PYTHON=PATH  use this Python (it must import docker and cloudpickle, and
#                         pytest for `test`) instead of making .venv
#   MINIPOOL_NO_INSTALL=1 never apt-get install nor start an engine: say what to run
#
# .ci/run sources this file for its functions (setup_venv, setup_engine,
# setup_images, stop_started_engine) and calls the same steps.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
DEFAULT_SOCKET="unix:///var/run/docker.sock"
DOCKERD_LOG=/var/log/minipool-dockerd.log
# No bridge and no iptables rules: minipool's containers run with network none.
DOCKERD_ARGS=(--bridge=none --iptables=false --ip-masq=false)
PY=""                  # the Python that runs everything, set by setup_venv
STARTED_ENGINE_PID=""  # a dockerd this script started, stopped at exit
_STEP_START=$EPOCHREALTIME
_APT_UPDATED=""

say() {
  # One progress line: seconds since the script started, then the message.
  local now=$EPOCHREALTIME
  printf 'run.sh [%5.1f s] %s\n' "$(bc_sub "$now" "$_STEP_START")" "$*" >&2
}

bc_sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }

die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

since() { bc_sub "$EPOCHREALTIME" "$1"; }

# ------------------------------------------------------------------ what this machine allows

is_debian_like() {
  [ -r /etc/os-release ] && grep -Eq '^(ID|ID_LIKE)=.*(debian|ubuntu)' /etc/os-release
}

# Why this script may not install packages or start an engine here; "" if it may.
why_not_install() {
  if [ -n "${MINIPOOL_NO_INSTALL:-}" ]; then echo "MINIPOOL_NO_INSTALL is set"
  elif [ "$(id -u)" != 0 ]; then echo "not root"
  elif ! is_debian_like; then echo "not Debian or Ubuntu"
  elif ! command -v apt-get >/dev/null; then echo "no apt-get"
  fi
}

apt_install() {
  # apt-get install the given Debian packages (updating the lists once per run).
  if [ -z "$_APT_UPDATED" ]; then
    apt-get update -q >/dev/null || die "apt-get update failed"
    _APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null || die "apt-get install $* failed"
}

# ------------------------------------------------------------------ 1. the Python environment

setup_venv() {
  local started=$EPOCHREALTIME
  if [ -n "${MINIPOOL_PYTHON:-}" ]; then
    PY=$MINIPOOL_PYTHON
    "$PY" -c 'import docker, cloudpickle' 2>/dev/null \
      || die "MINIPOOL_PYTHON=$PY cannot import docker and cloudpickle: $PY -m pip install -e '$ROOT[test]'"
    say "python: $PY (MINIPOOL_PYTHON)"
    return
  fi
  PY="$ROOT/.venv/bin/python"
  local stamp="$ROOT/.venv/.minipool-installed" wanted
  wanted=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
  # Ready: installed from this pyproject.toml, and `import minipool` finds this checkout
  # (run from / so that the current directory does not decide it).
  if [ -x "$PY" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ] \
    && [ "$(cd / && "$PY" -c 'import minipool; print(minipool.__file__)' 2>/dev/null)" = "$ROOT/minipool.py" ]; then
    say "venv: ready ($ROOT/.venv)"
    return
  fi
  if [ ! -x "$PY" ]; then
    if ! python3 -m venv "$ROOT/.venv" >/dev/null 2>&1; then
      rm -rf "$ROOT/.venv"
      [ -z "$(why_not_install)" ] || die "python3 cannot make a virtual environment: apt-get install python3-venv (as root), then run this again"
      say "venv: installing python3-venv"
      apt_install python3-venv
      python3 -m venv "$ROOT/.venv" || die "python3 -m venv $ROOT/.venv failed"
    fi
  fi
  "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]" \
    || die "pip install -e '$ROOT[test]' failed (see above)"
  echo "$wanted" >"$stamp"
  say "venv: created $ROOT/.venv and installed minipool[test] ($(since "$started") s)"
}

# ------------------------------------------------------------------ 2. the engine

# "ok DESCRIPTION" if an engine answers at $DOCKER_HOST (or the default socket),
# else "no REASON".
probe_engine() {
  "$PY" - <<'EOF' 2>/dev/null || echo "no the probe itself failed"
import docker
try:
    version = docker.from_env(timeout=10).version()
    print(f"ok Docker {version.get('Version')}, API {version.get('ApiVersion')}")
except Exception as exc:
    said = str(exc)
    for known in ("No such file or directory", "Permission denied", "Connection refused"):
        if known in said:
            said = known.lower()
    print(f"no {said[:300]}")
EOF
}

engine_help() {
  # The commands that get an engine, for someone this script cannot do it for.
  cat >&2 <<EOF
Get an engine, then run this again. On Debian or Ubuntu, as root (this script does
the same when run as root with DOCKER_HOST unset):
    apt-get install -y docker.io
    setsid dockerd ${DOCKERD_ARGS[*]} >/var/log/dockerd.log 2>&1 </dev/null &
    until docker info >/dev/null 2>&1; do sleep 0.5; done
Elsewhere, install and start Docker Engine (https://docs.docker.com/engine/install/),
or a Podman service (README: Podman), and point DOCKER_HOST at its socket.
EOF
}

setup_engine() {
  local started=$EPOCHREALTIME socket=${DOCKER_HOST:-$DEFAULT_SOCKET} answer why
  answer=$(probe_engine)
  if [ "${answer%% *}" = ok ]; then
    say "engine: found at $socket (${answer#ok })"
    return
  fi
  why=${answer#no }
  if [ "$why" = "permission denied" ]; then
    printf 'run.sh: the engine at %s refuses this user (permission denied).\n' "$socket" >&2
    printf 'Add yourself to its group, then log in again:  sudo usermod -aG docker %s\n' "$(id -un)" >&2
    exit 1
  fi
  if [ -n "${DOCKER_HOST:-}" ]; then
    # Not ours to start: dockerd would listen on the default socket, not there.
    printf 'run.sh: no Docker engine answers at DOCKER_HOST=%s (%s).\n' "$DOCKER_HOST" "$why" >&2
    printf 'Start the engine that serves it, or `unset DOCKER_HOST` to use %s.\n' "$DEFAULT_SOCKET" >&2
    engine_help
    exit 1
  fi
  local cannot
  cannot=$(why_not_install)
  if [ -n "$cannot" ]; then
    printf 'run.sh: no Docker engine answers at %s (%s), and this script starts one only as root on Debian or Ubuntu (here: %s).\n' \
      "$socket" "$why" "$cannot" >&2
    engine_help
    exit 1
  fi
  if ! command -v dockerd >/dev/null; then
    say "engine: none at $socket; installing docker.io"
    apt_install docker.io
  fi
  say "engine: none at $socket ($why); starting dockerd"
  # setsid: a Ctrl-C in the terminal must not stop the engine under the tests' teardown;
  # it is stopped once they are done. (Not a group leader here, setsid execs: $! is dockerd.)
  setsid dockerd "${DOCKERD_ARGS[@]}" >"$DOCKERD_LOG" 2>&1 </dev/null &
  STARTED_ENGINE_PID=$!
  local deadline=$((SECONDS + 60))
  until answer=$(probe_engine) && [ "${answer%% *}" = ok ]; do
    if ! kill -0 "$STARTED_ENGINE_PID" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 20 "$DOCKERD_LOG" >&2
      die "dockerd did not come up (pid $STARTED_ENGINE_PID, log $DOCKERD_LOG, last lines above)"
    fi
    sleep 0.5
  done
  if [ "$(cat "/proc/$STARTED_ENGINE_PID/comm" 2>/dev/null)" != dockerd ] && [ -r /var/run/docker.pid ]; then
    STARTED_ENGINE_PID=$(cat /var/run/docker.pid)  # setsid forked after all: dockerd's own pid file
  fi
  say "engine: started dockerd, pid $STARTED_ENGINE_PID, log $DOCKERD_LOG (${answer#ok }) in $(since "$started") s"
}

stop_started_engine() {
  # Stop the dockerd this script started (SIGTERM: it stops its containers first).
  [ -n "$STARTED_ENGINE_PID" ] || return 0
  local pid=$STARTED_ENGINE_PID deadline=$((SECONDS + 30))
  STARTED_ENGINE_PID=""
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null && say "engine: dockerd (pid $pid) ignored SIGTERM for 30 s: killed"
  wait "$pid" 2>/dev/null || true  # its exit status is not ours
  say "engine: stopped the dockerd we started (pid $pid)"
}

# ------------------------------------------------------------------ 3. the images

setup_images() {
  # Arguments go to images/build.py (.ci/run passes --offline).
  local started=$EPOCHREALTIME missing
  missing=$("$PY" -c '
import docker, sys
client = docker.from_env()
print(" ".join(name for name in sys.argv[1:] if not client.images.list(name=name)))
' app1_v0.1 app2_v0.1) || die "cannot list the engine's images"
  if [ -z "$missing" ]; then
    say "images: app1_v0.1 and app2_v0.1 present"
    return
  fi
  # Without a registry build.py makes its base from Debian packages with debootstrap.
  if ! command -v debootstrap >/dev/null && [ -z "$(why_not_install)" ]; then
    say "images: installing debootstrap (for a base image where no registry answers)"
    apt_install debootstrap
  fi
  say "images: building $missing"
  "$PY" "$ROOT/images/build.py" "$@" || exit 1
  say "images: built $missing in $(since "$started") s"
}

# ------------------------------------------------------------------ the two commands

usage() {
  cat >&2 <<EOF
usage: examples/run.sh demo               set up, then run the seed demo
       examples/run.sh test [PYTEST ARGS] set up, then run the test suite (from the checkout)
EOF
  exit 2
}

main() {
  set -uo pipefail
  [ $# -ge 1 ] || usage
  local command=$1 status
  shift
  case $command in
    demo) [ $# -eq 0 ] || usage ;;
    test) ;;
    *) usage ;;
  esac
  trap stop_started_engine EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  cd "$ROOT" || exit 1
  setup_venv
  setup_engine
  setup_images
  local started=$EPOCHREALTIME
  if [ "$command" = demo ]; then
    say "demo: python examples/seed_demo.py"
    "$PY" examples/seed_demo.py
    status=$?
  else
    "$PY" -c 'import pytest' 2>/dev/null || die "$PY cannot import pytest: $PY -m pip install -e '$ROOT[test]'"
    command -v podman >/dev/null \
      || say "test: no podman here: its tests will skip (as root on Debian: apt-get install podman catatonit)"
    command -v ch-run >/dev/null \
      || say "test: no ch-run here: the Charliecloud tests will skip (as root on Debian: apt-get install charliecloud-runtime)"
    command -v slurmctld >/dev/null \
      || say "test: no Slurm here: its tests will skip (as root on Debian: apt-get install slurmctld slurmd slurm-client munge)"
    say "test: python -m pytest$([ $# -eq 0 ] || printf ' %q' "$@")"
    "$PY" -m pytest "$@"
    status=$?
  fi
  say "$command: exit status $status after $(since "$started") s"
  exit "$status"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
