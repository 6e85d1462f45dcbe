"""Networks: Restormer (baseline), AMIR, TAT and DiffCode. They know nothing about tasks, files or bundles."""

from .amir import AMIR
from .official import load_official_state_dict
from .restormer import Restormer
from .tat import TAT

__all__ = ["AMIR", "Restormer", "TAT", "load_official_state_dict"]
