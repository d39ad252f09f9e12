"""Entry point for ``ray job submit -- python jobs/align.py CONFIG [--set k=v] [--input URI] [--output URI]``."""

import sys

from cskd_ray.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))
