import pytest
import torch

from medir_monai.tasks import (
    TASKS,
    Task,
    UnknownTaskError,
    get_task,
    register_task,
    task_from_folder,
    task_from_modality,
    task_names,
)


def test_registry_holds_the_three_paper_tasks_with_design_ranges():
    assert task_names()[:3] == ["mri_sr", "ct_denoise", "pet_synthesis"]
    assert get_task("mri_sr").norm_range == (0.0, 4095.0)
    assert get_task("ct_denoise").norm_range == (-1024.0, 3071.0)
    assert get_task("ct_denoise").eval_window == (-160.0, 240.0)
    assert get_task("pet_synthesis").norm_range == (0.0, 20.0)
    assert get_task("pet_synthesis").slice_size == (192, 400)
    assert get_task("pet_synthesis").display_invert and get_task("pet_synthesis").display_window == (0.0, 5.0)
    assert get_task("mri_sr").central_slices == 100


def test_unknown_task_lists_known_ones():
    with pytest.raises(UnknownTaskError) as err:
        get_task("mri_sr8x")
    msg = str(err.value)
    assert "mri_sr8x" in msg and all(name in msg for name in ("mri_sr", "ct_denoise", "pet_synthesis"))


def test_lookup_by_folder_and_modality():
    assert task_from_folder("pet").name == "pet_synthesis"
    assert task_from_modality("CT").name == "ct_denoise"
    with pytest.raises(UnknownTaskError, match="US"):
        task_from_modality("US")


def test_normalise_roundtrip_and_clip():
    task = get_task("ct_denoise")
    hu = torch.tensor([-2000.0, -1024.0, 0.0, 3071.0, 5000.0])
    n = task.normalise(hu)
    assert n.min() == 0 and n.max() == 1
    assert torch.allclose(task.denormalise(n)[1:4], hu[1:4])


def test_adding_a_task_is_one_registry_entry():
    base = get_task("mri_sr")
    new = Task(**{**base.__dict__, "name": "mri_sr8x_test", "degradation_args": {"keep_fraction": 0.125}})
    try:
        register_task(new)
        assert get_task("mri_sr8x_test").index == len(TASKS) - 1
        with pytest.raises(ValueError, match="already registered"):
            register_task(new)
    finally:
        TASKS.pop("mri_sr8x_test", None)
