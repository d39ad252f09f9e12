"""The help texts of ``cskd-ray``: one line and examples per subcommand, as data for :mod:`cskd_ray.app.cli`.

Plain text only (``--help`` prints it as is): no reST or Markdown markup.
"""

from __future__ import annotations

import argparse

DESCRIPTION = ("Train, evaluate and serve image-aesthetics models with CLIP-based semi-supervised\n"
               "knowledge distillation (CSKD), distributed on Ray.")

EPILOG = """\
examples:
  cskd-ray demo                                    # the whole pipeline on generated images, local Ray
  cskd-ray config show distill                     # every key of a stage's config, default and meaning
  cskd-ray distill jobs/configs/demo/distill.yaml --set train.lr=3e-4
  cskd-ray predict runs/demo/student/model photo.jpg

Every stage takes a YAML config plus --set KEY=VALUE overrides. A bad config, argument or path exits
with status 2 and one 'error:' line (--debug shows the traceback). Commands print their own progress
lines and the workers' output; Ray's and open_clip's own INFO lines show with --verbose. Shell completion
is not built in: with the argcomplete package installed, run  eval "$(register-python-argcomplete cskd-ray)"
to get it."""

# name: (one line, examples). The line is the subcommand's entry in `cskd-ray --help` and its description.
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "demo": ("generate demo data, run the whole pipeline on local Ray",
             ("cskd-ray demo", "cskd-ray demo --workdir /tmp/demo --num-images 200")),
    "make-demo-data": ("generate photo-like images with AVA-style labels",
                       ("cskd-ray make-demo-data --output runs/data --num-images 1000 --labeled-fraction 0.1",)),
    "features": ("cache CLIP features of images (Ray Data)",
                 ("cskd-ray features jobs/configs/demo/features.yaml --input runs/demo/data/images "
                  "--output runs/features",)),
    "align": ("phase 1: align a timm encoder to cached CLIP features",
              ("cskd-ray align jobs/configs/demo/align.yaml --input runs/features --output runs/align",
               "cskd-ray align jobs/configs/demo/align.yaml --set encoder.name=resnet18 --set train.epochs=3")),
    "teacher": ("phase 2a: train the teacher (encoder + head) on labels",
                ("cskd-ray teacher jobs/configs/demo/teacher.yaml --set aligned=runs/align/model",)),
    "label": ("phase 2b: the teacher pseudo-labels unlabeled images",
              ("cskd-ray label jobs/configs/demo/label.yaml --set model=runs/teacher/model "
               "--input unlabeled.csv --output runs/pseudo-labels",)),
    "distill": ("phase 2c: distil labels + pseudo-labels into a student",
                ("cskd-ray distill jobs/configs/demo/distill.yaml --set pseudo_labels=runs/pseudo-labels",
                 "cskd-ray distill runs/demo/tune/best_config.yaml")),
    "tune": ("Ray Tune sweep over a training stage's config keys",
             ("cskd-ray tune jobs/configs/demo/tune.yaml", "cskd-ray tune jobs/configs/demo/tune.yaml --resume")),
    "pipeline": ("every stage in order as one job, complete ones skipped",
                 ("cskd-ray pipeline jobs/configs/demo/pipeline.yaml",)),
    "evaluate": ("SRCC / KRCC / PLCC / accuracy / EMD on labeled images",
                 ("cskd-ray evaluate --model runs/demo/student/model --labels ava:AVA.txt --images photos/ "
                  "--test-list test.jpgl --split test",)),
    "diagnose": ("ViT attention distance/entropy before and after align",
                 ("cskd-ray diagnose --model runs/demo/align-student/model --images runs/demo/data/images",)),
    "report": ("one self-contained HTML page of a run",
               ("cskd-ray report runs/demo", "cskd-ray report s3://bucket/runs/ava --output report.html")),
    "score": ("bulk-score a collection with a model (Ray Data)",
              ("cskd-ray score --model runs/demo/student/model --input s3://bucket/photos/ --output runs/scores",
               "cskd-ray score --model hf-hub:org/name --input photos/ --output runs/scores --min-score 6.5")),
    "predict": ("score a few images in this process (no Ray)",
                ("cskd-ray predict runs/demo/student/model photo.jpg 'shots/*.jpg'   # path<TAB>score a line",
                 "ls *.png | cskd-ray predict hf-hub:org/name - --json")),
    "push": ("publish a model on the Hugging Face Hub, with a card",
             ("cskd-ray push runs/demo/student/model --repo org/name --private --license apache-2.0",
              "cskd-ray push runs/demo/student/model --repo org/name --local-dir hub-folder   # write only")),
    "export": ("export a model to ONNX or TorchScript, verified",
               ("cskd-ray export --model runs/demo/student/model --format onnx --output runs/student-onnx",)),
    "list-models": ("list CLIP models or timm encoders",
                    ("cskd-ray list-models clip", "cskd-ray list-models encoders --pattern 'mobilenet*'")),
    "config": ("show a stage's config keys, defaults and descriptions",
               ("cskd-ray config show distill", "cskd-ray config show features | grep batch")),
    "config show": ("print every key of a stage's config, its default and description",
                    ("cskd-ray config show teacher", "cskd-ray config show pipeline")),
}


def epilog(name: str) -> str:
    """The ``examples:`` block closing a subcommand's ``--help``."""
    return "examples:\n" + "\n".join(f"  {example}" for example in COMMANDS[name][1])


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Prints descriptions and examples as written, and each subcommand with its help on one line.

    argparse measures subcommand names without the 2 extra spaces it indents them by, so a long name
    (``make-demo-data``) pushed its help to the next line.
    """

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def add_argument(self, action: argparse.Action) -> None:
        """Account for the indentation of subcommand names when placing the help column."""
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            names = [len(name) for name in action.choices]
            self._action_max_length = max(self._action_max_length, max(names, default=0) + self._current_indent + 2)
