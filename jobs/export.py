"""Entry point for ``ray job submit -- python jobs/export.py --model M --format onnx|torchscript --output PATH``."""

import sys

from cskd_ray.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
