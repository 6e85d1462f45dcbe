"""Training losses beyond plain L1 (docs/design.md, section 4), in one place.

* :mod:`.balancing`: TAT's sample-adaptive loss balancing (:class:`TATLossBalancing`), the task-level uncertainty
  weights (:class:`TaskUncertaintyLoss`) and AMIR's balance-loss building block (:func:`cv_squared`);
* :mod:`.restoration`: :class:`RestorationLoss`, the Restormer / AMIR / TAT objective behind MONAI's trainer;
* :mod:`.diffcode`: DiffCode's objective of each training stage.
"""

from .balancing import TATLossBalancing, TaskUncertaintyLoss, cv_squared, uncertainty_weighted
from .diffcode import CodebookStageLoss, DiffCodeCodebookLoss, DiffCodeLoss, LatentStageLoss
from .restoration import RestorationLoss

__all__ = [
    "CodebookStageLoss",
    "DiffCodeCodebookLoss",
    "DiffCodeLoss",
    "LatentStageLoss",
    "RestorationLoss",
    "TATLossBalancing",
    "TaskUncertaintyLoss",
    "cv_squared",
    "uncertainty_weighted",
]
