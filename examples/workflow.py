"""The seed's workflow: X fans out to Y...Y, which join into Z, across two pools.

    python examples/workflow.py [--fan-out 4] [--cache DIR]

Each app is a plain function decorated for the pool whose image it needs. Calling an
app returns a Future at once; passing that Future to another app makes a dataflow
edge: the second call is submitted when the first is done, with its result in its
place. With --cache DIR, results are kept in DIR, and a second run skips the work.
"""

import argparse
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

from minipool import ContainerPoolExecutor  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fan-out", type=int, default=4, help="how many Y tasks (default: 4)")
    parser.add_argument("--cache", metavar="DIR", help="keep results in DIR (default: in memory only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    cache = args.cache or True

    started = time.monotonic()
    with ContainerPoolExecutor("app1_v0.1", blocks=2) as pool_app1, ContainerPoolExecutor("app2_v0.1") as pool_app2:

        @pool_app1.app(cache=cache)
        def x(data):
            import app1  # in the image

            return app1.predict(data)

        @pool_app2.app(cache=cache)
        def y(data, offset):
            import app2

            return app2.predict([item + offset for item in data])

        @pool_app1.app(cache=cache)
        def z(*parts):
            import app1

            return app1.predict([sum(part) for part in parts])

        doubled = x([1, 2, 3])  # a Future, at once
        squares = [y(doubled, offset) for offset in range(args.fan_out)]  # run once `doubled` is done
        total = z(*squares)  # runs once every y is done
        print(f"X: {doubled.result()}")
        for offset, future in enumerate(squares):
            print(f"Y{offset}: {future.result()}")
        print(f"Z: {total.result()}")
    print(f"workflow: {args.fan_out + 2} tasks over two pools in {time.monotonic() - started:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
