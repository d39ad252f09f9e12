"""Run one stage as the command line does: load and check its config, start or join Ray, run, print a summary.

The CLI (:mod:`cskd_ray.cli`), the whole pipeline (:mod:`cskd_ray.pipeline`), the demo and the benchmarks
call these, so a stage prints and fails the same way wherever it runs. Every user error surfaces in the
config check, before Ray starts.
"""

from __future__ import annotations

from cskd_ray.preflight import check_stage

RANDOM_WEIGHTS_NOTE = (
    "note: CLIP weights are RANDOM (no model hub offline): features are not real CLIP features. For real "
    "ones set clip.pretrained to an open_clip tag (e.g. --set clip.name=ViT-L-14 --set clip.pretrained=openai), "
    "a checkpoint path or an s3:// URI."
)


def run_features_command(config: str, overrides: list[str], input_uris: list[str] | None,
                         output_uri: str | None) -> dict:
    """Load and validate the features config, start Ray, run the stage, print and return the summary."""
    from cskd_ray.config import load_config
    from cskd_ray.features import plan_features, run_features
    from cskd_ray.runtime import init_ray

    cfg = load_config("features", config, overrides, input_uris=input_uris, output_uri=output_uri)
    check_stage("features", cfg)
    plan = plan_features(cfg)  # every user error surfaces here, before Ray starts
    init_ray()
    result = run_features(cfg, plan, progress=lambda line: print(line, flush=True))
    summary = result.to_dict()
    print(f"features: {result.inputs} images, {result.already_cached} already cached, {result.new_rows} new rows "
          f"({result.computed} computed, {result.reused} reused by content), {result.errors} errors, "
          f"{result.images_per_s:.1f} img/s, {result.seconds:.1f} s")
    print(f"features: cache at {result.output}")
    if result.random_weights:
        print(RANDOM_WEIGHTS_NOTE)
    return summary


def run_align_command(config: str, overrides: list[str], input_uris: list[str] | None,
                      output_uri: str | None) -> dict:
    """Load and validate the align config, start Ray, train (or resume), print and return the summary."""
    from cskd_ray.config import load_config
    from cskd_ray.runtime import init_ray

    cfg = load_config("align", config, overrides, input_uris=input_uris, output_uri=output_uri)
    check_stage("align", cfg)  # every user error surfaces here, before Ray starts (and before torch loads)
    from cskd_ray.train.align import result_dict, run_align

    init_ray()
    result = run_align(cfg)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.metrics.items()) if isinstance(v, float))
    print(f"align: {result.steps} steps on {result.rows} cached images, {metrics}, "
          f"{result.images_per_s:.1f} img/s, {result.seconds:.1f} s")
    print(f"align: aligned model at {cfg.output}/model, checkpoints at {cfg.output}/train")
    return result_dict(result)


def run_supervised_command(stage: str, config: str, overrides: list[str], input_uris: list[str] | None,
                           output_uri: str | None) -> dict:
    """Teacher / distill: load and validate the config, start Ray, train (or resume), print the summary."""
    from dataclasses import asdict

    from cskd_ray.config import load_config
    from cskd_ray.runtime import init_ray

    cfg = load_config(stage, config, overrides, input_uris=input_uris, output_uri=output_uri)
    check_stage(stage, cfg)  # every user error surfaces here, before Ray starts
    init_ray()
    if stage == "distill":
        from cskd_ray.train.distill import run_distill as run
    else:
        from cskd_ray.train.supervise import run_teacher as run
    result = run(cfg)
    val = ", ".join(f"{k.removeprefix('val_')} {v:.3f}" for k, v in sorted(result.metrics.items())
                    if k.startswith("val_"))
    print(f"{stage}: {result.steps} steps on {result.train_rows} training rows ({result.head['kind']} head), "
          f"best validation on {result.val_rows} images: {val}; {result.seconds:.1f} s")
    print(f"{stage}: model at {cfg.output}/model, checkpoints at {cfg.output}/train")
    return asdict(result)


def run_label_command(config: str, overrides: list[str], input_uris: list[str] | None,
                      output_uri: str | None) -> dict:
    """Load and validate the label config, start Ray, pseudo-label what is missing, print the summary."""
    from cskd_ray.config import load_config
    from cskd_ray.runtime import init_ray

    cfg = load_config("label", config, overrides, input_uris=input_uris, output_uri=output_uri)
    check_stage("label", cfg)  # a bad model folder, input or output fails before Ray starts
    from cskd_ray.labeling import result_dict, run_label

    init_ray()
    result = run_label(cfg, progress=lambda line: print(line, flush=True))
    print(f"label: {result.inputs} images, {result.already_done} already labeled, {result.new_rows} new rows "
          f"({result.reused} copied by content), {result.errors} errors, {result.images_per_s:.1f} img/s, "
          f"{result.seconds:.1f} s; pseudo-labels at {result.output} (model {result.model})")
    return result_dict(result)
