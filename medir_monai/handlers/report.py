"""Evaluation outputs: ``metrics.csv`` (one row per slice) and ``report.md`` (the papers' Table 2 layout)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ignite.engine import Engine, Events

from ..data.demo import source_of
from ..data.io import DataError
from ..atomic import atomic_write_text
from ..tasks import get_task
from .metrics import TaskMetricCollector

__all__ = ["EvalReportHandler", "ValidationSummaryHandler", "write_metrics_csv", "format_report", "atomic_write_text"]

CSV_FIELDS = ("task", "file", "source", "psnr", "ssim", "rmse", "monai_psnr", "monai_ssim", "hot_recovery")


def csv_rows(rows: list[dict]) -> list[dict]:
    """Each slice gives two rows: ``source=restored`` and ``source=lq`` (the degraded input's baseline)."""
    out = []
    for row in rows:
        out.append({"source": "restored", **{k: row.get(k, "") for k in CSV_FIELDS if k != "source"}})
        if "lq_psnr" in row:
            out.append(
                {"task": row["task"], "file": row["file"], "source": "lq", "psnr": row["lq_psnr"],
                 "ssim": row["lq_ssim"], "rmse": row["lq_rmse"], "monai_psnr": "", "monai_ssim": "",
                 "hot_recovery": row.get("lq_hot_recovery", "")}
            )
    return out


def write_metrics_csv(rows: list[dict], path: str | os.PathLike) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in csv_rows(rows):
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


def format_report(means: dict[str, dict[str, float]], model_name: str = "model", counts: dict[str, int] | None = None,
                  infinite: dict[str, dict[str, int]] | None = None) -> str:
    """Markdown table: rows LQ input and the model; per task PSNR / SSIM / RMSE, then the average over tasks.

    ``infinite`` (:meth:`~medir_monai.handlers.TaskMetricCollector.infinite_counts`): slices whose metric is infinite
    (identical to the label), left out of the means and reported in a line under the slice counts."""
    tasks = sorted(means, key=lambda t: get_task(t).index)
    header = "| method | " + " | ".join(f"{t} PSNR | {t} SSIM | {t} RMSE ({get_task(t).unit})" for t in tasks)
    header += " | Average PSNR | Average SSIM |"
    sep = "|" + "---|" * (1 + 3 * len(tasks) + 2)
    lines = [f"# Evaluation of {model_name}", "",
             "Paper convention (docs/design.md, section 5): per slice, de-normalised, clipped to the task's eval window, "
             "data range = max - min of the label slice; SSIM 11x11 Gaussian, zero padding. Mean over slices.", ""]
    if counts:
        lines.append("Slices: " + ", ".join(f"{t} {counts.get(t, 0)}" for t in tasks))
        lines.append("")
    if infinite:
        notes = [f"{t} {metric} {n}" for t in sorted(infinite, key=lambda t: get_task(t).index)
                 for metric, n in sorted(infinite[t].items())]
        lines.append("Identical to the label, infinite and left out of the means (task, metric, slices): "
                     + ", ".join(notes))
        lines.append("")
    lines += [header, sep]
    for label, prefix in (("LQ input", "lq_"), (model_name, "")):
        cells, psnrs, ssims = [], [], []
        for t in tasks:
            m = means[t]
            p, s, r = m.get(f"{prefix}psnr", float("nan")), m.get(f"{prefix}ssim", float("nan")), m.get(f"{prefix}rmse", float("nan"))
            cells += [f"{p:.2f}", f"{s:.4f}", f"{r:.4g}"]
            psnrs.append(p)
            ssims.append(s)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {sum(psnrs) / len(psnrs):.2f} | {sum(ssims) / len(ssims):.4f} |")
    lines += ["", "MONAI metrics (fixed eval-window range, valid-region SSIM):", "",
              "| task | MONAI PSNR | MONAI SSIM |", "|---|---|---|"]
    for t in tasks:
        lines.append(f"| {t} | {means[t].get('monai_psnr', float('nan')):.2f} | {means[t].get('monai_ssim', float('nan')):.4f} |")
    hot_tasks = [t for t in tasks if "hot_recovery" in means[t]]
    if hot_tasks:
        lines += ["", "Hot-spot uptake kept (mean over the label's hottest fraction of the body, divided by the label's; "
                  "1 = lesions kept, a blur lowers it):", "", "| task | LQ input | " + model_name + " |", "|---|---|---|"]
        for t in hot_tasks:
            lines.append(f"| {t} | {means[t].get('lq_hot_recovery', float('nan')):.3f} | {means[t]['hot_recovery']:.3f} |")
    return "\n".join(lines) + "\n"


class EvalReportHandler:
    """At the end of an evaluation run write ``metrics.csv`` and ``report.md`` into ``output_dir``."""

    def __init__(self, collector: TaskMetricCollector, output_dir: str, model_name: str = "model"):
        self.collector = collector
        self.output_dir = Path(output_dir)
        self.model_name = model_name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.collector.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.collector.update(e))
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        rows = self.collector.rows
        if not rows:
            raise RuntimeError("evaluation produced no slices: check the dataset folder and split")
        write_metrics_csv(rows, self.output_dir / "metrics.csv")
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["task"]] = counts.get(row["task"], 0) + 1
        report = format_report(self.collector.per_task_means(), self.model_name, counts,
                               self.collector.infinite_counts())
        atomic_write_text(self.output_dir / "report.md", report)
        engine.logger.info("\n" + report)


def demo_sources_of(rows: list[dict]) -> dict[str, list[str]]:
    """The demo set's sources (subject / volume / scanner) of the rows' files, per task; empty when a file is not
    one of the demo's (other data sets carry no source names)."""
    out: dict[str, list[str]] = {}
    for row in rows:
        try:
            source = source_of(row["task"], str(row.get("file", "")))
        except DataError:
            return {}
        names = out.setdefault(row["task"], [])
        if source not in names:
            names.append(source)
    return out


class ValidationSummaryHandler:
    """When training ends, print the last validation as the papers' table (per task, LQ baseline and model).

    Attach it to the trainer; ``collector`` is the validation evaluator's :class:`TaskMetricCollector`. The table is
    also written to ``output_dir/validation_report.md`` when ``output_dir`` is given.
    """

    def __init__(self, collector: TaskMetricCollector, model_name: str = "model", output_dir: str | None = None):
        self.collector = collector
        self.model_name = model_name
        self.output_dir = output_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.collector.rows:
            self._repeat_last_report()
            return
        counts: dict[str, int] = {}
        for row in self.collector.rows:
            counts[row["task"]] = counts.get(row["task"], 0) + 1
        report = format_report(self.collector.per_task_means(), self.model_name, counts,
                               self.collector.infinite_counts())
        report = report.replace("# Evaluation of", f"# Validation at iteration {engine.state.iteration}:", 1)
        sources = demo_sources_of(self.collector.rows)
        if sources:
            listing = "; ".join(f"{task} {', '.join(names)}" for task, names in sources.items())
            report = report.replace("\nSlices: ", f"\nSources (demo set, none of them in training): {listing}\n\nSlices: ", 1)
        if self.output_dir:
            atomic_write_text(Path(self.output_dir) / "validation_report.md", report)
        print("\n" + report, flush=True)

    def _repeat_last_report(self) -> None:
        """No validation ran (the command was rerun after training had finished): show the last table again."""
        if not self.output_dir:
            return
        saved = Path(self.output_dir) / "validation_report.md"
        if saved.is_file():
            print(f"\nNo validation in this run; the last one ({saved}):\n\n{saved.read_text()}", flush=True)
