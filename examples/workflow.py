"""The seed's workflow: X fans out to Y...Y, which join into Z, across two pools.

    python examples/workflow.py [--fan-out 4] [--cache DIR] [--runtime charliecloud]

Each app is a plain function decorated for the pool whose image it needs. Calling an
app returns a Future at once; passing that Future to another app makes a dataflow
edge: the second call is submitted when the first is done, with its result in its
place. With --cache DIR, results are kept in DIR, and a second run skips the work:
the pools start with no container (blocks=0) and add one only when work comes, so a
run served wholly from the cache starts none. The results go to stdout; where each
came from (a container, or the cache) to stderr. With --runtime charliecloud the
blocks are ch-run processes of image directories made from the same images
(images/charliecloud/, made by images/build.py if missing); it prints the same.
"""

import argparse
import importlib.util
import logging
import os
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

import docker  # noqa: E402

import minipool  # noqa: E402
from minipool import ContainerPoolExecutor  # noqa: E402

# Said after an engine or image error, instead of a traceback.
SETUP_HINT = "(python images/build.py builds the seed's images; examples/run.sh demo also starts an engine)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fan-out", type=int, default=4, help="how many Y tasks (default: 4)")
    parser.add_argument("--cache", metavar="DIR", help="keep results in DIR (default: in memory only)")
    parser.add_argument(
        "--runtime", choices=["docker", "charliecloud"], default="docker",
        help="docker (the engine API, the default) or charliecloud (ch-run of image directories)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    images = {"app1_v0.1": "app1_v0.1", "app2_v0.1": "app2_v0.1"}
    try:
        if args.runtime == "charliecloud":
            build = load_build()
            try:
                made = build.ensure_charliecloud_images(log=lambda line: print(line, file=sys.stderr))
            except build.ImageBuildError as exc:
                sys.exit(f"workflow: {exc}")
            images = {name: str(path) for name, path in made.items()}
        run(args.fan_out, args.cache, images, args.runtime)
    except (minipool.StartupError, docker.errors.DockerException) as exc:
        sys.exit(f"workflow: {exc} {SETUP_HINT}")


def load_build():
    spec = importlib.util.spec_from_file_location("build", os.path.join(ROOT, "images", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def run(fan_out, cache_dir, images, runtime, provider=None):
    """provider: where the blocks run (examples/slurm.py passes a minipool.Slurm); None, here."""
    cache = cache_dir or True
    started = time.monotonic()
    # A Docker container's hostname is its short id; a ch-run process keeps the host's
    # hostname (no namespace of its own), and its pid names its block.
    where = "container {hostname}" if runtime == "docker" else "ch-run process {pid} on {hostname}"
    # blocks=0: no container until a call needs one; then up to max_blocks.
    with ContainerPoolExecutor(
        images["app1_v0.1"], blocks=0, max_blocks=2, runtime=runtime, provider=provider, label="app1_v0.1"
    ) as pool_app1, ContainerPoolExecutor(
        images["app2_v0.1"], blocks=0, max_blocks=1, runtime=runtime, provider=provider, label="app2_v0.1"
    ) as pool_app2:

        @pool_app1.app(cache=cache)
        def x(data):
            import app1  # in the image

            print("ran in " + where.format(hostname=socket.gethostname(), pid=os.getpid()))
            return app1.predict(data)

        @pool_app2.app(cache=cache)
        def y(data, offset):
            import app2

            print("ran in " + where.format(hostname=socket.gethostname(), pid=os.getpid()))
            return app2.predict([item + offset for item in data])

        @pool_app1.app(cache=cache)
        def z(*parts):
            import app1

            print("ran in " + where.format(hostname=socket.gethostname(), pid=os.getpid()))
            return app1.predict([sum(part) for part in parts])

        doubled = x([1, 2, 3])  # a Future, at once
        squares = [y(doubled, offset) for offset in range(fan_out)]  # run once `doubled` is done
        total = z(*squares)  # runs once every y is done
        calls = {"X": doubled, **{f"Y{offset}": future for offset, future in enumerate(squares)}, "Z": total}
        for name, future in calls.items():
            print(f"{name}: {future.result()}")
    # A result read from the cache has no output (minipool.output); one that ran says where.
    ran = 0
    for name, future in calls.items():
        where = minipool.output(future).strip()
        ran += bool(where)
        print(f"workflow: {name} {where or f'came from the cache in {cache_dir}'}", file=sys.stderr)
    took = time.monotonic() - started
    placed = runtime if provider is None else f"{runtime} on Slurm"
    print(
        f"workflow: {len(calls)} calls over two pools ({placed}) in {took:.2f} s: {ran} ran in a container,"
        f" {len(calls) - ran} came from the cache" + ("; no container was started" if ran == 0 else ""),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
