"""TensorBoard summaries of an evaluation run: images per task and AMIR's routing (papers' Fig. 4).

* :class:`TaskImageHandler`: for the first slice of each task in a validation run, one image strip
  ``LQ | restored | HQ`` in the task's display window (PET in inverted grey), tagged ``images/<task>``.
* :class:`RoutingHandler`: for AMIR, the top-1 expert chosen by each SRM, counted per task and shown as a
  histogram (``routing/<srm>/<task>``) and a task x expert frequency image (``routing/<srm>``); and the
  instruction vectors of the validation slices as a projector embedding labelled by task
  (``instruction``), ready for t-SNE in TensorBoard.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys as Keys
from torch.utils.tensorboard import SummaryWriter

from ..tasks import get_task
from ..wrappers import unwrap

__all__ = ["display_image", "TaskImageHandler", "RoutingHandler"]


def display_image(x: torch.Tensor, task: str) -> torch.Tensor:
    """Model-space (1,H,W) slice -> (1,H,W) in [0,1] for display: task display window, PET inverted."""
    task_ = get_task(task)
    phys = task_.denormalise(x.detach().float().cpu())
    low, high = task_.display_window
    img = ((phys - low) / (high - low)).clamp(0, 1)
    return 1.0 - img if task_.display_invert else img


class _WriterMixin:
    def _writer(self) -> SummaryWriter:
        if self.summary_writer is None:
            self.summary_writer = SummaryWriter(log_dir=self.log_dir)
        return self.summary_writer

    def _step(self, engine: Engine) -> int:
        return int(self.global_step_transform(engine)) if self.global_step_transform else engine.state.epoch


class TaskImageHandler(_WriterMixin):
    """Write ``LQ | restored | HQ`` per task to TensorBoard once per evaluation run.

    Args:
        log_dir: TensorBoard folder (ignored when ``summary_writer`` is given).
        summary_writer: an existing writer to share with the stats handlers.
        global_step_transform: maps the evaluator to the step to log at (use the trainer's iteration).
    """

    def __init__(self, log_dir: str = "./runs", summary_writer: SummaryWriter | None = None, global_step_transform=None):
        self.log_dir = log_dir
        self.summary_writer = summary_writer
        self.global_step_transform = global_step_transform
        self._done: set[str] = set()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._done.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out, batch = engine.state.output, engine.state.batch
        names = batch.get("task_name", [])
        names = [names] if isinstance(names, str) else list(names)
        for i, task in enumerate(names):
            if task in self._done:
                continue
            self._done.add(task)
            strip = torch.cat(
                [display_image(out[key][i], task) for key in (Keys.IMAGE, Keys.PRED, Keys.LABEL)], dim=-1
            )
            self._writer().add_image(f"images/{task}", strip, self._step(engine), dataformats="CHW")
        self._writer().flush()


def routing_figure(share: torch.Tensor, tasks: list[str], title: str):
    """A labelled tasks x experts figure of routing shares (``share[t, e]``: fraction of task ``t``'s tokens whose
    top-1 expert is ``e``), each cell printed in percent, with a colour bar, like the papers' routing figures."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib.figure import Figure

    share = torch.as_tensor(share).float().cpu()
    num_tasks, num_experts = share.shape
    fig = Figure(figsize=(1.2 + 1.1 * num_experts, 0.9 + 0.6 * num_tasks), dpi=100)
    ax = fig.add_subplot()
    shown = ax.imshow(share.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for t in range(num_tasks):
        for e in range(num_experts):
            value = float(share[t, e])
            ax.text(e, t, f"{100 * value:.0f}%", ha="center", va="center", fontsize=9,
                    color="black" if value > 0.6 else "white")
    ax.set_xticks(range(num_experts), [f"expert {e}" for e in range(num_experts)])
    ax.set_yticks(range(num_tasks), tasks)
    ax.set_xlabel("top-1 expert")
    ax.set_title(f"{title}: share of each task's tokens per expert")
    fig.colorbar(shown, ax=ax, label="share of tokens")
    fig.tight_layout()
    return fig


class RoutingHandler(_WriterMixin):
    """Log AMIR's routing decisions and instruction vectors for one evaluation run.

    A forward hook on the network reads ``network.last_routing`` (per SRM, the top-1 expert of every token, shaped
    (B, H, W) or (B, tokens)) and ``network.last_instruction`` ((B, atom_dim)) after *every* forward call, so with a
    sliding-window inferer each window counts, labelled with the task of the slice being validated (validation
    batches hold one slice, or windows map one-to-one onto the batch). Networks without these attributes are
    skipped.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        log_dir: str = "./runs",
        summary_writer: SummaryWriter | None = None,
        global_step_transform=None,
        num_experts: int = 4,
        max_embeddings: int = 2000,
    ):
        self.network = network
        self.log_dir = log_dir
        self.summary_writer = summary_writer
        self.global_step_transform = global_step_transform
        self.num_experts = num_experts
        self.max_embeddings = max_embeddings
        self._hook = None
        self._names: list[str] = []
        self._reset()

    def _reset(self, engine: Any = None) -> None:
        self.counts: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        self.instructions: list[torch.Tensor] = []
        self.labels: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._stop)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        names = engine.state.batch.get("task_name", []) if isinstance(engine.state.batch, dict) else []
        self._names = [names] if isinstance(names, str) else [str(n) for n in names]
        if self._hook is None:
            self._hook = unwrap(self.network).register_forward_hook(self._record)

    def _stop(self, engine: Engine) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _labels_for(self, count: int) -> list[str] | None:
        if len(self._names) == 1:
            return self._names * count
        if len(self._names) == count:
            return self._names
        return None

    def _record(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        routing = getattr(module, "last_routing", None)
        instruction = getattr(module, "last_instruction", None)
        if routing is not None:
            for srm, top1 in enumerate(routing):
                top1 = torch.as_tensor(top1).detach().cpu()
                labels = self._labels_for(top1.shape[0])
                if labels is None:
                    continue
                top1 = top1.reshape(top1.shape[0], -1)
                for i, task in enumerate(labels):
                    hist = torch.bincount(top1[i].long(), minlength=self.num_experts).float()
                    prev = self.counts[srm].get(task)
                    self.counts[srm][task] = hist if prev is None else prev + hist
        if instruction is not None and len(self.labels) < self.max_embeddings:
            instruction = torch.as_tensor(instruction).detach().float().cpu()
            labels = self._labels_for(instruction.shape[0])
            if labels is not None:
                self.instructions.append(instruction.reshape(instruction.shape[0], -1))
                self.labels.extend(labels)

    def _write(self, engine: Engine) -> None:
        if not self.counts and not self.instructions:
            return
        writer, step = self._writer(), self._step(engine)
        for srm, per_task in self.counts.items():
            tasks = sorted(per_task, key=lambda t: get_task(t).index)
            freq = torch.stack([per_task[t] / per_task[t].sum().clamp_min(1) for t in tasks])  # (tasks, experts)
            writer.add_figure(f"routing/srm{srm + 1}", routing_figure(freq, tasks, f"SRM {srm + 1}"), step)
            for t, row in zip(tasks, freq):
                experts = torch.arange(self.num_experts).repeat_interleave((row * 1000).round().long())
                if experts.numel():
                    writer.add_histogram(f"routing/srm{srm + 1}/{t}", experts, step, bins=self.num_experts)
                for e in range(self.num_experts):
                    writer.add_scalar(f"routing/srm{srm + 1}/{t}/expert{e}", float(row[e]), step)
        if self.instructions:
            writer.add_embedding(torch.cat(self.instructions), metadata=self.labels, global_step=step, tag="instruction")
        writer.flush()
