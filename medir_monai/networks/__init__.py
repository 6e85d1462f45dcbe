"""Networks: Restormer (baseline), AMIR, TAT and DiffCode. They know nothing about tasks, files or bundles."""

from .amir import AMIR
from .diffcode import DiffCode, DiffCodeAutoencoder, LatentDiffusion
from .official import load_official_state_dict
from .restormer import Restormer
from .tat import TAT

__all__ = ["AMIR", "DiffCode", "DiffCodeAutoencoder", "LatentDiffusion", "Restormer", "TAT", "load_official_state_dict"]
