"""The seed's workflow (examples/workflow.py) on a Slurm cluster: every block a Slurm job running Charliecloud.

    python examples/slurm.py [--partition P] [--time T] [--nodes-per-block N] [--images APP1_DIR APP2_DIR]
                             [--fan-out 4]

provider=minipool.Slurm(...) makes each block a Slurm job of N whole nodes, and runs
`ch-run IMAGE_DIR -- python3 ...` on each node as a step of it, with as many cores as
it has workers; the pools start no job until work comes (blocks=0) and end their
jobs when done. Inside an allocation (examples/slurm_batch.sh, run by sbatch) the
blocks are its steps instead. It prints what examples/workflow.py prints, and where
each call ran on stderr.

It needs a Slurm cluster that srun, sinfo, squeue and scancel reach (SLURM_CONF, as
for srun), ch-run on its nodes, and the image directories where the nodes see them
(default: images/charliecloud/ in this checkout, made by images/build.py
--charliecloud, which needs a Docker engine; give --images otherwise). On one
machine, as root, with a cluster of its own that stops when the command ends:

    python tests/slurm_cluster.py python examples/slurm.py
"""

import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing
sys.path.insert(0, os.path.join(ROOT, "examples"))

import workflow  # noqa: E402

import minipool  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partition", help="the jobs' partition (default: the cluster's default)")
    parser.add_argument("--time", default="00:10:00", help="each job's time limit (default: 00:10:00)")
    parser.add_argument("--nodes-per-block", type=int, default=1, help="nodes in each block's job (default: 1)")
    parser.add_argument("--images", nargs=2, metavar=("APP1_DIR", "APP2_DIR"),
                        help="Charliecloud image directories of app1_v0.1 and app2_v0.1 (default: made from them)")
    parser.add_argument("--fan-out", type=int, default=4, help="how many Y tasks (default: 4)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.images:
        images = dict(zip(("app1_v0.1", "app2_v0.1"), args.images))
    else:
        build = workflow.load_build()
        try:
            made = build.ensure_charliecloud_images(log=lambda line: print(line, file=sys.stderr))
        except build.ImageBuildError as exc:
            sys.exit(f"slurm example: {exc}")
        images = {name: str(path) for name, path in made.items()}
    slurm = minipool.Slurm(partition=args.partition, time=args.time, nodes_per_block=args.nodes_per_block)
    try:
        workflow.run(args.fan_out, None, images, "charliecloud", provider=slurm)
    except minipool.StartupError as exc:
        sys.exit(f"slurm example: {exc}")  # no srun, no such partition, a cluster that does not answer


if __name__ == "__main__":
    main()
