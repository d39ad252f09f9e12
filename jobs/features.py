"""Entry point for ``ray job submit -- python jobs/features.py CONFIG [--set k=v] [--input ...] [--output URI]``."""

import sys

from cskd_ray.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]]))
