"""Entry point for ``ray job submit -- python jobs/evaluate.py --model M --labels FMT:PATH [--images ROOT] ...``."""

import sys

from cskd_ray.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
