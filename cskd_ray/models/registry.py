"""Create models by name, with their preprocessing: CLIP image towers (open_clip) and encoders (timm).

The registry is filled on the first CLIP call in each process (the tiny test CLIP configs in
``clip_configs/`` are added to open_clip's) and never changed at run time, so every Ray worker sees the
same names; importing this module does not import open_clip.

CLIP weights (``pretrained``) may be:

* ``None``, ``""`` or ``"random"``: random initialisation from a fixed ``seed`` (so every actor of a
  job builds the same weights; say so in outputs — these are not real CLIP features);
* an open_clip pretrained tag for the model, e.g. ``ViT-L-14`` + ``openai``;
* a local checkpoint file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``), loaded without executing
  pickled code;
* an ``s3://`` URI of such a file (downloaded once to ``$CSKD_RAY_CACHE``, default ``~/.cache/cskd_ray``).
* ``"proxy"`` (model ``cskd-proxy-rn`` only): the demo's proxy CLIP, a tiny tower pre-trained on the demo
  generator's latent image properties (no aesthetic labels), shipped with its sha256 and verified at load
  (:mod:`cskd_ray.models.proxy_clip`). It is not OpenAI's CLIP.

A model name of the form ``hf-hub:org/repo`` loads config and weights from the Hugging Face hub.
Anything that cannot be fetched fails at once with :class:`WeightsUnavailableError`.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from cskd_ray.io import storage
from cskd_ray.io.transforms import PreprocessSpec

logger = logging.getLogger(__name__)

CLIP_CONFIG_DIR = Path(__file__).with_name("clip_configs")
RANDOM_WEIGHTS = ("", "random", "none")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class UnknownModelError(ValueError):
    """A model name is not in the registry; the message lists close matches."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be found or fetched; the message says what to do instead."""


@functools.cache
def _open_clip() -> ModuleType:
    """open_clip, imported on first use with the tiny test CLIP configs registered.

    Not at module import: open_clip pulls in torchvision and torch._dynamo (about 1 s on 2 cores), which a
    scoring actor loading a timm student never needs.
    """
    import open_clip

    open_clip.add_model_config(CLIP_CONFIG_DIR)
    return open_clip


@dataclass
class LoadedModel:
    """A model together with what is needed to feed it and to identify it.

    Attributes:
        model: The module (in eval mode for CLIP towers).
        preprocess: The preprocessing every stage must use for this model.
        name: The registry name.
        weights: A stable identifier of the weights: ``random:seed=0``, ``open_clip:openai``,
            ``sha256:<digest>`` for files, ``hf-hub:org/repo``.
        dim: Output feature dimension.
    """

    model: nn.Module
    preprocess: PreprocessSpec
    name: str
    weights: str
    dim: int

    @property
    def random_weights(self) -> bool:
        """Whether the weights are a random initialisation (no real pretrained knowledge)."""
        return self.weights.startswith("random:")


def unknown_model(kind: str, name: str, choices: list[str]) -> UnknownModelError:
    """The error for a model name not in ``choices``: it names the kind and the closest valid names.

    Stage configs and sweeps raise it (wrapped in their key's ``ConfigError``) before any model is built.
    """
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; see cskd-ray list-models ({kind})"
    return UnknownModelError(f"unknown {kind} model {name!r}{hint}")


def list_clip_models() -> list[str]:
    """Names accepted by :func:`create_clip` (open_clip's configs plus the tiny test configs)."""
    open_clip = _open_clip()

    return list(open_clip.list_models())


def list_clip_pretrained(name: str) -> list[str]:
    """The open_clip pretrained tags known for a CLIP model name."""
    open_clip = _open_clip()

    return list(open_clip.list_pretrained_tags_by_model(name))


def list_encoders(pattern: str = "") -> list[str]:
    """Names accepted by :func:`create_encoder` (timm's registry), optionally filtered by a glob."""
    import timm

    return list(timm.list_models(pattern or "*"))


def file_digest(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def cache_dir() -> Path:
    """Where downloaded and built weights are kept: ``$CSKD_RAY_CACHE``, default ``~/.cache/cskd_ray``."""
    return Path(os.environ.get("CSKD_RAY_CACHE", Path.home() / ".cache" / "cskd_ray"))


def fetch_checkpoint(uri: str) -> Path:
    """Return a local path for a checkpoint given as a local path or an ``s3://`` URI."""
    if not storage.is_remote(uri):
        path = Path(uri).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"checkpoint file {uri} does not exist")
        return path
    cache = cache_dir() / "weights"
    local = cache / hashlib.sha256(uri.encode()).hexdigest()[:16] / uri.rsplit("/", 1)[-1]
    if not local.is_file():
        try:
            data = storage.read_bytes(uri)
        except storage.StorageError as exc:
            raise WeightsUnavailableError(f"cannot fetch checkpoint {uri}: {exc}") from exc
        storage.write_bytes_once(str(local), data, overwrite=True)
    return local


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors or a torch file, never executing pickled code.

    Nested ``state_dict`` / ``model`` entries and DDP ``module.`` prefixes are unwrapped.
    """
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle and format errors come in many types
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise WeightsUnavailableError(f"cannot load {path} safely (weights_only=True): {reason}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights_into(model: nn.Module, path: str | Path, name: str, required_prefix: str = "") -> None:
    """Load a checkpoint into ``model``; raise when it does not fit (missing keys or wrong shapes).

    Args:
        model: The freshly built model.
        path: A local checkpoint file.
        name: The model's registry name (for messages).
        required_prefix: Only missing keys under this prefix count (``visual.`` for CLIP image towers).
    """
    state = load_state_dict(path)
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsUnavailableError(f"{path} does not fit {name}: {str(exc)[:300]}") from exc
    missing = [k for k in missing if k.startswith(required_prefix)]
    if missing:
        raise WeightsUnavailableError(f"{path} does not fit {name}: missing {missing[:5]} ({len(missing)} keys)")


class ClipImageTower(nn.Module):
    """The frozen image encoder of a CLIP model: ``forward(x)`` returns pooled image embeddings."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a normalised ``(N, 3, S, S)`` batch into ``(N, D)`` CLIP image features."""
        return self.visual(images)


def _build_clip(name: str, pretrained: str | None, seed: int) -> tuple[nn.Module, str]:
    open_clip = _open_clip()

    tag = (pretrained or "").strip()
    if name.startswith("hf-hub:"):
        try:
            model = open_clip.create_model(name, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types
            raise WeightsUnavailableError(
                f"cannot fetch {name} from the Hugging Face hub ({type(exc).__name__}: {exc}); download the "
                "checkpoint elsewhere and pass its local path or s3:// URI as pretrained"
            ) from exc
        return model, name
    if name not in list_clip_models():
        raise unknown_model("CLIP", name, list_clip_models())
    if tag == "proxy":  # the demo's proxy CLIP: built once, sha256-verified (cskd_ray.models.proxy_clip)
        from cskd_ray.models.proxy_clip import proxy_weights_path

        tag = str(proxy_weights_path(name))
    if tag.lower() in RANDOM_WEIGHTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None)
        return model, f"random:seed={seed}"
    if storage.is_remote(tag) or tag.endswith(CHECKPOINT_SUFFIXES) or os.path.sep in tag:
        path = fetch_checkpoint(tag)
        model = open_clip.create_model(name, pretrained=None)
        load_weights_into(model, path, name, required_prefix="visual.")
        return model, f"sha256:{file_digest(path)}"
    tags = list_clip_pretrained(name)
    if tag not in tags:
        raise WeightsUnavailableError(
            f"{name} has no pretrained tag {tag!r}; choose one of {tags or 'none'}, a checkpoint path, "
            "an s3:// URI, or 'random'"
        )
    try:
        model = open_clip.create_model(name, pretrained=tag, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - download errors come in many types
        raise WeightsUnavailableError(
            f"cannot fetch {name}/{tag} weights ({type(exc).__name__}: {str(exc)[:200]}); this machine may be "
            "offline: pass a local checkpoint path or s3:// URI as pretrained, or 'random' for a smoke test"
        ) from exc
    return model, f"open_clip:{tag}"


def create_clip(name: str, pretrained: str | None = None, *, seed: int = 0) -> LoadedModel:
    """Create a frozen CLIP image tower with its preprocessing.

    Args:
        name: An open_clip model name (``ViT-B-32``, ``ViT-L-14``, the tiny ``cskd-tiny-vit``) or
            ``hf-hub:org/repo``.
        pretrained: Weights, see the module docstring. ``None`` means random weights.
        seed: Seed of the random initialisation (ignored for pretrained weights).

    Raises:
        UnknownModelError: ``name`` is not a known model (the message lists close matches).
        WeightsUnavailableError: The weights cannot be found or fetched.
    """
    model, weights = _build_clip(name, pretrained, seed)
    tower = ClipImageTower(model.visual).eval().requires_grad_(False)
    if weights.startswith("random:"):
        logger.warning("CLIP %s uses RANDOM weights (%s): features are not real CLIP features", name, weights)
    return LoadedModel(tower, _clip_preprocess(model.visual), name, weights, _clip_dim(model.visual))


def _clip_preprocess(visual: nn.Module) -> PreprocessSpec:
    cfg = visual.preprocess_cfg
    return PreprocessSpec(
        image_size=int(cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]),
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        resize_mode=str(cfg.get("resize_mode", "shortest")),
    )


def _clip_dim(visual: nn.Module) -> int:
    return int(getattr(visual, "output_dim", 0) or visual.proj.shape[1])


def describe_clip(name: str, pretrained: str | None = None, *, seed: int = 0) -> LoadedModel:
    """What :func:`create_clip` would return, without paying for it where that is safe.

    For random weights and open_clip tags the model is built on the ``meta`` device (no memory, no
    initialisation; milliseconds even for ViT-L/14) after the tagged weights file is fetched into the
    local cache (so a missing file still fails fast). Checkpoint files and ``hf-hub:`` models are fully
    loaded, which also proves that they fit. The returned ``model`` must not be run.

    Raises:
        UnknownModelError: ``name`` is not a known model.
        WeightsUnavailableError: The weights cannot be found or fetched.
    """
    open_clip = _open_clip()

    tag = (pretrained or "").strip()
    random_init = tag.lower() in RANDOM_WEIGHTS
    if name.startswith("hf-hub:") or not (random_init or tag in list_clip_pretrained(name)):
        return create_clip(name, pretrained, seed=seed)  # files, hub models and bad tags take the full path
    if name not in list_clip_models():
        raise unknown_model("CLIP", name, list_clip_models())
    overrides: dict = {}
    if not random_init:
        cfg = open_clip.get_pretrained_cfg(name, tag)
        try:
            open_clip.download_pretrained(cfg)
        except Exception as exc:  # noqa: BLE001 - download errors come in many types
            raise WeightsUnavailableError(
                f"cannot fetch {name}/{tag} weights ({type(exc).__name__}); this machine may be offline: pass a "
                "local checkpoint path or s3:// URI as pretrained, or 'random' for a smoke test"
            ) from exc
        overrides = {"image_mean": cfg.get("mean"), "image_std": cfg.get("std"),
                     "image_interpolation": cfg.get("interpolation"), "image_resize_mode": cfg.get("resize_mode")}
    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta", **{k: v for k, v in overrides.items() if v is not None})
    weights = f"random:seed={seed}" if random_init else f"open_clip:{tag}"
    return LoadedModel(model.visual, _clip_preprocess(model.visual), name, weights, _clip_dim(model.visual))


def create_encoder(name: str, pretrained: bool | str = False, *, image_size: int | None = None,
                   **kwargs: object) -> LoadedModel:
    """Create a timm encoder (no classifier; ``forward`` returns pooled features) with its preprocessing.

    Args:
        name: Any timm model name, e.g. ``mobilenetv3_small_100``, ``vit_base_patch16_224`` or the tiny
            ``test_vit``.
        pretrained: False for random weights, True for timm's default weights, or a checkpoint path /
            ``s3://`` URI.
        image_size: Input side replacing the model's default in the preprocessing (convolutional encoders
            only: they take any size, while a ViT's position embeddings fix its grid).
        **kwargs: Passed on to ``timm.create_model``.
    """
    import timm

    if not timm.is_model(name):
        raise unknown_model("timm encoder", name, list_encoders())
    file_weights = isinstance(pretrained, str) and pretrained.lower() not in RANDOM_WEIGHTS
    try:
        model = timm.create_model(name, pretrained=pretrained is True, num_classes=0, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise WeightsUnavailableError(
            f"cannot fetch timm weights for {name} ({type(exc).__name__}); pass a checkpoint path instead"
        ) from exc
    if file_weights:
        path = fetch_checkpoint(str(pretrained))
        load_weights_into(model, path, name)
        weights = f"sha256:{file_digest(path)}"
    else:
        weights = f"timm:{name}" if pretrained is True else "random:timm-init"
    data_cfg = timm.data.resolve_model_data_config(model)
    if image_size is not None and hasattr(model, "patch_embed"):
        raise UnknownModelError(f"encoder.image_size={image_size}: {name} is a patch-based model built for "
                                f"{data_cfg['input_size'][-1]} px; image_size is for convolutional encoders only")
    spec = PreprocessSpec(
        image_size=int(image_size or data_cfg["input_size"][-1]),
        mean=tuple(float(m) for m in data_cfg["mean"]),
        std=tuple(float(s) for s in data_cfg["std"]),
        interpolation=str(data_cfg.get("interpolation", "bicubic")),
    )
    return LoadedModel(model, spec, name, weights, encoder_dim(model))


def encoder_dim(model: nn.Module) -> int:
    """Width of a timm encoder's pooled output (``num_classes=0``): the head's hidden size when it has one.

    MobileNetV3, for example, pools 576 channels and then projects them to 1024 in its ``conv_head``.
    """
    return int(getattr(model, "head_hidden_size", None) or model.num_features)
