"""The seed's app_1 on Apptainer, Singularity, Shifter or Charliecloud: runtime=.

    python examples/apptainer.py [--runtime apptainer] [--image app1.sif] [--blocks 2]

These runtimes have no engine API: ContainerPoolExecutor(image, runtime=...) runs each
block as a child process of this script, `RUNTIME [flags] IMAGE python3 -c BOOTSTRAP`,
whose stdin and stdout carry minipool's protocol; everything else is the same pool.
app1_v0.1 keeps app1.py in /home, its WORKDIR, and Apptainer starts in the caller's
directory instead, so the example passes workdir="/home" (the flag each runtime gets
for it: the README's runtime table). Make the image first:

    apptainer build app1.sif docker-daemon://app1_v0.1:latest   # Apptainer or Singularity
    shifterimg pull docker:YOU/app1_v0.1:latest                  # Shifter: push it to a registry first
    python images/build.py --charliecloud                        # Charliecloud: images/charliecloud/app1_v0.1

It prints [2, 4, 6]. What was run where this was written (Debian 12, where Apptainer,
Singularity and Shifter have no package): --runtime charliecloud, on an image
directory made from app1_v0.1 (tests/test_apptainer_example.py, in CI too). For
apptainer, singularity and shifter only the command line minipool would run was
checked, against their documentation; none of them has run this example.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

import minipool  # noqa: E402
from minipool import ContainerPoolExecutor  # noqa: E402

WORKDIR = "/home"  # app1_v0.1's WORKDIR, where app1.py is
# The image each runtime is given unless --image says otherwise.
DEFAULT_IMAGES = {
    "apptainer": "app1.sif",
    "singularity": "app1.sif",
    "shifter": "docker:app1_v0.1:latest",
    "charliecloud": os.path.join(ROOT, "images", "charliecloud", "app1_v0.1"),  # python images/build.py --charliecloud
}


# As in the seed: the function is the user's, the module it imports is the image's.
def app_1(data):
    import app1

    return app1.predict(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", choices=sorted(DEFAULT_IMAGES), default="apptainer", help="default: apptainer")
    defaults = "; ".join(f"{runtime}: {image}" for runtime, image in DEFAULT_IMAGES.items())
    parser.add_argument("--image", help=f"the image as the runtime takes it (default: {defaults})")
    parser.add_argument("--blocks", type=int, default=2, help="worker processes (default: 2)")
    args = parser.parse_args()
    image = args.image or DEFAULT_IMAGES[args.runtime]
    # A runtime that is not installed, an image that is not there: one line, no traceback.
    try:
        with ContainerPoolExecutor(image, blocks=args.blocks, runtime=args.runtime, workdir=WORKDIR) as pool:
            print(pool.submit(app_1, [1, 2, 3]).result())  # [2, 4, 6]
    except minipool.StartupError as exc:
        sys.exit(f"apptainer example: {exc}")
    print(f"apptainer example: ran on {args.blocks} block(s) of {image} with {args.runtime}", file=sys.stderr)


if __name__ == "__main__":
    main()
