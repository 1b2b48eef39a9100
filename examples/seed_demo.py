"""The seed scenario: two images, one pool each, `predict()` run inside the containers.

    python examples/seed_demo.py [--offline]

Builds app1_v0.1 and app2_v0.1 first if they are missing (see images/build.py;
--offline never pulls a base image and builds one from Debian packages instead).
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
    offline = parser.parse_args().offline
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    build = load_build()
    # No engine, no image, a wrong DOCKER_HOST: one line that names it and the fix.
    try:
        build.ensure_images(offline=offline, log=lambda line: print(line, file=sys.stderr))
        run()
    except build.ImageBuildError as exc:
        sys.exit(f"seed_demo: {exc}")  # it names the socket and the fix
    except (minipool.StartupError, docker.errors.DockerException) as exc:
        sys.exit(f"seed_demo: {exc} {SETUP_HINT}")


def run():
    started = time.monotonic()
    with ContainerPoolExecutor("app1_v0.1", blocks=2) as pool_app1, ContainerPoolExecutor("app2_v0.1") as pool_app2:
        x = pool_app1.submit(app_1, [1, 2, 3])
        y = pool_app2.submit(app_2, [1, 2, 3])
        # The print statements print [2, 4, 6] and [1, 4, 9] once the results are available.
        print(x.result())
        print(y.result())
    print(f"demo: two pools started, ran and stopped in {time.monotonic() - started:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
