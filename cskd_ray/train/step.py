"""One optimizer step of the shared worker loop, and what makes it the same on 1 or N DDP workers.

DDP averages the workers' gradients, so a loss that is a mean over each worker's own rows weighs a row by
1 / (rows on its worker): with 3 labeled rows on one worker and 1 on the other, the lone row counts three
times as much as in a one-worker run of the same global batch, and a term with no row on a worker halves
that term's gradient. Each task therefore reports every term as its worker's *share* of the global-batch
mean, ``mean_w · n_w · W / n`` (``n_w`` rows of the term on worker w, n on all W workers, one ``all_reduce``
of the counts per step): DDP's average of the shares is the mean over all n rows, as on one worker.

A term with no row on a worker still runs its modules and contributes ``0 ·`` their output, so every
parameter gets a gradient on every rank; DDP (``find_unused_parameters=False``, what ``prepare_model``
uses) requires it.

The random draws of a step (dropout, drop-path) come from a generator seeded with (seed, step, rank), so a
run resumed from a checkpoint at step k draws what the uninterrupted run drew at steps k+1, k+2, ...
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cskd_ray.models.precision import autocast
from cskd_ray.train.config import TrainerConfig


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class RowCounts:
    """How many rows each loss term has on this worker and in the whole global batch (all ranks).

    Built once per forward from ``{term: bool mask over the worker's rows}``; every rank must build it with
    the same terms in the same order (it is one collective).
    """

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        names = list(masks)
        local = torch.stack([masks[n].sum() for n in names]).float() if names else torch.zeros(0)
        total = local.clone()
        self.world = 1
        if _distributed():
            dist.all_reduce(total)
            self.world = dist.get_world_size()
        self.local = dict(zip(names, local, strict=True))
        self.total = dict(zip(names, total, strict=True))

    def share(self, name: str, mean: torch.Tensor) -> torch.Tensor:
        """This worker's share of term ``name``'s global-batch mean, from its mean over its own rows.

        ``mean · n_w · W / n`` (0 when the worker has no row of the term, whatever ``mean`` holds then, as
        long as it is finite); on one worker it is ``mean`` itself.
        """
        if self.world == 1:
            return mean
        return mean * (self.local[name] * self.world / self.total[name].clamp_min(1.0)).to(mean.dtype)


def global_metrics(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """The step's metrics averaged over the ranks (the shares of :class:`RowCounts` average to global means)."""
    values = torch.stack([value.detach().float().mean() for value in outputs.values()])
    if _distributed():
        dist.all_reduce(values)
        values = values / dist.get_world_size()
    return dict(zip(outputs, values.tolist(), strict=True))


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup then cosine decay: f = s/w for s < w, else ½(1 + cos(π (s − w)/(T − w)))."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def make_optimizer(params: list[nn.Parameter], cfg: TrainerConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW and its warmup + cosine LambdaLR schedule over ``total_steps``."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps))
    return optimizer, scheduler


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of step ``step``'s random draws on rank ``rank`` (distinct per step and rank, fixed per run)."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: Any, scheduler: Any, scaler: Any,
               params: list[nn.Parameter], cfg: TrainerConfig, step: int, rank: int) -> dict[str, torch.Tensor]:
    """Forward, backward, clip, optimizer and scheduler step for optimizer step ``step + 1``; the task's outputs.

    ``model`` is the task (DDP-wrapped when there are several workers); ``params`` what the optimizer updates.
    """
    torch.manual_seed(step_seed(cfg.seed, step, rank))
    device_type = batch["pixels"].device.type
    with autocast(device_type, cfg.precision):
        outputs = model(batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(outputs["loss"]).backward()
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return outputs
