"""Entry point for ``ray job submit -- python jobs/report.py RUN_DIR [--output report.html]``."""

import sys

from cskd_ray.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
