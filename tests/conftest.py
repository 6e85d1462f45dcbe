"""Shared test helpers: the reference fixtures live in ../shared/fixtures (docs/design.md, section 6)."""

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DIR = Path(os.environ.get("MEDIR_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


def load_fixture(name: str) -> dict:
    """Load a reference fixture; fail loudly (not skip) when it is missing."""
    path = FIXTURE_DIR / name
    if not path.is_file():
        pytest.fail(f"reference fixture {path} is missing (set MEDIR_FIXTURES to the folder holding it)")
    return torch.load(path, weights_only=True, map_location="cpu")


def pet_lesion_phantom():
    """A 64 x 64 PET slice (SUV, numpy float64): a body at 1 SUV on air (0), a 3-pixel-radius lesion at 8 SUV."""
    import numpy as np

    yy, xx = np.mgrid[:64, :64]
    hq = np.where((yy - 32) ** 2 + (xx - 32) ** 2 <= 28**2, 1.0, 0.0)
    hq[(yy - 20) ** 2 + (xx - 40) ** 2 <= 9] = 8.0
    return hq


def import_benchmark(name: str):
    """A script of ``benchmarks/`` (a folder, not a package) imported as a module, to test its functions."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.fixture
def fixture_loader():
    return load_fixture


def official_backbone_kwargs(cfg: dict) -> dict:
    """Constructor arguments of our Restormer-style models from the ``config`` of an authors' fixture."""
    return dict(
        in_channels=cfg["inp_channels"],
        out_channels=cfg["out_channels"],
        dim=cfg["dim"],
        num_blocks=cfg["num_blocks"],
        num_refinement_blocks=cfg["num_refinement_blocks"],
        heads=cfg["heads"],
        ffn_expansion_factor=cfg["ffn_expansion_factor"],
        bias=cfg["bias"],
        layer_norm_bias=cfg["LayerNorm_type"] == "WithBias",
    )


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_CHECKOUT_FOLDERS = ("bundles", "medir_monai", "transforms", "benchmarks", "docs", "scripts", "tests")


def _checkout_files() -> set[str]:
    """Every file of the checkout's own folders (``__pycache__`` aside), and its top-level files."""
    found = {str(p) for p in REPO_ROOT.iterdir() if p.is_file()}
    for folder in _CHECKOUT_FOLDERS:
        for dirpath, dirnames, filenames in os.walk(REPO_ROOT / folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            found.update(os.path.join(dirpath, name) for name in filenames)
    return found


@pytest.fixture(autouse=True)
def checkout_stays_clean():
    """Tests write only under temporary folders: a file a test leaves in the checkout fails that test."""
    before = _checkout_files()
    yield
    written = sorted(_checkout_files() - before)
    assert not written, f"the test wrote into the checkout: {written[:5]}"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """``(config, checkpoint)``: a dim-8 Restormer with random weights (seed 0) and the config override that sizes
    the restormer bundle to it, for running ``medir restore`` fast."""
    import json

    from medir_monai.networks import Restormer

    folder = tmp_path_factory.mktemp("tiny_bundle")
    torch.manual_seed(0)
    ckpt = folder / "model.pt"
    torch.save(Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1).state_dict(), ckpt)
    config = folder / "tiny.json"
    config.write_text(json.dumps({"network_def#dim": 8, "network_def#num_blocks": [1, 1, 1, 1],
                                  "network_def#num_refinement_blocks": 1, "patch_size": [32, 32]}))
    return config, ckpt
