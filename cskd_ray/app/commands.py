"""What each ``cskd-ray`` command does once its arguments are parsed: load and check, start or join Ray, run, print.

The CLI (:mod:`cskd_ray.app.cli`) only parses arguments and calls one function here per command; the pipeline
(:mod:`cskd_ray.app.pipeline`) calls the stage commands too, so a stage prints and fails the same way in both.
Every user error surfaces in the stage's checks (:func:`cskd_ray.stages.check_stage`), before Ray starts; the
work itself is the stage's ``run``. Modules that load torch or Ray are imported inside the functions, so
``cskd-ray --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from cskd_ray.config import ConfigError
from cskd_ray.io import storage

Printer = Callable[[str], None]
FLAGS = {"model": "--model", "batch_size": "--batch-size", "concurrency": "--concurrency",
         "num_gpus_per_actor": "--num-gpus-per-actor", "min_score": "--min-score", "input": "--input",
         "output": "--output"}


def _print(line: str) -> None:
    print(line, flush=True)


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's directory); URIs and Hub models as given."""
    return uri if "://" in uri or uri.startswith("hf-hub:") else os.path.abspath(os.path.expanduser(uri))


def _loaded_and_checked(stage: str, config: str | None, overrides: list[str], input_uris: list[str] | None,
                        output_uri: str | None) -> Any:
    from cskd_ray.stages import check_stage, load_config

    cfg = load_config(stage, config, overrides, input_uris=input_uris, output_uri=output_uri)
    check_stage(stage, cfg)  # every user error surfaces here, before Ray starts
    return cfg


def run_features_command(config: str | None, overrides: list[str], input_uris: list[str] | None,
                         output_uri: str | None) -> dict:
    """Load and check the features config, plan, start Ray, run the stage, print and return the summary."""
    from cskd_ray.app.runtime import init_ray
    from cskd_ray.stages import features

    cfg = _loaded_and_checked("features", config, overrides, input_uris, output_uri)
    plan = features.plan_features(cfg)  # lists inputs and checks the cache's model, before Ray starts
    init_ray()
    result = features.run(cfg, plan, progress=_print)
    print(features.summary(result))
    return result.to_dict()


def run_align_command(config: str | None, overrides: list[str], input_uris: list[str] | None,
                      output_uri: str | None) -> dict:
    """Load and check the align config, start Ray, train (or resume), print and return the summary."""
    from cskd_ray.app.runtime import init_ray

    cfg = _loaded_and_checked("align", config, overrides, input_uris, output_uri)
    from cskd_ray.stages import align

    init_ray()
    result = align.run(cfg)
    print(align.summary(result))
    return align.result_dict(result)


def run_supervised_command(stage: str, config: str | None, overrides: list[str], input_uris: list[str] | None,
                           output_uri: str | None) -> dict:
    """Teacher / distill: load and check the config, start Ray, train (or resume), print the summary."""
    import importlib

    from cskd_ray.app.runtime import init_ray

    cfg = _loaded_and_checked(stage, config, overrides, input_uris, output_uri)
    module = importlib.import_module(f"cskd_ray.stages.{stage}")
    init_ray()
    result = module.run(cfg)
    print(module.summary(result))
    return module.result_dict(result)


def run_label_command(config: str | None, overrides: list[str], input_uris: list[str] | None,
                      output_uri: str | None) -> dict:
    """Load and check the label config, start Ray, pseudo-label what is missing, print the summary."""
    from cskd_ray.app.runtime import init_ray

    cfg = _loaded_and_checked("label", config, overrides, input_uris, output_uri)
    from cskd_ray.stages import label

    init_ray()
    result = label.run(cfg, progress=_print)
    print(label.summary(result))
    return label.result_dict(result)


def _flag_error(exc: ConfigError) -> ConfigError:
    """Name the command-line flag instead of the config key in an error about a flag's value."""
    match = re.match(r"<defaults>: (\w+): (.*)$", str(exc))
    if match and match.group(1) in FLAGS:
        return ConfigError(f"{FLAGS[match.group(1)]}: {match.group(2)}")
    return ConfigError(str(exc).removeprefix("<defaults>: "))


def run_score_command(model: str, input_uris: list[str], output: str, config: str | None = None,
                      overrides: list[str] | None = None, printer: Printer = print) -> dict:
    """Validate everything, start (or join) Ray, score, print and return the summary.

    Args:
        model: A model folder written by teacher / distill, an export folder, or a Hub model
            ``hf-hub:org/name[@revision]`` (pinned to the commit the driver fetched, so every actor
            loads the same weights).
        input_uris: Folders, prefixes, globs or manifests (local or s3://).
        output: The score table (local folder or s3:// prefix).
        config: Optional YAML with more score keys (``shard_rows``, ``object_store_mb``, ...).
        overrides: ``key=value`` overrides, applied after ``config``.
        printer: Receives progress and summary lines.
    """
    from cskd_ray.app.runtime import init_ray
    from cskd_ray.stages import check_stage, load_config

    try:
        cfg = load_config("score", config, [*(overrides or []), f"model={model}"], input_uris=input_uris,
                          output_uri=output)
    except ConfigError as exc:
        raise _flag_error(exc) from None
    check_stage("score", cfg)  # before Ray starts; pins a Hub model to one commit
    from cskd_ray.stages import score

    init_ray()
    result = score.run(cfg, progress=printer)
    printer(score.format_summary(result))
    return result


def run_evaluate_command(model: str, labels: str, output: str | None = None, images: str | None = None,
                         test_list: str | None = None, split: str | None = None, threshold: float | None = None,
                         printer: Printer = print) -> dict[str, Any]:
    """``cskd-ray evaluate``: check the arguments, start (or join) Ray, evaluate, print the metrics table.

    Args:
        model: A model or export folder (local paths are made absolute for the Ray workers).
        labels: ``FMT:PATH``, e.g. ``ava:AVA.txt`` (see :data:`cskd_ray.io.labels.LABEL_FORMATS`).
        output: Where scores and ``metrics.json`` go; None: ``MODEL/../evaluate``.
        images: Folder or s3:// prefix the label file's names are under.
        test_list: AVA's official test list (gives the split).
        split: Evaluate only rows of this split.
        threshold: Accuracy threshold; None: 5 for 10-bin labels, else the midpoint of the label range.
        printer: Receives the metrics table and the path of ``metrics.json``.

    Raises:
        ConfigError: If ``labels`` is not ``FMT:PATH`` with a known format.
    """
    from cskd_ray.app.runtime import init_ray
    from cskd_ray.models.saved import describe_scoring_model
    from cskd_ray.stages import evaluate

    fmt, path = evaluate.parse_labels_arg(labels)
    model, path, images, test_list = (p if not p or "://" in p else os.path.abspath(p)
                                      for p in (model, path, images, test_list))
    describe_scoring_model(model)
    output = output or storage.join(model.rstrip("/").rsplit("/", 1)[0], "evaluate")
    cfg = evaluate.EvaluateConfig(model, fmt, path, output if "://" in output else os.path.abspath(output), images,
                                  test_list, split, threshold)
    init_ray()
    report = evaluate.run(cfg)
    printer(evaluate.format_table(report))
    printer(f"evaluate: metrics at {storage.join(cfg.output, 'metrics.json')}")
    return report


def stage(args: argparse.Namespace) -> int:
    """``cskd-ray features|align|teacher|label|distill CONFIG``: run one stage."""
    if args.command in ("teacher", "distill"):
        run_supervised_command(args.command, args.config, args.overrides, args.input, args.output)
    else:
        runner = {"features": run_features_command, "align": run_align_command, "label": run_label_command}
        runner[args.command](args.config, args.overrides, args.input, args.output)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``cskd-ray evaluate --model M --labels FMT:PATH``: see :func:`run_evaluate_command`."""
    run_evaluate_command(args.model, args.labels, args.output, args.images, args.test_list, args.split, args.threshold)
    return 0


def score(args: argparse.Namespace) -> int:
    """``cskd-ray score --model M --input URI ... --output URI``: the flags become score config keys."""
    flags = {"batch_size": args.batch_size, "concurrency": args.concurrency,
             "num_gpus_per_actor": args.num_gpus_per_actor, "min_score": args.min_score}
    overrides = [*args.overrides, *(f"{key}={value}" for key, value in flags.items() if value is not None)]
    run_score_command(args.model, args.input, args.output, args.config, overrides, printer=_print)
    return 0


def tune(args: argparse.Namespace) -> int:
    """``cskd-ray tune CONFIG``: run (or ``--resume``) a sweep; exit 1 when it was interrupted (resume it)."""
    from cskd_ray.app.runtime import init_ray
    from cskd_ray.stages import check_stage, load_config

    cfg = load_config("tune", args.config, args.overrides, input_uris=args.input, output_uri=args.output)
    check_stage("tune", cfg)  # every user error in the sweep or its base config surfaces here, before Ray starts
    from cskd_ray.stages import tune as tune_stage

    init_ray()
    result = tune_stage.run(cfg, resume=args.resume, say=_print)
    return 1 if any(row["status"] == "unfinished" for row in result.rows) else 0


def pipeline(args: argparse.Namespace) -> int:
    """``cskd-ray pipeline CONFIG``: every stage in order, complete ones skipped (:mod:`cskd_ray.app.pipeline`)."""
    from cskd_ray.app.pipeline import load_pipeline_config, run_pipeline

    cfg = load_pipeline_config(args.config, args.overrides, input_uris=args.input, output_uri=args.output)
    run_pipeline(cfg, say=_print)
    return 0


def diagnose(args: argparse.Namespace) -> int:
    """``cskd-ray diagnose``: per-layer attention statistics before and after alignment, as JSON and PNG."""
    from cskd_ray.stages.diagnose import DiagnoseConfig, run

    model = os.path.abspath(args.model) if "://" not in args.model else args.model
    if not storage.exists(storage.join(model, "model.json")):
        raise ConfigError(f"--model {args.model}: not a model folder (no model.json); pass align's output/model")
    output = args.output or storage.join(model.rstrip("/").rsplit("/", 1)[0], "diagnose")
    report = run(DiagnoseConfig(model, args.images, output, args.max_images))
    for label in ("before", "after"):
        distance = [sum(layer) / len(layer) for layer in report[label]["distance_px"]]
        entropy = [sum(layer) / len(layer) for layer in report[label]["entropy"]]
        print(f"diagnose: {label:>6} alignment: distance (px) per layer {', '.join(f'{d:.1f}' for d in distance)}; "
              f"entropy {', '.join(f'{e:.2f}' for e in entropy)}")
    print(f"diagnose: {report['images']} images; JSON and plot at {output}/diagnose.json, {output}/diagnose.png")
    return 0


def export(args: argparse.Namespace) -> int:
    """``cskd-ray export``: export and verify; a failed verification prints ``error:`` and exits 1, writing nothing."""
    from cskd_ray.stages.export import ExportConfig, ExportVerificationError, run

    try:
        result = run(ExportConfig(absolute(args.model), args.format, absolute(args.output), args.tolerance))
    except ExportVerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"export: {result.format} model at {result.file} (model {result.model_id}); max abs difference to "
          f"PyTorch on {result.samples} sample inputs: {result.max_abs_diff:.3g} (tolerance {result.tolerance:g}); "
          f"{result.seconds:.1f} s")
    return 0


def predict(args: argparse.Namespace) -> int:
    """``cskd-ray predict MODEL IMG ...``: see :func:`cskd_ray.stages.predict.run_predict_command`."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    from cskd_ray.stages.predict import run_predict_command

    return run_predict_command(absolute(args.model), args.images, args.json, sys.stdin, sys.stdout, sys.stderr,
                               batch_size=args.batch_size, device=args.device)


def push(args: argparse.Namespace) -> int:
    """``cskd-ray push MODEL --repo ORG/NAME``: see :func:`cskd_ray.models.hub.push_model`."""
    from cskd_ray.models.hub import push_model

    result = push_model(absolute(args.model), args.repo, private=args.private, revision=args.revision,
                        local_dir=args.local_dir and absolute(args.local_dir), license=args.license,
                        metrics=args.metrics and absolute(args.metrics))
    print(result.summary())
    return 0


def report(args: argparse.Namespace) -> int:
    """``cskd-ray report RUN_DIR``: write the HTML report (:mod:`cskd_ray.app.report`) and print its path."""
    from cskd_ray.app.report import write_report

    result = write_report(args.run_dir, args.output, args.top)
    for key, note in result.notes.items():
        print(f"report: no {key}: {note}")
    print(f"report: {result.output}")
    return 0


def make_demo_data(args: argparse.Namespace) -> int:
    """``cskd-ray make-demo-data``: generate demo data and print where it went."""
    from cskd_ray.io.demo import make_demo_data as make

    try:
        summary = make(args.output, args.num_images, args.labeled_fraction, args.seed, image_size=args.image_size,
                       num_corrupt=args.num_corrupt)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    print(json.dumps(summary.__dict__, indent=2))
    return 0


def demo(args: argparse.Namespace) -> int:
    """``cskd-ray demo``: see :mod:`cskd_ray.app.demo`."""
    from cskd_ray.app.demo import run_demo

    run_demo(args.workdir, args.num_images, args.config, clip=args.clip, verbose=args.verbose)
    return 0


def config(args: argparse.Namespace) -> int:
    """``cskd-ray config show STAGE``: see :mod:`cskd_ray.app.config_docs`."""
    from cskd_ray.app.config_docs import render_stage_config

    print(render_stage_config(args.stage))
    return 0


def list_models(args: argparse.Namespace) -> int:
    """``cskd-ray list-models clip|encoders``: model names, one per line."""
    import fnmatch

    from cskd_ray.models import list_clip_models, list_encoders

    names = list_clip_models() if args.kind == "clip" else list_encoders(args.pattern)
    print("\n".join(n for n in names if not args.pattern or fnmatch.fnmatch(n, args.pattern)))
    return 0
