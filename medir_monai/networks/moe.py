"""Top-k expert dispatch shared by the mixture-of-experts modules.

AMIR's spatial MoE (:class:`~medir_monai.networks.amir.SpatialMoE`) routes every pixel token to its top-k experts,
DiffCode's global routing (:class:`~medir_monai.networks.diffcode.restoration.TaskGlobalRouting`) every image.
Both need the same thing: the outputs of each item's chosen experts, in the order of its top-k indices. Two ways
compute the same numbers:

* **sparse**: items grouped by expert (one stable ``argsort``), each expert runs on its own items, the outputs go
  back to their places (``index_copy``). Reading the group sizes is a host sync, cheap on CPU.
* **dense**: every expert on every item, then the chosen ones gathered: k / E of the work is used, but there is no
  host sync and no data-dependent shape, which is what accelerators, tracing and ``torch.compile`` need.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["DISPATCH_MODES", "dense_dispatch", "run_top_k_experts"]

#: ``"auto"``: sparse on CPU, dense on accelerators; ``"sparse"`` / ``"dense"``: always that one (tracing,
#: scripting and ``torch.compile`` use dense whatever the mode)
DISPATCH_MODES = ("auto", "sparse", "dense")


def dense_dispatch(mode: str, device: torch.device) -> bool:
    """Whether ``mode`` dispatches densely for items on ``device`` in the current execution context."""
    if mode == "dense" or torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    if mode == "auto" and device.type != "cpu":
        return True
    return bool(torch.compiler.is_compiling())


def run_top_k_experts(
    items: torch.Tensor,
    top_idx: torch.Tensor,
    experts: Sequence[nn.Module],
    dense: bool,
    skip_idle: bool = False,
) -> torch.Tensor:
    """Outputs of every item's chosen experts.

    Args:
        items: ``[N, *item_shape]``, e.g. tokens ``[N, C]`` or images ``[B, C, H, W]``.
        top_idx: ``[N, k]`` int64, the experts of each item (in the order the outputs should come).
        experts: the ``E`` expert modules; each maps ``[n, *item_shape]`` to the same shape.
        dense: run every expert on every item and gather (see the module docstring), else the sparse dispatch.
        skip_idle: sparse only: do not call an expert that no item chose (it then gets no gradient at all rather
            than a zero one: an optimiser leaves it untouched instead of stepping its moments).

    Returns:
        ``[N, k, *item_shape]``: entry ``[i, j]`` is ``experts[top_idx[i, j]](items[i])``.
    """
    n, k = top_idx.shape
    if dense:
        every = torch.stack([expert(items) for expert in experts], dim=1)  # [N, E, *item_shape]
        index = top_idx.view(n, k, *([1] * (items.ndim - 1))).expand(n, k, *every.shape[2:])
        return every.gather(1, index)
    flat_expert = top_idx.reshape(-1)  # [N*k]: assignment j belongs to item j // k
    order = torch.argsort(flat_expert, stable=True)
    routed = items.index_select(0, order // k)  # items grouped by expert
    counts = torch.bincount(flat_expert, minlength=len(experts)).tolist()  # host read (a sync on accelerators)
    outs = [
        expert(chunk)
        for expert, chunk in zip(experts, routed.split(counts, dim=0))
        if chunk.shape[0] or not skip_idle
    ]
    grouped = torch.cat(outs, dim=0)
    return torch.zeros_like(grouped).index_copy(0, order, grouped).view(n, k, *items.shape[1:])
