"""The console of a command: quiet by default (our lines and warnings only), everything with ``--verbose``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cskd_ray.app.cli import build_parser

# What a stage's driver logs: open_clip's model-building lines (it logs to the root logger), Ray Data's
# execution lines, and our own warning.
SCRIPT = """
import logging, sys
from cskd_ray.app.runtime import configure_console
configure_console(verbose=sys.argv[1] == "verbose")
logging.info("Parsing model identifier. Schema: None, Identifier: cskd-tiny-vit")
logging.warning("No pretrained weights loaded for model 'cskd-tiny-vit'.")
logging.getLogger("ray.data._internal.execution.streaming_executor").info("Starting execution of Dataset val_1")
logging.getLogger("cskd_ray.stages.align").warning("checkpoint x is damaged")
logging.getLogger("cskd_ray.stages.align").info("resuming")
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_third_party_info_lines_show_only_with_verbose(mode: str) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                          check=True)
    lines = proc.stderr.strip().splitlines()
    if mode == "quiet":
        assert lines == ["WARNING cskd_ray.stages.align: checkpoint x is damaged"]
    else:
        assert lines == ["INFO root: Parsing model identifier. Schema: None, Identifier: cskd-tiny-vit",
                         "WARNING root: No pretrained weights loaded for model 'cskd-tiny-vit'.",
                         "INFO ray.data._internal.execution.streaming_executor: Starting execution of Dataset val_1",
                         "WARNING cskd_ray.stages.align: checkpoint x is damaged",
                         "INFO cskd_ray.stages.align: resuming"]


def test_verbose_is_a_global_flag_and_also_the_demos() -> None:
    parser = build_parser()
    assert parser.parse_args(["features", "c.yaml"]).verbose is False
    assert parser.parse_args(["--verbose", "align", "c.yaml"]).verbose is True
    assert parser.parse_args(["--verbose", "demo"]).verbose is True
    assert parser.parse_args(["demo", "--verbose"]).verbose is True
    assert parser.parse_args(["demo"]).verbose is False
