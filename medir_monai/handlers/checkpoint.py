"""Atomic checkpoints and automatic resume for iteration-based training.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a run killed while saving can leave a
truncated file. These handlers write to a temporary file in the same folder and ``os.replace`` it, and load
with ``torch.load(weights_only=True)``.

* :class:`ResumableCheckpoint` (trainer): at the end of every ``save_interval`` epochs (the bundles' epoch is one
  validation interval, and the checkpoint is written after that validation) and at the end of training, saves the
  full training state (model, optimizer, LR scheduler, trainer iteration, EMA, loss balancer, best metric, torch RNG
  state) as ``checkpoint_iteration=N.pt`` and keeps the newest ``n_saved``; when the trainer starts and a checkpoint
  is present it resumes from the newest one, so rerunning the same command continues an interrupted run, with the
  same batches, crops and MoE gating noise an uninterrupted run would have seen.
* Only one training writes into a checkpoint folder at a time: :class:`ResumableCheckpoint` holds an exclusive
  lock on ``<save_dir>/.training.lock`` (``flock``; released by the operating system when the process ends, also
  when it is killed), and a second training started into the same folder ends at once with one line naming the
  folder and the process holding it, and exit status 2, before it reads or writes anything there.
* :class:`BestModelSaver` (evaluator): writes ``model.pt`` (the weights of the network or its EMA, with the
  training profile when one is given) whenever the evaluator's key metric improves, and ``model_final.pt`` is
  written by the trainer checkpoint at the end.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from ..atomic import NoSpaceError, atomic_save, remove_stale_temporaries
from ..bundle import latest_checkpoint
from ..networks.official import load_weights_file
from ..wrappers import unwrap

__all__ = ["atomic_save", "ResumableCheckpoint", "BestModelSaver", "TorchRNGState", "TrainingLock", "FolderBusyError"]

logger = logging.getLogger(__name__)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _notice(message: str, error: bool = False) -> None:
    """``medir training: [error: ]...`` on stderr on a line of its own (also when a progress bar holds the current
    line), whatever the logging configuration: where a run starts from and why it stops must always be seen."""
    from tqdm import tqdm

    logger.info(message)
    tqdm.write(f"medir training: {'error: ' if error else ''}{message}", file=sys.stderr)
    sys.stderr.flush()


def _error_line(message: str) -> None:
    _notice(message, error=True)


def _state_dicts(objects: dict[str, Any]) -> dict[str, Any]:
    return {name: obj.state_dict() for name, obj in objects.items() if obj is not None}


class TorchRNGState:
    """The global torch RNG state(s) as a checkpointable object (AMIR's noisy gating draws from it)."""

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


LOCK_NAME = ".training.lock"


class FolderBusyError(RuntimeError):
    """Another training holds the checkpoint folder's lock."""


class TrainingLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.training.lock`` holding the owner's process id.

    The operating system releases it when the process ends in any way, so a killed run never leaves a stale lock.
    Platforms without ``fcntl`` (Windows) are not locked.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._handle = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`FolderBusyError` naming the folder and the holder's process id."""
        if self._handle is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise FolderBusyError(
                f"{self.path.parent}: another training (process {holder}) is writing its checkpoints here; wait for it "
                "to end or give this run another bundle_root / ckpt_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None


class ResumableCheckpoint:
    """Save the full training state every ``save_interval`` iterations; resume from the newest on start.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects with ``state_dict`` / ``load_state_dict`` (``None`` entries are skipped); the engine the
            handler is attached to is added as ``"trainer"`` so the iteration count is restored.
        save_interval: epochs between saves (an epoch of the bundles is one validation interval).
        n_saved: how many full checkpoints to keep.
        resume: resume from the newest checkpoint in ``save_dir`` when the trainer starts.
        final_model: also write the network's weights alone to this file name at the end (``None``: don't).
        final_network: the module whose weights go to ``final_model`` (default: ``save_dict["model"]``; TAT: the
            EMA model).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict[str, Any],
        save_interval: int = 1,
        n_saved: int = 1,
        resume: bool = True,
        final_model: str | None = "model_final.pt",
        final_network: torch.nn.Module | None = None,
    ):
        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}")
        self.save_dir = Path(save_dir)
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}
        self.save_dict.setdefault("rng", TorchRNGState())
        self.save_interval = int(save_interval)
        self.n_saved = int(n_saved)
        self.resume = resume
        self.final_model = final_model
        self.final_network = final_network
        self.lock = TrainingLock(self.save_dir)

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        # before the bundles' StatsHandler, so a full disk ends the run with one line and status 2
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exit_on_no_space)
        engine.add_event_handler(Events.STARTED, self.lock_folder)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load_latest)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save_final)

    def lock_folder(self, engine: Engine) -> None:
        """Rank 0 takes the checkpoint folder's lock; a folder another training holds ends this run (status 2)."""
        if _rank() != 0:
            return
        try:
            self.lock.acquire()
        except FolderBusyError as busy:
            _error_line(str(busy))
            raise SystemExit(2) from None

    def load_latest(self, engine: Engine) -> None:
        if _rank() == 0:  # a run killed while writing leaves a hidden temporary file; it is never read
            for stale in remove_stale_temporaries(self.save_dir):
                _notice(f"removed {stale}, left by an interrupted write (never read)")
        path = latest_checkpoint(self.save_dir)
        if path is None:
            _notice(f"no checkpoint in {self.save_dir}: training from scratch")
            return
        checkpoint = load_weights_file(path)
        missing = [k for k in self.save_dict if k not in checkpoint]
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks {missing}; move it away to start from scratch")
        configured_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.save_dict, checkpoint=checkpoint)
        if configured_max_epochs is not None:
            if engine.state.epoch > configured_max_epochs:
                raise RuntimeError(
                    f"checkpoint {path} is at epoch {engine.state.epoch}, beyond the configured {configured_max_epochs}"
                )
            engine.state.max_epochs = configured_max_epochs  # the config may extend (not shorten) the run
        _notice(f"resumed from {path} at iteration {engine.state.iteration}")
        if configured_max_epochs is not None and engine.state.epoch >= configured_max_epochs:
            _notice(
                f"training already finished at iteration {engine.state.iteration}: nothing left to train (raise "
                f"max_iterations to train longer, or move {self.save_dir} away to train again from scratch)"
            )

    def exit_on_no_space(self, engine: Engine, error: BaseException) -> None:
        """A full disk (here or in the evaluator's best-model saver): print one line naming the file, say which
        checkpoint is intact, and exit with status 2; any other exception propagates unchanged. Either way the
        folder's lock is released (a notebook can rerun at once)."""
        self.lock.release()
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, NoSpaceError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise error
        latest = latest_checkpoint(self.save_dir)
        kept = f"the last complete checkpoint {latest} is intact" if latest else "no checkpoint was written yet"
        _error_line(f"{cause}; {kept}: free some space and rerun the same command to resume")
        raise SystemExit(2) from None

    def save(self, engine: Engine) -> None:
        if _rank() != 0:  # DDP: every rank resumes, rank 0 writes
            return
        iteration = engine.state.iteration
        atomic_save(_state_dicts(self.save_dict), self.save_dir / f"checkpoint_iteration={iteration}.pt")
        self._prune(keep=iteration)

    def save_final(self, engine: Engine) -> None:
        if _rank() != 0:
            return
        if latest_checkpoint(self.save_dir) != str(self.save_dir / f"checkpoint_iteration={engine.state.iteration}.pt"):
            self.save(engine)
        if self.final_model:
            network = self.final_network if self.final_network is not None else self.save_dict["model"]
            atomic_save(unwrap(network).state_dict(), self.save_dir / self.final_model)
        self.lock.release()

    def _prune(self, keep: int) -> None:
        found = sorted(
            (int(p.name.split("=")[1].split(".")[0]), p) for p in self.save_dir.glob("checkpoint_iteration=*.pt")
        )
        for it, path in found[: max(0, len(found) - self.n_saved)]:
            if it != keep:
                path.unlink(missing_ok=True)


class BestModelSaver:
    """Write the weights of ``network`` to ``save_dir/filename`` when the evaluator's key metric improves.

    Args:
        save_dir: output folder.
        network: module whose ``state_dict`` is saved (TAT: the EMA model).
        filename: file name (the bundle's ``model.pt``).
        higher_is_better: direction of the key metric.
        profile: the training profile (:func:`medir_monai.data.profile.profile_items`) stored with the weights as
            ``{"model": state_dict, "training_profile": profile}`` (``None``: a plain state dict). MONAI's
            ``CheckpointLoader`` (``load_dict={"model": ...}``) and ``load_official_state_dict`` read both forms.
        floors: ``{metric name: lowest acceptable value}`` of other evaluator metrics, e.g.
            ``{"val_hot_recovery_pet_synthesis": 0.85}``. A validation round below a floor (or whose metric is NaN)
            becomes the best only while no round has met every floor: a round that meets them always ranks above
            one that does not, whatever its key metric. ``None`` / empty: the key metric alone (the papers' rule).
    """

    def __init__(self, save_dir: str, network: torch.nn.Module, filename: str = "model.pt", higher_is_better: bool = True,
                 profile: dict | None = None, floors: dict[str, float] | None = None):
        self.path = Path(save_dir) / filename
        self.network = network
        self.sign = 1.0 if higher_is_better else -1.0
        self.best: float | None = None
        self.best_meets_floors = True
        self.profile = profile
        self.floors = {str(k): float(v) for k, v in (floors or {}).items()}

    def state_dict(self) -> dict[str, Any]:
        """The best value so far (kept in the training checkpoint so a resumed run does not regress)."""
        return {"best": float("nan") if self.best is None else self.best, "best_meets_floors": self.best_meets_floors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = float(state.get("best", float("nan")))
        self.best = None if best != best else best
        self.best_meets_floors = bool(state.get("best_meets_floors", True))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _floors_missed(self, metrics: dict[str, Any]) -> list[str]:
        missed = []
        for name, floor in self.floors.items():
            if name not in metrics:
                raise RuntimeError(f"BestModelSaver floor on {name!r}, which the evaluator does not compute; it "
                                   f"computes {sorted(metrics)}")
            value = float(metrics[name])
            if not value >= floor:  # NaN misses too
                missed.append(f"{name} {value:.4f} below the floor {floor:g}")
        return missed

    def __call__(self, engine: Engine) -> None:
        name = getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise RuntimeError("BestModelSaver needs an evaluator with a key metric")
        value = float(engine.state.metrics[name])
        if value != value:  # NaN
            return
        missed = self._floors_missed(engine.state.metrics)
        if missed:
            logger.info(f"{name} {value:.4f}, but {'; '.join(missed)}: this round counts only while none meets the floors")
        rank, best_rank = (not missed, self.sign * value), (self.best_meets_floors, self.sign * (self.best or 0.0))
        if self.best is None or rank > best_rank:
            self.best, self.best_meets_floors = value, not missed
            weights = unwrap(self.network).state_dict()
            atomic_save({"model": weights, "training_profile": self.profile} if self.profile else weights, self.path)
            floors_note = (" (meets the floors)" if not missed else " (below a floor)") if self.floors else ""
            logger.info(f"{name} {value:.4f} is the best round so far{floors_note}: saved {self.path}")
