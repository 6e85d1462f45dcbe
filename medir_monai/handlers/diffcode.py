"""Handlers for training and running DiffCode's three stages (``bundles/diffcode``; docs/design.md, section 4).

* :class:`CodebookUsageHandler`: stage I, per-task codebook perplexity and dead codes, and the stage-I report;
* :class:`StageWeightsLoader` / :func:`require_stage_files`: stages II and III start from the trained earlier
  stages, or fail early with the command that makes the missing file;
* :class:`SampleSeedHandler`: reproducible diffusion noise during validation;
* :class:`ScanTaskHandler`: whole-scan inference, every window of a scan quantised with the scan's task codebook.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from ..atomic import atomic_write_text
from ..networks.official import load_weights_file
from ..tasks import get_task, task_names
from ..wrappers import unwrap

__all__ = [
    "CodebookUsageHandler",
    "StageWeightsLoader",
    "SampleSeedHandler",
    "ScanTaskHandler",
    "require_stage_files",
    "load_stage_weights",
    "MissingStageError",
]

logger = logging.getLogger(__name__)


class MissingStageError(FileNotFoundError):
    """A stage-I / stage-II weight file that a later stage needs is not there."""


def _task_label(index: int) -> str:
    names = task_names()
    return names[index] if 0 <= index < len(names) else f"task{index}"


class CodebookUsageHandler:
    """Per-task codebook usage of stage I: perplexity, used and dead codes, every ``interval`` trainer epochs.

    Reads (and resets) :meth:`DiffCodeAutoencoder.usage`, which counts the codes chosen by training forwards.
    Logs one line per task and writes ``codebook/perplexity/<task>``, ``codebook/used_codes/<task>``,
    ``codebook/dead_codes/<task>`` to TensorBoard at the trainer iteration. At the end of training, with a
    ``collector`` (the stage-I validation's :class:`~medir_monai.handlers.TaskMetricCollector`), it prints the
    stage-I table (reconstruction PSNR / SSIM / RMSE and codebook usage per task) and writes it to
    ``output_dir/stage1_report.md``.

    Args:
        autoencoder: the stage-I autoencoder (or a wrapper / DDP around it).
        tasks: task names to report (default: those seen in training).
        summary_writer: TensorBoard writer (``None``: no TensorBoard).
        interval: trainer epochs between reports.
        collector: validation collector of stage I (optional, for the final table).
        output_dir: folder of ``stage1_report.md`` (optional).
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        tasks: Sequence[str] | None = None,
        summary_writer: SummaryWriter | None = None,
        interval: int = 1,
        collector: Any = None,
        output_dir: str | os.PathLike | None = None,
    ):
        self.autoencoder = autoencoder
        self.tasks = None if tasks is None else [get_task(t).name for t in tasks]
        self.writer = summary_writer
        self.interval = max(1, int(interval))
        self.collector = collector
        self.output_dir = output_dir
        self.last_stats: dict[str, dict[str, float]] = {}

    def _bank(self) -> nn.Module:
        net = unwrap(self.autoencoder)
        net = getattr(net, "autoencoder", net)  # CodebookReconstruction / DecodedPrior wrappers
        if not hasattr(net, "usage"):
            raise TypeError(
                f"CodebookUsageHandler: {type(net).__name__} has no usage() (expected a DiffCodeAutoencoder)"
            )
        return net

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self.summarise)

    def __call__(self, engine: Engine) -> None:
        usage = self._bank().usage(reset=True)
        stats = {_task_label(t): s for t, s in usage.items() if s["tokens"] > 0}
        if self.tasks is not None:
            stats = {t: s for t, s in stats.items() if t in self.tasks}
        step = engine.state.iteration
        for task, s in stats.items():
            engine.logger.info(
                f"codebook {task}: perplexity {s['perplexity']:.1f}, used {int(s['used_codes'])}, "
                f"dead {int(s['dead_codes'])} codes ({int(s['tokens'])} token-levels since the last report)"
            )
            if self.writer is not None:
                for key in ("perplexity", "used_codes", "dead_codes"):
                    self.writer.add_scalar(f"codebook/{key}/{task}", float(s[key]), step)
        if self.writer is not None:
            self.writer.flush()
        if stats:
            self.last_stats = stats

    def report(self) -> str:
        """Markdown table of the last validation's reconstruction metrics and the last usage report, per task."""
        means = self.collector.per_task_means() if self.collector is not None else {}
        tasks = sorted(set(means) | set(self.last_stats), key=lambda t: get_task(t).index)
        lines = [
            "# DiffCode stage I: codebook autoencoder on HQ",
            "",
            "Reconstruction: paper-convention metrics of the last validation (recon vs HQ). Codebook usage: codes "
            "chosen by the training forwards since the previous report (all residual levels pooled).",
            "",
            "| task | recon PSNR | recon SSIM | recon RMSE | perplexity | used codes | dead codes |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in tasks:
            m, s = means.get(t, {}), self.last_stats.get(t, {})
            unit = get_task(t).unit
            lines.append(
                f"| {t} | {m.get('psnr', float('nan')):.2f} | {m.get('ssim', float('nan')):.4f} | "
                f"{m.get('rmse', float('nan')):.4g} {unit} | {s.get('perplexity', float('nan')):.1f} | "
                f"{int(s.get('used_codes', 0))} | {int(s.get('dead_codes', 0))} |"
            )
        return "\n".join(lines) + "\n"

    def summarise(self, engine: Engine) -> None:
        if not self.last_stats and (self.collector is None or not self.collector.rows):
            return
        text = self.report()
        if self.output_dir is not None:
            atomic_write_text(Path(self.output_dir) / "stage1_report.md", text)
        print("\n" + text, flush=True)


def load_stage_weights(module: nn.Module, path: str | os.PathLike, stage: str) -> None:
    """Load a stage's weights file into ``module``, with an error naming the file when it is missing or does not fit."""
    path = Path(path)
    if not path.is_file():
        raise MissingStageError(f"{path}: {stage} weights not found")
    state = load_weights_file(path)
    try:
        unwrap(module).load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"{path}: the {stage} weights do not fit the configured network (trained with other settings, e.g. "
            f"quick.json vs the paper config? retrain that stage or point ckpt_dir elsewhere): {err}"
        ) from None


class StageWeightsLoader:
    """Trainer handler: load the trained earlier stages when training starts (before a resume, so a resumed
    checkpoint wins), and keep them frozen.

    Args:
        stages: ``{name: (module, path)}`` in loading order, e.g. ``{"stage I": (autoencoder, ".../stage1.pt")}``;
            ``name`` is only used in messages.
    """

    def __init__(self, stages: Mapping[str, tuple[nn.Module, str | os.PathLike]]):
        self.stages = dict(stages)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        for name, (module, path) in self.stages.items():
            load_stage_weights(module, path, name)
            module.requires_grad_(False)
            module.eval()
            logger.info(f"loaded {name} weights from {path}")


def require_stage_files(stages: Mapping[str, str | os.PathLike], configs: str | None = None) -> None:
    """Fail early, with the command to run, when stage weight files are missing.

    Args:
        stages: ``{run key that produces the file: path}``, e.g. ``{"train_stage1": ".../models/stage1.pt"}``.
        configs: the ``--config_file`` value to show in the message (default: this process's).
    """
    missing = {key: str(path) for key, path in stages.items() if not Path(path).is_file()}
    if not missing:
        return
    if configs is None:
        from ..bundle import config_files_from_argv

        files = [str(p) for p in config_files_from_argv()]
        configs = repr(files) if len(files) > 1 else (files[0] if files else "<the same config files>")
    lines = [f"  {path}  (made by run key '{key}')" for key, path in missing.items()]
    commands = [f"  python -m monai.bundle run {key} --config_file \"{configs}\"" for key in missing]
    raise MissingStageError(
        "DiffCode needs the weights of its earlier stages, and these files are missing:\n" + "\n".join(lines)
        + "\nTrain them first, with the same config files and overrides (a one-time cost; later runs reuse the "
        "files):\n" + "\n".join(commands)
    )


class SampleSeedHandler:
    """Evaluator handler: fix the diffusion noise seed (``network.sample_seed``) while the evaluator runs, so
    validation metrics are reproducible; the previous value (``None``: fresh noise, the paper's sampling) is put
    back at the end."""

    def __init__(self, network: nn.Module, seed: int | None = 0):
        self.network = network
        self.seed = seed
        self._saved: Any = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._set)
        engine.add_event_handler(Events.COMPLETED, self._restore)

    def _set(self, engine: Engine) -> None:
        net = unwrap(self.network)
        self._saved = getattr(net, "sample_seed", None)
        net.sample_seed = self.seed

    def _restore(self, engine: Engine) -> None:
        unwrap(self.network).sample_seed = self._saved


class ScanTaskHandler:
    """Inference handler: before each scan, set ``network.task`` to the scan's task index so that every sliding
    window of the scan quantises with the same codebook (the task's).

    The scan's task is the one :class:`medir_monai.restore.LoadScand` resolved (config ``task``, or the DICOM
    Modality tag).
    """

    def __init__(self, network: nn.Module):
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        net = unwrap(self.network)
        batch = engine.state.batch
        item = batch[0] if isinstance(batch, (list, tuple)) else batch
        net.task = get_task(item["task"]).index
