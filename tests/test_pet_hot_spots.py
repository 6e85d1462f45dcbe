"""``benchmarks/pet_hot_spots.py``: the hot-spot measures that expose a PET model flattening lesions."""

import numpy as np
import pytest
from scipy import ndimage

from conftest import import_benchmark, pet_lesion_phantom


@pytest.fixture()
def hot_spots():
    return import_benchmark("pet_hot_spots")


def test_a_flattened_lesion_shows_in_the_hot_mean_peak_and_error_share(hot_spots):
    hq = pet_lesion_phantom()
    lesion = hq == 8.0
    halved = np.where(lesion, 4.0, hq)
    noisy_background = hq + np.where(lesion, 0.0, 0.1)
    blurred = ndimage.gaussian_filter(hq, 1.5)
    m = hot_spots.hot_spot_measures(hq, {"halved": halved, "background": noisy_background, "blurred": blurred})
    # the body's hottest 1 % (~25 of ~2,460 pixels) lies inside the 29-pixel lesion
    assert m["hq"]["hot_mean"] == pytest.approx(8.0) and m["hq"]["peak"] == 8.0
    assert 20 <= m["hq"]["hot_pixels"] <= lesion.sum()
    assert m["halved"]["hot_mean"] == pytest.approx(4.0) and m["halved"]["peak"] == 4.0
    assert 0.5 < m["halved"]["error_share_in_hot"] <= 1.0  # all its error is in the lesion, most in the hottest 1 %
    assert m["background"]["hot_mean"] == pytest.approx(8.0) and m["background"]["error_share_in_hot"] == 0.0
    assert m["blurred"]["hot_mean"] < 8.0 and m["blurred"]["peak"] < 8.0
    assert m["hq"]["hot_mean"] == hot_spots.hot_spot_measures(hq, {"same": hq})["same"]["hot_mean"]


def test_bad_input_is_named(hot_spots):
    hq = pet_lesion_phantom()
    with pytest.raises(ValueError, match="one shape"):
        hot_spots.hot_spot_measures(hq, {"cropped": hq[:32]})
    with pytest.raises(ValueError, match=r"fewer than 100 body pixels \(HQ > 0.25 SUV\)"):
        hot_spots.hot_spot_measures(np.zeros((64, 64)), {"zero": np.zeros((64, 64))})
    with pytest.raises(SystemExit, match="expected NAME=FILE"):
        hot_spots._parse_checkpoints(["tat"])
