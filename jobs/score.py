"""Entry point for ``ray job submit -- python jobs/score.py --model M --input URI [URI ...] --output URI [...]``."""

import sys

from cskd_ray.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
