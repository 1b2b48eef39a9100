"""The seed scenario: two images, one pool each, `predict()` run inside the containers.

    python examples/seed_demo.py [--offline] [--runtime charliecloud]

Builds app1_v0.1 and app2_v0.1 first if they are missing (see images/build.py;
--offline never pulls a base image and builds one from Debian packages instead).
With --runtime charliecloud the blocks are ch-run processes of image directories
made from those images (images/charliecloud/, made by images/build.py if missing
or out of date); it prints the same.
"""

import argparse
import importlib.util
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

import docker  # noqa: E402

import minipool  # noqa: E402
from minipool import ContainerPoolExecutor  # noqa: E402

SETUP_HINT = "(python images/build.py builds the seed's images; examples/run.sh demo also starts an engine)"


# As in the seed: the function is the user's, the module it imports is the image's.
def app_1(data):
    import app1

    return app1.predict(data)


def app_2(data):
    import app2

    return app2.predict(data)


def load_build():
    spec = importlib.util.spec_from_file_location("build", os.path.join(ROOT, "images", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="never pull a base image")
    parser.add_argument(
        "--runtime", choices=["docker", "charliecloud"], default="docker",
        help="docker (the engine API, the default) or charliecloud (ch-run of image directories)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    build = load_build()
    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    # No engine, no image, a wrong DOCKER_HOST: one line that names it and the fix.
    try:
        if args.runtime == "charliecloud":
            made = build.ensure_charliecloud_images(offline=args.offline, log=say)
            images = {name: str(path) for name, path in made.items()}
        else:
            images = {name: name for name in build.ensure_images(offline=args.offline, log=say)}
        run(images["app1_v0.1"], images["app2_v0.1"], args.runtime)
    except build.ImageBuildError as exc:
        sys.exit(f"seed_demo: {exc}")  # it names the socket and the fix
    except (minipool.StartupError, docker.errors.DockerException) as exc:
        sys.exit(f"seed_demo: {exc} {SETUP_HINT}")


def run(image1, image2, runtime):
    started = time.monotonic()
    # label: the logs name the pools app1_v0.1 and app2_v0.1 on either runtime.
    with ContainerPoolExecutor(
        image1, blocks=2, runtime=runtime, label="app1_v0.1"
    ) as pool_app1, ContainerPoolExecutor(image2, runtime=runtime, label="app2_v0.1") as pool_app2:
        x = pool_app1.submit(app_1, [1, 2, 3])
        y = pool_app2.submit(app_2, [1, 2, 3])
        # The print statements print [2, 4, 6] and [1, 4, 9] once the results are available.
        print(x.result())
        print(y.result())
    took = time.monotonic() - started
    print(f"demo: two pools ({runtime}) started, ran and stopped in {took:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
