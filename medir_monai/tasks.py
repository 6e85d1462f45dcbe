"""The task registry: the single source of truth for everything task-specific (docs/design.md, section 2).

Every other module (data loading, normalisation, metrics, display, inference) looks tasks up here.
Adding a task (e.g. MRI 8x or 10 % dose CT) is one :func:`register_task` call plus its degradation
transform in ``medir_monai.transforms``.

Example::

    >>> from medir_monai.tasks import get_task
    >>> get_task("ct_denoise").norm_range
    (-1024.0, 3071.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_ZOOM_TASKS",
    "PAPER_PATCH_SIZE",
    "Task",
    "TASKS",
    "UnknownTaskError",
    "get_task",
    "register_task",
    "task_names",
    "task_from_folder",
    "task_from_modality",
]

PAPER_PATCH_SIZE = 128
"""Side of the square training crop of all three papers (AMIR, TAT, DiffCode: 128 x 128), the datasets' default
crop and the default sliding window of restoration; the bundle configs set their own (``patch_size``)."""

DEFAULT_ZOOM_TASKS = ("ct_denoise", "pet_synthesis")
"""The tasks a random pixel size (the ``robust`` option ``zoom_range``) applies to when a bundle config does not name
them (``zoom_tasks``). MRI can be named (its pairs are then simulated again on the new grid) but is not by default:
it did not help MR sources unlike the training ones."""


class UnknownTaskError(KeyError):
    """Raised for a task name that is not in the registry; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown task"


@dataclass(frozen=True)
class Task:
    """One restoration task.

    Args:
        name: registry key, e.g. ``"mri_sr"``.
        modality: DICOM modality code of the scans (``"MR"``, ``"CT"``, ``"PT"``).
        folder: folder name in the authors' released layout ``<root>/<MRI|CT|PET>/<split>/<LQ|HQ>/``.
        description: one line for reports.
        unit: physical unit of the intensities (for reports and axis labels).
        norm_range: ``(low, high)`` physical range clipped and min-max mapped to ``[0, 1]`` for the model.
        eval_window: ``(low, high)`` physical window both prediction and label are clipped to before the
            paper-convention metrics (docs/design.md, section 5).
        slice_size: ``(H, W)`` of a 2-D slice in the papers' data (``medir prepare`` reports slices that differ).
        slice_axis: axis of a RAS-oriented ``(X, Y, Z)`` volume the papers cut their 2-D slices along:
            2 (axial) for MRI and CT; 1 (coronal) for PET, whose 192x192x400 volumes give 192 slices of 192x400
            (the shape rules out axial slices; the papers do not say coronal or sagittal, coronal is our choice).
        display_window: ``(low, high)`` physical window for TensorBoard / PNG display.
        display_invert: show with inverted grey (PET convention).
        degradation: name of the default degradation transform in ``medir_monai.transforms``.
        degradation_args: its default keyword arguments (the papers' settings).
        degradation_on_grid: the degradation is defined on the image's own grid (k-space truncation keeps a fraction
            of *its* bandwidth), so a random pixel size resamples the HQ image and simulates the LQ again instead of
            resampling a stored pair.
        air_threshold: physical value under which a pixel counts as air when dropping empty slices
            (``None``: keep every slice).
        central_slices: keep only the central N slices of a volume (``None``: all). MRI uses 100.
        hot_spot: ``(body_threshold, hot_fraction)`` for the lesion-uptake measure of
            :func:`medir_monai.metrics.hot_spot_recovery`: the body is the label above ``body_threshold``
            (physical units) and the hot spot its hottest ``hot_fraction``; ``None``: not measured for the task.
    """

    name: str
    modality: str
    folder: str
    description: str
    unit: str
    norm_range: tuple[float, float]
    eval_window: tuple[float, float]
    slice_size: tuple[int, int]
    display_window: tuple[float, float]
    display_invert: bool = False
    degradation: str = ""
    degradation_args: dict[str, Any] = field(default_factory=dict)
    degradation_on_grid: bool = False
    air_threshold: float | None = None
    central_slices: int | None = None
    slice_axis: int = 2
    hot_spot: tuple[float, float] | None = None

    @property
    def index(self) -> int:
        """Position of the task in the registry (stable label for samplers and classifiers)."""
        return list(TASKS).index(self.name)

    def normalise(self, x):
        """Clip a physical image to ``norm_range`` and map it linearly to ``[0, 1]``."""
        low, high = self.norm_range
        return (x.clip(low, high) - low) / (high - low)

    def denormalise(self, x):
        """Map a model-space ``[0, 1]`` image back to physical units (no clipping)."""
        low, high = self.norm_range
        return x * (high - low) + low


TASKS: dict[str, Task] = {}


def register_task(task: Task, overwrite: bool = False) -> Task:
    """Add ``task`` to the registry. Refuses to replace an existing entry unless ``overwrite``."""
    if task.name in TASKS and not overwrite:
        raise ValueError(f"task {task.name!r} is already registered; pass overwrite=True to replace it")
    if task.slice_axis not in (0, 1, 2):
        raise ValueError(f"task {task.name!r}: slice_axis must be 0, 1 or 2 (an axis of a RAS volume), got {task.slice_axis}")
    if task.norm_range[1] <= task.norm_range[0] or task.eval_window[1] <= task.eval_window[0]:
        raise ValueError(f"task {task.name!r}: ranges must be (low, high) with low < high")
    if task.hot_spot is not None and not 0.0 < task.hot_spot[1] < 1.0:
        raise ValueError(f"task {task.name!r}: hot_spot fraction must lie in (0, 1), got {task.hot_spot[1]}")
    TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    """Names of the registered tasks, in registry order."""
    return list(TASKS)


def get_task(name: str | Task) -> Task:
    """Look a task up by name (a :class:`Task` passes through). Unknown names raise :class:`UnknownTaskError`."""
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def task_from_folder(folder: str) -> Task:
    """Task for a folder name of the authors' layout (``MRI``, ``CT``, ``PET``), case-insensitive."""
    for task in TASKS.values():
        if task.folder.lower() == folder.lower():
            return task
    known = ", ".join(t.folder for t in TASKS.values())
    raise UnknownTaskError(f"unknown task folder {folder!r}; known folders: {known}")


def task_from_modality(modality: str) -> Task:
    """Task for a DICOM Modality tag value (``MR``, ``CT``, ``PT``); the first registered task of that modality."""
    for task in TASKS.values():
        if task.modality.upper() == modality.upper():
            return task
    known = ", ".join(sorted({t.modality for t in TASKS.values()}))
    raise UnknownTaskError(f"no task for DICOM modality {modality!r}; known modalities: {known}")


# ---- the papers' three tasks (AMIR / TAT / DiffCode, MICCAI 2024-2025) --------------------------------
register_task(
    Task(
        name="mri_sr",
        modality="MR",
        folder="MRI",
        description="MRI 4x super-resolution (k-space truncation, IXI T2)",
        unit="a.u.",
        norm_range=(0.0, 4095.0),
        eval_window=(0.0, 4095.0),
        slice_size=(256, 256),
        display_window=(0.0, 4095.0),
        degradation="KSpaceTruncate",
        degradation_args={"keep_fraction": 0.25},
        degradation_on_grid=True,
        air_threshold=None,
        central_slices=100,
    )
)
register_task(
    Task(
        name="ct_denoise",
        modality="CT",
        folder="CT",
        description="Low-dose CT denoising (quarter dose, AAPM-Mayo 2016)",
        unit="HU",
        norm_range=(-1024.0, 3071.0),
        eval_window=(-160.0, 240.0),
        slice_size=(512, 512),
        display_window=(-160.0, 240.0),
        degradation="LowDoseCT",
        # dose_fraction is against the calibrated full dose i0, the added noise that of a quarter-dose scan, and
        # (match_input_noise) at least 3x the input's own estimated noise variance when the input is noisier than
        # the calibration: the quarter dose of the calibrated dose or of the scan's own, whichever is lower
        degradation_args={"dose_fraction": 0.25, "mode": "insert_noise", "match_input_noise": True},
        air_threshold=-900.0,
    )
)
register_task(
    Task(
        name="pet_synthesis",
        modality="PT",
        folder="PET",
        description="Low-dose PET synthesis (1/12 dose, FDG)",
        unit="SUV",
        norm_range=(0.0, 20.0),
        eval_window=(0.0, 20.0),
        slice_size=(192, 400),
        display_window=(0.0, 5.0),
        display_invert=True,
        degradation="LowDosePET",
        # a real full-dose PET without its pair keeps its own resolution and mean: LQ = HQ + simulated extra noise
        # and counts in proportion to the slice's activity (a cold slice is noisier than a hot one)
        degradation_args={"dose_fraction": 1.0 / 12.0, "mode": "insert_noise", "count_scaling": "activity"},
        air_threshold=0.05,
        slice_axis=1,
        # lesion uptake: the hottest 1 % of the body (HQ above 0.25 SUV), where a smoothing model loses SUV first
        hot_spot=(0.25, 0.01),
    )
)
