"""Small trainer handlers: deterministic per-epoch seeding, learning-rate logging, a tqdm progress bar."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import ignite.handlers
from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter

__all__ = ["AttachHandler", "EpochSeedHandler", "LearningRateLogger", "ProgressBar", "loss_terms", "rank_zero_only"]


def loss_terms(keys: Sequence[str] = ("loss", "l1", "balance", "sigma")) -> Callable[[Any], dict[str, float]]:
    """``output_transform`` giving ``{name: value}`` for the loss terms present in the trainer output."""

    def transform(output: Any) -> dict[str, float]:
        if isinstance(output, list):  # decollated output: every item carries the batch loss
            output = output[0]
        return {k: float(output[k].detach()) if hasattr(output[k], "detach") else float(output[k]) for k in keys if k in output}

    return transform


class EpochSeedHandler:
    """Re-seed the batch sampler and the dataset's random crops at every epoch start.

    An "epoch" of the iteration-based bundles is one validation interval. Seeding from ``(seed, epoch)`` makes
    the data a function of the epoch number alone, so a run resumed from a checkpoint taken at an epoch boundary
    sees exactly the batches and crops an uninterrupted run would (with ``num_workers=0``; worker processes get
    their own seeds from MONAI's DataLoader).
    """

    def __init__(self, sampler: Any = None, dataset: Any = None, seed: int = 0):
        self.sampler, self.dataset, self.seed = sampler, dataset, int(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch - 1
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        target = getattr(self.dataset, "transform", self.dataset)
        if target is not None and hasattr(target, "set_random_state"):
            target.set_random_state(seed=(self.seed * 1_000_003 + epoch) % (2**32))


class LearningRateLogger:
    """Write the learning rate of every parameter group to TensorBoard (``lr`` / ``lr/group<i>``)."""

    def __init__(self, optimizer: Any, log_dir: str = "./runs", summary_writer: SummaryWriter | None = None, interval: int = 1):
        self.optimizer = optimizer
        self.log_dir = log_dir
        self.writer = summary_writer
        self.interval = max(1, int(interval))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        if self.writer is None:
            self.writer = SummaryWriter(log_dir=self.log_dir)
        for i, group in enumerate(self.optimizer.param_groups):
            self.writer.add_scalar("lr" if i == 0 else f"lr/group{i}", group["lr"], engine.state.iteration)


class ProgressBar(ignite.handlers.ProgressBar):
    """ignite's tqdm progress bar showing the loss terms, attachable from a MONAI handler list."""

    def __init__(self, keys: Sequence[str] = ("loss", "l1", "balance", "sigma"), **kwargs: Any):
        kwargs.setdefault("persist", True)
        super().__init__(**kwargs)
        self.keys = tuple(keys)

    def attach(self, engine: Engine, metric_names: Any = None, output_transform: Any = None, **kwargs: Any) -> None:
        super().attach(engine, metric_names=metric_names, output_transform=output_transform or loss_terms(self.keys), **kwargs)


def rank_zero_only(handlers: Sequence[Any], keep: Sequence[str] = ()) -> list[Any]:
    """On rank 0 (or without torch.distributed) all ``handlers``; on other ranks only those whose class name is in
    ``keep`` (the ones that change training itself: seeding, loss, LR schedule, resume)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:
        return list(handlers)
    return [h for h in handlers if type(h).__name__ in set(keep)]


class AttachHandler:
    """Attach an object defined elsewhere in a bundle config (e.g. the loss, the best-model saver) to an engine.

    Handler lists of MONAI bundles hold component definitions; this wrapper lets an ``@id`` reference take part.
    """

    def __init__(self, handler: Any):
        if not hasattr(handler, "attach"):
            raise TypeError(f"{type(handler).__name__} has no attach(engine) method")
        self.handler = handler

    def attach(self, engine: Engine) -> None:
        self.handler.attach(engine)
