# PYTHON_ARGCOMPLETE_OK
"""``cskd-ray``: one subcommand per stage; each parses arguments and calls one driver function.

Errors a user can fix (a bad config, argument, path or model name) exit with status 2 and one
``error:`` line on stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence

from cskd_ray import cli_help, stage_runs, storage
from cskd_ray.config import STAGE_CONFIGS, ConfigError

EXIT_USAGE = 2
STAGE_COMMANDS = ("features", "align", "teacher", "label", "distill")


def package_version() -> str:
    """The installed distribution's version, or ``cskd_ray.__version__`` when running from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cskd_ray")
    except PackageNotFoundError:
        from cskd_ray import __version__

        return __version__


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean a user mistake; modules never imported cannot have raised theirs."""
    errors: list[type[BaseException]] = [ConfigError, storage.StorageError, FileNotFoundError]
    for module, names in (("cskd_ray.data.labels", ("LabelFormatError",)), ("cskd_ray.data.sources", ("SourceError",)),
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
    """Add subcommand ``name`` with its one-line help and examples from :mod:`cskd_ray.cli_help`."""
    key = f"{parent} {name}".strip()
    line = cli_help.COMMANDS[key][0]
    return sub.add_parser(name, help=line, description=line[0].upper() + line[1:] + ".", epilog=cli_help.epilog(key),
                          formatter_class=cli_help.HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cskd-ray`` (also used by ``jobs/*.py``)."""
    parser = argparse.ArgumentParser(prog="cskd-ray", description=cli_help.DESCRIPTION, epilog=cli_help.EPILOG,
                                     formatter_class=cli_help.HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    demo = _command(sub, "demo")
    demo.add_argument("--workdir", default="runs/demo", help="where data and outputs go (default runs/demo)")
    demo.add_argument("--num-images", type=int, default=600)
    demo.add_argument("--config", default=None, help="features config (default jobs/configs/demo/features.yaml)")

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
        "stage", metavar="STAGE", help=f"a stage with a config: {', '.join(STAGE_CONFIGS)}")
    return parser


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    """Generate demo data and print where it went."""
    from cskd_ray.data.demo import make_demo_data

    try:
        summary = make_demo_data(args.output, args.num_images, args.labeled_fraction, args.seed,
                                 image_size=args.image_size, num_corrupt=args.num_corrupt)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    print(json.dumps(summary.__dict__, indent=2))
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """``cskd-ray features|align|teacher|label|distill CONFIG``: run one stage (:mod:`cskd_ray.stage_runs`)."""
    if args.command in ("teacher", "distill"):
        stage_runs.run_supervised_command(args.command, args.config, args.overrides, args.input, args.output)
    else:
        runner = {"features": stage_runs.run_features_command, "align": stage_runs.run_align_command,
                  "label": stage_runs.run_label_command}
        runner[args.command](args.config, args.overrides, args.input, args.output)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``cskd-ray evaluate --model M --labels FMT:PATH``: see :func:`cskd_ray.evaluation.run_evaluate_command`."""
    from cskd_ray.evaluation import run_evaluate_command

    run_evaluate_command(args.model, args.labels, args.output, args.images, args.test_list, args.split, args.threshold)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    """``cskd-ray diagnose``: per-layer attention statistics before and after alignment, as JSON and PNG."""
    from cskd_ray.diagnose import run_diagnose

    model = os.path.abspath(args.model) if "://" not in args.model else args.model
    if not storage.exists(storage.join(model, "model.json")):
        raise ConfigError(f"--model {args.model}: not a model folder (no model.json); pass align's output/model")
    output = args.output or storage.join(model.rstrip("/").rsplit("/", 1)[0], "diagnose")
    report = run_diagnose(model, args.images, output, args.max_images)
    for label in ("before", "after"):
        distance = [sum(layer) / len(layer) for layer in report[label]["distance_px"]]
        entropy = [sum(layer) / len(layer) for layer in report[label]["entropy"]]
        print(f"diagnose: {label:>6} alignment: distance (px) per layer {', '.join(f'{d:.1f}' for d in distance)}; "
              f"entropy {', '.join(f'{e:.2f}' for e in entropy)}")
    print(f"diagnose: {report['images']} images; JSON and plot at {output}/diagnose.json, {output}/diagnose.png")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``cskd-ray report RUN_DIR``: write the HTML report (:mod:`cskd_ray.report`) and print its path."""
    from cskd_ray.report import write_report

    result = write_report(args.run_dir, args.output, args.top)
    for key, note in result.notes.items():
        print(f"report: no {key}: {note}")
    print(f"report: {result.output}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """``cskd-ray tune CONFIG``: run (or ``--resume``) a sweep, print the top trials, write the best config."""
    from cskd_ray.config import load_config
    from cskd_ray.runtime import init_ray
    from cskd_ray.tune import plan_tune, run_tune

    cfg = load_config("tune", args.config, args.overrides, input_uris=args.input, output_uri=args.output)
    plan_tune(cfg)  # every user error in the sweep or its base config surfaces here, before Ray starts
    init_ray()
    result = run_tune(cfg, resume=args.resume, say=lambda line: print(line, flush=True))
    return 1 if any(row["status"] == "unfinished" for row in result.rows) else 0  # interrupted: --resume


def cmd_score(args: argparse.Namespace) -> int:
    """``cskd-ray score --model M --input URI ... --output URI``: see :mod:`cskd_ray.scoring`."""
    from cskd_ray.scoring import run_score_command

    flags = {"batch_size": args.batch_size, "concurrency": args.concurrency,
             "num_gpus_per_actor": args.num_gpus_per_actor, "min_score": args.min_score}
    overrides = [*args.overrides, *(f"{key}={value}" for key, value in flags.items() if value is not None)]
    run_score_command(args.model, args.input, args.output, args.config, overrides,
                      printer=lambda line: print(line, flush=True))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``cskd-ray predict MODEL IMG ...``: see :func:`cskd_ray.predict.run_predict_command`."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    from cskd_ray.predict import run_predict_command

    return run_predict_command(_absolute(args.model), args.images, args.json, sys.stdin, sys.stdout, sys.stderr,
                               batch_size=args.batch_size, device=args.device)


def cmd_export(args: argparse.Namespace) -> int:
    """``cskd-ray export --model M --format onnx|torchscript --output PATH``: see :mod:`cskd_ray.export`."""
    from cskd_ray.export import ExportVerificationError, export_model

    try:
        result = export_model(_absolute(args.model), args.format, _absolute(args.output), args.tolerance)
    except ExportVerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"export: {result.format} model at {result.file} (model {result.model_id}); max abs difference to "
          f"PyTorch on {result.samples} sample inputs: {result.max_abs_diff:.3g} (tolerance {result.tolerance:g}); "
          f"{result.seconds:.1f} s")
    return 0


def _absolute(uri: str) -> str:
    return uri if "://" in uri or uri.startswith("hf-hub:") else os.path.abspath(os.path.expanduser(uri))


def cmd_push(args: argparse.Namespace) -> int:
    """``cskd-ray push MODEL --repo ORG/NAME``: see :func:`cskd_ray.models.hub.push_model`."""
    from cskd_ray.models.hub import push_model

    result = push_model(_absolute(args.model), args.repo, private=args.private, revision=args.revision,
                        local_dir=args.local_dir and _absolute(args.local_dir), license=args.license,
                        metrics=args.metrics and _absolute(args.metrics))
    print(result.summary())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """``cskd-ray config show STAGE``: see :mod:`cskd_ray.config_docs`."""
    from cskd_ray.config_docs import render_stage_config

    print(render_stage_config(args.stage))
    return 0


def cmd_list_models(args: argparse.Namespace) -> int:
    """Print model names, one per line."""
    import fnmatch

    from cskd_ray.models import list_clip_models, list_encoders

    names = list_clip_models() if args.kind == "clip" else list_encoders(args.pattern)
    print("\n".join(n for n in names if not args.pattern or fnmatch.fnmatch(n, args.pattern)))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """``cskd-ray pipeline CONFIG``: every stage in order, complete ones skipped (:mod:`cskd_ray.pipeline`)."""
    from cskd_ray.config import load_config
    from cskd_ray.pipeline import run_pipeline

    cfg = load_config("pipeline", args.config, args.overrides, input_uris=args.input, output_uri=args.output)
    run_pipeline(cfg, say=lambda line: print(line, flush=True))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``cskd-ray demo``: see :mod:`cskd_ray.demo_pipeline`."""
    from cskd_ray.demo_pipeline import run_demo

    run_demo(args.workdir, args.num_images, args.config)
    return 0


COMMANDS = {"demo": cmd_demo, "make-demo-data": cmd_make_demo_data, **dict.fromkeys(STAGE_COMMANDS, cmd_stage),
            "evaluate": cmd_evaluate, "diagnose": cmd_diagnose, "pipeline": cmd_pipeline, "score": cmd_score,
            "predict": cmd_predict, "push": cmd_push, "export": cmd_export, "list-models": cmd_list_models,
            "report": cmd_report, "tune": cmd_tune, "config": cmd_config}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cskd-ray`` and ``jobs/*.py``; returns the exit status."""
    parser = build_parser()
    with contextlib.suppress(ImportError):  # shell completion, when the optional argcomplete package is installed
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
