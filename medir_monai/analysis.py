"""Analyses behind ``medir compare`` and ``medir interference``.

* :func:`compare_evaluations`: paired t-test per task between two ``eval/metrics.csv`` files over the same slices
  (the TAT paper reports p < 0.05 against each competitor).
* :func:`task_interference`: the task-interference matrix of AMIR Fig. 1b, with the definition of
  Uni-Perceiver-MoE (Zhu et al., NeurIPS 2022) as the AMIR authors computed it: gradients ``g`` of selected
  parameters are recorded for ``N`` mini-batches of each task; for tasks ``i`` (rows) and ``j`` (columns)

  ``delta_{j->i}(m) = 1/(N-1) * sum_{n != m} <g_j^n, g_i^m> / ||g_j^n||`` and
  ``I[i, j] = mean_m delta_{j->i}(m) / delta_{i->i}(m)``,

  so ``I[i, i] = 1``; an entry well below 1 (or negative) means task ``j``'s gradient disagrees with task ``i``'s,
  i.e. interference.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from .tasks import get_task

__all__ = ["read_metrics_csv", "compare_evaluations", "format_comparison", "task_interference", "format_interference"]


def read_metrics_csv(path: str | Path, source: str = "restored") -> dict[tuple[str, str], dict[str, float]]:
    """``{(task, file): {metric: value}}`` of one ``metrics.csv`` (rows of the given ``source``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.csv (run the bundle's evaluate.json first)")
    rows = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("source", "restored") != source:
                continue
            rows[(row["task"], row["file"])] = {k: float(row[k]) for k in ("psnr", "ssim", "rmse") if row.get(k)}
    if not rows:
        raise ValueError(f"{path}: no rows with source={source!r}")
    return rows


def compare_evaluations(a: str | Path, b: str | Path, metrics: Sequence[str] = ("psnr", "ssim", "rmse")) -> dict:
    """Paired t-test (``scipy.stats.ttest_rel``) per task and metric between evaluations ``a`` and ``b``.

    Only slices present in both are paired; returns ``{task: {metric: {"n", "mean_a", "mean_b", "diff", "t", "p"}}}``.
    """
    rows_a, rows_b = read_metrics_csv(a), read_metrics_csv(b)
    common = sorted(set(rows_a) & set(rows_b))
    if not common:
        raise ValueError(f"{a} and {b} share no (task, file) rows: were they evaluated on the same data?")
    by_task: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in common:
        by_task[key[0]].append(key)
    out: dict = {}
    for task in sorted(by_task, key=lambda t: get_task(t).index):
        out[task] = {}
        for metric in metrics:
            va = np.array([rows_a[k][metric] for k in by_task[task]])
            vb = np.array([rows_b[k][metric] for k in by_task[task]])
            if len(va) > 1 and np.any(va != vb):
                t, p = stats.ttest_rel(va, vb)
            else:
                t, p = float("nan"), float("nan")
            out[task][metric] = {"n": len(va), "mean_a": float(va.mean()), "mean_b": float(vb.mean()),
                                 "diff": float((va - vb).mean()), "t": float(t), "p": float(p)}
    return out


def format_comparison(result: dict, name_a: str = "A", name_b: str = "B") -> str:
    lines = [f"| task | metric | n | {name_a} | {name_b} | mean diff | t | p | p < 0.05 |", "|---|---|---|---|---|---|---|---|---|"]
    for task, per_metric in result.items():
        for metric, r in per_metric.items():
            sig = "yes" if r["p"] == r["p"] and r["p"] < 0.05 else "no"
            lines.append(f"| {task} | {metric} | {r['n']} | {r['mean_a']:.4f} | {r['mean_b']:.4f} | {r['diff']:+.4f} | "
                         f"{r['t']:.3f} | {r['p']:.3g} | {sig} |")
    return "\n".join(lines)


def _flat_grad(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def task_interference(
    network: torch.nn.Module,
    batches: dict[str, Sequence[tuple[torch.Tensor, torch.Tensor]]],
    param_pattern: str = r"ffn\.project_out",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    aux_weight: float = 0.0,
) -> tuple[list[str], np.ndarray]:
    """Task-interference matrix (rows: task ``i`` affected, columns: task ``j`` whose gradient is projected).

    Args:
        network: the model, in training mode for the gradient computation (restored afterwards).
        batches: per task name, ``N >= 2`` mini-batches ``(lq, hq)`` (the same N for every task).
        param_pattern: regular expression selecting the parameters whose gradients are compared (AMIR's authors use
            FFN output projections).
        loss_fn: training loss (default L1).
        aux_weight: weight of ``network.aux_loss`` (AMIR's balance loss) added to the loss.
    """
    loss_fn = loss_fn or (lambda p, t: torch.mean(torch.abs(p - t)))
    params = [p for n, p in network.named_parameters() if re.search(param_pattern, n) and p.requires_grad]
    if not params:
        raise ValueError(f"no parameter matches {param_pattern!r}")
    tasks = [get_task(t).name for t in batches]
    counts = {len(b) for b in batches.values()}
    if len(counts) != 1 or min(counts) < 2:
        raise ValueError("every task needs the same number (>= 2) of mini-batches")
    was_training = network.training
    network.train()
    grads: dict[str, torch.Tensor] = {}
    for task in tasks:
        rows = []
        for lq, hq in batches[task]:
            network.zero_grad(set_to_none=True)
            loss = loss_fn(network(lq), hq)
            aux = getattr(network, "aux_loss", None)
            if aux_weight and aux is not None:
                loss = loss + aux_weight * aux
            loss.backward()
            rows.append(_flat_grad(params).detach().double())
        grads[task] = torch.stack(rows)  # (N, P)
    network.zero_grad(set_to_none=True)
    network.train(was_training)

    def delta(j: str, i: str) -> torch.Tensor:
        gj, gi = grads[j], grads[i]
        proj = (gj @ gi.T) / gj.norm(dim=1, keepdim=True).clamp_min(1e-30)  # (N_j, N_i)
        n = proj.shape[0]
        return (proj.sum(0) - torch.diagonal(proj)) / (n - 1)  # over n != m, per m

    matrix = np.zeros((len(tasks), len(tasks)))
    for a, i in enumerate(tasks):
        own = delta(i, i)
        for b, j in enumerate(tasks):
            matrix[a, b] = float((delta(j, i) / own).mean())
    return tasks, matrix


def format_interference(tasks: Sequence[str], matrix: np.ndarray) -> str:
    lines = ["rows: task i whose loss is affected; columns: task j whose gradient step is applied (1 on the diagonal)", "",
             "| i \\ j | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for t, row in zip(tasks, matrix):
        lines.append(f"| {t} | " + " | ".join("nan" if math.isnan(v) else f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)
