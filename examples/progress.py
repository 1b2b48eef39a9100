"""Progress bars over a pool's work with tqdm (pip install tqdm).

    python examples/progress.py [--tasks 200]

Two ways: a bar over as_completed() for futures already submitted, and a bar over
map() with buffersize, which reads its input as results are consumed, so an input
too large to hold (here, an endless generator) streams through the pool.
"""

import argparse
import concurrent.futures as cf
import itertools
import os
import sys

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

import docker  # noqa: E402

import minipool  # noqa: E402
from minipool import ContainerPoolExecutor  # noqa: E402

# Said after an engine or image error, instead of a traceback.
SETUP_HINT = "(python images/build.py builds the seed's images; examples/run.sh demo also starts an engine)"


def app_1(data):
    import app1  # in the image

    return app1.predict(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200, help="how many tasks each way (default: 200)")
    args = parser.parse_args()
    try:
        run(args.tasks)
    except (minipool.StartupError, docker.errors.DockerException) as exc:
        sys.exit(f"progress: {exc} {SETUP_HINT}")


def run(tasks):
    with ContainerPoolExecutor("app1_v0.1", blocks=2) as pool:
        futures = [pool.submit(app_1, [i]) for i in range(tasks)]
        total = 0
        for future in tqdm(cf.as_completed(futures), total=len(futures), desc="as_completed", unit="task"):
            total += future.result()[0]
        print(f"sum of the doubled numbers 0..{tasks - 1}: {total}")

        endless = ([i] for i in itertools.count())  # never ends: map reads it as results go
        results = pool.map(app_1, endless, buffersize=16)
        first = list(tqdm(itertools.islice(results, tasks), total=tasks, desc="map", unit="task"))
        results.close()  # cancels what was read ahead
        print(f"the first {tasks} results of an endless map end with {first[-1]}")


if __name__ == "__main__":
    main()
