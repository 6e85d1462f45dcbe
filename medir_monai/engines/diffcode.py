"""Engine pieces for training DiffCode's three stages with MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``.

Chen et al., DiffCode, MICCAI 2025 (https://arxiv.org/abs/2507.19874), trained in three runs
(``bundles/diffcode``; docs/design.md, section 4):

* **stage I** (``train_stage1``): :class:`~medir_monai.networks.diffcode.DiffCodeAutoencoder` on HQ images,
  ``L1(recon, HQ) + ||sg[z] - z_q||^2 + 0.25 ||z - sg[z_q]||^2``. The engines see
  :class:`CodebookReconstruction` (``forward(hq, task) -> recon``, the quantiser loss left on ``aux_loss``), the batch
  comes from :func:`prepare_hq_task_batch`, the loss is :class:`CodebookStageLoss`, and :class:`CodebookUsageHandler`
  reports the perplexity and dead codes of every task's codebook;
* **stage II** (``train_stage2``): :class:`~medir_monai.networks.diffcode.LatentDiffusion` with stage I frozen;
  :class:`LatentTargetBatch` turns a batch into ``(LQ, z = E(HQ))`` and :class:`LatentStageLoss` is
  ``L1(z_hat, z)``. Validation decodes the estimate through the task codebook (:class:`DecodedPrior`), so the
  prior is scored in image space against HQ, next to the LQ input;
* **stage III** (``training``): :class:`~medir_monai.networks.diffcode.DiffCode` with the trained stages loaded by
  :class:`StageWeightsLoader`; :func:`prepare_task_batch` passes ``task=`` (the codebook) to the forward and
  :class:`DiffCodeLoss` is the paper's Eq. 7, ``L1(restored, HQ)`` alone.

Inference on whole scans (:mod:`medir_monai.restore`) calls the network with the image only; :class:`ScanTaskHandler`
sets ``model.task`` from each scan's task so that every window of a scan uses the same codebook.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import IterationEvents
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from ..atomic import atomic_write_text
from ..networks.blocks import crop_to_size, pad_to_multiple
from ..networks.official import load_weights_file
from ..tasks import get_task, task_names
from ..wrappers import unwrap

__all__ = [
    "prepare_task_batch",
    "prepare_hq_task_batch",
    "LatentTargetBatch",
    "CodebookReconstruction",
    "DecodedPrior",
    "CodebookStageLoss",
    "LatentStageLoss",
    "DiffCodeLoss",
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


# ---- batches -----------------------------------------------------------------------------------------------
def _task_tensor(batchdata: Mapping, device: Any, non_blocking: bool) -> torch.Tensor:
    if "task" not in batchdata:
        raise KeyError("DiffCode batches need a 'task' entry (registry index per sample); see medir_monai.data")
    return torch.as_tensor(batchdata["task"]).long().reshape(-1).to(device=device, non_blocking=non_blocking)


def prepare_task_batch(
    batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
):
    """``prepare_batch`` for stage III (and stage-II validation): ``(LQ, HQ, (), {"task": [B] int64})``.

    MONAI engines call ``network(LQ, task=task)`` with it, so the codebook
    uses each sample's true task.
    """
    lq = batchdata["lq"].to(device=device, non_blocking=non_blocking, **kwargs)
    hq = batchdata["hq"].to(device=device, non_blocking=non_blocking, **kwargs) if "hq" in batchdata else None
    return lq, hq, (), {"task": _task_tensor(batchdata, device, non_blocking)}


def prepare_hq_task_batch(
    batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
):
    """``prepare_batch`` for stage I: the HQ image is input and target, ``(HQ, HQ, (), {"task": [B] int64})``."""
    hq = batchdata["hq"].to(device=device, non_blocking=non_blocking, **kwargs)
    return hq, hq, (), {"task": _task_tensor(batchdata, device, non_blocking)}


class LatentTargetBatch:
    """``prepare_batch`` for stage II: ``(LQ, z, (), {"z_hq": z})`` with ``z = E(HQ)`` from the frozen stage-I encoder.

    The engine then calls ``diffusion(LQ, z_hq=z)`` (:meth:`LatentDiffusion.forward`: the reverse chain from
    ``q(z_{T-1} | z)``) and the loss compares its ``z_hat`` with the target ``z``. LQ and HQ are padded (reflect) to a
    multiple of the latent down-sampling factor.

    Args:
        autoencoder: the trained stage-I :class:`~medir_monai.networks.diffcode.DiffCodeAutoencoder` (kept in eval
            mode, no gradient).
    """

    def __init__(self, autoencoder: nn.Module):
        self.autoencoder = autoencoder

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        ae = unwrap(self.autoencoder)
        factor = int(ae.downsample_factor)
        lq = batchdata["lq"].to(device=device, non_blocking=non_blocking, **kwargs)
        hq = batchdata["hq"].to(device=device, non_blocking=non_blocking, **kwargs)
        lq, _ = pad_to_multiple(lq, factor)
        hq, _ = pad_to_multiple(hq, factor)
        ae.eval()
        with torch.no_grad():
            z = ae.encode(hq)  # [B, C, H/f, W/f]
        return lq, z, (), {"z_hq": z}


# ---- networks as the engines see them ---------------------------------------------------------------------
class CodebookReconstruction(nn.Module):
    """Stage-I view of a :class:`~medir_monai.networks.diffcode.DiffCodeAutoencoder`: ``forward(hq, task) -> recon``.

    The quantiser loss of the last forward is kept on :attr:`aux_loss` (with gradient) and its two terms on
    :attr:`last_terms`, which is how :class:`CodebookStageLoss` reads them; the image output is what MONAI's
    inferers, metrics and image handlers expect.
    """

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, hq: torch.Tensor, task: torch.Tensor | int | Sequence[int]) -> torch.Tensor:
        recon, vq_loss, _ = self.autoencoder(hq, task)
        self.aux_loss = vq_loss
        self.last_terms = dict(getattr(self.autoencoder.quantizer, "last_terms", {}))
        return recon


class DecodedPrior(nn.Module):
    """The codebook prior of an LQ image as an image: stage II's estimate, re-quantised with the task's codebook
    and decoded by stage I (what stage III receives next to the LQ input).

    ``forward(lq, task) -> prior`` ``[B, 1, H, W]`` (any size: padded to the latent grid and cropped back). Used to
    validate stage II in image space. Both stages stay in eval mode here.

    Args:
        autoencoder: stage-I :class:`~medir_monai.networks.diffcode.DiffCodeAutoencoder`.
        diffusion: stage-II :class:`~medir_monai.networks.diffcode.LatentDiffusion`.
        sample_seed: seed of the reverse chain's starting noise (deterministic validation); ``None``: global RNG.
    """

    def __init__(self, autoencoder: nn.Module, diffusion: nn.Module, sample_seed: int | None = 0):
        super().__init__()
        self.autoencoder = autoencoder
        self.diffusion = diffusion
        self.sample_seed = sample_seed

    def forward(self, lq: torch.Tensor, task: torch.Tensor | int | Sequence[int]) -> torch.Tensor:
        padded, size = pad_to_multiple(lq, int(self.autoencoder.downsample_factor))
        generator = None
        if self.sample_seed is not None:
            generator = torch.Generator(device=lq.device).manual_seed(int(self.sample_seed))
        z_hat = self.diffusion.sample(padded, generator=generator)
        z_q, _, _ = self.autoencoder.quantize(z_hat, task)
        return crop_to_size(self.autoencoder.decode(z_q), size)


# ---- losses ------------------------------------------------------------------------------------------------
class _TermLogger(nn.Module):
    """Writes ``last_terms`` into the trainer output after the loss (for ``StatsHandler`` / TensorBoard / tqdm)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_terms: dict[str, float] = {}

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._log_terms)

    def _log_terms(self, engine: Any) -> None:
        engine.state.output.update(self.last_terms)


class CodebookStageLoss(_TermLogger):
    """Stage-I objective ``l1_weight * L1(recon, HQ) + vq_weight * vq``, computed by
    :class:`~medir_monai.losses.DiffCodeCodebookLoss`.

    ``vq = ||sg[z] - z_q||^2 + beta ||z - sg[z_q]||^2`` is read from ``network.aux_loss`` (a
    :class:`CodebookReconstruction`, possibly inside DDP). Logged terms: ``l1``, ``vq``, ``codebook``, ``commitment``.
    Attach it to the trainer (``AttachHandler``) to log them.

    Args:
        network: the stage-I network the trainer runs.
        l1_weight, vq_weight: weights of the two terms (1 and 1 in the paper).
    """

    def __init__(self, network: nn.Module, l1_weight: float = 1.0, vq_weight: float = 1.0):
        super().__init__()
        from ..losses import DiffCodeCodebookLoss

        self._network = [network]  # a list: not registered as a sub-module
        self.objective = DiffCodeCodebookLoss(l1_weight=l1_weight, vq_weight=vq_weight)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        net = unwrap(self._network[0])
        vq = getattr(net, "aux_loss", None)
        if not isinstance(vq, torch.Tensor):
            raise RuntimeError("CodebookStageLoss: the network must leave its quantiser loss on .aux_loss "
                               "(wrap the autoencoder in CodebookReconstruction)")
        loss = self.objective(pred, target, vq)
        terms = {k: float(v) for k, v in self.objective.last_terms.items()}
        terms.update({k: float(v) for k, v in getattr(net, "last_terms", {}).items()})
        self.last_terms = terms
        return loss


class LatentStageLoss(_TermLogger):
    """Stage-II objective ``L1(z_hat, z)`` on the latent (``pred`` is :meth:`LatentDiffusion.forward`'s dict or the
    estimate itself, ``target`` the stage-I latent of the HQ image). Logged term: ``latent_l1``."""

    def forward(self, pred: Mapping[str, torch.Tensor] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z_hat = pred["z_hat"] if isinstance(pred, Mapping) else pred
        if z_hat.shape != target.shape:
            raise ValueError(f"LatentStageLoss: z_hat {tuple(z_hat.shape)} and target {tuple(target.shape)} differ")
        loss = F.l1_loss(z_hat, target)
        self.last_terms = {"latent_l1": float(loss.detach())}
        return loss


class DiffCodeLoss(_TermLogger):
    """Stage-III objective (the paper's Eq. 7): ``L1(restored, HQ)``, nothing else: the task classifier that
    gates the routing learns through the gating vector from this loss alone. Logged terms: ``l1`` and ``gate_max``
    (the batch mean of the largest entry of the gating vector ``V``: 1 / num_experts when the classifier has not
    learnt to choose, towards 1 when it routes decisively).
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self._network = [network]

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        l1 = torch.mean(torch.abs(pred - target))
        terms = {"l1": float(l1.detach())}
        gate = getattr(unwrap(self._network[0]), "last_gate", None)
        if isinstance(gate, torch.Tensor) and gate.ndim == 2:
            terms["gate_max"] = float(gate.max(dim=1).values.mean())
        self.last_terms = terms
        return l1


# ---- handlers ----------------------------------------------------------------------------------------------
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
