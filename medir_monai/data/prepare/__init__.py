"""``medir prepare``: the papers' public datasets -> training, validation and test folders in the authors' layout.

* :func:`prepare_ixi`: IXI T2 MRI (central 100 axial slices, k-space truncated LQ), split by subject;
* :func:`prepare_mayo`: AAPM-Mayo low-dose CT, full / quarter dose paired by slice position, split by patient;
* :func:`prepare_pet`: PET volumes in SUV cut along the papers' axis, given or simulated 1/12-dose LQ.

Each writes ``<out>/<MRI|CT|PET>/<train|validation|test>/<LQ|HQ>/`` plus ``<out>/prepare.json`` (settings, subject
-> split, finished subjects), is resumable and never overwrites (:mod:`.common`).
"""

from .common import DEFAULT_SPLIT, PREPARE_MANIFEST, PreparedLayout, parse_split, split_subjects
from .ixi import find_ixi_t2, prepare_ixi
from .mayo import MAYO_DEFAULT_SPLIT, MAYO_TEST_PATIENT, pair_mayo, prepare_mayo, scan_mayo
from .pet import find_pet_volumes, prepare_pet

__all__ = [
    "DEFAULT_SPLIT",
    "PREPARE_MANIFEST",
    "PreparedLayout",
    "parse_split",
    "split_subjects",
    "find_ixi_t2",
    "prepare_ixi",
    "MAYO_DEFAULT_SPLIT",
    "MAYO_TEST_PATIENT",
    "scan_mayo",
    "pair_mayo",
    "prepare_mayo",
    "find_pet_volumes",
    "prepare_pet",
]
