# PYTHON_ARGCOMPLETE_OK
"""``cskd-ray``: the argument parser; each subcommand calls one function of :mod:`cskd_ray.app.commands`.

Errors a user can fix (a bad config, argument, path or model name) exit with status 2 and one
``error:`` line on stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from cskd_ray.app import cli_help, commands
from cskd_ray.app.config_docs import CONFIGS
from cskd_ray.app.runtime import configure_console
from cskd_ray.config import ConfigError
from cskd_ray.io import storage

EXIT_USAGE = 2
STAGE_COMMANDS = ("features", "align", "teacher", "label", "distill")


def package_version() -> str:
    """The installed distribution's version, or ``cskd_ray.__version__`` when running from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cskd_ray")
    except PackageNotFoundError:
        from cskd_ray._version import __version__

        return __version__


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean a user mistake; modules never imported cannot have raised theirs."""
    errors: list[type[BaseException]] = [ConfigError, storage.StorageError, FileNotFoundError]
    for module, names in (("cskd_ray.io.labels", ("LabelFormatError",)), ("cskd_ray.io.sources", ("SourceError",)),
                          ("cskd_ray.models.registry", ("UnknownModelError", "WeightsUnavailableError"))):
        if module in sys.modules:  # importing cskd_ray.models only to name its errors costs seconds (torch)
            errors += [getattr(sys.modules[module], name) for name in names]
    return tuple(errors)


def _add_stage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config of the stage (see jobs/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted, YAML value), repeatable")
    parser.add_argument("--input", nargs="+", metavar="URI", help="override the config's input URIs")
    parser.add_argument("--output", metavar="URI", help="override the config's output URI")


def _command(sub: argparse._SubParsersAction, name: str, parent: str = "") -> argparse.ArgumentParser:
    """Add subcommand ``name`` with its one-line help and examples from :mod:`cskd_ray.app.cli_help`."""
    key = f"{parent} {name}".strip()
    line = cli_help.COMMANDS[key][0]
    return sub.add_parser(name, help=line, description=line[0].upper() + line[1:] + ".", epilog=cli_help.epilog(key),
                          formatter_class=cli_help.HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cskd-ray`` (also used by ``jobs/*.py``)."""
    parser = argparse.ArgumentParser(prog="cskd-ray", description=cli_help.DESCRIPTION, epilog=cli_help.EPILOG,
                                     formatter_class=cli_help.HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, Ray Data's and open_clip's own INFO lines")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    demo = _command(sub, "demo")
    demo.add_argument("--workdir", default="runs/demo", help="where data and outputs go (default runs/demo)")
    demo.add_argument("--num-images", type=int, default=None, help="generated images (default 800)")
    demo.add_argument("--config", default=None, help="features config (default jobs/configs/demo/features-proxy.yaml)")
    demo.add_argument("--clip", default=None, metavar="NAME:PRETRAINED",
                      help="real CLIP instead of the demo's proxy, e.g. ViT-B-32:openai (needs the weights)")
    demo.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,  # also `cskd-ray --verbose demo`
                      help="show Ray's and open_clip's own log lines")

    data = _command(sub, "make-demo-data")
    data.add_argument("--output", required=True)
    data.add_argument("--num-images", type=int, default=1000)
    data.add_argument("--labeled-fraction", type=float, default=0.1)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--image-size", type=int, default=128)
    data.add_argument("--num-corrupt", type=int, default=0, help="add this many broken files")

    stages = {name: _command(sub, name) for name in STAGE_COMMANDS + ("tune", "pipeline")}
    for stage_parser in stages.values():
        _add_stage_args(stage_parser)
    stages["tune"].add_argument("--resume", action="store_true", help="continue the sweep in the output folder")

    evaluate = _command(sub, "evaluate")
    evaluate.add_argument("--model", required=True, help="model folder (teacher's output/model)")
    evaluate.add_argument("--labels", required=True, metavar="FMT:PATH", help="e.g. ava:AVA.txt or tad66k:test.csv")
    evaluate.add_argument("--images", default=None, metavar="ROOT", help="folder or s3:// prefix of the images")
    evaluate.add_argument("--test-list", default=None, help="AVA: the official test list (gives the split)")
    evaluate.add_argument("--split", default=None, help="evaluate only rows of this split (e.g. test)")
    evaluate.add_argument("--threshold", type=float, default=None, help="accuracy threshold (default: 5 for AVA)")
    evaluate.add_argument("--output", default=None, help="where scores and metrics.json go (default MODEL/../evaluate)")

    diagnose = _command(sub, "diagnose")
    diagnose.add_argument("--model", required=True, help="aligned model folder (align's output/model)")
    diagnose.add_argument("--images", required=True, nargs="+", metavar="URI",
                          help="folders, prefixes, globs or manifests")
    diagnose.add_argument("--max-images", type=int, default=32)
    diagnose.add_argument("--output", default=None, help="where diagnose.json/.png go (default MODEL/../diagnose)")

    report = _command(sub, "report")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (e.g. runs/demo) or one stage's output")
    report.add_argument("--output", default=None, help="where the HTML goes (default RUN_DIR/report.html)")
    report.add_argument("--top", type=int, default=8, help="images in each top / bottom gallery (default 8)")

    score = _command(sub, "score")
    score.add_argument("--model", required=True, help="model folder (teacher/distill output/model), export folder "
                       "or hf-hub:org/name[@revision]")
    score.add_argument("--input", required=True, nargs="+", metavar="URI",
                       help="folders, prefixes, globs or manifests (local or s3://)")
    score.add_argument("--output", required=True, metavar="URI", help="score table (Parquet folder or s3:// prefix)")
    score.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default 64)")
    score.add_argument("--concurrency", type=int, default=None, help="model actors (default 1)")
    score.add_argument("--num-gpus-per-actor", type=float, default=None, help="default: 1 when the cluster has GPUs")
    score.add_argument("--min-score", type=float, default=None,
                       help="also write OUTPUT/_manifests/min_score-<t>.csv of the images scoring at least this")
    score.add_argument("--config", default=None, help="optional YAML with more score keys (shard_rows, ...)")
    score.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a score config key, repeatable")

    predict = _command(sub, "predict")
    predict.add_argument("model", metavar="MODEL", help="model folder (teacher/distill output/model), export folder "
                         "or hf-hub:org/name[@revision]")
    predict.add_argument("images", nargs="+", metavar="IMG",
                         help="image files, folders, globs or URIs (local or s3://); - reads one a line from stdin")
    predict.add_argument("--json", action="store_true", help="one JSON object a line, with the distribution")
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    predict.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")

    push = _command(sub, "push")
    push.add_argument("model", metavar="MODEL", help="model folder (teacher/distill output/model), local or s3://")
    push.add_argument("--repo", required=True, metavar="ORG/NAME", help="Hub model repository (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    push.add_argument("--local-dir", default=None, metavar="DIR", help="only write the Hub folder here (no network)")
    push.add_argument("--license", default="unknown", help="the model card's license id (default unknown), e.g. "
                      "apache-2.0 or cc-by-nc-4.0: check your training data's terms")
    push.add_argument("--metrics", default=None, metavar="FILE", help="metrics.json of cskd-ray evaluate for the card "
                      "(default: found next to MODEL)")

    export = _command(sub, "export")
    export.add_argument("--model", required=True, help="model folder (teacher/distill output/model)")
    export.add_argument("--format", required=True, metavar="FORMAT", help="onnx or torchscript")
    export.add_argument("--output", required=True, metavar="PATH", help="export folder (local or s3://)")
    export.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed (default 1e-4)")

    models = _command(sub, "list-models")
    models.add_argument("kind", choices=["clip", "encoders"])
    models.add_argument("--pattern", default="", help="glob filter, e.g. 'mobilenet*'")

    config = _command(sub, "config").add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    _command(config, "show", parent="config").add_argument(
        "stage", metavar="STAGE", help=f"a stage with a config: {', '.join(CONFIGS)}")
    return parser


COMMANDS = {"demo": commands.demo, "make-demo-data": commands.make_demo_data,
            **dict.fromkeys(STAGE_COMMANDS, commands.stage), "evaluate": commands.evaluate,
            "diagnose": commands.diagnose, "pipeline": commands.pipeline, "score": commands.score,
            "predict": commands.predict, "push": commands.push, "export": commands.export,
            "list-models": commands.list_models, "report": commands.report, "tune": commands.tune,
            "config": commands.config}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cskd-ray`` and ``jobs/*.py``; returns the exit status."""
    parser = build_parser()
    with contextlib.suppress(ImportError):  # shell completion, when the optional argcomplete package is installed
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    configure_console(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except _user_errors() as exc:
        if args.debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
