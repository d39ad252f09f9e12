"""Entry point for ``ray job submit -- python jobs/tune.py CONFIG [--set k=v] [--output URI] [--resume]``."""

import sys

from cskd_ray.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
