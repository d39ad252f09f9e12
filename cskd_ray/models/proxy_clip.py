"""A proxy CLIP for the demo world: a tiny open_clip image tower that knows what demo images show.

Real CSKD works because CLIP, trained without aesthetic labels, already encodes what an image shows
(blur, exposure, colour, composition, content). A random CLIP encodes nothing, so aligning a student to it
teaches nothing. This module gives the demo the same structure on a small scale: the image tower of the
open_clip config ``cskd-proxy-rn`` (a small ModifiedResNet, 64 px) is pre-trained on images drawn by the demo generator
(:mod:`cskd_ray.io.demo`) from a seed the demo never uses, to predict each image's *latent properties*
(exposure, contrast, saturation, blur, noise, subject position and size, distance to a thirds point, hue,
scene type, subject shape, clutter). The aesthetic score (``hidden_score``) and the vote labels are never
used. It is a proxy, not OpenAI's CLIP: it knows only the demo world.

Objective (the linear probe ``W, b`` is discarded after training): with ``z = C(x)`` the tower's pooled
embedding of dimension ``D``, ``u = z / ‖z‖`` and standardised targets ``y ∈ R^K``::

    ŷ = √D · W u + b
    L = (1/K) Σ_k (ŷ_k − y_k)²  +  γ · ‖mean_batch(u)‖²

The probe reads the unit vector, so the knowledge lives in the embedding's direction (what cosine
alignment sees), and the second term (γ = 1) keeps the batch mean direction small, so embeddings of
different images are not all nearly parallel (a random tower's are: cosine about 0.99).

The build is deterministic on one kind of CPU (fixed seeds, ``torch.use_deterministic_algorithms``, one CPU
thread), but not across kinds: torch's float kernels differ with the vector instructions a CPU has (AVX2,
AVX-512, AMX), so each kind of CPU builds its own bits. The weights are not in the repository: they are built on
first use (about 2 min on 2 cores; ``make setup`` does it) into ``$CSKD_RAY_CACHE/proxy/cskd-proxy-rn.safetensors``
(default ``~/.cache/cskd_ray``). ``weights/cskd-proxy-rn.json`` records the build's configuration, summary and
sha256, plus the sha256 of the same build on each other kind of CPU seen (``other_builds``, with the CPU that
made it); every load verifies the file against them (:func:`proxy_weights_path`).
``python -m cskd_ray.models.proxy_clip --ensure`` builds the file if missing and verifies it; ``--record``
rebuilds it and records this CPU's sha256 (keeping the others while the build configuration is unchanged).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROXY_NAME = "cskd-proxy-rn"
PROXY_TAG = "proxy"
WEIGHTS_DIR = Path(__file__).with_name("weights")
RECORD_PATH = WEIGHTS_DIR / f"{PROXY_NAME}.json"
TARGET_NAMES = ("exposure_ev", "contrast", "saturation", "log_blur", "log_noise", "subject_x", "subject_y",
                "thirds_distance", "subject_size", "hue_cos", "hue_sin", "scene_landscape", "scene_studio",
                "scene_texture", "shape_ellipse", "shape_rectangle", "shape_blob", "num_secondary")
PROXY_DATA_SEED = 7_919  # the demo uses seeds 0.. for its own images; this stream is disjoint from them


@dataclass(frozen=True)
class ProxyBuildConfig:
    """How the proxy CLIP is built; the defaults make the recorded weights.

    Attributes:
        name: open_clip config name of the tower.
        num_images: Generated training images (half rendered at 64 px, half at 128 px, as the demo uses both).
        epochs: Passes over the images.
        batch_size: Images per step.
        lr: Peak AdamW learning rate (cosine decay to 0 after a 5% warm-up).
        weight_decay: AdamW weight decay.
        spread_weight: γ, the weight of the batch-mean-direction penalty.
        seed: Seed of the image stream, the initialisation and the shuffling.
        workers: Processes rendering images (the output does not depend on it).
    """

    name: str = PROXY_NAME
    num_images: int = 3000
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    spread_weight: float = 1.0
    seed: int = PROXY_DATA_SEED
    workers: int = 2


def latent_targets(params: object) -> list[float]:
    """The latent properties of one demo scene (a :class:`cskd_ray.io.demo.SceneParams`), in TARGET_NAMES order.

    No aesthetic score enters: these are what the image shows, not how good it is.
    """
    p = params
    one_hot = [float(p.scene_type == k) for k in range(3)] + [float(p.subject_shape == k) for k in range(3)]
    return [p.exposure_ev, p.contrast, p.saturation, math.log1p(p.blur_sigma), math.log(p.noise_sigma + 0.004),
            p.subject_x, p.subject_y, p.thirds_distance, p.subject_size, math.cos(2 * math.pi * p.hue),
            math.sin(2 * math.pi * p.hue), *one_hot, float(p.num_secondary)]


def _render_chunk(seed: int, start: int, stop: int) -> tuple[list[bytes], list[list[float]]]:
    """JPEG bytes (quality 90, as the demo writes) and latent targets of images ``start..stop-1``."""
    from cskd_ray.io.demo import render_image, sample_params

    images, targets = [], []
    for i in range(start, stop):
        params = sample_params(np.random.default_rng([seed, i]))
        buf = io.BytesIO()
        render_image(params, 64 if i % 2 == 0 else 128).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
        targets.append(latent_targets(params))
    return images, targets


def render_training_set(cfg: ProxyBuildConfig, spec: object) -> tuple[np.ndarray, np.ndarray]:
    """Renders ``cfg.num_images`` images, preprocessed by ``spec``, as ``(N, S, S, 3)`` uint8 and ``(N, K)``."""
    from cskd_ray.io.transforms import resize_crop

    chunk = max(1, math.ceil(cfg.num_images / (cfg.workers * 4)))
    bounds = [(s, min(s + chunk, cfg.num_images)) for s in range(0, cfg.num_images, chunk)]
    if cfg.workers == 1:
        parts = [_render_chunk(cfg.seed, a, b) for a, b in bounds]
    else:
        with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
            parts = list(pool.map(_render_chunk, *zip(*[(cfg.seed, a, b) for a, b in bounds], strict=True)))
    pixels = [resize_crop(Image.open(io.BytesIO(b)).convert("RGB"), spec) for part in parts for b in part[0]]
    targets = np.asarray([t for part in parts for t in part[1]], dtype=np.float32)
    return np.stack(pixels), targets


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded, deterministic, single-threaded torch for the duration of the block."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(strict)
            torch.set_num_threads(threads)


def proxy_loss(u: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, spread_weight: float) -> dict:
    """``L = mean_k (ŷ_k − y_k)² + γ ‖mean_batch(u)‖²`` for unit embeddings ``u`` (see the module docstring)."""
    fit = torch.nn.functional.mse_loss(pred, target)
    spread = u.mean(dim=0).pow(2).sum()
    return {"loss": fit + spread_weight * spread, "fit": fit, "spread": spread}


def build_proxy(cfg: ProxyBuildConfig, log: object = print) -> tuple[dict[str, torch.Tensor], dict]:
    """Trains the proxy tower; returns its ``visual.*`` state dict and a summary (targets' R², timings).

    Args:
        cfg: The build configuration.
        log: Called with one progress line per epoch.

    Returns:
        The tower's weights (keys ``visual.*``, as open_clip names them) and a JSON-able summary with the
        held-out R² per latent property (the last 10% of the images are held out of training).
    """
    from cskd_ray.io.transforms import normalize_batch
    from cskd_ray.models.registry import _clip_preprocess, _open_clip

    start = time.perf_counter()
    with _deterministic(cfg.seed):
        model = _open_clip().create_model(cfg.name, pretrained=None)
        spec = _clip_preprocess(model.visual)
        visual = model.visual.train()
        pixels, targets = render_training_set(cfg, spec)
        render_s = time.perf_counter() - start
        held = max(1, cfg.num_images // 10)
        mean, std = targets[:-held].mean(0), targets[:-held].std(0) + 1e-6
        y = torch.from_numpy((targets - mean) / std)
        x = normalize_batch(pixels, spec).contiguous()
        dim = int(visual.output_dim)
        probe = torch.nn.Linear(dim, y.shape[1])
        params = [*visual.parameters(), *probe.parameters()]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_train = cfg.num_images - held
        steps = cfg.epochs * math.ceil(n_train / cfg.batch_size)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, s / steps))))

        def forward(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            u = torch.nn.functional.normalize(visual(batch), dim=-1)
            return u, probe(u) * math.sqrt(dim)

        for epoch in range(cfg.epochs):
            order = torch.randperm(n_train)
            for i in range(0, n_train, cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                u, pred = forward(x[idx])
                losses = proxy_loss(u, pred, y[idx], cfg.spread_weight)
                opt.zero_grad(set_to_none=True)
                losses["loss"].backward()
                opt.step()
                sched.step()
            log(f"proxy CLIP: epoch {epoch + 1}/{cfg.epochs} fit {losses['fit'].item():.3f} "
                f"spread {losses['spread'].item():.3f} ({time.perf_counter() - start:.0f} s)")
        visual.eval()
        with torch.no_grad():
            u, pred = forward(x[n_train:])
            resid = ((pred - y[n_train:]) ** 2).mean(0)
            r2 = (1 - resid / y[n_train:].var(0, unbiased=False).clamp_min(1e-6)).tolist()
            cos = (u @ u.T)[~torch.eye(len(u), dtype=torch.bool)].mean().item()
    weights = {f"visual.{k}": v.detach().clone().contiguous() for k, v in visual.state_dict().items()}
    summary = {"held_out_r2": dict(zip(TARGET_NAMES, [round(v, 3) for v in r2], strict=True)),
               "held_out_mean_pairwise_cosine": round(cos, 3), "render_seconds": round(render_s, 1),
               "total_seconds": round(time.perf_counter() - start, 1)}
    return weights, summary


def save_weights(weights: dict[str, torch.Tensor], path: str | Path) -> str:
    """Writes ``weights`` as safetensors (keys sorted, no metadata: the bytes depend on the values only).

    Returns:
        The file's sha256.
    """
    from safetensors.torch import save_file

    from cskd_ray.models.registry import file_digest

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(weights.items())), str(path))
    return file_digest(path)


def read_record() -> dict:
    """The recorded build: file name, sha256, build configuration and summary."""
    return json.loads(RECORD_PATH.read_text())


def cache_path(file: str) -> Path:
    """Where the built weights live: ``$CSKD_RAY_CACHE/proxy/<file>`` (default ``~/.cache/cskd_ray``)."""
    from cskd_ray.models.registry import cache_dir

    return cache_dir() / "proxy" / file


def proxy_weights_path(name: str = PROXY_NAME) -> Path:
    """The verified local file of the proxy CLIP weights for ``name``.

    The file is ``$CSKD_RAY_CACHE/proxy/<file>`` (default ``~/.cache/cskd_ray``), built there first if missing;
    its sha256 must equal the recorded one.

    Raises:
        WeightsUnavailableError: ``name`` has no proxy weights, or the file's sha256 differs from the record.
    """
    from cskd_ray.models.registry import WeightsUnavailableError, file_digest

    if name != PROXY_NAME:
        raise WeightsUnavailableError(f"pretrained {PROXY_TAG!r} exists only for {PROXY_NAME}, not {name!r}")
    record = read_record()
    path = cache_path(record["file"])
    if not path.is_file():
        weights, _ = build_proxy(ProxyBuildConfig(**record["build"]))
        save_weights(weights, path)
    digest = file_digest(path)
    known = known_digests(record)
    if digest not in known:
        raise WeightsUnavailableError(
            f"proxy CLIP weights {path} have sha256 {digest}, but {RECORD_PATH.name} records {record['sha256']} "
            f"(and {len(known) - 1} builds on other kinds of CPU). Each kind of CPU builds other bits: delete the "
            "file to rebuild it, or on a new kind of CPU record its build with `python -m cskd_ray.models.proxy_clip "
            f"--record` (and commit {RECORD_PATH.name})")
    return path


def known_digests(record: dict) -> set[str]:
    """The sha256 of the recorded build on every kind of CPU seen."""
    return {record["sha256"], *(build["sha256"] for build in record.get("other_builds", []))}


def cpu_summary() -> str:
    """The CPU's model name and the vector instruction sets torch's kernels dispatch on (they decide the bits)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    present = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(present) or 'no AVX2'})"


def main(argv: list[str] | None = None) -> int:
    """Builds the proxy CLIP; ``--ensure`` builds the cached weights if missing, ``--record`` re-records them."""
    parser = argparse.ArgumentParser(description="Build the demo's proxy CLIP (deterministic, CPU).")
    parser.add_argument("--output", help="where to write the safetensors file (default: print the sha256 only)")
    parser.add_argument("--record", action="store_true",
                        help=f"build into the cache and record this CPU's build in {RECORD_PATH.name}")
    parser.add_argument("--ensure", action="store_true", help="build the recorded weights into the cache if "
                        "missing, verify their sha256, print the path")
    parser.add_argument("--num-images", type=int, default=ProxyBuildConfig.num_images)
    parser.add_argument("--epochs", type=int, default=ProxyBuildConfig.epochs)
    args = parser.parse_args(argv)
    if args.ensure:
        print(proxy_weights_path())
        return 0
    cfg = ProxyBuildConfig(num_images=args.num_images, epochs=args.epochs)
    weights, summary = build_proxy(cfg)
    output = cache_path(f"{PROXY_NAME}.safetensors") if args.record else Path(args.output or "/dev/null")
    digest = save_weights(weights, output) if (args.record or args.output) else None
    print(json.dumps({"sha256": digest, **summary}, indent=2))
    if args.record:
        previous = read_record()
        others = [b for b in [{"sha256": previous["sha256"], "built_on": previous.get("built_on", "?")},
                              *previous.get("other_builds", [])] if b["sha256"] != digest]
        record = {"model": PROXY_NAME, "file": output.name, "sha256": digest, "build": asdict(cfg),
                  "command": "python -m cskd_ray.models.proxy_clip --record", "targets": list(TARGET_NAMES),
                  "summary": summary, "built_on": cpu_summary(),
                  "note": "a proxy trained on the demo generator's latent properties, not OpenAI's CLIP; it knows "
                          "only the demo world"}
        if previous["build"] == record["build"]:  # the same build on other kinds of CPU stays valid
            record["other_builds"] = others
        RECORD_PATH.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
